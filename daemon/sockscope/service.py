"""The running daemon: wires the poller to its consumers and owns their lifecycle.

Consumers of polls (exporters, the systemd watchdog) subscribe with `on_poll(callback)`;
each callback runs in the poller thread after every poll with the new PollStatus and must
return quickly (hand work to its own thread). Scrapes read `poller.status()` directly.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from . import __version__
from .aggregate import Rules
from .config import Config
from .kernelstats import KernelStatsReader
from .netlink import Reader
from .peaks import PeakTracker
from .poller import Poller
from .snapshot import PollStatus

log = logging.getLogger("sockscope")

STOP_POLLER_WAIT = 5.0  # seconds stop() waits for the poll in progress


def make_reader(cfg: Config) -> Reader:
    return Reader(
        cfg.poll.families,
        netns=cfg.poll.netns,
        timeout=cfg.poll.timeout,
        dump_retries=cfg.poll.dump_retries,
    )


class Service:
    def __init__(
        self, cfg: Config, *, reader_factory: Callable[[Config], Reader] = make_reader,
        web=None,
    ):
        self.cfg = cfg
        self.web = web  # webconfig.WebConfig (TLS, basic auth) or None
        self._reader_factory = reader_factory
        self._subscribers: list[Callable[[PollStatus], None]] = []
        self.poller = Poller(
            reader_factory(cfg), Rules.from_config(cfg), cfg.poll.interval,
            on_poll=self._dispatch,
            peaks=PeakTracker(cfg.poll.peak_window) if cfg.poll.peak_window else None,
            kernel=KernelStatsReader(cfg.poll.netns) if cfg.poll.kernel_stats else None,
        )
        self.server = None
        self.graphite = None  # graphite.Pusher when graphite.enabled
        if cfg.graphite.enabled:
            from .graphite import Pusher

            self.graphite = Pusher.from_config(cfg)
            self.on_poll(self.graphite.on_poll)

    def on_poll(self, callback: Callable[[PollStatus], None]) -> None:
        self._subscribers.append(callback)

    def _dispatch(self, status: PollStatus) -> None:
        for callback in self._subscribers:
            try:
                callback(status)
            except Exception:  # noqa: BLE001 - one consumer must not stop the poller
                log.exception("poll consumer %r failed", callback)

    def start(self) -> None:
        """Bind the HTTP port (raises OSError), then start polling."""
        cfg = self.cfg
        if cfg.prometheus.enabled:
            self.server = self._metrics_server(cfg)
            self.server.start()
            self._log_serving(cfg)
        where = f" in network namespace {cfg.poll.netns}" if cfg.poll.netns else ""
        log.info(
            "sockscope %s polling %s sockets%s every %gs (pid %d)",
            __version__, "+".join(cfg.poll.families), where, cfg.poll.interval, os.getpid(),
        )
        if self.graphite is not None:
            self.graphite.start()
        self.poller.start()

    def _registry(self, cfg: Config):
        from .prometheus import GraphiteCollector, SnapshotCollector, make_registry

        collectors = [SnapshotCollector(self.poller.status, cfg.poll.stale_after)]
        if self.graphite is not None:
            collectors.append(GraphiteCollector(self.graphite.stats))
        return make_registry(*collectors)

    def _metrics_server(self, cfg: Config):
        from .prometheus import MetricsServer

        return MetricsServer(self._registry(cfg), cfg.prometheus.host, cfg.prometheus.port, web=self.web)

    def _log_serving(self, cfg: Config) -> None:
        web = self.web
        scheme = "http" if web is None else web.scheme
        auth = ", basic auth" if web is not None and web.users else ""
        log.info("serving /metrics on %s://%s (port %d%s)", scheme, cfg.prometheus.listen_address,
                 self.server.port, auth)

    def reload(self, cfg: Config, web=None) -> None:
        """Apply a new Config (and web config) to the running service, all or nothing.

        A new listen address is bound before the old one is closed (when both want the
        same port, the old is closed first and restored if the new bind fails); an
        OSError from binding is raised with nothing changed. Poller settings (rules,
        interval, reader for families/netns/timeout/retries) are swapped by the poller
        thread at the top of its next poll, which follows at once.
        """
        old, old_web = self.cfg, self.web
        self.web = web
        try:
            self._reload_server(old, cfg)
        except OSError:
            self.web = old_web
            raise
        changes: dict[str, object] = {"rules": Rules.from_config(cfg), "interval": cfg.poll.interval}
        reader_keys = ("families", "netns", "timeout", "dump_retries")
        if any(getattr(old.poll, k) != getattr(cfg.poll, k) for k in reader_keys):
            changes["reader"] = self._reader_factory(cfg)
        if old.poll.peak_window != cfg.poll.peak_window:
            changes["peaks"] = PeakTracker(cfg.poll.peak_window) if cfg.poll.peak_window else None
        if (old.poll.kernel_stats, old.poll.netns) != (cfg.poll.kernel_stats, cfg.poll.netns):
            changes["kernel"] = KernelStatsReader(cfg.poll.netns) if cfg.poll.kernel_stats else None
        self.poller.reconfigure(**changes)
        if (old.graphite, old.poll.interval) != (cfg.graphite, cfg.poll.interval) and (
                old.graphite.enabled or cfg.graphite.enabled):
            # The pusher keeps its queue, connection and settings: rebuilding it would mean
            # a bounded flush inside reload. Documented in docs/graphite.md.
            log.warning("graphite settings (or poll.interval) changed: the Graphite push keeps its "
                        "current settings until sockscope restarts")
        self.cfg = cfg

    def _reload_server(self, old: Config, cfg: Config) -> None:
        server = self.server
        if not cfg.prometheus.enabled:
            if server is not None:
                server.stop()
                self.server = None
                log.info("stopped serving /metrics (prometheus.enabled is false)")
            return
        same_address = (old.prometheus.host, old.prometheus.port) == (cfg.prometheus.host, cfg.prometheus.port)
        if server is not None and same_address:
            server.registry = self._registry(cfg)  # poll.stale_after may have changed
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
        self._log_serving(cfg)

    def stop(self) -> None:
        # Bounded: a poller wedged in the kernel must not hold up the exit beyond
        # systemd's TimeoutStopSec; its thread is a daemon thread.
        self.poller.stop(timeout=min(self.cfg.poll.timeout, STOP_POLLER_WAIT))
        if self.graphite is not None:
            # No more polls: send what is queued within graphite.flush_timeout (logs what
            # it could not send). /metrics keeps serving meanwhile.
            self.graphite.close()
            self.graphite = None
        if self.server is not None:
            self.server.stop()
            self.server = None
