"""Sweeping many network namespaces (issue 14): every series labelled netns, each
namespace's counts equal to `ss -tan` run in it; namespaces deleted and added while the
daemon runs; the cap; config errors; discovery's pure parts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from sockscope import config, discovery
from sockscope.catalogue import GraphitePath, Metric
from sockscope.snapshot import STATES
from sockscope.sweep import labelled
from support.daemon import start_daemon
from support.netns import NetNS, stop_process
from support.prereq import require

SIZES = (3, 7, 12, 20)  # ESTABLISHED pairs per namespace, all different
BASE = """
udp:
  enabled: false
poll:
  interval: 200ms
  kernel_stats: false
"""  # poll last: tests append "  netns: ..." to it


def _state_counts(samples: dict, netns: str) -> dict[tuple[str, str], float]:
    return {dict(labels)["family"] + "/" + dict(labels)["state"]: v
            for (name, labels), v in samples.items()
            if name == "sockscope_tcp_sockets" and dict(labels).get("netns") == netns}


def _ss_counts(ns: NetNS) -> dict[str, int]:
    """(family/state) -> count from `ss -tanOH` run inside the namespace."""
    from support import ss_parse

    figures = ss_parse.ss_figures(ns)
    return {f"{family}/{state}": n for (family, state), n in figures.states.items()}


def _labels(samples: dict, name: str = "sockscope_tcp_sockets") -> set[str]:
    return {dict(labels).get("netns") for (n, labels), _ in samples.items() if n == name}


def _wait(daemon, predicate, polls: int = 40):
    s = daemon.samples()
    for _ in range(polls):
        if predicate(s):
            return s
        s = daemon.wait_polls(1)
    return s


def test_sweep_of_four_namespaces_equals_ss_in_each(tmp_path, sockmix_factory):
    mixes = [sockmix_factory({"established": {"n": n}}) for n in SIZES]
    names = [m.ns.name for m in mixes]
    daemon = start_daemon(tmp_path, BASE + "  netns: [" + ", ".join(names) + "]\n")
    try:
        s = daemon.wait_polls(2)
        assert _labels(s) == set(names), daemon.log()
        for mix, n in zip(mixes, SIZES):
            want = _ss_counts(mix.ns)
            got = {k: v for k, v in _state_counts(s, mix.ns.name).items() if v}
            assert got == want, (mix.ns.name, got, want)
            assert got["ipv4/established"] == 2 * n
        # every metric family carries the label; the sweep's own series are there
        assert s[("sockscope_poll_dumps", ())] == len(SIZES)  # TCP only (udp off), no retries here
        assert s[("sockscope_netns_tracked", ())] == len(SIZES)
        for name in names:
            assert s[("sockscope_netns_dump_duration_seconds", (("netns", name),))] > 0
            assert s[("sockscope_netns_source_up", (("netns", name), ("source", "tcp")))] == 1
        assert s[("sockscope_up", ())] == 1
        assert s[("sockscope_poll_sockets", ())] == sum(sum(_ss_counts(m.ns).values()) for m in mixes)

        # one deleted while the daemon runs: no crash, its series gone within 2 polls
        gone = mixes[1]
        gone.stop()
        gone.ns.delete()
        s = daemon.wait_polls(2)
        assert gone.ns.name not in _labels(s), daemon.log()
        assert _labels(s) == set(names) - {gone.ns.name}
        assert s[("sockscope_netns_vanished_total", ())] == 1
        assert daemon.proc.poll() is None
        assert s[("sockscope_up", ())] == 1
        for mix in (mixes[0], mixes[2], mixes[3]):
            assert {k: v for k, v in _state_counts(s, mix.ns.name).items() if v} == _ss_counts(mix.ns)
        assert f"netns {gone.ns.name}" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_discovery_picks_up_new_namespaces(tmp_path, netns_factory):
    made = [netns_factory() for _ in range(2)]
    # discover: run sees every namespace on the machine (other tests' too): only ours are
    # asserted on.
    daemon = start_daemon(tmp_path, BASE + "netns:\n  discover: [run]\n  rediscover: 1s\n  max_tracked: 4096\n")
    try:
        s = daemon.wait_polls(2)
        assert {ns.name for ns in made} <= _labels(s), daemon.log()
        late = netns_factory()
        deadline = time.monotonic() + 10
        while late.name not in _labels(s) and time.monotonic() < deadline:
            s = daemon.wait_polls(1)
        assert late.name in _labels(s), daemon.log()
        assert s[("sockscope_netns_discoveries_total", ())] >= 2
        assert s[("sockscope_netns_tracked", ())] >= 3
        assert s[("sockscope_netns_folded", ())] == 0
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_the_cap_keeps_configured_then_tracked_then_by_label(netns_factory):
    """Real namespaces, a discovery that lists exactly them (the machine's /run/netns
    holds other tests' namespaces too)."""
    from sockscope.service import make_reader
    from sockscope.sweep import Sweep

    made = sorted((netns_factory() for _ in range(4)), key=lambda ns: ns.name)
    listed = made[3]
    shown = [made[1], made[2], listed]

    def ns(n: NetNS, configured: bool = False) -> discovery.Namespace:
        st = os.stat(n.path)
        return discovery.Namespace((st.st_dev, st.st_ino), n.name, n.path, configured)

    def fake_discover(configured, kinds, host):
        assert configured == (listed.name,) and kinds == ("run",) and not host
        found = [ns(listed, True), *sorted((ns(n) for n in shown if n is not listed), key=lambda x: x.label)]
        return discovery.Discovery(tuple(found))

    cfg = config.from_mapping({"udp": {"enabled": False}, "poll": {"kernel_stats": False, "netns": [listed.name]},
                               "netns": {"discover": ["run"], "max_tracked": 2, "rediscover": "1s"}})
    now = [0.0]
    sweep = Sweep(cfg, make_reader, discover=fake_discover, monotonic=lambda: now[0])
    try:
        from sockscope.features import PollContext
        result = sweep.read(PollContext(time.time(), 0.0))
        assert [lane.label for lane in result.lanes] == [listed.name, made[1].name]
        assert result.folded == 1
        # a namespace sorting first appears: the already tracked one stays (stable choice)
        shown.append(made[0])
        now[0] = 2.0
        result = sweep.read(PollContext(time.time(), 2.0))
        assert [lane.label for lane in result.lanes] == [listed.name, made[1].name]
        assert result.folded == 2 and result.discoveries == 2
        # the tracked one vanishes: dropped at once; the next discovery takes the first by label
        made[1].delete()
        result = sweep.read(PollContext(time.time(), 2.5))
        assert [lane.label for lane in result.lanes] == [listed.name] and result.vanished == 1
        shown.remove(made[1])
        now[0] = 4.0
        result = sweep.read(PollContext(time.time(), 4.0))
        assert [lane.label for lane in result.lanes] == [listed.name, made[0].name]
    finally:
        sweep.close()


def test_host_namespace_and_process_namespace_labels(tmp_path, netns_factory):
    ns = netns_factory()
    # a process in an unnamed namespace: unshare gives it one no /run/netns entry names
    holder = subprocess.Popen(["unshare", "--net", sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if os.stat(f"/proc/{holder.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            time.sleep(0.05)
        daemon = start_daemon(tmp_path, BASE + "netns:\n  discover: [processes]\n  host: true\n")
        try:
            s = daemon.wait_polls(2)
            labels = _labels(s)
            assert "host" in labels
            assert f"pid:{holder.pid}" in labels, (labels, daemon.log())
            assert ns.name not in labels  # no process in it: processes discovery cannot see it
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        stop_process(holder)


def test_one_string_netns_has_no_label(tmp_path, netns_factory):
    ns = netns_factory()
    daemon = start_daemon(tmp_path, BASE + f"  netns: {ns.name}\n")
    try:
        s = daemon.wait_polls(1)
        assert _labels(s) == {None}
        assert ("sockscope_poll_dumps", ()) not in s
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.parametrize("text, message", [
    ("poll:\n  netns: []\n", "poll.netns: must not be empty"),
    ("poll:\n  netns: [a, a]\n", "poll.netns[1]: 'a' is listed twice"),
    ("poll:\n  netns: [a, 'x/y']\n", "poll.netns[1]: 'x/y': give a name from /run/netns"),
    ("poll:\n  netns: [a, '']\n", "poll.netns[1]: must not be empty"),
    ("poll:\n  netns: [1]\n", "poll.netns[0]: expected a string"),
    ("poll:\n  netns: {a: 1}\n", "poll.netns: expected a string or a list"),
    ("poll:\n  netns: [a, b, c]\nnetns:\n  max_tracked: 2\n", "3 namespaces listed but netns.max_tracked is 2"),
    ("poll:\n  netns: web\nnetns:\n  discover: [run]\n", "poll.netns: 'web' names one namespace"),
    ("netns:\n  discover: [docker]\n", "netns.discover[0]: 'docker' is not one of run, processes"),
    ("netns:\n  rediscover: 100ms\n", "netns.rediscover"),
    ("netns:\n  max_tracked: 0\n", "netns.max_tracked"),
])
def test_bad_sweep_config_is_refused_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "sockscope", "check-config", "--config.file", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert message in r.stderr + r.stdout, r.stderr + r.stdout


def test_config_forms():
    one = config.from_mapping({"poll": {"netns": "web"}})
    assert one.poll.netns == "web" and not config.sweeping(one)
    many = config.from_mapping({"poll": {"netns": ["web", "/proc/1/ns/net"]}})
    assert many.poll.netns == ("web", "/proc/1/ns/net") and config.sweeping(many)
    assert config.sweeping(config.from_mapping({"netns": {"host": True}}))
    assert not config.sweeping(config.DEFAULTS)
    # --netns (one namespace) overrides a sweep: the snapshot command reads one
    assert not config.sweeping(config.override(many, netns="db"))


def test_labelled_metric_puts_netns_first_and_in_the_graphite_path():
    m = Metric("sockscope_tcp_sockets", "gauge", "x", ("family", "state"),
               GraphitePath(("tcp", "states", "{family}", "{state}"), collectd_total=("tcpconns-all", "x")))
    got = labelled(m)
    assert got.labels == ("netns", "family", "state")
    assert got.graphite == GraphitePath(("netns", "{netns}", "tcp", "states", "{family}", "{state}"))
    own = labelled(Metric("sockscope_source_up", "gauge", "x", ("source",), GraphitePath(("sockscope", "source"))))
    assert own.graphite.sockscope == ("sockscope", "netns", "{netns}", "source")
    hist = labelled(Metric("h", "gaugehistogram", "x", ("port", "le")))
    assert hist.labels == ("netns", "port", "le")


@pytest.mark.parametrize("line, want", [
    ("0::/system.slice/docker-" + "a" * 64 + ".scope\n", "docker/" + "a" * 12),
    ("12:pids:/docker/" + "b" * 64 + "\n", "docker/" + "b" * 12),  # a hybrid host's v1 line
    ("0::/system.slice/containerd.service/kubepods-besteffort-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice"
     ":cri-containerd:" + "c" * 64 + "\n", "pod/0a1b2c3d-4e5f-6789-abcd-ef0123456789"),
    ("0::/system.slice/containerd.service/besteffort.slice:cri-containerd:" + "c" * 64 + "\n", "containerd/" + "c" * 12),
    ("0::/machine.slice/libpod-" + "e" * 64 + ".scope/container\n", "podman/" + "e" * 12),
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/"
     "cri-containerd-" + "d" * 64 + ".scope\n", "pod/0a1b2c3d-4e5f-6789-abcd-ef0123456789"),
    ("11:memory:/kubepods/besteffort/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/" + "f" * 64 + "\n",
     "pod/0a1b2c3d-4e5f-6789-abcd-ef0123456789"),
    ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
    ("0::/system.slice/docker.service\n", None),  # the runtime's daemon, not a container
    ("", None),
])
def test_container_label(line, want):
    assert discovery.container_label(line) == want


def test_start_time_counts_fields_after_the_last_parenthesis():
    fields = " ".join(str(i) for i in range(3, 53))
    assert discovery.start_time(f"123 (we) ird ) name) {fields}") == 22


def test_choose_keeps_configured_then_tracked_then_by_label():
    ns = [discovery.Namespace((0, i), f"n{i}", f"/p/{i}", configured=(i == 5)) for i in range(6)]
    ns = [ns[5], *ns[:5]]  # discover() lists configured ones first
    chosen, folded = discovery.choose(ns, tracked={(0, 3)}, cap=3)
    assert [n.label for n in chosen] == ["n5", "n3", "n0"] and folded == 3


def test_discover_with_fixture_roots(tmp_path):
    """Fixture roots: files stand in for namespaces (identity = inode), as stat sees them."""
    proc, run = tmp_path / "proc", tmp_path / "run"
    run.mkdir()
    nsfiles = {name: tmp_path / f"ns-{name}" for name in ("own", "a", "b", "c")}
    for f in nsfiles.values():
        f.write_text("")
    os.link(nsfiles["a"], run / "alpha")

    def process(pid: int, ns: str, start: int, cgroup: str = "0::/\n") -> None:
        d = proc / str(pid)
        (d / "ns").mkdir(parents=True)
        os.link(nsfiles[ns], d / "ns" / "net")
        fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30
        (d / "stat").write_text(f"{pid} (x y) " + " ".join(fields) + "\n")
        (d / "cgroup").write_text(cgroup)

    (proc / "self" / "ns").mkdir(parents=True)
    os.link(nsfiles["own"], proc / "self" / "ns" / "net")
    process(1, "own", 1)
    process(10, "a", 5)
    process(20, "b", 9)
    process(21, "b", 7)  # the oldest of b
    process(30, "c", 3, "0::/system.slice/docker-" + "f" * 64 + ".scope\n")
    got = discovery.discover(kinds=["run", "processes"], proc=str(proc), run=str(run))
    assert [(n.label, n.path) for n in got.found] == [
        ("alpha", str(run / "alpha")), ("docker/ffffffffffff", str(proc / "30" / "ns" / "net")),
        ("pid:21", str(proc / "21" / "ns" / "net"))]
    with_host = discovery.discover(["alpha", "missing"], kinds=[], host=True, proc=str(proc), run=str(run))
    assert [(n.label, n.path) for n in with_host.found] == [("host", None), ("alpha", str(run / "alpha"))]
    assert with_host.missing == ("missing",)
    by_path = discovery.discover([str(proc / "1" / "ns" / "net"), str(proc / "20" / "ns" / "net")],
                                 proc=str(proc), run=str(run))
    assert [n.label for n in by_path.found] == ["host", "pid:21"]  # the daemon's own; b's oldest process
    assert STATES  # the state labels the daemon tests compare


def _poll(service):
    status = service.poller.poll()
    assert status.last_error is None, status.last_error
    return status


def test_reload_rebuilds_only_the_lanes_whose_namespace_changed(netns_factory):
    from sockscope.graphite.lines import LineBuilder
    from sockscope.service import Service
    from sockscope.sweep import Sweep

    a, b, c = (netns_factory() for _ in range(3))
    # prometheus off: a reload of a Service that was never started would bind :9393
    base = {"udp": {"enabled": False}, "poll": {"kernel_stats": False}, "tcp_info": {"enabled": True},
            "prometheus": {"enabled": False}}
    cfg = config.from_mapping({**base, "poll": {"kernel_stats": False, "netns": [a.name, b.name]}})
    service = Service(cfg)
    try:
        status = _poll(service)
        sweep = service.features[0]
        assert isinstance(sweep, Sweep)
        lanes = {lane.ns.label: lane for lane in sweep.lanes.values()}
        assert set(lanes) == {a.name, b.name}
        tcp_info = {name: lane.poller.features for name, lane in lanes.items()}
        # the series bound (Graphite buffer sizing) multiplies by the namespaces: a fixed list's
        # (2 here), the cap's with discovery
        exported = sum(len(rows) for _, rows in status.samples)
        assert exported <= sweep.max_series()
        one = Service(config.from_mapping({**base, "poll": {"kernel_stats": False, "netns": a.name}}))
        try:
            from sockscope.service import make_reader, max_series
            assert 2 * max_series(one.features) <= sweep.max_series() < 3 * max_series(one.features)
            found = Sweep(config.from_mapping({**base, "netns": {"discover": ["run"]}}), make_reader)
            try:
                assert found.max_series() >= cfg.netns.max_tracked * max_series(one.features)
            finally:
                found.close()
        finally:
            for f in one.features:
                f.close()

        # Graphite: the namespace is a path component (sockscope), a tag (tags), and
        # under <host>.sockscope. in naming collectd (tcpconns has no namespace)
        paths = [p for p, _ in LineBuilder(host="h").series(status)]
        assert f"sockscope.h.netns.{a.name}.tcp.states.ipv4.listen" in paths
        assert "sockscope.h.sockscope.netns.tracked" in paths
        tagged = [p for p, _ in LineBuilder(host="h", tags=True).series(status)]
        assert any(p.startswith(f"sockscope.tcp.sockets;netns={a.name};family=ipv4;state=listen") for p in tagged)
        collectd = [p for p, _ in LineBuilder(host="h", naming="collectd").series(status)]
        assert f"h.sockscope.netns.{a.name}.tcp.states.ipv4.listen" in collectd
        assert not any(p.startswith("h.tcpconns") for p in collectd)

        # only the list changes: a kept, b dropped, c added; a's lane keeps its state
        cfg2 = config.from_mapping({**base, "poll": {"kernel_stats": False, "netns": [a.name, c.name]}})
        service.reload(cfg2)
        status = _poll(service)
        sweep2 = service.features[0]
        assert sweep2 is not sweep
        lanes2 = {lane.ns.label: lane for lane in sweep2.lanes.values()}
        assert set(lanes2) == {a.name, c.name}
        assert lanes2[a.name] is lanes[a.name] and lanes2[a.name].poller.features == tcp_info[a.name]
        assert {labels[0] for labels, _ in status.samples.get("sockscope_tcp_sockets")} == {a.name, c.name}
        # a key every lane is built from changes: every lane is rebuilt
        cfg3 = config.from_mapping({**base, "poll": {"kernel_stats": False, "netns": [a.name, c.name]},
                                    "ports": {"local": [4242]}})
        service.reload(cfg3)
        _poll(service)
        lanes3 = {lane.ns.label: lane for lane in service.features[0].lanes.values()}
        assert lanes3[a.name] is not lanes[a.name]
        # nothing the sweep uses changes: the same Sweep carries on
        sweep3 = service.features[0]
        service.reload(config.from_mapping({**base, "poll": {"kernel_stats": False, "netns": [a.name, c.name]},
                                            "ports": {"local": [4242]}, "log": {"level": "debug"}}))
        _poll(service)
        assert service.features[0] is sweep3
    finally:
        service.poller.stop()
        for f in service.poller.features:
            f.close()


def _caps(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


CAP_SYS_PTRACE, CAP_SYS_ADMIN = 19, 21  # linux/capability.h


@pytest.mark.parametrize("caps", [("sys_admin", "sys_ptrace"), ("sys_admin",)])
def test_the_dropins_capabilities_are_enough(tmp_path, netns_factory, caps):
    """systemd/sockscope.service.d/netns.conf grants CAP_SYS_ADMIN and CAP_SYS_PTRACE: a
    daemon holding only those (uid 0 without root's implicit capabilities, the noroot
    securebit) sweeps /run/netns and the namespace of another user's process; without
    CAP_SYS_PTRACE that process's /proc/PID/ns/net cannot be opened and it is not found."""
    require(shutil.which("setpriv") is not None and shutil.which("unshare") is not None, "needs util-linux")
    ns = netns_factory()
    # a process of another user (nobody) in a namespace no /run/netns entry names
    holder = subprocess.Popen(["unshare", "--net", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if os.stat(f"/proc/{holder.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino \
                        and os.stat(f"/proc/{holder.pid}").st_uid == 65534:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        listed = ",".join(f"+{c}" for c in caps)
        prefix = ("setpriv", f"--inh-caps=-all,{listed}", f"--ambient-caps=-all,{listed}",
                  f"--bounding-set=-all,{listed}", "--securebits=+noroot,+noroot_locked")
        daemon = start_daemon(tmp_path, BASE + "netns:\n  discover: [run, processes]\n  max_tracked: 4096\n",
                              prefix=prefix)
        try:
            want = sum(1 << {"sys_admin": CAP_SYS_ADMIN, "sys_ptrace": CAP_SYS_PTRACE}[c] for c in caps)
            assert _caps(daemon.pid) == want
            s = daemon.wait_polls(2)
            labels = _labels(s)
            assert ns.name in labels, daemon.log()
            assert s[("sockscope_netns_source_up", (("netns", ns.name), ("source", "tcp")))] == 1
            assert (f"pid:{holder.pid}" in labels) == ("sys_ptrace" in caps), (labels, daemon.log())
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        stop_process(holder)


def test_a_failing_discovery_or_lane_never_stops_the_others(netns_factory, caplog):
    from sockscope.features import PollContext
    from sockscope.service import make_reader
    from sockscope.sweep import Sweep

    a, b = netns_factory(), netns_factory()

    def found(*n: NetNS) -> discovery.Discovery:
        return discovery.Discovery(tuple(discovery.Namespace((os.stat(x.path).st_dev, os.stat(x.path).st_ino),
                                                             x.name, x.path) for x in n))

    answers: list = [found(a, b), RuntimeError("proc exploded"), found(a, b)]

    def fake_discover(configured, kinds, host):
        got = answers.pop(0)
        if isinstance(got, Exception):
            raise got
        return got

    def reader(cfg, need):
        if cfg.poll.netns == b.path and broken:
            raise OSError(24, "Too many open files")
        return make_reader(cfg, need)

    broken = True
    cfg = config.from_mapping({"udp": {"enabled": False}, "poll": {"kernel_stats": False},
                               "netns": {"discover": ["run"], "rediscover": "1s"}})
    now = [0.0]
    sweep = Sweep(cfg, reader, discover=fake_discover, monotonic=lambda: now[0])
    try:
        got = sweep.read(PollContext(time.time(), 0.0))
        assert [lane.label for lane in got.lanes] == [a.name]  # b's lane could not be built
        assert "Too many open files" in caplog.text
        now[0] = 1.5
        got = sweep.read(PollContext(time.time(), 1.5))  # the discovery raises: a's lane carries on
        assert [lane.label for lane in got.lanes] == [a.name] and got.discoveries == 1
        assert "proc exploded" in caplog.text
        broken = False
        now[0] = 3.0
        got = sweep.read(PollContext(time.time(), 3.0))
        assert [lane.label for lane in got.lanes] == [a.name, b.name] and got.discoveries == 2
        assert all(lane.status.last_error is None for lane in got.lanes)
    finally:
        sweep.close()


def test_snapshot_reads_one_namespace_and_says_so_for_a_sweep(tmp_path, netns_factory):
    ns = netns_factory()
    path = tmp_path / "sweep.yaml"
    path.write_text(f"poll:\n  netns: [{ns.name}]\n")
    cmd = [sys.executable, "-m", "sockscope", "snapshot", "--json", "--config.file", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "snapshot reads one namespace" in r.stderr, r
    r = subprocess.run([*cmd, "--netns", ns.name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


UDP_HOLDER = """
import socket, sys, time
held = []
for i in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    held.append(s)
print("ready", flush=True)
time.sleep(60)
"""


def test_udp_is_dumped_per_namespace_too(tmp_path, netns_factory):
    spaces = [netns_factory() for _ in range(2)]
    holders = []
    for ns, n in zip(spaces, (3, 8)):
        p = ns.popen([sys.executable, "-c", UDP_HOLDER, str(n)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        holders.append(p)
    config_text = "poll:\n  interval: 200ms\n  netns: [" + ", ".join(ns.name for ns in spaces) + "]\n"
    daemon = start_daemon(tmp_path, config_text)
    try:
        s = daemon.wait_polls(2)
        for ns in spaces:
            ss = len(ns.run(["ss", "-uanH"], check=True).stdout.splitlines())
            ours = sum(v for (name, labels), v in s.items()
                       if name == "sockscope_udp_sockets" and dict(labels)["netns"] == ns.name)
            assert ours == ss, (ns.name, ours, ss)
            assert s[("sockscope_netns_source_up", (("netns", ns.name), ("source", "udp")))] == 1
        assert [sum(v for (name, labels), v in s.items()
                    if name == "sockscope_udp_sockets" and dict(labels)["netns"] == ns.name) for ns in spaces] == [3, 8]
        assert s[("sockscope_poll_dumps", ())] == 4  # TCP + UDP in each
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_reload_between_one_namespace_and_a_sweep(netns_factory):
    from sockscope.service import Service

    a, b = netns_factory(), netns_factory()
    base = {"udp": {"enabled": False}, "prometheus": {"enabled": False}}  # see above

    def netns_labels(status) -> set:
        metric = status.samples.metrics["sockscope_tcp_sockets"]
        return {dict(zip(metric.labels, labels)).get("netns") for labels, _ in status.samples.get(metric.name)}

    service = Service(config.from_mapping({**base, "poll": {"netns": a.name}}))
    try:
        assert netns_labels(_poll(service)) == {None}
        service.reload(config.from_mapping({**base, "poll": {"netns": [a.name, b.name]}}))
        status = _poll(service)
        assert netns_labels(status) == {a.name, b.name} and service.poller.readers == {}
        service.reload(config.from_mapping(base))
        status = _poll(service)
        assert netns_labels(status) == {None} and set(service.poller.readers) == {6}
        assert "sockscope_netns_tracked" not in status.samples.metrics
    finally:
        service.poller.stop()
        for f in service.poller.features:
            f.close()
        for r in service.poller.readers.values():
            r.close()


def test_a_namespace_recreated_under_its_name_is_a_new_one(tmp_path, netns_factory):
    """`ip netns del X; ip netns add X` while sweeping: the old namespace's lane is dropped
    (counted) at once, not fed the new namespace's table; the next discovery polls the new
    one under the same label, with its own figures."""
    keep, again = netns_factory(), netns_factory()
    mix = subprocess.Popen(again.exec_argv([sys.executable, "-c", UDP_HOLDER, "0"]), stdout=subprocess.PIPE,
                           text=True)  # a process in the old namespace (it outlives the name)
    try:
        assert mix.stdout.readline().strip() == "ready"
        daemon = start_daemon(tmp_path, BASE + f"  netns: [{keep.name}, {again.name}]\n"
                              "netns:\n  rediscover: 2s\n")
        try:
            daemon.wait_polls(2)
            old = os.stat(again.path).st_ino
            subprocess.run(["ip", "netns", "del", again.name], check=True, timeout=30)
            subprocess.run(["ip", "netns", "add", again.name], check=True, timeout=30)
            assert os.stat(again.path).st_ino != old
            s = daemon.wait_polls(2)
            assert s[("sockscope_netns_vanished_total", ())] == 1, daemon.log()
            assert "names another namespace now" in daemon.log()
            deadline = time.monotonic() + 10
            while again.name not in _labels(s) and time.monotonic() < deadline:
                s = daemon.wait_polls(1)
            assert _labels(s) == {keep.name, again.name}, daemon.log()
            # the new namespace's loopback is down: no listener, nothing; ss agrees
            assert {k: v for k, v in _state_counts(s, again.name).items() if v} == _ss_counts(again)
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        stop_process(mix)


def test_a_sweep_longer_than_the_interval_is_logged_once(netns_factory, caplog):
    from sockscope.features import PollContext
    from sockscope.service import make_reader
    from sockscope.sweep import Sweep

    a = netns_factory()
    clock = [0.0]

    def monotonic() -> float:  # every reading 0.3 s later: a sweep "takes" longer than 0.2 s
        clock[0] += 0.3
        return clock[0]

    cfg = config.from_mapping({"udp": {"enabled": False}, "poll": {"interval": "200ms", "netns": [a.name]}})
    sweep = Sweep(cfg, make_reader, monotonic=monotonic)
    try:
        for _ in range(3):
            result = sweep.read(PollContext(time.time(), clock[0]))
            assert result.duration > 0.2 and [lane.label for lane in result.lanes] == [a.name]
        assert caplog.text.count("a sweep took longer than poll.interval (0.2s)") == 1
    finally:
        sweep.close()


def test_a_sweep_in_real_carbon_and_promtool(tmp_path, tmp_path_factory, sockmix_factory):
    """The netns label as carbon stores it (a path component, sanitised) and as promtool
    reads the exposition; values equal ss in each namespace."""
    from support.carbon import Carbon, prerequisites_missing

    require(prerequisites_missing() is None, prerequisites_missing() or "")
    promtool = shutil.which("promtool")
    require(promtool is not None, "needs promtool (Debian package prometheus)")
    mixes = [sockmix_factory({"established": {"n": n}}) for n in (3, 7)]
    carbon = Carbon.start(tmp_path_factory.mktemp("carbon"))
    try:
        text = ("udp:\n  enabled: false\npoll:\n  interval: 1s\n  kernel_stats: false\n"
                "  netns: [" + ", ".join(m.ns.name for m in mixes) + "]\n"
                f"graphite:\n  enabled: true\n  address: 127.0.0.1:{carbon.port}\n  prefix: sw\n"
                "tcp_info:\n  enabled: true\nconnections:\n  enabled: true\n")  # their histograms too
        daemon = start_daemon(tmp_path, text)
        try:
            scrape = daemon.wait_polls(2) and daemon.scrape()
            buckets = [line for line in scrape.splitlines() if "_bucket{" in line]
            assert buckets and all('netns="' in line for line in buckets)
            lint = subprocess.run([promtool, "check", "metrics"], input=scrape.encode(),
                                  capture_output=True, timeout=60)
            assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint
            want = {f"sw.netns.{m.ns.name}.tcp.states.ipv4.established": _ss_counts(m.ns)["ipv4/established"]
                    for m in mixes}
            assert sorted(want.values()) == [6, 14]
            deadline = time.monotonic() + 20
            got: dict = {}
            while time.monotonic() < deadline:
                points = carbon.points()
                got = {k: points[k][max(points[k])] for k in want if points.get(k)}
                if got == want:
                    break
                time.sleep(0.5)
            assert got == want, (got, want, daemon.log())
            assert any(k.startswith("sw.sockscope.netns.") and k.endswith(".dump_duration_seconds")
                       for k in carbon.points())
            # two namespaces, every feature, 1 s pushes: the default buffer reaches its ceiling
            assert "graphite.buffer_lines: 0 is capped at 2000000 lines" in daemon.log()
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        carbon.close()


def test_a_sweep_result_serves_where_a_snapshot_did():
    """PollStatus.snapshot in a sweep is the SweepResult: sd_notify's STATUS line, the
    self-metrics and the Graphite cadence read its summary fields."""
    from sockscope import sdnotify, selfmetrics
    from sockscope.snapshot import PollStatus
    from sockscope.sweep import SweepResult

    result = SweepResult(1000.0, 0.25, (), 6, 1, 0, 0, 1, 0.01, ("ipv4",),
                         {("ipv4", "established"): 40, ("ipv4", "listen"): 4}, ())
    status = PollStatus(results={"netns": result}, last_success_monotonic=5.0, polls=1)
    assert status.snapshot is result
    assert sdnotify.status_text(status).startswith("44 TCP sockets (40 established, 4 listen)")
    poll = selfmetrics.poll_samples(status, 5.0)
    assert poll.value("sockscope_poll_sockets") == 44 and poll.value("sockscope_poll_duration_seconds") == 0.25
    assert selfmetrics.scrape_samples(status, 15.0, 6.0).value("sockscope_up") == 1


LISTENER = r"""
import socket, sys, time
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
time.sleep(60)
"""


def test_owners_in_a_sweep_are_found_per_namespace(tmp_path, netns_factory):
    """Socket inodes are unique across namespaces, and each lane's /proc scan (the host's
    /proc: the sweep enters only the network namespace) finds its listener's process, under
    its namespace's label."""
    spaces = [netns_factory() for _ in range(2)]
    holders = []
    try:
        for ns, port in zip(spaces, (18620, 18621)):
            p = ns.popen([sys.executable, "-c", LISTENER, str(port)], stdout=subprocess.PIPE, text=True)
            holders.append(p)
            assert p.stdout.readline().strip() == "ready"
        config_text = ("udp:\n  enabled: false\nowners:\n  enabled: true\n"
                       "poll:\n  interval: 200ms\n  netns: [" + ", ".join(ns.name for ns in spaces) + "]\n")
        daemon = start_daemon(tmp_path, config_text)
        try:
            s = daemon.wait_polls(2)
            comm = os.path.basename(sys.executable)[:15]
            owners = {(dict(labels)["netns"], dict(labels)["port"], dict(labels)["process"])
                      for (name, labels), v in s.items() if name == "sockscope_tcp_listen_owner_info" and v == 1}
            assert owners == {(spaces[0].name, "18620", comm), (spaces[1].name, "18621", comm)}, owners
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        for p in holders:
            stop_process(p)


def test_one_proc_scan_per_sweep_serves_every_lane(netns_factory):
    """Socket inodes are unique across namespaces: the first lane of a sweep scans /proc for
    every socket inode, the others are answered from that scan (owners.interval 1: a scan
    each poll, one per sweep however many lanes)."""
    from sockscope.features.owners import ProcessOwners
    from sockscope.service import Service

    spaces = [netns_factory() for _ in range(3)]
    holders = []
    try:
        for ns, port in zip(spaces, (18630, 18631, 18632)):
            p = ns.popen([sys.executable, "-c", LISTENER, str(port)], stdout=subprocess.PIPE, text=True)
            holders.append(p)
            assert p.stdout.readline().strip() == "ready"
        cfg = config.from_mapping({"udp": {"enabled": False}, "prometheus": {"enabled": False},
                                   "owners": {"enabled": True, "interval": 1},
                                   "poll": {"kernel_stats": False, "netns": [ns.name for ns in spaces]}})
        service = Service(cfg)
        try:
            sweep = service.features[0]
            for _ in range(2):
                status = _poll(service)
            assert sweep._owner_scan.scans == 2  # one per sweep, not one per lane
            owners = [f for lane in sweep.lanes.values() for f in lane.poller.features
                      if isinstance(f, ProcessOwners)]
            assert len(owners) == 3 and all(f.scans == 2 for f in owners)
            comm = os.path.basename(sys.executable)[:15]
            metric = status.samples.metrics["sockscope_tcp_listen_owner_info"]
            rows = [dict(zip(metric.labels, labels)) for labels, v in status.samples.get(metric.name) if v == 1]
            got = {(r["netns"], r["port"], r["process"]) for r in rows}
            assert got == {(ns.name, str(port), comm) for ns, port in zip(spaces, (18630, 18631, 18632))}, got
        finally:
            service.poller.stop()
            for f in service.poller.features:
                f.close()
    finally:
        for p in holders:
            stop_process(p)
