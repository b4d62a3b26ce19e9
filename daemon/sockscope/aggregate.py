"""Pure aggregation: socket records + port rules -> Snapshot.

Records stream in per netlink datagram (Accumulator.add); nothing per socket is kept.
What is kept is bounded by the port space, not by traffic: counts keyed by
(port, state) for each side, queue sums for ports that had a non-empty queue, and one
entry per listening address:port. Folding into tracked ports + `other` happens once,
in finish(), so the series count depends only on the rules.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

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

    __slots__ = ("families", "local", "remote", "local_q", "remote_q", "listeners", "unknown")

    def __init__(self) -> None:
        self.families: dict[int, list[int]] = {}
        self.local: dict[int, int] = {}  # port << 4 | state index -> count
        self.remote: dict[int, int] = {}
        self.local_q: dict[int, list[int]] = {}  # port -> queue slots (non-LISTEN only)
        self.remote_q: dict[int, list[int]] = {}
        # (family, src, port) -> [members, queue length, queue limit] of the fullest member
        self.listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self.unknown = 0  # records with a state number this build does not know

    def add(self, records: Iterable[tuple]) -> None:
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
        local = _port_table(
            local_candidates, rules.max_local, self.local, self.local_q, totals
        )
        remote = _port_table(
            list(rules.remote), rules.max_remote, self.remote, self.remote_q, totals
        )
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


def _port_table(
    candidates: list[int],
    cap: int,
    counts: dict[int, int],
    queues: dict[int, list[int]],
    totals: list[int],
) -> PortTable:
    """Tracked ports (first `cap` candidates, ascending) + `other` holding the rest."""
    tracked = sorted(candidates[:cap])
    folded = max(0, len(candidates) - cap)
    rows: list[tuple[int, ...]] = []
    other = list(totals)
    for port in tracked:
        row = tuple(counts.get(port << 4 | i, 0) for i in range(_NSTATES))
        rows.append(row)
        for i, n in enumerate(row):
            other[i] -= n
    rows.append(tuple(other))

    qrows = [_queue_stats(queues.get(port)) for port in tracked]
    tracked_set = set(tracked)
    rest = [0, 0, 0, 0, 0, 0]
    for port, q in queues.items():
        if port in tracked_set:
            continue
        rest[_RSUM] += q[_RSUM]
        rest[_SSUM] += q[_SSUM]
        rest[_RN] += q[_RN]
        rest[_SN] += q[_SN]
        rest[_RMAX] = max(rest[_RMAX], q[_RMAX])
        rest[_SMAX] = max(rest[_SMAX], q[_SMAX])
    qrows.append(_queue_stats(rest))
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
