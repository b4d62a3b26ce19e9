"""The Prometheus collector and HTTP server (sockscope.prometheus)."""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import os
import platform
import shutil
import socket
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import sockscope
from sockscope.aggregate import Rules
from sockscope.catalogue import peak_metric
from sockscope.cgroupmap import CgroupMap
from sockscope.features import PollContext
from sockscope.features.kernel import KernelCounters
from sockscope.features.peaks import WINDOW, WindowPeaks
from sockscope.features.tcp import TcpSockets
from sockscope.features.udp import (
    UdpCounters,
    UdpCounts,
    UdpSockets,
    UdpTable,
)
from sockscope.features.units import CLOSE_WAIT_AGE as UNIT_CLOSE_WAIT_AGE
from sockscope.features.units import TcpUnits, UnitsResult
from sockscope.httpserver import Request, _dual_stack_available
from sockscope.kernelstats import KernelStats
from sockscope.poller import samples_of
from sockscope.prometheus import MetricsApp, StatusCollector, make_registry, metrics_server
from sockscope.snapshot import (
    OTHER,
    STATES,
    Listener,
    PollStatus,
    PortTable,
    QueueStats,
    Snapshot,
    SourceHealth,
)
from support.prereq import require
from support.recorded import fixed_kernel, fixed_udp, fixed_udp_counts, fixed_units

UNITS = [m for m in TcpUnits.metrics if m is not UNIT_CLOSE_WAIT_AGE]  # that one needs tcp_info
ALL_METRICS = [*TcpSockets.metrics, *UNITS, WINDOW, *(peak_metric(m) for m in (*TcpSockets.metrics, *UNITS) if m.peak),
               *KernelCounters.metrics, *UdpSockets.metrics, *UdpCounters.metrics]

GOLDEN = Path(__file__).parent / "golden" / "metrics.prom"
STALE_AFTER = 30.0
LAST_SUCCESS = 1000.0
TIMEOUT = 10.0  # seconds, for every network operation


def counts(**by_state: int) -> tuple[int, ...]:
    unknown = set(by_state) - set(STATES)
    assert not unknown, unknown
    return tuple(by_state.get(s, 0) for s in STATES)


def fixed_snapshot() -> Snapshot:
    """2 tracked local ports + other, 1 remote + other, 2 families, a 3-member listener.

    Per-state totals (both families): established 7, syn_recv 1, fin_wait2 1,
    time_wait 3, close_wait 2, listen 5; 19 sockets.
    """
    states = {(f, s): 0 for f in ("ipv4", "ipv6") for s in STATES}
    states.update({
        ("ipv4", "established"): 5, ("ipv4", "syn_recv"): 1, ("ipv4", "time_wait"): 3,
        ("ipv4", "close_wait"): 2, ("ipv4", "listen"): 2,
        ("ipv6", "established"): 2, ("ipv6", "fin_wait2"): 1, ("ipv6", "listen"): 3,
    })
    local = PortTable(
        ports=(22, 8080, OTHER),
        counts=(
            counts(established=2, listen=1),
            counts(established=3, syn_recv=1, close_wait=2, listen=3),
            counts(established=2, fin_wait2=1, time_wait=3, listen=1),
        ),
        queues=(
            QueueStats(send_bytes=36, send_max_bytes=36, send_backlogged=1),
            QueueStats(receive_bytes=131072, send_bytes=2896, receive_max_bytes=98304,
                       send_max_bytes=2896, receive_backlogged=2, send_backlogged=1),
            QueueStats(receive_bytes=517, receive_max_bytes=517, receive_backlogged=1),
        ),
        folded=3,
    )
    remote = PortTable(
        ports=(5432, OTHER),
        counts=(
            counts(established=4, time_wait=1),
            counts(established=3, syn_recv=1, fin_wait2=1, time_wait=2, close_wait=2, listen=5),
        ),
        queues=(
            QueueStats(receive_bytes=8192, receive_max_bytes=8192, receive_backlogged=1),
            QueueStats(receive_bytes=131589, send_bytes=2932, receive_max_bytes=98304,
                       send_max_bytes=2896, receive_backlogged=3, send_backlogged=2),
        ),
    )
    listeners = (
        Listener("ipv6", "::", 8080, queue_length=5, queue_limit=4096, members=3),
        Listener("ipv4", "0.0.0.0", 22, queue_length=0, queue_limit=128),
        Listener("ipv4", "127.0.0.1", 631, queue_length=0, queue_limit=4096),
    )
    return Snapshot(
        timestamp=1700000000.0, duration=0.125, families=("ipv4", "ipv6"), states=states,
        local=local, remote=remote, listeners=listeners, folded_listeners=1, messages=7,
    )


def spike_snapshot(snap: Snapshot) -> Snapshot:
    """`snap` as an earlier poll in the window saw it: a CLOSE-WAIT spike of 9 on local port
    8080 (ipv4) and a full accept queue (4096) on [::]:8080."""
    cw = STATES.index("close_wait")
    local_rows = [list(row) for row in snap.local.counts]
    local_rows[1][cw] = 9
    remote_rows = [list(row) for row in snap.remote.counts]
    remote_rows[1][cw] = 9
    return dataclasses.replace(
        snap, states=snap.states | {("ipv4", "close_wait"): 9},
        local=dataclasses.replace(snap.local, counts=tuple(map(tuple, local_rows))),
        remote=dataclasses.replace(snap.remote, counts=tuple(map(tuple, remote_rows))),
        listeners=tuple(dataclasses.replace(ln, queue_length=4096) if ln.port == 8080 else ln
                        for ln in snap.listeners))


def status_of(snapshot: Snapshot | None, kernel: KernelStats | None = None, *, peaks: bool = True,
              spike: bool = True, udp: UdpTable | None = None, udp_counts: UdpCounts | None = None,
              units: UnitsResult | None = None, **counters) -> PollStatus:
    """A PollStatus as the poller publishes it, its samples made by the real features: the
    TCP table, the units, window peaks (60 s; with `spike` an earlier poll saw
    spike_snapshot()), the kernel counters, the UDP table and counters."""
    features: list = [TcpSockets(Rules()), TcpUnits(cgroups=CgroupMap("/nonexistent"))]
    if peaks:
        features.append(WindowPeaks(60.0, list(TcpSockets.metrics) + list(TcpUnits.metrics)
                                    + list(KernelCounters.metrics)))
    features += [KernelCounters(reader=object()), UdpSockets(), UdpCounters()]
    results = {name: r for name, r in (("tcp", snapshot), ("units", units), ("kernel", kernel), ("udp", udp),
                                       ("udp_counters", udp_counts)) if r is not None}
    if peaks and spike and snapshot is not None:
        samples_of(features, {**results, "tcp": spike_snapshot(snapshot)}, PollContext(0.0, LAST_SUCCESS - 1), True)
    samples, _ = samples_of(features, results, PollContext(0.0, LAST_SUCCESS), True)
    return PollStatus(results=results, samples=samples, **counters)


def fixed_status(snapshot: Snapshot | None = None) -> PollStatus:
    return status_of(snapshot or fixed_snapshot(), fixed_kernel(), udp=fixed_udp(), udp_counts=fixed_udp_counts(),
                     units=fixed_units(),
                     last_success_monotonic=LAST_SUCCESS,
                     polls=42, errors=2, dump_retries=5, dump_interrupted=1, last_error="EPERM",
                     sources={"kernel": SourceHealth(True, 0.0025), "udp_counters": SourceHealth(True, 0.0005),
                              "tcp": SourceHealth(True, 0.125), "udp": SourceHealth(True, 0.0041)})


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def golden_collector(status: PollStatus | None = None, clock: FakeClock | None = None) -> StatusCollector:
    status = status or fixed_status()
    return StatusCollector(lambda: status, STALE_AFTER, clock or FakeClock(LAST_SUCCESS + 2.5),
                           metrics=ALL_METRICS, version="9.9.9", python_version="3.11.0",
                           poll_interval=STALE_AFTER / 3)


def only(collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def parse(text: str | bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] in exposition order."""
    if isinstance(text, bytes):
        text = text.decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def value(samples, name: str, **labels: str) -> float:
    hits = [v for lab, v in samples[name] if lab == labels]
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


def promtool_or_skip() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("promtool not found and CI=true (install Debian package prometheus: make system-deps)")
    pytest.skip("promtool not found (Debian package prometheus; `make system-deps` installs it)")


# -- golden + promtool --------------------------------------------------------------------------


def test_golden_exposition_is_byte_identical():
    body = generate_latest(only(golden_collector()))
    if os.environ.get("SOCKSCOPE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_bytes(body)
    assert GOLDEN.exists(), f"{GOLDEN} missing; regenerate with SOCKSCOPE_UPDATE_GOLDEN=1"
    expected = GOLDEN.read_bytes()
    assert body == expected, (
        "exposition differs from tests/golden/metrics.prom; if the change is intended, "
        "rerun with SOCKSCOPE_UPDATE_GOLDEN=1 and review the diff"
    )


def test_promtool_check_metrics_has_no_complaints():
    promtool = promtool_or_skip()
    body = generate_latest(only(golden_collector()))
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", (proc.stdout, proc.stderr)


def test_promtool_accepts_the_no_snapshot_exposition():
    promtool = promtool_or_skip()
    body = generate_latest(only(golden_collector(PollStatus(polls=3, errors=3))))
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (proc.stdout, proc.stderr)


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["local", "remote"])
def test_port_sums_equal_family_sums_per_state(side):
    samples = parse(generate_latest(only(golden_collector())))
    by_family = defaultdict(float)
    for labels, v in samples["sockscope_tcp_sockets"]:
        by_family[labels["state"]] += v
    by_port = defaultdict(float)
    for labels, v in samples[f"sockscope_tcp_{side}_port_sockets"]:
        by_port[labels["state"]] += v
    assert set(by_family) == set(STATES) == set(by_port)
    assert by_port == by_family
    assert sum(by_family.values()) == value(samples, "sockscope_poll_sockets") == 19


def test_values_follow_the_snapshot():
    snap = fixed_snapshot()
    samples = parse(generate_latest(only(golden_collector())))
    assert value(samples, "sockscope_tcp_sockets", family="ipv6", state="listen") == 3
    assert value(samples, "sockscope_tcp_sockets", family="ipv6", state="closing") == 0  # zeros included
    assert len(samples["sockscope_tcp_sockets"]) == 2 * len(STATES)
    assert len(samples["sockscope_tcp_local_port_sockets"]) == 3 * len(STATES)
    assert len(samples["sockscope_tcp_remote_port_sockets"]) == 2 * len(STATES)
    assert value(samples, "sockscope_tcp_local_port_sockets", port="8080", state="close_wait") == 2
    assert value(samples, "sockscope_tcp_remote_port_sockets", port="other", state="listen") == 5
    assert value(samples, "sockscope_tcp_local_port_receive_queue_bytes", port="8080") == 131072
    assert value(samples, "sockscope_tcp_local_port_send_queue_max_bytes", port="8080") == 2896
    assert value(samples, "sockscope_tcp_local_port_backlogged_sockets", port="8080", queue="receive") == 2
    assert value(samples, "sockscope_tcp_remote_port_backlogged_sockets", port="other", queue="send") == 2
    assert value(samples, "sockscope_tcp_remote_port_receive_queue_max_bytes", port="5432") == 8192
    assert value(samples, "sockscope_tcp_listen_queue_length", address="::", port="8080") == 5
    assert value(samples, "sockscope_tcp_listen_queue_limit", address="::", port="8080") == 4096
    assert value(samples, "sockscope_tcp_listen_sockets", address="::", port="8080") == 3
    assert len(samples["sockscope_tcp_listen_sockets"]) == 3
    assert value(samples, "sockscope_folded_ports", side="local") == 3
    assert value(samples, "sockscope_folded_ports", side="remote") == 0
    assert value(samples, "sockscope_folded_listeners") == 1
    assert value(samples, "sockscope_snapshot_age_seconds") == 2.5
    assert value(samples, "sockscope_poll_duration_seconds") == 0.125
    assert value(samples, "sockscope_last_poll_success_timestamp_seconds") == snap.timestamp + snap.duration
    assert value(samples, "sockscope_polls_total") == 42
    assert value(samples, "sockscope_poll_errors_total") == 2
    assert value(samples, "sockscope_netlink_dump_retries_total") == 5
    assert value(samples, "sockscope_netlink_dump_interrupted_total") == 1
    assert value(samples, "sockscope_build_info", version="9.9.9", python_version="3.11.0") == 1


def test_build_info_defaults_to_the_running_versions():
    samples = parse(generate_latest(only(StatusCollector(lambda: PollStatus(), STALE_AFTER))))
    assert samples["sockscope_build_info"] == [
        ({"version": sockscope.__version__, "python_version": platform.python_version()}, 1.0)
    ]


def test_sample_order_is_deterministic_even_for_unsorted_input():
    snap = fixed_snapshot()
    scrambled = Snapshot(
        timestamp=snap.timestamp, duration=snap.duration, families=("ipv6", "ipv4"), states=snap.states,
        local=PortTable(ports=(OTHER, 8080, 22), counts=snap.local.counts[::-1], queues=snap.local.queues[::-1]),
        remote=snap.remote, listeners=snap.listeners[::-1],
    )
    samples = parse(generate_latest(only(golden_collector(fixed_status(scrambled)))))
    local = [(lab["port"], lab["state"]) for lab, _ in samples["sockscope_tcp_local_port_sockets"]]
    assert local == [(p, s) for p in ("22", "8080", "other") for s in STATES]
    # the rows moved with their ports
    assert value(samples, "sockscope_tcp_local_port_sockets", port="8080", state="close_wait") == 2
    assert [lab["port"] for lab, _ in samples["sockscope_tcp_local_port_receive_queue_bytes"]] == ["22", "8080", "other"]
    backlog = [(lab["port"], lab["queue"]) for lab, _ in samples["sockscope_tcp_local_port_backlogged_sockets"]]
    assert backlog == [(p, q) for p in ("22", "8080", "other") for q in ("receive", "send")]
    fams = [(lab["family"], lab["state"]) for lab, _ in samples["sockscope_tcp_sockets"]]
    assert fams == [(f, s) for f in ("ipv4", "ipv6") for s in STATES]
    assert [lab["port"] for lab, _ in samples["sockscope_tcp_listen_sockets"]] == ["22", "631", "8080"]
    # and the whole body is stable across scrapes
    registry = only(golden_collector(fixed_status(scrambled)))
    assert generate_latest(registry) == generate_latest(registry)


def test_only_families_that_were_read_are_exported():
    snap = fixed_snapshot()
    v4only = Snapshot(
        timestamp=snap.timestamp, duration=snap.duration, families=("ipv4",),
        states={k: v for k, v in snap.states.items() if k[0] == "ipv4"},
        local=snap.local, remote=snap.remote, listeners=(),
    )
    samples = parse(generate_latest(only(golden_collector(fixed_status(v4only)))))
    assert {lab["family"] for lab, _ in samples["sockscope_tcp_sockets"]} == {"ipv4"}
    assert len(samples["sockscope_tcp_sockets"]) == len(STATES)
    assert "sockscope_tcp_listen_sockets" not in samples


# -- up / staleness / no snapshot --------------------------------------------------------------------


def test_up_follows_snapshot_age():
    clock = FakeClock(LAST_SUCCESS + 1)
    registry = only(golden_collector(clock=clock))
    assert value(parse(generate_latest(registry)), "sockscope_up") == 1
    clock.now = LAST_SUCCESS + STALE_AFTER  # exactly at the limit: still fresh
    assert value(parse(generate_latest(registry)), "sockscope_up") == 1
    clock.now = LAST_SUCCESS + STALE_AFTER + 0.001
    samples = parse(generate_latest(registry))
    assert value(samples, "sockscope_up") == 0
    assert value(samples, "sockscope_snapshot_age_seconds") == pytest.approx(STALE_AFTER + 0.001)
    # a stale snapshot is still exported, so dashboards keep the last known picture
    assert value(samples, "sockscope_poll_sockets") == 19


def test_no_snapshot_exports_only_up_counters_and_build_info():
    status = PollStatus(polls=4, errors=4, dump_retries=1, last_error="boom")
    samples = parse(generate_latest(only(golden_collector(status))))
    assert set(samples) == {
        "sockscope_up", "sockscope_polls_total", "sockscope_poll_errors_total",
        "sockscope_netlink_dump_retries_total", "sockscope_netlink_dump_interrupted_total",
        "sockscope_build_info", "sockscope_poll_interval_seconds",
    }
    assert value(samples, "sockscope_up") == 0
    assert value(samples, "sockscope_poll_interval_seconds") == STALE_AFTER / 3  # configuration
    assert value(samples, "sockscope_poll_errors_total") == 4
    assert value(samples, "sockscope_netlink_dump_retries_total") == 1


def test_collect_reads_status_once_and_register_not_at_all():
    calls = []

    def status():
        calls.append(1)
        return fixed_status()

    collector = StatusCollector(status, STALE_AFTER, FakeClock(LAST_SUCCESS))
    registry = only(collector)
    assert calls == []
    generate_latest(registry)
    assert len(calls) == 1


def test_describe_lists_every_collected_family():
    collector = golden_collector()
    described = [m.name for m in collector.describe()]
    collected = [m.name for m in collector.collect()]
    assert described == collected
    assert all(not m.samples for m in collector.describe())
    assert "sockscope_snapshot_age_seconds" in described


def test_make_registry_is_private_and_has_process_and_platform():
    before = set(REGISTRY._names_to_collectors)
    registry = make_registry(golden_collector())
    assert registry is not REGISTRY
    assert set(REGISTRY._names_to_collectors) == before
    samples = parse(generate_latest(registry))
    assert "python_info" in samples
    assert "process_resident_memory_bytes" in samples
    assert "sockscope_up" in samples
    with pytest.raises(ValueError):  # describe() makes duplicate names detectable
        registry.register(golden_collector())


# -- HTTP ---------------------------------------------------------------------------------------


def request(port: int, path: str = "/metrics", method: str = "GET", host: str = "127.0.0.1", **headers: str):
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def server():
    with metrics_server(only(golden_collector()), "127.0.0.1", 0) as srv:
        yield srv


def test_metrics_default_is_text_0_0_4(server):
    assert server.port != 0
    status, headers, body = request(server.port)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "content-encoding" not in headers
    assert body == generate_latest(only(golden_collector()))
    assert int(headers["content-length"]) == len(body)


def test_metrics_openmetrics_negotiated(server):
    status, headers, body = request(server.port, Accept="application/openmetrics-text")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b"\nsockscope_polls_total 42.0\n" in body


def test_metrics_openmetrics_with_prometheus_accept_header(server):
    accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    status, headers, body = request(server.port, Accept=accept)
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


def test_metrics_gzip(server):
    _, _, plain = request(server.port)
    status, headers, body = request(server.port, Accept_Encoding="gzip")
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert int(headers["content-length"]) == len(body)
    assert gzip.decompress(body) == plain


def test_metrics_name_filter(server):
    status, _, body = request(server.port, "/metrics?name[]=sockscope_up")
    assert status == 200
    assert set(parse(body)) == {"sockscope_up"}


def test_head_sends_headers_only(server):
    _, get_headers, get_body = request(server.port)
    status, headers, body = request(server.port, method="HEAD")
    assert status == 200
    assert body == b""
    assert headers["content-type"] == get_headers["content-type"]
    assert int(headers["content-length"]) == len(get_body)


def test_landing_page_and_404(server):
    status, headers, body = request(server.port, "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b'href="/metrics"' in body
    assert sockscope.__version__.encode() in body
    status, _, _ = request(server.port, "/nope")
    assert status == 404
    status, _, _ = request(server.port, "/metrics/extra")
    assert status == 404


def test_collect_error_is_a_500_logged_once_and_the_server_survives(caplog):
    def broken():
        raise RuntimeError("poller exploded")

    with metrics_server(only(StatusCollector(broken, STALE_AFTER)), "127.0.0.1", 0) as srv:
        for _ in range(20):
            status, _, body = request(srv.port)
            assert status == 500
            assert b"poller exploded" not in body  # details go to the log, not to any client
        status, _, _ = request(srv.port, "/")
        assert status == 200
    logged = [r for r in caplog.records if "poller exploded" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]  # 20 failures, one line


def test_bind_failure_names_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = metrics_server(CollectorRegistry(), "127.0.0.1", port)
        with pytest.raises(OSError) as info:
            srv.start()
        assert f"127.0.0.1:{port}" in str(info.value)
        assert info.value.errno is not None


def test_stop_closes_the_socket():
    srv = metrics_server(CollectorRegistry(), "127.0.0.1", 0)
    srv.start()
    port = srv.port
    assert request(port, "/")[0] == 200
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        request(port, "/")
    # the port is free again
    with metrics_server(CollectorRegistry(), "127.0.0.1", port) as again:
        assert request(again.port, "/")[0] == 200


def _loopback6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_all_addresses_is_dual_stack_when_ipv6_is_available():
    require(_dual_stack_available() and _loopback6(), "no IPv6 loopback in this environment")
    with metrics_server(CollectorRegistry(), "", 0) as srv:
        assert request(srv.port, "/", host="127.0.0.1")[0] == 200
        assert request(srv.port, "/", host="::1")[0] == 200


def test_ipv6_host():
    require(_loopback6(), "no IPv6 loopback in this environment")
    with metrics_server(CollectorRegistry(), "::1", 0) as srv:
        assert srv.address == f"[::1]:{srv.port}"
        assert request(srv.port, "/", host="::1")[0] == 200


def consistent_status(n: int) -> PollStatus:
    """A PollStatus whose totals depend on n: n+1 established sockets, all on port 80."""
    states = {(f, s): 0 for f in ("ipv4", "ipv6") for s in STATES}
    states[("ipv4", "established")] = n + 1
    table = PortTable(ports=(80, OTHER), counts=(counts(established=n + 1), counts()),
                      queues=(QueueStats(), QueueStats()))
    snap = Snapshot(timestamp=1.0, duration=0.01, families=("ipv4", "ipv6"), states=states,
                    local=table, remote=table, listeners=())
    return status_of(snap, peaks=False, last_success_monotonic=time.monotonic(), polls=n + 1)


def test_concurrent_scrapes_during_status_swaps():
    statuses = [consistent_status(n) for n in range(64)]
    current = [statuses[0]]
    registry = only(StatusCollector(lambda: current[0], STALE_AFTER))
    stop = threading.Event()
    swaps = [0]

    def swapper():
        deadline = time.monotonic() + 30
        while not stop.is_set() and swaps[0] < 1_000_000 and time.monotonic() < deadline:
            swaps[0] += 1
            current[0] = statuses[swaps[0] % len(statuses)]
            time.sleep(0.0001)  # let the scrapes run between swaps, each on a new status

    scrapers = 50
    barrier = threading.Barrier(scrapers, timeout=TIMEOUT)
    results: list = [None] * scrapers

    with metrics_server(registry, "127.0.0.1", 0) as srv:
        def scrape(i: int) -> None:
            try:
                barrier.wait()
                results[i] = request(srv.port)
            except Exception as exc:  # noqa: BLE001 - reported below
                results[i] = exc

        swap_thread = threading.Thread(target=swapper, daemon=True)
        swap_thread.start()
        threads = [threading.Thread(target=scrape, args=(i,), daemon=True) for i in range(scrapers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=TIMEOUT * 3)
        stop.set()
        swap_thread.join(timeout=TIMEOUT)

    assert not any(t.is_alive() for t in threads), "scrapes hung"
    assert swaps[0] > 0
    seen = set()
    for res in results:
        assert not isinstance(res, BaseException) and res is not None, res
        status, _, body = res
        assert status == 200
        samples = parse(body)
        total = value(samples, "sockscope_poll_sockets")
        assert total == sum(v for _, v in samples["sockscope_tcp_sockets"])
        assert total == sum(v for _, v in samples["sockscope_tcp_local_port_sockets"])
        assert value(samples, "sockscope_polls_total") == total  # counters from the same PollStatus
        seen.add(total)
    assert len(seen) > 1, "status never changed between scrapes; the test exercised nothing"


# -- PollExposition: the per-poll part rendered once per poll --------------------------------

from prometheus_client.openmetrics.parser import (  # noqa: E402
    text_string_to_metric_families as om_families,
)

from sockscope.prometheus import PollExposition  # noqa: E402

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Holder:
    """status() source the test swaps, like the poller does."""

    def __init__(self, status: PollStatus) -> None:
        self.current = status

    def __call__(self) -> PollStatus:
        return self.current


def bake(exp, accept=None, encoding=None, names=None) -> tuple[int, list, bytes]:
    """One /metrics request through MetricsApp: (status, headers, whole body)."""
    headers = {k: v for k, v in (("accept", accept), ("accept-encoding", encoding)) if v is not None}
    query = "&".join(f"name[]={n}" for n in names or ())
    resp = MetricsApp(exp)(Request("GET", "/metrics", "/metrics", query, "HTTP/1.1", headers, "test"))
    return resp.status, resp.headers, b"".join(resp.parts)


def exposition(holder: Holder) -> PollExposition:
    return PollExposition(holder, STALE_AFTER, monotonic=FakeClock(LAST_SUCCESS + 2.5))


def sockscope_samples(body: bytes) -> dict:
    return {name: v for name, v in parse(body).items() if name.startswith("sockscope_")}


def test_poll_exposition_equals_the_whole_registry():
    holder = Holder(fixed_status())
    exp = exposition(holder)
    status, headers, body = bake(exp)
    assert status == 200 and headers == [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")]
    whole = generate_latest(exp.registry)
    assert sockscope_samples(body) == sockscope_samples(whole)
    # Each family once: the cached and the fresh parts do not overlap.
    names = [line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)) > 40
    assert "process_cpu_seconds_total" in body.decode()


def test_poll_part_is_rendered_once_per_status():
    holder = Holder(fixed_status())
    exp = exposition(holder)
    first = exp._poll_part(holder(), "text", False)
    assert exp._poll_part(holder(), "text", False) is first  # cached
    # The poller publishes a new status: the next scrape renders the new figures.
    holder.current = fixed_status(dataclasses.replace(holder.current.snapshot, duration=0.5))
    _, _, body = bake(exp)
    assert value(parse(body), "sockscope_poll_duration_seconds") == 0.5


def test_poll_exposition_openmetrics_has_one_eof_and_parses():
    exp = exposition(Holder(fixed_status()))
    _, headers, body = bake(exp, OPENMETRICS)
    text = body.decode()
    assert headers[0][1].startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    names = {f.name for f in om_families(text)}
    assert {"sockscope_tcp_sockets", "sockscope_up", "process_cpu_seconds"} <= names


def test_poll_exposition_gzip_is_two_members_that_decompress_whole():
    exp = exposition(Holder(fixed_status()))
    _, headers, zipped = bake(exp, encoding="gzip")
    assert ("Content-Encoding", "gzip") in headers
    _, _, plain = bake(exp)
    assert sockscope_samples(gzip.decompress(zipped)) == sockscope_samples(plain)


def test_poll_exposition_name_filter_and_promtool():
    exp = exposition(Holder(fixed_status()))
    _, _, body = bake(exp, names=["sockscope_up"])
    assert set(parse(body)) == {"sockscope_up"}
    promtool = promtool_or_skip()
    _, _, full = bake(exp)
    proc = subprocess.run([promtool, "check", "metrics"], input=full, capture_output=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc


def test_up_is_fresh_on_every_scrape_of_a_cached_poll():
    holder = Holder(fixed_status())
    clock = FakeClock(LAST_SUCCESS + 1)
    exp = PollExposition(holder, STALE_AFTER, monotonic=clock)
    assert value(parse(bake(exp)[2]), "sockscope_up") == 1.0
    clock.now = LAST_SUCCESS + STALE_AFTER + 1
    body = bake(exp)[2]
    assert value(parse(body), "sockscope_up") == 0.0
    assert value(parse(body), "sockscope_snapshot_age_seconds") == STALE_AFTER + 1


def test_negotiation_is_a_fixed_set_of_formats_whatever_the_client_sends():
    from sockscope.prometheus import negotiate

    assert negotiate(None) == negotiate("") == "text"
    assert negotiate("application/openmetrics-text") == "openmetrics"
    assert negotiate("application/openmetrics-text; version=1.0.0") == "openmetrics"
    assert negotiate("application/openmetrics-text; version=0.0.1") == "text"
    # Regression (issue 9 defect 8): version=abc raised inside prometheus_client: a 500
    # with a traceback logged per request.
    assert negotiate("application/openmetrics-text; version=abc") == "text"
    assert negotiate("application/openmetrics-text; version=1.0.x") == "text"
    assert negotiate("text/plain;q=0.9, application/openmetrics-text;version=1.0.0;q=0.5") == "text"
    assert negotiate("application/openmetrics-text;q=0, text/plain") == "text"
    assert negotiate("image/png") == "text"
    assert negotiate("application/openmetrics-text; q=abc") == "text"


def test_render_cache_is_bounded_whatever_the_accept_header(caplog):
    # Regression (issue 9 defect 7): the cache was keyed by the content type string that
    # echoed the client's version, so 3,000 distinct Accept headers grew RSS by 86 MB.
    exp = exposition(Holder(fixed_status()))
    app = MetricsApp(exp)
    for n in range(3000):
        accept = f"application/openmetrics-text; version=1.0.{n}" if n % 2 else f"text/plain; version={n}"
        req = Request("GET", "/metrics", "/metrics", "", "HTTP/1.1",
                      {"accept": accept, "accept-encoding": "gzip" if n % 3 else "identity"}, "test")
        resp = app(req)
        assert resp.status == 200
        assert resp.headers[0][1] in ("text/plain; version=0.0.4; charset=utf-8",
                                      "application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert len(exp._cache) <= 4
    assert not caplog.records


def test_bad_accept_version_is_served_as_text_over_http():
    with metrics_server(only(golden_collector()), "127.0.0.1", 0) as srv:
        status, headers, body = request(srv.port, Accept="application/openmetrics-text; version=abc")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"sockscope_up" in body


def test_too_many_name_filters_is_a_400():
    with metrics_server(only(golden_collector()), "127.0.0.1", 0) as srv:
        query = "&".join(f"name[]=m{i}" for i in range(101))
        assert request(srv.port, f"/metrics?{query}")[0] == 400
        assert request(srv.port, "/metrics?name[]=sockscope_up")[0] == 200
