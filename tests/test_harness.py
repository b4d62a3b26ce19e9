"""Tests of the test harness itself: the ss parser on captured text, and the sockmix
fixture producing every promised state as `ss` sees it (root + iproute2 needed for the
second part: skipped locally without them, failing under CI=true)."""

from __future__ import annotations

import json
import os
import time

import pytest

from support import sockmix as sockmix_mod
from support.prereq import in_ci, require
from support.ss_parse import Queues, SsParseError, figures, parse, parse_line

# Captured once on Debian 12 (iproute2 6.1.0, kernel 6.x) with
#     ip netns exec NS ss -tanOH
# while `ip netns exec NS python tests/support/sockmix.py` ran its DEFAULT_SPEC (the `sockmix`
# fixture's mix) in a namespace made by netns.NetNS.create(). Trailing blanks stripped.
# The mix: listeners 127.0.0.1:18080, [::1]:18082, 0.0.0.0:18443 (3 SO_REUSEPORT
# members), dual-stack ::/18444 (printed `*`), v6only ::/18445; established 3 v4 pairs on
# 18080, 2 v6 pairs on 18082, 1 v4 client -> 18444 (server end v4-mapped); recvq 4 x 1000
# bytes on 18081; sendq 2 on 18083; close_wait 3 on 18084; time_wait 5 on 18085 (server
# closed first); fin_wait1 1 on 18086; last_ack 1 on 18087; syn_recv 2 on 18088
# (TCP_DEFER_ACCEPT); full_queue backlog 4 on 18090 (5 queued + 2 SYN-SENT).
SAMPLE_TANOH = """\
LISTEN     0      128               0.0.0.0:18443            0.0.0.0:*
LISTEN     0      128               0.0.0.0:18443            0.0.0.0:*
LISTEN     0      128               0.0.0.0:18443            0.0.0.0:*
LISTEN     0      128             127.0.0.1:18088            0.0.0.0:*
LISTEN     5      4               127.0.0.1:18090            0.0.0.0:*
LISTEN     0      128             127.0.0.1:18081            0.0.0.0:*
LISTEN     0      128             127.0.0.1:18080            0.0.0.0:*
LISTEN     0      128             127.0.0.1:18083            0.0.0.0:*
LISTEN     0      128             127.0.0.1:18085            0.0.0.0:*
LISTEN     0      128             127.0.0.1:18084            0.0.0.0:*
LISTEN     0      128             127.0.0.1:18087            0.0.0.0:*
LISTEN     0      128             127.0.0.1:18086            0.0.0.0:*
ESTAB      0      0               127.0.0.1:17860          127.0.0.1:18090
ESTAB      0      0               127.0.0.1:17876          127.0.0.1:18090
ESTAB      0      0               127.0.0.1:17890          127.0.0.1:18090
ESTAB      0      0               127.0.0.1:17904          127.0.0.1:18090
ESTAB      0      0               127.0.0.1:17914          127.0.0.1:18090
SYN-SENT   0      1               127.0.0.1:17924          127.0.0.1:18090
SYN-SENT   0      1               127.0.0.1:17928          127.0.0.1:18090
ESTAB      0      0               127.0.0.1:13216          127.0.0.1:18081
ESTAB      0      0               127.0.0.1:13226          127.0.0.1:18081
ESTAB      0      0               127.0.0.1:13232          127.0.0.1:18081
ESTAB      0      0               127.0.0.1:13242          127.0.0.1:18081
ESTAB      0      26624           127.0.0.1:18083          127.0.0.1:33276
FIN-WAIT-1 0      26625           127.0.0.1:18086          127.0.0.1:17212
ESTAB      0      0               127.0.0.1:13986          127.0.0.1:18444
LAST-ACK   1      26625           127.0.0.1:18087          127.0.0.1:49910
ESTAB      1000   0               127.0.0.1:18081          127.0.0.1:13226
SYN-RECV   0      0               127.0.0.1:18088          127.0.0.1:44052
CLOSE-WAIT 1      0               127.0.0.1:18084          127.0.0.1:29698
FIN-WAIT-2 4096   0               127.0.0.1:49910          127.0.0.1:18087
ESTAB      0      0               127.0.0.1:18080          127.0.0.1:37508
TIME-WAIT  0      0               127.0.0.1:18085          127.0.0.1:42674
ESTAB      4096   0               127.0.0.1:17212          127.0.0.1:18086
ESTAB      0      0               127.0.0.1:37484          127.0.0.1:18080
ESTAB      0      0               127.0.0.1:37500          127.0.0.1:18080
ESTAB      0      0               127.0.0.1:37508          127.0.0.1:18080
FIN-WAIT-2 0      0               127.0.0.1:29690          127.0.0.1:18084
FIN-WAIT-2 0      0               127.0.0.1:29698          127.0.0.1:18084
FIN-WAIT-2 0      0               127.0.0.1:29704          127.0.0.1:18084
ESTAB      1000   0               127.0.0.1:18081          127.0.0.1:13242
TIME-WAIT  0      0               127.0.0.1:18085          127.0.0.1:42700
ESTAB      0      0               127.0.0.1:18090          127.0.0.1:17890
CLOSE-WAIT 1      0               127.0.0.1:18084          127.0.0.1:29704
ESTAB      0      0               127.0.0.1:44052          127.0.0.1:18088
ESTAB      0      0               127.0.0.1:44060          127.0.0.1:18088
TIME-WAIT  0      0               127.0.0.1:18085          127.0.0.1:42690
ESTAB      0      0               127.0.0.1:18080          127.0.0.1:37484
ESTAB      1000   0               127.0.0.1:18081          127.0.0.1:13216
TIME-WAIT  0      0               127.0.0.1:18085          127.0.0.1:42708
ESTAB      0      0               127.0.0.1:18080          127.0.0.1:37500
ESTAB      0      0               127.0.0.1:18090          127.0.0.1:17876
ESTAB      1000   0               127.0.0.1:18081          127.0.0.1:13232
TIME-WAIT  0      0               127.0.0.1:18085          127.0.0.1:42678
CLOSE-WAIT 1      0               127.0.0.1:18084          127.0.0.1:29690
ESTAB      0      26624           127.0.0.1:18083          127.0.0.1:33282
SYN-RECV   0      0               127.0.0.1:18088          127.0.0.1:44060
ESTAB      0      0               127.0.0.1:18090          127.0.0.1:17914
ESTAB      0      0               127.0.0.1:18090          127.0.0.1:17904
ESTAB      4096   0               127.0.0.1:33276          127.0.0.1:18083
ESTAB      4096   0               127.0.0.1:33282          127.0.0.1:18083
ESTAB      0      0               127.0.0.1:18090          127.0.0.1:17860
LISTEN     0      128                  [::]:18445               [::]:*
LISTEN     0      128                     *:18444                  *:*
LISTEN     0      128                 [::1]:18082               [::]:*
ESTAB      0      0                   [::1]:18082              [::1]:27322
ESTAB      0      0      [::ffff:127.0.0.1]:18444 [::ffff:127.0.0.1]:13986
ESTAB      0      0                   [::1]:18082              [::1]:27326
ESTAB      0      0                   [::1]:27322              [::1]:18082
ESTAB      0      0                   [::1]:27326              [::1]:18082
"""

# Captured on the same machine with `ip netns exec NS ss -tuanOH` (note the Netid column)
# while one process held: a TCP listener on 127.0.0.1:5000 and one on [::1]:5001, both
# with SO_BINDTODEVICE "lo" (ss appends %lo, also to the accepted socket), one accepted
# connection to :5000, and a UDP socket on 127.0.0.1:5002 (must be ignored).
SAMPLE_TUANOH_SCOPED = """\
udp UNCONN 0      0         127.0.0.1:5002    0.0.0.0:*
tcp LISTEN 1      128    127.0.0.1%lo:5000    0.0.0.0:*
tcp ESTAB  0      0      127.0.0.1%lo:5000  127.0.0.1:44062
tcp ESTAB  0      0         127.0.0.1:44062 127.0.0.1:5000
tcp LISTEN 0      128        [::1]%lo:5001       [::]:*
"""

FIXED = range(18000, 19000)  # sockmix's ports; reserved from the ephemeral range


def _fixed(d: dict) -> dict:
    return {k: v for k, v in d.items() if k[0] in FIXED}


# ---- parser on captured text (no root needed) ------------------------------------------


def test_sample_states_by_family():
    fig = figures(SAMPLE_TANOH)
    assert fig.total == 70
    assert fig.states == {
        ("ipv4", "listen"): 12,
        ("ipv4", "established"): 32,
        ("ipv4", "syn_sent"): 2,
        ("ipv4", "syn_recv"): 2,
        ("ipv4", "fin_wait1"): 1,
        ("ipv4", "fin_wait2"): 4,
        ("ipv4", "time_wait"): 5,
        ("ipv4", "close_wait"): 3,
        ("ipv4", "last_ack"): 1,
        ("ipv6", "listen"): 3,
        ("ipv6", "established"): 5,  # 2 v6 pairs + the v4-mapped server end
    }
    assert fig.state("established") == 37
    assert fig.state("closing") == 0


def test_sample_local_port_states():
    fig = figures(SAMPLE_TANOH)
    assert _fixed(fig.local_port_states) == {
        (18080, "listen"): 1, (18080, "established"): 3,
        (18081, "listen"): 1, (18081, "established"): 4,
        (18082, "listen"): 1, (18082, "established"): 2,
        (18083, "listen"): 1, (18083, "established"): 2,
        (18084, "listen"): 1, (18084, "close_wait"): 3,
        (18085, "listen"): 1, (18085, "time_wait"): 5,
        (18086, "listen"): 1, (18086, "fin_wait1"): 1,
        (18087, "listen"): 1, (18087, "last_ack"): 1,
        (18088, "listen"): 1, (18088, "syn_recv"): 2,
        (18090, "listen"): 1, (18090, "established"): 5,
        (18443, "listen"): 3,
        (18444, "listen"): 1, (18444, "established"): 1,
        (18445, "listen"): 1,
    }
    # everything else is a client end on an ephemeral port
    assert sum(fig.local_port_states.values()) - sum(_fixed(fig.local_port_states).values()) == 26


def test_sample_remote_port_states():
    fig = figures(SAMPLE_TANOH)
    expected_fixed = {
        (18080, "established"): 3, (18081, "established"): 4, (18082, "established"): 2,
        (18083, "established"): 2, (18084, "fin_wait2"): 3, (18086, "established"): 1,
        (18087, "fin_wait2"): 1, (18088, "established"): 2, (18090, "established"): 5,
        (18090, "syn_sent"): 2, (18444, "established"): 1,
    }
    assert _fixed(fig.remote_port_states) == expected_fixed
    assert fig.remote_port_states[(0, "listen")] == 15  # LISTEN's peer `*` -> port 0
    assert (sum(fig.remote_port_states.values()) - 15 - sum(expected_fixed.values())) == 29


def test_sample_queues():
    fig = figures(SAMPLE_TANOH)
    lq, rq = fig.local_queues, fig.remote_queues
    assert lq[18081] == (4000, 0, 1000, 0, 4, 0)  # recvq: 4 x 1000 unread bytes
    assert lq[18083] == (0, 53248, 0, 26624, 0, 2)  # sendq: server ends
    assert rq[18083] == (8192, 0, 4096, 0, 2, 0)  # ... their slow readers
    assert lq[18084] == (3, 0, 1, 0, 3, 0)  # CLOSE-WAIT: the FIN counts 1
    assert lq[18086] == (0, 26625, 0, 26625, 0, 1)  # FIN-WAIT-1: data + FIN
    assert lq[18087] == (1, 26625, 1, 26625, 1, 1)  # LAST-ACK
    assert rq[18090] == (0, 2, 0, 1, 0, 2)  # SYN-SENT: the SYN counts 1
    # LISTEN lines are not in the queue figures: 18090's listener shows 5/4 in ss
    assert lq[18090] == Queues() == (0, 0, 0, 0, 0, 0)
    assert 18443 not in lq and 18445 not in lq and 0 not in rq
    assert lq[18085] == (0, 0, 0, 0, 0, 0)  # TIME-WAIT
    assert isinstance(lq[18081], tuple)


def test_sample_listeners():
    fig = figures(SAMPLE_TANOH)
    expected = {("127.0.0.1", p): [(0, 128)] for p in (18080, 18081, *range(18083, 18089))}
    expected |= {
        ("127.0.0.1", 18090): [(5, 4)],  # full accept queue: Recv-Q B+1, Send-Q B
        ("0.0.0.0", 18443): [(0, 128)] * 3,  # SO_REUSEPORT group
        ("::1", 18082): [(0, 128)],
        ("::", 18444): [(0, 128)],  # printed `*:18444` (AF_INET6, V6ONLY=0)
        ("::", 18445): [(0, 128)],  # printed `[::]:18445`
    }
    assert fig.listeners == expected


def test_sample_address_forms():
    lines = parse(SAMPLE_TANOH)
    by_raw = {ln.raw.split()[3]: ln for ln in lines if ln.state == "listen"}
    star = by_raw["*:18444"]
    assert (star.family, star.local_address, star.remote_address, star.remote_port) == (
        "ipv6", "::", "::", 0)
    [mapped] = [ln for ln in lines if ln.raw.split()[3] == "[::ffff:127.0.0.1]:18444"]
    assert (mapped.family, mapped.local_address, mapped.state) == (
        "ipv6", "::ffff:127.0.0.1", "established")
    assert mapped.remote_address == "::ffff:127.0.0.1"
    v6only = by_raw["[::]:18445"]
    assert (v6only.family, v6only.local_address, v6only.remote_address) == ("ipv6", "::", "::")
    v4any = by_raw["0.0.0.0:18443"]
    assert (v4any.family, v4any.local_address, v4any.remote_address) == (
        "ipv4", "0.0.0.0", "0.0.0.0")
    assert by_raw["[::1]:18082"].remote_address == "::"


def test_sample_exclude_and_include():
    drop_full_queue = lambda ln: 18090 in (ln.local_port, ln.remote_port)  # noqa: E731
    fig = figures(SAMPLE_TANOH, exclude=drop_full_queue)
    assert fig.total == 70 - 13  # listener + 5 pairs + 2 SYN-SENT
    assert fig.state("syn_sent") == 0
    assert ("127.0.0.1", 18090) not in fig.listeners
    assert 18090 not in fig.local_queues and 18090 not in fig.remote_queues
    only_v6 = figures(SAMPLE_TANOH, include=lambda ln: ln.family == "ipv6")
    assert only_v6.states == {("ipv6", "listen"): 3, ("ipv6", "established"): 5}
    # figures() also takes already parsed lines
    assert figures(parse(SAMPLE_TANOH)).states == figures(SAMPLE_TANOH).states


def test_scoped_addresses_and_netid_column():
    fig = figures(SAMPLE_TUANOH_SCOPED)
    assert fig.total == 4  # the udp line is ignored
    assert fig.listeners == {("127.0.0.1", 5000): [(1, 128)], ("::1", 5001): [(0, 128)]}
    assert fig.states == {("ipv4", "listen"): 1, ("ipv4", "established"): 2,
                          ("ipv6", "listen"): 1}
    assert fig.local_queues == {5000: (0, 0, 0, 0, 0, 0), 44062: (0, 0, 0, 0, 0, 0)}


def test_parser_edge_cases():
    # header lines (ss without -H) and blanks are skipped
    text = ("State  Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n\n"
            "ESTAB  0      0      127.0.0.1:1 127.0.0.1:2 users:((\"x\",pid=1,fd=3))\n")
    [ln] = parse(text)
    assert (ln.local_port, ln.remote_port, ln.extra) == (1, 2, 'users:(("x",pid=1,fd=3))')
    # every ss state name maps to the exporter's names
    names = {"ESTAB": "established", "SYN-SENT": "syn_sent", "SYN-RECV": "syn_recv",
             "FIN-WAIT-1": "fin_wait1", "FIN-WAIT-2": "fin_wait2", "TIME-WAIT": "time_wait",
             "UNCONN": "close", "CLOSE": "close", "CLOSE-WAIT": "close_wait",
             "LAST-ACK": "last_ack", "LISTEN": "listen", "CLOSING": "closing"}
    for ss_name, name in names.items():
        assert parse_line(f"{ss_name} 0 0 [::1]:5 [::1]:6").state == name
    # `*` next to a dotted peer (old iproute2 printed 0.0.0.0 as `*`): ipv4
    old = parse_line("LISTEN 0 5 *:22 0.0.0.0:*")
    assert (old.family, old.local_address) == ("ipv4", "0.0.0.0")
    for bad in ("ESTAB 0 0 127.0.0.1:1", "BOGUS 0 0 1.2.3.4:1 1.2.3.4:2",
                "ESTAB x 0 1.2.3.4:1 1.2.3.4:2", "ESTAB 0 0 1.2.3.4:http 1.2.3.4:2"):
        with pytest.raises(SsParseError):
            parse_line(bad)


def test_require_fails_under_ci_and_skips_otherwise(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="prerequisite missing"):
        require(False, "no frobnicator")
    require(True, "unused")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        require(False, "no frobnicator")


# ---- the sockmix fixture, as ss sees it (root) ------------------------------------------


@pytest.mark.root
def test_netns_is_set_up(netns):
    assert os.path.exists(netns.path) and netns.path == f"/run/netns/{netns.name}"
    assert netns.name.startswith(f"sockscope-test-{os.getpid()}-")
    r = netns.run(["ip", "-o", "addr", "show", "dev", "lo"], check=True)
    assert "127.0.0.1/8" in r.stdout and "::1/128" in r.stdout
    assert "UP" in netns.run(["ip", "link", "show", "lo"], check=True).stdout
    assert netns.sysctls["net.ipv4.tcp_tw_reuse"] == "0"
    assert netns.sysctls["net.ipv4.ip_local_port_range"] == "10000 60999"
    assert netns.sysctls["net.ipv6.conf.lo.disable_ipv6"] == "0"
    assert int(netns.sysctls["net.core.somaxconn"]) >= 4096


@pytest.mark.root
def test_every_promised_state_is_seen_by_ss(sockmix, ss_figures):
    fig = ss_figures(sockmix.ns)
    for (port, state), n in sockmix.expect_local.items():
        assert fig.local_port_states.get((port, state), 0) == n, (port, state)
    for (port, state), n in sockmix.expect_remote.items():
        assert fig.remote_port_states.get((port, state), 0) == n, (port, state)
    # nothing else lives in the namespace: every socket is a server end or a client end
    assert fig.total == sum(sockmix.expect_local.values()) + sum(sockmix.expect_remote.values())
    seen = {state for (_fam, state) in fig.states}
    assert seen >= {"listen", "established", "syn_sent", "syn_recv", "fin_wait1",
                    "fin_wait2", "time_wait", "close_wait", "last_ack"}


@pytest.mark.root
def test_states_by_family_match_the_ready_report(sockmix, ss_figures):
    expected: dict[tuple[str, str], int] = {}

    def add(fam, state, n):
        if state and n:
            expected[(fam, state)] = expected.get((fam, state), 0) + n

    for ln in sockmix.listeners:
        add(ln["family"], "listen", ln["members"])
    for g in sockmix.groups:
        add(g["server_family"], g["server_state"], g["n"])
        add(g["family"], g["client_state"], g["n"])
        add(g["family"], "syn_sent", len(g.get("syn_sent_ports", [])))
    assert ss_figures(sockmix.ns).states == expected
    assert expected[("ipv6", "established")] >= 3


@pytest.mark.root
def test_client_ports_reported_by_sockmix(sockmix, ss_figures):
    fig = ss_figures(sockmix.ns)
    by_local = {(ln.local_port, ln.remote_port): ln for ln in fig.lines}
    for g in sockmix.groups:
        for cport in g["client_ports"]:
            if g["client_state"] is None:  # time_wait closed by the server: client gone
                assert (cport, g["port"]) not in by_local
                assert by_local[(g["port"], cport)].state == "time_wait"
                continue
            ln = by_local[(cport, g["port"])]
            assert ln.state == g["client_state"] and ln.family == g["family"]
        for cport in g.get("syn_sent_ports", []):
            assert by_local[(cport, g["port"])].state == "syn_sent"


@pytest.mark.root
def test_close_wait_and_fin_wait2(sockmix, ss_figures):
    g = sockmix.group("close_wait")
    fig = ss_figures(sockmix.ns)
    n, p = g["n"], g["port"]
    assert fig.local_port_states[(p, "close_wait")] == n
    assert fig.remote_port_states[(p, "fin_wait2")] == n
    assert fig.local_queues[p] == (n, 0, 1, 0, n, 0)  # Recv-Q 1 each: the FIN


@pytest.mark.root
def test_full_accept_queue_and_syn_sent(sockmix, ss_figures):
    g = sockmix.group("full_queue")
    fig = ss_figures(sockmix.ns)
    b, p = g["backlog"], g["port"]
    assert fig.listeners[(g["host"], p)] == [(b + 1, b)]
    assert fig.local_port_states[(p, "established")] == b + 1
    assert fig.remote_port_states[(p, "established")] == b + 1
    assert fig.remote_port_states[(p, "syn_sent")] == g["syn_sent"] >= 1
    # queued connections have no owner yet: inode 0 in `ss -e`
    text = sockmix.ns.run(["ss", "-tanOHe", "state", "established", "sport", "=", f":{p}"],
                          check=True).stdout
    assert text.count("ino:0 ") == b + 1


@pytest.mark.root
def test_recv_and_send_queues(sockmix, ss_figures):
    fig = ss_figures(sockmix.ns)
    r = sockmix.group("recvq")
    n, nbytes = r["n"], r["bytes"]
    assert fig.local_queues[r["port"]] == (n * nbytes, 0, nbytes, 0, n, 0)
    assert fig.remote_queues[r["port"]] == (0, 0, 0, 0, 0, 0)
    s = sockmix.group("sendq")
    lq, rq = fig.local_queues[s["port"]], fig.remote_queues[s["port"]]
    assert lq.sendq_sum > 0 and lq.n_sendq_nonzero == s["n"] and lq.recvq_sum == 0
    assert rq.recvq_sum > 0 and rq.n_recvq_nonzero == s["n"] and rq.sendq_sum == 0
    # everything written is in the writer's Send-Q (unacked) or the reader's Recv-Q, or
    # both (received, ACK still delayed): >=, not ==
    assert lq.sendq_sum + rq.recvq_sum >= sum(s["written"])
    for kind in ("fin_wait1", "last_ack"):  # FIN queued behind the data: Send-Q +1
        g = sockmix.group(kind)
        q, peer = fig.local_queues[g["port"]], fig.remote_queues[g["port"]]
        assert q.n_sendq_nonzero == g["n"]
        assert q.sendq_sum + peer.recvq_sum >= sum(g["written"]) + g["n"]


@pytest.mark.root
def test_time_wait_syn_recv_and_reuseport(sockmix, ss_figures):
    fig = ss_figures(sockmix.ns)
    tw = sockmix.group("time_wait")
    assert fig.local_port_states[(tw["port"], "time_wait")] == tw["n"]
    sr = sockmix.group("syn_recv")
    assert fig.local_port_states[(sr["port"], "syn_recv")] == sr["n"]
    assert fig.remote_port_states[(sr["port"], "established")] == sr["n"]
    [rp] = [ln for ln in sockmix.listeners if ln["reuseport_members"] > 1]
    assert len(fig.listeners[(rp["host"], rp["port"])]) == rp["members"] == 3


@pytest.mark.root
def test_ipv6_present(sockmix, ss_figures):
    fig = ss_figures(sockmix.ns)
    assert fig.state("established", "ipv6") >= 5
    assert fig.state("listen", "ipv6") == 3
    assert ("::1", 18082) in fig.listeners and ("::", 18445) in fig.listeners
    [dual] = [ln for ln in fig.lines if ln.state == "listen" and ln.local_port == 18444]
    assert dual.raw.split()[3] == "*:18444" and dual.family == "ipv6"
    mapped = [ln for ln in fig.lines if ln.local_address == "::ffff:127.0.0.1"]
    assert len(mapped) == 1 and mapped[0].family == "ipv6"
    assert fig.local_port_states[(18082, "established")] == 2


@pytest.mark.root
def test_listen_only_output_parses_the_same(sockmix):
    from support.ss_parse import run_ss

    listen_only = figures(run_ss(sockmix.ns, "-ltnOH"))
    assert listen_only.listeners == figures(run_ss(sockmix.ns)).listeners
    assert {s for (_f, s) in listen_only.states} == {"listen"}


@pytest.mark.root
def test_factory_custom_spec_with_bulk(sockmix_factory, ss_figures):
    t0 = time.monotonic()
    spec = {"bulk": {"n": 2000}, "established": {"host": "::1", "port": 18082, "n": 5},
            "listeners": [{"host": "0.0.0.0", "port": 18443, "reuseport_members": 4}],
            "close_wait": {"host": "::1", "port": 18084, "n": 2}}
    mix = sockmix_factory(spec)
    fig = ss_figures(mix.ns)
    assert fig.states == {
        ("ipv4", "listen"): 1 + 4, ("ipv4", "established"): 4000,
        ("ipv6", "listen"): 2, ("ipv6", "established"): 10,
        ("ipv6", "close_wait"): 2, ("ipv6", "fin_wait2"): 2,
    }
    assert fig.local_port_states[(18089, "established")] == 2000
    assert fig.remote_port_states[(18089, "established")] == 2000
    assert len(fig.listeners[("0.0.0.0", 18443)]) == 4
    assert len(mix.group("bulk")["client_ports"]) == 2000
    assert time.monotonic() - t0 < 20


@pytest.mark.root
def test_sockmix_lifecycle(netns_factory):
    ns = netns_factory()
    mix = sockmix_mod.start(ns, {"established": {"n": 1}}, timeout=30)
    assert mix.proc.poll() is None and mix.ready["pid"] == mix.pid  # ip netns exec execs
    assert 0 <= mix.age() < 30
    mix.proc.stdin.close()  # EOF on stdin: sockmix exits by itself
    assert mix.proc.wait(timeout=10) == 0
    mix.stop()
    mix = sockmix_mod.start(ns, {"established": {"n": 1, "port": 18070}}, timeout=30)
    assert mix.stop() == 0  # SIGTERM, by pid
    with pytest.raises(RuntimeError, match="unknown spec keys"):
        sockmix_mod.start(ns, {"nonsense": {}}, timeout=30)
    with pytest.raises(RuntimeError, match="accept=false"):
        sockmix_mod.start(ns, {"listeners": [{"host": "127.0.0.1", "port": 18071,
                                              "accept": False}],
                               "established": {"port": 18071}}, timeout=30)
    path = ns.path
    ns.delete()
    assert not os.path.exists(path)
    ns.delete()  # idempotent


def test_default_spec_is_json_and_covers_every_group():
    json.dumps(sockmix_mod.DEFAULT_SPEC)
    assert set(sockmix_mod.GROUP_DEFAULTS) - set(sockmix_mod.DEFAULT_SPEC) == {"bulk"}
