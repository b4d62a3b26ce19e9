"""cli.py as a person uses it: flags in any order, check-config, journald priorities, and
`sockscope snapshot` (one-shot and --watch under tmux) against `ss` in a test namespace.

Real subprocesses wherever the order of argv, the terminal or journald matter.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import urllib.error
from pathlib import Path

import bcrypt
import pytest

from sockscope import cli, watch
from sockscope.report import Frame, View, build_report, render_text
from sockscope.snapshot import STATES
from support import ss_parse
from support.daemon import Daemon, free_port, samples, scrape
from support.prereq import require, require_root

PY = sys.executable
SGR = re.compile(r"\x1b\[[0-9;]*m")
PASSWORD = "correct horse"

# --- flags before or after the command (issue 10, defect 1) ---------------------------

COMMON = {  # flag -> (args attribute, a value, another value)
    "--config.file": ("config_file", "/etc/a.yaml", "/etc/b.yaml"),
    "--web.listen-address": ("listen_address", "127.0.0.1:1", ":2"),
    "--log.level": ("log_level", "debug", "error"),
    "--log.format": ("log_format", "json", "journal"),
    "--web.config.file": ("web_config_file", "/etc/web.yml", "/etc/web2.yml"),
    "--netns": ("netns", "ns1", "/proc/1/ns/net"),
}


@pytest.mark.parametrize("command", ["run", "snapshot", "check-config"])
@pytest.mark.parametrize("flag", list(COMMON))
def test_every_common_flag_before_or_after_the_command(flag, command):
    """Before the fix, the command's copy of the flag (argparse parents=) wrote its default
    None over a value given before the command: `--netns N snapshot` read the host."""
    dest, value, other = COMMON[flag]
    parse = cli._parser().parse_args
    assert getattr(parse([flag, value, command]), dest) == value
    assert getattr(parse([command, flag, value]), dest) == value
    assert getattr(parse([command]), dest) is None
    assert getattr(parse([flag, value, command, flag, other]), dest) == other  # last wins
    assert getattr(parse([flag, value]), dest) == value  # no command: run


def test_snapshot_flags():
    args = cli._parser().parse_args(
        ["snapshot", "--port", "80,443", "--port", "8080", "--state", "close-wait",
         "--state", "time-wait,listen", "--sort", "recv-q", "--top", "3", "--watch"])
    assert args.ports == [[80, 443], [8080]]
    assert args.states == [["close-wait"], ["time-wait", "listen"]]
    assert (args.sort, args.top, args.watch, args.json, args.color) == ("recv-q", 3, 2.0, False, "auto")
    assert cli._parser().parse_args(["snapshot", "--watch", "0.5"]).watch == 0.5


@pytest.mark.parametrize(("argv", "message"), [
    (["snapshot", "--port", "70000"], "70000 is not a port number"),
    (["snapshot", "--port", "http"], "'http' is not a port number"),
    (["snapshot", "--state", "closed-wait"], "'closed-wait' is not a state"),
    (["snapshot", "--top", "0"], "0 is not a positive number"),
    (["snapshot", "--watch", "-1"], "-1 is not a positive number"),
    (["snapshot", "--sort", "size"], "invalid choice: 'size'"),
    (["run", "--config", "x"], "unrecognized arguments: --config"),  # no abbreviations
])
def test_bad_snapshot_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli._parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_help_says_flags_go_either_side():
    assert "before or after the command" in cli._parser().format_help()


def _run_argv(*argv: str) -> list[str]:
    return [PY, "-m", "sockscope", *argv]


def _start(tmp_path: Path, argv: list[str], port: int, **kw) -> Daemon:
    log_path = tmp_path / f"run-{port}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    d = Daemon(proc, port, log_path, tmp_path / "none.yaml", **kw)
    try:
        d.wait_up()
    except Exception:
        d.kill()
        raise
    return d


def test_config_file_before_run_is_used(tmp_path):
    """`sockscope --config.file X run`: old code ran with the defaults (:9393)."""
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"poll:\n  interval: 200ms\nprometheus:\n  listen_address: 127.0.0.1:{port}\n")
    d = _start(tmp_path, _run_argv("--config.file", str(cfg), "run"), port)
    try:
        assert samples(d.scrape())[("sockscope_poll_interval_seconds", ())] == 0.2
    finally:
        assert d.stop() == 0, d.log()


def test_listen_address_and_log_flags_before_run(tmp_path):
    port = free_port()
    d = _start(tmp_path, _run_argv("--web.listen-address", f"127.0.0.1:{port}",
                                   "--log.format", "json", "--log.level", "warning", "run"), port)
    assert d.stop() == 0
    lines = d.log().splitlines()
    # warning level: the INFO lines of a start and stop are gone; json: what is left parses
    assert not any("serving http" in line or "shutting down" in line for line in lines), lines
    assert all(json.loads(line)["level"] in ("warning", "error") for line in lines), lines


def test_web_config_file_before_run(tmp_path):
    port = free_port()
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    d = _start(tmp_path, _run_argv("--web.config.file", str(web),
                                   "--web.listen-address", f"127.0.0.1:{port}", "run"),
               port, auth=("prometheus", PASSWORD))
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(d.url)
        assert e.value.code == 401
    finally:
        assert d.stop() == 0, d.log()


def test_netns_before_run(tmp_path, sockmix, ss_figures):
    port = free_port()
    d = _start(tmp_path, _run_argv("--netns", sockmix.ns.name,
                                   "--web.listen-address", f"127.0.0.1:{port}", "run"), port)
    try:
        s = samples(d.scrape())
        listen = sum(v for (name, labels), v in s.items()
                     if name == "sockscope_tcp_sockets" and ("state", "listen") in labels)
        assert listen == ss_figures(sockmix.ns).state("listen") > 0
    finally:
        assert d.stop() == 0, d.log()


# --- check-config (issue 10, defect 8) --------------------------------------------------


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("poll:\n  interval: 2s\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("poll:\n  interval: soon\n  familes: [ipv4]\n")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    bad_web = tmp_path / "bad-web.yml"
    bad_web.write_text("basic_auth_users:\n  prometheus: plain-text\ntls_server_config:\n"
                       "  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\nhttp: {}\n")
    return {"good": str(good), "bad": str(bad), "web": str(web), "bad_web": str(bad_web)}


def check(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_config_validates_the_web_config_too(files, capsys):
    code, out, _ = check(["check-config", files["good"], "--web.config.file", files["web"]], capsys)
    assert code == 0
    assert out.splitlines() == [f"{files['good']}: OK", f"{files['web']}: OK (web config)"]
    # the flag before the command is honoured as well
    code, out, _ = check(["--web.config.file", files["web"], "check-config", files["good"]], capsys)
    assert (code, out.splitlines()[-1]) == (0, f"{files['web']}: OK (web config)")


def test_check_config_web_config_alone(files, capsys):
    code, out, _ = check(["check-config", "--web.config.file", files["web"]], capsys)
    assert (code, out) == (0, f"{files['web']}: OK (web config)\n")
    code, out, err = check(["check-config", "--web.config.file", files["bad_web"]], capsys)
    assert code == 2 and out == ""
    assert f"{files['bad_web']}: " in err
    for problem in ("basic_auth_users.prometheus", "tls_server_config", "http"):
        assert problem in err, err


def test_check_config_reports_every_problem_of_every_file_and_flag(files, capsys):
    code, out, err = check(["check-config", files["bad"], "--web.config.file", files["bad_web"],
                            "--web.listen-address", "nowhere:x"], capsys)
    assert code == 2 and out == ""
    assert f"{files['bad']}: 2 problems:" in err
    assert "poll.interval" in err and "poll.familes" in err
    assert "--web.listen-address" in err
    assert f"{files['bad_web']}: " in err and "basic_auth_users.prometheus" in err
    assert "Traceback" not in err


def test_check_config_usage_problems(files, capsys):
    assert check(["check-config"], capsys)[2].startswith("check-config: nothing to check")
    code, _, err = check(["check-config", files["good"], "--config.file", files["bad"]], capsys)
    assert code == 2 and "name different files" in err
    code, out, _ = check(["check-config", "--config.file", files["good"]], capsys)
    assert (code, out) == (0, f"{files['good']}: OK\n")


def test_check_config_subprocess_exit_status(files):
    r = subprocess.run(_run_argv("check-config", files["good"], "--web.config.file",
                                 files["bad_web"]), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "basic_auth_users.prometheus" in r.stderr


# --- journald priorities (issue 10, defect 4) -------------------------------------------


def _log_through(fmt: str, stream, environ=None):
    cli.setup_logging("debug", fmt, stream=stream, environ=environ or {})
    log = logging.getLogger("sockscope.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")


def test_journal_format_prefixes_every_line_with_its_priority():
    out = io.StringIO()
    try:
        _log_through("journal", out)
    finally:
        logging.getLogger().handlers.clear()
    lines = out.getvalue().splitlines()
    assert lines[:5] == ["<7>DEBUG sockscope.test: d", "<6>INFO sockscope.test: i",
                         "<4>WARNING sockscope.test: w", "<3>ERROR sockscope.test: e",
                         "<2>CRITICAL sockscope.test: c"]
    # a traceback: every line at the record's priority, so journald keeps it together
    assert lines[5] == "<3>ERROR sockscope.test: failed"
    assert lines[6] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines[5:])


def test_text_and_json_get_the_prefix_only_on_journalds_stream(tmp_path):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        mine = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}  # inherited, redirected
        try:
            for fmt, environ in (("text", mine), ("json", mine), ("text", other), ("text", {})):
                stream.write(f"--- {fmt} {bool(environ) and environ is mine}\n")
                _log_through(fmt, stream, environ)
                stream.flush()
        finally:
            logging.getLogger().handlers.clear()
    blocks = path.read_text().split("--- ")[1:]
    text_j, json_j, text_other, text_none = (b.splitlines()[1:] for b in blocks)
    assert text_j[2] == "<4>WARNING sockscope.test: w"
    assert all(re.match(r"<[2-7]>", line) for line in text_j)
    assert json_j[2].startswith("<4>{") and json.loads(json_j[2][3:])["level"] == "warning"
    assert len(json_j) == 6  # a JSON record is one line, traceback included
    for lines in (text_other, text_none):
        assert lines[2] == "WARNING sockscope.test: w"
        assert not any(line.startswith("<") for line in lines)


@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2), (logging.INFO + 5, 6), (logging.NOTSET, 7)])
def test_priority_of_a_level(level, priority):
    assert cli.priority(level) == priority


JOURNALD_SCRIPT = r"""
set -e
# A private journald in a private mount namespace: tmpfs over its sockets and its storage.
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/journal /run/log
mount -t tmpfs tmpfs /run/log
printf '[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\nRateLimitBurst=0\n' \
    > /run/systemd/journald-test.conf
mount --bind /run/systemd/journald-test.conf /etc/systemd/journald.conf
/lib/systemd/systemd-journald &
JOURNALD=$!
for i in $(seq 50); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.1; done
# systemd-cat connects stdout and stderr to journald's stream; JOURNAL_STREAM is what
# systemd sets for a service (stderr's device:inode).
systemd-cat -t "$ID" sh -c 'export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); exec "$@"' \
    sh "$@" &
APP=$!
sleep "$RUN_SECONDS"
kill -TERM $APP 2>/dev/null || true
wait $APP || true
sleep 0.5
journalctl -D /run/log/journal -o json --no-pager -t "$ID"
echo '=== warning and worse'
journalctl -D /run/log/journal -o cat --no-pager -t "$ID" -p warning
kill $JOURNALD
wait $JOURNALD || true
"""


def _under_journald(tmp_path, argv: list[str], seconds: float) -> tuple[list[dict], list[str]]:
    require_root()
    for tool in ("unshare", "systemd-cat", "journalctl"):
        require(shutil.which(tool) is not None, f"needs {tool} (util-linux, systemd)")
    require(os.path.exists("/lib/systemd/systemd-journald"), "needs systemd-journald (systemd)")
    script = tmp_path / "journald.sh"
    script.write_text(JOURNALD_SCRIPT)
    env = dict(os.environ, ID=f"sockscope-test-{os.getpid()}", RUN_SECONDS=str(seconds))
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", str(script),
                        *argv], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    entries_text, _, warned = r.stdout.partition("=== warning and worse\n")
    entries = [json.loads(line) for line in entries_text.splitlines() if line.startswith("{")]
    assert entries, r.stdout + r.stderr
    return entries, warned.splitlines()


def test_journald_stores_each_line_at_its_priority(tmp_path):
    """The real daemon under a real journald: `journalctl -p warning` finds the poll error
    and the warnings, not the info lines (before: every line was stored at info)."""
    entries, warned = _under_journald(
        tmp_path, _run_argv("run", "--netns", "/run/netns/sockscope-test-missing",
                            "--web.listen-address", f"127.0.0.1:{free_port()}"), 2.5)
    by_priority = {}
    for e in entries:
        by_priority.setdefault(int(e["PRIORITY"]), []).append(e["MESSAGE"])
    assert any("poll failed" in m for m in by_priority[3]), by_priority
    assert any("kernel statistics" in m for m in by_priority[4]), by_priority
    assert any("serving http" in m for m in by_priority[6]), by_priority
    assert all(not m.startswith("<") for ms in by_priority.values() for m in ms)
    assert any("poll failed" in line for line in warned)
    assert not any("serving http" in line for line in warned)


def test_journald_keeps_a_traceback_at_error(tmp_path):
    snippet = textwrap.dedent("""
        import logging
        from sockscope import cli
        cli.setup_logging("info")
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger("sockscope").exception("unexpected")
        logging.getLogger("sockscope").info("after")
    """)
    entries, warned = _under_journald(tmp_path, [PY, "-c", snippet], 1.5)
    messages = [(int(e["PRIORITY"]), e["MESSAGE"]) for e in entries]
    start = messages.index((3, "ERROR sockscope: unexpected"))
    trace = messages[start:start + 4]
    assert [p for p, _ in trace] == [3, 3, 3, 3], messages
    assert trace[1][1] == "Traceback (most recent call last):"
    assert (3, "ZeroDivisionError: division by zero") in messages
    assert (6, "INFO sockscope: after") in messages
    assert "ZeroDivisionError: division by zero" in warned


# --- `sockscope snapshot` against ss (issue 10, the snapshot part) ---------------------

MIX = {
    "listeners": [{"host": "127.0.0.1", "port": 18080}, {"host": "::1", "port": 18082}],
    "established": [{"host": "127.0.0.1", "port": 18080, "n": 6},
                    {"host": "::1", "port": 18082, "n": 2}],
    "recvq": {"host": "127.0.0.1", "port": 18081, "n": 2, "bytes": 3000},
    "close_wait": {"host": "127.0.0.1", "port": 18084, "n": 5},
    "time_wait": {"host": "127.0.0.1", "port": 18085, "n": 3},
    "full_queue": {"host": "127.0.0.1", "port": 18090, "backlog": 2, "syn_sent": 1},
}


@pytest.fixture
def mix(sockmix_factory):
    return sockmix_factory(MIX)


def snapshot_json(*argv: str) -> dict:
    r = subprocess.run(_run_argv(*argv), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def states_of(figures: dict, port: int) -> dict:
    return {s: figures.get((port, s), 0) for s in STATES}


def test_snapshot_json_equals_ss(mix, ss_figures):
    # the flag before the command: the old code showed the host's table here
    report = snapshot_json("--netns", mix.ns.name, "snapshot", "--json")
    ss = ss_figures(mix.ns)
    assert report["netns"] == mix.ns.name
    assert report["totals"] == {s: ss.state(s) for s in STATES}
    assert report["sockets"] == ss.total

    local = {row["port"]: row for row in report["local_ports"]}
    assert set(local) == {18080, 18081, 18082, 18084, 18085, 18090}  # the listening ports
    for port, row in local.items():
        assert row["states"] == states_of(ss.local_port_states, port), port
        q = ss.local_queues.get(port, ss_parse.Queues())
        assert (row["queues"]["receive_bytes"], row["queues"]["send_bytes"]) == \
            (q.recvq_sum, q.sendq_sum), port
    # the remote ports this namespace's clients use, found without any configuration
    remote = {row["port"]: row for row in report["remote_ports"]}
    assert set(remote) == {18080, 18081, 18082, 18084, 18090}
    for port, row in remote.items():
        assert row["states"] == states_of(ss.remote_port_states, port), port
    for side in ("local_ports", "remote_ports"):
        other = report[side + "_other"]
        for s in STATES:
            assert other["states"][s] == ss.state(s) - sum(r["states"][s] for r in report[side])

    # CLOSE-WAIT and TIME-WAIT by peer, as ss would group them
    for state, key in (("close_wait", "close_wait_peers"), ("time_wait", "time_wait_peers")):
        peers = {}
        for line in ss.lines:
            if line.state == state:
                peers[line.remote_address] = peers.get(line.remote_address, 0) + 1
        assert {p["address"]: p["sockets"] for p in report[key]} == peers

    # as root: the sockmix process holds every shown port's sockets
    assert {o["pid"] for o in local[18080]["owners"]} == {mix.pid}
    assert local[18080]["owners"][0]["sockets"] == 1 + 6  # the listener and 6 accepted
    assert remote[18080]["owners"] == [{"pid": mix.pid, "name": remote[18080]["owners"][0]["name"],
                                        "user": "root", "sockets": 6}]
    assert {(ln["address"], ln["port"]) for ln in report["listeners"]} == set(ss.listeners)
    assert report["kernel_counters"]["listen_overflows"] >= 0
    for row in [*report["local_ports"], *report["remote_ports"], *report["listeners"]]:
        assert type(row["port"]) is int


def test_snapshot_filters_equal_ss_filters(mix):
    report = snapshot_json("snapshot", "--netns", mix.ns.name, "--json", "--port", "18084",
                           "--state", "close-wait")
    text = ss_parse.run_ss(mix.ns, "-tanOH", "state", "close-wait",
                           "( sport = :18084 or dport = :18084 )")
    # (ss leaves out the State column when one state is asked for)
    assert report["sockets"] == len(text.splitlines()) == 5
    assert report["filter"] == {"ports": [18084], "states": ["close-wait"]}
    assert [r["port"] for r in report["local_ports"]] == [18084]
    report = snapshot_json("snapshot", "--netns", mix.ns.name, "--json", "--state", "connected")
    ss = ss_parse.figures(ss_parse.run_ss(mix.ns, "-tanOH", "state", "connected"))
    assert report["totals"] == {s: ss.state(s) for s in STATES}
    assert report["totals"]["listen"] == 0 and report["totals"]["established"] > 0


def test_snapshot_text_piped_has_no_escape_codes(mix):
    r = subprocess.run(_run_argv("snapshot", "--netns", mix.ns.name), capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, TERM="xterm-256color"))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout
    assert "LOCAL PORTS" in r.stdout and "TIME-WAIT BY PEER" in r.stdout
    r = subprocess.run(_run_argv("snapshot", "--netns", mix.ns.name, "--color", "always"),
                       capture_output=True, text=True, timeout=60)
    assert "\x1b[1m" in r.stdout


def test_watch_piped_writes_plain_frames_and_stops_on_sigterm(mix):
    proc = subprocess.Popen(_run_argv("snapshot", "--netns", mix.ns.name, "--watch", "0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "\x1b" not in out
    frames = re.findall(r"^every 0.3s, frame (\d+);", out, re.M)
    assert len(frames) >= 2 and frames[:2] == ["1", "2"], out[-2000:]


def test_watch_json_lines(mix):
    proc = subprocess.Popen(_run_argv("snapshot", "--netns", mix.ns.name, "--watch", "0.3",
                                      "--json"), stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert (first["frame"]["number"], second["frame"]["number"]) == (1, 2)
    assert first["since_start"]["sockets"] == 0
    assert second["since_start"]["sockets"] == second["sockets"] - first["sockets"]
    assert "\x1b" not in json.dumps(second)


def test_snapshot_of_a_missing_namespace_is_a_clear_error():
    r = subprocess.run(_run_argv("snapshot", "--netns", "/run/netns/sockscope-test-missing"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "network namespace" in r.stderr and "Traceback" not in r.stderr


def test_watch_shows_a_failed_dump_and_goes_on(netns_factory):
    ns = netns_factory()
    proc = subprocess.Popen(_run_argv("snapshot", "--netns", ns.name, "--watch", "0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "frame 1;" in _read_until(proc, "frame 1;")
        ns.delete()
        text = _read_until(proc, "retrying every 0.2s")
        assert "sockscope snapshot: network namespace" in text
        assert proc.poll() is None  # still watching
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def _read_until(proc, needle: str, timeout: float = 20) -> str:
    """Lines of proc's stdout up to the first one containing needle (bounded in time)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(deadline - time.monotonic()):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return "".join(seen)
    raise AssertionError(f"{needle!r} not seen within {timeout}s:\n{''.join(seen)[-2000:]}")


# --- --watch in a terminal: tmux --------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) running one command in a fixed-size pane."""

    def __init__(self, sock: Path):
        self.sock = sock
        self.server_pid = None

    def __call__(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-S", str(self.sock), *args], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start(self, argv: list[str], env: dict[str, str], columns=220, rows=80) -> None:
        flags = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
        self("-f", "/dev/null", "new-session", "-d", "-x", str(columns), "-y", str(rows),
             *flags, " ".join(map(_quote, argv)))
        self.server_pid = int(self("display-message", "-p", "#{pid}").strip())

    def pane(self, escapes: bool = False) -> str:
        return self("capture-pane", "-p", *(["-e"] if escapes else []))

    def wait_frame(self, number: int, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.pane()
            m = re.search(r"frame (\d+);", text)
            if m and int(m.group(1)) >= number:
                return text
            time.sleep(0.1)
        raise AssertionError(f"no frame {number} within {timeout}s:\n{text}")

    def stop(self) -> None:
        if self.server_pid is not None:
            subprocess.run(["tmux", "-S", str(self.sock), "kill-server"], capture_output=True,
                           timeout=10)
            try:
                os.kill(self.server_pid, 0)
            except ProcessLookupError:
                return
            os.kill(self.server_pid, signal.SIGKILL)  # our own server, by its pid


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@pytest.fixture
def tmux(tmp_path):
    require(shutil.which("tmux") is not None, "needs tmux (Debian tmux)")
    t = Tmux(tmp_path / "tmux.sock")
    yield t
    t.stop()


def pane_table(text: str, title: str) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the table under a title line; cells are split on 2+ spaces."""
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[at + (0 if title == "TOTALS" else 1):]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows[0], rows[1:]


def cell(headers, row, name) -> tuple[int, str | None]:
    """(value, changes) of a figure cell: '12' or '12 +1/+4'."""
    text = row[headers.index(name)]
    value, _, changes = text.partition(" ")
    return int(value), changes or None


def test_watch_in_tmux_shows_ss_figures_and_what_changed(mix, tmux, sockmix_factory, ss_figures):
    env = {"TERM": "tmux-256color", "PATH": os.environ["PATH"]}
    tmux.start(_run_argv("snapshot", "--netns", mix.ns.name, "--watch", "0.5"), env)
    text = tmux.wait_frame(2)
    ss = ss_figures(mix.ns)
    headers, rows = pane_table(text, "TOTALS")
    all_row = next(r for r in rows if r[0] == "all")
    for label, state in (("ESTAB", "established"), ("CLOSE-WAIT", "close_wait"),
                         ("TIME-WAIT", "time_wait"), ("LISTEN", "listen")):
        assert cell(headers, all_row, label) == (ss.state(state), None), (label, text)
    headers, rows = pane_table(text, "LOCAL PORTS")
    by_port = {r[0]: r for r in rows}
    assert cell(headers, by_port["18084"], "CLOSE-WAIT")[0] == \
        ss.local_port_states[(18084, "close_wait")]
    # the full accept queue keeps dropping the SYN-SENT socket's SYN retransmits
    assert re.search(r"^kernel: listen overflows \+\d+/\+\d+  listen drops ", text, re.M), text
    assert text.startswith("sockscope snapshot")

    # a change: 4 more CLOSE-WAIT on a new port, made in the same namespace
    before = int(re.search(r"frame (\d+);", tmux.pane()).group(1))
    sockmix_factory({"close_wait": {"host": "127.0.0.1", "port": 18184, "n": 4}}, ns=mix.ns)
    text = tmux.wait_frame(before + 2)
    ss = ss_figures(mix.ns)
    headers, rows = pane_table(text, "TOTALS")
    value, changes = cell(headers, next(r for r in rows if r[0] == "all"), "CLOSE-WAIT")
    assert value == ss.state("close_wait") == 5 + 4
    assert changes is not None and changes.endswith("/+4"), text
    headers, rows = pane_table(text, "LOCAL PORTS")
    row = next(r for r in rows if r[0] == "18184")
    assert cell(headers, row, "CLOSE-WAIT")[0] == 4
    assert cell(headers, row, "CLOSE-WAIT")[1].endswith("/+4")
    headers, peers = pane_table(text, "CLOSE-WAIT BY PEER")
    assert peers[0][0] == "127.0.0.1"
    value, changes = cell(headers, peers[0], "SOCKETS")
    assert value == 9 and changes.endswith("/+4")

    coloured = tmux.pane(escapes=True)
    assert "\x1b[1m" in coloured  # bold titles and headers on a terminal
    assert SGR.sub("", coloured).split("\n")[0] == tmux.pane().split("\n")[0]


def test_watch_in_tmux_honours_no_color(mix, tmux):
    env = {"TERM": "tmux-256color", "PATH": os.environ["PATH"], "NO_COLOR": "1"}
    tmux.start(_run_argv("snapshot", "--netns", mix.ns.name, "--watch", "0.5"), env)
    tmux.wait_frame(2)
    assert "\x1b[" not in tmux.pane(escapes=True)


def test_watch_fits_a_small_terminal(mix, tmux):
    env = {"TERM": "tmux-256color", "PATH": os.environ["PATH"]}
    tmux.start(_run_argv("snapshot", "--netns", mix.ns.name, "--watch", "0.5"), env,
               columns=60, rows=20)
    text = tmux.wait_frame(3)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= 20 and lines[0].startswith("sockscope snapshot")
    assert re.match(r"\.\.\. \d+ more lines", lines[-1]), text


# --- watch mode keeps two frames, whatever the number of frames -------------------------


def test_watch_memory_does_not_grow_with_frames():
    from support.records import EST, rec, survey_of

    def take(i=[0]):  # noqa: B006 - a frame counter
        i[0] += 1
        records = [rec(EST, 1000 + (i[0] * 7 + k) % 3000, 20000 + (k * i[0]) % 40000,
                       rq=k % 5) for k in range(2000)]
        return Frame(survey_of(records).without_index())

    used = []

    def show(frame, last, start, number):
        used.append(tracemalloc.get_traced_memory()[0])
        return render_text(build_report(frame, View(), last=last, start=start,
                                        frame_number=number, interval=1.0))

    tracemalloc.start()
    try:
        watch.run(take, show, interval=0.0001, out=io.StringIO(), terminal=True,
                  size=lambda: (200, 60), max_frames=30)
    finally:
        tracemalloc.stop()
    assert len(used) == 30
    assert used[-1] - used[5] < 256 * 1024, (used[5], used[-1])


def test_redraw_and_fit():
    lines = watch.fit("\x1b[1mhello\x1b[0m world\nb\nc\nd\n", 7, 3)
    assert lines == ["\x1b[1mhello\x1b[0m w", "b", "... 2 more lines (a larger window or a smaller --top)"[:7]]
    assert watch.redraw(["a", "b"]) == "\x1b[Ha\x1b[K\nb\x1b[K\x1b[J"
    assert watch.cut("\x1b[1mabcdef\x1b[0m", 3) == "\x1b[1mabc\x1b[0m"
    assert watch.use_colour("auto", io.StringIO(), {}) is False
    assert watch.use_colour("always", io.StringIO(), {"NO_COLOR": "1"}) is True

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert watch.use_colour("auto", Tty(), {}) is True
    assert watch.use_colour("auto", Tty(), {"NO_COLOR": "1"}) is False
    assert watch.use_colour("auto", Tty(), {"NO_COLOR": ""}) is True  # no-color.org: non-empty
    assert watch.use_colour("auto", Tty(), {"TERM": "dumb"}) is False


# --- tcp_info columns (tcp_info.enabled) -------------------------------------------------

WAITING = r"""
import json, socket, subprocess, sys, threading, time
subprocess.run(["ip", "link", "set", "lo", "mtu", "1500"], check=True)  # as tests/test_tcp_info.py
def server(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(8); return s
never = server(18201)                            # never accepts
c1 = socket.create_connection(("127.0.0.1", 18201)); c1.sendall(b"GET /")
healthy = server(18204)
c2 = socket.create_connection(("127.0.0.1", 18204)); c2.sendall(b"ping")
a2, _ = healthy.accept(); assert a2.recv(10) == b"ping"
bulk = server(18301)                             # a sender behind a slow reader
c3 = socket.socket(); c3.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
c3.connect(("127.0.0.1", 18301)); a3, _ = bulk.accept(); a3.setblocking(False)
def send():
    while True:
        try:
            a3.send(b"x" * 65536)
        except BlockingIOError:
            time.sleep(0.002)
def read():
    while True:
        c3.recv(1024); time.sleep(0.05)
for f in (send, read):
    threading.Thread(target=f, daemon=True).start()
print(json.dumps({"t": time.time()}), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def waiting(netns_factory, tmp_path):
    """A namespace whose port 18201 never accepts a client that connected (and sent a
    request) at `t`; 18204 accepts and reads; 18301 sends to a reader of 1 KB per 50 ms.
    Yields (ns, t, config file with tcp_info.enabled)."""
    ns = netns_factory()
    proc = ns.popen([PY, "-c", WAITING], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cfg = tmp_path / "tcp_info.yaml"
    cfg.write_text("tcp_info:\n  enabled: true\n")
    try:
        yield ns, json.loads(proc.stdout.readline())["t"], str(cfg)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_snapshot_tcp_info_columns_in_a_namespace(waiting):
    ns, connected, cfg = waiting
    time.sleep(max(0.0, connected + 2.0 - time.time()))
    before = time.time()
    report = snapshot_json("snapshot", "--netns", ns.name, "--config.file", cfg, "--json",
                           "--busy-interval", "0.5")
    after = time.time()
    local = {row["port"]: row["tcp_info"] for row in report["local_ports"]}
    unaccepted = local[18201]["oldest_unaccepted_seconds"]
    assert 2.0 <= unaccepted <= after - connected
    lastrcv = [float(m) for m in re.findall(r"\blastrcv:([0-9]+)", ns.run(
        ["ss", "-tinH", "state", "established", "sport", "=", ":18201"], check=True).stdout)]
    # ss's lastrcv is the same age read later: older by the time since the snapshot's dump
    assert lastrcv and lastrcv[0] / 1000 - (time.time() - before) <= unaccepted <= lastrcv[0] / 1000
    assert local[18204]["oldest_unaccepted_seconds"] == 0 and local[18204]["oldest_unread_seconds"] < 1
    assert local[18204]["rtt_sockets"] == 1 and local[18204]["rtt_p50_le"] is not None
    # the busy split over the 0.5 s between the two dumps: the slow reader's window limits 18301
    assert 0.5 <= report["tcp_info"]["busy_interval_seconds"] < 5
    busy = local[18301]["busy_seconds"]
    assert 0.3 <= sum(busy.values()) <= report["tcp_info"]["busy_interval_seconds"] + 0.2
    assert busy["receiver"] == max(busy.values()) and busy["receiver"] > 0.5 * sum(busy.values())

    r = subprocess.run(_run_argv("snapshot", "--netns", ns.name, "--config.file", cfg,
                                 "--busy-interval", "0"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    headers, rows = pane_table(r.stdout, "LOCAL PORTS")
    row = next(row for row in rows if row[0] == "18201")
    text = row[headers.index("UNACCEPTED")]
    assert text.endswith("s") and float(text[:-1]) >= 2.0, text
    assert "BUSY" not in headers and "no busy split" in r.stdout

    plain = snapshot_json("snapshot", "--netns", ns.name, "--json")  # tcp_info off: as before
    assert "tcp_info" not in json.dumps(plain)
