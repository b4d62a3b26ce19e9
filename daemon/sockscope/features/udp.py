"""UDP sockets: per family, per tracked local port (queues, drops), and the host's counters.

Two features, one per source, both on with `udp.enabled`:

- `udp` (UdpSockets): one UDP dump per poll (IPPROTO_UDP, one inet_diag_req_v2 per
  family: TCPDIAG_GETSOCK is TCP only), with the INET_DIAG_SKMEMINFO extension for each
  socket's drop counter. The kernel walks its UDP hash (udp_table, separate from TCP's
  and shared by the namespaces unless net.ipv4.udp_child_hash_entries is set); `ss -uanm`
  reads the same. Ports tracked: `udp.local_ports` first, then (`udp.auto_bound`) every
  local port with an unconnected socket, ascending, capped by `udp.max_local_ports`; the
  rest is summed under port="other", so the ports add up to the family totals.
- `udp_counters` (UdpCounters): the `Udp:` row of /proc/net/snmp and the `Udp6*` lines of
  /proc/net/snmp6 of the watched namespace (kernelstats.ProcFiles: opened in the namespace
  once, pread every poll), labelled by family: nstat's UdpX is family="ipv4", Udp6X
  family="ipv6". Where a datagram is counted depends on the packet, not on the socket: an
  IPv4 datagram to a dual-stack IPv6 socket counts in the IPv4 row (net/ipv6/udp.c
  __UDPX_INC_STATS with is_udp4).

Kernel facts used (Linux 6.x):
- UDP sockets are in TCP_CLOSE (7, `ss` UNCONN) until connect() makes them
  TCP_ESTABLISHED (1, `ss` ESTAB) (include/net/tcp_states.h numbers).
- Recv-Q is udp_rqueue_get(): receive buffer memory in use (datagrams with their skb
  overhead), what `ss` prints; Send-Q is sk_wmem_alloc_get(): memory of datagrams sent
  and not yet freed by the device (net/ipv4/udp_diag.c udp_diag_get_info).
- INET_DIAG_SKMEMINFO (include/uapi/linux/inet_diag.h, 7; asked with ext bit
  1 << (7 - 1)) is u32[SK_MEMINFO_VARS] (include/uapi/linux/sock_diag.h); index
  SK_MEMINFO_DROPS (8) is sk_drops, `ss -m` `d<N>`: datagrams dropped for the socket
  (receive buffer full, socket filter, bad checksum found at read time), never reset
  while the socket lives.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..batch import Batch
from ..catalogue import GraphitePath, Metric, Samples
from ..kernelstats import ParseError, ProcFiles, parse_snmp
from ..snapshot import FAMILIES, OTHER
from .base import ALL_STATES, DumpNeed, DumpStats, Feature, Fold, PollContext

__all__ = ["UdpSockets", "UdpCounters", "UdpTable", "UdpPort", "UdpCounts", "METRICS", "COUNTER_METRICS",
           "parse_snmp6", "counts_from"]

INET_DIAG_SKMEMINFO = 7
SKMEMINFO_EXT = 1 << (INET_DIAG_SKMEMINFO - 1)
SK_MEMINFO_DROPS = 8
_DROPS_AT = 4 * SK_MEMINFO_DROPS  # bytes into the attribute's payload
TCP_CLOSE = 7  # an unconnected UDP socket

# Rows of the per-port sums (PortSums.sums).
_SOCKETS, _RSUM, _RMAX, _SSUM, _DROPS = range(5)

# /proc/net/snmp `Udp:` field -> metric stem. /proc/net/snmp6 has the same fields as
# `Udp6<field>`. Where the kernel counts each (net/ipv4/udp.c, net/ipv6/udp.c):
COUNTERS: tuple[tuple[str, str, str], ...] = (
    # udp_recvmsg: a datagram handed to the application (counted when read, not when
    # queued), or one consumed by an in-kernel encapsulation (tunnels).
    ("InDatagrams", "in_datagrams", "Datagrams delivered to applications, counted when read"),
    # __udp4_lib_rcv/__udp6_lib_rcv: no socket bound to the destination port; an ICMP
    # port unreachable answers it.
    ("NoPorts", "no_ports", "Datagrams received for a port no socket is bound to"),
    # every receive drop: full receive buffer (with RcvbufErrors), bad checksum (with
    # InCsumErrors), a malformed header, the udp_mem limit (MemErrors), a socket filter.
    ("InErrors", "in_errors", "Datagrams dropped on receive: receive buffer full, bad checksum, malformed, ..."),
    # __udp_enqueue_schedule_skb returned -ENOMEM: sk_rmem_alloc over SO_RCVBUF.
    ("RcvbufErrors", "receive_buffer_errors", "Datagrams dropped because the socket's receive buffer was full"),
    # udp_sendmsg/udpv6_sendmsg: ENOBUFS from the IP layer (send buffer or queue full).
    ("SndbufErrors", "send_buffer_errors", "Datagrams not sent because no send buffer space was left"),
    ("InCsumErrors", "in_checksum_errors", "Datagrams received with a bad checksum"),
)

_SNMP_NAMES = {"ipv4": "snmp", "ipv6": "snmp6"}
_PATHS = {"snmp": "net/snmp", "snmp6": "net/snmp6"}


# --- metrics ---------------------------------------------------------------------------------

_PORT = ("udp", "local_port", "{port}")
SOCKETS = Metric("sockscope_udp_sockets", "gauge", "UDP sockets per address family, connected or not (ss -uan).",
                 ("family",), GraphitePath(("udp", "sockets", "{family}")))
PORT_SOCKETS = Metric("sockscope_udp_local_port_sockets", "gauge",
                      'UDP sockets per local port, connected or not; port="other" holds every untracked port.',
                      ("port",), GraphitePath((*_PORT, "sockets")))
PORT_RECEIVE = Metric("sockscope_udp_local_port_receive_queue_bytes", "gauge",
                      "Sum of Recv-Q (receive buffer memory of datagrams not yet read) over the port's UDP sockets.",
                      ("port",), GraphitePath((*_PORT, "receive_queue_bytes")))
PORT_RECEIVE_MAX = Metric("sockscope_udp_local_port_receive_queue_max_bytes", "gauge",
                          "Largest Recv-Q of one UDP socket of the local port.",
                          ("port",), GraphitePath((*_PORT, "receive_queue_max_bytes")))
PORT_SEND = Metric("sockscope_udp_local_port_send_queue_bytes", "gauge",
                   "Sum of Send-Q (memory of sent datagrams the device has not freed yet) over the port's UDP sockets.",
                   ("port",), GraphitePath((*_PORT, "send_queue_bytes")))
PORT_DROPS = Metric("sockscope_udp_local_port_drops", "gauge",
                    "Sum of the drop counters (ss -uanm skmem d<N>) of the port's live UDP sockets: a gauge, "
                    "it falls when a socket closes.", ("port",), GraphitePath((*_PORT, "drops")))
FOLDED = Metric("sockscope_udp_folded_ports", "gauge",
                'Local UDP ports past udp.max_local_ports, counted under port="other".',
                (), GraphitePath(("udp", "folded_ports")))
METRICS = (SOCKETS, PORT_SOCKETS, PORT_RECEIVE, PORT_RECEIVE_MAX, PORT_SEND, PORT_DROPS, FOLDED)

COUNTER_METRICS = {
    stem: Metric(f"sockscope_udp_{stem}", "counter", f"{doc} (nstat Udp{name}, Udp6{name}).", ("family",),
                 GraphitePath(("udp", "kernel", "{family}", stem)))
    for name, stem, doc in COUNTERS
}


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpPort:
    port: int | str  # a tracked port, or OTHER
    sockets: int = 0
    receive_bytes: int = 0
    receive_max_bytes: int = 0
    send_bytes: int = 0
    drops: int = 0


@dataclass(frozen=True, slots=True)
class UdpTable:
    """One UDP dump: sockets per family read, tracked ports ascending then OTHER."""

    sockets: Mapping[str, int]  # family -> sockets, every family read (zeros included)
    ports: tuple[UdpPort, ...]
    folded: int = 0  # candidate ports past the cap, counted under OTHER
    messages: int = 0


@dataclass(frozen=True, slots=True)
class UdpCounts:
    """(family, metric stem) -> the kernel's counter, for the families read."""

    values: Mapping[tuple[str, str], int] = field(default_factory=dict)


# --- the dump's fold -------------------------------------------------------------------------


class PortSums:
    """Per local port sums of one dump in arrays kept across polls (5 x 65,536 int64,
    2.5 MiB): a dump writes only the ports that occur and the next dump zeroes only
    those, so a poll costs no pass over, and no fresh pages for, the whole port space."""

    def __init__(self) -> None:
        self.sums = np.zeros((5, 65536), np.int64)
        self.touched = np.zeros(65536, bool)
        self.unconnected = np.zeros(65536, bool)  # ports with a TCP_CLOSE socket
        self.families = {socket.AF_INET: 0, socket.AF_INET6: 0}

    def reset(self) -> None:
        ports = np.flatnonzero(self.touched)
        if len(ports):
            self.sums[:, ports] = 0
            self.unconnected[ports] = False
            self.touched[ports] = False
        self.families = {socket.AF_INET: 0, socket.AF_INET6: 0}

    def add(self, batch: Batch) -> None:
        if not len(batch):
            return
        fam = batch.family
        keep = (fam == socket.AF_INET) | (fam == socket.AF_INET6)  # all, in a UDP dump of either
        if not keep.all():
            batch = batch.take(keep)
            fam = batch.family
            if not len(batch):
                return
        n6 = int(np.count_nonzero(fam == socket.AF_INET6))
        self.families[socket.AF_INET6] += n6
        self.families[socket.AF_INET] += len(batch) - n6
        port = batch.sport.astype(np.intp)
        sums = self.sums
        np.add.at(sums[_SOCKETS], port, np.ones(len(port), np.int64))
        self.touched[port] = True
        self.unconnected[port[batch.state == TCP_CLOSE]] = True
        rq = batch.rqueue
        wq = batch.wqueue
        drops = socket_drops(batch)
        busy = np.flatnonzero((rq | wq | drops) != 0)  # most sockets have nothing queued
        if len(busy):
            p = port[busy]
            rq = rq[busy].astype(np.int64)
            np.add.at(sums[_RSUM], p, rq)
            np.maximum.at(sums[_RMAX], p, rq)
            np.add.at(sums[_SSUM], p, wq[busy].astype(np.int64))
            np.add.at(sums[_DROPS], p, drops[busy].astype(np.int64))

    def table(self, configured: tuple[int, ...], auto: bool, cap: int, families: tuple[str, ...],
              messages: int) -> UdpTable:
        """Tracked ports: `configured` first, then ports with an unconnected socket
        (when `auto`), ascending; the first `cap` of them; the rest is OTHER."""
        candidates = list(configured)
        if auto:
            seen = set(configured)
            candidates += [p for p in np.flatnonzero(self.unconnected).tolist() if p not in seen]
        tracked = sorted(candidates[:cap])
        touched = np.flatnonzero(self.touched)
        sums = self.sums
        total = sums[:, touched].sum(axis=1).tolist()
        rows = []
        for port, col in zip(tracked, sums[:, tracked].T.tolist()):
            rows.append(UdpPort(port, col[_SOCKETS], col[_RSUM], col[_RMAX], col[_SSUM], col[_DROPS]))
            for i in (_SOCKETS, _RSUM, _SSUM, _DROPS):
                total[i] -= col[i]
        rest = self.touched.copy()
        rest[tracked] = False
        rest_max = int(sums[_RMAX, rest].max()) if rest.any() else 0
        rows.append(UdpPort(OTHER, total[_SOCKETS], total[_RSUM], rest_max, total[_SSUM], total[_DROPS]))
        by_number = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
        return UdpTable(sockets={f: self.families[by_number[f]] for f in FAMILIES if f in families},
                        ports=tuple(rows), folded=max(0, len(candidates) - cap), messages=messages)


def socket_drops(batch: Batch) -> np.ndarray:
    """sk_drops of every message (uint32) from INET_DIAG_SKMEMINFO; 0 where the attribute
    is missing or too short to hold it."""
    attr = batch.attribute(INET_DIAG_SKMEMINFO)
    ok = np.flatnonzero(attr.present & (attr.length >= _DROPS_AT + 4))
    drops = np.zeros(len(batch), np.uint32)
    if len(ok):
        # Attribute payloads start 4-aligned (messages and attributes are NLMSG/NLA aligned).
        words = np.frombuffer(batch.data, np.uint32, len(batch.data) >> 2)
        drops[ok] = words[(attr.offset[ok] + _DROPS_AT) >> 2]
    return drops


class _UdpFold(Fold):
    def __init__(self, feature: UdpSockets) -> None:
        self._feature = feature
        self._sums = feature.sums
        self._sums.reset()  # one fold at a time per feature: the poller's, per attempt

    def add(self, batch: Batch) -> None:
        self._sums.add(batch)

    def finish(self, stats: DumpStats) -> UdpTable:
        f = self._feature
        return self._sums.table(f.local_ports, f.auto_bound, f.max_local_ports, stats.families, stats.messages)


def samples(table: UdpTable, out: Samples) -> None:
    for metric in METRICS:
        out.declare(metric)
    for family in FAMILIES:
        if family in table.sockets:
            out.add(SOCKETS, (family,), table.sockets[family])
    for metric, attr in ((PORT_SOCKETS, "sockets"), (PORT_RECEIVE, "receive_bytes"),
                         (PORT_RECEIVE_MAX, "receive_max_bytes"), (PORT_SEND, "send_bytes"),
                         (PORT_DROPS, "drops")):
        for row in table.ports:
            out.add(metric, (str(row.port),), getattr(row, attr))
    out.add(FOLDED, (), table.folded)


class UdpSockets(Feature):
    name = "udp"
    metrics = METRICS

    def __init__(self, local_ports: tuple[int, ...] = (), *, auto_bound: bool = True,
                 max_local_ports: int = 64, families: tuple[str, ...] = FAMILIES) -> None:
        self.local_ports = tuple(local_ports)
        self.auto_bound = auto_bound
        self.max_local_ports = max_local_ports
        self.families = families
        self.sums = PortSums()

    @classmethod
    def from_config(cls, cfg) -> UdpSockets:
        u = cfg.udp
        return cls(u.local_ports, auto_bound=u.auto_bound, max_local_ports=u.max_local_ports,
                   families=cfg.poll.families)

    def needs(self) -> DumpNeed:
        return DumpNeed(socket.IPPROTO_UDP, ALL_STATES, SKMEMINFO_EXT, (INET_DIAG_SKMEMINFO,))

    def fold(self, ctx: PollContext) -> Fold:
        return _UdpFold(self)

    def samples(self, table: UdpTable, out: Samples) -> None:
        samples(table, out)

    def max_series(self) -> int:
        return len(self.families) + (self.max_local_ports + 1) * 5 + 1


# --- the kernel's counters -------------------------------------------------------------------


def parse_snmp6(text: str) -> dict[str, int]:
    """/proc/net/snmp6: one `Name value` pair per line (Udp6InDatagrams 42)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ParseError(f"expected `name value`, got {line.strip()[:60]!r}")
        try:
            out[parts[0]] = int(parts[1])
        except ValueError:
            raise ParseError(f"{parts[0][:40]}: not an integer: {parts[1][:40]!r}") from None
    return out


def counts_from(texts: Mapping[str, str | Exception | None], families: tuple[str, ...]) -> UdpCounts:
    """UdpCounts from the texts of /proc/net/snmp ("snmp") and /proc/net/snmp6 ("snmp6").
    A file that is absent (None: /proc/net/snmp6 with IPv6 disabled) leaves its family out;
    one that failed, or lacks a counter, raises (OSError / ParseError) naming the file."""
    values: dict[tuple[str, str], int] = {}
    for family in FAMILIES:
        name = _SNMP_NAMES[family]
        text = texts.get(name)
        if family not in families or text is None:
            continue
        path = f"/proc/{_PATHS[name]}"
        if isinstance(text, OSError):
            raise OSError(text.errno, f"{path}: {text.strerror or text}")
        if isinstance(text, Exception):
            raise text
        try:
            if family == "ipv4":
                got = {field: v for (section, field), v in parse_snmp(text).items() if section == "Udp"}
            else:
                got = {k.removeprefix("Udp6"): v for k, v in parse_snmp6(text).items() if k.startswith("Udp6")}
            for field_name, stem, _ in COUNTERS:
                if field_name not in got:
                    raise ParseError(f"no Udp{'6' if family == 'ipv6' else ' '}{field_name}")
                values[(family, stem)] = got[field_name]
        except ParseError as e:
            raise ParseError(f"{path}: {e}") from None
    return UdpCounts(values)


def counter_samples(counts: UdpCounts, out: Samples) -> None:
    for _, stem, _ in COUNTERS:
        metric = COUNTER_METRICS[stem]
        out.declare(metric)
        for family in FAMILIES:
            value = counts.values.get((family, stem))
            if value is not None:
                out.add(metric, (family,), value)


class UdpCounters(Feature):
    name = "udp_counters"
    metrics = tuple(COUNTER_METRICS.values())

    def __init__(self, netns: str | None = None, families: tuple[str, ...] = FAMILIES, *,
                 proc: str = "/proc") -> None:
        self.families = families
        self._files = ProcFiles({_SNMP_NAMES[f]: _PATHS[_SNMP_NAMES[f]] for f in FAMILIES if f in families},
                                netns, proc=proc)

    def read(self, ctx: PollContext) -> UdpCounts:
        return counts_from(self._files.read(), self.families)

    def samples(self, counts: UdpCounts, out: Samples) -> None:
        counter_samples(counts, out)

    def max_series(self) -> int:
        return len(COUNTERS) * len(self.families)

    def close(self) -> None:
        self._files.close()
