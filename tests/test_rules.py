"""Prometheus alert and recording rules (dashboards/prometheus): promtool check/test, and
that every alert is unit-tested both firing and quiet, with severity and annotations."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import require

RULES_DIR = Path(__file__).resolve().parent.parent / "dashboards" / "prometheus"
ALERTS = RULES_DIR / "sockscope-alerts.yml"
RECORDING = RULES_DIR / "sockscope-rules.yml"
TESTS = sorted((RULES_DIR / "tests").glob("*.test.yml"))
SEVERITIES = {"critical", "warning", "info"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "needs promtool (Debian package prometheus; make system-deps)")
    return path


def rules(path: Path) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules(promtool):
    r = subprocess.run([promtool, "check", "rules", str(RECORDING), str(ALERTS)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout
    assert f"SUCCESS: {len(rules(ALERTS))} rules found" in r.stdout


@pytest.mark.parametrize("test_file", TESTS, ids=[t.name for t in TESTS])
def test_promtool_test_rules(promtool, test_file):
    r = subprocess.run([promtool, "test", "rules", test_file.name], cwd=test_file.parent,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_severity_summary_description_and_a_what_to_check():
    for rule in rules(ALERTS):
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        description = rule["annotations"]["description"]
        assert "`" in description, f"{name}: name a command to run"
        assert "{{ $labels.instance }}" in rule["annotations"]["summary"], name


def test_every_alert_is_tested_firing_and_quiet():
    firing, quiet = set(), set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {r["alert"] for r in rules(ALERTS)}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def test_every_recording_rule_is_used_or_tested():
    used = ALERTS.read_text() + "".join(p.read_text() for p in TESTS)
    grafana = RULES_DIR.parent / "grafana" / "sockscope-prometheus.json"
    if grafana.exists():
        used += grafana.read_text()
    for rule in rules(RECORDING):
        assert rule["record"] in used, rule["record"]


def test_the_unit_tests_catch_a_changed_threshold(promtool, tmp_path):
    """The fixtures are sharp: raising the accept-queue threshold makes promtool fail."""
    (tmp_path / "tests").mkdir()
    shutil.copy(RECORDING, tmp_path / RECORDING.name)
    text = ALERTS.read_text()
    assert text.count("sockscope:tcp_listen_queue_fill:ratio >= 0.8") == 1
    (tmp_path / ALERTS.name).write_text(text.replace("fill:ratio >= 0.8", "fill:ratio >= 0.95"))
    test_file = RULES_DIR / "tests" / "sockscope-alerts.test.yml"
    shutil.copy(test_file, tmp_path / "tests" / test_file.name)
    r = subprocess.run([promtool, "test", "rules", test_file.name], cwd=tmp_path / "tests",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "SockscopeAcceptQueueNearFull" in r.stdout + r.stderr
