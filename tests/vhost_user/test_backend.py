"""The back-end state machine, fed requests as bytes, with no socket."""

from __future__ import annotations

import os

import pytest

from pyvhost.testing import GuestRam
from pyvhost.testing.memfd import fds_named, mappings_named, memfd
from pyvhost.vhost_user.backend import OFFERED_PROTOCOL_FEATURES
from pyvhost.vhost_user.messages import (
    U64,
    ConfigSpace,
    MemoryRegionDesc,
    MemoryTable,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.vhost_user.protocol import ProtocolFeature as PF, Request as R, mask

from .conftest import FRONTEND_BASE, PROTOCOL_FEATURES_BIT, own_fds

ACK = mask(PF.REPLY_ACK)
ALL = OFFERED_PROTOCOL_FEATURES


def test_features_offer_the_device_bits_and_protocol_features(session):
    offered = session.send(R.GET_FEATURES).value
    assert offered & PROTOCOL_FEATURES_BIT
    assert offered & (1 << 32)  # VERSION_1, from the device


def test_the_offered_protocol_features_are_the_documented_set(session):
    got = session.send(R.GET_PROTOCOL_FEATURES).value
    want = mask(
        PF.MQ,
        PF.LOG_SHMFD,
        PF.REPLY_ACK,
        PF.NET_MTU,
        PF.CONFIG,
        PF.RESET_DEVICE,
        PF.CONFIGURE_MEM_SLOTS,
        PF.STATUS,
        PF.RARP,
        PF.BACKEND_REQ,
    )
    assert got == want


def test_acking_features_never_offered_is_refused(session):
    session.send(R.SET_PROTOCOL_FEATURES, U64(ACK))
    assert session.send(R.SET_FEATURES, U64(1 << 63), need_reply=True) == U64(1)
    assert session.backend.acked_features == 0


def test_acking_protocol_features_never_offered_is_refused(session):
    session.send(R.SET_PROTOCOL_FEATURES, U64(1 << PF.PAGEFAULT))
    assert session.backend.acked_protocol_features == 0


def test_reply_ack_answers_zero_for_success(session):
    session.send(R.SET_PROTOCOL_FEATURES, U64(ACK))
    assert session.send(R.SET_OWNER, need_reply=True) == U64(0)


def test_without_reply_ack_need_reply_gets_no_answer(session):
    assert session.send(R.SET_OWNER, need_reply=True) is None


def test_a_request_gated_by_an_unnegotiated_feature_is_refused(session):
    assert session.send(R.GET_QUEUE_NUM) == "empty"
    session.send(R.SET_PROTOCOL_FEATURES, U64(mask(PF.MQ)))
    assert session.send(R.GET_QUEUE_NUM) == U64(2)


def test_set_vring_enable_needs_protocol_features(session):
    session.send(R.SET_FEATURES, U64(1 << 32))
    assert session.send(R.SET_VRING_ENABLE, VringState(0, 1)) is None  # refused, no ack asked
    assert not session.backend.vrings[0].enabled


def test_set_protocol_features_alone_negotiates_them_as_qemu_expects(session, device, ram):
    # QEMU 7.2: SET_PROTOCOL_FEATURES, then SET_VRING_ENABLE, and only later
    # SET_FEATURES. The spec: protocol features need no SET_FEATURES ack.
    session.send(R.GET_FEATURES)
    session.send(R.SET_PROTOCOL_FEATURES, U64(ALL))
    assert session.send(R.SET_VRING_ENABLE, VringState(0, 1), need_reply=True) == U64(0)
    session.send(R.SET_FEATURES, U64(1 << 32))
    session.share(ram)
    session.start_ring(ram, 0)
    assert device.events == [("started", 0), ("enabled", 0)]


def test_the_enable_state_outlives_a_stop(session, device, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    session.send(R.SET_VRING_ENABLE, VringState(0, 1))
    session.start_ring(ram, 0)
    session.send(R.GET_VRING_BASE, VringState(0, 0))
    session.send(R.SET_VRING_KICK, VringFd(0, False), [session.eventfd()])
    assert device.events[-2:] == [("started", 0), ("enabled", 0)]


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (R.SET_VRING_NUM, VringState(2, 16)),
        (R.SET_VRING_BASE, VringState(7, 0)),
        (R.SET_VRING_ADDR, VringAddr(2, 0, 0, 0, 0)),
        (R.SET_VRING_ENABLE, VringState(255, 1)),
    ],
)
def test_a_ring_index_past_the_device_is_refused(session, request_, payload):
    session.negotiate(protocol=ALL)
    assert session.send(request_, payload, need_reply=True) == U64(1)
    assert "does not exist" in str(session.backend.errors) or session.backend.errors == 1


def test_get_vring_base_on_a_missing_ring_gets_an_empty_reply(session):
    assert session.send(R.GET_VRING_BASE, VringState(9, 0)) == "empty"


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_a_ring_size_that_is_not_a_power_of_two_is_refused(session, size):
    session.send(R.SET_PROTOCOL_FEATURES, U64(ACK))
    assert session.send(R.SET_VRING_NUM, VringState(0, size), need_reply=True) == U64(1)


def test_with_protocol_features_a_ring_starts_disabled(session, device, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    session.start_ring(ram, 0)
    assert device.events == [("started", 0)]
    session.send(R.SET_VRING_ENABLE, VringState(0, 1))
    assert device.events[-1] == ("enabled", 0)


def test_without_protocol_features_a_ring_starts_enabled(session, device, ram):
    session.negotiate(features=1 << 32)
    session.share(ram)
    session.start_ring(ram, 0)
    assert device.events == [("started", 0), ("enabled", 0)]


def test_a_kick_reaches_the_device(session, device, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 1)
    driver.add(readable=[(ram.alloc(64), 64)])
    driver.kick()
    session.run()
    assert len(device.held[1]) == 1


def test_a_new_call_fd_on_a_running_ring_is_signalled_once(session, ram):
    """A signal sent to the old fd after the front-end stopped watching it
    (QEMU 10 with MSI-X, after a back-end reconnects) must not stall the driver."""
    session.negotiate(protocol=ALL)
    session.share(ram)
    session.start_ring(ram, 1)
    new = session.eventfd()
    session.send(R.SET_VRING_CALL, VringFd(1, False), [new])
    assert os.eventfd_read(new) == 1


def test_a_call_fd_set_before_the_ring_starts_is_not_signalled(session):
    fd = session.eventfd()
    session.send(R.SET_VRING_CALL, VringFd(1, False), [fd])
    with pytest.raises(BlockingIOError):
        os.eventfd_read(fd)


def test_get_vring_base_stops_the_ring_and_reports_the_next_index(session, device, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 1)
    for _ in range(5):
        driver.add(readable=[(ram.alloc(64), 64)])
    driver.kick()
    session.run()
    device.complete(1)
    assert session.send(R.GET_VRING_BASE, VringState(1, 0)) == VringState(1, 5)
    assert device.events[-1] == ("stopped", 1)
    assert not session.backend.vrings[1].started
    assert session.backend.vrings[1].kick_fd is None  # the kick fd went with it


def test_a_ring_restarts_at_the_base_it_is_given(session, device, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 1)
    for _ in range(3):
        driver.add(readable=[(ram.alloc(8), 8)])
    driver.kick()
    session.run()
    device.complete(1)
    base = session.send(R.GET_VRING_BASE, VringState(1, 0)).num
    session.send(R.SET_VRING_BASE, VringState(1, base))
    session.send(R.SET_VRING_KICK, VringFd(1, False), [session.eventfd()])
    assert device.started[1][0].next_avail == 3  # the queue the device was given


def test_a_ring_without_a_kick_fd_is_polled(session, device, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 0)
    session.send(R.SET_VRING_KICK, VringFd(0, True))
    assert session.backend.vrings[0].polled
    driver.add(writable=[(ram.alloc(8), 8)])
    driver.publish()  # no kick at all
    session.run()
    assert len(device.held[0]) == 1


def err_signalled(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def broken_ring(session, ram, index: int):
    """A started ring with an error eventfd, whose driver has published an
    avail index more than a queue ahead (hostile input)."""
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, index, size=8)
    err = session.eventfd()
    os.set_blocking(err, False)
    session.send(R.SET_VRING_ERR, VringFd(index, False), [err])
    driver.set_avail_idx(9)
    return driver, err


def test_a_ring_broken_on_a_kick_signals_its_error_eventfd(session, device, ram, caplog):
    driver, err = broken_ring(session, ram, 1)
    os.eventfd_write(driver.kick_fd, 1)  # kick() would publish its own, sane, index
    session.run()
    assert err_signalled(err)
    assert "9 entries ahead" in session.backend.vrings[1].errors[0]


def test_a_ring_broken_outside_a_kick_also_signals_its_error_eventfd(session, device, ram, caplog):
    # A device drives its rings from host events too (a TAP with frames for an
    # RX ring, a busy poller): the error is reported whoever found it.
    driver, err = broken_ring(session, ram, 0)
    queue = device.started[0][0]
    assert queue.pop() is None
    assert err_signalled(err)
    queue.pop()  # still broken: reported once
    assert not err_signalled(err)
    assert len(session.backend.vrings[0].errors) == 1


def test_a_kick_fd_that_is_not_an_eventfd_is_refused_and_closed(session, ram):
    session.negotiate(protocol=ALL)
    r, w = os.pipe()
    before = own_fds()
    assert session.send(R.SET_VRING_KICK, VringFd(0, False), [r], need_reply=True) == U64(1)
    assert own_fds() == before
    os.close(r)
    os.close(w)


def test_a_kick_before_ring_addresses_is_refused(session):
    session.negotiate(protocol=ALL)
    fd = session.eventfd()
    assert session.send(R.SET_VRING_KICK, VringFd(0, False), [fd], need_reply=True) == U64(1)


def test_ring_addresses_outside_shared_memory_are_refused(session, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    session.send(R.SET_VRING_NUM, VringState(0, 16))
    session.send(R.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x2000, 0x3000))  # not frontend addrs
    fd = session.eventfd()
    assert session.send(R.SET_VRING_KICK, VringFd(0, False), [fd], need_reply=True) == U64(1)


def test_the_memory_table_fd_count_must_match_and_fds_are_closed(session, ram):
    session.negotiate(protocol=ALL)
    table = MemoryTable((MemoryRegionDesc(0, ram.size, FRONTEND_BASE, 0),))
    before = own_fds()
    extra = memfd(4096)
    assert session.send(R.SET_MEM_TABLE, table, [ram.fd, extra], need_reply=True) == U64(1)
    assert own_fds() == before | {extra}
    os.close(extra)


def test_a_memory_table_whose_file_is_too_small_is_refused(session):
    session.negotiate(protocol=ALL)
    table = MemoryTable((MemoryRegionDesc(0, 1 << 20, FRONTEND_BASE, 0),))
    fd = memfd(4096, "pyvhost-test-short")
    assert session.send(R.SET_MEM_TABLE, table, [fd], need_reply=True) == U64(1)
    assert len(session.backend.memory) == 0
    os.close(fd)


def test_a_new_memory_table_moves_running_rings_with_it(session, device, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 1)
    session.share(ram)  # QEMU re-sends the table on every memory change
    driver.add(readable=[(ram.alloc(8), 8)])
    driver.kick()
    session.run()
    assert len(device.held[1]) == 1


def test_buffers_in_flight_keep_a_removed_region_mapped_until_they_complete(session, device):
    session.negotiate(protocol=ALL)
    with GuestRam(1 << 20) as ram:
        session.share(ram)
        driver = session.start_ring(ram, 1)
        dimm = GuestRam(1 << 16, guest_base=1 << 32, name="pyvhost-test-dimm", memory=ram.memory)
        desc = MemoryRegionDesc(1 << 32, 1 << 16, FRONTEND_BASE + (1 << 32), 0)
        assert session.send(R.ADD_MEM_REG, SingleRegion(desc), [dimm.fd], need_reply=True) == U64(0)
        driver.add(readable=[(1 << 32, 64)])
        ram.memory.write(1 << 32, b"in flight")
        driver.kick()
        session.run()
        [chain] = device.held[1]

        assert session.send(R.REM_MEM_REG, SingleRegion(desc), need_reply=True) == U64(0)
        assert not any(r.start == 1 << 32 for r in session.backend.memory.regions)
        assert bytes(chain.readable[0][:9]) == b"in flight"  # still mapped for the chain
        del chain
        device.complete(1)
        assert driver.used() and len(mappings_named("pyvhost-test-dimm")) == 1  # the driver's
        dimm.close()
        assert mappings_named("pyvhost-test-dimm") == []  # and the back-end's is gone too


def test_rem_mem_reg_must_name_an_existing_region(session, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    desc = MemoryRegionDesc(1 << 40, 4096, 0, 0)
    assert session.send(R.REM_MEM_REG, SingleRegion(desc), need_reply=True) == U64(1)


def test_an_fd_sent_with_rem_mem_reg_is_closed_unused(session, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    desc = MemoryRegionDesc(0, ram.size, FRONTEND_BASE, 0)
    # The test's memfd, then the driver's and the back-end's regions, two fds
    # each (the mapping's own, and the one kept for MemoryRegion.share_fd):
    assert len(fds_named("pyvhost-test-guest")) == 5
    assert session.send(R.REM_MEM_REG, SingleRegion(desc), [ram.fd], need_reply=True) == U64(0)
    # The back-end's region is gone, and so is the fd that came with the request.
    assert len(fds_named("pyvhost-test-guest")) == 3


def test_max_mem_slots_is_the_memory_limit(session):
    session.send(R.SET_PROTOCOL_FEATURES, U64(ALL))
    assert session.send(R.GET_MAX_MEM_SLOTS) == U64(509)


def test_get_config_returns_the_requested_slice(session):
    session.send(R.SET_PROTOCOL_FEATURES, U64(ALL))
    assert session.send(R.GET_CONFIG, ConfigSpace(4, 4, 0, bytes(4))).data == bytes([4, 5, 6, 7])


def test_get_config_past_the_space_gets_an_empty_reply(session):
    session.send(R.SET_PROTOCOL_FEATURES, U64(ALL))
    assert session.send(R.GET_CONFIG, ConfigSpace(14, 4, 0, bytes(4))) == "empty"


def test_set_config_on_a_read_only_device_is_refused(session):
    session.send(R.SET_PROTOCOL_FEATURES, U64(ALL))
    assert session.send(R.SET_CONFIG, ConfigSpace(0, 1, 0, b"\1"), need_reply=True) == U64(1)


def test_status_is_kept_and_reported(session):
    session.send(R.SET_PROTOCOL_FEATURES, U64(ALL))
    session.send(R.SET_STATUS, U64(0x0F))
    assert session.send(R.GET_STATUS) == U64(0x0F)
    assert session.send(R.SET_STATUS, U64(0x100), need_reply=True) == U64(1)


def test_reset_device_stops_rings_and_forgets_features(session, device, ram):
    session.negotiate(protocol=ALL)
    session.share(ram)
    session.start_ring(ram, 0)
    session.send(R.RESET_DEVICE)
    assert ("stopped", 0) in device.events and device.events[-1] == ("reset",)
    assert session.backend.acked_features == 0
    assert not session.backend.vrings[0].started


def test_closing_the_session_unmaps_memory_and_closes_every_fd(device):
    from .conftest import Session

    before = own_fds()
    with GuestRam(1 << 20, name="pyvhost-test-session") as ram:
        s = Session(device)
        s.negotiate(protocol=ALL)
        s.share(ram)
        s.start_ring(ram, 0)
        s.start_ring(ram, 1)
        s.backend.close()
        s.loop.close()
        assert len(mappings_named("pyvhost-test-session")) == 1  # only the driver's own
        for fd in s.owned_fds:
            os.close(fd)
    assert own_fds() == before
    assert mappings_named("pyvhost-test-session") == []


def test_the_same_region_added_once_per_queue_pair_is_counted_not_refused(session, ram):
    # QEMU 7.2 with queues=N: every pair's vhost_dev sends ADD_MEM_REG for the
    # same region, and REM_MEM_REG as often. The region is mapped once.
    session.negotiate(protocol=ALL)
    desc = MemoryRegionDesc(0, ram.size, FRONTEND_BASE, 0)
    for _ in range(3):
        assert session.send(R.ADD_MEM_REG, SingleRegion(desc), [ram.fd], need_reply=True) == U64(0)
    assert len(session.backend.memory) == 1
    # ram.fd, the driver's region, ours (two fds per region): no more
    assert len(fds_named("pyvhost-test-guest")) == 5
    for _ in range(2):
        assert session.send(R.REM_MEM_REG, SingleRegion(desc), need_reply=True) == U64(0)
        assert len(session.backend.memory) == 1
    assert session.send(R.REM_MEM_REG, SingleRegion(desc), need_reply=True) == U64(0)
    assert len(session.backend.memory) == 0


def test_the_same_description_from_another_file_is_still_an_overlap(session, ram):
    session.negotiate(protocol=ALL)
    desc = MemoryRegionDesc(0, ram.size, FRONTEND_BASE, 0)
    assert session.send(R.ADD_MEM_REG, SingleRegion(desc), [ram.fd], need_reply=True) == U64(0)
    other = memfd(ram.size)
    assert session.send(R.ADD_MEM_REG, SingleRegion(desc), [other], need_reply=True) == U64(1)
    os.close(other)


@pytest.mark.parametrize("kind", ["eventfd", "pipe", "datagram-socket"])
def test_a_backend_req_fd_that_is_no_stream_socket_is_refused_and_nothing_stays_open(session, kind):
    import socket

    session.negotiate(protocol=ALL)
    if kind == "eventfd":
        fd = os.eventfd(0)
    elif kind == "pipe":
        fd, w = os.pipe()
        os.close(w)
    else:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.close()
        fd = b.detach()
    before = own_fds()
    session.send(R.SET_BACKEND_REQ_FD, fds=[fd])
    assert session.backend.errors == 1
    assert own_fds() == before  # the copy sent, and any probe of it, are closed
    os.close(fd)
