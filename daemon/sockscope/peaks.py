"""Window peaks: the largest value of each socket gauge seen by any poll in poll.peak_window.

sockscope polls faster than Prometheus scrapes, so a CLOSE-WAIT spike that rises and falls
between two scrapes is seen by some poll; the peak gauges carry it to the next scrape.

Memory and cost are O(series), not O(polls x series): the window is cut into BUCKETS
fixed sub-windows of window/BUCKETS seconds on the monotonic clock; each keeps only the
per-series maximum of the polls that fell into it, and the peak is the max of the bucket
maxima still in the window. A value therefore stays in the peak for at least `window`
and at most `window + window/BUCKETS` seconds after the poll that saw it.

The tracker runs in the poller thread (features/peaks.py); its result is part of the
poll's samples, so every scraper sees the same values and scraping never resets them.

Series follow the live gauges: a peak is exported for exactly the label sets of the
current poll. When a port becomes tracked (a new listener with ports.auto_listen) its
peak starts from the polls since then (before, its sockets counted under port="other",
whose peak keeps them for the window); a port that stops being tracked loses its peak
series with its live series, and its bucket entries age out with the window.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Mapping

BUCKETS = 12


class PeakTracker:
    """Keeps per-series bucket maxima; `observe()` folds in one poll's values and returns
    the peak of each of them over the window.

    `window` > 0 seconds. `now` passed to observe() is a monotonic time.
    """

    def __init__(self, window: float, buckets: int = BUCKETS):
        if window <= 0 or buckets < 1:
            raise ValueError("window must be > 0 and buckets >= 1")
        self.window = float(window)
        self.buckets = buckets
        self.width = self.window / buckets
        # (bucket index, {series key: max}) oldest first; at most buckets + 1 entries.
        self._buckets: deque[tuple[int, dict[Hashable, float]]] = deque()

    def series(self) -> int:
        """Entries held over all buckets (for tests of the memory bound)."""
        return sum(len(b) for _, b in self._buckets)

    def _current(self, now: float) -> dict[Hashable, float]:
        index = math.floor(now / self.width)
        while self._buckets and self._buckets[0][0] < index - self.buckets:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != index:
            if self._buckets and self._buckets[-1][0] > index:  # clock went back: start over
                self._buckets.clear()
            self._buckets.append((index, {}))
        return self._buckets[-1][1]

    def observe(self, values: Mapping[Hashable, float], now: float) -> dict[Hashable, float]:
        """The peak of every key of `values` (this poll's), this poll included."""
        current = self._current(now)
        for key, v in values.items():
            if current.get(key, -math.inf) < v:
                current[key] = v
        older = [b for _, b in self._buckets if b is not current]
        peaks = {}
        for key in values:
            best = current[key]
            for bucket in older:
                seen = bucket.get(key)
                if seen is not None and seen > best:
                    best = seen
            peaks[key] = best
        return peaks
