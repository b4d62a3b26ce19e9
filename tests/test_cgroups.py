"""cgroups.py: the cgroup2 mount, a process's cgroup, and the label of a cgroup path."""

from __future__ import annotations

import os

import pytest

from sockscope.cgroups import ROOT_LABEL, cgroup2_mount, proc_cgroup_path, unit_label

ID = "4f1c0a9e2b7d" + "0" * 52  # a 64-digit container id

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
"""


def test_the_cgroup2_mount_is_read_not_assumed():
    assert cgroup2_mount(HYBRID) == "/sys/fs/cgroup/unified"
    unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    assert cgroup2_mount(unified) == "/sys/fs/cgroup"
    assert cgroup2_mount(HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs")) is None
    # optional fields before the separator, an escaped space in the mount point
    odd = "50 31 0:40 / /mnt/cg\\040two rw shared:1 master:2 - cgroup2 none rw\n"
    assert cgroup2_mount(odd) == "/mnt/cg two"


def test_the_machines_own_mount_holds_this_process():
    with open("/proc/self/mountinfo") as f:
        mount = cgroup2_mount(f.read())
    assert mount is not None
    with open("/proc/self/cgroup") as f:
        path = proc_cgroup_path(f.read())
    assert path is not None
    assert os.path.isfile(os.path.join(mount, path.lstrip("/"), "cgroup.procs"))


def test_proc_cgroup_path_takes_the_unified_line():
    assert proc_cgroup_path("12:memory:/x\n0::/system.slice/nginx.service\n") == "/system.slice/nginx.service"
    assert proc_cgroup_path("0::/\n") == "/"
    assert proc_cgroup_path("4:memory:/x\n") is None


@pytest.mark.parametrize("path, label", [
    ("/", ROOT_LABEL),
    ("/init.scope", "init.scope"),
    ("/system.slice/nginx.service", "nginx.service"),
    ("/system.slice/nginx.service/worker", "nginx.service"),  # a service's own sub-cgroup
    ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
    ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
    ("/user.slice/user-1000.slice/user@1000.service/init.scope", "user@1000.service"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/app-x.service", "user@1000.service/app-x.service"),
    ("/system.slice", "system.slice"),
    ("/machine.slice", "machine.slice"),
    (f"/system.slice/docker-{ID}.scope", "docker/4f1c0a9e2b7d"),
    (f"/docker/{ID}", "docker/4f1c0a9e2b7d"),
    (f"/machine.slice/libpod-{ID}.scope", "podman/4f1c0a9e2b7d"),
    (f"/machine.slice/libpod-{ID}.scope/container", "podman/4f1c0a9e2b7d"),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope", "podman/4f1c0a9e2b7d"),
    (f"/system.slice/cri-containerd-{ID}.scope", "containerd/4f1c0a9e2b7d"),
    (f"/libpod_parent/libpod-{ID}", "podman/4f1c0a9e2b7d"),  # podman's cgroupfs manager
    (f"/libpod_parent/libpod-{ID}/ctr", "podman/4f1c0a9e2b7d"),
    ("/system.slice/docker.service", "docker.service"),  # the daemon itself, not a container
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b8e6f3a_52c1_4d7e_9a1b_2f3c4d5e6f70.slice/"
     f"cri-containerd-{ID}.scope", "pod/0b8e6f3a-52c1-4d7e-9a1b-2f3c4d5e6f70"),
    ("/kubepods.slice/kubepods-pod0b8e6f3a_52c1_4d7e_9a1b_2f3c4d5e6f70.slice/"
     f"crio-{ID}.scope", "pod/0b8e6f3a-52c1-4d7e-9a1b-2f3c4d5e6f70"),
    (f"/kubepods/besteffort/pod0b8e6f3a-52c1-4d7e-9a1b-2f3c4d5e6f70/{ID}", "pod/0b8e6f3a-52c1-4d7e-9a1b-2f3c4d5e6f70"),
    ("/system.slice/containerd.service/kubepods-besteffort-pod0b8e6f3a_52c1_4d7e_9a1b_2f3c4d5e6f70.slice"
     f":cri-containerd:{ID}", "pod/0b8e6f3a-52c1-4d7e-9a1b-2f3c4d5e6f70"),  # containerd's cgroupfs form
    (f"/system.slice/containerd.service/default.slice:cri-containerd:{ID}", "containerd/4f1c0a9e2b7d"),
    ("/kubepods.slice/kubepods-besteffort.slice", "kubepods-besteffort.slice"),
    ("/process_api/9f884f34", "/process_api/9f884f34"),  # no systemd names: the path
    ("/docker/not-an-id", "/docker/not-an-id"),
])
def test_unit_label(path, label):
    assert unit_label(path) == label
