"""The datapath of one virtio-net queue pair and its host-side queue (a TAP fd).

TX (guest to host): every available chain goes to the host with one writev
straight from the guest's buffers (the virtio-net header included when the
TAP has IFF_VNET_HDR, sliced off otherwise): no copy in Python.

RX (host to guest): one readv straight into the guest's first RX chain,
with a bounce buffer behind it that only catches what does not fit. With
MRG_RXBUF the overflow of a large (GSO) frame is copied into further chains
and num_buffers says how many; frames that fit, the common case, are never
copied. When the guest has posted no RX buffers, the TAP is not read at
all until the guest kicks the RX queue: frames wait in the TAP's queue,
none is dropped here.

Notifications: signals to the driver go through a ModeratedNotifier (at most
one per tx/rx window per ring, none delayed on an idle ring), and after a
TX kick that found frames the ring is busy-polled for `poll_ns` before kicks
are asked for again, so a guest sending a stream does not kick per frame.
Both trade our CPU time for the guest's: see BENCHMARKS.md. A stream of
large frames is drained (TX) and read (RX) on a timer rather than per
frame, so a wake carries several (RX_DEFER_AFTER, TX_DEFER_AFTER).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import time
from bisect import bisect_left
from collections import deque
from itertools import accumulate
from typing import Protocol

from pyvhost import hooks
from pyvhost.device import RingConfig, ServedRing
from pyvhost.devices.net import spec
from pyvhost.devices.net.metrics import QueueCounters, count_signal
from pyvhost.eventloop import EventLoop
from pyvhost.hooks import IN, OUT, PASS, HookContext, LoadedHook, Redirect
from pyvhost.moderation import ModeratedNotifier
from pyvhost.virtq import SplitQueue
from pyvhost.virtq.iov import scatter, skip, write_at

log = logging.getLogger(__name__)

# Largest frame the host side can hand us: 64 KiB of GSO payload plus
# headers, plus the virtio-net header.
MAX_FRAME = 65536 + 256
# Frames handled per readiness event before the loop serves others.
BUDGET = 64
# Batched TAP I/O (io_uring) pays from a few frames a batch on: a batch of
# one or two costs more than a readv or writev each (bench/trickle.py). A
# TX drain batches when this many frames are posted; RX reads in batches
# after an event that read this many (a burst), and frame by frame after
# one that read fewer (a trickle: a stream's ACKs, request and response).
SPAN_BATCH_MIN = 8
# num_buffers = 1 (virtio_net_hdr_mrg_rxbuf), little-endian, at offset 10.
_ONE_BUFFER = b"\x01\x00"
# TX chains sent per kick (or poll) before yielding to the loop, as QEMU's
# tx_burst: a guest that refills its ring as fast as we drain it must not
# starve the control socket, the other rings or the stats socket.
TX_BUDGET = 256
# A stream of large (GSO) frames into the guest comes a frame or two per TAP
# event: every frame wakes us, and each wake's fixed cost (the loop, the poll,
# the used-ring push and signal decision) is paid per one or two frames. Once
# RX_DEFER_AFTER events in a row read large frames, an event that read fewer
# than RX_DEFER_BELOW leaves the TAP unread for rx_defer_ns, so the next read
# takes the several frames that came meanwhile: NAPI's napi_defer_hard_irqs
# with gro_flush_timeout, for a TAP. Small frames (a ping, a request, the ACKs
# of a stream going out) are never deferred.
RX_DEFER_AFTER = 4
RX_DEFER_BELOW = 4
# The same for a stream of large frames from the guest, as QEMU's tx=timer: once
# TX_DEFER_AFTER kicks in a row sent large frames (several buffers each), kicks
# stay off and the ring is drained every tx_defer_ns while it has frames; the
# first drain that finds none asks for kicks again.
TX_DEFER_AFTER = 4
# RX signals are moderated only while the guest is streaming out: this much
# sent since the last RX signal (about one TSO frame). What comes in then is
# mostly its ACKs, and taking them in batches is cheaper for the guest; a
# guest doing request/response is never kept waiting for its answer.
STREAMING_BYTES = 32 * 1024


class _Dropped(Exception):
    """A hook dropped the frame being sent."""


class HostQueue(Protocol):
    """One host-side queue of frames: a TAP queue, or a switch port.

    `fileno()` is the fd that turns readable when frames wait (a TAP); a host
    side that pushes frames instead returns None and calls
    `QueuePair.process_tap_rx_event()` itself, which then reads them with
    `read_iovec`. Either way `read_iovec` raises BlockingIOError when no frame
    waits, and a frame carries a virtio-net header when `has_vnet_hdr`."""

    has_vnet_hdr: bool

    def fileno(self) -> int | None: ...

    def has_frames(self) -> bool:
        """Only asked of a host side without an fd: do frames wait to be read?"""
        ...

    def read_iovec(self, buffers: list) -> int: ...

    def write_iovec(self, buffers: list) -> int: ...

    # Optional: `open_span_writer()` and `open_span_reader()`, io_uring rings
    # (backends/uring.py) for batched writes and reads, or None; the pair
    # closes each with the ring it served. Without them, frame by frame.


class QueuePair:
    """RX queue 2N, TX queue 2N+1, and host queue N."""

    def __init__(
        self,
        pair: int,
        host: HostQueue,
        loop: EventLoop,
        *,
        poll_ns: int = 0,
        tx_window_ns: int = 0,
        rx_window_ns: int = 0,
        rx_defer_ns: int = 0,
        tx_defer_ns: int = 0,
    ) -> None:
        self.pair = pair
        self.host = host
        self.loop = loop
        self.poll_ns = poll_ns
        self.tx_window_ns = tx_window_ns
        self.rx_window_ns = rx_window_ns
        self.rx_defer_ns = rx_defer_ns
        self.tx_defer_ns = tx_defer_ns
        self.rx_counters = QueueCounters()
        self.tx_counters = QueueCounters()
        self._rx_ring: ServedRing | None = None
        self._tx_ring: ServedRing | None = None
        self.rxq: SplitQueue | None = None
        self.rx_notifier: ModeratedNotifier | None = None
        self.txq: SplitQueue | None = None
        self.tx_notifier: ModeratedNotifier | None = None
        self._tx_polling = False
        self._tx_resume_pending = False  # a budget-limited drain is to continue
        self._push = host.fileno() is None  # the host side pushes frames (a switch port)
        # Asked before taking a further batch of RX buffers in one event: taking
        # and giving back a span of buffers costs far more than this poll.
        self._readable = None
        if not self._push:
            self._readable = select.poll()
            self._readable.register(host.fileno(), select.POLLIN)
        self._wake_pending = False
        self._rx_owner: object = None  # the session serving the RX ring
        self._tx_owner: object = None  # and the TX ring: a deferred drain runs as its own
        self._tx_bytes_since_rx_signal = 0
        self._tx_idle_since = 0  # busy polling: when the ring was last found empty
        self.rx_enabled = False
        self.tx_enabled = False
        self.hdr_size = spec.HDR_SIZE
        self.mrg_rxbuf = False
        self.rx_starved = False  # no RX buffers: the TAP is not being read
        self._tx_blocked = False  # the TAP refused a write (sndbuf full): wait until writable
        self._span_writer = None  # batched TAP writes (io_uring), when the host side has them
        self._tx_not_spans = False  # the last TX batch ended with a frame of several buffers
        self._rx_last = 0  # frames read by the last TAP event that found any
        self._rx_span = 1  # RX chains to read one frame across (merged buffers)
        self._rx_views = False  # the RX ring has pop_views (see _rx_merged)
        self._rx_streak = 0  # TAP events in a row that read large frames (RX_DEFER_AFTER)
        self._rx_deferred = None  # the Timer that resumes reading the TAP, while deferred
        self._tx_streak = 0  # drains in a row that ended with a large frame (TX_DEFER_AFTER)
        self._tx_deferred = None  # the Timer of the next drain, while kicks are off
        # A frame larger than one buffer came lately: batched reads start with
        # one read and double while frames fit, so a burst of large frames is
        # not read into single buffers and copied on (see _rx_spans).
        self._rx_large_seen = False
        self._bounce = bytearray(MAX_FRAME)
        self._bounce_view = memoryview(self._bounce)
        # Frames read but not yet placed (MRG only), oldest first: one waiting for
        # RX buffers, or those a batched read left out of place (_rx_spans).
        self._pending: deque[bytes] = deque()
        self._span_reader = None  # batched TAP reads (io_uring), when the host side has them
        self._zero_hdr = bytes(spec.HDR_SIZE)
        # Observers: hooks and captures (the device switches the pair to this
        # engine while any is attached). `observed` is the one test the
        # datapath makes when there are none.
        self.port_name = f"pair{pair}"
        self.hooks: list[LoadedHook] = []
        self.captures: list = []
        self.observed = False

    # --- configuration, from the device ---------------------------------------------

    def configure(self, features: int) -> None:
        self.hdr_size = spec.header_size(features)
        self.mrg_rxbuf = bool(features & (1 << spec.F_MRG_RXBUF))
        self._zero_hdr = bytes(self.hdr_size)

    # --- the engine interface (devices/net/engine.py) ---------------------------------

    kind = "python"

    def start_ring(self, rx: bool, config: RingConfig) -> None:
        """Serve the pair's RX or TX ring from config.base on, here."""
        ring = ServedRing(config, self.loop, self._on_rx_kick if rx else self._on_tx_kick)
        if rx:
            self._attach_rx(ring)
        else:
            self._attach_tx(ring)
        ring.watch()
        # Buffers may already be waiting (a reconnect, a switch): look once.
        (self._on_rx_kick if rx else self._on_tx_kick)()

    def stop_ring(self, rx: bool) -> int:
        """Stop serving the ring; returns the avail index to go on from. Every
        chain taken has been completed: the datapath holds none across events."""
        ring = self._rx_ring if rx else self._tx_ring
        if ring is None:
            raise ValueError(f"{'rx' if rx else 'tx'}{self.pair} is not started")
        self._detach(rx)
        return ring.stop()

    def set_ring_enabled(self, rx: bool, enabled: bool) -> None:
        if rx:
            self.rx_enabled = enabled
            self._update_reading()
        else:
            self.tx_enabled = enabled
        if enabled:
            (self._on_rx_kick if rx else self._on_tx_kick)()

    def ring_fds_changed(self, rx: bool) -> None:
        ring = self._rx_ring if rx else self._tx_ring
        if ring is not None:
            ring.fds_changed()

    def holds_frames(self) -> bool:
        """A frame read from the TAP waits for RX buffers: stopping RX now would
        lose it. Tries to place it first."""
        if self._pending and self.rxq is not None:
            self.process_tap_rx_event()
        return bool(self._pending)

    def host_io(self) -> dict[str, str]:
        out = {}
        if self._rx_ring is not None:
            out["rx"] = "switch" if self._push else "io_uring" if self._span_reader else "readv"
        if self._tx_ring is not None:
            out["tx"] = "switch" if self._push else "io_uring" if self._span_writer else "writev"
        return out

    def close(self) -> None:
        for rx in (True, False):
            if (self._rx_ring if rx else self._tx_ring) is not None:
                self.stop_ring(rx)

    def set_observers(self, hooks: list[LoadedHook] | None = None, captures=None) -> None:
        if hooks is not None:
            self.hooks = hooks
        if captures is not None:
            self.captures = captures
        self.observed = bool(self.hooks or self.captures)

    def _capture(self, direction: str, views: list, skip_bytes: int) -> None:
        data = skip(views, skip_bytes) if skip_bytes else views
        for cap in list(self.captures):
            cap.record(self.port_name, direction, data)

    def _observe_tx(self, readable: list, hdr: int, strip: int) -> list | None:
        """Hooks on a frame from the guest: the buffers to write, or None to drop."""
        if not self.hooks:
            return readable if not strip else skip(readable, strip)
        data = b"".join(bytes(v) for v in readable)
        header = spec.VnetHeader.unpack(data)
        ctx = HookContext(self.port_name, IN, 0, header)
        verdict, result = hooks.run(self.hooks, memoryview(data)[hdr:], ctx)
        if verdict is not PASS:
            if verdict is Redirect:
                log.warning("%s: a hook redirected a frame; pyvhost net has no other port",
                            self.port_name)  # fmt: skip
            return None
        return [result] if strip else [data[:hdr], result]

    def _observe_rx(self, q: SplitQueue, chain, total: int, room: int, done) -> bool | None:
        """Hooks and captures on a frame read for the guest. None: deliver it as
        read; True: handled (dropped, or its replacement placed); False: stop
        (the replacement waits for buffers)."""
        hdr = self.hdr_size
        data = b"".join(bytes(v) for v in chain.writable)[: min(total, room)]
        if total > room:
            data += bytes(self._bounce_view[: total - room])
        frame = memoryview(data)[hdr:]
        if self.hooks:
            ctx = HookContext(self.port_name, OUT, 0, spec.VnetHeader.unpack(data))
            verdict, result = hooks.run(self.hooks, frame, ctx)
            if verdict is not PASS:
                q.unpop()  # the chain is used for the next frame
                self.rx_counters.drops += 1
                return True
            if result is not frame:  # replaced: placed like a frame kept for later
                if not self.mrg_rxbuf and hdr + len(result) > room:
                    q.unpop()  # without merged buffers it cannot span chains
                    self.rx_counters.drops += 1
                    return True
                if self.captures:
                    self._capture(OUT, [result], 0)
                self._pending.append(data[:hdr] + bytes(result))
                q.unpop()
                return self._place_pending(q, done)
        if self.captures:
            self._capture(OUT, [frame], 0)
        return None

    def _on_rx_kick(self) -> None:
        self.rx_counters.kicks += 1
        self.process_rx_queue_event()

    def _on_tx_kick(self) -> None:
        self.tx_counters.kicks += 1
        self.process_tx_queue_event()

    # --- rings in and out -------------------------------------------------------------

    def _attach_rx(self, ring: ServedRing) -> None:
        c = self.rx_counters

        def signalled(sent: bool) -> None:
            count_signal(c, sent)
            self._tx_bytes_since_rx_signal = 0

        self._rx_ring = ring
        self._rx_owner = self.loop.owner
        self.rxq = ring.queue
        make = getattr(self.host, "open_span_reader", None)
        spans = make is not None and hasattr(ring.queue, "pop_spans")
        self._span_reader = make() if spans else None
        self._rx_views = hasattr(ring.queue, "pop_views")  # a split ring's (see _rx_merged)
        self.rx_notifier = ModeratedNotifier(
            ring.notifier, self.loop, self.rx_window_ns, signalled, self._guest_streaming
        )
        ring.queue.disable_notification()  # kicks only matter when starved
        self._update_reading()

    def _guest_streaming(self) -> bool:
        return self._tx_bytes_since_rx_signal >= STREAMING_BYTES

    def _attach_tx(self, ring: ServedRing) -> None:
        c = self.tx_counters
        self._tx_ring = ring
        self._tx_owner = self.loop.owner
        self.txq = ring.queue
        # Batched writes take chains as spans: a split ring's pop_spans (a packed
        # ring goes frame by frame).
        make = getattr(self.host, "open_span_writer", None)
        spans = make is not None and hasattr(ring.queue, "pop_spans")
        self._span_writer = make() if spans else None
        self.tx_notifier = ModeratedNotifier(
            ring.notifier, self.loop, self.tx_window_ns, lambda sent: count_signal(c, sent)
        )

    def _detach(self, rx: bool) -> None:
        if rx:
            if self.rx_notifier is not None:
                self.rx_notifier.cancel()
            self._end_rx_deferral()
            self._rx_ring = self.rxq = self.rx_notifier = None
            self.rx_enabled = False
            self.rx_starved = False
            self._pending.clear()
            self._update_reading()
            if self._span_reader is not None:
                self._span_reader.close()
                self._span_reader = None
        else:
            if self.tx_notifier is not None:
                self.tx_notifier.cancel()
            self._stop_tx_polling()
            self._end_tx_deferral()
            self._tx_ring = self.txq = self.tx_notifier = None
            self.tx_enabled = False
            if self._span_writer is not None:
                self._span_writer.close()
                self._span_writer = None
            if self._tx_blocked:
                self._tx_blocked = False
                self.loop.remove_writer(self.host.fileno())

    def _update_reading(self) -> None:
        fd = self.host.fileno()
        if fd is None:
            self._wake()  # a host side that pushes frames (a switch port): nothing to poll
            return
        if (
            self.rxq is not None
            and self.rx_enabled
            and not self.rx_starved
            and self._rx_deferred is None
        ):
            self.loop.add_reader(fd, self.process_tap_rx_event)
        else:
            self.loop.remove_reader(fd)

    # --- TX ---------------------------------------------------------------------------------

    def process_tx_queue_event(self) -> None:
        """The guest kicked TX (or the TAP became writable again)."""
        if self._tx_polling or self._tx_deferred is not None:
            return  # the busy poller, or the deferred drain, will see it
        if not self.poll_ns:
            if self.tx_defer_ns and self._tx_streak >= TX_DEFER_AFTER:
                self._drain_tx_deferred()
            else:
                self._drain_tx_and_rearm()
        elif not self._drain_tx(rearm=False):
            self._drain_tx_and_rearm()  # nothing there: wait for the next kick
        elif self.txq is not None and not self._tx_blocked:
            self._tx_polling = True
            self._tx_idle_since = 0
            self.loop.add_busy_poller(self, self._poll_tx)

    def _drain_tx_and_rearm(self) -> None:
        """Drain, then ask for kicks; if the budget ran out with frames left, go
        on after the loop's other work (kicks stay disabled meanwhile, so none
        is lost or needed)."""
        if self._drain_tx(rearm=True) >= TX_BUDGET and not self._tx_resume_pending:
            self._tx_resume_pending = True
            self.loop.call_soon(self._resume_tx)

    def _drain_tx_deferred(self) -> None:
        """In a stream of large frames: drain with kicks left off, and drain
        again after tx_defer_ns; a drain that finds nothing asks for kicks."""
        if self._drain_tx(rearm=False) and not self._tx_blocked and self.txq is not None:
            with self.loop.owned_by(self._tx_owner):
                self._tx_deferred = self.loop.call_at(
                    time.monotonic_ns() + self.tx_defer_ns, self._tx_deferral_over
                )
            self.tx_counters.deferrals += 1
        elif not self._tx_blocked:
            self._tx_streak = 0
            self._drain_tx_and_rearm()  # the stream paused: kicks again, catching a race

    def _tx_deferral_over(self) -> None:
        self._tx_deferred = None
        self.process_tx_queue_event()

    def _end_tx_deferral(self) -> None:
        self._tx_streak = 0
        if self._tx_deferred is not None:
            self._tx_deferred.cancel()
            self._tx_deferred = None

    def _resume_tx(self) -> None:
        self._tx_resume_pending = False
        self.process_tx_queue_event()

    def _poll_tx(self) -> None:
        """Busy polling: drain again; after poll_ns without frames, ask for kicks."""
        q = self.txq
        if q is None or self._tx_blocked or q.broken is not None:
            self._stop_tx_polling()  # detached, waiting for room, or dead until reset
            return
        if self._drain_tx(rearm=False):
            self._tx_idle_since = 0
            return
        now = time.monotonic_ns()
        if not self._tx_idle_since:
            self._tx_idle_since = now
        elif now - self._tx_idle_since >= self.poll_ns:
            self._stop_tx_polling()
            self._drain_tx_and_rearm()  # re-arm kicks, catching frames that raced us

    def _stop_tx_polling(self) -> None:
        if self._tx_polling:
            self._tx_polling = False
            self.loop.remove_busy_poller(self)

    def _drain_tx(self, rearm: bool) -> int:
        """Send the available frames, up to TX_BUDGET; with `rearm`, ask for kicks
        before returning if the ring was emptied. Returns how many chains were
        consumed (TX_BUDGET: there may be more; kicks are still disabled)."""
        q = self.txq
        if q is None or self._tx_blocked:
            return 0
        c = self.tx_counters
        write = self.host.write_iovec
        strip = 0 if self.host.has_vnet_hdr else self.hdr_size
        hdr = self.hdr_size
        q.disable_notification()
        consumed = 0
        packets = sent_bytes = drops = errors = 0
        # Batched writes: chains of one buffer (a small frame, header in front)
        # go to the TAP in one system call per batch, written from guest memory
        # by address. Anything else, and observed frames, take the path below.
        spans = self._span_writer if self.tx_enabled and not self.observed and not strip else None
        while consumed < TX_BUDGET:
            if spans is not None and not self._tx_not_spans:
                heads, addrs, lengths = q.pop_spans(
                    min(BUDGET, TX_BUDGET - consumed), at_least=SPAN_BATCH_MIN
                )
                if heads:
                    results = spans.write_spans(addrs, lengths)
                    n = len(heads)
                    if min(results) >= 0:  # the common case: every frame taken
                        packets += n
                        sent_bytes += sum(lengths) - n * hdr
                    else:
                        for length, res in zip(lengths, results, strict=True):
                            if res >= 0:
                                packets += 1
                                sent_bytes += length - hdr
                            elif res in (-errno.EIO, -errno.ENETDOWN, -errno.EAGAIN):
                                drops += 1  # the TAP is down (EAGAIN: sndbuf was made finite)
                            else:
                                errors += 1  # EINVAL: a runt or a malformed GSO header
                    consumed += n
                    q.push_used_read(heads)
                    continue
            asked = min(BUDGET, TX_BUDGET - consumed)
            chains = q.pop_batch(asked)
            if not chains:
                if rearm and q.enable_notification():
                    q.disable_notification()
                    continue
                break
            # A stream of frames of several buffers (TSO, indirect tables) is no
            # span: pop_spans is not asked again until a batch ends with a
            # frame of one buffer.
            self._tx_not_spans = len(chains[-1].readable) != 1
            done = []
            completed = done.append
            if not self.tx_enabled:
                drops += len(chains)  # a disabled ring is processed without side effects
                for chain in chains:
                    completed((chain.head, 0))
            else:
                observed = self.observed
                for i, chain in enumerate(chains):
                    length = chain.readable_len
                    if length <= hdr:
                        errors += 1  # no frame behind the header
                        completed((chain.head, 0))
                        continue
                    bufs = chain.readable if not strip else skip(chain.readable, strip)
                    if observed:  # hooks or a capture: off, this costs one test
                        bufs = self._observe_tx(chain.readable, hdr, strip)
                        if bufs is None:
                            drops += 1  # a hook said so
                            completed((chain.head, 0))
                            continue
                    try:
                        write(bufs)
                        packets += 1
                        sent_bytes += length - hdr
                        if self.captures:
                            self._capture(IN, bufs, 0 if strip else hdr)
                    except BlockingIOError:
                        # The TAP's send buffer is full: keep this chain and the
                        # rest of the batch, and wait for room.
                        for _ in range(len(chains) - i):
                            q.unpop()
                        self._tx_blocked = True
                        self.loop.add_writer(self.host.fileno(), self._on_tap_writable)
                        break
                    except OSError as e:
                        if e.errno in (errno.EIO, errno.ENETDOWN):
                            drops += 1  # the TAP is down
                        else:
                            errors += 1  # e.g. EINVAL: a malformed GSO header
                            log.debug("tx%d: TAP refused a frame: %s", self.pair, e.strerror)
                    completed((chain.head, 0))
            consumed += len(done)
            q.push_used_batch(done)
            if self._tx_blocked:
                break
            if len(chains) < asked:
                # The batch took all the ring had when it looked: ask for kicks
                # now (and look once more), rather than pop an empty ring first.
                if rearm and q.enable_notification():
                    q.disable_notification()
                    continue
                break
        if consumed:
            self._tx_streak = self._tx_streak + 1 if self._tx_not_spans else 0
            c.packets += packets
            c.bytes += sent_bytes
            c.drops += drops
            c.errors += errors
            self._tx_bytes_since_rx_signal += sent_bytes
            self.tx_notifier.completed()
        return consumed

    def _on_tap_writable(self) -> None:
        self.loop.remove_writer(self.host.fileno())
        self._tx_blocked = False
        self.process_tx_queue_event()

    # --- RX ------------------------------------------------------------------------------

    def process_rx_queue_event(self) -> None:
        """The guest posted RX buffers (kick): resume reading the TAP if starved."""
        if self.rxq is None:
            return
        if self.rx_starved:
            self.rx_starved = False
            self.rxq.disable_notification()  # fed again: kicks are not needed
            self._update_reading()
        self.process_tap_rx_event()

    def process_tap_rx_event(self) -> None:
        """Frames are waiting on the TAP: move up to BUDGET of them into the guest."""
        q = self.rxq
        if q is None or not self.rx_enabled:
            return
        c = self.rx_counters
        before = c.packets
        done: list[tuple[int, int]] = []
        if self._pending and not self._place_pending(q, done):
            self._flush_rx(q, done)
            return
        read = self.host.read_iovec
        vnet = self.host.has_vnet_hdr
        hdr = self.hdr_size
        mrg = self.mrg_rxbuf
        bounce = self._bounce_view
        bounce_list = [bounce]
        packets = nbytes = 0
        # Buffers are taken in batches sized by what the last event read, so a
        # lone frame costs one pop and a stream gets whole batches. Observers
        # give a chain back as the last one taken: one at a time for them.
        observed = self.observed
        last = self._rx_last
        want = 1 if observed else max(1, last)
        # With merged buffers a frame is read across as many chains as the last
        # one took (a GSO stream: several), so it lands in place, not in the
        # bounce buffer to be copied on.
        can_span = mrg and vnet and not observed
        span = self._rx_span if can_span else 1
        taken = 0
        stop = False
        reader = self._span_reader
        if reader is not None and can_span and span == 1 and last >= SPAN_BATCH_MIN:
            # A burst of frames that fit one buffer (the last one did): read in batches.
            taken, stop = self._rx_spans(q, reader, 1 if self._rx_large_seen else want, done)
            span = self._rx_span if can_span else 1
        while taken < BUDGET and not stop:
            if taken and not self._frames_wait():
                break  # a frame came; no other waits: no buffers to take and give back
            size = max(span, min(want, BUDGET - taken))
            if span > 1:
                size -= size % span  # whole spans: a span cut at the batch's end is given back
                if can_span and self._rx_views:
                    merged = self._rx_merged(q, span, size, done)
                    if merged is not None:
                        used, frames, read_bytes, stop = merged
                        taken += max(used, 1)
                        packets += frames
                        nbytes += read_bytes
                        span = self._rx_span
                        if used == size:
                            want = min(BUDGET, 2 * want)  # the batch was used up: more may wait
                        continue
            chains = q.pop_batch(size)
            if not chains:
                self._starve(q)
                break
            i, end = 0, len(chains)
            while i < end:
                chain = chains[i]
                room = chain.writable_len
                if room < hdr:
                    c.errors += 1  # a buffer that cannot even hold the header
                    done.append((chain.head, 0))
                    i += 1
                    continue
                writable = chain.writable
                if span > 1 and i + span > end and i > 0:
                    # Too few chains left in this batch for a whole span: give them
                    # back and take a new batch that starts with them.
                    for _ in range(end - i):
                        q.unpop()
                    break
                if span > 1 and i + 1 < end:
                    bufs = list(writable)
                    for extra in chains[i + 1 : i + span]:
                        bufs += extra.writable
                        room += extra.writable_len
                    bufs.append(bounce)
                else:
                    bufs = (writable if vnet else skip(writable, hdr)) + bounce_list
                try:
                    n = read(bufs)
                except BlockingIOError:
                    n = -1  # nothing queued on the TAP: hand the buffers back
                except OSError as e:
                    n = -1
                    c.errors += 1
                    log.warning("rx%d: reading the TAP failed: %s", self.pair, e.strerror)
                if n < 0:
                    for _ in range(end - i):
                        q.unpop()
                    stop = True
                    break
                if vnet and n < hdr:
                    c.errors += 1  # shorter than its own header: not a frame
                    continue  # the same chain takes the next read
                taken += 1
                total = n if vnet else n + hdr
                if not vnet:
                    write_at(writable, 0, self._zero_hdr)
                if observed:  # batches of one: this chain is the last one taken
                    outcome = self._observe_rx(q, chain, total, room, done)
                    if outcome is not None:  # dropped, or replaced and placed (or pending)
                        if outcome:
                            i += 1
                            continue
                        stop = True
                        break
                if total <= chain.writable_len:
                    if mrg:  # num_buffers = 1
                        first = writable[0]
                        if len(first) >= 12:
                            first[10:12] = _ONE_BUFFER
                        else:
                            write_at(writable, 10, _ONE_BUFFER)
                    done.append((chain.head, total))
                    packets += 1
                    nbytes += total - hdr
                    span = self._rx_span = 1
                    i += 1
                    continue
                if total <= room:
                    # Read in place across chains i, i+1, ...: return each with its share.
                    left, used = total, 0
                    while left > 0:
                        part = chains[i + used]
                        k = min(left, part.writable_len)
                        done.append((part.head, k))
                        left -= k
                        used += 1
                    write_at(writable, 10, used.to_bytes(2, "little"))
                    packets += 1
                    nbytes += total - hdr
                    # A smaller frame in a stream (a push) leaves the span as it
                    # is: reading across more chains than a frame fills costs
                    # nothing (the next frame starts where it ended), fewer
                    # costs a copy into the bounce buffer and on.
                    span = self._rx_span = max(span, used)
                    self._rx_large_seen = True
                    i += used
                    continue
                # The frame ran on into the bounce buffer.
                overflow = bounce[: total - room]
                if not mrg:
                    c.drops += 1  # the guest's buffers are too small for this frame
                    done.append((chain.head, 0))
                    i += 1
                    continue
                # Further buffers come from the ring in order: give back the rest
                # of this batch first.
                spanned = chains[i : i + span] if span > 1 else [chain]
                for _ in range(end - i - len(spanned)):
                    q.unpop()
                self._rx_span = min(BUDGET, max(len(spanned), -(-total // chain.writable_len)))
                self._rx_large_seen = True
                if can_span:
                    span = self._rx_span
                if not self._place_spanned(q, spanned, total - len(overflow), overflow, done):
                    # Not enough buffers for the rest: keep the whole frame for later.
                    frame = bytearray(total)
                    pos = 0
                    for part in spanned:
                        for v in part.writable:
                            k = min(len(v), total - len(overflow) - pos)
                            frame[pos : pos + k] = v[:k]
                            pos += k
                    frame[pos:] = overflow
                    self._pending.append(bytes(frame))
                    for _ in spanned:
                        q.unpop()
                    self._starve_for_more(q)
                    stop = True
                break  # the batch is spent (given back or used): take a new one
            else:
                if not observed:
                    want = min(BUDGET, 2 * want)  # the batch was used up: more may wait
                continue
        c.packets += packets
        if c.packets != before:  # frames placed in place, batched, or copied on
            self._rx_last = c.packets - before
        c.bytes += nbytes
        self._flush_rx(q, done)
        if self._push:
            self._wake()  # frames may still wait (the budget ran out)
        elif self.rx_defer_ns and c.packets != before:
            self._maybe_defer_rx(c.packets - before)

    def _maybe_defer_rx(self, frames: int) -> None:
        """After an event that read `frames`: in a stream of large frames, an
        event that read few leaves the TAP unread for rx_defer_ns (RX_DEFER_AFTER)."""
        if self._rx_span == 1:
            self._rx_streak = 0  # a frame that fit one buffer: no stream of large ones
            return
        self._rx_streak += 1
        if (
            frames < RX_DEFER_BELOW
            and self._rx_streak >= RX_DEFER_AFTER
            and self._rx_deferred is None
            and not self.rx_starved
        ):
            with self.loop.owned_by(self._rx_owner):
                self._rx_deferred = self.loop.call_at(
                    time.monotonic_ns() + self.rx_defer_ns, self._rx_deferral_over
                )
            self.rx_counters.deferrals += 1
            self._update_reading()

    def _rx_deferral_over(self) -> None:
        self._rx_deferred = None
        self._update_reading()
        self.process_tap_rx_event()

    def _end_rx_deferral(self) -> None:
        self._rx_streak = 0
        if self._rx_deferred is not None:
            self._rx_deferred.cancel()
            self._rx_deferred = None

    def _frames_wait(self) -> bool:
        """Whether the host side has a frame to read now (a zero-timeout poll
        of the TAP's fd, or a pushing host side's own answer)."""
        if self._readable is None:
            return self.host.has_frames()
        return bool(self._readable.poll(0))

    def _rx_spans(self, q: SplitQueue, reader, want: int, done: list) -> tuple[int, bool]:
        """Batched reads: a frame into each of a batch of one-buffer RX chains, one
        system call per batch. Returns (chains used, stop): stop when the TAP
        is empty or the guest's buffers ran out; otherwise the general path
        goes on (a chain that is not one buffer is next, or a frame was larger
        than its buffer and the stream now wants merged spans)."""
        c = self.rx_counters
        hdr = self.hdr_size
        taken = 0
        while taken < BUDGET:
            heads, addrs, lengths = q.pop_spans(min(want, BUDGET - taken), writable=True)
            if not heads:
                return taken, False  # no buffers, or not one-buffer ones: pop_batch decides
            results = reader.read_spans(addrs, lengths)
            n = len(heads)
            fit = 0  # frames that landed whole in their buffer, from the first on
            for got, room in zip(results, lengths, strict=True):
                if got < hdr or got > room:
                    break
                fit += 1
            if fit:
                q.memory.stamp(addrs[:fit] if fit < n else addrs, 10, _ONE_BUFFER)  # num_buffers
                done.extend(zip(heads[:fit], results[:fit], strict=True))
                c.packets += fit
                c.bytes += sum(results[:fit]) - fit * hdr
                taken += fit
            if fit == n:
                self._rx_large_seen = False
                if not self._frames_wait():
                    return taken, True  # a poll costs less than a batch of empty reads
                want = min(BUDGET, 2 * want)  # all of them full, and more wait
                continue
            for _ in range(n - fit):
                q.unpop()  # the rest of the batch goes back to the ring
            if results.count(-errno.EAGAIN) == n - fit:
                return taken, True  # the reads after the frames found the TAP empty
            # Rare: a frame larger than its buffer, an error, or a frame that came
            # in after a read had found none. What was read from `fit` on is kept,
            # in order, and placed as pending frames (copied, merged as needed).
            failed = ""
            for i in range(fit, n):
                got, room = results[i], lengths[i]
                if got == -errno.EAGAIN:
                    continue
                if got < hdr:  # the read itself failed: given up below
                    c.errors += 1
                    failed = failed or (os.strerror(-got) if got < 0 else f"{got} bytes")
                    continue
                frame = ctypes.string_at(addrs[i], min(got, room))
                if got > room:
                    frame += bytes(reader.overflow(i, got - room))
                    self._rx_span = min(BUDGET, -(-got // room))  # a GSO stream: span chains
                    self._rx_large_seen = True
                self._pending.append(frame)
            if failed and self._span_reader is not None:
                # Not a frame's fault: the batched read itself failed. Say so once
                # and read frame by frame from now on.
                log.warning("rx%d: a batched read of the TAP failed (%s); reading frame "
                            "by frame from now on", self.pair, failed)  # fmt: skip
                self._span_reader.close()
                self._span_reader = None
            if not self._place_pending(q, done):
                return taken, True
            return taken, False
        return taken, False

    def _rx_merged(
        self, q: SplitQueue, span: int, size: int, done: list
    ) -> tuple[int, int, int, bool] | None:
        """A GSO stream's frames, each read in place across `span` merged
        buffers of a batch that pop_views() took, with no DescriptorChain built:
        (buffers used, frames, bytes, stop). None when the ring's next buffers
        are not such a batch (pop_batch takes them). A frame that fits one
        buffer ends the batch with the span back at 1 (a burst of small frames
        is read in batches); one larger than its span is kept and placed as a
        pending frame, the span grown to fit it."""
        heads, views, lengths = q.pop_views(size)
        if not heads:
            return None
        c = self.rx_counters
        hdr = self.hdr_size
        read = self.host.read_iovec
        bounce = self._bounce_view
        n = len(heads)
        i = frames = nbytes = 0
        stop = overflowed = False
        while i < n:
            end = i + span
            if end > n:
                if i:
                    break  # not a whole span left: given back, a new batch starts with them
                end = n
            bufs = views[i:end]
            bufs.append(bounce)
            try:
                got = read(bufs)
            except BlockingIOError:
                stop = True  # nothing queued on the TAP: the rest goes back
                break
            except OSError as e:
                c.errors += 1
                log.warning("rx%d: reading the TAP failed: %s", self.pair, e.strerror)
                stop = True
                break
            if got < hdr:
                c.errors += 1  # shorter than its own header: not a frame
                continue
            ends = list(accumulate(lengths[i:end]))
            if got > ends[-1]:
                # Ran on into the bounce buffer: keep the frame, and place it
                # below with as many buffers as it needs.
                room = ends[-1]
                self._pending.append(b"".join(bufs[:-1]) + bounce[: got - room])
                self._rx_span = min(BUDGET, max(end - i, -(-got // lengths[i])))
                self._rx_large_seen = True
                overflowed = True
                break
            k = bisect_left(ends, got)  # the frame ends in buffer i + k
            done.extend(zip(heads[i : i + k], lengths[i : i + k], strict=True))
            done.append((heads[i + k], got - ends[k - 1] if k else got))
            count = (k + 1).to_bytes(2, "little")  # num_buffers
            first = views[i]
            if len(first) >= 12:
                first[10:12] = count
            else:
                write_at(views[i:end], 10, count)
            frames += 1
            nbytes += got - hdr
            i += k + 1
            if not k:
                self._rx_span = 1  # it fit one buffer: small frames follow, read in batches
                break
            self._rx_large_seen = True
        for _ in range(n - i):
            q.unpop()
        if overflowed and not self._place_pending(q, done):
            stop = True
        return i, frames, nbytes, stop

    def _place_merged(self, q: SplitQueue, first, room: int, overflow, done) -> bool:
        """Copy `overflow` into further chains; on success queue all completions."""
        return self._place_spanned(q, [first], room, overflow, done)

    def _place_spanned(self, q: SplitQueue, firsts: list, room: int, overflow, done) -> bool:
        """The frame filled chains `firsts` (`room` bytes) and ran on into `overflow`:
        copy that into further chains; on success queue all completions."""
        extra = []
        pos = 0
        while pos < len(overflow):
            chain = q.pop()
            if chain is None:
                for _ in extra:
                    q.unpop()
                return False
            n = scatter(chain.writable, overflow[pos:])
            extra.append((chain.head, n))
            pos += n
        write_at(firsts[0].writable, 10, (len(firsts) + len(extra)).to_bytes(2, "little"))
        for part in firsts:
            done.append((part.head, part.writable_len))
        done.extend(extra)
        self.rx_counters.packets += 1
        self.rx_counters.bytes += room + len(overflow) - self.hdr_size
        return True

    def _place_pending(self, q: SplitQueue, done) -> bool:
        """Deliver the frames kept while the guest had too few buffers (or left
        out of place by a batched read), oldest first; False if some still wait."""
        while self._pending:
            frame = memoryview(self._pending[0])
            first = q.pop()
            if first is None:
                self._starve(q)
                return False
            room = min(first.writable_len, len(frame))
            scatter(first.writable, frame[:room])
            if room == len(frame):
                write_at(first.writable, 10, b"\x01\x00")
                done.append((first.head, room))
                self.rx_counters.packets += 1
                self.rx_counters.bytes += room - self.hdr_size
            elif not self._place_merged(q, first, room, frame[room:], done):
                q.unpop()
                self._starve_for_more(q)
                return False
            self._pending.popleft()
        return True

    def _starve(self, q: SplitQueue) -> None:
        """No RX buffers: ask for a kick, and stop reading the TAP until it comes."""
        if q.enable_notification():
            # Buffers arrived meanwhile: the level-triggered TAP fd brings us back
            # (a host side that pushes frames is woken as if it were one).
            if self._push:
                self._wake()
            return
        self.rx_starved = True
        self._update_reading()

    def _starve_for_more(self, q: SplitQueue) -> None:
        """A frame waits for more RX buffers than the guest has posted: ask for a
        kick when it posts more (not at the first one there, already passed), and
        stop reading the TAP meanwhile. The TAP's fd cannot bring us back: the
        frame is ours, not the TAP's."""
        if q.enable_notification_for_more():
            with self.loop.owned_by(self._rx_owner):
                self.loop.call_soon(self.process_tap_rx_event)
            return
        self.rx_starved = True
        self._update_reading()

    def _wake(self) -> None:
        """A pushing host side with frames waiting: read them at the loop's next
        turn, as a readable fd would, for the ring's own session."""
        if (
            not self._wake_pending
            and self.rxq is not None
            and self.rx_enabled
            and not self.rx_starved
            and self.host.has_frames()
        ):
            self._wake_pending = True
            with self.loop.owned_by(self._rx_owner):
                self.loop.call_soon(self._woken)

    def _woken(self) -> None:
        self._wake_pending = False
        self.process_tap_rx_event()

    def _flush_rx(self, q: SplitQueue, done: list[tuple[int, int]]) -> None:
        if done:
            q.push_used_batch(done)
            self.rx_notifier.completed()
