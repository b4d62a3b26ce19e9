"""cgroup id -> cgroup path -> label, by walking the cgroup2 tree (the units feature's I/O).

The kernel reports a full socket's cgroup as INET_DIAG_CGROUP_ID, the inode number of its
cgroup2 directory (kernfs: the directory's inode number is the cgroup's kernfs id, and
readdir reports the same number as d_ino, so `os.scandir` finds it without a stat per
directory). There is no unprivileged way from an id to its path (open_by_handle_at needs
CAP_DAC_READ_SEARCH), so the tree is walked:

- on a miss only (an id of this poll not in the cache), at most once per call (one call
  per poll), and not again before max(min_interval, COST_RATIO x the last walk's duration)
  has passed since the last walk ended: walking costs at most ~1/COST_RATIO of a core
  however often ids miss (~1 µs per directory entry; a cgroup directory holds ~20-60);
- a walk stops after `max_dirs` directories (a pathological tree cannot stall the poll);
- the cache is bounded (`max_entries`, least recently asked evicted first); a cgroup that
  vanished keeps its last known path until evicted (sockets outlive their cgroup: an
  orphaned FIN-WAIT socket of a stopped service, a socket passed to another process);
- an id a complete walk did not find is remembered as unresolvable (cgroup ids are 64-bit
  and never reused, and a walk that starts after the dump sees every cgroup that still
  exists): a cgroup removed before the walk saw it, or one outside this process's cgroup
  namespace. Its label is UNKNOWN.

Paths are relative to the cgroup2 mount (what `ss --cgroup` prints after "cgroup:").
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from .cgroups import cgroup2_mount, unit_label
from .health import Problems

__all__ = ["CgroupMap", "UNKNOWN", "COST_RATIO"]

log = logging.getLogger(__name__)

UNKNOWN = "unknown"  # the label of an id no walk could resolve
COST_RATIO = 10.0  # a walk waits at least this many times its own duration after the last one
MAX_DIRS = 100_000
MAX_ENTRIES = 4096


def find_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    with open(mountinfo) as f:
        return cgroup2_mount(f.read())


class CgroupMap:
    """`labels(ids)` -> {id: label}. `root`: the cgroup2 mount; None finds it in
    /proc/self/mountinfo at the first walk (an error then is logged once and retried at the
    walk rate)."""

    def __init__(self, root: str | None = None, *, min_interval: float = 0.0, max_entries: int = MAX_ENTRIES,
                 max_dirs: int = MAX_DIRS, monotonic: Callable[[], float] = time.monotonic,
                 mountinfo: str = "/proc/self/mountinfo") -> None:
        self.root = root
        self.min_interval = min_interval
        self.max_entries = max_entries
        self.max_dirs = max_dirs
        self._monotonic = monotonic
        self._mountinfo = mountinfo
        self._cache: OrderedDict[int, tuple[str | None, str]] = OrderedDict()  # id -> (path, label)
        self._next_walk = float("-inf")
        self.walks = 0  # walks done (complete or not)
        self.walk_errors = 0
        self.last_walk_seconds = 0.0
        self.last_walk_dirs = 0
        self._problems = Problems(log, "cgroup2 tree walk (unit labels)", level=logging.WARNING,
                                  recovery="cgroup2 tree walked again after {n} failures")

    def __len__(self) -> int:
        return len(self._cache)

    def path(self, cgroup_id: int) -> str | None:
        got = self._cache.get(cgroup_id)
        return got[0] if got is not None else None

    def labels(self, ids: Iterable[int]) -> dict[int, str]:
        """The label of every id (0, "no cgroup id", is not asked here: callers keep it
        apart). Ids the cache lacks trigger one walk when the rate allows. Never raises for
        the walk: it runs inside the TCP dump's fold, whose failure is a failed poll."""
        want = list(dict.fromkeys(int(i) for i in ids))
        missing = [i for i in want if i not in self._cache]
        if missing and self._monotonic() >= self._next_walk:
            try:
                self._walk(set(missing))
            except Exception as e:  # noqa: BLE001 - a bug here must not fail the poll
                self.walk_errors += 1
                self._next_walk = self._monotonic() + max(self.min_interval, 1.0)
                self._problems.failed(e, traceback=e)
        out: dict[int, str] = {}
        cache = self._cache
        for i in want:
            got = cache.get(i)
            if got is None:
                out[i] = UNKNOWN  # not resolved yet: the next walk the rate allows tries again
                continue
            cache.move_to_end(i)
            out[i] = got[1]
        while len(cache) > self.max_entries:
            cache.popitem(last=False)
        return out

    def _walk(self, wanted: set[int]) -> None:
        started = self._monotonic()
        self.walks += 1
        try:
            if self.root is None:
                self.root = find_mount(self._mountinfo)
                if self.root is None:
                    raise OSError("no cgroup2 mount in /proc/self/mountinfo (a cgroup v1-only host, or started "
                                  "with `ip netns exec`, which remounts /sys: use --netns instead); every "
                                  'socket counts under unit="unknown"')
            found, complete = self._scan(self.root, wanted)
        except OSError as e:
            self.walk_errors += 1
            self._problems.failed(e)
            found, complete = {}, False
        else:
            self._problems.ok()
        for i in wanted:
            path = found.get(i)
            if path is not None:
                self._cache[i] = (path, unit_label(path))
            elif complete:
                self._cache[i] = (None, UNKNOWN)
        ended = self._monotonic()
        self.last_walk_seconds = ended - started
        self._next_walk = ended + max(self.min_interval, COST_RATIO * self.last_walk_seconds)

    def _scan(self, root: str, wanted: set[int]) -> tuple[dict[int, str], bool]:
        """The paths of the `wanted` ids found under `root` (the root itself is "/"), and
        whether the walk saw the whole tree. Stops early once every wanted id is found."""
        found: dict[int, str] = {}
        left = set(wanted)
        root_ino = os.stat(root).st_ino
        if root_ino in left:
            found[root_ino] = "/"
            left.discard(root_ino)
        stack = [""]
        dirs = 0
        complete = True
        while stack and left:
            rel = stack.pop()
            try:
                it = os.scandir(root + rel)
            except FileNotFoundError:  # removed while we walked: it holds nothing now
                continue
            except PermissionError:  # a subtree we may not list: the rest of the walk stands
                complete = False
                continue
            with it:
                for entry in it:
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        ino = entry.inode()
                    except FileNotFoundError:
                        continue
                    path = f"{rel}/{entry.name}"
                    dirs += 1
                    if ino in left:
                        found[ino] = path
                        left.discard(ino)
                    stack.append(path)
            if dirs >= self.max_dirs:
                self.last_walk_dirs = dirs
                return found, not left
        self.last_walk_dirs = dirs
        return found, complete or not left
