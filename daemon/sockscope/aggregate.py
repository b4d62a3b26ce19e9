"""Pure aggregation: socket batches + port rules -> Snapshot (the TCP feature's fold).

Batches (batch.Batch) stream in per netlink batch (Accumulator.add); nothing per socket
is kept. What is kept is bounded by the port space and the rules, not by traffic:
- local side: counts per (port, state) in a dense 65,536 x 16 int32 array (key
  port << 4 | state slot, np.add.at) and queue figures per port: dense because the
  tracked local ports (the listening ones) are known only at the end;
- remote side: only configured ports are ever tracked, so a port -> row table sends every
  other port to one `other` row ((k + 1) rows); with no remote port configured nothing is
  counted per socket there at all (its `other` row is the per-state totals);
- queue figures of both sides in two shared arrays (sums and backlogged counts per row,
  maxima per row), so each batch costs one np.add.at and one np.maximum.at for them;
- per-state totals per family (np.bincount) and one entry per listening address:port.
The arrays are allocated once per Accumulator and reused poll after poll (`reset()`
zeroes the rows the last poll touched): allocating them per poll cost ~2,000 fresh
page faults per poll, ~15 ms of CPU at 100k sockets (docs/performance.md). Folding into
tracked ports + `other` happens once, in finish(), so the series count depends only on
the rules.

The fold reads the words of inet_diag_msg it needs as the Batch's shared columns (batch.py
has the layout): word 4 = family, state, timer, retrans; word 5 = sport, dport; words
18, 19 = rqueue, wqueue. One gather per word for every column it holds
(each gather of a ~1 MiB batch misses the cache once per message), shared with the other
features' folds of the same batch.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .batch import Batch, format_address
from .snapshot import LISTEN_INDEX, OTHER, Listener, PortTable, QueueStats, Snapshot
from .states import NSTATES as _NSTATES
from .states import SLOT as _STATE_LUT
from .states import STATES
from .states import UNKNOWN_SLOT as _UNKNOWN

_FAMILY_NAME: dict[int, str] = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_PORTS = 65536
_WIDTH = 16  # count slots per row: a row is port << 4 | state slot (UNKNOWN_SLOT 15 ignored)
# Queue sums per row (_qsums, row-major) and maxima (_qmax, one block of rows per figure).
_RSUM, _SSUM, _RN, _SN = range(4)
_RMAX, _SMAX = range(2)
# Family of a message -> offset of its 16 state slots in the per-poll totals: AF_INET,
# AF_INET6, anything else (never seen in TCP dumps; counted, but in no family's figures).
_V4, _V6, _ELSE = 0, 16, 32
_FAMILY_OFFSET = np.full(256, _ELSE, np.uint8)
_FAMILY_OFFSET[socket.AF_INET] = _V4
_FAMILY_OFFSET[socket.AF_INET6] = _V6
# The first two bytes of word 4 (family, state) read as one uint16 in memory order ->
# family offset + state slot: one table lookup per message instead of two gathers.
_pair = np.arange(65536, dtype=np.uint32)
_first, _second = (_pair & 0xFF, _pair >> 8) if sys.byteorder == "little" else (_pair >> 8, _pair & 0xFF)
_FAMILY_SLOT = (_FAMILY_OFFSET[_first] + _STATE_LUT[_second]).astype(np.uint8)
del _pair, _first, _second
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

    def tracked_local(self, listening) -> tuple[list[int], int]:
        """The tracked local ports (ascending) given the listening ones, and how many
        candidates the cap left out: configured ports first, then (auto_listen) the
        listening ones ascending, the first max_local of them."""
        candidates = list(self.local)
        if self.auto_listen:
            candidates += sorted(set(listening) - set(self.local))
        return sorted(candidates[:self.max_local]), max(0, len(candidates) - self.max_local)


def port_lookup(ports: Iterable[int], dtype=np.intp) -> tuple[tuple[int, ...], np.ndarray]:
    """The sorted distinct `ports` and a 65,536-entry table port -> row: a port's index
    among them, every other port the row after the last."""
    kept = tuple(sorted(set(ports)))
    lut = np.full(_PORTS, len(kept), dtype)
    lut[list(kept)] = np.arange(len(kept), dtype=dtype)
    return kept, lut


def port_rows(ports: Iterable[int] | None, dtype=np.intp) -> tuple[tuple[int, ...] | None, np.ndarray | None, int]:
    """(ports, lut, rows) of one side's per-port table: `ports` None = dense, one row per
    port number (no lookup table); else port_lookup's sorted ports and table, and one row
    for every other port after them."""
    if ports is None:
        return None, None, _PORTS
    kept, lut = port_lookup(ports, dtype)
    return kept, lut, len(kept) + 1


class _Side:
    """The rows of one side (local or remote port): ports (dense), or, given `ports`, the
    sorted ports then one row for every other port. `first` is its first row in the
    Accumulator's queue arrays; `lo`/`hi` bound the rows a poll touched."""

    __slots__ = ("ports", "lut", "rows", "first", "counts", "lo", "hi")

    def __init__(self, ports: Iterable[int] | None, first: int) -> None:
        self.ports, self.lut, self.rows = port_rows(ports, np.uint32)
        self.first = first
        self.counts = np.zeros(self.rows * _WIDTH, np.int32)
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

    def row(self, port: int) -> tuple[int, ...]:
        at = self.row_of(port) * _WIDTH
        return tuple(self.counts[at:at + _NSTATES].tolist())


class Accumulator:
    """Running totals of one poll. Feed it batch.Batch objects; `reset()` makes it ready
    for the next poll without allocating again.

    `remote`: the remote ports finish() may be asked to track (Rules.remote); only those
    are counted per port. None (the default, for one-shot use) counts every remote port.
    """

    __slots__ = ("listeners", "local", "remote", "_totals", "_ones", "_qsums", "_qmax", "_rows")

    def __init__(self, remote: Iterable[int] | None = None) -> None:
        self.local = _Side(None, 0)
        self.remote = _Side(remote, _PORTS)
        self._rows = _PORTS + self.remote.rows
        self._qsums = np.zeros(self._rows * 4, np.int64)  # _RSUM, _SSUM, _RN, _SN per row
        self._qmax = np.zeros(2 * self._rows, np.int64)  # _RMAX rows, then _SMAX rows
        self._ones = np.ones(0, np.int32)
        self.listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self._totals = np.zeros(48, np.int64)  # family offset (_V4, _V6, _ELSE) + state slot

    def reset(self) -> None:
        """Forget the last poll (a finished one, or an attempt thrown away): zero the rows
        it touched."""
        for side in (self.local, self.remote):
            if side.hi < 0:
                continue
            side.counts[side.lo * _WIDTH:(side.hi + 1) * _WIDTH] = 0
            lo, hi = side.first + side.lo, side.first + side.hi + 1
            self._qsums[lo * 4:hi * 4] = 0
            self._qmax[lo:hi] = 0
            self._qmax[self._rows + lo:self._rows + hi] = 0
            side.lo, side.hi = side.rows, -1
        self.listeners = {}
        self._totals[:] = 0

    @property
    def unknown(self) -> int:
        """Sockets with a state number this build does not know (not counted)."""
        return int(self._totals[_UNKNOWN::16].sum())

    def add(self, batch: Batch) -> None:
        n = len(batch)
        if not n:
            return
        head = batch.head
        famslot = _FAMILY_SLOT[head.view(np.uint16)[0::2]]
        per = np.bincount(famslot, minlength=48)
        self._totals += per
        slot = famslot & 15
        sport, dport = batch.sport, batch.dport
        if len(self._ones) < n:
            self._ones = np.ones(n, np.int32)
        ones = self._ones[:n]
        # np.add.at is fast only when index, array and values agree in kind: intp keys
        # and an int32 ones array (a Python 1 takes a casting path 100x slower). Sockets
        # of unknown states land in slot 15 of their row, which nothing reads.
        key = np.left_shift(sport, 4, dtype=np.intp)
        key |= slot
        np.add.at(self.local.counts, key, ones)
        self.local.touch(sport)
        remote = self.remote
        if remote.counting:
            rows = remote.rows_of(dport)
            key = np.left_shift(rows, 4, dtype=np.intp)
            key |= slot
            np.add.at(remote.counts, key, ones)
            remote.touch(rows)
        rq, wq = batch.rqueue, batch.wqueue
        if per[LISTEN_INDEX::16].any():
            family = head.view(np.uint8)[0::4]
            for i in np.flatnonzero(slot == LISTEN_INDEX).tolist():
                self._add_listener(int(family[i]), batch.src(i), int(sport[i]), int(rq[i]), int(wq[i]))
        queued = np.flatnonzero(rq | wq)
        if len(queued):
            queued = queued[_QUEUED_SLOT[slot[queued]]]
            if len(queued):
                self._add_queues(rq[queued], wq[queued], sport[queued], dport[queued])

    def _add_queues(self, rq: np.ndarray, wq: np.ndarray, sport: np.ndarray, dport: np.ndarray) -> None:
        """Queue figures of the sockets with queues, on both sides at once: one np.add.at
        and one np.maximum.at over flat indices (the calls, not the few elements, cost)."""
        k = len(rq)
        rows = np.empty(2 * k, np.intp)
        rows[:k] = sport
        remote = self.remote
        rows[k:] = remote.rows_of(dport)
        if not remote.counting:  # otherwise add() touched these rows already
            remote.touch(rows[k:])
        rows[k:] += remote.first
        r = np.concatenate((rq, rq)).astype(np.int64)
        w = np.concatenate((wq, wq)).astype(np.int64)
        at = rows * 4
        np.add.at(self._qsums, np.concatenate((at + _RSUM, at + _SSUM, at + _RN, at + _SN)),
                  np.concatenate((r, w, r != 0, w != 0)))
        np.maximum.at(self._qmax, np.concatenate((rows + _RMAX * self._rows, rows + _SMAX * self._rows)),
                      np.concatenate((r, w)))

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

    def _queue(self, side: _Side, port: int) -> list[int]:
        """[receive sum, send sum, receive max, send max, receive n, send n] of a port."""
        row = side.first + side.row_of(port)
        rsum, ssum, rn, sn = self._qsums[row * 4:row * 4 + 4].tolist()
        return [rsum, ssum, int(self._qmax[row]), int(self._qmax[self._rows + row]), rn, sn]

    def _rest(self, side: _Side, tracked: list[int], total: list[int]) -> list[int]:
        """Queue figures of the rows not in `tracked`: sums are the totals minus the
        tracked rows', maxima a pass over the rows the poll touched, tracked ones left out."""
        rsum, ssum, rn, sn = total
        rest = [rsum, ssum, 0, 0, rn, sn]
        for port in tracked:
            q = self._queue(side, port)
            for i in (0, 1, 4, 5):
                rest[i] -= q[i]
        if side.hi < 0:
            return rest
        inside = [r - side.lo for r in map(side.row_of, tracked) if side.lo <= r <= side.hi]
        for i, base in ((2, _RMAX * self._rows), (3, _SMAX * self._rows)):
            at = base + side.first
            figures = self._qmax[at + side.lo:at + side.hi + 1].copy()
            figures[inside] = 0
            rest[i] = int(figures.max())
        return rest

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
        # Every socket with queues is in exactly one row of each side: the remote side's
        # rows (few, unless every remote port is counted) sum to the totals.
        remote = self.remote
        qtotal = [0, 0, 0, 0]
        if remote.hi >= 0:
            lo, hi = remote.first + remote.lo, remote.first + remote.hi + 1
            qtotal = self._qsums[lo * 4:hi * 4].reshape(-1, 4).sum(axis=0).tolist()

        tracked, folded = rules.tracked_local(self.listen_ports())
        local = self._port_table(tracked, folded, self.local, totals, qtotal)
        remote_ports = list(rules.remote)
        remote_table = self._port_table(sorted(remote_ports[:rules.max_remote]),
                                        max(0, len(remote_ports) - rules.max_remote), remote, totals, qtotal)
        listeners, folded_listeners = self._listeners(rules.max_listeners)
        return Snapshot(
            timestamp=timestamp,
            duration=duration,
            families=families,
            states=states,
            local=local,
            remote=remote_table,
            listeners=listeners,
            folded_listeners=folded_listeners,
            dump_interrupted=dump_interrupted,
            messages=messages,
        )

    def _port_table(self, tracked: list[int], folded: int, side: _Side, totals: list[int],
                    qtotal: list[int]) -> PortTable:
        """Tracked ports (ascending) + `other` holding the rest."""
        rows: list[tuple[int, ...]] = []
        other = list(totals)
        for port in tracked:
            row = side.row(port)
            rows.append(row)
            for i, n in enumerate(row):
                other[i] -= n
        rows.append(tuple(other))
        qrows = [QueueStats(*self._queue(side, port)) for port in tracked]
        qrows.append(QueueStats(*self._rest(side, tracked, qtotal)))
        return PortTable(
            ports=(*tracked, OTHER), counts=tuple(rows), queues=tuple(qrows), folded=folded
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
