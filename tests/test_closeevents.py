"""Close notifications (sockscope.closeevents): pure decoding of recorded events, then the
real kernel in test namespaces (cookies against a dump, outcomes, no privilege, losses).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sockscope import tcpinfo
from sockscope.batch import Batch
from sockscope.closeevents import FAILED, NORMAL, UNREAD_DATA, Closed, CloseEvents, decode, frame
from sockscope.netlink import Reader

FIXTURES = Path(__file__).parent / "fixtures"
DAEMON = Path(__file__).parent.parent / "daemon"


def recorded() -> dict[str, bytes]:
    """Datagrams recorded by tests/fixtures/record_close_events.py."""
    lines = (FIXTURES / "close_events_recorded.txt").read_text().splitlines()
    return {line.split()[0]: bytes.fromhex(line.split()[1]) for line in lines if line and line[0] != "#"}


def framed(datagrams: list[bytes]) -> tuple[bytes, list[int]]:
    """Datagrams back to back as CloseEvents holds them (each padded to 4 bytes)."""
    data, bounds = b"", []
    for d in datagrams:
        data += d + b"\0" * (-len(d) % 4)
        bounds.append(len(data))
    return data, bounds


def decoded(names: list[str]) -> tuple[Closed, int]:
    rec = recorded()
    data, bounds = framed([rec[n] for n in names])
    words, bad = frame(data, bounds)
    assert bad == 0
    return decode(Batch(data, words))


# -- pure ---------------------------------------------------------------------------------

def test_recorded_events_decode_with_the_dumps_layout_and_outcomes():
    names = ["normal_client", "normal_server", "unread_server", "unread_client", "refused_blocking",
             "refused_nonblocking", "timed_out", "listener"]
    closed, skipped = decoded(names)
    assert skipped == 1  # the listener is not a connection
    row = dict(zip(names[:-1], range(len(names) - 1)))
    assert len(closed) == 7

    def get(name: str, col: str) -> int:
        return int(getattr(closed, col)[row[name]])

    # 10,000 bytes one way and 500 back; the SYN and the FIN each count one in the
    # sequence space tcpi_bytes_acked/received measure
    assert get("normal_client", "bytes_acked") in (10_001, 10_002)
    assert get("normal_server", "bytes_received") in (10_000, 10_001)
    assert get("normal_client", "bytes_received") in (500, 501)
    assert get("normal_server", "sport") == get("normal_client", "dport") == 18211
    assert get("unread_server", "bytes_received") in (1000, 1001)
    outcome = {n: get(n, "outcome") for n in row}
    assert outcome == {"normal_client": NORMAL, "normal_server": NORMAL, "unread_server": UNREAD_DATA,
                       "unread_client": NORMAL, "refused_blocking": FAILED, "refused_nonblocking": FAILED,
                       "timed_out": FAILED}
    assert get("refused_blocking", "dport") == 0  # tcp_disconnect cleared it
    assert get("refused_nonblocking", "dport") == 18219
    assert get("timed_out", "dport") == 18212 and get("timed_out", "total_retrans") >= 1
    assert len(set(closed.cookie.tolist())) == 7


def test_frame_checks_each_datagram_and_skips_only_the_bad_ones():
    rec = recorded()
    good = rec["normal_client"]
    garbled = bytearray(rec["normal_server"])
    garbled[0:4] = (5000).to_bytes(4, sys.byteorder)  # a length past the datagram
    two = rec["unread_server"] + rec["unread_client"]  # two messages in one datagram: walked
    short = good[:40]
    data, bounds = framed([good, bytes(garbled), two, short, rec["timed_out"]])
    words, bad = frame(data, bounds)
    assert bad == 2
    closed, _ = decode(Batch(data, words))
    assert closed.outcome.tolist() == [NORMAL, UNREAD_DATA, NORMAL, FAILED]
    assert frame(b"", [])[0].size == 0


def test_a_tcp_info_too_short_to_classify_is_skipped_not_misread():
    rec = recorded()
    msg = rec["normal_server"]
    batch = Batch(msg, np.array([0]))
    attr = batch.attribute(tcpinfo.INET_DIAG_INFO)
    cut = int(attr.offset[0]) + 192  # tcpi_delivered (Linux 4.18) starts at 192
    short = bytearray(msg[:cut])
    short[0:4] = cut.to_bytes(4, sys.byteorder)
    short[int(attr.offset[0]) - 4:int(attr.offset[0]) - 2] = (196).to_bytes(2, sys.byteorder)
    closed, skipped = decode(Batch(bytes(short), np.array([0])))
    assert len(closed) == 0 and skipped == 1


# -- real kernel -------------------------------------------------------------------------

CONNECTIONS = r"""
import json, socket, sys
n = int(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 18401), backlog=n)
pairs = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", 18401)); a, _ = srv.accept()
    c.sendall(b"q" * 100); a.recv(100); a.sendall(b"r" * 200); c.recv(200)
    pairs.append((c, a))
unread = socket.create_connection(("127.0.0.1", 18401)); u, _ = srv.accept()
unread.sendall(b"x" * 3000)
print(json.dumps({"ports": [c.getsockname()[1] for c, _ in pairs], "unread": unread.getsockname()[1]}), flush=True)
sys.stdin.readline()
for c, a in pairs:
    c.close(); a.close()
u.close()      # 3000 bytes unread: an RST
unread.close()
r = socket.socket()
try:
    r.connect(("127.0.0.1", 18402))  # nothing listens: refused
except ConnectionRefusedError:
    pass
r.close()
print("closed", flush=True)
"""


def receive_until(events: CloseEvents, want: int, timeout: float = 5.0) -> tuple[Closed, int, int]:
    """Connections closed, ENOBUFS seen and events skipped (not connections), read until
    `want` connections came or `timeout` passed."""
    parts, enobufs, skipped = [], 0, 0
    deadline = time.monotonic() + timeout
    while sum(map(len, parts)) < want and time.monotonic() < deadline:
        got = events.receive(0.1)
        if got is not None:
            enobufs += got.enobufs
            closed, n = decode(got.batch)
            parts.append(closed)
            skipped += n
    return Closed.concat(parts), enobufs, skipped


def dump_cookies(ns) -> dict[tuple[int, int], int]:
    """(sport, dport) -> cookie of the namespace's ESTABLISHED TCP sockets, by a dump."""
    found: dict[tuple[int, int], int] = {}

    def start():
        def sink(batch):
            for sp, dp, st, ck in zip(batch.sport.tolist(), batch.dport.tolist(), batch.state.tolist(),
                                      batch.cookie.tolist()):
                if st == 1:
                    found[(sp, dp)] = ck
        return sink

    with Reader(("ipv4",), netns=ns.name, legacy=False) as reader:
        reader.poll(start)
    return found


def test_each_closed_connection_arrives_once_per_side_with_the_cookie_a_dump_reported(netns_factory):
    ns = netns_factory()
    n = 40
    with CloseEvents(("ipv4", "ipv6"), netns=ns.name) as events:
        events.open()
        assert events.forced and events.granted >= 2 * 8 * 1024 * 1024  # root: SO_RCVBUFFORCE, doubled
        proc = ns.popen([sys.executable, "-c", CONNECTIONS, str(n)], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
        try:
            ready = json.loads(proc.stdout.readline())
            cookies = dump_cookies(ns)
            client = {cookies[(p, 18401)] for p in ready["ports"]}
            server = {cookies[(18401, p)] for p in ready["ports"]}
            assert len(client) == len(server) == n
            assert events.receive(0.1) is None  # nothing closed yet
            proc.stdin.write("close\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "closed"
        finally:
            proc.stdin.close()
            proc.wait(timeout=10)
        # + the listener, closed as the process exits: an event, but not a connection
        closed, enobufs, skipped = receive_until(events, 2 * n + 4, timeout=1.0)
        assert skipped == 1
        assert enobufs == 0 and events.dropped() == 0
    got = dict(zip(closed.cookie.tolist(), range(len(closed))))
    assert len(closed) == 2 * n + 3 and len(got) == len(closed)  # each socket once
    assert client | server <= set(got)
    for ck in client:
        i = got[ck]
        assert closed.dport[i] == 18401 and closed.outcome[i] == NORMAL
        assert closed.bytes_acked[i] >= 101 and closed.bytes_received[i] >= 200
    for ck in server:
        assert closed.sport[got[ck]] == 18401 and closed.bytes_received[got[ck]] >= 100
    unread = cookies[(18401, ready["unread"])]
    assert closed.outcome[got[unread]] == UNREAD_DATA
    refused = [i for i in range(len(closed)) if closed.outcome[i] == FAILED]
    assert len(refused) == 1 and closed.dport[refused[0]] == 0  # blocking connect: the kernel cleared it


NOBODY = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from sockscope.closeevents import CloseEvents, decode
os.setgroups([]); os.setgid(65534); os.setuid(65534)  # nobody: every capability dropped
cap = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")][0]
events = CloseEvents(("ipv4",), rcvbuf=64 * 1024)
events.open()
print(json.dumps({"ready": True}), flush=True)
got, deadline = 0, time.monotonic() + 5
while got < int(sys.argv[2]) and time.monotonic() < deadline:
    r = events.receive(0.2)
    if r is not None:
        got += len(decode(r.batch)[0])
print(json.dumps({"uid": os.getuid(), "cap": cap, "forced": events.forced, "events": got}), flush=True)
"""


def test_an_unprivileged_subscriber_receives_the_events_of_roots_sockets(netns_factory):
    ns = netns_factory()
    proc = ns.popen([sys.executable, "-c", NOBODY, str(DAEMON), "20"], stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline())["ready"]
    ns.python(["-c", "import socket\nsrv = socket.create_server(('127.0.0.1', 18403))\n"
               "for _ in range(10):\n    c = socket.create_connection(('127.0.0.1', 18403)); a, _ = srv.accept()\n"
               "    c.close(); a.close()\n"], check=True)
    out = json.loads(proc.stdout.readline())
    proc.wait(timeout=10)
    assert out == {"uid": 65534, "cap": "0000000000000000", "forced": False, "events": 20}


BURST = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", 18404), backlog=4096)
for _ in range(int(sys.argv[1])):
    c = socket.create_connection(("127.0.0.1", 18404)); a, _ = srv.accept()
    c.close(); a.close()
"""


def test_a_burst_beyond_a_small_buffer_counts_its_losses_and_keeps_receiving(netns_factory):
    ns = netns_factory()
    # not forced: a 32 KiB SO_RCVBUF (doubled to 64 KiB) holds a few dozen ~1 KiB events
    events = CloseEvents(("ipv4",), netns=ns.name, rcvbuf=32 * 1024, force=False)
    try:
        events.open()
        assert not events.forced and events.granted == 64 * 1024
        ns.python(["-c", BURST, "500"], check=True, timeout=60)  # 1,000 events, nobody reading
        closed, enobufs, skipped = receive_until(events, 1000, timeout=1.0)
        lost = events.dropped()
        assert enobufs >= 1 and lost > 0
        # SO_MEMINFO's drop count is exact: 1,000 connection ends + the listener, each
        # received (the listener: skipped, not a connection) or dropped
        assert len(closed) + skipped + lost == 1001 and skipped <= 1
        ns.python(["-c", BURST, "10"], check=True)
        after, enobufs, _ = receive_until(events, 20)
        assert len(after) == 20 and enobufs == 0 and events.dropped() == lost
    finally:
        events.close()


def test_receive_blocks_for_its_timeout_without_spinning(netns_factory):
    ns = netns_factory()
    with CloseEvents(netns=ns.name) as events:
        cpu, wall = time.process_time(), time.monotonic()
        assert events.receive(0.5) is None
        assert time.monotonic() - wall >= 0.45 and time.process_time() - cpu < 0.05


def test_ipv6_connections_arrive_through_their_own_group(netns_factory):
    ns = netns_factory()
    script = ("import socket\nsrv = socket.create_server(('::1', 18405), family=socket.AF_INET6)\n"
              "c = socket.create_connection(('::1', 18405)); a, _ = srv.accept(); c.sendall(b'v6' * 50)\n"
              "a.recv(100); c.close(); a.close()\n")
    with CloseEvents(("ipv4",), netns=ns.name) as v4, CloseEvents(("ipv6",), netns=ns.name) as v6:
        v4.open()
        v6.open()
        ns.python(["-c", script], check=True)
        closed, _, _ = receive_until(v6, 2)
        assert sorted(closed.sport.tolist()) == sorted([18405, int(closed.sport[closed.dport == 18405][0])])
        assert closed.bytes_received.max() >= 100
        assert receive_until(v4, 1, timeout=0.3)[0].cookie.size == 0  # IPv4's group hears none of it
