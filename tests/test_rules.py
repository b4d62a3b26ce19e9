"""Prometheus alert and recording rules (dashboards/prometheus): promtool check/test, every
alert unit-tested both firing and quiet, with severity, annotations, a runbook section and
namespace-aware commands; the unit tests pin each fixed defect (the old rule fails them);
and one end-to-end run: a real Prometheus evaluating the rules on a real sockscope that
watches a test namespace where 2,000 CLOSE-WAIT sockets appear on a brand-new listener."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support.daemon import start_daemon
from support.prereq import require
from support.prom_server import RealPrometheus

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "dashboards" / "prometheus"
ALERTS = RULES_DIR / "sockscope-alerts.yml"
RECORDING = RULES_DIR / "sockscope-rules.yml"
TESTS = sorted((RULES_DIR / "tests").glob("*.test.yml"))
ALERTING_MD = ROOT / "docs" / "alerting.md"
SEVERITIES = {"critical", "warning", "info"}
# Prefix of every ss/nstat/sysctl command in an annotation: enters the watched namespace
# when the scrape target carries a `netns` label (a name under /run/netns, or a path).
NETNS_PREFIX = ('{{ with $labels.netns }}nsenter --net={{ if not (match "/" .) }}/run/netns/{{ end }}'
                '{{ . }} {{ end }}')


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "needs promtool (Debian package prometheus; make system-deps)")
    return path


def rules(path: Path) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub (and most renderers) give the headings: lower case, punctuation
    other than - and _ dropped, spaces as -."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def promtool_test(promtool: str, directory: Path, test_file: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, "test", "rules", test_file], cwd=directory,
                          capture_output=True, text=True, timeout=120)


# -- static checks ----------------------------------------------------------------------


def test_promtool_check_rules(promtool):
    r = subprocess.run([promtool, "check", "rules", str(RECORDING), str(ALERTS)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules(RECORDING))} rules found" in r.stdout
    assert f"SUCCESS: {len(rules(ALERTS))} rules found" in r.stdout


@pytest.mark.parametrize("test_file", TESTS, ids=[t.name for t in TESTS])
def test_promtool_test_rules(promtool, test_file):
    r = promtool_test(promtool, test_file.parent, test_file.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_severity_summary_description_and_a_runbook_section():
    anchors = github_anchors(ALERTING_MD.read_text())
    for rule in rules(ALERTS):
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert "{{ $labels.instance }}" in annotations["summary"], name
        assert "`" in annotations["description"], f"{name}: name a command to run"
        url = annotations["runbook_url"]
        assert url == f"docs/alerting.md#{name.lower()}", (name, url)
        assert url.split("#")[1] in anchors, f"{name}: no section {url} in docs/alerting.md"


def test_every_alert_has_a_threshold_row_in_the_docs():
    text = ALERTING_MD.read_text()
    for rule in rules(ALERTS):
        assert re.search(rf"^\| {rule['alert']} \|", text, re.M), rule["alert"]


def test_commands_enter_the_watched_namespace():
    """Every ss/nstat/sysctl command in an annotation is prefixed so that it runs in the
    namespace named by the target's netns label (`ss ... sport = :8080` on the host would
    look at the wrong socket table)."""
    commands = 0
    for rule in rules(ALERTS):
        for text in rule["annotations"].values():
            for command in re.findall(r"`([^`]+)`", text):
                bare = command.removeprefix(NETNS_PREFIX)
                if re.match(r"(ss|nstat|sysctl) ", bare):
                    commands += 1
                    assert command.startswith(NETNS_PREFIX), (rule["alert"], command)
    assert commands >= 14


def test_commands_never_filter_on_port_other():
    """`sport = :other` (what the old CLOSE-WAIT alerts printed for port="other") is not a
    port: every alert on local-port series words port="other" on its own."""
    local_port_alerts = 0
    for rule in rules(ALERTS):
        description = rule["annotations"]["description"]
        if "sockscope_tcp_local_port_" in rule["expr"]:
            local_port_alerts += 1
            assert '{{ if eq $labels.port "other" }}' in description, rule["alert"]
            other_part = description.split("{{ else }}")[0]
            assert "sport = :" not in other_part, rule["alert"]
    assert local_port_alerts == 8


def test_every_alert_is_tested_firing_and_quiet():
    firing, quiet = set(), set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {r["alert"] for r in rules(ALERTS)}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def test_recording_rules_follow_level_metric_operations_and_are_tested():
    """level:metric:operations (https://prometheus.io/docs/practices/rules/): the metric
    part is an exported sockscope name (without _total under rate, `a_per_b` for a
    division), and each rule's value and kept labels are pinned by a promtool test."""
    golden = (ROOT / "tests" / "golden" / "metrics.prom").read_text()
    exported = set(re.findall(r"^# TYPE (\w+) ", golden, re.M))
    tested = " ".join(t["expr"] for path in TESTS for case in yaml.safe_load(path.read_text())["tests"]
                      for t in case.get("promql_expr_test", []))
    for rule in rules(RECORDING):
        level, metric, operations = rule["record"].split(":")
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", level) and level.startswith("instance"), rule["record"]
        assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", operations), rule["record"]
        numerator = metric.split("_per_")[0]
        assert numerator in exported or numerator + "_total" in exported, rule["record"]
        if operations.startswith("rate"):
            assert numerator + "_total" in rule["expr"], rule["record"]
        if "_per_" in metric:
            assert operations == "ratio", rule["record"]
        assert rule["record"] in tested.split(), f"{rule['record']}: no promql_expr_test"


def test_no_old_recording_rule_names_are_left():
    """The pre-convention names (sockscope:tcp_...:ratio) were renamed everywhere."""
    for path in [*RULES_DIR.rglob("*.yml"), *(ROOT / "dashboards" / "grafana").glob("*.json"),
                 *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]:
        assert not re.search(r"\bsockscope:[a-z_]+:", path.read_text()), path


def test_the_unit_tests_catch_a_changed_threshold(promtool, tmp_path):
    """The fixtures are sharp: raising the accept-queue threshold makes promtool fail."""
    old = "sockscope_tcp_listen_queue_length_per_limit:ratio >= 0.8"
    text = ALERTS.read_text()
    assert text.count(old) == 1
    r = run_with_alerts(promtool, tmp_path, text.replace(old, old.replace("0.8", "0.95")),
                        "sockscope-alerts.test.yml")
    assert r.returncode != 0
    assert "SockscopeAcceptQueueNearFull" in r.stdout + r.stderr


def run_with_alerts(promtool: str, tmp_path: Path, alerts_text: str, test_file: str):
    (tmp_path / "tests").mkdir(exist_ok=True)
    shutil.copy(RECORDING, tmp_path / RECORDING.name)
    (tmp_path / ALERTS.name).write_text(alerts_text)
    shutil.copy(RULES_DIR / "tests" / test_file, tmp_path / "tests" / test_file)
    return promtool_test(promtool, tmp_path / "tests", test_file)


# Every threshold and duration of the wait-time alerts (issue 12), moved a little either way:
# sockscope-waits.test.yml must fail, naming the alert. (alert, expression fragment or
# "for", replacement.)
WAIT_CHANGES = [
    ("SockscopeAcceptQueueWait", "_peak > 1", "_peak > 0.5"),
    ("SockscopeAcceptQueueWait", "_peak > 1", "_peak > 4"),
    ("SockscopeAcceptQueueWait", "for", "1m30s"),
    ("SockscopeAcceptQueueWait", "for", "2m15s"),
    ("SockscopeUnreadRequestOld", "_peak > 5", "_peak > 4"),
    ("SockscopeUnreadRequestOld", "_peak > 5", "_peak > 8"),
    ("SockscopeUnreadRequestOld", "for", "2m30s"),
    ("SockscopeUnreadRequestOld", "for", "3m15s"),
    ("SockscopeCloseWaitOld", "> 600", "> 500"),
    ("SockscopeCloseWaitOld", "> 600", "> 700"),
    ("SockscopeCloseWaitOld", "for", "9m"),
    ("SockscopeCloseWaitOld", "for", "14m45s"),
    ("SockscopeReceiverLimited", "> 0.5", "> 0.4"),
    ("SockscopeReceiverLimited", "> 0.5", "> 0.65"),
    ("SockscopeReceiverLimited", "> 0.1", "> 0.05"),
    ("SockscopeReceiverLimited", "> 0.1", "> 0.25"),
    ("SockscopeReceiverLimited", "for", "9m45s"),
    ("SockscopeReceiverLimited", "for", "10m15s"),
]


# The connection-outcome alerts (issue 13): sockscope-connections.test.yml must fail for
# each threshold, minimum rate and duration moved a little either way.
CONNECTION_CHANGES = [
    ("SockscopeConnectFailures", "> 0.1", "> 0.07"),
    ("SockscopeConnectFailures", "> 0.1", "> 0.2"),
    ("SockscopeConnectFailures", "> 0.05", "> 0.03"),
    ("SockscopeConnectFailures", "> 0.05", "> 0.25"),
    ("SockscopeConnectFailures", "for", "2m"),
    ("SockscopeConnectFailures", "for", "10m"),
    ("SockscopeUnreadDataCloses", "> 0.1", "> 0.04"),
    ("SockscopeUnreadDataCloses", "> 0.1", "> 0.25"),
    ("SockscopeUnreadDataCloses", "> 0.05", "> 0.03"),
    ("SockscopeUnreadDataCloses", "> 0.05", "> 0.3"),
    ("SockscopeUnreadDataCloses", "for", "5m"),
    ("SockscopeUnreadDataCloses", "for", "15m"),
]


# The per-unit CLOSE-WAIT alerts (issue 14): sockscope-units.test.yml must fail for each.
UNIT_CHANGES = [
    ("SockscopeUnitCloseWaitSpike", ">= 50", ">= 51"),
    ("SockscopeUnitCloseWaitSpike", ">= 50", ">= 45"),
    ("SockscopeUnitCloseWaitGrowing", ">= 20", ">= 31"),
    ("SockscopeUnitCloseWaitGrowing", ">= 20", ">= 18"),
    ("SockscopeUnitCloseWaitGrowing", "for", "14m"),
    ("SockscopeUnitCloseWaitGrowing", "for", "31m"),
]


THRESHOLD_CHANGES = [("sockscope-waits.test.yml", *c) for c in WAIT_CHANGES] + \
    [("sockscope-connections.test.yml", *c) for c in CONNECTION_CHANGES] + \
    [("sockscope-units.test.yml", *c) for c in UNIT_CHANGES]


@pytest.mark.parametrize("tests,alert,old,new", THRESHOLD_CHANGES,
                         ids=[f"{a}:{o}->{n}" for _, a, o, n in THRESHOLD_CHANGES])
def test_the_alert_tests_catch_a_changed_threshold(promtool, tmp_path, tests, alert, old, new):
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    if old == "for":
        rule["for"] = new
    else:
        assert rule["expr"].count(old) == 1, (alert, old)
        rule["expr"] = rule["expr"].replace(old, new)
    r = run_with_alerts(promtool, tmp_path, yaml.safe_dump(doc, sort_keys=False), tests)
    assert r.returncode != 0, f"{tests} passes with {alert} {old} -> {new}"
    assert f"alertname: {alert}," in r.stdout + r.stderr


# The rules as they were before issue 10 (defect 3), with today's annotations: the unit
# tests must fail on each, for the behaviour alone.
OLD_RULES = {
    "SockscopeCloseWaitSpike": (
        "sockscope-closewait.test.yml", None,
        'sockscope_tcp_local_port_sockets_peak{state="close_wait"}\n'
        '  - min_over_time(sockscope_tcp_local_port_sockets{state="close_wait"}[10m])\n>= 50\n'),
    "SockscopeStale": (
        "sockscope-alerts.test.yml", "2m",
        "sockscope_up == 0 or sockscope_snapshot_age_seconds > 60\n"),
    "SockscopeListenOverflows": (
        "sockscope-alerts.test.yml", None,
        "increase(sockscope_tcp_listen_overflows_total[5m]) > 0\n"),
}


@pytest.mark.parametrize("alert", sorted(OLD_RULES))
def test_the_unit_tests_fail_on_the_old_rule(promtool, tmp_path, alert):
    test_file, for_, expr = OLD_RULES[alert]
    doc = yaml.safe_load(ALERTS.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    rule["expr"] = expr
    rule.pop("for", None)
    if for_:
        rule["for"] = for_
    r = run_with_alerts(promtool, tmp_path, yaml.safe_dump(doc, sort_keys=False), test_file)
    assert r.returncode != 0, f"{test_file} passes with the old {alert}"
    assert f"alertname: {alert}," in r.stdout + r.stderr


# -- end to end: a real Prometheus, a real sockscope, a real spike ---------------------------

SPIKE = 2000       # server-side CLOSE-WAIT sockets on a brand-new listener
CLIENT_SIDE = 60   # client-side CLOSE-WAIT sockets: ephemeral local ports, port="other"
POLL_INTERVAL = 5  # the default poll.interval
ALERT_WITHIN = 30.0

# Runs inside the namespace: `spike PORT N` listens on PORT and makes N server-side
# CLOSE-WAIT sockets (clients shut down their write side, the accepted sockets are never
# closed: a stalled application); `client PORT N` makes N client-side ones (the server
# closes every accepted socket, the clients never close theirs: a leaking client pool).
# Prints "ready SECONDS" (from listen() to the last socket in its state), then holds
# every socket until stdin closes.
BUILD = r"""
import resource, socket, sys, time
mode, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
start = time.monotonic()
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(n + 16)
clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
accepted = [listener.accept()[0] for _ in range(n)]
for sock in clients if mode == "spike" else accepted:
    if mode == "spike":
        sock.shutdown(socket.SHUT_WR)
    else:
        sock.close()
# CLOSE-WAIT (state 08 in /proc/net/tcp) on the listener's port: as the local port of the
# server ends (spike), as the remote port of the client ends (client).
column = 1 if mode == "spike" else 2

def close_wait():
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[3] == "08" and int(r[column].split(":")[1], 16) == port)

# != n, not < n: /proc/net/tcp is read a page at a time, so a read while the other builder
# adds sockets can list some twice (a CI run saw 616 of 60)
deadline = time.monotonic() + 30  # a loaded 2-core machine once took over 10 s
while (have := close_wait()) != n and time.monotonic() < deadline:
    time.sleep(0.01)
print("ready %.3f" % (time.monotonic() - start) if have == n else "failed %d" % have, flush=True)
sys.stdin.read()
"""


def build(ns, mode: str, port: int, n: int):
    proc = ns.popen([sys.executable, "-c", BUILD, mode, str(port), str(n)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


def wait_ready(proc) -> float:
    line = proc.stdout.readline().split()  # bounded: the script gives up after 30 s
    assert line and line[0] == "ready", f"socket builder: {line}"
    return float(line[1])


def firing(prom: RealPrometheus, alert: str, **labels: str) -> dict | None:
    for a in prom.get("alerts")["alerts"]:
        if a["labels"].get("alertname") == alert and a["state"] == "firing" and \
                all(a["labels"].get(k) == v for k, v in labels.items()):
            return a
    return None


def run_command(description: str) -> str:
    """Run the first backticked command of an alert description on the host, as the
    operator would paste it."""
    command = re.search(r"`([^`]+)`", description).group(1)
    r = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (command, r.stderr)
    return r.stdout


def test_close_wait_spike_on_a_new_listener_alerts_end_to_end(netns_factory, tmp_path):
    require(shutil.which("nsenter") is not None, "needs nsenter (util-linux) for the alerts' commands")
    ns = netns_factory()
    daemon = start_daemon(tmp_path, f"poll:\n  interval: {POLL_INTERVAL}s\n", netns=ns.name)
    prom = RealPrometheus(
        tmp_path / "prometheus",
        [{"job_name": "sockscope",
          "static_configs": [{"targets": [daemon.address], "labels": {"netns": ns.name}}]}],
        rule_files=[str(RECORDING), str(ALERTS)])
    builders, frozen = [], False
    try:
        prom.start()
        prom.wait_target_up()
        assert float(prom.wait_value("sockscope_poll_interval_seconds")) == POLL_INTERVAL
        # The listener starts and fills between two polls, so the port's first sample is
        # already the spike. Polls are 5 s apart, but building 2,000 connections in Python
        # took up to 4 s on a loaded 2-core machine: the daemon is frozen meanwhile, so no
        # poll can see the spike half-built (the old rule would then have fired too).
        daemon.signal(signal.SIGSTOP)
        frozen = True
        spike_port, client_port = 18601, 18602
        builders = [build(ns, "spike", spike_port, SPIKE), build(ns, "client", client_port, CLIENT_SIDE)]
        took = [wait_ready(p) for p in builders]
        daemon.signal(signal.SIGCONT)
        frozen = False
        built = time.monotonic()

        found = {}
        deadline = built + ALERT_WITHIN
        while len(found) < 2 and time.monotonic() < deadline:
            for port in (str(spike_port), "other"):
                if port not in found:
                    alert = firing(prom, "SockscopeCloseWaitSpike", port=port, netns=ns.name)
                    if alert:
                        found[port] = (alert, time.monotonic() - built)
            time.sleep(0.5)
        assert set(found) == {str(spike_port), "other"}, \
            f"not firing within {ALERT_WITHIN}s of the spike: {prom.get('alerts')}"

        # The listener's series started with the spike: the old rule (peak minus the
        # 10-minute minimum) computes 0 for it and could never fire.
        selector = f'{{port="{spike_port}",state="close_wait"}}'
        first = prom.query(f"min_over_time(sockscope_tcp_local_port_sockets{selector}[10m])")
        assert float(first[0]["value"][1]) == SPIKE, "the first sample was not the whole spike"
        old = prom.query(f"sockscope_tcp_local_port_sockets_peak{selector}"
                         f" - min_over_time(sockscope_tcp_local_port_sockets{selector}[10m])")
        assert float(old[0]["value"][1]) == 0

        # What the alerts tell the operator to run works, from the host, in the namespace.
        alert, seconds = found[str(spike_port)]
        assert float(alert["value"]) == SPIKE
        assert alert["annotations"]["runbook_url"] == "docs/alerting.md#sockscopeclosewaitspike"
        t0 = time.monotonic()
        rows = run_command(alert["annotations"]["description"]).splitlines()[1:]  # header
        assert len(rows) == SPIKE and all(f":{spike_port} " in row for row in rows)
        alert, other_seconds = found["other"]
        assert float(alert["value"]) == CLIENT_SIDE
        top = run_command(alert["annotations"]["description"]).splitlines()[0].split()
        assert top[:2] == [str(CLIENT_SIDE), f"127.0.0.1:{client_port}"], top
        assert top[2].startswith('users:(("python') and ",fd=" not in top[2], top
        commands = time.monotonic() - t0
        assert not firing(prom, "SockscopeStale")
        print(f"\nbuilt in {took} s; new listener alerted {seconds:.1f} s and port=other "
              f"{other_seconds:.1f} s after the sockets were in place; the commands took {commands:.1f} s")
    finally:
        if frozen:
            daemon.signal(signal.SIGCONT)
        for p in builders:
            p.stdin.close()
        prom.stop()
        daemon.stop()
