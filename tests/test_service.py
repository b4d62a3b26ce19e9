"""The daemon as systemd runs it: sd_notify over a real NOTIFY_SOCKET (READY, STATUS,
WATCHDOG, RELOADING, STOPPING), a wedged poller starving the watchdog, a failing or dying
poller, SIGHUP reloads (onto hostile files too), SIGTERM/SIGINT, SIGUSR1/SIGUSR2, JSON
logs, and running unprivileged with no capabilities."""

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

from support.daemon import Daemon, free_port, samples, scrape, start_daemon
from support.prereq import require, require_root
from support.service import WEDGE_DRIVER, NotifyListener

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

            d.proc.send_signal(signal.SIGRTMIN)  # every poll from now on blocks in the reader
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

    def poll(self, start, states=None):
        import threading

        from sockscope.batch import Batch
        from sockscope.netlink import DumpStats

        self.polled_by.add(threading.current_thread().name)
        start()(Batch.from_records([]))
        return DumpStats(("ipv4",), 0, 0, 0)

    def close(self):
        import threading
        self.closed_by = threading.current_thread().name


def test_reload_swaps_reader_in_the_poller_thread_and_rebinds_the_same_port():
    from sockscope import config
    from sockscope.service import Service

    port = free_port()
    cfg = config.from_mapping({"poll": {"interval": "100ms"},
                               "prometheus": {"listen_address": f":{port}"}})
    readers = []

    def factory(c, need):
        readers.append(_FakeReader(len(readers)))
        return readers[-1]

    service = Service(cfg, reader_factory=factory)
    service.start()
    try:
        first_server = service.server
        # Same port, another host: Linux refuses 127.0.0.1:P while [::]:P listens, so the
        # old listener is closed first and the new one bound.
        new = config.from_mapping({"poll": {"interval": "100ms", "families": ["ipv4"]},
                                   "prometheus": {"listen_address": f"127.0.0.1:{port}"}})
        service.reload(new)
        assert service.server is not first_server and service.server.port == port
        assert "sockscope_up" in scrape(f"http://127.0.0.1:{port}/metrics")
        _wait(lambda: readers[0].closed_by is not None and readers[1].polled_by, 5, "the reader swap")
        assert readers[0].closed_by == "sockscope-poller"
        assert readers[1].polled_by == {"sockscope-poller"}
        assert service.poller.interval == 0.1 and service.cfg is new
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


# -- issue 9: hostile reloads, a failing or dying poller, SIGUSR1/SIGUSR2 ----------------------


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def _wait_log(d: Daemon, text: str, count: int, timeout: float = 10.0) -> str:
    """The log once `text` occurs `count` times in it (fails after timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.log()
        if log.count(text) >= count:
            return log
        if d.proc.poll() is not None:
            pytest.fail(f"sockscope exited with {d.proc.returncode}:\n{log[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"{text!r} not logged {count} times within {timeout}s:\n{d.log()[-3000:]}")


def _alias_bomb() -> str:
    lines = ["anchors:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\npoll:\n  netns: *l8\n"


def test_sighup_onto_hostile_files_keeps_the_running_configuration(tmp_path):
    """Before: the alias bomb held the GIL (no /metrics, no polls) while RSS grew ~200 MB/s
    and SIGTERM was ignored; the FIFO blocked the main thread; /dev/zero ate memory; the
    deep file and a constructor error in the web config ended the daemon with a traceback."""
    web = tmp_path / "web.yml"
    web.write_text("# plain HTTP, no users\n")
    good = "poll:\n  interval: 200ms\nports:\n  local: [23456]\n"
    d = start_daemon(tmp_path, good, env=env_with(), extra_args=("--web.config.file", str(web)))
    tracked = ("sockscope_tcp_local_port_sockets", (("port", "23456"), ("state", "listen")))
    try:
        cfg = d.config_path
        good_text = cfg.read_text()
        rss_start = _rss_kib(d.pid)
        cases = [
            ("alias bomb", lambda: cfg.write_text(_alias_bomb()),
             "YAML refused: the document expands to more than 20,000 nodes"),
            ("deep nesting", lambda: cfg.write_text("poll:\n  families: " + "[ " * 2000 + "]" * 2000 + "\n"),
             "nested more than 32 levels deep"),
            ("!!bool maybe", lambda: cfg.write_text("poll:\n  kernel_stats: !!bool maybe\n"),
             "poll.kernel_stats: line 2, column 17: invalid YAML: cannot read 'maybe' as !!bool"),
            ("FIFO", lambda: (cfg.unlink(), os.mkfifo(cfg)), "cannot read file: a FIFO, not a regular file"),
            ("/dev/zero", lambda: (cfg.unlink(), cfg.symlink_to("/dev/zero")),
             "cannot read file: a character device, not a regular file"),
            ("web config", lambda: (cfg.unlink(), cfg.write_text(good_text),
                                    web.write_text("basic_auth_users:\n  u: !!binary 'zz!'\n")),
             "basic_auth_users.u: line 2, column 6: invalid YAML: failed to decode base64"),
            ("bcrypt cost", lambda: web.write_text("basic_auth_users:\n  u: $2b$99$" + "a" * 53 + "\n"),
             "basic_auth_users.u: bcrypt cost 99 is outside 04-31"),
        ]
        for n, (name, make, problem) in enumerate(cases, start=1):
            make()
            started = time.monotonic()
            d.signal(signal.SIGHUP)
            log = _wait_log(d, "reload refused", n, timeout=5.0)
            took = time.monotonic() - started
            assert log.count(problem) == 1, (name, log[-2000:])  # logged once, by this reload
            assert took < 2.0, (name, took)
            s = d.wait_polls(2, timeout=5.0)  # still polling and serving, the old rules in force
            assert s[tracked] >= 0 and s[("sockscope_up", ())] == 1.0, name
        assert "Traceback" not in d.log()
        grown = _rss_kib(d.pid) - rss_start
        assert grown < 30 * 1024, f"RSS grew by {grown} KiB"
        took = stop_within(d, bound=5.0)
        assert took < 3.0
    finally:
        d.stop()


def test_a_failing_peak_tracker_is_counted_and_polling_goes_on(tmp_path):
    """Before (issue 9): PeakTracker.apply ran outside the poll's try; its exception ended
    the poller thread and the daemon served sockscope_polls_total frozen forever. Now the
    peaks are a source that fails on its own (issue 11): counted in
    sockscope_source_errors_total{source="peaks"}, its series left out, the TCP figures and
    the polls go on."""
    with NotifyListener(tmp_path) as n:
        env = env_with(NOTIFY_SOCKET=n.address, WATCHDOG_USEC="600000")
        d = start_daemon(tmp_path, "poll:\n  interval: 100ms\n", env=env, program=(WEDGE_DRIVER,))
        try:
            d.signal(signal.SIGRTMIN + 1)  # PeakTracker.observe raises from now on
            _wait_log(d, "peaks source failed: injected peaks failure", 1)
            t_broken = time.monotonic()
            before = d.samples()
            errors_key = ("sockscope_source_errors_total", (("source", "peaks"),))
            polls_key = ("sockscope_polls_total", ())
            after = _wait(lambda: (s := d.samples())[errors_key] >= before[errors_key] + 4 and s,
                          timeout=10, what="4 more failed peak updates")
            # Every poll since counts a peaks failure, and polls go on (a poll may end
            # between the two reads of a scrape: allow one).
            assert abs((after[polls_key] - before[polls_key]) - (after[errors_key] - before[errors_key])) <= 1
            assert after[("sockscope_source_up", (("source", "peaks"),))] == 0.0
            assert after[("sockscope_poll_errors_total", ())] == before[("sockscope_poll_errors_total", ())]
            assert not any(name == "sockscope_tcp_sockets_peak" for name, _ in after)
            assert after[("sockscope_up", ())] == 1.0
            _wait(lambda: len(n.times("WATCHDOG", "1", after=t_broken)) >= 2, timeout=5, what="2 pings")
            d.signal(signal.SIGRTMIN + 1)  # healed
            log = _wait_log(d, "peaks source failed: recovered after", 1)
            assert log.count("peaks source failed: injected peaks failure") == 1
            assert log.count("Traceback") == 1  # the unexpected error's, logged once
            assert d.wait_polls(2)[("sockscope_source_up", (("source", "peaks"),))] == 1.0
            stop_within(d)
        finally:
            d.stop()


def test_a_dead_poller_thread_stops_the_watchdog_and_exits_1(tmp_path):
    """Before: a poller thread that ended left a process serving a frozen table forever
    (SystemExit in a thread ends it silently). Now the main loop notices within a second
    and exits with status 1, so Restart=on-failure starts a fresh daemon."""
    with NotifyListener(tmp_path) as n:
        env = env_with(NOTIFY_SOCKET=n.address, WATCHDOG_USEC="600000")  # ping every 0.3 s
        d = start_daemon(tmp_path, "poll:\n  interval: 100ms\n", env=env, program=(WEDGE_DRIVER,))
        try:
            n.wait_for("WATCHDOG=1", timeout=10)
            t_kill = time.monotonic()
            d.signal(signal.SIGRTMIN + 2)  # the next poll raises SystemExit in the reader
            try:
                rc = d.proc.wait(timeout=6.0)
            except subprocess.TimeoutExpired:
                pytest.fail(f"a daemon with a dead poller kept running:\n{d.log()[-2000:]}")
            took = time.monotonic() - t_kill
            assert rc == 1, d.log()
            assert took < 4.0, took  # the poll in progress, then the main loop's 1 s check
            log = d.log()
            assert "the poll loop ended on SystemExit" in log
            assert "the poller thread ended unexpectedly; exiting with status 1" in log
            n.wait_for("STOPPING=1", timeout=1, after=t_kill)
            assert n.times("WATCHDOG", "1", after=t_kill + 0.5) == []  # no pings once polls stopped
        finally:
            d.stop()


def test_sigusr1_logs_a_status_line_and_sigusr2_is_ignored(tmp_path):
    """Before: both signals' default action killed the daemon."""
    graphite_port = free_port()  # nothing listens: lines stay queued
    d = start_daemon(tmp_path, "poll:\n  interval: 200ms\n"
                               f"graphite:\n  enabled: true\n  address: 127.0.0.1:{graphite_port}\n"
                               "  interval: 1s\n  flush_timeout: 0\n", env=env_with(),
                     extra_args=("--log.level", "debug"))
    try:
        d.wait_polls(6)
        d.signal(signal.SIGUSR1)
        log = _wait_log(d, "status: ", 1, timeout=5)
        line = next(ln for ln in log.splitlines() if "status: " in ln)
        assert re.search(r"INFO sockscope: status: (\d+) polls \(0 failed\); last good poll \d+\.\ds ago; "
                         r"\d+ sockets, \d+ listening addresses; graphite queue (\d+) of \d+ lines "
                         r"\(0 sent, 0 dropped\)$", line), line
        polls = int(re.search(r"status: (\d+) polls", line).group(1))
        assert polls >= 6
        assert int(re.search(r"graphite queue (\d+)", line).group(1)) > 0
        d.signal(signal.SIGUSR2)
        _wait_log(d, "received SIGUSR2: ignored", 1, timeout=5)
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1):
            d.signal(sig)
            time.sleep(0.3)  # one signal of a kind is pending at a time: they would merge
        _wait_log(d, "status: ", 3, timeout=5)
        assert d.proc.poll() is None
        assert d.wait_polls(1)[("sockscope_up", ())] == 1.0
        stop_within(d)
    finally:
        d.stop()
