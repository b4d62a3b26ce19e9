"""cgroup2: where the tree is mounted, which cgroup a process is in, and the label a cgroup
path gets (its systemd unit, its container, or the path itself).

The kernel reports each full socket's cgroup as the inode number of its cgroup2 directory
(INET_DIAG_CGROUP_ID); a process's cgroup is the "0::" line of /proc/PID/cgroup. Both lead
to a path below the cgroup2 mount, which is not always /sys/fs/cgroup (a hybrid layout
mounts it at /sys/fs/cgroup/unified): the mount is read from /proc/self/mountinfo.
"""

from __future__ import annotations

import re

__all__ = ["cgroup2_mount", "container_label", "proc_cgroup_path", "unit_label", "ROOT_LABEL"]

ROOT_LABEL = "-.slice"  # the root cgroup, as systemd names it

_UNIT_SUFFIXES = (".service", ".scope")
# Container runtimes' leaf cgroups: systemd driver ("docker-<id>.scope") and cgroupfs driver
# ("/docker/<id>"; podman's "/libpod_parent/libpod-<id>"). The id is 64 hex digits; labels
# carry its first 12, as `docker ps` shows.
_SCOPE_RUNTIMES = {"docker": "docker", "libpod": "podman", "cri-containerd": "containerd", "crio": "crio"}
_SCOPE_CONTAINER = re.compile(r"^(docker|libpod|cri-containerd|crio)-([0-9a-f]{64})(?:\.scope)?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# kubepods: ".../kubepods-burstable-pod<uid with _>.slice/..." (systemd driver) or
# ".../kubepods/burstable/pod<uid>/<id>" (cgroupfs driver).
_POD = re.compile(r"^(?:kubepods(?:-[a-z]+)*-)?pod([0-9a-fA-F_-]{36})(?:\.slice)?$")
_USER_MANAGER = re.compile(r"^user@\d+\.service$")
# containerd's cgroupfs layout under a systemd service: "<parent>.slice:<runtime>:<id>" in one component
_COLON_FORM = re.compile(r"^(.+)\.slice:(docker|cri-containerd|crio):([0-9a-f]{64})$")


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \040 \011 \012 \134
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup2_mount(mountinfo: str) -> str | None:
    """The first cgroup2 mount point in /proc/self/mountinfo text; None without one."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and tail and tail[0] == "cgroup2":
            return _unescape_mountinfo(fields[4])
    return None


def proc_cgroup_path(text: str) -> str | None:
    """The cgroup2 path of a process from its /proc/PID/cgroup text (the "0::" line); None
    when it has none (a cgroup v1-only host)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def unit_label(path: str) -> str:
    """The label of a cgroup path (relative to the cgroup2 mount, starting with "/").

    - a container: `docker/<id12>`, `podman/<id12>`, `containerd/<id12>`, `crio/<id12>`; in a
      Kubernetes pod: `pod/<uid>` (one label per pod whatever its containers, so a restarted
      container keeps its series);
    - else the innermost systemd service or scope (`/system.slice/nginx.service/worker` ->
      `nginx.service`); a user manager's own units keep their manager as a prefix
      (`user@1000.service/app.slice/x.service` -> `user@1000.service/x.service`), its own
      process is `user@1000.service`;
    - else the innermost slice; the root cgroup is `-.slice`;
    - else (no systemd names) the path itself.
    """
    parts = [p for p in path.split("/") if p]
    if not parts:
        return ROOT_LABEL
    container = container_label(path)
    if container is not None:
        return container
    manager = next((i for i, p in enumerate(parts) if _USER_MANAGER.match(p)), None)
    inner = next((p for p in reversed(parts) if p.endswith(_UNIT_SUFFIXES)), None)
    if manager is not None:
        units = [p for p in parts[manager + 1:] if p.endswith(_UNIT_SUFFIXES) and p != "init.scope"]
        return parts[manager] + ("/" + units[-1] if units else "")
    if inner is not None:
        return inner
    slices = [p for p in parts if p.endswith(".slice")]
    if slices:
        return slices[-1]
    return "/" + "/".join(parts)


def container_label(path: str) -> str | None:
    """`docker/<id12>`, `podman/<id12>`, `containerd/<id12>`, `crio/<id12>` or `pod/<uid>` when
    the cgroup path belongs to a container or a Kubernetes pod (unit_label's first rule; the
    namespace sweep labels a container's network namespace with it too); None otherwise."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[0].startswith("kubepods"):
        for part in parts[1:]:
            pod = _POD.match(part)
            if pod is not None:
                return "pod/" + pod.group(1).replace("_", "-")
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        container = _SCOPE_CONTAINER.match(part)
        if container is not None:
            return f"{_SCOPE_RUNTIMES[container.group(1)]}/{container.group(2)[:12]}"
        if _HEX64.match(part) and i > 0 and parts[i - 1] in ("docker", "libpod"):
            return f"{_SCOPE_RUNTIMES[parts[i - 1]]}/{part[:12]}"
        colon = _COLON_FORM.match(part)
        if colon is not None:
            pod = _POD.match(colon.group(1))
            if pod is not None:
                return "pod/" + pod.group(1).replace("_", "-")
            return f"{_SCOPE_RUNTIMES[colon.group(2)]}/{colon.group(3)[:12]}"
    return None
