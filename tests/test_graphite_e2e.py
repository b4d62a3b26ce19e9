"""The Graphite push against a real carbon-cache (tests/support/carbon.py), whisper files read back.

- sockscope (as a daemon, reading a namespace with every TCP state) pushes to carbon under
  both namings, with tags, and over UDP; the stored values equal `ss` at that time;
- an outage (carbon stopped for several polls) loses nothing: every pushed line lands
  with its original timestamp;
- a small buffer and a long outage drop the oldest lines, exactly as many as the drop
  counter says;
- a blackholed carbon (accepts, never reads) stalls neither polls nor /metrics, and the
  shutdown flush gives up within its bound;
- a carbon that stops reading (SIGSTOP) while pushes are written to it, then is killed
  (SIGKILL) and restarted: nothing counted sent that carbon did not read, everything in
  whisper; a carbon that reads in bursts gets everything without a resend;
- collectd 5.12 (tcpconns + write_graphite, its defaults) and sockscope in one UTS + mount
  namespace with a given host name and /etc/hosts write the same host component.

What was pushed is known from the daemon's debug log ("queued N lines stamped T", one per
push) so the tests compare exactly that with what carbon stored.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from sockscope.graphite import COLLECTD_STATES, collectd_hostname, sanitize
from sockscope.snapshot import OTHER, STATES
from support import ss_parse
from support.carbon import Carbon, prerequisites_missing
from support.daemon import Daemon, start_daemon
from support.prereq import require, require_root

POLL = "1s"
QUEUED = re.compile(r"graphite: queued (\d+) lines stamped (\d+)")


@pytest.fixture
def carbon_factory(tmp_path_factory):
    require(prerequisites_missing() is None, prerequisites_missing() or "")
    started: list[Carbon] = []

    def start() -> Carbon:
        c = Carbon.start(tmp_path_factory.mktemp("carbon"))
        started.append(c)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.close()


@pytest.fixture
def daemons():
    """Daemons started by a test; each stopped by PID at teardown."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.signal(signal.SIGCONT)
        d.stop()


def run(daemons: list, work, text: str, **kw) -> Daemon:
    require_root()
    d = start_daemon(work, text, extra_args=("--log.level", "debug"), **kw)
    daemons.append(d)
    return d


def graphite_config(carbon: Carbon, **keys) -> str:
    lines = [f"poll:\n  interval: {POLL}\n  kernel_stats: false\n", "graphite:\n  enabled: true\n",
             f"  address: 127.0.0.1:{carbon.port}\n"]
    lines += [f"  {k}: {v}\n" for k, v in keys.items()]
    return "".join(lines)


def pushing(daemons: list, work, carbon: Carbon, netns: str, prefix: str, **keys) -> Daemon:
    """A daemon watching `netns` that pushes to `carbon` under `prefix`, once its first two
    pushes are in whisper."""
    d = run(daemons, work, graphite_config(carbon, prefix=prefix, **keys), netns=netns)
    wait_until(lambda: len(stored(carbon, prefix + ".")) >= 2, 15, "the first pushes in whisper")
    return d


def queued(d: Daemon) -> dict[int, int]:
    """Lines queued per timestamp, from the daemon's debug log."""
    out: dict[int, int] = {}
    for n, stamp in QUEUED.findall(d.log()):
        assert int(stamp) not in out, f"two pushes stamped {stamp}"
        out[int(stamp)] = int(n)
    return out


def all_written(d: Daemon) -> bool:
    """Nothing waits to be written: every queued line is on the connection, at most
    awaiting carbon's confirmation (1.5 pushes; a clean close at exit confirms the rest)."""
    s = d.samples()
    return s[("sockscope_graphite_queue_lines", ())] == s[("sockscope_graphite_unconfirmed_lines", ())]


def stored(carbon: Carbon, prefix: str) -> Counter:
    """Points per timestamp over every series under prefix."""
    c: Counter = Counter()
    for name, points in carbon.points().items():
        if name.startswith(prefix):
            c.update(points.keys())
    return c


def wait_until(cond, timeout: float, what: str, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def quiet_stop(carbon: Carbon, d: Daemon) -> None:
    """Stop carbon with nothing of ours in carbon's cache.

    carbon-cache does not drain its in-memory cache on SIGTERM (its writer drains, then
    sleeps 1 s, and exits when the reactor stops): points it read less than ~1 s before
    are lost inside carbon, where sockscope cannot see them. Freezing sockscope (SIGSTOP)
    for 1.6 s lets carbon read and write everything already sent; whatever sockscope
    produces after SIGCONT meets a dead carbon and must be buffered - that is what the
    tests check.
    """
    quiet(carbon, d, carbon.stop)


def quiet(carbon: Carbon, d: Daemon, then) -> None:
    """Freeze sockscope for 1.6 s (carbon reads and writes all it was sent), call then()."""
    d.signal(signal.SIGSTOP)
    try:
        time.sleep(1.6)
        then()
    finally:
        d.signal(signal.SIGCONT)


# -- values equal ss ------------------------------------------------------------------------


def fullest(members):
    # The listener member with the largest length/limit ratio, then the largest length.
    return max(members, key=lambda m: (m[0] / m[1] if m[1] else float(m[0] > 0) * 1e9, m[0]))


def fold(port_states: dict, tracked: set) -> dict:
    out: dict = {}
    for (port, state), n in port_states.items():
        key = (port if port in tracked else OTHER, state)
        out[key] = out.get(key, 0) + n
    return out


def test_whisper_equals_ss_under_both_namings_tags_and_udp(carbon_factory, daemons, sockmix, tmp_path):
    carbon = carbon_factory()
    ns = sockmix.ns
    remote = sorted(sockmix.ports)
    ports = f"ports:\n  remote: [{', '.join(map(str, remote))}]\n"
    host = collectd_hostname()  # {fqdn}, graphite.host's default, in the default prefix
    configs = {
        "sockscope": graphite_config(carbon),
        "collectd": graphite_config(carbon, naming="collectd", prefix="collectd.", host="test.host.example"),
        "tags": graphite_config(carbon, tags="true", prefix="tagged", host="test.host.example"),
        "udp": graphite_config(carbon, protocol="udp", prefix="udp.{fqdn}"),
    }
    for name, text in configs.items():
        work = tmp_path / name
        work.mkdir()
        run(daemons, work, text + ports, netns=ns.name)

    base = f"sockscope.{sanitize(host)}"
    udp = f"udp.{sanitize(host)}"
    cd = "collectd.test_host_example"
    probe = f"{base}.tcp.states.ipv4.listen"

    probes = (probe, f"{cd}.tcpconns-all.tcp_connections-LISTEN", f"{udp}.tcp.states.ipv4.listen",
              "tagged.tcp.sockets;family=ipv4;host=test.host.example;state=listen")

    def common_stamp(p: dict, window: range) -> int | None:
        return next((t for t in window if all(t in p.get(n, {}) for n in probes)), None)

    for _attempt in range(4):
        before = ss_parse.ss_figures(ns)
        t1 = time.time()
        time.sleep(3.2)  # at least two whole seconds, each with a push of every daemon
        after = ss_parse.ss_figures(ns)
        t2 = time.time()
        if before.lines != after.lines:
            continue  # a TIME-WAIT expired in between; read again
        window = range(int(t1) + 1, int(t2))  # pushes stamped strictly inside the window
        # A busy machine may make a daemon skip a poll slot or carbon lag: a window in which
        # the four never pushed at the same second is tried again, not failed.
        deadline = time.monotonic() + 30
        while (stamp := common_stamp(points := carbon.points(), window)) is None and time.monotonic() < deadline:
            time.sleep(0.25)
        if stamp is not None:
            break
    else:
        pytest.fail("no second in which every daemon pushed while the namespace's table stood still")
    ss = before

    def at(name: str) -> float:
        # carbon-cache writes each series' whisper file in its own time: the probes above
        # being stored at `stamp` does not mean every series of that push is yet (a busy CI
        # machine once had the pusher's own series a second behind).
        nonlocal points
        if stamp not in points.get(name, {}):
            points = wait_until(lambda: (lambda p: p if stamp in p.get(name, {}) else None)(carbon.points()),
                                30, f"{name} at {stamp} (have {sorted(points.get(name, {}))[-3:]})")
        return points[name][stamp]

    tracked_local = {int(n.split(".")[-2]) for n in points
                     if n.startswith(f"{base}.tcp.local_port.") and n.split(".")[-2].isdigit()}
    assert tracked_local == {ln.local_port for ln in ss.lines if ln.state == "listen"}
    local = fold(ss.local_port_states, tracked_local)
    rem = fold(ss.remote_port_states, set(remote))
    checked = 0
    for family in ("ipv4", "ipv6"):
        for state in STATES:
            n = ss.states.get((family, state), 0)
            assert at(f"{base}.tcp.states.{family}.{state}") == n, (family, state)
            assert at(f"{udp}.tcp.states.{family}.{state}") == n, (family, state)
            assert at(f"tagged.tcp.sockets;family={family};host=test.host.example;state={state}") == n
            checked += 3
    for state in STATES:
        assert at(f"{cd}.tcpconns-all.tcp_connections-{COLLECTD_STATES[state]}") == ss.state(state)
        for port in sorted(tracked_local) + [OTHER]:
            n = local.get((port, state), 0)
            assert at(f"{base}.tcp.local_port.{port}.{state}") == n, (port, state)
            assert at(f"tagged.tcp.local_port_sockets;host=test.host.example;port={port};state={state}") == n
            if port != OTHER:
                assert at(f"{cd}.tcpconns-{port}-local.tcp_connections-{COLLECTD_STATES[state]}") == n
            checked += 3
        for port in remote + [OTHER]:
            n = rem.get((port, state), 0)
            assert at(f"{base}.tcp.remote_port.{port}.{state}") == n, (port, state)
            if port != OTHER:
                assert at(f"{cd}.tcpconns-{port}-remote.tcp_connections-{COLLECTD_STATES[state]}") == n
            checked += 2
    recvq = sockmix.group("recvq")
    assert at(f"{base}.tcp.local_port.{recvq['port']}.receive_queue_bytes") == recvq["n"] * 1000
    for (address, port), members in ss.listeners.items():
        length, limit = fullest(members)
        assert at(f"{base}.tcp.listen.{sanitize(address)}_{port}.queue_length") == length
        assert at(f"{base}.tcp.listen.{sanitize(address)}_{port}.queue_limit") == limit
        checked += 2
    # The states the mix promises are really there, so the comparison is not all zeros.
    assert at(f"{cd}.tcpconns-{sockmix.group('close_wait')['port']}-local.tcp_connections-CLOSE_WAIT") == \
        sockmix.group("close_wait")["n"]
    assert sum(at(f"{base}.tcp.states.ipv4.{s}") for s in STATES) > 20
    # No collectd path for the "other" bucket; the self-metrics are there.
    assert not any(".tcpconns-other" in n for n in points)
    assert at(f"{base}.sockscope.graphite.dropped_lines") == 0
    print(f"\n{checked} series compared with ss at {stamp}")


# -- outage: nothing lost ---------------------------------------------------------------------


def test_outage_loses_nothing_and_keeps_timestamps(carbon_factory, daemons, netns_factory, tmp_path):
    carbon = carbon_factory()
    d = pushing(daemons, tmp_path, carbon, netns_factory().name, "outage", send_timeout="2s")

    quiet_stop(carbon, d)
    down_at = time.time()
    errors_before = d.value("sockscope_graphite_send_errors_total")
    time.sleep(5.5)  # five or six polls while carbon is down
    s = d.samples()
    assert s[("sockscope_graphite_send_errors_total", ())] > errors_before
    assert s[("sockscope_graphite_queue_lines", ())] > 0
    up_at = time.time()
    carbon.restart()

    wait_until(lambda: all_written(d), 30, "the queue to drain")
    assert d.value("sockscope_graphite_dropped_lines_total") == 0
    assert d.stop() == 0, d.log()
    assert "every queued line sent" in d.log()

    pushed = queued(d)
    during = [t for t in pushed if down_at < t < up_at]
    assert len(during) >= 4, (during, down_at, up_at)
    got = wait_until(lambda: (lambda c: c if all(c[t] == n for t, n in pushed.items()) else None)(
        stored(carbon, "outage.")), 15, "every pushed line in whisper")
    assert {t: got[t] for t in pushed} == pushed
    print(f"\n{len(pushed)} pushes, {sum(pushed.values())} lines; {len(during)} pushes made "
          f"while carbon was down; all stored with their timestamps")


# -- overflow: the oldest lines are dropped and counted --------------------------------------------


def test_overflow_drops_oldest_and_counts_exactly(carbon_factory, daemons, netns_factory, tmp_path):
    carbon = carbon_factory()
    # An empty namespace: 151 lines per push (TCP states and the `other` port rows, kernel
    # counters, window peaks, per-source health, self-metrics): the buffer holds two pushes.
    d = pushing(daemons, tmp_path, carbon, netns_factory().name, "overflow", buffer_lines=320)

    quiet_stop(carbon, d)
    time.sleep(6.5)
    dropped_live = d.value("sockscope_graphite_dropped_lines_total")
    assert dropped_live > 0
    assert d.value("sockscope_graphite_queue_lines") <= 320
    carbon.restart()
    wait_until(lambda: all_written(d), 30, "the queue to drain")
    dropped = d.value("sockscope_graphite_dropped_lines_total")
    assert dropped >= dropped_live
    assert d.stop() == 0, d.log()

    pushed = queued(d)
    stamps = sorted(pushed)
    wait_until(lambda: stored(carbon, "overflow.")[stamps[-1]] == pushed[stamps[-1]], 15, "the last push")
    got = stored(carbon, "overflow.")
    missing = {t: pushed[t] - got[t] for t in stamps if got[t] != pushed[t]}
    assert all(v > 0 for v in missing.values()), missing  # nothing extra, nothing duplicated
    assert sum(missing.values()) == dropped
    # The oldest went first: one contiguous run of pushes, all gone but the newest of them,
    # which may have lost only its first lines.
    run_ = sorted(missing)
    assert stamps[stamps.index(run_[0]): stamps.index(run_[-1]) + 1] == run_, missing
    assert all(missing[t] == pushed[t] for t in run_[:-1]), missing
    assert "buffer full" in d.log()
    print(f"\n{len(stamps)} pushes; {int(dropped)} lines dropped = {sum(missing.values())} missing in whisper")


# -- blackhole: nothing stalls ---------------------------------------------------------------------


def test_blackholed_carbon_stalls_neither_polls_nor_metrics(daemons, tmp_path):
    # Accepts (the kernel completes the handshake) and never reads, with a tiny window.
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    try:
        ports = list(range(30000, 30060))
        text = (f"poll:\n  interval: {POLL}\n  kernel_stats: false\n"
                f"ports:\n  local: {ports}\n  remote: {ports}\n"
                "graphite:\n  enabled: true\n"
                f"  address: 127.0.0.1:{hole.getsockname()[1]}\n"
                "  send_timeout: 1s\n  connect_timeout: 1s\n  flush_timeout: 2s\n")
        d = run(daemons, tmp_path, text)  # ~1,500 lines (85 KB) per push
        polls0 = d.value("sockscope_polls_total")
        t0 = time.monotonic()
        worst = 0.0
        while time.monotonic() - t0 < 7:
            s0 = time.monotonic()
            d.scrape(timeout=5)
            worst = max(worst, time.monotonic() - s0)
            time.sleep(0.25)
        s = d.samples()
        elapsed = time.monotonic() - t0
        polls = s[("sockscope_polls_total", ())] - polls0
        assert worst < 0.5, f"a scrape took {worst:.2f}s"
        assert polls >= elapsed - 2, f"{polls} polls in {elapsed:.1f}s"
        assert s[("sockscope_up", ())] == 1
        assert s[("sockscope_graphite_send_errors_total", ())] >= 1
        assert s[("sockscope_graphite_queue_lines", ())] > 0

        t_stop = time.monotonic()
        assert d.stop(timeout=15) == 0, d.log()
        took = time.monotonic() - t_stop
        assert took < 2 + 1 + 2, f"shutdown took {took:.1f}s with flush_timeout 2s"
        assert re.search(r"shutdown flush gave up after [\d.]+s: \d+ lines not sent", d.log()), d.log()[-2000:]
        print(f"\n{polls:.0f} polls in {elapsed:.1f}s, worst scrape {worst * 1000:.0f} ms, "
              f"stopped in {took:.1f}s")
    finally:
        hole.close()


# -- at-least-once against a real carbon (issue 9, defect 3) ---------------------------------


def series_at(carbon: Carbon, prefix: str) -> dict[int, set[str]]:
    """{timestamp: the series under prefix with a point there}: the (path, timestamp) pairs."""
    out: dict[int, set[str]] = {}
    for name, points in carbon.points().items():
        if name.startswith(prefix):
            for t in points:
                out.setdefault(t, set()).add(name)
    return out


def test_carbon_frozen_then_killed_loses_nothing(carbon_factory, daemons, netns_factory, tmp_path):
    """carbon stops reading (SIGSTOP: its kernel keeps acknowledging into its socket
    buffer), sockscope writes several pushes into it, then carbon is killed (SIGKILL: the
    kernel resets the connection and discards what was unread) and restarted. None of those
    pushes may count as sent, and every (path, timestamp) must end up in whisper. The old
    pusher counted them sent when sendall() returned and lost them."""
    carbon = carbon_factory()
    d = pushing(daemons, tmp_path, carbon, netns_factory().name, "frozen", send_timeout="5s")
    # Right after a push (so it is written), let carbon read and store everything so far
    # (its cache dies with it), then freeze carbon.
    n = len(QUEUED.findall(d.log()))
    wait_until(lambda: len(QUEUED.findall(d.log())) > n, 5, "a push")
    time.sleep(0.2)
    read: dict[int, int] = {}

    def freeze_carbon():
        read.update(queued(d))  # sockscope is frozen: every push so far, all read by carbon
        carbon.signal(signal.SIGSTOP)

    quiet(carbon, d, freeze_carbon)
    try:
        time.sleep(4.2)  # four pushes into carbon's socket buffer, unread
        s = d.samples()
        # Exactly what carbon read: the pushes before the freeze, none after.
        assert s[("sockscope_graphite_sent_lines_total", ())] == sum(read.values()), \
            (s[("sockscope_graphite_sent_lines_total", ())], sum(read.values()))
        assert s[("sockscope_graphite_unconfirmed_lines", ())] >= 3 * 50
        assert s[("sockscope_graphite_resent_lines_total", ())] == 0
    finally:
        carbon.kill()
    carbon.restart()
    wait_until(lambda: all_written(d), 30, "the queue to drain")
    s = d.samples()
    assert s[("sockscope_graphite_resent_lines_total", ())] >= 3 * 50
    assert s[("sockscope_graphite_send_errors_total", ())] >= 1
    assert s[("sockscope_graphite_dropped_lines_total", ())] == 0
    assert s[("sockscope_graphite_dropped_unconfirmed_lines_total", ())] == 0
    assert d.stop() == 0, d.log()
    assert "every queued line sent" in d.log()

    pushed = queued(d)
    during = [t for t in pushed if t not in read]
    assert len(during) >= 4, during
    got = wait_until(lambda: (lambda a: a if all(len(a.get(t, ())) == n for t, n in pushed.items()) else None)(
        series_at(carbon, "frozen.")), 15, "every pushed (path, timestamp) in whisper")
    before = max(read)
    for t in during:  # the same series as an ordinary push, every one of them
        assert got[t] == got[before], (t, got[t] ^ got[before])
    print(f"\n{len(during)} pushes written to a frozen carbon, killed; "
          f"{int(s[('sockscope_graphite_resent_lines_total', ())])} lines resent, all in whisper")


def test_carbon_reading_in_bursts_gets_everything_without_resend(carbon_factory, daemons, netns_factory,
                                                                    tmp_path):
    """A slow carbon: it runs 0.1 s in every 0.5 s (SIGSTOP/SIGCONT), so pushes wait unread
    in its socket. Confirmation waits for it (unconfirmed lines seen), nothing fails or is
    written twice, and every pushed line is stored."""
    carbon = carbon_factory()
    d = pushing(daemons, tmp_path, carbon, netns_factory().name, "slow")
    unconfirmed = []
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            carbon.signal(signal.SIGSTOP)
            time.sleep(0.2)
            unconfirmed.append(d.value("sockscope_graphite_unconfirmed_lines"))
            time.sleep(0.2)
            carbon.signal(signal.SIGCONT)
            time.sleep(0.1)
    finally:
        carbon.signal(signal.SIGCONT)
    wait_until(lambda: all_written(d), 15, "the queue to drain")
    s = d.samples()
    assert max(unconfirmed) > 0
    assert s[("sockscope_graphite_send_errors_total", ())] == 0
    assert s[("sockscope_graphite_resent_lines_total", ())] == 0
    assert d.stop() == 0, d.log()
    pushed = queued(d)
    sent = int(re.findall(r"every queued line sent \((\d+) since start\)", d.log())[-1])
    assert sent == sum(pushed.values())
    wait_until(lambda: (lambda a: all(len(a.get(t, ())) == n for t, n in pushed.items()))(
        series_at(carbon, "slow.")), 15, "every pushed (path, timestamp) in whisper")
    print(f"\n{len(pushed)} pushes, {sent} lines sent and stored; unconfirmed up to {max(unconfirmed):.0f}")


# -- SIGTERM: the queue reaches carbon before the exit ---------------------------------------


def test_sigterm_flushes_the_queue_to_carbon_and_exits_0(carbon_factory, daemons, netns_factory, tmp_path):
    """Issue 4: SIGTERM exits 0 within its bound and the Graphite buffer is flushed to a
    real carbon. Lines queue while carbon is down; carbon comes back and SIGTERM arrives
    while sockscope is frozen (so they are still queued); every queued point must be in whisper. (The
    negative bound, a blackholed carbon, is test_blackholed_carbon_stalls_neither_polls_nor_metrics.)"""
    carbon = carbon_factory()
    d = pushing(daemons, tmp_path, carbon, netns_factory().name, "sigterm", flush_timeout="10s")

    quiet_stop(carbon, d)
    down_at = time.time()
    wait_until(lambda: d.value("sockscope_graphite_queue_lines") > 0 and
               d.value("sockscope_graphite_send_errors_total") >= 1, 10, "lines queued while carbon is down")
    time.sleep(2.5)  # a few more pushes queue up
    queue = d.value("sockscope_graphite_queue_lines")
    d.signal(signal.SIGSTOP)  # frozen: the queue stays as it is until SIGTERM is pending
    try:
        carbon.restart()
        t_term = time.monotonic()
        d.signal(signal.SIGTERM)
    finally:
        d.signal(signal.SIGCONT)
    try:
        rc = d.proc.wait(timeout=10 + 5 + 3)  # flush_timeout + the poller's 5 s + margin
    except subprocess.TimeoutExpired:
        d.kill()
        pytest.fail(f"sockscope did not stop within its bound:\n{d.log()[-3000:]}")
    took = time.monotonic() - t_term
    assert rc == 0, d.log()[-3000:]
    assert took < 10, f"stopping took {took:.1f}s with carbon reachable"
    log = d.log()
    assert "received SIGTERM, shutting down" in log
    assert "every queued line sent" in log and "lines not sent" not in log, log[-3000:]

    pushed = queued(d)
    during = [t for t in pushed if t > down_at]
    assert len(during) >= 2 and queue >= 3 * 50, (during, queue)  # 50+ lines per push
    # carbon keeps running: its writer stores what it received within ~1 s (it would not
    # on its own SIGTERM), so wait for whisper before the fixture stops it.
    got = wait_until(lambda: (lambda c: c if all(c[t] == n for t, n in pushed.items()) else None)(
        stored(carbon, "sigterm.")), 15, "every queued line in whisper")
    assert {t: got[t] for t in pushed} == pushed
    print(f"\n{queue:.0f} lines queued over {len(during)} pushes while carbon was down; "
          f"SIGTERM -> exit 0 in {took:.2f}s; all {sum(pushed.values())} lines in whisper")


# -- SIGHUP: Graphite settings apply on reload -----------------------------------------------


def rewrite(d: Daemon, text: str) -> None:
    """A new config file for d (same /metrics address), to be applied with SIGHUP."""
    d.config_path.write_text(text.rstrip("\n") + f"\nprometheus:\n  listen_address: {d.address}\n")


def reload(d: Daemon, text: str, done: str, timeout: float = 10) -> None:
    n = d.log().count(done)
    rewrite(d, text)
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.log().count(done) > n, timeout, f"{done!r} in the log")


GRAPHITE_COUNTERS = ("sockscope_graphite_sent_lines_total", "sockscope_graphite_pushes_total",
                     "sockscope_graphite_dropped_lines_total", "sockscope_graphite_send_errors_total")


class CounterWatch:
    """Scrapes d every 0.1 s in a thread; .check() asserts no counter ever went back."""

    def __init__(self, d: Daemon):
        import threading

        self.d, self.seen, self.stop = d, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                s = self.d.samples()
            except OSError:
                time.sleep(0.1)
                continue
            self.seen.append({k: s.get((k, ())) for k in GRAPHITE_COUNTERS})
            time.sleep(0.1)

    def check(self) -> int:
        self.stop.set()
        self.thread.join(10)
        for name in GRAPHITE_COUNTERS:
            values = [s[name] for s in self.seen]
            assert None not in values, f"{name} missing from a scrape"
            assert all(a <= b for a, b in zip(values, values[1:])), f"{name} went back: {values}"
        return len(self.seen)


def test_sighup_changes_the_prefix_without_gap_or_lost_line(carbon_factory, daemons, netns_factory, tmp_path):
    """A reload that changes graphite.prefix while carbon is down: the lines queued before
    it keep their old paths and are delivered, later pushes use the new prefix, no poll is
    skipped or pushed twice across the reload, and no counter on /metrics goes back."""
    carbon = carbon_factory()
    base = graphite_config(carbon, send_timeout="2s")
    d = run(daemons, tmp_path, base + "  prefix: before\n", netns=netns_factory().name)
    wait_until(lambda: len(stored(carbon, "before.")) >= 2, 15, "the first pushes in whisper")

    quiet_stop(carbon, d)
    down_at = time.time()
    wait_until(lambda: d.value("sockscope_graphite_queue_lines") > 0, 10, "lines queued while carbon is down")
    time.sleep(2.5)
    watch = CounterWatch(d)
    reload(d, base + "  prefix: after\n", "graphite: settings reloaded")
    taken = int(re.findall(r"settings reloaded; (\d+) queued lines taken over", d.log())[-1])
    assert taken >= 2 * 50, taken
    time.sleep(2.5)  # pushes under the new prefix, queued too
    carbon.restart()
    wait_until(lambda: all_written(d), 30, "the queue to drain")
    scrapes = watch.check()
    assert d.value("sockscope_graphite_dropped_lines_total") == 0
    assert d.stop() == 0, d.log()
    log = d.log()
    assert "keeps its current settings" not in log

    pushed = queued(d)
    wait_until(lambda: (lambda b, a: all(b[t] + a[t] == n for t, n in pushed.items()))(
        stored(carbon, "before."), stored(carbon, "after.")), 15, "every pushed line in whisper")
    before, after = stored(carbon, "before."), stored(carbon, "after.")
    for t, n in pushed.items():  # each push whole under exactly one prefix
        assert (before[t], after[t]) in ((n, 0), (0, n)), (t, n, before[t], after[t])
    old = sorted(t for t in pushed if before[t])
    new = sorted(t for t in pushed if after[t])
    assert old and new and old[-1] < new[0]
    assert len([t for t in old if t > down_at]) >= 2  # queued under the old prefix, delivered
    assert len(new) >= 3
    # No poll skipped across the reload: the step from the last old push to the first new
    # one is an ordinary step (1 s polls; 2 from rounding, more only if the host stalls all
    # polls; quiet_stop's freeze, before down_at, is left out).
    stamps = sorted(t for t in pushed if t > down_at)
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b != new[0]]
    assert new[0] - old[-1] <= max(2, *gaps), f"a poll was not pushed across the reload: " \
        f"{old[-1]} -> {new[0]}, other steps {gaps}"
    print(f"\n{len(old)} pushes under before.*, {len(new)} under after.*, first new {new[0] - old[-1]}s "
          f"after the last old; {taken} queued lines taken over; {scrapes} scrapes, counters monotonic")


def test_sighup_enables_and_disables_graphite(carbon_factory, daemons, netns_factory, tmp_path):
    carbon = carbon_factory()
    off = f"poll:\n  interval: {POLL}\n  kernel_stats: false\n"
    on = graphite_config(carbon, prefix="toggled")
    d = run(daemons, tmp_path, off, netns=netns_factory().name)
    assert not any(k[0].startswith("sockscope_graphite_") for k in d.samples())

    reload(d, on, "pushing to Graphite at")
    wait_until(lambda: len(stored(carbon, "toggled.")) >= 2, 15, "pushes after enabling by reload")
    wait_until(lambda: d.value("sockscope_graphite_sent_lines_total") > 0, 5, "sent lines on /metrics")

    reload(d, off, "graphite disabled")
    off_at = time.time()
    polls = d.value("sockscope_polls_total")
    time.sleep(3.5)  # polls go on; carbon's writer has stored anything sent before the reload
    last = max(stored(carbon, "toggled."))
    assert off_at - 5 <= last <= off_at + 1, f"points kept arriving after graphite was disabled: {last - off_at}"
    s = d.samples()
    assert s[("sockscope_polls_total", ())] >= polls + 2
    assert not any(k[0].startswith("sockscope_graphite_") for k in s)
    assert d.stop() == 0, d.log()
    assert "every queued line sent" in d.log()


# -- collectd's host name (issue 10, defect 2) --------------------------------------------------

COLLECTD = "/usr/sbin/collectd"

# collectd 5.12 with its defaults for the host name (no Hostname, FQDNLookup true), tcpconns'
# all-ports summary, write_graphite to the test's sink. The rest only keeps it in work_dir.
COLLECTD_CONF = """\
Interval 1
BaseDir "{work}"
PIDFile "{work}/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin logfile
<Plugin logfile>
  LogLevel info
  File STDOUT
</Plugin>
LoadPlugin tcpconns
LoadPlugin write_graphite
<Plugin tcpconns>
  ListeningPorts false
  AllPortsSummary true
</Plugin>
<Plugin write_graphite>
  <Node "sink">
    Host "127.0.0.1"
    Port "{port}"
    Protocol "tcp"
    Prefix "cd."
  </Node>
</Plugin>
"""


class HostNamespace:
    """A UTS + mount namespace (unshare, private propagation) whose host name is `name` and
    whose /etc/hosts and /etc/nsswitch.conf (`hosts: files`, so no DNS answer can differ
    between runs) are bind-mounted temporary files; the real ones are never touched. A
    `sleep` holds it; processes join it with `nsenter -t PID --uts --mount` (no fork: the
    PID we hold is the program's)."""

    def __init__(self, work, name: str, hosts: str):
        (work / "hosts").write_text(hosts)
        (work / "nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\nhosts: files\n")
        script = (f"hostname {name} && mount --bind {work / 'hosts'} /etc/hosts && "
                  f"mount --bind {work / 'nsswitch.conf'} /etc/nsswitch.conf && echo ready && exec sleep 300")
        self.proc = subprocess.Popen(["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", script],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            self.close()
            raise RuntimeError(f"unshare failed: {ready}{self.proc.stdout.read()}")
        self.prefix = ("nsenter", "-t", str(self.proc.pid), "--uts", "--mount")

    def run(self, *argv: str) -> str:
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True, timeout=30, check=True).stdout

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def host_components(lines: list[str], prefix: str) -> set[str]:
    return {line.split(".")[1] for line in lines if line.startswith(prefix + ".")}


@pytest.mark.parametrize("hosts, expected", [
    # The layout: collectd resolves "web1" to the line's first name, localhost,
    # exactly as sockscope does (and as socket.getfqdn() did).
    ("127.0.0.1 localhost web1\n", "localhost"),
    # Short name first: the canonical name is "web1"; socket.getfqdn() answered
    # web1.example.net (the first alias with a dot), so the paths differed.
    ("127.0.0.1 localhost\n127.0.1.1 web1 web1.example.net\n", "web1"),
    # A canonical FQDN different from the host name.
    ("127.0.0.1 localhost\n127.0.1.1 web1.example.net web1\n", "web1_example_net"),
    # The name does not resolve: collectd refuses to start; sockscope uses the host name.
    ("127.0.0.1 localhost\n", None),
], ids=["localhost-line", "short-name-first", "fqdn", "unresolvable"])
def test_collectd_and_sockscope_write_the_same_host(daemons, tmp_path, hosts, expected):
    require_root()
    require(os.path.exists(COLLECTD), f"needs {COLLECTD} (Debian package collectd-core; `make system-deps`)")
    require(shutil.which("unshare") is not None and shutil.which("nsenter") is not None, "needs util-linux")
    from support.sink import Sink

    sink = Sink()
    ns = HostNamespace(tmp_path, "web1", hosts)
    collectd = None
    try:
        (tmp_path / "collectd.conf").write_text(COLLECTD_CONF.format(work=tmp_path, port=sink.port))
        with open(tmp_path / "collectd.log", "wb") as out:
            collectd = subprocess.Popen([*ns.prefix, COLLECTD, "-f", "-C", str(tmp_path / "collectd.conf")],
                                        stdout=out, stderr=subprocess.STDOUT)
        d = run(daemons, tmp_path, f"poll:\n  interval: 1s\n  kernel_stats: false\ngraphite:\n  enabled: true\n"
                                   f"  address: 127.0.0.1:{sink.port}\n  naming: collectd\n  prefix: ss.\n",
                prefix=ns.prefix)
        default_prefix = ns.run(sys.executable, "-c", "from sockscope.graphite import LineBuilder; "
                                                      "print(LineBuilder()._base)").strip()
        if expected is None:
            assert collectd.wait(timeout=10) == 1
            assert 'Looking up "web1" failed' in (tmp_path / "collectd.log").read_text()
            wait_until(lambda: host_components(sink.lines, "ss"), 10, "sockscope's lines")
            assert host_components(sink.lines, "ss") == {"web1"}
            assert "looking up the host name 'web1' failed" in d.log()
            assert default_prefix == "sockscope.web1"
            return
        wait_until(lambda: host_components(sink.lines, "cd") and host_components(sink.lines, "ss"), 15,
                   "lines from both collectd and sockscope")
        assert host_components(sink.lines, "cd") == host_components(sink.lines, "ss") == {expected}
        assert any(line.startswith(f"cd.{expected}.tcpconns-all.tcp_connections-LISTEN ") for line in sink.lines)
        assert any(line.startswith(f"ss.{expected}.tcpconns-all.tcp_connections-LISTEN ") for line in sink.lines)
        assert default_prefix == f"sockscope.{expected}"  # naming sockscope: the same host
        if expected == "localhost":
            assert "resolved to 'localhost'" in d.log()
    finally:
        if collectd is not None and collectd.poll() is None:
            collectd.terminate()
            collectd.wait(timeout=10)
        for dd in daemons:
            dd.stop()
        ns.close()
        sink.close()
