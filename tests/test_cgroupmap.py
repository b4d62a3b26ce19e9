"""cgroupmap.py: cgroup id -> path -> label by walking a tree, rate-bounded, bounded cache.

A directory tree under tmp_path stands in for the cgroup2 mount (the walk only reads
directory entries and their inode numbers); one test walks the machine's real mount.
"""

from __future__ import annotations

import logging
import os

import pytest

from sockscope.cgroupmap import COST_RATIO, UNKNOWN, CgroupMap, find_mount


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(root, *paths: str) -> dict[str, int]:
    out = {}
    for p in paths:
        os.makedirs(root / p.lstrip("/"), exist_ok=True)
        out[p] = os.stat(root / p.lstrip("/")).st_ino
    return out


@pytest.fixture
def tree(tmp_path):
    ino = make(tmp_path, "/system.slice/nginx.service", "/system.slice/nginx.service/worker",
               "/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.service")
    (tmp_path / "system.slice" / "cgroup.procs").write_text("")  # files are not cgroups
    return tmp_path, ino


def test_ids_map_to_paths_and_labels(tree):
    root, ino = tree
    cg = CgroupMap(str(root), monotonic=Clock())
    got = cg.labels([ino["/system.slice/nginx.service"], ino["/system.slice/nginx.service/worker"],
                     ino["/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.service"],
                     os.stat(root).st_ino])
    assert list(got.values()) == ["nginx.service", "nginx.service", "user@1000.service/app-x.service", "-.slice"]
    assert cg.path(ino["/system.slice/nginx.service/worker"]) == "/system.slice/nginx.service/worker"
    assert cg.walks == 1
    cg.labels([ino["/system.slice/nginx.service"]])  # cached: no walk
    assert cg.walks == 1


def test_a_miss_walks_again_only_when_the_rate_allows(tree):
    root, ino = tree
    clock = Clock()
    cg = CgroupMap(str(root), min_interval=5.0, monotonic=clock)
    assert cg.labels([ino["/system.slice/nginx.service"]])
    new = make(root, "/system.slice/redis.service")["/system.slice/redis.service"]
    clock.now += 1
    assert cg.labels([new]) == {new: UNKNOWN}  # too soon: no walk, unknown for now
    assert cg.walks == 1
    clock.now += 4
    assert cg.labels([new]) == {new: "redis.service"}
    assert cg.walks == 2


def test_the_walk_rate_follows_its_cost(tree):
    root, ino = tree

    class Slow(Clock):
        def __call__(self) -> float:  # every reading advances 0.1 s: a walk "takes" 0.1 s
            self.now += 0.1
            return self.now

    clock = Slow()
    cg = CgroupMap(str(root), monotonic=clock)
    cg.labels([999_999_999])
    assert cg.walks == 1 and cg.last_walk_seconds == pytest.approx(0.1)
    cg.labels([999_999_998])
    assert cg.walks == 1  # within COST_RATIO x 0.1 s
    clock.now += COST_RATIO * 0.1
    cg.labels([999_999_998])
    assert cg.walks == 2


def test_an_id_a_complete_walk_missed_is_unknown_without_more_walks(tree):
    root, _ = tree
    cg = CgroupMap(str(root), monotonic=Clock())
    assert cg.labels([123456789]) == {123456789: UNKNOWN}
    for _ in range(5):
        cg.labels([123456789])
    assert cg.walks == 1


def test_a_vanished_cgroup_keeps_its_last_path_until_evicted(tree):
    root, ino = tree
    clock = Clock()
    cg = CgroupMap(str(root), max_entries=2, monotonic=clock)
    gone = make(root, "/system.slice/old.service")["/system.slice/old.service"]
    assert cg.labels([gone]) == {gone: "old.service"}
    os.rmdir(root / "system.slice" / "old.service")
    clock.now += 60
    a, b = ino["/system.slice/nginx.service"], ino["/system.slice/nginx.service/worker"]
    assert cg.labels([gone, a]) == {gone: "old.service", a: "nginx.service"}  # the walk did not forget it
    assert len(cg) == 2
    cg.labels([a, b])  # a third id: the least recently asked (gone) is evicted
    assert len(cg) == 2 and cg.path(gone) is None


def test_a_walk_that_hits_max_dirs_leaves_the_rest_unresolved_not_unknown_forever(tree):
    root, ino = tree
    clock = Clock()
    deep = ino["/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.service"]
    cg = CgroupMap(str(root), max_dirs=1, monotonic=clock)
    assert cg.labels([deep]) == {deep: UNKNOWN}
    cg.max_dirs = 1000
    clock.now += 1
    assert cg.labels([deep]) == {deep: "user@1000.service/app-x.service"}  # retried: not cached as unknown


def test_a_missing_mount_is_logged_once_and_retried(tmp_path, caplog):
    info = tmp_path / "mountinfo"
    info.write_text("25 30 0:23 / /sys rw - sysfs sysfs rw\n")
    clock = Clock()
    cg = CgroupMap(mountinfo=str(info), monotonic=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert cg.labels([5]) == {5: UNKNOWN}
            clock.now += 1
    assert cg.walk_errors == 3
    assert len([r for r in caplog.records if "cgroup2" in r.getMessage()]) == 1
    ino = make(tmp_path, "/cg/a.service")["/cg/a.service"]
    info.write_text(f"41 31 0:38 / {tmp_path / 'cg'} rw - cgroup2 cgroup2 rw\n")
    assert cg.labels([ino]) == {ino: "a.service"}


def test_the_real_mount_resolves_this_process_cgroup():
    mount = find_mount()
    assert mount is not None
    with open("/proc/self/cgroup") as f:
        rel = next(line[3:].strip() for line in f if line.startswith("0::"))
    own = os.stat(os.path.join(mount, rel.lstrip("/"))).st_ino
    cg = CgroupMap()
    cg.labels([own])
    assert cg.path(own) == rel


def test_an_unreadable_subtree_leaves_the_rest_resolved_and_its_ids_retried(tree, monkeypatch):
    root, ino = tree
    real = os.scandir
    locked = str(root / "user.slice")

    def scandir(path):
        if str(path).startswith(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr("sockscope.cgroupmap.os.scandir", scandir)
    clock = Clock()
    cg = CgroupMap(str(root), monotonic=clock)
    deep = ino["/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.service"]
    nginx = ino["/system.slice/nginx.service"]
    assert cg.labels([deep, nginx]) == {deep: UNKNOWN, nginx: "nginx.service"}
    monkeypatch.setattr("sockscope.cgroupmap.os.scandir", real)
    clock.now += 1
    assert cg.labels([deep]) == {deep: "user@1000.service/app-x.service"}  # not cached as unknown for good


def test_an_unexpected_error_in_a_walk_is_logged_and_leaves_ids_unknown(tree, monkeypatch, caplog):
    root, ino = tree
    cg = CgroupMap(str(root), monotonic=Clock())

    def broken(*args):
        raise ValueError("surprise")

    monkeypatch.setattr(cg, "_scan", broken)
    with caplog.at_level(logging.WARNING):
        assert cg.labels([ino["/system.slice/nginx.service"]]) == {ino["/system.slice/nginx.service"]: UNKNOWN}
    assert cg.walk_errors == 1 and "surprise" in caplog.text
