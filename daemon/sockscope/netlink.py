"""TCP socket table over NETLINK_SOCK_DIAG: the only module that talks to the kernel.

Requests are `inet_diag_req_v2` dumps, one per address family, all states, no
extensions. Replies are decoded here with `struct` (pyroute2's generic decoder costs
30-100 µs per socket; this one about 1 µs). pyroute2 is used only to open the netlink
socket inside another network namespace.

Structures mirrored (include/uapi/linux/netlink.h, include/uapi/linux/inet_diag.h,
include/uapi/linux/sock_diag.h):

    struct nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }          16 B
    struct inet_diag_sockid { be16 sport, dport; be32 src[4], dst[4]; u32 if;
                              u32 cookie[2]; }                                   48 B
    struct inet_diag_req_v2 { u8 family, protocol, ext, pad; u32 states;
                              struct inet_diag_sockid id; }                      56 B
    struct inet_diag_msg { u8 family, state, timer, retrans;
                           struct inet_diag_sockid id;
                           u32 expires, rqueue, wqueue, uid, inode; }            72 B
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4  # == NETLINK_INET_DIAG
SOCK_DIAG_BY_FAMILY = 20
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x100 | 0x200  # NLM_F_ROOT | NLM_F_MATCH
ALL_STATES = 0xFFF  # 1 << state for every TCP state incl. NEW_SYN_RECV (12)

FAMILY_NUMBERS = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
FAMILY_NAMES = {v: k for k, v in FAMILY_NUMBERS.items()}

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=IHHII" "BBBxI" "48x")  # nlmsghdr + inet_diag_req_v2, zero sockid
# nlmsghdr + inet_diag_msg, skipping timer, retrans, if, cookie and expires.
# Ports are big-endian on the wire and unpacked natively here, then swapped below.
_MSG = struct.Struct("=IHHII" "BBxx" "HH16s16s" "16x" "IIII")
_ERR = struct.Struct("=i")
_MSG_MIN = _MSG.size  # 88: a SOCK_DIAG_BY_FAMILY message can be no shorter
_SWAP_PORTS = sys.byteorder == "little"

RECV_BUFFER = 256 * 1024  # the kernel sends at most ~32 KiB per dump datagram


class Record(NamedTuple):
    """One socket as the kernel reports it. The decoder yields plain tuples in this order."""

    family: int  # socket.AF_INET / AF_INET6
    state: int  # kernel TCP state number (include/net/tcp_states.h); 12 = NEW_SYN_RECV
    sport: int
    dport: int
    src: bytes  # 16 bytes; IPv4 uses the first 4
    dst: bytes
    rqueue: int  # `ss` Recv-Q: unread bytes, or accept-queue length for LISTEN
    wqueue: int  # `ss` Send-Q: unacked bytes, or backlog limit for LISTEN
    uid: int
    inode: int  # 0 for TIME-WAIT and connections still in an accept queue


def format_address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)


class NetlinkError(Exception):
    """A dump that could not be completed; the message says which family and why."""

    def __init__(self, message: str, *, errno_: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.errno = errno_
        self.retryable = retryable


def build_request(family: int, seq: int, states: int = ALL_STATES) -> bytes:
    return _REQ.pack(
        _REQ.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0,
        family, socket.IPPROTO_TCP, 0, states,
    )


@dataclass(slots=True)
class DatagramResult:
    """What one datagram held besides the records: the end of the dump, interruption."""

    done: bool = False
    interrupted: bool = False


def decode_datagram(
    buf, nbytes: int, seq: int, out: list, family_name: str = "?"
) -> DatagramResult:
    """Decode one netlink datagram of a sock_diag dump, appending record tuples to `out`.

    Messages of another sequence number (left over from an aborted dump) are skipped.
    Raises NetlinkError on NLMSG_ERROR, an error in the NLMSG_DONE payload, or a
    truncated/garbled message: the offset always advances, so a bad buffer can never
    loop forever.
    """
    result = DatagramResult()
    unpack_hdr = _NLMSGHDR.unpack_from
    unpack_msg = _MSG.unpack_from
    append = out.append
    swap = _SWAP_PORTS
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
            if mtype == SOCK_DIAG_BY_FAMILY:
                if length < _MSG_MIN:
                    raise NetlinkError(
                        f"netlink dump {family_name}: truncated inet_diag_msg at offset "
                        f"{off}: {length} bytes, need {_MSG_MIN}"
                    )
                (_, _, _, _, _, fam, state, sp, dp, src, dst, rq, wq, uid, ino) = unpack_msg(
                    buf, off
                )
                if swap:
                    sp = ((sp & 0xFF) << 8) | (sp >> 8)
                    dp = ((dp & 0xFF) << 8) | (dp >> 8)
                append((fam, state, sp, dp, src, dst, rq, wq, uid, ino))
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


def _open_socket(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    # pyroute2 forks a child that enters the namespace, creates the socket there and
    # passes the fd back; our own namespace never changes. flags=0: never create a
    # namespace that does not exist (the default O_CREAT would).
    from pyroute2.netns import create_socket

    return create_socket(
        netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG, flags=0
    )


def netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join("/run/netns", netns)


@dataclass(frozen=True, slots=True)
class DumpStats:
    families: tuple[str, ...]  # families actually read (IPv6 dropped when unavailable)
    messages: int
    retries: int  # dumps restarted (NLM_F_DUMP_INTR or a retryable error)
    interrupted: int  # dumps accepted with NLM_F_DUMP_INTR after the last retry


class Reader:
    """Dumps the TCP table of one network namespace. Not thread-safe: one per poller.

    The netlink socket is kept open across polls (in another namespace opening one forks
    a helper process) and re-opened after any error. When watching a namespace by path,
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
        open_socket: Callable[[str | None], socket.socket] = _open_socket,
    ):
        self.families = tuple(families)
        self.netns = netns
        self.timeout = timeout
        self.dump_retries = dump_retries
        self._open_socket = open_socket
        self._sock: socket.socket | None = None
        self._ns_id: tuple[int, int] | None = None
        self._seq = itertools.count(int.from_bytes(os.urandom(2), "little") + 1)
        self._buf = bytearray(RECV_BUFFER)
        self._unavailable: set[str] = set()  # families the kernel said it cannot dump

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._ns_id = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self.netns is not None:
            path = netns_path(self.netns)
            try:
                st = os.stat(path)
            except OSError as e:
                self.close()
                raise NetlinkError(f"network namespace {self.netns!r} ({path}): {e.strerror}") from e
            ns_id = (st.st_dev, st.st_ino)
            if self._sock is not None and ns_id != self._ns_id:
                log.info("network namespace %s was replaced; reopening", self.netns)
                self.close()
        else:
            ns_id = None
        if self._sock is None:
            try:
                sock = self._open_socket(self.netns)
            except OSError as e:
                where = f" in network namespace {self.netns!r}" if self.netns else ""
                raise NetlinkError(f"cannot open sock_diag socket{where}: {e}") from e
            sock.settimeout(self.timeout)
            self._sock, self._ns_id = sock, ns_id
        return self._sock

    def dump(self, family: str, sink: Callable[[list], None], states: int = ALL_STATES) -> tuple[int, bool]:
        """One dump of `family`; calls sink(list of record tuples) per datagram.

        Returns (messages, interrupted). Raises NetlinkError; on any error the socket is
        closed so leftovers of the broken dump can never be read by the next one.
        """
        fam = FAMILY_NUMBERS[family]
        seq = next(self._seq) & 0xFFFFFFFF
        sock = self._socket()
        buf = self._buf
        view = memoryview(buf)
        messages = 0
        interrupted = False
        try:
            sock.send(build_request(fam, seq, states))
            while True:
                try:
                    n = sock.recv_into(buf, 0, socket.MSG_TRUNC)
                except InterruptedError:
                    continue
                if n > len(buf):
                    raise NetlinkError(
                        f"netlink dump {family}: datagram of {n} bytes exceeds the "
                        f"{len(buf)}-byte buffer"
                    )
                if n == 0:
                    raise NetlinkError(f"netlink dump {family}: empty datagram before NLMSG_DONE")
                records: list = []
                res = decode_datagram(view, n, seq, records, family)
                if records:
                    messages += len(records)
                    sink(records)
                interrupted |= res.interrupted
                if res.done:
                    return messages, interrupted
        except NetlinkError:
            self.close()
            raise
        except socket.timeout as e:
            self.close()
            raise NetlinkError(
                f"netlink dump {family}: no answer from the kernel within {self.timeout:g} s"
            ) from e
        except OSError as e:
            self.close()
            raise NetlinkError(
                f"netlink dump {family} failed: {e.strerror or e}",
                errno_=e.errno,
                retryable=e.errno == errno.ENOBUFS,
            ) from e

    def poll(self, start: Callable[[], Callable[[list], None]]) -> DumpStats:
        """Dump every configured family into one sink, retrying interrupted dumps.

        `start()` returns a fresh sink for an attempt; when a dump comes back with
        NLM_F_DUMP_INTR (the table changed while it was walked) or a retryable error
        (ENOBUFS), the whole attempt is thrown away and started again, at most
        `dump_retries` times; an interrupted last attempt is accepted and counted.
        """
        retries = 0
        while True:
            sink = start()
            messages = 0
            interrupted = False
            families = []
            try:
                for family in self.families:
                    if family in self._unavailable:
                        continue
                    try:
                        n, intr = self.dump(family, sink)
                    except NetlinkError as e:
                        if family == "ipv6" and e.errno in (errno.ENOENT, errno.EAFNOSUPPORT):
                            log.warning("IPv6 sockets cannot be dumped (%s); reading IPv4 only", e)
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

    def records(self, states: int = ALL_STATES) -> Iterator[Record]:
        """Every socket in the given states as Record, for one-shot use (CLI), not polling."""
        out: list = []
        for family in self.families:
            if family in self._unavailable:
                continue
            self.dump(family, out.extend, states)
        return map(Record._make, out)
