"""struct tcp_info, as sock_diag sends it in INET_DIAG_INFO, read column-wise.

Layout from include/uapi/linux/tcp.h (Linux 6.x; every field keeps its offset across
kernels, new ones are appended). A kernel sends the struct as long as it knows it
(`tcp_info` 280 bytes on 6.18): `columns()` gives each asked field for the messages whose
attribute is long enough, and marks the others absent (a shorter struct from an older
kernel is read as far as it goes, never past it).

Times are milliseconds (last_*), microseconds (rtt, rttvar, min_rtt; busy_time and the
*_limited chronographs, cumulative per socket), counters are cumulative per socket.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .batch import Batch

__all__ = ["INET_DIAG_INFO", "INFO_EXT", "FIELDS", "Field", "columns", "word_index", "words", "u64s"]

INET_DIAG_INFO = 2  # include/uapi/linux/inet_diag.h: the attribute, and ext bit (1 << (2 - 1))
INFO_EXT = 1 << (INET_DIAG_INFO - 1)
_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class Field:
    offset: int
    dtype: str  # numpy dtype of the field, native byte order


# name -> where it is (bytes from the start of struct tcp_info)
FIELDS: dict[str, Field] = {
    "state": Field(0, "u1"),
    "ca_state": Field(1, "u1"),
    "retransmits": Field(2, "u1"),
    "probes": Field(3, "u1"),
    "backoff": Field(4, "u1"),
    "rto": Field(8, "u4"),  # µs
    "ato": Field(12, "u4"),
    "snd_mss": Field(16, "u4"),
    "rcv_mss": Field(20, "u4"),
    "unacked": Field(24, "u4"),
    "sacked": Field(28, "u4"),
    "lost": Field(32, "u4"),
    "retrans": Field(36, "u4"),
    "last_data_sent": Field(44, "u4"),  # ms ago
    "last_ack_sent": Field(48, "u4"),  # not kept by Linux: always 0
    "last_data_recv": Field(52, "u4"),  # ms ago
    "last_ack_recv": Field(56, "u4"),  # ms ago
    "pmtu": Field(60, "u4"),
    "rcv_ssthresh": Field(64, "u4"),
    "rtt": Field(68, "u4"),  # µs, smoothed
    "rttvar": Field(72, "u4"),  # µs
    "snd_ssthresh": Field(76, "u4"),
    "snd_cwnd": Field(80, "u4"),
    "advmss": Field(84, "u4"),
    "reordering": Field(88, "u4"),
    "rcv_rtt": Field(92, "u4"),
    "rcv_space": Field(96, "u4"),
    "total_retrans": Field(100, "u4"),
    "pacing_rate": Field(104, "u8"),
    "max_pacing_rate": Field(112, "u8"),
    "bytes_acked": Field(120, "u8"),  # RFC 4898 tcpEStatsAppHCThruOctetsAcked
    "bytes_received": Field(128, "u8"),  # RFC 4898 tcpEStatsAppHCThruOctetsReceived
    "segs_out": Field(136, "u4"),
    "segs_in": Field(140, "u4"),
    "notsent_bytes": Field(144, "u4"),
    "min_rtt": Field(148, "u4"),  # µs
    "data_segs_in": Field(152, "u4"),
    "data_segs_out": Field(156, "u4"),
    "delivery_rate": Field(160, "u8"),
    "busy_time": Field(168, "u8"),  # µs the socket had data to send
    "rwnd_limited": Field(176, "u8"),  # µs of it limited by the peer's receive window
    "sndbuf_limited": Field(184, "u8"),  # µs of it limited by our send buffer
    "delivered": Field(192, "u4"),
    "delivered_ce": Field(196, "u4"),
    "bytes_sent": Field(200, "u8"),
    "bytes_retrans": Field(208, "u8"),
    "dsack_dups": Field(216, "u4"),
    "reord_seen": Field(220, "u4"),
    "rcv_ooopack": Field(224, "u4"),
    "snd_wnd": Field(228, "u4"),
    "rcv_wnd": Field(232, "u4"),
}


def columns(batch: Batch, names: Iterable[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The tcp_info fields `names` of every message of `batch`, and a boolean mask of the
    messages that carry them all (INET_DIAG_INFO present and long enough). Values of the
    other messages are 0. The attribute's offsets are located once per batch
    (Batch.attributes); each field is one numpy gather."""
    names = tuple(names)
    attr = batch.attribute(INET_DIAG_INFO)
    need = max(FIELDS[n].offset + np.dtype(FIELDS[n].dtype).itemsize for n in names) if names else 0
    ok = attr.present & (attr.length >= need)
    rows = np.flatnonzero(ok)
    base = attr.offset[rows]
    u8 = np.frombuffer(batch.data, np.uint8)
    u32 = np.frombuffer(batch.data, np.uint32, len(batch.data) >> 2)
    out = {}
    for name in names:
        f = FIELDS[name]
        col = np.zeros(len(batch), f.dtype)
        if len(rows):
            # Attribute payloads are 4-aligned (NLA_ALIGNTO): a u4 field is one word, a
            # u8 field two (its 8-aligned struct offset may sit 4 bytes off in the buffer),
            # a u1 field one byte. One gather per word: a byte-wise (n, size) gather cost
            # 3x more at 100k sockets.
            if f.dtype == "u4":
                col[rows] = u32[(base + f.offset) >> 2]
            elif f.dtype == "u8":
                at = (base + f.offset) >> 2
                lo, hi = u32[at].astype(np.uint64), u32[at + 1].astype(np.uint64)
                col[rows] = (lo | (hi << np.uint64(32))) if _LITTLE else ((lo << np.uint64(32)) | hi)
            else:
                col[rows] = u8[base + f.offset]
        out[name] = col
    return out, ok


def word_index(names: Iterable[str]) -> tuple[np.ndarray, int]:
    """The 32-bit words (from the start of tcp_info) that hold the fields `names`, in order:
    one for a u4 field, two for a u8 field (low word first, whatever the byte order: see
    u64); and the struct length they need."""
    out: list[int] = []
    need = 0
    for name in names:
        f = FIELDS[name]
        if f.dtype not in ("u4", "u8"):
            raise ValueError(f"{name}: only u4/u8 fields are read as words")
        w = f.offset >> 2
        out += [w] if f.dtype == "u4" else ([w, w + 1] if _LITTLE else [w + 1, w])
        need = max(need, f.offset + np.dtype(f.dtype).itemsize)
    return np.array(out, np.int64), need


def words(batch: Batch, rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """A (len(rows), len(index)) uint32 block: for each message in `rows`, the words
    `index` (word_index) of its tcp_info, in one gather. The caller has checked that those
    messages' INET_DIAG_INFO is at least as long as word_index said."""
    u32 = batch._u32
    base = batch.attribute(INET_DIAG_INFO).offset[rows] >> 2  # payloads are 4-aligned (NLA_ALIGNTO)
    out = np.empty((len(base), len(index)), np.uint32)
    for j, k in enumerate(index.tolist()):  # a gather per word: ~20 % less than one 2-D gather
        out[:, j] = u32[k:].take(base)
    return out


def u64s(pairs: np.ndarray) -> np.ndarray:
    """(n, k) u8 fields from an (n, 2k) block of (low, high) word pairs (word_index)."""
    if _LITTLE:  # (low, high) in memory is the u64 itself
        return np.ascontiguousarray(pairs).view(np.uint64)
    return pairs[:, 0::2].astype(np.uint64) | (pairs[:, 1::2].astype(np.uint64) << np.uint64(32))
