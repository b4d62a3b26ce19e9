"""systemd/sockscope.service.d/owners.conf, the drop-in for owners.enabled: the unit with it verifies
clean and stays under the exposure bound, and exactly its capabilities, given to a non-root
user (as DynamicUser gets them) under the unit's ProtectProc=invisible, let a /proc scan see
another (root) process's socket; without them the scan is partial."""

from __future__ import annotations

import ctypes
import os
import re
import socket
from pathlib import Path

from sockscope.owners import find_owners
from support.forked import in_child
from support.prereq import require_root
from support.systemd import DROPINS, install, security, settings, verify

DROP_IN = DROPINS / "owners.conf"
MAX_EXPOSURE = 2.0
CAPS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19}  # include/uapi/linux/capability.h
NOBODY = 65534


def test_drop_in_grants_exactly_the_two_capabilities():
    s = settings(DROP_IN)
    assert set(s) == {"CapabilityBoundingSet", "AmbientCapabilities", "SystemCallFilter"}
    assert set(s["CapabilityBoundingSet"][0].split()) == set(s["AmbientCapabilities"][0].split()) == set(CAPS)
    assert s["SystemCallFilter"] == ["~process_vm_readv process_vm_writev"]
    assert not [v for vs in s.values() for v in vs if "#" in v]
    assert "ProtectProc" not in s  # the unit's invisible stays: CAP_SYS_PTRACE sees through it


def test_unit_with_the_drop_in_verifies_clean_and_its_exposure_is_bounded(tmp_path):
    unit = install(tmp_path, DROP_IN)
    r = verify(unit)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    level, report = security(unit)
    assert level <= MAX_EXPOSURE, report
    # the drop-in was read: systemd-analyze counts the capability against the unit
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_SYS_PTRACE", report), report


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def scan_as_nobody(inode: int, caps: int, fd: int) -> dict:
    """In a forked child: the inherited `fd` closed, a private /proc mounted hidepid=invisible
    (ProtectProc=invisible), uid nobody with only `caps` (a bit mask below 32), then
    find_owners({inode})."""
    libc = ctypes.CDLL(None, use_errno=True)

    def scan() -> dict:
        os.close(fd)  # the socket's holder is the parent only
        assert libc.unshare(0x00020000) == 0, os.strerror(ctypes.get_errno())  # CLONE_NEWNS
        assert libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) == 0  # MS_REC|MS_PRIVATE
        assert libc.mount(b"proc", b"/proc", b"proc", 0, b"hidepid=invisible") == 0, \
            os.strerror(ctypes.get_errno())
        assert libc.prctl(8, 1, 0, 0, 0) == 0  # PR_SET_KEEPCAPS: keep permitted across setuid
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        data = (CapData * 2)(CapData(caps, caps, 0), CapData(0, 0, 0))
        assert libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), data) == 0, \
            os.strerror(ctypes.get_errno())  # _LINUX_CAPABILITY_VERSION_3
        found = find_owners({inode})
        status = Path("/proc/self/status").read_text()
        return {"complete": found.complete, "note": found.note,
                "owners": [o.pid for o in found.owners.get(inode, ())],
                "uid": os.getuid(), "cap_eff": int(re.search(r"CapEff:\s*(\w+)", status)[1], 16)}

    return in_child(scan)


def test_the_drop_ins_capabilities_let_a_non_root_scan_see_root_processes():
    require_root()
    granted = sum(1 << CAPS[name] for name in settings(DROP_IN)["AmbientCapabilities"][0].split())
    with socket.socket() as listener:  # held by this (root, full capabilities) process
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        inode, fd = os.fstat(listener.fileno()).st_ino, listener.fileno()
        with_caps = scan_as_nobody(inode, granted, fd)
        without = scan_as_nobody(inode, 0, fd)
        alone = {name: scan_as_nobody(inode, 1 << CAPS[name], fd) for name in CAPS}
    assert with_caps["uid"] == NOBODY and with_caps["cap_eff"] == granted
    assert with_caps["owners"] == [os.getpid()]
    assert without["cap_eff"] == 0 and without["owners"] == [] and without["complete"] is False
    # each one alone is not enough: hidepid hides the process, or its fd directory is 0500
    assert {name: r["owners"] for name, r in alone.items()} == {name: [] for name in CAPS}
