"""Pure aggregation: socket batches + port rules -> Snapshot (the TCP feature's fold).

Batches (batch.Batch) stream in per netlink batch (Accumulator.add); nothing per socket
is kept. What is kept is bounded by the port space, not by traffic: counts in fixed numpy
arrays indexed by port << 4 | state (65536 x 16 int32 per side, 4 MiB, allocated with
calloc so only the pages of ports seen become resident) with np.add.at, queue figures in
6 x 65536 arrays with np.add.at / np.maximum.at, and one entry per listening
address:port. Folding into tracked ports + `other` happens once, in finish(), so the
series count depends only on the rules.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .batch import Batch, format_address
from .snapshot import FAMILIES, LISTEN_INDEX, OTHER, Listener, PortTable, QueueStats, Snapshot
from .states import NSTATES as _NSTATES
from .states import STATES
from .states import SLOT as _STATE_LUT
from .states import UNKNOWN_SLOT as _UNKNOWN

_FAMILY_NAME = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
# Queue accumulator slots: receive sum, send sum, receive max, send max, receive n, send n.
_RSUM, _SSUM, _RMAX, _SMAX, _RN, _SN = range(6)
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


class Accumulator:
    """Running totals of one poll. Feed it batch.Batch objects."""

    __slots__ = ("families", "listeners", "unknown", "local_a", "remote_a", "local_qa", "remote_qa")

    def __init__(self) -> None:
        self.families: dict[int, list[int]] = {}
        # (family, src, port) -> [members, queue length, queue limit] of the fullest member
        self.listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self.unknown = 0  # sockets with a state number this build does not know
        self.local_a = np.zeros(_KEYS, np.int32)  # port << 4 | state slot -> count
        self.remote_a = np.zeros(_KEYS, np.int32)
        self.local_qa: np.ndarray | None = None  # [slot, port], slots _RSUM.._SN
        self.remote_qa: np.ndarray | None = None

    def add(self, batch: Batch) -> None:
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
        local_view = _ArrayView(self.local_a, self.local_qa)
        remote_view = _ArrayView(self.remote_a, self.remote_qa)
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
                address=format_address(fam, src),
                port=port,
                queue_length=rq,
                queue_limit=wq,
                members=members,
            )
            for (fam, src, port), (members, rq, wq) in ordered[:cap]
        )
        return out, max(0, len(ordered) - cap)


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
