"""systemd/sockscope.service.d/netns.conf: the drop-in a sweep of network namespaces
needs. With the unit, systemd-analyze verify prints nothing; it grants exactly
CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE (other users' /proc/PID/ns/net), relaxes
RestrictNamespaces to network namespaces only, and leaves every other hardening setting
of the unit as it was."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from support.prereq import require, require_root
from test_systemd_unit import UNIT, analyze, settings

DROPIN = UNIT.parent / "sockscope.service.d" / "netns.conf"


def install(tmp_path: Path) -> Path:
    """The unit and this drop-in alone in a directory (other drop-ins left out)."""
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    (tmp_path / "sockscope.service.d").mkdir()
    shutil.copy(DROPIN, tmp_path / "sockscope.service.d" / DROPIN.name)
    return unit


def dropin_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in DROPIN.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#;[":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def security(unit: Path) -> str:
    r = subprocess.run([analyze(), "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    assert "Overall exposure level" in r.stdout, r.stdout + r.stderr
    return r.stdout


def test_verify_prints_nothing_with_the_dropin(tmp_path):
    tool = analyze()
    unit = install(tmp_path)
    exe = settings()["ExecStart"][0].split()[0]
    if os.access(exe, os.X_OK):
        cmd = [tool, "verify", str(unit)]
    else:
        require_root()
        require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
        top = "/" + exe.strip("/").split("/")[0]
        script = (f'mount -t tmpfs tmpfs {top} && mkdir -p "$(dirname {exe})" && '
                  f'printf "#!/bin/sh\\n" > {exe} && chmod +x {exe} && exec "$0" verify "$1"')
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, tool, str(unit)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_dropin_grants_what_a_sweep_needs_and_nothing_else(tmp_path):
    d = dropin_settings()
    assert set(d) == {"CapabilityBoundingSet", "AmbientCapabilities", "RestrictNamespaces"}
    assert d["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN CAP_SYS_PTRACE"]
    assert d["AmbientCapabilities"] == ["CAP_SYS_ADMIN CAP_SYS_PTRACE"]
    assert d["RestrictNamespaces"] == ["", "net"]  # reset the unit's "yes", then network only
    assert not [v for vs in d.values() for v in vs if "#" in v]

    out = security(install(tmp_path))
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_SYS_ADMIN ", out), out
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_SYS_PTRACE ", out), out
    assert re.search(r"✗ RestrictNamespaces=~net ", out), out
    for kind in ("user", "pid", "mnt", "uts", "ipc", "cgroup"):
        assert re.search(rf"✓ RestrictNamespaces=~{kind} ", out), (kind, out)
    # the rest of the unit's hardening is untouched
    for setting in ("PrivateDevices=", "ProtectKernelModules=", "NoNewPrivileges=", "SystemCallFilter=~@privileged",
                    "ProtectSystem=", "MemoryDenyWriteExecute="):
        assert re.search(rf"✓ {re.escape(setting)}", out), (setting, out)
    level = float(re.search(r"Overall exposure level for sockscope\.service: ([\d.]+)", out)[1])
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(UNIT, alone / UNIT.name)
    base = float(re.search(r"Overall exposure level for sockscope\.service: ([\d.]+)",
                           security(alone / UNIT.name))[1])
    assert base < level <= 2.5, (base, level)
