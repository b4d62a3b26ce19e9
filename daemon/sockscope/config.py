"""Configuration: YAML in, a validated frozen Config out.

The only module that imports yaml. Validation is driven by the _SECTIONS table: each
section lists its fields (name, kind, default) and cross-field checks; one walker applies
them and collects every problem, each prefixed by its key path, before raising a single
ConfigError. Adding a section = a dataclass, a _Section entry and a Config field.

A "kind" is a function raw YAML value -> parsed value that raises ValueError with a
message (or _ItemProblems for per-element messages of a list).

Files are untrusted input (docs/configuration.md, "File rules"): read_yaml reads regular
files only, at most MAX_FILE_BYTES, without blocking on a FIFO; the YAML loader refuses
documents nested deeper than MAX_DEPTH or expanding (aliases counted each time they are
used) to more than MAX_NODES nodes; every exception of parsing or constructing becomes a
ConfigError; messages show values bounded in length (_show), never in full.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Any, Callable, NoReturn

import yaml

__all__ = [
    "DEFAULTS",
    "FLAGS",
    "KEY_PATHS",
    "Config",
    "ConfigError",
    "GraphiteConfig",
    "ListenersConfig",
    "LogConfig",
    "PollConfig",
    "PortsConfig",
    "PrometheusConfig",
    "UdpConfig",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "file_problem",
    "from_mapping",
    "key_text",
    "load",
    "override",
    "parse_duration",
    "parse_listen_address",
    "read_file",
    "read_yaml",
    "show_value",
]


MAX_FILE_BYTES = 1 << 20  # a config listing 8,192 ports is ~60 KiB
MAX_DEPTH = 32  # nested nodes; sockscope's own files need 4. Far below the recursion limit.
MAX_NODES = 20_000  # YAML nodes after alias expansion; 8,192 ports + every key is ~8,300
MAX_SHOWN_PROBLEMS = 50  # problems listed (and logged on reload); the rest are counted


class ConfigError(Exception):
    """Every problem found in one configuration source, each "key.path: message".

    `count` is the number of problems; `problems` lists at most MAX_SHOWN_PROBLEMS of them
    and then one line saying how many more there were."""

    def __init__(self, problems: list[str] | str, source: str = "<config>") -> None:
        problems = [problems] if isinstance(problems, str) else list(problems)
        self.count = len(problems)
        self.problems = problems[:MAX_SHOWN_PROBLEMS]
        if self.count > MAX_SHOWN_PROBLEMS:
            self.problems.append(f"... and {self.count - MAX_SHOWN_PROBLEMS} more problems")
        self.source = source
        head = f"{source}: {self.count} problem{'' if self.count == 1 else 's'}:"
        super().__init__("\n".join([head, *("  " + p for p in self.problems)]))


@dataclass(frozen=True, slots=True)
class PollConfig:
    interval: float
    stale_after: float  # resolved: 3 * interval when configured as 0
    timeout: float
    families: tuple[str, ...]
    # None = the daemon's own namespace; a tuple (a YAML list) = a sweep of those, each
    # series labelled netns (docs/design.md "Many network namespaces"); see sweeping()
    netns: str | tuple[str, ...] | None
    dump_retries: int
    peak_window: float  # 0 = no window peaks
    kernel_stats: bool


@dataclass(frozen=True, slots=True)
class NetnsConfig:
    """The sweep of many network namespaces (docs/configuration.md, section netns)."""

    discover: tuple[str, ...]  # "run": every /run/netns entry; "processes": distinct /proc/*/ns/net
    max_tracked: int  # namespaces polled at most; the rest counted in sockscope_netns_folded
    host: bool  # the daemon's own namespace too, as netns="host"
    rediscover: float  # seconds between two discoveries


@dataclass(frozen=True, slots=True)
class PortsConfig:
    auto_listen: bool
    local: tuple[int, ...]
    remote: tuple[int, ...]
    max_local: int
    max_remote: int


@dataclass(frozen=True, slots=True)
class ListenersConfig:
    max_tracked: int


@dataclass(frozen=True, slots=True)
class UdpConfig:
    enabled: bool
    auto_bound: bool  # track every local port with an unconnected socket (ss -ul)
    local_ports: tuple[int, ...]
    max_local_ports: int


@dataclass(frozen=True, slots=True)
class TcpInfoConfig:
    enabled: bool  # ask the TCP dump for tcp_info (INET_DIAG_INFO): wait times, RTT, limited-by


@dataclass(frozen=True, slots=True)
class ConnectionsConfig:
    enabled: bool  # per-port traffic/retransmit/close counters from tcp_info + close notifications
    max_sockets: int  # sockets the per-cookie ledger follows at most
    max_pending_events: int  # close events held between two polls at most
    receive_buffer: int  # bytes asked for the close-notification socket (SO_RCVBUFFORCE / SO_RCVBUF)


@dataclass(frozen=True, slots=True)
class OwnersConfig:
    enabled: bool  # process owners of listeners and CLOSE-WAIT sockets (/proc/PID/fd scan; privileged)
    interval: int  # polls between two /proc scans at most (the last answer is reused in between)
    max_per_listener: int  # (process, unit) series per listening address at most
    max_scan_time: float  # seconds of /proc reading per poll; a longer scan goes on at the next polls


@dataclass(frozen=True, slots=True)
class UnitsConfig:
    enabled: bool  # TCP sockets per systemd unit / container, from each socket's cgroup id
    max_tracked: int  # units with series (the most sockets first); the rest under unit="other"


@dataclass(frozen=True, slots=True)
class PrometheusConfig:
    enabled: bool
    listen_address: str
    max_connections: int  # open client connections; past it the longest-waiting idle one closes
    workers: int  # threads answering requests
    request_timeout: float  # TLS handshake + request head
    idle_timeout: float  # keep-alive wait for the next request
    write_timeout: float  # a response must be taken within this
    host: str  # "" = all addresses; an IPv6 literal has no brackets
    port: int


@dataclass(frozen=True, slots=True)
class GraphiteConfig:
    enabled: bool
    address: str
    protocol: str  # "tcp" | "udp"
    prefix: str  # "" = the naming's default (see docs/graphite.md)
    host: str  # host name in collectd paths and the host tag; {hostname}/{fqdn} expanded at start
    naming: str  # "sockscope" | "collectd"
    tags: bool
    interval: float  # 0 = every poll; else a multiple of poll.interval
    buffer_lines: int  # 0 = sized for 30 minutes of outage (graphite.default_buffer_lines)
    connect_timeout: float
    send_timeout: float
    flush_timeout: float
    server_host: str  # from address; an IPv6 literal has no brackets
    server_port: int


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class Config:
    poll: PollConfig
    netns: NetnsConfig
    ports: PortsConfig
    listeners: ListenersConfig
    udp: UdpConfig
    tcp_info: TcpInfoConfig
    connections: ConnectionsConfig
    owners: OwnersConfig
    units: UnitsConfig
    prometheus: PrometheusConfig
    graphite: GraphiteConfig
    log: LogConfig
    # Where the values came from. Not compared: the same settings from two files are equal.
    source: str = field(default="<defaults>", compare=False)


# --- value display -----------------------------------------------------------------

_TYPE_NAMES = (
    (bool, "a boolean"),  # before int: bool is a subclass of int
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "a mapping"),
)


_SHOW_MAX = 60


def _show(value: Any, limit: int = _SHOW_MAX) -> str:
    """A value as the user wrote it in YAML, shortened to `limit` characters.

    Bounded in time and memory whatever the value: a list that aliases expand to millions
    of elements or a 4,000-digit integer is never rendered in full (repr() would be)."""
    text = _repr_prefix(value, limit + 1)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _repr_prefix(value: Any, budget: int) -> str:
    """repr-like text of value, complete or at least `budget` characters of its start."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 200:  # ~60 digits; str() of a huge int is quadratic
            return f"<an integer of {value.bit_length()} bits>"
        return repr(value)
    if isinstance(value, (str, bytes)):
        return repr(value[:budget])
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        opening, closing = ("{", "}") if isinstance(value, (dict, set, frozenset)) else ("[", "]")
        parts, used = [], 1
        items = value.items() if isinstance(value, dict) else value
        for item in items:
            if used >= budget:
                parts.append("...")
                break
            if isinstance(value, dict):
                text = _repr_prefix(item[0], budget - used) + ": " + _repr_prefix(item[1], budget - used)
            else:
                text = _repr_prefix(item, budget - used)
            parts.append(text)
            used += len(text) + 2
        return opening + ", ".join(parts) + closing
    if isinstance(value, float) or type(value).__module__ == "datetime":
        return repr(value)
    return f"<{type(value).__name__}>"


def _key_text(key: Any) -> str:
    """A mapping key as written in a key path: plain when it is a short printable string."""
    if isinstance(key, str) and 0 < len(key) <= _SHOW_MAX and key.isprintable() and key.strip() == key:
        return key
    return _show(key)


show_value = _show  # for the web config's messages (webconfig.py)
key_text = _key_text


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    name = next((n for t, n in _TYPE_NAMES if isinstance(value, t)), type(value).__name__)
    return f"{name} ({_show(value)})"


def _expect(value: Any, kind: type, what: str) -> None:
    # bool is a subclass of int, but YAML `true` is never accepted as a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"expected {what}, got {_describe(value)}")


def _format_seconds(seconds: float) -> str:
    """5s, 100ms, 24h, 1m30s, 2.5s: whole hours and minutes as such, below 1s in ms."""
    if 0 < seconds < 1 and round(seconds * 1000, 9).is_integer():
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and float(seconds).is_integer():
        h, rest = divmod(int(seconds), 3600)
        m, sec = divmod(rest, 60)
        return "".join(f"{n}{unit}" for n, unit in ((h, "h"), (m, "m"), (sec, "s")) if n)
    return f"{seconds:g}s"


# --- public parsers ------------------------------------------------------------------

_DURATION_UNITS = {"h": Decimal(3600), "m": Decimal(60), "s": Decimal(1), "ms": Decimal("0.001")}
# ASCII digits only: \d would also take "٥" (ARABIC-INDIC FIVE) as a 5.
_DURATION_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_DURATION_PART = re.compile(rf"({_DURATION_NUMBER})(ms|h|m|s)")
_DURATION_HINT = "use seconds (5, 1.5) or a string like 500ms, 5s, 1m30s, 2h"
_DURATION_MAX_TEXT = 64  # characters; "1h2m3.123456s" is 13
_ASCII_SPACE = " \t\r\n\f\v"


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds or a string like 500ms, 5s, 1.5s, 1m30s, 2h.

    Units go from largest to smallest, each at most once. Raises ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a duration, got {_describe(value)}; {_DURATION_HINT}")
    if isinstance(value, str):
        seconds = _parse_duration_string(value)
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"{_show(value)} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{_show(value)} is negative; durations must be >= 0")
    return seconds


def _parse_duration_string(text: str) -> float:
    stripped = text.strip(_ASCII_SPACE)
    if len(stripped) > _DURATION_MAX_TEXT:
        raise ValueError(f"{_show(text)}: {len(stripped)} characters is too long for a duration; {_DURATION_HINT}")
    if stripped.startswith("-"):
        raise ValueError(f"{_show(text)} is negative; durations must be >= 0")
    pos, total, order = 0, Decimal(0), list(_DURATION_UNITS)
    last_rank = -1
    while pos < len(stripped):
        match = _DURATION_PART.match(stripped, pos)
        if not match:
            missing_unit = re.fullmatch(_DURATION_NUMBER, stripped[pos:])
            reason = "a number needs a unit" if missing_unit else "not a duration"
            raise ValueError(f"{_show(text)}: {reason}; {_DURATION_HINT}")
        number, unit = match.groups()
        rank = order.index(unit)
        if rank <= last_rank:
            raise ValueError(f"{_show(text)}: units must go from largest to smallest, each once (e.g. 1h2m3s)")
        last_rank = rank
        total += Decimal(number) * _DURATION_UNITS[unit]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"empty duration; {_DURATION_HINT}")
    return float(total)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
_LISTEN_FORMS = "expected host:port, :port or [v6addr]:port"
_LISTEN_MAX = 260  # a 253-character hostname, ':' and a port


def parse_listen_address(value: str) -> tuple[str, int]:
    """(host, port) from "host:port", ":port" or "[v6addr]:port". host "" = all addresses.

    host is an IP literal or a syntactically valid hostname; an IPv6 literal must be in
    brackets and is returned without them. Port 1-65535. Raises ValueError.
    """
    _expect(value, str, "a string")
    if len(value) > _LISTEN_MAX:
        raise ValueError(f"{_show(value)}: {len(value)} characters is too long (at most {_LISTEN_MAX})")
    if not (value.isascii() and value.isprintable()):
        # Also the IPv6 scope (%eth0), which ipaddress takes as any text.
        raise ValueError(f"{_show(value)}: only printable ASCII characters are allowed; {_LISTEN_FORMS}")
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise ValueError(f"{value!r}: missing ']' after the IPv6 address")
        host, rest = value[1:close], value[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"{value!r}: missing ':port' after ']'; {_LISTEN_FORMS}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon and _PORT_DIGITS.fullmatch(value):
            raise ValueError(f"{value!r}: missing ':' (write ':{value}' for all addresses)")
        if not colon:
            raise ValueError(f"{value!r}: missing port; {_LISTEN_FORMS}")
        if ":" in host:
            raise ValueError(f"{value!r}: an IPv6 address must be in brackets, e.g. [::1]:9393")
        _check_host(value, host)
    if port_text == "":
        raise ValueError(f"{value!r}: missing port after ':'")
    if not _PORT_DIGITS.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port {port_text!r} is not a port (1-65535)")
    return host, int(port_text)


def _check_host(value: str, host: str) -> None:
    if host == "":
        return
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv4 address") from None
        return
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{value!r}: {host!r} is not an IP address or a valid hostname")


# --- kinds: raw YAML value -> parsed value, or ValueError ------------------------------

Kind = Callable[[Any], Any]


class _ItemProblems(ValueError):
    """Problems with elements of a list: (suffix such as "[2]", message) pairs."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        super().__init__(items)
        self.items = items


def _boolean(value: Any) -> bool:
    _expect(value, bool, "true or false")
    return value


def _integer(lo: int, hi: int, noun: str | None = None) -> Kind:
    def parse(value: Any) -> int:
        _expect(value, int, "an integer")
        if not lo <= value <= hi:
            shown = _show(value)
            raise ValueError(f"{shown} is not a {noun} ({lo}-{hi})" if noun else f"{shown} is out of range ({lo}-{hi})")
        return value

    return parse


def _duration(*, allow_zero: bool = False, at_least: tuple[float, str] | None = None,
              at_most: float | None = None) -> Kind:
    """at_least: (seconds, why) for a non-zero value."""

    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds == 0 and not allow_zero:
            raise ValueError(f"must be > 0, got {_show(value)}")
        if at_least is not None and 0 < seconds < at_least[0]:
            raise ValueError(f"{_show(value)} is too short (at least {_format_seconds(at_least[0])}: {at_least[1]})")
        if at_most is not None and seconds > at_most:
            raise ValueError(f"{_show(value)} is too long (at most {_format_seconds(at_most)})")
        return seconds

    return parse


def _choice(*options: str, fold_case: bool = False) -> Kind:
    def parse(value: Any) -> str:
        _expect(value, str, "a string")
        key = value.lower() if fold_case else value
        if key not in options:
            raise ValueError(f"{_show(value)} is not one of {', '.join(options)}")
        return key

    return parse


def _list_of(item: Kind, *, nonempty: bool = False) -> Kind:
    """A list without duplicates, as a tuple; each element is reported by its index."""

    def parse(value: Any) -> tuple:
        _expect(value, list, "a list")
        if nonempty and not value:
            raise ValueError("must not be empty")
        problems: list[tuple[str, str]] = []
        first_at: dict[Any, int] = {}
        for index, element in enumerate(value):
            try:
                parsed = item(element)
            except ValueError as exc:
                problems.append((f"[{index}]", str(exc)))
                continue
            if parsed in first_at:
                problems.append((f"[{index}]", f"{_show(element)} is listed twice (first at [{first_at[parsed]}])"))
            else:
                first_at[parsed] = index
        if problems:
            raise _ItemProblems(problems)
        return tuple(first_at)  # dicts keep insertion order

    return parse


_NAME_MAX = 255  # bytes in one file name (limits.h NAME_MAX)
_PATH_MAX = 4095  # bytes in a path, without the NUL that PATH_MAX (4096) counts


def _netns(value: Any) -> str | tuple[str, ...] | None:
    """One name or path (today's single namespace, no netns label), or a list of them
    (a sweep: every series labelled netns)."""
    if isinstance(value, list):
        names = _list_of(_one_netns, nonempty=True)(value)
        if len(names) > _MAX_NETNS_LIST:
            raise ValueError(f"{len(names)} namespaces listed; at most {_MAX_NETNS_LIST}")
        return names
    _expect(value, str, "a string or a list of names/paths")
    return _one_netns(value, empty_ok=True)


_MAX_NETNS_LIST = 4096  # netns.max_tracked's upper bound


def _one_netns(value: Any, empty_ok: bool = False) -> str | None:
    _expect(value, str, "a string")
    if value == "" and not empty_ok:
        raise ValueError("must not be empty (give a name from /run/netns or an absolute path)")
    if value == "":
        return None
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate ("\ud800" in a double-quoted YAML string) names no file.
        raise ValueError(f"{_show(value)}: character {exc.start} cannot be encoded (not a file name)") from None
    if not value.isprintable():
        raise ValueError(f"{_show(value)}: must not contain a newline or another control character")
    if value.startswith("/"):
        if len(encoded) > _PATH_MAX:
            raise ValueError(f"{_show(value)}: {len(encoded)} bytes is too long for a path (at most {_PATH_MAX})")
        if any(len(part.encode()) > _NAME_MAX for part in value.split("/")):
            raise ValueError(f"{_show(value)}: a path component is longer than {_NAME_MAX} bytes")
        return value
    if "/" in value:
        raise ValueError(f"{_show(value)}: give a name from /run/netns or an absolute path (like /proc/PID/ns/net)")
    if value in (".", ".."):
        raise ValueError(f"{_show(value)} is not a namespace name")
    if len(encoded) > _NAME_MAX:
        raise ValueError(f"{_show(value)}: {len(encoded)} bytes is too long for a name in /run/netns (at most {_NAME_MAX})")
    return value


def _listen_address(value: Any) -> str:
    parse_listen_address(value)
    return value


_PORT = _integer(1, 65535, "port")
_MAX_DURATION = 86400.0  # one day; larger waits overflow threading/socket timeouts
_MAX_STALE_AFTER = 3 * _MAX_DURATION  # the default, 3 x poll.interval, fits
# A poll costs ~5-10 ms of CPU even on a small table (docs/performance.md): 1ms polled
# 170 times a second at 89% of a core.
_MIN_POLL_INTERVAL = (0.1, "a poll costs ~5-10 ms of CPU even on a small table")


# --- the schema --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kind: Kind
    default: Any  # raw, as it would be written in YAML; parsed by kind like user input


@dataclass(frozen=True, slots=True)
class _Check:
    """A rule over several already-valid fields; rule returns a message or None."""

    uses: tuple[str, ...]
    reports: str  # the key the message is filed under
    rule: Callable[..., str | None]


@dataclass(frozen=True, slots=True)
class _Section:
    name: str
    build: type
    fields: tuple[_Field, ...]
    checks: tuple[_Check, ...] = ()
    # values -> constructor kwargs. Must be idempotent on values taken back from a built
    # section, because override() rebuilds sections from their current values.
    derive: Callable[[dict[str, Any]], dict[str, Any]] = dict


def _stale_after_rule(interval: float, stale_after: float) -> str | None:
    if stale_after and stale_after < interval:
        return (
            f"{_format_seconds(stale_after)} is less than poll.interval ({_format_seconds(interval)});"
            " use 0 for 3 x interval"
        )
    return None


def _peak_window_rule(interval: float, peak_window: float) -> str | None:
    if peak_window and peak_window < interval:
        return (
            f"{_format_seconds(peak_window)} is less than poll.interval ({_format_seconds(interval)});"
            " use 0 to turn window peaks off"
        )
    return None


def _cap_check(side: str) -> _Check:
    def rule(ports: tuple[int, ...], cap: int) -> str | None:
        if len(ports) > cap:
            return f"{len(ports)} ports listed but ports.max_{side} is {cap}"
        return None

    return _Check((side, f"max_{side}"), side, rule)


def _derive_poll(values: dict[str, Any]) -> dict[str, Any]:
    return values | {"stale_after": values["stale_after"] or 3 * values["interval"]}


def sweeping(cfg: Config) -> bool:
    """True when the daemon sweeps namespaces (each series labelled netns): poll.netns is
    a list, or netns.discover / netns.host ask for it. One poll.netns name (the file's or
    --netns) reads that namespace alone, as before."""
    netns = cfg.poll.netns
    return isinstance(netns, tuple) or (netns is None and (bool(cfg.netns.discover) or cfg.netns.host))


def one_netns(cfg: Config) -> str | None:
    """poll.netns of a configuration that is not a sweep (a lane's, or a single one)."""
    netns = cfg.poll.netns
    if isinstance(netns, tuple):
        raise ValueError("poll.netns lists namespaces: this reads one (a sweep's lane has one)")
    return netns


def _netns_problems(poll: PollConfig, netns: NetnsConfig) -> list[tuple[str, str]]:
    """poll.netns against the netns section (two sections: checked after both are built)."""
    problems = []
    if isinstance(poll.netns, str) and (netns.discover or netns.host):
        problems.append(("poll.netns", f"{_show(poll.netns)} names one namespace but netns.discover/netns.host ask "
                         f"for a sweep: list the namespaces ([{poll.netns}]) or remove poll.netns"))
    if isinstance(poll.netns, tuple) and len(poll.netns) + netns.host > netns.max_tracked:
        problems.append(("poll.netns", f"{len(poll.netns)} namespaces listed{' plus host' if netns.host else ''} "
                         f"but netns.max_tracked is {netns.max_tracked}"))
    return problems


def _derive_prometheus(values: dict[str, Any]) -> dict[str, Any]:
    host, port = parse_listen_address(values["listen_address"])
    return values | {"host": host, "port": port}


_GRAPHITE_TEMPLATE = re.compile(r"(?:[A-Za-z0-9_.-]|\{hostname\}|\{fqdn\})*")


def _graphite_address(value: Any) -> str:
    host, _ = parse_listen_address(value)
    if host == "":
        raise ValueError(f"{_show(value)}: give carbon's host, e.g. 127.0.0.1:2003")
    return value


def _graphite_template(*, empty_ok: bool) -> Kind:
    """A path template: [A-Za-z0-9_.-] and the placeholders {hostname} and {fqdn}."""

    def parse(value: Any) -> str:
        _expect(value, str, "a string")
        if not value and not empty_ok:
            raise ValueError("must not be empty")
        if len(value) > 256:
            raise ValueError(f"{len(value)} characters is too long (at most 256)")
        if not _GRAPHITE_TEMPLATE.fullmatch(value):
            raise ValueError(f"{_show(value)}: only letters, digits, '_', '-', '.', {{hostname}} and {{fqdn}} are allowed")
        if value.startswith(".") or ".." in value:
            raise ValueError(f"{_show(value)}: empty path component")
        return value

    return parse


def _graphite_prefix_rule(prefix: str, naming: str) -> str | None:
    # collectd's Prefix is glued to the host name, so "collectd." is the usual form there.
    if naming != "collectd" and prefix.endswith("."):
        return f"{prefix!r}: must not end with '.' (that is only for naming: collectd)"
    return None


def _graphite_tags_rule(naming: str, tags: bool) -> str | None:
    if tags and naming != "sockscope":
        return "tags need naming: sockscope (collectd paths have no tags)"
    return None


def _derive_graphite(values: dict[str, Any]) -> dict[str, Any]:
    host, port = parse_listen_address(values["address"])
    return values | {"server_host": host, "server_port": port}


def _graphite_interval_problems(poll: PollConfig, graphite: GraphiteConfig) -> list[tuple[str, str]]:
    """graphite.interval against poll.interval (two sections: checked after both are built;
    no CLI flag changes either, so override() need not repeat it)."""
    problems = []
    interval = graphite.interval or poll.interval
    if graphite.interval:
        ratio = graphite.interval / poll.interval
        if ratio < 1 - 1e-9 or abs(ratio - round(ratio)) > 1e-9 * ratio:
            problems.append(("graphite.interval", f"{_format_seconds(graphite.interval)} is not a multiple of "
                             f"poll.interval ({_format_seconds(poll.interval)})"))
    if graphite.enabled and interval < 1:
        problems.append(("graphite.interval", f"pushes every {_format_seconds(interval)}; Graphite keeps one point "
                         "per second: set a multiple of poll.interval of at least 1s"))
    return problems


_SECTIONS: tuple[_Section, ...] = (
    _Section(
        "poll",
        PollConfig,
        (
            _Field("interval", _duration(at_least=_MIN_POLL_INTERVAL, at_most=_MAX_DURATION), "5s"),
            _Field("stale_after", _duration(allow_zero=True, at_most=_MAX_STALE_AFTER), 0),
            _Field("timeout", _duration(at_most=_MAX_DURATION), "30s"),
            _Field("families", _list_of(_choice("ipv4", "ipv6"), nonempty=True), ["ipv4", "ipv6"]),
            _Field("netns", _netns, ""),
            _Field("dump_retries", _integer(0, 100), 3),
            _Field("peak_window", _duration(allow_zero=True, at_most=_MAX_DURATION), "1m"),
            _Field("kernel_stats", _boolean, True),
        ),
        checks=(
            _Check(("interval", "stale_after"), "stale_after", _stale_after_rule),
            _Check(("interval", "peak_window"), "peak_window", _peak_window_rule),
        ),
        derive=_derive_poll,
    ),
    _Section(
        "netns",
        NetnsConfig,
        (
            _Field("discover", _list_of(_choice("run", "processes")), []),
            _Field("max_tracked", _integer(1, _MAX_NETNS_LIST), 32),
            _Field("host", _boolean, False),
            # Discovery stats every /proc/PID/ns/net: bounded rate, at least one poll apart.
            _Field("rediscover", _duration(at_least=(1.0, "discovery stats every process's namespace"),
                                           at_most=_MAX_DURATION), "30s"),
        ),
    ),
    _Section(
        "ports",
        PortsConfig,
        (
            _Field("auto_listen", _boolean, True),
            _Field("local", _list_of(_PORT), []),
            _Field("remote", _list_of(_PORT), []),
            _Field("max_local", _integer(0, 4096), 64),
            _Field("max_remote", _integer(0, 4096), 64),
        ),
        checks=(_cap_check("local"), _cap_check("remote")),
    ),
    _Section("listeners", ListenersConfig, (_Field("max_tracked", _integer(0, 65536), 256),)),
    _Section(
        "udp",
        UdpConfig,
        (
            _Field("enabled", _boolean, True),
            _Field("auto_bound", _boolean, True),
            _Field("local_ports", _list_of(_PORT), []),
            _Field("max_local_ports", _integer(0, 4096), 64),
        ),
        checks=(_Check(("local_ports", "max_local_ports"), "local_ports",
                       lambda ports, cap: f"{len(ports)} ports listed but udp.max_local_ports is {cap}"
                       if len(ports) > cap else None),),
    ),
    _Section("tcp_info", TcpInfoConfig, (_Field("enabled", _boolean, False),)),
    _Section(
        "connections",
        ConnectionsConfig,
        (
            _Field("enabled", _boolean, False),
            _Field("max_sockets", _integer(1, 16_000_000), 1_000_000),
            _Field("max_pending_events", _integer(1, 16_000_000), 100_000),
            _Field("receive_buffer", _integer(65_536, 1 << 30), 8 * 1024 * 1024),
        ),
    ),
    _Section(
        "owners",
        OwnersConfig,
        (
            _Field("enabled", _boolean, False),
            _Field("interval", _integer(1, 100_000), 12),
            _Field("max_per_listener", _integer(1, 64), 4),
            _Field("max_scan_time", _duration(at_most=3600), "1s"),
        ),
    ),
    _Section(
        "units",
        UnitsConfig,
        (
            _Field("enabled", _boolean, True),
            _Field("max_tracked", _integer(0, 4096), 64),
        ),
    ),
    _Section(
        "prometheus",
        PrometheusConfig,
        (
            _Field("enabled", _boolean, True),
            _Field("listen_address", _listen_address, ":9393"),
            _Field("max_connections", _integer(1, 65536), 512),
            _Field("workers", _integer(1, 32), 4),
            _Field("request_timeout", _duration(at_most=3600), "10s"),
            _Field("idle_timeout", _duration(at_most=3600), "2m"),
            _Field("write_timeout", _duration(at_most=3600), "30s"),
        ),
        derive=_derive_prometheus,
    ),
    _Section(
        "graphite",
        GraphiteConfig,
        (
            _Field("enabled", _boolean, False),
            _Field("address", _graphite_address, "127.0.0.1:2003"),
            _Field("protocol", _choice("tcp", "udp"), "tcp"),
            _Field("prefix", _graphite_template(empty_ok=True), ""),
            _Field("host", _graphite_template(empty_ok=False), "{fqdn}"),
            _Field("naming", _choice("sockscope", "collectd"), "sockscope"),
            _Field("tags", _boolean, False),
            _Field("interval", _duration(allow_zero=True, at_most=_MAX_DURATION), 0),
            _Field("buffer_lines", _integer(0, 100_000_000), 0),
            _Field("connect_timeout", _duration(at_most=3600), "5s"),
            _Field("send_timeout", _duration(at_most=3600), "10s"),
            _Field("flush_timeout", _duration(allow_zero=True, at_most=3600), "10s"),
        ),
        checks=(
            _Check(("prefix", "naming"), "prefix", _graphite_prefix_rule),
            _Check(("naming", "tags"), "tags", _graphite_tags_rule),
        ),
        derive=_derive_graphite,
    ),
    _Section(
        "log",
        LogConfig,
        (
            _Field("level", _choice("debug", "info", "warning", "error", fold_case=True), "info"),
            _Field("format", _choice("text", "json", "journal"), "text"),
        ),
    ),
)

KEY_PATHS: tuple[str, ...] = tuple(f"{s.name}.{f.name}" for s in _SECTIONS for f in s.fields)

# CLI flag -> (section, key). override() takes the keyword named after the key.
FLAGS: dict[str, tuple[str, str]] = {
    "--web.listen-address": ("prometheus", "listen_address"),
    "--log.level": ("log", "level"),
    "--log.format": ("log", "format"),
    "--netns": ("poll", "netns"),
}

assert [f.name for f in fields(Config) if f.name != "source"] == [s.name for s in _SECTIONS]


# --- the walker --------------------------------------------------------------------


class _Problems(list):
    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}")


_MAX_HINTS = 20  # "did you mean" suggestions per mapping: difflib is slow on thousands of keys


def _unknown_keys(mapping: dict, known: list[str], prefix: str, problems: _Problems) -> None:
    hints = 0
    for key in mapping:
        if key not in known:
            hint = ""
            if isinstance(key, str) and len(key) <= _SHOW_MAX and hints < _MAX_HINTS:
                hints += 1
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(f"{prefix}{_key_text(key)}", f"unknown key{hint}")


def _parse_field(spec: _Field, raw: Any, path: str, problems: _Problems, values: dict[str, Any]) -> None:
    if raw is None:
        problems.add(path, f"no value given (remove the key to use the default, {_show(spec.default)})")
        return
    try:
        values[spec.name] = spec.kind(raw)
    except _ItemProblems as exc:
        for suffix, message in exc.items:
            problems.add(path + suffix, message)
    except ValueError as exc:
        problems.add(path, str(exc))
    except Exception as exc:  # noqa: BLE001 - a value no rule foresaw is a problem, never a crash
        problems.add(path, f"cannot check {_describe(raw)}: {type(exc).__name__}")


def _finish(section: _Section, values: dict[str, Any], problems: _Problems) -> Any:
    """Cross-field checks, then the dataclass; None when anything was invalid."""
    before = len(problems)
    for check in section.checks:
        if all(name in values for name in check.uses):
            message = check.rule(*(values[name] for name in check.uses))
            if message:
                problems.add(f"{section.name}.{check.reports}", message)
    if len(values) != len(section.fields) or len(problems) > before:
        return None
    return section.build(**section.derive(values))


def _walk_section(section: _Section, raw: Any, problems: _Problems) -> Any:
    if raw is None:  # "poll:" with every key commented out
        raw = {}
    if not isinstance(raw, dict):
        problems.add(section.name, f"expected a mapping, got {_describe(raw)}")
        return None
    _unknown_keys(raw, [f.name for f in section.fields], f"{section.name}.", problems)
    values: dict[str, Any] = {}
    for spec in section.fields:
        path = f"{section.name}.{spec.name}"
        _parse_field(spec, raw[spec.name] if spec.name in raw else spec.default, path, problems, values)
    return _finish(section, values, problems)


def from_mapping(data: Any, source: str = "<config>") -> Config:
    """A Config from a parsed YAML document (None = all defaults). Raises ConfigError."""
    if data is None:
        data = {}
    problems = _Problems()
    if not isinstance(data, dict):
        names = ", ".join(s.name for s in _SECTIONS)
        problems.add("top level", f"expected a mapping of sections ({names}), got {_describe(data)}")
        raise ConfigError(problems, source)
    _unknown_keys(data, [s.name for s in _SECTIONS], "", problems)
    built = {s.name: _walk_section(s, data.get(s.name), problems) for s in _SECTIONS}
    if built["poll"] is not None and built["graphite"] is not None:
        for path, message in _graphite_interval_problems(built["poll"], built["graphite"]):
            problems.add(path, message)
    if built["poll"] is not None and built["netns"] is not None:
        for path, message in _netns_problems(built["poll"], built["netns"]):
            problems.add(path, message)
    if problems:
        raise ConfigError(problems, source)
    return Config(**built, source=source)


# --- reading files -----------------------------------------------------------------

try:  # libyaml scans and parses in C: a 1 MiB file in ~0.6 s instead of ~12 s
    from yaml._yaml import CParser as _EventSource
except ImportError:  # PyYAML built without libyaml: the same rules, slower

    class _EventSource(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)


class _Refused(yaml.MarkedYAMLError):
    """A document over one of the loader's limits (depth, expanded size, recursion)."""


_NUMBER_TEXT_MAX = 64  # characters of an int or float scalar; 1:2:3... ints are quadratic


class _Loader(yaml.composer.Composer, _EventSource, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """A safe YAML loader for untrusted files: libyaml's parser when present, PyYAML's
    composer with limits, SafeConstructor with every error tied to its node.

    - A key given twice in one mapping is refused (plain safe_load keeps the last value
      silently; a config with `interval` twice is almost always a merge accident).
    - Nesting deeper than MAX_DEPTH is refused while composing, long before Python's
      recursion limit (PyYAML recurses 2-3 frames per level).
    - The document may expand to at most MAX_NODES nodes, an alias counting its anchor's
      nodes each time it is used, checked as each node or alias is read: a 1 KB "billion
      laughs" file is refused after 20,000 nodes instead of being expanded (37 s, 2.2 GB)
      by whoever walks or prints it. An alias inside its own anchor is refused too.
    - Every exception of constructing a value (`!!bool maybe`, `!!int abc`, a 5,000-digit
      integer) becomes a ConstructorError at the node, with the node's key path.
    """

    def __init__(self, stream: str) -> None:
        _EventSource.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._expanded = 0  # nodes read so far, aliases counted at their anchor's size
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, once composed
        self._where: dict[int, tuple[Any, Any]] = {}  # id(node) -> (parent node, index or key node)
        self._stack: list[str] = []  # key path parts of the nodes being composed

    # -- composing, with limits -------------------------------------------------------

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        self._stack.append(_path_part(parent, index))
        try:
            if isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(event.anchor)
                if target is not None:  # else PyYAML reports the undefined alias
                    size = self._sizes.get(id(target))
                    if size is None:
                        self._refuse(f"alias *{_key_text(event.anchor)} is used inside its own anchor "
                                     "(a recursive structure)", event)
                    self._count(size, event)
                return super().compose_node(parent, index)
            if self._depth >= MAX_DEPTH:
                self._refuse(f"nested more than {MAX_DEPTH} levels deep", event)
            start = self._expanded
            self._count(1, event)
            self._depth += 1
            try:
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
        finally:
            self._stack.pop()
        self._sizes[id(node)] = self._expanded - start
        self._where[id(node)] = (parent, index)
        return node

    def _count(self, nodes: int, event: Any) -> None:
        self._expanded += nodes
        if self._expanded > MAX_NODES:
            self._refuse(f"the document expands to more than {MAX_NODES:,} nodes (each use of an alias "
                         "counts the nodes of its anchor again)", event)

    def _refuse(self, message: str, event: Any) -> NoReturn:
        error = _Refused(None, None, message, event.start_mark)
        error.key_path = "".join(self._stack).lstrip(".") or "top level"  # type: ignore[attr-defined]  # read back by getattr
        raise error

    def _node_path(self, node: Any) -> str:
        """The key path (poll.families[1]) of a composed node."""
        parts: list[str] = []
        parent, index = self._where.get(id(node), (None, None))
        while parent is not None:
            parts.append(_path_part(parent, index))
            parent, index = self._where.get(id(parent), (None, None))
        return "".join(reversed(parts)).lstrip(".") or "top level"

    # -- constructing -------------------------------------------------------------------

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        pending = len(self.state_generators)
        try:
            data = super().construct_object(node, deep=deep)
            if len(self.state_generators) == pending + 1:  # a collection, filled in later
                self.state_generators[-1] = self._tied(self.state_generators[-1], node)
            return data
        except yaml.MarkedYAMLError as exc:
            if getattr(exc, "key_path", None) is None:
                exc.key_path = self._node_path(node)  # type: ignore[attr-defined]  # read back by getattr
            raise
        except Exception as exc:  # noqa: BLE001 - any constructor failure is a problem of the file
            raise self._problem(node, exc) from None

    def _problem(self, node: Any, exc: Exception) -> yaml.MarkedYAMLError:
        # ValueError says what was wrong ("invalid literal for int() ..."); KeyError,
        # AttributeError and the like only say where PyYAML tripped.
        reason = f": {_clip(str(exc))}" if isinstance(exc, ValueError) and str(exc) else ""
        error = yaml.constructor.ConstructorError(
            None, None, f"cannot read {_show(node.value)} as {_short_tag(node.tag)}{reason}", node.start_mark)
        error.key_path = self._node_path(node)  # type: ignore[attr-defined]  # read back by getattr
        return error

    def _tied(self, generator: Any, node: Any) -> Any:
        """generator (the rest of a collection's construction, run by construct_document)
        with its errors tied to node, like construct_object's."""
        try:
            yield from generator
        except yaml.MarkedYAMLError as exc:
            if getattr(exc, "key_path", None) is None:
                exc.key_path = self._node_path(node)  # type: ignore[attr-defined]  # read back by getattr
            raise
        except Exception as exc:  # noqa: BLE001 - as in construct_object
            raise self._problem(node, exc) from None

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        try:
            seen: set = set()
            # Not a mapping (`!!set [a]`): SafeConstructor says so below.
            pairs = node.value if isinstance(node, yaml.MappingNode) else []
            for key_node, _ in pairs:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    error = yaml.constructor.ConstructorError(
                        None, None, f"key {_show(key)} appears twice in one mapping", key_node.start_mark
                    )
                    path = self._node_path(node)
                    error.key_path = _key_text(key) if path == "top level" else f"{path}.{_key_text(key)}"  # type: ignore[attr-defined]  # read back by getattr
                    raise error
                seen.add(key)
            return super().construct_mapping(node, deep=deep)
        except yaml.MarkedYAMLError as exc:
            if getattr(exc, "key_path", None) is None:
                exc.key_path = self._node_path(node)  # type: ignore[attr-defined]  # read back by getattr
            raise

    def construct_bounded_number(self, node: Any) -> Any:
        if len(node.value) > _NUMBER_TEXT_MAX:
            raise ValueError(f"{len(node.value)} characters is too long for a number (at most {_NUMBER_TEXT_MAX})")
        if node.tag.endswith(":int"):
            return self.construct_yaml_int(node)
        return self.construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_bounded_number)  # type: ignore[type-var]  # stubs bound _L to the stock loaders
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_bounded_number)  # type: ignore[type-var]


def _path_part(parent: Any, index: Any) -> str:
    """One step of a key path: ".key" (index is the key's node), "[3]", "" at the root."""
    if parent is None:
        return ""
    if isinstance(index, int):
        return f"[{index}]"
    if isinstance(index, yaml.ScalarNode):
        return "." + _key_text(index.value)
    return " (a key)" if index is None else ".?"


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else _show(tag)


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, _Refused):
        label = "YAML refused"
    elif isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError, yaml.composer.ComposerError)):
        label = "YAML syntax error"
    else:
        label = "invalid YAML"
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
        text = ": ".join(_clip(part) for part in (exc.context, exc.problem) if part)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        key_path = getattr(exc, "key_path", None)
        return f"{key_path}: {where}: {label}: {text}" if key_path else f"{where}: {label}: {text}"
    return f"{label}: {_clip(str(exc))}"


def load(path: str | None) -> Config:
    """The Config in the YAML file at path; None = DEFAULTS. Raises ConfigError only."""
    if path is None:
        return DEFAULTS
    data = read_yaml(path)
    try:
        return from_mapping(data, path)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug in a rule must not crash a reload
        raise ConfigError(f"cannot validate the file: {type(exc).__name__}: {_clip(str(exc))}", path) from None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: str, limit: int) -> int:
    """An fd of the regular file at path, no larger than limit. Raises ValueError.

    O_NONBLOCK: opening a FIFO for reading would wait for a writer (and a read would block
    on an empty one); O_NOCTTY: a terminal never becomes our controlling terminal."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot read file: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the path
        raise ValueError(f"cannot read file: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"cannot read file: {_file_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise ValueError(f"file is {st.st_size:,} bytes, larger than the limit of {limit:,}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_problem(path: str, limit: int = MAX_FILE_BYTES) -> str | None:
    """Why the file at path is not a readable regular file of at most limit bytes, or None.

    For files other modules hand to a library by path (TLS certificates and keys), so that
    a FIFO, /dev/zero or a huge file is refused before the library blocks on it."""
    try:
        os.close(_open_regular(path, limit))
    except ValueError as exc:
        return str(exc)
    return None


def read_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at path, at most limit of them. Raises ConfigError."""
    try:
        fd = _open_regular(path, limit)
    except ValueError as exc:
        raise ConfigError(str(exc), path) from None
    try:
        chunks, size = [], 0
        while size <= limit:  # the file may grow after fstat: read at most limit + 1 bytes
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror or exc}", path) from None
    finally:
        os.close(fd)
    if size > limit:
        raise ConfigError(f"file is larger than the limit of {limit:,} bytes", path)
    return b"".join(chunks)


def read_yaml(path: str) -> Any:
    """The parsed YAML document at path, under the file rules (module docstring).
    Raises ConfigError only.

    Also used for the web config file (webconfig.py), so YAML stays behind this module.
    """
    data = read_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", path) from None
    try:
        loader = _Loader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(exc), path) from None
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the file is refused
        raise ConfigError(f"invalid YAML: {type(exc).__name__}: {_clip(str(exc))}", path) from None


def format_endpoint(host: str, port: int) -> str:
    """host:port as parse_listen_address reads it back: [v6addr]:port for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def changed_keys(old: Config, new: Config) -> set[str]:
    """The key paths ("poll.interval", ...) whose values differ between two Configs: a
    reload applies exactly these (features rebuilt by their keys, readers, the server,
    the Graphite pusher)."""
    changed = set()
    for section in _SECTIONS:
        a, b = getattr(old, section.name), getattr(new, section.name)
        for f in fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                changed.add(f"{section.name}.{f.name}")
    return changed


def override(
    cfg: Config,
    *,
    listen_address: str | None = None,
    log_level: str | None = None,
    netns: str | None = None,
    log_format: str | None = None,
) -> Config:
    """cfg with CLI flag values applied (None = flag not given), validated like the file.

    Problems name the flag, e.g. "--web.listen-address: ...". Raises ConfigError.
    """
    given = {"--web.listen-address": listen_address, "--log.level": log_level, "--netns": netns,
             "--log.format": log_format}
    problems = _Problems()
    updates: dict[str, dict[str, Any]] = {}
    for flag, raw in given.items():
        if raw is None:
            continue
        section_name, key = FLAGS[flag]
        spec = next(f for s in _SECTIONS if s.name == section_name for f in s.fields if f.name == key)
        _parse_field(spec, raw, flag, problems, updates.setdefault(section_name, {}))
    if problems:
        raise ConfigError(problems, "command line")
    changed = {}
    for section in _SECTIONS:
        if section.name in updates:
            current = getattr(cfg, section.name)
            values = {f.name: getattr(current, f.name) for f in section.fields} | updates[section.name]
            changed[section.name] = _finish(section, values, problems)
    if problems:
        raise ConfigError(problems, "command line")
    return replace(cfg, **changed)


DEFAULTS: Config = from_mapping({}, "<defaults>")
