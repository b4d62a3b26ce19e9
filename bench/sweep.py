"""What sweeping network namespaces costs: `python -m bench.sweep [--size 100000] [--namespaces 10]`.

Needs root. Creates its own network namespace, re-runs itself inside it, builds a TCP table
there (bench/loader.py) and `--namespaces` - 1 empty namespaces beside it, then measures
one poll of the daemon's own code (service.Service, Poller.poll in this process, the
default features: TCP, UDP, kernel counters, peaks) in three configurations, in rounds of
`--polls` polls each, alternating order:

- `one`: the table's namespace alone (no sweep, as before issue 14);
- `sweep`: `netns.host: true` (the table's namespace, labelled host) plus the empty
  namespaces: `--namespaces` lanes;
- `empty`: the empty namespaces alone (what a walk of the shared hash costs when it
  yields nothing).

CPU per poll is time.process_time (user + system of this process: the kernel's walk of
the established hash runs in our recvmsg calls); wall per poll time.perf_counter. Every
namespace created while net.ipv4.tcp_child_ehash_entries is 0 shares the host's hash
(`net.ipv4.tcp_ehash_entries` inside is negative): the bench records both.

`--own-hash` creates the empty namespaces with hashes of their own
(`net.ipv4.tcp_child_ehash_entries` / `udp_child_hash_entries` set in the bench's
namespace first), the remedy for the walks above.

Writes bench/results/sweep-latest.json and sweep-latest.md (sweep-own-hash-latest.* with
--own-hash) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from . import ns as netns
from .loader import Table
from .run import machine
from .tools import REPO, result_args, write_results

OWN_HASH = 1024  # --own-hash: buckets of each new namespace's TCP and UDP hash (Linux >= 6.1 / 6.2)


def _sysctl(name: str, ns: str | None = None) -> str:
    cmd = ["sysctl", "-n", name] if ns is None else ["ip", "netns", "exec", ns, "sysctl", "-n", name]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return r.stdout.strip() or r.stderr.strip()


def _service(mapping: dict):
    from sockscope import config
    from sockscope.service import Service

    return Service(config.from_mapping(mapping))


def _polls(service, n: int) -> dict:
    cpu, wall = [], []
    status = None
    for _ in range(n):
        c0, w0 = time.process_time(), time.perf_counter()
        status = service.poller.poll()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        if status.last_error is not None:
            raise RuntimeError(f"poll failed: {status.last_error}")
    assert status is not None
    dumps = status.samples.value("sockscope_poll_dumps")
    if dumps is None:  # no sweep: one dump per reader (retries aside)
        dumps = float(len(service.poller.readers))
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall), "cpu_all": cpu, "wall_all": wall,
            "sockets": status.snapshot.sockets if status.snapshot is not None else 0,
            "dumps": dumps, "lanes": status.samples.value("sockscope_netns_tracked")}


def run(args) -> dict:
    names = [f"sockscope-bench-sweep-{os.getpid()}-{i}" for i in range(args.namespaces - 1)]
    table = Table(args.size)
    result: dict = {"machine": machine(), "size": args.size, "namespaces": args.namespaces, "polls": args.polls,
                    "names": names,
                    "rounds": {"one": [], "sweep": [], "empty": []}}
    services: dict = {}
    try:
        table.build()
        if args.own_hash:  # read at creation from the creating namespace (the bench's, not the host's)
            subprocess.run(["sysctl", "-q", "-w", f"net.ipv4.tcp_child_ehash_entries={OWN_HASH}",
                            f"net.ipv4.udp_child_hash_entries={OWN_HASH}"], check=True, timeout=30)
        result["own_hash"] = args.own_hash
        for name in names:
            netns.create(name)
        result["tcp_child_ehash_entries"] = _sysctl("net.ipv4.tcp_child_ehash_entries")
        result["tcp_ehash_entries_inside"] = _sysctl("net.ipv4.tcp_ehash_entries", names[0])
        base = {"poll": {"interval": "1s"}}
        services = {
            "one": _service(base),
            "sweep": _service({"poll": {"interval": "1s", "netns": names}, "netns": {"host": True,
                                                                                 "max_tracked": args.namespaces}}),
            "empty": _service({"poll": {"interval": "1s", "netns": names}}),
        }
        for service in services.values():  # first polls open sockets and discover
            _polls(service, 2)
        for r in range(args.rounds):
            if table.tw_age() + 3 * args.polls * 2 > 58:
                table.refresh_time_wait()
            order = ("one", "sweep", "empty") if r % 2 == 0 else ("empty", "sweep", "one")
            for name in order:
                got = _polls(services[name], args.polls)
                result["rounds"][name].append(got)
                print(f"round {r} {name}: cpu {got['cpu'] * 1000:.1f} ms, wall {got['wall'] * 1000:.1f} ms, "
                      f"{got['sockets']} sockets, {got['dumps']} dumps", flush=True)
    finally:
        for service in services.values():
            for reader in service.poller.readers.values():
                reader.close()
            for feature in service.poller.features:
                feature.close()
        for name in names:
            netns.delete(name)
        table.close()
    return result


def markdown(result: dict) -> str:
    med = {name: {k: statistics.median(w[k] for w in rounds) for k in ("cpu", "wall", "sockets", "dumps")}
           for name, rounds in result["rounds"].items() if rounds}
    n = result["namespaces"]
    one, sweep, empty = med["one"], med["sweep"], med["empty"]
    per_ns_cpu = (sweep["cpu"] - one["cpu"]) / (n - 1)
    per_ns_wall = (sweep["wall"] - one["wall"]) / (n - 1)
    m = result["machine"]
    lines = [
        f"# Sweeping {n} network namespaces over a {result['size']:,}-socket host table",
        "",
        f"{m['date']}; Linux {m['kernel']}, {m['cpus']} × {m['cpu']}; Python {m['python']}.",
        f"`net.ipv4.tcp_child_ehash_entries` = {result['tcp_child_ehash_entries']}; "
        f"`tcp_ehash_entries` inside the new namespaces = {result['tcp_ehash_entries_inside']} (negative: the "
        "host's hash, shared; positive: their own).",
        f"Poller.poll in-process, default features (TCP + UDP dumps, kernel counters, peaks); medians of "
        f"{len(result['rounds']['one'])} rounds × {result['polls']} polls.",
        "",
        "| configuration | lanes | dumps/poll | sockets seen | CPU/poll | wall/poll |",
        "|---|---:|---:|---:|---:|---:|",
        f"| one namespace (the table's, no sweep) | 1 | {one['dumps']:.0f} | {one['sockets']:,.0f} | {one['cpu'] * 1000:.1f} ms | "
        f"{one['wall'] * 1000:.1f} ms |",
        f"| sweep: host (the table) + {n - 1} empty | {n} | {sweep['dumps']:.0f} | {sweep['sockets']:,.0f} | "
        f"{sweep['cpu'] * 1000:.1f} ms | {sweep['wall'] * 1000:.1f} ms |",
        f"| sweep: the {n - 1} empty ones alone | {n - 1} | {empty['dumps']:.0f} | {empty['sockets']:,.0f} | "
        f"{empty['cpu'] * 1000:.1f} ms | {empty['wall'] * 1000:.1f} ms |",
        "",
        f"Each added namespace: {per_ns_cpu * 1000:.1f} ms CPU, {per_ns_wall * 1000:.1f} ms wall per poll "
        f"(({sweep['cpu'] * 1000:.1f} - {one['cpu'] * 1000:.1f}) / {n - 1}), though it holds no socket"
        + (": its walks visit only its own hashes." if result.get("own_hash") else
           ": its two walks (TCP, UDP) visit the whole shared hash."),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=100_000, help="sockets of the host table")
    p.add_argument("--namespaces", type=int, default=10, help="lanes of the sweep (host + N-1 empty)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--polls", type=int, default=5, help="polls per configuration and round")
    p.add_argument("--own-hash", action="store_true",
                   help="create the empty namespaces with hashes of their own (tcp_child_ehash_entries, "
                        "udp_child_hash_entries)")
    return result_args(p).parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.inner:
        return netns.rerun_inside("bench.sweep", argv, REPO)
    result = run(args)
    write_results(args.out, "sweep-own-hash" if args.own_hash else "sweep", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
