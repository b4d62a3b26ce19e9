"""features/owners.py: process owners of listeners and CLOSE-WAIT sockets, as series.

Real kernel: processes started in a test namespace, the daemon's poll of that namespace,
the host's /proc. Fake /proc trees only for the scan schedule and the join rules.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest

from sockscope import config, features
from sockscope.aggregate import Rules
from sockscope.batch import Batch
from sockscope.cgroups import proc_cgroup_path, unit_label
from sockscope.features.owners import UNKNOWN_UNIT, ProcessOwners
from sockscope.netlink import DumpStats
from sockscope.owners import find_owners
from sockscope.poller import Poller
from support.daemon import start_daemon
from support.inprocess import InProcessPoller
from support.prereq import require

LISTEN_OWNER = "sockscope_tcp_listen_owner_info"
CW_OWNER = "sockscope_tcp_local_port_close_wait_owner_sockets"
ALL_CAPS = (1 << 41) - 1

# --- fake /proc: the scan schedule and the join --------------------------------------


def make_proc(root, processes):
    """{pid: {"comm": str, "cgroup": str | None, "fds": {fd: target}}} as a fake /proc."""
    for pid, spec in processes.items():
        d = root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "comm").write_text(spec["comm"] + "\n")
        (d / "status").write_text("Uid:\t0\t0\t0\t0\n")
        if spec.get("cgroup") is not None:
            (d / "cgroup").write_text(spec["cgroup"])
        for fd, target in spec.get("fds", {}).items():
            os.symlink(target, d / "fd" / str(fd))
    return str(root)


class TableReader:
    """A hand-made TCP dump: (state, sport, inode) rows on 127.0.0.1."""

    def __init__(self, rows):
        self.rows = rows

    def poll(self, start, states=None):
        sink = start()
        lo = socket.inet_aton("127.0.0.1") + bytes(12)
        sink(Batch.from_records([(socket.AF_INET, state, sport, 0 if state == 10 else 40000 + i, lo,
                                  bytes(16) if state == 10 else lo, 0, 0, 0, inode)
                                 for i, (state, sport, inode) in enumerate(self.rows)]))
        return DumpStats(("ipv4",), len(self.rows), 0, 0)

    def close(self):
        pass


def fake_poller(proc, rows, **kw):
    listed = []

    def listdir(path):
        listed.append(path)
        return os.listdir(path)

    feature = ProcessOwners(Rules(), proc_root=proc, scan=partial(find_owners, listdir=listdir), caps=ALL_CAPS,
                            **kw)
    poller = Poller([feature], {socket.IPPROTO_TCP: TableReader(rows)}, 1.0)
    return poller, feature, listed


NGINX = "0::/system.slice/nginx.service\n"


def test_the_scan_runs_every_interval_polls_and_the_answer_is_reused_between(tmp_path):
    proc = make_proc(tmp_path, {10: {"comm": "nginx", "cgroup": NGINX, "fds": {3: "socket:[100]"}}})
    poller, feature, listed = fake_poller(proc, [(10, 80, 100)], interval=3)
    for n in range(1, 8):
        status = poller.poll()
        assert status.last_error is None and status.sources["owners"].up
        assert status.samples.get(LISTEN_OWNER) == [(("127.0.0.1", "80", "nginx", "nginx.service"), 1.0)]
        # /proc itself is listed once per scan: polls 1, 4 and 7
        assert listed.count(proc) == feature.scans == 1 + (n - 1) // 3
        assert status.samples.value("sockscope_owners_scans") == feature.scans


def test_a_scan_longer_than_max_scan_time_is_read_over_several_polls(tmp_path):
    """With the real scan and a clock that moves 1 s per reading, max_scan_time 0.5 s lets
    each poll read one process: the round over 3 processes ends at the 4th poll (the 3rd
    reads the last process and is out of time before it can tell), the answer stands
    meanwhile (none yet: the first round), and the next round starts `interval` polls later."""
    proc = make_proc(tmp_path, {10: {"comm": "idle", "cgroup": NGINX, "fds": {3: "/dev/null"}},
                                11: {"comm": "idle", "cgroup": NGINX, "fds": {3: "/dev/null"}},
                                12: {"comm": "nginx", "cgroup": NGINX, "fds": {3: "socket:[100]"}}})
    ticks = iter(range(10**6))
    feature = ProcessOwners(Rules(), proc_root=proc, caps=ALL_CAPS, interval=6, max_scan_time=0.5,
                            monotonic=lambda: float(next(ticks)))
    poller = Poller([feature], {socket.IPPROTO_TCP: TableReader([(10, 80, 100)])}, 1.0)
    seen = []
    for _ in range(14):
        status = poller.poll()
        assert status.last_error is None and status.sources["owners"].up
        seen.append((len(status.samples.get(LISTEN_OWNER)), status.samples.value("sockscope_owners_scan_complete"),
                     status.samples.value("sockscope_owners_scans"), status.samples.value(
                         "sockscope_owners_unresolved_listeners")))
    # polls 1-3 read the first round; 10-12 the second (6 polls after the first ended), with
    # the first's answer standing; each ends at the next poll
    assert seen == [(0, 0, 0, 1)] * 3 + [(1, 1, 1, 0)] * 9 + [(1, 1, 2, 0)] * 2
    assert status.samples.value("sockscope_owners_scan_duration_seconds") > 0


def test_workers_with_one_name_and_unit_are_one_series_and_the_biggest_close_wait_holder_wins(tmp_path):
    proc = make_proc(tmp_path, {
        10: {"comm": "nginx", "cgroup": NGINX, "fds": {3: "socket:[100]", 4: "socket:[201]"}},
        11: {"comm": "nginx", "cgroup": NGINX, "fds": {3: "socket:[100]", 4: "socket:[202]", 5: "socket:[203]"}},
        12: {"comm": "php-fpm", "cgroup": "0::/system.slice/php.service\n",
             "fds": {3: "socket:[204]", 4: "socket:[205]"}},
        13: {"comm": "sidecar", "cgroup": None, "fds": {3: "socket:[100]", 4: "socket:[301]"}},
    })
    rows = [(10, 80, 100), (8, 80, 201), (8, 80, 202), (8, 80, 203), (8, 80, 204), (8, 80, 205),
            (8, 80, 206),  # no holder found
            (8, 5555, 301),  # not a tracked port: not looked for
            (10, 81, 400)]  # a listener nobody holds
    poller, feature, _ = fake_poller(proc, rows)
    got = poller.poll().samples
    assert sorted(got.get(LISTEN_OWNER)) == [(("127.0.0.1", "80", "nginx", "nginx.service"), 1.0),
                                            (("127.0.0.1", "80", "sidecar", UNKNOWN_UNIT), 1.0)]
    # nginx's two workers hold 3 CLOSE-WAIT sockets of port 80, php-fpm 2
    assert got.get(CW_OWNER) == [(("80", "nginx", "nginx.service"), 3.0)]
    assert got.value("sockscope_owners_unresolved_listeners") == 1
    assert got.value("sockscope_owners_scan_complete") == 1


def test_owners_per_listener_are_capped(tmp_path):
    procs = {10 + i: {"comm": f"w{i}", "cgroup": NGINX, "fds": {3: "socket:[100]"}} for i in range(6)}
    poller, feature, _ = fake_poller(make_proc(tmp_path, procs), [(10, 80, 100)], max_per_listener=2)
    assert [labels[2] for labels, _ in poller.poll().samples.get(LISTEN_OWNER)] == ["w0", "w1"]
    assert feature.max_series() == Rules().max_listeners * 2 + Rules().max_local + 4


def test_a_failing_scan_is_a_failed_source_not_a_failed_poll(tmp_path):
    def broken(*args, **kw):
        raise OSError("boom")

    feature = ProcessOwners(Rules(), scan=broken)
    poller = Poller([feature], {socket.IPPROTO_TCP: TableReader([(10, 80, 100)])}, 1.0)
    status = poller.poll()
    assert status.last_error is None
    assert not status.sources["owners"].up and status.source_errors["owners"] == 1
    assert status.samples.get(LISTEN_OWNER) == []


def test_config_defaults_and_registry():
    cfg = config.from_mapping({})
    assert (cfg.owners.enabled, cfg.owners.interval, cfg.owners.max_per_listener) == (False, 12, 4)
    assert "owners" not in [f.name for f in features.build(cfg)]
    on = config.from_mapping({"owners": {"enabled": True, "interval": 3}})
    feature = next(f for f in features.build(on) if f.name == "owners")
    assert feature.interval == 3
    assert features.changed_features({"owners.interval"}) == {"owners"}
    with pytest.raises(config.ConfigError, match="owners.interval"):
        config.from_mapping({"owners": {"interval": 0}})


def test_a_reload_turns_owners_on_and_off():
    from sockscope.service import Service

    base = {"poll": {"kernel_stats": False, "peak_window": 0}, "prometheus": {"enabled": False},
            "udp": {"enabled": False}}
    service = Service(config.from_mapping(base),
                      reader_factory=lambda cfg, need: TableReader([(10, 80, 4_000_000_000)]))
    try:
        assert "owners" not in service.poller.poll().sources
        service.reload(config.from_mapping({**base, "owners": {"enabled": True}}))
        status = service.poller.poll()
        assert status.sources["owners"].up
        assert status.samples.value("sockscope_owners_unresolved_listeners") == 1  # nobody holds that inode
        service.reload(config.from_mapping(base))
        status = service.poller.poll()
        assert "owners" not in status.sources and status.samples.get(LISTEN_OWNER) == []
    finally:
        service.stop()


def test_graphite_paths_of_owner_series_are_clean(tmp_path):
    from sockscope.graphite.lines import LineBuilder

    proc = make_proc(tmp_path, {10: {"comm": "my app.v2", "cgroup": "0::/user.slice/user-1000.slice/"
                                     "user@1000.service/app.slice/web.service\n", "fds": {3: "socket:[100]"}}})
    poller, _, _ = fake_poller(proc, [(10, 80, 100), (8, 80, 100)])
    status = poller.poll()
    lines = b"".join(LineBuilder(host="h").render(status, 1000).lines).decode().splitlines()
    owner = [ln for ln in lines if ".owner." in ln or ".close_wait_owner." in ln]
    assert owner == ["sockscope.h.tcp.listen.127_0_0_1_80.owner.user_1000_service_web_service.my_app_v2 1 1000",
                     "sockscope.h.tcp.local_port.80.close_wait_owner.user_1000_service_web_service.my_app_v2 1 1000"]


# --- real kernel ---------------------------------------------------------------------

HOLDER = r"""
import ctypes, json, os, socket, sys
opts = json.loads(sys.argv[1])
libc = ctypes.CDLL(None)
libc.prctl(15, opts["name"].encode(), 0, 0, 0)  # PR_SET_NAME: /proc/PID/comm
port = opts["port"]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(64)
clients, accepted = [], []
for _ in range(opts.get("close_wait", 0) + opts.get("child_close_wait", 0)):
    c = socket.create_connection(("127.0.0.1", port)); a, _ = s.accept(); c.shutdown(socket.SHUT_WR)
    clients.append(c); accepted.append(a)
child = 0
if opts.get("child_close_wait"):
    mine, theirs = accepted[:opts["close_wait"]], accepted[opts["close_wait"]:]
    child = os.fork()
    if child == 0:  # keeps only its share of the CLOSE-WAIT sockets
        libc.prctl(15, opts["child_name"].encode(), 0, 0, 0)
        for x in [s, *clients, *mine]:
            x.close()
        sys.stdin.read()
        os._exit(0)
    for x in theirs:
        x.close()
print(json.dumps({"event": "ready", "pid": os.getpid(), "child": child}), flush=True)
sys.stdin.read()
if child:
    os.waitpid(child, 0)
"""


def start_holder(ns, **opts):
    proc = ns.popen([sys.executable, "-c", HOLDER, json.dumps(opts)], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True)
    ready = json.loads(proc.stdout.readline())
    assert ready["event"] == "ready"
    return proc, ready


def stop_holder(proc):
    proc.stdin.close()
    proc.wait(timeout=10)


def unit_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        path = proc_cgroup_path(f.read())
    return UNKNOWN_UNIT if path is None else unit_label(path)


def ns_poller(ns, owners: dict | None = None) -> InProcessPoller:
    """In-process polls of one namespace with owners on; the features live across polls."""
    return InProcessPoller({"poll": {"netns": ns.name}, "udp": {"enabled": False},
                            "owners": {"enabled": True, "interval": 1, **(owners or {})}}, source="owners")


def snapshot_listener_owners(ns, port: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "sockscope", "snapshot", "--netns", ns.name, "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    listeners = json.loads(out)["listeners"]
    return next(ln["owners"] for ln in listeners if ln["port"] == port)


def test_listener_owner_is_the_child_process_and_a_restart_keeps_its_series(netns):
    p = ns_poller(netns)
    proc, ready = start_holder(netns, name="owner-lsn", port=18201)
    try:
        labels = {lab for lab, v in p.poll().get(LISTEN_OWNER) if lab[1] == "18201"}
        assert labels == {("127.0.0.1", "18201", "owner-lsn", unit_of(ready["pid"]))}
        assert not any(str(ready["pid"]) in part for lab in labels for part in lab)
        # the pid is in the snapshot (ss -ltnp's pid), not in the labels
        assert [(o["pid"], o["name"]) for o in snapshot_listener_owners(netns, 18201)] == \
            [(ready["pid"], "owner-lsn")]
        assert netns.run(["ss", "-ltnpH", "sport", "=", ":18201"]).stdout.count(f'pid={ready["pid"]},') == 1
        stop_holder(proc)
        proc, again = start_holder(netns, name="owner-lsn", port=18201)
        assert again["pid"] != ready["pid"]
        after = {lab for lab, v in p.poll().get(LISTEN_OWNER) if lab[1] == "18201"}
        assert after == labels  # same series: no new label set for the new pid
        assert [o["pid"] for o in snapshot_listener_owners(netns, 18201)] == [again["pid"]]
    finally:
        stop_holder(proc)
        p.close()


def test_the_process_holding_most_close_wait_sockets_is_the_ports_owner(netns):
    p = ns_poller(netns)
    proc, ready = start_holder(netns, name="cw-holder", port=18202, close_wait=5,
                               child_close_wait=2, child_name="cw-few")
    try:
        ss = netns.run(["ss", "-tnpH", "state", "close-wait", "sport", "=", ":18202"]).stdout
        assert ss.count(f'pid={ready["pid"]},') == 5 and ss.count(f'pid={ready["child"]},') == 2
        got = p.poll()
        assert got.get(CW_OWNER) == [(("18202", "cw-holder", unit_of(ready["pid"])), 5.0)]
        assert got.value("sockscope_tcp_local_port_sockets", "18202", "close_wait") == 7
    finally:
        stop_holder(proc)
        p.close()


def test_without_ptrace_the_scan_is_partial_says_so_once_and_never_crashes(netns, tmp_path):
    require(os.geteuid() == 0, "needs root to drop capabilities")
    proc, ready = start_holder(netns, name="owner-root", port=18203)
    drop = "-sys_ptrace,-dac_read_search"
    daemon = start_daemon(tmp_path, "poll:\n  interval: 0.2s\nudp:\n  enabled: false\n"
                          "owners:\n  enabled: true\n  interval: 1\n", netns=netns.name,
                          prefix=("setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"))
    try:
        with open(f"/proc/{daemon.pid}/status") as f:
            caps = int(re.search(r"CapEff:\s*([0-9a-f]+)", f.read()).group(1), 16)
        assert not caps & (1 << 19) and not caps & (1 << 2) and caps & (1 << 21)  # no PTRACE/DAC_READ_SEARCH
        samples = daemon.wait_polls(5)
        assert samples[("sockscope_owners_scan_complete", ())] == 0
        assert samples[("sockscope_owners_scans_total", ())] >= 5
        assert samples[("sockscope_source_up", (("source", "owners"),))] == 1
        assert samples[("sockscope_owners_unresolved_listeners", ())] >= 1  # root's listener: refused
        assert not [k for k in samples if k[0] == LISTEN_OWNER and ("port", "18203") in k[1]]
        assert daemon.proc.poll() is None
        partial_lines = [ln for ln in daemon.log().splitlines() if "process owner scan: partial" in ln]
        assert len(partial_lines) == 1, daemon.log()
        assert "CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE" in partial_lines[0]
    finally:
        daemon.stop()
        stop_holder(proc)


def test_the_scan_costs_show_in_the_source_duration(netns):
    p = ns_poller(netns, {"interval": 2})
    proc, _ = start_holder(netns, name="owner-cost", port=18204)
    try:
        durations, scans, scan_seconds = [], [], []
        for _ in range(6):
            status = p.poller.poll()
            durations.append(status.sources["owners"].duration)
            scans.append(status.samples.value("sockscope_owners_scans"))
            scan_seconds.append(status.samples.value("sockscope_owners_scan_duration_seconds"))
        assert scans == [1, 1, 2, 2, 3, 3]
        # the scan runs inside the source's timed part
        assert all(durations[i] >= scan_seconds[i] > 0 for i in (0, 2, 4))
        # a scan reads every process's fds; a poll between scans only joins arrays
        assert np.median(durations[0::2]) > np.median(durations[1::2])
    finally:
        stop_holder(proc)
        p.close()


def test_series_disappear_with_their_listener(netns):
    p = ns_poller(netns, {"interval": 100})
    proc, _ = start_holder(netns, name="owner-gone", port=18205)
    try:
        assert [lab for lab, _ in p.poll().get(LISTEN_OWNER) if lab[1] == "18205"]
        stop_holder(proc)
        time.sleep(0.1)
        # no new scan (interval 100): the listener is gone from the dump, so is its series
        assert not [lab for lab, _ in p.poll().get(LISTEN_OWNER) if lab[1] == "18205"]
    finally:
        if proc.poll() is None:
            stop_holder(proc)
        p.close()
