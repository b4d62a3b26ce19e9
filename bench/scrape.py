"""Scrapes and memory of the real daemon: `python -m bench.scrape [--sizes 100000] [--1m] [--soak]`.

Needs root. Creates its own network namespace (sockscope-scrape-<pid>) and builds the
socket table inside it with a holder process (`ip netns exec NS python -m bench.scrape
--hold SIZE`, bench/loader.py's Table). The daemon runs in the caller's (host) namespace
as in production: `python -m sockscope run --netns NS --web.listen-address 127.0.0.1:PORT`
(default configuration otherwise: port caps 64/64, 256 listeners, poll.interval 5s),
so every scrape comes from outside on the host loopback and adds nothing to the table.

Per size:
  render     --render-scrapes sequential GETs of /metrics (plain text, then with the
             headers Prometheus sends: OpenMetrics + gzip); client-side wall time from
             connect to the last byte, median and p90; bytes and series (sample lines).
  cadence    the poll loop observed without scrapers for --duration s, then for
             --duration s per scrape pattern (--patterns: churn = a new connection per
             scrape, keepalive, gzip = keep-alive with Prometheus' headers) with --scrapers
             closed-loop scrapers spread over --client-procs processes (each: GET, read,
             check, GET again, bounded by the duration and --max-scrapes-each). A monitor
             fetches only the poll metrics (?name[]=) every 0.25 s in both periods and
             records every poll (finish time = sockscope_last_poll_success_timestamp_seconds,
             start = finish - sockscope_poll_duration_seconds). Cadence = mean spacing of
             poll starts; also reported: poll duration, polls completed, lateness of each
             poll start against its slot, and every scraper failure.
             Before each period the table's TIME-WAIT share is renewed (it lives 60 s),
             so both periods see the same table.
--soak       memory soak: a 10k table plus a churn process inside the namespace
             (bounded rate: short connections closed client first = TIME-WAIT turning over,
             connections held ~10 s then closed, listeners on new ports opened and closed),
             the daemon polling every --soak-interval; VmRSS/VmHWM of the daemon sampled
             every second until --soak-polls polls (or --soak-timeout). Reports first/last/
             max and the slope after a warm-up.
Results: bench/results/scrape-latest.{json,md} and soak-latest.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support.daemon import start_daemon

from . import ns as netns
from .run import machine
from .tools import REPO, _env

RESULTS = REPO / "bench" / "results"
PORT = 0  # set by Daemon to a free port of the host loopback
POLL_METRICS = ("sockscope_last_poll_success_timestamp_seconds", "sockscope_poll_duration_seconds",
                "sockscope_polls_total", "sockscope_poll_sockets")
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


# --------------------------------------------------------------------------- HTTP client

def fetch(path: str = "/metrics", headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes, float]:
    """One GET on a new connection: (status, body, seconds from connect to last byte)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return r.status, body, time.perf_counter() - t0
    finally:
        conn.close()


def parse_values(text: str, names=POLL_METRICS) -> dict[str, float]:
    out = {}
    for name in names:
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        if m:
            out[name] = float(m.group(1))
    return out


def poll_metrics() -> dict[str, float]:
    q = "&".join(f"name[]={n}" for n in POLL_METRICS)
    status, body, _ = fetch(f"/metrics?{q}", timeout=30)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return parse_values(body.decode())


def process_cpu(pid: int) -> float:
    """utime+stime of the whole process from /proc/PID/stat, threads that already exited
    included (per-task schedstat would lose them). Clock ticks: fine over a 60 s period."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]


# --------------------------------------------------------------------------- the daemon

class Daemon:
    """`sockscope run --netns NS` in this (host) namespace, default config unless told:
    started by tests/support/daemon.py's start_daemon, the tests' own launcher."""

    def __init__(self, ns_name: str, conf: str = "", src: Path | None = None):
        """src: the daemon/ directory to run (another checkout's, for --baseline)."""
        global PORT
        self.dir = tempfile.mkdtemp(prefix="sockscope-bench-scrape-")
        # A free port, never a fixed one: another run's daemon would answer for us. Up once
        # a poll succeeded (at 1M sockets the first one takes a while).
        self.daemon = start_daemon(
            Path(self.dir), conf, netns=ns_name, extra_args=("--log.level", "warning"),
            env=_env() if src is None else None, src=src, cwd=REPO if src is None else None,
            up_timeout=300, ready=_polled)
        self.proc = self.daemon.proc
        PORT = self.daemon.port

    def memory(self) -> dict[str, int]:
        with open(f"/proc/{self.proc.pid}/status") as f:
            text = f.read()
        return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024
                for k in ("VmRSS", "VmHWM")}

    def close(self) -> None:
        self.daemon.stop()
        subprocess.run(["rm", "-rf", self.dir])


def _polled(text: str) -> bool:
    return bool(parse_values(text).get("sockscope_last_poll_success_timestamp_seconds"))


# --------------------------------------------------------------------------- the table holder

class Holder:
    """A process inside the namespace holding a Table (and optionally churning)."""

    def __init__(self, ns_name: str, size: int, churn: bool = False, churn_seconds: float = 0):
        cmd = ["ip", "netns", "exec", ns_name, sys.executable, "-m", "bench.scrape", "--hold", str(size)]
        if churn:
            cmd += ["--churn-seconds", str(churn_seconds)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=_env(), cwd=REPO)
        self.info = self._answer()
        self.tw_created = time.monotonic()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("table holder died")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def refresh_time_wait(self) -> dict:
        """Waits until the TIME-WAIT share expired and makes it again (see Table)."""
        self.proc.stdin.write("tw\n")
        self.proc.stdin.flush()
        out = self._answer()
        self.tw_created = time.monotonic()
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def hold(size: int, churn_seconds: float) -> int:
    """Inside the namespace: build the table, answer commands on stdin, tear down at EOF."""
    from .loader import Table

    table = Table(size)
    churner = None
    try:
        table.build()
        if churn_seconds:
            churner = Churn(churn_seconds)
            churner.start()
        print(json.dumps({"build_seconds": table.build_seconds, "workers": len(table.plan)}), flush=True)
        for line in sys.stdin:
            if line.strip() == "tw":
                table.refresh_time_wait()
                print(json.dumps({"tw": True}), flush=True)
            else:
                break
    except Exception as e:  # noqa: BLE001 - reported to the parent
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    finally:
        if churner is not None:
            churner.stop()
        table.close()
    return 0


class Churn(threading.Thread):
    """Bounded churn on loopback inside the namespace, ticks of 0.1 s:
    TW_PER_TICK short connections closed client first (TIME-WAIT, 60 s each), HELD_PER_TICK
    connections held HOLD_SECONDS then closed client first (more TIME-WAIT), one listener on a
    new port per second, each closed after LISTEN_SECONDS (~100 ports > the 64-port cap, so
    tracked ports come and go and the rest fall into "other"). Stops after `seconds`."""

    TW_PER_TICK, HELD_PER_TICK, HOLD_SECONDS, LISTEN_SECONDS = 5, 5, 10.0, 100.0
    SERVER = "127.250.0.1"

    def __init__(self, seconds: float):
        super().__init__(daemon=True, name="churn")
        self.seconds = seconds
        self.halt = threading.Event()
        self.made = 0

    def _src(self, i: int) -> str:
        return f"127.251.{(i // 250) % 200}.{i % 250 + 1}"

    def _pair(self, ln: socket.socket, port: int) -> tuple[socket.socket, socket.socket]:
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
        c.bind((self._src(self.made), 0))
        self.made += 1
        c.connect((self.SERVER, port))
        s, _ = ln.accept()
        return c, s

    def run(self) -> None:
        def listener(port: int, backlog: int = 1024) -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.SERVER, port))
            s.listen(backlog)
            return s

        ln = listener(6000)
        held: list[tuple[float, socket.socket, socket.socket]] = []
        ports: list[tuple[float, socket.socket]] = []
        end = time.monotonic() + self.seconds
        tick, next_port = 0, 20000
        while not self.halt.is_set() and time.monotonic() < end:
            t0 = time.monotonic()
            for _ in range(self.TW_PER_TICK):
                c, s = self._pair(ln, 6000)
                c.close()
                s.close()
            for _ in range(self.HELD_PER_TICK):
                c, s = self._pair(ln, 6000)
                held.append((t0 + self.HOLD_SECONDS * random.uniform(0.5, 1.5), c, s))
            keep = []
            for t, c, s in held:
                if t <= t0:
                    c.close()
                    s.close()
                else:
                    keep.append((t, c, s))
            held = keep
            if tick % 10 == 0:
                ports.append((t0 + self.LISTEN_SECONDS, listener(next_port, 16)))
                next_port = 20000 + (next_port - 20000 + 1) % 5000
                while ports and ports[0][0] <= t0:
                    ports.pop(0)[1].close()
            tick += 1
            self.halt.wait(max(0.0, 0.1 - (time.monotonic() - t0)))
        for _, c, s in held:
            c.close()
            s.close()
        for _, s in ports:
            s.close()
        ln.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


# --------------------------------------------------------------------------- measurements

def render(n: int) -> dict:
    """n sequential scrapes, plain text then Prometheus' own Accept headers (gzip)."""
    out = {}
    for kind, headers in (("text", {}), ("prometheus_gzip", {"Accept": PROMETHEUS_ACCEPT,
                                                             "Accept-Encoding": "gzip"})):
        times, body = [], b""
        for _ in range(n):
            status, body, wall = fetch(headers=headers)
            if status != 200:
                raise RuntimeError(f"/metrics answered {status}")
            times.append(wall)
        raw = gzip.decompress(body) if kind == "prometheus_gzip" else body
        lines = raw.decode().splitlines()
        out[kind] = {
            "scrapes": n, "median_ms": statistics.median(times) * 1e3, "p90_ms": pct(times, 90) * 1e3,
            "max_ms": max(times) * 1e3, "bytes": len(body), "uncompressed_bytes": len(raw),
            "series": sum(1 for ln in lines if ln and not ln.startswith("#")),
            "families": sum(1 for ln in lines if ln.startswith("# TYPE")),
        }
    return out


class Monitor(threading.Thread):
    """Records every poll the daemon publishes: {finish timestamp: (duration, polls_total)}."""

    def __init__(self):
        super().__init__(daemon=True, name="monitor")
        self.polls: dict[float, dict] = {}
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.25):
            try:
                m = poll_metrics()
            except (OSError, RuntimeError, http.client.HTTPException):
                self.errors += 1
                continue
            ts = m.get("sockscope_last_poll_success_timestamp_seconds")
            if ts and ts not in self.polls:
                self.polls[ts] = {"duration": m["sockscope_poll_duration_seconds"],
                                  "polls_total": m["sockscope_polls_total"],
                                  "sockets": m.get("sockscope_poll_sockets", 0)}

    def between(self, t0: float, t1: float) -> list[dict]:
        out = []
        for ts, p in sorted(self.polls.items()):
            start = ts - p["duration"]
            if t0 <= start and ts <= t1:
                out.append({"start": start, "finish": ts, **p})
        return out


PATTERNS = {
    # name: (headers, keep the connection alive between scrapes)
    "churn": ({}, False),  # a new connection per scrape: accept + close each time
    "keepalive": ({}, True),  # one connection per scraper, reused (what Prometheus does)
    "gzip": ({"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}, True),  # Prometheus' headers
}


def _load_threads(n: int, seconds: float, max_each: int, pause: float, pattern: str) -> dict:
    """n threads in this process scraping back to back (see scrapers())."""
    headers, keep = PATTERNS[pattern]
    end = time.monotonic() + seconds
    lock = threading.Lock()
    times: list[float] = []
    failures: list[str] = []

    def loop() -> None:
        mine = []
        conn = None
        if pause:
            time.sleep(random.uniform(0, pause))
        for _ in range(max_each):
            if time.monotonic() >= end:
                break
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
                conn.request("GET", "/metrics", headers=headers)
                r = conn.getresponse()
                body = r.read()
                if r.getheader("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if r.status != 200 or b"sockscope_build_info" not in body:
                    raise RuntimeError(f"status {r.status}, {len(body)} bytes")
                mine.append(time.perf_counter() - t0)
                if not keep or r.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - counted
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                    conn = None
            if pause:
                time.sleep(max(0.0, min(pause, end - time.monotonic())))
        if conn is not None:
            conn.close()
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return {"times": times, "failures": failures, "still_running": sum(t.is_alive() for t in threads)}


def scrapers(n: int, seconds: float, max_each: int, pause: float = 0.0, pattern: str = "churn",
             procs: int = 1) -> dict:
    """n scrapers spread over `procs` client processes (so the client's own GIL is not the
    bottleneck), each scraping back to back until `seconds` passed or it made max_each
    scrapes; with `pause` > 0 each waits `pause` s between scrapes (first one at a random
    offset in [0, pause), like independent Prometheus servers). `pattern` (PATTERNS): a new
    connection per scrape, keep-alive, or keep-alive with Prometheus' Accept headers and
    gzip. A scrape fails on any exception, a status other than 200 or a body without the
    last family the daemon writes."""
    t0 = time.monotonic()
    share = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    children = [subprocess.Popen(
        [sys.executable, "-m", "bench.scrape", "--load", json.dumps(
            {"port": PORT, "n": k, "seconds": seconds, "max_each": max_each, "pause": pause,
             "pattern": pattern})],
        stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO) for k in share if k]
    times: list[float] = []
    failures: list[str] = []
    still = 0
    for child in children:
        out, _ = child.communicate(timeout=seconds + 180)
        res = json.loads(out.strip().splitlines()[-1])
        times += res["times"]
        failures += res["failures"]
        still += res["still_running"]
    wall = time.monotonic() - t0
    return {"scrapers": n, "client_processes": len(children), "pattern": pattern, "pause_s": pause,
            "seconds": wall, "scrapes": len(times), "failures": len(failures),
            "failure_samples": failures[:5], "scrapes_per_second": len(times) / wall,
            "latency_median_ms": statistics.median(times) * 1e3 if times else None,
            "latency_p99_ms": pct(times, 99) * 1e3 if times else None,
            "still_running": still}


def load_main(spec: str) -> int:
    """A client process of scrapers(): prints {"times", "failures", "still_running"}."""
    global PORT
    cfg = json.loads(spec)
    PORT = cfg["port"]
    res = _load_threads(cfg["n"], cfg["seconds"], cfg["max_each"], cfg["pause"], cfg["pattern"])
    print(json.dumps(res))
    return 0


def cadence_summary(polls: list[dict], interval: float) -> dict:
    starts = [p["start"] for p in polls]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    late = [s - (starts[0] + round((s - starts[0]) / interval) * interval) for s in starts]
    durations = [p["duration"] for p in polls]
    return {
        "polls": len(polls),
        "spacing_mean_s": statistics.fmean(gaps) if gaps else None,
        "spacing_max_s": max(gaps) if gaps else None,
        "duration_median_s": statistics.median(durations) if durations else None,
        "duration_max_s": max(durations) if durations else None,
        "lateness_max_ms": max(late) * 1e3 if late else None,
        "sockets_median": statistics.median(p["sockets"] for p in polls) if polls else None,
    }


def measure_size(ns_name: str, size: int, args, baseline: Path | None = None) -> dict:
    """Render and cadence figures at one table size; with `baseline` (another checkout's
    daemon/ directory) that daemon is measured first on the same table, then ours."""
    holder = Holder(ns_name, size)
    try:
        print(f"[{size}] table built in {holder.info['build_seconds']:.1f} s", flush=True)
        out = {"size": size, "build_seconds": holder.info["build_seconds"], "daemons": {}}
        daemons = ([("baseline", baseline)] if baseline is not None else []) + [("current", None)]
        for name, src in daemons:
            out["daemons"][name] = measure_daemon(ns_name, size, args, holder, src, name)
        current = out["daemons"]["current"]
        for key in ("poll_at_render", "render", "periods", "cadence_ratio", "duration_ratio", "daemon_memory"):
            out[key] = current[key]  # the figures of the daemon under test, at the top level
        return out
    finally:
        holder.close()


def measure_daemon(ns_name: str, size: int, args, holder: Holder, src: Path | None, name: str) -> dict:
    daemon = None
    tag = f"[{size} {name}]"
    try:
        interval = args.poll_interval
        daemon = Daemon(ns_name, f"poll:\n  interval: {interval}s\n" if interval != 5.0 else "", src=src)
        time.sleep(5.5)  # one regular poll after the first
        out = {"poll_at_render": poll_metrics(), "render": render(args.render_scrapes)}
        r = out["render"]["text"]
        print(f"{tag} render median {r['median_ms']:.1f} ms, {r['bytes']} bytes, "
              f"{r['series']} series", flush=True)
        monitor = Monitor()
        monitor.start()
        periods = {}
        patterns = [p for p in args.patterns.split(",") if p]
        for kind in ["without", *patterns]:
            if args.tw_refresh:
                holder.refresh_time_wait()  # the same table in every period (TIME-WAIT lasts 60 s)
            time.sleep(1.0)
            c0, t0 = process_cpu(daemon.proc.pid), time.time()
            if kind != "without":
                load = scrapers(args.scrapers, args.duration, args.max_scrapes_each, args.scrape_pause,
                                pattern=kind, procs=args.client_procs)
            else:
                time.sleep(args.duration)
                load = None
            t1 = time.time()
            time.sleep(0.5)
            periods[kind] = {**cadence_summary(monitor.between(t0, t1), interval),
                             "daemon_cpu_s": process_cpu(daemon.proc.pid) - c0, "scrape_load": load}
            print(f"{tag} {kind}: {json.dumps(periods[kind])}", flush=True)
        monitor.halt.set()
        monitor.join(5)
        out["periods"] = periods
        out["monitor_errors"] = monitor.errors
        wo = periods["without"]
        out["cadence_ratio"], out["duration_ratio"] = {}, {}
        for kind in patterns:
            w = periods[kind]
            out["cadence_ratio"][kind] = (w["spacing_mean_s"] / wo["spacing_mean_s"]
                                          if w["spacing_mean_s"] and wo["spacing_mean_s"] else None)
            out["duration_ratio"][kind] = (w["duration_median_s"] / wo["duration_median_s"]
                                           if w["duration_median_s"] and wo["duration_median_s"] else None)
        out["daemon_memory"] = daemon.memory()
        return out
    finally:
        if daemon is not None:
            daemon.close()


def checkout(ref: str) -> tuple[Path, str]:
    """daemon/ of git ref `ref` extracted into a temporary directory, and the commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    where = Path(tempfile.mkdtemp(prefix="sockscope-bench-baseline-"))
    archive = subprocess.run(["git", "archive", commit, "daemon"], cwd=REPO, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where / "daemon", commit


def soak(ns_name: str, args) -> dict:
    holder = Holder(ns_name, args.soak_size, churn=True, churn_seconds=args.soak_timeout + 120)
    daemon = None
    try:
        daemon = Daemon(ns_name, f"poll:\n  interval: {args.soak_interval}s\n")
        samples = []
        t0 = time.monotonic()
        end = t0 + args.soak_timeout
        polls = 0
        while time.monotonic() < end:
            mem = daemon.memory()
            status, body, _ = fetch(timeout=30)  # a full scrape each second: the render path too
            m = parse_values(body.decode())
            polls = int(m["sockscope_polls_total"])
            samples.append({"t": time.monotonic() - t0, "polls": polls,
                            "sockets": m.get("sockscope_poll_sockets"), **mem})
            if len(samples) % 30 == 0:
                print(f"[soak] {polls} polls, {m.get('sockscope_poll_sockets')} sockets, "
                      f"VmRSS {mem['VmRSS'] / 2**20:.1f} MiB", flush=True)
            if polls >= args.soak_polls:
                break
            time.sleep(1.0)
        errors = parse_values(fetch()[1].decode(), ("sockscope_poll_errors_total",))
        return {"size": args.soak_size, "interval_s": args.soak_interval, "seconds": time.monotonic() - t0,
                "polls": polls, "poll_errors": errors.get("sockscope_poll_errors_total"),
                "summary": soak_summary(samples, args.soak_polls), "samples": samples}
    finally:
        if daemon is not None:
            daemon.close()
        holder.close()


def soak_summary(samples: list[dict], target: int, window: int = 500) -> dict:
    """first/last/max, and growth after a warm-up of 10 % of the polls.

    A sample taken during a poll sees the poll's buffers (~10 MiB more than between polls),
    so single samples are bimodal. Growth is judged on envelopes per window of `window`
    polls: the minimum (RSS between polls) and the maximum (RSS during a poll). Slope =
    least squares of each envelope on the window's first poll number."""
    rss = [s["VmRSS"] for s in samples]
    out = {"first_rss": rss[0], "last_rss": rss[-1], "max_rss": max(rss),
           "first_hwm": samples[0]["VmHWM"], "last_hwm": samples[-1]["VmHWM"],
           "sockets_min": min(s["sockets"] or 0 for s in samples),
           "sockets_max": max(s["sockets"] or 0 for s in samples)}
    warm_from = target * 0.1
    windows = []
    for k in range(int(warm_from), max(s["polls"] for s in samples) + 1, window):
        w = [s["VmRSS"] for s in samples if k <= s["polls"] < k + window]
        if len(w) >= 3:
            windows.append((k, min(w), max(w)))
    out["windows"] = windows

    def slope(points: list[tuple[float, float]]) -> float:
        mx = statistics.fmean(x for x, _ in points)
        my = statistics.fmean(y for _, y in points)
        sxx = sum((x - mx) ** 2 for x, _ in points)
        return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0

    if len(windows) >= 3:
        out.update({
            "warm_polls": windows[0][0],
            "warm_first_min_rss": windows[0][1], "last_min_rss": windows[-1][1],
            "warm_first_max_rss": windows[0][2], "last_max_rss": windows[-1][2],
            "slope_min_bytes_per_1000_polls": slope([(k, lo) for k, lo, _ in windows]) * 1000,
            "slope_max_bytes_per_1000_polls": slope([(k, hi) for k, _, hi in windows]) * 1000,
        })
        # "No growth": after warm-up, both envelopes end within 1 MiB of where they started
        # and neither fitted slope extrapolates to 1 MiB over 10,000 polls.
        out["no_growth"] = (out["last_min_rss"] - out["warm_first_min_rss"] < 2**20
                            and out["last_max_rss"] - out["warm_first_max_rss"] < 2**20
                            and out["slope_min_bytes_per_1000_polls"] * 10 < 2**20
                            and out["slope_max_bytes_per_1000_polls"] * 10 < 2**20)
    return out


# --------------------------------------------------------------------------- report

def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}; "
             f"{m['date']}; load average before: {m['load_before']:.2f}.", ""]
    if result.get("sizes"):
        lines += ["`/metrics` of `sockscope run --netns <bench ns>` (default config), scraped from the "
                  "host loopback; client wall time from connect to last byte.", "",
                  "| sockets | render median (text) | p90 | with Prometheus headers (gzip) median | bytes text / gzip | series |",
                  "|---|---|---|---|---|---|"]
        for s in result["sizes"]:
            t, g = s["render"]["text"], s["render"]["prometheus_gzip"]
            socks = int(s["poll_at_render"].get("sockscope_poll_sockets", 0))
            lines.append(f"| {socks:,} | {t['median_ms']:.1f} ms {'✓' if t['median_ms'] <= 20 else '✗'} | "
                         f"{t['p90_ms']:.1f} ms | {g['median_ms']:.1f} ms | {t['bytes']:,} / {g['bytes']:,} | "
                         f"{t['series']:,} |")
        a = result["args"]
        how = (f"each pausing {a['scrape_pause']:g} s between scrapes" if a.get("scrape_pause")
               else "closed-loop (no pause)")
        env = " ".join(f"{k}={v}" for k, v in result.get("daemon_env", {}).items())
        base = (f" \"baseline\" is the daemon of commit {result['baseline_commit']}, measured first on the "
                "same table; \"current\" is this checkout's." if result.get("baseline_commit") else "")
        lines += ["", f"Poll cadence (poll.interval {a.get('poll_interval', 5.0):g} s) for {a['duration']:.0f} s "
                  "without scrapers, then "
                  f"{a['duration']:.0f} s per pattern with {a['scrapers']} scrapers {how} in "
                  f"{a['client_procs']} client processes (churn: a new connection per scrape; keepalive: "
                  "one connection per scraper; gzip: keep-alive with Prometheus' Accept and gzip)"
                  + (f"; daemon environment {env}" if env else "") + "." + base, "",
                  "| sockets | period | polls | mean spacing of poll starts (ratio to without) "
                  "| poll duration median (max) | scrapes (failed) | scrape latency median / p99 | daemon CPU |",
                  "|---|---|---|---|---|---|---|---|"]
        def f(v, spec: str, scale: float = 1, unit: str = "") -> str:
            return "–" if v is None else f"{v * scale:{spec}}{unit}"

        rows = [(s, name, d) for s in result["sizes"] for name, d in s.get("daemons", {"current": s}).items()]
        for s, daemon_name, d in rows:
            for kind, p in d["periods"].items():
                load = p["scrape_load"]
                sc = "–" if load is None else f"{load['scrapes']:,} ({load['failures']})"
                lat = "–" if load is None else (f"{f(load['latency_median_ms'], '.1f')} / "
                                                f"{f(load['latency_p99_ms'], '.0f')} ms")
                cr = d["cadence_ratio"].get(kind)
                ratio = "" if cr is None else f" ({cr:.3f} {'✓' if cr <= 1.1 else '✗'})"
                label = kind if len(s.get("daemons", {})) < 2 else f"{daemon_name}: {kind}"
                lines.append(f"| {int(p['sockets_median'] or 0):,} | {label} | {p['polls']} | "
                             f"{f(p['spacing_mean_s'], '.3f', 1, ' s')}{ratio} | "
                             f"{f(p['duration_median_s'], '.0f', 1e3, ' ms')} "
                             f"({f(p['duration_max_s'], '.0f', 1e3, ' ms')}) | {sc} | {lat} | "
                             f"{p['daemon_cpu_s']:.1f} s |")
        lines += ["", "Daemon memory at the end (after the scrapers): " + ", ".join(
            f"{int(s['poll_at_render'].get('sockscope_poll_sockets', 0)):,} sockets: VmHWM "
            f"{s['daemon_memory']['VmHWM'] / 2**20:.1f} MiB" for s in result["sizes"])]
    if result.get("soak"):
        s = result["soak"]
        u = s["summary"]
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        lines += ["", f"Memory soak: {s['polls']:,} polls in {s['seconds']:.0f} s (poll.interval "
                  f"{s['interval_s']} s), churning table of {int(u['sockets_min']):,}–{int(u['sockets_max']):,} sockets, "
                  f"{s['poll_errors']:.0f} poll errors.", "",
                  f"| VmRSS first sample | between polls (min per {500}-poll window): after warm-up → last "
                  "| during polls (max per window): after warm-up → last | slope min / max "
                  "| VmHWM first → last | no growth |", "|---|---|---|---|---|---|",
                  f"| {mib(u['first_rss'])} | {mib(u.get('warm_first_min_rss', 0))} → {mib(u.get('last_min_rss', 0))} "
                  f"(from poll {u.get('warm_polls', 0):,}) | {mib(u.get('warm_first_max_rss', 0))} → "
                  f"{mib(u.get('last_max_rss', 0))} | {u.get('slope_min_bytes_per_1000_polls', 0) / 1024:+.1f} / "
                  f"{u.get('slope_max_bytes_per_1000_polls', 0) / 1024:+.1f} KiB per 1000 polls | "
                  f"{mib(u['first_hwm'])} → {mib(u['last_hwm'])} | {'✓' if u.get('no_growth') else '✗'} |"]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000", help="comma-separated table sizes ('' = none)")
    p.add_argument("--1m", dest="one_million", action="store_true", help="add a 1,000,000-socket table")
    p.add_argument("--render-scrapes", type=int, default=100)
    p.add_argument("--scrapers", type=int, default=50)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-scrapes-each", type=int, default=100_000)
    p.add_argument("--scrape-pause", type=float, default=0.0,
                   help="seconds each scraper waits between scrapes (0 = closed loop, the worst case)")
    p.add_argument("--no-tw-refresh", dest="tw_refresh", action="store_false",
                   help="do not renew TIME-WAIT before each cadence period (quick smoke runs)")
    p.add_argument("--soak", action="store_true", help="run the memory soak (minutes; not in CI)")
    p.add_argument("--soak-size", type=int, default=10_000)
    p.add_argument("--soak-polls", type=int, default=10_000)
    p.add_argument("--soak-interval", type=float, default=0.1,
                   help="poll.interval of the soak (the configuration allows 100 ms at least)")
    p.add_argument("--soak-timeout", type=float, default=1500.0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--patterns", default="churn,keepalive,gzip",
                   help=f"scrape patterns, one loaded period each ({', '.join(PATTERNS)})")
    p.add_argument("--client-procs", type=int, default=5,
                   help="client processes the scrapers are spread over")
    p.add_argument("--poll-interval", type=float, default=5.0,
                   help="the daemon's poll.interval in the cadence periods (default 5 s, the default config)")
    p.add_argument("--baseline", metavar="REF",
                   help="also measure the daemon of this git ref (e.g. a commit before a change) "
                        "on the same table, first")
    p.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    p.add_argument("--churn-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.load is not None:
        return load_main(args.load)
    if args.hold is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return hold(args.hold, args.churn_seconds)
    if os.geteuid() != 0:
        print("bench.scrape: needs root (network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.one_million and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"sockscope-scrape-{os.getpid()}"
    netns.create(name)
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if sizes:
            result = {"machine": machine(), "args": vars(args), "sizes": [],
                      "daemon_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
            baseline = None
            if args.baseline:
                baseline, result["baseline_commit"] = checkout(args.baseline)
            for size in sizes:
                result["sizes"].append(measure_size(name, size, args, baseline))
            (out / "scrape-latest.json").write_text(json.dumps(result, indent=1))
            (out / f"scrape-{stamp}.json").write_text(json.dumps(result, indent=1))
            md = markdown(result)
            (out / "scrape-latest.md").write_text(md)
            print(md)
        if args.soak:
            result = {"machine": machine(), "args": vars(args), "soak": soak(name, args)}
            (out / "soak-latest.json").write_text(json.dumps(result, indent=1))
            (out / f"soak-{stamp}.json").write_text(json.dumps(result, indent=1))
            md = markdown(result)
            (out / "soak-latest.md").write_text(md)
            print(md)
    finally:
        netns.delete(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
