"""Live migration through `pyvhost net`: while the front-end logs (SET_LOG_BASE
and VHOST_F_LOG_ALL), every page the datapath writes is in the log, and
nothing else is. A real TAP, a real daemon, the Python front-end as QEMU."""

from __future__ import annotations

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


def test_no_migration_offers_no_dirty_logging_and_says_so(net_daemon):
    d = net_daemon("tap,ifname=IFNAME", "--no-migration", "-v")
    with NetFrontend.connect(d.sock) as fe:
        assert not fe.client.get_features() & (1 << VHOST_F_LOG_ALL)
    _, err = d.stop()
    assert "live migration unavailable: turned off (--no-migration)" in err
