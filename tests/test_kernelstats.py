"""Kernel TCP counters (sockscope.kernelstats): pure parsers on recorded /proc files, the
namespace-bound reader, failure isolation, and counters provoked in a test namespace
compared with what `nstat` reports there."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sockscope.aggregate import Rules
from sockscope.features.kernel import KernelCounters
from sockscope.features.tcp import TcpSockets
from sockscope.kernelstats import (
    COUNTERS,
    KernelStatsReader,
    ParseError,
    build,
    parse_port_range,
    parse_snmp,
    parse_sockstat,
    parse_tcp_mem,
)
from sockscope.netlink import NetlinkError
from sockscope.poller import Poller
from support.daemon import samples, scrape, start_daemon
from support.prereq import require
from support.readers import OneSocketReader


def poller_of(reader, kernel: KernelStatsReader) -> Poller:
    """The TCP table over `reader` and the kernel counters of `kernel`."""
    import socket as _socket

    return Poller([TcpSockets(Rules()), KernelCounters(reader=kernel)], {_socket.IPPROTO_TCP: reader}, 1.0)

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


def recorded_nstat(name: str) -> dict[str, int]:
    """A recorded `nstat -az` output: name -> absolute value."""
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def test_recorded_provoked_counters_equal_the_nstat_recorded_with_them():
    """proc_net_provoked_*: recorded in a namespace after PROVOKE and PROVOKE_MORE (below), with
    `nstat -az` run at the same moment: every counter we export reads what nstat printed."""
    stats, problems = build({
        "snmp": (FIXTURES / "proc_net_provoked_snmp").read_text(),
        "netstat": (FIXTURES / "proc_net_provoked_netstat").read_text(),
    })
    assert not problems, problems
    theirs = recorded_nstat("proc_net_provoked_nstat")
    ours = ours_as_nstat(stats)
    assert ours == {k: theirs[k] for k in ours}
    # Read by hand from the recorded files (what the two scripts provoked):
    assert ours["TcpInCsumErrors"] == 1  # one bad checksum
    assert ours["TcpInErrs"] == 2  # that one and one 16-byte header
    cookies = ("TcpExtSyncookiesSent", "TcpExtSyncookiesRecv", "TcpExtSyncookiesFailed")
    assert [ours[k] for k in cookies] == [1, 1, 1]
    assert ours["TcpExtTCPReqQFullDrop"] == 5  # 8 SYNs, 3 fit the listen(2) SYN queue
    assert ours["TcpExtTCPSynRetrans"] > 0 and ours["TcpExtTCPTimeouts"] > 0
    assert ours["TcpInSegs"] > ours["TcpOutSegs"] > 0
    assert ours["TcpExtTCPBacklogDrop"] == 0  # not provoked: see test_counters_equal_nstat_...


def test_every_counter_reads_its_own_column():
    """Each (section, field) of COUNTERS lands on its own stem: the recorded files with every
    value replaced by a number unique to its column."""
    def renumber(text: str, base: int) -> str:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        for i in range(1, len(lines), 2):
            name, _, values = lines[i].partition(":")
            lines[i] = f"{name}: " + " ".join(str(base + 1000 * i + j) for j in range(len(values.split())))
        return "\n".join(lines) + "\n"

    snmp = renumber((FIXTURES / "proc_net_snmp").read_text(), 1_000_000)
    netstat = renumber((FIXTURES / "proc_net_netstat").read_text(), 2_000_000)
    stats, problems = build({"snmp": snmp, "netstat": netstat})
    assert not problems, problems
    columns = parse_snmp(snmp) | parse_snmp(netstat)
    assert len(set(columns.values())) == len(columns)  # every column distinct
    assert {stem: stats.counters[stem] for _, _, stem in COUNTERS} == {
        stem: columns[(section, name)] for section, name, stem in COUNTERS}
    assert len({stem for _, _, stem in COUNTERS}) == len(COUNTERS)


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
    assert parse_tcp_mem("383430\t511241\t766860\n") == (383430, 511241, 766860)
    for bad in ("383430\t511241\n", "1 2 x\n", ""):
        with pytest.raises(ParseError):
            parse_tcp_mem(bad)


def test_build_isolates_each_source():
    stats, problems = build({
        "snmp": (FIXTURES / "proc_net_snmp").read_text(),
        "netstat": "garbage",
        "sockstat": "TCP: inuse 1 orphan 2 tw 3 alloc 4 mem 5\n",
        "tcp_max_tw_buckets": OSError(13, "Permission denied"),
        "tcp_max_orphans": None,  # absent: not listed at all
        "ip_local_port_range": "10000 60999\n",
        "tcp_mem": "1000\t2000\t3000\n",
    }, page_size=16384)
    assert stats.ok == {"snmp": True, "netstat": False, "sockstat": True,
                        "tcp_max_tw_buckets": False, "ip_local_port_range": True, "tcp_mem": True}
    assert set(problems) == {"netstat", "tcp_max_tw_buckets"}
    assert "net/netstat" in problems["netstat"]
    assert stats.counters["out_resets"] == 64
    assert "listen_overflows" not in stats.counters  # from the broken netstat
    assert stats.sockstat.mem * stats.page_size == 5 * 16384
    assert stats.local_port_range_size == 51000
    assert stats.tcp_mem == (1000, 2000, 3000)  # pages; the exposition multiplies
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
    return root  # no tcp_max_orphans, no tcp_mem: as in a child namespace


def test_a_broken_source_does_not_fail_the_socket_poll_and_is_logged_once(tmp_path, caplog):
    proc = fake_proc(tmp_path, snmp="Tcp: A B\nTcp: 1\n")
    caplog.set_level(logging.INFO, logger="sockscope")
    kernel = KernelStatsReader(proc=str(proc))
    poller = poller_of(OneSocketReader(), kernel)
    for _ in range(3):
        status = poller.poll()
    assert status.errors == 0 and status.snapshot is not None
    k = status.kernel
    assert k.ok["snmp"] is False and k.ok["netstat"] is True
    assert "tcp_max_orphans" not in k.ok and "tcp_mem" not in k.ok  # absent is not a failure
    assert k.max_tw_buckets == 4096 and k.local_port_range_size == 64512
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "snmp" in warnings[0], warnings
    # Recovery is noticed on the next poll (files are re-read with pread every poll).
    (proc / "net/snmp").write_text((FIXTURES / "proc_net_snmp").read_text())
    assert poller.poll().kernel.ok["snmp"] is True
    assert any("readable again" in r.getMessage() for r in caplog.records)
    kernel.close()


def test_exposition_of_a_broken_source(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from sockscope.prometheus import StatusCollector

    kernel = KernelStatsReader(proc=str(fake_proc(tmp_path, snmp="broken\n")))
    poller = poller_of(OneSocketReader(), kernel)
    poller.poll()
    registry = CollectorRegistry()
    registry.register(StatusCollector(poller.status, 10.0))
    text = generate_latest(registry).decode()
    assert 'sockscope_kernel_stats_up{source="snmp"} 0.0' in text
    assert 'sockscope_kernel_stats_up{source="netstat"} 1.0' in text
    assert "sockscope_tcp_out_resets_total" not in text  # absent, not a false 0
    assert "sockscope_tcp_listen_overflows_total 0.0" in text
    assert "sockscope_up 1.0" in text
    kernel.close()


def exposition(status) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from sockscope.prometheus import StatusCollector

    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: status, 10.0))
    return generate_latest(registry).decode()


def family_names(status) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {fam.name for fam in text_string_to_metric_families(exposition(status))}


def test_tcp_mem_limits_are_exported_in_bytes_per_level(tmp_path):
    proc = fake_proc(tmp_path)
    (proc / "sys/net/ipv4/tcp_mem").write_text("1000\t2000\t3000\n")  # as in the initial namespace
    kernel = KernelStatsReader(proc=str(proc), page_size=16384)
    status = poller_of(OneSocketReader(), kernel).poll()
    kernel.close()
    s = samples(exposition(status))
    assert s[("sockscope_kernel_stats_up", (("source", "tcp_mem"),))] == 1.0
    assert {labels: v for (name, labels), v in s.items() if name == "sockscope_tcp_memory_bytes_limit"} == {
        (("level", "min"),): 1000 * 16384.0,
        (("level", "pressure"),): 2000 * 16384.0,
        (("level", "max"),): 3000 * 16384.0,
    }


class FailingReader:
    def poll(self, start, states=None):
        raise NetlinkError("netlink dump AF_INET failed: EPERM")

    def close(self):
        pass


def metrics_md_section(heading: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def test_before_the_first_successful_poll_exactly_what_metrics_md_lists(tmp_path):
    """docs/metrics.md, "Before the first successful poll", against a real daemon whose polls
    all fail (its namespace does not exist, so neither the dump nor the kernel sources can be
    read). Families that never depend on polls are documented in their own sections."""
    doc = metrics_md_section("Before the first successful poll").split("\n\n")[0]
    listed = {re.sub(r"_total$", "", n) for n in re.findall(r"`(sockscope_\w+)", doc)}

    absent = f"/run/netns/sockscope-test-absent-{os.getpid()}"
    assert not os.path.exists(absent)
    daemon = start_daemon(tmp_path, "poll:\n  interval: 200ms\n", netns=absent, wait_up=False)
    try:
        text, deadline = "", time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                text = daemon.scrape(timeout=2)
            except OSError:
                text = ""
            if samples(text).get(("sockscope_poll_errors_total", ()), 0) >= 2:
                break
            time.sleep(0.1)
        s = samples(text)
        assert s[("sockscope_poll_errors_total", ())] == s[("sockscope_polls_total", ())] >= 2, daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
    from prometheus_client.parser import text_string_to_metric_families

    # process_*, python_* (process and runtime), sockscope_graphite_* and the /metrics
    # server's sockscope_http_* do not depend on polls.
    exported = {fam.name for fam in text_string_to_metric_families(text)
                if not fam.name.startswith(("process_", "python_", "sockscope_graphite_", "sockscope_http_"))}
    assert exported == listed, "docs/metrics.md's list is not what is exported"
    assert s[("sockscope_up", ())] == 0.0
    assert {v for (name, _), v in s.items() if name == "sockscope_kernel_stats_up"} == {0.0}


def test_a_failed_poll_still_exports_the_kernel_series_it_read(tmp_path):
    """The kernel counters are read even when the socket dump fails; whatever a failed poll
    adds is in the kernel section of docs/metrics.md."""
    kernel = KernelStatsReader(proc=str(fake_proc(tmp_path)))
    poller = poller_of(FailingReader(), kernel)
    before = family_names(poller.status())  # no poll yet
    failed = poller.poll()
    kernel.close()
    assert failed.snapshot is None and failed.errors == 1
    after = family_names(failed)
    assert "sockscope_tcp_sockets" not in after  # no socket series without a good poll
    assert after - before >= {"sockscope_kernel_stats_up", "sockscope_tcp_listen_overflows",
                               "sockscope_tcp_in_segments"}
    documented = metrics_md_section("## Kernel TCP counters") + metrics_md_section("## Health of the exporter")
    assert [n for n in after - before if f"`{n}" not in documented] == []


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


PROVOKE_MORE = r"""
import socket, struct, subprocess, time
SYN, ACK = 0x02, 0x10
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL


def checksum(data):
    data += bytes(len(data) % 2)
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def send(src, sport, dport, flags, seq=1000, ack=0, doff=5, bad_checksum=False):
    # A hand-made TCP segment to 127.0.0.1; the kernel fills in the IP checksum and id.
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton("127.0.0.1") + struct.pack("!BBH", 0, 6, len(tcp))
    csum = checksum(pseudo + tcp) ^ (0x5A5A if bad_checksum else 0)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton("127.0.0.1"))
    raw.sendto(ip + tcp, ("127.0.0.1", 0))


def sysctl(name, value):
    with open("/proc/sys/net/ipv4/" + name, "w") as f:
        f.write(value)


# A bad checksum (TcpInCsumErrors and TcpInErrs) and a 16-byte header (TcpInErrs).
send("127.0.0.1", 40000, 18502, SYN, bad_checksum=True)
send("127.0.0.1", 40001, 18502, SYN, doff=4)
# tcp_syncookies=2 answers every SYN with a cookie: one connect is TcpExtSyncookiesSent and
# TcpExtSyncookiesRecv; an ACK with a made-up cookie to that listener TcpExtSyncookiesFailed.
sysctl("tcp_syncookies", "2")
ln = socket.socket(); ln.bind(("127.0.0.1", 18502)); ln.listen(8)
c = socket.create_connection(("127.0.0.1", 18502), timeout=2)
a, _ = ln.accept(); a.close(); c.close()
send("127.0.0.1", 40002, 18502, ACK, seq=12345, ack=67890)
time.sleep(0.2)
ln.close()
# SYNs from 10.255.0.1, routed into lo: their SYN-ACKs are discarded (not a local address),
# so 3 requests stay half-open and fill the SYN queue of listen(2); with tcp_syncookies=0
# the other 5 SYNs are TcpExtTCPReqQFullDrop. After 1 s each SYN-ACK is retransmitted
# (TcpExtTCPTimeouts, TcpExtTCPSynRetrans). Once their listener is closed, the requests are
# dropped at their next timer without counting anything.
subprocess.run(["ip", "route", "replace", "10.255.0.0/24", "dev", "lo"], check=True)
sysctl("tcp_syncookies", "0")
ln = socket.socket(); ln.bind(("127.0.0.1", 18503)); ln.listen(2)
for sport in range(41000, 41008):
    send("10.255.0.1", sport, 18503, SYN)
time.sleep(1.5)
ln.close()
sysctl("tcp_syncookies", "1")
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
        # The namespace's own sysctls (set by tests/support/netns.py), not the host's.
        assert first.max_tw_buckets == int(ns.sysctls["net.ipv4.tcp_max_tw_buckets"])
        low, high = map(int, ns.sysctls["net.ipv4.ip_local_port_range"].split())
        assert first.local_port_range_size == high - low + 1
        host_orphans = int(Path("/proc/sys/net/ipv4/tcp_max_orphans").read_text())
        assert first.max_orphans == host_orphans  # host-wide, read where it exists
        assert first.counters["active_opens"] == 0  # a fresh namespace, not the host

        ns.python(["-c", PROVOKE], check=True, timeout=30)
        ns.python(["-c", PROVOKE_MORE], check=True, timeout=30)
        ours, theirs = stable_counters(reader, ns)
        assert ours == theirs
        assert ours["TcpExtListenOverflows"] > 0
        assert ours["TcpExtListenDrops"] >= ours["TcpExtListenOverflows"] + ours["TcpExtTCPReqQFullDrop"]
        assert ours["TcpOutRsts"] >= 3
        assert ours["TcpAttemptFails"] >= 3
        assert ours["TcpActiveOpens"] >= 15
        assert ours["TcpInSegs"] > 0 and ours["TcpOutSegs"] > 0
        assert ours["TcpInCsumErrors"] == 1 and ours["TcpInErrs"] == 2
        assert ours["TcpExtSyncookiesRecv"] == 1 and ours["TcpExtSyncookiesFailed"] == 1
        assert ours["TcpExtTCPReqQFullDrop"] >= 1
        assert ours["TcpExtTCPSynRetrans"] >= 1 and ours["TcpExtTCPTimeouts"] >= 1
        # TcpExtTCPBacklogDrop is compared (it stays 0): loopback offers no reliable way to
        # hold a socket's lock while its backlog overflows.
    finally:
        reader.close()


def test_tcp_mem_is_host_wide_and_read_where_the_daemon_runs(quiet_ns):
    """net.ipv4.tcp_mem is one host-wide array (sysctl_tcp_mem, initial namespace only):
    a child namespace has no such file, so it is read in the daemon's own namespace."""
    ns = quiet_ns
    assert ns.run(["cat", "/proc/sys/net/ipv4/tcp_mem"]).returncode != 0  # absent in the child
    host = tuple(int(v) for v in Path("/proc/sys/net/ipv4/tcp_mem").read_text().split())
    reader = KernelStatsReader(netns=ns.name)
    try:
        stats = reader.read()
        assert stats.ok["tcp_mem"] is True
        assert stats.tcp_mem == host
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
        ns.python(["-c", PROVOKE_MORE], check=True, timeout=30)
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
        assert ours["TcpInErrs"] > 0 and ours["TcpExtSyncookiesFailed"] > 0 and ours["TcpExtTCPReqQFullDrop"] > 0
        assert s[("sockscope_tcp_time_wait_sockets_limit", ())] == float(ns.sysctls["net.ipv4.tcp_max_tw_buckets"])
        page = os.sysconf("SC_PAGE_SIZE")
        host_mem = Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()  # sysctl net.ipv4.tcp_mem
        limits = [s[("sockscope_tcp_memory_bytes_limit", (("level", level),))] for level in ("min", "pressure", "max")]
        assert limits == [float(int(pages) * page) for pages in host_mem]
        assert all(v == 1.0 for (name, _), v in s.items() if name == "sockscope_kernel_stats_up")
    finally:
        assert daemon.stop() == 0, daemon.log()
