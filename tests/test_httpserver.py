"""The bounded HTTP server (sockscope.httpserver) on loopback: request parsing, keep-alive,
deadlines, the connection cap, the worker and auth queues, slow readers, EMFILE.

Regressions of issue 9 defect 1 (one thread per connection, a per-read timeout, no cap):
every test below that holds connections open failed or hung on the old
ThreadingHTTPServer (e.g. the trickler was never dropped; 60 idle connections over a cap
of 20 all stayed open).
"""

from __future__ import annotations

import errno
import http.client
import socket
import threading
import time

import pytest

from sockscope.httpserver import HTTPError, HTTPServer, Limits, Request, Response, parse_head

TIMEOUT = 10.0


def ok_app(req: Request) -> Response:
    return Response(200, [("Content-Type", "text/plain")], f"{req.method} {req.path} {req.query}\n".encode())


def get(port: int, path: str = "/x", **headers: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send data, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.fixture
def serve():
    servers = []

    def start(app=ok_app, **limits) -> HTTPServer:
        srv = HTTPServer(app, "127.0.0.1", 0, limits=Limits(**limits))
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


# -- parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize("head, status", [
    (b"GET /metrics HTTP/1.1", None),
    (b"GET /metrics?name[]=a HTTP/1.0\r\nHost: x", None),
    (b"GET http://host:9/metrics HTTP/1.1", None),
    (b"GET /metrics", 400),
    (b"GET  /metrics HTTP/1.1", 400),
    (b"G@T /metrics HTTP/1.1", 400),
    (b"GET /metrics HTTP/2.0", 505),
    (b"GET /metrics HTTPS/1.1", 400),
    (b"GET /met\x01rics HTTP/1.1", 400),
    (b"GET ftp://x/ HTTP/1.1", 400),
    (b"GET /metrics HTTP/1.1\r\nNo colon here", 400),
    (b"GET /metrics HTTP/1.1\r\n folded: x", 400),
    (b"GET /metrics HTTP/1.1\r\nBad Name: x", 400),
    (b"GET /metrics HTTP/1.1\r\nX: a\x00b", 400),
    (b"GET /metrics HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b", 400),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1", 400),
    (b"GET /metrics HTTP/1.1" + b"\r\nX: y" * 101, 431),
    (b"\xff\xfe GET", 400),
])
def test_parse_head(head, status):
    if status is None:
        req = parse_head(head)
        assert req.path == "/metrics" and req.method == "GET"
    else:
        with pytest.raises(HTTPError) as info:
            parse_head(head)
        assert info.value.status == status


def test_parse_head_joins_repeated_headers_and_lowers_names():
    req = parse_head(b"GET /a?b=c HTTP/1.1\r\nAccept: x\r\naccept: y\r\nX-Thing:  v  ")
    assert req.headers == {"accept": "x, y", "x-thing": "v"}
    assert (req.path, req.query) == ("/a", "b=c")


# -- keep-alive -----------------------------------------------------------------------------

def test_keep_alive_serves_several_requests_on_one_connection(serve):
    srv = serve()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
    try:
        for i in range(5):
            conn.request("GET", f"/r{i}")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == f"GET /r{i} \n".encode()
    finally:
        conn.close()
    assert srv.stats().accepted == 1


def test_pipelined_requests_are_answered_in_order(serve):
    srv = serve()
    out = raw(srv.port, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nConnection: close\r\n\r\n")
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in out.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"GET /a \n", b"GET /b \n", b"GET /c \n"]


def test_http10_closes_unless_asked_to_keep_alive(serve):
    srv = serve()
    out = raw(srv.port, b"GET /a HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out


def test_keep_alive_is_bounded_by_max_requests(serve):
    srv = serve(max_requests=3)
    out = raw(srv.port, b"GET /a HTTP/1.1\r\n\r\n" * 5)
    assert out.count(b"HTTP/1.1 200 OK") == 3  # then the server closed
    assert out.count(b"Connection: close") == 1


def test_request_with_a_body_is_answered_then_closed(serve):
    srv = serve()
    out = raw(srv.port, b"GET /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in out


def test_head_and_other_methods(serve):
    srv = serve()
    out = raw(srv.port, b"HEAD /a HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 9" in head  # "HEAD /a \n" and body == b""
    out = raw(srv.port, b"POST /a HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD" in out


def test_oversized_head_is_431_and_garbage_is_400(serve):
    srv = serve(max_header_bytes=1024)
    out = raw(srv.port, b"GET /a HTTP/1.1\r\nX: " + b"y" * 5000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    assert raw(srv.port, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert srv.stats().requests[431] == 1 and srv.stats().requests[400] == 1


# -- deadlines ------------------------------------------------------------------------------

def test_a_trickling_client_is_dropped_at_the_total_deadline(serve):
    # One header line every 0.2 s: each read arrives well within any per-read timeout,
    # but the request as a whole must be in within request_timeout.
    srv = serve(request_timeout=1.0)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
        started = time.monotonic()
        s.sendall(b"GET /a HTTP/1.1\r\n")
        closed_after = None
        for i in range(50):
            time.sleep(0.2)
            try:
                s.sendall(f"X-{i}: y\r\n".encode())
            except OSError:
                closed_after = time.monotonic() - started
                break
            s.settimeout(0.01)
            try:
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
    assert closed_after is not None and 0.9 <= closed_after <= 2.0, closed_after
    assert srv.stats().dropped["request_timeout"] == 1


def test_idle_keep_alive_connection_closes_after_idle_timeout(serve):
    srv = serve(idle_timeout=0.6)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
    conn.request("GET", "/a")
    assert conn.getresponse().read() == b"GET /a \n"
    started = time.monotonic()
    assert conn.sock.recv(1) == b""  # the server closed it
    assert 0.5 <= time.monotonic() - started <= 1.5
    conn.close()
    assert srv.stats().dropped["idle_timeout"] == 1


def test_a_client_that_never_reads_its_response_is_dropped_and_frees_nothing_else(serve):
    big = b"x" * (16 << 20)  # far more than the socket buffers hold
    srv = serve(lambda req: Response(200, [], big if req.path == "/big" else b"ok"), write_timeout=1.0)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        time.sleep(0.3)
        assert get(srv.port, "/small")[2] == b"ok"  # the workers are not held by the reader
        deadline = time.monotonic() + 5
        while srv.stats().dropped["write_timeout"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert srv.stats().dropped["write_timeout"] == 1


# -- caps -----------------------------------------------------------------------------------

def test_connection_cap_evicts_the_longest_waiting_and_requests_still_succeed(serve):
    srv = serve(max_connections=20)
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) for _ in range(60)]
    try:
        for _ in range(10):
            assert get(srv.port)[0] == 200
        time.sleep(0.1)
        stats = srv.stats()
        assert stats.open_connections <= 20
        assert stats.dropped["evicted"] >= 40
        # The oldest were closed first: the first connection is gone, the last is open.
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""
        idle[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            idle[-1].recv(1)
    finally:
        for s in idle:
            s.close()


def test_full_worker_queue_answers_503_at_once(serve):
    release = threading.Event()

    def slow(req):
        release.wait(TIMEOUT)
        return Response(200, [], b"done")

    srv = serve(slow, workers=1, queue=1)
    results = []
    threads = [threading.Thread(target=lambda: results.append(get(srv.port)[0])) for _ in range(2)]
    for t in threads:  # one in the worker, one queued
        t.start()
        time.sleep(0.2)
    started = time.monotonic()
    assert get(srv.port)[0] == 503
    assert time.monotonic() - started < 1.0
    release.set()
    for t in threads:
        t.join(TIMEOUT)
    assert results == [200, 200]


def test_an_app_error_is_a_500_and_the_worker_lives_on(serve):
    def app(req):
        if req.path == "/boom":
            raise RuntimeError("boom")
        return ok_app(req)

    srv = serve(app, workers=1)
    for _ in range(3):
        assert get(srv.port, "/boom")[0] == 500
    assert get(srv.port, "/fine")[0] == 200


class _EMFILEListener:
    """The server's listening socket, whose accept() fails with EMFILE while `failing`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failing = True
        self.calls = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self):
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


def test_out_of_file_descriptors_evicts_or_pauses_instead_of_spinning(serve):
    srv = serve()
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
    time.sleep(0.2)  # accepted: an idle connection that EMFILE may evict
    listener = srv._listener = _EMFILEListener(srv._listener)
    try:
        pending = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)  # in the backlog
        idle.settimeout(TIMEOUT)
        assert idle.recv(1) == b""  # evicted to free a descriptor
        calls0 = listener.calls
        time.sleep(1.0)
        # Nothing left to evict: accept() is retried ~10 times a second, not in a busy loop.
        assert listener.calls - calls0 <= 20, listener.calls - calls0
        listener.failing = False
        pending.sendall(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
        pending.settimeout(TIMEOUT)
        assert pending.recv(100).startswith(b"HTTP/1.1 200")
        assert get(srv.port)[0] == 200
        stats = srv.stats()
        assert stats.dropped["accept_error"] >= 2 and stats.dropped["evicted"] == 1
    finally:
        listener.failing = False
        idle.close()


# -- deferring to the poller's dump -----------------------------------------------------------

def test_requests_wait_while_a_dump_holds_the_gate_at_most_its_hold(serve):
    from sockscope.poller import DumpGate

    gate = DumpGate(hold=0.8)
    srv = HTTPServer(ok_app, "127.0.0.1", 0, yield_to=gate.wait)
    srv.start()
    try:
        assert get(srv.port)[0] == 200
        # A short dump: the request is answered right after it.
        with gate.dumping():
            started = time.monotonic()
            result = []
            client = threading.Thread(target=lambda: result.append(get(srv.port)[0]))
            client.start()
            time.sleep(0.3)
            assert not result  # still waiting for the dump
        client.join(TIMEOUT)
        assert result == [200] and 0.25 <= time.monotonic() - started < 1.2
        # A dump that outlasts its hold: scrapes go on after `hold` seconds.
        with gate.dumping():
            started = time.monotonic()
            assert get(srv.port)[0] == 200
            took = time.monotonic() - started
            assert 0.5 <= took <= 1.5, took
    finally:
        srv.stop()


def test_many_pipelined_requests_answered_at_once_do_not_recurse(serve):
    # 700 pipelined POSTs, each answered 405 without a worker, plus stray empty lines.
    srv = serve()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
        s.sendall((b"\r\n\r\n" * 50 + b"POST / HTTP/1.1\r\n\r\n" * 700)[:16000])
        s.sendall(b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.count(b"HTTP/1.1 405") >= 500
    assert out.endswith(b"GET /last \n")
