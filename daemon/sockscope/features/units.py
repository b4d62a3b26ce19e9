"""TCP sockets per systemd unit / container, from each socket's cgroup id.

Every full socket's message carries INET_DIAG_CGROUP_ID (attribute 21, a u64) unasked,
with no privilege: the inode number of the socket's cgroup2 directory, i.e. the cgroup of
the process that CREATED the socket (an accepted socket: the listener's, whoever holds its
fd later). TIME-WAIT and request sockets (SYN-RECV) carry none: they count under
unit="none". `ss -tan --cgroup` prints the same cgroup as a path.

Per poll: the dump's batches are folded by cgroup id (a sorted table of ids, started from
the last poll's, one searchsorted per batch, bincounts into per-id rows: no Python per socket), then
finish() maps the ids to labels (cgroupmap.CgroupMap: a walk of the cgroup2 tree on a
miss, rate-bounded; cgroups.unit_label's rules) and folds ids of one label together (a
service's sub-cgroups, a pod's containers). The `max_tracked` labels with the most
sockets get series; the rest are summed under unit="other", so the sum over units equals
the per-state totals. Listening sockets name their unit in one info series each (the
listeners of sockscope_tcp_listen_*, same cap and order).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np

from .. import tcpinfo
from ..batch import Batch, format_address
from ..catalogue import GraphitePath, Metric, Samples
from ..cgroupmap import UNKNOWN, CgroupMap
from ..states import NSTATES, SLOT, STATES
from .base import DumpNeed, DumpStats, Feature, Fold, PollContext

__all__ = ["TcpUnits", "METRICS", "INET_DIAG_CGROUP_ID", "NONE", "OTHER", "UnitRow", "UnitsResult", "cgroup_ids",
           "SnapshotUnits", "UnitTables"]

INET_DIAG_CGROUP_ID = 21  # include/uapi/linux/inet_diag.h (Linux 5.9+): u64, sent for every full socket
CLOSE_WAIT, LISTEN = 8, 10  # include/net/tcp_states.h
NONE = "none"  # sockets without a cgroup id: TIME-WAIT and request sockets
OTHER = "other"  # units past units.max_tracked
_WIDTH = 16  # state slots per row (states.UNKNOWN_SLOT = 15 is dropped, as in the TCP fold)
_WHERE = ("tcp", "unit", "{unit}")

SOCKETS = Metric("sockscope_tcp_unit_sockets", "gauge",
                 "TCP sockets per systemd unit or container (from the socket's cgroup: that of the process that "
                 'created it; accepted sockets are the listener\'s) and state; unit="none": TIME-WAIT and request '
                 'sockets (no cgroup), unit="other": units past units.max_tracked.', ("unit", "state"),
                 GraphitePath((*_WHERE, "{state}")), peak=True)
RECEIVE = Metric("sockscope_tcp_unit_receive_queue_bytes", "gauge",
                 "Sum of Recv-Q (bytes not yet read by the application) over the unit's non-LISTEN sockets.",
                 ("unit",), GraphitePath((*_WHERE, "receive_queue_bytes")))
SEND = Metric("sockscope_tcp_unit_send_queue_bytes", "gauge",
              "Sum of Send-Q (bytes not yet acknowledged by the peer) over the unit's non-LISTEN sockets.",
              ("unit",), GraphitePath((*_WHERE, "send_queue_bytes")))
LISTEN_UNIT = Metric("sockscope_tcp_listen_unit_info", "gauge",
                     "1 for each unit with a listening socket on the address (the listeners of "
                     "sockscope_tcp_listen_sockets, at most listeners.max_tracked series).",
                     ("address", "port", "unit"), GraphitePath(("tcp", "listen", "{address}_{port}", "unit", "{unit}")))
CLOSE_WAIT_AGE = Metric("sockscope_tcp_unit_oldest_close_wait_seconds", "gauge",
                        "Max ss -ti lastack over the unit's CLOSE-WAIT sockets: time since the peer's FIN arrived "
                        "and the application has not closed; 0 if none (with tcp_info.enabled).", ("unit",),
                        GraphitePath((*_WHERE, "oldest_close_wait_seconds")), peak=True)
FOLDED = Metric("sockscope_folded_units", "gauge",
                'Units past units.max_tracked, counted under unit="other".', (), GraphitePath(("tcp", "folded_units")))
WALKS = Metric("sockscope_tcp_unit_cgroup_walks", "counter",
               "Walks of the cgroup2 tree to map new cgroup ids to units (on a miss, rate-bounded), complete or not.",
               (), GraphitePath(("tcp", "unit_cgroup", "walks")))
WALK_ERRORS = Metric("sockscope_tcp_unit_cgroup_walk_errors", "counter",
                     "Walks of the cgroup2 tree that failed (no cgroup2 mount, unreadable): their ids count under "
                     'unit="unknown"; the error is logged once.', (), GraphitePath(("tcp", "unit_cgroup", "walk_errors")))
METRICS = (SOCKETS, RECEIVE, SEND, CLOSE_WAIT_AGE, LISTEN_UNIT, FOLDED, WALKS, WALK_ERRORS)
_LAST_ACK_WORD, _LAST_ACK_LEN = tcpinfo.word_index(("last_ack_recv",))


def cgroup_ids(batch: Batch) -> np.ndarray:
    """The cgroup id of every message of `batch` (uint64); 0 where it has none."""
    attr = batch.attribute(INET_DIAG_CGROUP_ID)
    has = attr.length >= 8
    # where absent, offset 0 is read (the first message's header): masked out below
    ids = batch.u64(np.where(has, attr.offset, 0))
    if not has.all():
        ids[~has] = 0
    return ids


@dataclass(frozen=True, slots=True)
class UnitRow:
    unit: str
    counts: tuple[int, ...]  # per STATES
    receive_bytes: int
    send_bytes: int
    oldest_close_wait: float | None = None  # seconds; None without tcp_info


@dataclass(frozen=True, slots=True)
class UnitsResult:
    units: tuple[UnitRow, ...]  # the tracked units by label, then none, then other
    listeners: tuple[tuple[str, int, str], ...]  # (address, port, unit), ordered like the listen series
    folded: int
    cgroup_walks: int
    cgroup_walk_errors: int = 0


class _UnitsFold(Fold):
    """Per-id rows for one dump attempt. Row 0 is id 0 (no cgroup id)."""

    def __init__(self, feature: TcpUnits) -> None:
        self.f = feature
        # The ids of the last poll's sockets (sorted, 0 first) start the table: a new id
        # (a sort) is rare after the first poll.
        self.keys = feature.seen  # sorted ids
        rows = len(self.keys)
        self.key_row = np.arange(rows, dtype=np.intp)  # row of each key
        self.counts = np.zeros(rows * _WIDTH, np.int64)  # rows x _WIDTH
        self.queues = np.zeros(rows * 2, np.int64)  # rows x (recv, send)
        self.ages = np.zeros(rows, np.int64)  # per row: max tcpi_last_ack_recv (ms) of its CLOSE-WAIT sockets
        self.listen: list[tuple[np.ndarray, ...]] = []  # family, src (n,16), sport, id

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.keys, ids), len(self.keys) - 1)
        hit = self.keys[pos] == ids
        if not hit.all():
            new = np.unique(ids[~hit])
            first = len(self.key_row)
            keys = np.concatenate((self.keys, new))
            rows = np.concatenate((self.key_row, np.arange(first, first + len(new))))
            order = np.argsort(keys, kind="stable")
            self.keys, self.key_row = keys[order], rows[order]
            self.counts = np.concatenate((self.counts, np.zeros(len(new) * _WIDTH, np.int64)))
            self.queues = np.concatenate((self.queues, np.zeros(len(new) * 2, np.int64)))
            self.ages = np.concatenate((self.ages, np.zeros(len(new), np.int64)))
            pos = np.searchsorted(self.keys, ids)
        return self.key_row[pos]

    def add(self, batch: Batch) -> None:
        if not len(batch):
            return
        ids = cgroup_ids(batch)
        row = self._rows(ids)
        state = batch.state
        slot = SLOT[state].astype(np.intp)
        nrows = len(self.key_row)
        self.counts += np.bincount(row * _WIDTH + slot, minlength=nrows * _WIDTH)
        rq, wq = batch.rqueue, batch.wqueue
        queued = np.flatnonzero(((rq | wq) != 0) & (state != LISTEN))  # most sockets have empty queues
        if len(queued):
            r = row[queued]
            # float64 weights: exact while a unit's queued bytes stay below 2**53
            self.queues[0::2] += np.bincount(r, weights=rq[queued], minlength=nrows).astype(np.int64)
            self.queues[1::2] += np.bincount(r, weights=wq[queued], minlength=nrows).astype(np.int64)
        listen = np.flatnonzero(state == LISTEN)
        if len(listen):
            self.listen.append((batch.family[listen], batch.addresses("src", listen), batch.sport[listen],
                                ids[listen]))
        if self.f.close_wait_age:
            waits = np.flatnonzero(state == CLOSE_WAIT)
            if len(waits):
                waits = waits[batch.attribute(tcpinfo.INET_DIAG_INFO).length[waits] >= _LAST_ACK_LEN]
                if len(waits):
                    age = tcpinfo.words(batch, waits, _LAST_ACK_WORD)[:, 0].astype(np.int64)
                    np.maximum.at(self.ages, row[waits], age)

    def finish(self, stats: DumpStats) -> UnitsResult:
        return self.f.result(self.keys, self.key_row, self.counts.reshape(-1, _WIDTH), self.queues.reshape(-1, 2),
                             self.listen, self.ages if self.f.close_wait_age else None)


class TcpUnits(Feature):
    name = "units"
    metrics = METRICS

    def __init__(self, max_tracked: int = 64, max_listeners: int = 256, cgroups: CgroupMap | None = None,
                 close_wait_age: bool = False) -> None:
        self.max_tracked = max_tracked
        self.max_listeners = max_listeners
        self.cgroups = cgroups if cgroups is not None else CgroupMap()
        self.close_wait_age = close_wait_age  # tcp_info.enabled: the dump carries INET_DIAG_INFO
        self.seen = np.zeros(1, np.uint64)  # the ids the last complete dump met, sorted; 0 first

    @classmethod
    def from_config(cls, cfg) -> TcpUnits:
        return cls(cfg.units.max_tracked, cfg.listeners.max_tracked, close_wait_age=cfg.tcp_info.enabled)

    def needs(self) -> DumpNeed:
        # No extension bit for the id: the kernel sends INET_DIAG_CGROUP_ID with every full
        # socket (net/ipv4/inet_diag.c inet_diag_msg_attrs_fill, CONFIG_SOCK_CGROUP_DATA).
        if self.close_wait_age:  # the tcp_info feature asks for the same extension
            return DumpNeed(socket.IPPROTO_TCP, ext=tcpinfo.INFO_EXT,
                            attributes=(INET_DIAG_CGROUP_ID, tcpinfo.INET_DIAG_INFO))
        return DumpNeed(socket.IPPROTO_TCP, attributes=(INET_DIAG_CGROUP_ID,))

    def fold(self, ctx: PollContext) -> Fold:
        return _UnitsFold(self)

    def result(self, keys: np.ndarray, key_row: np.ndarray, counts: np.ndarray, queues: np.ndarray,
               listen: list[tuple[np.ndarray, ...]], ages: np.ndarray | None = None) -> UnitsResult:
        ids = np.zeros(len(key_row), np.uint64)
        ids[key_row] = keys  # id of each row; row 0 is id 0
        live = counts.sum(axis=1) > 0  # rows seeded from the last poll may have no socket now
        live[0] = True
        rows = np.flatnonzero(live)
        ids, counts, queues = ids[rows], counts[rows], queues[rows]
        ages = None if ages is None else ages[rows]
        self.seen = np.sort(ids)
        names = self.cgroups.labels(ids[ids != 0].tolist())
        label_of = [NONE if i == 0 else names[i] for i in ids.tolist()]
        per: dict[str, np.ndarray] = {}  # label -> counts (NSTATES) + recv + send
        age: dict[str, int] = {}  # label -> oldest CLOSE-WAIT (ms)
        for row, label in enumerate(label_of):
            figures = np.concatenate((counts[row, :NSTATES], queues[row]))
            have = per.get(label)
            per[label] = figures if have is None else have + figures
            if ages is not None:
                age[label] = max(age.get(label, 0), int(ages[row]))
        none = per.pop(NONE, np.zeros(NSTATES + 2, np.int64))
        ranked = sorted(per, key=lambda u: (-int(per[u][:NSTATES].sum()), u))
        tracked = sorted(ranked[:self.max_tracked])
        rest = np.zeros(NSTATES + 2, np.int64)
        for u in ranked[self.max_tracked:]:
            rest += per[u]
        oldest = None
        if ages is not None:
            age[OTHER] = max((age.get(u, 0) for u in ranked[self.max_tracked:]), default=0)

            def oldest(u: str) -> float:
                return age.get(u, 0) / 1000

        units = tuple(_row(u, f, oldest) for u, f in ((u, per[u]) for u in tracked)) + (
            _row(NONE, none, oldest), _row(OTHER, rest, oldest))
        return UnitsResult(units, self._listeners(listen, ids, key_row, names),
                           max(0, len(ranked) - self.max_tracked), self.cgroups.walks, self.cgroups.walk_errors)

    def _listeners(self, listen: list[tuple[np.ndarray, ...]], ids: np.ndarray, key_row: np.ndarray,
                   names: dict[int, str]) -> tuple[tuple[str, int, str], ...]:
        if not listen:
            return ()
        family, src, port, cg = (np.concatenate(c) for c in zip(*listen))
        groups: dict[tuple[int, int, bytes], set[str]] = {}
        for fam, raw, p, i in zip(family.tolist(), src, port.tolist(), cg.tolist()):
            groups.setdefault((p, fam, raw.tobytes()), set()).add(NONE if i == 0 else names.get(i, UNKNOWN))
        out: list[tuple[str, int, str]] = []
        for (p, fam, raw) in sorted(groups)[:self.max_listeners]:  # the TCP feature's listener order and cap
            address = format_address(fam, raw)
            out.extend((address, p, u) for u in sorted(groups[(p, fam, raw)]))
        return tuple(out[:self.max_listeners])  # one series per (listener, unit): at most the cap

    def samples(self, result: UnitsResult, out: Samples) -> None:
        out.declare(SOCKETS)
        for row in result.units:
            for state, n in zip(STATES, row.counts):
                out.add(SOCKETS, (row.unit, state), n)
        out.declare(RECEIVE)
        for row in result.units:
            out.add(RECEIVE, (row.unit,), row.receive_bytes)
        out.declare(SEND)
        for row in result.units:
            out.add(SEND, (row.unit,), row.send_bytes)
        if result.units and result.units[0].oldest_close_wait is not None:
            out.declare(CLOSE_WAIT_AGE)
            for row in result.units:
                out.add(CLOSE_WAIT_AGE, (row.unit,), row.oldest_close_wait or 0.0)
        out.declare(LISTEN_UNIT)
        for address, port, unit in result.listeners:
            out.add(LISTEN_UNIT, (address, str(port), unit), 1)
        out.add(FOLDED, (), result.folded)
        out.add(WALKS, (), result.cgroup_walks)
        out.add(WALK_ERRORS, (), result.cgroup_walk_errors)

    def max_series(self) -> int:
        per_unit = NSTATES + 2 + (1 if self.close_wait_age else 0)
        return (self.max_tracked + 2) * per_unit + self.max_listeners + 3  # + none, other; folded, walks, errors

    def max_peak_series(self) -> int:
        return (self.max_tracked + 2) * (NSTATES + (1 if self.close_wait_age else 0))


def _row(unit: str, figures: np.ndarray, oldest=None) -> UnitRow:
    return UnitRow(unit, tuple(int(x) for x in figures[:NSTATES]), int(figures[NSTATES]), int(figures[NSTATES + 1]),
                   None if oldest is None else oldest(unit))


# --- `sockscope snapshot`: the unit of each listener and of each port's CLOSE-WAIT sockets ---

@dataclass(frozen=True, slots=True)
class UnitTables:
    """One dump's units for a person: every listener's (address, port) -> its units (sorted),
    and every local port with CLOSE-WAIT sockets -> (unit, sockets), most first."""

    listeners: dict[tuple[str, int], tuple[str, ...]]
    close_wait: dict[int, tuple[tuple[str, int], ...]]


class _SnapshotFold(Fold):
    def __init__(self, feature: SnapshotUnits) -> None:
        self.f = feature
        self.listen: list[tuple[np.ndarray, ...]] = []  # family, src, sport, id
        self.waits: list[tuple[np.ndarray, np.ndarray]] = []  # sport, id of CLOSE-WAIT sockets

    def add(self, batch: Batch) -> None:
        if not len(batch):
            return
        state = batch.state
        listen = np.flatnonzero(state == LISTEN)
        waits = np.flatnonzero(state == CLOSE_WAIT)
        if not len(listen) and not len(waits):
            return
        ids = cgroup_ids(batch)
        if len(listen):
            self.listen.append((batch.family[listen], batch.addresses("src", listen), batch.sport[listen],
                                ids[listen]))
        if len(waits):
            self.waits.append((batch.sport[waits], ids[waits]))

    def finish(self, stats: DumpStats) -> UnitTables:
        known = [i for part in self.listen for i in part[3].tolist()]
        known += [i for part in self.waits for i in part[1].tolist()]
        names = self.f.cgroups.labels(i for i in set(known) if i)

        def label(i: int) -> str:
            return NONE if i == 0 else names.get(i, UNKNOWN)

        listeners: dict[tuple[str, int], set[str]] = {}
        for family, src, port, ids in self.listen:
            for fam, raw, p, i in zip(family.tolist(), src, port.tolist(), ids.tolist()):
                listeners.setdefault((format_address(fam, raw.tobytes()), p), set()).add(label(i))
        close_wait: dict[int, dict[str, int]] = {}
        if self.waits:
            port = np.concatenate([p for p, _ in self.waits])
            ids = np.concatenate([i for _, i in self.waits])
            pairs, counts = np.unique(np.stack((port.astype(np.uint64), ids)), axis=1, return_counts=True)
            for (p, i), n in zip(pairs.T.tolist(), counts.tolist()):
                per = close_wait.setdefault(int(p), {})
                per[label(i)] = per.get(label(i), 0) + n
        return UnitTables({k: tuple(sorted(v)) for k, v in listeners.items()},
                          {p: tuple(sorted(per.items(), key=lambda kv: (-kv[1], kv[0])))
                           for p, per in close_wait.items()})


class SnapshotUnits(Feature):
    """The units fold for `sockscope snapshot` (Survey.results["units"]): no privilege
    needed, the cgroup id comes with every full socket of the snapshot's one dump."""

    name = "units"

    def __init__(self, cgroups: CgroupMap | None = None) -> None:
        self.cgroups = cgroups if cgroups is not None else CgroupMap()

    def needs(self) -> DumpNeed:
        return DumpNeed(socket.IPPROTO_TCP, attributes=(INET_DIAG_CGROUP_ID,))

    def fold(self, ctx: PollContext) -> Fold:
        return _SnapshotFold(self)
