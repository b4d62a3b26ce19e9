"""Tests for sockscope.config: defaults, every validation rule, loading and CLI overrides."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

import pytest

from sockscope import config
from sockscope.config import (
    DEFAULTS,
    ConfigError,
    from_mapping,
    load,
    override,
    parse_duration,
    parse_listen_address,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "sockscope.yaml"
DOCS = ROOT / "docs" / "configuration.md"


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(data, "test.yaml")
    return info.value.problems


def only_problem(data) -> str:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    return problems[0]


def load_error(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sockscope.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- defaults -----------------------------------------------------------------------


def test_defaults_values():
    assert DEFAULTS.source == "<defaults>"
    assert DEFAULTS.poll == config.PollConfig(
        interval=5.0, stale_after=15.0, timeout=30.0, families=("ipv4", "ipv6"), netns=None, dump_retries=3,
        peak_window=60.0, kernel_stats=True,
    )
    assert DEFAULTS.ports == config.PortsConfig(auto_listen=True, local=(), remote=(), max_local=64, max_remote=64)
    assert DEFAULTS.listeners == config.ListenersConfig(max_tracked=256)
    assert DEFAULTS.prometheus == config.PrometheusConfig(
        enabled=True, listen_address=":9393", max_connections=512, workers=4, request_timeout=10.0,
        idle_timeout=120.0, write_timeout=30.0, host="", port=9393,
    )
    assert DEFAULTS.log == config.LogConfig(level="info", format="text")


def test_no_file_is_defaults():
    assert load(None) == DEFAULTS
    assert load(None).source == "<defaults>"


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "null\n", "~\n", "---\n"])
def test_empty_or_null_document_is_defaults(tmp_path, text):
    path = write(tmp_path, text)
    cfg = load(path)
    assert cfg == DEFAULTS
    assert cfg.source == path


def test_empty_section_is_defaults():
    assert from_mapping({"poll": None, "log": {}}) == DEFAULTS


def test_shipped_file_equals_defaults():
    cfg = load(str(SHIPPED))
    assert cfg == DEFAULTS
    assert cfg.source == str(SHIPPED)


def test_shipped_file_sets_every_key():
    # Every key written out (not only commented), so the file documents each default.
    import yaml  # the test may read YAML; only config.py imports it in the package

    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    written = {f"{section}.{key}" for section, keys in data.items() for key in keys}
    assert written == set(config.KEY_PATHS)


def test_docs_describe_every_key_and_flag():
    text = DOCS.read_text(encoding="utf-8")
    missing = [key for key in config.KEY_PATHS if f"`{key}`" not in text]
    assert missing == []
    assert all(f"`{flag}" in text for flag in config.FLAGS)
    assert "exits with status **2**" in text


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.poll.interval = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.log = None  # type: ignore[misc]


def test_source_not_compared_but_values_are():
    assert from_mapping({}, "a.yaml") == from_mapping({}, "b.yaml")
    assert from_mapping({"log": {"level": "debug"}}) != DEFAULTS


# --- good values ----------------------------------------------------------------------


def test_full_custom_config():
    cfg = from_mapping(
        {
            "poll": {
                "interval": "1m30s",
                "stale_after": "5m",
                "timeout": 2,
                "families": ["ipv6"],
                "netns": "/proc/1/ns/net",
                "dump_retries": 0,
                "peak_window": "2m",
                "kernel_stats": False,
            },
            "ports": {"auto_listen": False, "local": [443, 80], "remote": [5432], "max_local": 2, "max_remote": 1},
            "listeners": {"max_tracked": 0},
            "prometheus": {"enabled": False, "listen_address": "[::1]:9100"},
            "log": {"level": "WARNING", "format": "json"},
        },
        "custom.yaml",
    )
    assert cfg.poll == config.PollConfig(90.0, 300.0, 2.0, ("ipv6",), "/proc/1/ns/net", 0, 120.0, False)
    assert cfg.ports == config.PortsConfig(False, (443, 80), (5432,), 2, 1)
    assert cfg.listeners.max_tracked == 0
    assert cfg.prometheus == dataclasses.replace(DEFAULTS.prometheus, enabled=False, listen_address="[::1]:9100",
                                                 host="::1", port=9100)
    assert cfg.log == config.LogConfig("warning", "json")
    assert cfg.source == "custom.yaml"


@pytest.mark.parametrize(
    ("interval", "stale_after", "resolved"),
    [("5s", 0, 15.0), (2, "0s", 6.0), ("10s", "10s", 10.0), (0.5, 60, 60.0)],
)
def test_stale_after_resolution(interval, stale_after, resolved):
    cfg = from_mapping({"poll": {"interval": interval, "stale_after": stale_after}})
    assert cfg.poll.stale_after == resolved


def test_netns_name_kept():
    assert from_mapping({"poll": {"netns": "blue"}}).poll.netns == "blue"


def test_port_limits_inclusive():
    cfg = from_mapping({"ports": {"local": [1, 65535], "max_local": 2, "max_remote": 4096}})
    assert cfg.ports.local == (1, 65535)
    assert cfg.ports.max_remote == 4096


# --- one bad value, one message naming its key ------------------------------------------

BAD_CASES = [
    ({"poll": {"interval": 0}}, "poll.interval", "must be > 0"),
    ({"poll": {"interval": "-1s"}}, "poll.interval", "negative"),
    ({"poll": {"interval": "2d"}}, "poll.interval", "not a duration"),
    ({"poll": {"interval": "25h"}}, "poll.interval", "too long"),
    ({"poll": {"interval": True}}, "poll.interval", "boolean"),
    ({"poll": {"stale_after": "1s"}}, "poll.stale_after", "less than poll.interval"),
    ({"poll": {"stale_after": -3}}, "poll.stale_after", "negative"),
    ({"poll": {"timeout": "0s"}}, "poll.timeout", "must be > 0"),
    ({"poll": {"families": []}}, "poll.families", "must not be empty"),
    ({"poll": {"families": "ipv4"}}, "poll.families", "expected a list"),
    ({"poll": {"families": ["ipv4", "IPX"]}}, "poll.families[1]", "'IPX' is not one of ipv4, ipv6"),
    ({"poll": {"families": ["ipv6", "ipv6"]}}, "poll.families[1]", "listed twice (first at [0])"),
    ({"poll": {"netns": "run/netns/x"}}, "poll.netns", "absolute path"),
    ({"poll": {"netns": "a\0b"}}, "poll.netns", "NUL"),
    ({"poll": {"netns": ".."}}, "poll.netns", "not a namespace name"),
    ({"poll": {"netns": 5}}, "poll.netns", "expected a string"),
    ({"poll": {"dump_retries": 101}}, "poll.dump_retries", "out of range (0-100)"),
    ({"poll": {"dump_retries": -1}}, "poll.dump_retries", "out of range (0-100)"),
    ({"poll": {"dump_retries": 2.0}}, "poll.dump_retries", "expected an integer"),
    ({"poll": {"dump_retries": True}}, "poll.dump_retries", "expected an integer, got a boolean (true)"),
    ({"poll": {"bogus": 1}}, "poll.bogus", "unknown key"),
    ({"poll": {"intervall": 1}}, "poll.intervall", "did you mean 'interval'"),
    ({"poll": {"interval": None}}, "poll.interval", "no value given"),
    ({"poll": [1]}, "poll", "expected a mapping"),
    ({"ports": {"auto_listen": 1}}, "ports.auto_listen", "expected true or false"),
    ({"ports": {"auto_listen": "true"}}, "ports.auto_listen", "expected true or false"),
    ({"ports": {"local": [80, 70000]}}, "ports.local[1]", "70000 is not a port (1-65535)"),
    ({"ports": {"local": [0]}}, "ports.local[0]", "0 is not a port (1-65535)"),
    ({"ports": {"local": ["80"]}}, "ports.local[0]", "expected an integer"),
    ({"ports": {"local": [False]}}, "ports.local[0]", "boolean"),
    ({"ports": {"remote": [5432, 6379, 5432]}}, "ports.remote[2]", "listed twice (first at [0])"),
    ({"ports": {"remote": 5432}}, "ports.remote", "expected a list"),
    ({"ports": {"max_local": 4097}}, "ports.max_local", "out of range (0-4096)"),
    ({"ports": {"max_remote": True}}, "ports.max_remote", "boolean"),
    ({"ports": {"local": [1, 2, 3], "max_local": 2}}, "ports.local", "3 ports listed but ports.max_local is 2"),
    ({"ports": {"remote": [1, 2], "max_remote": 0}}, "ports.remote", "2 ports listed but ports.max_remote is 0"),
    ({"listeners": {"max_tracked": 65537}}, "listeners.max_tracked", "out of range (0-65536)"),
    ({"listeners": {"max_tracked": "many"}}, "listeners.max_tracked", "expected an integer"),
    ({"prometheus": {"enabled": "yes please"}}, "prometheus.enabled", "expected true or false"),
    ({"prometheus": {"listen_address": "9393"}}, "prometheus.listen_address", "missing ':'"),
    ({"prometheus": {"listen_address": 9393}}, "prometheus.listen_address", "expected a string"),
    ({"log": {"level": "loud"}}, "log.level", "'loud' is not one of debug, info, warning, error"),
    ({"log": {"format": "JSON"}}, "log.format", "is not one of text, json"),
    ({"graphite": {"interval": "7s"}}, "graphite.interval", "7s is not a multiple of poll.interval (5s)"),
    ({"graphite": {"enabled": True}, "poll": {"interval": "500ms"}}, "graphite.interval", "at least 1s"),
    ({"graphite": {"address": ":2003"}}, "graphite.address", "give carbon's host"),
    ({"graphite": {"protocol": "http"}}, "graphite.protocol", "is not one of tcp, udp"),
    ({"graphite": {"prefix": "a..b"}}, "graphite.prefix", "empty path component"),
    ({"graphite": {"prefix": "a.{host}"}}, "graphite.prefix", "only letters, digits"),
    ({"graphite": {"prefix": "collectd."}}, "graphite.prefix", "only for naming: collectd"),
    ({"graphite": {"host": ""}}, "graphite.host", "must not be empty"),
    ({"graphite": {"naming": "collectd", "tags": True}}, "graphite.tags", "tags need naming: sockscope"),
    ({"graphite": {"buffer_lines": -1}}, "graphite.buffer_lines", "out of range"),
    ({"graphite": {"flush_timeout": "2h"}}, "graphite.flush_timeout", "too long"),
    ({"graftie": {}}, "graftie", "unknown key (did you mean 'graphite'?)"),
]


@pytest.mark.parametrize(("data", "path", "fragment"), BAD_CASES, ids=[c[1] + ":" + c[2] for c in BAD_CASES])
def test_bad_value(data, path, fragment):
    problem = only_problem(data)
    assert problem.startswith(f"{path}: "), problem
    assert fragment in problem


@pytest.mark.parametrize("document", [[1, 2], "poll", 5, True])
def test_top_level_must_be_mapping(document):
    problem = only_problem(document)
    assert problem.startswith("top level: expected a mapping")


def test_cross_checks_skip_invalid_inputs():
    # An invalid interval must not also produce a stale_after complaint.
    assert problems_of({"poll": {"interval": "x", "stale_after": "1s"}}) == [
        "poll.interval: 'x': not a duration; use seconds (5, 1.5) or a string like 500ms, 5s, 1m30s, 2h"
    ]


def test_many_problems_reported_together(tmp_path):
    path = write(
        tmp_path,
        """\
poll:
  interval: 0
  bogus: 1
  families: [ipv4, ipx, ipv4]
  dump_retries: true
ports:
  local: [80, 443, 70000, 80]
  remote: 5432
prometheus:
  listen_address: "::1:9393"
log:
  level: loud
graphite:
  naming: graphite
""",
    )
    error = load_error(path)
    error = error
    keys = [p.split(": ", 1)[0] for p in error.problems]
    assert sorted(keys) == sorted(
        [
            "graphite.naming",
            "poll.bogus",
            "poll.interval",
            "poll.families[1]",
            "poll.families[2]",
            "poll.dump_retries",
            "ports.local[2]",
            "ports.local[3]",
            "ports.remote",
            "prometheus.listen_address",
            "log.level",
        ]
    )
    assert "ports.local[2]: 70000 is not a port (1-65535)" in error.problems
    assert str(error).startswith(f"{path}: 11 problems:\n  ")
    assert str(error).count("\n") == 11


def test_error_message_format():
    error = ConfigError(["a.b: one"], "f.yaml")
    assert str(error) == "f.yaml: 1 problem:\n  a.b: one"
    assert error.problems == ["a.b: one"]
    assert error.source == "f.yaml"


# --- durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (0, 0.0),
        (0.25, 0.25),
        ("5s", 5.0),
        ("1m", 60.0),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("2h", 7200.0),
        ("1m30s", 90.0),
        ("1h2m3s4ms", 3723.004),
        (".5s", 0.5),
        ("0s", 0.0),
        (" 5s ", 5.0),
    ],
)
def test_parse_duration_good(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-1, "negative"),
        (-0.5, "negative"),
        ("-5s", "negative"),
        ("5", "needs a unit"),
        ("abc", "not a duration"),
        ("5 s", "not a duration"),
        ("5d", "not a duration"),
        ("5S", "not a duration"),
        ("1e3s", "not a duration"),
        ("", "empty duration"),
        ("30s1m", "largest to smallest"),
        ("1s1s", "largest to smallest"),
        (True, "expected a duration, got a boolean"),
        (False, "expected a duration, got a boolean"),
        (None, "expected a duration, got null"),
        ([5], "expected a duration, got a list"),
        (float("inf"), "not a finite duration"),
        (float("nan"), "not a finite duration"),
        (10**400, "not a finite duration"),
    ],
)
def test_parse_duration_bad(value, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_duration(value)


# --- listen addresses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":9393", ("", 9393)),
        ("127.0.0.1:9393", ("127.0.0.1", 9393)),
        ("[::1]:9393", ("::1", 9393)),
        ("[::]:1", ("::", 1)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("localhost:9393", ("localhost", 9393)),
        ("metrics.example.com.:65535", ("metrics.example.com.", 65535)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_listen_address_good(value, expected):
    assert parse_listen_address(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("9393", "missing ':'"),
        ("localhost", "missing port"),
        ("[::1", "missing ']'"),
        ("[::1]", "missing ':port'"),
        ("[::1]9393", "missing ':port'"),
        ("[localhost]:80", "not an IPv6 address"),
        ("[127.0.0.1]:80", "not an IPv6 address"),
        ("::1:9393", "must be in brackets"),
        ("host:0", "not a port (1-65535)"),
        ("host:70000", "not a port (1-65535)"),
        ("host:-1", "not a port"),
        ("host:http", "not a port"),
        ("host:", "missing port"),
        ("a b:1", "not an IP address or a valid hostname"),
        ("-bad:1", "not an IP address or a valid hostname"),
        ("under_score:1", "not an IP address or a valid hostname"),
        ("a..b:1", "not an IP address or a valid hostname"),
        ("256.1.1.1:80", "not an IPv4 address"),
        ("1.2.3:80", "not an IPv4 address"),
        ("x" * 64 + ":80", "not an IP address or a valid hostname"),
    ],
)
def test_listen_address_bad(value, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_listen_address(value)


def test_listen_address_rejects_non_string():
    with pytest.raises(ValueError, match="expected a string"):
        parse_listen_address(9393)  # type: ignore[arg-type]


def test_listen_address_host_and_port_in_config():
    cfg = from_mapping({"prometheus": {"listen_address": "[2001:db8::5]:9100"}})
    assert (cfg.prometheus.listen_address, cfg.prometheus.host, cfg.prometheus.port) == (
        "[2001:db8::5]:9100",
        "2001:db8::5",
        9100,
    )


# --- loading files --------------------------------------------------------------------------


def test_load_custom_file(tmp_path):
    path = write(tmp_path, "poll:\n  interval: 1s\nports:\n  remote: [5432]\n")
    cfg = load(path)
    assert cfg.poll.interval == 1.0
    assert cfg.poll.stale_after == 3.0
    assert cfg.ports.remote == (5432,)
    assert cfg.source == path


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    error = load_error(path)
    assert error.source == path
    assert str(error).startswith(f"{path}: 1 problem:")
    assert "No such file or directory" in error.problems[0]


def test_directory_is_unreadable(tmp_path):
    error = load_error(str(tmp_path))
    assert error.problems == ["cannot read file: a directory, not a regular file"]


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"poll:\n  netns: \xff\n")
    error = load_error(str(path))
    assert "not UTF-8" in error.problems[0]


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("poll:\n  interval: 5s\n   timeout: 1s\n", 3, 11),
        ("poll:\n  families: [ipv4, ipv6\n", 3, 1),
        ("log: {level: info\n", 2, 1),
        ("poll:\n\tinterval: 5s\n", 2, 1),
    ],
)
def test_yaml_syntax_error(tmp_path, text, line, column):
    path = write(tmp_path, text)
    error = load_error(path)
    (problem,) = error.problems
    assert problem.startswith(f"line {line}, column {column}: YAML syntax error: ")
    assert "Traceback" not in str(error)
    assert error.__suppress_context__  # the yaml exception is not chained into the traceback


def test_unmarked_yaml_error_is_config_error(tmp_path):
    path = write(tmp_path, "log:\n  level: \x07\n")  # control characters are refused by the YAML reader
    error = load_error(path)
    assert error.problems[0].startswith("invalid YAML: unacceptable character #x0007")


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "poll:\n  interval: 5s\n  interval: 1s\n")
    error = load_error(path)
    assert error.problems == ["poll.interval: line 3, column 3: invalid YAML: key 'interval' appears twice in one mapping"]


def test_yaml_merge_keys_still_work(tmp_path):
    # Keys brought in by a merge may be overridden; only explicit repeats are errors.
    path = write(tmp_path, "poll:\n  <<: {interval: 2s, timeout: 7s}\n  interval: 3s\n")
    cfg = load(path)
    assert (cfg.poll.interval, cfg.poll.timeout) == (3.0, 7.0)


def test_python_tags_are_refused(tmp_path):
    path = write(tmp_path, "poll: !!python/object/apply:os.system ['true']\n")
    error = load_error(path)
    assert error.problems[0].startswith("poll: line 1, column 7: invalid YAML: could not determine a constructor")


# --- CLI overrides ---------------------------------------------------------------------------


def test_override_nothing_returns_equal_config():
    assert override(DEFAULTS) == DEFAULTS


def test_override_applies_and_derives():
    base = from_mapping({"poll": {"interval": "2s"}}, "f.yaml")
    cfg = override(base, listen_address="127.0.0.1:9100", log_level="DEBUG", netns="blue")
    assert cfg.prometheus == dataclasses.replace(DEFAULTS.prometheus, listen_address="127.0.0.1:9100",
                                                 host="127.0.0.1", port=9100)
    assert cfg.log.level == "debug"
    assert cfg.poll.netns == "blue"
    assert cfg.poll.stale_after == 6.0  # untouched keys keep their values
    assert cfg.source == "f.yaml"
    assert base.log.level == "info"  # the original is unchanged


def test_override_empty_netns_means_own_namespace():
    base = from_mapping({"poll": {"netns": "blue"}})
    assert override(base, netns="").poll.netns is None


def test_override_validates_and_names_flags():
    with pytest.raises(ConfigError) as info:
        override(DEFAULTS, listen_address="host:0", log_level="loud", netns="a/b")
    problems = info.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == ["--web.listen-address", "--log.level", "--netns"]
    assert "not a port (1-65535)" in problems[0]
    assert str(info.value).startswith("command line: 3 problems:")


def test_flags_table_points_at_real_keys():
    assert {f"{section}.{key}" for section, key in config.FLAGS.values()} <= set(config.KEY_PATHS)


def test_only_config_imports_yaml():
    package = ROOT / "daemon" / "sockscope"
    importers = sorted(p.name for p in package.glob("*.py") if re.search(r"^\s*(import|from)\s+yaml\b", p.read_text(), re.M))
    assert importers == ["config.py"]



# --- hostile files (issue 9, defect 2): refused cheaply, one problem naming the key ----------
# Each of these crashed (traceback), froze or exhausted memory before the loader limits; the
# same cases run through the real CLI in test_config_fuzz.py.


def hostile(tmp_path: Path, text: str, seconds: float = 1.0) -> ConfigError:
    path = write(tmp_path, text)
    started = time.monotonic()
    error = load_error(path)
    assert time.monotonic() - started < seconds, error
    assert len(str(error)) < 2000, str(error)[:300]  # values are shown shortened
    return error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("poll:\n  kernel_stats: !!bool maybe\n", "poll.kernel_stats: line 2, column 17: invalid YAML: cannot read 'maybe' as !!bool"),
        ("poll:\n  dump_retries: !!int abc\n", "poll.dump_retries: line 2, column 17: invalid YAML: cannot read 'abc' as !!int"),
        ("poll:\n  timeout: !!float x\n", "poll.timeout: line 2, column 12: invalid YAML: cannot read 'x' as !!float"),
        ("poll:\n  timeout: !!timestamp x\n", "poll.timeout: line 2, column 12: invalid YAML: cannot read 'x' as !!timestamp"),
        ("ports:\n  local: [1, !!binary 'zz!']\n", "ports.local[1]: line 2, column 14: invalid YAML: failed to decode base64"),
        ("poll:\n  dump_retries: " + "9" * 5000 + "\n", "poll.dump_retries: line 2, column 17: invalid YAML: cannot read '999"),
        ("poll:\n  interval: 1" + ":1" * 200_000 + "\n", "poll.interval: line 2, column 13: invalid YAML: cannot read '1:1"),
        ("poll:\n  ? [a]\n  : 1\n", "poll: line 2, column 5: invalid YAML: while constructing a mapping: found unhashable key"),
        ("poll: {!!int abc : 1}\n", "poll (a key): line 1, column 8: invalid YAML: cannot read 'abc' as !!int"),
        ("poll: !!omap [a]\n", "poll: line 1, column 15: invalid YAML: while constructing an ordered map"),
        ("poll:\n  timeout: !!set [a]\n", "poll.timeout: line 2, column 12: invalid YAML: expected a mapping node"),
        ("log: {level: !!map [1]}\n", "log.level: line 1, column 14: invalid YAML: expected a mapping node"),
    ],
    ids=["bool-maybe", "int-abc", "float-x", "timestamp-x", "binary", "5000-digits", "sexagesimal", "unhashable-key",
         "bad-key", "omap", "set-of-a-list", "map-of-a-list"],
)
def test_constructor_errors_name_the_key(tmp_path, text, expected):
    (problem,) = hostile(tmp_path, text).problems
    assert problem.startswith(expected), problem


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The classic "billion laughs": ~1 KB that expands to width**levels nodes."""
    lines = [f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_used_as_a_value_is_refused_at_once(tmp_path):
    # Before: 37 s and 2.2 GB, then MemoryError (repr of the expanded value in a message).
    text = "x:\n" + alias_bomb() + "poll:\n  netns: *l8\n"
    assert len(text) < 1100
    (problem,) = hostile(tmp_path, text, seconds=0.5).problems
    assert re.match(r"x\.l\d\[\d\]: line \d+, column \d+: YAML refused: the document expands to more than "
                    r"20,000 nodes", problem), problem


def test_merge_key_bomb_is_refused(tmp_path):
    text = "m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}\n"
    text += "".join(f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 8)}]}}\n" for i in range(1, 9))
    (problem,) = hostile(tmp_path, text + "poll: {<<: *m8}\n", seconds=0.5).problems
    assert "YAML refused: the document expands to more than 20,000 nodes" in problem


def test_aliases_within_the_limit_still_work(tmp_path):
    ports = list(range(1000, 5000))
    path = write(tmp_path, f"common: &p {ports}\nports:\n  local: *p\n  remote: *p\n"
                           "  max_local: 4096\n  max_remote: 4096\n")
    error = load_error(path)  # only the anchor's own key is unknown
    assert error.problems == ["common: unknown key"]


def test_a_million_keys_are_refused_after_the_node_cap(tmp_path):
    text = "poll:\n" + "".join(f"  k{i}: {i}\n" for i in range(60_000))
    (problem,) = hostile(tmp_path, text).problems
    assert "expands to more than 20,000 nodes" in problem


@pytest.mark.parametrize("text", [
    "poll:\n  families: " + "[" * 1000 + "]" * 1000 + "\n",  # RecursionError before
    "poll:\n  families: " + "[ " * 100 + "]" * 100 + "\n",
    "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)),
    "poll:\n  families: " + "{a: " * 40 + "1" + "}" * 40 + "\n",
], ids=["1000-brackets", "100-spaced", "60-block-levels", "40-flow-maps"])
def test_deep_nesting_is_refused(tmp_path, text):
    (problem,) = hostile(tmp_path, text).problems
    assert re.search(r"line \d+, column \d+: YAML (refused: nested more than 32 levels deep|syntax error: .*"
                     r"exceeded maximum nesting depth)", problem), problem


@pytest.mark.parametrize("text", ["poll: &a {netns: *a}\n", "ports: {local: &a [1, *a]}\n"])
def test_recursive_alias_is_refused(tmp_path, text):
    (problem,) = hostile(tmp_path, text).problems
    assert "is used inside its own anchor (a recursive structure)" in problem


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    error = load_error(str(fifo))  # open(2) without O_NONBLOCK waits for a writer forever
    assert time.monotonic() - started < 1
    assert error.problems == ["cannot read file: a FIFO, not a regular file"]


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"), ("/dev/null", "a character device")])
def test_devices_are_refused(tmp_path, path, kind):
    link = tmp_path / "config.yaml"
    link.symlink_to(path)  # a symlink is followed, then the file itself is judged
    for name in (path, str(link)):
        assert load_error(name).problems == [f"cannot read file: {kind}, not a regular file"]


def test_size_cap(tmp_path):
    just = "#" * (config.MAX_FILE_BYTES - 1) + "\n"
    assert load(write(tmp_path, just)) == DEFAULTS
    error = load_error(write(tmp_path, just + "#"))
    assert error.problems == [f"file is {config.MAX_FILE_BYTES + 1:,} bytes, larger than the limit of "
                              f"{config.MAX_FILE_BYTES:,}"]


def test_a_file_growing_past_the_cap_while_read_is_refused(tmp_path):
    # /proc files report size 0; read_file reads at most cap + 1 bytes whatever fstat said.
    assert len(config.read_file("/proc/self/maps", limit=1 << 30)) > 0
    with pytest.raises(ConfigError, match="larger than the limit of 10 bytes"):
        config.read_file("/proc/self/maps", limit=10)


def test_utf8_bom_is_accepted_utf16_is_not(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfpoll:\n  interval: 2s\n")
    assert load(str(path)).poll.interval == 2.0
    path.write_bytes("poll:\n  interval: 2s\n".encode("utf-16"))
    assert load_error(str(path)).problems == ["not UTF-8 text (byte 0)"]


def test_shown_values_are_bounded():
    from sockscope.config import _show

    shared = ["x"] * 10
    for _ in range(8):
        shared = [shared] * 10  # 10**9 leaves when expanded, like an alias bomb
    started = time.monotonic()
    for value in (shared, 10 ** 4000, "y" * 10**6, {"k" * 100: shared}, b"\0" * 10**6, object()):
        text = _show(value)
        assert len(text) <= 60, text
    assert time.monotonic() - started < 0.1
    assert _show(10**4000).startswith("<an integer of 13288 bits")


def test_many_problems_are_listed_up_to_a_cap(tmp_path):
    text = "poll:\n" + "".join(f"  unknown{i}: 1\n" for i in range(500))
    error = load_error(write(tmp_path, text))
    assert error.count == 500
    assert len(error.problems) == config.MAX_SHOWN_PROBLEMS + 1
    assert error.problems[-1] == f"... and {500 - config.MAX_SHOWN_PROBLEMS} more problems"
    assert str(error).startswith(f"{error.source}: 500 problems:")


def test_keys_are_shown_safely(tmp_path):
    problems = problems_of({"poll": {"a\nb": 1, "z" * 5000: 2, 7: 3}})
    assert problems[0] == "poll.'a\\nb': unknown key"
    assert problems[1].startswith("poll.'zzzz") and len(problems[1]) < 100
    assert problems[2] == "poll.7: unknown key"


# --- validation gaps (issue 9, defect 9) -------------------------------------------------------

GAP_CASES = [
    ({"poll": {"interval": "1ms"}}, "poll.interval",
     "'1ms' is too short (at least 100ms: a poll costs ~5-10 ms of CPU even on a small table)"),
    ({"poll": {"interval": 0.05}}, "poll.interval", "too short (at least 100ms"),
    ({"poll": {"stale_after": "9" * 400 + "s"}}, "poll.stale_after", "too long for a duration"),
    ({"poll": {"stale_after": "9" * 60 + "s"}}, "poll.stale_after", "too long (at most 72h)"),
    ({"poll": {"stale_after": 10**400}}, "poll.stale_after", "not a finite duration"),
    ({"poll": {"stale_after": float("inf")}}, "poll.stale_after", "not a finite duration"),
    ({"poll": {"interval": "\u0665s"}}, "poll.interval", "not a duration"),  # ARABIC-INDIC DIGIT FIVE
    ({"poll": {"interval": "\uff15s"}}, "poll.interval", "not a duration"),  # FULLWIDTH DIGIT FIVE
    ({"poll": {"interval": "\u20055s"}}, "poll.interval", "not a duration"),  # a non-ASCII space
    ({"poll": {"netns": "blue\n"}}, "poll.netns", "newline or another control character"),
    ({"poll": {"netns": "/run/netns/a\tb"}}, "poll.netns", "newline or another control character"),
    ({"poll": {"netns": "a\u2028b"}}, "poll.netns", "newline or another control character"),
    ({"poll": {"netns": "\ud800"}}, "poll.netns", "cannot be encoded (not a file name)"),
    ({"poll": {"netns": "n" * 256}}, "poll.netns", "256 bytes is too long for a name in /run/netns (at most 255)"),
    ({"poll": {"netns": "é" * 128}}, "poll.netns", "256 bytes is too long for a name"),
    ({"poll": {"netns": "/" + "d/" * 2048}}, "poll.netns", "4097 bytes is too long for a path (at most 4095)"),
    ({"poll": {"netns": "/proc/" + "p" * 256}}, "poll.netns", "a path component is longer than 255 bytes"),
    ({"prometheus": {"listen_address": "[fe80::1%eth\n0]:9393"}}, "prometheus.listen_address",
     "only printable ASCII characters"),
    ({"prometheus": {"listen_address": "[fe80::1%\ud800]:9393"}}, "prometheus.listen_address",
     "only printable ASCII characters"),
    ({"prometheus": {"listen_address": "h" * 300 + ":1"}}, "prometheus.listen_address", "too long (at most 260)"),
    ({"graphite": {"address": "\u0661.2.3.4:2003"}}, "graphite.address", "only printable ASCII characters"),
    ({"ports": {"local": [10**4000]}}, "ports.local[0]", "<an integer of 13288 bits> is not a port"),
    ({"ports": {"max_local": 2**70}}, "ports.max_local", "1180591620717411303424 is out of range (0-4096)"),
    ({"ports": {"local": [float("inf")]}}, "ports.local[0]", "expected an integer, got a number (inf)"),
    ({"log": {"level": "x" * 10**6}}, "log.level", "... is not one of debug"),
    ({"graphite": {"prefix": "a" * 300}}, "graphite.prefix", "300 characters is too long (at most 256)"),
]


@pytest.mark.parametrize(("data", "path", "fragment"), GAP_CASES, ids=[c[1] + ":" + c[2][:30] for c in GAP_CASES])
def test_validation_gaps(data, path, fragment):
    problem = only_problem(data)
    assert problem.startswith(f"{path}: "), problem
    assert fragment in problem
    assert len(problem) < 300


def test_interval_minimum_is_inclusive():
    assert from_mapping({"poll": {"interval": "100ms"}}).poll.interval == 0.1


def test_long_ipv6_scope_and_hostnames_still_parse():
    assert parse_listen_address("[fe80::1%enp0s31f6]:9393") == ("fe80::1%enp0s31f6", 9393)
    host = ".".join(["a" * 63] * 3) + ".b"
    assert parse_listen_address(f"{host}:1") == (host, 1)


def test_netns_limits_inclusive():
    assert from_mapping({"poll": {"netns": "n" * 255}}).poll.netns == "n" * 255
    assert from_mapping({"poll": {"netns": "blue green"}}).poll.netns == "blue green"
    path = "/" + "/".join(["d" * 255] * 15 + ["d" * 254])
    assert len(path) == 4095 and from_mapping({"poll": {"netns": path}}).poll.netns == path
