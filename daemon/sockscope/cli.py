"""Command line: `sockscope [run|snapshot|check-config|version]`, flags named like Go exporters."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping

from . import __version__, config
from .aggregate import Rules
from .netlink import NetlinkError, Reader
from .owners import owners_for
from .poller import poll_once
from .report import build_report, render_text
from .sdnotify import ServiceNotifier
from .service import Service, make_reader

log = logging.getLogger("sockscope")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
LISTEN_AND_CLOSE_WAIT = (1 << 10) | (1 << 8)  # kernel state bits, tcp_states.h


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config.file", dest="config_file", metavar="FILE",
                        help="YAML configuration (default: built-in defaults)")
    common.add_argument("--web.listen-address", dest="listen_address", metavar="ADDR",
                        help="address of /metrics, e.g. :9393 or 127.0.0.1:9393 "
                             "(overrides prometheus.listen_address)")
    common.add_argument("--log.level", dest="log_level", metavar="LEVEL",
                        help="debug, info, warning or error (overrides log.level)")
    common.add_argument("--log.format", dest="log_format", metavar="FORMAT",
                        help="text or json (overrides log.format)")
    common.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                        help="TLS and basic auth for /metrics, in the exporter-toolkit web "
                             "config format (re-read on SIGHUP)")
    common.add_argument("--netns", dest="netns", metavar="NAME|PATH",
                        help="read the sockets of this network namespace "
                             "(overrides poll.netns; needs CAP_SYS_ADMIN)")

    p = argparse.ArgumentParser(
        prog="sockscope",
        description="TCP socket states, queues and listen backlogs per port, from sock_diag.",
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"sockscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon (default)")
    snap = sub.add_parser("snapshot", parents=[common],
                          help="poll once and print a per-port summary")
    snap.add_argument("--json", action="store_true", help="print JSON for scripts")
    chk = sub.add_parser("check-config", help="validate a configuration file and exit")
    chk.add_argument("file")
    sub.add_parser("version", help="print the version")
    return p


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        # journald adds the time and the unit; keep lines plain.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _load(args) -> config.Config:
    cfg = config.load(args.config_file)
    return config.override(
        cfg, listen_address=args.listen_address, log_level=args.log_level, netns=args.netns,
        log_format=args.log_format,
    )


def _load_web(args):
    """The web config named by --web.config.file (None without the flag). Raises ConfigError."""
    if not args.web_config_file:
        return None
    from . import webconfig  # the only importer of ssl and bcrypt

    return webconfig.load(args.web_config_file)


def main(
    argv: list[str] | None = None,
    *,
    reader_factory: Callable[[config.Config], Reader] = make_reader,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The command line. reader_factory and environ (for NOTIFY_SOCKET, WATCHDOG_USEC) are
    injectable so tests can run the real daemon with a reader they control."""
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command == "version":
        print(f"sockscope {__version__}")
        return 0
    try:
        if command == "check-config":
            cfg = config.load(args.file)
            print(f"{args.file}: OK")
            return 0
        cfg = _load(args)
        web = _load_web(args) if command == "run" else None
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log.level, cfg.log.format)
    if command == "snapshot":
        return snapshot(cfg, as_json=args.json)
    return run(cfg, web=web, reload_config=lambda: (_load(args), _load_web(args)),
               reader_factory=reader_factory, environ=environ)


def snapshot(cfg: config.Config, *, as_json: bool) -> int:
    rules = Rules.from_config(cfg)
    with make_reader(cfg) as reader:
        try:
            snap, _ = poll_once(reader, rules)
            # A second, small dump for the sockets whose owners we name.
            records = list(reader.records(states=LISTEN_AND_CLOSE_WAIT))
        except NetlinkError as e:
            print(f"sockscope: {e}", file=sys.stderr)
            return EXIT_RUNTIME
    tracked = {p for p in snap.local.ports if isinstance(p, int)}
    owners = owners_for(records, tracked)
    report = build_report(snap, owners)
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(report))
    return 0


def run(
    cfg: config.Config,
    *,
    web=None,
    reload_config: Callable[[], tuple[config.Config, object]] | None = None,
    reader_factory: Callable[[config.Config], Reader] = make_reader,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The daemon until SIGTERM/SIGINT (exit 0); SIGHUP calls reload_config() and applies it.

    Signal handlers only queue the signal; the main thread acts on it, so logging and
    reconfiguring never run inside a handler.
    """
    wake = threading.Event()
    signals: list[int] = []

    def on_signal(signum, _frame):
        signals.append(signum)
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    systemd = ServiceNotifier.from_environ(environ)
    systemd.check_interval(cfg.poll.interval)
    service = Service(cfg, reader_factory=reader_factory, web=web)
    service.on_poll(systemd.on_poll)
    try:
        service.start()
    except OSError as e:
        log.error("%s", e)
        return EXIT_RUNTIME
    try:
        while True:
            wake.wait(1.0)
            wake.clear()
            while signals:
                signum = signals.pop(0)
                if signum == signal.SIGHUP:
                    _reload(service, reload_config, systemd)
                    continue
                log.info("received %s, shutting down", signal.Signals(signum).name)
                raise _Stop
    except _Stop:
        pass
    finally:
        systemd.stopping()
        service.stop()
    log.info("stopped")
    return 0


class _Stop(Exception):
    pass


def _reload(service: Service, reload_config, systemd: ServiceNotifier) -> None:
    if reload_config is None:
        log.warning("received SIGHUP but there is nothing to reload")
        return
    systemd.reloading()
    try:
        try:
            cfg, web = reload_config()
        except config.ConfigError as e:
            for problem in e.problems:
                log.error("reload: %s: %s", e.source, problem)
            log.error("reload refused (%d problem%s); the running configuration stays",
                      len(e.problems), "" if len(e.problems) == 1 else "s")
            return
        try:
            service.reload(cfg, web)
        except (OSError, ValueError) as e:  # ValueError: a Graphite path the builder refuses
            log.error("reload failed: %s; the running configuration stays", e)
            return
        setup_logging(cfg.log.level, cfg.log.format)
        systemd.check_interval(cfg.poll.interval)
        log.info("reloaded the configuration from %s", cfg.source)
    finally:
        systemd.reloaded()
