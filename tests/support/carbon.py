"""A real carbon-cache (Debian graphite-carbon 1.1.7) for tests, and whisper read-back.

    with Carbon.start(tmp_dir) as carbon:      # free loopback ports, 1 s whisper schema
        carbon.port                            # plaintext TCP (and UDP) line receiver
        carbon.points()                        # {metric path: {timestamp: value}}
        carbon.stop(); carbon.restart()        # an outage, same storage
        carbon.kill(); carbon.signal(SIGSTOP)  # a crash; a carbon that stops reading

carbon runs in the foreground (`--debug start`), so the PID we hold is carbon's and it is
stopped by that PID. The config lives in a temp dir: STORAGE_DIR, LOCAL_DATA_DIR, CONF_DIR,
LOG_DIR and PID_DIR all under it; every listener is on 127.0.0.1.

Facts this relies on (checked on Debian 12):
- carbon's writer thread drains its in-memory cache, then sleeps 1 s; on SIGTERM it does
  NOT drain the cache first, so points received less than ~1 s before a stop can be lost
  by carbon itself. Tests that stop carbon create a quiet moment first (see
  test_graphite_e2e.quiet_stop).
- Tagged series (`name;k=v`) are stored under `_tagged/<3 hex>/<3 hex>/`; with
  TAG_HASH_FILENAMES = False the file name is the normalised series (tags sorted, `.`
  written as `_DOT_`), so it can be read back here. ENABLE_TAGS = False keeps carbon from
  posting to a graphite-web TagDB; tags are still parsed (and invalid ones rejected).

Whisper files are read with the `whisper` module of Debian's python3-whisper, run by the
system python3 (the tests' venv does not have it): one subprocess per read.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CARBON_CACHE = "/usr/bin/carbon-cache"
SYSTEM_PYTHON = "/usr/bin/python3"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

CARBON_CONF = """\
[cache]
STORAGE_DIR = {root}/storage
LOCAL_DATA_DIR = {root}/storage/whisper
WHITELISTS_DIR = {root}/storage/lists
CONF_DIR = {root}/conf
LOG_DIR = {root}/log
PID_DIR = {root}/run
ENABLE_LOGROTATION = False
USER =
MAX_CACHE_SIZE = inf
MAX_UPDATES_PER_SECOND = inf
MAX_CREATES_PER_MINUTE = inf
WHISPER_AUTOFLUSH = True
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {port}
ENABLE_UDP_LISTENER = True
UDP_RECEIVER_INTERFACE = 127.0.0.1
UDP_RECEIVER_PORT = {port}
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {pickle_port}
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = {query_port}
LOG_LISTENER_CONNECTIONS = True
LOG_UPDATES = False
LOG_CACHE_HITS = False
ENABLE_TAGS = False
TAG_HASH_FILENAMES = False
"""

# 1 s resolution for an hour: every push of a 1 s poll gets its own point.
STORAGE_SCHEMAS = """\
[everything]
pattern = .*
retentions = 1s:1h
"""

STORAGE_AGGREGATION = """\
[default]
pattern = .*
xFilesFactor = 0
aggregationMethod = last
"""

# Run by the system python3: prints {path: [[ts, value], ...]} for every whisper file.
_READ_WHISPER = r"""
import json, os, sys, time, whisper
root = sys.argv[1]
out = {}
now = int(time.time()) + 5
for base, _, files in os.walk(root):
    for name in files:
        if not name.endswith(".wsp"):
            continue
        full = os.path.join(base, name)
        try:
            (start, end, step), values = whisper.fetch(full, now - 3600, now)
        except Exception as e:  # a file being created right now
            continue
        rel = os.path.relpath(full, root)[: -len(".wsp")]
        out[rel] = [[start + i * step, v] for i, v in enumerate(values) if v is not None]
json.dump(out, sys.stdout)
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_both() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (carbon uses the same for both)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1")


def prerequisites_missing() -> str | None:
    """Why a real carbon cannot run here, or None."""
    if not os.path.exists(CARBON_CACHE):
        return f"needs {CARBON_CACHE} (Debian package graphite-carbon; `make system-deps`)"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import whisper"], capture_output=True)
    if probe.returncode != 0:
        return "needs the whisper module for the system python3 (Debian package python3-whisper)"
    if shutil.which("whisper-fetch") is None:
        return "needs whisper-fetch (Debian package python3-whisper)"
    return None


def decode_tagged(rel: str) -> str:
    """A `_tagged/abc/def/name;k=v` file path -> the series as carbon normalised it."""
    name = rel.split(os.sep, 3)[3]
    return name.replace("_DOT_", ".")


def series_name(rel: str) -> str:
    """Relative whisper path (no .wsp) -> Graphite series name."""
    if rel.startswith("_tagged" + os.sep):
        return decode_tagged(rel)
    return rel.replace(os.sep, ".")


class Carbon:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port_both()
        self.proc: subprocess.Popen | None = None
        for sub in ("storage/whisper", "storage/lists", "conf", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        conf = CARBON_CONF.format(root=self.root, port=self.port,
                                  pickle_port=free_port(), query_port=free_port())
        (self.root / "conf" / "carbon.conf").write_text(conf)
        (self.root / "conf" / "storage-schemas.conf").write_text(STORAGE_SCHEMAS)
        (self.root / "conf" / "storage-aggregation.conf").write_text(STORAGE_AGGREGATION)
        self._out = open(self.root / "carbon.out", "ab")

    @classmethod
    def start(cls, root: Path) -> "Carbon":
        carbon = cls(root)
        carbon.restart()
        return carbon

    @property
    def whisper_dir(self) -> Path:
        return self.root / "storage" / "whisper"

    def restart(self) -> None:
        """Start carbon-cache (again, same port and storage); wait until it accepts lines."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("carbon is already running")
        pidfile = self.root / "run" / "carbon-cache.pid"
        pidfile.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [CARBON_CACHE, f"--config={self.root / 'conf' / 'carbon.conf'}",
             f"--pidfile={pidfile}", f"--logdir={self.root / 'log'}", "--debug", "start"],
            stdout=self._out, stderr=subprocess.STDOUT, cwd=self.root,
            env=dict(os.environ, GRAPHITE_ROOT=str(self.root), GRAPHITE_CONF_DIR=str(self.root / "conf")),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"carbon-cache exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"carbon-cache did not accept connections within {START_TIMEOUT}s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM by PID, wait for exit (SIGKILL after STOP_TIMEOUT)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # a stopped carbon would hold SIGTERM pending
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def signal(self, sig: int) -> None:
        """Send `sig` to carbon by PID (SIGSTOP/SIGCONT: a carbon that stops reading)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL by PID (a crash: its kernel resets connections with unread data, and the
        points in its cache not yet written are lost), wait for it; restart() works after."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        self.stop()
        self._out.close()

    def __enter__(self) -> "Carbon":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        text = (self.root / "carbon.out").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def points(self) -> dict[str, dict[int, float]]:
        """Every stored point: {series name: {timestamp: value}} (tagged series decoded)."""
        r = subprocess.run([SYSTEM_PYTHON, "-c", _READ_WHISPER, str(self.whisper_dir)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"reading whisper files failed: {r.stderr.strip()}")
        return {series_name(rel): {int(ts): v for ts, v in pts}
                for rel, pts in json.loads(r.stdout).items()}

    def fetch(self, series: str) -> dict[int, float]:
        """One untagged series read with `whisper-fetch --json` (the documented CLI)."""
        path = self.whisper_dir.joinpath(*series.split(".")).with_suffix(".wsp")
        now = int(time.time()) + 5
        r = subprocess.run(["whisper-fetch", "--json", f"--from={now - 3600}", f"--until={now}", str(path)],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"whisper-fetch {path}: {r.stderr.strip()}")
        data = json.loads(r.stdout)
        start, step = data["start"], data["step"]
        return {start + i * step: v for i, v in enumerate(data["values"]) if v is not None}
