"""The benchmark's own network namespace: created with its sysctls, removed afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SYSCTLS = {
    # 2 (the default) lets loopback connects reuse TIME-WAIT ports: counts would drift.
    "net.ipv4.tcp_tw_reuse": "0",
    "net.ipv4.tcp_max_tw_buckets": "2000000",
    "net.ipv4.ip_local_port_range": "10000 60999",
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
}


def create(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True, timeout=30)
        args = [f"{k}={v}" for k, v in SYSCTLS.items()]
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", *args],
                       check=True, timeout=30)
    except BaseException:
        delete(name)
        raise


def delete(name: str) -> None:
    if os.path.exists(f"/run/netns/{name}"):
        subprocess.run(["ip", "netns", "del", name], timeout=60)


def rerun_inside(module: str, argv: list[str], cwd: Path, *, only_net: bool = False) -> int:
    """Root check, then `python -m module --inner *argv` inside a namespace of its own
    (created with SYSCTLS, deleted afterwards whatever happens); its exit status.
    `only_net`: enter only the network namespace (`nsenter --net`), keeping the host's
    /sys, which `ip netns exec` remounts (the cgroup2 tree is then not there)."""
    if os.geteuid() != 0:
        print(f"{module}: needs root (network namespaces)", file=sys.stderr)
        return 2
    name = f"sockscope-{module.replace('.', '-')}-{os.getpid()}"
    create(name)
    try:
        enter = ["nsenter", f"--net=/run/netns/{name}"] if only_net else ["ip", "netns", "exec", name]
        cmd = [*enter, sys.executable, "-m", module, "--inner", *argv]
        return subprocess.run(cmd, cwd=cwd).returncode
    finally:
        delete(name)
