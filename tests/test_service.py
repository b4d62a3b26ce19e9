"""The daemon as systemd runs it: sd_notify over a real NOTIFY_SOCKET (READY, STATUS,
WATCHDOG, RELOADING, STOPPING), a wedged poller starving the watchdog, SIGHUP reloads,
SIGTERM/SIGINT, JSON logs, and running unprivileged with no capabilities."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import require, require_root
from daemon_helpers import Daemon, free_port, samples, scrape, start_daemon
from service_helpers import WEDGE_DRIVER, NotifyListener

STOP_BOUND = 8.0  # Service waits at most 5 s for a wedged poll; TimeoutStopSec is 30 s


def env_with(**extra) -> dict:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env | extra


def stop_within(d: Daemon, sig=signal.SIGTERM, bound: float = STOP_BOUND) -> float:
    started = time.monotonic()
    d.proc.send_signal(sig)
    try:
        rc = d.proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait(5)
        pytest.fail(f"sockscope did not stop within {bound}s:\n{d.log()}")
    assert rc == 0, d.log()
    return time.monotonic() - started


def test_ready_watchdog_and_a_wedged_poller(tmp_path):
    with NotifyListener(tmp_path) as n:
        env = env_with(NOTIFY_SOCKET=n.address, WATCHDOG_USEC="600000")  # ping every 0.3 s
        d = start_daemon(tmp_path, "poll:\n  interval: 100ms\n", env=env, program=(WEDGE_DRIVER,),
                         wait_up=False)
        try:
            t_ready, fields = n.wait_for("READY=1", timeout=20)
            # READY means: port bound and a good poll published. Scrape at once.
            s = samples(d.scrape())
            assert s[("sockscope_up", ())] == 1.0
            assert fields["MAINPID"] == str(d.proc.pid)
            assert re.match(r"\d+ TCP sockets .* poll took [\d.]+ ms$", fields["STATUS"]), fields
            assert n.times("READY", "1") == [t_ready]

            pings = _wait(lambda: (p := n.times("WATCHDOG", "1", after=t_ready))[4:] and p,
                          timeout=6.0, what="5 watchdog pings")
            gaps = [b - a for a, b in zip(pings, pings[1:])]
            assert all(0.25 <= g <= 0.7 for g in gaps), gaps
            assert any(f.get("STATUS", "").endswith("ms") for t, f in n.messages if t > t_ready)

            d.proc.send_signal(signal.SIGUSR1)  # every poll from now on blocks in the reader
            t_wedge = time.monotonic()
            time.sleep(2.0)
            late = n.times("WATCHDOG", "1", after=t_wedge + 0.5)
            assert late == [], f"WATCHDOG=1 kept coming from a wedged poller: {late}"
            polls = samples(d.scrape())[("sockscope_polls_total", ())]
            time.sleep(0.3)
            assert samples(d.scrape())[("sockscope_polls_total", ())] == polls  # really wedged

            t_stop = time.monotonic()
            took = stop_within(d)
            n.wait_for("STOPPING=1", timeout=1, after=t_stop)
            assert "shutting down" in d.log()
            print(f"\nwedged daemon stopped in {took:.2f}s")
        finally:
            d.stop()


def test_no_ready_while_polls_fail(tmp_path):
    with NotifyListener(tmp_path, abstract=True) as n:
        d = start_daemon(tmp_path, "poll:\n  interval: 200ms\n", env=env_with(NOTIFY_SOCKET=n.address),
                         netns=str(tmp_path / "no-such-netns"), wait_up=False)
        try:
            deadline = time.monotonic() + 10
            failed = []
            while time.monotonic() < deadline and not failed:
                failed = [f for _, f in n.messages if f.get("STATUS", "").startswith("poll failed")]
                time.sleep(0.1)
            assert failed and "no-such-netns" in failed[0]["STATUS"], n.messages
            time.sleep(1.0)
            assert n.times("READY", "1") == []
            assert samples(d.scrape())[("sockscope_up", ())] == 0.0  # bound, but not ready
            # The same failure, polled 5 times a second, is logged once.
            assert d.log().count("poll failed") == 1, d.log()
            stop_within(d)
        finally:
            d.stop()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_sighup_reload(tmp_path):
    with NotifyListener(tmp_path) as n:
        d = start_daemon(tmp_path, "poll:\n  interval: 200ms\n  families: [ipv4, ipv6]\n",
                         env=env_with(NOTIFY_SOCKET=n.address))
        try:
            cfg_path = tmp_path / f"sockscope-{d.port}.yaml"
            s = samples(d.scrape())
            assert ("sockscope_tcp_sockets", (("family", "ipv6"), ("state", "established"))) in s
            assert not any(dict(k[1]).get("port") == "23456" for k in s)

            # A valid change: a new tracked port, IPv4 only, a new listen address.
            old_port, new_port = d.port, free_port()
            cfg_path.write_text("poll:\n  interval: 200ms\n  families: [ipv4]\n"
                                f"ports:\n  local: [23456]\n"
                                f"prometheus:\n  listen_address: 127.0.0.1:{new_port}\n")
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGHUP)
            t_reloading, _ = n.wait_for("RELOADING=1", timeout=10, after=t0)
            t_ready, _ = n.wait_for("READY=1", timeout=10, after=t_reloading)
            d.port = new_port
            s = _wait(lambda: (lambda s: s if ("sockscope_tcp_local_port_sockets",
                                                (("port", "23456"), ("state", "listen"))) in s else None)(
                samples(d.scrape())), 5, "port 23456 to be tracked")
            assert not any(dict(k[1]).get("family") == "ipv6" for k in s)
            with pytest.raises(OSError):
                scrape(f"http://127.0.0.1:{old_port}/metrics", timeout=2)

            # An invalid file: every problem logged, the running config stays.
            cfg_path.write_text("poll:\n  interval: -1s\n  familes: [ipv4]\nports:\n  local: [99999]\n")
            t1 = time.monotonic()
            d.proc.send_signal(signal.SIGHUP)
            t_reloading2, _ = n.wait_for("RELOADING=1", timeout=10, after=t1)
            n.wait_for("READY=1", timeout=10, after=t_reloading2)
            log = d.log()
            assert "poll.interval" in log
            assert "poll.familes: unknown key" in log
            assert "ports.local[0]" in log
            assert "reload refused (3 problems); the running configuration stays" in log
            before = samples(d.scrape())
            after = d.wait_polls(2)
            assert ("sockscope_tcp_local_port_sockets", (("port", "23456"), ("state", "listen"))) in after
            assert after[("sockscope_polls_total", ())] > before[("sockscope_polls_total", ())]
            stop_within(d)
        finally:
            d.stop()


def test_sigint_stops_and_logs_are_json(tmp_path):
    d = start_daemon(tmp_path, "poll:\n  interval: 200ms\n", env=env_with(),
                     extra_args=("--log.format", "json", "--log.level", "debug"))
    try:
        took = stop_within(d, signal.SIGINT, bound=5.0)
        assert took < 2.0
        lines = [json.loads(line) for line in d.log().splitlines() if line.strip()]
        assert {"time", "level", "logger", "msg"} <= set(lines[0])
        msgs = [ln["msg"] for ln in lines]
        assert "received SIGINT, shutting down" in msgs and msgs[-1] == "stopped"
        assert any(ln["level"] == "debug" for ln in lines)
    finally:
        d.stop()


# -- unprivileged -----------------------------------------------------------------------


def _caps(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    return dict(re.findall(r"^(Uid|Gid|CapEff|CapPrm|CapBnd|CapAmb|Groups):[ \t]*(.*)$", status, re.M))


def test_unprivileged_daemon_without_capabilities_sees_every_socket(sockmix, ss_figures):
    """As nobody with no capabilities, inside the namespace (joining one needs
    CAP_SYS_ADMIN, so `ip netns exec` enters it and setpriv drops everything)."""
    require_root()
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    require(shutil.which("curl") is not None, "needs curl")
    ns = sockmix.ns
    work = Path(tempfile.mkdtemp(prefix="sockscope-nobody-"))
    os.chmod(work, 0o755)  # pytest's tmp_path is 0700: nobody could not read the config
    try:
        prefix = ("ip", "netns", "exec", ns.name, "setpriv", "--reuid=nobody", "--regid=nogroup",
                  "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs")
        d = start_daemon(work, "poll:\n  interval: 200ms\n", prefix=prefix, env=env_with(),
                         wait_up=False)
        try:
            url = d.url

            def ns_scrape():
                r = ns.run(["curl", "-sf", "--max-time", "5", url])
                return samples(r.stdout) if r.returncode == 0 else None

            _wait(lambda: (ns_scrape() or {}).get(("sockscope_up", ())) == 1.0, 20, "the daemon in the netns")
            caps = _caps(d.proc.pid)
            assert caps["Uid"].split()[:2] == ["65534", "65534"], caps
            assert caps["Groups"] == ""
            for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
                assert int(caps[key], 16) == 0, caps

            mix_ports = {p for p in sockmix.ports}
            last = None
            for _ in range(5):  # the mix's SYN-SENT/TIME-WAIT timers can move between reads
                ours = ns_scrape()
                ss = ss_figures(ns)
                want = {(p, st): n for (p, st), n in ss.local_port_states.items() if p in mix_ports and n}
                got = {(int(dict(k[1])["port"]), dict(k[1])["state"]): v for k, v in ours.items()
                       if k[0] == "sockscope_tcp_local_port_sockets" and v
                       and dict(k[1])["port"].isdigit() and int(dict(k[1])["port"]) in mix_ports}
                last = (got, want)
                if got == want:
                    break
                time.sleep(0.3)
            got, want = last
            assert got == want
            assert len({st for _, st in want}) >= 5, want  # the mix holds every state
            stop_within(d)
        finally:
            d.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- in process: Service.reload ------------------------------------------------------------


class _FakeReader:
    def __init__(self, name):
        self.name = name
        self.closed_by = None
        self.polled_by = set()

    def poll(self, start):
        import threading
        from sockscope.netlink import DumpStats

        self.polled_by.add(threading.current_thread().name)
        start()([])
        return DumpStats(("ipv4",), 0, 0, 0)

    def close(self):
        import threading
        self.closed_by = threading.current_thread().name


def test_reload_swaps_reader_in_the_poller_thread_and_rebinds_the_same_port():
    from sockscope import config
    from sockscope.service import Service

    port = free_port()
    cfg = config.from_mapping({"poll": {"interval": "50ms"},
                               "prometheus": {"listen_address": f":{port}"}})
    readers = []

    def factory(c):
        readers.append(_FakeReader(len(readers)))
        return readers[-1]

    service = Service(cfg, reader_factory=factory)
    service.start()
    try:
        first_server = service.server
        # Same port, another host: Linux refuses 127.0.0.1:P while [::]:P listens, so the
        # old listener is closed first and the new one bound.
        new = config.from_mapping({"poll": {"interval": "50ms", "families": ["ipv4"]},
                                   "prometheus": {"listen_address": f"127.0.0.1:{port}"}})
        service.reload(new)
        assert service.server is not first_server and service.server.port == port
        assert "sockscope_up" in scrape(f"http://127.0.0.1:{port}/metrics")
        _wait(lambda: readers[0].closed_by is not None and readers[1].polled_by, 5, "the reader swap")
        assert readers[0].closed_by == "sockscope-poller"
        assert readers[1].polled_by == {"sockscope-poller"}
        assert service.poller.interval == 0.05 and service.cfg is new
        # A port somebody else holds: nothing changes.
        import socket as socketmod
        with socketmod.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            bad = config.from_mapping({"poll": {"interval": "1s"},
                                       "prometheus": {"listen_address": f"127.0.0.1:{taken}"}})
            with pytest.raises(OSError):
                service.reload(bad)
        assert service.cfg is new and service.server.port == port
        assert "sockscope_up" in scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        service.stop()
