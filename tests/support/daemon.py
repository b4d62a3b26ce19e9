"""Run the real daemon as a subprocess and scrape it: the one launcher of the end-to-end
tests and of bench/scrape.py (which imports it as tests.support.daemon).

    d = start_daemon(work_dir, "poll:\\n  interval: 200ms\\n", netns="NS")
    d.url, d.address, d.port       # http(s)://127.0.0.1:PORT/metrics; d.port may be reassigned
    samples(d.scrape())            # {(sample name, sorted label pairs): value}
    d.wait_polls(2)                # samples once sockscope_polls_total grew by 2
    d.log()                        # everything it logged so far (stdout + stderr)
    d.stop()                       # SIGTERM by PID, wait, SIGKILL after a bound -> exit status

start_daemon writes `config_text` plus `prometheus.listen_address: 127.0.0.1:<free port>`
to work_dir/sockscope-<port>.yaml and runs `[*prefix, python, *program, "run",
"--config.file", FILE, *extra_args]` (+ `--netns NS`), program defaulting to
`-m sockscope`. With wait_up (the default) it returns once `ready(exposition text)` holds
(default: sockscope_up 1, i.e. a first good poll), scraping with `scheme`, `context` (TLS)
and `auth` (basic auth) as given. `src` runs another checkout's daemon/ directory (bench
--baseline): PYTHONPATH=src, started in work_dir so this checkout is not on its path.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

UP_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str, timeout: float = 5, *, context: ssl.SSLContext | None = None,
           auth: tuple[str, str] | None = None) -> str:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
        return r.read().decode()


def samples(text: str) -> dict:
    """{(sample name, sorted label pairs): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class DaemonError(RuntimeError):
    pass


def first_poll_up(text: str) -> bool:
    return "sockscope_up 1.0" in text


class Daemon:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, config_path: Path, *,
                 scheme: str = "http", context: ssl.SSLContext | None = None,
                 auth: tuple[str, str] | None = None,
                 ready: Callable[[str], bool] = first_poll_up):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.config_path = config_path
        self.scheme = scheme
        self.context = context
        self.auth = auth
        self.ready = ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self, timeout: float = 5) -> str:
        return scrape(self.url, timeout, context=self.context, auth=self.auth)

    def samples(self) -> dict:
        return samples(self.scrape())

    def value(self, name: str, **labels) -> float:
        return self.samples()[(name, tuple(sorted(labels.items())))]

    def wait_up(self, timeout: float = UP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError(f"sockscope exited with {self.proc.returncode}:\n{self.log()}")
            try:
                ready = self.ready(self.scrape(timeout=2))
            except OSError:
                ready = False
            if ready:
                if self.proc.poll() is not None:  # never a fixed port, but still: not ours
                    raise DaemonError(f"port {self.port} is answered by another process:\n{self.log()}")
                return
            time.sleep(0.1)
        raise DaemonError(f"sockscope did not come up within {timeout}s:\n{self.log()}")

    def wait_polls(self, n: int = 1, timeout: float = 20.0) -> dict:
        """Samples of the first scrape after sockscope_polls_total grew by n."""
        key = ("sockscope_polls_total", ())
        start = samples(self.scrape())[key]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = samples(self.scrape())
            if s[key] >= start + n:
                return s
            time.sleep(0.05)
        raise DaemonError(f"fewer than {n} polls within {timeout}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (by PID) and wait; SIGKILL after `timeout`. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_daemon(work_dir: Path, config_text: str, *, netns: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict | None = None,
                 program: tuple[str, ...] = ("-m", "sockscope"), prefix: tuple[str, ...] = (),
                 src: Path | None = None, cwd: Path | None = None,
                 wait_up: bool = True, up_timeout: float = UP_TIMEOUT, scheme: str = "http",
                 context: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None,
                 ready: Callable[[str], bool] = first_poll_up) -> Daemon:
    work_dir = Path(work_dir)
    if src is not None:
        env = {**(os.environ if env is None else env), "PYTHONPATH": str(src)}
        cwd = work_dir if cwd is None else cwd
    port = free_port()
    config_path = work_dir / f"sockscope-{port}.yaml"
    listen = f"prometheus:\n  listen_address: 127.0.0.1:{port}"
    if re.search(r"(?m)^prometheus:[ \t]*$", config_text):  # a prometheus section of the test's own
        config_path.write_text(re.sub(r"(?m)^prometheus:[ \t]*$", listen, config_text, count=1))
    else:
        config_path.write_text(config_text.rstrip("\n") + f"\n{listen}\n")
    log_path = work_dir / f"sockscope-{port}.log"
    argv = [*prefix, sys.executable, *program, "run", "--config.file", str(config_path), *extra_args]
    if netns is not None:
        argv += ["--netns", netns]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    daemon = Daemon(proc, port, log_path, config_path, scheme=scheme, context=context, auth=auth,
                    ready=ready)
    if wait_up:
        try:
            daemon.wait_up(up_timeout)
        except DaemonError:
            daemon.kill()
            raise
    return daemon
