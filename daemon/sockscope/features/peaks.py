"""Window peaks: for every gauge whose Metric says `peak`, the largest value any poll saw
in poll.peak_window (peaks.PeakTracker: fixed sub-window buckets, memory O(series)).

Works on the other features' samples after each poll. Peaks move only with a good
primary poll (a failed TCP dump keeps the last good snapshot, and its peaks with it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from ..catalogue import GraphitePath, Metric, Samples, peak_metric
from ..peaks import PeakTracker
from .base import Feature, PollContext

__all__ = ["WindowPeaks", "WINDOW"]

WINDOW = Metric("sockscope_peak_window_seconds", "gauge",
                "Window (poll.peak_window) over which the *_peak gauges keep the largest value of any poll.",
                (), GraphitePath(("peak", "window_seconds")))


class WindowPeaks(Feature):
    name = "peaks"
    sticky = True

    def __init__(self, window: float, tracked: list[Metric]) -> None:
        self.tracker = PeakTracker(window)
        self._last: Samples | None = None
        self.retrack(tracked)

    def retrack(self, metrics: list[Metric]) -> None:
        """Track the peak metrics among `metrics` (after a reload rebuilt other features;
        the buckets, keyed by metric and labels, carry on)."""
        self.tracked = [m for m in metrics if m.peak]
        self._twins = {m.name: peak_metric(m) for m in self.tracked}
        self.metrics = (WINDOW, *self._twins.values())

    def after(self, samples: Samples, ctx: PollContext, fresh: bool) -> Samples | None:
        if not fresh:
            return self._last  # no peaks before the first good poll; then the last good ones
        values: dict[Hashable, float] = {}
        for metric in self.tracked:
            for labels, value in samples.get(metric.name):
                values[(metric.name, labels)] = value
        peaks = self.tracker.observe(values, ctx.monotonic)
        out = Samples()
        out.add(WINDOW, (), self.tracker.window)
        for metric in self.tracked:
            if metric.name not in samples.series:
                continue  # its feature is off or its source failed
            rows = out.declare(self._twins[metric.name])
            for labels, _ in samples.get(metric.name):
                rows.append((labels, float(peaks[(metric.name, labels)])))
        self._last = out
        return self._last

    def max_series(self, others: Sequence[Feature] = ()) -> int:
        return 1 + sum(f.max_peak_series() for f in others)
