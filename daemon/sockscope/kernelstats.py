"""Kernel TCP counters and limits of the watched network namespace, from /proc.

Sources (each read once per poll, each with its own success flag):

    /proc/net/snmp      "Tcp:" header line + value line   (nstat: Tcp*)
    /proc/net/netstat   "TcpExt:" header line + value line (nstat: TcpExt*)
    /proc/net/sockstat  "TCP: inuse N orphan N tw N alloc N mem N"
    /proc/sys/net/ipv4/tcp_max_tw_buckets, tcp_max_orphans, ip_local_port_range, tcp_mem

/proc/net/* and /proc/sys/net/* answer for the network namespace of the task that OPENED
the file, for as long as the file stays open (checked on Linux 6.x: an fd opened in a
namespace kept reporting that namespace's counters to a reader in another one). So for
another namespace the files are opened once by a short-lived thread that enters it with
setns(2) (namespace.run_in) and exits; every poll then re-reads them with
os.pread(fd, ..., 0) from the poller thread. Like netlink.Reader, the namespace path is
stat'ed every poll and the files are reopened when it was replaced (an open file pins its
namespace).

Parsers are pure functions of the file text (tests/fixtures/proc_net_*).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .health import Problems
from .namespace import NamespaceWatch, run_in

log = logging.getLogger(__name__)

# (section, field) of a counter -> metric stem. The sections are the row names of
# /proc/net/snmp ("Tcp") and /proc/net/netstat ("TcpExt"); `nstat` prints them joined
# (TcpOutRsts, TcpExtListenOverflows). The fields are the kernel's MIB names
# (include/uapi/linux/snmp.h: TCP_MIB_* and LINUX_MIB_*, printed by net/ipv4/proc.c); one
# MIB per namespace covers IPv4 and IPv6. Where each is counted (Linux 6.x):
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("TcpExt", "ListenOverflows", "listen_overflows"),
    ("TcpExt", "ListenDrops", "listen_drops"),
    ("Tcp", "OutRsts", "out_resets"),
    ("Tcp", "EstabResets", "estab_resets"),
    ("Tcp", "AttemptFails", "attempt_fails"),
    # tcp_v4_rcv/tcp_v6_rcv, before any check ("Count it even if it's bad").
    ("Tcp", "InSegs", "in_segments"),
    # __tcp_transmit_skb only for segments that send new sequence space or none (pure
    # ACKs), so retransmissions are not in it; plus RSTs and ACKs sent without a full
    # socket, and every SYN-ACK (tcp_make_synack, retransmitted ones included).
    ("Tcp", "OutSegs", "out_segments"),
    ("Tcp", "RetransSegs", "retransmitted_segments"),
    # bad checksum (csum_error), doff < 5 (bad_packet), an in-window SYN on a synchronized
    # connection (tcp_validate_incoming, RFC 5961 challenge ACK).
    ("Tcp", "InErrs", "in_errors"),
    ("Tcp", "InCsumErrors", "in_checksum_errors"),
    # __tcp_retransmit_skb of a SYN-flagged skb, tcp_rtx_synack (request sockets).
    ("TcpExt", "TCPSynRetrans", "syn_retransmits"),
    # tcp_retransmit_timer (every RTO expiry but zero-window probes) and
    # tcp_syn_ack_timeout (SYN-ACK timer of a request socket).
    ("TcpExt", "TCPTimeouts", "timeouts"),
    ("Tcp", "ActiveOpens", "active_opens"),
    ("Tcp", "PassiveOpens", "passive_opens"),
    ("TcpExt", "TCPAbortOnData", "abort_on_data"),
    ("TcpExt", "TCPAbortOnTimeout", "abort_on_timeout"),
    ("TcpExt", "SyncookiesSent", "syncookies_sent"),
    # cookie_v4_check/cookie_v6_check: an ACK to a listener that overflowed (sent cookies)
    # within TCP_SYNCOOKIE_VALID (2 min); the cookie checks out (Recv) or not (Failed).
    ("TcpExt", "SyncookiesRecv", "syncookies_received"),
    ("TcpExt", "SyncookiesFailed", "syncookies_failed"),
    # tcp_syn_flood_action with net.ipv4.tcp_syncookies=0: the SYN queue is full.
    ("TcpExt", "TCPReqQFullDrop", "request_queue_full_drops"),
    # tcp_add_backlog: the socket is owned by its process and its backlog is over
    # sk_rcvbuf * 2 + sk_sndbuf / 2 + 64 KiB.
    ("TcpExt", "TCPBacklogDrop", "backlog_drops"),
)

# Source names, in exposition order: the label values of sockscope_kernel_stats_up.
SNMP, NETSTAT, SOCKSTAT = "snmp", "netstat", "sockstat"
MAX_TW, MAX_ORPHANS, PORT_RANGE = "tcp_max_tw_buckets", "tcp_max_orphans", "ip_local_port_range"
TCP_MEM = "tcp_mem"
SOURCES = (SNMP, NETSTAT, SOCKSTAT, MAX_TW, MAX_ORPHANS, PORT_RANGE, TCP_MEM)

_PATHS = {
    SNMP: "net/snmp",
    NETSTAT: "net/netstat",
    SOCKSTAT: "net/sockstat",
    MAX_TW: "sys/net/ipv4/tcp_max_tw_buckets",
    MAX_ORPHANS: "sys/net/ipv4/tcp_max_orphans",
    PORT_RANGE: "sys/net/ipv4/ip_local_port_range",
    TCP_MEM: "sys/net/ipv4/tcp_mem",
}
# tcp_max_orphans and tcp_mem are host-wide sysctls (the kernel's sysctl_max_orphans and
# sysctl_tcp_mem[3], in ipv4_table, registered for the initial namespace only): a child
# namespace has no such files (checked on 6.18). Read them where the daemon runs, which is
# where they exist.
_HOST_WIDE = frozenset({MAX_ORPHANS, TCP_MEM})
# The three values of net.ipv4.tcp_mem, in pages, as Documentation/networking/ip-sysctl
# names them: min (under it TCP leaves memory pressure), pressure (over it TCP moderates
# its buffers), max (TCP socket memory allocations fail beyond it).
TCP_MEM_LEVELS = ("min", "pressure", "max")


class ParseError(ValueError):
    pass


# --- pure parsers --------------------------------------------------------------------------


def parse_snmp(text: str) -> dict[tuple[str, str], int]:
    """(section, field) -> value from /proc/net/snmp or /proc/net/netstat.

    Both files are pairs of lines `Section: F1 F2 ...` / `Section: v1 v2 ...`. Values may be
    negative (Tcp MaxConn is -1).
    """
    out: dict[tuple[str, str], int] = {}
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) % 2:
        raise ParseError(f"odd number of lines ({len(lines)}): header/value pairs expected")
    for head, values in zip(lines[::2], lines[1::2]):
        hname, _, hfields = head.partition(":")
        vname, _, vfields = values.partition(":")
        if not hname or hname != vname:
            raise ParseError(f"header {hname!r} followed by values of {vname!r}")
        names, numbers = hfields.split(), vfields.split()
        if len(names) != len(numbers):
            raise ParseError(f"{hname}: {len(names)} fields but {len(numbers)} values")
        try:
            out.update(((hname, n), int(v)) for n, v in zip(names, numbers))
        except ValueError as e:
            raise ParseError(f"{hname}: {e}") from None
    return out


@dataclass(frozen=True, slots=True)
class SockStat:
    """The TCP line of /proc/net/sockstat (`ss -s` prints the same numbers)."""

    inuse: int
    orphan: int
    tw: int
    alloc: int
    mem: int  # pages


def parse_sockstat(text: str) -> SockStat:
    for line in text.splitlines():
        if line.startswith("TCP:"):
            words = line.split()[1:]
            if len(words) % 2:
                raise ParseError(f"TCP line is not key/value pairs: {line!r}")
            try:
                values = {k: int(v) for k, v in zip(words[::2], words[1::2])}
            except ValueError as e:
                raise ParseError(f"TCP line: {e}") from None
            missing = [k for k in SockStat.__slots__ if k not in values]
            if missing:
                raise ParseError(f"TCP line lacks {', '.join(missing)}: {line!r}")
            return SockStat(**{k: values[k] for k in SockStat.__slots__})
    raise ParseError("no TCP: line")


def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ParseError(f"not an integer: {text.strip()[:40]!r}") from None


def parse_port_range(text: str) -> int:
    """Size of ip_local_port_range ("32768\\t60999" -> 28232 ports)."""
    parts = text.split()
    if len(parts) != 2:
        raise ParseError(f"expected two ports, got {text.strip()[:40]!r}")
    low, high = (parse_int(p) for p in parts)
    return max(0, high - low + 1)


def parse_tcp_mem(text: str) -> tuple[int, int, int]:
    """net.ipv4.tcp_mem ("383430\t511241\t766860", pages) -> (min, pressure, max)."""
    parts = text.split()
    if len(parts) != 3:
        raise ParseError(f"expected three page counts, got {text.strip()[:60]!r}")
    low, pressure, high = (parse_int(p) for p in parts)
    return low, pressure, high


# --- the immutable result --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KernelStats:
    """One read of every source. A failed or absent source leaves its figures out.

    `ok` maps each source that exists to whether it was read and parsed; a source that does
    not exist on this kernel (e.g. tcp_max_orphans where it is not visible) is not in it.
    """

    counters: Mapping[str, int] = field(default_factory=dict)  # COUNTERS stem -> value
    sockstat: SockStat | None = None
    max_tw_buckets: int | None = None
    max_orphans: int | None = None
    local_port_range_size: int | None = None
    tcp_mem: tuple[int, int, int] | None = None  # pages, TCP_MEM_LEVELS order
    ok: Mapping[str, bool] = field(default_factory=dict)
    page_size: int = 4096  # bytes per page of sockstat `mem` and of tcp_mem


def build(
    texts: Mapping[str, str | Exception | None], page_size: int = 4096
) -> tuple[KernelStats, dict[str, str]]:
    """KernelStats from each source's text (an Exception = read failed, None = absent).

    Returns the stats and {source: problem} for every source that failed; a counter
    missing from its file (older kernel) is a problem of that source but the others stay.
    """
    problems: dict[str, str] = {}
    ok: dict[str, bool] = {}
    counters: dict[str, int] = {}
    values: dict[str, Any] = {}  # source -> its parsed value (a SockStat, int or tuple)
    parsed_snmp: dict[str, dict[tuple[str, str], int]] = {}
    for source in SOURCES:
        text = texts.get(source)
        if text is None:
            continue
        try:
            if isinstance(text, Exception):
                raise text
            if source in (SNMP, NETSTAT):
                parsed_snmp[source] = parse_snmp(text)
            elif source == SOCKSTAT:
                values[source] = parse_sockstat(text)
            elif source == PORT_RANGE:
                values[source] = parse_port_range(text)
            elif source == TCP_MEM:
                values[source] = parse_tcp_mem(text)
            else:
                values[source] = parse_int(text)
        except (OSError, ParseError) as e:
            problems[source] = f"{_PATHS[source]}: {e}"
            ok[source] = False
        else:
            ok[source] = True
    for section, name, stem in COUNTERS:
        source = SNMP if section == "Tcp" else NETSTAT
        if source not in parsed_snmp:
            continue
        value = parsed_snmp[source].get((section, name))
        if value is None:
            problems[source] = f"{_PATHS[source]}: no {section} {name}"
            ok[source] = False
        else:
            counters[stem] = value
    stats = KernelStats(
        counters=counters,
        sockstat=values.get(SOCKSTAT),
        max_tw_buckets=values.get(MAX_TW),
        max_orphans=values.get(MAX_ORPHANS),
        local_port_range_size=values.get(PORT_RANGE),
        tcp_mem=values.get(TCP_MEM),
        ok=ok,
        page_size=page_size,
    )
    return stats, problems


# --- I/O -----------------------------------------------------------------------------------

def _close_all(fds: Mapping[str, int | Exception | None]) -> None:
    for fd in fds.values():
        if isinstance(fd, int):
            os.close(fd)


def _pread_all(fd: int) -> str:
    chunks, offset = [], 0
    for _ in range(64):  # the largest of these files is ~5 KiB; bounded anyway
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode("ascii", "replace")


class ProcFiles:
    """Files under /proc of one network namespace (None = the daemon's own), opened in it
    once and re-read with os.pread every poll (see the module docstring).

    `paths` maps a name to a path relative to /proc: `net/...` files are opened through
    /proc/thread-self by a thread inside the namespace, `sys/...` files by that same
    thread through /proc; names in `host_wide` are opened where the daemon runs. The
    namespace path is stat'ed every read and the files reopened when it was replaced,
    and after any I/O error. Not thread-safe: one per poller."""

    def __init__(self, paths: Mapping[str, str], netns: str | None = None, *, proc: str = "/proc",
                 host_wide: frozenset[str] = frozenset()) -> None:
        self.paths = dict(paths)
        self.netns = netns
        self.proc = proc
        self.host_wide = host_wide
        self._fds: dict[str, int | Exception | None] | None = None
        self._ns = NamespaceWatch(netns)

    def _open_in(self, base: str, names, fds: dict[str, int | Exception | None]) -> None:
        for name in names:
            try:
                fds[name] = os.open(os.path.join(base, self.paths[name]), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fds[name] = None
            except OSError as e:
                fds[name] = e

    def _open_all(self) -> dict[str, int | Exception | None]:
        """fd per name (None = absent, Exception = could not open), opened in the namespace."""
        fds: dict[str, int | Exception | None] = {}
        netns_path = self._ns.path
        if netns_path is None:
            self._open_in(self.proc, self.paths, fds)
            return fds
        own = [n for n in self.paths if n not in self.host_wide]

        def in_namespace() -> None:
            # /proc/thread-self/net is this thread's namespace; /proc/net is the process's.
            self._open_in(os.path.join(self.proc, "thread-self"),
                          [n for n in own if self.paths[n].startswith("net/")], fds)
            self._open_in(self.proc, [n for n in own if not self.paths[n].startswith("net/")], fds)

        try:
            run_in(netns_path, in_namespace)
        except BaseException:
            _close_all(fds)
            raise
        self._open_in(self.proc, [n for n in self.paths if n in self.host_wide], fds)
        return fds

    def read(self) -> dict[str, str | Exception | None]:
        """Text per name; None = the file does not exist on this kernel; an OSError = it
        could not be opened or read (the namespace gone: every name gets that error)."""
        texts: dict[str, str | Exception | None] = {}
        try:
            if self._ns.replaced():  # OSError: the namespace is gone
                log.info("network namespace %s was replaced; reopening %s", self.netns,
                         ", ".join(self.paths.values()))
                self.close()
            if self._fds is None:
                self._fds = self._open_all()
                self._ns.opened()
        except OSError as e:
            where = f"network namespace {self.netns!r}: " if self.netns else ""
            err = OSError(e.errno, f"{where}{e.strerror or e}")
            return {name: err for name in self.paths}
        for name, fd in self._fds.items():
            if isinstance(fd, int):
                try:
                    texts[name] = _pread_all(fd)
                except OSError as e:
                    texts[name] = e
            else:
                texts[name] = fd
        if any(isinstance(t, OSError) for t in texts.values()):
            self.close()  # reopen next read
        return texts

    def close(self) -> None:
        if self._fds is not None:
            _close_all(self._fds)
            self._fds = None
            self._ns.closed()


class KernelStatsReader:
    """Reads KernelStats of one network namespace (None = the daemon's own) every poll.

    Not thread-safe: one per poller. `read()` never raises: a problem with a source makes
    it `ok=False` for that poll and is logged once per distinct message (recovery at INFO).
    """

    def __init__(self, netns: str | None = None, *, proc: str = "/proc",
                 page_size: int = os.sysconf("SC_PAGE_SIZE")):
        self.netns = netns
        self.proc = proc
        self.page_size = page_size
        self._files = ProcFiles(_PATHS, netns, proc=proc, host_wide=_HOST_WIDE)
        self._problems: dict[str, Problems] = {}  # per source: each problem logged once

    def read(self) -> KernelStats:
        stats, problems = build(self._files.read(), self.page_size)
        self._log(stats, problems)
        return stats

    def _log(self, stats: KernelStats, problems: dict[str, str]) -> None:
        for source, message in problems.items():
            if source not in self._problems:
                self._problems[source] = Problems(log, f"kernel statistics from {source} unavailable",
                                                  level=logging.WARNING,
                                                  recovery=f"kernel statistics from {source} readable again")
            self._problems[source].failed(message)
        for source, problems_of in self._problems.items():
            if stats.ok.get(source):
                problems_of.ok()

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> KernelStatsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
