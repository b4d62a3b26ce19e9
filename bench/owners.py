"""What process owners cost a poll: `python -m bench.owners [--size 100000] [--polls 15]`.

Needs root. Creates its own network namespace, re-runs itself inside it, builds a table
(bench/loader.py: ~10 % CLOSE-WAIT on a listening port, held by worker processes) and
polls it in-process with three feature sets, alternating, one poll at a time:

- `off`: the default features (owners.enabled false);
- `fold`: owners on, between two scans (owners.interval large): the share of the dump it
  folds (LISTEN and CLOSE-WAIT sockets) and the join with the last scan;
- `scan`: owners on with owners.interval 1: a /proc scan every poll.

Reports the medians of the poll's wall time and of sockscope_source_duration_seconds
{source="owners"}, the socket fds of the host (what a scan reads) and the inodes it
looked for. Writes bench/results/owners-latest.json and .md and prints the table.
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
from .tools import REPO, RESULTS, write_results


def socket_fds(proc: str = "/proc") -> int:
    n = 0
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"{proc}/{pid}/fd"):
                try:
                    n += os.readlink(f"{proc}/{pid}/fd/{fd}").startswith("socket:[")
                except OSError:
                    pass
        except OSError:
            pass
    return n


def pollers() -> dict:
    from sockscope import config, features
    from sockscope.poller import Poller, merge_needs
    from sockscope.service import make_reader

    out = {}
    for name, owners in (("off", {}), ("fold", {"enabled": True, "interval": 100_000}),
                         ("scan", {"enabled": True, "interval": 1})):
        cfg = config.from_mapping({"udp": {"enabled": False}, "poll": {"kernel_stats": False},
                                   "owners": owners})
        feats = features.build(cfg)
        readers = {p: make_reader(cfg, need) for p, need in merge_needs(feats).items()}
        out[name] = Poller(feats, readers, 1.0)
    return out


def inner(args) -> int:
    table = Table(args.size)
    try:
        table.build(timeout=900)
        polls = pollers()
        for p in polls.values():
            p.poll()  # warm: arrays allocated, the first scan of `fold` done
        wall: dict[str, list[float]] = {k: [] for k in polls}
        owners: dict[str, list[float]] = {k: [] for k in polls}
        for _ in range(args.polls):
            for name, p in polls.items():
                t0 = time.perf_counter()
                status = p.poll()
                wall[name].append(time.perf_counter() - t0)
                assert status.last_error is None, status.last_error
                if "owners" in status.sources:
                    owners[name].append(status.sources["owners"].duration)
        last = polls["scan"].status().samples
        wanted = sum(1 for _ in last.get("sockscope_tcp_listen_owner_info"))
        result = {
            "machine": machine(),
            "size": args.size,
            "polls": args.polls,
            "socket_fds": socket_fds(),
            "close_wait_sockets": last.value("sockscope_tcp_sockets", "ipv4", "close_wait"),
            "listen_owner_series": wanted,
            "close_wait_owner": last.get("sockscope_tcp_local_port_close_wait_owner_sockets"),
            "scan_complete": last.value("sockscope_owners_scan_complete"),
            "median_poll_seconds": {k: statistics.median(v) for k, v in wall.items()},
            "median_owners_seconds": {k: statistics.median(v) for k, v in owners.items() if v},
        }
    finally:
        table.close()
    write_results(RESULTS, "owners", result, markdown(result))
    return 0


def markdown(r: dict) -> str:
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    lines = [
        f"# owners cost, {r['size']} sockets ({r['close_wait_sockets']:.0f} CLOSE-WAIT), "
        f"{r['socket_fds']} socket fds on the host, medians of {r['polls']} polls",
        "",
        "| features | poll (wall) | owners source |",
        "|---|---|---|",
    ]
    for k, label in (("off", "owners off"), ("fold", "owners on, between scans"),
                     ("scan", "owners on, a scan every poll")):
        own = r["median_owners_seconds"].get(k)
        lines.append(f"| {label} | {ms(r['median_poll_seconds'][k])} | {ms(own) if own is not None else '-'} |")
    lines += ["", f"scan complete: {r['scan_complete']:.0f}; close-wait owner: {r['close_wait_owner']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.owners")
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--polls", type=int, default=15)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        return inner(args)
    return netns.rerun_inside("bench.owners", [a for a in (argv if argv is not None else sys.argv[1:])],
                              REPO)


if __name__ == "__main__":
    sys.exit(main())
