"""sockscope's figures equal `ss` run in the same namespace (real kernel, real sockets).

A few thousand sockets in every state (tests/support/sockmix.py DEFAULT_SPEC + bulk pairs) are
held in a fresh namespace. sockscope reads that namespace from outside (poll.netns), so
its own scrapes never appear in the table it compares with `ss`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from sockscope.aggregate import Rules
from sockscope.batch import Record, format_address
from sockscope.netlink import Reader
from sockscope.poller import poll_once
from sockscope.snapshot import OTHER, STATES
from sockscope.states import TcpState
from support import sockmix as sockmix_mod
from support import ss_parse
from support.daemon import DaemonError, samples, scrape, start_daemon

BULK_PAIRS = 1500
SS_STATE = {s.value: s.label for s in TcpState}


@pytest.fixture(scope="module")
def mix(netns):
    spec = dict(sockmix_mod.DEFAULT_SPEC, bulk={"host": "127.0.0.1", "port": 18089,
                                                 "n": BULK_PAIRS})
    m = sockmix_mod.start(netns, spec, timeout=60)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def rules(mix):
    # Track the mix's fixed ports on the remote side too (clients connect TO them).
    return Rules(remote=tuple(sorted(mix.ports)))


def stable(read, attempts=5):
    """read() -> (ours, ss) until two reads of ours around one ss agree (the table holds
    still; only the retransmitting SYN-SENT/TIME-WAIT timers could move it)."""
    for _ in range(attempts):
        before = read("ours")
        theirs = read("ss")
        after = read("ours")
        if before == after:
            return before, theirs
        time.sleep(0.2)
    pytest.fail("the namespace's table kept changing between reads")


def test_reader_records_equal_ss_lines(netns, mix):
    reader = Reader(netns=netns.name)

    def read(which):
        if which == "ss":
            return sorted(
                (ln.state, ln.family, ln.local_address, ln.local_port, ln.remote_address,
                 ln.remote_port, ln.recvq, ln.sendq)
                for ln in ss_parse.parse(ss_parse.run_ss(netns)))
        out = []
        reader.poll(lambda: (out.clear(), out.extend)[1])
        return sorted(
            (SS_STATE[r.state], "ipv4" if r.family == socket.AF_INET else "ipv6",
             format_address(r.family, r.src), r.sport,
             format_address(r.family, r.dst), r.dport, r.rqueue, r.wqueue)
            for r in map(Record._make, out))

    ours, theirs = stable(read)
    reader.close()
    assert len(ours) > 2 * BULK_PAIRS
    assert ours == theirs


PYROUTE2_ORACLE = """
import collections, json, socket
from pyroute2 import DiagSocket
counts = collections.Counter()
with DiagSocket() as ds:
    ds.bind()
    for fam in (socket.AF_INET, socket.AF_INET6):
        for m in ds.get_sock_stats(family=fam):
            counts[(fam, m["idiag_state"], m["idiag_rqueue"], m["idiag_wqueue"])] += 1
print(json.dumps(sorted([*k, n] for k, n in counts.items())))
"""


def test_reader_equals_pyroute2_decoder(netns, mix):
    """A second, independent decoder (pyroute2's generic one, run inside the namespace)
    agrees with ours on every (family, state, Recv-Q, Send-Q) count."""
    reader = Reader(netns=netns.name)

    def read(which):
        if which == "ss":
            r = netns.run([sys.executable, "-c", PYROUTE2_ORACLE], timeout=120)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)
        out = []
        reader.poll(lambda: (out.clear(), out.extend)[1])
        counts: dict = {}
        for r in map(Record._make, out):
            key = (r.family, r.state, r.rqueue, r.wqueue)
            counts[key] = counts.get(key, 0) + 1
        return sorted([*k, n] for k, n in counts.items())

    ours, theirs = stable(read)
    reader.close()
    assert sum(n for *_, n in ours) > 2 * BULK_PAIRS
    assert ours == theirs


def snapshot_figures(snap):
    """The Snapshot in ss_parse.SsFigures terms, for the tracked ports."""
    states = {k: v for k, v in snap.states.items() if v}
    local = {(p, s): n for p, row in zip(snap.local.ports, snap.local.counts)
             for s, n in zip(STATES, row) if n}
    remote = {(p, s): n for p, row in zip(snap.remote.ports, snap.remote.counts)
              for s, n in zip(STATES, row) if n}
    return states, local, remote


def fold(port_states: dict, tracked: set[int]) -> dict:
    out: dict = {}
    for (port, state), n in port_states.items():
        key = (port if port in tracked else OTHER, state)
        out[key] = out.get(key, 0) + n
    return out


def fold_queues(queues: dict, tracked: set[int]) -> dict:
    out: dict = {}
    for port, q in queues.items():
        key = port if port in tracked else OTHER
        o = out.get(key, ss_parse.Queues())
        out[key] = ss_parse.Queues(o.recvq_sum + q.recvq_sum, o.sendq_sum + q.sendq_sum,
                                   max(o.recvq_max, q.recvq_max), max(o.sendq_max, q.sendq_max),
                                   o.n_recvq_nonzero + q.n_recvq_nonzero,
                                   o.n_sendq_nonzero + q.n_sendq_nonzero)
    return {k: v for k, v in out.items() if any(v)}


def snapshot_queues(table):
    return {p: ss_parse.Queues(q.receive_bytes, q.send_bytes, q.receive_max_bytes,
                               q.send_max_bytes, q.receive_backlogged, q.send_backlogged)
            for p, q in zip(table.ports, table.queues) if any(
                (q.receive_bytes, q.send_bytes, q.receive_backlogged, q.send_backlogged))}


def fullest(members):
    # The member with the largest length/limit ratio, then the largest length.
    return max(members, key=lambda m: (m[0] / m[1] if m[1] else float(m[0] > 0) * 1e9, m[0]))


def test_snapshot_equals_ss_figures(netns, mix, rules):
    reader = Reader(netns=netns.name)
    snaps = {}

    def read(which):
        if which == "ss":
            return ss_parse.ss_figures(netns)
        snap, _ = poll_once(reader, rules)
        snaps["last"] = snap
        return (snapshot_figures(snap), snapshot_queues(snap.local), snapshot_queues(snap.remote),
                snap.listeners, snap.local.ports)

    ((states, local, remote), lq, rq, listeners, local_ports), ss = stable(read)
    reader.close()
    snap = snaps["last"]

    # Per family and state.
    assert states == ss.states
    # Every state the mix promised is really there.
    for state in ("listen", "established", "syn_sent", "syn_recv", "fin_wait1", "fin_wait2",
                  "time_wait", "close_wait", "last_ack"):
        assert ss.state(state) > 0, state
    # Local side: auto-tracked listening ports; everything else folded into other.
    tracked_local = {p for p in local_ports if p != OTHER}
    assert tracked_local == {ln.local_port for ln in ss.lines if ln.state == "listen"}
    assert local == fold(ss.local_port_states, tracked_local)
    tracked_remote = set(rules.remote)
    assert remote == fold(ss.remote_port_states, tracked_remote)
    # Queues (LISTEN excluded on both sides).
    assert lq == fold_queues(ss.local_queues, tracked_local)
    assert rq == fold_queues(ss.remote_queues, tracked_remote)
    recvq = mix.group("recvq")
    assert lq[recvq["port"]].recvq_sum == recvq["n"] * 1000
    assert lq[mix.group("sendq")["port"]].sendq_sum > 0
    # Listeners: fullest member's Recv-Q/Send-Q, and the member count.
    ours = {(ln.address, ln.port): (ln.queue_length, ln.queue_limit, ln.members)
            for ln in listeners}
    theirs = {key: (*fullest(members), len(members)) for key, members in ss.listeners.items()}
    assert ours == theirs
    full = mix.group("full_queue")
    assert ours[("127.0.0.1", full["port"])][:2] == (full["backlog"] + 1, full["backlog"])
    assert ours[("0.0.0.0", 18443)][2] == 3  # the SO_REUSEPORT group
    print(f"\npoll of {snap.sockets} sockets in the test namespace: "
          f"{snap.duration * 1000:.1f} ms ({snap.messages} messages)")


@pytest.fixture(scope="module")
def daemon(netns, mix, rules, tmp_path_factory):
    try:
        d = start_daemon(tmp_path_factory.mktemp("daemon"),
                         "poll:\n  interval: 500ms\n"
                         f"ports:\n  remote: [{', '.join(map(str, rules.remote))}]\n",
                         netns=netns.name)
    except DaemonError as e:
        pytest.fail(str(e))
    yield d.url, d
    d.stop()


def test_metrics_endpoint_equals_ss(netns, daemon, rules):
    url, _ = daemon

    def read(which):
        if which == "ss":
            return ss_parse.ss_figures(netns)
        s = samples(scrape(url))
        # Wait for a poll newer than the previous ss run: compare values, not timestamps.
        return {k: v for k, v in s.items() if k[0].startswith("sockscope_tcp_")}

    # Two scrapes 1.2 s apart span at least two polls.
    def read_after_poll(which):
        if which == "ours":
            time.sleep(0.6)
        return read(which)

    m, ss = stable(read_after_poll)
    for (family, state), n in ss.states.items():
        assert m[("sockscope_tcp_sockets", (("family", family), ("state", state)))] == n
    assert sum(v for (name, _), v in m.items() if name == "sockscope_tcp_sockets") == ss.total
    tracked_local = {int(dict(k[1])["port"]) for k in m
                     if k[0] == "sockscope_tcp_local_port_sockets"
                     and dict(k[1])["port"] != OTHER}
    for side, figures, tracked in (
        ("local", ss.local_port_states, tracked_local),
        ("remote", ss.remote_port_states, set(rules.remote)),
    ):
        got = {(p if p == OTHER else int(p), st): v for (name, labels), v in m.items()
               if name == f"sockscope_tcp_{side}_port_sockets" and v
               for p, st in [(dict(labels)["port"], dict(labels)["state"])]}
        assert got == fold(figures, tracked), side
    for (address, port), members in ss.listeners.items():
        labels = (("address", address), ("port", str(port)))
        length, limit = fullest(members)
        assert m[("sockscope_tcp_listen_queue_length", labels)] == length
        assert m[("sockscope_tcp_listen_queue_limit", labels)] == limit
        assert m[("sockscope_tcp_listen_sockets", labels)] == len(members)
    recv = fold_queues(ss.local_queues, tracked_local)
    for port, q in recv.items():
        labels = (("port", str(port)),)
        assert m[("sockscope_tcp_local_port_receive_queue_bytes", labels)] == q.recvq_sum
        assert m[("sockscope_tcp_local_port_send_queue_bytes", labels)] == q.sendq_sum


def test_concurrent_scrapes_while_polling(daemon):
    """20 scrapers x 15 scrapes against the real daemon polling every 500 ms: every scrape
    succeeds, each body is one consistent snapshot, and polls keep happening."""
    from concurrent.futures import ThreadPoolExecutor

    url, proc = daemon
    polls_before = samples(scrape(url))[("sockscope_polls_total", ())]

    def scraper(_):
        out = []
        for _ in range(15):
            s = samples(scrape(url))
            total = sum(v for (name, _), v in s.items() if name == "sockscope_tcp_sockets")
            out.append((s[("sockscope_up", ())], total == s[("sockscope_poll_sockets", ())]))
            time.sleep(0.05)
        return out

    with ThreadPoolExecutor(20) as pool:
        results = [r for rs in pool.map(scraper, range(20)) for r in rs]
    assert len(results) == 300
    assert all(up == 1.0 and consistent for up, consistent in results)
    assert samples(scrape(url))[("sockscope_polls_total", ())] > polls_before
    assert proc.proc.poll() is None


def test_daemon_stops_cleanly_on_sigterm(daemon):
    _, d = daemon
    assert d.stop(timeout=10) == 0, d.log()
    assert "shutting down" in d.log()


def test_snapshot_cli_json_and_text(netns, mix):
    base = [sys.executable, "-m", "sockscope", "snapshot", "--netns", netns.name]
    r = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    ss = ss_parse.ss_figures(netns)
    assert report["totals"] == {state: ss.state(state) for state in STATES}
    listeners = {(ln["address"], ln["port"]): ln for ln in report["listeners"]}
    assert set(listeners) == set(ss.listeners)
    # We are root: the sockmix process is named as the owner of its listeners.
    owner_pids = {o["pid"] for o in listeners[("127.0.0.1", 18080)]["owners"]}
    assert owner_pids == {mix.pid}
    cw_port = mix.group("close_wait")["port"]
    (cw,) = [e for e in report["close_wait_owners"] if e["port"] == cw_port]
    assert [(o["pid"], o["sockets"]) for o in cw["owners"]] == [
        (mix.pid, ss.local_port_states[(cw_port, "close_wait")])]

    r2 = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert r2.returncode == 0, r2.stderr
    (line,) = [ln.split() for ln in r2.stdout.splitlines() if "127.0.0.1:18090 " in ln]
    # The full accept queue: marked, B+1 of B, owned by the sockmix process.
    assert line[:3] == ["!", "127.0.0.1:18090", "5/4"], line
    assert f"[{mix.pid}]" in line[-2]
