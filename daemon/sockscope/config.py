"""Configuration: YAML in, a validated frozen Config out.

The only module that imports yaml. Validation is driven by the _SECTIONS table: each
section lists its fields (name, kind, default) and cross-field checks; one walker applies
them and collects every problem, each prefixed by its key path, before raising a single
ConfigError. Adding a section = a dataclass, a _Section entry and a Config field.

A "kind" is a function raw YAML value -> parsed value that raises ValueError with a
message (or _ItemProblems for per-element messages of a list).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Any, Callable

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
    "from_mapping",
    "load",
    "override",
    "parse_duration",
    "parse_listen_address",
    "read_yaml",
]


class ConfigError(Exception):
    """Every problem found in one configuration source, each "key.path: message"."""

    def __init__(self, problems: list[str] | str, source: str = "<config>") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        count = len(self.problems)
        head = f"{source}: {count} problem{'' if count == 1 else 's'}:"
        super().__init__("\n".join([head, *("  " + p for p in self.problems)]))


@dataclass(frozen=True, slots=True)
class PollConfig:
    interval: float
    stale_after: float  # resolved: 3 * interval when configured as 0
    timeout: float
    families: tuple[str, ...]
    netns: str | None  # None = the daemon's own namespace
    dump_retries: int
    peak_window: float  # 0 = no window peaks
    kernel_stats: bool


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
class PrometheusConfig:
    enabled: bool
    listen_address: str
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
    ports: PortsConfig
    listeners: ListenersConfig
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


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, shortened."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    return f"{seconds:g}s"


# --- public parsers ------------------------------------------------------------------

_DURATION_UNITS = {"h": Decimal(3600), "m": Decimal(60), "s": Decimal(1), "ms": Decimal("0.001")}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_DURATION_HINT = "use seconds (5, 1.5) or a string like 500ms, 5s, 1m30s, 2h"


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
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"{text!r} is negative; durations must be >= 0")
    pos, total, order = 0, Decimal(0), list(_DURATION_UNITS)
    last_rank = -1
    while pos < len(stripped):
        match = _DURATION_PART.match(stripped, pos)
        if not match:
            missing_unit = re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", stripped[pos:])
            reason = "a number needs a unit" if missing_unit else "not a duration"
            raise ValueError(f"{text!r}: {reason}; {_DURATION_HINT}")
        number, unit = match.groups()
        rank = order.index(unit)
        if rank <= last_rank:
            raise ValueError(f"{text!r}: units must go from largest to smallest, each once (e.g. 1h2m3s)")
        last_rank = rank
        total += Decimal(number) * _DURATION_UNITS[unit]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"empty duration; {_DURATION_HINT}")
    return float(total)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
_LISTEN_FORMS = "expected host:port, :port or [v6addr]:port"


def parse_listen_address(value: str) -> tuple[str, int]:
    """(host, port) from "host:port", ":port" or "[v6addr]:port". host "" = all addresses.

    host is an IP literal or a syntactically valid hostname; an IPv6 literal must be in
    brackets and is returned without them. Port 1-65535. Raises ValueError.
    """
    _expect(value, str, "a string")
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
            raise ValueError(f"{value} is not a {noun} ({lo}-{hi})" if noun else f"{value} is out of range ({lo}-{hi})")
        return value

    return parse


def _duration(*, allow_zero: bool = False, at_most: float | None = None) -> Kind:
    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds == 0 and not allow_zero:
            raise ValueError(f"must be > 0, got {_show(value)}")
        if at_most is not None and seconds > at_most:
            raise ValueError(f"{_show(value)} is too long (at most {_format_seconds(at_most)})")
        return seconds

    return parse


def _choice(*options: str, fold_case: bool = False) -> Kind:
    def parse(value: Any) -> str:
        _expect(value, str, "a string")
        key = value.lower() if fold_case else value
        if key not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
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


def _netns(value: Any) -> str | None:
    _expect(value, str, "a string")
    if value == "":
        return None
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    if value.startswith("/"):
        return value
    if "/" in value:
        raise ValueError(f"{value!r}: give a name from /run/netns or an absolute path (like /proc/PID/ns/net)")
    if value in (".", ".."):
        raise ValueError(f"{value!r} is not a namespace name")
    return value


def _listen_address(value: Any) -> str:
    parse_listen_address(value)
    return value


_PORT = _integer(1, 65535, "port")
_MAX_DURATION = 86400.0  # one day; larger waits overflow threading/socket timeouts


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


def _derive_prometheus(values: dict[str, Any]) -> dict[str, Any]:
    host, port = parse_listen_address(values["listen_address"])
    return values | {"host": host, "port": port}


_GRAPHITE_TEMPLATE = re.compile(r"(?:[A-Za-z0-9_.-]|\{hostname\}|\{fqdn\})*")


def _graphite_address(value: Any) -> str:
    host, _ = parse_listen_address(value)
    if host == "":
        raise ValueError(f"{value!r}: give carbon's host, e.g. 127.0.0.1:2003")
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
            raise ValueError(f"{value!r}: only letters, digits, '_', '-', '.', {{hostname}} and {{fqdn}} are allowed")
        if value.startswith(".") or ".." in value:
            raise ValueError(f"{value!r}: empty path component")
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
            _Field("interval", _duration(at_most=_MAX_DURATION), "5s"),
            _Field("stale_after", _duration(allow_zero=True), 0),
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
        "prometheus",
        PrometheusConfig,
        (
            _Field("enabled", _boolean, True),
            _Field("listen_address", _listen_address, ":9393"),
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
            _Field("format", _choice("text", "json"), "text"),
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


def _unknown_keys(mapping: dict, known: list[str], prefix: str, problems: _Problems) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(f"{prefix}{key}", f"unknown key{hint}")


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
    if problems:
        raise ConfigError(problems, source)
    return Config(**built, source=source)


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping.

    Plain safe_load keeps the last value silently; a config with `interval` twice is
    almost always a merge accident, so it is reported with its line.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_show(key)} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    syntax = isinstance(exc, (yaml.scanner.ScannerError, yaml.parser.ParserError, yaml.composer.ComposerError))
    label = "YAML syntax error" if syntax else "invalid YAML"
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
        text = ": ".join(part for part in (exc.context, exc.problem) if part)
        return f"line {mark.line + 1}, column {mark.column + 1}: {label}: {text}"
    return f"{label}: {' '.join(str(exc).split())}"


def load(path: str | None) -> Config:
    """The Config in the YAML file at path; None = DEFAULTS. Raises ConfigError."""
    if path is None:
        return DEFAULTS
    return from_mapping(read_yaml(path), path)


def read_yaml(path: str) -> Any:
    """The parsed YAML document at path (keys given twice refused). Raises ConfigError.

    Also used for the web config file (webconfig.py), so YAML stays behind this module.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror or exc}", path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", path) from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(exc), path) from None


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
