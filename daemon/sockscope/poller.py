"""The poll loop: every interval, one dump per protocol the features need plus the
sources that need no dump, one immutable PollStatus swapped in per poll.

A poll (Poller.poll): the features that read on their own (kernel counters), then one
dump per protocol (the union of the features' needs: one walk of the kernel's table
serves them all; each batch goes to every fold that asked for it), then each feature's
samples, then the features that work on samples (window peaks). Each source is timed and
caught here, in one place: sockscope_source_up{source} / _duration_seconds{source}.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

from .aggregate import Rules
from .catalogue import Samples
from .features import DumpNeed, DumpStats, Feature, PollContext
from .features.tcp import TcpSockets
from .health import Problems, clip
from .netlink import NetlinkError, Reader
from .snapshot import PollStatus, Snapshot, SourceHealth

log = logging.getLogger(__name__)

PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}


def merge_needs(features: Sequence[Feature]) -> dict[int, DumpNeed]:
    """One DumpNeed per protocol: the union of the features' states, extensions and
    attributes."""
    merged: dict[int, DumpNeed] = {}
    for f in features:
        need = f.needs()
        if need is None:
            continue
        have = merged.get(need.protocol)
        if have is None:
            merged[need.protocol] = need
        else:
            merged[need.protocol] = DumpNeed(
                need.protocol, have.states | need.states, have.ext | need.ext,
                tuple(dict.fromkeys(have.attributes + need.attributes)))
    return merged


def dump_into(reader: Reader, features: Sequence[Feature], ctx: PollContext,
              need: DumpNeed | None = None) -> tuple[dict[str, Any], int, int]:
    """One dump of `reader` folded by every feature in `features` (they share its
    protocol). Returns ({feature name: result}, retries, interrupted). Raises NetlinkError."""
    folds: dict[str, Any] = {}
    attributes = need.attributes if need is not None else ()

    def start() -> Callable[[Any], None]:
        # Fresh folds per attempt: an interrupted dump is thrown away whole.
        folds.clear()
        folds.update({f.name: f.fold(ctx) for f in features})
        active = list(folds.values())

        def sink(batch) -> None:
            if attributes:
                batch.attributes(attributes)  # located once, shared by every fold
            for fold in active:
                fold.add(batch)
        return sink

    stats = reader.poll(start)
    done = DumpStats(stats.families, stats.messages, stats.retries, stats.interrupted)
    return {name: fold.finish(done) for name, fold in folds.items()}, stats.retries, stats.interrupted


def poll_once(
    reader: Reader,
    rules: Rules,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> tuple[Snapshot, int]:
    """One TCP dump aggregated into a Snapshot (one-shot use: CLI, tests). Returns
    (snapshot, dump retries). Raises NetlinkError."""
    started = monotonic()
    feature = TcpSockets(rules, reader.families)
    results, retries, _ = dump_into(reader, [feature], PollContext(clock(), started))
    return replace(results["tcp"], duration=monotonic() - started), retries


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


_LOOP_RETRY = 1.0  # seconds the loop waits after a failure of its own schedule


def samples_of(features: Sequence[Feature], results: Mapping[str, Any], ctx: PollContext,
               fresh: bool, failed: Callable[[str, Exception], None] | None = None,
               monotonic: Callable[[], float] = time.monotonic) -> tuple[Samples, dict[str, float]]:
    """Every feature's samples in exposition order; then those made from them. A feature
    that raises is left out and reported to `failed(name, exception)` (raised without it).
    Also returns the seconds each feature took here."""
    per: dict[str, Samples] = {}
    took: dict[str, float] = {}

    def guarded(feature: Feature, make: Callable[[], Samples | None]) -> None:
        started = monotonic()
        try:
            out = make()
        except Exception as e:  # noqa: BLE001 - one feature must not take the others down
            if failed is None:
                raise
            per.pop(feature.name, None)
            failed(feature.name, e)
            return
        finally:
            took[feature.name] = took.get(feature.name, 0.0) + monotonic() - started
        if out is not None:
            per[feature.name] = out

    def sampled(feature: Feature, result: Any) -> Samples:
        out = Samples()
        feature.samples(result, out)
        return out

    for feature in features:
        result = results.get(feature.name)
        if result is not None:
            guarded(feature, partial(sampled, feature, result))
    merged = Samples()
    for part in per.values():
        merged.merge(part)
    for feature in features:
        guarded(feature, partial(feature.after, merged, ctx, fresh))
    ordered = Samples()
    for feature in features:
        if feature.name in per:
            ordered.merge(per[feature.name])
    return ordered, took


class Poller:
    """Polls every `interval` seconds in its own thread and publishes a PollStatus.

    `features` (features.build) in exposition order; `readers` one netlink.Reader per
    protocol the features need (their merged needs, merge_needs). Any exception in a poll
    is caught here: a failed source leaves its series out (a sticky feature keeps its last
    good result) and says so in sources; the primary source (the TCP dump) failing, or a
    consumer (on_poll) raising, is a failed poll, counted in PollStatus.errors. Each
    distinct error message is logged once (at ERROR; unexpected exceptions with their
    traceback) until a poll succeeds again, and recovery is logged once (at INFO). Missed
    slots are skipped, never caught up in a burst.

    The loop itself survives any Exception; only a BaseException (SystemExit raised by a
    callee) can end the thread, and `ended_unexpectedly` then says so: the daemon's main
    loop checks it every second and exits with status 1 (docs/service.md).
    """

    def __init__(
        self,
        features: Sequence[Feature],
        readers: Mapping[int, Reader],
        interval: float,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_poll: Callable[[PollStatus], None] | None = None,
        gate: DumpGate | None = None,
        name: str = "",
    ):
        self.name = name  # prefixes its log lines (a sweep's lane: "netns NAME")
        self.features = list(features)
        self.readers = dict(readers)
        self.gate = gate or DumpGate(0.0)  # the HTTP server defers to the dump through it
        self.interval = interval
        self._clock = clock
        self._monotonic = monotonic
        self._on_poll = on_poll
        self._status = PollStatus()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and reconfigure()
        self._pending: dict[str, Any] = {}  # attribute -> new value, see reconfigure()
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Each distinct failure logged once, recovery once: the poll's, each source's.
        self._problems = Problems(log, name, recovery=("{what}: " if name else "") + "poll recovered after {n} failed polls")
        self._sources: dict[str, Problems] = {}

    def status(self) -> PollStatus:
        return self._status

    def poll(self) -> PollStatus:
        """Run one poll now (in the caller's thread), publish its outcome, hand it to
        on_poll. Never raises an Exception."""
        old = self._status
        ctx = PollContext(self._clock(), self._monotonic())
        sources: dict[str, SourceHealth] = {}
        results: dict[str, Any] = {}
        failure: Exception | None = None
        retries = interrupted = 0
        source_errors = dict(old.source_errors)

        def source_failed(name: str, e: Exception, took: float = 0.0) -> None:
            self._source_failed(name, e)
            source_errors[name] = source_errors.get(name, 0) + 1
            sources[name] = SourceHealth(False, took)
        try:
            self._apply_pending()
            features = self.features
            needs = merge_needs(features)
            results = {f.name: r for f in features if f.sticky and (r := old.results.get(f.name)) is not None}
            for feature in features:
                if feature.reads():
                    started = self._monotonic()
                    try:
                        result = feature.read(ctx)
                    except Exception as e:  # noqa: BLE001 - a source fails on its own
                        took = self._monotonic() - started
                        if not feature.sticky:
                            results.pop(feature.name, None)
                        if feature.primary:  # a sweep in which every namespace failed
                            failure = e
                            source_errors[feature.name] = source_errors.get(feature.name, 0) + 1
                            sources[feature.name] = SourceHealth(False, took)
                        else:
                            source_failed(feature.name, e, took)
                        continue
                    if result is not None:
                        results[feature.name] = result
                    self._source_ok(feature.name)
                    sources[feature.name] = SourceHealth(True, self._monotonic() - started)
            for protocol, reader in self.readers.items():
                sharing = [f for f in features if (n := f.needs()) is not None and n.protocol == protocol]
                label = PROTOCOL_NAMES.get(protocol, str(protocol))
                started = self._monotonic()
                try:
                    with self.gate.dumping(min(self.interval * DUMP_PRIORITY_SHARE, MAX_DUMP_PRIORITY)):
                        got, r, i = dump_into(reader, sharing, ctx, needs.get(protocol))
                except Exception as e:  # noqa: BLE001 - counted below
                    for f in sharing:
                        if not f.sticky:
                            results.pop(f.name, None)
                    took = self._monotonic() - started
                    if any(f.primary for f in sharing):
                        failure = e  # a failed poll: counted and logged as such
                        source_errors[label] = source_errors.get(label, 0) + 1
                        sources[label] = SourceHealth(False, took)
                    else:
                        source_failed(label, e, took)
                    continue
                self._source_ok(label)
                took = self._monotonic() - started
                sources[label] = SourceHealth(True, took)
                retries += r
                interrupted += i
                for name, result in got.items():
                    results[name] = replace(result, duration=took) if isinstance(result, Snapshot) else result
            samples, took_here = samples_of(features, results, ctx, fresh=failure is None,
                                            failed=source_failed, monotonic=self._monotonic)
            for name, seconds in took_here.items():
                if name not in sources:  # features that work on samples only
                    sources[name] = SourceHealth(True, seconds)
                if sources[name].up:
                    self._source_ok(name)
        except Exception as e:  # noqa: BLE001 - any failure keeps the daemon serving
            failure = e
            samples = old.samples
            results = dict(old.results)
        if failure is not None:
            message = self._failed("poll failed", failure)
            new = PollStatus(
                results=results, samples=samples, sources=sources, source_errors=source_errors,
                last_success_monotonic=old.last_success_monotonic,
                polls=old.polls + 1, errors=old.errors + 1,
                dump_retries=old.dump_retries + retries, dump_interrupted=old.dump_interrupted,
                last_error=message,
            )
        else:
            new = PollStatus(
                results=results, samples=samples, sources=sources, source_errors=source_errors,
                last_success_monotonic=self._monotonic(),
                polls=old.polls + 1, errors=old.errors,
                dump_retries=old.dump_retries + retries, dump_interrupted=old.dump_interrupted + interrupted,
                last_error=None,
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
        if consumed and new.last_error is None:
            self._problems.ok()
        return new

    def _failed(self, what: str, e: Exception) -> str:
        """Count a failed poll, log its message once; the message for last_error."""
        message = clip(str(e) or type(e).__name__)
        if what != "poll failed":
            message = f"{what}: {message}"
        expected = isinstance(e, NetlinkError) or (isinstance(e, ConsumerError) and e.__cause__ is None)
        self._problems.failed(message if what != "poll failed" else f"poll failed: {message}",
                              traceback=None if expected else e)
        return message

    def _source_failed(self, name: str, e: Exception) -> None:
        problems = self._sources.get(name)
        if problems is None:
            problems = self._sources[name] = Problems(log, f"{self.name + ': ' if self.name else ''}{name} source failed")
        problems.failed(e, traceback=None if isinstance(e, (NetlinkError, OSError)) else e)

    def _source_ok(self, name: str) -> None:
        problems = self._sources.get(name)
        if problems is not None:
            problems.ok()

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as e:
            log.critical("the poll loop ended on %s: %s", type(e).__name__, e)
            raise
        finally:
            for reader in self.readers.values():
                self._close(reader)
            for feature in self.features:
                self._close(feature)

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
    def _close(resource: Any) -> None:
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
        """Replace attributes (features, readers, interval) at the top of the next poll.

        Safe from any thread: the poller thread makes the swap, closes each replaced
        object that has close() (a Reader is not thread-safe; features and readers in a
        replaced list that are not in the new one), and polls at once.
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
            if isinstance(old, (list, dict)):
                olds = old.values() if isinstance(old, dict) else old
                news = value.values() if isinstance(value, dict) else value
                keep = {id(v) for v in news}
                replaced += [o for o in olds if id(o) not in keep]
            elif old is not None and old is not value and callable(getattr(old, "close", None)):
                replaced.append(old)
        for old in replaced:  # every change is in place before any close can fail
            self._close(old)

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
