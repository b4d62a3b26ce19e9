"""Tests for sockscope.config: defaults, every validation rule, loading and CLI overrides."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from sockscope import config
from sockscope.config import DEFAULTS, ConfigError, from_mapping, load, override, parse_duration, parse_listen_address

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
    assert DEFAULTS.prometheus == config.PrometheusConfig(enabled=True, listen_address=":9393", host="", port=9393)
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
    assert cfg.prometheus == config.PrometheusConfig(False, "[::1]:9100", "::1", 9100)
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
    assert error.problems[0].startswith("cannot read file: ")


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
    assert error.problems == ["line 3, column 3: invalid YAML: key 'interval' appears twice in one mapping"]


def test_yaml_merge_keys_still_work(tmp_path):
    # Keys brought in by a merge may be overridden; only explicit repeats are errors.
    path = write(tmp_path, "poll:\n  <<: {interval: 2s, timeout: 7s}\n  interval: 3s\n")
    cfg = load(path)
    assert (cfg.poll.interval, cfg.poll.timeout) == (3.0, 7.0)


def test_python_tags_are_refused(tmp_path):
    path = write(tmp_path, "poll: !!python/object/apply:os.system ['true']\n")
    error = load_error(path)
    assert error.problems[0].startswith("line 1, column 7: invalid YAML: could not determine a constructor")


# --- CLI overrides ---------------------------------------------------------------------------


def test_override_nothing_returns_equal_config():
    assert override(DEFAULTS) == DEFAULTS


def test_override_applies_and_derives():
    base = from_mapping({"poll": {"interval": "2s"}}, "f.yaml")
    cfg = override(base, listen_address="127.0.0.1:9100", log_level="DEBUG", netns="blue")
    assert cfg.prometheus == config.PrometheusConfig(True, "127.0.0.1:9100", "127.0.0.1", 9100)
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

