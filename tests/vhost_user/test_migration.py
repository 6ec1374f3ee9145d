"""Live migration: dirty logging through SET_LOG_BASE, SET_LOG_FD and
VHOST_F_LOG_ALL (vhost-user spec, "Migration"), with no socket."""

from __future__ import annotations

import os

import pytest

from pyvhost.memory import LOG_PAGE
from pyvhost.testing.memfd import mappings_named, memfd, open_fds
from pyvhost.vhost_user.backend import Backend
from pyvhost.vhost_user.messages import U64, Empty, LogBase, VringAddr
from pyvhost.vhost_user.protocol import VHOST_F_LOG_ALL, ProtocolFeature as PF, Request as R
from pyvhost.virtq.layout import RING_IDX

from .conftest import FRONTEND_BASE, RecordingDevice
from .test_backend import ALL

LOG_ALL = 1 << VHOST_F_LOG_ALL
LOG_BYTES = (1 << 20) // LOG_PAGE // 8 + 64  # past the test RAM (1 MiB at guest 0x100000)


@pytest.fixture
def log_fd():
    fd = memfd(LOG_BYTES, "pyvhost-test-log")
    yield fd
    os.close(fd)


def set_log_base(session, fd: int):
    return session.send(R.SET_LOG_BASE, LogBase(LOG_BYTES, 0), [fd])


def dirty(fd: int) -> set[int]:
    data = os.pread(fd, LOG_BYTES, 0)
    return {i * 8 + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


def complete_one(session, device, ram, driver, index: int = 0) -> None:
    driver.add(readable=[(ram.alloc(16), 16)])
    driver.kick()
    session.run()
    device.complete(index)


def test_log_all_and_log_shmfd_are_offered(session):
    assert session.send(R.GET_FEATURES).value & LOG_ALL
    assert session.send(R.GET_PROTOCOL_FEATURES).value & (1 << PF.LOG_SHMFD)


def test_set_log_base_maps_the_log_and_answers_zero(session, log_fd):
    session.negotiate(protocol=ALL)
    assert set_log_base(session, log_fd) == U64(0)  # LOG_SHMFD: the front-end waits for it
    assert len(mappings_named("pyvhost-test-log")) == 1


def test_set_log_base_needs_log_shmfd(session, log_fd):
    session.negotiate(protocol=ALL & ~(1 << PF.LOG_SHMFD))
    before = open_fds()
    set_log_base(session, log_fd)
    assert mappings_named("pyvhost-test-log") == []
    assert open_fds() == before  # the fd sent along was closed


def test_writes_are_logged_once_log_all_is_acked_and_a_log_is_set(session, device, ram, log_fd):
    offered = session.send(R.GET_FEATURES).value
    session.negotiate(features=offered & ~LOG_ALL, protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 0)
    set_log_base(session, log_fd)
    complete_one(session, device, ram, driver)
    assert dirty(log_fd) == set()  # a log, but LOG_ALL not acked: not logging yet
    session.send(R.SET_FEATURES, U64(offered))  # the migration begins
    complete_one(session, device, ram, driver)
    assert (driver.used_addr + RING_IDX) // LOG_PAGE in dirty(log_fd)


def test_the_used_ring_is_logged_at_log_guest_addr(session, device, ram, log_fd):
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 0)
    set_log_base(session, log_fd)
    log_addr = ram.guest_base + ram.size - LOG_PAGE  # a page nothing else touches
    session.send(
        R.SET_VRING_ADDR,  # as QEMU re-sends it when logging starts, with the log flag
        VringAddr(0, 1, FRONTEND_BASE + driver.desc_addr, FRONTEND_BASE + driver.used_addr,
                  FRONTEND_BASE + driver.avail_addr, log_addr),
    )  # fmt: skip
    complete_one(session, device, ram, driver)
    assert log_addr // LOG_PAGE in dirty(log_fd)
    assert (driver.used_addr + RING_IDX) // LOG_PAGE not in dirty(log_fd)


def test_set_log_fd_is_signalled_after_writes_are_logged(session, device, ram, log_fd):
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 0)
    set_log_base(session, log_fd)
    notify = session.eventfd()
    session.send(R.SET_LOG_FD, Empty(), [notify])
    complete_one(session, device, ram, driver)
    assert os.eventfd_read(notify) >= 1


def test_set_log_fd_before_a_log_is_refused_and_its_fd_closed(session):
    session.negotiate(protocol=ALL)
    notify = session.eventfd()
    before = open_fds()
    session.send(R.SET_LOG_FD, Empty(), [notify])
    assert session.backend.errors == 1
    assert open_fds() == before


def test_a_log_that_cannot_be_mapped_ends_the_session(session):
    session.negotiate(protocol=ALL)
    small = memfd(64, "pyvhost-test-log")
    before = open_fds()
    set_log_base(session, small)  # LOG_BYTES asked of a 64-byte file
    os.close(small)
    # The answer cannot say "failed", and migrating without a log would lose
    # pages silently: the session must end instead.
    assert session.backend.fatal
    assert open_fds() == before - {small}


def test_a_new_log_replaces_the_old_and_the_old_is_unmapped(session, device, ram, log_fd):
    session.negotiate(protocol=ALL)
    session.share(ram)
    driver = session.start_ring(ram, 0)
    set_log_base(session, log_fd)
    bigger = memfd(LOG_BYTES, "pyvhost-test-log2")
    session.send(R.SET_LOG_BASE, LogBase(LOG_BYTES, 0), [bigger])
    complete_one(session, device, ram, driver)
    assert mappings_named("pyvhost-test-log") == []
    assert dirty(bigger) and not dirty(log_fd)
    os.close(bigger)


def test_closing_the_session_releases_the_log(device, log_fd):
    from .conftest import Session

    s = Session(device)
    s.negotiate(protocol=ALL)
    set_log_base(s, log_fd)
    s.send(R.SET_LOG_FD, Empty(), [s.eventfd()])
    before = open_fds()
    s.close()
    assert mappings_named("pyvhost-test-log") == []
    assert len(before - open_fds()) >= 1  # the log's notify fd went with it


class NoLogging(RecordingDevice):
    def dirty_logging_unavailable(self) -> str | None:
        return "turned off (--no-migration)"


def test_a_device_that_cannot_be_logged_offers_neither_log_all_nor_log_shmfd():
    from pyvhost.eventloop import EventLoop

    loop = EventLoop()
    backend = Backend(NoLogging(), loop)
    assert not backend.offered_features & LOG_ALL
    assert not backend.offered_protocol_features & (1 << PF.LOG_SHMFD)
    backend.close()
    loop.close()
