"""The tools the benchmark compares, each measured the way it runs in production.

Every tool has measure() -> {"cpu": s, "wall": s, "rss": bytes, ...} for ONE full read
of the table, and close(). CPU is user+sys:
  probe (floor, sockscope in-process)  time.process_time() in a long-running process
  ss -tan > /dev/null                  rusage of the child (os.wait4): the whole process
  node_exporter tcpstat                CPU of its process around k scrapes / k
  collectd tcpconns                    CPU of its process over k reads / k (see Collectd)
  sockscope daemon                     its own sockscope_poll_duration_seconds (wall)
  sockscope daemon, whole process      Daemon.window(): utime+stime of `sockscope run` from
                                       /proc/PID/stat over a window of polls, per poll
Per-process CPU of a long-running daemon is the sum over its threads of
/proc/PID/task/*/schedstat field 1 (ns on CPU), finer than the 10 ms ticks of /proc/PID/stat.
Peak RSS is VmHWM of the process (the probes read their own); for ss, GNU time's %M
(see Ss: ru_maxrss of a direct child carries the runner's hiwater across fork + exec).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.support.daemon import start_daemon

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def result_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every namespace bench takes: --out (the result directory) and the hidden
    --inner (set by ns.rerun_inside for the run inside the bench's namespace)."""
    p.add_argument("--out", default=str(RESULTS), help="result directory")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return p


def write_results(out: str | Path, stem: str, result: dict, md: str) -> None:
    """<out>/<stem>-latest.json and .md (out made if missing); prints the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}-latest.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{stem}-latest.md").write_text(md)
    print(md)
SS_STATES = {
    "ESTAB": "established", "SYN-SENT": "syn_sent", "SYN-RECV": "syn_recv",
    "FIN-WAIT-1": "fin_wait1", "FIN-WAIT-2": "fin_wait2", "TIME-WAIT": "time_wait",
    "UNCONN": "close", "CLOSE-WAIT": "close_wait", "LAST-ACK": "last_ack",
    "LISTEN": "listen", "CLOSING": "closing",
}


def cpu_seconds(pid: int) -> float:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def proc_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the whole process, all threads: /proc/PID/stat
    fields 14 and 15 (utime, stime), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def minor_faults(pid: int) -> int:
    """Minor page faults of the whole process so far (/proc/PID/stat field 10)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}:{REPO}"}


def ss_counts() -> dict[str, int]:
    out = subprocess.run(["ss", "-tanH"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        state = SS_STATES[line.split(None, 1)[0]]
        counts[state] = counts.get(state, 0) + 1
    return counts


class Probe:
    def __init__(self, kind: str):
        self.name = {"floor": "floor", "sockscope": "sockscope"}[kind]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.probe", kind], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)

    def measure(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"probe {self.name} died")
        out = json.loads(line)
        out["rss"] = out.pop("maxrss")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Ss:
    """`ss -tan > /dev/null`, the whole process.

    CPU: user+sys of the child from os.wait4, one plain run per sample.
    Peak RSS: NOT ru_maxrss of that child. Linux starts a process's ru_maxrss at the
    hiwater of the memory it had before exec (signal->maxrss is raised to the old mm's
    hiwater in exec_mmap), and Python's subprocess forks/vforks from the benchmark runner,
    so ru_maxrss of a direct child reports the runner's size (that gave "ss: 295 MiB").
    Instead GNU time (`/usr/bin/time -f %M`, Debian package `time`) runs ss: ss is then
    forked from time, whose own RSS is ~1-2 MiB, so the carried value is negligible and
    %M (ss's ru_maxrss) is ss's own peak. One such extra run per table size (the warm-up),
    kept out of the CPU samples; without /usr/bin/time the RSS is not reported.
    """

    name = "ss"
    TIME = "/usr/bin/time"

    def __init__(self) -> None:
        self.rss: int | None = None

    @classmethod
    def peak_rss(cls, argv: list[str]) -> int | None:
        """Peak RSS in bytes of `argv` (run to completion, stdout discarded) via GNU time."""
        if not os.access(cls.TIME, os.X_OK):
            return None
        with tempfile.NamedTemporaryFile("r", prefix="sockscope-bench-time-") as out:
            subprocess.run([cls.TIME, "-f", "%M", "-o", out.name, *argv], check=True,
                           stdout=subprocess.DEVNULL, timeout=600)
            return int(out.read().split()[-1]) * 1024

    def measure(self) -> dict:
        if self.rss is None:
            self.rss = self.peak_rss(["ss", "-tan"])
        w0 = time.perf_counter()
        with open(os.devnull, "w") as null:
            p = subprocess.Popen(["ss", "-tan"], stdout=null)
            _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            raise RuntimeError(f"ss -tan exited {p.returncode}")
        out = {"cpu": ru.ru_utime + ru.ru_stime, "wall": time.perf_counter() - w0}
        if self.rss is not None:
            out["rss"] = self.rss
        return out

    def close(self) -> None:
        pass


class NodeExporter:
    """Debian's prometheus-node-exporter 1.5 with only the tcpstat collector."""

    name = "node_exporter"
    BIN = "/usr/bin/prometheus-node-exporter"
    PORT = 19100

    @classmethod
    def available(cls) -> bool:
        return os.access(cls.BIN, os.X_OK)

    def __init__(self, scrapes: int):
        self.k = scrapes
        self.proc = subprocess.Popen(
            [self.BIN, "--collector.disable-defaults", "--collector.tcpstat",
             f"--web.listen-address=127.0.0.1:{self.PORT}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                self._scrape()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("node_exporter did not answer")

    def _scrape(self) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.PORT}/metrics", timeout=120) as r:
            return r.read()

    def measure(self) -> dict:
        c0, w0 = cpu_seconds(self.proc.pid), time.perf_counter()
        for _ in range(self.k):
            body = self._scrape()
        if b"node_tcp_connection_states" not in body:
            raise RuntimeError("node_exporter: no tcpstat metrics")
        return {"cpu": (cpu_seconds(self.proc.pid) - c0) / self.k,
                "wall": (time.perf_counter() - w0) / self.k, "rss": vm_hwm(self.proc.pid)}

    def close(self) -> None:
        _stop(self.proc)


class Collectd:
    """collectd 5.12 tcpconns (one TCPDIAG_GETSOCK dump per read, as sockscope).

    CPU per read: collectd runs with `Interval` well above one read's duration and the
    csv plugin, and is SIGSTOPped outside its measuring slot. In a slot it is continued,
    CPU is sampled, and we wait until the csv file has k more rows (one row per read),
    then stop it and sample again: (CPU delta) / k. The delta also holds collectd's own
    idle loop and csv writes during the slot (small); a read still running when stopped
    cannot be counted because the interval leaves no second read in the slot.
    """

    name = "collectd"
    BIN = "/usr/sbin/collectd"

    @classmethod
    def available(cls) -> bool:
        return os.access(cls.BIN, os.X_OK)

    def __init__(self, reads: int, interval: float):
        self.k = reads
        self.dir = tempfile.mkdtemp(prefix="sockscope-bench-collectd-")
        conf = os.path.join(self.dir, "collectd.conf")
        with open(conf, "w") as f:
            f.write(f"""Hostname "bench"
FQDNLookup false
Interval {interval}
BaseDir "{self.dir}"
PIDFile "{self.dir}/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
LoadPlugin tcpconns
LoadPlugin csv
<Plugin tcpconns>
  ListeningPorts true
  AllPortsSummary true
</Plugin>
<Plugin csv>
  DataDir "{self.dir}/csv"
  StoreRates false
</Plugin>
""")
        self.proc = subprocess.Popen([self.BIN, "-f", "-C", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.rows_glob = f"{self.dir}/csv/bench/tcpconns-all/tcp_connections-LISTEN-*"
        if not self._wait_rows(1, 120):
            raise RuntimeError("collectd tcpconns wrote nothing")
        os.kill(self.proc.pid, signal.SIGSTOP)

    def _rows(self) -> int:
        n = 0
        for path in glob.glob(self.rows_glob):
            with open(path, "rb") as f:
                n += f.read().count(b"\n") - 1  # minus the header
        return n

    def _wait_rows(self, n: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._rows() >= n:
                return True
            time.sleep(0.005)
        return False

    def measure(self) -> dict:
        start = self._rows()
        c0, w0 = cpu_seconds(self.proc.pid), time.perf_counter()
        os.kill(self.proc.pid, signal.SIGCONT)
        ok = self._wait_rows(start + self.k, 300)
        os.kill(self.proc.pid, signal.SIGSTOP)
        if not ok:
            raise RuntimeError("collectd: reads did not complete")
        return {"cpu": (cpu_seconds(self.proc.pid) - c0) / self.k,
                "wall": (time.perf_counter() - w0) / self.k, "rss": vm_hwm(self.proc.pid)}

    def close(self) -> None:
        _stop(self.proc)
        subprocess.run(["rm", "-rf", self.dir])


class Daemon:
    """`sockscope run` itself: its poll duration metric and peak RSS (VmHWM).

    SIGSTOPped outside its slot; continued, it polls at once (its slot is overdue) and
    we read sockscope_poll_duration_seconds once the success timestamp moved.
    """

    name = "sockscope_daemon"

    def __init__(self, interval: float):
        self.interval = interval
        self.dir = tempfile.mkdtemp(prefix="sockscope-bench-daemon-")
        # The one launcher of the tests and benches (tests/support/daemon.py); it returns
        # once sockscope_up is 1, i.e. after the first good poll.
        self.daemon = start_daemon(
            Path(self.dir), f"poll:\n  interval: {interval}s\n",
            extra_args=("--log.level", "warning"), env=_env(), cwd=REPO, up_timeout=120)
        self.proc = self.daemon.proc
        self.port = self.daemon.port
        self.last = self._metrics().get("sockscope_last_poll_success_timestamp_seconds")
        os.kill(self.proc.pid, signal.SIGSTOP)

    def _metrics(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for name in ("sockscope_poll_duration_seconds", "sockscope_poll_sockets",
                     "sockscope_last_poll_success_timestamp_seconds", "sockscope_polls_total"):
            m = re.search(rf"^{name} (\S+)$", text, re.M)
            if m:
                out[name] = float(m.group(1))
        return out

    def measure(self) -> dict:
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            end = time.monotonic() + 300
            while time.monotonic() < end:
                m = self._metrics()
                ts = m.get("sockscope_last_poll_success_timestamp_seconds")
                if ts and ts != self.last:
                    self.last = ts
                    return {"wall": m["sockscope_poll_duration_seconds"],
                            "sockets": int(m.get("sockscope_poll_sockets", 0)),
                            "rss": vm_hwm(self.proc.pid)}
                time.sleep(0.1)
            raise RuntimeError("sockscope daemon: no new poll")
        finally:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def _polls_after(self, n: float, timeout: float) -> float:
        """Scrape every 20 ms until sockscope_polls_total exceeds `n`; returns it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            polls = self._metrics().get("sockscope_polls_total", n)
            if polls > n:
                return polls
            time.sleep(0.02)
        raise RuntimeError("sockscope daemon: no new poll")

    def window(self, polls: int) -> dict:
        """The whole process's CPU per poll over `polls` polls, nothing else asked of it.

        Both ends of the window sit just after a poll finished (seen within 20 ms by
        scraping sockscope_polls_total), so the window holds whole polls, the daemon's idle
        threads and the few small scrapes that found the last poll's end (cached bodies,
        ~1 ms each: < 1 % of the window's CPU at 100k sockets). utime/stime are the
        process's (all threads), in clock ticks (10 ms): over >= 10 polls of >= 100 ms that
        is <= 1 % resolution.
        """
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            n0 = self._polls_after(self._metrics().get("sockscope_polls_total", 0), 300)
            u0, s0 = proc_times(self.proc.pid)
            w0 = time.monotonic()
            time.sleep(max(0.0, polls * self.interval - 0.5 * self.interval))
            n1 = self._polls_after(n0 + polls - 1, 300)
            u1, s1 = proc_times(self.proc.pid)
            wall = time.monotonic() - w0
        finally:
            os.kill(self.proc.pid, signal.SIGSTOP)
        k = n1 - n0
        return {"user": (u1 - u0) / k, "sys": (s1 - s0) / k, "cpu": (u1 - u0 + s1 - s0) / k,
                "polls": int(k), "window": wall, "rss": vm_hwm(self.proc.pid)}

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.daemon.stop()
        subprocess.run(["rm", "-rf", self.dir])


class ConfigDaemon:
    """One `sockscope run` with the given configuration, SIGSTOPped between windows: its
    whole-process CPU per poll (utime/stime of /proc/PID/stat and the schedstat sum) over a
    window of polls with no scrape inside, and its peak RSS."""

    def __init__(self, name: str, config: str, port: int, interval: float) -> None:
        self.name, self.port, self.interval = name, port, interval
        self.dir = tempfile.mkdtemp(prefix=f"sockscope-bench-{name}-")
        conf = os.path.join(self.dir, "sockscope.yaml")
        with open(conf, "w") as f:
            f.write(config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockscope", "run", "--config.file", conf,
             "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warning"],
            env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.metrics().get(("sockscope_polls_total", "")):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"daemon {name} did not poll")
        os.kill(self.proc.pid, signal.SIGSTOP)

    def metrics(self) -> dict[tuple[str, str], float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=60) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line.startswith("sockscope_") and " " in line:
                key, value = line.rsplit(" ", 1)
                name, _, labels = key.partition("{")
                out[(name, labels.rstrip("}"))] = float(value)
        return out

    def window(self, polls: int) -> dict:
        """CPU per poll over `polls` x interval. Continued, the daemon polls at once, then on
        its grid; the window starts 1.5 intervals later, so it holds `polls` poll starts. A
        poll longer than the interval delays the next: the figures divide by the polls the
        daemon counted in the window when that is fewer."""
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            time.sleep(1.5 * self.interval)
            before = self.metrics()  # outside the window
            time.sleep(0.2 * self.interval)
            u0, s0 = proc_times(self.proc.pid)
            c0, f0 = cpu_seconds(self.proc.pid), minor_faults(self.proc.pid)
            time.sleep(polls * self.interval)
            u1, s1 = proc_times(self.proc.pid)
            c1, f1 = cpu_seconds(self.proc.pid), minor_faults(self.proc.pid)
            after = self.metrics()
        finally:
            os.kill(self.proc.pid, signal.SIGSTOP)
        seen = after[("sockscope_polls_total", "")] - before[("sockscope_polls_total", "")]
        n = min(polls, seen) if seen else polls
        src = {k[1].split('"')[1]: v for k, v in after.items() if k[0] == "sockscope_source_duration_seconds"}
        return {"polls": polls, "polls_seen": seen, "cpu": (c1 - c0) / n, "user": (u1 - u0) / n,
                "sys": (s1 - s0) / n, "minor_faults": (f1 - f0) / n, "source_seconds": src, "tcp_sockets": after.get(("sockscope_poll_sockets", ""), 0),
                "rss_peak": vm_hwm(self.proc.pid), "metrics": after}

    def close(self) -> None:
        _stop(self.proc)
        subprocess.run(["rm", "-rf", self.dir])
