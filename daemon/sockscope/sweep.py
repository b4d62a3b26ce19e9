"""Sweeping many network namespaces: one lane per namespace, every series labelled netns.

A lane is what the daemon runs for one namespace without a sweep: its own features
(features.build with poll.netns set to the lane's path: tcp_info's per-cookie state,
connections' close-event socket, the kernel counters are per namespace anyway) and its
own readers, driven by a Poller that has no thread of its own. The sweep is one Feature
(`netns`) of the daemon's Poller: its read() rediscovers the namespaces when due
(netns.rediscover), then polls the lanes one after another; its samples() merges the
lanes' samples with the netns label put first (catalogue: `labelled`). Window peaks run
inside each lane: a series belongs to one lane, so its peak is the same as over the
merged samples. docs/design.md "Many network namespaces".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from . import discovery, features
from .catalogue import GraphitePath, Metric, Samples
from .config import Config
from .features import DumpNeed, Feature, PollContext
from .features.owners import ProcessOwners, SharedScan
from .health import Problems
from .netlink import Reader
from .poller import DumpGate, Poller, merge_needs
from .snapshot import Listener, PollStatus

log = logging.getLogger("sockscope.netns")

__all__ = ["Sweep", "SweepResult", "labelled", "METRICS"]


def labelled(metric: Metric) -> Metric:
    """`metric` with the label netns first. Graphite: `netns.<name>.` before the path; in
    naming collectd the series go under `<host>.sockscope.` (collectd's tcpconns has no
    namespace in its names, so its paths would merge the namespaces)."""
    g = metric.graphite
    path = None if g is None else GraphitePath(
        (g.sockscope[0], "netns", "{netns}", *g.sockscope[1:]) if g.sockscope[0] == "sockscope"
        else ("netns", "{netns}", *g.sockscope))
    return Metric(metric.name, metric.kind, metric.help, ("netns", *metric.labels), path, metric.peak)


_N = ("sockscope", "netns")
LANE_UP = Metric("sockscope_netns_source_up", "gauge",
                 "1 if the source (tcp, udp, kernel, ...) worked in this namespace in the latest poll.",
                 ("netns", "source"), GraphitePath((*_N, "{netns}", "source", "{source}", "up")))
DUMP_DURATION = Metric("sockscope_netns_dump_duration_seconds", "gauge",
                       "Seconds the dumps (TCP, and UDP when on) of this namespace took in the latest poll.",
                       ("netns",), GraphitePath((*_N, "{netns}", "dump_duration_seconds")))
DUMPS = Metric("sockscope_poll_dumps", "gauge",
               "Walks of the kernel's socket tables in the latest poll: one per namespace and protocol, plus "
               "retries.", (), GraphitePath(("sockscope", "poll", "dumps")))
TRACKED = Metric("sockscope_netns_tracked", "gauge", "Network namespaces polled (at most netns.max_tracked).",
                 (), GraphitePath((*_N, "tracked")))
FOLDED = Metric("sockscope_netns_folded", "gauge",
                "Network namespaces found by the latest discovery beyond netns.max_tracked: not polled.",
                (), GraphitePath((*_N, "folded")))
MISSING = Metric("sockscope_netns_missing", "gauge",
                 "poll.netns entries that named no namespace at the latest discovery.",
                 (), GraphitePath((*_N, "missing")))
VANISHED = Metric("sockscope_netns_vanished", "counter",
                  "Polled network namespaces that disappeared (their series are dropped).",
                  (), GraphitePath((*_N, "vanished")))
DISCOVERIES = Metric("sockscope_netns_discoveries", "counter", "Namespace discoveries run (netns.rediscover).",
                     (), GraphitePath((*_N, "discoveries")))
DISCOVERY_DURATION = Metric("sockscope_netns_discovery_duration_seconds", "gauge",
                            "Seconds the latest discovery took.", (), GraphitePath((*_N, "discovery_duration_seconds")))
METRICS = (DUMPS, TRACKED, FOLDED, MISSING, VANISHED, DISCOVERIES, DISCOVERY_DURATION, DUMP_DURATION, LANE_UP)


@dataclass(frozen=True, slots=True)
class LaneResult:
    label: str
    status: PollStatus
    dump_seconds: float


@dataclass(frozen=True, slots=True)
class SweepResult:
    """One sweep. Has the summary fields of a Snapshot (timestamp, duration, families,
    states, listeners, sockets): PollStatus.snapshot in a sweep, summed over the lanes."""

    timestamp: float
    duration: float
    lanes: tuple[LaneResult, ...]
    dumps: int
    folded: int
    missing: int
    vanished: int
    discoveries: int
    discovery_seconds: float
    families: tuple[str, ...] = ()
    states: dict[tuple[str, str], int] | None = None
    listeners: tuple[Listener, ...] = ()

    @property
    def sockets(self) -> int:
        return sum((self.states or {}).values())


class SweepFailed(Exception):
    """Every lane's TCP dump failed in this poll: a failed poll (the last sweep is kept)."""


class _Lane:
    def __init__(self, ns: discovery.Namespace, cfg: Config, poller: Poller) -> None:
        self.ns = ns
        self.cfg = cfg
        self.poller = poller

    def close(self) -> None:
        resources: list[Reader | Feature] = [*self.poller.readers.values(), *self.poller.features]
        for resource in resources:
            try:
                resource.close()
            except Exception:  # noqa: BLE001 - closing must not stop the sweep
                log.warning("closing %s of netns %s failed", type(resource).__name__, self.ns.label,
                            exc_info=True)


ReaderFactory = Callable[[Config, DumpNeed], Reader]


class Sweep(Feature):
    """The `netns` source: every lane polled in turn (see the module doc)."""

    name = "netns"
    sticky = True  # every lane failing keeps the last sweep (as the TCP table does)
    primary = True

    def __init__(self, cfg: Config, make_reader: ReaderFactory, *, gate: DumpGate | None = None,
                 monotonic: Callable[[], float] = time.monotonic, clock: Callable[[], float] = time.time,
                 discover: Callable[..., discovery.Discovery] = discovery.discover,
                 stat: Callable[[str], os.stat_result] = os.stat) -> None:
        self.cfg = cfg
        self._make_reader = make_reader
        self._gate = gate
        self._monotonic = monotonic
        self._clock = clock
        self._discover = discover
        self._stat = stat
        self.lanes: dict[discovery.NsKey, _Lane] = {}
        self._owner_scan = SharedScan()  # the owners features of every lane (owners.enabled)
        self._given: set[int] = set()  # ids of lanes handed to the sweep of a reload
        self._next_discovery: float | None = None
        self._folded = self._missing = self._vanished = self._discoveries = 0
        self._discovery_seconds = 0.0
        self._discovery_log = Problems(log, "netns discovery", recovery="netns discovery works again")
        self._build_log = Problems(log, "netns", recovery="netns: every namespace polled again")
        self._slow_log = Problems(log, "netns", level=logging.WARNING, recovery="netns: sweeps fit poll.interval again")
        self._missing_log = Problems(log, "netns", level=logging.WARNING, recovery="netns: every listed namespace found")
        from .service import max_series  # service imports this module lazily

        template = features.build(self._lane_config(None))
        try:
            self._template = [(f.name, f.metrics) for f in template]
            self._lane_max = max_series(template)
        finally:
            for f in template:
                f.close()
        self._labelled_cache: dict[str, Metric] = {}
        self.metrics = tuple(labelled(m) for _, ms in self._template for m in ms) + METRICS

    # -- configuration ------------------------------------------------------------------

    def _lane_config(self, path: str | None) -> Config:
        return replace(self.cfg, poll=replace(self.cfg.poll, netns=path))

    def _targets(self) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
        netns = self.cfg.poll.netns
        configured = netns if isinstance(netns, tuple) else ()
        return configured, self.cfg.netns.discover, self.cfg.netns.host

    def max_series(self) -> int:
        configured, kinds, host = self._targets()
        cap = self.cfg.netns.max_tracked
        if not kinds:  # a fixed list: at most its namespaces
            cap = min(cap, len(configured) + host)
        return cap * (self._lane_max + 1 + 8) + len(METRICS)  # + dump duration, source up per lane

    def max_peak_series(self) -> int:
        return 0  # the lanes' peaks are counted in their max_series

    def take_over(self, old: Sweep, rebuild: bool) -> None:
        """A reload: keep the lanes of `old` whose namespace is still wanted (unless
        `rebuild`: a setting every lane is built from changed), with their state."""
        if not rebuild:
            self.lanes = dict(old.lanes)
            old._given = {id(lane) for lane in self.lanes.values()}
        self._vanished, self._discoveries = old._vanished, old._discoveries

    # -- polling ------------------------------------------------------------------------

    def reads(self) -> bool:
        return True

    def _rediscover(self, now: float) -> None:
        """Discover and reconcile the lanes. A discovery that fails keeps the lanes as
        they are (logged once, retried at the next due time); a lane that cannot be built
        is left out until the next discovery (logged once)."""
        started = self._monotonic()
        self._next_discovery = now + self.cfg.netns.rediscover
        configured, kinds, host = self._targets()
        try:
            found = self._discover(configured, kinds, host)
        except Exception as e:  # noqa: BLE001 - the lanes polled so far carry on
            self._discovery_log.failed(e, traceback=None if isinstance(e, OSError) else e)
            return
        self._discovery_log.ok()
        chosen, self._folded = discovery.choose(found.found, self.lanes, self.cfg.netns.max_tracked)
        self._missing = len(found.missing)
        if found.missing:
            self._missing_log.failed(f"listed namespaces not found (polled once they appear): "
                                     f"{', '.join(found.missing[:10])}")
        else:
            self._missing_log.ok()
        wanted = {ns.key: ns for ns in chosen}
        for key in [k for k in self.lanes if k not in wanted or wanted[k].path != self.lanes[k].ns.path]:
            self._drop(key, None)
        built_all = True
        for key, ns in wanted.items():
            lane = self.lanes.get(key)
            if lane is None:
                try:
                    self.lanes[key] = self._lane(ns)
                except Exception as e:  # noqa: BLE001 - one namespace must not stop the others
                    self._build_log.failed(f"netns {ns.label}: {e or type(e).__name__}",
                                           traceback=None if isinstance(e, OSError) else e)
                    built_all = False
                    continue
                log.info("netns %s: polling %s", ns.label, ns.path or "the daemon's own namespace")
            elif lane.ns.label != ns.label:
                lane.ns = ns
        if built_all:
            self._build_log.ok()
        self.lanes = {k: self.lanes[k] for k in wanted if k in self.lanes}  # the chosen order
        self._discoveries += 1
        self._discovery_seconds = self._monotonic() - started

    def _lane(self, ns: discovery.Namespace) -> _Lane:
        cfg = self._lane_config(ns.path)
        built = features.build(cfg)
        for f in built:
            if isinstance(f, ProcessOwners):  # one /proc scan per sweep serves every lane
                f.share_scan(self._owner_scan)
        readers = {p: self._make_reader(cfg, need) for p, need in merge_needs(built).items()}
        poller = Poller(built, readers, cfg.poll.interval, gate=self._gate, clock=self._clock,
                        monotonic=self._monotonic, name=f"netns {ns.label}")
        return _Lane(ns, cfg, poller)

    def _gone(self, lane: _Lane, key: discovery.NsKey) -> str | None:
        """Why the lane's namespace is no longer there (None: it is). A path that names
        another namespace now (`ip netns del web; ip netns add web`, a reused pid) counts
        as gone: the new one is a namespace of its own, found by the next discovery."""
        path = lane.ns.path
        if path is None:
            return None
        try:
            st = self._stat(path)
        except OSError as e:
            return f"{path} is gone ({e.strerror or e})"
        if (st.st_dev, st.st_ino) != key:
            return f"{path} names another namespace now"
        return None

    def _drop(self, key: discovery.NsKey, why: str | None) -> None:
        lane = self.lanes.pop(key)
        if why is not None:
            self._vanished += 1
            log.info("netns %s: %s; its series are dropped", lane.ns.label, why)
        lane.close()

    def read(self, ctx: PollContext) -> SweepResult:
        try:
            return self._sweep(ctx)
        finally:
            self._owner_scan.next_round()  # its host-wide /proc answer lives for one sweep only

    def _sweep(self, ctx: PollContext) -> SweepResult:
        now = self._monotonic()
        if self._next_discovery is None or now >= self._next_discovery:
            self._rediscover(now)
        lanes: list[LaneResult] = []
        dumps = failed = 0
        states: dict[tuple[str, str], int] = {}
        listeners: list[Listener] = []
        families: dict[str, None] = {}
        for key, lane in list(self.lanes.items()):
            gone = self._gone(lane, key)
            if gone is not None:
                self._drop(key, gone)
                continue
            retries = lane.poller.status().dump_retries
            status = lane.poller.poll()
            if status.last_error is not None and (gone := self._gone(lane, key)) is not None:
                self._drop(key, f"{gone} (during its poll)")
                continue
            dumps += len(lane.poller.readers) + status.dump_retries - retries
            if status.last_error is not None:
                failed += 1
            took = sum(h.duration for name, h in status.sources.items() if name in ("tcp", "udp"))
            lanes.append(LaneResult(lane.ns.label, status, took))
            snap = status.snapshot
            if snap is not None:
                for k, n in snap.states.items():
                    states[k] = states.get(k, 0) + n
                listeners.extend(snap.listeners)
                families.update(dict.fromkeys(snap.families))
        took = self._monotonic() - now
        interval = self.cfg.poll.interval
        if took > interval:
            self._slow_log.failed("a sweep took longer than poll.interval "
                                  f"({interval:g}s): polls are skipped; each namespace walks the host's whole "
                                  "socket table (docs/performance.md): lower netns.max_tracked or raise poll.interval")
        elif took < 0.8 * interval:
            self._slow_log.ok()
        if lanes and failed == len(lanes):
            raise SweepFailed(f"the TCP dump failed in every namespace ({lanes[0].label}: "
                              f"{lanes[0].status.last_error})")
        return SweepResult(ctx.timestamp, took, tuple(lanes), dumps, self._folded,
                           self._missing, self._vanished, self._discoveries, self._discovery_seconds,
                           tuple(families), states, tuple(listeners))

    def samples(self, result: SweepResult, out: Samples) -> None:
        for _name, metrics in self._template:  # every family declared, in exposition order
            for metric in metrics:
                out.declare(self._labelled(metric))
        for lane in result.lanes:
            label = lane.label
            for metric, rows in lane.status.samples:
                out.extend(self._labelled(metric), (((label, *labels), value) for labels, value in rows))
        out.add(DUMPS, (), result.dumps)
        out.add(TRACKED, (), len(result.lanes))
        out.add(FOLDED, (), result.folded)
        out.add(MISSING, (), result.missing)
        out.add(VANISHED, (), result.vanished)
        out.add(DISCOVERIES, (), result.discoveries)
        out.add(DISCOVERY_DURATION, (), result.discovery_seconds)
        for lane in result.lanes:
            out.add(DUMP_DURATION, (lane.label,), lane.dump_seconds)
        for lane in result.lanes:
            for source, health in lane.status.sources.items():
                out.add(LANE_UP, (lane.label, source), 1.0 if health.up else 0.0)

    def _labelled(self, metric: Metric) -> Metric:
        got = self._labelled_cache.get(metric.name)
        if got is None:
            got = self._labelled_cache[metric.name] = labelled(metric)
        return got

    def close(self) -> None:
        for lane in list(self.lanes.values()):
            if id(lane) not in self._given:
                lane.close()
        self.lanes = {}

