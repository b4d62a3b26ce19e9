"""Graphite push: every Snapshot as plaintext lines `<path> <value> <timestamp>`, to carbon.

The only module that imports graphyte. graphyte builds the lines (`Sender.build_message`)
and is the send seam (`Sender.send_message`, overridden by `Transport` to keep one
connection); everything graphyte leaves out is here:

    poller thread                         sender thread ("sockscope-graphite")
    Pusher.on_poll(status)                Pusher._run()
      LineBuilder.render(snapshot)          connect (timeouts, capped backoff + jitter)
        validate every line                 take the oldest chunk, write it whole
      pack lines into chunks                keep it until carbon has confirmed it (below)
      LineBuffer.add()  ── lock ──►         on an abnormal close, everything unconfirmed
                                              goes back first in line and is written again
                                            LineBuffer (bounded in lines, drops oldest)

Delivery over TCP is at-least-once for everything written on a connection that was not
confirmed. A chunk stays in the buffer after `sendall` returned ("unconfirmed") until:
  - every byte of it was acknowledged by carbon's TCP (SIOCOUTQ: bytes not acknowledged),
  - a check at least `confirm_delay` (1.5 push intervals, at least 1 s) after that
    acknowledgement was first seen finds the connection open (no EOF, no reset), and
  - at that check carbon's advertised receive window (tcp_info tcpi_snd_wnd) is the largest
    it offered on this connection: a receiver that leaves bytes unread advertises less;
or carbon closed the connection cleanly (FIN, no reset) after acknowledging everything,
including when sockscope half-closes it at shutdown (a peer reaches EOF only after reading
every byte before it; a kernel that closes a socket with unread data sends a reset).
Only then is a line counted in `sent_lines`. A reset, EPIPE, a send timeout or a peer FIN
with bytes outstanding puts every unconfirmed chunk back first in line: carbon may receive
those lines twice (same path, value and timestamp: the same whisper point written twice).
A partial line carbon got before the connection broke is discarded by its line receiver.

What stays possible to lose is in docs/graphite.md ("What can still be lost"). UDP has no
delivery guarantee at all: a datagram counts as sent when the kernel accepted it.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import random
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import graphyte

from . import selfmetrics
from .config import format_endpoint
from .catalogue import GraphitePath, Metric, Samples
from .snapshot import OTHER, PollStatus, Snapshot
from .states import COUNTED

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

__all__ = [
    "COLLECTD_STATES",
    "GraphiteStats",
    "Drops",
    "InvalidLine",
    "LineBuffer",
    "LineBuilder",
    "Pusher",
    "Transport",
    "collectd_hostname",
    "default_buffer_lines",
]

# carbon's LineReceiver (twisted LineOnlyReceiver.MAX_LENGTH): a longer line makes carbon
# drop the connection and, with it, the rest of the batch. Counted with the newline.
MAX_LINE_BYTES = 16384
# One TCP send. Small enough that a retried chunk repeats little.
TCP_CHUNK_BYTES = 32 * 1024
# One UDP datagram: fits an Ethernet frame over IPv6 (1500 - 40 - 28), like collectd's
# write_graphite buffer. A single longer line (at most MAX_LINE_BYTES) goes alone.
UDP_DATAGRAM_BYTES = 1432
# SO_SNDBUF of the TCP socket (the kernel doubles it): bounds what a stalled carbon holds
# up in our kernel, and so what is written again after a failure.
SNDBUF_BYTES = 64 * 1024
BACKOFF_INITIAL = 0.5  # seconds before the first reconnect
BACKOFF_MAX = 30.0  # cap of the exponential backoff
# The default buffer holds this much outage at the configured series count.
OUTAGE_SECONDS = 1800
# Lines per push of the poll loop's and the pusher's own series (selfmetrics, METRICS),
# besides the features' (Feature.max_series): a bound, not an exact count.
SELF_SERIES = 16
# Pusher.detach (reload): how long to wait for the interrupted sender thread to stop.
HANDOVER_WAIT = 2.0
# A chunk acknowledged by carbon's TCP counts as sent only if the connection is still open
# and carbon's receive window is full at a check at least CONFIRM_INTERVALS push intervals
# (and at least CONFIRM_DELAY seconds) after the acknowledgement was seen. carbon, when
# alive, reads within milliseconds; waiting past the next push matters because a receive
# window moves in steps (2^wscale bytes, and not below rcv_ssthresh): a few KB left unread
# can leave it unchanged, the next push's bytes on top of them make it shrink.
CONFIRM_DELAY = 1.0
CONFIRM_INTERVALS = 1.5
# How often the sender checks the connection while something written is unconfirmed.
CHECK_INTERVAL = 0.1
# Acknowledged but still unconfirmed this long (the window never came back: a stalled
# carbon, or a receiver whose window shrank for good): half-close the connection and wait
# for carbon's FIN, which confirms everything, or write it all again on a new connection.
RECYCLE_AFTER = 30.0
# TCP keepalive on the carbon connection: after 1 s idle a probe every second, each answered
# with an ACK that carries carbon's current window (a window update carbon's kernel would
# otherwise not send), so what carbon read is confirmed between pushes.
KEEPALIVE_IDLE = 1
KEEPALIVE_INTERVAL = 1
# linux/sockios.h SIOCOUTQ (= TIOCOUTQ, asm-generic/ioctls.h 0x5411): on a TCP socket,
# bytes written and not yet acknowledged by the peer (write_seq - snd_una).
SIOCOUTQ = 0x5411
# include/uapi/linux/tcp.h struct tcp_info: __u32 tcpi_snd_wnd ("peer's advertised receive
# window after scaling") at byte 228, since Linux 5.4; an older kernel returns less.
TCPI_SND_WND_OFFSET = 228
TCP_INFO_BYTES = 256

# collectd tcpconns' names for the kernel states (src/tcpconns.c, tcp_state[]), keyed by
# sockscope's label values. collectd never sees TCP_NEW_SYN_RECV; sockscope counts request
# sockets as syn_recv, as `ss` shows them.
COLLECTD_STATES = {s.label: s.collectd for s in COUNTED}

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_UNSAFE_PREFIX = re.compile(r"[^A-Za-z0-9_.-]")
_TAG_VALUE_UNSAFE = re.compile(r"[\s;]")
_PLACEHOLDER = re.compile(r"\{(hostname|fqdn)\}")


class InvalidLine(ValueError):
    """A value or path that must not reach carbon."""


def sanitize(component: str) -> str:
    """One path component: every character outside [A-Za-z0-9_-] becomes `_`
    (dots in host names and IP addresses included). Never empty."""
    return _UNSAFE.sub("_", component) or "_"


def tag_value(value: str) -> str:
    """A Graphite 1.1 tag value: non-empty, no `;` (nor whitespace, which would split the
    line), not starting with `~`. Offending characters become `_`."""
    cleaned = _TAG_VALUE_UNSAFE.sub("_", value)
    if cleaned.startswith("~"):
        cleaned = "_" + cleaned[1:]
    if not cleaned:
        raise InvalidLine("empty tag value")
    return cleaned


def check_value(value) -> int | float:
    """The value as carbon accepts it: an int or a finite float, never a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidLine(f"value {value!r} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidLine(f"value {value!r} is not finite")
    return value


def expand(template: str, hostname: Callable[[], str], fqdn: Callable[[], str]) -> list[str]:
    """`template` split into path components with {hostname}/{fqdn} expanded, each
    sanitised (a placeholder is one component: `web1.example.com` -> `web1_example_com`).
    Empty components (a trailing `.`) are kept as ""; the caller decides."""
    values = {}

    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            values[key] = sanitize((hostname if key == "hostname" else fqdn)())
        return values[key]

    return [sanitize(_PLACEHOLDER.sub(sub, part)) if part else "" for part in template.split(".")]


def expand_raw(template: str, hostname: Callable[[], str], fqdn: Callable[[], str]) -> str:
    """`template` with {hostname}/{fqdn} replaced verbatim (dots kept)."""
    return _PLACEHOLDER.sub(lambda m: (hostname if m.group(1) == "hostname" else fqdn)(), template)


def collectd_hostname(gethostname: Callable[[], str] = socket.gethostname,
                      getaddrinfo: Callable = socket.getaddrinfo) -> str:
    """The host name collectd 5.12 uses with its defaults (no `Hostname`, `FQDNLookup
    true`; src/daemon/collectd.c init_hostname): gethostname(), then the canonical name of
    the first result of getaddrinfo(name, NULL, {ai_flags = AI_CANONNAME}) that has one
    (glibc: the first name of the /etc/hosts line that matched, or DNS's CNAME target).

    Not socket.getfqdn(): that is a reverse lookup of the address the name resolves to,
    and picks the first name with a dot, so `127.0.1.1 web1 web1.example.net` gives
    `web1.example.net` where collectd writes `web1`.

    collectd refuses to start when the lookup fails; sockscope logs a warning and uses the
    plain host name instead."""
    name = gethostname()
    try:
        # bytes: passed to the resolver as is, like collectd's char[] (a str would be
        # IDNA-encoded first, which refuses names the resolver accepts).
        infos = getaddrinfo(os.fsencode(name), None, 0, 0, 0, socket.AI_CANONNAME)
    except (OSError, UnicodeError) as exc:
        log.warning("graphite: looking up the host name %r failed (%s); using it as is for {fqdn} "
                    "(collectd with FQDNLookup true would not start)", name, exc)
        return name
    for info in infos:
        if info[3]:  # ai_canonname; Python gives "" for NULL
            return info[3]
    return name


# -- lines ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GraphiteStats:
    """The pusher's counters, copied under its lock (cumulative since start)."""

    sent_lines: int = 0  # TCP: confirmed read by carbon (module docstring); UDP: datagram accepted
    send_errors: int = 0  # failed connects, failed sends, connections lost with lines unconfirmed
    dropped_lines: int = 0  # oldest lines dropped because the buffer was full, never written
    dropped_unconfirmed_lines: int = 0  # the same, but written before: carbon may have them
    resent_lines: int = 0  # lines written again after the connection they were written on failed
    invalid_lines: int = 0  # lines refused by validation, never queued
    queue_lines: int = 0  # not yet sent: waiting, being written, or written and unconfirmed
    unconfirmed_lines: int = 0  # of queue_lines: written on the open connection, unconfirmed
    capacity_lines: int = 0
    pushes: int = 0  # snapshots rendered and queued
    last_success_timestamp: float = 0.0  # UNIX time lines were last counted sent; 0 = never
    connected: bool = False


_G = ("sockscope", "graphite")
SENT = Metric("sockscope_graphite_sent_lines", "counter",
              "Lines delivered to carbon: TCP, read by carbon as far as sockscope can confirm (docs/graphite.md); "
              "UDP, accepted by the kernel.", (), GraphitePath((*_G, "sent_lines")))
SEND_ERRORS = Metric("sockscope_graphite_send_errors", "counter",
                     "Failed connects and sends, and connections carbon closed before confirming what was written "
                     "on them (those lines are sent again).", (), GraphitePath((*_G, "send_errors")))
DROPPED = Metric("sockscope_graphite_dropped_lines", "counter",
                 "Oldest lines dropped from the full buffer before they were written: they never reach carbon.",
                 (), GraphitePath((*_G, "dropped_lines")))
DROPPED_UNCONFIRMED = Metric("sockscope_graphite_dropped_unconfirmed_lines", "counter",
                             "Oldest lines dropped from the full buffer after being written, before carbon "
                             "confirmed them.", (), GraphitePath((*_G, "dropped_unconfirmed_lines")))
RESENT = Metric("sockscope_graphite_resent_lines", "counter",
                "Lines written again because their connection failed before carbon confirmed them.",
                (), GraphitePath((*_G, "resent_lines")))
INVALID = Metric("sockscope_graphite_invalid_lines", "counter",
                 "Lines refused before queueing (NaN/inf/bool value, line over 16384 bytes).",
                 (), GraphitePath((*_G, "invalid_lines")))
PUSHES = Metric("sockscope_graphite_pushes", "counter", "Polls rendered and queued for Graphite.",
                (), GraphitePath((*_G, "pushes")))
QUEUE = Metric("sockscope_graphite_queue_lines", "gauge",
               "Lines not yet confirmed sent: waiting, being written, or written and unconfirmed.",
               (), GraphitePath((*_G, "queue_lines")))
UNCONFIRMED = Metric("sockscope_graphite_unconfirmed_lines", "gauge",
                     "Queued lines written on the current connection and not yet confirmed read by carbon.",
                     (), GraphitePath((*_G, "unconfirmed_lines")))
CAPACITY = Metric("sockscope_graphite_queue_capacity_lines", "gauge",
                  "Size of the buffer in lines (graphite.buffer_lines, resolved).", (),
                  GraphitePath((*_G, "queue_capacity_lines")))
LAST_SUCCESS = Metric("sockscope_graphite_last_success_timestamp_seconds", "gauge",
                      "UNIX time lines were last counted in sockscope_graphite_sent_lines_total (0 before the first).",
                      (), GraphitePath((*_G, "last_success_timestamp_seconds")))
CONNECTED = Metric("sockscope_graphite_connected", "gauge",
                   "1 while a connection (or UDP socket) to carbon is open.", (), GraphitePath((*_G, "connected")))
METRICS = (SENT, SEND_ERRORS, DROPPED, DROPPED_UNCONFIRMED, RESENT, INVALID, PUSHES, QUEUE, UNCONFIRMED,
           CAPACITY, LAST_SUCCESS, CONNECTED)


def stats_samples(stats: GraphiteStats | None) -> Samples | None:
    """The pusher's own series (None while Graphite is disabled)."""
    if stats is None:
        return None
    out = Samples()
    for metric, value in ((SENT, stats.sent_lines), (SEND_ERRORS, stats.send_errors),
                          (DROPPED, stats.dropped_lines), (DROPPED_UNCONFIRMED, stats.dropped_unconfirmed_lines),
                          (RESENT, stats.resent_lines), (INVALID, stats.invalid_lines), (PUSHES, stats.pushes),
                          (QUEUE, stats.queue_lines), (UNCONFIRMED, stats.unconfirmed_lines),
                          (CAPACITY, stats.capacity_lines), (LAST_SUCCESS, stats.last_success_timestamp),
                          (CONNECTED, 1.0 if stats.connected else 0.0)):
        out.add(metric, (), value)
    return out


@dataclass(frozen=True, slots=True)
class Rendered:
    lines: list[bytes]
    invalid: list[str]  # one reason per refused line


class LineBuilder:
    """Renders a Snapshot as Graphite plaintext lines. Pure: no I/O, no clock.

    naming "sockscope": `<prefix>.tcp.states.<family>.<state>` ... (docs/graphite.md);
    tags=True: `<prefix>.tcp.local_port_sockets;port=8080;state=close_wait;host=<host>`;
    naming "collectd": `<prefix><host>.tcpconns-<port>-local.tcp_connections-<STATE>`.
    `prefix` and `host` are the configured strings; {hostname} and {fqdn} in them are
    expanded with the given functions (called at most once each, here). The default prefix
    of naming "sockscope" is `sockscope.<host>`, the host as one component.
    """

    def __init__(
        self,
        *,
        naming: str = "sockscope",
        tags: bool = False,
        prefix: str = "",
        host: str = "{fqdn}",
        hostname: Callable[[], str] = socket.gethostname,
        fqdn: Callable[[], str] = collectd_hostname,
    ) -> None:
        if naming not in ("sockscope", "collectd"):
            raise ValueError(f"unknown naming {naming!r}")
        if tags and naming != "sockscope":
            raise ValueError("tags need naming 'sockscope'")
        self.naming = naming
        self.tags = tags
        cache: dict[str, str] = {}

        def once(name: str, fn: Callable[[], str]) -> Callable[[], str]:
            return lambda: cache[name] if name in cache else cache.setdefault(name, fn())

        hostname, fqdn = once("hostname", hostname), once("fqdn", fqdn)
        # The host as resolved (dots kept): collectd paths, the host tag, the default prefix.
        self.host = expand_raw(host, hostname, fqdn)
        if naming == "collectd":
            # collectd: Prefix is glued to the host as written ("collectd." or ""); the
            # host has its dots escaped as write_graphite's EscapeCharacter "_" does.
            self._base = _UNSAFE_PREFIX.sub("_", expand_raw(prefix, hostname, fqdn)) + sanitize(self.host)
            self._host_tag = ""
        else:
            if prefix:
                parts = expand(prefix, hostname, fqdn)
            elif tags:
                parts = ["sockscope"]
            else:
                parts = ["sockscope", sanitize(self.host)]
            if any(p == "" for p in parts):
                raise ValueError(f"prefix {prefix!r} has an empty path component")
            self._base = ".".join(parts)
            self._host_tag = tag_value(self.host) if tags else ""
        # graphyte's line format: "<metric> <value> <int(round(timestamp))>\n", UTF-8.
        self._graphyte = graphyte.Sender(host=None, prefix=None)

    # -- series: (path or name;tags, value) -------------------------------------------------

    def series(self, status: PollStatus, stats: GraphiteStats | None = None,
               poll_interval: float | None = None) -> Iterator[tuple[str, object]]:
        """Every series of one push: the features' samples (status.samples), the poll
        loop's own series, the pusher's; each metric as its catalogue entry says
        (catalogue.GraphitePath), metrics without a Graphite path left out."""
        parts = [status.samples, selfmetrics.poll_samples(status, poll_interval)]
        own = stats_samples(stats)
        if own is not None:
            parts.append(own)
        for samples in parts:
            for metric, rows in samples:
                if metric.graphite is not None and rows:
                    yield from self._metric_series(metric, rows)

    def _metric_series(self, metric: Metric, rows) -> Iterator[tuple[str, object]]:
        g = metric.graphite
        if self.naming == "collectd":
            if g.collectd_total is not None:
                totals: dict[tuple[str, ...], float] = {}
                for labels, value in rows:
                    values = dict(zip(metric.labels, labels))
                    key = tuple(_format(c, values) for c in g.collectd_total)
                    totals[key] = totals.get(key, 0) + value
                for key, value in totals.items():
                    yield ".".join([self._base, *(sanitize(c) for c in key)]), _number(value)
            elif g.collectd is not None:
                for labels, value in rows:
                    if OTHER in labels:  # collectd has no such bucket
                        continue
                    values = dict(zip(metric.labels, labels))
                    yield ".".join([self._base, *(sanitize(_format(c, values)) for c in g.collectd)]), _number(value)
            else:
                path = g.sockscope if g.sockscope[0] == "sockscope" else ("sockscope", *g.sockscope)
                for labels, value in rows:
                    values = dict(zip(metric.labels, labels))
                    yield ".".join([self._base, *(sanitize(_format(c, values)) for c in path)]), _number(value)
            return
        own = g.sockscope[0] == "sockscope"  # sockscope's own series: a path even with tags
        for labels, value in rows:
            values = dict(zip(metric.labels, labels))
            if not self.tags:
                yield ".".join([self._base, *(sanitize(_format(c, values)) for c in g.sockscope)]), _number(value)
            elif own:
                path = ".".join(sanitize(_format(c, values)) for c in g.sockscope)
                yield f"{self._base}.{path};host={self._host_tag}", _number(value)
            else:
                suffix = "".join(f";{k}={tag_value(v)}" for k, v in zip(metric.labels, labels))
                yield f"{self._base}.{metric.tag_name}{suffix};host={self._host_tag}", _number(value)

    # -- lines ------------------------------------------------------------------------------

    def line(self, path: str, value, timestamp: int) -> bytes:
        """One validated line. Raises InvalidLine (bad value, too long)."""
        check_value(value)
        try:
            data = self._graphyte.build_message(path, value, timestamp)
        except (TypeError, ValueError) as exc:  # whitespace in the path
            raise InvalidLine(f"{path!r}: {exc}") from None
        if len(data) > MAX_LINE_BYTES:
            raise InvalidLine(f"line of {len(data)} bytes for {path[:80]!r}... exceeds carbon's {MAX_LINE_BYTES}")
        return data

    def render(self, status: PollStatus, timestamp: int, stats: GraphiteStats | None = None,
               poll_interval: float | None = None) -> Rendered:
        lines: list[bytes] = []
        invalid: list[str] = []
        for path, value in self.series(status, stats, poll_interval):
            try:
                lines.append(self.line(path, value, timestamp))
            except InvalidLine as exc:
                invalid.append(str(exc))
        return Rendered(lines, invalid)


def _format(component: str, labels: dict[str, str]) -> str:
    """A path template component with {label} (and {STATE}: collectd's state name) filled."""
    if "{" not in component:
        return component
    if "state" in labels:
        labels = {**labels, "STATE": COLLECTD_STATES.get(labels["state"], labels["state"])}
    return component.format(**labels)


def _number(value: float) -> int | float:
    """Counts and byte sums as integers (carbon stores floats either way; the line reads
    as it always did), other values as they are."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def default_buffer_lines(interval: float, per_push: int) -> int:
    """Lines for OUTAGE_SECONDS of pushes every `interval` seconds at `per_push` lines."""
    return math.ceil(OUTAGE_SECONDS / interval) * per_push


# -- buffer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    data: bytes  # whole lines
    lines: int
    written: bool = False  # written (maybe in part) on a connection that then failed


@dataclass(frozen=True, slots=True)
class Drops:
    """Lines a buffer operation dropped to stay within capacity."""

    unsent: int = 0  # never written to carbon
    unconfirmed: int = 0  # written, not confirmed: carbon may have them

    @property
    def total(self) -> int:
        return self.unsent + self.unconfirmed


def pack(lines: list[bytes], limit: int) -> list[Chunk]:
    """Consecutive lines joined into chunks of at most `limit` bytes (a longer line alone)."""
    chunks: list[Chunk] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            chunks.append(Chunk(b"".join(current), len(current)))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(Chunk(b"".join(current), len(current)))
    return chunks


def _drop_lines(chunk: Chunk, n: int) -> Chunk:
    """chunk without its first n lines (0 < n < chunk.lines)."""
    pos = 0
    for _ in range(n):
        pos = chunk.data.index(b"\n", pos) + 1
    return Chunk(chunk.data[pos:], chunk.lines - n, chunk.written)


class _Unconfirmed:
    """A chunk written whole on the current connection, not yet confirmed."""

    __slots__ = ("chunk", "end", "acked_at")

    def __init__(self, chunk: Chunk, end: int) -> None:
        self.chunk = chunk
        self.end = end  # bytes written on the connection up to its last byte
        self.acked_at: float | None = None  # monotonic time its acknowledgement was first seen


class LineBuffer:
    """Every line not yet sent, bounded in lines; when full the OLDEST lines are dropped.

    Oldest first: chunks written on the current connection and not confirmed, the chunk
    being written ("in flight"), then the queue. Not thread-safe: the Pusher calls it under
    its lock. The capacity covers the unconfirmed and queued lines; the chunk in flight is
    exempt while it is being written (new lines never pull it out mid-send) and counts again
    once written or given back, so memory is bounded by capacity + one chunk.
    """

    def __init__(self, capacity_lines: int) -> None:
        if capacity_lines < 1:
            raise ValueError("capacity must be >= 1 line")
        self.capacity = capacity_lines
        self._chunks: deque[Chunk] = deque()
        self._lines = 0
        self._unconfirmed: deque[_Unconfirmed] = deque()
        self._unconfirmed_lines = 0
        self.in_flight: Chunk | None = None

    def __len__(self) -> int:
        """Lines not sent: unconfirmed, in flight and queued."""
        return self._lines + self._unconfirmed_lines + (self.in_flight.lines if self.in_flight else 0)

    @property
    def unconfirmed(self) -> int:
        return self._unconfirmed_lines

    @property
    def has_queued(self) -> bool:
        return bool(self._chunks)

    @property
    def has_unconfirmed(self) -> bool:
        return bool(self._unconfirmed)

    def add(self, chunks: Iterable[Chunk]) -> Drops:
        """Append; returns the (oldest) lines dropped to stay within capacity."""
        for chunk in chunks:
            self._chunks.append(chunk)
            self._lines += chunk.lines
        return self._trim()

    def take(self) -> Chunk | None:
        if self.in_flight is not None:
            raise RuntimeError("a chunk is already in flight")
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._lines -= chunk.lines
        self.in_flight = chunk
        return chunk

    def done(self) -> None:
        """The chunk in flight was sent and needs no confirmation (UDP)."""
        self.in_flight = None

    def written(self, end: int) -> Drops:
        """The chunk in flight was written whole; `end` = bytes written on this connection
        up to its last byte. It waits for confirmation, counted against the capacity."""
        chunk, self.in_flight = self.in_flight, None
        if chunk is None:
            raise RuntimeError("no chunk in flight")
        self._unconfirmed.append(_Unconfirmed(chunk, end))
        self._unconfirmed_lines += chunk.lines
        return self._trim()

    def confirm(self, acked: int, window_full: bool, now: float, delay: float) -> int:
        """Note which unconfirmed chunks `acked` (bytes acknowledged on this connection)
        covers, at monotonic time `now`; confirm, oldest first, those acknowledged at least
        `delay` ago if `window_full`. Returns the lines confirmed (removed)."""
        for entry in self._unconfirmed:
            if entry.end > acked:
                break
            if entry.acked_at is None:
                entry.acked_at = now
        confirmed = 0
        while window_full and self._unconfirmed:
            entry = self._unconfirmed[0]
            if entry.acked_at is None or now - entry.acked_at < delay:
                break
            self._unconfirmed.popleft()
            self._unconfirmed_lines -= entry.chunk.lines
            confirmed += entry.chunk.lines
        return confirmed

    def confirm_all(self) -> int:
        """Carbon confirmed everything written on the connection (it closed cleanly after
        acknowledging all of it). Returns the lines confirmed."""
        confirmed = self._unconfirmed_lines
        self._unconfirmed.clear()
        self._unconfirmed_lines = 0
        return confirmed

    def oldest_acked_at(self) -> float | None:
        """When the oldest unconfirmed chunk's acknowledgement was first seen (None: not yet)."""
        return self._unconfirmed[0].acked_at if self._unconfirmed else None

    def requeue(self) -> Drops:
        """The connection failed: every unconfirmed chunk, then the chunk in flight, goes
        back first in line, marked written (sending it again is a resend). Returns the lines
        dropped to stay within capacity."""
        back = [entry.chunk for entry in self._unconfirmed]
        if self.in_flight is not None:
            back.append(self.in_flight)
        self._unconfirmed.clear()
        self._unconfirmed_lines = 0
        self.in_flight = None
        for chunk in reversed(back):
            chunk = chunk if chunk.written else Chunk(chunk.data, chunk.lines, True)
            self._chunks.appendleft(chunk)
            self._lines += chunk.lines
        return self._trim()

    def drain(self) -> list[Chunk]:
        """Remove and return every unconfirmed and queued chunk, oldest first (a successor
        takes them; the unconfirmed ones marked written). The chunk in flight, if any,
        stays with this buffer."""
        chunks = [e.chunk if e.chunk.written else Chunk(e.chunk.data, e.chunk.lines, True)
                  for e in self._unconfirmed]
        chunks += self._chunks
        self._unconfirmed, self._unconfirmed_lines = deque(), 0
        self._chunks, self._lines = deque(), 0
        return chunks

    def prepend(self, chunks: list[Chunk]) -> Drops:
        """Put `chunks` (older lines) ahead of everything queued; returns lines dropped
        (the oldest first) to stay within capacity."""
        for chunk in reversed(chunks):
            self._chunks.appendleft(chunk)
            self._lines += chunk.lines
        return self._trim()

    def _trim(self) -> Drops:
        unsent = unconfirmed = 0
        while self._lines + self._unconfirmed_lines > self.capacity:
            excess = self._lines + self._unconfirmed_lines - self.capacity
            if self._unconfirmed:
                entry = self._unconfirmed[0]
                if entry.chunk.lines <= excess:
                    self._unconfirmed.popleft()
                    n = entry.chunk.lines
                else:
                    entry.chunk = _drop_lines(entry.chunk, excess)
                    n = excess
                self._unconfirmed_lines -= n
                unconfirmed += n
                continue
            head = self._chunks[0]
            if head.lines <= excess:
                self._chunks.popleft()
                n = head.lines
            else:
                self._chunks[0] = _drop_lines(head, excess)
                n = excess
            self._lines -= n
            if head.written:
                unconfirmed += n
            else:
                unsent += n
        return Drops(unsent, unconfirmed)


# -- transport ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """One look at the TCP connection to carbon (Transport.probe)."""

    closed: bool  # EOF (carbon's FIN) or an error
    error: OSError | None  # e.g. ECONNRESET
    unacked: int  # SIOCOUTQ: bytes written and not acknowledged (`ss -tn` Send-Q)
    window: int | None  # carbon's advertised receive window; None before Linux 5.4


class Transport(graphyte.Sender):
    """graphyte's send seam (`send_message`) over ONE persistent socket.

    graphyte opens a connection per message; this keeps one TCP connection (or one
    connected UDP socket) until a send fails. Every call raises OSError on failure and
    leaves the transport disconnected; the Pusher decides about retries.
    """

    def __init__(self, host: str, port: int, protocol: str = "tcp", *,
                 sndbuf: int = SNDBUF_BYTES, keepalive_probes: int = 10) -> None:
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
        super().__init__(host, port, protocol=protocol)
        self.sndbuf = sndbuf
        # Unanswered keepalive probes before the kernel resets the connection (TCP_KEEPCNT,
        # 1-127): an idle carbon that vanished without a reset is noticed after about
        # KEEPALIVE_IDLE + probes x KEEPALIVE_INTERVAL seconds.
        self.keepalive_probes = max(1, min(127, keepalive_probes))
        self._sock: socket.socket | None = None
        self._connecting: socket.socket | None = None  # for abort()
        # Set by abort(): a socket shut down here reads as EOF, which must not pass for
        # carbon's clean close.
        self._aborted = False

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def chunk_bytes(self) -> int:
        return TCP_CHUNK_BYTES if self.protocol == "tcp" else UDP_DATAGRAM_BYTES

    def connect(self, timeout: float) -> None:
        self.close()
        kind = socket.SOCK_STREAM if self.protocol == "tcp" else socket.SOCK_DGRAM
        # getaddrinfo has no timeout; an IP literal (the usual case) never waits.
        infos = socket.getaddrinfo(self.host, self.port, type=kind)
        error: OSError | None = None
        for family, type_, proto, _, address in infos:
            sock = socket.socket(family, type_, proto)
            self._connecting = sock
            try:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.keepalive_probes)
                sock.settimeout(timeout)
                sock.connect(address)  # UDP: only fixes the peer (and gets ICMP errors back)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            finally:
                self._connecting = None
            self._sock = sock
            return
        raise error or OSError(f"no address for {self.host}:{self.port}")

    def probe(self) -> Probe:
        """The TCP connection's state, without blocking (carbon never writes, so a readable
        socket means EOF or an error)."""
        sock = self._sock
        if sock is None or self.protocol != "tcp":
            raise ConnectionError("no TCP connection")
        if self._aborted:
            return Probe(True, ConnectionAbortedError("aborted"), 0, None)
        closed, error = False, None
        try:
            # Non-blocking: with a timeout set, Python would wait for readability first.
            sock.settimeout(0.0)
            closed = sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            pass
        except OSError as exc:
            closed, error = True, exc
        try:
            unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
        except OSError as exc:
            return Probe(True, error or exc, 0, None)
        window = (struct.unpack_from("I", info, TCPI_SND_WND_OFFSET)[0]
                  if len(info) >= TCPI_SND_WND_OFFSET + 4 else None)
        return Probe(closed, error, unacked, window)

    def finish(self, timeout: float) -> bool:
        """Half-close (our FIN after everything written) and wait up to `timeout` for
        carbon's FIN. True if it came with everything acknowledged and no reset: carbon
        reached EOF, i.e. read every byte (a socket closed with unread data resets instead).
        The connection is closed either way."""
        sock = self._sock
        if sock is None:
            return False
        deadline = time.monotonic() + timeout
        try:
            sock.shutdown(socket.SHUT_WR)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                sock.settimeout(left)
                if sock.recv(65536) == b"":
                    break
            if self._aborted:
                return False
            # Our FIN takes one sequence number: 0 = every byte and the FIN acknowledged.
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0] == 0
        except OSError:
            return False
        finally:
            self.close()

    def send_message(self, message: bytes, timeout: float | None = None) -> None:
        """Send all of `message` (TCP) or one datagram (UDP) within `timeout` seconds."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        try:
            sock.settimeout(timeout)
            if self.protocol == "tcp":
                sock.sendall(message)  # the timeout bounds the whole call (Python >= 3.5)
            else:
                sent = sock.send(message)
                if sent != len(message):
                    raise OSError(f"datagram truncated: {sent} of {len(message)} bytes")
        except OSError:
            self.close()
            raise

    def abort(self) -> None:
        """From another thread: make a blocked connect or send fail at once (shutdown;
        the owner of the socket closes it)."""
        self._aborted = True
        for sock in (self._connecting, self._sock):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected (yet), or already closed by its owner

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def stop(self) -> None:  # graphyte.Sender.__del__ calls stop(); we have no thread
        self.close()


# -- pusher ---------------------------------------------------------------------------------


class Pusher:
    """Renders polls into the bounded buffer (poller thread) and sends them (own thread).

    on_poll() returns after rendering (a few ms for thousands of series): it never waits
    for the network, so a slow or blackholed carbon cannot stall the poller or /metrics.
    A snapshot is pushed when it is at least `interval` newer than the last one pushed
    (within half a poll interval); its lines carry the poll's timestamp, whole seconds.
    """

    def __init__(
        self,
        builder: LineBuilder,
        transport: Transport,
        *,
        interval: float,
        poll_interval: float,
        capacity_lines: int,
        connect_timeout: float = 5.0,
        send_timeout: float = 10.0,
        flush_timeout: float = 10.0,
        backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_MAX),
        confirm_delay: float | None = None,
        check_interval: float = CHECK_INTERVAL,
        recycle_after: float = RECYCLE_AFTER,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.builder = builder
        self.transport = transport
        self.interval = interval
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.flush_timeout = flush_timeout
        self.confirm_delay = (max(CONFIRM_DELAY, CONFIRM_INTERVALS * interval) if confirm_delay is None
                              else confirm_delay)
        self.check_interval = check_interval
        self.recycle_after = recycle_after
        self._backoff = backoff
        self._clock = clock
        self._monotonic = monotonic
        self._jitter = jitter
        self.destination = f"{transport.protocol}://{format_endpoint(transport.host, transport.port)}"
        self._confirming = transport.protocol == "tcp"

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._buffer = LineBuffer(capacity_lines)
        self._sent = self._errors = self._dropped = self._dropped_unconfirmed = 0
        self._resent = self._invalid = self._pushes = 0
        self._last_success = 0.0
        self._closing = False
        self._detached = False  # stopped by detach(): a successor owns the queue
        self._deadline = math.inf
        self._thread: threading.Thread | None = None
        # sender thread only
        self._failures = 0
        self._next_attempt = 0.0
        self._outage_started: float | None = None
        self._written_bytes = 0  # on the current connection
        self._max_window = 0  # largest receive window carbon advertised on it
        # poller thread only
        self._last_snapshot: Snapshot | None = None
        self._last_pushed: tuple[float, int] | None = None  # (poll timestamp, line timestamp)
        self._dropping = False
        self._invalid_logged = False

    @classmethod
    def from_config(cls, cfg: Config, series: int, **kwargs) -> Pusher:
        """`series`: the most series the enabled features can export with `cfg`
        (features.max_series): the default buffer holds OUTAGE_SECONDS of pushes of that."""
        g = cfg.graphite
        interval = g.interval or cfg.poll.interval
        per_push = series + SELF_SERIES
        capacity = g.buffer_lines or default_buffer_lines(interval, per_push)
        if capacity < per_push:
            log.warning("graphite.buffer_lines (%d) is smaller than one push at the configured caps "
                        "(up to %d lines): any outage drops lines", capacity, per_push)
        elif capacity < 3 * per_push:
            log.warning("graphite.buffer_lines (%d) holds fewer than 3 pushes at the configured caps (up to "
                        "%d lines each): lines awaiting carbon's confirmation count against it, so even a "
                        "healthy carbon may see unconfirmed lines dropped", capacity, per_push)
        builder = LineBuilder(naming=g.naming, tags=g.tags, prefix=g.prefix, host=g.host,
                              **{k: kwargs.pop(k) for k in ("hostname", "fqdn") if k in kwargs})
        if builder.host.lower() in ("localhost", "localhost.localdomain") and g.host != builder.host:
            log.warning("graphite: graphite.host %r resolved to %r (as collectd's would), so every such "
                        "host writes the same paths; set graphite.host to a name", g.host, builder.host)
        # Keepalive gives up on a silent idle carbon after about send_timeout.
        transport = Transport(g.server_host, g.server_port, g.protocol,
                              keepalive_probes=math.ceil(g.send_timeout / KEEPALIVE_INTERVAL))
        return cls(builder, transport, interval=interval, poll_interval=cfg.poll.interval,
                   capacity_lines=capacity, connect_timeout=g.connect_timeout,
                   send_timeout=g.send_timeout, flush_timeout=g.flush_timeout, **kwargs)

    # -- poller side ------------------------------------------------------------------------

    def on_poll(self, status: PollStatus) -> int:
        """Service.on_poll callback: render the new snapshot (if due) and queue it.
        Returns the number of lines queued (0 when nothing was due)."""
        snap = status.snapshot
        if snap is None or snap is self._last_snapshot:
            return 0  # before the first success, or a failed poll (keeps the old snapshot)
        self._last_snapshot = snap
        stamp = int(round(snap.timestamp))  # graphyte rounds the same way
        if self._last_pushed is not None:
            last_time, last_stamp = self._last_pushed
            if snap.timestamp < last_time + self.interval - self.poll_interval / 2:
                return 0  # graphite.interval is a multiple of poll.interval: not due yet
            if stamp <= last_stamp:
                # Two polls in one second (scheduling jitter): carbon keeps one point per
                # second, so a second push would only overwrite the first.
                log.debug("graphite: poll at %.3f falls in second %d, already pushed; skipped",
                          snap.timestamp, stamp)
                return 0
        self._last_pushed = (snap.timestamp, stamp)
        return self.push(status, stamp)

    def push(self, status: PollStatus, stamp: int) -> int:
        """Render `status` with timestamp `stamp` and queue it. Returns the lines queued."""
        rendered = self.builder.render(status, stamp, self.stats(), self.poll_interval)
        chunks = pack(rendered.lines, self.transport.chunk_bytes)
        with self._cond:
            drops = self._buffer.add(chunks)
            self._count_drops(drops)
            self._invalid += len(rendered.invalid)
            self._pushes += 1
            queued = len(self._buffer)
            self._cond.notify()
        if rendered.invalid and not self._invalid_logged:
            self._invalid_logged = True
            log.warning("graphite: %d invalid lines not queued (logged once), first: %s",
                        len(rendered.invalid), rendered.invalid[0])
        if drops.total and not self._dropping:
            self._dropping = True
            log.warning("graphite: buffer full (%d lines), dropping the oldest lines; "
                        "sockscope_graphite_dropped_lines_total (never written) and "
                        "sockscope_graphite_dropped_unconfirmed_lines_total (written, unconfirmed) "
                        "count them", self._buffer.capacity)
        elif not drops.total:
            self._dropping = False
        log.debug("graphite: queued %d lines stamped %d (queue %d lines)", len(rendered.lines), stamp, queued)
        return len(rendered.lines)

    def _count_drops(self, drops: Drops) -> None:
        """Under the lock."""
        self._dropped += drops.unsent
        self._dropped_unconfirmed += drops.unconfirmed

    def stats(self) -> GraphiteStats:
        with self._lock:
            return GraphiteStats(
                sent_lines=self._sent, send_errors=self._errors, dropped_lines=self._dropped,
                dropped_unconfirmed_lines=self._dropped_unconfirmed, resent_lines=self._resent,
                invalid_lines=self._invalid, queue_lines=len(self._buffer),
                unconfirmed_lines=self._buffer.unconfirmed, capacity_lines=self._buffer.capacity,
                pushes=self._pushes, last_success_timestamp=self._last_success,
                connected=self.transport.connected,
            )

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Pusher already started")
        self._thread = threading.Thread(target=self._run, name="sockscope-graphite", daemon=True)
        self._thread.start()
        log.info("pushing to Graphite at %s every %gs (buffer %d lines)",
                 self.destination, self.interval, self._buffer.capacity)

    def close(self, timeout: float | None = None) -> int:
        """Send what is queued and have it confirmed (TCP: carbon's FIN after our
        half-close) for at most `timeout` seconds (default flush_timeout), then stop.
        Returns the number of lines not sent (and logs it)."""
        timeout = self.flush_timeout if timeout is None else timeout
        started = self._monotonic()
        with self._cond:
            self._closing = True
            self._deadline = started + timeout
            self._cond.notify_all()
        self._next_attempt = 0.0  # one immediate attempt, even in the middle of a backoff
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 0.5)
            if self._thread.is_alive():  # stuck outside our timeouts (e.g. DNS)
                log.warning("graphite: sender thread still busy after %gs; abandoned", timeout)
            else:
                self.transport.close()
        with self._lock:
            unsent, unconfirmed = len(self._buffer), self._buffer.unconfirmed
        if unsent:
            log.warning("graphite: shutdown flush gave up after %.1fs: %d lines not sent to %s "
                        "(%d of them written but not confirmed)",
                        self._monotonic() - started, unsent, self.destination, unconfirmed)
        else:
            log.info("graphite: every queued line sent (%d since start)", self._sent)
        return unsent

    # -- reload: a successor takes over -------------------------------------------------------

    def continue_from(self, old: Pusher) -> None:
        """Take `old`'s push cadence (last snapshot and timestamp pushed), so the first
        poll after a reload is pushed on time, never twice and never in a second already
        pushed. Call while neither on_poll runs (Service holds its dispatch lock)."""
        self._last_snapshot = old._last_snapshot
        self._last_pushed = old._last_pushed

    def detach(self, timeout: float = HANDOVER_WAIT) -> tuple[list[Chunk], GraphiteStats]:
        """Stop sending at once, without a flush, and give up the queue: returns every
        unsent chunk (unconfirmed ones first, marked written, then the queue) and the final
        counters, for a successor's take_over().

        A send or connect in progress is interrupted (Transport.abort); its chunk goes
        back in line and is handed over whole (at-least-once, as after any failed send).
        Waits at most `timeout` for the sender thread; if it is stuck beyond that
        (e.g. DNS), the chunk it holds, if any, stays behind and is counted as dropped."""
        with self._cond:
            self._closing = self._detached = True
            self._deadline = -math.inf
            self._cond.notify_all()
        self._wake.set()
        self.transport.abort()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("graphite: sender thread for %s still busy after %gs; abandoned",
                            self.destination, timeout)
        with self._lock:
            chunks = self._buffer.drain()
            stranded = self._buffer.in_flight
            if stranded is not None:
                self._count_drops(Drops(0, stranded.lines) if stranded.written else Drops(stranded.lines, 0))
        if not (self._thread is not None and self._thread.is_alive()):
            self.transport.close()
        return chunks, self.stats()

    def take_over(self, chunks: list[Chunk], stats: GraphiteStats | None) -> int:
        """Queue a predecessor's chunks ahead of anything already queued (they keep the
        paths and timestamps they were rendered with) and add its counters to ours, so
        the counters on /metrics never go back. Returns the lines taken over (after
        trimming to this buffer's capacity; trimmed lines count as dropped)."""
        if chunks and max(len(c.data) for c in chunks) > self.transport.chunk_bytes:
            # e.g. tcp -> udp: re-pack into datagram-sized chunks (written chunks apart)
            chunks = [Chunk(c.data, c.lines, flag) for flag in (True, False)
                      for c in pack([line for c in chunks if c.written == flag
                                     for line in c.data.splitlines(keepends=True)],
                                    self.transport.chunk_bytes)]
        with self._cond:
            drops = self._buffer.prepend(chunks)
            self._count_drops(drops)
            if stats is not None:
                self._sent += stats.sent_lines
                self._errors += stats.send_errors
                self._dropped += stats.dropped_lines
                self._dropped_unconfirmed += stats.dropped_unconfirmed_lines
                self._resent += stats.resent_lines
                self._invalid += stats.invalid_lines
                self._pushes += stats.pushes
                self._last_success = max(self._last_success, stats.last_success_timestamp)
            self._cond.notify()
        total = sum(c.lines for c in chunks)
        if drops.total:
            log.warning("graphite: %d of the %d lines taken over did not fit the new buffer (%d lines); "
                        "the oldest were dropped", drops.total, total, self._buffer.capacity)
        return total - drops.total

    # -- sender thread ----------------------------------------------------------------------

    def _remaining(self, limit: float) -> float:
        """`limit`, shortened to what is left of the shutdown flush."""
        if not self._closing:
            return limit
        return max(0.001, min(limit, self._deadline - self._monotonic()))

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._buffer.has_queued and not self._closing:
                    if self._buffer.has_unconfirmed:
                        self._cond.wait(self.check_interval)  # a push wakes it earlier
                    else:
                        while not self._buffer.has_queued and not self._closing:
                            self._cond.wait()
                closing = self._closing
            if self._detached:
                self._stop_detached()
                return
            if self._confirming and self.transport.connected:
                self._check()
            if closing:
                if self._monotonic() >= self._deadline:
                    return
                with self._lock:
                    queued, unconfirmed = self._buffer.has_queued, self._buffer.has_unconfirmed
                if not queued:
                    if unconfirmed:
                        self._finish("shutdown", self._deadline - self._monotonic())
                        if self._buffer.has_queued:
                            continue  # carbon did not confirm: written again if time is left
                    return
            if not self._buffer.has_queued:
                continue
            if not self.transport.connected and not self._connect():
                continue
            with self._lock:
                chunk = self._buffer.take()
            if chunk is None:
                continue
            try:
                self.transport.send_message(chunk.data, timeout=self._remaining(self.send_timeout))
            except OSError as exc:
                if self._detached:  # interrupted by detach(): not a failure of carbon
                    self._stop_detached()
                    return
                self._failed("send", exc)
                continue
            with self._lock:
                if chunk.written:
                    self._resent += chunk.lines
                if self._confirming:
                    self._written_bytes += len(chunk.data)
                    self._count_drops(self._buffer.written(self._written_bytes))
                else:  # UDP: fire and forget
                    self._buffer.done()
                    self._sent += chunk.lines
                    self._last_success = self._clock()
                backlog = len(self._buffer)
            if self._failures:
                self._recovered(backlog)

    def _stop_detached(self) -> None:
        with self._lock:
            self._count_drops(self._buffer.requeue())
        self.transport.close()

    def _check(self) -> None:
        """Look at the connection: confirm what carbon has read, or put back everything
        unconfirmed if carbon closed or reset it."""
        try:
            probe = self.transport.probe()
        except OSError as exc:
            self._failed("connection check", exc)
            return
        if probe.window is not None:
            self._max_window = max(self._max_window, probe.window)
        window_full = probe.window is None or probe.window >= self._max_window
        if probe.closed:
            if probe.error is None and probe.unacked == 0 and window_full:
                # A clean FIN after acknowledging everything: carbon read it all.
                with self._lock:
                    self._confirmed(self._buffer.confirm_all())
                log.info("graphite: %s closed the connection; reconnecting", self.destination)
                self.transport.close()
                return
            with self._lock:
                unconfirmed = self._buffer.unconfirmed
            if not unconfirmed:
                log.info("graphite: %s closed the connection (%s); reconnecting", self.destination,
                         probe.error or "EOF")
                self.transport.close()
                return
            self._failed("connection", probe.error or ConnectionError(
                f"carbon closed the connection with {probe.unacked} bytes unacknowledged, "
                f"{unconfirmed} lines unconfirmed"))
            return
        now = self._monotonic()
        with self._lock:
            confirmed = self._buffer.confirm(self._written_bytes - probe.unacked, window_full,
                                             now, self.confirm_delay)
            self._confirmed(confirmed)
            acked_at = self._buffer.oldest_acked_at()
        if confirmed:
            log.debug("graphite: %d lines confirmed (%d of %d bytes acknowledged, window %s of %d)", confirmed,
                      self._written_bytes - probe.unacked, self._written_bytes, probe.window, self._max_window)
        if acked_at is not None and now - acked_at >= self.recycle_after:
            # Acknowledged long ago, yet carbon's window never came back: it is not
            # reading (or its window shrank for good). Its FIN would confirm everything.
            log.info("graphite: %s acknowledged lines %.0fs ago without its window coming back; "
                     "closing the connection to have them confirmed", self.destination, now - acked_at)
            self._finish("recycle", self._remaining(self.send_timeout))

    def _confirmed(self, lines: int) -> None:
        """Under the lock."""
        if lines:
            self._sent += lines
            self._last_success = self._clock()

    def _finish(self, why: str, timeout: float) -> None:
        """Half-close and wait for carbon's FIN: it confirms every unconfirmed line; a
        reset or a timeout puts them back in line (a failure)."""
        if self.transport.finish(max(0.0, timeout)):
            with self._lock:
                self._confirmed(self._buffer.confirm_all())
            log.debug("graphite: %s: %s read everything and closed", why, self.destination)
            return
        self._failed(why, ConnectionError(f"carbon did not close cleanly within {timeout:.1f}s "
                                          "(reset, or still not reading)"))

    def _connect(self) -> bool:
        wait = self._next_attempt - self._monotonic()
        if wait > 0:
            if self._closing:
                wait = min(wait, self._deadline - self._monotonic())
            self._wake.wait(max(0.0, wait))
            self._wake.clear()
            return False  # re-check closing/deadline first
        try:
            self.transport.connect(self._remaining(self.connect_timeout))
        except (OSError, ValueError) as exc:  # ValueError: e.g. an IDNA-invalid host name
            if self._detached:
                self.transport.close()
                return False
            self._failed("connect", exc)
            return False
        self._written_bytes = self._max_window = 0
        log.debug("graphite: connected to %s", self.destination)
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        """Close the connection; everything unconfirmed and the chunk in flight go back
        first in line; count the error and back off."""
        if self._detached:  # detach() interrupted it: not a failure of carbon
            self._stop_detached()
            return
        self.transport.close()
        with self._lock:
            resend = self._buffer.unconfirmed + (self._buffer.in_flight.lines if self._buffer.in_flight else 0)
            self._count_drops(self._buffer.requeue())
            self._errors += 1
            queued = len(self._buffer)
        self._failures += 1
        initial, cap = self._backoff
        delay = min(cap, initial * 2 ** (self._failures - 1))
        delay *= 0.5 + 0.5 * self._jitter()  # "equal jitter": never less than half the delay
        self._next_attempt = self._monotonic() + delay
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._failures == 1:
            self._outage_started = self._monotonic()
            log.warning("graphite: %s to %s failed (%s); %d lines written but unconfirmed will be "
                        "sent again; buffering (%d lines queued), retrying with backoff up to %gs",
                        what, self.destination, message, resend, queued, cap)
        else:
            log.debug("graphite: %s to %s failed again (%s); %d lines to send again; next attempt in %.1fs",
                      what, self.destination, message, resend, delay)

    def _recovered(self, backlog: int) -> None:
        took = self._monotonic() - (self._outage_started or self._monotonic())
        log.info("graphite: sending to %s again after %d failed attempts over %.1fs; %d lines still queued",
                 self.destination, self._failures, took, backlog)
        self._failures = 0
        self._outage_started = None


