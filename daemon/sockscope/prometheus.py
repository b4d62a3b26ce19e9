"""Prometheus exposition: the collectors, the per-poll render cache and the /metrics app
(served by httpserver.HTTPServer).

This is the only module that imports prometheus_client; it uses only its public API
(collectors, registries, the two `generate_latest` encoders). Format negotiation is ours:
a fixed set of formats, whatever the client sends.

Scrapes never trigger a poll: `SnapshotCollector.collect()` reads the latest published
`PollStatus` once (one reference read, no lock) and turns it into fresh metric families,
so any number of concurrent scrapes see a consistent poll each and cost no netlink work.
"""

from __future__ import annotations

import gzip
import html
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_generate_latest

from sockscope import __version__
from sockscope.httpserver import DROP_REASONS, HTTPServer, Limits, Request, Response
from sockscope.kernelstats import COUNTERS as KERNEL_COUNTERS
from sockscope.kernelstats import SOURCES as KERNEL_SOURCES
from sockscope.kernelstats import TCP_MEM_LEVELS
from sockscope.kernelstats import KernelStats
from sockscope.snapshot import FAMILIES, OTHER, STATES, PollStatus, PortTable, Snapshot

log = logging.getLogger(__name__)

__all__ = [
    "GraphiteCollector", "HTTPCollector", "SnapshotCollector", "PollExposition", "MetricsApp",
    "make_registry", "metrics_server", "negotiate",
]

_LATEST = " Figures are from the latest poll (see sockscope_snapshot_age_seconds); a scrape never triggers a dump."
_QUEUE_NOTE = " LISTEN sockets are excluded (their Recv-Q/Send-Q are the accept queue length and limit)."
_QUEUES = ("receive", "send")
_KERNEL_COUNTER_DOCS = {
    "listen_overflows": "SYNs or completed handshakes dropped because a listener's accept queue was full",
    "listen_drops": "SYNs dropped by listeners for any reason, overflows included",
    "out_resets": "TCP segments sent with the RST flag",
    "estab_resets": "Connections reset from the ESTABLISHED or CLOSE-WAIT state",
    "attempt_fails": "Connection attempts that failed (SYN-SENT/SYN-RECV to CLOSED, or SYN-RECV reset)",
    "retransmitted_segments": "TCP segments retransmitted",
    "active_opens": "Connections opened by connect() (SYN-SENT from CLOSED)",
    "passive_opens": "Connections accepted by listeners (SYN-RECV from LISTEN)",
    "abort_on_data": "Connections reset because the application closed them with unread data or "
                     "data arriving after close",
    "abort_on_timeout": "Connections aborted after too many retransmissions or keepalive probes",
    "syncookies_sent": "SYN cookies sent (the SYN queue of a listener overflowed)",
    # Where the kernel counts each: comments of kernelstats.COUNTERS.
    "in_segments": "TCP segments received, those in error included",
    "out_segments": "TCP segments sent, RSTs and pure ACKs included, retransmissions of data already sent "
                    "excluded (retransmitted SYN-ACKs of half-open connections are counted); the "
                    "retransmission ratio is sockscope_tcp_retransmitted_segments_total over this",
    "in_errors": "TCP segments received in error: a bad checksum (also in "
                 "sockscope_tcp_in_checksum_errors_total), a header length under 20 bytes, or a SYN on a "
                 "synchronized connection, which is answered by a challenge ACK",
    "in_checksum_errors": "TCP segments received with a bad checksum (also in sockscope_tcp_in_errors_total)",
    "syn_retransmits": "SYNs and SYN-ACKs retransmitted (also in sockscope_tcp_retransmitted_segments_total)",
    "timeouts": "Retransmission timer expiries: of connections (SYN-SENT included, zero-window probes "
                "excluded) and of the SYN-ACK timer of half-open connections",
    "syncookies_received": "ACKs carrying a valid SYN cookie, from which a connection is created",
    "syncookies_failed": "ACKs to a listener that sent SYN cookies in the last 2 minutes whose cookie "
                         "was invalid",
    "request_queue_full_drops": "SYNs dropped because the listener's SYN queue (half-open connections) was "
                                "full and SYN cookies were off (net.ipv4.tcp_syncookies=0); also in "
                                "sockscope_tcp_listen_drops_total",
    "backlog_drops": "Segments dropped because the socket was locked by its process and its backlog queue "
                     "was full",
}


def _port_label(port: int | str) -> str:
    return OTHER if port == OTHER else str(port)


def _port_order(table: PortTable) -> list[int]:
    """Row indices of `table`: numeric ports ascending, then OTHER."""
    return sorted(
        range(len(table.ports)),
        key=lambda i: (1, 0) if table.ports[i] == OTHER else (0, int(table.ports[i])),
    )


def _family_order(families: tuple[str, ...]) -> list[str]:
    rank = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(families, key=lambda f: (rank.get(f, len(rank)), f))


class SnapshotCollector:
    """Custom collector exporting the poller's latest `PollStatus`.

    `status` returns the current PollStatus (an immutable object swapped by the poller);
    it is called exactly once per collect() and never from describe(). `stale_after` is
    the age in seconds beyond which sockscope_up drops to 0. `poll_interval` (poll.interval
    in seconds) is exported as sockscope_poll_interval_seconds, from before the first poll
    on, so staleness alerts can scale with it; None leaves the gauge out. `monotonic` is
    injectable for tests, as are the build_info label values.
    """

    def __init__(
        self,
        status: Callable[[], PollStatus],
        stale_after: float,
        monotonic: Callable[[], float] = time.monotonic,
        *,
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
        self._version = version
        self._python_version = python_version

    # -- registry protocol ------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        """Every family this collector can emit, without samples (no status() call)."""
        return list(self._families(None, 0.0))

    def collect(self) -> Iterator[Metric]:
        status = self._status()  # the one read; everything below uses this object
        now = self._monotonic()
        return iter(list(self._families(status, now)))

    # -- building ---------------------------------------------------------------------------

    def _families(self, status: PollStatus | None, now: float) -> Iterator[Metric]:
        """Families in exposition order. status=None means describe(): all families, empty."""
        describing = status is None
        snap: Snapshot | None = None if describing else status.snapshot
        if self._part != "scrape":
            if describing or snap is not None:
                yield from self._socket_families(snap)
                yield from self._peak_families(snap, describing)
            if describing or status.kernel is not None:
                yield from self._kernel_families(None if describing else status.kernel)
        if self._part != "poll":
            yield from self._liveness_families(status, snap, now)
        if self._part != "scrape":
            yield from self._tail_families(status, snap)

    def _liveness_families(self, status: PollStatus | None, snap: Snapshot | None,
                           now: float) -> Iterator[Metric]:
        """sockscope_up and the snapshot age: the only families that change between polls."""
        describing = status is None
        up = GaugeMetricFamily(
            "sockscope_up",
            "1 if the latest successful poll is at most poll.stale_after seconds old, else 0 "
            "(also 0 before the first successful poll).",
        )
        age = None
        if not describing:
            last = status.last_success_monotonic
            if snap is not None and last is not None:
                age = max(0.0, now - last)
            up.add_metric([], 1.0 if age is not None and age <= self._stale_after else 0.0)
        yield up

        if describing or age is not None:
            fam = GaugeMetricFamily(
                "sockscope_snapshot_age_seconds",
                "Seconds since the latest successful poll (monotonic clock); compare with the poll interval.",
            )
            if age is not None:
                fam.add_metric([], age)
            yield fam

    def _tail_families(self, status: PollStatus | None, snap: Snapshot | None) -> Iterator[Metric]:
        describing = status is None
        if describing or self._poll_interval is not None:
            fam = GaugeMetricFamily(
                "sockscope_poll_interval_seconds",
                "Configured seconds between two polls (poll.interval); the snapshot age normally "
                "stays below it plus sockscope_poll_duration_seconds.",
            )
            if not describing:
                fam.add_metric([], self._poll_interval)
            yield fam
        if describing or snap is not None:
            poll_meta = (
                ("sockscope_poll_duration_seconds", "Seconds the latest successful poll took (netlink dump and aggregation).",
                 lambda s: s.duration),
                ("sockscope_poll_sockets", "TCP sockets seen by the latest successful poll (all families and states).",
                 lambda s: s.sockets),
                ("sockscope_last_poll_success_timestamp_seconds",
                 "UNIX time at which the latest successful poll finished.",
                 lambda s: s.timestamp + s.duration),
            )
            for name, doc, value in poll_meta:
                fam = GaugeMetricFamily(name, doc)
                if snap is not None:
                    fam.add_metric([], float(value(snap)))
                yield fam

        counters = (
            ("sockscope_polls", "Polls attempted since start, successful or not.", "polls"),
            ("sockscope_poll_errors", "Polls that failed since start: the table, kernel counters or peaks "
             "could not be read (the previous snapshot is kept) or a consumer of the poll raised.", "errors"),
            ("sockscope_netlink_dump_retries", "sock_diag dumps restarted because the kernel flagged them "
             "inconsistent (NLM_F_DUMP_INTR).", "dump_retries"),
            ("sockscope_netlink_dump_interrupted", "sock_diag dumps accepted while still flagged inconsistent "
             "(NLM_F_DUMP_INTR) after all retries; counts may be slightly off for those polls.", "dump_interrupted"),
        )
        for name, doc, attr in counters:
            fam = CounterMetricFamily(name, doc)
            if not describing:
                fam.add_metric([], float(getattr(status, attr)))
            yield fam

        info = GaugeMetricFamily(
            "sockscope_build_info", "Always 1; labels carry the sockscope and Python versions.",
            labels=("version", "python_version"),
        )
        if not describing:
            info.add_metric([self._version, self._python_version], 1.0)
        yield info

    def _socket_families(self, snap: Snapshot | None) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "sockscope_tcp_sockets",
            "TCP sockets per address family and state (SYN_RECV includes request sockets, as ss "
            "shows them)." + _LATEST,
            labels=("family", "state"),
        )
        if snap is not None:
            for family in _family_order(snap.families):
                for state in STATES:
                    fam.add_metric([family, state], float(snap.states.get((family, state), 0)))
        yield fam

        for side in ("local", "remote"):
            yield from self._port_families(side, None if snap is None else getattr(snap, side))

        listen = (
            ("sockscope_tcp_listen_queue_length",
             "Connections waiting in the accept queue of a listening address (ss -lnt Recv-Q; the "
             "fullest member when several sockets share it with SO_REUSEPORT).",
             lambda lst: lst.queue_length),
            ("sockscope_tcp_listen_queue_limit",
             "Accept queue limit (effective backlog) of a listening address (ss -lnt Send-Q; that of "
             "the fullest member).",
             lambda lst: lst.queue_limit),
            ("sockscope_tcp_listen_sockets",
             "Listening sockets bound to the address (more than 1 with SO_REUSEPORT).",
             lambda lst: lst.members),
        )
        listeners = () if snap is None else sorted(snap.listeners, key=lambda lst: (lst.port, lst.address))
        for name, doc, value in listen:
            fam = GaugeMetricFamily(name, doc + _LATEST, labels=("address", "port"))
            for lst in listeners:
                fam.add_metric([lst.address, str(lst.port)], float(value(lst)))
            yield fam

        fam = GaugeMetricFamily(
            "sockscope_folded_ports",
            "Ports that would have been tracked but exceeded the tracked-port cap and were counted "
            'under port="other".' + _LATEST,
            labels=("side",),
        )
        if snap is not None:
            fam.add_metric(["local"], float(snap.local.folded))
            fam.add_metric(["remote"], float(snap.remote.folded))
        yield fam
        fam = GaugeMetricFamily(
            "sockscope_folded_listeners",
            "Listening addresses beyond the tracked-listener cap, not exported in the "
            "sockscope_tcp_listen_* series." + _LATEST,
        )
        if snap is not None:
            fam.add_metric([], float(snap.folded_listeners))
        yield fam

    def _port_families(self, side: str, table: PortTable | None) -> Iterator[Metric]:
        prefix = f"sockscope_tcp_{side}_port"
        what = f"{side} port"
        order = [] if table is None else _port_order(table)
        labels = [] if table is None else [_port_label(p) for p in table.ports]

        fam = GaugeMetricFamily(
            f"{prefix}_sockets",
            f"TCP sockets per {what} and state, all families; port=\"other\" counts every untracked "
            f"port. Summing over ports gives sockscope_tcp_sockets summed over families." + _LATEST,
            labels=("port", "state"),
        )
        for i in order:
            for state, count in zip(STATES, table.counts[i]):
                fam.add_metric([labels[i], state], float(count))
        yield fam

        scalar = (
            ("receive_queue_bytes", f"Sum of Recv-Q (bytes received, not yet read by the application) "
             f"over the sockets of the {what}.", "receive_bytes"),
            ("send_queue_bytes", f"Sum of Send-Q (bytes sent, not yet acknowledged by the peer) over the "
             f"sockets of the {what}.", "send_bytes"),
            ("receive_queue_max_bytes", f"Largest Recv-Q of a single socket of the {what}.", "receive_max_bytes"),
            ("send_queue_max_bytes", f"Largest Send-Q of a single socket of the {what}.", "send_max_bytes"),
        )
        for suffix, doc, attr in scalar:
            fam = GaugeMetricFamily(f"{prefix}_{suffix}", doc + _QUEUE_NOTE + _LATEST, labels=("port",))
            for i in order:
                fam.add_metric([labels[i]], float(getattr(table.queues[i], attr)))
            yield fam

        fam = GaugeMetricFamily(
            f"{prefix}_backlogged_sockets",
            f"Sockets of the {what} with a non-empty receive (Recv-Q > 0) or send (Send-Q > 0) queue."
            + _QUEUE_NOTE + _LATEST,
            labels=("port", "queue"),
        )
        for i in order:
            q = table.queues[i]
            fam.add_metric([labels[i], "receive"], float(q.receive_backlogged))
            fam.add_metric([labels[i], "send"], float(q.send_backlogged))
        yield fam

    def _peak_families(self, snap: Snapshot | None, describing: bool) -> Iterator[Metric]:
        """Window peaks (sockscope.peaks), absent when poll.peak_window is 0."""
        peaks = None if snap is None else snap.peaks
        if not describing and peaks is None:
            return
        peak_note = (" Largest value seen by any poll within the last sockscope_peak_window_seconds "
                     "(kept between one and 13/12 windows); the same for every scraper, never reset by a scrape.")
        fam = GaugeMetricFamily(
            "sockscope_peak_window_seconds",
            "Window (poll.peak_window) over which the *_peak gauges keep the largest value of any poll.",
        )
        if peaks is not None:
            fam.add_metric([], peaks.window)
        yield fam
        fam = GaugeMetricFamily(
            "sockscope_tcp_sockets_peak", "Peak of sockscope_tcp_sockets." + peak_note,
            labels=("family", "state"),
        )
        if peaks is not None:
            for family in _family_order(snap.families):
                for state in STATES:
                    fam.add_metric([family, state], float(peaks.states.get((family, state), 0)))
        yield fam
        for side in ("local", "remote"):
            fam = GaugeMetricFamily(
                f"sockscope_tcp_{side}_port_sockets_peak",
                f"Peak of sockscope_tcp_{side}_port_sockets per port and state." + peak_note,
                labels=("port", "state"),
            )
            if peaks is not None:
                table, rows = getattr(snap, side), getattr(peaks, side)
                for i in _port_order(table):
                    for state, count in zip(STATES, rows[i]):
                        fam.add_metric([_port_label(table.ports[i]), state], float(count))
            yield fam
        fam = GaugeMetricFamily(
            "sockscope_tcp_listen_queue_length_peak",
            "Peak of sockscope_tcp_listen_queue_length per listening address." + peak_note,
            labels=("address", "port"),
        )
        if peaks is not None:
            for lst in sorted(snap.listeners, key=lambda lst: (lst.port, lst.address)):
                fam.add_metric([lst.address, str(lst.port)],
                               float(peaks.listeners.get((lst.family, lst.address, lst.port), lst.queue_length)))
        yield fam

    def _kernel_families(self, kernel: KernelStats | None) -> Iterator[Metric]:
        """Kernel TCP counters and limits of the watched namespace (sockscope.kernelstats).

        Each family is emitted only with its source readable, so a broken file makes its
        series disappear (and sockscope_kernel_stats_up{source} 0) instead of reading 0.
        """
        describing = kernel is None
        fam = GaugeMetricFamily(
            "sockscope_kernel_stats_up",
            "1 if the kernel statistics source (a /proc file of the watched network namespace) was "
            "read and parsed in the latest poll, else 0. Sources absent on this kernel are not listed.",
            labels=("source",),
        )
        if kernel is not None:
            for source in KERNEL_SOURCES:
                if source in kernel.ok:
                    fam.add_metric([source], 1.0 if kernel.ok[source] else 0.0)
        yield fam
        for _section, field_name, stem in KERNEL_COUNTERS:
            fam = CounterMetricFamily(
                f"sockscope_tcp_{stem}",
                f"{_KERNEL_COUNTER_DOCS[stem]} (nstat {'TcpExt' if _section == 'TcpExt' else 'Tcp'}{field_name}; "
                "since the namespace was created).",
            )
            if kernel is not None and stem in kernel.counters:
                fam.add_metric([], float(kernel.counters[stem]))
            if describing or fam.samples:
                yield fam
        sock = None if kernel is None else kernel.sockstat

        def one(value):  # an unlabelled gauge's samples, None when its source is missing
            return None if value is None else [((), value)]

        tcp_mem = None if kernel is None or kernel.tcp_mem is None else [
            ((level,), pages * kernel.page_size) for level, pages in zip(TCP_MEM_LEVELS, kernel.tcp_mem)]
        gauges = (
            ("sockscope_tcp_orphan_sockets", "TCP sockets no longer attached to a file descriptor "
             "(/proc/net/sockstat TCP orphan; host-wide: the kernel counts orphans globally).", (),
             one(None if sock is None else sock.orphan)),
            ("sockscope_tcp_orphan_sockets_limit", "net.ipv4.tcp_max_orphans (host-wide); beyond it "
             "orphans are reset (\"too many orphaned sockets\" in the kernel log).", (),
             one(None if kernel is None else kernel.max_orphans)),
            ("sockscope_tcp_time_wait_sockets", "TIME-WAIT sockets as the kernel counts them "
             "(/proc/net/sockstat TCP tw).", (), one(None if sock is None else sock.tw)),
            ("sockscope_tcp_time_wait_sockets_limit", "net.ipv4.tcp_max_tw_buckets; beyond it new "
             "TIME-WAIT sockets are destroyed at once (TCPTimeWaitOverflow).", (),
             one(None if kernel is None else kernel.max_tw_buckets)),
            ("sockscope_tcp_memory_bytes", "Memory allocated to TCP socket buffers: /proc/net/sockstat "
             "TCP mem (pages, host-wide) times the page size.", (),
             one(None if sock is None else sock.mem * kernel.page_size)),
            ("sockscope_tcp_memory_bytes_limit", "net.ipv4.tcp_mem (pages, host-wide) times the page size: "
             "above level=\"pressure\" TCP moderates its socket buffers until sockscope_tcp_memory_bytes "
             "falls under level=\"min\"; beyond level=\"max\" TCP memory allocations fail.", ("level",),
             tcp_mem),
            ("sockscope_local_port_range_size", "Ports in net.ipv4.ip_local_port_range (the ephemeral "
             "ports available per destination address:port).", (),
             one(None if kernel is None else kernel.local_port_range_size)),
        )
        for name, doc, labels, samples in gauges:
            fam = GaugeMetricFamily(name, doc, labels=labels)
            for label_values, value in samples or ():
                fam.add_metric(list(label_values), float(value))
            if describing or fam.samples:
                yield fam


class GraphiteCollector:
    """The Graphite pusher's self-metrics. `stats` returns a graphite.GraphiteStats (a
    frozen copy taken under the pusher's lock), or None while Graphite is disabled (no
    samples then); called once per collect()."""

    _COUNTERS = (
        ("sockscope_graphite_sent_lines", "Lines delivered to carbon. TCP: carbon's TCP acknowledged every "
         "byte up to the line's end and, at a check >= 0.5 s later, the connection was open and carbon's "
         "advertised receive window was back at its largest (nothing left unread), or carbon closed the "
         "connection cleanly after acknowledging it. UDP: the kernel accepted the datagram.", "sent_lines"),
        ("sockscope_graphite_send_errors", "Failed connection attempts, failed sends, and connections carbon "
         "closed or reset before confirming what was written on them; those lines are sent again.",
         "send_errors"),
        ("sockscope_graphite_dropped_lines", "Oldest lines dropped because the buffer (graphite.buffer_lines) "
         "was full, never written to carbon: they never reach it.", "dropped_lines"),
        ("sockscope_graphite_dropped_unconfirmed_lines", "Oldest lines dropped because the buffer was full "
         "after they were written to carbon but before carbon confirmed reading them: not sent again, "
         "missing in carbon only if it did not read them.", "dropped_unconfirmed_lines"),
        ("sockscope_graphite_resent_lines", "Lines written to carbon again because the connection they had "
         "been written on failed before carbon confirmed them (carbon may store such a line twice, the "
         "same whisper point).", "resent_lines"),
        ("sockscope_graphite_invalid_lines", "Lines refused before queueing (NaN/inf/bool value, line over "
         "16384 bytes).", "invalid_lines"),
        ("sockscope_graphite_pushes", "Polls rendered and queued for Graphite.", "pushes"),
    )

    def __init__(self, stats: Callable[[], object]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        return iter(() if stats is None else list(self._families(stats)))

    def _families(self, stats) -> Iterator[Metric]:
        for name, doc, attr in self._COUNTERS:
            fam = CounterMetricFamily(name, doc)
            if stats is not None:
                fam.add_metric([], float(getattr(stats, attr)))
            yield fam
        gauges = (
            ("sockscope_graphite_queue_lines", "Lines not yet sent to carbon: waiting, being written, or written "
             "and not yet confirmed.", lambda st: st.queue_lines),
            ("sockscope_graphite_unconfirmed_lines", "Of the queued lines, those written on the current connection "
             "and not yet confirmed read by carbon (sent again if it fails).", lambda st: st.unconfirmed_lines),
            ("sockscope_graphite_queue_capacity_lines", "Size of the buffer in lines (graphite.buffer_lines, "
             "resolved).", lambda st: st.capacity_lines),
            ("sockscope_graphite_last_success_timestamp_seconds", "UNIX time lines were last counted in "
             "sockscope_graphite_sent_lines_total (0 before the first).", lambda st: st.last_success_timestamp),
            ("sockscope_graphite_connected", "1 while a connection (or UDP socket) to carbon is open.",
             lambda st: 1.0 if st.connected else 0.0),
        )
        for name, doc, value in gauges:
            fam = GaugeMetricFamily(name, doc)
            if stats is not None:
                fam.add_metric([], float(value(stats)))
            yield fam


def make_registry(*collectors) -> CollectorRegistry:
    """A private registry (not prometheus_client.REGISTRY) with process, platform and `collectors`."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


class HTTPCollector:
    """The /metrics server's own counters (httpserver.ServerStats from `stats()`, or None
    before the server runs): connections open and dropped, responses by status code."""

    def __init__(self, stats: Callable[[], object]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        return iter(() if stats is None else list(self._families(stats)))

    def _families(self, stats) -> Iterator[Metric]:
        fam = GaugeMetricFamily("sockscope_http_open_connections",
                                "Client connections to the /metrics server open now.")
        if stats is not None:
            fam.add_metric([], float(stats.open_connections))
        yield fam
        fam = GaugeMetricFamily("sockscope_http_max_connections",
                                "Connections the /metrics server keeps open at most (prometheus.max_connections, "
                                "lowered to fit the open-files limit); past it the longest-waiting idle one is closed.")
        if stats is not None:
            fam.add_metric([], float(stats.max_connections))
        yield fam
        fam = CounterMetricFamily("sockscope_http_accepted_connections",
                                  "Client connections accepted by the /metrics server.")
        if stats is not None:
            fam.add_metric([], float(stats.accepted))
        yield fam
        fam = CounterMetricFamily(
            "sockscope_http_dropped_connections",
            "Connections the /metrics server closed without answering, by reason: evicted (the connection cap "
            "was reached and this one had waited longest for a request), request_timeout, idle_timeout, "
            "write_timeout, tls_handshake (failed, too slow, or plain HTTP on the TLS port), accept_error "
            "(out of file descriptors).",
            labels=("reason",))
        if stats is not None:
            for reason in DROP_REASONS:
                fam.add_metric([reason], float(stats.dropped.get(reason, 0)))
        yield fam
        fam = CounterMetricFamily("sockscope_http_responses",
                                  "Responses sent by the /metrics server, by status code.", labels=("code",))
        if stats is not None:
            for code, count in sorted(stats.requests.items()):
                fam.add_metric([str(code)], float(count))
        yield fam


# -- content negotiation --------------------------------------------------------------------

_OM_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_FORMATS = {  # name -> (content type, encoder): a fixed set, so caches keyed by it are bounded
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
                 monotonic: Callable[[], float] = time.monotonic,
                 poll_interval: float | None = None) -> None:
        self._status = status
        self._stale_after = stale_after
        self._monotonic = monotonic
        self._poll_interval = poll_interval
        self.registry = make_registry(
            SnapshotCollector(status, stale_after, monotonic, poll_interval=poll_interval), *extra)
        self._scrape = make_registry(
            SnapshotCollector(status, stale_after, monotonic, part="scrape"), *extra)
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
        registry.register(SnapshotCollector(lambda: status, self._stale_after, self._monotonic,
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
