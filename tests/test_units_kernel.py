"""The units feature against the real kernel: cgroups made by the test under the machine's
cgroup2 mount (found in /proc/self/mountinfo), a process in each (its pid written to
cgroup.procs before it opens a socket), in a test network namespace:

- web (a `.scope` cgroup): a listener with 30 ESTABLISHED + 5 CLOSE-WAIT accepted sockets;
- db (a plain cgroup: its label is the path): a listener with 12 ESTABLISHED;
- clients (a third cgroup): the 47 client ends (42 ESTABLISHED, 5 FIN-WAIT-2).

The unit series equal those counts, and what `ss -tan --cgroup` reports per cgroup (run
with `nsenter --net`: `ip netns exec` remounts /sys and ss then prints `unreachable`).
Accepted sockets are the listener's cgroup's even though no client-side process is in it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

from sockscope.cgroupmap import find_mount
from sockscope.cgroups import unit_label
from sockscope.states import TcpState
from support.inprocess import InProcessPoller
from support.prereq import require

WEB_PORT, DB_PORT = 18411, 18412
SERVER = r"""
import socket, struct, sys
sys.stdin.readline()  # placed in its cgroup by now: the listener is created there
port, n = int(sys.argv[1]), int(sys.argv[2])
l = socket.socket()
l.bind(("127.0.0.1", port))
l.listen(128)
print("listening", flush=True)
held = []
for _ in range(n):
    c, _ = l.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # exit: RST, no leftovers
    held.append(c)
print("accepted", flush=True)
sys.stdin.readline()
"""
CLIENT = r"""
import socket, struct, sys
sys.stdin.readline()
held = []
for spec in sys.argv[1:]:  # port:count:shut
    port, count, shut = map(int, spec.split(":"))
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if i < shut:
            s.shutdown(socket.SHUT_WR)  # the server's end goes CLOSE-WAIT, ours FIN-WAIT-2
        held.append(s)
print("connected", flush=True)
sys.stdin.readline()
"""
SHOWN = {s.shown: s.label for s in TcpState}  # ss's State column -> our state label


class Cgroup:
    def __init__(self, mount: str, name: str) -> None:
        self.rel = "/" + name
        self.dir = os.path.join(mount, name)
        os.mkdir(self.dir)

    @property
    def label(self) -> str:
        return unit_label(self.rel)

    def adopt(self, pid: int) -> None:
        with open(os.path.join(self.dir, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while os.path.isdir(self.dir):
            try:
                os.rmdir(self.dir)
            except OSError:  # EBUSY until the exited processes are gone from it
                assert time.monotonic() < deadline, f"cannot remove {self.dir}"
                time.sleep(0.05)


def start(ns, script: str, args: list[str], cgroup: Cgroup, ready: str) -> subprocess.Popen:
    p = ns.popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cgroup.adopt(p.pid)  # `ip netns exec` execs python: the pid is the script's
    p.stdin.write("go\n")
    p.stdin.flush()
    line = p.stdout.readline().strip()
    assert line == ready, line
    return p


def finish(p: subprocess.Popen) -> None:
    p.stdin.write("exit\n")
    p.stdin.flush()
    p.wait(timeout=10)


def ss_by_cgroup(ns) -> dict[str, Counter]:
    """cgroup path -> Counter of state labels, from `ss -tan --cgroup` in the namespace
    (entered with nsenter --net: /sys stays the host's); TIME-WAIT lines name no cgroup."""
    out = subprocess.run(["nsenter", f"--net={ns.path}", "ss", "-tanH", "--cgroup"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    got: dict[str, Counter] = {}
    for line in out.splitlines():
        fields = line.split()
        path = fields[-1].removeprefix("cgroup:") if fields[-1].startswith("cgroup:") else "none"
        got.setdefault(path, Counter())[SHOWN[fields[0]]] += 1
    return got


def series(samples, name: str = "sockscope_tcp_unit_sockets") -> dict[str, Counter]:
    got: dict[str, Counter] = {}
    for labels, value in samples.get(name):
        c = got.setdefault(labels[0], Counter())
        if value:
            c[labels[1]] += int(value)
    return got


def unit_poller(ns, max_tracked: int, tcp_info: bool = False) -> InProcessPoller:
    return InProcessPoller({"poll": {"netns": ns.name, "kernel_stats": False, "peak_window": 0},
                            "udp": {"enabled": False}, "tcp_info": {"enabled": tcp_info},
                            "units": {"enabled": True, "max_tracked": max_tracked}}, source="tcp")


@pytest.fixture
def world(netns_factory):
    mount = find_mount()
    require(mount is not None, "needs a cgroup2 mount (cgroup v2 or a hybrid layout)")
    assert mount is not None
    require(os.access(mount, os.W_OK), f"needs a writable cgroup2 mount at {mount} (to make test cgroups)")
    require(shutil.which("nsenter") is not None, "needs nsenter (util-linux)")
    ns = netns_factory()
    tag = f"sockscope-test-{os.getpid()}-{ns.name.rsplit('-', 1)[-1]}"
    groups = {}
    procs = []
    try:
        groups = {"web": Cgroup(mount, f"{tag}-web.scope"), "db": Cgroup(mount, f"{tag}-db"),
                  "clients": Cgroup(mount, f"{tag}-clients")}
        procs.append(start(ns, SERVER, [str(WEB_PORT), "35"], groups["web"], "listening"))
        procs.append(start(ns, SERVER, [str(DB_PORT), "12"], groups["db"], "listening"))
        procs.append(start(ns, CLIENT, [f"{WEB_PORT}:35:5", f"{DB_PORT}:12:0"], groups["clients"], "connected"))
        for p in procs[:2]:
            assert p.stdout.readline().strip() == "accepted"
        yield ns, groups, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        ns.delete()
        for g in groups.values():
            g.remove()


def settled(ns, want_close_wait: int) -> dict[str, Counter]:
    deadline = time.monotonic() + 10
    while True:  # the FINs of the shut-down clients are in flight for a moment
        got = ss_by_cgroup(ns)
        if sum(c["close_wait"] for c in got.values()) == want_close_wait or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_unit_series_equal_the_mix_and_ss_per_cgroup(world):
    ns, groups, procs = world
    ss = settled(ns, 5)
    web, db, clients = groups["web"], groups["db"], groups["clients"]
    assert web.label == web.rel[1:] and db.label == db.rel  # a .scope is its name; a plain cgroup its path
    p = unit_poller(ns, max_tracked=64)
    try:
        got = series(p.poll())
    finally:
        p.close()
    assert got[web.label] == Counter(listen=1, established=30, close_wait=5)
    assert got[db.label] == Counter(listen=1, established=12)
    assert got[clients.label] == Counter(established=42, fin_wait2=5)
    assert got["none"] == Counter() and got["other"] == Counter()
    assert set(got) == {web.label, db.label, clients.label, "none", "other"}
    # ss per cgroup path, folded by the same labels: the same figures
    by_label: dict[str, Counter] = {}
    for path, c in ss.items():
        by_label.setdefault("none" if path == "none" else unit_label(path), Counter()).update(c)
    assert {u: c for u, c in got.items() if c} == by_label


def test_the_cap_keeps_the_biggest_units_and_a_removed_cgroup_disappears(world):
    ns, groups, procs = world
    settled(ns, 5)
    web, db, clients = groups["web"], groups["db"], groups["clients"]
    capped = unit_poller(ns, max_tracked=2)
    p = unit_poller(ns, max_tracked=64)
    try:
        samples = capped.poll()
        got = series(samples)
        # clients 47 sockets, web 36, db 13: db is folded
        assert set(got) == {clients.label, web.label, "none", "other"}
        assert got["other"] == Counter(listen=1, established=12)
        assert samples.value("sockscope_folded_units") == 1
        listeners = {labels for labels, _ in samples.get("sockscope_tcp_listen_unit_info")}
        assert listeners == {("127.0.0.1", str(WEB_PORT), web.label), ("127.0.0.1", str(DB_PORT), db.label)}
        assert samples.value("sockscope_tcp_unit_receive_queue_bytes", web.label) == 5  # each CLOSE-WAIT: the FIN
        assert series(p.poll())[db.label] == Counter(listen=1, established=12)
        finish(procs[1])  # db exits: its accepted sockets reset (SO_LINGER 0), its listener closes
        db.remove()
        deadline = time.monotonic() + 10
        while db.label in (now := series(p.poll())):
            assert time.monotonic() < deadline, now[db.label]
            time.sleep(0.1)
        assert now[web.label] == Counter(listen=1, established=30, close_wait=5)
        assert now[clients.label]["established"] == 30  # the 12 db clients were reset
    finally:
        capped.close()
        p.close()


# The CLI as nobody with no capability. Imported first as root: a checkout under a
# private home (a CI runner's /root) is unreadable to nobody, the imports are not.
AS_NOBODY = r"""
import locale, os, sys  # argparse's gettext imports locale when it first runs
from sockscope import cli
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_snapshot_names_the_unit_of_each_listener_and_close_wait_socket(world):
    """`sockscope snapshot` (units on by default) as an unprivileged user: the units come
    from the dump's cgroup ids, no /proc scan."""
    ns, groups, _ = world
    settled(ns, 5)
    web, db = groups["web"], groups["db"]
    # entering the namespace needs CAP_SYS_ADMIN: nsenter does it, then the CLI drops to nobody
    argv = ["nsenter", f"--net={ns.path}", sys.executable, "-c", AS_NOBODY, "snapshot"]
    r = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["owners"]["collected"] is False or report["owners"]["complete"] is False  # no privilege
    units = {(lst["port"]): lst["units"] for lst in report["listeners"]}
    assert units == {WEB_PORT: [web.label], DB_PORT: [db.label]}
    assert report["close_wait_units"] == [{"port": WEB_PORT, "units": [{"unit": web.label, "sockets": 5}]}]
    text = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    block = text.split("CLOSE-WAIT BY UNIT", 1)[1].splitlines()
    assert block[1].split() == ["PORT", "UNIT", "SOCKETS"] and block[2].split() == [str(WEB_PORT), web.label, "5"]
    assert any(db.label in line.split() for line in text.split("LISTENERS", 1)[1].splitlines()
               if f":{DB_PORT}" in line)


def test_with_tcp_info_the_units_oldest_close_wait_agrees_with_ss_lastack(world):
    ns, groups, _ = world
    settled(ns, 5)
    web, db = groups["web"], groups["db"]
    time.sleep(0.3)  # ages well above ss's millisecond rounding
    p = unit_poller(ns, max_tracked=64, tcp_info=True)
    try:
        start = time.monotonic()
        out = subprocess.run(["nsenter", f"--net={ns.path}", "ss", "-tinH", "state", "close-wait", "cgroup",
                              web.rel], capture_output=True, text=True, check=True, timeout=30).stdout
        samples = p.poll()
        took = time.monotonic() - start  # ss, then the poll: the ages grew by at most this
    finally:
        p.close()
    before = max(int(m) for m in re.findall(r"lastack:(\d+)", out)) / 1000
    age = samples.value("sockscope_tcp_unit_oldest_close_wait_seconds", web.label)
    assert before - 0.002 <= age <= before + took + 0.002, (before, age, took)
    assert samples.value("sockscope_tcp_unit_oldest_close_wait_seconds", db.label) == 0
