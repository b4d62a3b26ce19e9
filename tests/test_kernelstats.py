"""Kernel TCP counters (sockscope.kernelstats): pure parsers on recorded /proc files, the
namespace-bound reader, failure isolation, and counters provoked in a test namespace
compared with what `nstat` reports there."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require
from daemon_helpers import samples, scrape, start_daemon
from sockscope.aggregate import Rules
from sockscope.kernelstats import (
    COUNTERS,
    KernelStatsReader,
    ParseError,
    build,
    parse_port_range,
    parse_snmp,
    parse_sockstat,
)
from sockscope.poller import Poller
from test_peaks import OneSocketReader

FIXTURES = Path(__file__).parent / "fixtures"


# -- pure parsers (tests/fixtures/proc_net_README.md says how the files were recorded) ----------


def test_parse_snmp_recorded():
    v = parse_snmp((FIXTURES / "proc_net_snmp").read_text())
    assert v[("Tcp", "MaxConn")] == -1  # negative values survive
    assert v[("Tcp", "ActiveOpens")] == 3910
    assert v[("Tcp", "PassiveOpens")] == 3847
    assert v[("Tcp", "OutRsts")] == 64
    assert v[("Tcp", "RetransSegs")] == 1
    assert v[("Udp", "InDatagrams")] >= 0  # other sections are parsed too


def test_parse_netstat_recorded():
    v = parse_snmp((FIXTURES / "proc_net_netstat").read_text())
    assert v[("TcpExt", "ListenOverflows")] == 0
    assert v[("TcpExt", "TCPAbortOnData")] == 9
    assert ("IpExt", "InOctets") in v
    for section, name, _ in COUNTERS:
        if section == "TcpExt":
            assert (section, name) in v, name


def test_parse_sockstat_recorded():
    s = parse_sockstat((FIXTURES / "proc_net_sockstat").read_text())
    assert (s.inuse, s.orphan, s.tw, s.alloc, s.mem) == (1, 0, 70, 1, 0)


@pytest.mark.parametrize("text, message", [
    ("Tcp: A B\n", "odd number of lines"),
    ("Tcp: A B\nTcp: 1\n", "2 fields but 1 values"),
    ("Tcp: A B\nUdp: 1 2\n", "followed by values"),
    ("Tcp: A\nTcp: x\n", "Tcp"),
])
def test_parse_snmp_rejects_garbage(text, message):
    with pytest.raises(ParseError, match=message):
        parse_snmp(text)


def test_parse_sockstat_and_ranges_reject_garbage():
    with pytest.raises(ParseError, match="no TCP"):
        parse_sockstat("UDP: inuse 0 mem 0\n")
    with pytest.raises(ParseError, match="lacks"):
        parse_sockstat("TCP: inuse 1 orphan 0\n")
    assert parse_port_range("32768\t60999\n") == 28232
    with pytest.raises(ParseError):
        parse_port_range("32768\n")


def test_build_isolates_each_source():
    stats, problems = build({
        "snmp": (FIXTURES / "proc_net_snmp").read_text(),
        "netstat": "garbage",
        "sockstat": "TCP: inuse 1 orphan 2 tw 3 alloc 4 mem 5\n",
        "tcp_max_tw_buckets": OSError(13, "Permission denied"),
        "tcp_max_orphans": None,  # absent: not listed at all
        "ip_local_port_range": "10000 60999\n",
    }, page_size=16384)
    assert stats.ok == {"snmp": True, "netstat": False, "sockstat": True,
                        "tcp_max_tw_buckets": False, "ip_local_port_range": True}
    assert set(problems) == {"netstat", "tcp_max_tw_buckets"}
    assert "net/netstat" in problems["netstat"]
    assert stats.counters["out_resets"] == 64
    assert "listen_overflows" not in stats.counters  # from the broken netstat
    assert stats.sockstat.mem * stats.page_size == 5 * 16384
    assert stats.local_port_range_size == 51000
    assert stats.max_tw_buckets is None and stats.max_orphans is None


# -- the reader -----------------------------------------------------------------------------------


def fake_proc(root: Path, snmp: str | None = None) -> Path:
    (root / "net").mkdir(parents=True)
    (root / "sys/net/ipv4").mkdir(parents=True)
    (root / "net/snmp").write_text(snmp if snmp is not None else (FIXTURES / "proc_net_snmp").read_text())
    (root / "net/netstat").write_text((FIXTURES / "proc_net_netstat").read_text())
    (root / "net/sockstat").write_text((FIXTURES / "proc_net_sockstat").read_text())
    (root / "sys/net/ipv4/tcp_max_tw_buckets").write_text("4096\n")
    (root / "sys/net/ipv4/ip_local_port_range").write_text("1024\t65535\n")
    return root  # no tcp_max_orphans: as in a child namespace


def test_a_broken_source_does_not_fail_the_socket_poll_and_is_logged_once(tmp_path, caplog):
    proc = fake_proc(tmp_path, snmp="Tcp: A B\nTcp: 1\n")
    caplog.set_level(logging.INFO, logger="sockscope")
    poller = Poller(OneSocketReader(), Rules(), 1.0, kernel=KernelStatsReader(proc=str(proc)))
    for _ in range(3):
        status = poller.poll()
    assert status.errors == 0 and status.snapshot is not None
    k = status.kernel
    assert k.ok["snmp"] is False and k.ok["netstat"] is True
    assert "tcp_max_orphans" not in k.ok  # absent is not a failure
    assert k.max_tw_buckets == 4096 and k.local_port_range_size == 64512
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "snmp" in warnings[0], warnings
    # Recovery is noticed on the next poll (files are re-read with pread every poll).
    (proc / "net/snmp").write_text((FIXTURES / "proc_net_snmp").read_text())
    assert poller.poll().kernel.ok["snmp"] is True
    assert any("readable again" in r.getMessage() for r in caplog.records)
    poller.kernel.close()


def test_exposition_of_a_broken_source(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from sockscope.prometheus import SnapshotCollector

    poller = Poller(OneSocketReader(), Rules(), 1.0,
                    kernel=KernelStatsReader(proc=str(fake_proc(tmp_path, snmp="broken\n"))))
    poller.poll()
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(poller.status, 10.0))
    text = generate_latest(registry).decode()
    assert 'sockscope_kernel_stats_up{source="snmp"} 0.0' in text
    assert 'sockscope_kernel_stats_up{source="netstat"} 1.0' in text
    assert "sockscope_tcp_out_resets_total" not in text  # absent, not a false 0
    assert "sockscope_tcp_listen_overflows_total 0.0" in text
    assert "sockscope_up 1.0" in text
    poller.kernel.close()


def nstat(ns) -> dict[str, int]:
    """Absolute counters of the namespace (`nstat -az`: absolute, zeros, no history file)."""
    r = ns.run(["nstat", "-az"], check=True, env={**os.environ, "NSTAT_HISTORY": "/dev/null"})
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def ours_as_nstat(stats) -> dict[str, int]:
    return {f"{'TcpExt' if section == 'TcpExt' else 'Tcp'}{name}": stats.counters[stem]
            for section, name, stem in COUNTERS}


PROVOKE = r"""
import socket, time
# A listener with a tiny backlog that never accepts: once backlog+1 handshakes completed,
# further SYNs are dropped (TcpExtListenOverflows, TcpExtListenDrops).
ln = socket.socket(); ln.bind(("127.0.0.1", 18500)); ln.listen(1)
clients = []
for _ in range(12):
    c = socket.socket(); c.setblocking(False)
    c.connect_ex(("127.0.0.1", 18500)); clients.append(c)
time.sleep(1.5)  # one SYN retransmission round
for c in clients:
    c.close()
ln.close()
# Connects to a closed port: the kernel answers RST (TcpOutRsts), the client's attempt
# fails (TcpAttemptFails).
for _ in range(3):
    try:
        socket.create_connection(("127.0.0.1", 18501), timeout=2)
    except ConnectionRefusedError:
        pass
"""


def stable_counters(reader, ns, attempts=20):
    """(ours, nstat) once two reads of ours around one nstat run agree."""
    for _ in range(attempts):
        a = ours_as_nstat(reader.read())
        theirs = nstat(ns)
        b = ours_as_nstat(reader.read())
        if a == b:
            return a, {k: theirs.get(k) for k in a}
        time.sleep(0.3)
    pytest.fail("the namespace's TCP counters kept moving")


@pytest.fixture
def quiet_ns(netns_factory):
    require(shutil.which("nstat") is not None, "needs `nstat` (iproute2)")
    return netns_factory()


def test_counters_equal_nstat_in_the_watched_namespace(quiet_ns):
    ns = quiet_ns
    reader = KernelStatsReader(netns=ns.name)
    try:
        first = reader.read()
        assert all(first.ok.values()), first.ok
        # The namespace's own sysctls (set by tests/netns.py), not the host's.
        assert first.max_tw_buckets == int(ns.sysctls["net.ipv4.tcp_max_tw_buckets"])
        low, high = map(int, ns.sysctls["net.ipv4.ip_local_port_range"].split())
        assert first.local_port_range_size == high - low + 1
        host_orphans = int(Path("/proc/sys/net/ipv4/tcp_max_orphans").read_text())
        assert first.max_orphans == host_orphans  # host-wide, read where it exists
        assert first.counters["active_opens"] == 0  # a fresh namespace, not the host

        ns.python(["-c", PROVOKE], check=True, timeout=30)
        ours, theirs = stable_counters(reader, ns)
        assert ours == theirs
        assert ours["TcpExtListenOverflows"] > 0
        assert ours["TcpExtListenDrops"] >= ours["TcpExtListenOverflows"]
        assert ours["TcpOutRsts"] >= 3
        assert ours["TcpAttemptFails"] >= 3
        assert ours["TcpActiveOpens"] >= 15
    finally:
        reader.close()


def test_replaced_namespace_is_reopened(quiet_ns):
    ns = quiet_ns
    reader = KernelStatsReader(netns=ns.name)
    try:
        ns.python(["-c", PROVOKE], check=True, timeout=30)
        assert reader.read().counters["out_resets"] >= 3
        subprocess.run(["ip", "netns", "del", ns.name], check=True)
        gone = reader.read()
        assert not any(gone.ok.values()) and not gone.counters
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        fresh = reader.read()
        assert fresh.ok["snmp"] and fresh.counters["out_resets"] == 0
    finally:
        reader.close()


def test_daemon_exports_the_namespace_counters(quiet_ns, tmp_path):
    ns = quiet_ns
    daemon = start_daemon(tmp_path, "poll:\n  interval: 500ms\n", netns=ns.name)
    try:
        ns.python(["-c", PROVOKE], check=True, timeout=30)
        for _ in range(20):
            theirs = nstat(ns)
            daemon.wait_polls(2)
            s = samples(scrape(daemon.url))
            again = nstat(ns)
            if theirs == again:
                break
        ours = {f"{'TcpExt' if section == 'TcpExt' else 'Tcp'}{name}":
                s[(f"sockscope_tcp_{stem}_total", ())] for section, name, stem in COUNTERS}
        assert ours == {k: float(theirs.get(k, 0)) for k in ours}
        assert ours["TcpExtListenOverflows"] > 0
        assert s[("sockscope_tcp_time_wait_sockets_limit", ())] == float(ns.sysctls["net.ipv4.tcp_max_tw_buckets"])
        assert all(v == 1.0 for (name, _), v in s.items() if name == "sockscope_kernel_stats_up")
    finally:
        assert daemon.stop() == 0, daemon.log()
