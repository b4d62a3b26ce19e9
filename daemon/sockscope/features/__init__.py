"""The features, in exposition order. Adding one: docs/design.md, "How to add a feature".

Each entry: the feature's name, the configuration key paths it is built from (a reload
rebuilds exactly the features whose keys changed; the others keep their state, e.g. the
peaks' buckets), and its factory, which returns None when the configuration turns it off.
Factories get the features built before them (peaks track every metric of the others, so
the registry builds it last whatever its place in the exposition).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .base import DumpNeed, DumpStats, Feature, Fold, PollContext
from .connections import Connections
from .kernel import KernelCounters
from .owners import ProcessOwners
from .peaks import WindowPeaks
from .tcp import TcpSockets
from .tcp_info import TcpInfo
from .udp import UdpCounters, UdpSockets
from .units import TcpUnits

__all__ = ["DumpNeed", "DumpStats", "Feature", "Fold", "PollContext", "REGISTRY", "Entry", "build",
           "changed_features"]


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    keys: tuple[str, ...]  # config key paths (or section names) the feature is built from
    make: Callable[..., Feature | None]  # (cfg, built: list[Feature]) -> Feature | None
    build_last: bool = False


REGISTRY: tuple[Entry, ...] = (
    Entry("tcp", ("ports", "listeners", "poll.families"), lambda cfg, built: TcpSockets.from_config(cfg)),
    Entry("tcp_info", ("tcp_info", "ports"),
          lambda cfg, built: TcpInfo.from_config(cfg) if cfg.tcp_info.enabled else None),
    Entry("connections", ("connections", "ports", "poll.netns", "poll.families"),
          lambda cfg, built: Connections.from_config(cfg) if cfg.connections.enabled else None),
    Entry("owners", ("owners", "ports", "listeners"),
          lambda cfg, built: ProcessOwners.from_config(cfg) if cfg.owners.enabled else None),
    Entry("units", ("units", "listeners", "tcp_info.enabled"),
          lambda cfg, built: TcpUnits.from_config(cfg) if cfg.units.enabled else None),
    Entry("peaks", ("poll.peak_window",),
          lambda cfg, built: WindowPeaks(cfg.poll.peak_window, [m for f in built for m in f.metrics])
          if cfg.poll.peak_window else None, build_last=True),
    Entry("kernel", ("poll.kernel_stats", "poll.netns"),
          lambda cfg, built: KernelCounters(cfg.poll.netns) if cfg.poll.kernel_stats else None),
    Entry("udp", ("udp", "poll.families"),
          lambda cfg, built: UdpSockets.from_config(cfg) if cfg.udp.enabled else None),
    Entry("udp_counters", ("udp.enabled", "poll.netns", "poll.families"),
          lambda cfg, built: UdpCounters(cfg.poll.netns, cfg.poll.families) if cfg.udp.enabled else None),
)


def build(cfg, keep: Sequence[Feature] = ()) -> list[Feature]:
    """The enabled features for `cfg` in exposition order; those in `keep` (unchanged by a
    reload) are reused as they are."""
    kept = {f.name: f for f in keep}
    built: dict[str, Feature] = {}
    for entry in sorted(REGISTRY, key=lambda e: e.build_last):
        feature = kept.get(entry.name)
        if feature is None:
            feature = entry.make(cfg, list(built.values()))
        elif isinstance(feature, WindowPeaks):
            feature.retrack([m for f in built.values() for m in f.metrics])
        if feature is not None:
            built[entry.name] = feature
    return [built[e.name] for e in REGISTRY if e.name in built]


def changed_features(changed_keys: set[str]) -> set[str]:
    """Names of the features whose configuration keys are among (or under) `changed_keys`."""
    def hit(key: str) -> bool:
        return any(c == key or c.startswith(key + ".") or key.startswith(c + ".") for c in changed_keys)

    return {e.name for e in REGISTRY if any(hit(k) for k in e.keys)}
