"""Map socket inodes to the processes holding them, by walking /proc/PID/fd like `ss -p`.

sock_diag reports a socket's inode but not its owner; the only way to the owner is to
read every process's fd symlinks ("socket:[INODE]"). Other users' fd directories need
CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE; without them the scan is partial and says so
(`complete=False` plus a note) instead of guessing.
"""

from __future__ import annotations

import math
import os
import pwd
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sockscope.snapshot import STATES

CLOSE_WAIT_SLOT = STATES.index("close_wait")

CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
_NEEDED_CAPS = (1 << CAP_DAC_READ_SEARCH) | (1 << CAP_SYS_PTRACE)

PRIVILEGE_NOTE = "process owners need root (CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE)"

# A vanished process shows up as one of these mid-scan; it is skipped silently.
_GONE = (FileNotFoundError, ProcessLookupError, NotADirectoryError)


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    name: str  # /proc/PID/comm (at most 15 characters, as `ss -p` and `top` show it)
    user: str  # effective uid's user name, or the numeric uid if it has no passwd entry


@dataclass(frozen=True, slots=True)
class OwnerScan:
    held: dict[Owner, np.ndarray]  # process -> the wanted inodes it holds (int64)
    complete: bool  # every process's fd table was read
    note: str | None = None  # why the scan is incomplete
    scanned_at: float | None = None  # wall clock when the scan started
    seconds: float = 0.0  # what it took

    @property
    def owners(self) -> dict[int, tuple[Owner, ...]]:
        """inode -> holders sorted by pid; found inodes only."""
        out: dict[int, list[Owner]] = {}
        for owner in sorted(self.held, key=lambda o: o.pid):
            for inode in self.held[owner].tolist():
                out.setdefault(inode, []).append(owner)
        return {i: tuple(o) for i, o in out.items()}


@dataclass(frozen=True, slots=True)
class PortOwners:
    """Processes holding the sockets of the ports a report shows, from one /proc scan.

    local / remote: port -> ((Owner, sockets held), ...) over the sockets with that local
      (remote) port, most sockets first, then by pid; only ports asked for.
    listeners: (address, port) -> holders of any member socket (SO_REUSEPORT members and
      pre-fork children are merged), sorted by pid; () when none was found.
    close_wait: local port -> ((Owner, sockets), ...) over its CLOSE-WAIT sockets, every port.
    close_wait_owned: local port -> CLOSE-WAIT sockets with at least one known holder (the
      rest are still in an accept queue, inode 0, or held where the scan could not look).
    A socket shared by several processes counts once for each of them.
    """

    local: dict[int, tuple[tuple[Owner, int], ...]]
    remote: dict[int, tuple[tuple[Owner, int], ...]]
    listeners: dict[tuple[str, int], tuple[Owner, ...]]
    close_wait: dict[int, tuple[tuple[Owner, int], ...]]
    close_wait_owned: dict[int, int]
    complete: bool
    note: str | None = None
    scanned_at: float | None = None  # wall clock of the /proc scan these come from


def effective_capabilities(status_path: str = "/proc/self/status") -> int | None:
    """CapEff of this process as a bit mask, or None if it cannot be read."""
    try:
        with open(status_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def has_owner_privileges(caps: int | None = None) -> bool:
    """True if this process can read every process's fd table."""
    if caps is None:
        caps = effective_capabilities()
    if caps is None:
        return os.geteuid() == 0
    return caps & _NEEDED_CAPS == _NEEDED_CAPS


def _socket_inode(target: str) -> int | None:
    if target.startswith("socket:[") and target.endswith("]"):
        try:
            return int(target[8:-1])
        except ValueError:
            return None
    return None


def _read_owner(pid_dir: str, pid: int, users: dict[int, str]) -> Owner | None:
    """Owner for one process, None if it is gone."""
    name, uid = "?", None
    try:
        with open(f"{pid_dir}/comm", encoding="utf-8", errors="replace") as f:
            name = f.read().rstrip("\n")
        with open(f"{pid_dir}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = int(line.split()[2])  # real, effective, saved, fs: effective
                    break
    except _GONE:
        return None
    except (OSError, ValueError, IndexError):
        pass  # fd table was readable but comm/status odd: keep the pid, show "?"
    if uid is None:
        return Owner(pid, name, "?")
    user = users.get(uid)
    if user is None:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        users[uid] = user
    return Owner(pid, name, user)


def find_owners(inodes: Iterable[int] | np.ndarray | None, proc_root: str = "/proc", **seams: Any) -> OwnerScan:
    """Processes holding each wanted socket inode (`inodes` None: every socket inode): a
    ScanRound read in one go (`seams`: its keyword arguments)."""
    done = ScanRound(inodes, proc_root, **seams).run()
    assert done is not None
    return done


class ScanRound:
    """One scan of /proc for the processes holding the wanted socket inodes (None: every
    socket inode), readable in steps: run(budget) reads process after process until
    `budget` seconds have passed and returns None, the next call carrying on where it
    stopped; the call that reads the last process returns the OwnerScan. The processes are
    those listed when the round starts: one that exits before its turn is skipped, one
    started since is not read, as in a single pass.

    Every process is scanned (an inode can be held by several). A process's socket inodes
    are collected in a compact array and matched against the wanted ones with numpy, so
    memory stays at 8 bytes per socket fd of the host. `caps` overrides this process's CapEff
    (read from /proc/self/status, not from proc_root); `listdir`/`readlink` are seams for
    tests.
    """

    def __init__(
        self,
        inodes: Iterable[int] | np.ndarray | None,
        proc_root: str = "/proc",
        *,
        caps: int | None = None,
        listdir: Callable[[str], list[str]] = os.listdir,
        readlink: Callable[[str], str] = os.readlink,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc_root, self._caps = proc_root, caps
        self._listdir, self._readlink, self._monotonic = listdir, readlink, monotonic
        self._wanted: np.ndarray | None = None
        self._holders: dict[int, np.ndarray] = {}  # pid -> wanted inodes it holds
        self._denied = 0
        self._done: OwnerScan | None = None
        self._pids: Iterator[str] = iter(())
        self.scanned_at, started = clock(), monotonic()
        self.seconds = 0.0  # spent in run() so far
        if inodes is not None:
            wanted = np.unique(np.fromiter(inodes, np.int64) if not isinstance(inodes, np.ndarray)
                               else inodes.astype(np.int64))
            self._wanted = wanted[wanted != 0]
            if not len(self._wanted):
                self._done = OwnerScan({}, True, None, self.scanned_at)
                return
        try:
            entries = listdir(proc_root)
        except PermissionError:
            self._done = OwnerScan({}, False, f"{PRIVILEGE_NOTE}: {proc_root} could not be read",
                                   self.scanned_at, monotonic() - started)
            return
        self._pids = iter([e for e in entries if e.isdigit()])
        self.seconds = monotonic() - started

    def run(self, budget: float = math.inf) -> OwnerScan | None:
        if self._done is not None:
            return self._done
        started = self._monotonic()
        for entry in self._pids:
            self._read(entry)
            if self._monotonic() - started >= budget:
                self.seconds += self._monotonic() - started
                return None
        self._done = self._finish()
        self.seconds += self._monotonic() - started
        self._done = replace(self._done, seconds=self.seconds)
        return self._done

    def _read(self, entry: str) -> None:
        fd_dir = f"{self._proc_root}/{entry}/fd"
        try:
            fds = self._listdir(fd_dir)
        except PermissionError:
            self._denied += 1
            return
        except _GONE:
            return
        found = array("q")
        prefix = fd_dir + "/"
        for fd in fds:
            try:
                target = self._readlink(prefix + fd)
            except PermissionError:
                self._denied += 1
                return  # count the process once, and keep nothing half-read
            except _GONE:
                continue  # fd closed, or the whole process went away
            except OSError:
                continue
            # ~5 us per readlink: the scan's whole cost.
            if target.startswith("socket:["):
                inode = _socket_inode(target)
                if inode is not None:
                    found.append(inode)
        if found:
            mine = np.frombuffer(found, np.int64)
            mine = np.unique(mine if self._wanted is None else mine[np.isin(mine, self._wanted)])
            if len(mine):
                self._holders[int(entry)] = mine

    def _finish(self) -> OwnerScan:
        held: dict[Owner, np.ndarray] = {}
        users: dict[int, str] = {}
        for pid in sorted(self._holders):
            owner = _read_owner(f"{self._proc_root}/{pid}", pid, users)
            if owner is None:
                continue  # exited after its fds were read: it no longer holds anything
            held[owner] = self._holders[pid]
        note = None
        denied = self._denied
        if denied:
            noun = "process" if denied == 1 else "processes"
            if has_owner_privileges(self._caps):
                # Even root is refused by some (e.g. pid 1 of a container or sandbox).
                note = f"with root privileges, {denied} {noun} could not be read"
            else:
                note = f"{PRIVILEGE_NOTE}: {denied} {noun} could not be read"
        elif not has_owner_privileges(self._caps):
            # No error, but without the capabilities other users' processes may be hidden
            # (hidepid) rather than refused: the scan cannot claim to be complete.
            note = f"{PRIVILEGE_NOTE}: other users' processes may be hidden"
        return OwnerScan(held, note is None, note, self.scanned_at)


def port_owners(
    index,
    listener_inodes: Mapping[tuple[str, int], Iterable[int]],
    local_ports: Iterable[int],
    remote_ports: Iterable[int],
    proc_root: str = "/proc",
    *,
    scan: OwnerScan | None = None,
    **scan_options,
) -> tuple[PortOwners, OwnerScan]:
    """Owners of the sockets on the given ports, of the listeners and of every CLOSE-WAIT
    socket, with one /proc scan; also returns the scan.

    `index` is a survey.SocketIndex (numpy columns inode, sport, dport, slot of the sockets
    that have an inode); sockets are matched to their holders column-wise, so no Python
    object is made per socket. An earlier `scan` may be given instead of scanning again
    (`snapshot --watch` when a scan is expensive): sockets opened since have no known owner.
    `scan_options` go to find_owners.
    """
    local = np.fromiter(local_ports, np.int64)
    remote = np.fromiter(remote_ports, np.int64)
    inode = index.inode
    close_wait = index.slot == CLOSE_WAIT_SLOT
    wanted_listeners = np.fromiter(set().union(*listener_inodes.values()), np.int64)
    if scan is None:
        wanted_rows = np.isin(index.sport, local) | np.isin(index.dport, remote) | close_wait
        scan = find_owners(
            np.concatenate([inode[wanted_rows].astype(np.int64), wanted_listeners]),
            proc_root, **scan_options)

    listener_holders: dict[int, list[Owner]] = {}
    people = sorted(scan.held, key=lambda o: o.pid)
    parts_inode, parts_owner = [], []
    for k, owner in enumerate(people):
        inodes = scan.held[owner]
        for i in inodes[np.isin(inodes, wanted_listeners)].tolist():
            listener_holders.setdefault(i, []).append(owner)
        parts_inode.append(inodes)
        parts_owner.append(np.full(len(inodes), k, np.int64))
    listeners = {}
    for key, members in listener_inodes.items():
        found = {o for i in members for o in listener_holders.get(i, ())}
        listeners[key] = tuple(sorted(found, key=lambda o: o.pid))

    # (inode, owner) pairs -> the socket row of each inode (inodes are unique per socket).
    pi = np.concatenate(parts_inode) if parts_inode else np.zeros(0, np.int64)
    po = np.concatenate(parts_owner) if parts_owner else np.zeros(0, np.int64)
    order = np.argsort(inode, kind="stable")
    sorted_inode = inode[order]
    at = np.minimum(np.searchsorted(sorted_inode, pi), max(len(sorted_inode) - 1, 0))
    hit = (sorted_inode[at] == pi) if len(sorted_inode) else np.zeros(len(pi), bool)
    row = order[at[hit]]
    po = po[hit]
    sport = index.sport[row].astype(np.int64)
    dport = index.dport[row].astype(np.int64)
    cw = close_wait[row]

    def by_port(ports: np.ndarray, owner: np.ndarray, keep: np.ndarray) -> dict:
        keys, counts = np.unique((ports[keep] << 32) | owner[keep], return_counts=True)
        out: dict[int, list[tuple[Owner, int]]] = {}
        for key, n in zip(keys.tolist(), counts.tolist()):
            out.setdefault(key >> 32, []).append((people[key & 0xFFFFFFFF], n))
        return {p: tuple(sorted(v, key=lambda oc: (-oc[1], oc[0].pid))) for p, v in out.items()}

    owned = np.unique(row[cw])  # CLOSE-WAIT sockets with a holder, each once
    cw_ports, cw_owned = np.unique(index.sport[owned].astype(np.int64), return_counts=True)
    return PortOwners(
        local=by_port(sport, po, np.isin(sport, local)),
        remote=by_port(dport, po, np.isin(dport, remote)),
        listeners=listeners,
        close_wait=by_port(sport, po, cw),
        close_wait_owned=dict(zip(cw_ports.tolist(), cw_owned.tolist())),
        complete=scan.complete,
        note=scan.note,
        scanned_at=scan.scanned_at,
    ), scan
