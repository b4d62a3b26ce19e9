"""The bounded buffer of lines not yet sent, in chunks of whole lines.

Oldest first: chunks written on the current connection and not yet confirmed, the chunk
being written, then the queue. Bounded in lines; when full the OLDEST lines are dropped
and reported (`Drops`: never written, or written and unconfirmed). No lock, no I/O: the
Pusher calls it under its lock. Lines are stored as bytes, joined into chunks (no object
per line), so memory is bounded by capacity x line length plus one chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Chunk", "Drops", "LineBuffer", "pack"]


@dataclass(frozen=True, slots=True)
class Chunk:
    data: bytes  # whole lines
    lines: int
    written: bool = False  # written (maybe in part) on a connection that then failed


@dataclass(frozen=True, slots=True)
class Drops:
    """Lines a buffer operation dropped to stay within capacity."""

    unsent: int = 0  # never written to carbon
    unconfirmed: int = 0  # written, not confirmed: carbon may have them

    @property
    def total(self) -> int:
        return self.unsent + self.unconfirmed


def pack(lines: list[bytes], limit: int) -> list[Chunk]:
    """Consecutive lines joined into chunks of at most `limit` bytes (a longer line alone)."""
    chunks: list[Chunk] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            chunks.append(Chunk(b"".join(current), len(current)))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(Chunk(b"".join(current), len(current)))
    return chunks


def _drop_lines(chunk: Chunk, n: int) -> Chunk:
    """chunk without its first n lines (0 < n < chunk.lines)."""
    pos = 0
    for _ in range(n):
        pos = chunk.data.index(b"\n", pos) + 1
    return Chunk(chunk.data[pos:], chunk.lines - n, chunk.written)


class _Unconfirmed:
    """A chunk written whole on the current connection, not yet confirmed."""

    __slots__ = ("chunk", "end", "acked_at")

    def __init__(self, chunk: Chunk, end: int) -> None:
        self.chunk = chunk
        self.end = end  # bytes written on the connection up to its last byte
        self.acked_at: float | None = None  # monotonic time its acknowledgement was first seen


class LineBuffer:
    """Every line not yet sent, bounded in lines; when full the OLDEST lines are dropped.

    Oldest first: chunks written on the current connection and not confirmed, the chunk
    being written ("in flight"), then the queue. Not thread-safe: the Pusher calls it under
    its lock. The capacity covers the unconfirmed and queued lines; the chunk in flight is
    exempt while it is being written (new lines never pull it out mid-send) and counts again
    once written or given back, so memory is bounded by capacity + one chunk.
    """

    def __init__(self, capacity_lines: int) -> None:
        if capacity_lines < 1:
            raise ValueError("capacity must be >= 1 line")
        self.capacity = capacity_lines
        self._chunks: deque[Chunk] = deque()
        self._lines = 0
        self._unconfirmed: deque[_Unconfirmed] = deque()
        self._unconfirmed_lines = 0
        self.in_flight: Chunk | None = None

    def __len__(self) -> int:
        """Lines not sent: unconfirmed, in flight and queued."""
        return self._lines + self._unconfirmed_lines + (self.in_flight.lines if self.in_flight else 0)

    @property
    def unconfirmed(self) -> int:
        return self._unconfirmed_lines

    @property
    def has_queued(self) -> bool:
        return bool(self._chunks)

    @property
    def has_unconfirmed(self) -> bool:
        return bool(self._unconfirmed)

    def add(self, chunks: Iterable[Chunk]) -> Drops:
        """Append; returns the (oldest) lines dropped to stay within capacity."""
        for chunk in chunks:
            self._chunks.append(chunk)
            self._lines += chunk.lines
        return self._trim()

    def take(self) -> Chunk | None:
        if self.in_flight is not None:
            raise RuntimeError("a chunk is already in flight")
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._lines -= chunk.lines
        self.in_flight = chunk
        return chunk

    def done(self) -> None:
        """The chunk in flight was sent and needs no confirmation (UDP)."""
        self.in_flight = None

    def written(self, end: int) -> Drops:
        """The chunk in flight was written whole; `end` = bytes written on this connection
        up to its last byte. It waits for confirmation, counted against the capacity."""
        chunk, self.in_flight = self.in_flight, None
        if chunk is None:
            raise RuntimeError("no chunk in flight")
        self._unconfirmed.append(_Unconfirmed(chunk, end))
        self._unconfirmed_lines += chunk.lines
        return self._trim()

    def confirm(self, acked: int, window_full: bool, now: float, delay: float) -> int:
        """Note which unconfirmed chunks `acked` (bytes acknowledged on this connection)
        covers, at monotonic time `now`; confirm, oldest first, those acknowledged at least
        `delay` ago if `window_full`. Returns the lines confirmed (removed)."""
        for entry in self._unconfirmed:
            if entry.end > acked:
                break
            if entry.acked_at is None:
                entry.acked_at = now
        confirmed = 0
        while window_full and self._unconfirmed:
            entry = self._unconfirmed[0]
            if entry.acked_at is None or now - entry.acked_at < delay:
                break
            self._unconfirmed.popleft()
            self._unconfirmed_lines -= entry.chunk.lines
            confirmed += entry.chunk.lines
        return confirmed

    def confirm_all(self) -> int:
        """Carbon confirmed everything written on the connection (it closed cleanly after
        acknowledging all of it). Returns the lines confirmed."""
        confirmed = self._unconfirmed_lines
        self._unconfirmed.clear()
        self._unconfirmed_lines = 0
        return confirmed

    def oldest_acked_at(self) -> float | None:
        """When the oldest unconfirmed chunk's acknowledgement was first seen (None: not yet)."""
        return self._unconfirmed[0].acked_at if self._unconfirmed else None

    def requeue(self) -> Drops:
        """The connection failed: every unconfirmed chunk, then the chunk in flight, goes
        back first in line, marked written (sending it again is a resend). Returns the lines
        dropped to stay within capacity."""
        back = [entry.chunk for entry in self._unconfirmed]
        if self.in_flight is not None:
            back.append(self.in_flight)
        self._unconfirmed.clear()
        self._unconfirmed_lines = 0
        self.in_flight = None
        for chunk in reversed(back):
            chunk = chunk if chunk.written else Chunk(chunk.data, chunk.lines, True)
            self._chunks.appendleft(chunk)
            self._lines += chunk.lines
        return self._trim()

    def drain(self) -> list[Chunk]:
        """Remove and return every unconfirmed and queued chunk, oldest first (a successor
        takes them; the unconfirmed ones marked written). The chunk in flight, if any,
        stays with this buffer."""
        chunks = [e.chunk if e.chunk.written else Chunk(e.chunk.data, e.chunk.lines, True)
                  for e in self._unconfirmed]
        chunks += self._chunks
        self._unconfirmed, self._unconfirmed_lines = deque(), 0
        self._chunks, self._lines = deque(), 0
        return chunks

    def prepend(self, chunks: list[Chunk]) -> Drops:
        """Put `chunks` (older lines) ahead of everything queued; returns lines dropped
        (the oldest first) to stay within capacity."""
        for chunk in reversed(chunks):
            self._chunks.appendleft(chunk)
            self._lines += chunk.lines
        return self._trim()

    def _trim(self) -> Drops:
        unsent = unconfirmed = 0
        while self._lines + self._unconfirmed_lines > self.capacity:
            excess = self._lines + self._unconfirmed_lines - self.capacity
            if self._unconfirmed:
                entry = self._unconfirmed[0]
                if entry.chunk.lines <= excess:
                    self._unconfirmed.popleft()
                    n = entry.chunk.lines
                else:
                    entry.chunk = _drop_lines(entry.chunk, excess)
                    n = excess
                self._unconfirmed_lines -= n
                unconfirmed += n
                continue
            head = self._chunks[0]
            if head.lines <= excess:
                self._chunks.popleft()
                n = head.lines
            else:
                self._chunks[0] = _drop_lines(head, excess)
                n = excess
            self._lines -= n
            if head.written:
                unconfirmed += n
            else:
                unsent += n
        return Drops(unsent, unconfirmed)
