"""Which network namespace a reader is bound to, and whether that is still the one named.

Anything opened inside a namespace (a sock_diag socket, a /proc/net file) pins it: after
`ip netns del NAME` (and perhaps `ip netns add NAME` again) it would keep reporting the old,
orphaned namespace forever. Readers stat the path every poll through NamespaceWatch and
re-open what they hold when the path is gone or names another namespace.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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


CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h
_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in(path: str, fn: Callable[[], T]) -> T:
    """fn() in a short-lived thread that has entered the network namespace at `path`.

    Only that thread enters (setns(2) with CLONE_NEWNET; os.setns needs Python 3.12) and
    it ends right after, so the process and its other threads never move. What fn opens
    there stays bound to that namespace: a socket, or /proc/thread-self/net/* and
    /proc/sys/net/* files. Needs CAP_SYS_ADMIN. Raises what fn or setns raised.
    """
    result: list = []
    failure: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(nsfd)
            finally:
                os.close(nsfd)
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            failure.append(e)

    t = threading.Thread(target=enter_and_run, name="sockscope-setns", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]
