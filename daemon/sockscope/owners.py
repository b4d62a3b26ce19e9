"""Map socket inodes to the processes holding them, by walking /proc/PID/fd like `ss -p`.

sock_diag reports a socket's inode but not its owner; the only way to the owner is to
read every process's fd symlinks ("socket:[INODE]"). Other users' fd directories need
CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE; without them the scan is partial and says so
(`complete=False` plus a note) instead of guessing.
"""

from __future__ import annotations

import os
import pwd
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sockscope.snapshot import OTHER

TCP_CLOSE_WAIT = 8
TCP_LISTEN = 10

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
    owners: dict[int, tuple[Owner, ...]]  # inode -> holders sorted by pid; found inodes only
    complete: bool  # every process's fd table was read
    note: str | None = None  # why the scan is incomplete


@dataclass(frozen=True, slots=True)
class OwnerInfo:
    """Owners of the listeners and of the CLOSE-WAIT sockets of one dump.

    listeners: (address, port) -> holders of any member socket (SO_REUSEPORT members and
      pre-fork children are merged), sorted by pid; () when none was found.
    close_wait: local port (tracked) or OTHER -> ((Owner, sockets held), ...) sorted by
      count descending then pid. A socket shared by several processes counts once for
      each of them.
    unowned: local port or OTHER -> CLOSE-WAIT sockets without a known holder: inode 0
      (still in an accept queue) or not found in any fd table. Only non-zero entries.
    """

    listeners: dict[tuple[str, int], tuple[Owner, ...]]
    close_wait: dict[int | str, tuple[tuple[Owner, int], ...]]
    unowned: dict[int | str, int]
    complete: bool
    note: str | None = None


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


def find_owners(
    inodes: set[int],
    proc_root: str = "/proc",
    *,
    caps: int | None = None,
    listdir: Callable[[str], list[str]] = os.listdir,
    readlink: Callable[[str], str] = os.readlink,
) -> OwnerScan:
    """Processes holding each wanted socket inode.

    Every process is scanned (an inode can be held by several), but only links naming a
    wanted inode cost more than one readlink. `caps` overrides this process's CapEff
    (read from /proc/self/status, not from proc_root); `listdir`/`readlink` are seams for
    tests.
    """
    wanted = {i for i in inodes if i}
    if not wanted:
        return OwnerScan({}, True, None)
    holders: dict[int, set[int]] = {}  # pid -> wanted inodes it holds
    denied = 0
    try:
        entries = listdir(proc_root)
    except PermissionError:
        return OwnerScan({}, False, f"{PRIVILEGE_NOTE}: {proc_root} could not be read")
    for entry in entries:
        if not entry.isdigit():
            continue
        fd_dir = f"{proc_root}/{entry}/fd"
        try:
            fds = listdir(fd_dir)
        except PermissionError:
            denied += 1
            continue
        except _GONE:
            continue
        found: set[int] = set()
        for fd in fds:
            try:
                inode = _socket_inode(readlink(f"{fd_dir}/{fd}"))
            except PermissionError:
                denied += 1
                found.clear()  # count the process once, and keep nothing half-read
                break
            except _GONE:
                continue  # fd closed, or the whole process went away
            except OSError:
                continue
            if inode in wanted:
                found.add(inode)
        if found:
            holders[int(entry)] = found

    owners: dict[int, list[Owner]] = {}
    users: dict[int, str] = {}
    for pid in sorted(holders):
        owner = _read_owner(f"{proc_root}/{pid}", pid, users)
        if owner is None:
            continue  # exited after its fds were read: it no longer holds anything
        for inode in holders[pid]:
            owners.setdefault(inode, []).append(owner)

    note = None
    if denied:
        noun = "process" if denied == 1 else "processes"
        if has_owner_privileges(caps):
            # Even root is refused by some (e.g. pid 1 of a container or sandbox).
            note = f"with root privileges, {denied} {noun} could not be read"
        else:
            note = f"{PRIVILEGE_NOTE}: {denied} {noun} could not be read"
    elif not has_owner_privileges(caps):
        # No error, but without the capabilities other users' processes may be hidden
        # (hidepid) rather than refused: the scan cannot claim to be complete.
        note = f"{PRIVILEGE_NOTE}: other users' processes may be hidden"
    return OwnerScan({i: tuple(o) for i, o in owners.items()}, note is None, note)


def listener_address(family: int, src: bytes) -> str:
    """The address string Snapshot.listeners uses for a record's source address."""
    return socket.inet_ntop(family, src[:4] if family == socket.AF_INET else src[:16])


def owners_for(
    records: Iterable[tuple],
    tracked_local_ports: set[int],
    proc_root: str = "/proc",
    **scan_options,
) -> OwnerInfo:
    """Owners of the LISTEN and CLOSE-WAIT sockets in `records`, with one /proc scan.

    Records are sock_diag tuples (family, state, sport, dport, src, dst, rqueue,
    wqueue, uid, inode); other states are ignored. CLOSE-WAIT sockets are keyed by local
    port when it is tracked, else by OTHER. `scan_options` go to find_owners.
    """
    listener_inodes: dict[tuple[str, int], set[int]] = {}
    close_wait: dict[int | str, list[int]] = {}  # key -> inodes (0 included), per socket
    for rec in records:
        family, state, sport, inode = rec[0], rec[1], rec[2], rec[9]
        if state == TCP_LISTEN:
            key = (listener_address(family, rec[4]), sport)
            members = listener_inodes.setdefault(key, set())
            if inode:
                members.add(inode)
        elif state == TCP_CLOSE_WAIT:
            port: int | str = sport if sport in tracked_local_ports else OTHER
            close_wait.setdefault(port, []).append(inode)

    wanted = set().union(*listener_inodes.values(), *(set(v) for v in close_wait.values()))
    scan = find_owners(wanted, proc_root, **scan_options)

    listeners = {}
    for key, members in listener_inodes.items():
        found = {o for i in members for o in scan.owners.get(i, ())}
        listeners[key] = tuple(sorted(found, key=lambda o: o.pid))

    cw_owners: dict[int | str, tuple[tuple[Owner, int], ...]] = {}
    unowned: dict[int | str, int] = {}
    for port, port_inodes in close_wait.items():
        counts: Counter[Owner] = Counter()
        for inode in port_inodes:
            holders = scan.owners.get(inode, ()) if inode else ()
            if not holders:
                unowned[port] = unowned.get(port, 0) + 1
            counts.update(holders)
        if counts:
            cw_owners[port] = tuple(sorted(counts.items(), key=lambda oc: (-oc[1], oc[0].pid)))
    return OwnerInfo(listeners, cw_owners, unowned, scan.complete, scan.note)
