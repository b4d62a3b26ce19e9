"""The poll loop: one dump per interval, one immutable PollStatus swapped in per poll."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .aggregate import Accumulator, Rules
from .netlink import NetlinkError, Reader
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
    ):
        self.reader = reader
        self.rules = rules
        self.interval = interval
        self._clock = clock
        self._monotonic = monotonic
        self._on_poll = on_poll
        self._status = PollStatus()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged_error: str | None = None
        self._failures = 0

    def status(self) -> PollStatus:
        return self._status

    def poll(self) -> PollStatus:
        """Run one poll now (in the caller's thread) and publish its outcome."""
        old = self._status
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
            )
        else:
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
            self._stop.wait(next_slot - now)
        self.reader.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="sockscope-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
