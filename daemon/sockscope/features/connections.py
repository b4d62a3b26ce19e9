"""Exact traffic, retransmits and closed connections per port, across polls and closes.

Two sources, one ledger. The poll's TCP dump (asked for INET_DIAG_INFO, shared with the
tcp_info feature) gives every live socket's cumulative tcpi_bytes_acked,
tcpi_bytes_received and tcpi_total_retrans; the kernel's close notifications
(closeevents.py, read by a receiver thread per watched namespace) give the same three
for every full socket at its end, with how it ended. Per socket (cookie) the ledger keeps
the values last accounted; the growth since then is added to the socket's local and
remote port when a poll sees it and when its close arrives, then the close drops it:

- sockets in the feature's FIRST poll are its baseline (only their growth after it counts);
  sockets first seen later, or only in a close event, were born after it and count whole;
- close events that arrive before the first poll count the close, not the bytes (their
  sockets may predate the start);
- a socket a dump no longer sees and whose close has not arrived is kept one more poll
  (`gone`): a close read just after a poll's drain, or a socket the kernel's walk skipped,
  is matched then instead of counted whole again; after that it is forgotten;
- a socket no poll saw and whose close was lost is missed whole; one whose close was lost
  loses its growth since its last poll;
- per port, two counter histograms of the connections that closed established: the
  duration from the start of the first poll that saw the socket (unknown, so not observed,
  for baseline sockets and ones no poll saw) to the reading of its close, and the
  smoothed RTT in its close notification;
- the ledger is bounded by `connections.max_sockets`: sockets beyond it are not followed
  (sockscope_tcp_connections_untracked_sockets), their growth is counted when a later poll
  finds room, or at their close.

Thread safety: the receiver only decodes each wakeup's events into compact columns
(Closed: 49 bytes per event) and appends them to a bounded queue
(`connections.max_pending_events`; beyond it the events are dropped and counted lost);
the poller thread drains the queue at the end of each accepted dump attempt (Fold.finish)
and is the only thread that touches the ledger and the counters.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from .. import tcpinfo
from ..aggregate import Rules, port_rows
from ..batch import Batch
from ..catalogue import GraphitePath, Metric, Samples
from ..closeevents import FAILED, OUTCOMES, Closed, CloseEvents, decode
from ..health import Problems
from ..snapshot import OTHER
from .base import DumpNeed, DumpStats, Feature, Fold, PollContext
from .tcp_info import BUCKETS as RTT_BUCKETS

__all__ = ["Connections", "METRICS", "Ledger", "Pending"]

log = logging.getLogger(__name__)

LISTEN = 10  # include/net/tcp_states.h
_PORTS = 65536
_FIELDS = ("bytes_acked", "bytes_received", "total_retrans")
_NO = len(OUTCOMES)
RECEIVE_WAIT = 0.5  # seconds the receiver blocks per wakeup: how fast it sees stop()
# Decoding costs ~130 µs per wakeup plus ~0.2 µs per event (numpy set-up dominates small
# batches: 26 µs/event at 5 events, 0.6 at 500). After a wakeup that had events the
# receiver lets the kernel queue more for a moment, as long as the buffer granted holds
# what DESIGN_RATE events/s bring meanwhile (a queued event takes ~1.3 KiB of it: the
# default 208 KiB buffer held ~166), and never longer than MAX_BATCH_WAIT. At 1,000
# events/s with a 16 MiB buffer, 50 ms (32 ms by the buffer) instead of 10 ms cut the
# receiver's CPU from 65 to 22 µs/event (bench/closeevents.py; the pending events wait for
# the next poll anyway).
MAX_BATCH_WAIT = 0.05
EVENT_TRUESIZE = 1280
DESIGN_RATE = 100_000
# Histogram bounds, fixed so a port's series are bounded: connection duration (s), from
# 100 ms (a request on a pooled connection seen by one poll) to a day; the RTT at close
# uses tcp_info's RTT bounds (50 µs .. 5 s), so the two RTT views line up.
DURATION_EDGES = np.array([0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600, 1800, 3600, 21600, 86400], np.float64)
DURATION_BUCKETS = tuple(f"{e:g}" for e in DURATION_EDGES.tolist()) + ("+Inf",)
RTT_EDGES_US = np.array([float(b) * 1e6 for b in RTT_BUCKETS[:-1]], np.float64)
_ND, _NR = len(DURATION_BUCKETS), len(RTT_BUCKETS)
_HIST = _ND + 1 + _NR + 1  # duration buckets, duration sum (s), RTT buckets, RTT sum (s)


def _counter(side: str, what: str, help_: str) -> Metric:
    return Metric(f"sockscope_tcp_{side}_port_{what}", "counter", help_, ("port",),
                  GraphitePath(("tcp", f"{side}_port", "{port}", what)))


def _side(side: str) -> tuple[Metric, ...]:
    since = "counted per socket from the first poll that saw it, or whole for sockets born since, up to its close"
    return (
        _counter(side, "sent_bytes", f"Bytes the {side} port's sockets sent and the peer acknowledged (ss -ti "
                 f"bytes_acked; the SYN and FIN count 1 each), {since}."),
        _counter(side, "received_bytes", f"Bytes the {side} port's sockets received in order (ss -ti "
                 f"bytes_received; a FIN counts 1), {since}."),
        _counter(side, "retransmitted_segments", f"Segments the {side} port's sockets retransmitted (ss -ti "
                 f"retrans:x/TOTAL), {since}."),
        Metric(f"sockscope_tcp_{side}_port_connections_closed", "counter",
               f"TCP connections of the {side} port the kernel destroyed, by outcome: normal, unread_data (closed "
               "with Recv-Q > 1: unread bytes thrown away, an RST sent), failed (never established: refused or "
               "timed out).", ("port", "outcome"),
               GraphitePath(("tcp", f"{side}_port", "{port}", "connections_closed", "{outcome}"))),
    )


def _histogram(side: str, what: str, help_: str, count_help: str, sum_help: str) -> tuple[Metric, Metric, Metric]:
    p = f"sockscope_tcp_{side}_port_{what}"
    where = ("tcp", f"{side}_port", "{port}", what.removesuffix("_seconds"))
    return (
        Metric(p, "histogram", help_, ("port", "le"), GraphitePath((*where, "le_{le}"))),
        Metric(f"{p}_count", "counter", count_help, ("port",), GraphitePath((*where, "count"))),
        Metric(f"{p}_sum", "counter", sum_help, ("port",), GraphitePath((*where, "sum"))),
    )


def _histograms(side: str) -> tuple[Metric, ...]:
    closed = f"connections of the {side} port that closed established (outcome normal or unread_data)"
    return (
        *_histogram(side, "connection_duration_seconds",
                    f"Histogram of the lifetime of {closed} and that a poll saw alive: from the start of the first "
                    "poll that saw it to the reading of its close notification (short of the true lifetime by up to one poll "
                    "interval; sockets alive at the feature's start are not observed).",
                    f"Closed connections of the {side} port observed by the duration histogram.",
                    f"Sum of the durations the {side} port's duration histogram observed (seconds)."),
        *_histogram(side, "close_rtt_seconds",
                    f"Histogram of the smoothed RTT (ss -ti rtt) of each of the {closed}, from its close "
                    "notification's tcp_info.",
                    f"Connections of the {side} port observed by the RTT-at-close histogram.",
                    f"Sum of the RTTs at close of the {side} port's connections (seconds)."),
    )


LOCAL, REMOTE = _side("local"), _side("remote")
LOCAL_HIST, REMOTE_HIST = _histograms("local"), _histograms("remote")
LOST = Metric("sockscope_tcp_close_events_lost", "counter",
              "Close notifications lost: dropped by the kernel because the receive buffer was full (SO_MEMINFO "
              "drops), by sockscope's pending queue (connections.max_pending_events), or unreadable.", (),
              GraphitePath(("tcp", "close_events", "lost")))
OVERRUNS = Metric("sockscope_tcp_close_events_overruns", "counter",
                  "Times the kernel reported a close-notification overrun (recv failed with ENOBUFS).", (),
                  GraphitePath(("tcp", "close_events", "overruns")))
BUFFER = Metric("sockscope_tcp_close_events_buffer_bytes", "gauge",
                "Receive buffer the kernel granted the close-notification socket (getsockopt SO_RCVBUF: twice "
                "what was asked; capped by net.core.rmem_max unless CAP_NET_ADMIN).", (),
                GraphitePath(("tcp", "close_events", "buffer_bytes")))
SUBSCRIBED = Metric("sockscope_tcp_close_events_subscribed", "gauge",
                    "1 while sockscope is subscribed to the namespace's TCP close notifications, 0 when it cannot "
                    "(the error is logged).", (), GraphitePath(("tcp", "close_events", "subscribed")))
UNTRACKED = Metric("sockscope_tcp_connections_untracked_sockets", "gauge",
                   "Sockets of this poll not followed because the ledger is full (connections.max_sockets).", (),
                   GraphitePath(("tcp", "connections", "untracked_sockets")))
# Reconciliation with the namespace's kernel counters (features/kernel.py): the same sums
# as over every local port (other included), but one series each that no change of the
# tracked ports resets.
ACCOUNTED_RETRANS = Metric("sockscope_tcp_connections_accounted_retransmitted_segments", "counter",
                           "Segments retransmitted by every socket the connections ledger accounted (the sum of "
                           "sockscope_tcp_local_port_retransmitted_segments_total over all ports, other included); "
                           "compare with sockscope_tcp_retransmitted_segments_total (TcpRetransSegs).", (),
                           GraphitePath(("tcp", "connections", "accounted", "retransmitted_segments")))
ACCOUNTED_CLOSED = Metric("sockscope_tcp_connections_accounted_closed", "counter",
                          "Connections the kernel destroyed that the connections feature counted, every outcome and "
                          "port (the sum of sockscope_tcp_local_port_connections_closed_total); compare with the "
                          "growth of TcpActiveOpens + TcpPassiveOpens.", (),
                          GraphitePath(("tcp", "connections", "accounted", "closed")))
METRICS = (*LOCAL, *REMOTE, *LOCAL_HIST, *REMOTE_HIST, LOST, OVERRUNS, BUFFER, SUBSCRIBED, UNTRACKED,
           ACCOUNTED_RETRANS, ACCOUNTED_CLOSED)


@dataclass(slots=True)
class Ledger:
    """What was last accounted per live socket, sorted by cookie (42 bytes a socket)."""

    cookie: np.ndarray  # uint64
    values: np.ndarray  # (n, 3) int64: bytes_acked, bytes_received, total_retrans
    dport: np.ndarray  # uint16 (a failed blocking connect's close event has dport 0)
    seen: np.ndarray  # float64: monotonic start of the first poll that saw it; NaN: its birth is unknown

    @classmethod
    def empty(cls) -> Ledger:
        return cls(np.zeros(0, np.uint64), np.zeros((0, 3), np.int64), np.zeros(0, np.uint16),
                   np.zeros(0, np.float64))

    def __len__(self) -> int:
        return len(self.cookie)

    def find(self, cookies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, row of each found cookie) for `cookies`."""
        if not len(self.cookie):
            return np.zeros(len(cookies), bool), np.zeros(len(cookies), np.intp)
        at = np.minimum(np.searchsorted(self.cookie, cookies), len(self.cookie) - 1)
        return self.cookie[at] == cookies, at

    def without(self, rows: np.ndarray) -> Ledger:
        keep = np.ones(len(self), bool)
        keep[rows] = False
        return Ledger(self.cookie[keep], self.values[keep], self.dport[keep], self.seen[keep])


class Pending:
    """The receiver's decoded events waiting for the next poll, at most `limit` of them;
    thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._parts: list[Closed] = []
        self._count = 0
        self.dropped = 0  # events refused because the queue was full

    def put(self, closed: Closed) -> None:
        with self._lock:
            room = self.limit - self._count
            if len(closed) > room:
                self.dropped += len(closed) - max(room, 0)
                if room <= 0:
                    return
                closed = Closed(*(getattr(closed, f.name)[:room] for f in fields(Closed)))
            self._parts.append(closed)
            self._count += len(closed)

    def take(self) -> Closed:
        with self._lock:
            parts, self._parts, self._count = self._parts, [], 0
        return Closed.concat(parts)


class Receiver:
    """The receiver thread of one namespace: CloseEvents -> decode -> Pending. Never
    raises: an error is logged once (and its recovery), then retried every second."""

    def __init__(self, events: CloseEvents, pending: Pending,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.events = events
        self.pending = pending
        self.monotonic = monotonic
        self.overruns = 0
        self.kernel_dropped = 0
        self.malformed = 0
        self.subscribed = False
        self.granted = 0
        self.batch_wait = 0.0  # seconds waited after a wakeup with events (see MAX_BATCH_WAIT)
        self._stop = threading.Event()
        self._problems = Problems(log, "close notifications", recovery="close notifications received again")
        self._overrun = Problems(log, "", level=logging.WARNING)  # logged once
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self.events.open()  # here, so the events of the first poll's sockets are heard
            self._opened()
        except OSError as e:
            self._problems.failed(e)
        self._thread = threading.Thread(target=self._run, name="sockscope-close-events", daemon=True)
        self._thread.start()

    def _opened(self) -> None:
        self.granted = self.events.granted
        self.batch_wait = min(MAX_BATCH_WAIT, self.granted / (4 * EVENT_TRUESIZE * DESIGN_RATE))
        self.subscribed = True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.events.receive(RECEIVE_WAIT)
                if not self.subscribed:
                    self._opened()
                    self._problems.ok()
                if got is not None:
                    self.malformed += got.malformed
                    closed, _ = decode(got.batch, self.monotonic())
                    if len(closed):
                        self.pending.put(closed)
                    self.kernel_dropped = self.events.dropped()
                    if got.enobufs:
                        self.overruns += got.enobufs
                        self._overrun.failed(
                            f"the kernel dropped close notifications: the {self.granted}-byte receive buffer was "
                            "full (counted in sockscope_tcp_close_events_lost_total; raise "
                            "connections.receive_buffer, and give CAP_NET_ADMIN to go past net.core.rmem_max)")
                    if self.batch_wait:
                        self._stop.wait(self.batch_wait)
            except Exception as e:  # noqa: BLE001 - the thread must survive anything
                self.subscribed = False
                self._problems.failed(e, traceback=None if isinstance(e, OSError) else e)
                self._stop.wait(1.0)

    def stop(self, timeout: float = 2 * RECEIVE_WAIT + 1) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.events.close()


class _PortSums:
    """Per-poll sums of one side: three counters and the closes by outcome per row (local:
    one row per port; remote: the configured ports + other). Allocated once; a poll
    zeroes only the rows it touched."""

    def __init__(self, remote_ports: tuple[int, ...] | None) -> None:
        ports, self.lut, rows = port_rows(remote_ports)
        self.ports = ports or ()  # () when dense
        self.counts = np.zeros((rows, 3 + _NO), np.int64)
        self.mark = np.zeros(rows, bool)

    def rows(self, ports: np.ndarray) -> np.ndarray:
        return ports.astype(np.intp) if self.lut is None else self.lut[ports]

    def add(self, ports: np.ndarray, growth: np.ndarray) -> None:
        r = self.rows(ports)
        self.mark[r] = True
        np.add.at(self.counts[:, :3], r, growth)

    def close(self, ports: np.ndarray, outcome: np.ndarray) -> None:
        r = self.rows(ports)
        self.mark[r] = True
        np.add.at(self.counts, (r, 3 + outcome.astype(np.intp)), 1)

    def reset(self) -> None:
        t = np.flatnonzero(self.mark)
        self.counts[t] = 0
        self.mark[t] = False


class _LedgerFold(Fold):
    def __init__(self, feature: Connections, now: float) -> None:
        self.f = feature
        self.now = now  # the poll's monotonic start: when the sockets first seen now were seen
        feature.local.reset()
        feature.remote.reset()
        feature.listening[:] = False
        feature.observed = []
        self.seen: list[tuple[np.ndarray, ...]] = []  # followed: cookie, values, dport, first seen
        self.new: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # cookie, values, dport, sport

    def add(self, batch: Batch) -> None:
        if not len(batch):
            return
        f = self.f
        state, sport = batch.state, batch.sport
        listen = state == LISTEN
        if listen.any():
            f.listening[sport[listen]] = True
        cols, ok = tcpinfo.columns(batch, _FIELDS)
        rows = np.flatnonzero(ok & ~listen)
        if not len(rows):
            return
        cookie = batch.cookie[rows]
        values = np.stack([cols[n][rows].astype(np.int64) for n in _FIELDS], axis=1)
        sp, dp = sport[rows], batch.dport[rows]
        found, at = f.ledger.find(cookie)
        self.seen.append((cookie[found], values[found], dp[found], f.ledger.seen[at[found]]))
        growth = np.maximum(values[found] - f.ledger.values[at[found]], 0)
        moved = np.flatnonzero(growth.any(axis=1))  # idle sockets (most) cost nothing more
        if len(moved):
            idx = np.flatnonzero(found)[moved]
            f.local.add(sp[idx], growth[moved])
            f.remote.add(dp[idx], growth[moved])
        new = ~found
        if new.any():
            self.new.append((cookie[new], values[new], dp[new], sp[new]))

    def finish(self, stats: DumpStats) -> object:
        f = self.f
        cookie, values, dport, seen = _concat(self.seen, np.float64)
        n_cookie, n_values, n_dport, n_sport = _concat(self.new, np.uint16)
        if len(n_cookie) > 1:  # a socket the kernel's walk met twice (the table changed under it): its last sighting
            _, last = np.unique(n_cookie[::-1], return_index=True)
            keep = np.sort(len(n_cookie) - 1 - last)
            n_cookie, n_values, n_dport, n_sport = n_cookie[keep], n_values[keep], n_dport[keep], n_sport[keep]
        room = max(f.max_sockets - len(cookie), 0)
        # Born since the last poll, so first seen now: unless this is the baseline, or the
        # last poll left sockets out (one admitted now may be older)
        known = f.started and not f.untracked
        f.untracked = max(len(n_cookie) - room, 0)
        n_cookie, n_values, n_dport, n_sport = n_cookie[:room], n_values[:room], n_dport[:room], n_sport[:room]
        n_seen = np.full(len(n_cookie), self.now if known else np.nan)
        # A socket the last dump missed (its walk skipped it while the table changed) is
        # still in `gone`: followed, only its growth counts
        back, at = f.gone.find(n_cookie)
        if back.any():
            n_seen[back] = f.gone.seen[at[back]]
            growth = np.maximum(n_values[back] - f.gone.values[at[back]], 0)
            f.local.add(n_sport[back], growth)
            f.remote.add(n_dport[back], growth)
        born = np.flatnonzero(~back)
        if f.started and len(born):  # born since the first poll: counted whole
            f.local.add(n_sport[born], n_values[born])
            f.remote.add(n_dport[born], n_values[born])
        cookie = np.concatenate((cookie, n_cookie))
        order = np.argsort(cookie, kind="stable")
        cookie = cookie[order]
        # A followed socket met twice is kept once (its growth was added at each sighting).
        once = np.flatnonzero(np.append(cookie[1:] != cookie[:-1], True)) if len(cookie) else order
        ledger = Ledger(cookie[once], np.concatenate((values, n_values))[order][once],
                        np.concatenate((dport, n_dport))[order][once], np.concatenate((seen, n_seen))[order][once])
        closed = f.pending.take()
        # Sockets of the last poll that this dump did not see and whose close has not
        # arrived: kept one more poll, so a close the receiver reads after this drain (it
        # happened just before the dump), or a socket the walk skipped, is matched, not
        # counted whole a second time. Older than that, they are forgotten.
        missing = ~ledger.find(f.ledger.cookie)[0]
        if len(closed):
            missing &= ~np.isin(f.ledger.cookie, closed.cookie)
        gone = f.ledger.without(np.flatnonzero(~missing))
        f.ledger = f.close_all(ledger, (f.ledger, f.gone), closed)
        f.gone = gone
        f.started = True
        return f.result()


def _concat(pieces: list, last: type) -> tuple[np.ndarray, ...]:
    """cookie, values, dport and a fourth column of dtype `last`, concatenated."""
    if pieces:
        return tuple(np.concatenate(p) for p in zip(*pieces))
    return np.zeros(0, np.uint64), np.zeros((0, 3), np.int64), np.zeros(0, np.uint16), np.zeros(0, last)


@dataclass(frozen=True, slots=True)
class PortCounters:
    port: str
    counters: tuple[int, int, int]  # sent bytes, received bytes, retransmitted segments
    closed: tuple[int, ...]  # per OUTCOMES
    duration: tuple[int, ...]  # cumulative, per DURATION_BUCKETS
    duration_sum: float  # seconds
    rtt: tuple[int, ...]  # cumulative, per RTT_BUCKETS
    rtt_sum: float  # seconds


@dataclass(frozen=True, slots=True)
class ConnectionsResult:
    local: tuple[PortCounters, ...]
    remote: tuple[PortCounters, ...]
    lost: int
    overruns: int
    buffer_bytes: int
    subscribed: bool
    untracked: int
    accounted_retransmitted: int  # every port's retransmitted segments, since the start
    accounted_closed: int  # every port's closes, every outcome


class Connections(Feature):
    name = "connections"
    metrics = METRICS

    def __init__(self, rules: Rules, *, families: tuple[str, ...] = ("ipv4", "ipv6"), netns: str | None = None,
                 max_sockets: int = 1_000_000, max_pending_events: int = 100_000,
                 receive_buffer: int = 8 * 1024 * 1024,
                 events: Callable[[], CloseEvents] | None = None) -> None:
        self.rules = rules
        self.max_sockets = max_sockets
        self.local = _PortSums(None)
        self.remote = _PortSums(tuple(rules.remote[:rules.max_remote]))
        self.listening = np.zeros(_PORTS, bool)
        self.ledger = Ledger.empty()
        self.gone = Ledger.empty()  # the last ledger's sockets the last dump missed, not yet closed
        self.started = False  # the first poll (the baseline) is done
        self.untracked = 0
        self.pending = Pending(max_pending_events)
        self._events = events or (lambda: CloseEvents(families, netns=netns, rcvbuf=receive_buffer))
        self.receiver: Receiver | None = None  # started by the first fold: nothing runs before
        # Counter totals per exported port label and side; ports no longer tracked are
        # dropped (bounded by the caps, not by traffic).
        self._totals: dict[str, dict[str, np.ndarray]] = {"local": {}, "remote": {}}
        self._accounted = np.zeros(3 + _NO, np.int64)  # every local row summed, since the start
        # This poll's closed established connections: (sport, dport, duration s or NaN, rtt µs)
        self.observed: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._hists: dict[str, dict[str, np.ndarray]] = {"local": {}, "remote": {}}  # _HIST per port label

    @classmethod
    def from_config(cls, cfg) -> Connections:
        c = cfg.connections
        return cls(Rules.from_config(cfg), families=cfg.poll.families, netns=cfg.poll.netns,
                   max_sockets=c.max_sockets, max_pending_events=c.max_pending_events,
                   receive_buffer=c.receive_buffer)

    def needs(self) -> DumpNeed:
        return DumpNeed(socket.IPPROTO_TCP, ext=tcpinfo.INFO_EXT, attributes=(tcpinfo.INET_DIAG_INFO,))

    def fold(self, ctx: PollContext) -> Fold:
        if self.receiver is None:
            self.receiver = Receiver(self._events(), self.pending)
            self.receiver.start()
        return _LedgerFold(self, ctx.monotonic)

    def close_all(self, new: Ledger, older: tuple[Ledger, ...], closed: Closed) -> Ledger:
        """Account the close events `closed` against the ledger this poll built (`new`) or,
        for sockets gone before its dump, the older ones (the previous poll's, then the
        sockets it had lost sight of); returns `new` without the closed sockets."""
        if not len(closed):
            return new
        final = np.stack((closed.bytes_acked, closed.bytes_received, closed.total_retrans), axis=1)
        last = np.zeros_like(final) if self.started else final.copy()  # unseen: born since, or before the start
        dport = closed.dport.copy()
        seen = np.full(len(closed), np.nan)
        matched = np.zeros(len(closed), bool)
        in_new = at_new = matched
        for ledger in (new, *older):
            hit, at = ledger.find(closed.cookie)
            hit &= ~matched
            last[hit] = ledger.values[at[hit]]
            seen[hit] = ledger.seen[at[hit]]
            fix = hit & (dport == 0)  # a blocking connect that failed: the table knew where it went
            dport[fix] = ledger.dport[at[fix]]
            if ledger is new:
                in_new, at_new = hit, at
            matched |= hit
        growth = np.maximum(final - last, 0)
        est = np.flatnonzero(closed.outcome != FAILED)
        if len(est):
            self.observed.append((closed.sport[est], dport[est], np.maximum(closed.at[est] - seen[est], 0),
                                  closed.rtt[est]))
        self.local.add(closed.sport, growth)
        self.remote.add(dport, growth)
        self.local.close(closed.sport, closed.outcome)
        self.remote.close(dport, closed.outcome)
        return new.without(at_new[in_new])

    def result(self) -> ConnectionsResult:
        self._accounted += self.local.counts[np.flatnonzero(self.local.mark)].sum(axis=0)
        tracked, _ = self.rules.tracked_local(np.flatnonzero(self.listening).tolist())
        obs = tuple(np.concatenate(c) for c in zip(*self.observed)) if self.observed else None
        self.observed = []
        local = self._table("local", self.local, tracked, tracked, self._observe(obs, 0, tracked))
        remote = self._table("remote", self.remote, list(self.remote.ports), list(range(len(self.remote.ports))),
                             self._observe(obs, 1, list(self.remote.ports)))
        r = self.receiver
        lost = self.pending.dropped + (r.kernel_dropped + r.malformed if r is not None else 0)
        return ConnectionsResult(local, remote, lost, r.overruns if r else 0, r.granted if r else 0,
                                 bool(r and r.subscribed), self.untracked, int(self._accounted[2]),
                                 int(self._accounted[3:].sum()))

    @staticmethod
    def _observe(obs: tuple[np.ndarray, ...] | None, side: int, ports: list[int]) -> np.ndarray:
        """This poll's histogram rows (_HIST wide, not cumulative) per exported port of one
        side (`ports` in order, then other) from the observed closes."""
        out = np.zeros((len(ports) + 1, _HIST))
        if obs is None:
            return out
        port, duration, rtt = obs[side], obs[2], obs[3]
        label = np.full(len(port), len(ports), np.intp)  # other
        if ports:
            want = np.asarray(ports, np.int64)
            order = np.argsort(want)
            at = np.minimum(np.searchsorted(want[order], port), len(want) - 1)
            hit = want[order][at] == port
            label[hit] = order[at[hit]]
        known = np.flatnonzero(~np.isnan(duration))
        np.add.at(out, (label[known], np.searchsorted(DURATION_EDGES, duration[known])), 1)
        np.add.at(out[:, _ND], label[known], duration[known])
        r = rtt.astype(np.float64)
        np.add.at(out, (label, _ND + 1 + np.searchsorted(RTT_EDGES_US, r)), 1)
        np.add.at(out[:, -1], label, r / 1e6)
        return out

    def _table(self, name: str, sums: _PortSums, ports: list[int], rows: list[int],
               hist: np.ndarray) -> tuple[PortCounters, ...]:
        totals, hists = self._totals[name], self._hists[name]
        touched = np.flatnonzero(sums.mark)
        rest = sums.counts[touched].sum(axis=0)
        kept: dict[str, np.ndarray] = {}
        kept_hist: dict[str, np.ndarray] = {}
        for i, (port, row) in enumerate(zip(ports, rows)):
            rest = rest - sums.counts[row]
            kept[str(port)] = totals.get(str(port), np.zeros(3 + _NO, np.int64)) + sums.counts[row]
            kept_hist[str(port)] = hists.get(str(port), np.zeros(_HIST)) + hist[i]
        kept[OTHER] = totals.get(OTHER, np.zeros(3 + _NO, np.int64)) + rest
        kept_hist[OTHER] = hists.get(OTHER, np.zeros(_HIST)) + hist[-1]
        self._totals[name], self._hists[name] = kept, kept_hist
        out = []
        for p, v in kept.items():
            h = kept_hist[p]
            out.append(PortCounters(p, tuple(v[:3].tolist()), tuple(v[3:].tolist()),
                                    tuple(np.cumsum(h[:_ND]).astype(np.int64).tolist()), float(h[_ND]),
                                    tuple(np.cumsum(h[_ND + 1:-1]).astype(np.int64).tolist()), float(h[-1])))
        return tuple(out)

    def samples(self, result: ConnectionsResult, out: Samples) -> None:
        for metrics, table in ((LOCAL, result.local), (REMOTE, result.remote)):
            for i, metric in enumerate(metrics[:3]):
                out.declare(metric)
                for p in table:
                    out.add(metric, (p.port,), p.counters[i])
            out.declare(metrics[3])
            for p in table:
                for outcome, n in zip(OUTCOMES, p.closed):
                    out.add(metrics[3], (p.port, outcome), n)
        for hist, table in ((LOCAL_HIST, result.local), (REMOTE_HIST, result.remote)):
            for (bucket, count, total), bounds, get in (
                    (hist[:3], DURATION_BUCKETS, lambda p: (p.duration, p.duration_sum)),
                    (hist[3:], RTT_BUCKETS, lambda p: (p.rtt, p.rtt_sum))):
                for m in (bucket, count, total):
                    out.declare(m)
                for p in table:
                    cumulative, sum_ = get(p)
                    for le, n in zip(bounds, cumulative):
                        out.add(bucket, (p.port, le), n)
                    out.add(count, (p.port,), cumulative[-1])
                    out.add(total, (p.port,), sum_)
        out.add(LOST, (), result.lost)
        out.add(OVERRUNS, (), result.overruns)
        out.add(BUFFER, (), result.buffer_bytes)
        out.add(SUBSCRIBED, (), int(result.subscribed))
        out.add(UNTRACKED, (), result.untracked)
        out.add(ACCOUNTED_RETRANS, (), result.accounted_retransmitted)
        out.add(ACCOUNTED_CLOSED, (), result.accounted_closed)

    def max_series(self) -> int:
        r = self.rules
        per_port = 3 + _NO + (_ND + 2) + (_NR + 2)
        return ((r.max_local + 1) + (min(len(r.remote), r.max_remote) + 1)) * per_port + 7

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None
