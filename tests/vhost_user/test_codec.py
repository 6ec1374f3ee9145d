"""The sans-IO codec: bytes and fds in, frames and messages out. No sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from pyvhost.errors import (
    MalformedMessageError,
    ProtocolError,
    UnexpectedFdsError,
    UnknownRequestError,
)
from pyvhost.vhost_user.codec import Frame, MessageReader, decode_request, encode
from pyvhost.vhost_user.messages import (
    U64,
    ConfigSpace,
    Empty,
    Header,
    MemoryRegionDesc,
    MemoryTable,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    Request as R,
)


def frames_of(data: bytes, fds=None) -> list[Frame]:
    return MessageReader().feed(data, fds)


def decode(data: bytes, fds=None):
    [frame] = frames_of(data, fds or [])
    return decode_request(frame)


def raw(request: int, body: bytes, flags: int = VERSION) -> bytes:
    return Header(request, flags, len(body)).pack() + body


REGION = MemoryRegionDesc(0, 0x10000, 0x7F0000000000, 0)


# --- framing -------------------------------------------------------------------------


def test_the_header_is_request_flags_size_in_native_order():
    assert Header(5, VERSION | FLAG_NEED_REPLY, 40).pack() == struct.pack("=III", 5, 9, 40)


def test_a_message_fed_byte_by_byte_comes_out_whole():
    data = encode(R.SET_VRING_NUM, VringState(1, 256))
    reader = MessageReader()
    out = []
    for i in range(len(data)):
        assert reader.wanted() >= 1
        out += reader.feed(data[i : i + 1])
    [frame] = out
    assert decode_request(frame).payload == VringState(1, 256)


def test_the_reader_never_asks_past_the_current_message():
    reader = MessageReader()
    assert reader.wanted() == HEADER_SIZE
    reader.feed(Header(R.SET_VRING_NUM, VERSION, 8).pack())
    assert reader.wanted() == 8


def test_two_messages_in_one_read_are_two_frames():
    data = encode(R.SET_OWNER, Empty()) + encode(R.GET_FEATURES, Empty())
    assert [f.header.request for f in frames_of(data)] == [R.SET_OWNER, R.GET_FEATURES]


def test_fds_belong_to_the_message_they_arrived_with():
    reader = MessageReader()
    [frame] = reader.feed(encode(R.SET_VRING_KICK, VringFd(0, False)), [7])
    assert frame.fds == [7]
    [frame] = reader.feed(encode(R.SET_OWNER, Empty()))
    assert frame.fds == []


def test_an_oversized_body_is_skipped_and_the_stream_stays_in_step():
    reader = MessageReader()
    big = MAX_PAYLOAD_SIZE + 1
    [bad] = reader.feed(Header(R.SET_MEM_TABLE, VERSION, big).pack() + bytes(big))
    assert bad.body is None
    with pytest.raises(MalformedMessageError, match="larger than any"):
        decode_request(bad)
    [good] = reader.feed(encode(R.GET_FEATURES, Empty()))
    assert decode_request(good).request is R.GET_FEATURES


def test_an_oversized_body_is_never_buffered():
    reader = MessageReader()
    reader.feed(Header(R.SET_MEM_TABLE, VERSION, 1 << 30).pack())
    assert reader.wanted() == 65536  # read in bounded chunks, then dropped


# --- payloads round-trip ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (R.SET_FEATURES, U64(0x1_4000_0000)),
        (R.SET_VRING_NUM, VringState(3, 1024)),
        (R.SET_VRING_ADDR, VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)),
        (R.SET_VRING_CALL, VringFd(2, True)),
        (R.SET_MEM_TABLE, MemoryTable((REGION, MemoryRegionDesc(1 << 32, 4096, 1 << 40, 4096)))),
        (R.ADD_MEM_REG, SingleRegion(REGION)),
        (R.SET_CONFIG, ConfigSpace(6, 2, 0, b"\x01\x00")),
    ],
)
def test_every_payload_shape_round_trips(request_, payload):
    fds = {R.SET_MEM_TABLE: [3, 4], R.ADD_MEM_REG: [3]}.get(request_, [])
    msg = decode(encode(request_, payload, need_reply=True), fds)
    assert msg.payload == payload and msg.need_reply and msg.fds == fds


@settings(max_examples=200)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_vring_payloads_round_trip_any_values(index, num, addr):
    assert VringState.unpack(VringState(index, num).pack()) == VringState(index, num)
    a = VringAddr(index, num, addr, addr, addr, addr)
    assert VringAddr.unpack(a.pack()) == a


# --- what is refused ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (raw(R.SET_VRING_NUM, bytes(4)), MalformedMessageError, "4 bytes, expected 8"),
        (raw(R.SET_VRING_NUM, bytes(12)), MalformedMessageError, "12 bytes, expected 8"),
        (raw(R.SET_FEATURES, b""), MalformedMessageError, "expected 8"),
        (raw(R.GET_FEATURES, bytes(8)), MalformedMessageError, "expected 0"),
        (raw(R.SET_VRING_ADDR, bytes(39)), MalformedMessageError, "expected 40"),
        (raw(R.SET_OWNER, b"", flags=2), MalformedMessageError, "version 2"),
        (raw(R.SET_OWNER, b"", flags=VERSION | FLAG_REPLY), MalformedMessageError, "reply flag"),
        (raw(99, b""), UnknownRequestError, "request 99"),
        (raw(R.GET_INFLIGHT_FD, bytes(16)), UnknownRequestError, "GET_INFLIGHT_FD"),
        (raw(R.SET_VRING_KICK, struct.pack("=Q", 0x200)), MalformedMessageError, "reserved"),
        (
            raw(R.SET_MEM_TABLE, struct.pack("=II", 9, 0) + REGION.pack() * 9),
            MalformedMessageError,
            "9 regions",
        ),
        (
            raw(R.SET_MEM_TABLE, struct.pack("=II", 2, 0) + REGION.pack()),
            MalformedMessageError,
            "expected 72",
        ),
        (
            raw(R.SET_MEM_TABLE, struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 0, 0, 0, 0)),
            MalformedMessageError,
            "size 0",
        ),
        (
            raw(R.ADD_MEM_REG, bytes(8) + struct.pack("=QQQQ", 2**64 - 4096, 8192, 0, 0)),
            MalformedMessageError,
            "wraps",
        ),
        (
            raw(R.SET_CONFIG, struct.pack("=III", 0, 300, 0) + bytes(300)),
            MalformedMessageError,
            "at most 256",
        ),
        (
            raw(R.SET_CONFIG, struct.pack("=III", 0, 4, 0) + bytes(2)),
            MalformedMessageError,
            "config access of 4",
        ),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(data, error, match):
    with pytest.raises(error, match=match):
        decode(data)


def test_overlapping_regions_in_one_table_are_refused():
    table = MemoryTable((REGION, MemoryRegionDesc(0x8000, 0x10000, 1 << 40, 0)))
    with pytest.raises(MalformedMessageError, match="overlap"):
        decode(encode(R.SET_MEM_TABLE, table), [3, 4])


@pytest.mark.parametrize(
    ("request_", "payload", "fds", "match"),
    [
        (R.SET_OWNER, Empty(), [3], "carries 1 fds; it takes 0"),
        (R.SET_VRING_KICK, VringFd(0, False), [], "takes 1"),
        (R.SET_VRING_KICK, VringFd(0, True), [3], "takes 0"),
        (R.SET_MEM_TABLE, MemoryTable((REGION,)), [3, 4], "takes 1"),
        (R.ADD_MEM_REG, SingleRegion(REGION), [], "takes 1"),
        (R.REM_MEM_REG, SingleRegion(REGION), [3, 4], "takes 0 or 1"),
    ],
)
def test_a_request_with_the_wrong_number_of_fds_is_refused(request_, payload, fds, match):
    with pytest.raises(UnexpectedFdsError, match=match):
        decode(encode(request_, payload), fds)


def test_fds_the_kernel_had_to_drop_make_the_message_invalid():
    [frame] = MessageReader().feed(encode(R.SET_OWNER, Empty()), [], fds_truncated=True)
    with pytest.raises(UnexpectedFdsError, match="more fds"):
        decode_request(frame)


@settings(max_examples=500)
@given(st.binary(max_size=400), st.lists(st.integers(100, 200), max_size=3))
def test_arbitrary_bytes_only_ever_raise_protocol_errors(data, fds):
    reader = MessageReader()
    for frame in reader.feed(data, fds):
        try:
            decode_request(frame)
        except ProtocolError:
            pass


@settings(max_examples=300)
@given(st.sampled_from(list(R)), st.binary(max_size=300), st.integers(0, 15))
def test_every_request_with_a_random_body_decodes_or_is_refused(request_, body, flags):
    try:
        decode(raw(request_, body, flags=flags))
    except ProtocolError:
        pass
