"""Process owners of the tracked listeners and of each tracked port's CLOSE-WAIT sockets.

sock_diag gives a socket's inode, never its process: the only way there is a walk of every
process's /proc/PID/fd (owners.find_owners, what `ss -p` does). That walk costs ~6-7 us per
socket fd of the host, so it runs at most every `owners.interval` polls, at most
`owners.max_scan_time` of it per poll (a longer one goes on at the next polls), and only looks for
the inodes this feature needs (the tracked listeners' and the CLOSE-WAIT sockets of the
tracked local ports); between scans the last scan's inode -> (process, unit) pairs are
joined with each poll's dump (a socket opened since has no known owner until the next scan).

Labels carry the process name (/proc/PID/comm, as `ss -p` shows it) and its unit
(/proc/PID/cgroup -> cgroups.unit_label), never the pid: a restarted process keeps its
series. Other users' fd tables need CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE; without them
the scan is partial, sockscope_owners_scan_complete says 0 and it is logged once.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..aggregate import Rules
from ..batch import format_address
from ..catalogue import GraphitePath, Metric, Samples
from ..cgroups import proc_cgroup_path, unit_label
from ..health import Problems
from ..owners import OwnerScan, ScanRound, find_owners
from ..states import TcpState
from .base import DumpNeed, DumpStats, Feature, Fold, PollContext

__all__ = ["ProcessOwners", "SharedScan", "Wanted", "Known", "METRICS", "UNKNOWN_UNIT"]

log = logging.getLogger(__name__)

UNKNOWN_UNIT = "unknown"  # /proc/PID/cgroup unreadable, or no cgroup2 line (a v1-only host)

_LISTEN, _CLOSE_WAIT = int(TcpState.LISTEN), int(TcpState.CLOSE_WAIT)

LISTEN_OWNER = Metric(
    "sockscope_tcp_listen_owner_info", "gauge",
    "1 for each process name and unit holding a tracked listening address's sockets, as of the last "
    "/proc scan (ss -ltnp; the pid is not a label).", ("address", "port", "process", "unit"),
    GraphitePath(("tcp", "listen", "{address}_{port}", "owner", "{unit}", "{process}")))
CLOSE_WAIT_OWNER = Metric(
    "sockscope_tcp_local_port_close_wait_owner_sockets", "gauge",
    "CLOSE-WAIT sockets of a tracked local port held by the process name and unit holding most of them "
    "(ss -tnp state close-wait); one series per port that has owned CLOSE-WAIT sockets.",
    ("port", "process", "unit"),
    GraphitePath(("tcp", "local_port", "{port}", "close_wait_owner", "{unit}", "{process}")))
SCAN_COMPLETE = Metric(
    "sockscope_owners_scan_complete", "gauge",
    "1 if the last /proc scan read every process's fd table, 0 if some were refused or may be hidden "
    "(needs CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE).", (), GraphitePath(("owners", "scan_complete")))
SCAN_SECONDS = Metric(
    "sockscope_owners_scan_duration_seconds", "gauge",
    "Seconds the last /proc scan for socket owners took (it runs every owners.interval polls).", (),
    GraphitePath(("owners", "scan_duration_seconds")))
SCANS = Metric("sockscope_owners_scans", "counter", "/proc scans for socket owners since the feature started.",
               (), GraphitePath(("owners", "scans")))
UNRESOLVED = Metric(
    "sockscope_owners_unresolved_listeners", "gauge",
    "Tracked listening addresses with no known holder: opened since the last scan, held where the scan "
    "could not look, or in a process that is gone.", (), GraphitePath(("owners", "unresolved_listeners")))
METRICS = (LISTEN_OWNER, CLOSE_WAIT_OWNER, SCAN_COMPLETE, SCAN_SECONDS, SCANS, UNRESOLVED)


@dataclass(frozen=True, slots=True)
class Wanted:
    """What one dump needs owners for: the tracked listening addresses (in the TCP
    feature's order and cap) with their member sockets' inodes, and the CLOSE-WAIT sockets
    of the tracked local ports (port and inode columns)."""

    listeners: tuple[tuple[str, int, np.ndarray], ...]  # (address, port, member inodes)
    close_wait_port: np.ndarray  # int64
    close_wait_inode: np.ndarray  # int64

    def inodes(self) -> np.ndarray:
        parts = [inodes for _, _, inodes in self.listeners] + [self.close_wait_inode]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True, slots=True)
class Known:
    """One scan's answer: each found inode with the (process, unit) label index of each
    holder, sorted by inode then label, each pair once."""

    inode: np.ndarray  # int64
    label: np.ndarray  # int64, index into labels
    labels: tuple[tuple[str, str], ...]  # (process, unit)
    pids: tuple[tuple[int, ...], ...]  # per label: the pids seen (for logs and tests, not exported)
    complete: bool
    note: str | None
    seconds: float

    def labels_of(self, inodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in `inodes`, label) pairs for every holder of each inode."""
        lo = np.searchsorted(self.inode, inodes, "left")
        hi = np.searchsorted(self.inode, inodes, "right")
        n = hi - lo
        rows = np.repeat(np.arange(len(inodes)), n)
        starts = np.repeat(lo - np.cumsum(n) + n, n)  # each row's pairs, consecutive
        at = np.arange(len(rows)) + starts
        return rows, self.label[at]


def read_unit(proc_root: str, pid: int) -> str:
    """The unit label of a process from /proc/PID/cgroup; UNKNOWN_UNIT when unreadable."""
    try:
        with open(f"{proc_root}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            path = proc_cgroup_path(f.read())
    except OSError:
        return UNKNOWN_UNIT
    return UNKNOWN_UNIT if path is None else unit_label(path)


def known_from_scan(scan: OwnerScan, unit_of: Callable[[int], str]) -> Known:
    """A scan's holders as inode -> label pairs; processes with the same name and unit
    share a label (pre-fork workers, SO_REUSEPORT members)."""
    index: dict[tuple[str, str], int] = {}
    pids: dict[int, list[int]] = {}
    parts_inode, parts_label = [], []
    for owner in sorted(scan.held, key=lambda o: o.pid):
        k = index.setdefault((owner.name, unit_of(owner.pid)), len(index))
        pids.setdefault(k, []).append(owner.pid)
        inodes = scan.held[owner]
        parts_inode.append(inodes.astype(np.int64))
        parts_label.append(np.full(len(inodes), k, np.int64))
    if parts_inode:
        pairs = np.unique((np.concatenate(parts_inode) << 20) | np.concatenate(parts_label))
    else:
        pairs = np.zeros(0, np.int64)
    # inodes are u32 (sock_diag's idiag_inode); labels are fewer than 2**20 (one per process at most)
    return Known(pairs >> 20, pairs & 0xFFFFF, tuple(index), tuple(tuple(pids[k]) for k in range(len(index))),
                 scan.complete, scan.note, scan.seconds)


class SharedScan:
    """One /proc scan per round for every caller: a sweep's lanes (one owners feature per
    namespace) each ask for their own inodes, and socket inodes are unique across network
    namespaces, so the first caller of a round scans for every socket inode of the host
    (the same walk: a readlink per fd whatever is wanted) and the others are answered from
    it. `next_round()` (the sweep, once its lanes are polled) drops the answer: ~8 bytes
    per socket fd of the host, held only during a sweep."""

    def __init__(self, scan: Callable[..., OwnerScan] = find_owners) -> None:
        self._scan = scan
        self._have: tuple[str, OwnerScan] | None = None
        self.scans = 0

    def next_round(self) -> None:
        self._have = None

    def __call__(self, inodes: np.ndarray, proc_root: str = "/proc", *, caps: int | None = None) -> OwnerScan:
        if self._have is None or self._have[0] != proc_root:
            self._have = (proc_root, self._scan(None, proc_root, caps=caps))
            self.scans += 1
        full = self._have[1]
        wanted = np.asarray(inodes, np.int64)
        held = {}
        for owner, mine in full.held.items():
            mine = mine[np.isin(mine, wanted)]
            if len(mine):
                held[owner] = mine
        return replace(full, held=held)


@dataclass(frozen=True, slots=True)
class Answer:
    listeners: tuple[tuple[str, int, tuple[tuple[str, str], ...]], ...]  # (address, port, labels)
    close_wait: tuple[tuple[int, tuple[str, str], int], ...]  # (port, label, sockets)
    unresolved: int


def answer(wanted: Wanted, known: Known, max_per_listener: int) -> Answer:
    """Join one dump's wanted sockets with a scan's holders."""
    listeners = []
    unresolved = 0
    for address, port, inodes in wanted.listeners:
        _, labels = known.labels_of(inodes)
        names = sorted({known.labels[k] for k in labels.tolist()})
        if not names:
            unresolved += 1
        listeners.append((address, port, tuple(names[:max_per_listener])))
    rows, labels = known.labels_of(wanted.close_wait_inode)
    close_wait = []
    if len(rows):
        keys, counts = np.unique((wanted.close_wait_port[rows] << 32) | labels, return_counts=True)
        best: dict[int, tuple[int, tuple[str, str]]] = {}
        for key, n in zip(keys.tolist(), counts.tolist()):
            port, label = key >> 32, known.labels[key & 0xFFFFFFFF]
            have = best.get(port)
            # most sockets; a tie goes to the first label by name, so the series is stable
            if have is None or n > have[0] or (n == have[0] and label < have[1]):
                best[port] = (n, label)
        close_wait = [(port, label, n) for port, (n, label) in sorted(best.items())]
    return Answer(tuple(listeners), tuple(close_wait), unresolved)


class _OwnersFold(Fold):
    """Collects the LISTEN sockets (address, port, inode) and the CLOSE-WAIT sockets (port,
    inode) of one dump; `finish` keeps the tracked ones."""

    def __init__(self, rules: Rules) -> None:
        self._rules = rules
        self._listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self._cw_port: list[np.ndarray] = []
        self._cw_inode: list[np.ndarray] = []

    def add(self, batch) -> None:
        if not len(batch):
            return
        state = batch.state
        cw = np.flatnonzero(state == _CLOSE_WAIT)
        if len(cw):
            self._cw_port.append(batch.sport[cw].astype(np.int64))
            self._cw_inode.append(batch.inode[cw].astype(np.int64))
        listen = np.flatnonzero(state == _LISTEN)
        if len(listen):
            family, sport, inode = batch.family, batch.sport, batch.inode
            for i in listen.tolist():
                key = (int(family[i]), batch.src(i), int(sport[i]))
                self._listeners.setdefault(key, []).append(int(inode[i]))

    def finish(self, stats: DumpStats) -> Wanted:
        rules = self._rules
        # The TCP feature's listener series: sorted by (port, family, address), the first
        # listeners.max_tracked (aggregate.Accumulator._listeners).
        ordered = sorted(self._listeners.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1]))
        listeners = tuple((format_address(fam, src), port, np.asarray(inodes, np.int64))
                          for (fam, src, port), inodes in ordered[:rules.max_listeners])
        tracked, _ = rules.tracked_local({port for (_, _, port) in self._listeners})
        port = np.concatenate(self._cw_port) if self._cw_port else np.zeros(0, np.int64)
        inode = np.concatenate(self._cw_inode) if self._cw_inode else np.zeros(0, np.int64)
        keep = np.isin(port, np.asarray(tracked, np.int64)) & (inode != 0)
        return Wanted(listeners, port[keep], inode[keep])


class ProcessOwners(Feature):
    """Owners of listeners and CLOSE-WAIT sockets. The /proc scan runs in `samples()`,
    after the dump, so that the poller times it as this feature's source
    (sockscope_source_duration_seconds{source="owners"}) and catches its failure there."""

    name = "owners"
    metrics = METRICS

    def __init__(self, rules: Rules, *, interval: int = 1, max_per_listener: int = 4,
                 max_scan_time: float = math.inf, proc_root: str = "/proc",
                 scan: Callable[..., OwnerScan] = find_owners, caps: int | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.rules = rules
        self.interval = interval
        # Seconds of /proc reading per poll at most: a longer scan (many fds on the host) is
        # read in steps over the next polls (owners.ScanRound), the last answer standing
        # meanwhile, so that it never holds the poll up for longer.
        self.max_scan_time = max_scan_time
        self._round: ScanRound | None = None
        self.max_per_listener = max_per_listener
        self.proc_root = proc_root
        self._scan = scan
        self._caps = caps
        self._monotonic = monotonic
        self._known: Known | None = None
        self._since_scan = 0  # polls since the last scan
        self.scans = 0
        self._partial = Problems(log, "process owner scan", level=logging.WARNING,
                                 recovery="process owner scan: complete again after {n} partial scans")

    @classmethod
    def from_config(cls, cfg) -> ProcessOwners:
        return cls(Rules.from_config(cfg), interval=cfg.owners.interval,
                   max_per_listener=cfg.owners.max_per_listener, max_scan_time=cfg.owners.max_scan_time)

    def needs(self) -> DumpNeed:
        return DumpNeed(socket.IPPROTO_TCP, states=(1 << _LISTEN) | (1 << _CLOSE_WAIT))

    def fold(self, ctx: PollContext) -> Fold:
        return _OwnersFold(self.rules)

    def share_scan(self, shared: SharedScan) -> None:
        """Scan through `shared` (a sweep: one /proc walk per round for all its lanes)."""
        self._scan = shared

    def known(self, wanted: Wanted) -> Known:
        """The scan's answer for this poll: a new scan every `interval` polls (read in
        steps of at most max_scan_time per poll), else the last complete one."""
        self._since_scan += 1
        if self._round is None and (self._known is None or self._since_scan >= self.interval):
            if self._scan is find_owners:
                self._round = ScanRound(wanted.inodes(), self.proc_root, caps=self._caps,
                                        monotonic=self._monotonic)
            else:  # a sweep's shared scan (or a test's): one call
                started = self._monotonic()
                scan = self._scan(wanted.inodes(), self.proc_root, caps=self._caps)
                self._finished(scan, self._monotonic() - started)
        if self._round is not None:
            done = self._round.run(self.max_scan_time)
            if done is not None:
                self._round = None
                self._finished(done, done.seconds)
        if self._known is None:  # the first scan is still being read
            return Known(np.zeros(0, np.int64), np.zeros(0, np.int64), (), (), False,
                         "the first /proc scan is still being read", 0.0)
        return self._known

    def _finished(self, scan: OwnerScan, seconds: float) -> None:
        """A complete round (`seconds` of /proc reading): its answer stands until the next."""
        started = self._monotonic()
        known = known_from_scan(scan, lambda pid: read_unit(self.proc_root, pid))
        self._known = replace(known, seconds=seconds + self._monotonic() - started)  # the cgroup reads too
        self._since_scan = 0
        self.scans += 1
        if scan.complete:
            self._partial.ok()
        else:
            # one line per kind of problem, not per count of refused processes
            self._partial.failed("partial: " + re.sub(r"\b\d+ process(es)?\b", "some processes",
                                                      scan.note or "incomplete"))

    def samples(self, wanted: Wanted, out: Samples) -> None:
        known = self.known(wanted)
        got = answer(wanted, known, self.max_per_listener)
        out.declare(LISTEN_OWNER)
        for address, port, labels in got.listeners:
            for process, unit in labels:
                out.add(LISTEN_OWNER, (address, str(port), process, unit), 1)
        out.declare(CLOSE_WAIT_OWNER)
        for port, (process, unit), n in got.close_wait:
            out.add(CLOSE_WAIT_OWNER, (str(port), process, unit), n)
        out.add(SCAN_COMPLETE, (), 1 if known.complete else 0)
        out.add(SCAN_SECONDS, (), known.seconds)
        out.add(SCANS, (), self.scans)
        out.add(UNRESOLVED, (), got.unresolved)

    def max_series(self) -> int:
        r = self.rules
        return r.max_listeners * self.max_per_listener + r.max_local + 4
