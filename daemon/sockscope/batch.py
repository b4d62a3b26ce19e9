"""The one record type: the sockets of a run of sock_diag messages, read column-wise.

A Batch holds raw netlink messages (bytes) and the offsets of the socket messages among
them; every column is gathered from the bytes with numpy on first use and cached, so the
folds of several features share one gather. Both decoders produce Batches: the fast
header scan (netlink.scan_batch) and the exact per-message decoder (netlink.decode_datagram,
which defines what a valid message is) only differ in how they find the offsets.

Message layout (include/uapi/linux/netlink.h, include/uapi/linux/inet_diag.h), in bytes
from the start of the nlmsghdr:

     0 struct nlmsghdr { u32 len; u16 type, flags; u32 seq, pid; }
    16 struct inet_diag_msg { u8 family, state, timer, retrans;
    20   struct inet_diag_sockid { be16 sport, dport;
    24                             be32 src[4]; 40 be32 dst[4];
    56                             u32 if; 60 u32 cookie[2]; }
    68   u32 expires; 72 rqueue; 76 wqueue; 80 uid; 84 inode; }
    88 attributes: struct nlattr { u16 len, type; } + payload, each padded to 4 bytes

The cookie is cookie[0] | cookie[1] << 32, host order (net/core/sock_diag.c
sock_diag_save_cookie): the same value a later dump, and the close notification, report
for the same socket.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["Attribute", "Batch", "Record", "MSG_BYTES", "encode_message"]

MSG_BYTES = 88  # nlmsghdr + inet_diag_msg: the shortest socket message, no attributes
_LITTLE = sys.byteorder == "little"
_SWAP = _LITTLE  # ports are big-endian on the wire
_NLA_TYPE_MASK = 0x3FFF  # include/uapi/linux/netlink.h: ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
_MAX_ATTRIBUTES = 32  # attributes walked per message at most (the kernel sends ~12)
_LAYOUTS = 4  # layouts learned per batch before the rest is walked message by message


class Record(NamedTuple):
    """One socket as the kernel reports it; iterating a Batch yields tuples in this order."""

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


@dataclass(frozen=True, slots=True)
class Attribute:
    """Where one netlink attribute type sits in each message of a Batch: the payload's
    byte offset in Batch.data and its length; -1 / 0 in messages without it."""

    offset: np.ndarray  # int64
    length: np.ndarray  # int64

    @property
    def present(self) -> np.ndarray:
        return self.offset >= 0


class Batch:
    """Socket messages of one dump, column-wise. `data` holds whole netlink messages back
    to back (other messages may sit between them); `words` are the socket messages'
    header offsets in 32-bit words (all are 4-aligned); `sizes` their nlmsg_len, if the
    decoder has them. A dump's batches wrap the reader's receive buffer (a memoryview), not
    a copy: a fold that keeps one is safe (the reader then receives into a new buffer),
    but copying out what it needs is cheaper."""

    __slots__ = ("data", "words", "_u8", "_u16", "_u32", "_cache")

    def __init__(self, data: bytes | memoryview, words: np.ndarray, sizes: np.ndarray | None = None) -> None:
        self.data = data
        self.words = np.asarray(words, np.int64)
        self._u8 = np.frombuffer(data, np.uint8)
        self._u16 = np.frombuffer(data, np.uint16, len(data) >> 1)
        self._u32 = np.frombuffer(data, np.uint32, len(data) >> 2)
        self._cache: dict = {}
        if sizes is not None:  # nlmsg_len of each message, when the decoder has read them
            self._cache["sizes"] = sizes

    def __len__(self) -> int:
        return len(self.words)

    def take(self, rows: np.ndarray) -> Batch:
        """The batch of the messages at `rows` (indices or a boolean mask)."""
        sizes = self._cache.get("sizes")
        return Batch(self.data, self.words[rows], None if sizes is None else sizes[rows])

    # -- columns ----------------------------------------------------------------------------

    def _column(self, name: str, make) -> np.ndarray:
        col = self._cache.get(name)
        if col is None:
            col = self._cache[name] = make()
        return col

    # Gathers take from a view that starts at the field (u32[k:].take(words)) rather than
    # index u32[words + k]: no index array to build, ~20 % less per gather.
    def _word(self, at: int) -> np.ndarray:
        return self._u32[at >> 2:].take(self.words)

    def u64(self, at: np.ndarray) -> np.ndarray:
        """The host-order u64 at each byte offset in `at` (4-aligned), e.g. an attribute's
        payload: two 32-bit gathers (cheaper than one through an overlapping 8-byte view)."""
        at = at >> 2
        lo = self._u32.take(at).astype(np.uint64)
        hi = self._u32[1:].take(at).astype(np.uint64)
        return lo | (hi << np.uint64(32)) if _LITTLE else (lo << np.uint64(32)) | hi

    # Each of these words is gathered once and shared by its columns (strided views of it):
    # word 4 = family, state, timer, retrans; word 5 = sport, dport.
    head = property(lambda self: self._column("head", lambda: self._word(16)))
    family = property(lambda self: self._column("family", lambda: self.head.view(np.uint8)[0::4]))
    state = property(lambda self: self._column("state", lambda: self.head.view(np.uint8)[1::4]))
    timer = property(lambda self: self._column("timer", lambda: self.head.view(np.uint8)[2::4]))
    retrans = property(lambda self: self._column("retrans", lambda: self.head.view(np.uint8)[3::4]))
    ports = property(lambda self: self._column("ports", lambda: self._word(20).view(np.uint16)))
    sport = property(lambda self: self._column("sport", lambda: _net16(self.ports[0::2])))
    dport = property(lambda self: self._column("dport", lambda: _net16(self.ports[1::2])))
    expires = property(lambda self: self._column("expires", lambda: self._word(68)))
    rqueue = property(lambda self: self._column("rqueue", lambda: self._word(72)))
    wqueue = property(lambda self: self._column("wqueue", lambda: self._word(76)))
    uid = property(lambda self: self._column("uid", lambda: self._word(80)))
    inode = property(lambda self: self._column("inode", lambda: self._word(84)))

    @property
    def sizes(self) -> np.ndarray:
        """nlmsg_len of every message."""
        return self._column("sizes", lambda: self._u32.take(self.words))

    @property
    def cookie(self) -> np.ndarray:
        def make() -> np.ndarray:
            lo = self._word(60).astype(np.uint64)
            hi = self._word(64).astype(np.uint64)
            return lo | (hi << np.uint64(32))
        return self._column("cookie", make)

    def addresses(self, which: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, 16) uint8 array of the source ("src") or destination ("dst") addresses of
        the messages at `rows` (all by default). IPv4 uses the first 4 bytes."""
        at = 24 if which == "src" else 40
        words = self.words if rows is None else self.words[rows]
        return self._u8[((words << 2) + at)[:, None] + np.arange(16)]

    def src(self, i: int) -> bytes:
        o = int(self.words[i]) << 2
        return bytes(self.data[o + 24:o + 40])

    def dst(self, i: int) -> bytes:
        o = int(self.words[i]) << 2
        return bytes(self.data[o + 40:o + 56])

    # -- attributes -------------------------------------------------------------------------

    def attributes(self, types: Iterable[int]) -> dict[int, Attribute]:
        """Where each attribute type in `types` is in every message, found by walking the
        attributes of all messages at once (one numpy step per attribute position, ~12).
        A malformed attribute (length below 4 or past its message) ends that message's
        walk; what was found before it stands. Cached per type."""
        types = tuple(types)
        missing = [t for t in types if ("attr", t) not in self._cache]
        if missing:
            for t, found in self._walk(missing).items():
                self._cache[("attr", t)] = found
        return {t: self._cache[("attr", t)] for t in types}

    def attribute(self, attr_type: int) -> Attribute:
        return self.attributes((attr_type,))[attr_type]

    def _walk(self, types: list[int]) -> dict[int, Attribute]:
        n = len(self.words)
        out = {t: Attribute(np.full(n, -1, np.int64), np.zeros(n, np.int64)) for t in types}
        size = self.sizes
        # The messages of one kind share one layout (the same attributes, the same lengths):
        # learn the layout of the first message of each length, then confirm it on every
        # other message of that length at once by the header word at each attribute
        # position. A walk depends only on those, so a confirmed message gets exactly what
        # walking it gives, at a fraction of the cost; the rest are walked (_walk_rows).
        todo = np.ones(n, bool)
        rest: list[np.ndarray] = []
        for _ in range(_LAYOUTS):
            first = int(np.argmax(todo))
            if not todo[first]:
                break
            length = int(size[first])
            rows = np.flatnonzero(size == length)
            todo[rows] = False
            heads, found = self._layout(int(self.words[first]) << 2, length, types)
            at = self.words[rows]
            ok = np.ones(len(rows), bool)
            for rel, word in heads:  # attribute headers are 4-aligned (NLA_ALIGNTO)
                ok &= self._u32[rel >> 2:].take(at) == word
            hit = rows[ok]
            for t, (rel, nla_len) in found.items():
                out[t].offset[hit] = (at[ok] << 2) + (rel + 4)
                out[t].length[hit] = nla_len - 4
            if len(hit) < len(rows):
                rest.append(rows[~ok])
        if todo.any():
            rest.append(np.flatnonzero(todo))
        if rest:
            self._walk_rows(np.sort(np.concatenate(rest)), out)
        return out

    def _layout(self, start: int, length: int, types: list[int]) -> tuple[list[tuple[int, int]], dict]:
        """One message's walk, in Python: the (offset from the message start, header word)
        of every attribute header the walk reads, and where the asked types are (offset,
        nla_len; the last one wins, as in _walk_rows)."""
        heads: list[tuple[int, int]] = []
        found: dict[int, tuple[int, int]] = {}
        end = start + length
        p = start + MSG_BYTES
        for _ in range(_MAX_ATTRIBUTES):
            if p + 4 > end:
                break
            heads.append((p - start, int(self._u32[p >> 2])))
            length = int(self._u16[p >> 1])
            kind = int(self._u16[(p >> 1) + 1]) & _NLA_TYPE_MASK
            if length < 4 or p + length > end:
                break
            if kind in types:
                found[kind] = (p - start, length)
            p += (length + 3) & ~3
        return heads, found

    def _walk_rows(self, rows: np.ndarray, out: dict[int, Attribute]) -> None:
        """The attributes of the messages at `rows`, walked for all of them at once (one
        numpy step per attribute position)."""
        start = self.words << 2
        end = start + self.sizes
        pos = start + MSG_BYTES
        rows = rows[pos[rows] + 4 <= end[rows]]
        for _ in range(_MAX_ATTRIBUTES):
            if not len(rows):
                break
            p = pos[rows]
            length = self._u16[p >> 1].astype(np.int64)
            kind = self._u16[(p >> 1) + 1] & _NLA_TYPE_MASK
            ok = (length >= 4) & (p + length <= end[rows])
            for t, attr in out.items():
                hit = ok & (kind == t)
                if hit.any():
                    attr.offset[rows[hit]] = p[hit] + 4
                    attr.length[rows[hit]] = length[hit] - 4
            nxt = p + ((length + 3) & ~3)
            pos[rows] = nxt
            rows = rows[ok & (nxt + 4 <= end[rows])]

    # -- rows as tuples (CLI, tests) ---------------------------------------------------------

    def __iter__(self) -> Iterator[tuple]:
        data = self.data
        for fam, state, sp, dp, rq, wq, uid, ino, w in zip(
            self.family.tolist(), self.state.tolist(), self.sport.tolist(),
            self.dport.tolist(), self.rqueue.tolist(), self.wqueue.tolist(),
            self.uid.tolist(), self.inode.tolist(), self.words.tolist(),
        ):
            o = w << 2
            yield (fam, state, sp, dp, bytes(data[o + 24:o + 40]), bytes(data[o + 40:o + 56]), rq, wq, uid, ino)

    @classmethod
    def from_records(cls, records: Iterable[tuple], *, cookies: Iterable[int] | None = None,
                     attributes: Iterable[Iterable[tuple[int, bytes]]] | None = None) -> Batch:
        """A batch of messages encoded from Record-order tuples (tests, tools): what the
        kernel would send for those sockets, with optional cookies and attributes."""
        records = list(records)
        cookies = list(cookies) if cookies is not None else [0] * len(records)
        attrs = list(attributes) if attributes is not None else [()] * len(records)
        parts, words, off = [], [], 0
        for rec, cookie, extra in zip(records, cookies, attrs):
            msg = encode_message(rec, cookie=cookie, attributes=extra)
            parts.append(msg)
            words.append(off >> 2)
            off += len(msg)
        return cls(b"".join(parts), np.array(words, np.int64))


_MSG = struct.Struct("=IHHII" "BBBB" "HH16s16s" "III" "IIIII")
assert _MSG.size == MSG_BYTES


def encode_message(rec: tuple, *, msg_type: int = 20, seq: int = 0, cookie: int = 0,
                   attributes: Iterable[tuple[int, bytes]] = (), flags: int = 0x2) -> bytes:
    """One socket message (nlmsghdr + inet_diag_msg + attributes) for a Record-order tuple."""
    fam, state, sport, dport, src, dst, rq, wq, uid, ino = rec
    tail = b""
    for kind, payload in attributes:
        nla = struct.pack("=HH", 4 + len(payload), kind) + payload
        tail += nla + b"\0" * (-len(nla) % 4)
    swap = (lambda p: ((p & 0xFF) << 8) | (p >> 8)) if _SWAP else (lambda p: p)
    head = _MSG.pack(MSG_BYTES + len(tail), msg_type, flags, seq, 0, fam, state, 0, 0,
                     swap(sport), swap(dport), bytes(src).ljust(16, b"\0"), bytes(dst).ljust(16, b"\0"),
                     0, cookie & 0xFFFFFFFF, cookie >> 32, 0, rq, wq, uid, ino)
    return head + tail


def _net16(port: np.ndarray) -> np.ndarray:
    """Big-endian (network order) 16-bit values to host order (a copy)."""
    return port.byteswap() if _SWAP else port.copy()


def format_address(family: int, raw: bytes) -> str:
    """An address as `ss` prints it: dotted quad for AF_INET (first 4 bytes), else IPv6."""
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)
