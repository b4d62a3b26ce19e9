"""Builds a TCP socket table of a given size and mix inside the current network namespace.

Run inside a throw-away namespace only (bench/run.py creates one): everything here
connects to loopback addresses of that namespace.

Mix for a table of N sockets (shares of N):
  ~70 %  ESTABLISHED (both ends of N*0.35 pairs; 10 % of them IPv6), 2 % of the pairs
         with unread bytes (Recv-Q), a few pairs with unacked bytes (Send-Q)
  ~10 %  CLOSE-WAIT + FIN-WAIT-2 (client shutdown(SHUT_WR), both fds kept)
  ~18 %  TIME-WAIT (short connections closed client first; no fd, they expire after 60 s)
  plus   LISTEN sockets (3 per worker + a full accept queue: backlog 16, 17 queued)

One process cannot hold more than ~20k fds here (no CAP_SYS_RESOURCE), so the held
sockets are spread over worker processes of at most FDS_PER_WORKER fds each. Clients
bind many 127.x source addresses with IP_BIND_ADDRESS_NO_PORT so ephemeral ports never
run out; every worker has its own server address (127.1.x.y, fd00::x) on shared ports,
so per-port series stay few and each worker accepts only its own connections.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import signal
import socket
import subprocess
import time

IP_BIND_ADDRESS_NO_PORT = 24
FDS_PER_WORKER = 19000
PORT_EST, PORT_CW, PORT_TW, PORT_V6, PORT_FULL, PORT_SENDQ = 8080, 8443, 8081, 9090, 7070, 8090
FULL_BACKLOG = 16
BATCH = 256


def server_v4(w: int) -> str:
    return f"127.1.{w // 250}.{w % 250 + 1}"


def server_v6(w: int) -> str:
    return f"fd00::1:{w + 1:x}"


def client_v4(w: int, i: int) -> str:
    return f"127.{2 + w % 200}.{(i // 250) % 64}.{i % 250 + 1}"


def plan(size: int) -> list[dict]:
    """Split a table of `size` sockets into per-worker shares."""
    est_pairs = round(size * 0.35)
    cw_pairs = round(size * 0.05)
    tw = round(size * 0.18)
    fds = 2 * (est_pairs + cw_pairs)
    workers = max(1, math.ceil(fds / (FDS_PER_WORKER - 100)))

    def share(total: int, w: int) -> int:
        return total // workers + (1 if w < total % workers else 0)

    return [
        {
            "index": w,
            "est_pairs": share(est_pairs, w),
            "cw_pairs": share(cw_pairs, w),
            "tw": share(tw, w),
            "full": w == 0,
        }
        for w in range(workers)
    ]


def _listener(family: int, host: str, port: int, backlog: int = 4096) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


def _client(family: int, src: str | None) -> socket.socket:
    c = socket.socket(family, socket.SOCK_STREAM)
    if src is not None:
        c.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        c.bind((src, 0))
    return c


def _pairs(n: int, family: int, ln: socket.socket, dst: tuple, src_of) -> list:
    """n connected (client, server) pairs to listener `ln`, in batches of BATCH."""
    out = []
    done = 0
    while done < n:
        k = min(BATCH, n - done)
        clients = []
        for j in range(k):
            c = _client(family, src_of(done + j))
            c.connect(dst)
            clients.append(c)
        for c in clients:
            s, _ = ln.accept()
            out.append((c, s))
        done += k
    return out


class _Worker:
    def __init__(self, spec: dict):
        self.spec = spec
        self.w = spec["index"]
        self.held: list[socket.socket] = []

    def build(self) -> dict:
        w, spec = self.w, self.spec
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        s4 = server_v4(w)
        self.ln_est = _listener(socket.AF_INET, s4, PORT_EST)
        self.ln_cw = _listener(socket.AF_INET, s4, PORT_CW)
        self.ln_tw = _listener(socket.AF_INET, s4, PORT_TW)
        self.ln_v6 = _listener(socket.AF_INET6, server_v6(w), PORT_V6)
        self.held += [self.ln_est, self.ln_cw, self.ln_tw, self.ln_v6]
        n = spec["est_pairs"]
        n6 = n // 10
        v4 = _pairs(n - n6, socket.AF_INET, self.ln_est, (s4, PORT_EST),
                    lambda i: client_v4(w, i))
        v6 = _pairs(n6, socket.AF_INET6, self.ln_v6, (server_v6(w), PORT_V6), lambda i: None)
        for c, s in v4 + v6:
            self.held += (c, s)
        # Recv-Q: bytes the server end never reads (2 % of the pairs).
        for c, _ in v4[:: 50]:
            c.send(b"x" * 64)
        if w == 0:
            self._send_queues(s4)
            self._full_listener(s4)
        cw = _pairs(spec["cw_pairs"], socket.AF_INET, self.ln_cw, (s4, PORT_CW),
                    lambda i: client_v4(w, i + 100_000))
        for c, s in cw:
            c.shutdown(socket.SHUT_WR)  # client FIN-WAIT-2, server CLOSE-WAIT (Recv-Q 1)
            self.held += (c, s)
        self.tw_round = 0
        self.time_wait()
        return {"index": w, "held": len(self.held), "tw": spec["tw"]}

    def _send_queues(self, s4: str) -> None:
        # Send-Q: the reader has a tiny receive buffer and never reads; fill until EAGAIN.
        ln = _listener(socket.AF_INET, s4, PORT_SENDQ)
        ln.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.held.append(ln)
        for c, s in _pairs(20, socket.AF_INET, ln, (s4, PORT_SENDQ),
                           lambda i: client_v4(0, 200_000 + i)):
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            c.setblocking(False)
            for _ in range(1000):
                try:
                    c.send(b"y" * 4096)
                except BlockingIOError:
                    break
            self.held += (c, s)

    def _full_listener(self, s4: str) -> None:
        ln = _listener(socket.AF_INET, s4, PORT_FULL, backlog=FULL_BACKLOG)
        self.held.append(ln)
        for i in range(FULL_BACKLOG + 1):  # B+1 complete; ss shows Recv-Q 17, Send-Q 16
            c = _client(socket.AF_INET, client_v4(0, 300_000 + i))
            c.connect((s4, PORT_FULL))
            self.held.append(c)

    def time_wait(self) -> None:
        """Short connections closed client first: one TIME-WAIT each, for 60 s."""
        w, n = self.w, self.spec["tw"]
        base = 400_000 + self.tw_round * n
        self.tw_round += 1
        s4 = server_v4(w)
        done = 0
        while done < n:
            k = min(BATCH, n - done)
            pairs = _pairs(k, socket.AF_INET, self.ln_tw, (s4, PORT_TW),
                           lambda i, d=done: client_v4(w, base + d + i))
            for c, _ in pairs:  # the client closes first: its side goes to TIME-WAIT
                c.close()
            for _, s in pairs:
                s.close()
            done += k


def _worker_main(spec: dict, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = _Worker(spec)
    try:
        conn.send(("ready", worker.build()))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send(("error", f"worker {spec['index']}: {type(e).__name__}: {e}"))
        return
    while True:
        if not conn.poll(3600):
            return
        cmd = conn.recv()
        if cmd == "tw":
            worker.time_wait()
            conn.send(("ok", None))
        else:
            return


class Table:
    """A socket table of about `size` sockets held by worker processes; close() removes it."""

    def __init__(self, size: int):
        self.size = size
        self.plan = plan(size)
        self.procs: list[mp.Process] = []
        self.conns: list = []
        self.tw_created = 0.0
        self.build_seconds = 0.0

    def build(self, timeout: float = 300) -> None:
        _add_v6_addresses(len(self.plan))
        ctx = mp.get_context("fork")
        t0 = time.monotonic()
        for spec in self.plan:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(spec, child), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)
        for conn in self.conns:
            left = timeout - (time.monotonic() - t0)
            if left <= 0 or not conn.poll(left):
                raise RuntimeError(f"loader: workers not ready within {timeout} s")
            kind, info = conn.recv()
            if kind != "ready":
                raise RuntimeError(f"loader: {info}")
        self.tw_created = time.monotonic()
        self.build_seconds = self.tw_created - t0

    def tw_age(self) -> float:
        return time.monotonic() - self.tw_created

    def refresh_time_wait(self, timeout: float = 120) -> None:
        """Wait until the current TIME-WAIT sockets expired (60 s), then make new ones."""
        left = 61.0 - self.tw_age()
        if left > 0:
            time.sleep(left)
        for conn in self.conns:
            conn.send("tw")
        for conn in self.conns:
            if not conn.poll(timeout):
                raise RuntimeError("loader: TIME-WAIT refresh timed out")
            conn.recv()
        self.tw_created = time.monotonic()

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send("stop")
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        self.procs.clear()
        self.conns.clear()


def _add_v6_addresses(n: int) -> None:
    cmds = "".join(f"addr replace {server_v6(w)}/128 dev lo nodad\n" for w in range(n))
    subprocess.run(["ip", "-6", "-force", "-batch", "-"], input=cmds, text=True,
                   capture_output=True, timeout=60)
