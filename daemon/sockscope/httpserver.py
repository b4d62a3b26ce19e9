"""A small, bounded HTTP/1.1 server for /metrics: one I/O thread, a fixed pool of workers.

Why not http.server (what prometheus-client uses): it starts one thread per connection
with no cap and its timeout is per read, so idle or trickling clients exhaust the unit's
TasksMax or file descriptors and a client that sends a header line every 25 s is never
dropped; its TLS mode handshakes in the accept loop. The libraries evaluated instead are
listed in docs/design.md (none met every limit below with TLS and basic auth).

Shape:
- One I/O thread owns every socket (selectors/epoll, non-blocking): accepts, TLS
  handshakes (non-blocking, in the loop), reads request heads, writes responses. It never
  runs application code or bcrypt.
- `Limits.workers` threads run the application (`app(request) -> Response`); one more
  thread runs the slow half of basic auth (bcrypt), so password guessing occupies at most
  one core and never the workers. Both queues are bounded; beyond them the request gets a
  503 at once.
- Every connection is bounded in time: TLS handshake + request head within
  `request_timeout` of the accept (or of the first byte of a keep-alive request), an idle
  keep-alive connection closes after `idle_timeout`, a response must be taken within
  `write_timeout`. Keep-alive serves at most `max_requests` requests per connection.
- At most `max_connections` connections are open; a new one past the cap closes the
  connection that has been waiting longest for a request to arrive (idle, trickling or
  handshaking — never one whose request is being served). On EMFILE the same eviction
  frees a descriptor; with none to evict, accepting pauses briefly instead of spinning.

Everything a client can do costs it a bounded amount of our memory: a request head is at
most `max_header_bytes`, request bodies are never read (the connection closes after the
response), a response body is shared bytes, not a copy per client.
"""

from __future__ import annotations

import collections
import email.utils
import errno
import logging
import os
import queue
import resource
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .config import format_endpoint

log = logging.getLogger(__name__)

__all__ = ["Limits", "Request", "Response", "HTTPServer", "ServerStats", "raise_fd_limit",
           "DROP_REASONS"]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client, and all of them together, may cost (docs/service.md)."""

    max_connections: int = 512
    workers: int = 4
    request_timeout: float = 10.0  # TLS handshake + request head, from accept/first byte
    idle_timeout: float = 120.0  # a keep-alive connection waiting for its next request
    write_timeout: float = 30.0  # a response must be taken by the client within this
    max_requests: int = 1000  # per keep-alive connection
    max_header_bytes: int = 16384
    max_headers: int = 100
    queue: int = 128  # requests waiting for a worker
    auth_queue: int = 16  # requests waiting for a bcrypt check


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    path: str
    query: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    client: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | tuple[bytes, ...] = b""  # parts are sent back to back, never joined

    @property
    def parts(self) -> tuple[bytes, ...]:
        return (self.body,) if isinstance(self.body, bytes) else self.body


_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 408: "Request Timeout",
    413: "Content Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
STATUS_CODES = tuple(_REASONS)  # the only codes this server sends: a bounded label set

# Why the server closed a connection before answering it (sockscope_http_dropped_connections_total).
DROP_REASONS = ("evicted", "request_timeout", "idle_timeout", "write_timeout", "tls_handshake",
                "accept_error")

# A TLS record starts with content type 22 (handshake); anything else on the TLS port is
# most likely plain HTTP, answered like Go's net/http does.
_TLS_HANDSHAKE_RECORD = 0x16
_PLAIN_HTTP_ON_TLS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_ACCEPT_BATCH = 64  # accepts per readiness event, so reads of accepted clients interleave
_TICK = 0.25  # seconds between deadline sweeps
_SEND_CHUNK = 256 * 1024
_TLS_SEND_CHUNK = 16384  # one TLS record
_FD_RESERVE = 64  # descriptors kept for everything but client connections


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(data: bytes, client: str = "", max_headers: int = 100) -> Request:
    """A Request from a request head (request line + header lines, without the blank
    line). Raises HTTPError with the status to answer. Pure; tested on hostile input."""
    lines = data.split(b"\n")
    line = lines[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not method or not all(c in _TOKEN for c in method):
        raise HTTPError(400, "malformed method")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/") and version[5:6].isdigit():
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are served")
        raise HTTPError(400, "malformed HTTP version")
    if not target or any(c <= 0x20 or c == 0x7F for c in target):
        raise HTTPError(400, "malformed request target")
    if len(lines) - 1 > max_headers:
        raise HTTPError(431, f"more than {max_headers} header lines")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        raw = raw.rstrip(b"\r")
        if raw[:1] in (b" ", b"\t"):
            raise HTTPError(400, "obsolete header line folding")
        name, colon, value = raw.partition(b":")
        if not colon or not name or not all(c in _TOKEN for c in name):
            raise HTTPError(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if any(ord(ch) < 0x20 and ch != "\t" for ch in text):
            raise HTTPError(400, "control character in a header value")
        if key in headers:
            if key in ("authorization", "content-length", "host"):
                raise HTTPError(400, f"{key} given twice")
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
    target_text = target.decode("latin-1")
    url = urlsplit(target_text) if not target_text.startswith("/") else None
    if url is not None and (url.scheme not in ("http", "https") or not url.netloc):
        if target_text != "*":
            raise HTTPError(400, "malformed request target")
    path, _, query = (target_text if url is None else (url.path or "/") + ("?" + url.query if url.query else "")).partition("?")
    return Request(method.decode("ascii"), target_text, path, query, version.decode("ascii"),
                   headers, client)


def _wants_keep_alive(req: Request) -> bool:
    tokens = {t.strip().lower() for t in req.headers.get("connection", "").split(",")}
    if req.version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def _has_body(req: Request) -> bool:
    if "transfer-encoding" in req.headers:
        return True
    length = req.headers.get("content-length", "0").strip()
    return not (length.isdigit() and int(length) == 0)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (as Go programs do at start) so
    that `wanted` descriptors fit. Returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, e)
    return soft


class _Throttle:
    """Log a recurring per-request problem at most once per `every` seconds, with the
    count of those not logged: a hostile client cannot flood the journal."""

    def __init__(self, every: float = 60.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._monotonic = monotonic
        self._next: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, level: int, key: str, message: str, *args, exc_info=None) -> None:
        now = self._monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._suppressed[key] += 1
                return
            self._next[key] = now + self._every
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" ({suppressed} similar not logged in the last {self._every:g}s)"
        log.log(level, message, *args, exc_info=exc_info)


@dataclass(frozen=True, slots=True)
class ServerStats:
    """A consistent copy of the server's counters (sockscope_http_* metrics)."""

    open_connections: int
    max_connections: int
    accepted: int
    dropped: dict[str, int]  # DROP_REASONS -> count
    requests: dict[int, int]  # status code -> count


# Connection states
_PEEK, _HANDSHAKE, _READ, _BUSY, _WRITE, _LINGER = range(6)
_LINGER_SECONDS = 1.0  # after an error reply: read and discard what the client still sends...
_LINGER_BYTES = 256 * 1024  # ...at most this much, so the reply is not lost to a reset


class _Conn:
    __slots__ = ("sock", "client", "state", "buf", "deadline", "out", "out_pos", "keep_alive",
                 "served", "tls", "first_request", "head_only", "http10", "linger", "registered",
                 "closed")

    def __init__(self, sock: socket.socket, client: str, tls: ssl.SSLContext | None) -> None:
        self.sock: Any = sock  # a socket.socket; an ssl.SSLSocket once TLS wraps it
        self.client = client
        self.tls = tls
        self.state = _PEEK if tls is not None else _READ
        self.buf = bytearray()
        self.deadline = 0.0
        self.out: collections.deque[memoryview] = collections.deque()
        self.out_pos = 0
        self.keep_alive = False
        self.served = 0
        self.first_request = True
        self.head_only = False  # the request being answered is a HEAD
        self.http10 = False
        self.linger = 0  # > 0: close gracefully (bytes still to discard), see _linger()
        self.registered = 0  # selector events currently registered (0 = none)
        self.closed = False


class HTTPServer:
    """Serves `app` (request -> Response) on host:port; see the module docstring.

    `web` (a webconfig.WebConfig or None) gives TLS (`web.tls`) and basic auth
    (`web.auth_quick(header)` -> True/False/None, `web.authorized(header)` -> bool); it and
    `app` are read once per connection / request, so they can be swapped at any time.
    """

    def __init__(self, app: Callable[[Request], Response], host: str, port: int, *, web=None,
                 limits: Limits = Limits(), server_header: str = "sockscope",
                 yield_to: Callable[[], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        # Called by the I/O thread before each round of work and by a worker before each
        # request; blocks while the poller's dump should have the GIL to itself
        # (poller.DumpGate.wait). Without it, a server busy with scrapes makes the dump wait
        # for the GIL after every one of its thousands of netlink reads.
        self._yield_to = yield_to or (lambda: None)
        self.web = web
        self.host = host
        self._port = port
        self.limits = limits
        self._server_header = server_header
        self._monotonic = monotonic
        self._listener: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._sel: selectors.BaseSelector | None = None  # both set by start() before the I/O thread runs: its uses carry type: ignore[union-attr]
        self._wake_fd = -1
        self._done: collections.deque[tuple[_Conn, Response]] = collections.deque()
        self._auth_done: collections.deque[tuple[_Conn, Request, bool]] = collections.deque()
        # Connections with a complete pipelined request in their buffer (never recursion).
        self._pipelined: collections.deque[_Conn] = collections.deque()
        self._work: queue.Queue = queue.Queue(maxsize=limits.queue)
        self._auth: queue.Queue = queue.Queue(maxsize=limits.auth_queue)
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._conns: dict[int, _Conn] = {}
        # Connections waiting for a request (or handshaking), oldest wait first: the
        # eviction order. Busy and writing connections are never in it.
        self._waiting: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        self._max_connections = limits.max_connections
        self._accept_paused_until = 0.0
        self._accepted = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._requests = dict.fromkeys(STATUS_CODES, 0)
        self._throttle = _Throttle(monotonic=monotonic)
        self._date = (0, "")

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._bound[1] if self._bound is not None else self._port

    @property
    def address(self) -> str:
        if self._bound is not None:
            return format_endpoint(*self._bound)
        return format_endpoint(self.host or "*", self._port)

    def _resolve(self) -> tuple[int, Any, bool]:
        host = self.host.strip("[]")
        if host == "":
            if _dual_stack_available():
                return socket.AF_INET6, "::", True
            return socket.AF_INET, "0.0.0.0", False
        try:
            infos = socket.getaddrinfo(host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise OSError(errno.EADDRNOTAVAIL,
                          f"cannot listen on {format_endpoint(host, self._port)}: {exc.strerror}") from exc
        family, _, _, _, sockaddr = infos[0]
        return family, sockaddr[0], False

    def start(self) -> None:
        """Bind and listen (raises OSError naming the address), then serve in threads."""
        if self._listener is not None:
            raise RuntimeError("server already started")
        family, host, dual_stack = self._resolve()
        where = format_endpoint(host, self._port)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create a socket for {where}: {exc.strerror or exc}") from exc
        try:
            if dual_stack:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self._port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}") from exc
        self._bound = sock.getsockname()[:2]
        soft = raise_fd_limit(self.limits.max_connections + _FD_RESERVE)
        if soft != resource.RLIM_INFINITY and soft - _FD_RESERVE < self.limits.max_connections:
            self._max_connections = max(1, soft - _FD_RESERVE)
            log.warning("the open-files limit (%d) allows %d HTTP connections, not the %d configured; "
                        "raise LimitNOFILE", soft, self._max_connections, self.limits.max_connections)
        self._listener = sock
        self._sel = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self._sel.register(sock, selectors.EVENT_READ, self)
        name = f"http-{self.port}"
        self._threads = [threading.Thread(target=self._io_loop, name=f"{name}-io", daemon=True)]
        self._threads += [threading.Thread(target=self._worker, name=f"{name}-worker-{i}", daemon=True)
                          for i in range(self.limits.workers)]
        self._threads.append(threading.Thread(target=self._auth_worker, name=f"{name}-auth", daemon=True))
        for t in self._threads:
            t.start()
        log.debug("HTTP server on %s: %d workers, at most %d connections", self.address,
                  self.limits.workers, self._max_connections)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection and the listening socket; wait for the
        threads (a worker in the middle of a request finishes it, its reply is dropped)."""
        if self._listener is None:
            return
        self._stopping.set()
        self._wake()
        for q in [self._work] * self.limits.workers + [self._auth]:
            try:
                q.put_nowait(None)
            except queue.Full:
                pass  # workers also check _stopping
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._listener = None
        self._threads = []

    def __enter__(self) -> HTTPServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stats(self) -> ServerStats:
        return ServerStats(len(self._conns), self._max_connections, self._accepted,
                           dict(self._dropped), dict(self._requests))

    # -- worker threads ---------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    def _worker(self) -> None:
        while not self._stopping.is_set():
            item = self._work.get()
            if item is None:
                break
            conn, req = item
            self._yield_to()
            try:
                resp = self.app(req)
            except Exception as e:  # noqa: BLE001 - a handler bug answers 500, never kills the worker
                self._throttle(logging.ERROR, f"app:{type(e).__name__}",
                               "error answering %s %s from %s: %s", req.method, req.path, req.client,
                               e, exc_info=e)
                resp = Response(500, [("Content-Type", "text/plain; charset=utf-8")],
                                b"internal error; see the daemon's log\n")
            self._done.append((conn, resp))
            self._wake()

    def _auth_worker(self) -> None:
        while not self._stopping.is_set():
            item = self._auth.get()
            if item is None:
                break
            conn, req, web = item
            try:
                ok = web.authorized(req.header("authorization"))
            except Exception as e:  # noqa: BLE001 - never let an odd credential kill the thread
                self._throttle(logging.ERROR, "auth", "basic auth check failed: %s", e, exc_info=e)
                ok = False
            self._auth_done.append((conn, req, ok))
            self._wake()

    # -- the I/O loop -----------------------------------------------------------------------

    def _io_loop(self) -> None:
        next_tick = self._monotonic() + _TICK
        sel = self._sel
        try:
            while not self._stopping.is_set():
                self._yield_to()
                try:
                    events = sel.select(_TICK)  # type: ignore[union-attr]
                except InterruptedError:
                    continue
                for key, mask in events:
                    if key.data is self:
                        self._accept()
                    elif key.data is None:
                        try:
                            os.eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
                    else:
                        self._guard(self._on_event, key.data, mask)
                while self._auth_done:
                    conn, req, ok = self._auth_done.popleft()
                    self._guard(self._after_auth, conn, req, ok)
                while self._done:
                    conn, resp = self._done.popleft()
                    self._guard(self._respond, conn, resp)
                while self._pipelined:
                    self._guard(self._next_request, self._pipelined.popleft())
                now = self._monotonic()
                if now >= next_tick:
                    next_tick = now + _TICK
                    self._sweep(now)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            sel.close()  # type: ignore[union-attr]
            if self._listener is not None:
                self._listener.close()
            os.close(self._wake_fd)

    def _guard(self, fn, conn: _Conn, *args) -> None:
        """Run one connection's step; any error closes that connection only."""
        if conn.closed:
            return
        try:
            fn(conn, *args)
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError) as e:
            log.debug("connection from %s ended: %s", conn.client, e)
            self._close(conn)
        except Exception as e:  # noqa: BLE001 - a bug here must not stop the I/O thread
            self._throttle(logging.ERROR, f"io:{type(e).__name__}", "HTTP connection from %s failed: %s",
                           conn.client, e, exc_info=e)
            self._close(conn)

    def _accept(self) -> None:
        now = self._monotonic()
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = self._listener.accept()  # type: ignore[union-attr]
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._dropped["accept_error"] += 1
                    if not self._evict_one():
                        # Nothing to evict: stop watching the listener for a moment (epoll
                        # is level-triggered: it would report it ready at once, forever).
                        self._accept_paused_until = now + 0.1
                        self._sel.unregister(self._listener)  # type: ignore[union-attr, arg-type]
                        self._throttle(logging.WARNING, "emfile", "cannot accept HTTP connections: %s", e)
                        return
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            self._accepted += 1
            if len(self._conns) >= self._max_connections:
                self._evict_one()
            sock.setblocking(False)
            client = format_endpoint(str(addr[0]), addr[1]) if isinstance(addr, tuple) else str(addr)
            web = self.web
            conn = _Conn(sock, client, None if web is None else web.tls)
            conn.deadline = now + self.limits.request_timeout
            self._conns[sock.fileno()] = conn
            self._waiting[id(conn)] = conn
            self._watch(conn, selectors.EVENT_READ)

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request. False if none can go."""
        while self._waiting:
            _, conn = self._waiting.popitem(last=False)
            if not conn.closed:
                self._dropped["evicted"] += 1
                log.debug("connection from %s evicted (%d open, the cap)", conn.client, len(self._conns))
                self._close(conn)
                return True
        return False

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.registered:
            return
        if events == 0:
            self._sel.unregister(conn.sock)  # type: ignore[union-attr]
        elif conn.registered == 0:
            self._sel.register(conn.sock, events, conn)  # type: ignore[union-attr]
        else:
            self._sel.modify(conn.sock, events, conn)  # type: ignore[union-attr]
        conn.registered = events

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.registered:
            try:
                self._sel.unregister(conn.sock)  # type: ignore[union-attr]
            except (KeyError, ValueError, OSError):
                pass
            conn.registered = 0
        self._waiting.pop(id(conn), None)
        fd = conn.sock.fileno()
        if self._conns.get(fd) is conn:
            del self._conns[fd]
        try:
            conn.sock.close()
        except OSError:
            pass

    def _sweep(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._sel.register(self._listener, selectors.EVENT_READ, self)  # type: ignore[union-attr, arg-type]
        for conn in [c for c in self._conns.values() if c.state != _BUSY and c.deadline <= now]:
            if conn.state == _LINGER:
                self._close(conn)
                continue
            if conn.state == _WRITE:
                reason = "write_timeout"
            elif conn.state in (_PEEK, _HANDSHAKE):
                reason = "tls_handshake"
            elif not conn.buf and not conn.first_request:
                reason = "idle_timeout"
            else:
                reason = "request_timeout"
            self._dropped[reason] += 1
            log.debug("connection from %s closed: %s", conn.client, reason.replace("_", " "))
            self._close(conn)

    # -- per connection ----------------------------------------------------------------------

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if conn.state == _PEEK:
            self._peek(conn)
        elif conn.state == _HANDSHAKE:
            self._handshake(conn)
        elif conn.state == _READ:
            self._read(conn)
        elif conn.state == _WRITE:
            self._write(conn)
        elif conn.state == _LINGER:
            self._discard(conn)

    def _peek(self, conn: _Conn) -> None:
        try:
            first = conn.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        if not first:
            self._close(conn)
            return
        if first[0] != _TLS_HANDSHAKE_RECORD:
            try:
                # Consume what the client sent and end our side first: closing with unread
                # bytes would send a reset that can destroy the reply before it is read.
                conn.sock.recv(65536)
                conn.sock.send(_PLAIN_HTTP_ON_TLS)
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._dropped["tls_handshake"] += 1
            self._close(conn)
            return
        self._watch(conn, 0)
        fd = conn.sock.fileno()
        conn.sock = conn.tls.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)  # type: ignore[union-attr]  # _PEEK: tls is set
        self._conns[fd] = conn
        conn.state = _HANDSHAKE
        self._handshake(conn)

    def _handshake(self, conn: _Conn) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as e:
            self._dropped["tls_handshake"] += 1
            log.debug("TLS handshake with %s failed: %s", conn.client, e)
            self._close(conn)
            return
        conn.state = _READ
        self._watch(conn, selectors.EVENT_READ)
        if conn.sock.pending():
            self._read(conn)

    def _recv(self, conn: _Conn) -> bytes | None:
        """Bytes from the client; b"" at its end of stream; None: nothing yet."""
        try:
            return conn.sock.recv(self.limits.max_header_bytes)  # a buffer holds at most ~2 heads
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return None

    def _read(self, conn: _Conn) -> None:
        limit = self.limits.max_header_bytes
        while True:
            data = self._recv(conn)
            if data is None:
                break
            if not data:
                self._close(conn)
                return
            if not conn.buf and not conn.first_request:
                # The first byte of a keep-alive request: from now on the request deadline.
                conn.deadline = self._monotonic() + self.limits.request_timeout
            conn.buf += data
            if len(conn.buf) > limit + 4 or b"\n\r\n" in conn.buf or b"\n\n" in conn.buf:
                break
            if not (conn.tls is not None and conn.sock.pending()):
                break
        self._next_request(conn)

    def _next_request(self, conn: _Conn) -> None:
        """Parse and dispatch the next complete request head in conn.buf, if any."""
        buf = conn.buf
        skip = len(buf) - len(buf.lstrip(b"\r\n"))  # empty lines before a request (RFC 9112 2.2)
        if skip:
            del buf[:skip]
        end, sep = buf.find(b"\r\n\r\n"), 4
        lf = buf.find(b"\n\n")
        if lf >= 0 and (end < 0 or lf < end):
            end, sep = lf, 2
        if end < 0:
            if len(buf) > self.limits.max_header_bytes:
                self._error(conn, HTTPError(431, f"request head over {self.limits.max_header_bytes} bytes"))
            return
        if end > self.limits.max_header_bytes:
            self._error(conn, HTTPError(431, f"request head over {self.limits.max_header_bytes} bytes"))
            return
        head = bytes(buf[:end])
        del buf[: end + sep]
        try:
            req = parse_head(head, conn.client, self.limits.max_headers)
        except HTTPError as e:
            self._error(conn, e)
            return
        conn.first_request = False
        conn.served += 1
        if _has_body(req):
            conn.linger = _LINGER_BYTES  # the body is never read
        conn.keep_alive = (_wants_keep_alive(req) and not _has_body(req)
                           and conn.served < self.limits.max_requests and not self._stopping.is_set())
        conn.head_only = req.method == "HEAD"
        conn.http10 = req.version == "HTTP/1.0"
        conn.state = _BUSY
        self._waiting.pop(id(conn), None)
        self._watch(conn, 0)
        if req.method not in ("GET", "HEAD"):
            self._respond(conn, Response(405, [("Allow", "GET, HEAD"),
                                               ("Content-Type", "text/plain; charset=utf-8")],
                                         b"method not allowed\n"))
            return
        web = self.web
        if web is not None and web.users:
            verdict = web.auth_quick(req.header("authorization"))
            if verdict is None:
                try:
                    self._auth.put_nowait((conn, req, web))
                except queue.Full:
                    self._respond(conn, _busy("too many authentication checks in progress"))
                return
            if not verdict:
                self._respond(conn, _UNAUTHORIZED())
                return
        self._dispatch(conn, req)

    def _after_auth(self, conn: _Conn, req: Request, ok: bool) -> None:
        if ok:
            self._dispatch(conn, req)
        else:
            self._respond(conn, _UNAUTHORIZED())

    def _dispatch(self, conn: _Conn, req: Request) -> None:
        try:
            self._work.put_nowait((conn, req))
        except queue.Full:
            self._respond(conn, _busy("too many requests in progress"))

    def _error(self, conn: _Conn, e: HTTPError) -> None:
        log.debug("bad request from %s: %s", conn.client, e)
        conn.keep_alive = False
        conn.linger = _LINGER_BYTES
        conn.head_only = False
        conn.state = _BUSY
        self._waiting.pop(id(conn), None)
        self._watch(conn, 0)
        self._respond(conn, Response(e.status, [("Content-Type", "text/plain; charset=utf-8")],
                                     f"{e}\n".encode()))

    def _date_header(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]

    def _respond(self, conn: _Conn, resp: Response) -> None:
        if conn.closed:
            return
        status = resp.status if resp.status in _REASONS else 500
        self._requests[status] += 1
        if status >= 500 or status in (400, 408, 431, 505):
            conn.keep_alive = False
        body = resp.parts
        length = sum(len(p) for p in body)
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Server: {self._server_header}",
                 f"Date: {self._date_header()}"]
        lines += [f"{k}: {v}" for k, v in resp.headers]
        lines.append(f"Content-Length: {length}")
        if not conn.keep_alive:
            lines.append("Connection: close")
        elif conn.http10:
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        conn.out.clear()
        conn.out.append(memoryview(head))
        if not conn.head_only:
            conn.out.extend(memoryview(p) for p in body if p)
        conn.state = _WRITE
        conn.deadline = self._monotonic() + self.limits.write_timeout
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        chunk = _TLS_SEND_CHUNK if conn.tls is not None else _SEND_CHUNK
        while conn.out:
            part = conn.out[0]
            try:
                sent = conn.sock.send(part[:chunk])
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._watch(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._watch(conn, selectors.EVENT_READ)
                return
            if sent >= len(part):
                conn.out.popleft()
            else:
                conn.out[0] = part[sent:]
        # Response complete.
        if not conn.keep_alive:
            if conn.linger or conn.buf:
                self._linger(conn)
            else:
                self._close(conn)
            return
        conn.state = _READ
        conn.deadline = self._monotonic() + self.limits.idle_timeout
        self._waiting[id(conn)] = conn  # waits again: the newest in eviction order
        self._watch(conn, selectors.EVENT_READ)
        if conn.buf:  # a pipelined request already arrived: next round of the loop
            conn.deadline = self._monotonic() + self.limits.request_timeout
            self._pipelined.append(conn)
        elif conn.tls is not None and conn.sock.pending():
            self._read(conn)


    def _linger(self, conn: _Conn) -> None:
        """Close gracefully: end our side, then read and discard what the client still
        sends (bounded in time and bytes) before closing. Closing with unread input makes
        the kernel send a reset, which can destroy the reply before the client reads it."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = _LINGER
        conn.linger = conn.linger or _LINGER_BYTES
        conn.buf.clear()
        conn.deadline = self._monotonic() + _LINGER_SECONDS
        self._watch(conn, selectors.EVENT_READ)

    def _discard(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        conn.linger -= len(data)
        if not data or conn.linger <= 0:
            self._close(conn)


def _UNAUTHORIZED() -> Response:
    return Response(401, [("Content-Type", "text/plain; charset=utf-8"),
                          ("WWW-Authenticate", 'Basic realm="sockscope"')], b"Unauthorized\n")


def _busy(why: str) -> Response:
    return Response(503, [("Content-Type", "text/plain; charset=utf-8"), ("Retry-After", "1")],
                    f"{why}; try again\n".encode())


def _dual_stack_available() -> bool:
    """True if an AF_INET6 socket can accept IPv4 too (IPV6_V6ONLY=0)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
        return True
    except OSError:
        return False

