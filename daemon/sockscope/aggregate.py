"""Pure aggregation: socket batches + port rules -> Snapshot (the TCP feature's fold).

Batches (batch.Batch) stream in per netlink batch (Accumulator.add); nothing per socket
is kept. What is kept is bounded by the port space and the rules, not by traffic:
- local side: counts per (port, state) in a dense 65,536 x 16 int32 array (key
  port << 4 | state slot, np.add.at) and six queue figures per port (65,536 x 6 int64):
  dense because the tracked local ports (the listening ones) are known only at the end;
- remote side: only configured ports are ever tracked, so a port -> row table sends every
  other port to one `other` row ((k + 1) rows); with no remote port configured nothing is
  counted per socket there at all (its `other` row is the per-state totals);
- per-state totals per family (np.bincount) and one entry per listening address:port.
The arrays are allocated once per Accumulator and reused poll after poll (`reset()`
zeroes the port range the last poll touched): allocating them per poll cost ~2,000 fresh
page faults per poll, ~15 ms of CPU at 100k sockets (docs/performance.md). Folding into
tracked ports + `other` happens once, in finish(), so the series count depends only on
the rules.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .batch import Batch, format_address
from .snapshot import LISTEN_INDEX, OTHER, Listener, PortTable, QueueStats, Snapshot
from .states import NSTATES as _NSTATES
from .states import SLOT as _STATE_LUT
from .states import STATES
from .states import UNKNOWN_SLOT as _UNKNOWN

_FAMILY_NAME = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_PORTS = 65536
_WIDTH = 16  # count slots per row: a row is port << 4 | state slot (UNKNOWN_SLOT 15 ignored)
# Queue figures per row: receive sum, send sum, receive max, send max, receive n, send n.
_RSUM, _SSUM, _RMAX, _SMAX, _RN, _SN = range(6)
_QW = 6
# Family of a message -> offset of its 16 state slots in the per-poll totals: AF_INET,
# AF_INET6, anything else (never seen in TCP dumps; counted exactly on a slow path).
_V4, _V6, _ELSE = 0, 16, 32
_FAMILY_OFFSET = np.full(256, _ELSE, np.uint8)
_FAMILY_OFFSET[socket.AF_INET] = _V4
_FAMILY_OFFSET[socket.AF_INET6] = _V6
# Slots whose queues are bytes: not LISTEN (accept queue length / limit), not unknown.
_QUEUED_SLOT = np.ones(_WIDTH, bool)
_QUEUED_SLOT[LISTEN_INDEX] = _QUEUED_SLOT[_UNKNOWN] = False


@dataclass(frozen=True, slots=True)
class Rules:
    """Which ports become series. Built from the `ports:`/`listeners:` config."""

    local: tuple[int, ...] = ()
    remote: tuple[int, ...] = ()
    auto_listen: bool = True
    max_local: int = 64
    max_remote: int = 64
    max_listeners: int = 256

    @classmethod
    def from_config(cls, cfg) -> Rules:
        return cls(
            local=cfg.ports.local,
            remote=cfg.ports.remote,
            auto_listen=cfg.ports.auto_listen,
            max_local=cfg.ports.max_local,
            max_remote=cfg.ports.max_remote,
            max_listeners=cfg.listeners.max_tracked,
        )


class _Side:
    """Counts and queue figures of one side (local or remote port).

    Rows are ports (dense), or, given `ports`, the sorted ports then one row for every
    other port. `lo`/`hi` bound the rows a poll touched (reset() zeroes them)."""

    __slots__ = ("ports", "lut", "rows", "counts", "queues", "lo", "hi")

    def __init__(self, ports: Iterable[int] | None) -> None:
        if ports is None:
            self.ports = None
            self.lut = None
            self.rows = _PORTS
        else:
            self.ports = tuple(sorted(set(ports)))
            self.rows = len(self.ports) + 1
            self.lut = np.full(_PORTS, len(self.ports), np.uint32)  # port -> row; other: last
            self.lut[list(self.ports)] = np.arange(len(self.ports), dtype=np.uint32)
        self.counts = np.zeros(self.rows * _WIDTH, np.int32)
        self.queues = np.zeros(self.rows * _QW, np.int64)
        self.lo, self.hi = self.rows, -1

    @property
    def counting(self) -> bool:
        """False when no port of this side can be tracked: only the totals matter."""
        return self.ports != ()

    def row_of(self, port: int) -> int:
        if self.ports is None:
            return port
        if port not in self.ports:
            raise ValueError(f"port {port} is not among the ports this side counts")
        return self.ports.index(port)

    def rows_of(self, ports: np.ndarray) -> np.ndarray:
        return ports if self.lut is None else self.lut[ports]

    def touch(self, rows: np.ndarray) -> None:
        lo, hi = int(rows.min()), int(rows.max())
        if lo < self.lo:
            self.lo = lo
        if hi > self.hi:
            self.hi = hi

    def reset(self) -> None:
        if self.hi >= 0:
            self.counts[self.lo * _WIDTH:(self.hi + 1) * _WIDTH] = 0
            self.queues[self.lo * _QW:(self.hi + 1) * _QW] = 0
            self.lo, self.hi = self.rows, -1

    def row(self, port: int) -> tuple[int, ...]:
        at = self.row_of(port) * _WIDTH
        return tuple(self.counts[at:at + _NSTATES].tolist())

    def queue(self, port: int) -> list[int]:
        at = self.row_of(port) * _QW
        return self.queues[at:at + _QW].tolist()

    def rest(self, tracked: list[int], total: list[int]) -> list[int]:
        """Queue figures of the rows not in `tracked`: sums are the totals minus the
        tracked rows', maxima a pass over the touched rows with the tracked ones left out."""
        rest = list(total)
        for port in tracked:
            q = self.queue(port)
            for slot in (_RSUM, _SSUM, _RN, _SN):
                rest[slot] -= q[slot]
        if self.hi < 0:
            return rest
        rows = [self.row_of(p) for p in tracked]
        inside = [r - self.lo for r in rows if self.lo <= r <= self.hi]
        for slot in (_RMAX, _SMAX):
            col = self.queues[self.lo * _QW + slot:(self.hi + 1) * _QW:_QW].copy()
            col[inside] = 0
            rest[slot] = int(col.max())
        return rest


class Accumulator:
    """Running totals of one poll. Feed it batch.Batch objects; `reset()` makes it ready
    for the next poll without allocating again.

    `remote`: the remote ports finish() may be asked to track (Rules.remote); only those
    are counted per port. None (the default, for one-shot use) counts every remote port.
    """

    __slots__ = ("listeners", "local", "remote", "_totals", "_qtotal", "_ones")

    def __init__(self, remote: Iterable[int] | None = None) -> None:
        self.local = _Side(None)
        self.remote = _Side(remote)
        self._ones = np.ones(0, np.int32)
        self.listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self._totals = np.zeros(48, np.int64)  # family offset (_V4, _V6, _ELSE) + state slot
        self._qtotal = [0] * _QW  # sums and counts over every socket (maxima unused)

    def reset(self) -> None:
        """Forget the last poll (a finished one, or an attempt thrown away)."""
        self.local.reset()
        self.remote.reset()
        self.listeners = {}
        self._totals[:] = 0
        self._qtotal = [0] * _QW

    @property
    def unknown(self) -> int:
        """Sockets with a state number this build does not know (not counted)."""
        return int(self._totals[_UNKNOWN::16].sum())

    def add(self, batch: Batch) -> None:
        n = len(batch)
        if not n:
            return
        slot = _STATE_LUT[batch.state]
        fam = batch.family
        famslot = _FAMILY_OFFSET[fam]
        famslot += slot
        per = np.bincount(famslot, minlength=48)
        self._totals += per
        if len(self._ones) < n:
            self._ones = np.ones(n, np.int32)
        ones = self._ones[:n]
        sport = batch.sport
        # np.add.at is fast only when index, array and values agree in kind: intp keys
        # and an int32 ones array (a Python 1 takes a casting path 100x slower). Sockets
        # of unknown states land in slot 15 of their row, which nothing reads.
        key = np.left_shift(sport, 4, dtype=np.intp)
        key |= slot
        np.add.at(self.local.counts, key, ones)
        self.local.touch(sport)
        remote = self.remote
        dport = batch.dport
        if remote.counting:
            rows = remote.rows_of(dport)
            key = np.left_shift(rows, 4, dtype=np.intp)
            key |= slot
            np.add.at(remote.counts, key, ones)
            remote.touch(rows)
        rq = batch.rqueue
        wq = batch.wqueue
        if per[LISTEN_INDEX::16].any():
            src = batch.src
            for i in np.flatnonzero(slot == LISTEN_INDEX).tolist():
                self._add_listener(int(fam[i]), src(i), int(sport[i]), int(rq[i]), int(wq[i]))
        queued = np.flatnonzero(rq | wq)
        if len(queued):
            queued = queued[_QUEUED_SLOT[slot[queued]]]
            if len(queued):
                self._add_queues(queued, sport, dport, rq, wq)

    def _add_queues(self, queued: np.ndarray, sport: np.ndarray, dport: np.ndarray,
                    rq: np.ndarray, wq: np.ndarray) -> None:
        r = rq[queued].astype(np.int64)
        w = wq[queued].astype(np.int64)
        rn = r != 0
        sn = w != 0
        total = self._qtotal
        total[_RSUM] += int(r.sum())
        total[_SSUM] += int(w.sum())
        total[_RN] += int(np.count_nonzero(rn))
        total[_SN] += int(np.count_nonzero(sn))
        # One np.add.at for the four sums and one np.maximum.at for the two maxima per
        # side: the calls, not the few elements, are the cost.
        sums = np.concatenate((r, w, rn, sn))
        maxima = np.concatenate((r, w))
        for side, ports in ((self.local, sport), (self.remote, dport)):
            rows = side.rows_of(ports[queued])
            base = np.multiply(rows, _QW, dtype=np.intp)
            np.add.at(side.queues, np.concatenate((base + _RSUM, base + _SSUM, base + _RN, base + _SN)), sums)
            np.maximum.at(side.queues, np.concatenate((base + _RMAX, base + _SMAX)), maxima)
            if not side.counting:  # otherwise add() touched these rows already
                side.touch(rows)

    def _add_listener(self, fam: int, src: bytes, port: int, rq: int, wq: int) -> None:
        key = (fam, src, port)
        entry = self.listeners.get(key)
        if entry is None:
            self.listeners[key] = [1, rq, wq]
            return
        entry[0] += 1
        # Keep the fullest member by fill ratio rq/wq (cross-multiplied: wq may be 0),
        # then by length.
        _, brq, bwq = entry
        if rq * bwq > brq * wq or (rq * bwq == brq * wq and rq > brq):
            entry[1], entry[2] = rq, wq

    def listen_ports(self) -> set[int]:
        return {port for (_, _, port) in self.listeners}

    def finish(
        self,
        rules: Rules,
        *,
        families: Iterable[str],
        timestamp: float,
        duration: float = 0.0,
        messages: int = 0,
        dump_interrupted: int = 0,
    ) -> Snapshot:
        families = tuple(families)
        states: dict[tuple[str, str], int] = {}
        totals = [0] * _NSTATES
        for name, at in (("ipv4", _V4), ("ipv6", _V6)):
            if name not in families:
                continue
            for i, (state, n) in enumerate(zip(STATES, self._totals[at:at + _NSTATES].tolist())):
                states[(name, state)] = n
                totals[i] += n
        qtotal = self._qtotal

        local_candidates = list(rules.local)
        if rules.auto_listen:
            configured = set(rules.local)
            local_candidates += sorted(self.listen_ports() - configured)
        local = _port_table(local_candidates, rules.max_local, self.local, totals, qtotal)
        remote = _port_table(list(rules.remote), rules.max_remote, self.remote, totals, qtotal)
        listeners, folded_listeners = self._listeners(rules.max_listeners)
        return Snapshot(
            timestamp=timestamp,
            duration=duration,
            families=families,
            states=states,
            local=local,
            remote=remote,
            listeners=listeners,
            folded_listeners=folded_listeners,
            dump_interrupted=dump_interrupted,
            messages=messages,
        )

    def _listeners(self, cap: int) -> tuple[tuple[Listener, ...], int]:
        ordered = sorted(self.listeners.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1]))
        out = tuple(
            Listener(
                family=_FAMILY_NAME.get(fam, str(fam)),
                address=format_address(fam, src),
                port=port,
                queue_length=rq,
                queue_limit=wq,
                members=members,
            )
            for (fam, src, port), (members, rq, wq) in ordered[:cap]
        )
        return out, max(0, len(ordered) - cap)


def _port_table(candidates: list[int], cap: int, side: _Side, totals: list[int],
                qtotal: list[int]) -> PortTable:
    """Tracked ports (first `cap` candidates, ascending) + `other` holding the rest."""
    tracked = sorted(candidates[:cap])
    folded = max(0, len(candidates) - cap)
    rows: list[tuple[int, ...]] = []
    other = list(totals)
    for port in tracked:
        row = side.row(port)
        rows.append(row)
        for i, n in enumerate(row):
            other[i] -= n
    rows.append(tuple(other))

    qrows = [_queue_stats(side.queue(port)) for port in tracked]
    qrows.append(_queue_stats(side.rest(tracked, qtotal)))
    return PortTable(
        ports=(*tracked, OTHER), counts=tuple(rows), queues=tuple(qrows), folded=folded
    )


def _queue_stats(q: list[int]) -> QueueStats:
    return QueueStats(
        receive_bytes=q[_RSUM],
        send_bytes=q[_SSUM],
        receive_max_bytes=q[_RMAX],
        send_max_bytes=q[_SMAX],
        receive_backlogged=q[_RN],
        send_backlogged=q[_SN],
    )
