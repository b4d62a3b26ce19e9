"""`make install` / `make uninstall` (scripts/install.sh, scripts/uninstall.sh) and the sdist.

A staged install (DESTDIR) must name only its final PREFIX, run from there with /home and
/root hidden (the unit's ProtectHome=yes) and its staging directory gone, and carry no
test-only dependency; `make uninstall` must leave nothing but a config changed by hand.
Each install builds a real venv from /usr/bin/python3 (~12 s; pip takes the wheels from
its cache after the first run).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from support.prereq import require

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # what `make install` builds from by default
TEST_ONLY = ("pyroute2", "psutil")


def require_install_tools() -> None:
    require(os.geteuid() == 0, "needs root (a mount namespace for the relocated run)")
    for tool in ("make", "unshare", "mount"):
        require(shutil.which(tool) is not None, f"needs `{tool}` on PATH")
    ok = os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True).returncode == 0
    require(ok, f"needs {SYSTEM_PYTHON} with venv and ensurepip (Debian: python3-venv)")


def system_py() -> str:
    """The venv's lib/ directory name: pythonX.Y of the system interpreter."""
    return subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print('python%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def make(target: str, tree: Path = ROOT, **variables: str) -> subprocess.CompletedProcess:
    """`make TARGET VAR=value...` in `tree` (the checkout, or an unpacked sdist), with
    root's umask at its strictest: the service's dynamic user must still read the install."""
    argv = ["make", "-s", "-C", str(tree), target, *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(0o077))


def files_under(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*") if p.is_file() or p.is_symlink())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_relocated(stage: Path, prefix: str, script: str) -> subprocess.CompletedProcess:
    """`script` (sh) in a private mount namespace where the staged PREFIX is bind-mounted,
    read-only, at PREFIX (a tmpfs over its parent, so the host's is never touched), the
    staged config is at /run/sockscope-test.yaml, and the staging directory, /home and /root
    are empty tmpfs: what systemd's ProtectSystem=strict + ProtectHome=yes leave visible."""
    setup = f"""
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs {Path(prefix).parent}
mkdir {prefix}
mount --bind {stage}{prefix} {prefix}
mount -o remount,bind,ro {prefix}
mount -t tmpfs tmpfs /run
cp {stage}/etc/sockscope/sockscope.yaml /run/sockscope-test.yaml
mount -t tmpfs tmpfs {stage}
mount -t tmpfs tmpfs /root
mount -t tmpfs tmpfs /home
cd /
"""
    return subprocess.run(["unshare", "--mount", "sh", "-c", setup + script],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})


def test_staged_install_is_relocatable_and_uninstall_removes_it(tmp_path):
    """Defect 5 (issue 10): the old `make install DESTDIR=...` wrote DESTDIR into the
    scripts' shebangs, pyvenv.cfg and the byte-code (1,527 files named the staging path)
    and linked the venv to whatever `python3` came first on PATH (here pyenv's, under
    /root); the old install also put pyroute2's ss2 into bin/."""
    require_install_tools()
    stage = tmp_path / "stage"
    prefix = "/opt/sockscope"
    r = make("install", DESTDIR=str(stage))
    assert r.returncode == 0, r.stdout + r.stderr
    venv = stage / prefix.lstrip("/")
    py = system_py()

    # Nothing under the staged tree names the staging directory: text, byte-code, links.
    needle = os.fsencode(stage)
    naming = [str(p) for p in files_under(stage)
              if (p.is_symlink() and needle in os.fsencode(os.readlink(p)))
              or (not p.is_symlink() and needle in p.read_bytes())]
    assert naming == []
    assert (venv / "bin" / "sockscope").read_text().splitlines()[0] == f"#!{prefix}/bin/python"
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines())
    assert cfg["home"] == "/usr/bin"
    assert os.path.realpath(venv / "bin" / "python3").startswith("/usr/")
    # Readable by the service's dynamic user although make ran with umask 077.
    unreadable = [str(p) for p in files_under(stage)
                  if not p.is_symlink() and not p.stat().st_mode & 0o004]
    assert unreadable == []

    # Defect 6: no test-only distribution, so no pyroute2 scripts (ss2, pyroute2-*) in bin/.
    bins = sorted(p.name for p in (venv / "bin").iterdir())
    assert "sockscope" in bins
    assert [b for b in bins if b == "ss2" or b.startswith(("pyroute2", "psutil"))] == []
    site = venv / "lib" / py / "site-packages"
    installed = {re.split(r"-\d", d.name)[0].lower() for d in site.glob("*.dist-info")}
    assert {"sockscope", "prometheus_client", "numpy", "bcrypt", "graphyte", "pyyaml"} <= installed
    assert installed.isdisjoint(TEST_ONLY)

    unit = (stage / "etc/systemd/system/sockscope.service").read_text()
    assert f"ExecStart={prefix}/bin/sockscope run --config.file=/etc/sockscope/sockscope.yaml" in unit
    shipped = ROOT / "config" / "sockscope.yaml"
    assert sha256(stage / "etc/sockscope/sockscope.yaml") == sha256(shipped)

    # Moved to PREFIX, with the staging directory, /root and /home hidden: it runs, its
    # byte-code is used (compiled for the final paths), its config checks.
    r = run_relocated(stage, prefix, f"""
ls -A {stage} | wc -l
{prefix}/bin/sockscope version
{prefix}/bin/sockscope check-config /run/sockscope-test.yaml
{prefix}/bin/python -v -c 'import sockscope.prometheus, sockscope.netlink, sockscope.webconfig, sockscope.graphite' 2>&1 |
  grep -c 'code object from .{prefix}/lib/{py}/site-packages/sockscope/__pycache__/'
""")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "0"  # the staging directory really was hidden
    assert re.fullmatch(r"sockscope \d+\.\d+\.\d+\S*", lines[1])
    assert lines[2] == "/run/sockscope-test.yaml: OK"
    assert int(lines[3]) >= 5  # sockscope/__init__ + the four modules, from valid .pyc

    # The config is still the one install wrote: uninstall removes everything.
    r = make("uninstall", DESTDIR=str(stage))
    assert r.returncode == 0, r.stdout + r.stderr
    assert files_under(stage) == []
    assert not venv.exists() and not (stage / "etc/sockscope").exists()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (tarball,) = out.glob("sockscope-*.tar.gz")
    return tarball


def test_upgrade_from_the_sdist_replaces_the_venv_and_keeps_a_changed_config(tmp_path, sdist):
    """Run from an unpacked sdist, an install over an earlier one starts from an empty
    venv (an older release's pyroute2 and its ss2 script do not survive), keeps a config
    changed by hand, and `make uninstall` then leaves that config alone. Non-default
    PREFIX and CONFDIR end up in the unit."""
    require_install_tools()
    subprocess.run(["tar", "-xzf", str(sdist), "-C", str(tmp_path)], check=True)
    (tree,) = tmp_path.glob("sockscope-*")
    stage = tmp_path / "stage"
    prefix, confdir = "/opt/sockscope-test", "/etc/sockscope-test"
    old = stage / prefix.lstrip("/")
    py = system_py()
    (old / "bin").mkdir(parents=True)
    (old / "pyvenv.cfg").write_text("home = /usr/bin\n")
    for name in ("sockscope", "ss2"):
        (old / "bin" / name).write_text("#!/bin/sh\n")
    (old / "lib" / py / "site-packages" / "pyroute2").mkdir(parents=True)
    # What an earlier `make install` recorded, and the config changed since.
    shipped = (tree / "config" / "sockscope.yaml").read_bytes()
    (old / "share" / "sockscope").mkdir(parents=True)
    (old / "share/sockscope/config.sha256").write_text(
        f"{hashlib.sha256(shipped).hexdigest()}  {confdir}/sockscope.yaml\n")
    conf = stage / confdir.lstrip("/") / "sockscope.yaml"
    conf.parent.mkdir(parents=True)
    changed = shipped + b"# changed by hand\n"
    conf.write_bytes(changed)

    r = make("install", tree, DESTDIR=str(stage), PREFIX=prefix, CONFDIR=confdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kept" in r.stdout
    assert conf.read_bytes() == changed
    assert not (old / "bin" / "ss2").exists()
    assert not (old / "lib" / py / "site-packages" / "pyroute2").exists()
    assert (old / "bin" / "sockscope").read_text().startswith(f"#!{prefix}/bin/python\n")
    assert sorted(p.name for p in old.parent.iterdir()) == [old.name]  # no .new/.old left
    unit = (stage / "etc/systemd/system/sockscope.service").read_text()
    assert f"ExecStart={prefix}/bin/sockscope run --config.file={confdir}/sockscope.yaml" in unit

    r = make("uninstall", tree, DESTDIR=str(stage), PREFIX=prefix, CONFDIR=confdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert files_under(stage) == [conf]
    assert conf.read_bytes() == changed


def test_install_refuses_an_interpreter_the_service_cannot_see(tmp_path):
    """A python under /root (pyenv's, or a venv made from it) would be hidden from the
    service by ProtectHome=yes: refused with the reason, before anything is written."""
    require_install_tools()
    stage = tmp_path / "stage"
    hidden = Path(tempfile.mkdtemp(prefix="sockscope-test-", dir="/root"))
    try:
        (hidden / "python3").symlink_to(SYSTEM_PYTHON)
        r = make("install", DESTDIR=str(stage), INSTALL_PYTHON=str(hidden / "python3"))
    finally:
        shutil.rmtree(hidden)
    assert r.returncode != 0
    assert f"runs from {hidden}/python3" in r.stderr and "ProtectHome=yes" in r.stderr
    assert not stage.exists()


def test_uninstall_refuses_a_foreign_prefix_and_an_enabled_service(tmp_path):
    stage = tmp_path / "stage"
    foreign = stage / "opt" / "sockscope"
    foreign.mkdir(parents=True)
    (foreign / "data").write_text("not ours\n")
    r = make("uninstall", DESTDIR=str(stage))
    assert r.returncode != 0 and "not a sockscope install" in r.stderr
    assert (foreign / "data").exists()

    # A sockscope install whose unit is enabled: removing it would leave a dangling link.
    (foreign / "data").unlink()
    (foreign / "bin").mkdir()
    (foreign / "bin" / "sockscope").write_text("#!/bin/sh\n")
    (foreign / "pyvenv.cfg").write_text("home = /usr/bin\n")
    wants = stage / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "sockscope.service").symlink_to("/etc/systemd/system/sockscope.service")
    r = make("uninstall", DESTDIR=str(stage))
    assert r.returncode != 0 and "systemctl disable --now sockscope" in r.stderr
    assert (foreign / "bin" / "sockscope").exists()


def test_sdist_ships_config_unit_dashboards_and_install_scripts(sdist):
    """Defect 5: the sdist had only the package and README (19 files below were missing);
    `make install` from it needs the Makefile, scripts/, config/ and systemd/, and users
    want the dashboards."""
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        members = {n.split("/", 1)[1] for n in names if "/" in n}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    wanted = {"Makefile", "MANIFEST.in", "README.md", "pyproject.toml"}
    for d in ("config", "systemd", "dashboards", "scripts", "docs"):
        wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / d).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(wanted - members) == []
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]
    # Defect 6: pyroute2 and psutil only under the test extra.
    requires = re.findall(r"^Requires-Dist: (.*)$", pkg_info, re.M)
    runtime = [r for r in requires if "extra ==" not in r]
    assert runtime and not [r for r in runtime if r.lower().startswith(TEST_ONLY)]
    assert [r for r in requires if r.lower().startswith("pyroute2") and 'extra == "test"' in r]
