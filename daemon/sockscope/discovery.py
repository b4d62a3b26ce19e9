"""Which network namespaces a sweep polls, and the `netns` label of each.

A namespace is known by the identity (st_dev, st_ino) of its nsfs inode: `stat` of
/run/netns/NAME and of /proc/PID/ns/net give the same pair for the same namespace
(`ls -iL /proc/PID/ns/net`, `ip netns identify PID`). Labels (docs/configuration.md):
- the daemon's own namespace: "host";
- a namespace with a /run/netns entry: that name (the first in sorted order);
- else the container of its oldest process, when its /proc/PID/cgroup path names one
  (docker, containerd/cri, podman, kubepods): "<runtime>/<12 hex digits of the id>", or
  "pod/<uid>" for a Kubernetes pod (its containers share the pod's namespace), the labels
  the units feature gives them (cgroups.container_label);
- else "pid:<pid of its oldest process>" (oldest by start time, /proc/PID/stat field 22).
A name given in poll.netns is its label; an absolute path gets the
label above (the path itself when no process and no /run/netns entry has it).

Pure parsers (container_label, start_time) are separate from the scans, whose roots are
injected (tests point them at fixtures).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import cgroups

__all__ = ["Namespace", "Discovery", "container_label", "start_time", "discover", "choose"]

NsKey = tuple[int, int]  # (st_dev, st_ino) of the namespace's nsfs inode


@dataclass(frozen=True, slots=True)
class Namespace:
    key: NsKey
    label: str
    path: str | None  # what readers enter (None: the daemon's own namespace, no setns)
    configured: bool = False  # listed in poll.netns (kept before discovered ones under the cap)


@dataclass(frozen=True, slots=True)
class Discovery:
    found: tuple[Namespace, ...]  # every namespace found, configured ones first, then by label
    missing: tuple[str, ...] = ()  # poll.netns entries that name no namespace now
    processes: int = 0  # /proc/PID/ns/net entries stat'ed
    unreadable: int = 0  # of those, refused or gone (EACCES without CAP_SYS_PTRACE, exited)


def container_label(cgroup_text: str) -> str | None:
    """The container ("docker/3f2a9c1b0d4e", ...) or Kubernetes pod ("pod/<uid>": its
    containers share the pod's namespace) named by any line of a /proc/PID/cgroup text
    ("hierarchy:controllers:path"; a hybrid host's v1 lines too), by the rules of
    cgroups.container_label, the units feature's; None otherwise."""
    for line in cgroup_text.splitlines():
        label = cgroups.container_label(line.split(":", 2)[-1])
        if label is not None:
            return label
    return None


def start_time(stat_text: str) -> int:
    """Field 22 of /proc/PID/stat (starttime, clock ticks since boot). The command name
    (field 2) may hold spaces and parentheses: fields are counted after the last ')'."""
    rest = stat_text[stat_text.rindex(")") + 2:].split()
    return int(rest[19])  # rest[0] is field 3


def _key(path: str) -> NsKey:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


@dataclass(slots=True)
class _Scan:
    proc: str
    members: dict[NsKey, list[str]] = field(default_factory=dict)  # namespace -> pids
    processes: int = 0
    unreadable: int = 0
    done: bool = False

    def run(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            return
        for pid in pids:
            self.processes += 1
            try:
                key = _key(os.path.join(self.proc, pid, "ns", "net"))
            except OSError:
                self.unreadable += 1
                continue
            self.members.setdefault(key, []).append(pid)

    def oldest(self, key: NsKey) -> str | None:
        best: tuple[int, int] | None = None
        for pid in self.members.get(key, ()):
            text = _read(os.path.join(self.proc, pid, "stat"))
            try:
                started = start_time(text) if text is not None else None
            except (ValueError, IndexError):
                started = None
            if started is not None and (best is None or (started, int(pid)) < best):
                best = (started, int(pid))
        return None if best is None else str(best[1])

    def label(self, key: NsKey) -> tuple[str, str] | None:
        """(label, path to enter) from the namespace's oldest process; None without one."""
        pid = self.oldest(key)
        if pid is None:
            return None
        cgroup = _read(os.path.join(self.proc, pid, "cgroup"))
        container = container_label(cgroup) if cgroup is not None else None
        return container or f"pid:{pid}", os.path.join(self.proc, pid, "ns", "net")


def discover(configured: Sequence[str] = (), kinds: Iterable[str] = (), host: bool = False, *,
             proc: str = "/proc", run: str = "/run/netns") -> Discovery:
    """The namespaces to choose from: `configured` (poll.netns entries: names in `run` or
    absolute paths), then those `kinds` find ("run": every entry of `run`; "processes":
    the distinct namespaces of the processes under `proc`), deduplicated by identity.
    The daemon's own namespace is "host", included only when `host`. Never raises for a
    namespace that vanishes meanwhile: it is left out."""
    kinds = set(kinds)
    try:
        own = _key(os.path.join(proc, "self", "ns", "net"))
    except OSError:
        own = None
    scan = _Scan(proc)
    run_names: dict[NsKey, str] = {}
    try:
        entries = sorted(os.listdir(run))
    except OSError:
        entries = []
    for name in entries:
        try:
            run_names.setdefault(_key(os.path.join(run, name)), name)
        except OSError:
            continue  # removed meanwhile, or a bind mount being set up
    found: dict[NsKey, Namespace] = {}
    if host and own is not None:
        found[own] = Namespace(own, "host", None, configured=True)
    missing = []
    for entry in configured:
        path = entry if entry.startswith("/") else os.path.join(run, entry)
        try:
            key = _key(path)
        except OSError:
            missing.append(entry)
            continue
        if key in found:
            continue
        if not entry.startswith("/"):
            label = entry
        elif key == own:  # /proc/1/ns/net on the host, /proc/self/ns/net
            label = "host"
        elif key in run_names:
            label = run_names[key]
        else:
            scan.run()
            got = scan.label(key)
            label = got[0] if got is not None else entry
        found[key] = Namespace(key, label, path, configured=True)
    discovered: list[Namespace] = []
    if "run" in kinds:
        for key, name in run_names.items():
            if key not in found and key != own:
                discovered.append(Namespace(key, name, os.path.join(run, name)))
    if "processes" in kinds:
        scan.run()
        seen = {n.key for n in discovered}
        for key in scan.members:
            if key in found or key in seen or key == own:
                continue
            if key in run_names:
                discovered.append(Namespace(key, run_names[key], os.path.join(run, run_names[key])))
                continue
            got = scan.label(key)
            if got is not None:  # every member exited meanwhile
                discovered.append(Namespace(key, got[0], got[1]))
    discovered.sort(key=lambda n: n.label)
    return Discovery(tuple(_unique_labels([*found.values(), *discovered])), tuple(missing),
                     scan.processes, scan.unreadable)


def _unique_labels(spaces: list[Namespace]) -> list[Namespace]:
    """Two namespaces must never share a label (their series would merge): a repeated
    label gets ":<inode>" appended."""
    seen: set[str] = set()
    out = []
    for ns in spaces:
        if ns.label in seen:
            ns = Namespace(ns.key, f"{ns.label}:{ns.key[1]}", ns.path, ns.configured)
        seen.add(ns.label)
        out.append(ns)
    return out


def choose(found: Sequence[Namespace], tracked: Iterable[NsKey], cap: int) -> tuple[list[Namespace], int]:
    """At most `cap` namespaces, the choice stable: configured ones (and host) first, then
    those already tracked, then the others by label. Returns (chosen, folded count)."""
    tracked = set(tracked)
    order = sorted(range(len(found)),
                   key=lambda i: (not found[i].configured, found[i].key not in tracked, i))
    chosen = [found[i] for i in order[:cap]]
    return chosen, max(0, len(found) - cap)
