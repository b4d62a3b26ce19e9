"""The pusher: polls rendered into the bounded buffer, a sender thread that delivers them.

    poller thread                         sender thread ("sockscope-graphite")
    Pusher.on_poll(status)                Pusher._run()
      LineBuilder.render(status)            connect (timeouts, capped backoff + jitter)
        validate every line                 take the oldest chunk, write it whole
      pack lines into chunks                keep it until carbon has confirmed it (below)
      LineBuffer.add()  ── lock ──►         on an abnormal close, everything unconfirmed
                                              goes back first in line and is written again
                                            LineBuffer (bounded in lines, drops oldest)

Delivery over TCP is at-least-once for everything written on a connection that was not
confirmed. A chunk stays in the buffer after `sendall` returned ("unconfirmed") until:
  - every byte of it was acknowledged by carbon's TCP (SIOCOUTQ: bytes not acknowledged),
  - a check at least `confirm_delay` (1.5 push intervals, at least 1 s) after that
    acknowledgement was first seen finds the connection open (no EOF, no reset), and
  - at that check carbon's advertised receive window (tcp_info tcpi_snd_wnd) is the largest
    it offered on this connection: a receiver that leaves bytes unread advertises less;
or carbon closed the connection cleanly (FIN, no reset) after acknowledging everything,
including when sockscope half-closes it at shutdown (a peer reaches EOF only after reading
every byte before it; a kernel that closes a socket with unread data sends a reset).
Only then is a line counted in `sent_lines`. A reset, EPIPE, a send timeout or a peer FIN
with bytes outstanding puts every unconfirmed chunk back first in line: carbon may receive
those lines twice (same path, value and timestamp: the same whisper point written twice).
A partial line carbon got before the connection broke is discarded by its line receiver.

What stays possible to lose is in docs/graphite.md ("What can still be lost"). UDP has no
delivery guarantee at all: a datagram counts as sent when the kernel accepted it.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import selfmetrics
from ..config import format_endpoint
from ..snapshot import PollStatus, Snapshot
from .buffer import Chunk, Drops, LineBuffer, pack
from .lines import METRICS, LineBuilder
from .transport import KEEPALIVE_INTERVAL, Transport

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("sockscope.graphite")

__all__ = ["GraphiteStats", "MAX_DEFAULT_BUFFER_LINES", "Pusher", "SELF_SERIES", "SETTLE_AFTER", "SOURCE_SERIES",
           "default_buffer_lines"]

BACKOFF_INITIAL = 0.5  # seconds before the first reconnect
BACKOFF_MAX = 30.0  # cap of the exponential backoff
# The default buffer holds this much outage at the configured series count.
OUTAGE_SECONDS = 1800
# Lines per push besides the features' (Feature.max_series), from the catalogue: the poll
# loop's own unlabelled series (selfmetrics) and the pusher's (lines.METRICS) ...
SELF_SERIES = sum(1 for m in (*selfmetrics.POLL_METRICS, *METRICS) if m.graphite is not None and not m.labels)
# ... and, per source (each enabled feature), sockscope.source.<name>.{up,duration_seconds,errors}.
SOURCE_SERIES = sum(1 for m in selfmetrics.POLL_METRICS if m.graphite is not None and m.labels == ("source",))
# Pusher.detach (reload): how long to wait for the interrupted sender thread to stop.
HANDOVER_WAIT = 2.0
# A chunk acknowledged by carbon's TCP counts as sent only if the connection is still open
# and carbon's receive window is full at a check at least CONFIRM_INTERVALS push intervals
# (and at least CONFIRM_DELAY seconds) after the acknowledgement was seen. carbon, when
# alive, reads within milliseconds; waiting past the next push matters because a receive
# window moves in steps (2^wscale bytes, and not below rcv_ssthresh): a few KB left unread
# can leave it unchanged, the next push's bytes on top of them make it shrink.
CONFIRM_DELAY = 1.0
CONFIRM_INTERVALS = 1.5
# How often the sender checks the connection while something written is unconfirmed.
CHECK_INTERVAL = 0.1
# Acknowledged but still unconfirmed this long (the window never came back: a stalled
# carbon, or a receiver whose window shrank for good): half-close the connection and wait
# for carbon's FIN, which confirms everything, or write it all again on a new connection.
RECYCLE_AFTER = 30.0
# The same, sooner, once the connection has gone quiet: everything written acknowledged,
# nothing written and carbon's window unchanged for this long (at least confirm_delay), yet
# below the largest it offered. Linux lowers the window it offers with an empty receive
# queue when it lowers window_clamp/rcv_ssthresh (e.g. window_clamp follows the measured
# payload/truesize ratio of received segments, tcp_measure_rcv_mss); seen here after a
# 280 KB burst: Recv-Q 0 and rcv_ssthresh 704512 at the receiver after it had offered
# 717824. Such a window never comes back, and neither does a stalled carbon's; only
# carbon's FIN tells them apart. 3 s: the first keepalive answer comes KEEPALIVE_IDLE after
# the last ACK, then one every KEEPALIVE_INTERVAL; two of them agree before we give up.
SETTLE_AFTER = 3.0


@dataclass(frozen=True, slots=True)
class GraphiteStats:
    """The pusher's counters, copied under its lock (cumulative since start)."""

    sent_lines: int = 0  # TCP: confirmed read by carbon (module docstring); UDP: datagram accepted
    send_errors: int = 0  # failed connects, failed sends, connections lost with lines unconfirmed
    dropped_lines: int = 0  # oldest lines dropped because the buffer was full, never written
    dropped_unconfirmed_lines: int = 0  # the same, but written before: carbon may have them
    resent_lines: int = 0  # lines written again after the connection they were written on failed
    invalid_lines: int = 0  # lines refused by validation, never queued
    queue_lines: int = 0  # not yet sent: waiting, being written, or written and unconfirmed
    unconfirmed_lines: int = 0  # of queue_lines: written on the open connection, unconfirmed
    capacity_lines: int = 0
    pushes: int = 0  # snapshots rendered and queued
    last_success_timestamp: float = 0.0  # UNIX time lines were last counted sent; 0 = never
    connected: bool = False


# The default buffer's ceiling: ~120-180 MB of lines at 60-90 bytes, under the unit's
# MemoryMax=256M. The default caps reach it at a 5 s push (6,965 lines, units on); a namespace
# sweep multiplies the bound by netns.max_tracked. It then holds less than 30 minutes of a
# push with every cap full, and more of what is really exported (a few hundred lines on most
# hosts).
MAX_DEFAULT_BUFFER_LINES = 2_000_000


def default_buffer_lines(interval: float, per_push: int) -> int:
    """Lines for OUTAGE_SECONDS of pushes every `interval` seconds at `per_push` lines, at
    most MAX_DEFAULT_BUFFER_LINES."""
    return min(math.ceil(OUTAGE_SECONDS / interval) * per_push, MAX_DEFAULT_BUFFER_LINES)


class Pusher:
    """Renders polls into the bounded buffer (poller thread) and sends them (own thread).

    on_poll() returns after rendering (a few ms for thousands of series): it never waits
    for the network, so a slow or blackholed carbon cannot stall the poller or /metrics.
    A snapshot is pushed when it is at least `interval` newer than the last one pushed
    (within half a poll interval); its lines carry the poll's timestamp, whole seconds.
    """

    def __init__(
        self,
        builder: LineBuilder,
        transport: Transport,
        *,
        interval: float,
        poll_interval: float,
        capacity_lines: int,
        connect_timeout: float = 5.0,
        send_timeout: float = 10.0,
        flush_timeout: float = 10.0,
        backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_MAX),
        confirm_delay: float | None = None,
        check_interval: float = CHECK_INTERVAL,
        recycle_after: float = RECYCLE_AFTER,
        settle_after: float = SETTLE_AFTER,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.builder = builder
        self.transport = transport
        self.interval = interval
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.flush_timeout = flush_timeout
        self.confirm_delay = (max(CONFIRM_DELAY, CONFIRM_INTERVALS * interval) if confirm_delay is None
                              else confirm_delay)
        self.check_interval = check_interval
        self.recycle_after = recycle_after
        self.settle_after = max(settle_after, self.confirm_delay)
        self._backoff = backoff
        self._clock = clock
        self._monotonic = monotonic
        self._jitter = jitter
        self.destination = f"{transport.protocol}://{format_endpoint(transport.host, transport.port)}"
        self._confirming = transport.protocol == "tcp"

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._buffer = LineBuffer(capacity_lines)
        self._sent = self._errors = self._dropped = self._dropped_unconfirmed = 0
        self._resent = self._invalid = self._pushes = 0
        self._last_success = 0.0
        self._closing = False
        self._detached = False  # stopped by detach(): a successor owns the queue
        self._deadline = math.inf
        self._thread: threading.Thread | None = None
        # sender thread only
        self._failures = 0
        self._next_attempt = 0.0
        self._outage_started: float | None = None
        self._written_bytes = 0  # on the current connection
        self._max_window = 0  # largest receive window carbon advertised on it
        self._quiet_since = 0.0  # monotonic: last write, or last change of carbon's window
        self._last_window: int | None = None
        # poller thread only
        self._last_snapshot: Snapshot | None = None
        self._last_pushed: tuple[float, int] | None = None  # (poll timestamp, line timestamp)
        self._dropping = False
        self._invalid_logged = False

    @classmethod
    def from_config(cls, cfg: Config, series: int, sources: int = 0, **kwargs) -> Pusher:
        """`series`: the most series the enabled features can export with `cfg`
        (service.max_series), `sources` how many they are (each has its source health
        series): the default buffer holds OUTAGE_SECONDS of pushes of those and our own."""
        g = cfg.graphite
        interval = g.interval or cfg.poll.interval
        per_push = series + SELF_SERIES + SOURCE_SERIES * sources
        capacity = g.buffer_lines or default_buffer_lines(interval, per_push)
        if not g.buffer_lines and capacity == MAX_DEFAULT_BUFFER_LINES:
            log.info("graphite.buffer_lines: 0 is capped at %d lines (~%d MB at most): with every cap full "
                     "(up to %d lines per push) it holds %.1f of the 30 minutes of outage it aims at; set "
                     "graphite.buffer_lines to what memory allows (docs/graphite.md)", capacity,
                     capacity * 90 // 10**6, per_push, capacity // per_push * interval / 60)
        if capacity < per_push:
            log.warning("graphite.buffer_lines (%d) is smaller than one push at the configured caps "
                        "(up to %d lines): any outage drops lines", capacity, per_push)
        elif capacity < 3 * per_push:
            log.warning("graphite.buffer_lines (%d) holds fewer than 3 pushes at the configured caps (up to "
                        "%d lines each): lines awaiting carbon's confirmation count against it, so even a "
                        "healthy carbon may see unconfirmed lines dropped", capacity, per_push)
        builder = LineBuilder(naming=g.naming, tags=g.tags, prefix=g.prefix, host=g.host,
                              **{k: kwargs.pop(k) for k in ("hostname", "fqdn") if k in kwargs})
        if builder.host.lower() in ("localhost", "localhost.localdomain") and g.host != builder.host:
            log.warning("graphite: graphite.host %r resolved to %r (as collectd's would), so every such "
                        "host writes the same paths; set graphite.host to a name", g.host, builder.host)
        # Keepalive gives up on a silent idle carbon after about send_timeout.
        transport = Transport(g.server_host, g.server_port, g.protocol,
                              keepalive_probes=math.ceil(g.send_timeout / KEEPALIVE_INTERVAL))
        return cls(builder, transport, interval=interval, poll_interval=cfg.poll.interval,
                   capacity_lines=capacity, connect_timeout=g.connect_timeout,
                   send_timeout=g.send_timeout, flush_timeout=g.flush_timeout, **kwargs)

    # -- poller side ------------------------------------------------------------------------

    def on_poll(self, status: PollStatus) -> int:
        """Service.on_poll callback: render the new snapshot (if due) and queue it.
        Returns the number of lines queued (0 when nothing was due)."""
        snap = status.snapshot
        if snap is None or snap is self._last_snapshot:
            return 0  # before the first success, or a failed poll (keeps the old snapshot)
        self._last_snapshot = snap
        stamp = int(round(snap.timestamp))  # graphyte rounds the same way
        if self._last_pushed is not None:
            last_time, last_stamp = self._last_pushed
            if snap.timestamp < last_time + self.interval - self.poll_interval / 2:
                return 0  # graphite.interval is a multiple of poll.interval: not due yet
            if stamp <= last_stamp:
                # Two polls in one second (scheduling jitter): carbon keeps one point per
                # second, so a second push would only overwrite the first.
                log.debug("graphite: poll at %.3f falls in second %d, already pushed; skipped",
                          snap.timestamp, stamp)
                return 0
        self._last_pushed = (snap.timestamp, stamp)
        return self.push(status, stamp)

    def push(self, status: PollStatus, stamp: int) -> int:
        """Render `status` with timestamp `stamp` and queue it. Returns the lines queued."""
        rendered = self.builder.render(status, stamp, self.stats(), self.poll_interval)
        chunks = pack(rendered.lines, self.transport.chunk_bytes)
        with self._cond:
            drops = self._buffer.add(chunks)
            self._count_drops(drops)
            self._invalid += len(rendered.invalid)
            self._pushes += 1
            queued = len(self._buffer)
            self._cond.notify()
        if rendered.invalid and not self._invalid_logged:
            self._invalid_logged = True
            log.warning("graphite: %d invalid lines not queued (logged once), first: %s",
                        len(rendered.invalid), rendered.invalid[0])
        if drops.total and not self._dropping:
            self._dropping = True
            log.warning("graphite: buffer full (%d lines), dropping the oldest lines; "
                        "sockscope_graphite_dropped_lines_total (never written) and "
                        "sockscope_graphite_dropped_unconfirmed_lines_total (written, unconfirmed) "
                        "count them", self._buffer.capacity)
        elif not drops.total:
            self._dropping = False
        log.debug("graphite: queued %d lines stamped %d (queue %d lines)", len(rendered.lines), stamp, queued)
        return len(rendered.lines)

    def _count_drops(self, drops: Drops) -> None:
        """Under the lock."""
        self._dropped += drops.unsent
        self._dropped_unconfirmed += drops.unconfirmed

    def stats(self) -> GraphiteStats:
        with self._lock:
            return GraphiteStats(
                sent_lines=self._sent, send_errors=self._errors, dropped_lines=self._dropped,
                dropped_unconfirmed_lines=self._dropped_unconfirmed, resent_lines=self._resent,
                invalid_lines=self._invalid, queue_lines=len(self._buffer),
                unconfirmed_lines=self._buffer.unconfirmed, capacity_lines=self._buffer.capacity,
                pushes=self._pushes, last_success_timestamp=self._last_success,
                connected=self.transport.connected,
            )

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Pusher already started")
        self._thread = threading.Thread(target=self._run, name="sockscope-graphite", daemon=True)
        self._thread.start()
        log.info("pushing to Graphite at %s every %gs (buffer %d lines)",
                 self.destination, self.interval, self._buffer.capacity)

    def close(self, timeout: float | None = None) -> int:
        """Send what is queued and have it confirmed (TCP: carbon's FIN after our
        half-close) for at most `timeout` seconds (default flush_timeout), then stop.
        Returns the number of lines not sent (and logs it)."""
        timeout = self.flush_timeout if timeout is None else timeout
        started = self._monotonic()
        with self._cond:
            self._closing = True
            self._deadline = started + timeout
            self._cond.notify_all()
        self._next_attempt = 0.0  # one immediate attempt, even in the middle of a backoff
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 0.5)
            if self._thread.is_alive():  # stuck outside our timeouts (e.g. DNS)
                log.warning("graphite: sender thread still busy after %gs; abandoned", timeout)
            else:
                self.transport.close()
        with self._lock:
            unsent, unconfirmed = len(self._buffer), self._buffer.unconfirmed
        if unsent:
            log.warning("graphite: shutdown flush gave up after %.1fs: %d lines not sent to %s "
                        "(%d of them written but not confirmed)",
                        self._monotonic() - started, unsent, self.destination, unconfirmed)
        else:
            log.info("graphite: every queued line sent (%d since start)", self._sent)
        return unsent

    # -- reload: a successor takes over -------------------------------------------------------

    def continue_from(self, old: Pusher) -> None:
        """Take `old`'s push cadence (last snapshot and timestamp pushed), so the first
        poll after a reload is pushed on time, never twice and never in a second already
        pushed. Call while neither on_poll runs (Service holds its dispatch lock)."""
        self._last_snapshot = old._last_snapshot
        self._last_pushed = old._last_pushed

    def detach(self, timeout: float = HANDOVER_WAIT) -> tuple[list[Chunk], GraphiteStats]:
        """Stop sending at once, without a flush, and give up the queue: returns every
        unsent chunk (unconfirmed ones first, marked written, then the queue) and the final
        counters, for a successor's take_over().

        A send or connect in progress is interrupted (Transport.abort); its chunk goes
        back in line and is handed over whole (at-least-once, as after any failed send).
        Waits at most `timeout` for the sender thread; if it is stuck beyond that
        (e.g. DNS), the chunk it holds, if any, stays behind and is counted as dropped."""
        with self._cond:
            self._closing = self._detached = True
            self._deadline = -math.inf
            self._cond.notify_all()
        self._wake.set()
        self.transport.abort()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("graphite: sender thread for %s still busy after %gs; abandoned",
                            self.destination, timeout)
        with self._lock:
            chunks = self._buffer.drain()
            stranded = self._buffer.in_flight
            if stranded is not None:
                self._count_drops(Drops(0, stranded.lines) if stranded.written else Drops(stranded.lines, 0))
        if not (self._thread is not None and self._thread.is_alive()):
            self.transport.close()
        return chunks, self.stats()

    def take_over(self, chunks: list[Chunk], stats: GraphiteStats | None) -> int:
        """Queue a predecessor's chunks ahead of anything already queued (they keep the
        paths and timestamps they were rendered with) and add its counters to ours, so
        the counters on /metrics never go back. Returns the lines taken over (after
        trimming to this buffer's capacity; trimmed lines count as dropped)."""
        if chunks and max(len(c.data) for c in chunks) > self.transport.chunk_bytes:
            # e.g. tcp -> udp: re-pack into datagram-sized chunks (written chunks apart)
            chunks = [Chunk(c.data, c.lines, flag) for flag in (True, False)
                      for c in pack([line for c in chunks if c.written == flag
                                     for line in c.data.splitlines(keepends=True)],
                                    self.transport.chunk_bytes)]
        with self._cond:
            drops = self._buffer.prepend(chunks)
            self._count_drops(drops)
            if stats is not None:
                self._sent += stats.sent_lines
                self._errors += stats.send_errors
                self._dropped += stats.dropped_lines
                self._dropped_unconfirmed += stats.dropped_unconfirmed_lines
                self._resent += stats.resent_lines
                self._invalid += stats.invalid_lines
                self._pushes += stats.pushes
                self._last_success = max(self._last_success, stats.last_success_timestamp)
            self._cond.notify()
        total = sum(c.lines for c in chunks)
        if drops.total:
            log.warning("graphite: %d of the %d lines taken over did not fit the new buffer (%d lines); "
                        "the oldest were dropped", drops.total, total, self._buffer.capacity)
        return total - drops.total

    # -- sender thread ----------------------------------------------------------------------

    def _remaining(self, limit: float) -> float:
        """`limit`, shortened to what is left of the shutdown flush."""
        if not self._closing:
            return limit
        return max(0.001, min(limit, self._deadline - self._monotonic()))

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._buffer.has_queued and not self._closing:
                    if self._buffer.has_unconfirmed:
                        self._cond.wait(self.check_interval)  # a push wakes it earlier
                    else:
                        while not self._buffer.has_queued and not self._closing:
                            self._cond.wait()
                closing = self._closing
            if self._detached:
                self._stop_detached()
                return
            if self._confirming and self.transport.connected:
                self._check()
            if closing:
                if self._monotonic() >= self._deadline:
                    return
                with self._lock:
                    queued, unconfirmed = self._buffer.has_queued, self._buffer.has_unconfirmed
                if not queued:
                    if unconfirmed:
                        self._finish("shutdown", self._deadline - self._monotonic())
                        if self._buffer.has_queued:
                            continue  # carbon did not confirm: written again if time is left
                    return
            if not self._buffer.has_queued:
                continue
            if not self.transport.connected and not self._connect():
                continue
            with self._lock:
                chunk = self._buffer.take()
            if chunk is None:
                continue
            try:
                self.transport.send_message(chunk.data, timeout=self._remaining(self.send_timeout))
            except OSError as exc:
                if self._detached:  # interrupted by detach(): not a failure of carbon
                    self._stop_detached()
                    return
                self._failed("send", exc)
                continue
            with self._lock:
                if chunk.written:
                    self._resent += chunk.lines
                if self._confirming:
                    self._written_bytes += len(chunk.data)
                    self._quiet_since = self._monotonic()
                    self._count_drops(self._buffer.written(self._written_bytes))
                else:  # UDP: fire and forget
                    self._buffer.done()
                    self._sent += chunk.lines
                    self._last_success = self._clock()
                backlog = len(self._buffer)
            if self._failures:
                self._recovered(backlog)

    def _stop_detached(self) -> None:
        with self._lock:
            self._count_drops(self._buffer.requeue())
        self.transport.close()

    def _check(self) -> None:
        """Look at the connection: confirm what carbon has read, or put back everything
        unconfirmed if carbon closed or reset it."""
        try:
            probe = self.transport.probe()
        except OSError as exc:
            self._failed("connection check", exc)
            return
        if probe.window is not None:
            self._max_window = max(self._max_window, probe.window)
        window_full = probe.window is None or probe.window >= self._max_window
        if probe.window != self._last_window:
            self._last_window = probe.window
            self._quiet_since = self._monotonic()
        if probe.closed:
            if probe.error is None and probe.unacked == 0 and window_full:
                # A clean FIN after acknowledging everything: carbon read it all.
                with self._lock:
                    self._confirmed(self._buffer.confirm_all())
                log.info("graphite: %s closed the connection; reconnecting", self.destination)
                self.transport.close()
                return
            with self._lock:
                unconfirmed = self._buffer.unconfirmed
            if not unconfirmed:
                log.info("graphite: %s closed the connection (%s); reconnecting", self.destination,
                         probe.error or "EOF")
                self.transport.close()
                return
            self._failed("connection", probe.error or ConnectionError(
                f"carbon closed the connection with {probe.unacked} bytes unacknowledged, "
                f"{unconfirmed} lines unconfirmed"))
            return
        now = self._monotonic()
        with self._lock:
            confirmed = self._buffer.confirm(self._written_bytes - probe.unacked, window_full,
                                             now, self.confirm_delay)
            self._confirmed(confirmed)
            acked_at = self._buffer.oldest_acked_at()
            unconfirmed = self._buffer.unconfirmed
        if confirmed:
            log.debug("graphite: %d lines confirmed (%d of %d bytes acknowledged, window %s of %d)", confirmed,
                      self._written_bytes - probe.unacked, self._written_bytes, probe.window, self._max_window)
        if acked_at is not None and now - acked_at >= self.recycle_after:
            # Acknowledged long ago, yet carbon's window never came back: it is not
            # reading (or its window shrank for good). Its FIN would confirm everything.
            log.info("graphite: %s acknowledged lines %.0fs ago without its window coming back; "
                     "closing the connection to have them confirmed", self.destination, now - acked_at)
            self._finish("recycle", self._remaining(self.send_timeout))
        elif (acked_at is not None and probe.unacked == 0 and not window_full
              and now - self._quiet_since >= self.settle_after):
            # Quiet: nothing more will move the window (SETTLE_AFTER). Half-close now
            # rather than after recycle_after: carbon's FIN confirms what it read.
            log.debug("graphite: %s acknowledged everything, window %s below its largest %d for %.1fs; "
                      "closing the connection to have %d lines confirmed", self.destination, probe.window,
                      self._max_window, now - self._quiet_since, unconfirmed)
            self._finish("settle", self._remaining(self.send_timeout))

    def _confirmed(self, lines: int) -> None:
        """Under the lock."""
        if lines:
            self._sent += lines
            self._last_success = self._clock()

    def _finish(self, why: str, timeout: float) -> None:
        """Half-close and wait for carbon's FIN: it confirms every unconfirmed line; a
        reset or a timeout puts them back in line (a failure)."""
        if self.transport.finish(max(0.0, timeout)):
            with self._lock:
                self._confirmed(self._buffer.confirm_all())
            log.debug("graphite: %s: %s read everything and closed", why, self.destination)
            return
        self._failed(why, ConnectionError(f"carbon did not close cleanly within {timeout:.1f}s "
                                          "(reset, or still not reading)"))

    def _connect(self) -> bool:
        wait = self._next_attempt - self._monotonic()
        if wait > 0:
            if self._closing:
                wait = min(wait, self._deadline - self._monotonic())
            self._wake.wait(max(0.0, wait))
            self._wake.clear()
            return False  # re-check closing/deadline first
        try:
            self.transport.connect(self._remaining(self.connect_timeout))
        except (OSError, ValueError) as exc:  # ValueError: e.g. an IDNA-invalid host name
            if self._detached:
                self.transport.close()
                return False
            self._failed("connect", exc)
            return False
        self._written_bytes = self._max_window = 0
        self._last_window = None
        self._quiet_since = self._monotonic()
        log.debug("graphite: connected to %s", self.destination)
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        """Close the connection; everything unconfirmed and the chunk in flight go back
        first in line; count the error and back off."""
        if self._detached:  # detach() interrupted it: not a failure of carbon
            self._stop_detached()
            return
        self.transport.close()
        with self._lock:
            resend = self._buffer.unconfirmed + (self._buffer.in_flight.lines if self._buffer.in_flight else 0)
            self._count_drops(self._buffer.requeue())
            self._errors += 1
            queued = len(self._buffer)
        self._failures += 1
        initial, cap = self._backoff
        delay = min(cap, initial * 2 ** (self._failures - 1))
        delay *= 0.5 + 0.5 * self._jitter()  # "equal jitter": never less than half the delay
        self._next_attempt = self._monotonic() + delay
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._failures == 1:
            self._outage_started = self._monotonic()
            log.warning("graphite: %s to %s failed (%s); %d lines written but unconfirmed will be "
                        "sent again; buffering (%d lines queued), retrying with backoff up to %gs",
                        what, self.destination, message, resend, queued, cap)
        else:
            log.debug("graphite: %s to %s failed again (%s); %d lines to send again; next attempt in %.1fs",
                      what, self.destination, message, resend, delay)

    def _recovered(self, backlog: int) -> None:
        took = self._monotonic() - (self._outage_started or self._monotonic())
        log.info("graphite: sending to %s again after %d failed attempts over %.1fs; %d lines still queued",
                 self.destination, self._failures, took, backlog)
        self._failures = 0
        self._outage_started = None



