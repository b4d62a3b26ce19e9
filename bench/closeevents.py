"""The connections feature's cost: close notifications received without loss per receive
buffer, the receiver's CPU per 1,000 events, the largest burst each buffer absorbs, and
the poll side (the ledger fold at 100k sockets, a drain of 10k closes).

    sudo python -m bench.closeevents [--seconds 5] [--json PATH] [--no-burst] [--sockets N]

Root (a namespace of its own, SO_RCVBUFFORCE). Everything is bounded in time: each churn
phase runs --seconds, each burst at most 8,000 connection pairs, the fold medians 15 rounds.

- churn: G generator processes in the namespace open and close loopback connections as
  fast as they can (and, on the kernel's default buffer and on the feature's, paced at
  PACED events/s) (the client closes with SO_LINGER 0: an RST, no TIME-WAIT, so ports do
  not run out; both ends are full sockets: 2 events per connection). The feature's own
  Receiver (features/connections.py) reads them in this process, its Pending queue drained
  every 200 ms as a poll would. Received + lost must equal 2 x the connections made, plus
  at most one per generator: its listener's close is a notification too, not a connection
  (skipped when read, but counted lost when the kernel drops it). CPU:
  the receiver thread's clock (pthread_getcpuclockid), per 1,000 events received.
- burst: a process opens N connection pairs and exits, so the kernel closes 2N sockets in
  a few milliseconds; N doubles from 250 until the receiver loses events.
- poll side: the ledger fold of a synthetic 100k-socket dump (10 % of the sockets grew since
  the last poll) and one drain of 10,000 closes, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sockscope import features, tcpinfo
from sockscope.batch import Batch
from sockscope.closeevents import NORMAL, Closed, CloseEvents
from sockscope.features import DumpStats, PollContext
from sockscope.features.connections import Connections, Pending, Receiver

from . import ns as bench_ns

NS = "sockscope-bench-close"
# (label, SO_RCVBUF asked, forced): the kernel grants twice what is asked
BUFFERS = [("208 KiB (default, not forced)", 104 * 1024, False),
           ("416 KiB (stock rmem_max 212992, unprivileged)", 212992, False), ("2 MiB", 1 << 20, True),
           ("8 MiB", 4 << 20, True), ("16 MiB (connections.receive_buffer default)", 8 << 20, True)]
GENERATORS = 2
PACED = (1_000, 10_000, 20_000, 40_000)  # events/s asked of the generators

CHURN = r"""
import socket, struct, sys, time
port, seconds, rate = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
srv = socket.create_server(("127.0.0.1", port), backlog=4096)
rst = struct.pack("ii", 1, 0)
start = time.monotonic()
n, end = 0, start + seconds
while time.monotonic() < end:
    if rate and n >= rate * (time.monotonic() - start):  # paced: rate connections/s
        time.sleep(0.001)
        continue
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = srv.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
    c.close(); a.close()
    n += 1
print(n, flush=True)
"""

BURST = r"""
import os, socket, sys
n = int(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 18700), backlog=n)
held = []
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", 18700)); a, _ = srv.accept(); held += [c, a]
print("ready", flush=True)
sys.stdin.readline()
os._exit(0)  # the kernel closes every socket at once
"""


def thread_cpu(thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


class Run:
    """One receiver (the feature's) on one buffer size, counting what it hands over."""

    def __init__(self, asked: int, forced: bool) -> None:
        self.pending = Pending(10_000_000)
        self.receiver = Receiver(CloseEvents(netns=NS, rcvbuf=asked, force=forced), self.pending)
        self.receiver.start()
        self.received = 0

    def drain(self) -> None:
        self.received += len(self.pending.take())

    def lost(self) -> int:
        return self.receiver.kernel_dropped + self.pending.dropped

    def stop(self) -> None:
        self.receiver.stop()


def churn(asked: int, forced: bool, seconds: float, events_per_s: float = 0) -> dict:
    """Unpaced (events_per_s 0: as fast as the generators go), or paced to events_per_s."""
    run = Run(asked, forced)
    time.sleep(0.2)
    thread = run.receiver._thread
    cpu0, t0 = thread_cpu(thread), time.monotonic()
    procs = [subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", CHURN, str(18600 + g), str(seconds),
                              str(events_per_s / 2 / GENERATORS)],
                              stdout=subprocess.PIPE, text=True) for g in range(GENERATORS)]
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        run.drain()
    made = sum(int(p.stdout.read().strip() or 0) for p in procs)
    wall = time.monotonic() - t0
    deadline = time.monotonic() + 3
    while run.received + run.lost() < 2 * made and time.monotonic() < deadline:
        time.sleep(0.1)
        run.drain()
    cpu = thread_cpu(thread) - cpu0
    run.drain()
    out = {"granted": run.receiver.granted, "connections": made, "events": 2 * made, "received": run.received,
           "lost": run.lost(), "overruns": run.receiver.overruns, "seconds": round(wall, 2),
           "events_per_s": round(2 * made / wall), "receiver_cpu_ms_per_1000": round(1e3 * cpu / max(run.received, 1) * 1e3, 2)}
    run.stop()
    return out


def burst(asked: int, forced: bool) -> dict:
    """The largest burst (events) absorbed without loss, and the first one that lost."""
    clean, first_loss = 0, None
    n = 250
    while n <= 8000:
        run = Run(asked, forced)
        proc = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", BURST, str(n)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3)
            run.drain()
            before = run.received  # the pairs' own opens send nothing; nothing expected yet
            proc.stdin.write("x\n")
            proc.stdin.flush()
            proc.wait(timeout=60)
            deadline = time.monotonic() + 3
            while run.received - before + run.lost() < 2 * n and time.monotonic() < deadline:
                time.sleep(0.1)
                run.drain()
            lost = run.lost()
        finally:
            if proc.poll() is None:
                proc.kill()
            run.stop()
        if lost:
            first_loss = {"events": 2 * n, "lost": lost}
            break
        clean = 2 * n
        n *= 2
    return {"absorbed_events": clean, "first_loss": first_loss}


# -- the poll side ----------------------------------------------------------------------------


def _quiet_events():
    class Quiet:
        granted = 0

        def open(self):
            pass

        def receive(self, timeout):
            time.sleep(timeout)

        def dropped(self):
            return 0

        def close(self):
            pass
    return Quiet()


def synthetic_dumps(n: int, per_batch: int = 10_000) -> list[tuple[Batch, np.ndarray]]:
    """n ESTABLISHED sockets (cookies 1..n) on 200 local ports with a tcp_info each, as the
    reader hands them over (batches of `per_batch` messages), with where each batch's
    bytes_acked sits (patched per round)."""
    lo = socket.inet_aton("127.0.0.1") + bytes(12)
    info = [(tcpinfo.INET_DIAG_INFO, bytes(232))]
    acked = tcpinfo.FIELDS["bytes_acked"].offset
    out = []
    for start in range(0, n, per_batch):
        idx = range(start, min(start + per_batch, n))
        batch = Batch.from_records([(socket.AF_INET, 1, 8000 + i % 200, 40000 + i % 20000, lo, lo, 0, 0, 0, 1)
                                    for i in idx], cookies=[i + 1 for i in idx], attributes=[info] * len(idx))
        out.append((batch, batch.attribute(tcpinfo.INET_DIAG_INFO).offset + acked))
    return out


def with_acked(batch: Batch, at: np.ndarray, acked: np.ndarray) -> Batch:
    data = np.frombuffer(batch.data, np.uint8).copy()
    data[at[:, None] + np.arange(8)] = acked.astype("<u8").view(np.uint8).reshape(-1, 8)
    return Batch(data.tobytes(), batch.words)


def poll_side(n: int = 100_000, rounds: int = 15) -> dict:
    f = Connections(features.tcp.Rules(), events=_quiet_events)
    rng = np.random.default_rng(1)
    grown = np.zeros(n, np.int64)
    stats = DumpStats(("ipv4",), n, 0, 0)
    dumps = synthetic_dumps(n)
    times = []
    for r in range(rounds + 1):
        grown[rng.choice(n, n // 10, replace=False)] += 100
        batches = [with_acked(b, at, 1000 + grown[i * 10_000:i * 10_000 + len(at)]) for i, (b, at) in enumerate(dumps)]
        t = time.perf_counter()
        fold = f.fold(PollContext(float(r), float(r)))
        for batch in batches:
            fold.add(batch)
        fold.finish(stats)
        if r:
            times.append(time.perf_counter() - t)
    assert len(f.ledger) == n, len(f.ledger)
    fold_us = statistics.median(times) / n * 1e6
    drains = []
    for r in range(rounds):
        cookies = np.arange(r * 10_000 + 1, (r + 1) * 10_000 + 1, dtype=np.uint64)
        z = np.zeros(len(cookies), np.int64)
        f.pending.put(Closed(cookies, np.full(len(cookies), 8080, np.uint16), np.full(len(cookies), 40000, np.uint16),
                             z + 5000, z, z, np.full(len(cookies), NORMAL, np.uint8), np.full(len(cookies), 50, np.uint32),
                             np.full(len(cookies), 100.0 + r)))
        fold = f.fold(PollContext(100.0 + r, 100.0 + r))
        t = time.perf_counter()
        fold.finish(stats)  # nothing dumped: only the drain and the closes
        drains.append(time.perf_counter() - t)
    f.close()
    return {"sockets": n, "fold_us_per_socket": round(fold_us, 3),
            "drain_10k_closes_ms": round(statistics.median(drains) * 1e3, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="each churn phase (default 5)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--no-burst", action="store_true")
    ap.add_argument("--sockets", type=int, default=100_000, help="poll side: sockets in the dump")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (a network namespace, SO_RCVBUFFORCE)", file=sys.stderr)
        return 2
    bench_ns.delete(NS)
    bench_ns.create(NS)
    out: dict = {"generators": GENERATORS, "churn": {}, "paced": {}, "burst": {}}
    try:
        for label, asked, forced in (BUFFERS[0], BUFFERS[1], BUFFERS[-1]):
            for rate in PACED:  # where the default buffer starts losing; the CPU at ordinary rates
                out["paced"][f"{label} at {rate} events/s"] = got = churn(asked, forced, args.seconds, rate)
                print(label, "paced", rate, got, flush=True)
        for label, asked, forced in BUFFERS:
            out["churn"][label] = churn(asked, forced, args.seconds)
            print(label, "churn", out["churn"][label], flush=True)
            if not args.no_burst:
                out["burst"][label] = burst(asked, forced)
                print(label, "burst", out["burst"][label], flush=True)
    finally:
        bench_ns.delete(NS)
    out["poll_side"] = poll_side(args.sockets)
    print("poll side", out["poll_side"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
