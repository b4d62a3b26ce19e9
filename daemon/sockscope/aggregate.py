"""Pure aggregation: socket records + port rules -> Snapshot.

Records stream in per netlink batch (Accumulator.add); nothing per socket is kept.
What is kept is bounded by the port space, not by traffic: counts keyed by
(port, state) for each side, queue sums for ports that had a non-empty queue, and one
entry per listening address:port. Folding into tracked ports + `other` happens once,
in finish(), so the series count depends only on the rules.

Two paths, same result: record tuples (the exact decoder's lists, hand-built tests) go
into dicts; column batches (netlink.MessageBatch) go into fixed numpy arrays indexed by
port << 4 | state (65536 x 16 int32 per side, 4 MiB, allocated with calloc so only the
pages of ports seen become resident) with np.add.at, and queue figures into 6 x 65536
arrays with np.add.at / np.maximum.at. finish() folds the dicts into the arrays when
both were fed. Listeners are few and go through the same per-record code on both paths.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .snapshot import (
    FAMILIES,
    LISTEN_INDEX,
    OTHER,
    STATE_INDEX,
    STATES,
    Listener,
    PortTable,
    QueueStats,
    Snapshot,
)

_NSTATES = len(STATES)
# Kernel state number -> index into STATES; unknown numbers map to None (skipped, counted).
_STATE_INDEX = [STATE_INDEX.get(n) for n in range(256)]
_FAMILY_NAME = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
# Queue accumulator slots: receive sum, send sum, receive max, send max, receive n, send n.
_RSUM, _SSUM, _RMAX, _SMAX, _RN, _SN = range(6)
_UNKNOWN = 15  # state slot of kernel state numbers this build does not know
_STATE_LUT = np.array([_UNKNOWN if i is None else i for i in _STATE_INDEX], np.uint8)
_KEYS = 65536 << 4  # port << 4 | state slot


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


def _queue_add(queues: dict, port: int, rq: int, wq: int) -> None:
    q = queues.get(port)
    if q is None:
        q = queues[port] = [0, 0, 0, 0, 0, 0]
    if rq:
        q[_RSUM] += rq
        q[_RN] += 1
        if rq > q[_RMAX]:
            q[_RMAX] = rq
    if wq:
        q[_SSUM] += wq
        q[_SN] += 1
        if wq > q[_SMAX]:
            q[_SMAX] = wq


class Accumulator:
    """Running totals of one poll. Feed it record tuples (netlink.Record order)."""

    __slots__ = (
        "families", "local", "remote", "local_q", "remote_q", "listeners", "unknown",
        "local_a", "remote_a", "local_qa", "remote_qa",
    )

    def __init__(self) -> None:
        self.families: dict[int, list[int]] = {}
        self.local: dict[int, int] = {}  # port << 4 | state index -> count
        self.remote: dict[int, int] = {}
        self.local_q: dict[int, list[int]] = {}  # port -> queue slots (non-LISTEN only)
        self.remote_q: dict[int, list[int]] = {}
        # (family, src, port) -> [members, queue length, queue limit] of the fullest member
        self.listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self.unknown = 0  # records with a state number this build does not know
        # Column path (see the module doc): None until the first column batch.
        self.local_a: np.ndarray | None = None  # port << 4 | state -> count
        self.remote_a: np.ndarray | None = None
        self.local_qa: np.ndarray | None = None  # [slot, port], slots as in local_q
        self.remote_qa: np.ndarray | None = None

    def add(self, records: Iterable[tuple]) -> None:
        """Add a batch: a list of record tuples, or a column batch (has .state, .sport...)."""
        if not isinstance(records, (list, tuple)) and hasattr(records, "sport"):
            self._add_columns(records)
            return
        families = self.families
        local, remote = self.local, self.remote
        local_get, remote_get = local.get, remote.get
        state_index = _STATE_INDEX
        for fam, state, sport, dport, src, _dst, rq, wq, _uid, _ino in records:
            st = state_index[state]
            if st is None:
                self.unknown += 1
                continue
            counts = families.get(fam)
            if counts is None:
                counts = families[fam] = [0] * _NSTATES
            counts[st] += 1
            k = sport << 4 | st
            local[k] = local_get(k, 0) + 1
            k = dport << 4 | st
            remote[k] = remote_get(k, 0) + 1
            if st == LISTEN_INDEX:
                self._add_listener(fam, src, sport, rq, wq)
            elif rq or wq:
                _queue_add(self.local_q, sport, rq, wq)
                _queue_add(self.remote_q, dport, rq, wq)

    def _add_columns(self, batch) -> None:
        if not len(batch):
            return
        st = _STATE_LUT[batch.state]
        fam = batch.family
        sport = batch.sport
        dport = batch.dport
        rq = batch.rqueue
        wq = batch.wqueue
        unknown = st == _UNKNOWN
        rows = None
        if unknown.any():
            self.unknown += int(unknown.sum())
            rows = np.flatnonzero(~unknown)
            st, fam, sport, dport, rq, wq = (a[rows] for a in (st, fam, sport, dport, rq, wq))
            if not len(rows):
                return
        if self.local_a is None:
            self.local_a = np.zeros(_KEYS, np.int32)
            self.remote_a = np.zeros(_KEYS, np.int32)
        # np.add.at is fast only when index, array and values agree in kind: intp
        # keys and an int32 ones array (a Python 1 takes a casting path 20x slower).
        ones = np.ones(len(st), np.int32)
        slot = st.astype(np.intp)
        np.add.at(self.local_a, (sport.astype(np.intp) << 4) | slot, ones)
        np.add.at(self.remote_a, (dport.astype(np.intp) << 4) | slot, ones)
        is6 = fam == socket.AF_INET6
        if (is6 | (fam == socket.AF_INET)).all():
            both = np.bincount(slot + (is6.astype(np.intp) << 4), minlength=32).tolist()
            groups = [(socket.AF_INET, both[:_NSTATES]), (socket.AF_INET6, both[16:16 + _NSTATES])]
        else:  # not seen in TCP dumps; kept exact anyway
            groups = [(f, np.bincount(slot[fam == f], minlength=_NSTATES)[:_NSTATES].tolist())
                      for f in np.unique(fam).tolist()]
        for f, n in groups:
            if not any(n):
                continue
            counts = self.families.get(f)
            if counts is None:
                counts = self.families[f] = [0] * _NSTATES
            for i, c in enumerate(n):
                counts[i] += c
        listen = st == LISTEN_INDEX
        for i in np.flatnonzero(listen).tolist():
            row = i if rows is None else int(rows[i])
            self._add_listener(int(fam[i]), batch.src(row), int(sport[i]), int(rq[i]), int(wq[i]))
        queued = np.flatnonzero(((rq | wq) != 0) & ~listen)
        if len(queued):
            rq = rq[queued].astype(np.int64)
            wq = wq[queued].astype(np.int64)
            rn = (rq != 0).astype(np.int64)
            sn = (wq != 0).astype(np.int64)
            if self.local_qa is None:
                self.local_qa = np.zeros((6, 65536), np.int64)
                self.remote_qa = np.zeros((6, 65536), np.int64)
            for qa, port in ((self.local_qa, sport[queued]), (self.remote_qa, dport[queued])):
                port = port.astype(np.intp)
                np.add.at(qa[_RSUM], port, rq)
                np.add.at(qa[_SSUM], port, wq)
                np.maximum.at(qa[_RMAX], port, rq)
                np.maximum.at(qa[_SMAX], port, wq)
                np.add.at(qa[_RN], port, rn)
                np.add.at(qa[_SN], port, sn)

    def _fold_dicts_into_arrays(self) -> None:
        for arr, counts in ((self.local_a, self.local), (self.remote_a, self.remote)):
            for k, n in counts.items():
                arr[k] += n
        self.local.clear()
        self.remote.clear()
        if self.local_q or self.remote_q:
            if self.local_qa is None:
                self.local_qa = np.zeros((6, 65536), np.int64)
                self.remote_qa = np.zeros((6, 65536), np.int64)
            for qa, queues in ((self.local_qa, self.local_q), (self.remote_qa, self.remote_q)):
                for port, q in queues.items():
                    for slot in (_RSUM, _SSUM, _RN, _SN):
                        qa[slot, port] += q[slot]
                    for slot in (_RMAX, _SMAX):
                        qa[slot, port] = max(int(qa[slot, port]), q[slot])
                queues.clear()

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
        duration: float,
        messages: int = 0,
        dump_interrupted: int = 0,
    ) -> Snapshot:
        families = tuple(families)
        states: dict[tuple[str, str], int] = {}
        totals = [0] * _NSTATES
        for name in FAMILIES:
            if name not in families:
                continue
            counts = self.families.get(socket.AF_INET if name == "ipv4" else socket.AF_INET6)
            for i, state in enumerate(STATES):
                n = counts[i] if counts else 0
                states[(name, state)] = n
                totals[i] += n

        local_candidates = list(rules.local)
        if rules.auto_listen:
            configured = set(rules.local)
            local_candidates += sorted(self.listen_ports() - configured)
        if self.local_a is not None:
            self._fold_dicts_into_arrays()
            local_view = _ArrayView(self.local_a, self.local_qa)
            remote_view = _ArrayView(self.remote_a, self.remote_qa)
        else:
            local_view = _DictView(self.local, self.local_q)
            remote_view = _DictView(self.remote, self.remote_q)
        local = _port_table(local_candidates, rules.max_local, local_view, totals)
        remote = _port_table(list(rules.remote), rules.max_remote, remote_view, totals)
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
                address=_format(fam, src),
                port=port,
                queue_length=rq,
                queue_limit=wq,
                members=members,
            )
            for (fam, src, port), (members, rq, wq) in ordered[:cap]
        )
        return out, max(0, len(ordered) - cap)


def _format(fam: int, src: bytes) -> str:
    return socket.inet_ntop(fam, src[:4] if fam == socket.AF_INET else src)


class _DictView:
    """Counts and queues of one side as fed by record tuples."""

    def __init__(self, counts: dict[int, int], queues: dict[int, list[int]]):
        self.counts = counts
        self.queues = queues

    def row(self, port: int) -> tuple[int, ...]:
        return tuple(self.counts.get(port << 4 | i, 0) for i in range(_NSTATES))

    def queue(self, port: int) -> list[int] | None:
        return self.queues.get(port)

    def rest(self, tracked: set) -> list[int]:
        rest = [0, 0, 0, 0, 0, 0]
        for port, q in self.queues.items():
            if port in tracked:
                continue
            rest[_RSUM] += q[_RSUM]
            rest[_SSUM] += q[_SSUM]
            rest[_RN] += q[_RN]
            rest[_SN] += q[_SN]
            rest[_RMAX] = max(rest[_RMAX], q[_RMAX])
            rest[_SMAX] = max(rest[_SMAX], q[_SMAX])
        return rest


class _ArrayView:
    """Counts and queues of one side as fed by column batches."""

    def __init__(self, counts: np.ndarray, queues: np.ndarray | None):
        self.counts = counts
        self.queues = queues

    def row(self, port: int) -> tuple[int, ...]:
        return tuple(self.counts[port << 4:(port << 4) + _NSTATES].tolist())

    def queue(self, port: int) -> list[int] | None:
        return None if self.queues is None else self.queues[:, port].tolist()

    def rest(self, tracked: set) -> list[int]:
        if self.queues is None:
            return [0, 0, 0, 0, 0, 0]
        q = self.queues
        ports = sorted(tracked)
        rest = (q.sum(axis=1) - q[:, ports].sum(axis=1)).tolist()
        for slot in (_RMAX, _SMAX):
            m = q[slot].copy()
            m[ports] = 0
            rest[slot] = int(m.max())
        return rest


def _port_table(candidates: list[int], cap: int, view, totals: list[int]) -> PortTable:
    """Tracked ports (first `cap` candidates, ascending) + `other` holding the rest."""
    tracked = sorted(candidates[:cap])
    folded = max(0, len(candidates) - cap)
    rows: list[tuple[int, ...]] = []
    other = list(totals)
    for port in tracked:
        row = view.row(port)
        rows.append(row)
        for i, n in enumerate(row):
            other[i] -= n
    rows.append(tuple(other))

    qrows = [_queue_stats(view.queue(port)) for port in tracked]
    qrows.append(_queue_stats(view.rest(set(tracked))))
    return PortTable(
        ports=(*tracked, OTHER), counts=tuple(rows), queues=tuple(qrows), folded=folded
    )


def _queue_stats(q: list[int] | None) -> QueueStats:
    if q is None:
        return QueueStats()
    return QueueStats(
        receive_bytes=q[_RSUM],
        send_bytes=q[_SSUM],
        receive_max_bytes=q[_RMAX],
        send_max_bytes=q[_SMAX],
        receive_backlogged=q[_RN],
        send_backlogged=q[_SN],
    )
