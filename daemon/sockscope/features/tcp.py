"""TCP sockets per state, per tracked port on each side, queues, listen queues.

The first feature: the TCP dump (all states, no extensions) folded by aggregate.Accumulator
into a Snapshot (ports tracked by `ports:`, listeners capped by `listeners:`). Primary: a
failed TCP dump is a failed poll, the last good Snapshot is kept and sockscope_up ages it.
"""

from __future__ import annotations

import socket

from ..aggregate import Accumulator, Rules
from ..catalogue import GraphitePath, Metric, Samples
from ..snapshot import FAMILIES, OTHER, PortTable, Snapshot
from ..states import STATES
from .base import DumpNeed, DumpStats, Feature, Fold, PollContext

__all__ = ["TcpSockets", "METRICS"]


def _side_metrics(side: str) -> tuple[Metric, ...]:
    p = f"sockscope_tcp_{side}_port"
    where = ("tcp", f"{side}_port", "{port}")
    queue = "over its non-LISTEN sockets"
    return (
        Metric(f"{p}_sockets", "gauge", f"TCP sockets per {side} port and state, all families; "
               'port="other" holds every untracked port.', ("port", "state"),
               GraphitePath((*where, "{state}"), collectd=(f"tcpconns-{{port}}-{side}", "tcp_connections-{STATE}")),
               peak=True),
        Metric(f"{p}_receive_queue_bytes", "gauge", f"Sum of Recv-Q (bytes not yet read by the application) {queue}.",
               ("port",), GraphitePath((*where, "receive_queue_bytes"))),
        Metric(f"{p}_send_queue_bytes", "gauge", f"Sum of Send-Q (bytes not yet acknowledged by the peer) {queue}.",
               ("port",), GraphitePath((*where, "send_queue_bytes"))),
        Metric(f"{p}_receive_queue_max_bytes", "gauge", f"Largest Recv-Q of one socket of the {side} port.",
               ("port",), GraphitePath((*where, "receive_queue_max_bytes"))),
        Metric(f"{p}_send_queue_max_bytes", "gauge", f"Largest Send-Q of one socket of the {side} port.",
               ("port",), GraphitePath((*where, "send_queue_max_bytes"))),
        Metric(f"{p}_backlogged_sockets", "gauge", f"Sockets of the {side} port with a non-empty receive or send "
               "queue (LISTEN excluded).", ("port", "queue"), GraphitePath((*where, "backlogged", "{queue}"))),
    )


SOCKETS = Metric("sockscope_tcp_sockets", "gauge",
                 "TCP sockets per address family and state (request sockets count as syn_recv, as in ss).",
                 ("family", "state"),
                 GraphitePath(("tcp", "states", "{family}", "{state}"), collectd_total=("tcpconns-all",
                                                                                       "tcp_connections-{STATE}")),
                 peak=True)
LOCAL, REMOTE = _side_metrics("local"), _side_metrics("remote")
_LISTEN = ("tcp", "listen", "{address}_{port}")
LISTEN_LENGTH = Metric("sockscope_tcp_listen_queue_length", "gauge",
                       "Connections waiting in a listening address's accept queue (ss -lnt Recv-Q; the fullest "
                       "SO_REUSEPORT member).", ("address", "port"), GraphitePath((*_LISTEN, "queue_length")),
                       peak=True)
LISTEN_LIMIT = Metric("sockscope_tcp_listen_queue_limit", "gauge",
                      "Accept queue limit of a listening address (ss -lnt Send-Q; that of the fullest member).",
                      ("address", "port"), GraphitePath((*_LISTEN, "queue_limit")))
LISTEN_SOCKETS = Metric("sockscope_tcp_listen_sockets", "gauge",
                        "Listening sockets bound to the address (more than 1 with SO_REUSEPORT).",
                        ("address", "port"), GraphitePath((*_LISTEN, "sockets")))
FOLDED_PORTS = Metric("sockscope_folded_ports", "gauge",
                      'Ports past the tracked-port cap of a side, counted under port="other".', ("side",),
                      GraphitePath(("tcp", "folded_ports", "{side}")))
FOLDED_LISTENERS = Metric("sockscope_folded_listeners", "gauge",
                          "Listening addresses past listeners.max_tracked, not in the listen series.",
                          (), GraphitePath(("tcp", "folded_listeners")))
METRICS = (SOCKETS, *LOCAL, *REMOTE, LISTEN_LENGTH, LISTEN_LIMIT, LISTEN_SOCKETS, FOLDED_PORTS, FOLDED_LISTENERS)


def port_order(table: PortTable) -> list[int]:
    """Row indices of `table`: numeric ports ascending, then OTHER."""
    return sorted(range(len(table.ports)),
                  key=lambda i: (1, 0) if table.ports[i] == OTHER else (0, int(table.ports[i])))


def family_order(families: tuple[str, ...]) -> list[str]:
    rank = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(families, key=lambda f: (rank.get(f, len(rank)), f))


def samples(snap: Snapshot, out: Samples) -> None:
    """The samples of one Snapshot, in exposition order."""
    add = out.add
    out.declare(SOCKETS)
    for family in family_order(snap.families):
        for state in STATES:
            add(SOCKETS, (family, state), snap.states.get((family, state), 0))
    for metrics, table in ((LOCAL, snap.local), (REMOTE, snap.remote)):
        sockets, rsum, ssum, rmax, smax, backlogged = metrics
        for m in metrics:
            out.declare(m)
        order = port_order(table)
        for i in order:
            port = str(table.ports[i])
            for state, count in zip(STATES, table.counts[i]):
                add(sockets, (port, state), count)
        for i in order:
            add(rsum, (str(table.ports[i]),), table.queues[i].receive_bytes)
        for i in order:
            add(ssum, (str(table.ports[i]),), table.queues[i].send_bytes)
        for i in order:
            add(rmax, (str(table.ports[i]),), table.queues[i].receive_max_bytes)
        for i in order:
            add(smax, (str(table.ports[i]),), table.queues[i].send_max_bytes)
        for i in order:
            q = table.queues[i]
            add(backlogged, (str(table.ports[i]), "receive"), q.receive_backlogged)
            add(backlogged, (str(table.ports[i]), "send"), q.send_backlogged)
    listeners = sorted(snap.listeners, key=lambda lst: (lst.port, lst.address))
    for metric, attr in ((LISTEN_LENGTH, "queue_length"), (LISTEN_LIMIT, "queue_limit"),
                         (LISTEN_SOCKETS, "members")):
        out.declare(metric)
        for lst in listeners:
            add(metric, (lst.address, str(lst.port)), getattr(lst, attr))
    add(FOLDED_PORTS, ("local",), snap.local.folded)
    add(FOLDED_PORTS, ("remote",), snap.remote.folded)
    add(FOLDED_LISTENERS, (), snap.folded_listeners)


class _TcpFold(Fold):
    def __init__(self, acc: Accumulator, rules: Rules, ctx: PollContext) -> None:
        acc.reset()  # the feature's arrays, reused: a poll allocates nothing big
        self._acc = acc
        self._rules = rules
        self._ctx = ctx

    def add(self, batch) -> None:
        self._acc.add(batch)

    def finish(self, stats: DumpStats) -> Snapshot:
        return self._acc.finish(self._rules, families=stats.families, timestamp=self._ctx.timestamp,
                                messages=stats.messages, dump_interrupted=stats.interrupted)


class TcpSockets(Feature):
    name = "tcp"
    sticky = True
    primary = True
    metrics = METRICS

    def __init__(self, rules: Rules, families: tuple[str, ...] = FAMILIES) -> None:
        self.rules = rules
        self.families = families
        self._acc: Accumulator | None = None  # allocated at the first poll, then reused

    @classmethod
    def from_config(cls, cfg) -> TcpSockets:
        return cls(Rules.from_config(cfg), cfg.poll.families)

    def needs(self) -> DumpNeed:
        return DumpNeed(socket.IPPROTO_TCP)

    def fold(self, ctx: PollContext) -> Fold:
        # One fold at a time (the poller thread's): each new one, for the next poll or a
        # retried attempt, resets the same Accumulator.
        if self._acc is None:
            self._acc = Accumulator(remote=self.rules.remote)
        return _TcpFold(self._acc, self.rules, ctx)

    def samples(self, snap: Snapshot, out: Samples) -> None:
        samples(snap, out)

    def max_peak_series(self) -> int:
        r, n = self.rules, len(STATES)
        return len(self.families) * n + (r.max_local + 1) * n + (r.max_remote + 1) * n + r.max_listeners

    def max_series(self) -> int:
        r, n = self.rules, len(STATES)
        per_port = n + 4 + 2  # states, four queue figures, backlogged receive/send
        return (len(self.families) * n + (r.max_local + 1) * per_port + (r.max_remote + 1) * per_port
                + 3 * r.max_listeners + 2 + 1)
