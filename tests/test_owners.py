"""owners.py: socket inode -> processes, against the real /proc and against fake trees."""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import socket

import numpy as np
import pytest

from sockscope.owners import (
    PRIVILEGE_NOTE,
    Owner,
    effective_capabilities,
    find_owners,
    has_owner_privileges,
    port_owners,
)
from sockscope.snapshot import STATES
from sockscope.survey import SocketIndex
from support.forked import in_child
from support.prereq import require

ALL_CAPS = (1 << 41) - 1
NOBODY = 65534


def make_proc(root, processes):
    """A fake /proc: {pid: {"comm": str, "uid": int, "fds": {fd: link target}}}."""
    for pid, spec in processes.items():
        pid_dir = root / str(pid)
        (pid_dir / "fd").mkdir(parents=True)
        if "comm" in spec:
            (pid_dir / "comm").write_text(spec["comm"] + "\n")
        if "uid" in spec:
            uid = spec["uid"]
            (pid_dir / "status").write_text(
                f"Name:\t{spec.get('comm', '')}\nState:\tS (sleeping)\n"
                f"Uid:\t{uid + 1}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"
            )
        for fd, target in spec.get("fds", {}).items():
            os.symlink(target, pid_dir / "fd" / str(fd))
    (root / "self").mkdir(exist_ok=True)  # non-numeric entries are skipped
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    return str(root)


def root_name():
    return pwd.getpwuid(0).pw_name


# --- the real /proc -----------------------------------------------------------------


@pytest.fixture
def comm_name():
    """Give this process a distinctive comm for the duration of the test."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/comm") as f:
        old = f.read().rstrip("\n")
    new = "sockscope-test"
    assert libc.prctl(15, new.encode(), 0, 0, 0) == 0  # PR_SET_NAME
    try:
        yield new
    finally:
        libc.prctl(15, old.encode(), 0, 0, 0)


def test_real_listening_socket_maps_to_this_process(comm_name):
    with socket.socket() as listener, socket.socket() as other:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        other.bind(("127.0.0.1", 0))
        inode = os.fstat(listener.fileno()).st_ino
        other_inode = os.fstat(other.fileno()).st_ino
        closed = socket.socket()
        closed_inode = os.fstat(closed.fileno()).st_ino
        closed.close()

        scan = find_owners({inode, closed_inode})

    me = Owner(os.getpid(), comm_name, pwd.getpwuid(os.geteuid()).pw_name)
    assert scan.owners[inode] == (me,)
    assert closed_inode not in scan.owners
    assert other_inode not in scan.owners  # not asked for
    if not scan.complete:  # e.g. a sandbox's init refusing even root
        assert scan.note.endswith("could not be read")


def test_real_scan_without_privileges_is_partial_and_says_so():
    """Drop to nobody in a forked child: its own socket is found, root's fds are refused."""
    require(os.geteuid() == 0, "needs root to drop privileges to an unprivileged user")

    def as_nobody() -> dict:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            inode = os.fstat(s.fileno()).st_ino
            scan = find_owners({inode})
        return {
            "pid": os.getpid(),
            "caps_ok": has_owner_privileges(),
            "complete": scan.complete,
            "note": scan.note,
            "owners": [[o.pid, o.user] for o in scan.owners.get(inode, ())],
        }

    result = in_child(as_nobody)
    assert result["caps_ok"] is False
    assert result["complete"] is False
    assert re.fullmatch(
        re.escape(PRIVILEGE_NOTE) + r": [1-9]\d* process(es)? could not be read", result["note"]
    )
    nobody = pwd.getpwuid(NOBODY).pw_name
    assert result["owners"] == [[result["pid"], nobody]]


# --- fake /proc trees ---------------------------------------------------------------


def test_several_pids_share_one_inode(tmp_path):
    proc = make_proc(
        tmp_path,
        {
            100: {"comm": "nginx", "uid": 0, "fds": {0: "/dev/null", 6: "socket:[123]"}},
            200: {"comm": "nginx", "uid": 4242424, "fds": {6: "socket:[123]", 7: "socket:[123]"}},
            300: {"comm": "worker", "uid": 0, "fds": {3: "socket:[456]", 9: "socket:[123]"}},
            400: {"comm": "other", "uid": 0, "fds": {3: "socket:[999]"}},
        },
    )
    scan = find_owners({123, 456}, proc, caps=ALL_CAPS)
    root = root_name()
    assert scan.complete is True
    assert scan.note is None
    assert scan.owners == {
        123: (Owner(100, "nginx", root), Owner(200, "nginx", "4242424"), Owner(300, "worker", root)),
        456: (Owner(300, "worker", root),),
    }


def test_user_is_the_effective_uid(tmp_path):
    # make_proc writes real uid = effective + 1
    proc = make_proc(tmp_path, {10: {"comm": "x", "uid": 0, "fds": {3: "socket:[5]"}}})
    assert find_owners({5}, proc, caps=ALL_CAPS).owners[5] == (Owner(10, "x", root_name()),)


def test_non_socket_links_are_ignored(tmp_path):
    proc = make_proc(
        tmp_path,
        {
            10: {
                "comm": "p",
                "uid": 0,
                "fds": {
                    0: "/dev/null",
                    1: "pipe:[123]",
                    2: "anon_inode:[eventpoll]",
                    3: "socket:[abc]",
                    4: "/tmp/socket:[123]",
                    5: "socket:[1234]",
                },
            },
        },
    )
    scan = find_owners({123}, proc, caps=ALL_CAPS)
    assert scan.owners == {}
    assert scan.complete is True


def test_vanishing_processes_are_skipped_silently(tmp_path):
    proc = make_proc(
        tmp_path,
        {
            10: {"comm": "alive", "uid": 0, "fds": {3: "socket:[7]", 4: "socket:[8]"}},
            20: {"fds": {3: "socket:[7]"}},  # fds read, then gone before comm/status
            30: {"comm": "dying", "uid": 0, "fds": {3: "socket:[7]"}},
            50: {"comm": "exiting", "uid": 0, "fds": {3: "socket:[8]"}},
        },
    )

    def listdir(path):
        if path == proc:
            return os.listdir(path) + ["40"]  # listed, directory already gone
        if path.endswith("/50/fd"):
            raise ProcessLookupError(3, "No such process", path)
        return os.listdir(path)

    def readlink(path):
        if path.endswith("/10/fd/4"):
            raise FileNotFoundError(path)  # fd closed mid-scan
        if "/30/" in path:
            raise ProcessLookupError(path)
        return os.readlink(path)

    scan = find_owners({7, 8}, proc, caps=ALL_CAPS, listdir=listdir, readlink=readlink)
    assert scan.owners == {7: (Owner(10, "alive", root_name()),)}
    assert scan.complete is True
    assert scan.note is None


def test_permission_error_makes_the_scan_incomplete(tmp_path):
    proc = make_proc(
        tmp_path,
        {
            10: {"comm": "mine", "uid": 0, "fds": {3: "socket:[7]"}},
            20: {"comm": "theirs", "uid": 0, "fds": {3: "socket:[7]"}},
            30: {"comm": "theirs2", "uid": 0, "fds": {3: "socket:[8]"}},
        },
    )

    def listdir(path):
        if path.endswith("/20/fd"):
            raise PermissionError(13, "Permission denied", path)
        return os.listdir(path)

    def readlink(path):
        if "/30/fd/" in path:
            raise PermissionError(13, "Permission denied", path)
        return os.readlink(path)

    scan = find_owners({7, 8}, proc, caps=ALL_CAPS, listdir=listdir)
    assert scan.complete is False
    assert scan.note == "with root privileges, 1 process could not be read"
    assert scan.owners[7] == (Owner(10, "mine", root_name()),)  # what was read is kept

    scan = find_owners({7, 8}, proc, caps=ALL_CAPS, listdir=listdir, readlink=readlink)
    assert scan.note.endswith(", 2 processes could not be read")
    assert 8 not in scan.owners


def test_missing_capabilities_never_claim_completeness(tmp_path):
    proc = make_proc(tmp_path, {10: {"comm": "mine", "uid": 0, "fds": {3: "socket:[7]"}}})
    scan = find_owners({7}, proc, caps=1 << 2)  # CAP_DAC_READ_SEARCH only
    assert scan.owners == {7: (Owner(10, "mine", root_name()),)}
    assert scan.complete is False
    assert scan.note.startswith(PRIVILEGE_NOTE)


def test_no_wanted_inodes_means_no_scan():
    def listdir(path):
        raise AssertionError("scanned")

    scan = find_owners({0}, "/nonexistent", listdir=listdir)
    assert (scan.owners, scan.complete, scan.note) == ({}, True, None)


def test_capability_bits(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000080004\n")
    caps = effective_capabilities(str(status))
    assert caps == (1 << 2) | (1 << 19)
    assert has_owner_privileges(caps) is True
    assert has_owner_privileges(1 << 19) is False
    assert has_owner_privileges(1 << 2) is False
    assert has_owner_privileges(0) is False
    assert effective_capabilities(str(tmp_path / "missing")) is None


# --- port_owners -------------------------------------------------------------------

S = {name: i for i, name in enumerate(STATES)}


def index(*rows):
    """SocketIndex from (inode, sport, dport, state name) rows."""
    inode, sport, dport, slot = zip(*rows)
    return SocketIndex(np.array(inode, np.uint32), np.array(sport, np.uint16),
                       np.array(dport, np.uint16), np.array([S[s] for s in slot], np.uint8))


def test_port_owners_by_port_listener_and_close_wait(tmp_path):
    proc = make_proc(
        tmp_path,
        {
            100: {"comm": "web", "uid": 0, "fds": {3: "socket:[11]", 4: "socket:[12]",
                                                   5: "socket:[21]", 6: "socket:[22]",
                                                   7: "socket:[26]"}},
            101: {"comm": "web", "uid": 0, "fds": {3: "socket:[12]", 5: "socket:[23]"}},
            102: {"comm": "api", "uid": 4242424, "fds": {3: "socket:[13]", 4: "socket:[25]",
                                                         5: "socket:[31]", 6: "socket:[32]"}},
            103: {"comm": "other", "uid": 0, "fds": {3: "socket:[99]"}},
        },
    )
    idx = index(
        (11, 80, 0, "listen"), (12, 80, 0, "listen"),  # two reuseport members
        (13, 8080, 0, "listen"),
        (14, 9090, 0, "listen"),  # holder not visible
        (21, 80, 5000, "close_wait"), (22, 80, 5001, "close_wait"), (23, 80, 5002, "close_wait"),
        (24, 80, 5004, "close_wait"),  # holder not visible
        (25, 51000, 5432, "close_wait"),  # a client's leak: not a shown local port
        (26, 80, 5006, "established"),
        (31, 51001, 5432, "established"), (32, 51002, 5432, "established"),
        (99, 40000, 7, "established"),  # on no shown port
    )
    listener_inodes = {("0.0.0.0", 80): {11, 12}, ("::1", 8080): {13}, ("0.0.0.0", 9090): {14}}
    root_scans = []

    def listdir(path):
        if path == proc:
            root_scans.append(path)
        return os.listdir(path)

    info, scan = port_owners(idx, listener_inodes, [80, 8080], [5432], proc, caps=ALL_CAPS,
                             listdir=listdir)

    root = root_name()
    web100, web101 = Owner(100, "web", root), Owner(101, "web", root)
    api = Owner(102, "api", "4242424")
    assert len(root_scans) == 1  # one /proc walk for everything
    assert info.listeners == {("0.0.0.0", 80): (web100, web101), ("::1", 8080): (api,),
                              ("0.0.0.0", 9090): ()}
    # every socket on the port, listeners included; shared sockets count for each holder
    assert info.local == {80: ((web100, 5), (web101, 2)), 8080: ((api, 1),)}
    assert info.remote == {5432: ((api, 3),)}
    assert info.close_wait == {80: ((web100, 2), (web101, 1)), 51000: ((api, 1),)}
    assert info.close_wait_owned == {80: 3, 51000: 1}
    assert info.complete is True and info.note is None
    assert all(o.pid != 103 for owners in info.local.values() for o, _ in owners)

    # The same scan again, without scanning: a socket opened since has no known owner.
    later = index(*zip(idx.inode.tolist(), idx.sport.tolist(), idx.dport.tolist(),
                       [STATES[i] for i in idx.slot.tolist()]), (33, 80, 5007, "established"))
    again, same = port_owners(later, listener_inodes, [80, 8080], [5432], proc, scan=scan,
                              listdir=lambda path: pytest.fail("scanned again"))
    assert same is scan and again.scanned_at == info.scanned_at
    assert again.local == info.local


def test_port_owners_passes_incompleteness_through(tmp_path):
    proc = make_proc(tmp_path, {100: {"comm": "web", "uid": 0, "fds": {3: "socket:[11]"}}})

    def listdir(path):
        if path.endswith("/100/fd"):
            raise PermissionError(13, "Permission denied", path)
        return os.listdir(path)

    info, _ = port_owners(index((11, 80, 0, "listen")), {("0.0.0.0", 80): {11}}, [80], [], proc,
                          caps=ALL_CAPS, listdir=listdir)
    assert info.listeners == {("0.0.0.0", 80): ()}
    assert info.local == {}
    assert info.complete is False
    assert info.note.endswith("1 process could not be read")
