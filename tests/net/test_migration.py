"""Live migration through `pyvhost net`: while the front-end logs (SET_LOG_BASE
and VHOST_F_LOG_ALL), every page the datapath writes is in the log, and
nothing else is. A real TAP, a real daemon, the Python front-end as QEMU."""

from __future__ import annotations

import random
import threading
import time

from pyvhost.frontend.net import NetFrontend
from pyvhost.memory import LOG_PAGE
from pyvhost.vhost_user.protocol import VHOST_F_LOG_ALL
from pyvhost.virtq.layout import used_ring_size

from .conftest import GUEST_MAC, HOST_MAC, frame, receive_ours, recv_ours

RX0, TX0 = 0, 1


def pages(addr: int, length: int) -> set[int]:
    return set(range(addr // LOG_PAGE, (addr + length - 1) // LOG_PAGE + 1))


def used_ring_pages(fe: NetFrontend, index: int) -> set[int]:
    q = fe.rings[index].queue
    return pages(q.used_addr, used_ring_size(fe.queue_size))


def buffer_pages(fe: NetFrontend, index: int) -> set[int]:
    ring = fe.rings[index]
    slots = list(ring.slots) + [s for s in ring.inflight.values() if s is not None]
    return set().union(*(pages(s, ring.slot_size) for s in slots))


def test_received_frames_dirty_only_rx_buffers_and_the_rx_used_ring(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        rx_buffers = buffer_pages(fe, RX0)
        fe.start_logging()
        fe.dirty_pages()  # from here on
        sent = [frame(GUEST_MAC, HOST_MAC, bytes([i]) * 1000) for i in range(20)]
        for f in sent:
            host.send(f)
        assert receive_ours(fe, 20, timeout=10) == sent
        dirty = fe.dirty_pages()
        rx_used = used_ring_pages(fe, RX0)
    assert dirty & rx_buffers, "no received buffer was logged"
    assert rx_used <= dirty
    assert dirty <= rx_buffers | rx_used
    host.close()


def test_sent_frames_dirty_only_the_tx_used_ring(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(10)
    with NetFrontend.connect(d.sock) as fe:
        fe.start_logging()
        fe.dirty_pages()
        sent = [frame(HOST_MAC, GUEST_MAC, bytes([i]) * 100) for i in range(10)]
        for f in sent:
            fe.send(f)
        assert recv_ours(host, 10) == sent
        deadline = time.monotonic() + 10
        while fe.tx_done() < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        dirty = fe.dirty_pages()
        tx_used = used_ring_pages(fe, TX0)
    assert dirty, "the used ring's writes were not logged"
    assert dirty <= tx_used  # TX buffers are only read: nothing else is dirty
    host.close()


def test_once_log_all_is_dropped_nothing_more_is_logged(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        fe.start_logging()
        fe.stop_logging()  # the migration was cancelled
        fe.dirty_pages()
        host.send(frame(GUEST_MAC, HOST_MAC, b"after"))
        assert len(receive_ours(fe, 1, timeout=10)) == 1
        assert fe.dirty_pages() == set()
    host.close()


def snapshot(fe: NetFrontend, watched: set[int]) -> dict[int, bytes]:
    return {p: fe.ram.memory.read(p * LOG_PAGE, LOG_PAGE) for p in watched}


def test_every_page_the_datapath_changes_while_logging_is_logged(net_daemon, netns):
    """What a migration relies on, down the paths its last moments take:
    frames that span buffers (9,014 bytes into 4 KiB buffers, one a page, so a
    page is dirty only by its own buffer's logging), a guest short
    of buffers (a frame kept until it posts more), logging that begins
    mid-stream, and rings stopped mid-stream. Every RX-buffer or used-ring
    page whose bytes changed once logging began is in the log, and nothing
    changes after GET_VRING_BASE. Several sessions, each stopped at another
    moment."""
    d = net_daemon()
    netns.ip("link", "set", "dev", d.ifname, "mtu", "9000")
    host = netns.packet_socket(d.ifname)
    rng = random.Random(7)
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            host.send(frame(GUEST_MAC, HOST_MAC, bytes([i & 0xFF]) * 9000))
            i += 1

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    try:
        for session in range(6):
            with NetFrontend.connect(d.sock, rx_buf_size=4096) as fe:
                ring = fe.rings[RX0]
                watched = buffer_pages(fe, RX0) | used_ring_pages(fe, RX0)
                fe.post_rx(count=3)
                time.sleep(rng.uniform(0, 0.05))
                fe.start_logging()
                before = snapshot(fe, watched)
                for _ in range(rng.randrange(5, 40)):
                    fe.reclaim_rx()
                    fe.post_rx(count=rng.choice((1, 1, 2, 3, 8)))
                    time.sleep(rng.uniform(0, 0.004))
                if session % 2:
                    # One buffer for a frame that needs three: pyvhost reads it,
                    # keeps it for later and gives the buffer back; the stop drops it.
                    fe.reclaim_rx()
                    ring.slots.append(ring.slots.pop(0))  # one not used (nor logged) yet
                    fe.post_rx(count=1)
                    time.sleep(0.02)
                fe.stop_rings()
                after = snapshot(fe, watched)
                dirty = fe.dirty_pages()
                changed = {p for p in watched if before[p] != after[p]}
                assert changed, "no frame arrived while logging"
                assert changed <= dirty, f"written, not logged: {sorted(changed - dirty)}"
                time.sleep(0.05)  # frames keep coming to the TAP
                assert snapshot(fe, watched) == after, "written after GET_VRING_BASE"
    finally:
        stop.set()
        sender.join(5)
        host.close()


def test_no_migration_offers_no_dirty_logging_and_says_so(net_daemon):
    d = net_daemon("tap,ifname=IFNAME", "--no-migration", "-v")
    with NetFrontend.connect(d.sock) as fe:
        assert not fe.client.get_features() & (1 << VHOST_F_LOG_ALL)
    _, err = d.stop()
    assert "live migration unavailable: turned off (--no-migration)" in err
