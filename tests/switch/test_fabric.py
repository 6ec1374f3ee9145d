"""The switch's forwarding, as the 802.1D/802.1Q rules and pyvhost's hooks say it should be."""

from __future__ import annotations

import struct

import pytest

from pyvhost.devices.net import spec
from pyvhost.hooks import DROP, LoadedHook, Redirect
from pyvhost.switch.fabric import Port, PortConfig, Switch
from pyvhost.switch.frame import (
    ALL_OFFLOADS,
    TUN_F_CSUM,
    Frame,
    VnetHeader,
    ones_complement_sum,
)
from pyvhost.testing.frames import tcp4_frame

A, B, C = (bytes.fromhex(f"5254000000{i:02x}") for i in (1, 2, 3))
BCAST = b"\xff" * 6


class FakePort(Port):
    """A port that records what the switch hands it."""

    kind = "fake"

    def __init__(self, config: PortConfig, room: bool = True, up: bool = True) -> None:
        super().__init__(config)
        self.got: list[bytes] = []
        self.headers: list[VnetHeader] = []
        self.room = room
        self._up = up
        self.offloads = ALL_OFFLOADS

    @property
    def up(self) -> bool:
        return self._up

    def transmit(self, frame: Frame) -> bool:
        if not self.room:
            return False
        self.got.append(frame.tobytes())
        self.headers.append(frame.header)
        return True


def eth(dst: bytes, src: bytes, payload: bytes = b"hello", tag: int | None = None) -> bytes:
    vlan = b"\x81\x00" + tag.to_bytes(2, "big") if tag is not None else b""
    return dst + src + vlan + b"\x88\xb5" + payload


def send(sw: Switch, port: Port, data: bytes, header: VnetHeader | None = None) -> None:
    sw.ingress(port, Frame(header or VnetHeader(), [memoryview(data)]))


@pytest.fixture
def sw():
    clock = [0.0]
    s = Switch(ageing_s=300, clock=lambda: clock[0])
    s.clock_value = clock
    return s


def ports(sw: Switch, *configs: PortConfig) -> list[FakePort]:
    out = []
    for c in configs:
        p = FakePort(c)
        sw.add_port(p)
        out.append(p)
    return out


def test_unknown_unicast_floods_and_the_answer_is_switched_to_the_learned_port(sw):
    a, b, c = ports(sw, PortConfig("a"), PortConfig("b"), PortConfig("c"))
    send(sw, a, eth(B, A))
    assert b.got == c.got == [eth(B, A)] and a.got == []  # flooded, never back out of a
    send(sw, b, eth(A, B))
    assert a.got == [eth(A, B)] and c.got == [eth(B, A)]  # A was learned on a: no flood
    send(sw, a, eth(B, A, b"again"))
    assert b.got[-1] == eth(B, A, b"again") and len(c.got) == 1


def test_broadcast_reaches_every_other_port(sw):
    a, b, c = ports(sw, PortConfig("a"), PortConfig("b"), PortConfig("c"))
    send(sw, a, eth(BCAST, A))
    assert b.got == c.got == [eth(BCAST, A)] and a.got == []


def test_learned_addresses_age_out(sw):
    a, b, c = ports(sw, PortConfig("a"), PortConfig("b"), PortConfig("c"))
    send(sw, a, eth(BCAST, A))
    sw.clock_value[0] = 299
    send(sw, b, eth(A, B))
    assert len(c.got) == 1  # still known: switched to a only
    sw.clock_value[0] = 300 + 299.5
    send(sw, b, eth(A, B))
    assert len(c.got) == 2  # aged out: flooded


def test_a_moved_address_is_relearned(sw):
    a, b, c = ports(sw, PortConfig("a"), PortConfig("b"), PortConfig("c"))
    send(sw, a, eth(BCAST, A))
    send(sw, c, eth(BCAST, A))  # A now sends from c (a VM migrated)
    send(sw, b, eth(A, B))
    assert c.got[-1] == eth(A, B) and eth(A, B) not in a.got


def test_access_vlans_are_isolated(sw):
    a, b, c = ports(
        sw, PortConfig("a", vlan=10), PortConfig("b", vlan=10), PortConfig("c", vlan=20)
    )
    send(sw, a, eth(BCAST, A))
    assert b.got == [eth(BCAST, A)] and c.got == []
    send(sw, c, eth(A, C))
    assert a.got == [] and c.counters.rx_packets == 1


def test_a_tagged_frame_on_an_access_port_is_dropped(sw):
    a, b = ports(sw, PortConfig("a", vlan=10), PortConfig("b", vlan=10))
    send(sw, a, eth(BCAST, A, tag=10))
    assert b.got == [] and a.counters.drops["vlan"] == 1


def test_a_trunk_carries_its_vlans_tagged_and_its_native_one_untagged(sw):
    a, b, t = ports(
        sw,
        PortConfig("a", vlan=10),
        PortConfig("b", vlan=30),
        PortConfig("t", trunk=frozenset({10, 20}), native=30),
    )
    send(sw, a, eth(BCAST, A, b"x"))
    assert t.got == [eth(BCAST, A, b"x", tag=10)]  # tagged on the way out
    send(sw, b, eth(BCAST, B, b"y"))
    assert t.got[-1] == eth(BCAST, B, b"y")  # native: untagged
    send(sw, t, eth(BCAST, C, b"z", tag=10))
    assert a.got == [eth(BCAST, C, b"z")] and b.got == []  # the tag comes off
    send(sw, t, eth(BCAST, C, b"w", tag=99))
    assert t.counters.drops["vlan"] == 1 and len(a.got) == 1  # not carried


def test_frames_over_the_receiving_ports_mtu_are_dropped(sw):
    a, b = ports(sw, PortConfig("a", mtu=9000), PortConfig("b", mtu=1500))
    send(sw, a, eth(BCAST, A, bytes(1400)))
    send(sw, a, eth(BCAST, A, bytes(3000)))
    assert len(b.got) == 1 and b.counters.drops["mtu"] == 1


def test_a_locked_port_only_sends_from_its_own_mac(sw):
    a, b = ports(sw, PortConfig("a", mac=A, mac_policy="lock"), PortConfig("b"))
    send(sw, a, eth(BCAST, A))
    send(sw, a, eth(BCAST, C))  # spoofed
    assert b.got == [eth(BCAST, A)] and a.counters.drops["spoofed"] == 1


def test_ring_full_and_port_down_are_counted(sw):
    a, b = ports(sw, PortConfig("a"), PortConfig("b"))
    b.room = False
    send(sw, a, eth(B, A))
    assert b.counters.drops["no-room"] == 1
    send(sw, b, eth(BCAST, B))  # b learned; b's side then goes away
    b._up = False
    send(sw, a, eth(B, A))
    assert b.counters.drops["port-down"] == 1


def hook(fn) -> LoadedHook:
    return LoadedHook(f"test:{fn.__name__}", fn)


def test_hooks_drop_replace_and_redirect(sw):
    a, b, c = ports(sw, PortConfig("a"), PortConfig("b"), PortConfig("c"))
    seen = []

    def watch(frame, ctx):
        seen.append((ctx.port, ctx.direction, bytes(frame)))

    def no_payload_x(frame, ctx):
        return DROP if bytes(frame).endswith(b"x") else None

    def upper(frame, ctx):
        return bytes(frame)[:-1] + bytes(frame)[-1:].upper()

    def to_c(frame, ctx):
        return Redirect("c") if bytes(frame).endswith(b"r") else None

    a.hooks = [hook(watch), hook(no_payload_x), hook(to_c)]
    b.hooks = [hook(upper)]
    send(sw, a, eth(B, A, b"x"))
    assert b.got == [] and a.counters.drops["hook"] == 1
    send(sw, a, eth(B, A, b"y"))
    assert b.got == [eth(B, A, b"Y")]  # b's "out" hook replaced it
    assert c.got == [eth(B, A, b"y")]  # flooded (B unknown) without b's hook
    send(sw, a, eth(B, A, b"r"))
    assert c.got[-1] == eth(B, A, b"r") and len(b.got) == 1  # redirected to c only
    assert seen[0] == ("a", "in", eth(B, A, b"x"))


def test_a_hook_that_raises_drops_its_frame_and_the_switch_goes_on(sw, caplog):
    a, b = ports(sw, PortConfig("a"), PortConfig("b"))

    def broken(frame, ctx):
        raise KeyError("oops")

    a.hooks = [hook(broken)]
    send(sw, a, eth(BCAST, A))
    assert b.got == [] and a.counters.drops["hook-error"] == 1
    assert "oops" in caplog.text and "Traceback" in caplog.text
    a.hooks = []
    send(sw, a, eth(BCAST, A))
    assert b.got == [eth(BCAST, A)]


def tcp_checksum_ok(seg: bytes) -> bool:
    ip = seg[14:34]
    tcp = seg[34:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    return ones_complement_sum(tcp, ones_complement_sum(pseudo)) == 0xFFFF


def test_gso_frames_are_segmented_for_a_port_without_tso(sw):
    a, b, c = ports(sw, PortConfig("a", mtu=65535), PortConfig("b"), PortConfig("c", mtu=65535))
    b.offloads = 0  # a guest that negotiated no receive offloads
    big = tcp4_frame(10000, A, BCAST)
    header = VnetHeader(spec.HDR_F_NEEDS_CSUM, spec.GSO_TCPV4, 54, 1448, 34, 16)
    send(sw, a, big, header)
    assert c.got == [big] and c.headers[0] == header  # kept whole where taken
    assert len(b.got) == 7 and all(len(s) <= 1514 for s in b.got)
    assert all(tcp_checksum_ok(s) for s in b.got)
    assert b"".join(s[54:] for s in b.got) == big[54:]  # the payload, in order
    seqs = [int.from_bytes(s[38:42], "big") for s in b.got]
    assert seqs == [1 + 1448 * i for i in range(7)]


def test_a_partial_checksum_is_completed_for_a_port_without_csum(sw):
    a, b = ports(sw, PortConfig("a"), PortConfig("b"))
    b.offloads = 0
    frame = tcp4_frame(500, A, BCAST)
    ip = frame[14:34]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(frame) - 34)
    partial = ones_complement_sum(pseudo).to_bytes(2, "big")
    frame = frame[:50] + partial + frame[52:]
    send(sw, a, frame, VnetHeader(spec.HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16))
    [got] = b.got
    assert tcp_checksum_ok(got) and b.headers[0].flags == 0
    b.offloads = TUN_F_CSUM
    send(sw, a, frame, VnetHeader(spec.HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16))
    assert b.got[-1] == frame  # left to the receiver, who takes it
