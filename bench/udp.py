"""What UDP costs the daemon: `python -m bench.udp [--tcp 100000] [--udp 10000] [--rounds 4]`.

Needs root. Creates its own network namespace, re-runs itself inside it, builds a TCP table
(bench/loader.py) and a UDP table (UdpHolder below), checks that sockscope's UDP counts
equal `ss -uan`, then measures two `sockscope run` daemons on the same tables, one with
`udp.enabled: false`, one with the default `true`, both at `poll.interval: 1s`:

- whole daemon CPU per poll: user and system time of the process (/proc/PID/stat) over a
  window of exactly `--window` polls with no scrape inside it. The daemon not measured is
  SIGSTOPped; after SIGCONT it polls at once, then on its grid; the window starts 1.5 s
  later and lasts `window` x interval, so it holds `window` poll starts and its two cut
  polls add up to about one. A round is one window of each, back to back, in alternating
  order (off, on / on, off); the table's TIME-WAIT sockets (they expire 60 s after they
  were made) are renewed before a round that would not end before they expire. The other
  load on the machine moves both windows of a round alike: the table gives the median of
  the per-round differences as well as each daemon's median.
- in-process, the UDP dump alone (netlink.Reader with the SKMEMINFO extension, a sink that
  drops every batch) against dump + fold (features.udp), time.process_time per poll.

Writes bench/results/udp-latest.json and udp-latest.md and prints the table. The UDP part
of docs/performance.md quotes a run of it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time

from . import ns as netns
from .loader import Table
from .run import machine
from .tools import REPO, ConfigDaemon, result_args, write_results

SERVICE_PORTS = range(19000, 19032)  # 32 ports with unconnected sockets: the tracked ones
REUSEPORT_GROUP = 4  # IPv4 SO_REUSEPORT sockets per service port (plus one IPv6 socket)
SMALL_RCVBUF_PORT = 19000  # its sockets get a 4 KiB receive buffer: they drop datagrams


# -- the UDP table --------------------------------------------------------------------------


def _udp_main(n: int, conn) -> None:
    """Hold `n` UDP sockets: per service port 4 IPv4 SO_REUSEPORT sockets and one IPv6
    socket, never read; the rest connected clients (10 % IPv6) that each sent one 100-byte
    datagram to a service port, so Recv-Q is non-zero everywhere and the small-buffer port
    drops."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        held = []
        for port in SERVICE_PORTS:
            for _ in range(REUSEPORT_GROUP):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if port == SMALL_RCVBUF_PORT:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                s.bind(("127.0.0.1", port))
                held.append(s)
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s6.bind(("::1", port))
            held.append(s6)
        ports = list(SERVICE_PORTS)
        for i in range(n - len(held)):
            v6 = i % 10 == 9
            c = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
            c.connect(("::1" if v6 else "127.0.0.1", ports[i % len(ports)]))
            c.send(b"u" * 100)
            held.append(c)
        conn.send(("ready", len(held)))
        conn.recv()  # until told to stop
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", repr(e)))


class UdpHolder:
    def __init__(self, n: int) -> None:
        self.n = n
        parent, child = mp.get_context("fork").Pipe()
        self.conn = parent
        self.proc = mp.get_context("fork").Process(target=_udp_main, args=(n, child), daemon=True)

    def start(self, timeout: float = 120) -> int:
        self.proc.start()
        if not self.conn.poll(timeout):
            raise RuntimeError("UDP holder not ready")
        kind, info = self.conn.recv()
        if kind != "ready":
            raise RuntimeError(f"UDP holder: {info}")
        return info

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(5)


def ss_udp_counts() -> dict[str, int]:
    return {family: len(subprocess.run(["ss", "-uanH", flag], capture_output=True, text=True, check=True,
                                       timeout=60).stdout.splitlines())
            for family, flag in (("ipv4", "-4"), ("ipv6", "-6"))}


# -- measurements ---------------------------------------------------------------------------


def in_process(reps: int) -> dict:
    """The UDP dump alone vs dump + fold, CPU per poll (median of `reps`)."""
    from sockscope.features import PollContext
    from sockscope.features.udp import UdpSockets
    from sockscope.netlink import Reader
    from sockscope.poller import dump_into

    feature = UdpSockets()
    need = feature.needs()
    reader = Reader(protocol=need.protocol, ext=need.ext, states=need.states)
    dump, fold, counts = [], [], {}
    try:
        for _ in range(reps):
            t0 = time.process_time()
            stats = reader.poll(lambda: (lambda batch: None))
            dump.append(time.process_time() - t0)
            t0 = time.process_time()
            got, _, _ = dump_into(reader, [feature], PollContext(time.time(), time.monotonic()), need)
            fold.append(time.process_time() - t0)
            counts = dict(got["udp"].sockets)
    finally:
        reader.close()
    return {"messages": stats.messages, "dump": statistics.median(dump), "dump_fold": statistics.median(fold),
            "counts": counts}


def run(args) -> dict:
    table = Table(args.tcp)
    holder = UdpHolder(args.udp)
    daemons: dict[str, ConfigDaemon] = {}
    result = {"machine": machine(), "tcp": args.tcp, "udp": args.udp, "interval": args.interval,
              "window_polls": args.window, "rounds": {"off": [], "on": []}}
    try:
        table.build()
        result["udp_held"] = holder.start()
        ours = in_process(5)
        theirs = ss_udp_counts()
        if ours["counts"] != theirs:
            raise RuntimeError(f"sockscope's UDP counts {ours['counts']} differ from ss {theirs}")
        result["udp_counts_equal_ss"] = theirs
        daemons = {flag: ConfigDaemon(f"udp-{flag}", f"poll:\n  interval: {args.interval}s\nudp:\n  enabled: {str(flag == 'on').lower()}\n",
                                         port, args.interval)
                   for flag, port in (("off", 19401), ("on", 19402))}
        round_seconds = 2 * (args.window + 2) * args.interval
        for r in range(args.rounds):
            if table.tw_age() + round_seconds > 58:
                table.refresh_time_wait()
            for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
                w = daemons[name].window(args.window)
                result["rounds"][name].append(w)
                w["udp_sockets"] = sum(v for k, v in w.pop("metrics").items() if k[0] == "sockscope_udp_sockets")
                print(f"round {r} udp {name}: {w['cpu'] * 1000:.1f} ms/poll (user {w['user'] * 1000:.1f}, "
                      f"sys {w['sys'] * 1000:.1f}), {w['polls_seen']:.0f} polls seen, "
                      f"tcp {w['tcp_sockets']:.0f}, udp {w['udp_sockets']:.0f}", flush=True)
        result["in_process"] = in_process(args.reps)
    finally:
        for d in daemons.values():
            d.close()
        holder.close()
        table.close()
    return result


def markdown(result: dict) -> str:
    med = {name: {k: statistics.median(w[k] for w in rounds) for k in ("cpu", "user", "sys")}
           for name, rounds in result["rounds"].items()}
    off, on = med["off"], med["on"]
    diff = [on_w["cpu"] - off_w["cpu"] for on_w, off_w in zip(result["rounds"]["on"], result["rounds"]["off"])]
    diff_user = [a["user"] - b["user"] for a, b in zip(result["rounds"]["on"], result["rounds"]["off"])]
    diff_sys = [a["sys"] - b["sys"] for a, b in zip(result["rounds"]["on"], result["rounds"]["off"])]
    udp_src = statistics.median(w["source_seconds"].get("udp", 0) for w in result["rounds"]["on"])
    cnt_src = statistics.median(w["source_seconds"].get("udp_counters", 0) for w in result["rounds"]["on"])
    ip = result["in_process"]
    m = result["machine"]
    lines = [
        f"# UDP cost: {result['tcp']:,} TCP + {result['udp_held']:,} UDP sockets",
        "",
        f"{m['date']}; Linux {m['kernel']}, {m['cpus']} × {m['cpu']}; Python {m['python']}, numpy {m['numpy']}.",
        f"Whole `sockscope run` process, CPU per poll over windows of {result['window_polls']} polls at "
        f"{result['interval']:g} s, no scrapes inside; median of {len(result['rounds']['on'])} windows each, "
        "alternating order.",
        "",
        "| daemon | CPU/poll | user | system |",
        "|---|---|---|---|",
        *(f"| `udp.enabled: {flag}` | {m['cpu'] * 1000:.1f} ms | {m['user'] * 1000:.1f} ms | "
          f"{m['sys'] * 1000:.1f} ms |" for flag, m in (("false", off), ("true", on))),
        f"| difference of the medians | {(on['cpu'] - off['cpu']) * 1000:+.1f} ms "
        f"({(on['cpu'] / off['cpu'] - 1) * 100:+.1f} %) | "
        f"{(on['user'] - off['user']) * 1000:+.1f} ms | {(on['sys'] - off['sys']) * 1000:+.1f} ms |",
        f"| median of the per-round differences | {statistics.median(diff) * 1000:+.1f} ms | "
        f"{statistics.median(diff_user) * 1000:+.1f} ms | {statistics.median(diff_sys) * 1000:+.1f} ms |",
        "",
        "Every window: " + "; ".join(f"{name} " + ", ".join(f"{w['cpu'] * 1000:.1f}" for w in rounds)
                                     for name, rounds in result["rounds"].items()) + " ms/poll.",
        f"The daemon's own `sockscope_source_duration_seconds` (wall, median): udp dump + fold "
        f"{udp_src * 1000:.1f} ms, udp_counters {cnt_src * 1000:.2f} ms.",
        f"In-process, {ip['messages']:,} UDP sockets (both families): dump alone {ip['dump'] * 1000:.2f} ms, "
        f"dump + fold {ip['dump_fold'] * 1000:.2f} ms CPU per poll "
        f"(fold {(ip['dump_fold'] - ip['dump']) / max(ip['messages'], 1) * 1e6:.2f} µs/socket).",
        f"sockscope's UDP family counts equalled `ss -uan`: {result['udp_counts_equal_ss']}.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.udp", description=__doc__.split("\n")[0])
    p.add_argument("--tcp", type=int, default=100_000, help="TCP table size")
    p.add_argument("--udp", type=int, default=10_000, help="UDP sockets held")
    p.add_argument("--rounds", type=int, default=10, help="windows per daemon (order alternates)")
    p.add_argument("--window", type=int, default=10, help="polls per window")
    p.add_argument("--interval", type=float, default=1.0, help="poll.interval of both daemons, seconds")
    p.add_argument("--reps", type=int, default=15, help="in-process dumps")
    return result_args(p).parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.inner:
        return netns.rerun_inside("bench.udp", argv, REPO)
    result = run(args)
    write_results(args.out, "udp", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
