"""Run inside the namespace: echo every experimental-ethertype frame back on IFNAME."""

import socket
import sys

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind((sys.argv[1], 0))
while True:
    data = s.recv(2048)
    s.send(data[6:12] + data[0:6] + data[12:])
