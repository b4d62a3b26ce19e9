"""Prometheus exposition: the collectors, the per-poll render cache and the /metrics app
(served by httpserver.HTTPServer).

This is the only module that imports prometheus_client; it uses only its public API
(collectors, registries, the two `generate_latest` encoders). Format negotiation is ours:
a fixed set of formats, whatever the client sends.

Scrapes never trigger a poll: `StatusCollector.collect()` reads the latest published
`PollStatus` once (one reference read, no lock) and renders its samples through the
metric catalogue, so any number of concurrent scrapes see a consistent poll each and
cost no netlink work.
"""

from __future__ import annotations

import gzip
import html
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import Metric as PromMetric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_generate_latest

from sockscope import __version__, selfmetrics
from sockscope.catalogue import Metric, Samples
from sockscope.httpserver import DROP_REASONS, HTTPServer, Limits, Request, Response, ServerStats
from sockscope.selfmetrics import POLL_METRICS, SCRAPE_METRICS, poll_samples, scrape_samples
from sockscope.snapshot import PollStatus

log = logging.getLogger(__name__)

__all__ = [
    "HTTP_METRICS", "SamplesCollector", "StatusCollector", "PollExposition", "MetricsApp",
    "families", "http_samples", "make_registry", "metrics_server", "negotiate",
]

def families(samples: Samples) -> Iterator[PromMetric]:
    """prometheus-client metric families of `samples`, in their order (catalogue.Metric:
    name, type, HELP, labels; a counter's name gets its _total from the encoder)."""
    for metric, rows in samples:
        if metric.kind in ("gaugehistogram", "histogram"):
            yield _histogram(metric, rows, samples)
            continue
        base = samples.metrics.get(metric.name.rpartition("_")[0])
        if base is not None and (base.kind, metric.name.rpartition("_")[2]) in _INSIDE:
            continue  # rendered inside its histogram's family
        cls = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
        fam = cls(metric.name, metric.help, labels=metric.labels)
        for labels, value in rows:
            fam.add_metric(list(labels), value)
        yield fam


_INSIDE = {("gaugehistogram", "gcount"), ("gaugehistogram", "gsum"), ("histogram", "count"), ("histogram", "sum")}


def _histogram(metric: Metric, rows: list[tuple[tuple[str, ...], float]], samples: Samples) -> PromMetric:
    """The rows (labels..., le) -> cumulative count, with the sum of the same labels
    (`_gsum` gauge, `_sum` counter), as one (gauge) histogram family (the count is its
    +Inf bucket)."""
    gauge = metric.kind == "gaugehistogram"
    cls = GaugeHistogramMetricFamily if gauge else HistogramMetricFamily
    fam = cls(metric.name, metric.help, labels=metric.labels[:-1])
    total = f"{metric.name}_gsum" if gauge else f"{metric.name}_sum"
    grouped: dict[tuple[str, ...], list[tuple[str, float]]] = {}
    for labels, value in rows:
        grouped.setdefault(labels[:-1], []).append((labels[-1], value))
    for labels, buckets in grouped.items():
        fam.add_metric(list(labels), buckets, samples.value(total, *labels) or 0.0)
    return fam


def empty_families(metrics: Iterable[Metric]) -> list[PromMetric]:
    """Families without samples: what a collector can emit (describe())."""
    return list(families(_declared(metrics)))


def _declared(metrics: Iterable[Metric]) -> Samples:
    out = Samples()
    for m in metrics:
        out.declare(m)
    return out


class StatusCollector:
    """Exports the poller's latest PollStatus through the catalogue.

    `status` returns the current PollStatus (an immutable object swapped by the poller);
    it is called exactly once per collect() and never from describe(). Families in
    exposition order: the features' samples (PollStatus.samples), sockscope_up and the
    snapshot age (part "scrape": they change between polls), then the poll loop's own
    series (selfmetrics). `metrics` lists every metric the enabled features can emit
    (for describe()); `stale_after` is the age beyond which sockscope_up drops to 0;
    `poll_interval` is exported as sockscope_poll_interval_seconds (None: left out).
    """

    def __init__(
        self,
        status: Callable[[], PollStatus],
        stale_after: float,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        metrics: Iterable[Metric] = (),
        version: str = __version__,
        python_version: str = platform.python_version(),
        part: str = "all",
        poll_interval: float | None = None,
    ) -> None:
        if part not in ("all", "poll", "scrape"):
            raise ValueError(f"part must be all, poll or scrape, not {part!r}")
        self._part = part  # "poll": what one PollStatus fixes; "scrape": up and age only
        self._status = status
        self._stale_after = float(stale_after)
        self._poll_interval = None if poll_interval is None else float(poll_interval)
        self._monotonic = monotonic
        self._metrics = tuple(metrics)
        self._version = version
        self._python_version = python_version

    def describe(self) -> list[PromMetric]:
        metrics: list[Metric] = []
        if self._part != "scrape":
            metrics += self._metrics
        if self._part != "poll":
            metrics += SCRAPE_METRICS
        if self._part != "scrape":
            metrics += [m for m in POLL_METRICS if m is not selfmetrics.INTERVAL or self._poll_interval is not None]
        return empty_families(metrics)

    def collect(self) -> Iterator[PromMetric]:
        status = self._status()  # the one read; everything below uses this object
        now = self._monotonic()
        out = Samples()
        if self._part != "scrape":
            out.merge(status.samples)
        if self._part != "poll":
            out.merge(scrape_samples(status, self._stale_after, now))
        if self._part != "scrape":
            out.merge(poll_samples(status, self._poll_interval, version=self._version,
                                   python_version=self._python_version))
        return iter(list(families(out)))


class SamplesCollector:
    """A collector of the Samples `samples()` returns at each scrape (None: nothing), for
    the parts of the daemon that count on their own (the Graphite pusher, the HTTP server);
    `metrics` for describe()."""

    def __init__(self, samples: Callable[[], Samples | None], metrics: Iterable[Metric]) -> None:
        self._samples = samples
        self._metrics = tuple(metrics)

    def describe(self) -> list[PromMetric]:
        return empty_families(self._metrics)

    def collect(self) -> Iterator[PromMetric]:
        samples = self._samples()
        return iter(() if samples is None else list(families(samples)))


def make_registry(*collectors) -> CollectorRegistry:
    """A private registry (not prometheus_client.REGISTRY) with process, platform and `collectors`."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


HTTP_OPEN = Metric("sockscope_http_open_connections", "gauge", "Client connections to the /metrics server open now.")
HTTP_MAX = Metric("sockscope_http_max_connections", "gauge",
                  "Connections the /metrics server keeps open at most (prometheus.max_connections, fitted to "
                  "the open-files limit).")
HTTP_ACCEPTED = Metric("sockscope_http_accepted_connections", "counter", "Client connections accepted by the /metrics server.")
HTTP_DROPPED = Metric("sockscope_http_dropped_connections", "counter",
                      "Connections the /metrics server closed without answering, by reason (docs/service.md).",
                      ("reason",))
HTTP_RESPONSES = Metric("sockscope_http_responses", "counter", "Responses sent by the /metrics server, by status code.",
                        ("code",))
HTTP_METRICS = (HTTP_OPEN, HTTP_MAX, HTTP_ACCEPTED, HTTP_DROPPED, HTTP_RESPONSES)


def http_samples(stats: ServerStats | None) -> Samples | None:
    """The /metrics server's own counters (None before the server runs)."""
    if stats is None:
        return None
    out = Samples()
    out.add(HTTP_OPEN, (), stats.open_connections)
    out.add(HTTP_MAX, (), stats.max_connections)
    out.add(HTTP_ACCEPTED, (), stats.accepted)
    for reason in DROP_REASONS:
        out.add(HTTP_DROPPED, (reason,), stats.dropped.get(reason, 0))
    for code, count in sorted(stats.requests.items()):
        out.add(HTTP_RESPONSES, (str(code),), count)
    return out


# -- content negotiation --------------------------------------------------------------------

_OM_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# name -> (content type, encoder): a fixed set, so caches keyed by it are bounded
_FORMATS: dict[str, tuple[str, Callable[[Any], bytes]]] = {
    "text": (_TEXT_CONTENT_TYPE, generate_latest),
    "openmetrics": (_OM_CONTENT_TYPE, openmetrics_generate_latest),
}


def _version_at_least_1(text: str) -> bool:
    parts = text.split(".")
    return all(p.isascii() and p.isdigit() for p in parts) and int(parts[0]) >= 1


def negotiate(accept: str | None) -> str:
    """The exposition format for an Accept header: "openmetrics" when the client ranks
    OpenMetrics 1.x (or OpenMetrics without a version) at least as high as the text
    format, else "text" (text 0.0.4, also for anything unknown or malformed: never an
    error). The version served is always 1.0.0, whatever version the client named."""
    best, best_q = "text", -1.0
    for media_range in (accept or "").split(","):
        kind, *params = (p.strip() for p in media_range.split(";"))
        kind = kind.lower()
        q, version = 1.0, None
        for param in params:
            key, _, value = param.partition("=")
            key = key.strip().lower()
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            elif key == "version":
                version = value.strip()
        if not 0.0 < q <= 1.0:
            continue
        if kind == "application/openmetrics-text" and (version is None or _version_at_least_1(version)):
            fmt = "openmetrics"
        elif kind in ("text/plain", "text/*", "*/*"):
            fmt = "text"
        else:
            continue
        if q > best_q:
            best, best_q = fmt, q
    return best


def _gzip_accepted(accept_encoding: str | None) -> bool:
    for coding in (accept_encoding or "").split(","):
        name, _, params = coding.partition(";")
        if name.strip().lower() == "gzip":
            q = params.strip().lower()
            return q not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


_MAX_NAME_FILTERS = 100


class PollExposition:
    """/metrics bodies with the per-poll part rendered once per poll.

    Rendering the socket families costs tens of ms at the default caps (formatting
    thousands of samples in Python) and holds the GIL meanwhile, which delays the poller
    (it gives the GIL up for every ~32 KiB netlink read). So the families that one
    PollStatus fixes are rendered once per PollStatus and format, kept as bytes (and as
    a gzip member), and every scrape renders only what changes between polls: sockscope_up,
    the snapshot age, the process and platform collectors, `extra` collectors. A body is
    the cached part followed by the fresh part: each family appears once. gzip bodies are
    two gzip members back to back (RFC 1952 allows it; Go's and Python's readers read
    both). `?name[]=` filtered scrapes are rendered whole from `registry`.
    The cache holds at most one entry per (format, gzip): 4 bodies of the latest poll.
    """

    def __init__(self, status: Callable[[], PollStatus], stale_after: float, *extra,
                 metrics: Iterable[Metric] = (), monotonic: Callable[[], float] = time.monotonic,
                 poll_interval: float | None = None) -> None:
        self._status = status
        self._stale_after = stale_after
        self._monotonic = monotonic
        self._poll_interval = poll_interval
        self._metrics = tuple(metrics)
        self.registry = make_registry(
            StatusCollector(status, stale_after, monotonic, metrics=self._metrics, poll_interval=poll_interval),
            *extra)
        self._scrape = make_registry(
            StatusCollector(status, stale_after, monotonic, part="scrape"), *extra)
        self._lock = threading.Lock()
        self._key: PollStatus | None = None
        self._cache: dict[tuple[str, bool], bytes] = {}

    def _poll_part(self, status: PollStatus, fmt: str, gz: bool) -> bytes:
        with self._lock:
            if self._key is not status:
                self._key, self._cache = status, {}
            body = self._cache.get((fmt, gz))
        if body is not None:
            return body
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatusCollector(lambda: status, self._stale_after, self._monotonic,
                                          part="poll", poll_interval=self._poll_interval))
        body = _FORMATS[fmt][1](registry)
        if body.endswith(_OM_EOF):  # OpenMetrics: one "# EOF", at the very end
            body = body[: -len(_OM_EOF)]
        if gz:
            body = gzip.compress(body)
        with self._lock:
            if self._key is status:
                self._cache[(fmt, gz)] = body
        return body

    def render(self, fmt: str, gz: bool, names: list[str] | None = None) -> tuple[bytes, ...]:
        """The body of one scrape, as parts to send back to back."""
        if names is not None:
            return (_encode(self.registry.restricted_registry(names), fmt, gz),)
        head = self._poll_part(self._status(), fmt, gz)
        tail = _FORMATS[fmt][1](self._scrape)
        return head, gzip.compress(tail) if gz else tail


_OM_EOF = b"# EOF\n"


def _encode(registry, fmt: str, gz: bool) -> bytes:
    body = _FORMATS[fmt][1](registry)
    return gzip.compress(body) if gz else body


# -- the /metrics application ---------------------------------------------------------------

_LANDING = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>sockscope</title></head>
<body>
<h1>sockscope {version}</h1>
<p>TCP socket states, queues and listen backlogs per port, from sock_diag.</p>
<p><a href="/metrics">Metrics</a></p>
</body>
</html>
"""
_TEXT = ("Content-Type", "text/plain; charset=utf-8")


class MetricsApp:
    """/metrics (negotiated text 0.0.4 / OpenMetrics 1.0.0, gzip, `?name[]=` filters), the
    landing page at /, 404 elsewhere. `source` is a PollExposition (the daemon) or any
    collector/registry (tests), read once per request so it can be swapped."""

    def __init__(self, source) -> None:
        self.source = source

    def __call__(self, req: Request) -> Response:
        if req.path == "/metrics":
            return self._metrics(req)
        if req.path == "/":
            body = _LANDING.format(version=html.escape(__version__)).encode()
            return Response(200, [("Content-Type", "text/html; charset=utf-8")], body)
        return Response(404, [_TEXT], b"404 page not found\n")

    def _metrics(self, req: Request) -> Response:
        fmt = negotiate(req.header("accept"))
        gz = _gzip_accepted(req.header("accept-encoding"))
        names = None
        if req.query:
            try:
                params = parse_qs(req.query, max_num_fields=_MAX_NAME_FILTERS)
            except ValueError:
                return Response(400, [_TEXT], f"at most {_MAX_NAME_FILTERS} query parameters\n".encode())
            names = params.get("name[]")
        source = self.source
        if isinstance(source, PollExposition):
            body = source.render(fmt, gz, names)
        else:
            body = (_encode(source if names is None else source.restricted_registry(names), fmt, gz),)
        headers = [("Content-Type", _FORMATS[fmt][0])]
        if gz:
            headers.append(("Content-Encoding", "gzip"))
        return Response(200, headers, body)


def metrics_server(source, host: str, port: int, *, web=None, limits: Limits = Limits(),
                   yield_to: Callable[[], None] | None = None) -> HTTPServer:
    """The /metrics HTTP server for `source` (a PollExposition or a registry); not started."""
    return HTTPServer(MetricsApp(source), host, port, web=web, limits=limits,
                      server_header=f"sockscope/{__version__}", yield_to=yield_to)
