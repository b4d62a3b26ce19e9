"""The running daemon: wires the poller to its consumers and owns their lifecycle.

Consumers of polls (exporters, the systemd watchdog) subscribe with `on_poll(callback)`;
each callback runs in the poller thread after every poll with the new PollStatus and must
return quickly (hand work to its own thread). Scrapes read `poller.status()` directly.
A reload replaces a subscriber (the Graphite pusher) under the dispatch lock, so no poll
is ever handed to both the old and the new one, nor to neither.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from . import __version__, features
from .config import Config, changed_keys, one_netns, sweeping
from .features import DumpNeed, Feature
from .netlink import Reader
from .poller import ConsumerError, DumpGate, Poller, merge_needs
from .snapshot import PollStatus

if TYPE_CHECKING:  # imported when enabled (service.start, reload)
    from .graphite import Pusher
    from .httpserver import HTTPServer

log = logging.getLogger("sockscope")

STOP_POLLER_WAIT = 5.0  # seconds stop() waits for the poll in progress


def make_reader(cfg: Config, need: DumpNeed = DumpNeed()) -> Reader:
    """The reader of one protocol's dump, asking for what the features need of it."""
    return Reader(
        cfg.poll.families,
        netns=one_netns(cfg),
        timeout=cfg.poll.timeout,
        dump_retries=cfg.poll.dump_retries,
        protocol=need.protocol,
        ext=need.ext,
        states=need.states,
    )


# Settings every reader is built from (besides the features' needs).
_READER_KEYS = ("poll.families", "poll.netns", "poll.timeout", "poll.dump_retries")


def max_series(enabled: list[Feature]) -> int:
    """The most series the enabled features can export (peaks count their twins)."""
    total = 0
    for f in enabled:
        # peaks' bound depends on the others' (WindowPeaks.max_series(others))
        total += f.max_series(enabled) if f.name == "peaks" else f.max_series()  # type: ignore[call-arg]
    return total


def _consumer_name(callback: Callable) -> str:
    """"Pusher.on_poll" for a bound method, the function's name otherwise."""
    owner = getattr(callback, "__self__", None)
    name = getattr(callback, "__name__", type(callback).__name__)
    return f"{type(owner).__name__}.{name}" if owner is not None else name


class Service:
    def __init__(
        self, cfg: Config, *, reader_factory: Callable[[Config, DumpNeed], Reader] = make_reader,
        web=None,
    ):
        self.cfg = cfg
        self.web = web  # webconfig.WebConfig (TLS, basic auth) or None
        self._reader_factory = reader_factory
        self._gate = DumpGate()
        self.features = self._build(cfg)
        # Replaced (never mutated) under _dispatch_lock; _dispatch holds the lock while it
        # calls them, so a swap waits for the poll being dispatched (callbacks are quick).
        self._subscribers: list[Callable[[PollStatus], object]] = []
        self._dispatch_lock = threading.Lock()
        self._needs = merge_needs(self.features)
        self.poller = Poller(
            self.features, self._readers(cfg, self._needs), cfg.poll.interval,
            on_poll=self._dispatch, gate=self._gate,
        )
        self.server: HTTPServer | None = None
        self.graphite: Pusher | None = None  # when graphite.enabled
        self._graphite_carry: Pusher | None = None  # a Pusher a reload disabled: its counters carry on
        self._graphite_retired: list[tuple[threading.Thread, float]] = []  # their flushes, deadlines
        if cfg.graphite.enabled:
            from .graphite import Pusher

            self.graphite = Pusher.from_config(cfg, max_series(self.features), len(self.features))
            self.on_poll(self.graphite.on_poll)

    def _build(self, cfg: Config, keep: list[Feature] | None = None, changed: set[str] | None = None
               ) -> list[Feature]:
        """The features for `cfg`: features.build, or in a sweep of namespaces the one
        `netns` feature running a lane per namespace (sweep.py). On a reload (`changed`
        given) a sweep keeps what it can: the same Sweep when nothing it uses changed; its
        lanes (with their state) when only the namespaces to poll changed."""
        if not sweeping(cfg):
            return features.build(cfg, keep=keep or [])
        from .sweep import Sweep

        old = next((f for f in self.features if isinstance(f, Sweep)), None) if changed is not None else None
        lane_changed = changed is not None and (
            bool(features.changed_features({k for k in changed if k != "poll.netns"}))
            or any(k in changed for k in (*_READER_KEYS, "poll.interval") if k != "poll.netns"))
        sweep_changed = changed is not None and any(k == "poll.netns" or k.startswith("netns.") for k in changed)
        if old is not None and not lane_changed and not sweep_changed:
            return [old]
        new = Sweep(cfg, self._reader_factory, gate=self._gate)
        if old is not None:
            new.take_over(old, rebuild=lane_changed)
        return [new]

    def _readers(self, cfg: Config, needs: dict[int, DumpNeed], keep: dict[int, Reader] | None = None
                 ) -> dict[int, Reader]:
        """One reader per protocol the features need; those in `keep` are reused."""
        keep = keep or {}
        return {p: keep[p] if p in keep else self._reader_factory(cfg, need) for p, need in needs.items()}

    def on_poll(self, callback: Callable[[PollStatus], object]) -> None:
        with self._dispatch_lock:
            self._subscribers = [*self._subscribers, callback]

    def _dispatch(self, status: PollStatus) -> None:
        """Every consumer gets the poll even if another raised; then one ConsumerError
        names the failures, and the poller counts and logs it (once per distinct message)."""
        failures: list[tuple[Callable, Exception]] = []
        with self._dispatch_lock:
            for callback in self._subscribers:
                try:
                    callback(status)
                except Exception as e:  # noqa: BLE001 - one consumer must not stop the others
                    failures.append((callback, e))
        if failures:
            text = "; ".join(f"{_consumer_name(cb)}: {e or type(e).__name__}" for cb, e in failures)
            raise ConsumerError(text) from failures[0][1]

    def start(self) -> None:
        """Bind the HTTP port (raises OSError), then start polling."""
        cfg = self.cfg
        if cfg.prometheus.enabled:
            self.server = self._metrics_server(cfg)
            self.server.start()
            self._log_serving(cfg, self.server)
        if sweeping(cfg):
            where = f" in up to {cfg.netns.max_tracked} network namespaces (a sweep, labelled netns)"
        else:
            where = f" in network namespace {cfg.poll.netns}" if cfg.poll.netns else ""
        log.info(
            "sockscope %s polling %s sockets%s every %gs (pid %d)",
            __version__, "+".join(cfg.poll.families), where, cfg.poll.interval, os.getpid(),
        )
        if self.graphite is not None:
            self.graphite.start()
        self.poller.start()

    def _exposition(self, cfg: Config):
        from . import graphite
        from .prometheus import HTTP_METRICS, PollExposition, SamplesCollector

        # The Graphite and HTTP collectors read self.graphite / self.server at each scrape
        # (nothing while Graphite is off): a reload swaps, adds or removes them underneath
        # (counters carried over) without a new registry.
        return PollExposition(self.poller.status, cfg.poll.stale_after,
                              SamplesCollector(self._graphite_samples, graphite.METRICS),
                              SamplesCollector(self._http_samples, HTTP_METRICS),
                              metrics=[m for f in self.features for m in f.metrics],
                              poll_interval=cfg.poll.interval)

    def _graphite_samples(self):
        from .graphite import stats_samples

        pusher = self.graphite
        return None if pusher is None else stats_samples(pusher.stats())

    def _http_samples(self):
        from .prometheus import http_samples

        server = self.server
        return http_samples(None if server is None else server.stats())

    def _metrics_server(self, cfg: Config):
        from .httpserver import Limits
        from .prometheus import metrics_server

        p = cfg.prometheus
        limits = Limits(max_connections=p.max_connections, workers=p.workers,
                        request_timeout=p.request_timeout, idle_timeout=p.idle_timeout,
                        write_timeout=p.write_timeout)
        return metrics_server(self._exposition(cfg), p.host, p.port, web=self.web, limits=limits,
                              yield_to=self.poller.gate.wait)

    def _log_serving(self, cfg: Config, server: HTTPServer) -> None:
        web = self.web
        scheme = "http" if web is None else web.scheme
        auth = ", basic auth" if web is not None and web.users else ""
        host = cfg.prometheus.host
        where = "all addresses" if host == "" else "this address"
        url_host = "localhost" if host in ("", "0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
        log.info("serving %s://%s:%d/metrics (listening on %s, %s%s)", scheme, url_host, server.port,
                 server.address, where, auth)

    def reload(self, cfg: Config, web=None) -> None:
        """Apply a new Config (and web config) to the running service, all or nothing.

        A new listen address is bound before the old one is closed (when both want the
        same port, the old is closed first and restored if the new bind fails); an
        OSError from binding is raised with nothing changed. Poller settings (rules,
        interval, reader for families/netns/timeout/retries) are swapped by the poller
        thread at the top of its next poll, which follows at once. Changed Graphite
        settings (or poll.interval) replace the pusher (_reload_graphite); the new one is
        built first, so a ValueError from it also leaves everything unchanged.
        """
        old, old_web = self.cfg, self.web
        changed = changed_keys(old, cfg)
        rebuilt = features.changed_features(changed)
        new_features = self._build(cfg, [f for f in self.features if f.name not in rebuilt], changed)
        graphite_changed = any(k.startswith("graphite.") or k == "poll.interval" for k in changed) and (
            old.graphite.enabled or cfg.graphite.enabled)
        new_pusher = None
        if graphite_changed and cfg.graphite.enabled:
            from .graphite import Pusher

            # before anything changes (may raise ValueError)
            new_pusher = Pusher.from_config(cfg, max_series(new_features), len(new_features))
        self.web = web
        previous = self.features
        self.features = new_features
        try:
            self._reload_server(old, cfg)
        except OSError:
            self.web, self.features = old_web, previous
            raise
        needs = merge_needs(new_features)
        readers_changed = needs != self._needs or any(k in changed for k in _READER_KEYS)
        self._needs = needs
        readers = self._readers(cfg, needs, None if readers_changed else self.poller.readers)
        self.poller.reconfigure(features=new_features, readers=readers, interval=cfg.poll.interval)
        if graphite_changed:
            self._reload_graphite(new_pusher)
        self.cfg = cfg

    def _reload_graphite(self, new) -> None:
        """Replace the Graphite pusher by `new` (None: Graphite disabled), never blocking
        on the network. The new pusher takes over the old one's cadence (under the
        dispatch lock, so every poll goes to exactly one of them), then its queue (the
        lines keep the paths and timestamps they were rendered with) and its counters.
        When Graphite is disabled, the old pusher flushes in the background within its
        flush_timeout (Service.stop waits for that flush)."""
        old = self.graphite
        with self._dispatch_lock:
            subscribers = [cb for cb in self._subscribers
                           if old is None or getattr(cb, "__self__", None) is not old]
            if new is not None:
                if old is not None:
                    new.continue_from(old)
                subscribers.insert(0, new.on_poll)  # where Service.__init__ puts it
            self._subscribers = subscribers
        if old is None:  # enabled by this reload
            carry, self._graphite_carry = self._graphite_carry, None
            new.take_over([], carry.stats() if carry is not None else None)
            self.graphite = new
            new.start()
            return
        if new is None:  # disabled by this reload
            self._graphite_carry = old
            self.graphite = None
            flush = threading.Thread(target=old.close, name="sockscope-graphite-flush", daemon=True)
            flush.start()
            self._graphite_retired = [(t, d) for t, d in self._graphite_retired if t.is_alive()]
            self._graphite_retired.append((flush, time.monotonic() + old.flush_timeout + 1.0))
            log.info("graphite disabled: no more pushes to %s; %d queued lines are flushed in the "
                     "background (at most %gs)", old.destination, old.stats().queue_lines, old.flush_timeout)
            return
        chunks, stats = old.detach()
        taken = new.take_over(chunks, stats)
        self.graphite = new
        new.start()
        log.info("graphite: settings reloaded; %d queued lines taken over from %s (sent with the paths "
                 "they were rendered with)", taken, old.destination)

    def _reload_server(self, old: Config, cfg: Config) -> None:
        server = self.server
        if not cfg.prometheus.enabled:
            if server is not None:
                server.stop()
                self.server = None
                log.info("stopped serving /metrics (prometheus.enabled is false)")
            return
        same_server = replace(old.prometheus, listen_address="") == replace(cfg.prometheus, listen_address="")
        if server is not None and same_server:
            server.app.source = self._exposition(cfg)  # type: ignore[attr-defined]  # a MetricsApp; poll.stale_after, the features may have changed
            server.web = self.web
            return
        new = self._metrics_server(cfg)
        try:
            new.start()
        except OSError as e:
            # Linux refuses 127.0.0.1:P while we listen on [::]:P (and the reverse).
            if server is None or e.errno != errno.EADDRINUSE or cfg.prometheus.port != server.port:
                raise
            server.stop()
            try:
                new.start()
            except OSError:
                server.start()  # the port was ours a moment ago
                raise
        else:
            if server is not None:
                server.stop()
        self.server = new
        self._log_serving(cfg, new)

    def stop(self) -> None:
        # Bounded: a poller wedged in the kernel must not hold up the exit beyond
        # systemd's TimeoutStopSec; its thread is a daemon thread.
        self.poller.stop(timeout=min(self.cfg.poll.timeout, STOP_POLLER_WAIT))
        if self.graphite is not None:
            # No more polls: send what is queued within graphite.flush_timeout (logs what
            # it could not send). /metrics keeps serving meanwhile.
            self.graphite.close()
            self.graphite = None
        for flush, deadline in self._graphite_retired:  # disabled by a reload, still flushing
            flush.join(max(0.0, deadline - time.monotonic()))
        if self.server is not None:
            self.server.stop()
            self.server = None
