"""The shipped systemd unit and its drop-ins, checked with systemd-analyze (systemd need not
be PID 1): their settings, the unit copied where systemd-analyze reads a drop-in with it,
`verify` and the offline `security` exposure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from support.prereq import require, require_root

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "systemd" / "sockscope.service"
DROPINS = UNIT.parent / "sockscope.service.d"


def settings(path: Path = UNIT) -> dict[str, list[str]]:
    """key -> every value it is given, in order (an empty value resets a list setting)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "needs systemd-analyze (Debian systemd; make system-deps installs it)")
    return tool


def install(tmp_path: Path, *dropins: Path) -> Path:
    """The unit with exactly `dropins` beside it (systemd-analyze reads sockscope.service.d/
    next to the file it is given: the repository's directory would add every drop-in)."""
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    if dropins:
        (tmp_path / "sockscope.service.d").mkdir()
        for d in dropins:
            shutil.copy(d, tmp_path / "sockscope.service.d" / d.name)
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` of `unit`. It exits 0 even when it drops a setting (e.g. a
    comment after a value): callers assert that it prints nothing. ExecStart must exist, so
    unless sockscope is installed it runs in a private mount namespace with a stand-in
    executable on a tmpfs over its top directory."""
    tool = analyze()
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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def security(unit: Path) -> tuple[float, str]:
    """(overall exposure, the whole report) of `systemd-analyze security --offline=true`."""
    r = subprocess.run([analyze(), "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for sockscope\.service: ([\d.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m[1]), r.stdout
