"""Command line: `sockscope [run|snapshot|check-config|version]`, flags named like Go exporters."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from . import __version__, config, report, survey, watch
from .aggregate import Rules
from .features import DumpNeed, PollContext
from .features.tcp_info import SnapshotInfo
from .features.units import SnapshotUnits
from .kernelstats import KernelStatsReader
from .netlink import NetlinkError, Reader
from .owners import port_owners
from .poller import dump_into
from .sdnotify import ServiceNotifier
from .service import Service, make_reader

log = logging.getLogger("sockscope")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


# (flag, dest, metavar, help) of the flags every command takes, before or after its name.
_COMMON_FLAGS = (
    ("--config.file", "config_file", "FILE", "YAML configuration (default: built-in defaults)"),
    ("--web.listen-address", "listen_address", "ADDR",
     "address of /metrics, e.g. :9393 or 127.0.0.1:9393 (overrides prometheus.listen_address)"),
    ("--log.level", "log_level", "LEVEL", "debug, info, warning or error (overrides log.level)"),
    ("--log.format", "log_format", "FORMAT",
     "text, json or journal (text with sd-daemon <N> priority prefixes; automatic when "
     "stderr is journald's stream, $JOURNAL_STREAM); overrides log.format"),
    ("--web.config.file", "web_config_file", "FILE",
     "TLS and basic auth for /metrics, in the exporter-toolkit web config format "
     "(re-read on SIGHUP)"),
    ("--netns", "netns", "NAME|PATH",
     "read the sockets of this network namespace (overrides poll.netns; needs CAP_SYS_ADMIN)"),
)

def _add_common(parser: argparse.ArgumentParser, *, in_command: bool) -> None:
    """The common flags. A command's copies default to SUPPRESS: argparse would otherwise
    write their default (None) over a value given before the command's name, so
    `sockscope --netns N snapshot` would read the host's table."""
    for flag, dest, metavar, text in _COMMON_FLAGS:
        parser.add_argument(flag, dest=dest, metavar=metavar, help=text,
                            default=argparse.SUPPRESS if in_command else None)


def _port_list(text: str) -> list[int]:
    ports = []
    for part in text.split(","):
        try:
            port = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a port number") from None
        if not 1 <= port <= 65535:
            raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
        ports.append(port)
    return ports


def _state_list(text: str) -> list[str]:
    for name in text.split(","):
        try:
            survey.state_mask(name)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name!r} is not a state; one of {', '.join(survey.STATE_FILTERS)}") from None
    return text.split(",")


def _positive(kind: type, *, zero: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= 0 if zero else value > 0) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(
                f"{text} is not a {'non-negative' if zero else 'positive'} number")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sockscope",
        description="TCP socket states, queues and listen backlogs per port, from sock_diag.",
        epilog="Flags may come before or after the command: `sockscope --netns N snapshot` "
               "and `sockscope snapshot --netns N` are the same.",
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=f"sockscope {__version__}")
    _add_common(p, in_command=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run_cmd = sub.add_parser("run", help="run the daemon (default)", allow_abbrev=False)
    _add_common(run_cmd, in_command=True)

    snap = sub.add_parser(
        "snapshot", allow_abbrev=False,
        help="per-port summary of the socket table for a person, like a summarised `ss`",
        description="One dump of the socket table as per-port tables: local ports "
                    "(listening and configured), the busiest remote ports, listeners and "
                    "their accept queues, CLOSE-WAIT and TIME-WAIT by peer, and the "
                    "processes holding the sockets (as root).",
    )
    _add_common(snap, in_command=True)
    snap.add_argument("--json", action="store_true", help="print JSON for scripts "
                      "(with --watch: one JSON object per line per frame)")
    snap.add_argument("--port", dest="ports", type=_port_list, action="append", default=[],
                      metavar="PORT[,PORT]",
                      help="only sockets with this local or remote port (repeatable), "
                           "like ss '( sport = :PORT or dport = :PORT )'")
    snap.add_argument("--state", dest="states", type=_state_list, action="append", default=[],
                      metavar="STATE[,STATE]",
                      help="only sockets in this state (repeatable; ss names: "
                           f"{', '.join(survey.STATE_FILTERS)}); the kernel filters the dump")
    snap.add_argument("--sort", choices=report.SORT_KEYS, default="sockets", metavar="KEY",
                      help="order of the port rows: sockets (default), port, recv-q, send-q "
                           "or a state name (most first)")
    snap.add_argument("--top", type=_positive(int), default=report.DEFAULT_TOP, metavar="N",
                      help="rows per port and peer table (default %(default)s); the rest is "
                           "summed in an `other` row")
    snap.add_argument("--watch", type=_positive(float), nargs="?", const=2.0, default=None,
                      metavar="SECONDS",
                      help="redraw every SECONDS (default 2) with the change since the last "
                           "frame and since the start; Ctrl-C stops")
    snap.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                      help="colour: auto (a terminal, unless NO_COLOR is set), always, never")
    snap.add_argument("--busy-interval", type=_positive(float, zero=True), default=1.0,
                      metavar="SECONDS",
                      help="with tcp_info.enabled in the configuration: the busy-time split "
                           "(network/receiver/send_buffer) is the growth between a first dump "
                           "and the snapshot's, SECONDS apart (default %(default)g; the "
                           "snapshot takes that much longer); 0: one dump, no split. With "
                           "--watch: the growth since the previous frame")

    chk = sub.add_parser(
        "check-config", allow_abbrev=False,
        help="validate a configuration file and/or a web config file, and exit",
        description="Validate the configuration FILE (or --config.file), the flags that "
                    "override it and the --web.config.file; print every problem and exit "
                    "with status 2 if there is any.",
    )
    _add_common(chk, in_command=True)
    chk.add_argument("file", nargs="?", help="the configuration file (same as --config.file)")
    sub.add_parser("version", help="print the version")
    return p


# sd-daemon(3) priority prefixes (syslog levels) that journald parses off each stdout/stderr
# line of a service (SyslogLevelPrefix=yes, the default), by logging level.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def priority(levelno: int) -> int:
    """The syslog priority of a logging level: <3> error, <4> warning, <6> info, <7> debug."""
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return _DEBUG_PRIORITY


def is_journal_stream(stream, environ: Mapping[str, str] | None = None) -> bool:
    """True if `stream` is the journald stream systemd connected (JOURNAL_STREAM=DEV:INODE
    names it, systemd.exec(5)); False when stderr was redirected elsewhere, e.g. to a file
    by a wrapper, even though the variable was inherited."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def setup_logging(level: str, fmt: str = "text", *, stream=None,
                  environ: Mapping[str, str] | None = None) -> None:
    """Log to stderr as text or JSON. `journal` is text with a priority prefix on every
    line; the prefix is also added to text and JSON when stderr is journald's stream."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    # journald adds the time and the unit; keep lines plain.
    formatter = _JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(levelname)s %(name)s: %(message)s")
    if fmt == "journal" or is_journal_stream(stream, environ):
        formatter = _JournalFormatter(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _JournalFormatter(logging.Formatter):
    """Prefixes EVERY line of a record (a traceback too) with the record's priority: journald
    stores each line as its own entry, so an unprefixed traceback line would land at info
    and `journalctl -p err` would show the error without its traceback."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


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
    reader_factory: Callable[[config.Config, DumpNeed], Reader] = make_reader,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The command line. reader_factory and environ (for NOTIFY_SOCKET, WATCHDOG_USEC) are
    injectable so tests can run the real daemon with a reader they control."""
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command == "version":
        print(f"sockscope {__version__}")
        return 0
    if command == "check-config":
        return check_config(args)
    try:
        cfg = _load(args)
        web = _load_web(args) if command == "run" else None
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:  # noqa: BLE001 - loading raises ConfigError only; never a traceback
        print(f"sockscope: cannot load the configuration: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log.level, cfg.log.format)
    if command == "snapshot":
        return snapshot(cfg, args)
    return run(cfg, web=web, reload_config=lambda: (_load(args), _load_web(args)),
               reader_factory=reader_factory, environ=environ)


def check_config(args) -> int:
    """`check-config [FILE] [--web.config.file W] [flags]`: every problem of the
    configuration file, of the flags that override it and of the web config file, printed
    all at once; exit status 2 if there is any."""
    path = args.file or args.config_file
    if args.file and args.config_file and args.file != args.config_file:
        print(f"check-config: FILE ({args.file}) and --config.file ({args.config_file}) "
              "name different files", file=sys.stderr)
        return EXIT_CONFIG
    if not path and not args.web_config_file:
        print("check-config: nothing to check: give a configuration FILE and/or "
              "--web.config.file FILE", file=sys.stderr)
        return EXIT_CONFIG
    errors: list[config.ConfigError] = []
    ok: list[str] = []
    try:
        cfg = config.load(path)
        if path:
            ok.append(f"{path}: OK")
    except config.ConfigError as e:
        errors.append(e)
        cfg = config.load(None)  # the flags are still checked, on the defaults
    try:
        config.override(cfg, listen_address=args.listen_address, log_level=args.log_level,
                        netns=args.netns, log_format=args.log_format)
    except config.ConfigError as e:
        errors.append(e)
    try:
        if _load_web(args) is not None:
            ok.append(f"{args.web_config_file}: OK (web config)")
    except config.ConfigError as e:
        errors.append(e)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        return EXIT_CONFIG
    print("\n".join(ok))
    return 0


# In watch mode the /proc scan for process owners takes at most 1/SCAN_BUDGET of the time.
SCAN_BUDGET = 5


def snapshot(cfg: config.Config, args, *, environ: Mapping[str, str] | None = None,
             out: TextIO | None = None) -> int:
    """`sockscope snapshot`: one frame, or a frame every --watch seconds."""
    environ = os.environ if environ is None else environ
    out = sys.stdout if out is None else out
    if config.sweeping(cfg):
        print("sockscope: snapshot reads one namespace; poll.netns/netns configure a sweep: give --netns NAME "
              "(or --netns /proc/1/ns/net for the host's)", file=sys.stderr)
        return EXIT_CONFIG
    netns = config.one_netns(cfg)
    flt = survey.Filter.of(ports=[p for group in args.ports for p in group],
                           states=[s for group in args.states for s in group])
    view = report.View(top=args.top, sort=args.sort, local=cfg.ports.local,
                       remote=cfg.ports.remote, netns=netns)
    rules = Rules.from_config(cfg)
    colour = not args.json and watch.use_colour(args.color, out, environ)
    terminal = args.watch is not None and not args.json and watch.is_terminal(out)
    # tcp_info.enabled: the same dump asks for INET_DIAG_INFO and the tcp_info fold runs on
    # it for every port (SnapshotInfo); its cookie state lives across dumps for the busy split.
    info = SnapshotInfo(rules) if cfg.tcp_info.enabled else None
    # units.enabled: the unit of each listener and of each port's CLOSE-WAIT sockets, from
    # the cgroup id every full socket's message carries (no privilege, nothing more asked).
    units = SnapshotUnits() if cfg.units.enabled else None
    also = tuple(f for f in (info, units) if f is not None)
    primed: list[bool] = []
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(make_reader(cfg, info.needs() if info else DumpNeed()))
        kernel = None
        if cfg.poll.kernel_stats:
            kernel = stack.enter_context(KernelStatsReader(netns))

        last_scan: list = []  # [(OwnerScan, monotonic time it ended)]

        def take() -> report.Frame:
            if info is not None and not primed and args.busy_interval:
                # the busy counters are cumulative per socket: one dump has no growth
                dump_into(reader, [info], PollContext(time.time(), time.monotonic()), info.needs())
                time.sleep(args.busy_interval)
            primed[:] = [True]
            s = survey.take(reader, flt, rules, also=also)
            local, remote = report.choose_ports(s, view)
            reuse = None
            if last_scan and args.watch is not None:
                scan, ended = last_scan[0]
                # A /proc scan costs ~5 us per fd of the host (~10 s at 1M sockets): in
                # watch mode it is repeated at most every SCAN_BUDGET x its own duration.
                if time.monotonic() - ended < max(args.watch, SCAN_BUDGET * scan.seconds):
                    reuse = scan
            owners, scan = port_owners(s.sockets_index, s.listener_inodes, local, remote,
                                       scan=reuse)
            if reuse is None:
                last_scan[:] = [(scan, time.monotonic())]
            return report.Frame(s.without_index(), owners, kernel.read() if kernel else None)

        def show(frame, last=None, start=None, number=None) -> str:
            rep = report.build_report(frame, view, last=last, start=start, frame_number=number,
                                      interval=args.watch)
            if args.json:
                return json.dumps(rep, indent=None if args.watch else 2)
            return report.render_text(rep, colour=colour)

        if args.watch is None:
            try:
                frame = take()
            except NetlinkError as e:
                print(f"sockscope: {e}", file=sys.stderr)
                return EXIT_RUNTIME
            except KeyboardInterrupt:  # Ctrl-C during a long /proc scan
                return EXIT_INTERRUPTED
            text = show(frame)
            out.write(text if text.endswith("\n") else text + "\n")
            return 0

        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda *_: stop.set())

        def failed(e: Exception) -> str | None:
            if not isinstance(e, NetlinkError):
                return None
            if args.json:
                return json.dumps({"error": str(e)})
            return f"sockscope snapshot: {e}\n(retrying every {args.watch:g}s; Ctrl-C stops)"

        return watch.run(take, show, interval=args.watch, out=out, terminal=terminal,
                         stop=stop, failed=failed, gap="" if args.json else "\n")


def run(
    cfg: config.Config,
    *,
    web=None,
    reload_config: Callable[[], tuple[config.Config, object]] | None = None,
    reader_factory: Callable[[config.Config, DumpNeed], Reader] = make_reader,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The daemon until SIGTERM/SIGINT (exit 0); SIGHUP calls reload_config() and applies it;
    SIGUSR1 logs a status line; SIGUSR2 is ignored (their default action would kill us).

    Signal handlers only queue the signal; the main thread acts on it, so logging and
    reconfiguring never run inside a handler. The main thread also checks every second that
    the poller thread is alive: if it ever ended, the daemon exits with status 1 so that
    systemd (Restart=on-failure) starts a fresh one instead of serving a frozen table.
    """
    wake = threading.Event()
    signals: list[int] = []

    def on_signal(signum, _frame):
        signals.append(signum)
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
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
    status = 0
    try:
        while True:
            wake.wait(1.0)
            wake.clear()
            while signals:
                got = signals.pop(0)
                if got == signal.SIGHUP:
                    _reload(service, reload_config, systemd)
                elif got == signal.SIGUSR1:
                    log.info("%s", _status_line(service))
                elif got == signal.SIGUSR2:
                    log.debug("received SIGUSR2: ignored (SIGUSR1 logs a status line)")
                else:
                    log.info("received %s, shutting down", signal.Signals(got).name)
                    raise _Stop
            if service.poller.ended_unexpectedly:
                log.critical("the poller thread ended unexpectedly; exiting with status %d so that "
                             "systemd restarts sockscope", EXIT_RUNTIME)
                status = EXIT_RUNTIME
                raise _Stop
    except _Stop:
        pass
    finally:
        systemd.stopping()
        service.stop()
    log.info("stopped")
    return status


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
                      e.count, "" if e.count == 1 else "s")
            return
        except Exception as e:  # noqa: BLE001 - loading raises ConfigError only; a bug must not kill us
            log.error("reload refused: cannot load the configuration: %s: %s; the running "
                      "configuration stays", type(e).__name__, e, exc_info=e)
            return
        try:
            service.reload(cfg, web)
        except (OSError, ValueError) as e:  # ValueError: a Graphite path the builder refuses
            log.error("reload failed: %s; the running configuration stays", e)
            return
        except Exception as e:  # noqa: BLE001 - Service.reload is all or nothing only for the above
            log.error("reload failed: %s: %s; the configuration may be partly applied",
                      type(e).__name__, e, exc_info=e)
            return
        setup_logging(cfg.log.level, cfg.log.format)
        systemd.check_interval(cfg.poll.interval)
        log.info("reloaded the configuration from %s", cfg.source)
    except Exception as e:  # noqa: BLE001 - logging setup or the notifier: keep running
        log.error("reload: %s: %s", type(e).__name__, e, exc_info=e)
    finally:
        systemd.reloaded()


def _status_line(service: Service, monotonic: Callable[[], float] = time.monotonic) -> str:
    """The SIGUSR1 line: polls, errors, age of the last good poll, sockets, Graphite queue."""
    st = service.poller.status()
    parts = [f"{st.polls} polls ({st.errors} failed)"]
    if st.last_success_monotonic is None:
        parts.append("no good poll yet")
    else:
        parts.append(f"last good poll {monotonic() - st.last_success_monotonic:.1f}s ago")
    snap = st.snapshot
    if snap is not None:
        parts.append(f"{snap.sockets} sockets, {len(snap.listeners)} listening addresses")
    if st.last_error is not None:
        parts.append(f"last error: {st.last_error}")
    pusher = service.graphite
    if pusher is not None:
        g = pusher.stats()
        parts.append(f"graphite queue {g.queue_lines} of {g.capacity_lines} lines "
                     f"({g.sent_lines} sent, {g.dropped_lines} dropped)")
    return "status: " + "; ".join(parts)
