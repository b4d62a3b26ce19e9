"""The immutable result of one poll, shared by every exporter.

The poller builds a new Snapshot per poll and swaps one reference; readers (scrapes,
the Graphite pusher, the CLI) never see a half-built one and never lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kernelstats import KernelStats
    from .peaks import Peaks

# Kernel TCP states, include/net/tcp_states.h. Index = kernel number.
# TCP_NEW_SYN_RECV (12, request sockets) is reported as syn_recv, as `ss` does.
STATE_NAMES = (
    None,
    "established",  # 1
    "syn_sent",  # 2
    "syn_recv",  # 3
    "fin_wait1",  # 4
    "fin_wait2",  # 5
    "time_wait",  # 6
    "close",  # 7
    "close_wait",  # 8
    "last_ack",  # 9
    "listen",  # 10
    "closing",  # 11
)
# The label values in exposition order (kernel order).
STATES = tuple(s for s in STATE_NAMES if s)
TCP_LISTEN = 10
TCP_NEW_SYN_RECV = 12
TCP_SYN_RECV = 3
# Index into STATES for a kernel state number (0-based), NEW_SYN_RECV folded into SYN_RECV.
STATE_INDEX = {n: n - 1 for n in range(1, 12)} | {TCP_NEW_SYN_RECV: TCP_SYN_RECV - 1}
LISTEN_INDEX = TCP_LISTEN - 1

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
    duration: float  # seconds the poll took (dump + aggregation)
    families: tuple[str, ...]  # families that were read (ipv6 missing if disabled)
    states: dict[tuple[str, str], int]  # (family, state) -> count, zero-filled
    local: PortTable
    remote: PortTable
    listeners: tuple[Listener, ...]
    folded_listeners: int = 0  # listeners beyond listeners.max_tracked, not exported
    dump_interrupted: int = 0  # dumps accepted with NLM_F_DUMP_INTR after all retries
    messages: int = field(default=0)  # netlink messages decoded in this poll
    peaks: Peaks | None = None  # window peaks up to this poll (None: poll.peak_window 0)

    @property
    def sockets(self) -> int:
        return sum(self.states.values())


@dataclass(frozen=True, slots=True)
class PollStatus:
    """What the poller publishes after every poll, good or bad, swapped as one reference.

    `snapshot` is the last good Snapshot (None before the first success); a failed poll
    keeps it and only bumps the counters. Counters are cumulative since start.
    """

    snapshot: Snapshot | None = None
    last_success_monotonic: float | None = None  # time.monotonic() of the last good poll
    polls: int = 0
    errors: int = 0
    dump_retries: int = 0  # dumps restarted because of NLM_F_DUMP_INTR
    dump_interrupted: int = 0  # dumps accepted with NLM_F_DUMP_INTR after all retries
    last_error: str | None = None
    # Kernel TCP counters/limits read in the same poll (None: poll.kernel_stats off or
    # not read yet). Read and reported independently of the socket dump.
    kernel: KernelStats | None = None
