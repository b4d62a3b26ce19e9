"""What `sockscope snapshot` reads: one dump folded into per-port, per-peer and per-inode
tables, column-wise with numpy (no Python object per socket).

The daemon's Accumulator keeps only what its series need (ports capped by configuration);
a person needs more from one dump: every port's figures (so the busiest remote ports can be
shown without configuring them), CLOSE-WAIT and TIME-WAIT peers, and the socket inodes of
the ports shown, to name the processes holding them. So `Tally` is the sink of one dump
(`Reader.poll`), `Survey` the frozen result. Memory is bounded by the port space and, for
one dump at a time, by the table (peers and inodes: 24 and 9 bytes per socket, numpy);
a Survey keeps per-port rows of the ports that had sockets and one row per distinct peer.

Filters: a state mask goes to the kernel (a dump only carries the states asked for, which is
what makes `--state close-wait` cheap on a large table); ports are filtered here, a socket
matching when its local or remote port is one of them (`ss '( sport = :P or dport = :P )'`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .aggregate import Accumulator, Rules
from .batch import Batch, format_address
from .features.base import DumpStats, Feature, Fold, PollContext
from .netlink import ALL_STATES, Reader
from .snapshot import FAMILIES, Listener
from .states import COUNTED, NSTATES, STATES, TcpState
from .states import SLOT as _SLOT
from .states import UNKNOWN_SLOT as _UNKNOWN

LISTEN_SLOT = TcpState.LISTEN.slot
CLOSE_WAIT_SLOT = TcpState.CLOSE_WAIT.slot
TIME_WAIT_SLOT = TcpState.TIME_WAIT.slot
# Queue slots per port, as aggregate.py: receive/send sums, maxima, non-empty counts.
QUEUE_FIELDS = ("receive_bytes", "send_bytes", "receive_max_bytes", "send_max_bytes",
                "receive_backlogged", "send_backlogged")
_RSUM, _SSUM, _RMAX, _SMAX, _RN, _SN = range(6)


def _bits(*states: int) -> int:
    return sum(1 << s for s in states)


# ss(8) STATE-FILTER names -> kernel state bit mask (include/net/tcp_states.h numbers;
# syn-recv includes TCP_NEW_SYN_RECV, 12, the request sockets `ss` also shows as SYN-RECV).
SS_STATES: dict[str, int] = {
    s.ss: _bits(s, TcpState.NEW_SYN_RECV) if s is TcpState.SYN_RECV else _bits(s) for s in COUNTED
}
# ss's groups, same definitions as ss.c.
_CONNECTED = ALL_STATES & ~(SS_STATES["listening"] | SS_STATES["closed"])
STATE_GROUPS: dict[str, int] = {
    "all": ALL_STATES,
    "connected": _CONNECTED,
    "synchronized": _CONNECTED & ~SS_STATES["syn-sent"],
    "bucket": SS_STATES["syn-recv"] | SS_STATES["time-wait"],
    "big": ALL_STATES & ~(SS_STATES["syn-recv"] | SS_STATES["time-wait"]),
}
# Also accepted: sockscope's own label values (close_wait) and `listen`, `close`.
_ALIASES: dict[str, str] = {"listen": "listening", "close": "closed"}
_ALIASES |= {s.label: s.ss for s in COUNTED if s.label not in ("listen", "close")}
STATE_FILTERS: tuple[str, ...] = (*SS_STATES, *STATE_GROUPS)
# The ss name of each STATES entry (label value), for flags and sort keys.
SS_NAME: dict[str, str] = {s: _ALIASES.get(s, s) for s in STATES}


def state_mask(name: str) -> int:
    """Kernel state mask of an ss state or group name (or a sockscope label value).
    Raises ValueError."""
    name = _ALIASES.get(name, name)
    if name in SS_STATES:
        return SS_STATES[name]
    if name in STATE_GROUPS:
        return STATE_GROUPS[name]
    raise ValueError(f"{name!r} is not a TCP state (one of {', '.join(STATE_FILTERS)})")


@dataclass(frozen=True, slots=True)
class Filter:
    ports: frozenset[int] = frozenset()  # empty: every port
    states: int = ALL_STATES  # kernel state bit mask

    @classmethod
    def of(cls, ports: Iterable[int] = (), states: Iterable[str] = ()) -> Filter:
        mask = 0
        for name in states:
            mask |= state_mask(name)
        # Request sockets (TCP_NEW_SYN_RECV) go with SYN-RECV: checked on 6.x, a dump
        # asking for either bit returns them, reported as state 3.
        if mask & _bits(3):
            mask |= _bits(12)
        if not mask or mask & ALL_STATES == ALL_STATES:
            mask = ALL_STATES
        return cls(frozenset(ports), mask)

    def __bool__(self) -> bool:
        return bool(self.ports) or self.states != ALL_STATES


# --- frozen results --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortRows:
    """One side's figures for every port that had a socket: `ports` ascending and
    `counts[i]` the per-state counts (STATES order) of ports[i]; queue figures
    (QUEUE_FIELDS) only for the ports with a non-empty queue, `queue_ports` ascending."""

    ports: np.ndarray  # int64, sorted
    counts: np.ndarray  # (len(ports), NSTATES) int32
    queue_ports: np.ndarray  # int64, sorted
    queues: np.ndarray  # (len(queue_ports), 6) int64

    @staticmethod
    def _find(table: np.ndarray, want: np.ndarray) -> np.ndarray:
        if not len(table):
            return np.full(len(want), -1)
        at = np.minimum(np.searchsorted(table, want), len(table) - 1)
        return np.where(table[at] == want, at, -1)

    def index(self, ports: Iterable[int]) -> np.ndarray:
        """Row index of each port, -1 where the port had no socket."""
        return self._find(self.ports, np.asarray(list(ports), np.int64))

    def rows(self, ports: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(counts, queues) of the given ports, zeros for a port without sockets."""
        want = np.asarray(list(ports), np.int64)
        counts = np.zeros((len(want), NSTATES), np.int64)
        queues = np.zeros((len(want), 6), np.int64)
        at = self._find(self.ports, want)
        counts[at >= 0] = self.counts[at[at >= 0]]
        at = self._find(self.queue_ports, want)
        queues[at >= 0] = self.queues[at[at >= 0]]
        return counts, queues

    def rest(self, ports: Iterable[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """(counts, queues, number of ports) of every port NOT in `ports`."""
        want = np.asarray(list(ports), np.int64)
        keep = ~np.isin(self.ports, want)
        counts = self.counts[keep].sum(axis=0, dtype=np.int64)
        q = self.queues[~np.isin(self.queue_ports, want)]
        queues = np.zeros(6, np.int64)
        if len(q):
            queues[[_RSUM, _SSUM, _RN, _SN]] = q[:, [_RSUM, _SSUM, _RN, _SN]].sum(axis=0)
            queues[[_RMAX, _SMAX]] = q[:, [_RMAX, _SMAX]].max(axis=0)
        return counts, queues, int(keep.sum())


@dataclass(frozen=True, slots=True)
class PeerCounts:
    """Sockets of one state per peer address: `keys` rows (family, high, low 64 bits of the
    address, big-endian), sorted; `counts` aligned."""

    keys: np.ndarray  # (k, 3) uint64
    counts: np.ndarray  # (k,) int64

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def top(self, n: int) -> list[tuple[tuple[int, int, int], int]]:
        """The n peers with the most sockets (ties: address order), as (key, count)."""
        order = np.lexsort((self.keys[:, 2], self.keys[:, 1], self.keys[:, 0], -self.counts))[:n]
        return [(tuple(self.keys[i].tolist()), int(self.counts[i])) for i in order]

    def count(self, key: tuple[int, int, int]) -> int:
        hit = np.flatnonzero((self.keys == np.asarray(key, np.uint64)).all(axis=1))
        return int(self.counts[hit[0]]) if len(hit) else 0


def peer_address(key: tuple[int, int, int]) -> tuple[str, str]:
    """(family name, address text) of a PeerCounts key."""
    family, high, low = key
    raw = high.to_bytes(8, "big") + low.to_bytes(8, "big")
    return ("ipv4" if family == socket.AF_INET else "ipv6"), format_address(family, raw)


@dataclass(frozen=True, slots=True)
class SocketIndex:
    """inode, local port, remote port and state slot of every filtered socket with an inode
    (TIME-WAIT and not yet accepted sockets have none), for naming their processes."""

    inode: np.ndarray  # uint32
    sport: np.ndarray  # uint16
    dport: np.ndarray  # uint16
    slot: np.ndarray  # uint8, index into STATES


@dataclass(frozen=True, slots=True)
class Survey:
    timestamp: float  # wall clock at the start of the dump
    duration: float  # seconds: dump + folding
    families: tuple[str, ...]
    states: dict[tuple[str, str], int]  # (family, state) -> count, zero-filled
    local: PortRows
    remote: PortRows
    # Client-side sockets per remote port (their local port does not listen), aligned with
    # remote.ports: what makes a remote port worth a row of its own.
    remote_client: np.ndarray
    listening: tuple[int, ...]  # ports with a LISTEN socket, ascending
    listeners: tuple[Listener, ...]
    folded_listeners: int
    listener_inodes: dict[tuple[str, int], frozenset[int]]  # (address, port) -> inodes
    close_wait_peers: PeerCounts
    time_wait_peers: PeerCounts
    filter: Filter = Filter()
    dump_interrupted: int = 0
    unknown_states: int = 0  # sockets in a state this build does not know (not counted)
    sockets_index: SocketIndex | None = field(default=None, compare=False)
    # Results of other features' folds of the same dump, by feature name (take(also=)):
    # `tcp_info` (features.tcp_info.PortTables) when tcp_info.enabled.
    results: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def sockets(self) -> int:
        return sum(self.states.values())

    def totals(self) -> np.ndarray:
        out = np.zeros(NSTATES, np.int64)
        for (_fam, state), n in self.states.items():
            out[STATES.index(state)] += n
        return out

    def without_index(self) -> Survey:
        """This Survey without its per-socket index (what a watch loop keeps)."""
        return replace(self, sockets_index=None)


# --- the sink of one dump ----------------------------------------------------------------


class Tally:
    """Folds the batches of one dump attempt (pass `add` as the Reader.poll sink)."""

    def __init__(self, flt: Filter = Filter(), *, index_sockets: bool = True):
        self.filter = flt
        self.index_sockets = index_sockets
        self.fam = np.zeros(32, np.int64)  # (family is IPv6) << 4 | slot
        self.local = np.zeros(65536 << 4, np.int32)  # port << 4 | slot; calloc'd, lazy pages
        self.remote = np.zeros(65536 << 4, np.int32)
        self.local_q = np.zeros((6, 65536), np.int64)
        self.remote_q = np.zeros((6, 65536), np.int64)
        self.client = np.zeros(65536, np.int64)  # client-side sockets by remote port
        self.listening = np.zeros(65536, bool)
        self.listen_rows: list[tuple] = []
        self.peer_parts: list[np.ndarray] = []  # (k, 4) uint64: slot, family, high, low
        self.index_parts: list[tuple[np.ndarray, ...]] = []
        self.unknown = 0
        self.other_families = 0

    def add(self, batch: Batch) -> None:
        n = len(batch)
        if not n:
            return
        fam, state, sport, dport = batch.family, batch.state, batch.sport, batch.dport
        slot = _SLOT[state]
        # Every listening port is noted, also when the filter leaves LISTEN sockets out
        # (take() always asks the kernel for them; they are few): see `client` below.
        self.listening[sport[slot == LISTEN_SLOT]] = True
        keep = None
        if self.filter.states != ALL_STATES:
            # The kernel filtered the dump already; this keeps hand-fed batches honest.
            keep = ((np.uint32(1) << state.astype(np.uint32)) & self.filter.states) != 0
        if self.filter.ports:
            wanted = np.fromiter(self.filter.ports, np.uint16)
            on_port = np.isin(sport, wanted) | np.isin(dport, wanted)
            keep = on_port if keep is None else keep & on_port
        unknown = slot == _UNKNOWN
        if unknown.any():
            self.unknown += int((unknown if keep is None else unknown & keep).sum())
            keep = ~unknown if keep is None else keep & ~unknown
        is6 = fam == socket.AF_INET6
        odd = ~(is6 | (fam == socket.AF_INET))
        if odd.any():  # never seen in a TCP dump; not counted rather than miscounted
            self.other_families += int(odd.sum())
            keep = ~odd if keep is None else keep & ~odd
        rows = np.arange(n) if keep is None else np.flatnonzero(keep)
        if keep is not None:
            if not len(rows):
                return
            fam, slot, sport, dport, is6 = fam[rows], slot[rows], sport[rows], dport[rows], is6[rows]
        slot_i = slot.astype(np.intp)
        self.fam += np.bincount((is6.astype(np.intp) << 4) | slot_i, minlength=32)
        sport_i = sport.astype(np.intp)
        dport_i = dport.astype(np.intp)
        ones = np.ones(len(rows), np.int32)  # int32 ones + intp keys: np.add.at's fast path
        np.add.at(self.local, (sport_i << 4) | slot_i, ones)
        np.add.at(self.remote, (dport_i << 4) | slot_i, ones)

        listen = slot == LISTEN_SLOT
        rq = batch.rqueue[rows]
        wq = batch.wqueue[rows]
        inode = batch.inode[rows] if self.index_sockets else None
        if listen.any():
            at = np.flatnonzero(listen)
            srcs = batch.addresses("src", rows[at])
            for j, i in enumerate(at.tolist()):
                self.listen_rows.append((
                    int(fam[i]), 10, int(sport[i]), 0, srcs[j].tobytes(), b"\0" * 16,
                    int(rq[i]), int(wq[i]), 0, int(inode[i]) if inode is not None else 0,
                ))
        # Listeners precede the connections in a dump (inet_diag walks the listening hash
        # first, per family), so a socket whose local port listens is a server's end; the
        # others are clients, and their remote ports are the services this host uses.
        # Only the choice of rows depends on this; no figure does.
        conn = ~listen
        client = conn & ~self.listening[sport_i]
        if client.any():
            np.add.at(self.client, dport_i[client], 1)
        queued = np.flatnonzero(((rq | wq) != 0) & conn)
        if len(queued):
            qrq = rq[queued].astype(np.int64)
            qwq = wq[queued].astype(np.int64)
            rn = (qrq != 0).astype(np.int64)
            sn = (qwq != 0).astype(np.int64)
            for qa, port in ((self.local_q, sport_i[queued]), (self.remote_q, dport_i[queued])):
                np.add.at(qa[_RSUM], port, qrq)
                np.add.at(qa[_SSUM], port, qwq)
                np.maximum.at(qa[_RMAX], port, qrq)
                np.maximum.at(qa[_SMAX], port, qwq)
                np.add.at(qa[_RN], port, rn)
                np.add.at(qa[_SN], port, sn)
        waits = np.flatnonzero((slot == CLOSE_WAIT_SLOT) | (slot == TIME_WAIT_SLOT))
        if len(waits):
            addr = np.ascontiguousarray(batch.addresses("dst", rows[waits])).view(">u8").astype(np.uint64)
            part = np.empty((len(waits), 4), np.uint64)
            part[:, 0] = slot[waits]
            part[:, 1] = fam[waits]
            part[:, 2:] = addr
            self.peer_parts.append(part)
        if inode is not None:
            held = np.flatnonzero(inode != 0)
            if len(held):
                self.index_parts.append((inode[held], sport[held], dport[held], slot[held]))

    def finish(self, rules: Rules, *, families: Iterable[str], timestamp: float,
               duration: float = 0.0, dump_interrupted: int = 0,
               results: dict[str, Any] | None = None) -> Survey:
        families = tuple(families)
        states = {}
        for f, name in enumerate(FAMILIES):
            if name in families:
                for i, state in enumerate(STATES):
                    states[(name, state)] = int(self.fam[(f << 4) | i])
        # Listeners through the daemon's own code: same grouping and fullest-member rule.
        acc = Accumulator()
        acc.add(Batch.from_records(self.listen_rows))
        snap = acc.finish(Rules(auto_listen=False, max_listeners=rules.max_listeners),
                          families=families, timestamp=timestamp, duration=0.0)
        inodes: dict[tuple[str, int], set[int]] = {}
        for fam, _st, port, _dp, src, _dst, _rq, _wq, _uid, ino in self.listen_rows:
            address = format_address(fam, src)
            members = inodes.setdefault((address, port), set())
            if ino:
                members.add(ino)
        remote = _port_rows(self.remote, self.remote_q)
        index = None
        if self.index_sockets:
            parts = self.index_parts or [(np.zeros(0, np.uint32), np.zeros(0, np.uint16),
                                          np.zeros(0, np.uint16), np.zeros(0, np.uint8))]
            index = SocketIndex(*(np.concatenate(col) for col in zip(*parts)))
        peers = _peer_counts(self.peer_parts)
        return Survey(
            timestamp=timestamp,
            duration=duration,
            families=families,
            states=states,
            local=_port_rows(self.local, self.local_q),
            remote=remote,
            remote_client=self.client[remote.ports],
            listening=tuple(np.flatnonzero(self.listening).tolist()),
            listeners=snap.listeners,
            folded_listeners=snap.folded_listeners,
            listener_inodes={k: frozenset(v) for k, v in inodes.items()},
            close_wait_peers=peers[CLOSE_WAIT_SLOT],
            time_wait_peers=peers[TIME_WAIT_SLOT],
            filter=self.filter,
            dump_interrupted=dump_interrupted,
            unknown_states=self.unknown,
            sockets_index=index,
            results=results or {},
        )


def _port_rows(counts: np.ndarray, queues: np.ndarray) -> PortRows:
    per_port = counts.reshape(65536, 16)[:, :NSTATES]
    ports = np.flatnonzero(per_port.any(axis=1))
    queued = np.flatnonzero(queues[_RN] | queues[_SN])
    return PortRows(ports.astype(np.int64), per_port[ports],
                    queued.astype(np.int64), np.ascontiguousarray(queues[:, queued].T))


def _peer_counts(parts: list[np.ndarray]) -> dict[int, PeerCounts]:
    empty = PeerCounts(np.zeros((0, 3), np.uint64), np.zeros(0, np.int64))
    out = {CLOSE_WAIT_SLOT: empty, TIME_WAIT_SLOT: empty}
    if not parts:
        return out
    rows = np.concatenate(parts)
    order = np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))
    rows = rows[order]
    new = np.ones(len(rows), bool)
    new[1:] = (rows[1:] != rows[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, len(rows)))
    keys = rows[starts]
    for slot in out:
        mine = keys[:, 0] == slot
        out[slot] = PeerCounts(np.ascontiguousarray(keys[mine, 1:]), counts[mine].astype(np.int64))
    return out


def take(
    reader: Reader,
    flt: Filter,
    rules: Rules,
    *,
    index_sockets: bool = True,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    also: Sequence[Feature] = (),
) -> Survey:
    """One dump of `reader` (retried like the daemon's) folded into a Survey, and by the
    folds of the features `also` (their results in Survey.results; the reader must ask
    for what they need). Raises NetlinkError."""
    started = monotonic()
    timestamp = clock()
    attempt: list[Tally] = []
    folds: dict[str, Fold] = {}
    ctx = PollContext(timestamp, started)

    def start() -> Callable:
        tally = Tally(flt, index_sockets=index_sockets)  # an interrupted dump starts afresh
        attempt[:] = [tally]
        folds.clear()
        folds.update({f.name: fold for f in also if (fold := f.fold(ctx)) is not None})
        if not folds:
            return tally.add

        def sink(batch: Batch) -> None:
            tally.add(batch)
            # The features see the port filter's sockets and every listener (take() asks
            # the kernel for them whatever --state says; a fold needs them to know which
            # ports listen); the kernel applied the state filter.
            if flt.ports and len(batch):
                wanted = np.fromiter(flt.ports, np.uint16)
                batch = batch.take(np.isin(batch.sport, wanted) | np.isin(batch.dport, wanted)
                                   | (batch.state == TcpState.LISTEN))
            for fold in folds.values():
                fold.add(batch)
        return sink

    stats = reader.poll(start, states=flt.states | SS_STATES["listening"])
    done = DumpStats(stats.families, stats.messages, stats.retries, stats.interrupted)
    return attempt[0].finish(rules, families=stats.families, timestamp=timestamp,
                             duration=monotonic() - started,
                             dump_interrupted=stats.interrupted,
                             results={name: fold.finish(done) for name, fold in folds.items()})
