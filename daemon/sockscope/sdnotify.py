"""The systemd notification protocol (sd_notify(3)), written here rather than imported.

A notification is one datagram of `KEY=VALUE` lines sent to the AF_UNIX socket named by
$NOTIFY_SOCKET: a filesystem path, or `@name` for the abstract namespace (the `@` becomes
a leading NUL byte). The `sdnotify` package swallows every error and systemd-python needs
libsystemd headers to build, so the few lines are ours.

Errors talking to the socket are logged (once per distinct error) and never raised: a
daemon must not die because its supervisor went away.

The watchdog (sd_watchdog_enabled(3)): $WATCHDOG_USEC is the timeout systemd enforces;
$WATCHDOG_PID, when set, names the process it applies to. `Watchdog.kick()` sends
WATCHDOG=1 at most every WATCHDOG_USEC/2 and is called by the daemon after every
completed poll, so a poller that stops completing polls stops the pings and systemd
restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from .health import Problems
from .snapshot import PollStatus

log = logging.getLogger(__name__)

__all__ = ["Notifier", "ServiceNotifier", "Watchdog", "socket_address", "status_text", "watchdog_interval"]


def socket_address(value: str) -> str | bytes:
    """The sendto() address for a $NOTIFY_SOCKET value: a path, or bytes for `@abstract`."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends notifications to $NOTIFY_SOCKET; does nothing when it is unset.

    `environ` is injectable (defaults to os.environ). The socket is opened lazily and
    kept; a failed send closes it so the next one starts fresh.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if value.startswith(("/", "@")) and len(value) > 1:
            self.address = socket_address(value)
        elif value:
            log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an @abstract name", value)
        self._sock: socket.socket | None = None
        self._problems = Problems(log, "", level=logging.WARNING,
                                 recovery="notifying systemd works again")
        self._lock = threading.Lock()  # the poller thread and the main thread both send

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send `lines` (each "KEY=VALUE") as one datagram. True if it was sent."""
        address = self.address
        if address is None:
            return False
        # A newline inside a value would start a new assignment: keep each value one line.
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
        with self._lock:
            return self._send(payload, address)

    def _send(self, payload: bytes, address: str | bytes) -> bool:
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(1.0)
            self._sock.sendto(payload, address)
        except OSError as e:
            self._problems.failed(f"cannot notify systemd at {self._shown()}: {e.strerror or e}")
            self.close()
            return False
        self._problems.ok()
        return True

    def _shown(self) -> str:
        a = self.address
        return "@" + a[1:].decode(errors="replace") if isinstance(a, bytes) else str(a)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when not asked for.

    None also when $WATCHDOG_PID names another process (the variable was inherited).
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner and owner.strip() != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    if usec <= 0:
        return None
    return usec / 2e6


class Watchdog:
    """Rate-limited WATCHDOG=1: `kick()` sends at most once per `interval` seconds."""

    def __init__(
        self,
        notifier: Notifier,
        interval: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.interval = interval
        self._monotonic = monotonic
        self._last: float | None = None

    def kick(self) -> bool:
        """Send WATCHDOG=1 if `interval` has passed since the last ping. True if sent."""
        now = self._monotonic()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return self.notifier.notify("WATCHDOG=1")


def status_text(status: PollStatus) -> str:
    """The STATUS= line `systemctl status` shows: the last poll's figures, or its error."""
    snap = status.snapshot
    if status.last_error is not None:
        kept = "" if snap is None else f"; serving the poll of {snap.sockets} sockets before it"
        return f"poll failed ({status.errors} of {status.polls} failed): {status.last_error}{kept}"
    if snap is None:
        return "starting"
    states: dict[str, int] = {}
    for (_family, state), n in snap.states.items():
        states[state] = states.get(state, 0) + n
    busiest = ", ".join(f"{n} {s}" for s, n in sorted(states.items(), key=lambda kv: -kv[1])[:3] if n)
    return (f"{snap.sockets} TCP sockets ({busiest or 'none'}), {len(snap.listeners)} listening "
            f"addresses; poll took {snap.duration * 1000:.1f} ms")


class ServiceNotifier:
    """What sockscope tells systemd, and when.

    - on_poll(status), called in the poller thread after every poll: WATCHDOG=1 (rate
      limited by Watchdog), READY=1 after the first successful poll (the HTTP port is
      bound before the poller starts), STATUS= at most every `status_every` seconds or
      when a poll's outcome flips between success and failure.
    - reloading() / reloaded() around a SIGHUP reload, stopping() on shutdown.
    """

    def __init__(
        self,
        notifier: Notifier,
        watchdog: Watchdog | None = None,
        *,
        status_every: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.watchdog = watchdog
        self._status_every = status_every
        self._monotonic = monotonic
        self.ready = threading.Event()
        self._last_status_at: float | None = None
        self._last_failed: bool | None = None
        self._last_text = "starting"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ServiceNotifier:
        notifier = Notifier(environ)
        interval = watchdog_interval(environ)
        return cls(notifier, Watchdog(notifier, interval) if interval and notifier.enabled else None)

    def check_interval(self, poll_interval: float) -> None:
        """Warn when polls are too far apart for the watchdog to be fed in time."""
        if self.watchdog is not None and poll_interval >= 2 * self.watchdog.interval:
            log.warning("poll.interval (%gs) is not shorter than WatchdogSec (%gs): systemd will "
                        "kill sockscope between polls", poll_interval, 2 * self.watchdog.interval)

    def on_poll(self, status: PollStatus) -> None:
        if self.watchdog is not None:
            self.watchdog.kick()
        now = self._monotonic()
        failed = status.last_error is not None
        text = status_text(status)
        self._last_text = text
        if not failed and not self.ready.is_set():
            self.ready.set()
            self.notifier.notify("READY=1", f"STATUS={text}", f"MAINPID={os.getpid()}")
        elif (failed != self._last_failed or self._last_status_at is None
              or now - self._last_status_at >= self._status_every):
            self.notifier.notify(f"STATUS={text}")
        else:
            return
        self._last_status_at = now
        self._last_failed = failed

    def reloading(self) -> None:
        self.notifier.notify("RELOADING=1", "STATUS=reloading the configuration")

    def reloaded(self) -> None:
        # Before the first good poll READY=1 would be premature; on_poll sends it later.
        ready = ("READY=1",) if self.ready.is_set() else ()
        self.notifier.notify(*ready, f"STATUS={self._last_text}")

    def stopping(self) -> None:
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
