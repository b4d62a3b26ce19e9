"""The metric catalogue: every series sockscope exports, written once.

A `Metric` says what a series is (name, type, one-line HELP, labels), whether window
peaks track it, and how Graphite writes it in each naming. Features declare their
metrics and produce `Samples` for them; the Prometheus exposition, the Graphite lines,
the series-count bound and the docs test all read this one catalogue.

Graphite paths (docs/graphite.md):
- naming "sockscope": `<prefix>.` + `sockscope` components, `{label}` replaced by the
  label's value (sanitised); with tags: `<prefix>.<tag_name>;label=value...;host=<host>`,
  the tag name being the metric name without `sockscope_`, first `_` made a `.`.
- naming "collectd": `collectd` components where collectd writes an equivalent (its
  tcpconns plugin), `{STATE}` being collectd's spelling of the state; samples with a label
  value collectd cannot have (port="other") are not written. `collectd_total` sums the
  samples over the labels it leaves out (tcpconns' `all` summary). Metrics without a
  collectd equivalent are written under `<host>.sockscope.` + their `sockscope` path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["GraphitePath", "Metric", "Samples", "peak_metric", "NOT_PUSHED"]


@dataclass(frozen=True, slots=True)
class GraphitePath:
    sockscope: tuple[str, ...]
    collectd: tuple[str, ...] | None = None
    collectd_total: tuple[str, ...] | None = None


NOT_PUSHED = None  # Metric.graphite for series Graphite does not get (liveness, build info)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str  # the Prometheus name; a counter's without "_total" (the exposition adds it)
    # "gauge" | "counter" | "gaugehistogram": the cumulative `_bucket{le}` rows of a
    # histogram of this poll (OpenMetrics gauge histogram; text 0.0.4 says histogram); its
    # count and sum are the gauges "<name>_gcount" and "<name>_gsum", which Prometheus
    # renders inside the family and Graphite writes like any gauge. | "histogram": the same
    # rows as counters since the start (observations accumulate; `rate()` applies), its
    # count and sum the counters "<name>_count" and "<name>_sum" (catalogue names as they
    # are: no "_total"), rendered inside the family.
    kind: str
    help: str  # one line: what it is
    labels: tuple[str, ...] = ()
    graphite: GraphitePath | None = NOT_PUSHED
    peak: bool = False  # window peaks: a gauge "<name>_peak" with the same labels

    def __post_init__(self) -> None:
        if self.kind not in ("gauge", "counter", "gaugehistogram", "histogram"):
            raise ValueError(f"{self.name}: kind {self.kind!r}")
        if self.kind in ("gaugehistogram", "histogram") and self.labels[-1:] != ("le",):
            raise ValueError(f"{self.name}: a histogram's last label is le")
        if self.peak and self.kind != "gauge":
            raise ValueError(f"{self.name}: peaks are kept for gauges only")
        if "\n" in self.help:
            raise ValueError(f"{self.name}: HELP is one line")

    @property
    def tag_name(self) -> str:
        return self.name.removeprefix("sockscope_").replace("_", ".", 1)


def peak_metric(metric: Metric) -> Metric:
    """The window-peak twin of a gauge (sockscope.peaks); in Graphite under `peak.`."""
    return Metric(
        f"{metric.name}_peak", "gauge",
        f"Largest {metric.name} of any poll in the last sockscope_peak_window_seconds.",
        metric.labels,
        None if metric.graphite is None else GraphitePath(("peak", *metric.graphite.sockscope)),
    )


@dataclass(slots=True)
class Samples:
    """The samples of one poll (or one scrape), per metric, in the order added.

    `series[name]` lists (label values, value) for Metric `name`; a metric present with no
    sample is exported as an empty family (HELP and TYPE only); an absent one not at all
    (e.g. a failed source's)."""

    metrics: dict[str, Metric] = field(default_factory=dict)
    series: dict[str, list[tuple[tuple[str, ...], float]]] = field(default_factory=dict)

    def declare(self, metric: Metric) -> list[tuple[tuple[str, ...], float]]:
        if metric.name not in self.series:
            self.metrics[metric.name] = metric
            self.series[metric.name] = []
        return self.series[metric.name]

    def add(self, metric: Metric, labels: tuple[str, ...], value: float) -> None:
        if len(labels) != len(metric.labels):
            raise ValueError(f"{metric.name}: labels {labels} do not match {metric.labels}")
        self.declare(metric).append((labels, float(value)))

    def extend(self, metric: Metric, rows: Iterable[tuple[tuple[str, ...], float]]) -> None:
        target = self.declare(metric)
        for labels, value in rows:
            target.append((labels, float(value)))

    def merge(self, other: Samples) -> None:
        for name, rows in other.series.items():
            self.declare(other.metrics[name]).extend(rows)  # already checked and float

    def __iter__(self) -> Iterator[tuple[Metric, list[tuple[tuple[str, ...], float]]]]:
        for name, rows in self.series.items():
            yield self.metrics[name], rows

    def get(self, name: str) -> list[tuple[tuple[str, ...], float]]:
        return self.series.get(name, [])

    def value(self, name: str, *labels: str) -> float | None:
        for got, value in self.series.get(name, ()):
            if got == labels:
                return value
        return None
