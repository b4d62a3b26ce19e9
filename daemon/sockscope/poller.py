"""The poll loop: one dump per interval, one immutable PollStatus swapped in per poll."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from .aggregate import Accumulator, Rules
from .kernelstats import KernelStatsReader
from .netlink import NetlinkError, Reader
from .peaks import PeakTracker
from .snapshot import PollStatus, Snapshot

log = logging.getLogger(__name__)


def poll_once(
    reader: Reader,
    rules: Rules,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> tuple[Snapshot, int]:
    """Dump the table and aggregate it. Returns (snapshot, dump retries). Raises NetlinkError."""
    started = monotonic()
    timestamp = clock()
    attempt: list[Accumulator] = []

    def start() -> Callable[[list], None]:
        # A fresh accumulator per attempt: an interrupted dump is thrown away whole.
        acc = Accumulator()
        attempt[:] = [acc]
        return acc.add

    stats = reader.poll(start)
    snapshot = attempt[0].finish(
        rules,
        families=stats.families,
        timestamp=timestamp,
        duration=monotonic() - started,
        messages=stats.messages,
        dump_interrupted=stats.interrupted,
    )
    return snapshot, stats.retries


MAX_DUMP_PRIORITY = 5.0  # seconds; see DumpGate
DUMP_PRIORITY_SHARE = 0.9  # of poll.interval; see DumpGate


class DumpGate:
    """Gives the poller's dump the GIL to itself for a bounded time.

    A dump reads thousands of ~32 KiB netlink datagrams (~4,000 at 1M sockets) and releases
    the GIL around each read; while HTTP threads are busy with scrapes, each read then
    waits up to the interpreter's switch interval (5 ms) to get the GIL back: the dump
    took 2-5x longer under 50 closed-loop scrapers and the poll cadence slipped
    (docs/performance.md). The HTTP server calls `wait()` before each round of work: while
    a dump runs it blocks, at most until `hold` seconds after the dump began (then the
    server carries on, so a slow or stuck dump delays a scrape by at most `hold`:
    min(0.9 x poll.interval, MAX_DUMP_PRIORITY): the poll comes first, but no scrape waits
    more than 5 s, half of Prometheus' default scrape timeout). Requests meanwhile wait in the kernel's
    socket buffers, not in our memory.
    """

    def __init__(self, hold: float = MAX_DUMP_PRIORITY, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._hold = hold
        self._monotonic = monotonic
        self._idle = threading.Event()
        self._idle.set()
        self._until = 0.0

    @contextmanager
    def dumping(self, hold: float | None = None) -> Iterator[None]:
        hold = self._hold if hold is None else min(hold, self._hold)
        if hold <= 0:
            yield
            return
        self._until = self._monotonic() + hold
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()

    def wait(self) -> None:
        """Return at once unless a dump is running; then when it ends or its hold expires."""
        if self._idle.is_set():
            return
        left = self._until - self._monotonic()
        if left > 0:
            self._idle.wait(left)


class ConsumerError(Exception):
    """Raised by an on_poll callback after it handed the poll to every consumer, when some
    of them raised (Service._dispatch). The poller counts it as a failed poll."""


_MAX_MESSAGE = 500  # characters of an error message kept in PollStatus.last_error and logs
_MAX_REMEMBERED = 64  # distinct error messages remembered as logged (then forgotten, relogged)
_LOOP_RETRY = 1.0  # seconds the loop waits after a failure of its own schedule


class Poller:
    """Polls every `interval` seconds in its own thread and publishes a PollStatus.

    A poll is: the kernel counters, the dump, the window peaks, then the consumers
    (on_poll). Any exception in it is a failed poll, counted in PollStatus.errors: a failure
    before the consumers keeps the last good Snapshot; a consumer's failure is counted
    after the consumers had the new one. Each distinct error message is logged once (at
    ERROR; unexpected exceptions with their traceback) until a poll succeeds again, and
    recovery is logged once (at INFO). Missed slots are skipped, never caught up in a burst.

    The loop itself survives any Exception; only a BaseException (SystemExit raised by a
    callee) can end the thread, and `ended_unexpectedly` then says so: the daemon's main
    loop checks it every second and exits with status 1 (docs/service.md).
    """

    def __init__(
        self,
        reader: Reader,
        rules: Rules,
        interval: float,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_poll: Callable[[PollStatus], None] | None = None,
        peaks: PeakTracker | None = None,
        kernel: KernelStatsReader | None = None,
        gate: DumpGate | None = None,
    ):
        self.reader = reader
        self.gate = gate or DumpGate(0.0)  # the HTTP server defers to the dump through it
        self.rules = rules
        self.interval = interval
        self._clock = clock
        self._monotonic = monotonic
        self._on_poll = on_poll
        self.peaks = peaks  # window peaks folded into each good Snapshot (None = off)
        self.kernel = kernel  # kernel counters read every poll, failing on their own
        self._status = PollStatus()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and reconfigure()
        self._pending: dict[str, object] = {}  # attribute -> new value, see reconfigure()
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._logged: set[str] = set()  # error messages logged since the last good poll
        self._failures = 0

    def status(self) -> PollStatus:
        return self._status

    def poll(self) -> PollStatus:
        """Run one poll now (in the caller's thread), publish its outcome, hand it to
        on_poll. Never raises an Exception."""
        old = self._status
        kernel = None
        try:
            self._apply_pending()
            if self.kernel is not None:
                kernel = self.kernel.read()  # flags a failed source itself; raising is a bug
            with self.gate.dumping(min(self.interval * DUMP_PRIORITY_SHARE, MAX_DUMP_PRIORITY)):
                snapshot, retries = poll_once(
                    self.reader, self.rules, clock=self._clock, monotonic=self._monotonic
                )
            if self.peaks is not None:
                snapshot = self.peaks.apply(snapshot, self._monotonic())
        except Exception as e:  # noqa: BLE001 - any failure keeps the daemon serving
            message = self._failed("poll failed", e)
            new = PollStatus(
                snapshot=old.snapshot,
                last_success_monotonic=old.last_success_monotonic,
                polls=old.polls + 1,
                errors=old.errors + 1,
                dump_retries=old.dump_retries,
                dump_interrupted=old.dump_interrupted,
                last_error=message,
                kernel=kernel,
            )
        else:
            new = PollStatus(
                snapshot=snapshot,
                last_success_monotonic=self._monotonic(),
                polls=old.polls + 1,
                errors=old.errors,
                dump_retries=old.dump_retries + retries,
                dump_interrupted=old.dump_interrupted + snapshot.dump_interrupted,
                last_error=None,
                kernel=kernel,
            )
        self._status = new
        consumed = True
        if self._on_poll is not None:
            try:
                self._on_poll(new)
            except Exception as e:  # noqa: BLE001 - see ConsumerError
                consumed = False
                message = self._failed("poll consumer failed", e)
                if new.last_error is None:  # a failed poll is counted once
                    new = replace(new, errors=new.errors + 1, last_error=message)
                    self._status = new
        if consumed and new.last_error is None and self._failures:
            log.info("poll recovered after %d failed polls", self._failures)
            self._failures = 0
            self._logged.clear()
        return new

    def _failed(self, what: str, e: Exception) -> str:
        """Count a failure, log its message once; the message for PollStatus.last_error."""
        text = str(e) or type(e).__name__
        message = text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."
        if what != "poll failed":
            message = f"{what}: {message}"
        self._failures += 1
        if message not in self._logged:
            if len(self._logged) >= _MAX_REMEMBERED:
                self._logged.clear()
            self._logged.add(message)
            expected = isinstance(e, NetlinkError) or (isinstance(e, ConsumerError) and e.__cause__ is None)
            shown = message if what != "poll failed" else f"poll failed: {message}"
            log.error("%s", shown, exc_info=None if expected else e)
        return message

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as e:
            log.critical("the poll loop ended on %s: %s", type(e).__name__, e)
            raise
        finally:
            self._close(self.reader)
            self._close(self.kernel)

    def _loop(self) -> None:
        next_slot = self._monotonic()
        loop_error: str | None = None
        while not self._stop.is_set():
            try:
                self.poll()
                next_slot += self.interval
                now = self._monotonic()
                if now >= next_slot:  # the poll overran: skip the missed slots
                    missed = int((now - next_slot) // self.interval) + 1
                    next_slot += missed * self.interval
                wait = next_slot - now
                loop_error = None
            except Exception as e:  # noqa: BLE001 - poll() never raises: the schedule failed
                if str(e) != loop_error:
                    loop_error = str(e)
                    log.error("poll loop failed: %s; polling again in %gs", e, _LOOP_RETRY, exc_info=e)
                wait = _LOOP_RETRY
                next_slot = self._monotonic() + wait
            if self._wake.wait(wait):  # reconfigured or stopping: poll at once
                self._wake.clear()
                next_slot = self._monotonic()

    @staticmethod
    def _close(resource: object) -> None:
        try:
            if resource is not None:
                resource.close()
        except Exception:  # noqa: BLE001 - closing at exit must not hide why the loop ended
            log.warning("closing %s failed", type(resource).__name__, exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="sockscope-poller", daemon=True)
        self._thread.start()

    @property
    def ended_unexpectedly(self) -> bool:
        """True when the poll thread ended without stop() being called."""
        thread = self._thread
        return thread is not None and not thread.is_alive() and not self._stop.is_set()

    def reconfigure(self, **changes: object) -> None:
        """Replace attributes (reader, rules, interval, ...) at the top of the next poll.

        Safe from any thread: the poller thread makes the swap, closes each replaced
        object that has close() (a Reader is not thread-safe), and polls at once.
        """
        for name in changes:
            if not hasattr(self, name) or name.startswith("_"):
                raise AttributeError(f"Poller has no setting {name!r}")
        with self._pending_lock:
            self._pending.update(changes)
        self._wake.set()

    def _apply_pending(self) -> None:
        with self._pending_lock:
            changes, self._pending = self._pending, {}
        replaced = []
        for name, value in changes.items():
            old = getattr(self, name)
            setattr(self, name, value)
            if old is not None and old is not value and callable(getattr(old, "close", None)):
                replaced.append(old)
        for old in replaced:  # every change is in place before any close can fail
            self._close(old)

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
