"""A hostile vhost-user front-end: random sequences of valid, mutated and
garbage messages, with fds of every kind, through a real socket.

Driven by a `random.Random` (hypothesis's `st.randoms()` in the fast test,
a seeded one for the soak run), so a failing sequence can be replayed from
its seed. It reconnects whenever the back-end hangs up, and keeps what a
real front-end would own (guest RAM, kick eventfds) so it can also write
random bytes into the rings it described and kick them.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import socket
import struct
import time

from pyvhost.testing.memfd import memfd
from pyvhost.vhost_user.codec import encode
from pyvhost.vhost_user.messages import (
    U64,
    ConfigSpace,
    Empty,
    Header,
    LogBase,
    MemoryRegionDesc,
    MemoryTable,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.vhost_user.protocol import Request as R

RAM_NAME = "pyvhost-fuzz-ram"  # memfds the back-end must not keep (leak checks)
RAM_SIZE = 1 << 20
FRONTEND_BASE = 0x7F00_0000_0000
_SCM_MAX_FDS = 8  # the protocol's limit per message


class HostileFrontend:
    """One hostile peer. `step()` sends one message (or pokes the rings)."""

    def __init__(self, path: str, rng: random.Random) -> None:
        self.path = path
        self.rng = rng
        self.ram_fd = memfd(RAM_SIZE, RAM_NAME)
        self.ram = mmap.mmap(self.ram_fd, RAM_SIZE)
        self.kicks: list[int] = []  # our copies of eventfds sent as kick fds
        self.rings: list[tuple[int, int, int, int]] = []  # (size, desc, avail, base) set up
        self.sock: socket.socket | None = None
        self.messages = 0
        self.hangups = 0  # reconnects after a send or receive failed (the peer was gone)
        self.replies = 0
        self.trace: list[str] = []  # what was sent, for a failure's report
        self.connect()

    # --- the connection -----------------------------------------------------------------

    def connect(self) -> None:
        self._disconnect()
        if hasattr(self, "trace"):
            self.trace.append("--reconnect--")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 10
        while True:
            try:
                s.connect(self.path)
                break
            except BlockingIOError:  # the listen backlog is full: the daemon is busy
                if time.monotonic() > deadline:
                    s.close()
                    raise
                time.sleep(0.01)
        # Blocking, no timeout: with one, Python would wait out MSG_DONTWAIT reads.
        self.sock = s
        if self.rng.random() < 0.8:
            self._handshake()  # most sessions get far enough for the rings to matter

    def _ask(self, request: R, payload=None) -> int | None:
        """A request whose u64 answer the fuzzer needs; None if none came."""
        self.sock.sendall(encode(request, payload or Empty()))
        self.sock.settimeout(5)
        try:
            data = b""
            while len(data) < 20:
                chunk = self.sock.recv(20 - len(data))
                if not chunk:
                    return None
                data += chunk
            return struct.unpack_from("=Q", data, 12)[0]
        except OSError:
            return None
        finally:
            self.sock.settimeout(None)

    def _handshake(self) -> None:
        """What QEMU sends first, with values the back-end offered: features,
        protocol features, owner, and the guest's RAM."""
        features = self._ask(R.GET_FEATURES)
        protocol = self._ask(R.GET_PROTOCOL_FEATURES) if features else None
        if features is None or protocol is None:
            return
        self.sock.sendall(encode(R.SET_PROTOCOL_FEATURES, U64(protocol & self.rng.getrandbits(64))))
        self.sock.sendall(encode(R.SET_OWNER, Empty()))
        self.sock.sendall(encode(R.SET_FEATURES, U64(features & ~self.rng.getrandbits(32))))
        table = MemoryTable((MemoryRegionDesc(0, RAM_SIZE, FRONTEND_BASE, 0),))
        self._send(encode(R.SET_MEM_TABLE, table), [os.dup(self.ram_fd)])

    def _start_ring(self) -> None:
        """A whole, valid ring set-up somewhere in the RAM (then poked at random)."""
        rng = self.rng
        index = rng.randrange(5)
        size = rng.choice((16, 64, 256))
        base = rng.randrange(0, RAM_SIZE - (64 << 10), 64 << 10)
        desc, avail = base, base + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        next_avail = rng.choice((0, 0, rng.getrandbits(16)))
        self.rings.append((size, desc, avail, next_avail))
        for data, fds in (
            (encode(R.SET_VRING_NUM, VringState(index, size)), []),
            (encode(R.SET_VRING_BASE, VringState(index, next_avail)), []),
            (
                encode(
                    R.SET_VRING_ADDR,
                    VringAddr(
                        index,
                        0,
                        FRONTEND_BASE + desc,
                        FRONTEND_BASE + used,
                        FRONTEND_BASE + avail,
                        0,
                    ),
                ),
                [],
            ),  # fmt: skip
            (encode(R.SET_VRING_CALL, VringFd(index, False)), [os.eventfd(0, os.EFD_CLOEXEC)]),
            (encode(R.SET_VRING_ENABLE, VringState(index, 1)), []),
        ):
            self._send(data, fds)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kicks.append(os.dup(kick))
        self._send(encode(R.SET_VRING_KICK, VringFd(index, False)), [kick])

    def _disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in self.kicks:
            os.close(fd)
        self.kicks.clear()
        if hasattr(self, "rings"):
            self.rings.clear()

    def _send(self, data: bytes, fds: list[int]) -> None:
        try:
            try:
                if fds:
                    self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               struct.pack(f"{len(fds)}i", *fds))])  # fmt: skip
                else:
                    self.sock.sendall(data)
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise
                self.hangups += 1
                self.connect()
                return
            self.messages += 1
            if len(data) >= 12:
                req, flags, size = struct.unpack_from("=III", data)
                self.trace.append(f"{req}/{flags:x}/{size}/{len(data) - 12}+{len(fds)}fds")
                if size > len(data) + 4096:
                    # The back-end now skips that many bytes: everything sent after
                    # would vanish into it. Start over instead.
                    self.connect()
                    return
            self._drain()
        finally:
            for fd in fds:  # the back-end has its own copies now
                os.close(fd)

    def _drain(self) -> None:
        """Read whatever the back-end answered (replies are not checked here:
        only that the back-end survives), so it never blocks on a full socket."""
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * 8),
                                                        socket.MSG_DONTWAIT)  # fmt: skip
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            for level, kind, fd_bytes in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for (fd,) in struct.iter_unpack("i", fd_bytes[: len(fd_bytes) // 4 * 4]):
                        os.close(fd)
            if not data:
                self.hangups += 1
                self.connect()
                return
            self.replies += 1

    def close(self) -> None:
        self._disconnect()
        self.ram.close()
        os.close(self.ram_fd)

    # --- fds of every kind --------------------------------------------------------------

    def _fd(self) -> int:
        kind = self.rng.choice(("eventfd", "eventfd", "eventfd", "pipe", "null", "small-memfd",
                                "ram", "socket"))  # fmt: skip
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        if kind == "null":
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        if kind == "small-memfd":
            return memfd(self.rng.choice((0, 1, 4096)), RAM_NAME)
        if kind == "ram":
            return os.dup(self.ram_fd)
        a, b = socket.socketpair()
        a.close()
        return b.detach()

    def _fds(self, usual: int) -> list[int]:
        """Mostly the count the request takes; sometimes none or too many."""
        r = self.rng.random()
        n = usual if r < 0.8 else (0 if r < 0.9 else self.rng.randint(1, _SCM_MAX_FDS))
        return [self._fd() for _ in range(n)]

    # --- numbers a front-end would send, and ones it would not --------------------------

    def _ring(self) -> int:
        return self.rng.choice((0, 1, 2, 3, self.rng.randint(0, 0xFFFF), 0xFFFFFFFF))

    def _size(self) -> int:
        return self.rng.choice((0, 1, 3, 8, 64, 256, 1024, 32768, 65536, self.rng.getrandbits(32)))

    def _guest(self) -> int:
        """A guest address: mostly inside the RAM, sometimes anywhere."""
        if self.rng.random() < 0.8:
            return self.rng.randrange(0, RAM_SIZE, 16)
        return self.rng.getrandbits(64)

    def _region(self) -> MemoryRegionDesc:
        gpa = self.rng.choice((0, 0, RAM_SIZE // 2, self.rng.getrandbits(48)))
        size = self.rng.choice(
            (RAM_SIZE, RAM_SIZE, RAM_SIZE * 2, 4096, 0, self.rng.getrandbits(40))
        )
        offset = self.rng.choice((0, 0, 4096, RAM_SIZE, self.rng.getrandbits(40)))
        return MemoryRegionDesc(gpa, size, FRONTEND_BASE + gpa, offset)

    # --- messages ---------------------------------------------------------------------

    def _valid(self) -> tuple[bytes, list[int]]:
        rng = self.rng
        need_reply = rng.random() < 0.5
        choice = rng.randrange(24)
        fds: list[int] = []
        if choice == 0:
            req, payload = R.GET_FEATURES, Empty()
        elif choice == 1:
            req, payload = (
                R.SET_FEATURES,
                U64(
                    rng.getrandbits(64)
                    & rng.choice(
                        (0x1_7000_0000, 0x1_4000_0000 | rng.getrandbits(32), rng.getrandbits(64))
                    )
                ),
            )
        elif choice == 2:
            req, payload = R.GET_PROTOCOL_FEATURES, Empty()
        elif choice == 3:
            req, payload = R.SET_PROTOCOL_FEATURES, U64(rng.getrandbits(20))
        elif choice == 4:
            req, payload = R.SET_OWNER, Empty()
        elif choice == 5:
            n = rng.choice((1, 1, 2, 0, 9))
            regions = tuple(self._region() for _ in range(n))
            req, payload, fds = R.SET_MEM_TABLE, MemoryTable(regions), self._fds(n)
        elif choice == 6:
            req, payload = R.SET_VRING_NUM, VringState(self._ring(), self._size())
        elif choice == 7:
            req, payload = (
                R.SET_VRING_BASE,
                VringState(self._ring(), rng.getrandbits(rng.choice((16, 32)))),
            )
        elif choice == 8:
            addrs = [FRONTEND_BASE + self._guest() if rng.random() < 0.9 else rng.getrandbits(64)
                     for _ in range(3)]  # fmt: skip
            req, payload = (
                R.SET_VRING_ADDR,
                VringAddr(
                    self._ring(), rng.choice((0, 1, rng.getrandbits(32))), *addrs, self._guest()
                ),
            )
        elif choice in (9, 10, 11):
            req = (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR)[choice - 9]
            no_fd = rng.random() < 0.1
            payload = VringFd(self._ring(), no_fd)
            fds = self._fds(0 if no_fd else 1)
            if req == R.SET_VRING_KICK:
                self.kicks += [os.dup(fd) for fd in fds]  # to kick later, whatever it is
        elif choice == 12:
            req, payload = R.SET_VRING_ENABLE, VringState(self._ring(), rng.choice((0, 1, 2)))
        elif choice == 13:
            req, payload = R.GET_VRING_BASE, VringState(self._ring(), 0)
        elif choice == 14:
            req, payload, fds = R.ADD_MEM_REG, SingleRegion(self._region()), self._fds(1)
        elif choice == 15:
            req, payload = R.REM_MEM_REG, SingleRegion(self._region())
        elif choice == 16:
            size = rng.choice((0, 4, 12, 256, 4096))
            req, payload = (
                R.GET_CONFIG,
                ConfigSpace(rng.choice((0, 6, 8, 0xFFFFFFF0)), size, 0, bytes(size)),
            )
        elif choice == 17:
            data = rng.randbytes(rng.choice((0, 2, 6, 64)))
            req, payload = (
                R.SET_CONFIG,
                ConfigSpace(rng.choice((0, 6, 10)), len(data), rng.choice((0, 1)), data),
            )
        elif choice == 18:
            size = rng.choice((8, 64, RAM_SIZE // 4096 // 8, 12, 1 << 30))
            req, payload, fds = (
                R.SET_LOG_BASE,
                LogBase(size, rng.choice((0, 8, 4096, 3))),
                self._fds(1),
            )
        elif choice == 19:
            req, payload, fds = R.SET_LOG_FD, Empty(), self._fds(1)
        elif choice == 20:
            req, payload = (
                R.NET_SET_MTU,
                U64(rng.choice((68, 1500, 9000, 0, 65536, rng.getrandbits(64)))),
            )
        elif choice == 21:
            req, payload = R.SEND_RARP, U64(rng.getrandbits(48))
        elif choice == 22:
            req, payload = rng.choice(
                (
                    (R.SET_STATUS, U64(rng.getrandbits(8))),
                    (R.GET_STATUS, Empty()),
                    (R.RESET_DEVICE, Empty()),
                    (R.GET_QUEUE_NUM, Empty()),
                    (R.GET_MAX_MEM_SLOTS, Empty()),
                )
            )
        else:
            req, payload, fds = R.SET_BACKEND_REQ_FD, Empty(), self._fds(1)
        return encode(req, payload, need_reply=need_reply), fds

    def _mutated(self) -> tuple[bytes, list[int]]:
        data, fds = self._valid()
        data = bytearray(data)
        rng = self.rng
        how = rng.randrange(5)
        if how == 0:  # flip bytes anywhere
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
        elif how == 1:  # a size field that lies
            struct.pack_into("=I", data, 8, rng.choice((0, 1, len(data), 0x1000, 0xFFFFFFFF)))
        elif how == 2:  # flags: reply bit, wrong version, random
            struct.pack_into("=I", data, 4, rng.choice((0x5, 0x2, 0x0, 0xD, rng.getrandbits(32))))
        elif how == 3:  # cut short (the next message then arrives inside this one)
            data = data[: rng.randrange(len(data))]
        else:  # trailing garbage
            data += rng.randbytes(rng.randint(1, 64))
        return bytes(data), fds

    def _garbage(self) -> tuple[bytes, list[int]]:
        rng = self.rng
        if rng.random() < 0.5:  # a header for any request, then anything
            h = Header(rng.randrange(64), rng.choice((1, 5, 9)), rng.randint(0, 300))
            return h.pack() + rng.randbytes(rng.randint(0, 300)), self._fds(0)
        return rng.randbytes(rng.randint(1, 512)), self._fds(0)

    def _poke_rings(self) -> None:
        """Random bytes over the RAM where rings were described, then kick them all.
        Half the time a ring gets a believable avail index over random descriptors
        and heads, so the device walks hostile chains instead of refusing the index."""
        rng = self.rng
        if self.rings and rng.random() < 0.5:
            size, desc, avail, base = rng.choice(self.rings)
            for i in range(size):  # descriptors: in memory or not, chained, looped, indirect
                addr = rng.randrange(RAM_SIZE) if rng.random() < 0.7 else rng.getrandbits(64)
                length = rng.choice((0, 1, 12, 64, 1500, 4096, 65536, rng.getrandbits(32)))
                flags = rng.getrandbits(3) if rng.random() < 0.9 else rng.getrandbits(16)
                nxt = rng.randrange(size) if rng.random() < 0.9 else rng.getrandbits(16)
                struct.pack_into("<QIHH", self.ram, desc + 16 * i, addr, length, flags, nxt)
            for i in range(size):
                head = rng.randrange(size) if rng.random() < 0.95 else rng.getrandbits(16)
                struct.pack_into("<H", self.ram, avail + 4 + 2 * i, head)
            struct.pack_into("<H", self.ram, avail + 2, (base + rng.randint(1, size)) & 0xFFFF)
        else:
            for _ in range(rng.randint(1, 16)):
                off = rng.randrange(0, RAM_SIZE - 4096)
                self.ram[off : off + 4096] = rng.randbytes(4096)
        for fd in self.kicks:
            with contextlib.suppress(OSError):
                os.write(fd, (1).to_bytes(8, "little"))
        self._drain()

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.1:
            self._start_ring()
            return
        if r < 0.6:
            data, fds = self._valid()
        elif r < 0.85:
            data, fds = self._mutated()
        elif r < 0.95:
            data, fds = self._garbage()
        else:
            self._poke_rings()
            return
        self._send(data, fds)
