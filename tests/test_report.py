"""report.py: the rows a person sees, the JSON report and its text view (pure).

Surveys are built from hand-made records through survey.Tally (tests/test_survey.py);
owners and kernel counters are hand-made values.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket

import numpy as np
import pytest

from sockscope.features.tcp_info import BUCKETS, PortInfo, PortTables
from sockscope.kernelstats import KernelStats
from sockscope.owners import Owner, PortOwners
from sockscope.report import (
    Frame,
    View,
    bucket_quantile,
    build_report,
    choose_ports,
    endpoint,
    fill_percent,
    format_age,
    format_bytes,
    format_le,
    render_text,
)
from sockscope.snapshot import STATES
from sockscope.survey import Filter
from support.records import CLOSE_WAIT, EST, LISTEN, RECORDS, TIME_WAIT, a4, rec, survey_of

WEB = [Owner(100 + i, "nginx", "www-data") for i in range(5)]
API = Owner(200, "api", "4242424")
NOTE = "process owners need root (CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE): 3 processes could not be read"
SGR = re.compile(r"\x1b\[[0-9;]*m")


def make_owners(**overrides):
    fields = dict(
        local={80: ((WEB[0], 5), (WEB[1], 2)), 9000: ((API, 1),)},
        remote={5432: ((API, 4),)},
        listeners={("0.0.0.0", 80): tuple(WEB), ("::", 80): (WEB[0],), ("127.0.0.1", 9000): ()},
        close_wait={80: ((WEB[0], 2),), 51003: ((API, 1),)},
        close_wait_owned={80: 2, 51003: 1},
        complete=True,
        note=None,
    )
    return PortOwners(**(fields | overrides))


def frame(records=RECORDS, owners="default", kernel=None, flt=Filter()):
    return Frame(survey_of(records, flt), make_owners() if owners == "default" else owners, kernel)


def section(text, title):
    """Lines of one titled table: from the line after the title up to the blank line."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = lines.index("", start)
    return lines[start:end]


def assert_aligned(table, columns):
    """Every row's cells sit under their header: left columns start, right columns end there."""
    header, rows = table[0], table[1:]
    assert rows
    pos = 0
    for label, align in columns:
        start = header.index(label, pos)
        end = pos = start + len(label)
        for row in rows:
            if align == "l":
                assert row[start] != " " and row[start - 1] == " ", (label, row)
            else:
                assert row[end - 1] != " ", (label, row)
                assert len(row) == end or row[end] == " ", (label, row)


# --- which rows ------------------------------------------------------------------------


def test_rows_are_listening_local_ports_and_the_remote_ports_clients_use():
    survey = survey_of(RECORDS)
    local, remote = choose_ports(survey, View())
    assert local == [80, 9000]  # ephemeral client ports (51000...) are not rows
    assert remote == [5432, 6379, 443]  # most sockets first; the server's peers' ports are not


def test_configured_ports_are_candidates_even_without_sockets():
    local, remote = choose_ports(survey_of(RECORDS), View(local=(7777,), remote=(3306,)))
    assert local == [80, 9000, 7777]
    assert remote == [5432, 6379, 443, 3306]


@pytest.mark.parametrize(("sort", "top", "local", "remote"), [
    ("port", 10, [80, 9000], [443, 5432, 6379]),
    ("close-wait", 10, [80, 9000], [5432, 443, 6379]),
    ("time-wait", 2, [80, 9000], [6379, 443]),
    ("send-q", 1, [80], [5432]),
    ("sockets", 1, [80], [5432]),
])
def test_sort_and_top(sort, top, local, remote):
    assert choose_ports(survey_of(RECORDS), View(sort=sort, top=top)) == (local, remote)


def test_a_port_asked_for_gets_its_row():
    survey = survey_of(RECORDS, Filter.of(ports=[51003]))
    assert choose_ports(survey, View()) == ([51003], [5432])


# --- build_report ----------------------------------------------------------------------


def test_json_types_are_fixed_and_rows_add_up():
    report = build_report(frame(), View())
    assert json.loads(json.dumps(report)) == report
    for side in ("local_ports", "remote_ports"):
        rows, other = report[side], report[side + "_other"]
        assert all(type(r["port"]) is int for r in rows)
        assert "port" not in other and type(other["ports"]) is int
        for state in STATES:
            assert sum(r["states"][state] for r in rows) + other["states"][state] == \
                report["totals"][state]
        assert sum(r["total"] for r in rows) + other["total"] == report["sockets"]
        for r in [*rows, other]:
            assert list(r["states"]) == list(STATES)  # every key, zeros included
    assert all(type(ln["port"]) is int for ln in report["listeners"])
    assert all(type(c["port"]) is int for c in report["close_wait_owners"])


def test_report_values():
    report = build_report(frame(), View())
    assert report["timestamp"] == "1970-01-01T00:01:40.000Z"
    assert report["sockets"] == len(RECORDS)
    assert report["totals"]["close_wait"] == 4
    assert report["totals_by_family"]["ipv6"]["established"] == 1
    port80 = report["local_ports"][0]
    assert port80["port"] == 80
    assert port80["states"]["established"] == 3 and port80["states"]["syn_recv"] == 1
    assert port80["queues"] == {"receive_bytes": 103, "send_bytes": 50, "receive_max_bytes": 100,
                                "send_max_bytes": 50, "receive_backlogged": 4,
                                "send_backlogged": 1}
    assert port80["owners"] == [{"pid": 100, "name": "nginx", "user": "www-data", "sockets": 5},
                                {"pid": 101, "name": "nginx", "user": "www-data", "sockets": 2}]
    assert report["local_ports_other"]["ports"] == 7  # 51000..51006
    assert report["remote_ports"][0]["owners"] == [{"pid": 200, "name": "api",
                                                    "user": "4242424", "sockets": 4}]
    assert report["listeners"] == [
        {"family": "ipv4", "address": "0.0.0.0", "port": 80, "queue_length": 3,
         "queue_limit": 128, "fill_percent": 2.3, "members": 1,
         "owners": [{"pid": o.pid, "name": "nginx", "user": "www-data"} for o in WEB]},
        {"family": "ipv6", "address": "::", "port": 80, "queue_length": 0, "queue_limit": 128,
         "fill_percent": 0.0, "members": 1,
         "owners": [{"pid": 100, "name": "nginx", "user": "www-data"}]},
        {"family": "ipv4", "address": "127.0.0.1", "port": 9000, "queue_length": 0,
         "queue_limit": 16, "fill_percent": 0.0, "members": 1, "owners": []},
    ]
    assert report["close_wait_peers"] == [
        {"family": "ipv4", "address": "10.0.0.7", "sockets": 2},
        {"family": "ipv4", "address": "10.0.0.5", "sockets": 1},
        {"family": "ipv4", "address": "10.0.0.8", "sockets": 1},
    ]
    assert report["close_wait_peers_other"] == {"peers": 0, "sockets": 0}
    assert [p["address"] for p in report["time_wait_peers"]] == ["10.0.0.6", "10.0.0.8", "fd00::6"]
    # port 80: 3 CLOSE-WAIT, 2 held by nginx, 1 not accepted; the client pool's leak on 51003
    assert report["close_wait_owners"] == [
        {"port": 80, "owners": [{"pid": 100, "name": "nginx", "user": "www-data", "sockets": 2}],
         "unowned": 1},
        {"port": 51003, "owners": [{"pid": 200, "name": "api", "user": "4242424", "sockets": 1}],
         "unowned": 0},
    ]
    assert report["owners"] == {"collected": True, "complete": True, "note": None,
                                "scanned_at": None}
    assert report["filter"] == {"ports": [], "states": []}
    assert "since_last" not in report


def test_top_folds_rows_peers_and_close_wait_ports_into_other():
    report = build_report(frame(), View(top=1))
    assert [r["port"] for r in report["remote_ports"]] == [5432]
    assert report["remote_ports_other"]["states"]["time_wait"] == 3
    assert report["close_wait_peers_other"] == {"peers": 2, "sockets": 2}
    assert report["close_wait_owners_other"] == {"ports": 1, "sockets": 1}
    assert len(report["listeners"]) == 3  # listeners are never cut


def test_without_owners_and_with_an_incomplete_scan():
    report = build_report(frame(owners=None), View())
    assert [ln["owners"] for ln in report["listeners"]] == [None] * 3
    assert report["local_ports"][0]["owners"] is None
    assert report["close_wait_owners"] == []
    assert report["owners"] == {"collected": False, "complete": False, "note": None,
                                "scanned_at": None}
    report = build_report(frame(owners=make_owners(complete=False, note=NOTE)), View())
    assert report["owners"] == {"collected": True, "complete": False, "note": NOTE,
                                "scanned_at": None}
    assert report["local_ports"][1]["owners"][0]["pid"] == 200


def test_filter_is_reported():
    report = build_report(frame(flt=Filter.of(ports=[5432], states=["close-wait", "listen"])))
    assert report["filter"] == {"ports": [5432], "states": ["close-wait", "listening"]}
    assert report["sockets"] == 1


MORE = [*RECORDS,
        rec(CLOSE_WAIT, 80, 40100, dst=a4("10.0.0.7"), inode=41),
        rec(EST, 51010, 5432, dst=a4("10.0.0.5"), inode=42),
        *(rec(EST, 52000 + i, 11211, dst=a4("10.0.0.3"), inode=50 + i) for i in range(5))]


def test_changes_since_last_and_since_start():
    start, last, now = frame(), frame(RECORDS[:-3]), frame(MORE)
    report = build_report(now, View(top=2), last=last, start=start)
    assert report["since_start"]["sockets"] == len(MORE) - len(RECORDS)
    assert report["since_last"]["sockets"] == len(MORE) - len(RECORDS) + 3
    assert report["since_start"]["totals"]["close_wait"] == 1
    by_port = {r["port"]: r for r in report["remote_ports"]}
    # 11211 entered the top 2 with 5 sockets: its change is against the full Surveys.
    assert set(by_port) == {11211, 5432}
    assert by_port[11211]["since_start"] == {
        "total": 5, "states": {s: 5 if s == "established" else 0 for s in STATES},
        "queues": {"receive_bytes": 0, "send_bytes": 0, "receive_backlogged": 0,
                   "send_backlogged": 0}}
    assert by_port[5432]["since_last"]["total"] == 1
    other = report["remote_ports_other"]
    assert other["since_start"]["total"] == 1  # the new CLOSE-WAIT's peer port 40100
    cw = {p["address"]: p for p in report["close_wait_peers"]}
    assert cw["10.0.0.7"]["since_start"] == {"sockets": 1}
    assert report["listeners"][0]["since_last"] == {"queue_length": 0}


def test_kernel_counter_changes():
    k0 = KernelStats(counters={"listen_overflows": 10, "out_resets": 5})
    k1 = KernelStats(counters={"listen_overflows": 13, "out_resets": 5})
    k2 = KernelStats(counters={"listen_overflows": 20, "out_resets": 9})
    report = build_report(frame(kernel=k2), View(), last=frame(kernel=k1), start=frame(kernel=k0))
    assert report["kernel_counters"] == {"listen_overflows": 20, "out_resets": 9}
    assert report["since_last"]["kernel_counters"] == {"listen_overflows": 7, "out_resets": 4}
    assert report["since_start"]["kernel_counters"] == {"listen_overflows": 10, "out_resets": 4}
    text = render_text(report)
    assert "kernel: listen overflows +7/+10  resets sent +4/+4" in text


@pytest.mark.parametrize(
    ("length", "limit", "percent"),
    [(110, 128, 85.9), (0, 128, 0.0), (5, 5, 100.0), (6, 5, 120.0), (0, 0, 0.0), (1, 0, 100.0)],
)
def test_fill_percent(length, limit, percent):
    assert fill_percent(length, limit) == percent


# --- render_text -----------------------------------------------------------------------


@pytest.fixture
def text():
    return render_text(build_report(frame(), View()))


def test_header_and_totals_hide_zero_states(text):
    assert text.split("\n")[0] == (
        f"sockscope snapshot  1970-01-01T00:01:40.000Z  sockets {len(RECORDS)}  poll 10.0 ms"
        "  families ipv4,ipv6"
    )
    header = next(ln for ln in text.split("\n") if ln.startswith("TOTALS"))
    assert header.split() == ["TOTALS", "ESTAB", "SYN-SENT", "SYN-RECV", "TIME-WAIT",
                              "CLOSE-WAIT", "LISTEN"]
    assert [row.split() for row in section(text, "TOTALS")] == [
        ["all", "6", "1", "1", "3", "4", "3"],
        ["ipv4", "5", "1", "1", "2", "4", "2"],
        ["ipv6", "1", "0", "0", "1", "0", "1"],
    ]
    assert "\x1b[" not in text


def test_local_ports_table(text):
    table = section(text, "LOCAL PORTS")
    assert table[0].split() == ["PORT", "SOCKETS", "ESTAB", "CLOSE-WAIT", "TIME-WAIT", "OTHER",
                                "STATES", "RECV-Q", "SEND-Q", "BACKLOGGED(R/S)", "PROCESS"]
    assert table[1].split() == ["80", "10", "3", "3", "1", "SYN-RECV:1", "LISTEN:2", "103", "B",
                                "50", "B", "4/1", "nginx[100,101]", "www-data"]
    assert table[2].split() == ["9000", "1", "0", "0", "0", "LISTEN:1", "0", "B", "0", "B", "0/0",
                                "api[200]", "4242424"]
    assert table[3].split()[:3] == ["other", "7", "3"]
    assert_aligned(table, [("PORT", "r"), ("SOCKETS", "r"), ("ESTAB", "r"), ("CLOSE-WAIT", "r"),
                           ("OTHER STATES", "l"), ("RECV-Q", "r"), ("SEND-Q", "r"),
                           ("BACKLOGGED(R/S)", "r")])


def test_remote_ports_table(text):
    table = section(text, "REMOTE PORTS")
    assert [row.split()[0] for row in table] == ["PORT", "5432", "6379", "443", "other"]
    assert table[1].split()[5:9] == ["-", "0", "B", "7"]
    assert table[2].split()[-1] == "-"  # no process found


def test_sizes_are_labelled():
    big = [rec(EST, 80, 40000 + i, rq=1536 * 1024, inode=i + 1) for i in range(3)]
    table = section(render_text(build_report(frame(big, owners=None))), "LOCAL PORTS")
    assert "4.5 MiB" in table[1]


def test_listeners_table_marks_full_queues():
    records = [rec(LISTEN, 80, 0, 110, 128, src=a4("0.0.0.0"), inode=11),
               rec(LISTEN, 9090, 0, 5, 5, inode=12), rec(LISTEN, 9091, 0, 79, 100, inode=13)]
    text = render_text(build_report(frame(records), View()))
    title = next(ln for ln in text.split("\n") if ln.startswith("LISTENERS"))
    assert "! = accept queue >= 80% full" in title
    table = section(text, "LISTENERS")
    assert table[0].split() == ["ADDRESS:PORT", "QUEUE", "FILL", "MEMBERS", "PROCESS"]
    rows = table[1:]
    assert [r[0] for r in rows] == ["!", "!", " "]
    assert rows[0].split()[1:] == ["0.0.0.0:80", "110/128", "86%", "1", "nginx[100,101,102,+2]",
                                   "www-data"]
    assert_aligned(table, [("ADDRESS:PORT", "l"), ("QUEUE", "r"), ("FILL", "r"),
                           ("MEMBERS", "r"), ("PROCESS", "l")])


def test_peer_tables(text):
    assert [r.split() for r in section(text, "CLOSE-WAIT BY PEER")] == [
        ["PEER", "SOCKETS"], ["10.0.0.7", "2"], ["10.0.0.5", "1"], ["10.0.0.8", "1"]]
    table = section(render_text(build_report(frame(), View(top=1))), "TIME-WAIT BY PEER")
    assert [r.split() for r in table] == [["PEER", "SOCKETS"], ["10.0.0.6", "1"],
                                          ["(2", "more", "peers)", "2"]]


def test_close_wait_owners(text):
    table = section(text + "\n", "CLOSE-WAIT OWNERS")
    assert [re.split(r"\s{2,}", r.strip()) for r in table] == [
        ["PORT", "PROCESS (PID/NAME/USER)", "SOCKETS"],
        ["80", "100/nginx/www-data", "2"],
        ["80", "(no process: not accepted or not visible)", "1"],
        ["51003", "200/api/4242424", "1"],
    ]
    assert "owners:" not in text


def test_owner_notes():
    text = render_text(build_report(frame(owners=make_owners(complete=False, note=NOTE))))
    assert f"owners: {NOTE}\n" in text
    assert "PROCESS" in section(text, "LISTENERS")[0]
    text = render_text(build_report(frame(owners=None)))
    assert text.rstrip("\n").split("\n")[-1] == "owners: run as root to see processes"
    assert "PROCESS" not in text


def test_owners_from_an_earlier_scan_say_so():
    fresh = render_text(build_report(frame(owners=make_owners(scanned_at=100.2))))
    assert "owners:" not in fresh
    report = build_report(frame(owners=make_owners(scanned_at=90.0)))
    assert report["owners"]["scanned_at"] == "1970-01-01T00:01:30.000Z"
    assert ("owners: processes as of 1970-01-01T00:01:30.000Z (a slow /proc scan is repeated "
            "less often than frames)\n") in render_text(report)


def test_empty_survey():
    text = render_text(build_report(frame([], owners=make_owners(
        local={}, remote={}, listeners={}, close_wait={}, close_wait_owned={}))))
    assert "TOTALS  no sockets" in text
    assert "LOCAL PORTS: none" in text and "REMOTE PORTS: none" in text
    assert "LISTENERS: none" in text
    assert "CLOSE-WAIT BY PEER: none" in text
    assert "CLOSE-WAIT OWNERS: none" in text


def test_state_filter_narrows_the_port_columns():
    report = build_report(frame(flt=Filter.of(states=["close-wait"])))
    text = render_text(report)
    assert "filter: state close-wait" in text
    assert section(text, "LOCAL PORTS")[0].split()[:3] == ["PORT", "SOCKETS", "CLOSE-WAIT"]


def test_watch_cells_show_both_changes():
    report = build_report(frame(MORE), View(), last=frame(RECORDS[:-3]), start=frame(),
                          frame_number=3, interval=2.0)
    text = render_text(report)
    lines = text.split("\n")
    assert lines[0].split()[3:6] == ["sockets", f"{len(MORE)}", "+10/+7"]
    assert lines[1].startswith("every 2s, frame 3; changes shown as +since last frame/+since start")
    table = section(text, "REMOTE PORTS")
    row = next(r for r in table if r.split()[0] == "11211")
    assert row.split()[1:3] == ["5", "+5/+5"]
    cw = section(text, "CLOSE-WAIT BY PEER")
    assert cw[1].split() == ["10.0.0.7", "3", "+1/+1"]


def test_colour_only_when_asked_and_never_changes_the_text():
    report = build_report(frame(), View(), last=frame(RECORDS[:-3]), start=frame(),
                          frame_number=2, interval=1.0)
    plain = render_text(report)
    coloured = render_text(report, colour=True)
    assert "\x1b[" not in plain
    assert "\x1b[1m" in coloured  # bold headers
    assert SGR.sub("", coloured) == plain


def test_text_is_deterministic(text):
    assert text == render_text(build_report(frame(), View()))


def test_format_helpers():
    assert [format_bytes(n) for n in (0, 1, 1023, 1024, 1536, 10 * 1024, 5 * 1024**3, -2048)] == [
        "0 B", "1 B", "1023 B", "1.0 KiB", "1.5 KiB", "10 KiB", "5.0 GiB", "-2.0 KiB",
    ]
    assert endpoint("ipv6", "::1", 80) == "[::1]:80"
    assert endpoint("ipv4", "0.0.0.0", 80) == "0.0.0.0:80"


def test_v4_mapped_peers_are_their_own_family():
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.7")
    records = [rec(TIME_WAIT, 80, 1, fam=socket.AF_INET6, dst=mapped)]
    report = build_report(frame(records, owners=None))
    assert report["time_wait_peers"] == [{"family": "ipv6", "address": "::ffff:10.0.0.7",
                                          "sockets": 1}]


# --- tcp_info columns (tcp_info.enabled) -------------------------------------------------


def info_tables(interval=1.0) -> PortTables:
    """Local 80 (a request 2.35 s in the accept queue, CLOSE-WAIT 125 s, 3 RTTs), 51000
    (a client's ephemeral port: `other`), remote 5432 (9 RTTs <= 50 µs, 1 past 5 s)."""
    nb = len(BUCKETS)

    def hist(**at: int) -> list[int]:
        h = [0] * nb
        for le, n in at.items():
            h[BUCKETS.index(le.replace("_", ".").replace("p", "+"))] = n
        return h

    local = PortInfo(ports=np.array([80, 51000]), waits=np.array([[2350, 40, 125_000], [0, 7000, 0]]),
                     hist=np.array([hist(**{"0_0001": 1, "0_0025": 2}), hist(**{"0_0005": 4})]),
                     rtt=np.array([5100, 2000]), busy=np.array([[100, 800, 100], [0, 0, 0]]))
    remote = PortInfo(ports=np.array([5432, 40001]), waits=np.zeros((2, 3), np.int64),
                      hist=np.array([[9] + [0] * (nb - 2) + [1], hist(**{"0_0001": 2})]),
                      rtt=np.array([6_000_400, 200]), busy=np.zeros((2, 3), np.int64))
    return PortTables(local, remote, interval)


def info_report(interval=1.0) -> dict:
    survey = survey_of(RECORDS)
    survey = dataclasses.replace(survey, results={"tcp_info": info_tables(interval)})
    return build_report(Frame(survey, None, None), View(top=1))


def test_rtt_quantile_is_the_bucket_that_holds_it():
    h = [0] * len(BUCKETS)
    assert bucket_quantile(h, 0.5) is None
    h[1], h[2] = 1, 2  # sockets <= 100 µs: 1, <= 250 µs: 2 more
    assert (bucket_quantile(h, 0.5), bucket_quantile(h, 0.9)) == ("0.00025", "0.00025")
    assert bucket_quantile(h, 0.3) == "0.0001"
    h = [9] + [0] * (len(BUCKETS) - 2) + [1]
    assert (bucket_quantile(h, 0.5), bucket_quantile(h, 0.9), bucket_quantile(h, 0.95)) == ("5e-05", "5e-05", "+Inf")


@pytest.mark.parametrize("seconds, text", [(0, "-"), (None, "-"), (0.001, "1ms"), (0.35, "350ms"),
                                           (2.04, "2.0s"), (59.96, "60.0s"), (125, "2m05s"), (7300.5, "2h01m")])
def test_format_age(seconds, text):
    assert format_age(seconds) == text


@pytest.mark.parametrize("le, text", [("5e-05", "<=50us"), ("0.00025", "<=250us"), ("0.0025", "<=2.5ms"),
                                      ("0.5", "<=500ms"), ("1", "<=1s"), ("2.5", "<=2.5s"), ("+Inf", ">5s"),
                                      (None, "-")])
def test_format_le(le, text):
    assert format_le(le) == text


def test_tcp_info_json_per_port_row():
    report = info_report()
    assert report["tcp_info"] == {"busy_interval_seconds": 1.0}
    (row,), other = report["local_ports"], report["local_ports_other"]
    assert row["port"] == 80
    t = row["tcp_info"]
    assert (t["oldest_unaccepted_seconds"], t["oldest_unread_seconds"], t["oldest_close_wait_seconds"]) == \
        (2.35, 0.04, 125.0)
    assert (t["rtt_sockets"], t["rtt_sum_seconds"], t["rtt_p50_le"], t["rtt_p90_le"]) == (3, 0.0051, "0.0025", "0.0025")
    assert list(t["rtt_buckets"]) == list(BUCKETS) and t["rtt_buckets"]["0.0001"] == 1 and t["rtt_buckets"]["+Inf"] == 3
    assert t["busy_seconds"] == {"network": 0.1, "receiver": 0.8, "send_buffer": 0.1}
    # every port without a row: 51000 (a client's end) and 9000 (no tcp_info socket)
    assert other["tcp_info"]["oldest_unread_seconds"] == 7.0 and other["tcp_info"]["rtt_sockets"] == 4
    (r,) = report["remote_ports"]
    assert r["port"] == 5432 and r["tcp_info"]["oldest_unaccepted_seconds"] is None  # waits: local ports only
    assert (r["tcp_info"]["rtt_p50_le"], r["tcp_info"]["rtt_p90_le"], r["tcp_info"]["rtt_sockets"]) == \
        ("5e-05", "5e-05", 10)
    assert report["remote_ports_other"]["tcp_info"]["rtt_sockets"] == 2
    json.dumps(report, allow_nan=False)
    assert info_report(None)["local_ports"][0]["tcp_info"]["busy_seconds"] is None
    assert "tcp_info" not in json.dumps(build_report(frame(), View(top=1)))  # off: the report is unchanged


def test_tcp_info_columns_in_the_port_tables():
    text = render_text(info_report())
    local, remote = section(text, "LOCAL PORTS"), section(text, "REMOTE PORTS")
    head = ["UNACCEPTED", "UNREAD", "CLOSE-WAIT AGE", "RTT P50", "RTT P90", "BUSY", "NET/RCV/SNDBUF"]
    assert local[0].split()[-10:-3] == ["UNACCEPTED", "UNREAD", "CLOSE-WAIT", "AGE", "RTT", "P50", "RTT"]
    assert local[1].split()[-7:] == ["2.4s", "40ms", "2m05s", "<=2.5ms", "<=2.5ms", "1.00s", "10/80/10%"]
    assert local[2].split()[-7:] == ["-", "7.0s", "-", "<=500us", "<=500us", "-", "-"]  # other
    assert "UNACCEPTED" not in remote[0] and remote[1].split()[-4:] == ["<=50us", "<=50us", "-", "-"]
    assert_aligned(local, [(h, "r") for h in head])
    assert "BUSY is the sockets' busy time in the last 1s" in text
    text = render_text(info_report(None))
    assert "BUSY" not in section(text, "LOCAL PORTS")[0] and "no busy split" in text
