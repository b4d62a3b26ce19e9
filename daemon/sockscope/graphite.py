"""Graphite push: every Snapshot as plaintext lines `<path> <value> <timestamp>`, to carbon.

The only module that imports graphyte. graphyte builds the lines (`Sender.build_message`)
and is the send seam (`Sender.send_message`, overridden by `Transport` to keep one
connection); everything graphyte leaves out is here:

    poller thread                         sender thread ("sockscope-graphite")
    Pusher.on_poll(status)                Pusher._run()
      LineBuilder.render(snapshot)          connect (timeouts, capped backoff + jitter)
        validate every line                 take the oldest chunk, send it whole
      pack lines into chunks                on failure put it back first in line
      LineBuffer.add()  ── lock ──►         LineBuffer (bounded in lines, drops oldest)

Delivery is at-least-once over TCP: a chunk is removed from the buffer only when
`sendall` returned. A chunk that failed half-way is sent again whole on the next
connection, so carbon may receive some of its lines twice: same path, value and
timestamp, i.e. the same whisper point written twice. The half line carbon may have
received before the connection broke is discarded by carbon's line receiver when that
connection closes (it only parses complete lines).

What TCP cannot tell us: bytes that `sendall` handed to the kernel but carbon never read
(carbon killed with data in its socket buffer). The socket's send buffer is capped
(SNDBUF_BYTES) to bound that window, and a connection the peer closed is detected before
each send (a plain `send` on it would "succeed" once and lose that chunk). UDP has no
delivery guarantee at all: a datagram is counted sent when the kernel accepted it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import graphyte

from .snapshot import FAMILIES, OTHER, STATES, PollStatus, PortTable, Snapshot

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

__all__ = [
    "COLLECTD_STATES",
    "GraphiteStats",
    "InvalidLine",
    "LineBuffer",
    "LineBuilder",
    "Pusher",
    "Transport",
    "collectd_hostname",
    "default_buffer_lines",
    "series_per_push",
]

# carbon's LineReceiver (twisted LineOnlyReceiver.MAX_LENGTH): a longer line makes carbon
# drop the connection and, with it, the rest of the batch. Counted with the newline.
MAX_LINE_BYTES = 16384
# One TCP send. Small enough that a retried chunk repeats little.
TCP_CHUNK_BYTES = 32 * 1024
# One UDP datagram: fits an Ethernet frame over IPv6 (1500 - 40 - 28), like collectd's
# write_graphite buffer. A single longer line (at most MAX_LINE_BYTES) goes alone.
UDP_DATAGRAM_BYTES = 1432
# SO_SNDBUF of the TCP socket (the kernel doubles it): bounds the lines that can be
# "sent" but not yet read by carbon, i.e. silently lost if carbon dies right then.
SNDBUF_BYTES = 64 * 1024
BACKOFF_INITIAL = 0.5  # seconds before the first reconnect
BACKOFF_MAX = 30.0  # cap of the exponential backoff
# The default buffer holds this much outage at the configured series count.
OUTAGE_SECONDS = 1800
# Self-metric lines per push (see LineBuilder._self_series).
SELF_SERIES = 9
# Pusher.detach (reload): how long to wait for the interrupted sender thread to stop.
HANDOVER_WAIT = 2.0

# collectd tcpconns' names for the kernel states (src/tcpconns.c, tcp_state[]), keyed by
# sockscope's names. collectd never sees TCP_NEW_SYN_RECV; sockscope counts request
# sockets as syn_recv, as `ss` shows them.
COLLECTD_STATES = {
    "established": "ESTABLISHED",
    "syn_sent": "SYN_SENT",
    "syn_recv": "SYN_RECV",
    "fin_wait1": "FIN_WAIT1",
    "fin_wait2": "FIN_WAIT2",
    "time_wait": "TIME_WAIT",
    "close": "CLOSED",
    "close_wait": "CLOSE_WAIT",
    "last_ack": "LAST_ACK",
    "listen": "LISTEN",
    "closing": "CLOSING",
}
assert tuple(COLLECTD_STATES) == STATES

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

    sent_lines: int = 0
    send_errors: int = 0  # failed connection attempts and failed sends
    dropped_lines: int = 0  # oldest lines dropped because the buffer was full
    invalid_lines: int = 0  # lines refused by validation, never queued
    queue_lines: int = 0  # waiting, including a chunk being sent
    capacity_lines: int = 0
    pushes: int = 0  # snapshots rendered and queued
    last_success_timestamp: float = 0.0  # UNIX time of the last successful send; 0 = never
    connected: bool = False


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

    def series(self, snap: Snapshot, status: PollStatus | None = None,
               stats: GraphiteStats | None = None) -> Iterator[tuple[str, object]]:
        """Every series of one push, in a fixed order: sockets, ports, listeners, self."""
        if self.naming == "collectd":
            yield from self._collectd_series(snap)
        else:
            yield from self._sockscope_series(snap)
        yield from self._self_series(snap, status, stats)

    def _name(self, untagged: Iterable[str], metric: str, tags: Iterable[tuple[str, str]]) -> str:
        """Untagged: <base>.<components, sanitised>. Tagged: <base>.<metric>;k=v...;host=H."""
        if not self.tags:
            return ".".join([self._base, *(sanitize(str(c)) for c in untagged)])
        suffix = "".join(f";{k}={tag_value(str(v))}" for k, v in tags)
        return f"{self._base}.{metric}{suffix};host={self._host_tag}"

    def _sockscope_series(self, snap: Snapshot) -> Iterator[tuple[str, object]]:
        rank = {f: i for i, f in enumerate(FAMILIES)}
        for family in sorted(snap.families, key=lambda f: (rank.get(f, len(rank)), f)):
            for state in STATES:
                yield (self._name(("tcp", "states", family, state), "tcp.sockets",
                                  (("family", family), ("state", state))),
                       snap.states.get((family, state), 0))
        for side in ("local", "remote"):
            table: PortTable = getattr(snap, side)
            for i in _port_order(table):
                port = table.ports[i]
                for state, count in zip(STATES, table.counts[i]):
                    yield (self._name(("tcp", f"{side}_port", port, state), f"tcp.{side}_port_sockets",
                                      (("port", port), ("state", state))), count)
                if side == "local":
                    q = table.queues[i]
                    for what, value in (("receive_queue_bytes", q.receive_bytes),
                                        ("send_queue_bytes", q.send_bytes)):
                        yield (self._name(("tcp", "local_port", port, what), f"tcp.local_port_{what}",
                                          (("port", port),)), value)
        for lst in sorted(snap.listeners, key=lambda x: (x.port, x.address)):
            for what, value in (("queue_length", lst.queue_length), ("queue_limit", lst.queue_limit)):
                yield (self._name(("tcp", "listen", f"{lst.address}_{lst.port}", what), f"tcp.listen_{what}",
                                  (("address", lst.address), ("port", lst.port))), value)

    def _collectd_series(self, snap: Snapshot) -> Iterator[tuple[str, object]]:
        # tcpconns with AllPortsSummary: the per-state totals over every socket.
        for state in STATES:
            total = sum(snap.states.get((f, state), 0) for f in snap.families)
            yield f"{self._base}.tcpconns-all.tcp_connections-{COLLECTD_STATES[state]}", total
        for side in ("local", "remote"):
            table: PortTable = getattr(snap, side)
            for i in _port_order(table):
                port = table.ports[i]
                if port == OTHER:  # collectd has no such bucket
                    continue
                for state, count in zip(STATES, table.counts[i]):
                    yield (f"{self._base}.tcpconns-{port}-{side}.tcp_connections-{COLLECTD_STATES[state]}",
                           count)

    def _self_series(self, snap: Snapshot, status: PollStatus | None,
                     stats: GraphiteStats | None) -> Iterator[tuple[str, object]]:
        if stats is None:
            return
        figures = [
            ("graphite", "sent_lines", stats.sent_lines),
            ("graphite", "send_errors", stats.send_errors),
            ("graphite", "dropped_lines", stats.dropped_lines),
            ("graphite", "invalid_lines", stats.invalid_lines),
            ("graphite", "queue_lines", stats.queue_lines),
        ]
        if stats.last_success_timestamp:
            figures.append(("graphite", "last_success_timestamp_seconds", stats.last_success_timestamp))
        figures += [("poll", "duration_seconds", snap.duration), ("poll", "sockets", snap.sockets)]
        if status is not None:
            figures.append(("poll", "errors", status.errors))
        for group, name, value in figures:
            if self.naming == "collectd" or not self.tags:
                yield ".".join([self._base, "sockscope", group, name]), value
            else:
                yield f"{self._base}.sockscope.{group}.{name};host={self._host_tag}", value

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

    def render(self, snap: Snapshot, timestamp: int, status: PollStatus | None = None,
               stats: GraphiteStats | None = None) -> Rendered:
        lines: list[bytes] = []
        invalid: list[str] = []
        for path, value in self.series(snap, status, stats):
            try:
                lines.append(self.line(path, value, timestamp))
            except InvalidLine as exc:
                invalid.append(str(exc))
        return Rendered(lines, invalid)


def _port_order(table: PortTable) -> list[int]:
    """Row indices: numeric ports ascending, then OTHER."""
    return sorted(range(len(table.ports)),
                  key=lambda i: (1, 0) if table.ports[i] == OTHER else (0, int(table.ports[i])))


def series_per_push(naming: str, families: int, max_local: int, max_remote: int, max_listeners: int) -> int:
    """Upper bound of lines in one push for the configured caps (every tracked port full,
    every listener slot used). sockscope/tags: per family 11 states; per local port (cap +
    `other`) 11 states + 2 queue figures; per remote port 11 states; 2 per listener.
    collectd: 11 totals + 11 per tracked port on each side. Plus SELF_SERIES."""
    n = len(STATES)
    if naming == "collectd":
        return n + n * (max_local + max_remote) + SELF_SERIES
    return families * n + (max_local + 1) * (n + 2) + (max_remote + 1) * n + 2 * max_listeners + SELF_SERIES


def default_buffer_lines(interval: float, per_push: int) -> int:
    """Lines for OUTAGE_SECONDS of pushes every `interval` seconds at `per_push` lines."""
    return math.ceil(OUTAGE_SECONDS / interval) * per_push


# -- buffer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    data: bytes  # whole lines
    lines: int


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
    return Chunk(chunk.data[pos:], chunk.lines - n)


class LineBuffer:
    """FIFO of chunks bounded in lines; when full the OLDEST lines are dropped (counted).

    Not thread-safe: the Pusher calls it under its lock. At most one chunk is "in
    flight" (taken by the sender); it is not counted against the capacity while in
    flight (so new lines never push it out mid-send), and when it comes back after a
    failed send it is first in line again and the capacity is enforced from there. So
    memory is bounded by capacity + one chunk.
    """

    def __init__(self, capacity_lines: int) -> None:
        if capacity_lines < 1:
            raise ValueError("capacity must be >= 1 line")
        self.capacity = capacity_lines
        self._chunks: deque[Chunk] = deque()
        self._lines = 0
        self.in_flight: Chunk | None = None

    def __len__(self) -> int:
        """Lines waiting, including the chunk in flight."""
        return self._lines + (self.in_flight.lines if self.in_flight else 0)

    @property
    def has_queued(self) -> bool:
        return bool(self._chunks)

    def add(self, chunks: Iterable[Chunk]) -> int:
        """Append; returns the number of (oldest) lines dropped to stay within capacity."""
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
        """The chunk in flight was sent."""
        self.in_flight = None

    def give_back(self) -> int:
        """The chunk in flight was not sent: first in line again. Returns lines dropped."""
        chunk, self.in_flight = self.in_flight, None
        if chunk is None:
            return 0
        self._chunks.appendleft(chunk)
        self._lines += chunk.lines
        return self._trim()

    def drain(self) -> list[Chunk]:
        """Remove and return every queued chunk, oldest first (a successor takes them).
        The chunk in flight, if any, stays with this buffer."""
        chunks, self._chunks, self._lines = list(self._chunks), deque(), 0
        return chunks

    def prepend(self, chunks: list[Chunk]) -> int:
        """Put `chunks` (older lines) ahead of everything queued; returns lines dropped
        (the oldest first) to stay within capacity."""
        for chunk in reversed(chunks):
            self._chunks.appendleft(chunk)
            self._lines += chunk.lines
        return self._trim()

    def _trim(self) -> int:
        dropped = 0
        while self._lines > self.capacity:
            excess = self._lines - self.capacity
            head = self._chunks[0]
            if head.lines <= excess:
                self._chunks.popleft()
                self._lines -= head.lines
                dropped += head.lines
            else:
                self._chunks[0] = _drop_lines(head, excess)
                self._lines -= excess
                dropped += excess
        return dropped


# -- transport ------------------------------------------------------------------------------


class Transport(graphyte.Sender):
    """graphyte's send seam (`send_message`) over ONE persistent socket.

    graphyte opens a connection per message; this keeps one TCP connection (or one
    connected UDP socket) until a send fails. Every call raises OSError on failure and
    leaves the transport disconnected; the Pusher decides about retries.
    """

    def __init__(self, host: str, port: int, protocol: str = "tcp", *,
                 sndbuf: int = SNDBUF_BYTES) -> None:
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
        super().__init__(host, port, protocol=protocol)
        self.sndbuf = sndbuf
        self._sock: socket.socket | None = None
        self._connecting: socket.socket | None = None  # for abort()

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

    def peer_closed(self) -> bool:
        """True if carbon closed (or reset) the TCP connection. carbon never writes, so a
        readable socket means EOF or an error."""
        if self._sock is None or self.protocol != "tcp":
            return False
        try:
            # Non-blocking: with a timeout set, Python would wait for readability first.
            self._sock.settimeout(0.0)
            data = self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return data == b""

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
        self._backoff = backoff
        self._clock = clock
        self._monotonic = monotonic
        self._jitter = jitter
        self.destination = f"{transport.protocol}://{_format_address(transport.host, transport.port)}"

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._buffer = LineBuffer(capacity_lines)
        self._sent = self._errors = self._dropped = self._invalid = self._pushes = 0
        self._last_success = 0.0
        self._closing = False
        self._detached = False  # stopped by detach(): a successor owns the queue
        self._deadline = math.inf
        self._thread: threading.Thread | None = None
        # sender thread only
        self._failures = 0
        self._next_attempt = 0.0
        self._outage_started: float | None = None
        # poller thread only
        self._last_snapshot: Snapshot | None = None
        self._last_pushed: tuple[float, int] | None = None  # (poll timestamp, line timestamp)
        self._dropping = False
        self._invalid_logged = False

    @classmethod
    def from_config(cls, cfg: Config, **kwargs) -> Pusher:
        g = cfg.graphite
        interval = g.interval or cfg.poll.interval
        per_push = series_per_push(g.naming, len(cfg.poll.families), cfg.ports.max_local,
                                   cfg.ports.max_remote, cfg.listeners.max_tracked)
        capacity = g.buffer_lines or default_buffer_lines(interval, per_push)
        if capacity < per_push:
            log.warning("graphite.buffer_lines (%d) is smaller than one push at the configured caps "
                        "(up to %d lines): any outage drops lines", capacity, per_push)
        builder = LineBuilder(naming=g.naming, tags=g.tags, prefix=g.prefix, host=g.host,
                              **{k: kwargs.pop(k) for k in ("hostname", "fqdn") if k in kwargs})
        if builder.host.lower() in ("localhost", "localhost.localdomain") and g.host != builder.host:
            log.warning("graphite: graphite.host %r resolved to %r (as collectd's would), so every such "
                        "host writes the same paths; set graphite.host to a name", g.host, builder.host)
        transport = Transport(g.server_host, g.server_port, g.protocol)
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
        return self.push(snap, stamp, status)

    def push(self, snap: Snapshot, stamp: int, status: PollStatus | None = None) -> int:
        """Render `snap` with timestamp `stamp` and queue it. Returns the lines queued."""
        rendered = self.builder.render(snap, stamp, status, self.stats())
        chunks = pack(rendered.lines, self.transport.chunk_bytes)
        with self._cond:
            dropped = self._buffer.add(chunks)
            self._dropped += dropped
            self._invalid += len(rendered.invalid)
            self._pushes += 1
            queued = len(self._buffer)
            self._cond.notify()
        if rendered.invalid and not self._invalid_logged:
            self._invalid_logged = True
            log.warning("graphite: %d invalid lines not queued (logged once), first: %s",
                        len(rendered.invalid), rendered.invalid[0])
        if dropped and not self._dropping:
            self._dropping = True
            log.warning("graphite: buffer full (%d lines), dropping the oldest lines; "
                        "sockscope_graphite_dropped_lines_total counts them", self._buffer.capacity)
        elif not dropped:
            self._dropping = False
        log.debug("graphite: queued %d lines stamped %d (queue %d lines)", len(rendered.lines), stamp, queued)
        return len(rendered.lines)

    def stats(self) -> GraphiteStats:
        with self._lock:
            return GraphiteStats(
                sent_lines=self._sent, send_errors=self._errors, dropped_lines=self._dropped,
                invalid_lines=self._invalid, queue_lines=len(self._buffer),
                capacity_lines=self._buffer.capacity, pushes=self._pushes,
                last_success_timestamp=self._last_success, connected=self.transport.connected,
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
        """Send what is queued for at most `timeout` seconds (default flush_timeout), then
        stop. Returns the number of lines that could not be sent (and logs it)."""
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
        unsent = len(self._buffer)
        if unsent:
            log.warning("graphite: shutdown flush gave up after %.1fs: %d lines not sent to %s",
                        self._monotonic() - started, unsent, self.destination)
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
        """Stop sending at once, without a flush, and give up the queue: returns the queued
        chunks (oldest first) and the final counters, for a successor's take_over().

        A send or connect in progress is interrupted (Transport.abort); its chunk goes
        back first in line and is handed over whole (at-least-once, as after any failed
        send). Waits at most `timeout` for the sender thread; if it is stuck beyond that
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
            stranded = self._buffer.in_flight.lines if self._buffer.in_flight else 0
            self._dropped += stranded
        if not (self._thread is not None and self._thread.is_alive()):
            self.transport.close()
        return chunks, self.stats()

    def take_over(self, chunks: list[Chunk], stats: GraphiteStats | None) -> int:
        """Queue a predecessor's chunks ahead of anything already queued (they keep the
        paths and timestamps they were rendered with) and add its counters to ours, so
        the counters on /metrics never go back. Returns the lines taken over (after
        trimming to this buffer's capacity; trimmed lines count as dropped)."""
        if chunks and max(len(c.data) for c in chunks) > self.transport.chunk_bytes:
            # e.g. tcp -> udp: re-pack into datagram-sized chunks
            chunks = pack([line for c in chunks for line in c.data.splitlines(keepends=True)],
                          self.transport.chunk_bytes)
        with self._cond:
            dropped = self._buffer.prepend(chunks)
            self._dropped += dropped
            if stats is not None:
                self._sent += stats.sent_lines
                self._errors += stats.send_errors
                self._dropped += stats.dropped_lines
                self._invalid += stats.invalid_lines
                self._pushes += stats.pushes
                self._last_success = max(self._last_success, stats.last_success_timestamp)
            self._cond.notify()
        if dropped:
            log.warning("graphite: %d of the %d lines taken over did not fit the new buffer (%d lines); "
                        "the oldest were dropped", dropped, sum(c.lines for c in chunks), self._buffer.capacity)
        return sum(c.lines for c in chunks) - dropped

    # -- sender thread ----------------------------------------------------------------------

    def _remaining(self, limit: float) -> float:
        """`limit`, shortened to what is left of the shutdown flush."""
        if not self._closing:
            return limit
        return max(0.001, min(limit, self._deadline - self._monotonic()))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buffer.has_queued and not self._closing:
                    self._cond.wait()
                if self._closing and (not self._buffer.has_queued or self._monotonic() >= self._deadline):
                    if self._detached:
                        self.transport.close()
                    return
            if self.transport.peer_closed():
                log.info("graphite: %s closed the connection; reconnecting", self.destination)
                self.transport.close()
            if not self.transport.connected and not self._connect():
                continue
            with self._lock:
                chunk = self._buffer.take()
            if chunk is None:
                continue
            try:
                self.transport.send_message(chunk.data, timeout=self._remaining(self.send_timeout))
            except OSError as exc:
                with self._lock:
                    self._dropped += self._buffer.give_back()
                if self._detached:  # interrupted by detach(): not a failure of carbon
                    self.transport.close()
                    return
                self._failed("send", exc)
                continue
            with self._lock:
                self._buffer.done()
                self._sent += chunk.lines
                self._last_success = self._clock()
                backlog = len(self._buffer)
            if self._failures:
                self._recovered(backlog)

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
        log.debug("graphite: connected to %s", self.destination)
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        self.transport.close()
        with self._lock:
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
            log.warning("graphite: %s to %s failed (%s); buffering (%d lines queued), "
                        "retrying with backoff up to %gs", what, self.destination, message, queued, cap)
        else:
            log.debug("graphite: %s to %s failed again (%s); next attempt in %.1fs",
                      what, self.destination, message, delay)

    def _recovered(self, backlog: int) -> None:
        took = self._monotonic() - (self._outage_started or self._monotonic())
        log.info("graphite: sending to %s again after %d failed attempts over %.1fs; %d lines still queued",
                 self.destination, self._failures, took, backlog)
        self._failures = 0
        self._outage_started = None


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
