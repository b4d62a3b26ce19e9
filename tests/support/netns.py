"""Throw-away network namespaces for the tests (needs root and iproute2's `ip`).

    ns = NetNS.create()            # sockscope-test-<pid>-<n>, lo up, sysctls set
    ns.run(["ss", "-tanOH"])       # -> CompletedProcess (text), via `ip netns exec`
    p = ns.popen([...])            # a process inside it; stopped by PID at delete()
    ns.delete()                    # stops what it started, then `ip netns del`

Everything stays on the namespace's loopback. Names are unique per process and counter,
so parallel runs (other pids) never collide and never touch each other's namespaces.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PREFIX = "sockscope-test"
_counter = itertools.count(1)

# Applied inside every namespace (values are strings, as /proc/sys wants them).
SYSCTLS: dict[str, str] = {
    # 2 (the default) lets loopback connects reuse TIME-WAIT ports: counts would drift.
    "net.ipv4.tcp_tw_reuse": "0",
    "net.ipv4.tcp_max_tw_buckets": "262144",
    "net.ipv4.ip_local_port_range": "10000 60999",
    # The fixed test ports (sockmix uses 18xxx) are never handed out as ephemeral ports.
    "net.ipv4.ip_local_reserved_ports": "18000-18999",
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.ipv6.conf.lo.disable_ipv6": "0",
    "net.ipv6.conf.all.disable_ipv6": "0",
}

# Runs inside the namespace with this same interpreter: writes the sysctls given as
# argv pairs, then prints them back as key=value lines.
_SYSCTL_SCRIPT = r"""
import sys
args = sys.argv[1:]
for key, value in zip(args[::2], args[1::2]):
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)
for key in args[::2]:
    with open("/proc/sys/" + key.replace(".", "/")) as f:
        print(key + "=" + " ".join(f.read().split()))
"""


class NetNSError(RuntimeError):
    pass


class NetNS:
    """One named network namespace; `delete()` is idempotent."""

    def __init__(self, name: str):
        self.name = name
        self.path = str(NETNS_DIR / name)
        self.sysctls: dict[str, str] = {}
        self._procs: list[subprocess.Popen] = []
        self.deleted = False

    # ---- lifecycle -----------------------------------------------------------------
    @classmethod
    def create(cls, sysctls: dict[str, str] | None = None, name: str | None = None) -> "NetNS":
        name = name or f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise NetNSError(f"ip netns add {name}: {r.stderr.strip() or r.returncode}")
        ns = cls(name)
        try:
            ns.run(["ip", "link", "set", "lo", "up"], check=True)
            ns.set_sysctls({**SYSCTLS, **(sysctls or {})})
        except BaseException:
            ns.delete()
            raise
        return ns

    def delete(self) -> None:
        """Stop the processes this object started (by PID), then delete the namespace."""
        for p in self._procs:
            stop_process(p)
        self._procs.clear()
        if self.deleted:
            return
        self.deleted = True
        r = subprocess.run(["ip", "netns", "del", self.name], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0 and os.path.exists(self.path):
            raise NetNSError(f"ip netns del {self.name}: {r.stderr.strip()}")

    def __enter__(self) -> "NetNS":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"

    # ---- running things inside -------------------------------------------------------
    def exec_argv(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, cmd)]

    def run(self, cmd: list[str], *, check: bool = False, timeout: float = 30,
            **kw) -> subprocess.CompletedProcess:
        """Run `cmd` inside the namespace; text output captured unless overridden."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        r = subprocess.run(self.exec_argv(cmd), timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise NetNSError(f"in {self.name}: {' '.join(map(str, cmd))} -> rc "
                             f"{r.returncode}: {(r.stderr or '').strip()}")
        return r

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        """Start `cmd` inside the namespace. `ip netns exec` execs the command (no fork),
        so the Popen's pid is the command's own pid; delete() stops it by that pid."""
        p = subprocess.Popen(self.exec_argv(cmd), **kw)
        self._procs.append(p)
        return p

    def python(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return self.run([sys.executable, *args], **kw)

    def set_sysctls(self, values: dict[str, str]) -> dict[str, str]:
        argv = [x for kv in values.items() for x in kv]
        r = self.python(["-c", _SYSCTL_SCRIPT, *argv], check=True)
        got = dict(line.split("=", 1) for line in r.stdout.splitlines())
        for key, want in values.items():
            if got.get(key) != " ".join(want.split()):
                raise NetNSError(f"sysctl {key}: wanted {want!r}, namespace has {got.get(key)!r}")
        self.sysctls.update(got)
        return got


def stop_process(p: subprocess.Popen, timeout: float = 10) -> int | None:
    """SIGTERM one process we started (by its pid), SIGKILL it if it lingers; reap it."""
    if p.poll() is None:
        try:
            p.terminate()
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)
    for stream in (p.stdin, p.stdout, p.stderr):
        if stream:
            try:
                stream.close()
            except OSError:
                pass
    return p.returncode
