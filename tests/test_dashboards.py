"""Grafana dashboards (dashboards/grafana): JSON structure, every PromQL expression of
the Prometheus dashboard returning data from a real Prometheus that scrapes a real
sockscope watching a test namespace (with the recording rules loaded), and every series
of every Graphite dashboard target existing as a whisper file in a real carbon fed by a
real sockscope watching the same namespace."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from carbon import Carbon, prerequisites_missing
from conftest import require
from daemon_helpers import free_port, start_daemon
from sockscope.graphite import sanitize

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "dashboards" / "grafana"
PROM_DASH = GRAFANA / "sockscope-prometheus.json"
GRAPHITE_DASH = GRAFANA / "sockscope-graphite.json"
RULES = [ROOT / "dashboards" / "prometheus" / "sockscope-rules.yml",
         ROOT / "dashboards" / "prometheus" / "sockscope-alerts.yml"]
MIN_SCHEMA_VERSION = 36  # Grafana 9+; the dashboards carry 39 (Grafana 10.4/11)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def datasource_var(dash: dict) -> dict:
    (ds,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    return ds


# -- structure -----------------------------------------------------------------------------------


DASHBOARDS = [p for p in (PROM_DASH, GRAPHITE_DASH) if p.exists()]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_structure(path):
    dash = load(path)
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        assert key in dash, key
    assert dash["schemaVersion"] >= MIN_SCHEMA_VERSION
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dash["uid"])
    assert "id" not in dash or dash["id"] is None  # importable: Grafana assigns the id
    ds = datasource_var(dash)
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in all_panels(dash):
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${" + ds["name"] + "}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${" + ds["name"] + "}", p["title"]
    # No data source uid written anywhere: only the variable.
    text = path.read_text()
    for uid in re.findall(r'"uid":\s*"([^"]*)"', text):
        assert uid in (dash["uid"], "${" + ds["name"] + "}"), uid


def test_prometheus_dashboard_variables_and_coverage():
    dash = load(PROM_DASH)
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", "job", "instance", "port"]
    assert datasource_var(dash)["query"] == "prometheus"
    exprs = " ".join(t["expr"] for p in all_panels(dash) for t in p.get("targets", []))
    for needed in ("close_wait", "_peak", "receive_queue_bytes", "listen_queue_fill",
                   "listen_overflows", "out_resets", "sockscope_up", "snapshot_age"):
        assert needed in exprs, needed


# -- against a real Prometheus ------------------------------------------------------------------


def prom_query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def label_values(base: str, label: str, match: str) -> list[str]:
    url = f"{base}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]


@pytest.fixture(scope="module")
def prometheus_binary():
    path = shutil.which("prometheus")
    require(path is not None, "needs prometheus (Debian package prometheus; make system-deps)")
    return path


@pytest.fixture(scope="module")
def stack(netns, sockmix, prometheus_binary, tmp_path_factory):
    """sockscope watching `netns` (with the full sockmix), scraped every 1 s by Prometheus."""
    work = tmp_path_factory.mktemp("prom")
    daemon = start_daemon(work, "poll:\n  interval: 500ms\n  peak_window: 5s\n", netns=netns.name)
    port = free_port()
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: [{', '.join(json.dumps(str(r)) for r in RULES)}]\n"
        "scrape_configs:\n  - job_name: sockscope\n"
        f"    static_configs: [{{targets: ['{daemon.address}']}}]\n")
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [prometheus_binary, f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, (work / "prometheus.log").read_text()
            try:
                if prom_query(base, 'up{job="sockscope"} == 1'):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Prometheus never scraped sockscope:\n" + (work / "prometheus.log").read_text())
        yield base, daemon
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        daemon.stop()


def test_every_prometheus_dashboard_query_returns_data(stack):
    base, daemon = stack
    dash = load(PROM_DASH)
    variables = {"job": "sockscope", "instance": daemon.address}
    # Template variable queries: label_values(selector, label) must list values.
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]["query"])
        assert m, v["query"]
        selector = m.group(1)
        for name, value in variables.items():
            selector = selector.replace("$" + name, value)
        values = label_values(base, m.group(2), selector)
        assert values, v["name"]
        if v["name"] == "job":
            assert "sockscope" in values
        if v["name"] == "port":
            assert "18084" in values and "other" in values  # the sockmix CLOSE-WAIT port
            variables["port"] = "|".join(values)  # "All" selected, as a multi-value regex
    exprs = {}
    for p in all_panels(dash):
        for t in p.get("targets", []):
            expr = t["expr"]
            for name, value in variables.items():
                expr = expr.replace("$" + name, value)
            assert "$" not in expr, expr
            exprs[expr] = p["title"]
    pending = dict(exprs)
    deadline = time.monotonic() + 30  # recording rules and rate() need a few samples
    while pending and time.monotonic() < deadline:
        for expr in list(pending):
            if prom_query(base, expr):
                del pending[expr]
        if pending:
            time.sleep(1)
    assert not pending, f"no data for: {json.dumps(pending, indent=1)}"
    assert len(exprs) >= 30
    # And the data is the namespace's: the sockmix's CLOSE-WAIT sockets and full queue.
    cw = prom_query(base, 'sockscope_tcp_local_port_sockets_peak{port="18084",state="close_wait"}')
    assert float(cw[0]["value"][1]) == 3
    fill = prom_query(base, 'sockscope:tcp_listen_queue_fill:ratio{port="18090"}')
    assert float(fill[0]["value"][1]) == pytest.approx(5 / 4)


def test_graphite_dashboard_uses_the_default_graphite_paths():
    """Every target is built on sockscope.<host> (graphite.py's default prefix) and names
    only path families graphite.py writes (the real-carbon check is below)."""
    dash = load(GRAPHITE_DASH)
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "host", "port"]
    assert datasource_var(dash)["query"] == "graphite"
    known = re.compile(r"sockscope\.\$host\.(tcp\.(states|local_port|remote_port|listen)|sockscope\.(poll|graphite))\.")
    for p in all_panels(dash):
        for t in p["targets"]:
            paths = re.findall(r"sockscope\.\$host\.[\w.${},*]+", t["target"])
            assert paths, t["target"]
            for path in paths:
                assert known.match(path + "."), path


# -- Graphite dashboard against a real carbon -------------------------------------------------
#
# Each target is parsed (a small parser for Graphite's function syntax), its template
# variables substituted, and every series argument (path expression) globbed against the
# whisper tree the way graphite-web's finder does: `{a,b}` alternatives, then fnmatch per
# dot-separated component (`*`, `?`, `[...]` never cross a dot).

_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\(")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


class GraphiteTargetParser:
    """expr := call | 'string' | "string" | number | true/false | path;
    call := name '(' [expr (',' expr)*] ')'. Returns nested tuples:
    ("call", name, [args]), ("str", s), ("num", x), ("path", p)."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    @classmethod
    def parse(cls, text: str):
        p = cls(text)
        tree = p.expr()
        p.ws()
        assert p.i == len(p.s), f"trailing text at {p.i} in {text!r}"
        return tree

    def ws(self):
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def expr(self):
        self.ws()
        s = self.s
        assert self.i < len(s), f"expression expected at the end of {s!r}"
        if s[self.i] in "'\"":
            end = s.index(s[self.i], self.i + 1)
            tok, self.i = s[self.i + 1:end], end + 1
            return ("str", tok)
        m = _CALL.match(s, self.i)
        if m:
            self.i = m.end()
            args = []
            self.ws()
            if s[self.i] != ")":
                while True:
                    args.append(self.expr())
                    self.ws()
                    if s[self.i] == ",":
                        self.i += 1
                        continue
                    assert s[self.i] == ")", f"',' or ')' expected at {self.i} in {s!r}"
                    break
            self.i += 1
            return ("call", m.group(1), args)
        start, depth = self.i, 0
        while self.i < len(s):
            c = s[self.i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            elif c in ",)" and depth == 0:
                break
            self.i += 1
        tok = s[start:self.i].strip()
        assert tok and depth == 0, f"bad token {tok!r} in {s!r}"
        if _NUMBER.fullmatch(tok):
            return ("num", float(tok))
        if tok in ("true", "false", "True", "False", "None"):
            return ("str", tok)
        return ("path", tok)


def series_arguments(tree) -> list[tuple[str, list[int]]]:
    """Every path expression in the tree, each with the aliasByNode nodes applied to it."""
    out: list[tuple[str, list[int]]] = []

    def walk(node, nodes):
        if node[0] == "path":
            out.append((node[1], nodes))
        elif node[0] == "call":
            name, args = node[1], node[2]
            if name == "aliasByNode":
                walk(args[0], nodes + [int(a[1]) for a in args[1:]])
            else:
                for a in args:
                    walk(a, nodes)

    walk(tree, [])
    return out


def expand_braces(pattern: str) -> list[str]:
    """`a.{b,c}.d` -> [`a.b.d`, `a.c.d`] (nested and several groups too)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",")
            for x in expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


def glob(pattern: str, nodes: set[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Nodes (whisper files, or directories) a Graphite pattern matches."""
    out = []
    for alt in expand_braces(pattern):
        parts = alt.split(".")
        out += [n for n in nodes if len(n) == len(parts)
                and all(fnmatch.fnmatchcase(c, p) for c, p in zip(n, parts))]
    return out


def whisper_tree(root: Path) -> tuple[set, set]:
    """(series, every node incl. directories) as component tuples; tagged series left out."""
    series = set()
    for base, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "_tagged"]
        for name in files:
            if name.endswith(".wsp"):
                rel = os.path.relpath(os.path.join(base, name), root)[:-len(".wsp")]
                series.add(tuple(rel.split(os.sep)))
    nodes = {s[:k] for s in series for k in range(1, len(s) + 1)}
    return series, nodes


def substitute(text: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        text = text.replace("${" + name + "}", value).replace("[[" + name + "]]", value)
        text = re.sub(r"\$" + name + r"\b", lambda _m: value, text)
    assert "$" not in text, f"unsubstituted variable in {text!r}"
    return text


def test_target_parser():
    tree = GraphiteTargetParser.parse(
        "alias(sumSeries(a.$h.b.*.c, x.{d,e}.f), 'all, ports')")
    assert tree == ("call", "alias", [("call", "sumSeries", [("path", "a.$h.b.*.c"), ("path", "x.{d,e}.f")]),
                                      ("str", "all, ports")])
    assert series_arguments(GraphiteTargetParser.parse("aliasByNode(asPercent(a.*.q, a.*.l), 2)")) == \
        [("a.*.q", [2]), ("a.*.l", [2])]
    assert expand_braces("a.{b,c}.{d,e}") == ["a.b.d", "a.b.e", "a.c.d", "a.c.e"]
    files = {("a", "1", "q"), ("a", "2", "l")}
    assert glob("a.*.q", files) == [("a", "1", "q")]
    assert glob("a.{1,2}.[lq]", files) and not glob("a.*", files) and not glob("a.3.q", files)


@pytest.fixture
def carbon_fed(sockmix, netns, tmp_path_factory):
    """A real carbon-cache fed by sockscope (default naming and prefix) watching `netns`."""
    require(prerequisites_missing() is None, prerequisites_missing() or "")
    carbon = Carbon.start(tmp_path_factory.mktemp("carbon"))
    try:
        work = tmp_path_factory.mktemp("graphite-dash")
        daemon = start_daemon(work, "poll:\n  interval: 1s\n  kernel_stats: false\n"
                              f"graphite:\n  enabled: true\n  address: 127.0.0.1:{carbon.port}\n",
                              netns=netns.name)
        try:
            yield carbon, daemon
        finally:
            assert daemon.stop() == 0, daemon.log()
    finally:
        carbon.close()


def test_every_graphite_dashboard_target_exists_in_carbon(carbon_fed, sockmix):
    carbon, daemon = carbon_fed
    dash = load(GRAPHITE_DASH)
    host = sanitize(socket.gethostname())
    close_wait_port = str(sockmix.group("close_wait")["port"])
    full_port = str(sockmix.group("full_queue")["port"])
    targets = [(p["title"], t["target"]) for p in all_panels(dash) for t in p.get("targets", [])]
    assert len(targets) >= 10
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    # $port as Grafana renders it for Graphite: "All" (allValue), one port, several ports.
    port_choices = [variables["port"].get("allValue") or "*", close_wait_port,
                    "{" + close_wait_port + "," + full_port + "}"]

    def problems() -> list[str]:
        series, nodes = whisper_tree(carbon.whisper_dir)
        found: list[str] = []
        # The template variables' own queries list the values we substitute.
        hosts = {n[-1] for n in glob(variables["host"]["query"], nodes)}
        if host not in hosts:
            found.append(f"$host query {variables['host']['query']!r} lists {sorted(hosts)}, not {host!r}")
        ports = {n[-1] for n in glob(substitute(variables["port"]["query"], {"host": host}), nodes)}
        if not {close_wait_port, full_port, "other"} <= ports:
            found.append(f"$port query lists {sorted(ports)}")
        for title, target in targets:
            for port in port_choices:
                tree = GraphiteTargetParser.parse(substitute(target, {"host": host, "port": port}))
                args = series_arguments(tree)
                if not args:
                    found.append(f"{title}: no series in {target!r}")
                for path, alias_nodes in args:
                    # every {a,b} alternative on its own: a typo in one must not hide
                    for alt in expand_braces(path):
                        matched = glob(alt, series)
                        if not matched:
                            found.append(f"{title}: {alt!r} matches no whisper file ($port={port})")
                        elif alias_nodes and max(alias_nodes) >= len(alt.split(".")):
                            found.append(f"{title}: aliasByNode{tuple(alias_nodes)} beyond {alt!r}")
        return found

    deadline = time.monotonic() + 30  # carbon creates the files as the first pushes arrive
    left = problems()
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = problems()
    assert not left, "\n".join(dict.fromkeys(left))
    # And the values are the namespace's: the mix's CLOSE-WAIT sockets on their port.
    cw = carbon.fetch(f"sockscope.{host}.tcp.local_port.{close_wait_port}.close_wait")
    assert cw and list(cw.values())[-1] == sockmix.group("close_wait")["n"]
    print(f"\n{len(targets)} targets x {len(port_choices)} $port values: every series in whisper")
