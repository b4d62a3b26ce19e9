"""The running daemon: wires the poller to its consumers and owns their lifecycle.

Consumers of polls (exporters, the systemd watchdog) subscribe with `on_poll(callback)`;
each callback runs in the poller thread after every poll with the new PollStatus and must
return quickly (hand work to its own thread). Scrapes read `poller.status()` directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from . import __version__
from .aggregate import Rules
from .config import Config
from .netlink import Reader
from .poller import Poller
from .snapshot import PollStatus

log = logging.getLogger("sockscope")


def make_reader(cfg: Config) -> Reader:
    return Reader(
        cfg.poll.families,
        netns=cfg.poll.netns,
        timeout=cfg.poll.timeout,
        dump_retries=cfg.poll.dump_retries,
    )


class Service:
    def __init__(
        self, cfg: Config, *, reader_factory: Callable[[Config], Reader] = make_reader
    ):
        self.cfg = cfg
        self._subscribers: list[Callable[[PollStatus], None]] = []
        self.poller = Poller(
            reader_factory(cfg), Rules.from_config(cfg), cfg.poll.interval,
            on_poll=self._dispatch,
        )
        self.server = None

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
            from .prometheus import MetricsServer, SnapshotCollector, make_registry

            registry = make_registry(SnapshotCollector(self.poller.status, cfg.poll.stale_after))
            self.server = MetricsServer(registry, cfg.prometheus.host, cfg.prometheus.port)
            self.server.start()
            log.info("serving /metrics on %s (port %d)", cfg.prometheus.listen_address,
                     self.server.port)
        where = f" in network namespace {cfg.poll.netns}" if cfg.poll.netns else ""
        log.info(
            "sockscope %s polling %s sockets%s every %gs (pid %d)",
            __version__, "+".join(cfg.poll.families), where, cfg.poll.interval, os.getpid(),
        )
        self.poller.start()

    def stop(self) -> None:
        self.poller.stop(timeout=self.cfg.poll.timeout)
        if self.server is not None:
            self.server.stop()
            self.server = None
