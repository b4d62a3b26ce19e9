"""What tcp_info costs the daemon: `python -m bench.tcpinfo [--sizes 100000] [--1m] [--soak 10000]`.

Needs root. Creates its own network namespace, re-runs itself inside it, and for each
table size (bench/loader.py) measures two `sockscope run` daemons on the same table, one
with `tcp_info.enabled: false`, one with `true`:

- whole daemon CPU per poll, user and system apart (/proc/PID/stat over a window of polls
  with no scrape inside; the daemon not measured is SIGSTOPped), in rounds of one window
  each, alternating order; the ratio on/off per round, and its median;
- the added user time per socket (what the folds cost in Python) and the added system time
  (what asking the kernel for INET_DIAG_INFO costs);
- peak RSS (VmHWM) of each daemon after its windows, against the issue's budget of
  64 MB + 48 bytes per live socket.

`--soak N` then runs one daemon with tcp_info on at `poll.interval` 100 ms for N polls over a
small table that churns (a worker opens and closes connections all along, bounded in rate
and time) and samples its RSS every 500 polls: the per-cookie state must not grow with the
sockets that came and went.

Writes bench/results/tcpinfo-latest.json and tcpinfo-latest.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import sys
import time
from pathlib import Path

from . import ns as netns
from .loader import Table
from .run import machine
from .tools import REPO, ConfigDaemon, result_args, vm_hwm, write_results

BUDGET_BASE, BUDGET_PER_SOCKET = 64 * 2**20, 48  # the RSS budget with tcp_info on


def _config(enabled: bool, interval: float) -> str:
    return f"poll:\n  interval: {interval}s\ntcp_info:\n  enabled: {'true' if enabled else 'false'}\n"


def measure_size(size: int, rounds: int, window: int, interval: float) -> dict:
    table = Table(size)
    daemons: dict[str, ConfigDaemon] = {}
    out: dict = {"size": size, "interval": interval, "window_polls": window, "rounds": {"off": [], "on": []}}
    try:
        table.build(timeout=900)
        out["build_seconds"] = table.build_seconds
        daemons = {flag: ConfigDaemon(f"tcpinfo-{flag}", _config(flag == "on", interval), port, interval)
                   for flag, port in (("off", 19411), ("on", 19412))}
        round_seconds = 2 * (window + 2) * interval
        for r in range(rounds):
            if table.tw_age() + round_seconds > 58:
                table.refresh_time_wait()
            for flag in (("off", "on") if r % 2 == 0 else ("on", "off")):
                w = daemons[flag].window(window)
                m = w.pop("metrics")
                w["tcp_info_up"] = m.get(("sockscope_source_up", 'source="tcp_info"'))
                out["rounds"][flag].append(w)
                print(f"[{size}] round {r} tcp_info {flag}: {w['cpu'] * 1e3:.1f} ms/poll (user {w['user'] * 1e3:.1f},"
                      f" sys {w['sys'] * 1e3:.1f}), {w['polls_seen']:.0f} polls seen, {w['tcp_sockets']:.0f} sockets",
                      flush=True)
        out["rss_peak"] = {flag: vm_hwm(d.proc.pid) for flag, d in daemons.items()}
    finally:
        for d in daemons.values():
            d.close()
        table.close()
    return out


# -- the soak: a churning table --------------------------------------------------------------


def _churn(port: int, rate: float, seconds: float, conn) -> None:
    """Open and close connections to a local listener at `rate` per second for at most
    `seconds`, each sending and reading a little; the listener accepts and closes."""
    srv = socket.create_server(("127.0.0.1", port), backlog=4096)
    srv.setblocking(False)
    held: list[socket.socket] = []
    end = time.monotonic() + seconds
    made = 0
    try:
        conn.send("ready")
        start = time.monotonic()
        while time.monotonic() < end and not conn.poll():
            due = int((time.monotonic() - start) * rate)
            while made < due:
                c = socket.create_connection(("127.0.0.1", port))
                c.sendall(b"x" * 100)
                held.append(c)
                made += 1
            while True:
                try:
                    a, _ = srv.accept()
                except BlockingIOError:
                    break
                a.recv(100)
                a.sendall(b"y" * 1000)
                held.append(a)
            while len(held) > 2000:  # live connections stay around 2,000: the rest close
                held.pop(0).close()
            time.sleep(0.005)
        conn.send(("made", made))
    finally:
        for s in held:
            s.close()
        srv.close()


def soak(polls: int, size: int, rate: float) -> dict:
    table = Table(size)
    interval = 0.1  # poll.interval's minimum
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    seconds = polls * interval * 3 + 120  # an upper bound; the soak stops the churn itself
    churn = ctx.Process(target=_churn, args=(18800, rate, seconds, child), daemon=True)
    daemon = None
    samples = []
    try:
        table.build(timeout=900)
        churn.start()
        if not parent.poll(30) or parent.recv() != "ready":
            raise RuntimeError("churn worker not ready")
        daemon = ConfigDaemon("tcpinfo-soak", _config(True, interval), 19413, interval)
        os.kill(daemon.proc.pid, signal.SIGCONT)
        t0 = time.monotonic()
        deadline = t0 + seconds
        next_at = 0
        while time.monotonic() < deadline:
            m = daemon.metrics()
            done = m.get(("sockscope_polls_total", ""), 0)
            if done >= next_at:
                with open(f"/proc/{daemon.proc.pid}/status") as f:
                    rss = int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024
                samples.append({"polls": done, "seconds": time.monotonic() - t0, "rss": rss,
                                "sockets": m.get(("sockscope_poll_sockets", ""), 0)})
                print(f"[soak] {done:.0f} polls, RSS {rss / 2**20:.1f} MiB, {samples[-1]['sockets']:.0f} sockets",
                      flush=True)
                next_at = done + 500
            if done >= polls:
                break
            time.sleep(1)
        parent.send("stop")
        made = parent.recv()[1] if parent.poll(30) else None
        return {"polls": polls, "interval": interval, "table": size, "churn_rate": rate, "connections_made": made,
                "samples": samples, "rss_peak": vm_hwm(daemon.proc.pid)}
    finally:
        if daemon is not None:
            daemon.close()
        churn.join(10)
        if churn.is_alive():
            os.kill(churn.pid, signal.SIGKILL)
        table.close()


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# tcp_info cost: whole daemon, tcp_info on against off",
        "",
        f"{m['date']}; Linux {m['kernel']}, {m['cpus']} × {m['cpu']}; Python {m['python']}, numpy {m['numpy']}.",
        "Whole `sockscope run` process, CPU per poll over windows with no scrapes inside; median over "
        "rounds of one window each, alternating order.",
        "",
        "| sockets | off: CPU/poll (user + sys) | on: CPU/poll (user + sys) | on/off (median of rounds) | "
        "added user µs/socket | added sys | peak RSS off / on | RSS budget on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["sizes"]:
        med = {f: {k: statistics.median(w[k] for w in s["rounds"][f]) for k in ("cpu", "user", "sys", "tcp_sockets")}
               for f in ("off", "on")}
        ratios = [a["cpu"] / b["cpu"] for a, b in zip(s["rounds"]["on"], s["rounds"]["off"])]
        n = med["on"]["tcp_sockets"]
        budget = BUDGET_BASE + BUDGET_PER_SOCKET * n
        lines.append(
            f"| {n:,.0f} | {med['off']['cpu'] * 1e3:.1f} ms ({med['off']['user'] * 1e3:.1f} + "
            f"{med['off']['sys'] * 1e3:.1f}) | {med['on']['cpu'] * 1e3:.1f} ms ({med['on']['user'] * 1e3:.1f} + "
            f"{med['on']['sys'] * 1e3:.1f}) | {statistics.median(ratios):.2f}× "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | {(med['on']['user'] - med['off']['user']) / n * 1e6:.2f} | "
            f"{(med['on']['sys'] / med['off']['sys'] - 1) * 100:+.0f} % | {s['rss_peak']['off'] / 2**20:.1f} / "
            f"{s['rss_peak']['on'] / 2**20:.1f} MiB | {budget / 2**20:.1f} MiB |")
    if result.get("soak"):
        k = result["soak"]
        rss = [x["rss"] / 2**20 for x in k["samples"]]
        lines += ["", f"Soak: {k['polls']:,} polls at {k['interval'] * 1000:.0f} ms over a {k['table']:,}-socket table "
                  f"with {k['connections_made']} connections opened and closed ({k['churn_rate']:g}/s): RSS "
                  f"{rss[0]:.1f} MiB after {k['samples'][0]['polls']:.0f} polls, {rss[-1]:.1f} MiB after "
                  f"{k['samples'][-1]['polls']:.0f}, at most {max(rss):.1f} MiB (peak {k['rss_peak'] / 2**20:.1f} MiB)."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.tcpinfo", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000", help="comma-separated table sizes")
    p.add_argument("--1m", dest="one_million", action="store_true", help="add a 1,000,000-socket table")
    p.add_argument("--rounds", type=int, default=5, help="windows per daemon and size (order alternates)")
    p.add_argument("--window", type=int, default=8, help="polls per window")
    p.add_argument("--soak", type=int, default=0, help="polls of the churning soak (0: none)")
    p.add_argument("--soak-table", type=int, default=20000, help="sockets of the soak's static table")
    p.add_argument("--soak-rate", type=float, default=200.0, help="connections per second the soak opens")
    return result_args(p).parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.inner:
        return netns.rerun_inside("bench.tcpinfo", argv, REPO)
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([1_000_000] if args.one_million else [])
    result: dict = {"machine": machine(), "sizes": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        # 1 s polls up to ~300k sockets; larger tables poll every 2 s so a poll fits its slot
        interval = 1.0 if size <= 300_000 else 2.0
        result["sizes"].append(measure_size(size, args.rounds, args.window, interval))
        (out / "tcpinfo-latest.json").write_text(json.dumps(result, indent=1))
    if args.soak:
        result["soak"] = soak(args.soak, args.soak_table, args.soak_rate)
    write_results(out, "tcpinfo", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
