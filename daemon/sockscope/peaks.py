"""Window peaks: the largest value of each socket gauge seen by any poll in poll.peak_window.

sockscope polls faster than Prometheus scrapes, so a CLOSE-WAIT spike that rises and falls
between two scrapes is seen by some poll; the peak gauges carry it to the next scrape.

Memory and cost are O(series), not O(polls x series): the window is cut into BUCKETS
fixed sub-windows of window/BUCKETS seconds on the monotonic clock; each keeps only the
per-series maximum of the polls that fell into it, and the peak is the max of the bucket
maxima still in the window. A value therefore stays in the peak for at least `window`
and at most `window + window/BUCKETS` seconds after the poll that saw it.

The tracker runs in the poller thread; its result is a frozen `Peaks` stored in the
Snapshot, so every scraper sees the same values and scraping never resets them.

Series follow the live gauges: a peak is exported for exactly the label sets of the
current snapshot. When a port becomes tracked (a new listener with ports.auto_listen) its
peak starts from the polls since then (before, its sockets counted under port="other",
whose peak keeps them for the window); a port that stops being tracked loses its peak
series with its live series, and its bucket entries age out with the window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Hashable

from .snapshot import STATES, PortTable, Snapshot

BUCKETS = 12


@dataclass(frozen=True, slots=True)
class Peaks:
    """Peaks for one Snapshot; shapes mirror the Snapshot's own fields.

    local/remote: one tuple of len(STATES) per row of Snapshot.local/remote (same order).
    listeners: (family, address, port) -> largest accept-queue length.
    """

    window: float
    states: dict[tuple[str, str], int] = field(default_factory=dict)
    local: tuple[tuple[int, ...], ...] = ()
    remote: tuple[tuple[int, ...], ...] = ()
    listeners: dict[tuple[str, str, int], int] = field(default_factory=dict)


class PeakTracker:
    """Keeps per-series bucket maxima; `observe()` folds in a Snapshot and returns its Peaks.

    `window` > 0 seconds. `now` passed to observe() is a monotonic time.
    """

    def __init__(self, window: float, buckets: int = BUCKETS):
        if window <= 0 or buckets < 1:
            raise ValueError("window must be > 0 and buckets >= 1")
        self.window = float(window)
        self.buckets = buckets
        self.width = self.window / buckets
        # (bucket index, {series key: max}) oldest first; at most buckets + 1 entries.
        self._buckets: deque[tuple[int, dict[Hashable, int]]] = deque()

    def series(self) -> int:
        """Entries held over all buckets (for tests of the memory bound)."""
        return sum(len(b) for _, b in self._buckets)

    def _current(self, now: float) -> dict[Hashable, int]:
        index = math.floor(now / self.width)
        while self._buckets and self._buckets[0][0] < index - self.buckets:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != index:
            if self._buckets and self._buckets[-1][0] > index:  # clock went back: start over
                self._buckets.clear()
            self._buckets.append((index, {}))
        return self._buckets[-1][1]

    def observe(self, snap: Snapshot, now: float) -> Peaks:
        current = self._current(now)
        values: dict[Hashable, int] = {}
        for (family, state), n in snap.states.items():
            values[("s", family, state)] = n
        for side, table in (("l", snap.local), ("r", snap.remote)):
            for port, row in zip(table.ports, table.counts):
                for state, n in zip(STATES, row):
                    values[(side, port, state)] = n
        for lst in snap.listeners:
            values[("q", lst.family, lst.address, lst.port)] = lst.queue_length
        for key, n in values.items():
            if current.get(key, -1) < n:
                current[key] = n
        older = [b for _, b in self._buckets if b is not current]

        def peak(key: Hashable) -> int:
            best = current[key]
            for bucket in older:
                v = bucket.get(key)
                if v is not None and v > best:
                    best = v
            return best

        def table_peaks(side: str, table: PortTable) -> tuple[tuple[int, ...], ...]:
            return tuple(
                tuple(peak((side, port, state)) for state in STATES) for port in table.ports
            )

        return Peaks(
            window=self.window,
            states={k: peak(("s", *k)) for k in snap.states},
            local=table_peaks("l", snap.local),
            remote=table_peaks("r", snap.remote),
            listeners={
                (lst.family, lst.address, lst.port): peak(("q", lst.family, lst.address, lst.port))
                for lst in snap.listeners
            },
        )

    def apply(self, snap: Snapshot, now: float) -> Snapshot:
        """`snap` with its `peaks` filled in."""
        return replace(snap, peaks=self.observe(snap, now))
