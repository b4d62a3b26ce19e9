"""systemd/sockscope.service: systemd-analyze verify prints nothing, the offline security
score is at most 2.0, and the settings the daemon relies on are there (and the ones that
break it are not). systemd need not be PID 1 for either command."""

from __future__ import annotations

import re

from sockscope.config import DEFAULTS
from sockscope.service import STOP_POLLER_WAIT
from support.systemd import ROOT, install, security, settings, verify

MAX_EXPOSURE = 2.0


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "min" else 1)


def test_verify_prints_nothing(tmp_path):
    """verify exits 0 even when it drops a setting (e.g. a comment after a value): any
    output is a failure."""
    r = verify(install(tmp_path))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_security_exposure_at_most_2(tmp_path):
    # The unit alone: systemd-analyze also reads drop-ins beside the file
    # (systemd/sockscope.service.d/, opt-in relaxations tested in test_systemd_dropins.py).
    level, report = security(install(tmp_path))
    assert level <= MAX_EXPOSURE, report


def test_settings_the_daemon_needs():
    s = settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure" and one["DynamicUser"] == "yes"
    assert one["ConfigurationDirectory"] == "sockscope"
    assert "--config.file=/etc/sockscope/sockscope.yaml" in one["ExecStart"].split()
    # No capabilities at all: sock_diag dumps need none.
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    # FIELD_NOTES: these break the daemon (process metrics, socket uids).
    assert "ProcSubset" not in s and "PrivateUsers" not in s and "PrivateNetwork" not in s
    assert one["ProtectProc"] == "invisible"
    # Never a comment after a value: systemd would drop the setting silently.
    assert not [v for vs in s.values() for v in vs if "#" in v]


def test_timeouts_fit_the_daemon():
    one = {k: v[-1] for k, v in settings().items()}
    poll = DEFAULTS.poll
    # The watchdog must outlast the slowest poll that still completes: every family's
    # dump timing out, plus one interval.
    assert seconds(one["WatchdogSec"]) > len(poll.families) * poll.timeout + poll.interval
    # Stopping waits at most STOP_POLLER_WAIT for a poll, then closes the HTTP server
    # (and flushes Graphite within its own bound).
    assert seconds(one["TimeoutStopSec"]) >= 3 * STOP_POLLER_WAIT


def test_install_target_matches_the_unit():
    makefile = (ROOT / "Makefile").read_text()
    prefix = re.search(r"^PREFIX \?= (\S+)$", makefile, re.M)[1]
    confdir = re.search(r"^CONFDIR \?= (\S+)$", makefile, re.M)[1]
    exec_start = settings()["ExecStart"][0]
    assert exec_start.startswith(f"{prefix}/bin/sockscope run ")
    assert f"--config.file={confdir}/sockscope.yaml" in exec_start
