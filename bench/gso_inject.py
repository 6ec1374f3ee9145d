"""Run inside the namespace: send 64 KiB GSO frames into a TAP for N seconds.

python gso_inject.py IFNAME SECONDS [GBITS]   (prints frames sent and Gbit/s)

With GBITS the frames are paced to that rate: a TAP gives no back-pressure
(a full queue drops), so an unpaced injector spins on the CPU it shares with
the receiving front-end and becomes the bound itself.
"""

import socket
import sys
import time

from frames import gso_frame_and_header

SOL_PACKET, PACKET_VNET_HDR = 263, 15

ifname, seconds = sys.argv[1], float(sys.argv[2])
gbits = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
s.bind((ifname, 0))
frame, hdr = gso_frame_and_header(10, to_host=False)
data = hdr + frame
interval = len(frame) * 8 / (gbits * 1e9) if gbits else 0.0
sent = 0
t0 = time.monotonic()
while (now := time.monotonic()) - t0 < seconds:
    if interval and t0 + sent * interval > now:
        time.sleep(t0 + sent * interval - now)  # ahead of the pace
    for _ in range(1 if interval else 32):
        try:
            s.send(data)
            sent += 1
        except OSError:
            time.sleep(0.0005)
elapsed = time.monotonic() - t0
print(f"injected {sent} frames, {sent * len(frame) * 8 / elapsed / 1e9:.2f} Gbit/s")
