"""Kernel TCP counters and limits of the watched namespace: a source that needs no dump.

kernelstats.KernelStatsReader reads /proc/net/{snmp,netstat,sockstat} and sysctls every
poll (opened once in the namespace, pread each poll); this feature turns a KernelStats into
samples. A source (file) that failed leaves its series out, and
sockscope_kernel_stats_up{source} says which; the read as a whole is the `kernel` source
of sockscope_source_up.
"""

from __future__ import annotations

from ..catalogue import GraphitePath, Metric, Samples
from ..kernelstats import COUNTERS, SOURCES, TCP_MEM_LEVELS, KernelStats, KernelStatsReader
from .base import Feature, PollContext

__all__ = ["KernelCounters", "METRICS"]

COUNTER_DOCS = {
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


UP = Metric("sockscope_kernel_stats_up", "gauge",
            "1 if the /proc file or sysctl `source` of the watched namespace was read and parsed in the latest "
            "poll, else 0; sources this kernel lacks are not listed.", ("source",),
            GraphitePath(("kernel", "up", "{source}")))


def _nstat(section: str, field: str) -> str:
    return f"{'TcpExt' if section == 'TcpExt' else 'Tcp'}{field}"


COUNTER_METRICS = {
    stem: Metric(f"sockscope_tcp_{stem}", "counter", f"{COUNTER_DOCS[stem]} (nstat {_nstat(section, field)}).",
                 (), GraphitePath(("tcp", "kernel", stem)))
    for section, field, stem in COUNTERS
}
ORPHANS = Metric("sockscope_tcp_orphan_sockets", "gauge",
                 "TCP sockets no longer attached to a file descriptor (/proc/net/sockstat orphan; host-wide).",
                 (), GraphitePath(("tcp", "kernel", "orphan_sockets")))
ORPHANS_LIMIT = Metric("sockscope_tcp_orphan_sockets_limit", "gauge",
                       "net.ipv4.tcp_max_orphans (host-wide): beyond it orphans are reset.",
                       (), GraphitePath(("tcp", "kernel", "orphan_sockets_limit")))
TIME_WAIT = Metric("sockscope_tcp_time_wait_sockets", "gauge",
                   "TIME-WAIT sockets as the kernel counts them (/proc/net/sockstat tw).",
                   (), GraphitePath(("tcp", "kernel", "time_wait_sockets")))
TIME_WAIT_LIMIT = Metric("sockscope_tcp_time_wait_sockets_limit", "gauge",
                         "net.ipv4.tcp_max_tw_buckets: beyond it new TIME-WAIT sockets are destroyed at once.",
                         (), GraphitePath(("tcp", "kernel", "time_wait_sockets_limit")))
MEMORY = Metric("sockscope_tcp_memory_bytes", "gauge",
                "Memory of TCP socket buffers (/proc/net/sockstat mem pages, host-wide) in bytes.",
                (), GraphitePath(("tcp", "kernel", "memory_bytes")))
MEMORY_LIMIT = Metric("sockscope_tcp_memory_bytes_limit", "gauge",
                      "net.ipv4.tcp_mem in bytes (host-wide): TCP moderates buffers above pressure, fails "
                      "allocations beyond max.", ("level",),
                      GraphitePath(("tcp", "kernel", "memory_bytes_limit", "{level}")))
PORT_RANGE = Metric("sockscope_local_port_range_size", "gauge",
                    "Ports in net.ipv4.ip_local_port_range (ephemeral ports per destination address:port).",
                    (), GraphitePath(("tcp", "kernel", "local_port_range_size")))
METRICS = (UP, *COUNTER_METRICS.values(), ORPHANS, ORPHANS_LIMIT, TIME_WAIT, TIME_WAIT_LIMIT, MEMORY,
           MEMORY_LIMIT, PORT_RANGE)


def samples(kernel: KernelStats, out: Samples) -> None:
    """The samples of one KernelStats: a source that failed leaves its series out."""
    out.declare(UP)
    for source in SOURCES:
        if source in kernel.ok:
            out.add(UP, (source,), 1.0 if kernel.ok[source] else 0.0)
    for _section, _field, stem in COUNTERS:
        if stem in kernel.counters:
            out.add(COUNTER_METRICS[stem], (), kernel.counters[stem])
    sock = kernel.sockstat
    for metric, value in ((ORPHANS, None if sock is None else sock.orphan),
                          (ORPHANS_LIMIT, kernel.max_orphans),
                          (TIME_WAIT, None if sock is None else sock.tw),
                          (TIME_WAIT_LIMIT, kernel.max_tw_buckets),
                          (MEMORY, None if sock is None else sock.mem * kernel.page_size)):
        if value is not None:
            out.add(metric, (), value)
    if kernel.tcp_mem is not None:
        for level, pages in zip(TCP_MEM_LEVELS, kernel.tcp_mem):
            out.add(MEMORY_LIMIT, (level,), pages * kernel.page_size)
    if kernel.local_port_range_size is not None:
        out.add(PORT_RANGE, (), kernel.local_port_range_size)


class KernelCounters(Feature):
    name = "kernel"
    metrics = METRICS

    def __init__(self, netns: str | None = None, *, reader: KernelStatsReader | None = None) -> None:
        self.netns = netns
        self._reader = reader if reader is not None else KernelStatsReader(netns)

    def read(self, ctx: PollContext) -> KernelStats:
        return self._reader.read()

    def samples(self, kernel: KernelStats, out: Samples) -> None:
        samples(kernel, out)

    def max_series(self) -> int:
        return len(SOURCES) + len(COUNTERS) + 6 + len(TCP_MEM_LEVELS)

    def close(self) -> None:
        self._reader.close()
