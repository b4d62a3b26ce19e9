"""UDP sockets and counters (sockscope.features.udp): the fold and the parsers on
hand-built input, then every figure against `ss -uanm` and `nstat -az` in a test namespace,
in-process and through the real daemon's /metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sockscope import config, features
from sockscope.batch import Batch
from sockscope.catalogue import Samples
from sockscope.features import DumpStats, PollContext
from sockscope.features.udp import (
    COUNTER_METRICS,
    COUNTERS,
    INET_DIAG_SKMEMINFO,
    METRICS,
    UdpCounters,
    UdpSockets,
    counter_samples,
    counts_from,
    parse_snmp6,
    socket_drops,
)
from sockscope.graphite import LineBuilder
from sockscope.kernelstats import ParseError
from sockscope.netlink import NetlinkError
from sockscope.poller import Poller, merge_needs
from sockscope.service import Service, make_reader
from sockscope.snapshot import OTHER, PollStatus
from support.daemon import start_daemon
from support.prereq import require

FIXTURES = Path(__file__).parent / "fixtures"
LO4 = socket.inet_aton("127.0.0.1") + bytes(12)
LO6 = socket.inet_pton(socket.AF_INET6, "::1")
ESTABLISHED, UNCONN = 1, 7  # include/net/tcp_states.h: TCP_ESTABLISHED, TCP_CLOSE


def skmeminfo(drops: int, n: int = 9) -> tuple[int, bytes]:
    """An INET_DIAG_SKMEMINFO attribute of `n` u32 (the kernel sends SK_MEMINFO_VARS = 9);
    drops at index SK_MEMINFO_DROPS (8) when it fits, the others a recognisable filler."""
    values = [1000 + i for i in range(n)]
    if n > 8:
        values[8] = drops
    return INET_DIAG_SKMEMINFO, struct.pack(f"={n}I", *values)


def rec(port: int, *, family: int = socket.AF_INET, state: int = UNCONN, rq: int = 0, wq: int = 0,
        dport: int = 0) -> tuple:
    addr = LO4 if family == socket.AF_INET else LO6
    return (family, state, port, dport, addr, addr if dport else bytes(16), rq, wq, 0, 1)


def fold(feature: UdpSockets, *batches: Batch, families=("ipv4", "ipv6")):
    f = feature.fold(PollContext(0.0, 0.0))
    for b in batches:
        f.add(b)
    return f.finish(DumpStats(families, sum(len(b) for b in batches), 0, 0))


def rows(table) -> dict:
    return {r.port: (r.sockets, r.receive_bytes, r.receive_max_bytes, r.send_bytes, r.drops) for r in table.ports}


# -- the fold, on hand-built batches ----------------------------------------------------------


def test_drops_come_from_skmeminfo_and_a_missing_or_short_attribute_counts_none():
    batch = Batch.from_records(
        [rec(53), rec(53), rec(123), rec(5353), rec(9999)],
        attributes=[[skmeminfo(7)], [(2, b"\0" * 8), skmeminfo(4_000_000_000)], [], [skmeminfo(99, n=8)],
                    [(8, b"\1\0\0\0"), skmeminfo(3)]])
    assert socket_drops(batch).tolist() == [7, 4_000_000_000, 0, 0, 3]


def test_a_garbled_attribute_never_crashes_the_fold():
    good = Batch.from_records([rec(53)], attributes=[[skmeminfo(5)]])
    msg = bytearray(good.data)
    struct.pack_into("=H", msg, 88, 2)  # nla_len 2 (< 4): the walk stops, nothing found
    bad = Batch(bytes(msg), np.array([0]))
    assert socket_drops(bad).tolist() == [0]
    table = fold(UdpSockets(), bad)
    assert rows(table)[53] == (1, 0, 0, 0, 0)


def test_ports_configured_first_then_unconnected_ascending_capped_with_other():
    feature = UdpSockets((5000, 7000), max_local_ports=4)
    batch = Batch.from_records(
        [rec(9000, rq=100), rec(9000, rq=300), rec(53, wq=10), rec(123, family=socket.AF_INET6),
         rec(8000), rec(5000, rq=7), rec(40000, state=ESTABLISHED, dport=53, rq=900),
         rec(41000, state=ESTABLISHED, dport=9000)],
        attributes=[[skmeminfo(2)], [skmeminfo(3)], [skmeminfo(0)], [skmeminfo(1)], [skmeminfo(0)],
                    [skmeminfo(0)], [skmeminfo(6)], [skmeminfo(0)]])
    table = fold(feature, batch)
    # candidates: 5000, 7000 (configured), then 53, 123, 8000, 9000 (unconnected); the
    # connected sockets' local ports 40000/41000 are never candidates.
    assert [r.port for r in table.ports] == [53, 123, 5000, 7000, OTHER]
    assert table.folded == 2
    got = rows(table)
    assert got[7000] == (0, 0, 0, 0, 0)  # configured, no socket: zero-filled
    assert got[5000] == (1, 7, 7, 0, 0)
    assert got[53] == (1, 0, 0, 10, 0)
    assert got[123] == (1, 0, 0, 0, 1)
    assert got[OTHER] == (5, 1300, 900, 0, 11)  # 9000 x2, 8000 and the connected 40000, 41000
    assert table.sockets == {"ipv4": 7, "ipv6": 1}
    assert sum(r.sockets for r in table.ports) == sum(table.sockets.values())


def test_auto_bound_off_tracks_only_configured_ports():
    table = fold(UdpSockets((53,), auto_bound=False), Batch.from_records([rec(53), rec(123), rec(123)]))
    assert rows(table) == {53: (1, 0, 0, 0, 0), OTHER: (2, 0, 0, 0, 0)}
    assert table.folded == 0


def test_each_dump_starts_from_zero_although_the_arrays_are_reused():
    """PortSums keeps its arrays across polls and zeroes only the ports a dump touched: a
    second dump (or a retried attempt) must not see the first one's figures."""
    feature = UdpSockets()
    first = fold(feature, Batch.from_records([rec(53, rq=500), rec(54)], attributes=[[skmeminfo(9)], []]))
    assert rows(first)[53] == (1, 500, 500, 0, 9)
    abandoned = feature.fold(PollContext(0.0, 0.0))  # an interrupted attempt, thrown away
    abandoned.add(Batch.from_records([rec(99, rq=1)]))
    second = fold(feature, Batch.from_records([rec(53)]))
    assert rows(second) == {53: (1, 0, 0, 0, 0), OTHER: (0, 0, 0, 0, 0)}
    assert np.flatnonzero(feature.sums.touched).tolist() == [53]


def test_families_read_are_zero_filled_and_only_those():
    table = fold(UdpSockets(), Batch.from_records([]), families=("ipv4",))
    assert table.sockets == {"ipv4": 0}


def test_samples_stay_within_max_series():
    feature = UdpSockets((), max_local_ports=3)
    table = fold(feature, Batch.from_records([rec(p) for p in range(100, 120)]))
    out = Samples()
    feature.samples(table, out)
    assert sum(len(r) for _, r in out) == feature.max_series()
    assert [m.name for m, _ in out] == [m.name for m in METRICS]


def test_the_dump_need_is_udp_with_skmeminfo():
    need = UdpSockets().needs()
    assert (need.protocol, need.states, need.ext, need.attributes) == (socket.IPPROTO_UDP, 0xFFF, 1 << 6, (7,))
    merged = merge_needs(features.build(config.DEFAULTS))
    assert set(merged) == {socket.IPPROTO_TCP, socket.IPPROTO_UDP}
    assert merged[socket.IPPROTO_TCP].ext == 0  # TCP's request is unchanged by UDP's


# -- configuration, registry, failure ---------------------------------------------------------


def test_udp_config_defaults_and_rules():
    assert config.DEFAULTS.udp == config.UdpConfig(enabled=True, auto_bound=True, local_ports=(), max_local_ports=64)
    with pytest.raises(config.ConfigError) as e:
        config.from_mapping({"udp": {"local_ports": [53, 53, 123], "max_local_ports": 1, "enable": False}})
    text = str(e.value)
    assert "udp.enable: unknown key (did you mean 'enabled'?)" in text
    assert "udp.local_ports[1]" in text
    off = features.build(config.from_mapping({"udp": {"enabled": False}}))
    assert "udp" not in {f.name for f in off} and "udp_counters" not in {f.name for f in off}
    assert features.changed_features({"udp.local_ports"}) == {"udp"}
    assert features.changed_features({"udp.enabled"}) == {"udp", "udp_counters"}


class FakeReader:
    """A reader of one protocol: yields `batch` or raises `error`."""

    def __init__(self, batch: Batch | None = None, error: Exception | None = None) -> None:
        self.batch, self.error = batch, error

    def poll(self, start, states=None):
        sink = start()
        if self.error is not None:
            raise self.error
        sink(self.batch)
        return DumpStats(("ipv4",), len(self.batch), 0, 0)

    def close(self):
        pass


def test_a_failed_udp_dump_leaves_udp_out_and_the_poll_good():
    cfg = config.from_mapping({"poll": {"kernel_stats": False, "families": ["ipv4"]}, "prometheus": {"enabled": False}})
    feats = [f for f in features.build(cfg) if f.name != "udp_counters"]
    tcp = FakeReader(Batch.from_records([(socket.AF_INET, 10, 80, 0, LO4, bytes(16), 0, 128, 0, 1)]))
    udp_batch = Batch.from_records([rec(53)], attributes=[[skmeminfo(4)]])
    udp = FakeReader(udp_batch)
    poller = Poller(feats, {socket.IPPROTO_TCP: tcp, socket.IPPROTO_UDP: udp}, 1.0)
    good = poller.poll()
    assert good.samples.value("sockscope_udp_local_port_drops", "53") == 4
    udp.error = NetlinkError("netlink dump udp ipv4 failed: Operation not permitted")
    bad = poller.poll()
    assert bad.errors == 0 and bad.last_error is None  # TCP is the primary source
    assert bad.sources["udp"].up is False and bad.sources["tcp"].up
    assert bad.source_errors["udp"] == 1
    assert not any(name.startswith("sockscope_udp_") for name in bad.samples.series)
    assert bad.samples.value("sockscope_tcp_sockets", "ipv4", "listen") == 1
    udp.error = None
    assert poller.poll().samples.value("sockscope_udp_sockets", "ipv4") == 1


def test_reload_turning_udp_off_drops_its_reader():
    made = []

    def factory(cfg, need):
        made.append(need.protocol)
        return FakeReader(Batch.from_records([]))

    base = {"poll": {"kernel_stats": False}, "prometheus": {"enabled": False}}
    service = Service(config.from_mapping(base), reader_factory=factory)
    try:
        assert set(service.poller.readers) == {socket.IPPROTO_TCP, socket.IPPROTO_UDP}
        service.reload(config.from_mapping({**base, "udp": {"enabled": False}}))
        status = service.poller.poll()
        assert set(service.poller.readers) == {socket.IPPROTO_TCP}
        assert "udp" not in status.sources and "sockscope_udp_sockets" not in status.samples.series
    finally:
        service.stop()


# -- counters: parsers on recorded files ------------------------------------------------------


def nstat_text(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def ours_as_nstat(values) -> dict[str, int]:
    return {f"Udp{'6' if family == 'ipv6' else ''}{name}": values[(family, stem)]
            for family in ("ipv4", "ipv6") for name, stem, _ in COUNTERS}


def test_recorded_counters_equal_nstat():
    """tests/fixtures/proc_net_udp_* were recorded after HOLD_SOCKETS (fixtures README)."""
    counts = counts_from({"snmp": (FIXTURES / "proc_net_udp_snmp").read_text(),
                          "snmp6": (FIXTURES / "proc_net_udp_snmp6").read_text()}, ("ipv4", "ipv6"))
    nstat = nstat_text((FIXTURES / "proc_net_udp_nstat").read_text())
    ours = ours_as_nstat(counts.values)
    assert ours == {k: nstat[k] for k in ours}
    assert ours["UdpRcvbufErrors"] > 0 and ours["UdpNoPorts"] > 0 and ours["Udp6NoPorts"] > 0


def test_counters_absent_file_failed_file_and_missing_field():
    snmp = (FIXTURES / "proc_net_udp_snmp").read_text()
    only4 = counts_from({"snmp": snmp, "snmp6": None}, ("ipv4", "ipv6"))  # IPv6 disabled: no snmp6
    assert {f for f, _ in only4.values} == {"ipv4"}
    assert counts_from({"snmp": snmp}, ("ipv6",)).values == {}
    with pytest.raises(OSError, match="/proc/net/snmp6: Permission denied"):
        counts_from({"snmp": snmp, "snmp6": PermissionError(13, "Permission denied")}, ("ipv4", "ipv6"))
    with pytest.raises(ParseError, match="/proc/net/snmp6: no Udp6RcvbufErrors"):
        counts_from({"snmp6": "Udp6InDatagrams 1\nUdp6NoPorts 2\nUdp6InErrors 0\n"}, ("ipv6",))
    with pytest.raises(ParseError, match="not an integer"):
        parse_snmp6("Udp6InDatagrams x\n")
    assert parse_snmp6("Ip6InReceives 5\n\nUdp6NoPorts\t7\n") == {"Ip6InReceives": 5, "Udp6NoPorts": 7}


def test_counters_read_through_procfiles_of_a_fake_proc(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "snmp").write_text((FIXTURES / "proc_net_udp_snmp").read_text())
    feature = UdpCounters(families=("ipv4", "ipv6"), proc=str(tmp_path))
    try:
        counts = feature.read(PollContext(0.0, 0.0))  # no net/snmp6: ipv6 left out, not an error
        out = Samples()
        feature.samples(counts, out)
        assert [m.name for m, _ in out] == [m.name for m in COUNTER_METRICS.values()]
        assert all(labels == ("ipv4",) for _, r in out for labels, _ in r)
        (tmp_path / "net" / "snmp").write_text("Udp: InDatagrams\nUdp: 1\n")
        with pytest.raises(ParseError, match="no Udp NoPorts"):
            feature.read(PollContext(0.0, 0.0))
    finally:
        feature.close()


# -- Graphite paths ---------------------------------------------------------------------------


def udp_status() -> PollStatus:
    table = fold(UdpSockets((5353,)), Batch.from_records([rec(5353, rq=2048)], attributes=[[skmeminfo(12)]]))
    counts = counts_from({"snmp": (FIXTURES / "proc_net_udp_snmp").read_text()}, ("ipv4",))
    out = Samples()
    UdpSockets().samples(table, out)
    counter_samples(counts, out)
    return PollStatus(samples=out)


@pytest.mark.parametrize("naming, tags, expected", [
    ("sockscope", False, {"sockscope.h.udp.local_port.5353.drops 12",
                          "sockscope.h.udp.local_port.other.sockets 0",
                          "sockscope.h.udp.sockets.ipv4 1",
                          "sockscope.h.udp.kernel.ipv4.receive_buffer_errors 297",
                          "sockscope.h.udp.folded_ports 0"}),
    ("sockscope", True, {"sockscope.udp.local_port_drops;port=5353;host=h 12",
                         "sockscope.udp.in_errors;family=ipv4;host=h 297"}),
    # collectd's tcpconns has no UDP: the sockscope paths under <host>.sockscope.
    ("collectd", False, {"h.sockscope.udp.local_port.5353.receive_queue_bytes 2048",
                         "h.sockscope.udp.kernel.ipv4.no_ports 1"}),
])
def test_graphite_paths_in_each_naming(naming, tags, expected):
    b = LineBuilder(naming=naming, tags=tags, host="h", hostname=lambda: "h", fqdn=lambda: "h")
    lines = {f"{path} {value:g}" for path, value in b.series(udp_status())}
    assert expected <= lines, sorted(line for line in lines if "udp" in line)


# -- the real kernel: ss -uanm and nstat -az in a test namespace -------------------------------

# Holds UDP sockets inside the namespace until its stdin closes. Ports 186xx are reserved
# from the ephemeral range there (tests/support/netns.py).
HOLD_SOCKETS = r"""
import socket, sys, time
S, D, I4, I6 = socket.SOCK_DGRAM, None, socket.AF_INET, socket.AF_INET6
held = []
def udp(family, addr, port, rcvbuf=0, reuse=False):
    s = socket.socket(family, S)
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((addr, port))
    held.append(s)
    return s
def client(family, addr, port):
    s = socket.socket(family, S)
    s.connect((addr, port))
    held.append(s)
    return s
small = udp(I4, "127.0.0.1", 18601, rcvbuf=2048)   # overflows: drops, RcvbufErrors
queued = udp(I4, "127.0.0.1", 18602)               # unread datagrams: Recv-Q
group = [udp(I4, "0.0.0.0", 18603, reuse=True) for _ in range(3)]  # SO_REUSEPORT
v6 = udp(I6, "::1", 18604)
dual = udp(I6, "::", 18605)                         # dual-stack
extra = [udp(I4, "127.0.0.1", p) for p in (18606, 18607, 18608)] + [udp(I6, "::1", 18609)]
flood = client(I4, "127.0.0.1", 18601)
for _ in range(300):
    flood.send(b"f" * 200)
c = client(I4, "127.0.0.1", 18602)
for _ in range(5):
    c.send(b"q" * 1000)
c6 = client(I6, "::1", 18604)
for _ in range(3):
    c6.send(b"6" * 10)
v6.recv(100); v6.recv(100)                          # Udp6InDatagrams 2, one left queued
client(I4, "127.0.0.1", 18605).send(b"4")           # IPv4 to a dual-stack socket: Udp, not Udp6
dual.recv(10)
client(I4, "127.0.0.1", 18699).send(b"x")           # no socket there: UdpNoPorts
client(I6, "::1", 18699).send(b"x")                 # Udp6NoPorts
time.sleep(0.3)
print("ready", flush=True)
sys.stdin.read()
"""
HELD_PORTS = (18601, 18602, 18603, 18604, 18605, 18606, 18607, 18608, 18609)


def ss_udp(ns) -> list[dict]:
    """Every UDP socket of `ns` as `ss -uanmH` prints it: family, state, Recv-Q, Send-Q,
    local port and skmem's d<N>."""
    out = []
    for family, flag in (("ipv4", "-4"), ("ipv6", "-6")):
        text = ns.run(["ss", "-uanmH", flag], check=True).stdout
        for line in text.splitlines():
            if not line.strip():
                continue
            if "skmem:(" in line:
                out[-1]["drops"] = int(re.search(r"[(,]d(\d+)\)", line)[1])
                continue
            state, rq, wq, local = line.split()[:4]
            out.append({"family": family, "state": state, "rq": int(rq), "wq": int(wq),
                        "port": int(local.rsplit(":", 1)[1]), "drops": None})
    assert all(s["drops"] is not None for s in out), out
    return out


def ss_expected(socks: list[dict], configured: tuple[int, ...], cap: int) -> tuple[dict, dict, int]:
    """What sockscope must report by the documented rule, computed from `ss` alone:
    ({family: sockets}, {port: (sockets, rq sum, rq max, wq sum, drops)}, folded)."""
    families = {"ipv4": 0, "ipv6": 0}
    for s in socks:
        families[s["family"]] += 1
    unconn = sorted({s["port"] for s in socks if s["state"] == "UNCONN"} - set(configured))
    candidates = [*configured, *unconn]
    tracked = sorted(candidates[:cap])
    ports = {}
    for key in (*tracked, OTHER):
        mine = [s for s in socks if (s["port"] == key) or (key == OTHER and s["port"] not in tracked)]
        ports[key] = (len(mine), sum(s["rq"] for s in mine), max((s["rq"] for s in mine), default=0),
                      sum(s["wq"] for s in mine), sum(s["drops"] for s in mine))
    return families, ports, max(0, len(candidates) - cap)


def nstat(ns) -> dict[str, int]:
    r = ns.run(["nstat", "-az"], check=True, env={**os.environ, "NSTAT_HISTORY": "/dev/null"})
    return nstat_text(r.stdout)


@pytest.fixture(scope="module")
def udp_ns(netns):
    require(shutil.which("nstat") is not None, "needs `nstat` (iproute2)")
    proc = netns.popen([sys.executable, "-c", HOLD_SOCKETS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"socket holder failed (rc {proc.poll()})"
    first = ss_udp(netns)
    assert ss_udp(netns) == first  # the table is at rest
    yield netns
    proc.stdin.close()
    proc.wait(timeout=10)


def poll_in(ns, cfg_map: dict) -> PollStatus:
    cfg = config.from_mapping({**cfg_map, "poll": {"netns": ns.name}})
    feats = features.build(cfg)
    readers = {p: make_reader(cfg, need) for p, need in merge_needs(feats).items()}
    poller = Poller(feats, readers, 1.0)
    try:
        status = poller.poll()
    finally:
        for r in readers.values():
            r.close()
        for f in feats:
            f.close()
    assert status.last_error is None and status.sources["udp"].up and status.sources["udp_counters"].up
    return status


UDP_CFG = {"udp": {"local_ports": [18609, 18650], "max_local_ports": 6}}


def test_udp_figures_equal_ss_in_the_namespace(udp_ns):
    socks = ss_udp(udp_ns)
    assert len(socks) == 11 + 6 and {s["state"] for s in socks} == {"UNCONN", "ESTAB"}
    status = poll_in(udp_ns, UDP_CFG)
    table = status.results["udp"]
    families, ports, folded = ss_expected(socks, (18609, 18650), 6)
    assert dict(table.sockets) == families
    assert rows(table) == ports
    assert table.folded == folded == 4  # 2 configured + 8 more unconnected ports, 6 tracked
    assert [r.port for r in table.ports] == [18601, 18602, 18603, 18604, 18609, 18650, OTHER]
    # The socket that overflowed: drops equal ss's d<N> and the kernel's RcvbufErrors.
    small = next(s for s in socks if s["port"] == 18601)
    assert small["drops"] > 100
    assert rows(table)[18601][4] == small["drops"] == nstat(udp_ns)["UdpRcvbufErrors"]
    assert rows(table)[18602][1] > 5000 and rows(table)[18603][0] == 3
    # Prometheus samples of the same table.
    assert status.samples.value("sockscope_udp_local_port_drops", "18601") == small["drops"]
    assert status.samples.value("sockscope_udp_local_port_sockets", "18650") == 0


def test_udp_counters_equal_nstat_in_the_namespace(udp_ns):
    status = poll_in(udp_ns, {})
    ours = ours_as_nstat(status.results["udp_counters"].values)
    theirs = nstat(udp_ns)
    assert ours == {k: theirs[k] for k in ours}
    assert ours["UdpRcvbufErrors"] > 100 and ours["UdpInErrors"] >= ours["UdpRcvbufErrors"]
    assert ours["Udp6InDatagrams"] == 2 and ours["UdpInDatagrams"] == 1  # the dual-stack read counts as IPv4
    assert ours["UdpNoPorts"] == 1 and ours["Udp6NoPorts"] == 1


def test_the_daemon_exports_udp_equal_to_ss_and_nstat(udp_ns, tmp_path):
    daemon = start_daemon(tmp_path, "poll:\n  interval: 200ms\nudp:\n  local_ports: [18650]\n"
                                    "  max_local_ports: 4\n", netns=udp_ns.name)
    try:
        got = daemon.wait_polls(2)
        socks = ss_udp(udp_ns)
        families, ports, folded = ss_expected(socks, (18650,), 4)
        theirs = nstat(udp_ns)
    finally:
        assert daemon.stop() == 0, daemon.log()
    for family, n in families.items():
        assert got[("sockscope_udp_sockets", (("family", family),))] == n
    names = ("sockets", "receive_queue_bytes", "receive_queue_max_bytes", "send_queue_bytes", "drops")
    exported = {}
    for (name, labels), value in got.items():
        for i, what in enumerate(names):
            if name == f"sockscope_udp_local_port_{what}":
                port = dict(labels)["port"]
                exported.setdefault(OTHER if port == OTHER else int(port), [0] * 5)[i] = int(value)
    assert {p: tuple(v) for p, v in exported.items()} == ports
    assert got[("sockscope_udp_folded_ports", ())] == folded == 6  # 1 configured + 9 unconnected, 4 tracked
    for name, stem, _ in COUNTERS:
        assert got[(f"sockscope_udp_{stem}_total", (("family", "ipv4"),))] == theirs[f"Udp{name}"]
        assert got[(f"sockscope_udp_{stem}_total", (("family", "ipv6"),))] == theirs[f"Udp6{name}"]
    for source in ("udp", "udp_counters"):
        assert got[("sockscope_source_up", (("source", source),))] == 1


# -- bench/udp.py cannot rot ------------------------------------------------------------------


def test_udp_bench_smoke(tmp_path, root):
    """bench/udp.py end to end on a small table: both daemons, one round, the in-process
    dump; the bench itself fails when sockscope's UDP counts differ from `ss -uan`."""
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, "-m", "bench.udp", "--tcp", "2000", "--udp", "400", "--rounds", "1", "--window", "2",
         "--interval", "0.5", "--reps", "2", "--out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": f"{repo / 'daemon'}:{repo}"},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads((out / "udp-latest.json").read_text())
    assert result["udp_held"] == 400 and sum(result["udp_counts_equal_ss"].values()) == 400
    (on,), (off,) = result["rounds"]["on"], result["rounds"]["off"]
    assert on["udp_sockets"] == 400 and off["udp_sockets"] == 0
    assert on["cpu"] > 0 and off["cpu"] > 0 and on["polls_seen"] >= 1
    assert result["in_process"]["messages"] == 400
    assert "median of the per-round differences" in (out / "udp-latest.md").read_text()
