"""The dirty log a live migration reads: one bit per 4 KiB guest page."""

from __future__ import annotations

import mmap
import os

import pytest

from pyvhost.errors import InvalidRegionError
from pyvhost.memory import LOG_PAGE, DirtyLog
from pyvhost.testing.memfd import memfd, open_fds

LOG_BYTES = 64  # 512 pages: 2 MiB of guest memory


@pytest.fixture
def shared():
    """The front-end's side: a memfd and its own mapping of the log."""
    fd = memfd(LOG_BYTES, "dirty-log")
    view = mmap.mmap(fd, LOG_BYTES)
    yield fd, view
    view.close()
    os.close(fd)


def bits_set(view) -> list[int]:
    return [i * 8 + b for i, byte in enumerate(bytes(view)) for b in range(8) if byte >> b & 1]


def test_a_write_marks_every_page_it_touches(shared):
    fd, view = shared
    log = DirtyLog(os.dup(fd), LOG_BYTES)
    log.mark(2 * LOG_PAGE - 16, 32)  # the last bytes of page 1, the first of page 2
    assert bits_set(view) == [1, 2]  # the front-end sees them in its own mapping
    log.close()


def test_a_write_across_64_page_words_marks_all_of_its_pages(shared):
    fd, view = shared
    log = DirtyLog(os.dup(fd), LOG_BYTES)
    log.mark(60 * LOG_PAGE, 10 * LOG_PAGE)
    assert bits_set(view) == list(range(60, 70))
    assert log.dirty_pages() == list(range(60, 70))
    log.close()


def test_bits_another_writer_set_stay_set(shared):
    fd, view = shared
    view[0] = 0b1000_0001  # pages 0 and 7, set by the kernel or another process
    log = DirtyLog(os.dup(fd), LOG_BYTES)
    log.mark(3 * LOG_PAGE, 1)
    assert bits_set(view) == [0, 3, 7]
    log.close()


def test_an_empty_write_marks_nothing(shared):
    fd, view = shared
    log = DirtyLog(os.dup(fd), LOG_BYTES)
    log.mark(5 * LOG_PAGE, 0)
    assert bits_set(view) == []
    log.close()


def test_the_log_may_start_at_an_offset_in_its_file():
    fd = memfd(8192 + 8 + LOG_BYTES, "dirty-log")
    try:
        log = DirtyLog(os.dup(fd), LOG_BYTES, offset=8192 + 8)  # not page-aligned
        log.mark(0, 1)
        assert os.pread(fd, 1, 8192 + 8) == b"\x01"
        log.close()
    finally:
        os.close(fd)


def test_writes_past_the_end_of_the_log_are_clipped_and_counted(shared, caplog):
    fd, view = shared
    log = DirtyLog(os.dup(fd), LOG_BYTES)
    pages = LOG_BYTES * 8
    log.mark((pages - 1) * LOG_PAGE, 2 * LOG_PAGE)
    log.mark(pages * LOG_PAGE, 1)
    assert bits_set(view) == [pages - 1]
    assert log.outside == 2
    assert "too small" in caplog.text  # said once, not per write
    log.close()


@pytest.mark.parametrize(("size", "offset"), [(0, 0), (12, 0), (64, 4), (64, -8)])
def test_a_log_that_is_not_whole_64_bit_words_is_refused(size, offset):
    fd = memfd(4096, "dirty-log")
    before = open_fds()
    with pytest.raises(InvalidRegionError, match="multiples of 8"):
        DirtyLog(fd, size, offset)
    assert fd not in open_fds() and open_fds() == before - {fd}  # taken and closed


def test_a_log_larger_than_its_file_is_refused_and_its_fd_closed():
    fd = memfd(64, "dirty-log")
    with pytest.raises(InvalidRegionError, match="file has"):
        DirtyLog(fd, 128)
    assert fd not in open_fds()


def test_closing_the_log_unmaps_it_and_closes_its_notify_fd(shared):
    fd, _ = shared
    log = DirtyLog(os.dup(fd), LOG_BYTES)
    log.notify_fd = os.eventfd(0, os.EFD_NONBLOCK)
    notify = log.notify_fd
    log.close()
    assert notify not in open_fds()
    with open("/proc/self/maps") as f:
        assert f.read().count("/memfd:dirty-log") == 1  # only the front-end's own


def test_signal_tells_the_notify_eventfd(shared):
    fd, _ = shared
    log = DirtyLog(os.dup(fd), LOG_BYTES)
    reader = os.eventfd(0, os.EFD_NONBLOCK)
    log.notify_fd = os.dup(reader)
    log.signal()
    log.signal()
    assert os.eventfd_read(reader) == 2
    log.close()
    os.close(reader)


@pytest.mark.parametrize("size", [1 << 62, (1 << 64) - 8])
def test_a_log_too_large_to_map_is_refused_not_raised_past_the_error_hierarchy(size):
    fd = memfd(64, "dirty-log")
    with pytest.raises(InvalidRegionError):
        DirtyLog(fd, size)
    assert fd not in open_fds()


def test_a_log_fd_that_is_no_file_is_refused():
    fd = os.eventfd(0)
    with pytest.raises(InvalidRegionError, match="no memfd or file"):
        DirtyLog(fd, 64)
    assert fd not in open_fds()


def test_an_empty_file_is_too_small_for_any_log():
    fd = memfd(0, "dirty-log")  # mapping it would fault on the first mark
    with pytest.raises(InvalidRegionError, match="file has 0x0"):
        DirtyLog(fd, 64)
