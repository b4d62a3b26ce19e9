"""What the units feature costs a poll: `python -m bench.units [--tcp 100000] [--reps 15]`.

Needs root. Creates its own network namespace, re-runs itself inside it, builds a TCP table
(bench/loader.py), then in this process, alternating, `--reps` times each:

- dump: the TCP dump alone (netlink.Reader, no extension, a sink that drops every batch);
- tcp: the dump folded by the TCP feature (what a poll does with units off);
- tcp+units: the same dump, the cgroup-id attribute located in every batch and folded by
  the units feature as well (what a poll does with units on).

CPU per poll is time.process_time (user + system of this process) around one dump; the
table gives medians. The units fold's own share is tcp+units minus tcp. The inner run
enters the namespace with `nsenter --net` (`ip netns exec` would remount /sys and hide the
cgroup2 tree), so ids resolve to labels as in the daemon; the loader's sockets are all in the bench's cgroup, and a
fold's cost depends on the sockets, not on how many units there are (one searchsorted per
batch in a table of the poll's ids). Writes bench/results/units-latest.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from . import ns as netns
from .loader import Table
from .run import machine
from .tools import REPO, ConfigDaemon, result_args, write_results


def in_process(reps: int) -> dict:
    from sockscope.aggregate import Rules
    from sockscope.cgroupmap import CgroupMap
    from sockscope.features import PollContext
    from sockscope.features.tcp import TcpSockets
    from sockscope.features.units import TcpUnits
    from sockscope.netlink import Reader
    from sockscope.poller import dump_into, merge_needs

    tcp = TcpSockets(Rules())
    units = TcpUnits(cgroups=CgroupMap())
    need = merge_needs([tcp, units])[6]
    reader = Reader(ext=need.ext, states=need.states)
    times: dict[str, list[float]] = {"dump": [], "tcp": [], "tcp+units": []}
    last = {}
    try:
        for _ in range(reps):
            for name in times:
                t0 = time.process_time()
                if name == "dump":
                    stats = reader.poll(lambda: (lambda batch: None))
                elif name == "tcp":
                    got, _, _ = dump_into(reader, [tcp], PollContext(time.time(), time.monotonic()))
                else:
                    got, _, _ = dump_into(reader, [tcp, units], PollContext(time.time(), time.monotonic()), need)
                    last = got
                times[name].append(time.process_time() - t0)
    finally:
        reader.close()
    snap, result = last["tcp"], last["units"]
    tcp_total = sum(snap.states.values())
    unit_total = sum(sum(r.counts) for r in result.units)
    if tcp_total != unit_total:
        raise RuntimeError(f"units sum to {unit_total} sockets, the TCP feature counted {tcp_total}")
    return {"messages": stats.messages, **{k: statistics.median(v) for k, v in times.items()},
            "units": {r.unit: sum(r.counts) for r in result.units}, "walks": units.cgroups.walks,
            "walk_seconds": units.cgroups.last_walk_seconds, "walk_dirs": units.cgroups.last_walk_dirs}


def walk_cost(n: int, reps: int = 7) -> dict:
    """A complete walk of the cgroup2 tree with `n` more (empty) cgroups made for it, in
    10 parents of n/10: the time CgroupMap takes to look for an id that is not there."""
    from sockscope.cgroupmap import CgroupMap, find_mount

    mount = find_mount()
    if mount is None:
        return {}
    top = os.path.join(mount, f"sockscope-bench-{os.getpid()}")
    made = []
    try:
        os.mkdir(top)
        made.append(top)
        for i in range(n):
            d = os.path.join(top, f"p{i % 10}") if i >= 10 else os.path.join(top, f"p{i}")
            if i >= 10:
                d = os.path.join(d, f"c{i}")
            os.mkdir(d)
            made.append(d)
        times = []
        for k in range(reps):
            cg = CgroupMap(mount)
            t0 = time.perf_counter()
            cg.labels([2**62 + k])  # no such cgroup: the whole tree is walked
            times.append(time.perf_counter() - t0)
        return {"cgroups": n, "dirs": cg.last_walk_dirs, "seconds": statistics.median(times)}
    finally:
        for d in reversed(made):
            os.rmdir(d)


def daemons(table: Table, rounds: int, window: int, interval: float) -> dict:
    """Two `sockscope run` daemons on the table, `units.enabled: false` and `true` (UDP and
    the kernel counters off in both: only the TCP dump and its folds differ), each measured
    alone (the other SIGSTOPped) over `window` polls, `rounds` times in alternating order
    (bench.tools.ConfigDaemon, as bench.udp does)."""
    out: dict[str, list] = {"off": [], "on": []}
    made: dict[str, ConfigDaemon] = {}
    try:
        for flag, port in (("off", 19411), ("on", 19412)):
            made[flag] = ConfigDaemon(
                f"units-{flag}", f"poll:\n  interval: {interval}s\n  kernel_stats: false\nudp:\n  enabled: false\n"
                f"units:\n  enabled: {str(flag == 'on').lower()}\n", port, interval)
        round_seconds = 2 * (window + 2) * interval
        for r in range(rounds):
            if table.tw_age() + round_seconds > 58:
                table.refresh_time_wait()
            for flag in (("off", "on") if r % 2 == 0 else ("on", "off")):
                w = made[flag].window(window)
                w.pop("metrics")
                out[flag].append(w)
                print(f"round {r} units {flag}: {w['cpu'] * 1000:.1f} ms/poll (user {w['user'] * 1000:.1f}, "
                      f"sys {w['sys'] * 1000:.1f})", flush=True)
    finally:
        for d in made.values():
            d.close()
    return out


def markdown(r: dict) -> str:
    p = r["in_process"]
    per = 1e6 / p["messages"]
    rows = [f"| {name} | {p[name] * 1000:.1f} | {p[name] * per:.2f} |" for name in ("dump", "tcp", "tcp+units")]
    extra = p["tcp+units"] - p["tcp"]
    return "\n".join([
        f"units fold, {p['messages']} sockets in the dump, median of {r['reps']} polls each "
        f"({r['machine'].get('cpu', '')}, kernel {r['machine'].get('kernel', '')})",
        "",
        "| poll | CPU ms per poll | µs per socket |",
        "|---|---|---|",
        *rows,
        "",
        f"units' share: {extra * 1000:.1f} ms per poll ({extra * per:.3f} µs per socket, "
        f"{extra / p['tcp'] * 100:.0f} % of the tcp poll's CPU); {p['walks']} walk(s) of the cgroup2 tree, "
        f"the last {p['walk_seconds'] * 1000:.2f} ms over {p['walk_dirs']} directories; "
        f"units: {p['units']}",
        "",
        *(f"complete walk of the cgroup2 tree with {w['cgroups']} cgroups added ({w['dirs']} directories): "
          f"{w['seconds'] * 1000:.1f} ms (median of 7)" for w in r.get("walks", [])),
        *_daemon_lines(r.get("daemons")),
    ])


def _daemon_lines(rounds: dict | None) -> list[str]:
    if not rounds or not rounds["on"]:
        return []
    med = {k: {f: statistics.median(w[f] for w in v) for f in ("cpu", "user", "sys")} for k, v in rounds.items()}
    diff = statistics.median(a["cpu"] - b["cpu"] for a, b in zip(rounds["on"], rounds["off"]))
    return ["", f"whole daemon, CPU per poll, median of {len(rounds['on'])} windows each (alternating):",
            "", "| daemon | CPU/poll | user | system |", "|---|---|---|---|",
            *(f"| units {k} | {m['cpu'] * 1000:.1f} ms | {m['user'] * 1000:.1f} ms | {m['sys'] * 1000:.1f} ms |"
              for k, m in med.items()),
            "", f"median of the per-round differences: {diff * 1000:+.1f} ms; windows: "
            + "; ".join(f"{k} " + ", ".join(f"{w['cpu'] * 1000:.0f}" for w in v) for k, v in rounds.items())]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.units", description=__doc__.split("\n\n")[0])
    p.add_argument("--tcp", type=int, default=100_000, help="TCP sockets in the table")
    p.add_argument("--reps", type=int, default=15, help="polls of each kind")
    p.add_argument("--rounds", type=int, default=0, help="whole-daemon windows per daemon (0: none)")
    p.add_argument("--window", type=int, default=10, help="polls per window")
    p.add_argument("--interval", type=float, default=1.0, help="poll.interval of both daemons, seconds")
    return result_args(p).parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.inner:
        return netns.rerun_inside("bench.units", argv, REPO, only_net=True)
    table = Table(args.tcp)
    try:
        table.build()
        result = {"machine": machine(), "tcp": args.tcp, "reps": args.reps, "in_process": in_process(args.reps),
                  "walks": [w for n in (100, 1000, 5000) if (w := walk_cost(n))]}
        if args.rounds:
            result["daemons"] = daemons(table, args.rounds, args.window, args.interval)
    finally:
        table.close()
    write_results(args.out, "units", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
