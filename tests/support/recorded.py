"""Fixed kernel-counter and UDP results for the exposition and Graphite goldens
(test_prometheus, test_graphite), parsed from the recorded tests/fixtures files."""

from __future__ import annotations

from pathlib import Path

from sockscope.features.udp import UdpCounts, UdpPort, UdpTable, counts_from
from sockscope.features.units import UnitRow, UnitsResult
from sockscope.kernelstats import KernelStats
from sockscope.kernelstats import build as build_kernel_stats
from sockscope.snapshot import OTHER

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixed_kernel() -> KernelStats:
    """Parsed from the recorded tests/fixtures/proc_net_* files (proc_net_README.md says how
    they were recorded), limits as on Debian 12."""
    stats, problems = build_kernel_stats({
        "snmp": (FIXTURES / "proc_net_snmp").read_text(),
        "netstat": (FIXTURES / "proc_net_netstat").read_text(),
        "sockstat": (FIXTURES / "proc_net_sockstat").read_text(),
        "tcp_max_tw_buckets": "262144\n",
        "tcp_max_orphans": "131072\n",
        "ip_local_port_range": "32768\t60999\n",
        "tcp_mem": "383430\t511241\t766860\n",
    }, page_size=4096)
    assert not problems, problems
    return stats


def fixed_udp() -> UdpTable:
    """Tracked UDP ports 53 (a full socket that dropped datagrams) and 123, + other."""
    return UdpTable(
        sockets={"ipv4": 5, "ipv6": 2},
        ports=(UdpPort(53, sockets=2, receive_bytes=4352, receive_max_bytes=3840, drops=297),
               UdpPort(123, sockets=1),
               UdpPort(OTHER, sockets=4, receive_bytes=768, receive_max_bytes=768, send_bytes=1024, drops=3)),
        folded=1, messages=7)


def fixed_udp_counts() -> UdpCounts:
    """Parsed from the recorded tests/fixtures/proc_net_udp_snmp{,6}."""
    return counts_from({"snmp": (FIXTURES / "proc_net_udp_snmp").read_text(),
                        "snmp6": (FIXTURES / "proc_net_udp_snmp6").read_text()}, ("ipv4", "ipv6"))


def fixed_units() -> UnitsResult:
    """Units of a host like fixed_snapshot()'s, counts per STATES (established, syn_sent,
    syn_recv, fin_wait1, fin_wait2, time_wait, close, close_wait, last_ack, listen, closing):
    nginx.service leaking CLOSE-WAIT, a container, sshd, TIME-WAIT under none, one unit folded."""
    return UnitsResult(
        units=(UnitRow("docker/4f1c0a9e2b7d", (3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0), 0, 0),
               UnitRow("nginx.service", (45, 0, 0, 0, 1, 0, 0, 9, 0, 4, 0), 131589, 2896),
               UnitRow("ssh.service", (2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0), 0, 36),
               UnitRow("none", (0, 0, 1, 0, 0, 13, 0, 0, 0, 0, 0), 0, 0),
               UnitRow("other", (4, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0), 8192, 0)),
        listeners=(("0.0.0.0", 22, "ssh.service"), ("127.0.0.1", 631, "cups.service"), ("::", 8080, "nginx.service")),
        folded=1, cgroup_walks=3)
