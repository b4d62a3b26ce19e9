"""TCP close notifications: sock_diag's destroy multicast groups, read into Batches.

The kernel sends one SOCK_DIAG_BY_FAMILY message per destroyed full TCP socket to every
NETLINK_SOCK_DIAG socket that joined SKNLGRP_INET_TCP_DESTROY (IPv4) or
SKNLGRP_INET6_TCP_DESTROY (IPv6) of its network namespace (net/core/sock_diag.c
sock_diag_broadcast_destroy; include/uapi/linux/sock_diag.h). Joining needs no privilege
(the family is registered with NL_CFG_F_NONROOT_RECV: `nobody` with no capabilities
receives root's sockets). Measured on 6.18: each event is its own 380-byte datagram
(nlmsghdr seq 0, pid 0, flags 0) holding inet_diag_msg (state CLOSE, uid 0, inode 0, the
cookie a dump reported for that socket) + INET_DIAG_PROTOCOL + INET_DIAG_INFO (tcp_info,
280 bytes): the dump's layout, so a Batch and tcpinfo.columns() read it unchanged.
TIME-WAIT and request sockets send none; a LISTEN socket, or one never connected, does.

Receive buffer: each event costs ~1 KiB of it (skb truesize); the default (~208 KiB)
holds ~166. When it is full the kernel drops the event, counts it in the socket's
sk_drops (SO_MEMINFO, SK_MEMINFO_DROPS: the exact number lost) and makes the next recv
fail once with ENOBUFS; while the queue is not drained empty every further event is
dropped too (NETLINK_S_CONGESTED). So the reader asks for a large buffer
(SO_RCVBUFFORCE, which needs CAP_NET_ADMIN; else SO_RCVBUF, which the kernel caps at
net.core.rmem_max) and drains everything queued at each wakeup.

Pure decoding (`decode`, `classify`) is separate from the socket (`CloseEvents`); no
threads here: the connections feature runs the receiver.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import numpy as np

from . import tcpinfo
from .batch import MSG_BYTES, Batch
from .namespace import NamespaceWatch, netns_path, run_in
from .netlink import NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NetlinkError, decode_datagram

__all__ = ["CloseEvents", "Closed", "Received", "GROUPS", "classify", "decode", "frame", "NORMAL",
           "UNREAD_DATA", "FAILED", "NOT_A_CONNECTION", "OUTCOMES"]

GROUPS = {"ipv4": 1, "ipv6": 3}  # SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY
SOL_NETLINK = 270  # include/linux/socket.h
NETLINK_ADD_MEMBERSHIP = 1  # include/uapi/linux/netlink.h
SO_RCVBUFFORCE = 33  # include/uapi/asm-generic/socket.h
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8  # include/uapi/linux/sock_diag.h: index in the u32 array SO_MEMINFO returns
_MEMINFO = 9 * 4  # SK_MEMINFO_VARS u32s
_LITTLE = sys.byteorder == "little"
MAX_DATAGRAM = 64 * 1024  # room kept free for the next recv (an event is 380 bytes)

# Outcomes (the `outcome` label), from the socket's last tcp_info (classify()).
NORMAL, UNREAD_DATA, FAILED = 0, 1, 2
NOT_A_CONNECTION = 255  # a listener, or a socket closed before it ever tried to connect
OUTCOMES = ("normal", "unread_data", "failed")

# tcp_info fields an event is decoded with: the counters the feature follows, and what
# classify() needs (delivered: Linux 4.18+, advmss: every kernel).
FIELDS = ("bytes_acked", "bytes_received", "total_retrans", "delivered", "advmss", "rtt")


@dataclass(frozen=True, slots=True)
class Closed:
    """Closed connections, column-wise (one row per event that was a connection)."""

    cookie: np.ndarray  # uint64: the cookie the dumps reported for the socket
    sport: np.ndarray  # uint16
    dport: np.ndarray  # uint16; 0 when a connect failed inside a blocking connect() (see classify)
    bytes_acked: np.ndarray  # int64, tcpi_bytes_acked at close (ss -ti bytes_acked)
    bytes_received: np.ndarray  # int64, tcpi_bytes_received
    total_retrans: np.ndarray  # int64, tcpi_total_retrans (ss -ti retrans:x/TOTAL)
    outcome: np.ndarray  # uint8: NORMAL, UNREAD_DATA, FAILED
    rtt: np.ndarray  # uint32, tcpi_rtt at close: the smoothed RTT, µs (ss -ti rtt)
    at: np.ndarray  # float64, monotonic seconds when the receiver read the event

    def __len__(self) -> int:
        return len(self.cookie)

    @classmethod
    def empty(cls) -> Closed:
        z = np.zeros(0, np.int64)
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint16), np.zeros(0, np.uint16), z, z, z,
                   np.zeros(0, np.uint8), np.zeros(0, np.uint32), np.zeros(0, np.float64))

    @classmethod
    def concat(cls, parts: Iterable[Closed]) -> Closed:
        parts = list(parts)
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def classify(rqueue: np.ndarray, delivered: np.ndarray, advmss: np.ndarray) -> np.ndarray:
    """The outcome of each closed socket, from its last inet_diag_msg and tcp_info.

    Measured on 6.18 (tests/test_closeevents.py re-checks each case):
    - not a connection: advmss 0. A listener's or an unconnected socket's tcp_info has
      no MSS negotiated (tcp_connect_init and the accepting child set tp->advmss);
    - failed (never established): delivered 0. Every established socket has delivered
      >= 1 (the active side's acked SYN; the passive side counts the SYN-ACK when the
      handshake completes, tcp_rcv_state_process). A refused or timed-out connect has 0;
    - unread_data: Recv-Q > 1 at close (rcv_nxt - copied_seq: the bytes tcp_close threw
      away, sending the RST counted by TcpExtTCPAbortOnClose). A FIN the application
      never read also counts 1 in Recv-Q (every normal close measured showed Recv-Q 1),
      so 1 is read as normal: one unread byte without the peer's FIN is missed;
    - normal: the rest.
    """
    out = np.full(len(rqueue), NORMAL, np.uint8)
    out[rqueue > 1] = UNREAD_DATA
    out[delivered == 0] = FAILED
    out[advmss == 0] = NOT_A_CONNECTION
    return out


def decode(batch: Batch, at: float = 0.0) -> tuple[Closed, int]:
    """The connections closed in `batch` (close notifications read at monotonic time `at`),
    and how many of its messages were skipped: no tcp_info long enough to classify them (a
    kernel older than 4.18), or not a connection (listeners, sockets never connected)."""
    cols, ok = tcpinfo.columns(batch, FIELDS)
    outcome = classify(batch.rqueue, cols["delivered"], cols["advmss"])
    keep = np.flatnonzero(ok & (outcome != NOT_A_CONNECTION))
    closed = Closed(
        batch.cookie[keep], batch.sport[keep], batch.dport[keep],
        cols["bytes_acked"][keep].astype(np.int64), cols["bytes_received"][keep].astype(np.int64),
        cols["total_retrans"][keep].astype(np.int64), outcome[keep], cols["rtt"][keep].astype(np.uint32),
        np.full(len(keep), at, np.float64),
    )
    return closed, int((ok & (outcome == NOT_A_CONNECTION)).sum()) + int((~ok).sum())


def frame(data: bytes, bounds: list[int]) -> tuple[np.ndarray, int]:
    """Header word offsets of the event messages in `data` (datagrams back to back, each
    padded to 4 bytes, ending at `bounds`), and how many datagrams were malformed and left
    out.

    The kernel sends one message per datagram: those are checked all at once (length
    equals the datagram, type SOCK_DIAG_BY_FAMILY, at least an inet_diag_msg); any other
    datagram is walked message by message with the dump's exact decoder (decode_datagram,
    seq 0), and one it rejects is skipped whole."""
    if not bounds:
        return np.zeros(0, np.int64), 0
    ends = np.asarray(bounds, np.int64)
    starts = np.concatenate(([0], ends[:-1]))
    u32 = np.frombuffer(data, np.uint32, len(data) >> 2)
    size = ends - starts
    aligned = (starts & 3) == 0
    first = np.where(aligned, starts >> 2, 0)
    length = u32[first].astype(np.int64)
    kind = u32[first + 1] & 0xFFFF if _LITTLE else u32[first + 1] >> 16
    plain = aligned & (size >= MSG_BYTES) & (((length + 3) & ~3) == size) & (length >= MSG_BYTES) \
        & (kind == SOCK_DIAG_BY_FAMILY)
    if plain.all():
        return first, 0
    words = [first[plain]]
    bad = 0
    for i in np.flatnonzero(~plain).tolist():
        s, e = int(starts[i]), int(ends[i])
        offsets: list[int] = []
        try:
            if s & 3:
                raise NetlinkError("unaligned datagram")
            n = min(e - s, int.from_bytes(data[s:s + 4], sys.byteorder) if e - s >= 4 else 0)
            n = n if n >= 16 and ((n + 3) & ~3) == e - s else e - s  # one message: its own length
            decode_datagram(memoryview(data)[s:s + n], n, 0, offsets, "close events", SOCK_DIAG_BY_FAMILY, s)
        except NetlinkError:
            bad += 1
            continue
        words.append(np.asarray(offsets, np.int64) >> 2)
    return np.sort(np.concatenate(words)), bad



def _new_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)


def _open_socket(netns: str | None) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket of our namespace, or of `netns` (created by a thread that
    entered it: the socket then hears that namespace's sockets only)."""
    return _new_socket() if netns is None else run_in(netns_path(netns), _new_socket)


@dataclass(slots=True)
class Received:
    """What one wakeup read: the events (a Batch over a copy of the datagrams), and the
    losses and malformed datagrams seen meanwhile."""

    batch: Batch
    datagrams: int
    enobufs: int  # recv calls that failed with ENOBUFS (the kernel dropped events)
    malformed: int


class CloseEvents:
    """The close notifications of one network namespace (ours, or `netns`).

    `rcvbuf`: the receive buffer asked for (bytes), by SO_RCVBUFFORCE when `force` and
    permitted. `receive(timeout)` waits at most `timeout` seconds for the first datagram, then reads
    every queued one (non-blocking) into one preallocated buffer of `buffer_bytes` and
    returns them as one Batch; never spins (the first wait blocks in poll(2)). The socket
    is opened on first use, re-opened after an error, and when the namespace path names
    another namespace (checked at most once per `recheck` seconds). Not thread-safe: one
    receiver thread uses it.
    """

    def __init__(
        self,
        families: Iterable[str] = ("ipv4", "ipv6"),
        *,
        netns: str | None = None,
        rcvbuf: int = 8 * 1024 * 1024,
        force: bool = True,
        buffer_bytes: int = 1024 * 1024,
        recheck: float = 1.0,
        open_socket: Callable[[str | None], socket.socket] = _open_socket,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.groups = tuple(GROUPS[f] for f in families)
        self.netns = netns
        self.rcvbuf = rcvbuf
        self.force = force  # try SO_RCVBUFFORCE first
        self.granted = 0  # the receive buffer the kernel gave (getsockopt SO_RCVBUF), bytes
        self.forced = False  # SO_RCVBUFFORCE was permitted
        self._open = open_socket
        self._monotonic = monotonic
        self._recheck = recheck
        self._checked = float("-inf")
        self._ns = NamespaceWatch(netns)
        self._sock: socket.socket | None = None
        self._buf = bytearray(max(buffer_bytes, 2 * MAX_DATAGRAM))
        self._drops_base = 0  # sk_drops of the sockets closed before this one
        self._drops_now = 0

    # -- socket ------------------------------------------------------------------------------

    def open(self) -> None:
        """Open, bind and subscribe (raises OSError); a no-op when open."""
        if self._sock is not None:
            return
        if self.netns is not None:
            self._ns.replaced()  # records the namespace identity the socket is opened in
        sock = self._open(self.netns)
        try:
            sock.bind((0, 0))
            for group in self.groups:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            self.forced = self._grow_buffer(sock)
            self.granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._ns.opened()

    def _grow_buffer(self, sock: socket.socket) -> bool:
        """SO_RCVBUFFORCE (CAP_NET_ADMIN) else SO_RCVBUF, capped by the kernel at
        net.core.rmem_max; either way the kernel doubles the value for its bookkeeping.
        True when forced."""
        if self.force:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
                return True
            except PermissionError:
                pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._drops_base += self._drops_now
            self._drops_now = 0
            self._sock.close()
            self._sock = None
            self._ns.closed()

    def __enter__(self) -> CloseEvents:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def dropped(self) -> int:
        """Events the kernel dropped for our sockets so far (sk_drops via SO_MEMINFO),
        summed over the sockets this object opened."""
        if self._sock is not None:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO)
            if len(raw) > SK_MEMINFO_DROPS * 4:
                self._drops_now = struct.unpack_from("=I", raw, SK_MEMINFO_DROPS * 4)[0]
        return self._drops_base + self._drops_now

    def _check_namespace(self) -> None:
        if self.netns is None:
            return
        now = self._monotonic()
        if now - self._checked < self._recheck:
            return
        self._checked = now
        if self._ns.replaced():  # OSError when the path is gone: the caller's error
            self.close()

    # -- receiving ---------------------------------------------------------------------------

    def receive(self, timeout: float) -> Received | None:
        """The events queued now, or those that arrive within `timeout` seconds; None when
        none came. Raises OSError (the socket is then closed; the next call re-opens it)."""
        try:
            self._check_namespace()
            self.open()
            sock = self._sock
            assert sock is not None
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLERR)
            try:
                if not poller.poll(max(0, int(timeout * 1000))):
                    return None
            except InterruptedError:
                return None
            return self._drain(sock)
        except OSError:
            self.close()
            raise

    def _drain(self, sock: socket.socket) -> Received | None:
        buf = self._buf
        view = memoryview(buf)
        size = len(buf)
        pos = 0
        bounds: list[int] = []
        enobufs = malformed = 0
        while size - pos >= MAX_DATAGRAM:
            try:
                n = sock.recv_into(view[pos:], 0, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                enobufs += 1  # reported once per overrun; the queue is still readable
                continue
            if n > size - pos or n == 0:
                malformed += 1  # truncated (cannot happen for 380-byte events) or empty
                continue
            pos += n
            pos += -pos & 3  # keep every datagram 4-aligned in the buffer
            bounds.append(pos)
        if not bounds and not enobufs and not malformed:
            return None
        data = bytes(view[:pos])  # a copy: the buffer is reused by the next wakeup
        words, bad = frame(data, bounds)
        return Received(Batch(data, words), len(bounds), enobufs, malformed + bad)

