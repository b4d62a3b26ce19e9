"""Grafana dashboards (dashboards/grafana): JSON structure, links into the docs, thresholds
equal to the alerts'; every PromQL expression of the Prometheus dashboard returning data for
two instances at once from a real Prometheus that scrapes two real sockscopes watching a test
namespace (with the recording rules loaded); and every series of every target of the two
Graphite dashboards (naming sockscope, at two prefix depths and with several hosts, and
naming collectd) existing as a whisper file in a real carbon fed by real sockscopes."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sockscope import selfmetrics
from support.carbon import Carbon, prerequisites_missing
from support.daemon import start_daemon
from support.prereq import require
from support.prom_server import RealPrometheus

# sockscope's own series (selfmetrics): they describe the whole poll and carry no netns.
SELF_SERIES = {m.name + ("_total" if m.kind == "counter" else "")
               for m in (*selfmetrics.SCRAPE_METRICS, *selfmetrics.POLL_METRICS)}

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "dashboards" / "grafana"
PROM_DASH = GRAFANA / "sockscope-prometheus.json"
GRAPHITE_DASH = GRAFANA / "sockscope-graphite.json"
COLLECTD_DASH = GRAFANA / "sockscope-collectd.json"
DASHBOARDS = [PROM_DASH, GRAPHITE_DASH, COLLECTD_DASH]
RULES = [ROOT / "dashboards" / "prometheus" / "sockscope-rules.yml",
         ROOT / "dashboards" / "prometheus" / "sockscope-alerts.yml"]
MIN_SCHEMA_VERSION = 36  # Grafana 9+; the dashboards carry 39 (Grafana 10.4/11)
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval); the
# test Prometheus scrapes every second.
RATE_INTERVAL = "4s"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def datasource_var(dash: dict) -> dict:
    (ds,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    return ds


def alert_rules() -> dict[str, dict]:
    doc = yaml.safe_load(RULES[1].read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


# -- structure -----------------------------------------------------------------------------------


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
        assert p.get("description", "").strip(), f"panel {p['id']} {p['title']!r} has no description"
        assert p["datasource"]["uid"] == "${" + ds["name"] + "}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${" + ds["name"] + "}", p["title"]
    # No data source uid written anywhere: only the variable.
    text = path.read_text()
    for uid in re.findall(r'"uid":\s*"([^"]*)"', text):
        assert uid in (dash["uid"], "${" + ds["name"] + "}"), uid
    assert len({load(p)["uid"] for p in DASHBOARDS}) == len(DASHBOARDS)


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_links_lead_to_doc_sections_that_exist(path):
    """Dashboard and panel links are ${docs}/FILE.md[#anchor]; `docs` is a hidden constant
    (docs/alerting.md says how to point it at the published docs)."""
    dash = load(path)
    docs = variables(dash)["docs"]
    assert docs["type"] == "constant" and docs["query"] == "docs"
    links = [(link["title"], link["url"]) for link in dash["links"]]
    links += [(f"panel {p['id']}: {link['title']}", link["url"])
              for p in all_panels(dash) for link in p.get("links", [])]
    assert len(dash["links"]) >= 2 and len(links) >= 4
    for title, url in links:
        m = re.fullmatch(r"\$\{docs\}/([\w.-]+\.md)(?:#([\w-]+))?", url)
        assert m, (title, url)
        doc = ROOT / "docs" / m.group(1)
        assert doc.exists(), (title, url)
        if m.group(2):
            assert m.group(2) in github_anchors(doc.read_text()), (title, url)


def test_prometheus_dashboard_variables_and_coverage():
    dash = load(PROM_DASH)
    var = variables(dash)
    assert list(var) == ["datasource", "job", "instance", "netns", "port", "remote_port", "docs"]
    assert datasource_var(dash)["query"] == "prometheus"
    for name in ("instance", "netns", "port", "remote_port"):  # several selectable, "All" included
        assert var[name]["multi"] and var[name]["includeAll"], name
    # Without a sweep no series has netns: "All" must match a missing label, as ".*" does.
    assert var["netns"]["allValue"] == ".*"
    assert "sockscope_tcp_remote_port_sockets" in var["remote_port"]["query"]["query"]
    assert 'netns=~"$netns"' in var["port"]["query"]["query"] + var["remote_port"]["query"]["query"]
    exprs = [t["expr"] for p in all_panels(dash) for t in p.get("targets", [])]
    for expr in exprs:
        # A multi-value variable is a regex: `=` would match only a single selection.
        assert 'instance=~"$instance"' in expr and 'instance="' not in expr, expr
        assert 'port="$' not in expr, expr
        # In a sweep every series but sockscope's own health carries netns: each such
        # selector follows the namespace variable (the own series have no netns to match).
        for name, body in re.findall(r'([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}', expr):
            own = name == "up" or name in SELF_SERIES
            assert ('netns=~"$netns"' in body) != own, (name, expr)
        # Ranges follow the zoom and the scrape interval, never a fixed [5m].
        for rng in re.findall(r"\[([^\]]*)\]", expr):
            assert rng == "$__rate_interval", expr
    # Several instances on one panel: each series says which, except in the panels that
    # sum the selected instances on purpose (RTT heatmap, limited-by shares: one stack per
    # port): repeated over a port variable, aggregated by `sum` to no instance label.
    no_instance = [(p, t) for p in all_panels(dash) for t in p.get("targets", [])
                   if "{{instance}}" not in t["legendFormat"]]
    for p, t in no_instance:
        assert summed_over_instances(p), (p["title"], t["expr"])
    assert {p["type"] for p, _ in no_instance} == {"heatmap", "timeseries"}
    for p in all_panels(dash):
        if p["type"] == "heatmap":  # Prometheus turns the cumulative le buckets into cells
            assert all(t["format"] == "heatmap" and t["legendFormat"] == "{{le}}"
                       and t["expr"].startswith("sum by (le) (") and "_bucket{" in t["expr"]
                       and "rate(" not in t["expr"] for t in p["targets"]), p["title"]
            assert p["options"]["calculate"] is False and p["options"]["yAxis"]["unit"] == "s"
    joined = " ".join(exprs)
    assert 'port=~"$remote_port"' in joined
    for needed in ("close_wait", "_peak", "receive_queue_bytes", "listen_queue_length_per_limit",
                   "listen_overflows", "out_resets", "sockscope_up", "snapshot_age",
                   "sockscope_poll_interval_seconds", "out_segments",
                   # issue 12, tcp_info: the three waits as window peaks, RTT and limited-by both sides
                   "oldest_unaccepted_seconds_peak", "oldest_unread_seconds_peak",
                   "oldest_close_wait_seconds_peak", "local_port_rtt_seconds_bucket",
                   "remote_port_rtt_seconds_bucket", "local_port_busy_seconds_total",
                   "remote_port_busy_seconds_total",
                   # issue 13, connections: bytes per closed connection (the Solr-XML view),
                   # closes by outcome, retransmits per port, lifetime, reconciliation
                   "remote_port_sent_bytes_total", "remote_port_received_bytes_total",
                   "local_port_connections_closed_total", "remote_port_connections_closed_total",
                   "local_port_retransmitted_segments_total", "remote_port_retransmitted_segments_total",
                   "remote_port_connection_duration_seconds_bucket",
                   "connections_accounted_retransmitted_segments_total", "connections_accounted_closed_total",
                   # issue 14, units: CLOSE-WAIT per unit with its window peak, sockets per unit
                   "tcp_unit_sockets_peak", "tcp_unit_sockets{"):
        assert needed in joined, needed


def summed_over_instances(panel: dict) -> bool:
    """A panel repeated over a port variable (one port each) whose every query sums the
    selected instances: `sum(`/`sum by (<labels other than instance>) (`."""
    var = panel.get("repeat")
    if var not in ("port", "remote_port"):
        return False
    for t in panel["targets"]:
        m = re.match(r"sum(?: by \(([\w, ]*)\))? ?\(", t["expr"])
        if not m or "instance" in (m.group(1) or "") or f'port=~"${var}"' not in t["expr"]:
            return False
    return True


def threshold_steps(panel: dict) -> list[float]:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    return [s["value"] for s in steps if s["value"] is not None]


def panel_by_expr(dash: dict, fragment: str) -> list[dict]:
    return [p for p in all_panels(dash)
            if any(fragment in t.get("expr", t.get("target", "")) for t in p.get("targets", []))]


def test_thresholds_are_the_alerts():
    """Accept-queue fill at 0.8, the 1 MiB receive backlog, the three tcp_info waits and the
    receiver-limited share: the same literals as the alerts, read from the rule file (change
    one, this fails until the other follows)."""
    rules = alert_rules()
    fill = float(re.search(r">= ([\d.]+)", rules["SockscopeAcceptQueueNearFull"]["expr"]).group(1))
    backlog = float(re.search(r"> (\d+)", rules["SockscopeReceiveQueueBacklogGrowing"]["expr"]).group(1))
    overflows = float(re.search(r"> ([\d.]+)", rules["SockscopeListenOverflows"]["expr"]).group(1))
    tw = float(re.search(r"> ([\d.]+)", rules["SockscopeTimeWaitNearLimit"]["expr"]).group(1))
    waits = {fragment: float(re.fullmatch(rf"sockscope_tcp_local_port_{fragment}(?:_peak)? > ([\d.]+)",
                                          rules[alert]["expr"].strip()).group(1))
             for fragment, alert in (("oldest_unaccepted_seconds", "SockscopeAcceptQueueWait"),
                                     ("oldest_unread_seconds", "SockscopeUnreadRequestOld"),
                                     ("oldest_close_wait_seconds", "SockscopeCloseWaitOld"))}
    receiver = float(re.search(r"^> ([\d.]+)$", rules["SockscopeReceiverLimited"]["expr"], re.M).group(1))
    failed, unread = (float(re.search(r"^> ([\d.]+)$", rules[a]["expr"], re.M).group(1))
                      for a in ("SockscopeConnectFailures", "SockscopeUnreadDataCloses"))
    assert (fill, backlog) == (0.8, 1048576)
    assert list(waits.values()) == [1, 5, 600] and receiver == 0.5
    prom = load(PROM_DASH)
    for fragment, value in (("listen_queue_length_per_limit:ratio", fill),
                            ("local_port_receive_queue_bytes", backlog), ("listen_overflows", overflows),
                            ("time_wait_sockets_per_limit", tw), *waits.items(),
                            ('local_port_busy_seconds_total{job="$job",instance=~"$instance",netns=~"$netns",port=~"$port",'
                             'limited_by="receiver"}', receiver),
                            ('port=~"$remote_port",outcome="failed"}', failed),
                            ('port=~"$port",outcome="unread_data"}', unread)):
        (panel,) = panel_by_expr(prom, fragment)
        assert threshold_steps(panel) == [value], (panel["title"], threshold_steps(panel))
    # The receiver share's line reads against the bottom band: receiver first in the stack.
    (panel,) = panel_by_expr(prom, 'local_port_busy_seconds_total{job="$job",instance=~"$instance",netns=~"$netns",'
                                   'port=~"$port",limited_by="receiver"}')
    assert [t["legendFormat"] for t in panel["targets"]] == ["receiver", "send_buffer", "network"]
    graphite = load(GRAPHITE_DASH)
    (panel,) = panel_by_expr(graphite, "asPercent($prefix.$host.tcp.listen.")
    assert threshold_steps(panel) == [fill * 100] and panel["fieldConfig"]["defaults"]["unit"] == "percent"
    (panel,) = panel_by_expr(graphite, "receive_queue_bytes")
    assert threshold_steps(panel) == [backlog]
    for dash in (graphite, load(COLLECTD_DASH)):
        for fragment, value in waits.items():
            (panel,) = panel_by_expr(dash, fragment)
            assert threshold_steps(panel) == [value], (panel["title"], threshold_steps(panel))
            assert ".peak.tcp.local_port." in panel["targets"][0]["target"]  # stalls between pushes


def test_a_panel_never_mixes_a_ratio_with_counts():
    """One unit per panel: a 0-1 ratio (recording rule `:ratio` or a division) only in
    percentunit panels, and nothing else there (panel 24 mixed the port range with the
    TIME-WAIT ratio)."""
    dash = load(PROM_DASH)
    for p in all_panels(dash):
        if p["type"] == "row":
            continue
        unit = p["fieldConfig"]["defaults"]["unit"]
        # bytes per closed connection: a division, in bytes (issue 13's Solr-XML view)
        per_connection = [re.fullmatch(r"sum by \(instance, port\) \(rate\(\w+_bytes_total.* / sum by "
                                       r"\(instance, port\) \(rate\(\w+_connections_closed_total[^/]*", t["expr"])
                          for t in p["targets"]]
        if any(per_connection):
            assert all(per_connection) and unit == "bytes", (p["id"], p["title"], unit)
            continue
        ratios = [(":ratio" in t["expr"] or " / " in t["expr"]) for t in p["targets"]]
        assert all(ratios) if unit == "percentunit" else not any(ratios), (p["id"], p["title"], unit)
    (ports,) = [p for p in all_panels(dash) if p["id"] == 24]
    assert len(ports["targets"]) == 1 and ports["fieldConfig"]["defaults"]["unit"] == "none"


# -- against a real Prometheus ------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(netns, sockmix, tmp_path_factory):
    """Two sockscopes watching `netns` (with the full sockmix), scraped every 1 s by one
    Prometheus with the recording and alert rules loaded."""
    work = tmp_path_factory.mktemp("prom")
    # tcp_info on: the mix's idle ESTABLISHED pairs fill the RTT buckets, its full queue, unread
    # and CLOSE-WAIT sockets the waits, its zero-window senders (sendq) grow receiver busy time.
    # connections on: CHURN's connections to its own port 18095 (a tracked remote port) close
    # normally, with unread data, and fail, while the polls run.
    config = ("poll:\n  interval: 500ms\n  peak_window: 5s\nports:\n  remote: [18080, 18084, 18095]\n"
              "tcp_info:\n  enabled: true\nconnections:\n  enabled: true\n")
    daemons = []
    churn = netns.popen([sys.executable, "-c", CHURN], stdin=subprocess.PIPE)
    try:
        for _ in range(2):
            daemons.append(start_daemon(work, config, netns=netns.name))
        prom = RealPrometheus(
            work / "prometheus",
            [{"job_name": "sockscope", "static_configs": [{"targets": [d.address for d in daemons]}]}],
            rule_files=[str(r) for r in RULES])
        with prom:
            prom.wait_value('count(up{job="sockscope"} == 1) == 2')
            yield prom, daemons
    finally:
        churn.stdin.close()
        churn.wait(timeout=10)
        for d in daemons:
            d.stop()


# Connections for the connections panels, ~10/s, until stdin closes (at most 10 minutes):
# each sends 2,000 bytes and lives ~0.7 s (so the 500 ms polls see it: its lifetime is
# observed); the server closes every 4th without reading it (unread_data); every 5th connect
# goes to a port nobody listens on (failed).
CHURN = r"""
import select, socket, sys, threading, time
srv = socket.create_server(("127.0.0.1", 18095), backlog=256)
def serve():
    n = 0
    while True:
        a, _ = srv.accept()
        n += 1
        if n % 4:
            threading.Thread(target=drain, args=(a,), daemon=True).start()
        else:
            threading.Timer(0.3, a.close).start()  # the request sits unread: an RST on close
def drain(a):
    while a.recv(65536):
        pass
    a.close()
def client(i):
    try:
        c = socket.create_connection(("127.0.0.1", 18096 if i % 5 == 0 else 18095), timeout=2)
    except OSError:
        return
    try:
        c.sendall(b"r" * 2000)
        time.sleep(0.7)
    except OSError:
        pass
    c.close()
threading.Thread(target=serve, daemon=True).start()
deadline, i = time.monotonic() + 600, 0
while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0.1)[0]:
    i += 1
    threading.Thread(target=client, args=(i,), daemon=True).start()
"""


def fill_in(expr: str, values: dict[str, str]) -> str:
    """A dashboard expression with its variables as Grafana renders them."""
    for name in sorted(values, key=len, reverse=True):  # $remote_port before $port
        expr = expr.replace("$" + name, values[name])
    assert "$" not in expr, expr
    return expr


def label_values(prom: RealPrometheus, label: str, match: str) -> list[str]:
    return prom.get(f"label/{label}/values", **{"match[]": match})


def test_every_prometheus_dashboard_query_returns_data_for_every_instance(stack, sockmix):
    prom, daemons = stack
    dash = load(PROM_DASH)
    instances = {d.address for d in daemons}
    # Several instances selected: Grafana renders a multi-value variable as a regex.
    values = {"job": "sockscope", "instance": "|".join(sorted(instances)),
              "__rate_interval": RATE_INTERVAL}
    # Template variable queries: label_values(selector, label) must list values.
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]["query"])
        assert m, v["query"]
        selector = m.group(1)
        for name, value in values.items():
            selector = selector.replace("$" + name, value)
        listed = label_values(prom, m.group(2), selector)
        if v["name"] == "netns":  # one namespace, no sweep: no series has the label
            assert listed == []
            values["netns"] = v["allValue"]  # "All"
            continue
        assert listed, v["name"]
        if v["name"] == "job":
            assert "sockscope" in listed
        if v["name"] == "instance":
            assert set(listed) == instances
        if v["name"] == "port":
            assert {"18084", "other"} <= set(listed)  # the sockmix CLOSE-WAIT port
        if v["name"] == "remote_port":
            assert set(listed) == {"18080", "18084", "18095", "other"}
        if v["name"] in ("port", "remote_port"):
            values[v["name"]] = "|".join(listed)  # "All" selected, as a multi-value regex
    # Each query with every instance selected must return series of both; a panel that sums
    # the instances (summed_over_instances) must return data with each instance alone.
    exprs: dict[str, tuple[str, frozenset]] = {}
    for p in all_panels(dash):
        for t in p.get("targets", []):
            if summed_over_instances(p):
                for one in instances:
                    exprs[fill_in(t["expr"], {**values, "instance": one})] = \
                        (f"{p['title']} ({one} alone)", frozenset([None]))
            else:
                exprs[fill_in(t["expr"], values)] = (p["title"], frozenset(instances))
    pending = dict(exprs)
    deadline = time.monotonic() + 30  # recording rules and rate() need a few samples
    while pending and time.monotonic() < deadline:
        for expr, (_title, want) in list(pending.items()):
            seen = {s["metric"].get("instance") for s in prom.query(expr)}
            if seen == want:
                del pending[expr]
        if pending:
            time.sleep(1)
    assert not pending, f"no data for both instances: {json.dumps({e: t for e, (t, _w) in pending.items()}, indent=1)}"
    assert len(exprs) >= 35
    # The tcp_info panels show the namespace's sockets, per instance: the RTT heatmap of the
    # mix's ESTABLISHED port counts each of its sockets once in each of its 17 cumulative
    # buckets' +Inf (as the socket count does); the limited-by stack of the zero-window senders
    # (sendq: the client never reads) is all receiver and adds up to 1.
    (heat,) = [p for p in all_panels(dash) if p["type"] == "heatmap" and p["repeat"] == "port"]
    (share,) = [p for p in all_panels(dash) if p.get("repeat") == "port" and p["type"] == "timeseries"]
    stalled = str(sockmix.group("sendq")["port"])
    for one in sorted(instances):
        single = {**values, "instance": one}
        buckets = prom.query(fill_in(heat["targets"][0]["expr"], {**single, "port": "18080"}))
        by_le = sorted((float(s["metric"]["le"]), float(s["value"][1])) for s in buckets)
        counts = [n for _le, n in by_le]
        assert len(by_le) == 17 and by_le[-1][0] == float("inf") and counts == sorted(counts), by_le
        (est,) = prom.query(f'sockscope_tcp_local_port_sockets{{instance="{one}",port="18080",state="established"}}')
        assert counts[-1] == float(est["value"][1]) > 0
        shares = {t["legendFormat"]: prom.query(fill_in(t["expr"], {**single, "port": stalled}))
                  for t in share["targets"]}
        got = {k: float(v[0]["value"][1]) for k, v in shares.items()}
        assert got["receiver"] == pytest.approx(1, abs=0.02) and sum(got.values()) == pytest.approx(1), got
    # And the data is the namespace's: the sockmix's CLOSE-WAIT sockets and full queue.
    cw = prom.query('sockscope_tcp_local_port_sockets_peak{port="18084",state="close_wait"}')
    assert [float(s["value"][1]) for s in cw] == [3, 3]
    fill = prom.query('instance_address_port:sockscope_tcp_listen_queue_length_per_limit:ratio{port="18090"}')
    assert [float(s["value"][1]) for s in fill] == [pytest.approx(5 / 4)] * 2
    interval = prom.query("sockscope_poll_interval_seconds")
    assert [float(s["value"][1]) for s in interval] == [0.5, 0.5]
    # The connections panels show CHURN's connections, per instance: each carried its
    # 2,000-byte request (+ SYN, FIN), lived ~0.7 s, some were closed unread, some refused.
    (per_conn,) = panel_by_expr(dash, "remote_port_sent_bytes_total{")[:1]
    (lifetime,) = panel_by_expr(dash, "remote_port_connection_duration_seconds_bucket")
    for one in sorted(instances):
        single = {**values, "instance": one, "remote_port": "18095", "__rate_interval": "10s"}
        (got,) = prom.query(fill_in(per_conn["targets"][0]["expr"], single))
        assert 1500 < float(got["value"][1]) < 2500, got
        (p50,) = prom.query(fill_in(lifetime["targets"][0]["expr"], {**single, "__rate_interval": "30s"}))
        assert 0.1 <= float(p50["value"][1]) <= 1, p50
        for side, port, outcome in (("remote", "18095", "normal"), ("local", "18095", "unread_data"),
                                    ("remote", "other", "failed")):
            (n,) = prom.query(f'sockscope_tcp_{side}_port_connections_closed_total'
                              f'{{instance="{one}",port="{port}",outcome="{outcome}"}}')
            assert float(n["value"][1]) > 0, (one, side, port, outcome)


# -- Graphite dashboards against a real carbon ------------------------------------------------
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


# Functions whose numeric arguments are node indexes of their series: where they sit.
_NODE_ARGS = {"aliasByNode": slice(1, None), "groupByNode": slice(1, 2), "groupByNodes": slice(2, None),
              "asPercent": slice(2, None)}


def series_arguments(tree) -> list[tuple[str, list[int]]]:
    """Every path expression in the tree, each with the node indexes applied to it."""
    out: list[tuple[str, list[int]]] = []

    def walk(node, nodes):
        if node[0] == "path":
            out.append((node[1], nodes))
        elif node[0] == "call":
            name, args = node[1], node[2]
            extra = [int(a[1]) for a in args[_NODE_ARGS[name]] if a[0] == "num"] if name in _NODE_ARGS else []
            for a in args:
                walk(a, nodes + extra)

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


def substitute(text: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):  # $remote_port before $port
        value = values[name]
        text = text.replace("${" + name + "}", value).replace("[[" + name + "]]", value)
        text = re.sub(r"\$" + name + r"\b", lambda _m: value, text)  # noqa: B023 - used at once
    assert "$" not in text, f"unsubstituted variable in {text!r}"
    return text


def split_path(pattern: str) -> list[str]:
    """Dot-separated components, dots inside {a,b} kept."""
    parts, depth, cur = [], 0, ""
    for c in pattern:
        if c == "." and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += c == "{"
        depth -= c == "}"
        cur += c
    return [*parts, cur]


def test_target_parser():
    tree = GraphiteTargetParser.parse(
        "alias(sumSeries(a.$h.b.*.c, x.{d,e}.f), 'all, ports')")
    assert tree == ("call", "alias", [("call", "sumSeries", [("path", "a.$h.b.*.c"), ("path", "x.{d,e}.f")]),
                                      ("str", "all, ports")])
    assert series_arguments(GraphiteTargetParser.parse("aliasByNode(asPercent(a.*.q, a.*.l), -2)")) == \
        [("a.*.q", [-2]), ("a.*.l", [-2])]
    assert series_arguments(GraphiteTargetParser.parse("aliasSub(groupByNode(a.*.q, -3, 'sum'), '(.+)', 'x')")) \
        == [("a.*.q", [-3])]
    assert series_arguments(GraphiteTargetParser.parse("aliasByNode(asPercent(a.*.q, a.*.l, -2), -1)")) == \
        [("a.*.q", [-1, -2]), ("a.*.l", [-1, -2])]
    assert expand_braces("a.{b,c}.{d,e}") == ["a.b.d", "a.b.e", "a.c.d", "a.c.e"]
    assert split_path("${p}$h.x-{A,B}.y") == ["${p}$h", "x-{A,B}", "y"]
    files = {("a", "1", "q"), ("a", "2", "l")}
    assert glob("a.*.q", files) == [("a", "1", "q")]
    assert glob("a.{1,2}.[lq]", files) and not glob("a.*", files) and not glob("a.3.q", files)


@pytest.mark.parametrize("path", [GRAPHITE_DASH, COLLECTD_DASH], ids=["sockscope", "collectd"])
def test_graphite_node_indexes_count_from_the_end_and_name_a_varying_component(path):
    """The prefix is a variable of any depth: a node index from the start would shift with
    it. Each index counts from the end and lands on a component that varies (the host, a
    port, a state), never on a fixed word such as `tcp`."""
    dash = load(path)
    assert variables(dash)["prefix"]["type"] == "textbox"
    for p in all_panels(dash):
        for t in p["targets"]:
            assert "${prefix}$host." in t["target"] or "$prefix.$host." in t["target"], t["target"]
            for pattern, nodes in series_arguments(GraphiteTargetParser.parse(t["target"])):
                parts = split_path(pattern)
                assert nodes, f"{p['title']}: {pattern} is not aliased by node"
                for n in nodes:
                    assert -len(parts) <= n < 0, (p["title"], pattern, n)
                    varying = parts[n].replace("${prefix}", "").replace("$prefix", "")
                    assert re.search(r"[$*{\[]", varying), (p["title"], pattern, n, parts[n])


# Four sockscopes push to one carbon: naming sockscope for two hosts under one prefix and a
# third under a deeper prefix, and naming collectd (collectd's write_graphite "Prefix").
PUSHERS = {
    "hosta": "  prefix: sockscope.hosta\n",
    "hostb": "  prefix: sockscope.hostb\n",
    "hostc": "  prefix: ops.dc1.sockscope.hostc\n",
    "hostd_example_com": "  naming: collectd\n  prefix: collectd.\n  host: hostd.example.com\n",
}


@pytest.fixture(scope="module")
def carbon_fed(sockmix, netns, tmp_path_factory):
    """A real carbon-cache fed by the PUSHERS, each a sockscope watching `netns`."""
    require(prerequisites_missing() is None, prerequisites_missing() or "")
    carbon = Carbon.start(tmp_path_factory.mktemp("carbon"))
    daemons = []
    try:
        work = tmp_path_factory.mktemp("graphite-dash")
        for graphite in PUSHERS.values():
            daemons.append(start_daemon(
                work, "poll:\n  interval: 1s\n  kernel_stats: false\nports:\n  remote: [18080, 18084]\n"
                "tcp_info:\n  enabled: true\nconnections:\n  enabled: true\n"
                f"graphite:\n  enabled: true\n  address: 127.0.0.1:{carbon.port}\n{graphite}",
                netns=netns.name))
        yield carbon
    finally:
        for d in daemons:
            assert d.stop() == 0, d.log()
        carbon.close()


def variable_values(var: dict, values: dict[str, str], nodes: set) -> set[str]:
    """What a Graphite query variable lists: the last component of every node its query
    matches, through its regex (first group) when it has one."""
    listed = {n[-1] for n in glob(substitute(var["query"], values), nodes)}
    if var.get("regex"):
        rx = re.compile(var["regex"].strip("/"))
        listed = {m.group(1) for m in map(rx.match, listed) if m}
    return listed


def dashboard_problems(dash: dict, prefix: str, hosts: list[str], series: set, nodes: set,
                       ports: set[str], remote_ports: set[str]) -> tuple[list[str], dict]:
    """Check every target of `dash` with $prefix set and $host/$port/$remote_port as a
    single value, several ({a,b}) and "All"; returns (problems, the aliases each target
    gives for one host and all ports)."""
    found: list[str] = []
    var = variables(dash)
    values = {"prefix": prefix}
    listed_hosts = variable_values(var["host"], values, nodes)
    if set(hosts) != listed_hosts:
        found.append(f"$host lists {sorted(listed_hosts)} under {prefix!r}, not {hosts}")
    values["host"] = hosts[0]
    for name, want in (("port", ports), ("remote_port", remote_ports)):
        listed = variable_values(var[name], values, nodes)
        if not want <= listed:
            found.append(f"${name} lists {sorted(listed)} under {prefix!r}")
    p1, p2 = sorted(ports)[:2]
    r1, r2 = sorted(remote_ports)[:2]
    host_choices = [hosts[0], "{" + ",".join(hosts) + "}", "*"]
    choices = [{"host": h, "port": p, "remote_port": r}
               for h in host_choices for p, r in ((p1, r1), (f"{{{p1},{p2}}}", f"{{{r1},{r2}}}"), ("*", "*"))]
    aliases = {}
    for p in all_panels(dash):
        for t in p["targets"]:
            for choice in choices:
                tree = GraphiteTargetParser.parse(substitute(t["target"], {**values, **choice}))
                for pattern, alias_nodes in series_arguments(tree):
                    for alt in expand_braces(pattern):  # a typo in one alternative must not hide
                        matched = glob(alt, series)
                        if not matched:
                            found.append(f"{p['title']}: {alt!r} matches no whisper file ({choice})")
                        elif choice == choices[2]:
                            aliases.setdefault(t["target"], set()).update(
                                tuple(m[n] for n in alias_nodes) for m in matched)
    return found, aliases


def test_every_graphite_dashboard_target_exists_in_carbon(carbon_fed, sockmix):
    carbon = carbon_fed
    sockscope_dash, collectd_dash = load(GRAPHITE_DASH), load(COLLECTD_DASH)
    for dash in (sockscope_dash, collectd_dash):
        assert datasource_var(dash)["query"] == "graphite"
        assert [v["name"] for v in dash["templating"]["list"]] == \
            ["datasource", "prefix", "host", "port", "remote_port", "docs"]
        assert all(variables(dash)[v]["multi"] for v in ("host", "port", "remote_port"))
    close_wait_port = str(sockmix.group("close_wait")["port"])
    full_port = str(sockmix.group("full_queue")["port"])
    ports, remote_ports = {close_wait_port, full_port}, {"18080", "18084"}
    assert variables(sockscope_dash)["prefix"]["query"] == "sockscope"   # the default prefix
    assert variables(collectd_dash)["prefix"]["query"] == "collectd."    # collectd's usual one

    def problems():
        series, nodes = whisper_tree(carbon.whisper_dir)
        found, two, three = [], {}, {}
        for dash, prefix, hosts, want_ports, sink in (
                (sockscope_dash, "sockscope", ["hosta", "hostb"], ports | {"other"}, two),
                (sockscope_dash, "ops.dc1.sockscope", ["hostc"], ports | {"other"}, three),
                (collectd_dash, "collectd.", ["hostd_example_com"], ports, {})):
            f, aliases = dashboard_problems(dash, prefix, hosts, series, nodes, want_ports, remote_ports)
            found += f
            sink.update(aliases)
        # The same aliases under a 2- and a 4-component prefix, the host name aside.
        for target in two:
            a = {tuple("HOST" if c == "hosta" else c for c in x) for x in two[target]}
            b = {tuple("HOST" if c == "hostc" else c for c in x) for x in three.get(target, ())}
            if a != b:
                found.append(f"{target}: aliases depend on the prefix: {sorted(a)[:3]} vs {sorted(b)[:3]}")
        return found

    # carbon creates the files as the first pushes arrive: ~3,000 series per daemon with tcp_info
    # and connections on; on a busy 2-core machine 30 s was once not enough for all of them.
    deadline = time.monotonic() + 120
    left = problems()
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = problems()
    assert not left, "\n".join(dict.fromkeys(left))
    # And the values are the namespace's: the mix's CLOSE-WAIT sockets on their port.
    n = sockmix.group("close_wait")["n"]
    for path in (f"sockscope.hosta.tcp.local_port.{close_wait_port}.close_wait",
                 f"ops.dc1.sockscope.hostc.tcp.local_port.{close_wait_port}.close_wait",
                 f"collectd.hostd_example_com.tcpconns-{close_wait_port}-local.tcp_connections-CLOSE_WAIT"):
        points = carbon.fetch(path)
        assert points and list(points.values())[-1] == n, path
    # tcp_info under both namings: the age of those CLOSE-WAIT sockets (window peak), and the
    # receiver-limited time of the mix's zero-window senders growing from push to push.
    stalled = sockmix.group("sendq")["port"]
    for base in ("sockscope.hosta", "collectd.hostd_example_com.sockscope"):
        age = carbon.fetch(f"{base}.peak.tcp.local_port.{close_wait_port}.oldest_close_wait_seconds")
        assert age and list(age.values())[-1] > 0, base
        busy = list(carbon.fetch(f"{base}.tcp.local_port.{stalled}.busy_seconds.receiver").values())
        assert len(busy) >= 2 and busy[-1] > busy[0], (base, busy)
    targets = sum(len(p["targets"]) for d in (sockscope_dash, collectd_dash) for p in all_panels(d))
    print(f"\n{targets} targets x 9 host/port choices x 3 prefixes: every series in whisper")
