"""Where requests wait and why connections are slow, per port, from tcp_info.

The TCP dump, asked for INET_DIAG_INFO (`ss -ti`), folded with numpy only: per batch one
gather of the tcp_info words (tcpinfo.words), the arithmetic per chunk of 16,384 sockets
(walking attributes per message in Python cost 1.75 µs per socket). Per tracked port, the same ports and `other` bucket as the TCP feature
(Rules.tracked_local: configured + listening local ports, configured remote ports):

- oldest_unaccepted: max tcpi_last_data_recv over ESTABLISHED sockets with inode 0 on a
  local port that has a listener in this dump (connections in an accept queue). The kernel
  sets a child's lrcvtime when it is created (tcp_create_openreq_child), so a connection
  that sent nothing reads its age;
- oldest_unread: max tcpi_last_data_recv over non-LISTEN sockets with Recv-Q > 0: the time
  since the LAST data arrived, a lower bound of the oldest unread byte's age;
- oldest_close_wait: max tcpi_last_ack_recv over CLOSE-WAIT sockets (the peer's FIN is the
  last segment it sent);
- RTT: one observation = one ESTABLISHED socket's smoothed RTT (tcpi_rtt) in this poll,
  counted in fixed buckets (BUCKETS, 50 µs .. 5 s, + Inf), exported as a gauge histogram
  (catalogue kind "gaugehistogram": `_bucket{le}` cumulative, `_gcount`, `_gsum`);
- busy by limit: per socket, by cookie, the growth since the last poll of tcpi_busy_time,
  tcpi_rwnd_limited, tcpi_sndbuf_limited (µs, cumulative per socket, tcp_chrono_*, counted
  by the kernel in jiffies): receiver = rwnd growth, send_buffer = sndbuf growth, network =
  the rest of busy growth, at millisecond resolution. A cookie first seen contributes
  nothing (its growth before that is unknown); a cookie not seen in a poll is dropped. The
  state is the sorted cookies and their chronographs in ms modulo 2**32 (20 bytes per live
  non-LISTEN socket), replaced whole by each poll's.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace

import numpy as np

from .. import tcpinfo
from ..aggregate import Rules, port_rows
from ..batch import Batch
from ..catalogue import GraphitePath, Metric, Samples
from ..snapshot import OTHER
from .base import DumpNeed, DumpStats, Feature, Fold, PollContext

__all__ = ["TcpInfo", "METRICS", "BUCKETS", "LIMITS", "PortInfo", "PortTables", "SnapshotInfo"]

ESTABLISHED, CLOSE_WAIT, LISTEN = 1, 8, 10  # include/net/tcp_states.h
_PORTS = 65536
# RTT bucket upper bounds (µs); the last slot is +Inf. 16 finite buckets, 50 µs (loopback)
# to 5 s: series per port = 17 buckets + _gcount + _gsum.
_EDGES_US = np.array([50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
                      250_000, 500_000, 1_000_000, 2_500_000, 5_000_000], np.uint32)
BUCKETS = tuple(f"{e / 1e6:g}" for e in _EDGES_US.tolist()) + ("+Inf",)
_NB = len(BUCKETS)
LIMITS = ("network", "receiver", "send_buffer")
_WAITS = ("last_data_recv", "last_ack_recv", "rtt")  # in every tcp_info since 2.6
_CHRONO = ("busy_time", "rwnd_limited", "sndbuf_limited")  # Linux 4.10+


def _gauge(side: str, what: str, help_: str, labels=("port",), peak=False) -> Metric:
    return Metric(f"sockscope_tcp_{side}_port_{what}", "gauge", help_, labels,
                  GraphitePath(("tcp", f"{side}_port", "{port}", *what.split("."))), peak=peak)


def _rtt(side: str) -> tuple[Metric, Metric, Metric]:
    one = "one observation = one ESTABLISHED socket's smoothed RTT (ss -ti rtt) in this poll"
    p = f"sockscope_tcp_{side}_port_rtt_seconds"
    where = ("tcp", f"{side}_port", "{port}", "rtt")
    return (
        Metric(p, "gaugehistogram", f"Gauge histogram of the {side} port's RTT: sockets with RTT <= le; {one}.",
               ("port", "le"), GraphitePath((*where, "le_{le}"))),
        Metric(f"{p}_gcount", "gauge", f"ESTABLISHED sockets of the {side} port in this poll (the RTT histogram's "
               "count).", ("port",), GraphitePath((*where, "count"))),
        Metric(f"{p}_gsum", "gauge", f"Sum of the smoothed RTTs of the {side} port's ESTABLISHED sockets in this "
               "poll (seconds).", ("port",), GraphitePath((*where, "sum"))),
    )


def _busy(side: str) -> Metric:
    return Metric(f"sockscope_tcp_{side}_port_busy_seconds", "counter",
                  f"Time the {side} port's sockets had data to send (ss -ti busy), split by what limited it: "
                  "receiver (peer's window, rwnd_limited), send_buffer (our SO_SNDBUF, sndbuf_limited), network "
                  "(the rest); counted from the first poll that saw each socket.", ("port", "limited_by"),
                  GraphitePath(("tcp", f"{side}_port", "{port}", "busy_seconds", "{limited_by}")))


UNACCEPTED = _gauge("local", "oldest_unaccepted_seconds",
                    "Longest wait in the port's accept queue: max ss -ti lastrcv of ESTABLISHED sockets not yet "
                    "accepted (inode 0) on a listening port; a connection that sent nothing reads its age; 0 if "
                    "none.", peak=True)
UNREAD = _gauge("local", "oldest_unread_seconds",
                "Max ss -ti lastrcv over the port's sockets with Recv-Q > 0 (LISTEN excluded): time since the "
                "last data arrived, a lower bound of the oldest unread byte's age; 0 if none.", peak=True)
CLOSE_WAIT_AGE = _gauge("local", "oldest_close_wait_seconds",
                        "Max ss -ti lastack over the port's CLOSE-WAIT sockets: time since the peer's FIN "
                        "arrived and the application has not closed; 0 if none.", peak=True)
LOCAL_RTT, REMOTE_RTT = _rtt("local"), _rtt("remote")
LOCAL_BUSY, REMOTE_BUSY = _busy("local"), _busy("remote")
METRICS = (UNACCEPTED, UNREAD, CLOSE_WAIT_AGE, *LOCAL_RTT, *REMOTE_RTT, LOCAL_BUSY, REMOTE_BUSY)


@dataclass(frozen=True, slots=True)
class PortFigures:
    port: str
    waits: tuple[float, float, float]  # oldest unaccepted, unread, close-wait (s); () on remote
    buckets: tuple[int, ...]  # cumulative, one per BUCKETS
    rtt_sum: float  # seconds
    busy: tuple[float, float, float]  # counter values (s) per LIMITS


@dataclass(frozen=True, slots=True)
class TcpInfoResult:
    local: tuple[PortFigures, ...]
    remote: tuple[PortFigures, ...]


@dataclass(slots=True)
class CookieState:
    """The chronographs of the live sockets at the last poll, sorted by cookie: busy,
    rwnd_limited, sndbuf_limited in milliseconds modulo 2**32 (20 bytes per socket)."""

    cookie: np.ndarray  # uint64
    chrono: np.ndarray  # (n, 3) uint32, ms

    @classmethod
    def empty(cls) -> CookieState:
        return cls(np.zeros(0, np.uint64), np.zeros((0, 3), np.uint32))

    def __len__(self) -> int:
        return len(self.cookie)

    @property
    def nbytes(self) -> int:
        return self.cookie.nbytes + self.chrono.nbytes


class _Side:
    """Per-poll figures of one side, one row per port: dense (row = port: the snapshot),
    or through a lookup table (`lut`: port -> row) of the ports that may be exported, with
    one row for every other port."""

    def __init__(self, remote_ports: tuple[int, ...] | None) -> None:
        ports, self.lut, rows = port_rows(remote_ports)
        self.ports = ports or ()  # () when dense
        self._alloc(rows, waits=remote_ports is None)
        # the sums over all rows, kept as the rows are added to: `other` is the sum minus
        # the tracked rows (summing the touched rows, one per ephemeral port, cost ~2 ms)
        self.all_hist = np.zeros(_NB, np.int64)
        self.all_rtt = 0
        self.all_busy = np.zeros(3, np.int64)

    def _alloc(self, rows: int, waits: bool) -> None:
        # Allocated once, kept across polls; a poll zeroes only the rows it touched (`mark`).
        self.hist = np.zeros(rows * _NB, np.int32)
        self.rtt = np.zeros(rows, np.int64)  # µs
        self.busy = np.zeros(rows * 3, np.int64)  # ms growth per LIMITS
        self.waits = np.zeros(rows * 3, np.int64) if waits else None  # ms (local side only)
        self.mark = np.zeros(rows, bool)

    def touched(self) -> np.ndarray:
        return np.flatnonzero(self.mark)

    def reset(self) -> None:
        r = self.touched()
        self.hist.reshape(-1, _NB)[r] = 0
        self.rtt[r] = 0
        self.busy.reshape(-1, 3)[r] = 0
        if self.waits is not None:
            self.waits.reshape(-1, 3)[r] = 0
        self.mark[r] = False
        self.all_hist[:] = 0
        self.all_rtt = 0
        self.all_busy[:] = 0

    def rows(self, ports: np.ndarray) -> np.ndarray:
        return ports.astype(np.intp) if self.lut is None else self.lut[ports]

    def port_of(self, rows: np.ndarray) -> np.ndarray:
        """The port of each row (dense side); -1 for a row of several ports."""
        return rows.astype(np.int64)


class _LocalSide(_Side):
    """The daemon's local side: row 0 for every port that cannot be tracked, one row per
    configured port, and one per port a LISTEN socket of this poll's dump has, given as the
    dump meets them (`listen`). The kernel reports every listener before any other socket
    (inet_diag walks the listening hash first), and the fold runs a chunk behind the
    gathers, so a socket's port has its row by then. Memory grows with the listening ports,
    not with the 65,536 possible ones (dense rows held ~8 MB)."""

    def __init__(self, configured: tuple[int, ...]) -> None:
        self.table = self.lut = np.zeros(_PORTS, np.intp)  # `table`: the same array, never None
        fixed = sorted(set(configured))
        self.row_port = np.full(max(64, 2 * len(fixed) + 2), -1, np.int64)
        self.table[fixed] = np.arange(1, len(fixed) + 1)
        self.row_port[1:len(fixed) + 1] = fixed
        self.fixed = self.used = len(fixed) + 1
        self._alloc(len(self.row_port), waits=True)
        self.all_hist = np.zeros(_NB, np.int64)
        self.all_rtt = 0
        self.all_busy = np.zeros(3, np.int64)

    def listen(self, ports: np.ndarray) -> None:
        new = np.unique(ports[self.table[ports] == 0])
        if not len(new):
            return
        end = self.used + len(new)
        if end > len(self.row_port):
            self._grow(max(end, 2 * len(self.row_port)))
        self.table[new] = np.arange(self.used, end)
        self.row_port[self.used:end] = new
        self.used = end

    def _grow(self, rows: int) -> None:
        old = (self.hist, self.rtt, self.busy, self.waits, self.mark, self.row_port)
        self._alloc(rows, waits=True)
        self.row_port = np.full(rows, -1, np.int64)
        for new, before in zip((self.hist, self.rtt, self.busy, self.waits, self.mark, self.row_port), old):
            assert new is not None and before is not None
            new[:len(before)] = before

    def port_of(self, rows: np.ndarray) -> np.ndarray:
        return self.row_port[rows]

    def reset(self) -> None:
        super().reset()
        self.table[self.row_port[self.fixed:self.used]] = 0
        self.row_port[self.fixed:self.used] = -1
        self.used = self.fixed


# tcp_info words read per socket: the waits and RTT (in every tcp_info since 2.6), then
# the three u8 chronographs (Linux 4.10+) as (low, high) word pairs.
_WAIT_WORDS, _WAIT_LEN = tcpinfo.word_index(_WAITS)
_ALL_WORDS, _ALL_LEN = tcpinfo.word_index(_WAITS + _CHRONO)
_CHUNK = 16384  # sockets folded at once: a chunk's columns (~0.6 MB) stay in L2; 64k cost 25% more
_WRAP = np.uint32(1 << 31)  # a chronograph "growth" this large is a decrease (never: drop it)


class _InfoFold(Fold):
    """Per batch, only gathers: the header columns the TCP fold shares, the cookie and one
    (n, 9) block of tcp_info words. Every _CHUNK sockets the gathered columns are folded at
    once and the chunk's cookies, sorted, are joined with the last poll's sorted state (a
    binary search with sorted needles walks the state once; unsorted ones cost 5x more per
    socket); finish() merges the sorted chunks into the next state. Replaying a recorded
    80k-socket dump, the TCP and tcp_info folds together cost 0.32 µs per socket, against
    0.41 for a per-batch join with unsorted needles and a state of 32 bytes per socket."""

    def __init__(self, feature: TcpInfo) -> None:
        self.f = feature
        feature.local.reset()
        feature.remote.reset()
        feature.listening[:] = False
        self.pending: list[tuple[np.ndarray, ...]] = []
        self.pending_n = 0
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted cookies, chrono ms)

    def add(self, batch: Batch) -> None:
        if not len(batch):
            return
        state = batch.state
        listen = state == LISTEN
        if listen.any():
            ports = batch.sport[listen]
            self.f.listening[ports] = True
            if isinstance(self.f.local, _LocalSide):
                self.f.local.listen(ports)
        length = batch.attribute(tcpinfo.INET_DIAG_INFO).length  # 0 where absent
        rows = np.flatnonzero((length >= _WAIT_LEN) & ~listen)
        if not len(rows):
            return
        full = length[rows] >= _ALL_LEN
        if full.all():
            block = tcpinfo.words(batch, rows, _ALL_WORDS)
        else:  # a kernel older than 4.10 (or a truncated attribute): no chronographs there
            block = np.zeros((len(rows), len(_ALL_WORDS)), np.uint32)
            block[:, :len(_WAIT_WORDS)] = tcpinfo.words(batch, rows, _WAIT_WORDS)
            have = np.flatnonzero(full)
            block[have] = tcpinfo.words(batch, rows[have], _ALL_WORDS)
        if len(rows) == len(batch):  # no listener, every tcp_info whole: the columns as they are
            sport, dport, st, inode, rq, cookie = (batch.sport, batch.dport, state, batch.inode, batch.rqueue,
                                                    batch.cookie)
        else:
            sport, dport, st, inode, rq, cookie = (batch.sport[rows], batch.dport[rows], state[rows],
                                                    batch.inode[rows], batch.rqueue[rows], batch.cookie[rows])
        self.pending.append((sport, dport, st, inode == 0, rq > 0, cookie, full, block))
        self.pending_n += len(rows)
        if self.pending_n >= _CHUNK:
            self._fold()

    def _fold(self) -> None:
        if not self.pending:
            return
        sport, dport, st, no_inode, queued, cookie, full, block = (
            np.concatenate(c) if len(self.pending) > 1 else c[0] for c in zip(*self.pending))
        self.pending, self.pending_n = [], 0
        f = self.f
        loc, rem = f.local, f.remote
        lrow, rrow = loc.rows(sport), rem.rows(dport)
        loc.mark[lrow] = True
        rem.mark[rrow] = True
        assert loc.waits is not None
        ldr, lar, rtt = block[:, 0], block[:, 1], block[:, 2]
        est = st == ESTABLISHED
        for slot, mask, value in ((0, est & no_inode, ldr), (1, queued, ldr), (2, st == CLOSE_WAIT, lar)):
            at = np.flatnonzero(mask)
            if len(at):
                np.maximum.at(loc.waits, lrow[at] * 3 + slot, value[at].astype(np.int64))
        at = np.flatnonzero(est)
        if len(at):
            r = rtt[at]
            b = np.searchsorted(_EDGES_US, r, side="left")
            r64 = r.astype(np.int64)
            ones = np.ones(len(at), np.int32)  # int32 like hist: a Python 1 takes a slow casting path
            counts, total = np.bincount(b, minlength=_NB), int(r64.sum())
            for side, prow in ((loc, lrow[at]), (rem, rrow[at])):
                np.add.at(side.hist, prow * _NB + b, ones)
                np.add.at(side.rtt, prow, r64)
                side.all_hist += counts
                side.all_rtt += total
        have = np.flatnonzero(full)
        if not len(have):
            return
        # µs -> ms, kept modulo 2**32 (49.7 days; polls are at most a day apart): the kernel
        # counts chronographs in jiffies, so whole ms lose nothing at HZ 100/250/1000
        us = tcpinfo.u64s(block[:, 3:] if len(have) == len(block) else block[have, 3:])
        ms = (us // np.uint64(1000)).astype(np.uint32)
        order = np.argsort(cookie[have])
        ck, ms, have = cookie[have][order], ms[order], have[order]
        self.runs.append((ck, ms))
        prev = f.state
        if not len(prev):
            return
        j = np.minimum(np.searchsorted(prev.cookie, ck), len(prev) - 1)  # sorted needles: cheap
        seen = np.flatnonzero(prev.cookie[j] == ck)
        if not len(seen):
            return
        grow = ms[seen] - prev.chrono[j[seen]]  # uint32: wraps like the state
        grow[grow >= _WRAP] = 0
        g = grow.astype(np.int64)
        busy, rwnd, sndbuf = g[:, 0], g[:, 1], g[:, 2]
        net = np.maximum(busy - rwnd - sndbuf, 0)
        moved = np.flatnonzero(busy | rwnd | sndbuf)  # idle sockets (most) cost nothing more
        if not len(moved):
            return
        add = np.concatenate((net[moved], rwnd[moved], sndbuf[moved]))
        sums = add.reshape(3, -1).sum(axis=1)
        pos = have[seen[moved]]
        for side, prow in ((loc, lrow[pos]), (rem, rrow[pos])):
            base = prow * 3
            np.add.at(side.busy, np.concatenate((base, base + 1, base + 2)), add)
            side.all_busy += sums

    def finish(self, stats: DumpStats) -> TcpInfoResult:
        self._fold()
        f = self.f
        f.state = CookieState.empty()  # the last poll's state is no longer needed: free it first
        if len(self.runs) == 1:
            f.state = CookieState(*self.runs[0])
        elif self.runs:
            # One array at a time, each run freed once copied: at most twice the state is
            # resident (48 bytes per socket when the cookies and chronographs were copied
            # together; 20 MB per 1M sockets).
            cookies, chronos = [c for c, _ in self.runs], [m for _, m in self.runs]
            self.runs = []
            cookie = np.concatenate(cookies)
            del cookies
            order = np.argsort(cookie, kind="stable")  # merges the sorted runs
            chrono = np.concatenate(chronos)
            del chronos
            chrono = chrono[order]
            f.state = CookieState(cookie[order], chrono)
        self.runs = []
        return f.result()


class TcpInfo(Feature):
    name = "tcp_info"
    metrics = METRICS

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.local: _Side = _LocalSide(tuple(rules.local))
        self.remote = _Side(tuple(rules.remote[:rules.max_remote]))
        self.listening = np.zeros(_PORTS, bool)
        self.state = CookieState.empty()
        # Counter totals (ms) per exported port label and side; ports that stop being
        # tracked are dropped (their series end; bounded by the caps, not by traffic).
        self._totals: dict[str, dict[str, np.ndarray]] = {"local": {}, "remote": {}}

    @classmethod
    def from_config(cls, cfg) -> TcpInfo:
        return cls(Rules.from_config(cfg))

    def needs(self) -> DumpNeed:
        return DumpNeed(socket.IPPROTO_TCP, ext=tcpinfo.INFO_EXT, attributes=(tcpinfo.INET_DIAG_INFO,))

    def fold(self, ctx: PollContext) -> Fold:
        return _InfoFold(self)

    def result(self) -> TcpInfoResult:
        tracked, _ = self.rules.tracked_local(np.flatnonzero(self.listening).tolist())
        local = self._table("local", self.local, tracked, self.local.rows(np.array(tracked, np.intp)).tolist())
        remote = self._table("remote", self.remote, list(self.remote.ports),
                             list(range(len(self.remote.ports))))
        return TcpInfoResult(local, remote)

    def _table(self, name: str, side: _Side, ports: list[int], rows: list[int]) -> tuple[PortFigures, ...]:
        hist = side.hist.reshape(-1, _NB)
        busy = side.busy.reshape(-1, 3)
        waits = side.waits.reshape(-1, 3) if side.waits is not None else None
        t = side.touched()
        totals = self._totals[name]
        kept: dict[str, np.ndarray] = {}
        out = []
        rest_hist, rest_rtt, rest_busy = side.all_hist.copy(), side.all_rtt, side.all_busy.copy()
        rest_waits = np.zeros(3, np.int64)
        for port, row in zip(ports, rows):
            h, r, b = hist[row], int(side.rtt[row]), busy[row]
            rest_hist -= h
            rest_rtt -= r
            rest_busy -= b
            kept[str(port)] = totals.get(str(port), np.zeros(3, np.int64)) + b
            w = (0.0, 0.0, 0.0)
            if waits is not None:
                w0 = waits[row].copy()
                w0[0] = w0[0] if self.listening[port] else 0
                w = tuple((w0 / 1000).tolist())
            out.append(PortFigures(str(port), w, tuple(np.cumsum(h).tolist()), r / 1e6,
                                   tuple((kept[str(port)] / 1e3).tolist())))
        if waits is not None:
            rest = waits[t]
            rest[np.isin(t, rows)] = 0
            of = side.port_of(t)
            rest[(of < 0) | ~self.listening[np.maximum(of, 0)], 0] = 0  # no listener, no accept queue
            if len(rest):
                rest_waits = rest.max(axis=0)
        kept[OTHER] = totals.get(OTHER, np.zeros(3, np.int64)) + rest_busy
        out.append(PortFigures(OTHER, tuple((rest_waits / 1000).tolist()), tuple(np.cumsum(rest_hist).tolist()),
                               rest_rtt / 1e6, tuple((kept[OTHER] / 1e3).tolist())))
        self._totals[name] = kept
        return tuple(out)

    def samples(self, result: TcpInfoResult, out: Samples) -> None:
        for i, metric in enumerate((UNACCEPTED, UNREAD, CLOSE_WAIT_AGE)):
            out.declare(metric)
            for p in result.local:
                out.add(metric, (p.port,), p.waits[i])
        for (bucket, count, total), table in ((LOCAL_RTT, result.local), (REMOTE_RTT, result.remote)):
            for m in (bucket, count, total):
                out.declare(m)
            for p in table:
                for le, n in zip(BUCKETS, p.buckets):
                    out.add(bucket, (p.port, le), n)
            for p in table:
                out.add(count, (p.port,), p.buckets[-1])
            for p in table:
                out.add(total, (p.port,), p.rtt_sum)
        for metric, table in ((LOCAL_BUSY, result.local), (REMOTE_BUSY, result.remote)):
            out.declare(metric)
            for p in table:
                for limit, value in zip(LIMITS, p.busy):
                    out.add(metric, (p.port, limit), value)

    def max_series(self) -> int:
        r = self.rules
        return (r.max_local + 1) * (3 + _NB + 2 + 3) + (min(len(r.remote), r.max_remote) + 1) * (_NB + 2 + 3)

    def max_peak_series(self) -> int:
        return (self.rules.max_local + 1) * 3


# --- `sockscope snapshot`: the same fold, every port --------------------------------------


@dataclass(frozen=True, slots=True)
class PortInfo:
    """One dump's figures for every port of one side that had a socket with tcp_info (not
    only the tracked ports: the snapshot shows any port). Rows align with `ports`."""

    ports: np.ndarray  # int64, ascending
    waits: np.ndarray  # (n, 3) ms: oldest unaccepted (0 where the port has no listener), unread, close-wait
    hist: np.ndarray  # (n, len(BUCKETS)) ESTABLISHED sockets per RTT bucket (not cumulative)
    rtt: np.ndarray  # (n,) µs, sum of the smoothed RTTs
    busy: np.ndarray  # (n, 3) ms growth since the previous dump, per LIMITS

    def _at(self, ports) -> np.ndarray:
        want = np.asarray(list(ports), np.int64)
        if not len(self.ports):
            return np.full(len(want), -1)
        at = np.minimum(np.searchsorted(self.ports, want), len(self.ports) - 1)
        return np.where(self.ports[at] == want, at, -1)

    def rows(self, ports) -> tuple[np.ndarray, ...]:
        """(waits, hist, rtt, busy) of `ports`, zeros for a port without such sockets."""
        at = self._at(ports)
        out = []
        for a in (self.waits, self.hist, self.rtt, self.busy):
            z = np.zeros((len(at), *a.shape[1:]), np.int64)
            z[at >= 0] = a[at[at >= 0]]
            out.append(z)
        return tuple(out)

    def rest(self, ports) -> tuple[np.ndarray, ...]:
        """(waits, hist, rtt, busy) of every port NOT in `ports`: waits the maxima, the rest summed."""
        keep = ~np.isin(self.ports, np.asarray(list(ports), np.int64))
        waits = self.waits[keep].max(axis=0) if keep.any() else np.zeros(3, np.int64)
        return (waits, self.hist[keep].sum(axis=0), self.rtt[keep].sum(), self.busy[keep].sum(axis=0))


@dataclass(frozen=True, slots=True)
class PortTables:
    local: PortInfo
    remote: PortInfo
    # Seconds between the dump these figures come from and the previous one, over which
    # `busy` grew; None for a first dump (no growth known).
    interval: float | None


class SnapshotInfo(TcpInfo):
    """The TcpInfo fold for `sockscope snapshot`: dense on both sides (a remote port needs no
    configuration to get a row there), and the result is every port's figures rather than
    the tracked ports' series. Its cookie state lives across dumps, so the busy split is the
    growth between two dumps of the same SnapshotInfo."""

    def __init__(self, rules: Rules) -> None:
        super().__init__(replace(rules, remote=()))
        self.local = _Side(None)
        self.remote = _Side(None)
        self._dump_at: float | None = None
        self._last_at: float | None = None

    def fold(self, ctx: PollContext) -> Fold:
        self._dump_at = ctx.monotonic
        return super().fold(ctx)

    def result(self) -> PortTables:  # type: ignore[override]
        now = self._dump_at
        interval = None if self._last_at is None or now is None else now - self._last_at
        self._last_at = now
        return PortTables(self._info(self.local, self.listening), self._info(self.remote, None), interval)

    @staticmethod
    def _info(side: _Side, listening: np.ndarray | None) -> PortInfo:
        t = side.touched()
        if side.waits is not None and listening is not None:
            waits = side.waits.reshape(-1, 3)[t].copy()
            waits[~listening[t], 0] = 0
        else:
            waits = np.zeros((len(t), 3), np.int64)
        return PortInfo(t.astype(np.int64), waits, side.hist.reshape(-1, _NB)[t].astype(np.int64),
                        side.rtt[t].copy(), side.busy.reshape(-1, 3)[t].copy())
