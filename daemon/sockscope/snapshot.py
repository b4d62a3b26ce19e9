"""The immutable results of one poll, shared by every exporter.

The poller builds a new PollStatus per poll and swaps one reference; readers (scrapes,
the Graphite pusher, the CLI) never see a half-built one and never lock. Snapshot is the
TCP feature's result (features/tcp.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .catalogue import Samples
from .states import STATES, TcpState

if TYPE_CHECKING:
    from .kernelstats import KernelStats

# Re-exported for the modules that take the state label values from here (states.py
# is the one definition).
__all__ = ["STATES", "FAMILIES", "OTHER", "QueueStats", "PortTable", "Listener", "Snapshot",
           "SourceHealth", "PollStatus", "TcpState"]
LISTEN_INDEX = TcpState.LISTEN.slot

FAMILIES = ("ipv4", "ipv6")
OTHER = "other"


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Recv-Q/Send-Q over the non-LISTEN sockets of one port (`ss` Recv-Q/Send-Q columns)."""

    receive_bytes: int = 0
    send_bytes: int = 0
    receive_max_bytes: int = 0
    send_max_bytes: int = 0
    receive_backlogged: int = 0  # sockets with Recv-Q > 0
    send_backlogged: int = 0  # sockets with Send-Q > 0


@dataclass(frozen=True, slots=True)
class PortTable:
    """Socket counts per tracked port (one side: local or remote), plus the `other` bucket.

    `ports` lists the tracked ports in ascending order followed by OTHER; `counts[i]` is a
    tuple of len(STATES) counts for ports[i]; `queues[i]` its QueueStats. Summing counts
    over all ports gives the per-state totals of the snapshot.
    """

    ports: tuple[int | str, ...]
    counts: tuple[tuple[int, ...], ...]
    queues: tuple[QueueStats, ...]
    folded: int = 0  # candidate ports that did not fit under the cap and went to OTHER


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening address:port; several sockets with SO_REUSEPORT are its members.

    queue_length/queue_limit are those of the fullest member (highest length/limit), so
    the ratio of the two is what an operator alerts on; `ss -lnt` shows them as
    Recv-Q/Send-Q.
    """

    family: str
    address: str
    port: int
    queue_length: int
    queue_limit: int
    members: int = 1


@dataclass(frozen=True, slots=True)
class Snapshot:
    timestamp: float  # wall-clock time the poll started (UNIX seconds)
    duration: float  # seconds the TCP dump took (dump + aggregation)
    families: tuple[str, ...]  # families that were read (ipv6 missing if disabled)
    states: dict[tuple[str, str], int]  # (family, state) -> count, zero-filled
    local: PortTable
    remote: PortTable
    listeners: tuple[Listener, ...]
    folded_listeners: int = 0  # listeners beyond listeners.max_tracked, not exported
    dump_interrupted: int = 0  # dumps accepted with NLM_F_DUMP_INTR after all retries
    messages: int = field(default=0)  # netlink messages decoded in this poll

    @property
    def sockets(self) -> int:
        return sum(self.states.values())


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """How one source of the latest poll went: a dump (`tcp`, `udp`) or a feature that
    reads on its own (`kernel`)."""

    up: bool
    duration: float  # seconds


@dataclass(frozen=True, slots=True)
class PollStatus:
    """What the poller publishes after every poll, good or bad, swapped as one reference.

    `results` holds each feature's latest result by feature name ("tcp": the last good
    Snapshot, None before the first success; "kernel": KernelStats ...), `samples` what
    the features made of them (catalogue.Samples, in exposition order), `sources` how each
    source went. A failed primary poll (the TCP dump) keeps the last good Snapshot and only
    bumps the counters. Counters are cumulative since start.
    """

    results: Mapping[str, Any] = field(default_factory=dict)
    samples: Samples = field(default_factory=Samples)
    sources: Mapping[str, SourceHealth] = field(default_factory=dict)
    source_errors: Mapping[str, int] = field(default_factory=dict)  # failures per source since start
    last_success_monotonic: float | None = None  # time.monotonic() of the last good poll
    polls: int = 0
    errors: int = 0
    dump_retries: int = 0  # dumps restarted because of NLM_F_DUMP_INTR
    dump_interrupted: int = 0  # dumps accepted with NLM_F_DUMP_INTR after all retries
    last_error: str | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        """The TCP feature's last good Snapshot; in a sweep of namespaces, the sweep's
        result (sweep.SweepResult: the same summary fields, summed over the namespaces)."""
        snap = self.results.get("tcp")
        return snap if snap is not None else self.results.get("netns")

    @property
    def kernel(self) -> KernelStats | None:
        return self.results.get("kernel")
