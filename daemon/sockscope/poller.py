"""The poll loop: one dump per interval, one immutable PollStatus swapped in per poll."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

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


class Poller:
    """Polls every `interval` seconds in its own thread and publishes a PollStatus.

    A failed poll keeps the last good Snapshot and counts the error; each distinct error
    message is logged once (at ERROR), and recovery is logged once (at INFO). Missed
    slots are skipped, never caught up in a burst.
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
    ):
        self.reader = reader
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
        self._logged_error: str | None = None
        self._failures = 0

    def status(self) -> PollStatus:
        return self._status

    def poll(self) -> PollStatus:
        """Run one poll now (in the caller's thread) and publish its outcome."""
        self._apply_pending()
        old = self._status
        # Never raises: a failed source is flagged in the result and logged by the reader.
        kernel = self.kernel.read() if self.kernel is not None else None
        try:
            snapshot, retries = poll_once(
                self.reader, self.rules, clock=self._clock, monotonic=self._monotonic
            )
        except Exception as e:  # noqa: BLE001 - any failure keeps the daemon serving
            message = str(e) or type(e).__name__
            if message != self._logged_error:
                log.error("poll failed: %s", message, exc_info=not isinstance(e, NetlinkError))
                self._logged_error = message
            self._failures += 1
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
            if self.peaks is not None:
                snapshot = self.peaks.apply(snapshot, self._monotonic())
            if self._failures:
                log.info("poll recovered after %d failed polls", self._failures)
                self._failures = 0
                self._logged_error = None
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
        if self._on_poll is not None:
            self._on_poll(new)
        return new

    def run(self) -> None:
        next_slot = self._monotonic()
        while not self._stop.is_set():
            self.poll()
            next_slot += self.interval
            now = self._monotonic()
            if now >= next_slot:  # the poll overran: skip the missed slots
                missed = int((now - next_slot) // self.interval) + 1
                next_slot += missed * self.interval
            if self._wake.wait(next_slot - now):  # reconfigured or stopping: poll at once
                self._wake.clear()
                next_slot = self._monotonic()
        self.reader.close()
        if self.kernel is not None:
            self.kernel.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="sockscope-poller", daemon=True)
        self._thread.start()

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
        for name, value in changes.items():
            old = getattr(self, name)
            setattr(self, name, value)
            if old is not None and old is not value and callable(getattr(old, "close", None)):
                old.close()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
