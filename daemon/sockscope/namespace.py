"""Which network namespace a reader is bound to, and whether that is still the one named.

Anything opened inside a namespace (a sock_diag socket, a /proc/net file) pins it: after
`ip netns del NAME` (and perhaps `ip netns add NAME` again) it would keep reporting the old,
orphaned namespace forever. Readers stat the path every poll through NamespaceWatch and
re-open what they hold when the path is gone or names another namespace.
"""

from __future__ import annotations

import os


def netns_path(netns: str) -> str:
    """A name made by `ip netns add` lives in /run/netns; anything with a slash is a path."""
    return netns if "/" in netns else os.path.join("/run/netns", netns)


class NamespaceWatch:
    """Identity (st_dev, st_ino) of a namespace path; `netns` None = the daemon's own."""

    def __init__(self, netns: str | None):
        self.netns = netns
        self.path = None if netns is None else netns_path(netns)
        self._now: tuple[int, int] | None = None
        self._opened: tuple[int, int] | None = None

    def replaced(self) -> bool:
        """Stat the path now (OSError when it is gone). True when it no longer names the
        namespace recorded by opened(); False before opened() and for our own namespace."""
        if self.path is None:
            return False
        st = os.stat(self.path)
        self._now = (st.st_dev, st.st_ino)
        return self._opened is not None and self._now != self._opened

    def opened(self) -> None:
        """Record that what the caller holds was opened in the namespace last stat'ed."""
        self._opened = self._now

    def closed(self) -> None:
        self._opened = None
