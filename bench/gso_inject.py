"""Run inside the namespace: send 64 KiB GSO frames into a TAP for N seconds.

python gso_inject.py IFNAME SECONDS     (prints frames sent and Gbit/s)
"""

import socket
import sys
import time

from frames import gso_frame_and_header

SOL_PACKET, PACKET_VNET_HDR = 263, 15

ifname, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
s.bind((ifname, 0))
frame, hdr = gso_frame_and_header(10, to_host=False)
data = hdr + frame
sent = 0
t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    for _ in range(32):
        try:
            s.send(data)
            sent += 1
        except OSError:
            time.sleep(0.0005)
elapsed = time.monotonic() - t0
print(f"injected {sent} frames, {sent * len(frame) * 8 / elapsed / 1e9:.2f} Gbit/s")
