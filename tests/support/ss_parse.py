"""Parse `ss -tanOH` text into the figures sockscope exports: the tests' reference.

Pure part (no I/O, unit-tested on captured text):

    lines = parse(text)                       # list[SsLine]
    fig = figures(text)                       # SsFigures, from text or from lines
    fig = figures(text, exclude=lambda l: l.remote_port == 22)

Runner (needs root + iproute2; `ns` is a tests.netns.NetNS or a namespace name):

    fig = ss_figures(ns)                      # runs `ip netns exec NS ss -tanOH`
    text = run_ss(ns, "-ltnOH")

What iproute2 6.1 prints (checked on Debian 12, kernel 6.x), one socket per line with -O:

    State      Recv-Q Send-Q   Local Address:Port   Peer Address:Port [extra columns]
    LISTEN     0      128            0.0.0.0:18443       0.0.0.0:*      AF_INET wildcard
    LISTEN     0      128          127.0.0.1:18080       0.0.0.0:*
    LISTEN     0      128               [::]:18445          [::]:*      AF_INET6, V6ONLY=1
    LISTEN     0      128                  *:18444             *:*      AF_INET6, V6ONLY=0
    LISTEN     0      128              [::1]:18082          [::]:*
    ESTAB      0      0   [::ffff:127.0.0.1]:18444 [::ffff:127.0.0.1]:46140  AF_INET6
    SYN-SENT   0      1            127.0.0.1:48682     127.0.0.1:18090  (the SYN: Send-Q 1)

So a bare `*` address is printed ONLY for an AF_INET6 socket bound to in6addr_any without
IPV6_V6ONLY (ss.c inet_addr_print); AF_INET 0.0.0.0 prints as `0.0.0.0`. The parser
therefore takes `*` as "::" / ipv6, unless the other address of the line is a dotted v4
address (old iproute2 printed `*` for 0.0.0.0 too), then "0.0.0.0" / ipv4. Bracketed
addresses (incl. v4-mapped) are ipv6. `%ifname` scope suffixes are stripped.
State names: ss prints TCP_CLOSE as UNCONN (CLOSE accepted too) and TCP_NEW_SYN_RECV
request sockets as SYN-RECV.

Queues: for LISTEN lines Recv-Q/Send-Q are the accept queue length/limit (they go to
`listeners`, never to the queue figures); for every other line they are bytes (Recv-Q:
unread bytes, +1 for a received FIN; Send-Q: unacked/unsent bytes, +1 for a SYN/FIN).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

SS_STATES: dict[str, str] = {
    "ESTAB": "established",
    "SYN-SENT": "syn_sent",
    "SYN-RECV": "syn_recv",
    "FIN-WAIT-1": "fin_wait1",
    "FIN-WAIT-2": "fin_wait2",
    "TIME-WAIT": "time_wait",
    "UNCONN": "close",
    "CLOSE": "close",
    "CLOSE-WAIT": "close_wait",
    "LAST-ACK": "last_ack",
    "LISTEN": "listen",
    "CLOSING": "closing",
}
# Same order as sockscope.snapshot.STATES (kernel order).
STATES = ("established", "syn_sent", "syn_recv", "fin_wait1", "fin_wait2", "time_wait",
          "close", "close_wait", "last_ack", "listen", "closing")
FAMILIES = ("ipv4", "ipv6")
# A leading Netid column appears when ss lists several protocols (e.g. -tuan).
_NETIDS = {"tcp", "udp", "raw", "mptcp", "sctp", "dccp", "u_str", "u_dgr", "u_seq", "nl",
           "p_raw", "p_dgr", "v_str", "v_dgr", "xdp", "tipc"}


class SsParseError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SsLine:
    state: str  # SsFigures name: established, listen, ...
    ss_state: str  # as printed: ESTAB, LISTEN, ...
    recvq: int
    sendq: int
    family: str  # "ipv4" | "ipv6"
    local_address: str  # normalised: no brackets, no %scope, "*" -> "::" or "0.0.0.0"
    local_port: int  # "*" -> 0
    remote_address: str
    remote_port: int
    extra: str = ""  # anything ss printed after the peer column (-e, -p, -i ...)
    raw: str = field(default="", compare=False)


class Queues(NamedTuple):
    """Per-port queue figures over non-LISTEN sockets; equal to the plain 6-tuple."""

    recvq_sum: int = 0
    sendq_sum: int = 0
    recvq_max: int = 0
    sendq_max: int = 0
    n_recvq_nonzero: int = 0
    n_sendq_nonzero: int = 0

    def add(self, recvq: int, sendq: int) -> "Queues":
        return Queues(self.recvq_sum + recvq, self.sendq_sum + sendq,
                      max(self.recvq_max, recvq), max(self.sendq_max, sendq),
                      self.n_recvq_nonzero + (recvq > 0), self.n_sendq_nonzero + (sendq > 0))


@dataclass
class SsFigures:
    # (family, state) -> count; only non-zero entries (use .state() for a 0 default)
    states: dict[tuple[str, str], int] = field(default_factory=dict)
    local_port_states: dict[tuple[int, str], int] = field(default_factory=dict)
    remote_port_states: dict[tuple[int, str], int] = field(default_factory=dict)
    # port -> Queues, for every port seen on a non-LISTEN line (all-zero entries included)
    local_queues: dict[int, Queues] = field(default_factory=dict)
    remote_queues: dict[int, Queues] = field(default_factory=dict)
    # (address, port) -> [(recvq, sendq) per LISTEN socket], in ss order
    listeners: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)
    lines: list[SsLine] = field(default_factory=list)

    def state(self, state: str, family: str | None = None) -> int:
        """Count of `state`, for one family or both."""
        fams = FAMILIES if family is None else (family,)
        return sum(self.states.get((f, state), 0) for f in fams)

    @property
    def total(self) -> int:
        return len(self.lines)


def _split_endpoint(ep: str) -> tuple[str, str]:
    """'[::1]:80' -> ('[::1]', '80'); '127.0.0.1%lo:80' -> ('127.0.0.1%lo', '80')."""
    host, sep, port = ep.rpartition(":")
    if not sep or not host:
        raise SsParseError(f"no address:port in {ep!r}")
    return host, port


def _addr(host: str) -> tuple[str, str | None]:
    """Normalised address and its family (None for a bare `*`)."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise SsParseError(f"unbalanced bracket in {host!r}")
        inner = host[1:end].split("%", 1)[0]
        return inner, "ipv6"
    host = host.split("%", 1)[0]
    if host == "*":
        return "*", None
    if ":" in host:  # unbracketed v6 (not printed by current ss, accepted anyway)
        return host, "ipv6"
    return host, "ipv4"


def _port(p: str) -> int:
    if p == "*":
        return 0
    try:
        return int(p)
    except ValueError:
        raise SsParseError(f"non-numeric port {p!r} (run ss with -n)") from None


def parse_line(line: str) -> SsLine | None:
    """One ss line -> SsLine; None for blank/header/non-TCP lines."""
    parts = line.split()
    if not parts or parts[0] in ("State", "Netid"):
        return None
    if parts[0] in _NETIDS:
        if parts[0] != "tcp":
            return None
        parts = parts[1:]
    if len(parts) < 5:
        raise SsParseError(f"too few columns: {line!r}")
    ss_state = parts[0]
    if ss_state not in SS_STATES:
        raise SsParseError(f"unknown state {ss_state!r} in {line!r}")
    try:
        recvq, sendq = int(parts[1]), int(parts[2])
    except ValueError:
        raise SsParseError(f"bad queue columns in {line!r}") from None
    lhost, lport = _split_endpoint(parts[3])
    rhost, rport = _split_endpoint(parts[4])
    laddr, lfam = _addr(lhost)
    raddr, rfam = _addr(rhost)
    family = lfam or rfam or "ipv6"  # a bare `*` on both sides: dual-stack AF_INET6
    wildcard = "0.0.0.0" if family == "ipv4" else "::"
    return SsLine(
        state=SS_STATES[ss_state], ss_state=ss_state, recvq=recvq, sendq=sendq,
        family=family,
        local_address=wildcard if laddr == "*" else laddr, local_port=_port(lport),
        remote_address=wildcard if raddr == "*" else raddr, remote_port=_port(rport),
        extra=" ".join(parts[5:]), raw=line.rstrip("\n"),
    )


def parse(text: str) -> list[SsLine]:
    out = []
    for line in text.splitlines():
        parsed = parse_line(line)
        if parsed is not None:
            out.append(parsed)
    return out


def figures(source: str | Iterable[SsLine], *,
            exclude: Callable[[SsLine], bool] | None = None,
            include: Callable[[SsLine], bool] | None = None) -> SsFigures:
    """Figures over ss text (or already parsed lines), after include/exclude filters."""
    lines = parse(source) if isinstance(source, str) else list(source)
    if include is not None:
        lines = [ln for ln in lines if include(ln)]
    if exclude is not None:
        lines = [ln for ln in lines if not exclude(ln)]
    fig = SsFigures(lines=lines)
    for ln in lines:
        _inc(fig.states, (ln.family, ln.state))
        _inc(fig.local_port_states, (ln.local_port, ln.state))
        # LISTEN's peer is `*`: remote port 0
        _inc(fig.remote_port_states, (ln.remote_port, ln.state))
        if ln.state == "listen":
            fig.listeners.setdefault((ln.local_address, ln.local_port), []).append(
                (ln.recvq, ln.sendq))
            continue
        fig.local_queues[ln.local_port] = fig.local_queues.get(ln.local_port, Queues()).add(
            ln.recvq, ln.sendq)
        fig.remote_queues[ln.remote_port] = fig.remote_queues.get(
            ln.remote_port, Queues()).add(ln.recvq, ln.sendq)
    return fig


def _inc(d: dict, key) -> None:
    d[key] = d.get(key, 0) + 1


# ---- runner ------------------------------------------------------------------------------


def _ns_name(ns) -> str | None:
    return ns if isinstance(ns, str) or ns is None else ns.name


def run_ss(ns, *args: str, timeout: float = 30) -> str:
    """`ip netns exec NS ss ARGS` (or plain `ss` when ns is None); stdout text.
    Default args: -tanOH (all TCP sockets, numeric, one line each, no header)."""
    argv = ["ss", *(args or ("-tanOH",))]
    name = _ns_name(ns)
    if name is not None:
        argv = ["ip", "netns", "exec", name, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> rc {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def ss_figures(ns, *, exclude: Callable[[SsLine], bool] | None = None,
               include: Callable[[SsLine], bool] | None = None) -> SsFigures:
    return figures(run_ss(ns, "-tanOH"), exclude=exclude, include=include)
