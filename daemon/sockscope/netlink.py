"""Socket tables over NETLINK_SOCK_DIAG: the only module that talks to the kernel.

A TCP poll is one legacy TCPDIAG_GETSOCK dump when both families are wanted: the kernel
answers it with the sockets of both families from ONE walk of its hash tables (every
walk visits every socket of the host, whatever its namespace, ~0.1 us each; collectd's
tcpconns sends the same request). If the kernel refuses it, or only one family is
wanted, or the protocol is not TCP, it is one `inet_diag_req_v2` dump per family.
Extensions (tcp_info, memory info) are asked for only when a feature needs them.

Replies are read into one reused buffer, several ~32 KiB datagrams back to back, and
handed on a batch at a time as batch.Batch (message offsets found by a
vectorised header scan and verified as an exact chain, fields gathered column-wise):
~0.1 us per socket against ~1 us for struct.unpack_from per message and 30-100 us for
pyroute2's generic decoder (docs/performance.md). Anything unusual in a batch (an error,
NLMSG_DONE, a message of another dump, NLM_F_DUMP_INTR, a garbled length) sends that
batch through the exact per-message decoder, decode_datagram(), which defines the
semantics and yields the same Batch. In another network namespace the socket is created by a thread that entered
it (namespace.run_in).

Structures mirrored (include/uapi/linux/netlink.h, include/uapi/linux/inet_diag.h,
include/uapi/linux/sock_diag.h):

    struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }          16 B
    struct inet_diag_sockid { be16 sport, dport; be32 src[4], dst[4]; u32 if;
                              u32 cookie[2]; }                                   48 B
    struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states;
                              struct inet_diag_sockid id; }                      56 B
    struct inet_diag_req { u8 family, src_len, dst_len, ext;      (legacy, type 18)
                           struct inet_diag_sockid id; u32 states, dbs; }        60 B
    struct inet_diag_msg { u8 family, state, timer, retrans;
                           struct inet_diag_sockid id;
                           u32 expires, rqueue, wqueue, uid, inode; }            72 B

Replies to a legacy request carry its type (TCPDIAG_GETSOCK, 18) instead of
SOCK_DIAG_BY_FAMILY (20); the payload is the same inet_diag_msg
(net/ipv4/inet_diag.c: inet_diag_dump_compat sets family AF_UNSPEC, protocol TCP).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .batch import MSG_BYTES, Batch
from .namespace import NamespaceWatch, netns_path, run_in

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4  # == NETLINK_INET_DIAG
SOCK_DIAG_BY_FAMILY = 20
TCPDIAG_GETSOCK = 18  # legacy request: both families in one walk
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x100 | 0x200  # NLM_F_ROOT | NLM_F_MATCH
ALL_STATES = 0xFFF  # 1 << state for every TCP state incl. NEW_SYN_RECV (12)

FAMILY_NUMBERS = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=IHHII" "BBBxI" "48x")  # nlmsghdr + inet_diag_req_v2, zero sockid
_LEGACY_REQ = struct.Struct("=IHHII" "BBBB" "48x" "II")  # nlmsghdr + inet_diag_req
_ERR = struct.Struct("=i")
_MSG_MIN = MSG_BYTES  # 88: a SOCK_DIAG_BY_FAMILY message can be no shorter
_LITTLE = sys.byteorder == "little"
_PEEK = struct.Struct("=IHHI")  # nlmsghdr len, type, flags, seq
_DONE_TAIL = struct.Struct("=IH")  # a datagram ending in NLMSG_DONE: (20, 3) 20 bytes before its end
# Errors with which a kernel refuses TCPDIAG_GETSOCK: fall back to per-family dumps.
_LEGACY_REFUSED = (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT)

# The kernel sends at most ~32 KiB per dump datagram (netlink_dump caps its skb at
# 32 KiB whatever the receive buffer). Datagrams are received back to back into one
# buffer of RECV_BUFFER bytes and decoded as a batch when less than RECV_ROOM is left.
# 2 MiB: the folds' numpy calls cost per batch, and messages with tcp_info are 408 bytes;
# on recorded 100k dumps 2 MiB batches cost 10-25 % less than 1 MiB ones (docs/performance.md).
RECV_BUFFER = 2 * 1024 * 1024
RECV_ROOM = 64 * 1024


class _Holder:
    __slots__ = ("buf",)
    buf: bytearray


def _free_refs() -> int:
    """sys.getrefcount of a receive buffer that no Batch holds, as Reader._dump sees it: an
    attribute of its owner, a local, the memoryview received through, the call's argument.
    Batches wrap the buffer without a copy, each through a memoryview of its own, which
    counts once as long as anything (a Batch, a numpy view of its bytes) refers to it."""
    holder = _Holder()
    holder.buf = bytearray(8)
    buf = holder.buf
    view = memoryview(buf)
    n = sys.getrefcount(buf)
    view.release()
    return n


_FREE_REFS = _free_refs()
LEGACY = "ipv4+ipv6"  # the label of a legacy dump in errors


class NetlinkError(Exception):
    """A dump that could not be completed; the message says which family and why."""

    def __init__(self, message: str, *, errno_: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.errno = errno_
        self.retryable = retryable


def build_request(family: int, seq: int, states: int = ALL_STATES, ext: int = 0,
                  protocol: int = socket.IPPROTO_TCP) -> bytes:
    """inet_diag_req_v2 dump request; `ext` is the bit mask of extensions asked for
    (1 << (INET_DIAG_x - 1), e.g. INET_DIAG_INFO), 0 for none."""
    return _REQ.pack(
        _REQ.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0,
        family, protocol, ext, states,
    )


def build_legacy_request(seq: int, states: int = ALL_STATES, ext: int = 0) -> bytes:
    """TCPDIAG_GETSOCK dump request: TCP sockets of every family in one hash walk."""
    return _LEGACY_REQ.pack(
        _LEGACY_REQ.size, TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0,
        socket.AF_UNSPEC, 0, 0, ext, states, 0,
    )


def scan_batch(data: bytes | memoryview, bounds: list[int], seq: int, msg_type: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Header word offsets and lengths (nlmsg_len) of every message in `data`, or None if
    the batch is not plain.

    Plain: datagrams (ending at `bounds`) holding only socket messages of type `msg_type`,
    sequence `seq`, flags NLM_F_MULTI, each at least an inet_diag_msg long. Candidates
    are the 4-aligned positions whose type/flags and seq words match; they are accepted
    only if they chain exactly (each next header at the previous one + NLMSG_ALIGN(len),
    the first at 0, the last ending at the end) and every datagram starts on one of them.
    So a payload word that merely looks like a header, a message of another dump, an
    error, DUMP_INTR or a bad length all give None, never wrong offsets: the caller then
    decodes the batch with decode_datagram().
    """
    n = len(data)
    if n < _MSG_MIN or n & 3:
        return None
    w = np.frombuffer(data, np.uint32)
    typeflags = msg_type | (NLM_F_MULTI << 16) if _LITTLE else (msg_type << 16) | NLM_F_MULTI
    # One full pass (type/flags), then seq only at those few positions: ~3x cheaper than
    # comparing both words everywhere, same candidates.
    cand = np.flatnonzero(w[1:-2] == typeflags)
    cand = cand[w[2:].take(cand) == seq]
    if not len(cand) or cand[0] != 0:
        return None
    lens = w.take(cand)
    if int(lens.min()) < _MSG_MIN:
        return None
    nxt = cand + ((lens.astype(np.int64) + 3) >> 2)
    if nxt[-1] != n >> 2 or not np.array_equal(nxt[:-1], cand[1:]):
        return None
    if len(bounds) > 1:
        starts = np.asarray(bounds[:-1], np.int64) >> 2
        at = np.searchsorted(cand, starts)
        if (at >= len(cand)).any() or not np.array_equal(cand[np.minimum(at, len(cand) - 1)], starts):
            return None
    return cand, lens


@dataclass(slots=True)
class DatagramResult:
    """What one datagram held besides the records: the end of the dump, interruption."""

    done: bool = False
    interrupted: bool = False


def decode_datagram(
    buf, nbytes: int, seq: int, out: list[int], family_name: str = "?",
    msg_type: int = SOCK_DIAG_BY_FAMILY, base: int = 0,
) -> DatagramResult:
    """Check one netlink datagram of a sock_diag dump message by message, appending the
    byte offset (+ `base`) of every socket message to `out` (a Batch reads them).

    `msg_type` is the type socket messages carry (the request's: SOCK_DIAG_BY_FAMILY, or
    TCPDIAG_GETSOCK for a legacy dump).

    Messages of another sequence number (left over from an aborted dump) are skipped.
    Raises NetlinkError on NLMSG_ERROR, an error in the NLMSG_DONE payload, or a
    truncated/garbled message: the offset always advances, so a bad buffer can never
    loop forever.
    """
    result = DatagramResult()
    unpack_hdr = _NLMSGHDR.unpack_from
    append = out.append
    off = 0
    while off < nbytes:
        if nbytes - off < 16:
            raise NetlinkError(
                f"netlink dump {family_name}: {nbytes - off} trailing bytes at offset {off}, "
                "shorter than a message header"
            )
        length, mtype, flags, mseq, _pid = unpack_hdr(buf, off)
        if length < 16 or off + length > nbytes:
            raise NetlinkError(
                f"netlink dump {family_name}: garbled message at offset {off}: "
                f"length {length}, datagram {nbytes} bytes"
            )
        if mseq == seq:
            if flags & NLM_F_DUMP_INTR:
                result.interrupted = True
            if mtype == msg_type:
                if length < _MSG_MIN:
                    raise NetlinkError(
                        f"netlink dump {family_name}: truncated inet_diag_msg at offset "
                        f"{off}: {length} bytes, need {_MSG_MIN}"
                    )
                append(base + off)
            elif mtype == NLMSG_DONE:
                # The payload is an int: 0, or a negative errno when the dump failed.
                if length >= 20:
                    (err,) = _ERR.unpack_from(buf, off + 16)
                    if err < 0:
                        raise _errno_error(family_name, -err, "in NLMSG_DONE")
                result.done = True
                return result
            elif mtype == NLMSG_ERROR:
                if length < 20:
                    raise NetlinkError(
                        f"netlink dump {family_name}: truncated NLMSG_ERROR at offset {off}"
                    )
                (err,) = _ERR.unpack_from(buf, off + 16)
                if err == 0:  # an ACK: not expected for a dump, harmless
                    pass
                else:
                    raise _errno_error(family_name, -err, "NLMSG_ERROR")
            elif mtype == NLMSG_OVERRUN:
                raise NetlinkError(
                    f"netlink dump {family_name}: NLMSG_OVERRUN, data lost", retryable=True
                )
            elif mtype != NLMSG_NOOP:
                raise NetlinkError(
                    f"netlink dump {family_name}: unexpected message type {mtype} at offset {off}"
                )
        # NLMSG_ALIGN(len): messages are padded to 4 bytes.
        off += (length + 3) & ~3
    return result


def _errno_error(family_name: str, code: int, where: str) -> NetlinkError:
    return NetlinkError(
        f"netlink dump {family_name} failed ({where}): {os.strerror(code)} "
        f"[{errno.errorcode.get(code, code)}]",
        errno_=code,
    )


def _new_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)


def _open_socket(netns: str | None) -> socket.socket:
    if netns is None:
        return _new_socket()
    # Created by a thread that entered the namespace (never created: a missing path is
    # an error); the socket keeps reading that namespace from any thread.
    return run_in(netns_path(netns), _new_socket)


def ipv6_in_kernel() -> bool:
    """False when the kernel was booted with ipv6.disable=1 (no IPv6 stack at all; the
    sysctl disable_ipv6 leaves the stack, and sockets, in place)."""
    return os.path.isdir("/proc/sys/net/ipv6")


@dataclass(frozen=True, slots=True)
class DumpStats:
    families: tuple[str, ...]  # families actually read (IPv6 dropped when unavailable)
    messages: int
    retries: int  # dumps restarted (NLM_F_DUMP_INTR or a retryable error)
    interrupted: int  # dumps accepted with NLM_F_DUMP_INTR after the last retry


class Reader:
    """Dumps the sockets of one protocol (TCP by default, or UDP) of one network
    namespace, with the extensions `ext` asks for. Not thread-safe: one per poller.

    The netlink socket is kept open across polls (in another namespace it is created by a
    short-lived thread that entered it) and re-opened after any error. When watching a namespace by path,
    the path is re-checked every poll: our open socket would otherwise keep a deleted
    namespace alive and report its frozen table forever.
    """

    def __init__(
        self,
        families: Iterable[str] = ("ipv4", "ipv6"),
        *,
        netns: str | None = None,
        timeout: float = 30.0,
        dump_retries: int = 3,
        legacy: bool = True,
        protocol: int = socket.IPPROTO_TCP,
        ext: int = 0,
        states: int = ALL_STATES,
        open_socket: Callable[[str | None], socket.socket] = _open_socket,
    ):
        self.families = tuple(families)
        self.protocol = protocol
        self.label = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(protocol, str(protocol))
        self.ext = ext  # 1 << (INET_DIAG_x - 1) for each extension asked for
        self.states = states
        # One TCPDIAG_GETSOCK dump for both families while the kernel accepts it.
        self.legacy = legacy
        self._legacy_refused = False
        self.netns = netns
        self.timeout = timeout
        self.dump_retries = dump_retries
        self._open_socket = open_socket
        self._sock: socket.socket | None = None
        self._ns = NamespaceWatch(netns)
        self._seq = itertools.count(int.from_bytes(os.urandom(2), "little") + 1)
        self._buf = bytearray(RECV_BUFFER)
        self.buffers = 1  # receive buffers allocated: one more each time a sink kept a batch
        self._unavailable: set[str] = set()  # families the kernel said it cannot dump
        if "ipv6" in self.families and not ipv6_in_kernel():
            # A legacy dump would just return no IPv6 sockets: say so, drop the series.
            log.warning("IPv6 is disabled in this kernel; reading IPv4 only")
            self._unavailable.add("ipv6")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._ns.closed()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self.netns is not None:
            try:
                replaced = self._ns.replaced()
            except OSError as e:
                self.close()
                raise NetlinkError(
                    f"network namespace {self.netns!r} ({self._ns.path}): {e.strerror}"
                ) from e
            if replaced:
                log.info("network namespace %s was replaced; reopening", self.netns)
                self.close()
        if self._sock is None:
            try:
                sock = self._open_socket(self.netns)
            except OSError as e:
                where = f" in network namespace {self.netns!r}" if self.netns else ""
                raise NetlinkError(f"cannot open sock_diag socket{where}: {e}") from e
            sock.settimeout(self.timeout)
            self._sock = sock
            self._ns.opened()
        return self._sock

    def dump(self, family: str, sink: Callable, states: int = ALL_STATES) -> tuple[int, bool]:
        """One inet_diag_req_v2 dump of `family`; see _dump()."""
        seq = next(self._seq) & 0xFFFFFFFF
        request = build_request(FAMILY_NUMBERS[family], seq, states, self.ext, self.protocol)
        return self._dump(request, seq, SOCK_DIAG_BY_FAMILY, f"{self.label} {family}", sink)

    def dump_legacy(self, sink: Callable, states: int = ALL_STATES) -> tuple[int, bool]:
        """One TCPDIAG_GETSOCK dump: both families, one walk of the kernel's tables."""
        seq = next(self._seq) & 0xFFFFFFFF
        return self._dump(build_legacy_request(seq, states, self.ext), seq, TCPDIAG_GETSOCK, LEGACY, sink)

    def _dump(
        self, request: bytes, seq: int, msg_type: int, label: str, sink: Callable
    ) -> tuple[int, bool]:
        """Send `request` and read its dump; calls sink(batch) per Batch of datagrams
        (found by scan_batch, or checked message by message by decode_datagram).
        Returns (messages, interrupted). Raises NetlinkError; on any error the socket is
        closed so leftovers of the broken dump can never be read by the next one.
        """
        sock = self._socket()
        buf = self._buf
        view = memoryview(buf)
        size = len(buf)
        # Batches wrap this buffer, not a copy of it: one still referenced after its sink
        # returned (a Batch or a view of its bytes kept) keeps the buffer, and the dump
        # goes on in a new one (_free_refs).
        if sys.getrefcount(buf) != _FREE_REFS:
            buf, view = self._new_buffer(view)
        pos = 0  # bytes of plain datagrams held in buf, decoded together when it fills
        bounds: list[int] = []  # where each held datagram ends
        messages = 0
        interrupted = False
        try:
            sock.send(request)
            while True:
                try:
                    n = sock.recv_into(view[pos:], 0, socket.MSG_TRUNC)
                except InterruptedError:
                    continue
                if n > size - pos:
                    raise NetlinkError(
                        f"netlink dump {label}: datagram of {n} bytes exceeds the "
                        f"{size - pos}-byte buffer"
                    )
                if n == 0:
                    raise NetlinkError(f"netlink dump {label}: empty datagram before NLMSG_DONE")
                _, mtype, _, mseq = _PEEK.unpack_from(buf, pos)
                if (
                    n >= _MSG_MIN and not n & 3 and mtype == msg_type and mseq == seq
                    and _DONE_TAIL.unpack_from(buf, pos + n - 20) != (20, NLMSG_DONE)
                ):
                    # Socket messages only (NLMSG_DONE, if any, is always the last message
                    # of its datagram): hold it and receive the next one behind it.
                    pos += n
                    bounds.append(pos)
                    if size - pos >= RECV_ROOM:
                        continue
                    n = 0
                if pos:
                    m, intr, done = self._decode_batch(buf, bounds, seq, msg_type, label, sink)
                    messages += m
                    interrupted |= intr
                    if done:
                        return messages, interrupted
                if n:
                    # Anything else (NLMSG_DONE, an error, another dump's leftovers, a bad
                    # length) goes through the exact decoder on its own.
                    offsets: list[int] = []
                    res = decode_datagram(view[pos:pos + n], n, seq, offsets, label, msg_type)
                    if offsets:
                        messages += len(offsets)
                        sink(_exact_batch(view[pos:pos + n], offsets))
                    interrupted |= res.interrupted
                    if res.done:
                        return messages, interrupted
                if sys.getrefcount(buf) != _FREE_REFS:  # a batch of it is kept: see above
                    buf, view = self._new_buffer(view)
                pos = 0
                bounds = []
        except NetlinkError:
            self.close()
            raise
        except socket.timeout as e:
            self.close()
            raise NetlinkError(
                f"netlink dump {label}: no answer from the kernel within {self.timeout:g} s"
            ) from e
        except OSError as e:
            self.close()
            raise NetlinkError(
                f"netlink dump {label} failed: {e.strerror or e}",
                errno_=e.errno,
                retryable=e.errno == errno.ENOBUFS,
            ) from e

    def _new_buffer(self, view: memoryview) -> tuple[bytearray, memoryview]:
        """Leave the current buffer to whoever kept a batch of it; receive into a new one."""
        view.release()
        self._buf = bytearray(len(self._buf))
        self.buffers += 1
        return self._buf, memoryview(self._buf)

    @staticmethod
    def _decode_batch(
        buf: bytearray, bounds: list[int], seq: int, msg_type: int, label: str, sink: Callable
    ) -> tuple[int, bool, bool]:
        """Decode the datagrams held in buf[:bounds[-1]]: (messages, interrupted, done).
        The batch is a view of `buf` through a memoryview of its own, so the caller can
        tell from buf's reference count whether anything kept it."""
        data = view = memoryview(buf)[:bounds[-1]]
        found = scan_batch(data, bounds, seq, msg_type)
        if found is not None:
            words, sizes = found
            sink(Batch(data, words, sizes))
            return len(words), False, False
        offsets: list[int] = []
        interrupted = done = False
        start = 0
        for end in bounds:
            res = decode_datagram(view[start:end], end - start, seq, offsets, label, msg_type, start)
            interrupted |= res.interrupted
            start = end
            if res.done:
                done = True
                break
        if offsets:
            sink(Batch(data, np.array(offsets, np.int64) >> 2))
        return len(offsets), interrupted, done

    def _use_legacy(self) -> bool:
        return (
            self.legacy and self.protocol == socket.IPPROTO_TCP and not self._legacy_refused
            and not self._unavailable and set(self.families) == {"ipv4", "ipv6"}
        )

    def poll(self, start: Callable[[], Callable], states: int | None = None) -> DumpStats:
        """Dump every configured family into one sink, retrying interrupted dumps.

        `states` is a kernel state bit mask (1 << state): the kernel sends only those
        sockets (the CLI's `snapshot --state`); by default the reader's `states`.

        `start()` returns a fresh sink for an attempt; when a dump comes back with
        NLM_F_DUMP_INTR (the table changed under the walk) or a retryable error
        (ENOBUFS), the whole attempt is thrown away and started again, at most
        `dump_retries` times; an interrupted last attempt is accepted and counted.
        A kernel that refuses the legacy request (EINVAL, ENOENT, EOPNOTSUPP) is asked
        per family from then on, starting with a fresh attempt.
        """
        states = self.states if states is None else states
        retries = 0
        while True:
            sink = start()
            messages = 0
            interrupted = False
            families = []
            try:
                if self._use_legacy():
                    try:
                        messages, interrupted = self.dump_legacy(sink, states)
                    except NetlinkError as e:
                        if e.errno not in _LEGACY_REFUSED:
                            raise
                        log.warning(
                            "the kernel refused a TCPDIAG_GETSOCK dump (%s); dumping each "
                            "family on its own from now on", e,
                        )
                        self._legacy_refused = True
                        continue
                    families = list(self.families)
                else:
                    for family in self.families:
                        if family in self._unavailable:
                            continue
                        try:
                            n, intr = self.dump(family, sink, states)
                        except NetlinkError as e:
                            if family == "ipv6" and e.errno in (errno.ENOENT, errno.EAFNOSUPPORT):
                                log.warning(
                                    "IPv6 sockets cannot be dumped (%s); reading IPv4 only", e
                                )
                                self._unavailable.add(family)
                                continue
                            raise
                        families.append(family)
                        messages += n
                        interrupted |= intr
            except NetlinkError as e:
                if e.retryable and retries < self.dump_retries:
                    retries += 1
                    log.debug("retrying dump: %s", e)
                    continue
                raise
            if interrupted and retries < self.dump_retries:
                retries += 1
                continue
            return DumpStats(tuple(families), messages, retries, int(interrupted))


def _exact_batch(datagram: memoryview, offsets: list[int]) -> Batch:
    """The socket messages decode_datagram accepted in one datagram, as a Batch."""
    return Batch(bytes(datagram), np.array(offsets, np.int64) >> 2)
