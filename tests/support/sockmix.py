#!/usr/bin/env python3
"""Open real TCP sockets in (nearly) every state, on loopback, and hold them.

Run it INSIDE a throw-away network namespace (the test fixtures do this):

    ip netns exec NS python tests/support/sockmix.py --spec '{"close_wait": {"n": 3}}'

It builds the mix described by the spec, checks through /proc/net/tcp{,6} (which is
per-namespace) that every promised socket is in its promised state, prints ONE JSON line
``{"event": "ready", ...}`` on stdout describing what it made, then holds every socket
until stdin reaches EOF, SIGTERM/SIGINT arrives, or ``hold_seconds`` pass. On any error
it prints ``{"event": "error", "error": "..."}`` and exits 1.

Stdlib only: it must run with whatever python the namespace gets.

Spec (JSON object). A top-level group that is absent is not made; every field inside a
group has a default. A group is a dict or a list of dicts (e.g. one v4 and one v6 entry).
Hosts are "127.0.0.1", "::1" (targets) or "0.0.0.0"/"::" (listener wildcards).

  listeners:   [{host, port, backlog=128, accept=true, reuseport_members=1,
                 v6only=true}]                   plain LISTEN sockets; groups below that
                                                 connect to (host, port) use a matching one
                                                 (exact host, or the family's wildcard, or a
                                                 dual-stack "::" for v4) and otherwise get
                                                 their own accepting listener.
  established: {host="127.0.0.1", port=18080, n=1}  n pairs, both ends ESTAB
  recvq:       {host, port=18081, n=1, bytes=1000}  client sends `bytes`, server never
                                                 reads: server end Recv-Q == bytes
  sendq:       {host, port=18083, n=1, rcvbuf=4096, sndbuf=16384}
                                                 client (small SO_RCVBUF before connect)
                                                 never reads, server writes non-blocking
                                                 until EAGAIN: server end Send-Q > 0, client
                                                 end Recv-Q > 0
  close_wait:  {host, port=18084, n=1}           client shutdown(SHUT_WR), keeps its fd:
                                                 server end CLOSE-WAIT (Recv-Q 1, the FIN),
                                                 client end FIN-WAIT-2
  time_wait:   {host, port=18085, n=1, closer="server"}
                                                 the closer closes first, then the other:
                                                 closer end TIME-WAIT (no fd, 60 s),
                                                 other end gone
  fin_wait1:   {host, port=18086, n=1, rcvbuf=4096, sndbuf=16384}
                                                 as sendq, then server shutdown(SHUT_WR): its
                                                 FIN is queued behind unsent data: server
                                                 end FIN-WAIT-1, client ESTAB
  last_ack:    {host, port=18087, n=1, rcvbuf=4096, sndbuf=16384}
                                                 client shutdown(SHUT_WR), server fills the
                                                 client's window then shutdown(SHUT_WR): server
                                                 end LAST-ACK, client FIN-WAIT-2
  syn_recv:    {host, port=18088, n=1, defer_accept=120}
                                                 listener with TCP_DEFER_ACCEPT, clients
                                                 connect and send nothing: server end is a
                                                 request socket SYN-RECV (inode 0), client
                                                 ESTAB
  full_queue:  {host, port=18090, backlog=4, syn_sent=2}
                                                 never-accepting listener: backlog+1
                                                 connections complete (LISTEN Recv-Q B+1,
                                                 Send-Q B; both ends ESTAB, server end
                                                 inode 0), then `syn_sent` non-blocking
                                                 connects whose SYNs are dropped: SYN-SENT
  bulk:        {host, port=18089, n=0}           n extra ESTAB pairs (2n fds; keep 2n
                                                 below ~8000)
  hold_seconds: 900                              upper bound on the holding phase
  settle_seconds: 10                             upper bound on waiting for states

Every client connects TO the group's port, so the remote port of every client socket is
the group's (listener's) port and its local port is ephemeral.

The ready line: {"event": "ready", "pid", "listeners": [{host, port, family, backlog,
accept, reuseport_members, v6only, members}], "groups": [{kind, host, port, family, n,
server_state, client_state, client_ports, ...}], "expect": {"local": [[port, state, n]],
"remote": [[port, state, n]]}}. `expect` is what this script verified in /proc/net/tcp*
for the group ports (local side: server ends, remote side: client ends); states use the
SsFigures names (established, syn_sent, ...).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import signal
import socket
import sys
import time

DEFAULT_SPEC: dict = {
    "listeners": [
        {"host": "127.0.0.1", "port": 18080},
        {"host": "::1", "port": 18082},
        # one SO_REUSEPORT group: 3 LISTEN sockets on the same addr:port
        {"host": "0.0.0.0", "port": 18443, "reuseport_members": 3, "accept": False},
        # dual-stack wildcard (IPV6_V6ONLY=0): ss prints it as `*:18444`
        {"host": "::", "port": 18444, "v6only": False},
        # v6-only wildcard: ss prints `[::]:18445`
        {"host": "::", "port": 18445, "accept": False},
    ],
    "established": [
        {"host": "127.0.0.1", "port": 18080, "n": 3},
        {"host": "::1", "port": 18082, "n": 2},
        # v4 client to the dual-stack listener: server end is AF_INET6, v4-mapped
        {"host": "127.0.0.1", "port": 18444, "n": 1},
    ],
    "recvq": {"host": "127.0.0.1", "port": 18081, "n": 4, "bytes": 1000},
    "sendq": {"host": "127.0.0.1", "port": 18083, "n": 2},
    "close_wait": {"host": "127.0.0.1", "port": 18084, "n": 3},
    "time_wait": {"host": "127.0.0.1", "port": 18085, "n": 5},
    "fin_wait1": {"host": "127.0.0.1", "port": 18086, "n": 1},
    "last_ack": {"host": "127.0.0.1", "port": 18087, "n": 1},
    "syn_recv": {"host": "127.0.0.1", "port": 18088, "n": 2},
    "full_queue": {"host": "127.0.0.1", "port": 18090, "backlog": 4, "syn_sent": 2},
}

GROUP_DEFAULTS: dict[str, dict] = {
    "established": {"host": "127.0.0.1", "port": 18080, "n": 1},
    "recvq": {"host": "127.0.0.1", "port": 18081, "n": 1, "bytes": 1000},
    "sendq": {"host": "127.0.0.1", "port": 18083, "n": 1, "rcvbuf": 4096, "sndbuf": 16384},
    "close_wait": {"host": "127.0.0.1", "port": 18084, "n": 1},
    "time_wait": {"host": "127.0.0.1", "port": 18085, "n": 1, "closer": "server"},
    "fin_wait1": {"host": "127.0.0.1", "port": 18086, "n": 1, "rcvbuf": 4096, "sndbuf": 16384},
    "last_ack": {"host": "127.0.0.1", "port": 18087, "n": 1, "rcvbuf": 4096, "sndbuf": 16384},
    "syn_recv": {"host": "127.0.0.1", "port": 18088, "n": 1, "defer_accept": 120},
    "full_queue": {"host": "127.0.0.1", "port": 18090, "backlog": 4, "syn_sent": 2},
    "bulk": {"host": "127.0.0.1", "port": 18089, "n": 0},
}
# Build order. full_queue goes last: its SYN-SENT sockets retransmit SYNs (1 s, 3 s, ...)
# and nothing built after them could be disturbed.
GROUP_ORDER = (
    "established", "bulk", "recvq", "sendq", "close_wait", "time_wait",
    "fin_wait1", "last_ack", "syn_recv", "full_queue",
)
LISTENER_DEFAULTS = {"backlog": 128, "accept": True, "reuseport_members": 1, "v6only": True}

# /proc/net/tcp "st" and TCP_INFO tcpi_state numbers (include/net/tcp_states.h)
STATE_NAMES = {
    1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
    6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen",
    11: "closing", 12: "syn_recv",
}
STEP_TIMEOUT = 5.0  # seconds for one connect/accept/state wait
MAX_FILL_BYTES = 64 << 20  # bound on a fill-until-EAGAIN loop


class MixError(Exception):
    pass


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def fam_name(af: int) -> str:
    return "ipv6" if af == socket.AF_INET6 else "ipv4"


def tcp_state(s: socket.socket) -> str:
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return STATE_NAMES.get(info[0], str(info[0]))


def wait_state(s: socket.socket, want: str, deadline_s: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + deadline_s
    for _ in range(10000):
        st = tcp_state(s)
        if st == want:
            return
        if time.monotonic() > deadline:
            raise MixError(f"socket {s.getsockname()} stayed {st}, wanted {want}")
        time.sleep(0.002)
    raise MixError(f"socket {s.getsockname()} never reached {want}")


def proc_counts() -> tuple[dict, dict]:
    """(local port, state) and (remote port, state) counts from /proc/net/tcp{,6}."""
    local: dict[tuple[int, str], int] = {}
    remote: dict[tuple[int, str], int] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            parts = row.split()
            lport = int(parts[1].rsplit(":", 1)[1], 16)
            rport = int(parts[2].rsplit(":", 1)[1], 16)
            st = STATE_NAMES.get(int(parts[3], 16), parts[3])
            local[(lport, st)] = local.get((lport, st), 0) + 1
            remote[(rport, st)] = remote.get((rport, st), 0) + 1
    return local, remote


class Mix:
    def __init__(self, spec: dict):
        self.spec = spec
        self.keep: list[socket.socket] = []  # everything held until exit
        self.listeners: list[dict] = []  # each with "socks"
        self.groups: list[dict] = []
        self.expect_local: dict[tuple[int, str], int] = {}
        self.expect_remote: dict[tuple[int, str], int] = {}

    # ---- listeners -------------------------------------------------------------
    def add_listener(self, cfg: dict, *, defer_accept: int = 0, rcvbuf: int = 0) -> dict:
        cfg = {**LISTENER_DEFAULTS, **cfg}
        host, port = cfg["host"], int(cfg["port"])
        af = family_of(host)
        members = max(1, int(cfg["reuseport_members"]))
        socks = []
        for _ in range(members):
            s = socket.socket(af, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if members > 1:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if af == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if cfg["v6only"] else 0)
            if defer_accept:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            try:
                s.bind((host, port))
            except OSError as e:
                raise MixError(f"bind {host}:{port}: {e}") from e
            s.listen(int(cfg["backlog"]))
            s.setblocking(False)
            socks.append(s)
            self.keep.append(s)
        entry = {**cfg, "port": port, "family": fam_name(af), "members": members, "socks": socks}
        self.listeners.append(entry)
        self.expect_local[(port, "listen")] = self.expect_local.get((port, "listen"), 0) + members
        return entry

    def find_listener(self, host: str, port: int) -> dict | None:
        af = family_of(host)
        for ln in self.listeners:
            if ln["port"] != port:
                continue
            lh = ln["host"]
            if lh == host or (lh in ("0.0.0.0", "::") and family_of(lh) == af):
                return ln
            if lh == "::" and not ln["v6only"] and af == socket.AF_INET:
                return ln
        return None

    def accepting_listener(self, host: str, port: int, kind: str) -> dict:
        ln = self.find_listener(host, port)
        if ln is None:
            return self.add_listener({"host": host, "port": port})
        if not ln["accept"]:
            raise MixError(f"{kind}: listener {ln['host']}:{port} has accept=false")
        return ln

    # ---- connections -----------------------------------------------------------
    def connect(self, host: str, port: int, rcvbuf: int = 0) -> socket.socket:
        c = socket.socket(family_of(host), socket.SOCK_STREAM)
        self.keep.append(c)
        if rcvbuf:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        c.settimeout(STEP_TIMEOUT)
        c.connect((host, port))
        c.setblocking(False)
        return c

    def accept_for(self, ln: dict, client: socket.socket) -> socket.socket:
        """Accept the server end of `client` from any member of `ln`."""
        want = client.getsockname()[1]
        by_fd = {s.fileno(): s for s in ln["socks"]}
        poller = select.poll()  # not select(): fds go past 1024 with bulk
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + STEP_TIMEOUT
        for _ in range(1000):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ev in poller.poll(left * 1000):
                try:
                    s, peer = by_fd[fd].accept()
                except BlockingIOError:
                    continue
                s.setblocking(False)
                self.keep.append(s)
                if peer[1] != want:
                    raise MixError(f"accepted {peer} while waiting for client port {want}")
                return s
        raise MixError(f"no accept on {ln['host']}:{ln['port']} for client port {want}")

    def pair(self, ln: dict, host: str, port: int, rcvbuf: int = 0):
        c = self.connect(host, port, rcvbuf)
        return c, self.accept_for(ln, c)

    @staticmethod
    def fill(s: socket.socket) -> int:
        """Write non-blocking until EAGAIN; returns bytes written (bounded)."""
        chunk = b"x" * 65536
        total = 0
        for _ in range(MAX_FILL_BYTES // len(chunk)):
            try:
                total += s.send(chunk)
            except BlockingIOError:
                return total
        raise MixError("fill: never saw EAGAIN")

    def expect(self, port: int, server_state: str | None, client_state: str | None, n: int):
        if server_state:
            k = (port, server_state)
            self.expect_local[k] = self.expect_local.get(k, 0) + n
        if client_state:
            k = (port, client_state)
            self.expect_remote[k] = self.expect_remote.get(k, 0) + n

    # ---- groups ------------------------------------------------------------------
    def build_group(self, kind: str, cfg: dict) -> dict:
        g = {**GROUP_DEFAULTS[kind], **cfg}
        host, port = g["host"], int(g["port"])
        af = family_of(host)
        n = int(g.get("n", 0))
        report = {"kind": kind, **g, "port": port, "family": fam_name(af)}
        clients: list[socket.socket] = []
        closed_ports: list[int] = []  # time_wait clients are closed before reporting

        if kind in ("established", "bulk"):
            ln = self.accepting_listener(host, port, kind)
            for _ in range(n):
                c, _s = self.pair(ln, host, port)
                clients.append(c)
            report.update(server_state="established", client_state="established",
                          server_family=ln["family"])

        elif kind == "recvq":
            ln = self.accepting_listener(host, port, kind)
            nbytes = int(g["bytes"])
            for _ in range(n):
                c, s = self.pair(ln, host, port)
                c.setblocking(True)
                c.sendall(b"r" * nbytes)
                c.setblocking(False)
                clients.append(c)
            report.update(server_state="established", client_state="established",
                          server_family=ln["family"])

        elif kind in ("sendq", "fin_wait1"):
            ln = self.accepting_listener(host, port, kind)
            written = []
            for _ in range(n):
                c, s = self.pair(ln, host, port, rcvbuf=int(g["rcvbuf"]))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(g["sndbuf"]))
                written.append(self.fill(s))
                if kind == "fin_wait1":
                    s.shutdown(socket.SHUT_WR)
                    wait_state(s, "fin_wait1")
                clients.append(c)
            report.update(server_state="established" if kind == "sendq" else "fin_wait1",
                          client_state="established", written=written,
                          server_family=ln["family"])

        elif kind == "close_wait":
            ln = self.accepting_listener(host, port, kind)
            for _ in range(n):
                c, s = self.pair(ln, host, port)
                c.shutdown(socket.SHUT_WR)
                wait_state(s, "close_wait")
                wait_state(c, "fin_wait2")
                clients.append(c)
            report.update(server_state="close_wait", client_state="fin_wait2",
                          server_family=ln["family"])

        elif kind == "last_ack":
            ln = self.accepting_listener(host, port, kind)
            written = []
            for _ in range(n):
                c, s = self.pair(ln, host, port, rcvbuf=int(g["rcvbuf"]))
                c.shutdown(socket.SHUT_WR)
                wait_state(s, "close_wait")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(g["sndbuf"]))
                written.append(self.fill(s))
                s.shutdown(socket.SHUT_WR)
                wait_state(s, "last_ack")
                wait_state(c, "fin_wait2")
                clients.append(c)
            report.update(server_state="last_ack", client_state="fin_wait2", written=written,
                          server_family=ln["family"])

        elif kind == "time_wait":
            ln = self.accepting_listener(host, port, kind)
            closer = g["closer"]
            if closer not in ("server", "client"):
                raise MixError(f"time_wait.closer must be server or client, not {closer!r}")
            for _ in range(n):
                c, s = self.pair(ln, host, port)
                closed_ports.append(c.getsockname()[1])
                first, second = (s, c) if closer == "server" else (c, s)
                first.close()
                wait_state(second, "close_wait")
                second.close()
            report.update(server_state="time_wait" if closer == "server" else None,
                          client_state="time_wait" if closer == "client" else None,
                          server_family=ln["family"])

        elif kind == "syn_recv":
            if self.find_listener(host, port):
                raise MixError(f"syn_recv needs its own listener, {host}:{port} is taken")
            ln = self.add_listener({"host": host, "port": port},
                                   defer_accept=int(g["defer_accept"]))
            for _ in range(n):
                clients.append(self.connect(host, port))
            report.update(server_state="syn_recv", client_state="established",
                          server_family=ln["family"])

        elif kind == "full_queue":
            if self.find_listener(host, port):
                raise MixError(f"full_queue needs its own listener, {host}:{port} is taken")
            backlog = int(g["backlog"])
            ln = self.add_listener({"host": host, "port": port, "backlog": backlog,
                                    "accept": False})
            queued = backlog + 1
            for _ in range(queued):
                clients.append(self.connect(host, port))
            syn_sent = []
            for _ in range(int(g["syn_sent"])):
                c = socket.socket(af, socket.SOCK_STREAM)
                self.keep.append(c)
                c.setblocking(False)
                rc = c.connect_ex((host, port))
                if rc not in (errno.EINPROGRESS, 0):
                    raise MixError(f"full_queue: non-blocking connect: {os.strerror(rc)}")
                syn_sent.append(c)
            for c in syn_sent:
                wait_state(c, "syn_sent")
            n = queued
            report.update(n=queued, queued=queued, server_state="established",
                          client_state="established", server_family=ln["family"],
                          syn_sent_ports=[c.getsockname()[1] for c in syn_sent])
            self.expect(port, None, "syn_sent", len(syn_sent))
        else:
            raise MixError(f"unknown group {kind!r}")

        report["client_ports"] = closed_ports + [c.getsockname()[1] for c in clients]
        self.expect(port, report.get("server_state"), report.get("client_state"), n)
        return report

    def build(self) -> dict:
        for cfg in self.spec.get("listeners", []):
            self.add_listener(cfg)
        for kind in GROUP_ORDER:
            raw = self.spec.get(kind)
            if raw is None:
                continue
            for cfg in raw if isinstance(raw, list) else [raw]:
                self.groups.append(self.build_group(kind, cfg))
        unknown = set(self.spec) - set(GROUP_ORDER) - {"listeners", "hold_seconds",
                                                       "settle_seconds"}
        if unknown:
            raise MixError(f"unknown spec keys {sorted(unknown)}")
        self.verify(float(self.spec.get("settle_seconds", 10)))
        return {
            "event": "ready",
            "pid": os.getpid(),
            "listeners": [{k: v for k, v in ln.items() if k != "socks"} for ln in self.listeners],
            "groups": self.groups,
            "expect": {
                "local": [[p, s, n] for (p, s), n in sorted(self.expect_local.items())],
                "remote": [[p, s, n] for (p, s), n in sorted(self.expect_remote.items())],
            },
        }

    def verify(self, settle: float) -> None:
        """Wait (bounded) until /proc/net/tcp* shows exactly the expected counts."""
        deadline = time.monotonic() + settle
        diff: list = []
        for _ in range(1000):
            local, remote = proc_counts()
            diff = [("local", k, n, local.get(k, 0)) for k, n in self.expect_local.items()
                    if local.get(k, 0) != n]
            diff += [("remote", k, n, remote.get(k, 0)) for k, n in self.expect_remote.items()
                     if remote.get(k, 0) != n]
            if not diff or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if diff:
            raise MixError("states not reached (side, (port, state), want, got): "
                           + "; ".join(map(str, diff)))


class _Stop(Exception):
    pass


def _on_signal(signum, frame):
    raise _Stop()


def hold(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    fd = sys.stdin.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _ in range(int(seconds * 2) + 10):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if poller.poll(min(left, 1.0) * 1000) and not os.read(fd, 4096):
            return  # EOF: our parent is gone or done


# ---- runner side (imported by the test fixtures; not used inside the namespace) --------


class SockMixProcess:
    """A running sockmix inside a namespace, started by `start(ns, spec)`.

    .ready       the parsed ready line (dict)
    .groups      its groups; .group(kind, port=None) -> the one matching group
    .expect_local / .expect_remote   {(port, state): n} that sockmix verified in /proc
    .pid, .proc, .ns, .spec; .stop() terminates it by PID (idempotent)
    .age()       seconds since the ready line: TIME-WAIT sockets last 60 s, so exact
                 time_wait counts hold only while age() < 60 (SYN-SENT/SYN-RECV ~120 s)
    """

    def __init__(self, ns, spec: dict, proc, stderr_file, ready: dict):
        self.ns, self.spec, self.proc, self._stderr, self.ready = ns, spec, proc, stderr_file, ready
        self.pid = proc.pid
        self.ready_monotonic = time.monotonic()
        self.groups: list[dict] = ready.get("groups", [])
        self.listeners: list[dict] = ready.get("listeners", [])
        expect = ready.get("expect", {})
        self.expect_local = {(p, s): n for p, s, n in expect.get("local", [])}
        self.expect_remote = {(p, s): n for p, s, n in expect.get("remote", [])}

    def group(self, kind: str, port: int | None = None) -> dict:
        found = [g for g in self.groups if g["kind"] == kind and port in (None, g["port"])]
        if len(found) != 1:
            raise LookupError(f"{len(found)} sockmix groups match {kind!r} port={port}")
        return found[0]

    @property
    def ports(self) -> set[int]:
        """Every listener/group port of this mix (the fixed, non-ephemeral ones)."""
        return {ln["port"] for ln in self.listeners} | {g["port"] for g in self.groups}

    def age(self) -> float:
        return time.monotonic() - self.ready_monotonic

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self, timeout: float = 10) -> int | None:
        import subprocess

        if self.proc.poll() is None:
            try:
                self.proc.terminate()  # SIGTERM to our own child's PID
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream and not stream.closed:
                stream.close()
        if not self._stderr.closed:
            self._stderr.close()
        return self.proc.returncode


def start(ns, spec: dict | None = None, timeout: float = 30.0,
          python: str | None = None) -> SockMixProcess:
    """Start this script inside `ns` (an object with .popen(argv, **kw) running argv in the
    namespace, e.g. tests.netns.NetNS) and wait for its ready line (bounded by `timeout`).
    Raises RuntimeError with its error line/stderr if it fails or times out."""
    import subprocess
    import tempfile

    spec = DEFAULT_SPEC if spec is None else spec
    argv = [python or sys.executable, os.path.abspath(__file__), "--spec", json.dumps(spec)]
    err = tempfile.TemporaryFile()
    proc = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    fd = proc.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    buf = b""
    deadline = time.monotonic() + timeout
    line = None
    for _ in range(100000):
        if b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if poller.poll(left * 1000):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
    msg = None
    if line:
        try:
            msg = json.loads(line)
        except ValueError:
            pass
    mix = SockMixProcess(ns, spec, proc, err, msg if isinstance(msg, dict) else {})
    if mix.ready.get("event") == "ready":
        return mix
    why = f"said {line!r}" if line is not None else (
        "timed out" if proc.poll() is None else "exited without a ready line")
    err_text = mix.stderr()
    rc = mix.stop()
    raise RuntimeError(f"sockmix {why} (timeout {timeout}s, rc {rc}); stderr: {err_text[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", help="JSON spec (default: DEFAULT_SPEC, every state)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        spec = json.loads(args.spec) if args.spec else DEFAULT_SPEC
        if not isinstance(spec, dict):
            raise MixError("spec must be a JSON object")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        mix = Mix(spec)
        ready = mix.build()
        print(json.dumps(ready), flush=True)
        hold(float(spec.get("hold_seconds", 900)))
    except _Stop:
        return 0
    except (MixError, OSError, ValueError, KeyError, TypeError) as e:
        print(json.dumps({"event": "error", "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
