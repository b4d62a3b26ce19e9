"""TCP states: the kernel's numbers and every spelling sockscope meets, in one place.

Kernel numbers from include/net/tcp_states.h. `label` is the Prometheus label value (the
kernel name in lower snake case), `ss` the name ss(8) prints and takes in a STATE-FILTER,
`collectd` the name collectd's tcpconns plugin writes (src/tcpconns.c, tcp_state[]).
TCP_NEW_SYN_RECV (12, request sockets) has no label of its own: it is counted as
syn_recv, as `ss` shows it.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["TcpState", "STATES", "COUNTED", "SLOT", "NSTATES", "UNKNOWN_SLOT", "slot_of", "state_bits"]


class TcpState(enum.IntEnum):
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12  # request sockets; reported as SYN_RECV

    @property
    def counted_as(self) -> TcpState:
        return TcpState.SYN_RECV if self is TcpState.NEW_SYN_RECV else self

    @property
    def label(self) -> str:
        return self.counted_as.name.lower()

    @property
    def ss(self) -> str:
        return _SS[self.counted_as]

    @property
    def shown(self) -> str:
        """How `ss` prints the state in its State column."""
        return _SHOWN.get(self.counted_as, self.counted_as.name.replace("_", "-"))

    @property
    def collectd(self) -> str:
        return "CLOSED" if self is TcpState.CLOSE else self.counted_as.name

    @property
    def slot(self) -> int:
        """Index of this state's label in STATES."""
        return self.counted_as - 1


_SS = {
    TcpState.ESTABLISHED: "established", TcpState.SYN_SENT: "syn-sent",
    TcpState.SYN_RECV: "syn-recv", TcpState.FIN_WAIT1: "fin-wait-1",
    TcpState.FIN_WAIT2: "fin-wait-2", TcpState.TIME_WAIT: "time-wait",
    TcpState.CLOSE: "closed", TcpState.CLOSE_WAIT: "close-wait",
    TcpState.LAST_ACK: "last-ack", TcpState.LISTEN: "listening",
    TcpState.CLOSING: "closing",
}

_SHOWN = {TcpState.ESTABLISHED: "ESTAB", TcpState.FIN_WAIT1: "FIN-WAIT-1", TcpState.FIN_WAIT2: "FIN-WAIT-2"}

# Label values in exposition order (kernel order): the `state` label of every metric.
COUNTED: tuple[TcpState, ...] = tuple(s for s in TcpState if s is not TcpState.NEW_SYN_RECV)
STATES: tuple[str, ...] = tuple(s.label for s in COUNTED)
NSTATES = len(STATES)
UNKNOWN_SLOT = 15  # slot of a state number this build does not know (a 16-wide row)
# kernel state number -> slot (index into STATES), UNKNOWN_SLOT for numbers not listed.
SLOT = np.full(256, UNKNOWN_SLOT, np.uint8)
for _s in TcpState:
    SLOT[_s] = _s.slot


def slot_of(label: str) -> int:
    return STATES.index(label)


def state_bits(*states: TcpState) -> int:
    """A sock_diag state mask (1 << kernel number) for these states."""
    mask = 0
    for s in states:
        mask |= 1 << s
    return mask
