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
- a socket no poll saw and whose close was lost is missed whole; one whose close was lost
  loses its growth since its last poll (the next poll drops it, as tcp_info does);
- the ledger is bounded by `connections.max_sockets`: sockets beyond it are not followed
  (sockscope_tcp_connections_untracked_sockets), their growth is counted when a later poll
  finds room, or at their close.

Thread safety: the receiver only decodes each wakeup's events into compact columns
(Closed: 37 bytes per event) and appends them to a bounded queue
(`connections.max_pending_events`; beyond it the events are dropped and counted lost);
the poller thread drains the queue at the end of each accepted dump attempt (Fold.finish)
and is the only thread that touches the ledger and the counters.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from .. import tcpinfo
from ..aggregate import Rules
from ..batch import Batch
from ..catalogue import GraphitePath, Metric, Samples
from ..closeevents import OUTCOMES, Closed, CloseEvents, decode
from ..health import Problems
from ..snapshot import OTHER
from .base import DumpNeed, DumpStats, Feature, Fold, PollContext

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
# default 208 KiB buffer held ~166), and never longer than MAX_BATCH_WAIT.
MAX_BATCH_WAIT = 0.01
EVENT_TRUESIZE = 1280
DESIGN_RATE = 100_000


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


LOCAL, REMOTE = _side("local"), _side("remote")
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
METRICS = (*LOCAL, *REMOTE, LOST, OVERRUNS, BUFFER, SUBSCRIBED, UNTRACKED)


@dataclass(slots=True)
class Ledger:
    """What was last accounted per live socket, sorted by cookie (34 bytes a socket)."""

    cookie: np.ndarray  # uint64
    values: np.ndarray  # (n, 3) int64: bytes_acked, bytes_received, total_retrans
    dport: np.ndarray  # uint16 (a failed blocking connect's close event has dport 0)

    @classmethod
    def empty(cls) -> Ledger:
        return cls(np.zeros(0, np.uint64), np.zeros((0, 3), np.int64), np.zeros(0, np.uint16))

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
        return Ledger(self.cookie[keep], self.values[keep], self.dport[keep])


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

    def __init__(self, events: CloseEvents, pending: Pending) -> None:
        self.events = events
        self.pending = pending
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
                    closed, _ = decode(got.batch)
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
        if remote_ports is None:
            self.lut = None
            rows = _PORTS
        else:
            self.ports = tuple(sorted(set(remote_ports)))
            self.lut = np.full(_PORTS, len(self.ports), np.intp)
            self.lut[list(self.ports)] = np.arange(len(self.ports))
            rows = len(self.ports) + 1
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
    def __init__(self, feature: Connections) -> None:
        self.f = feature
        feature.local.reset()
        feature.remote.reset()
        feature.listening[:] = False
        self.seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # followed: cookie, values, dport
        self.new: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # + sport

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
        self.seen.append((cookie[found], values[found], dp[found]))
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
        cookie, values, dport = _concat(self.seen, 3)
        n_cookie, n_values, n_dport, n_sport = _concat(self.new, 4)
        if len(n_cookie) > 1:  # a socket the kernel's walk met twice (the table changed under it): its last sighting
            _, last = np.unique(n_cookie[::-1], return_index=True)
            keep = np.sort(len(n_cookie) - 1 - last)
            n_cookie, n_values, n_dport, n_sport = n_cookie[keep], n_values[keep], n_dport[keep], n_sport[keep]
        room = max(f.max_sockets - len(cookie), 0)
        f.untracked = max(len(n_cookie) - room, 0)
        n_cookie, n_values, n_dport, n_sport = n_cookie[:room], n_values[:room], n_dport[:room], n_sport[:room]
        if f.started and len(n_cookie):  # born since the first poll: counted whole
            f.local.add(n_sport, n_values)
            f.remote.add(n_dport, n_values)
        cookie = np.concatenate((cookie, n_cookie))
        order = np.argsort(cookie, kind="stable")
        cookie = cookie[order]
        # A followed socket met twice is kept once (its growth was added at each sighting).
        once = np.flatnonzero(np.append(cookie[1:] != cookie[:-1], True)) if len(cookie) else order
        ledger = Ledger(cookie[once], np.concatenate((values, n_values))[order][once],
                        np.concatenate((dport, n_dport))[order][once])
        f.ledger = f.close_all(ledger, f.ledger, f.pending.take())
        f.started = True
        return f.result()


def _concat(pieces: list, width: int) -> tuple[np.ndarray, ...]:
    if pieces:
        return tuple(np.concatenate(p) for p in zip(*pieces))
    empty = (np.zeros(0, np.uint64), np.zeros((0, 3), np.int64), np.zeros(0, np.uint16), np.zeros(0, np.uint16))
    return empty[:width]


@dataclass(frozen=True, slots=True)
class PortCounters:
    port: str
    counters: tuple[int, int, int]  # sent bytes, received bytes, retransmitted segments
    closed: tuple[int, ...]  # per OUTCOMES


@dataclass(frozen=True, slots=True)
class ConnectionsResult:
    local: tuple[PortCounters, ...]
    remote: tuple[PortCounters, ...]
    lost: int
    overruns: int
    buffer_bytes: int
    subscribed: bool
    untracked: int


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
        self.started = False  # the first poll (the baseline) is done
        self.untracked = 0
        self.pending = Pending(max_pending_events)
        self._events = events or (lambda: CloseEvents(families, netns=netns, rcvbuf=receive_buffer))
        self.receiver: Receiver | None = None  # started by the first fold: nothing runs before
        # Counter totals per exported port label and side; ports no longer tracked are
        # dropped (bounded by the caps, not by traffic).
        self._totals: dict[str, dict[str, np.ndarray]] = {"local": {}, "remote": {}}

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
        return _LedgerFold(self)

    def close_all(self, new: Ledger, old: Ledger, closed: Closed) -> Ledger:
        """Account the close events `closed` against the ledger this poll built (`new`) or,
        for sockets gone before its dump, the previous one (`old`); returns `new` without
        the closed sockets."""
        if not len(closed):
            return new
        final = np.stack((closed.bytes_acked, closed.bytes_received, closed.total_retrans), axis=1)
        in_new, at_new = new.find(closed.cookie)
        in_old, at_old = old.find(closed.cookie)
        in_old &= ~in_new
        last = np.zeros_like(final) if self.started else final.copy()  # unseen: born since, or before the start
        last[in_new] = new.values[at_new[in_new]]
        last[in_old] = old.values[at_old[in_old]]
        dport = closed.dport.copy()
        unknown = dport == 0  # a blocking connect that failed: the table knew where it went
        dport[unknown & in_new] = new.dport[at_new[unknown & in_new]]
        dport[unknown & in_old] = old.dport[at_old[unknown & in_old]]
        growth = np.maximum(final - last, 0)
        self.local.add(closed.sport, growth)
        self.remote.add(dport, growth)
        self.local.close(closed.sport, closed.outcome)
        self.remote.close(dport, closed.outcome)
        return new.without(at_new[in_new])

    def result(self) -> ConnectionsResult:
        tracked, _ = self.rules.tracked_local(np.flatnonzero(self.listening).tolist())
        local = self._table("local", self.local, tracked, tracked)
        remote = self._table("remote", self.remote, list(self.remote.ports), list(range(len(self.remote.ports))))
        r = self.receiver
        lost = self.pending.dropped + (r.kernel_dropped + r.malformed if r is not None else 0)
        return ConnectionsResult(local, remote, lost, r.overruns if r else 0, r.granted if r else 0,
                                 bool(r and r.subscribed), self.untracked)

    def _table(self, name: str, sums: _PortSums, ports: list[int], rows: list[int]) -> tuple[PortCounters, ...]:
        totals = self._totals[name]
        touched = np.flatnonzero(sums.mark)
        rest = sums.counts[touched].sum(axis=0)
        kept: dict[str, np.ndarray] = {}
        for port, row in zip(ports, rows):
            rest = rest - sums.counts[row]
            kept[str(port)] = totals.get(str(port), np.zeros(3 + _NO, np.int64)) + sums.counts[row]
        kept[OTHER] = totals.get(OTHER, np.zeros(3 + _NO, np.int64)) + rest
        self._totals[name] = kept
        return tuple(PortCounters(p, tuple(v[:3].tolist()), tuple(v[3:].tolist())) for p, v in kept.items())

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
        out.add(LOST, (), result.lost)
        out.add(OVERRUNS, (), result.overruns)
        out.add(BUFFER, (), result.buffer_bytes)
        out.add(SUBSCRIBED, (), int(result.subscribed))
        out.add(UNTRACKED, (), result.untracked)

    def max_series(self) -> int:
        r = self.rules
        return ((r.max_local + 1) + (min(len(r.remote), r.max_remote) + 1)) * (3 + _NO) + 5

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None
