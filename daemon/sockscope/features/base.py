"""The Feature protocol: what a feature tells the poller, and what it gets back.

A poll is one dump per (namespace, protocol) that some feature needs, each batch handed
to every fold that asked for that protocol, plus the sources that need no dump (/proc
counters), then every feature's samples, then the features that work on samples
(window peaks). The poller times and catches each feature's part in one place
(`sockscope_source_up{source}`, `sockscope_source_duration_seconds{source}`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, ClassVar

from ..batch import Batch
from ..catalogue import Metric, Samples

__all__ = ["DumpNeed", "DumpStats", "Feature", "Fold", "PollContext"]

ALL_STATES = 0xFFF


@dataclass(frozen=True, slots=True)
class DumpNeed:
    """What a feature needs from the dump of one protocol. The poller asks the kernel for
    the union of every feature's needs per protocol: one walk serves them all."""

    protocol: int = socket.IPPROTO_TCP
    states: int = ALL_STATES  # sock_diag state mask (1 << kernel state number)
    ext: int = 0  # extension bits (1 << (INET_DIAG_x - 1)): attributes the kernel adds on request
    attributes: tuple[int, ...] = ()  # attribute types to locate in each message (Batch.attributes)


@dataclass(frozen=True, slots=True)
class DumpStats:
    """What the reader reports about the dump a fold saw (netlink.DumpStats)."""

    families: tuple[str, ...]
    messages: int
    retries: int
    interrupted: int


@dataclass(frozen=True, slots=True)
class PollContext:
    timestamp: float  # wall-clock time the poll started
    monotonic: float  # monotonic time the poll started


class Fold:
    """One poll's accumulator over the batches of one dump attempt (a fresh one per
    attempt: an interrupted dump is thrown away whole)."""

    def add(self, batch: Batch) -> None:
        raise NotImplementedError

    def finish(self, stats: DumpStats) -> Any:
        """The feature's result for this poll (handed to Feature.samples)."""
        raise NotImplementedError


class Feature:
    """One family of facts. Subclasses set `name` and `metrics` and override what they use.

    - `needs()` / `fold()`: a share of a dump (most features); or
    - `read(ctx)`: a source of its own (kernel counters); or
    - `after(samples, ctx)`: work on the other features' samples (window peaks).
    `samples(result, out)` turns a result into samples of its metrics. A result is kept
    until the next good one when `sticky` (the TCP table: a failed dump keeps the last
    good snapshot, sockscope_up tells its age); otherwise a failed source's series
    disappear until it recovers.
    """

    name: ClassVar[str]  # the source label and the key of its result in PollStatus.results
    metrics: tuple[Metric, ...] = ()  # in exposition order
    sticky: ClassVar[bool] = False
    primary: ClassVar[bool] = False  # its failure is a failed poll (the TCP dump)

    def needs(self) -> DumpNeed | None:
        return None

    def fold(self, ctx: PollContext) -> Fold | None:
        return None

    def read(self, ctx: PollContext) -> Any:
        """The result of a source that needs no dump; None when there is none."""
        return None

    def reads(self) -> bool:
        return type(self).read is not Feature.read

    def samples(self, result: Any, out: Samples) -> None:
        """Samples of `result` (never None) into `out`."""

    def after(self, samples: Samples, ctx: PollContext, fresh: bool) -> Samples | None:
        """Samples computed from the other features' (`fresh`: the primary dump succeeded
        in this poll); None for features that do not work on samples."""
        return None

    def max_series(self) -> int:
        """Upper bound of the series this feature exports with its configuration."""
        return 0

    def max_peak_series(self) -> int:
        """Of max_series(), those of metrics with window peaks (each gets a _peak twin)."""
        return 0

    def close(self) -> None:
        pass


