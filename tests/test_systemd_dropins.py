"""systemd/sockscope.service.d/netns.conf: the drop-in a sweep of network namespaces
needs. With the unit, systemd-analyze verify prints nothing; it grants exactly
CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE (other users' /proc/PID/ns/net), relaxes
RestrictNamespaces to network namespaces only, and leaves every other hardening setting
of the unit as it was."""

from __future__ import annotations

import re

from support.systemd import DROPINS, install, security, settings, verify

DROPIN = DROPINS / "netns.conf"


def test_verify_prints_nothing_with_the_dropin(tmp_path):
    r = verify(install(tmp_path, DROPIN))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_dropin_grants_what_a_sweep_needs_and_nothing_else(tmp_path):
    d = settings(DROPIN)
    assert set(d) == {"CapabilityBoundingSet", "AmbientCapabilities", "RestrictNamespaces"}
    assert d["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN CAP_SYS_PTRACE"]
    assert d["AmbientCapabilities"] == ["CAP_SYS_ADMIN CAP_SYS_PTRACE"]
    assert d["RestrictNamespaces"] == ["", "net"]  # reset the unit's "yes", then network only
    assert not [v for vs in d.values() for v in vs if "#" in v]

    level, out = security(install(tmp_path, DROPIN))
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_SYS_ADMIN ", out), out
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_SYS_PTRACE ", out), out
    assert re.search(r"✗ RestrictNamespaces=~net ", out), out
    for kind in ("user", "pid", "mnt", "uts", "ipc", "cgroup"):
        assert re.search(rf"✓ RestrictNamespaces=~{kind} ", out), (kind, out)
    # the rest of the unit's hardening is untouched
    for setting in ("PrivateDevices=", "ProtectKernelModules=", "NoNewPrivileges=", "SystemCallFilter=~@privileged",
                    "ProtectSystem=", "MemoryDenyWriteExecute="):
        assert re.search(rf"✓ {re.escape(setting)}", out), (setting, out)
    alone = tmp_path / "alone"
    alone.mkdir()
    base, _ = security(install(alone))
    assert base < level <= 2.5, (base, level)
