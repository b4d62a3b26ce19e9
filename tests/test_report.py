"""report.py: the JSON report of a Snapshot and its text table."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from sockscope.owners import Owner, OwnerInfo
from sockscope.report import (
    build_report,
    endpoint,
    fill_percent,
    format_bytes,
    render_text,
)
from sockscope.snapshot import OTHER, STATES, Listener, PortTable, QueueStats, Snapshot

NOTE = "process owners need root (CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE): 3 processes could not be read"


def counts(**kw):
    assert set(kw) <= set(STATES)
    return tuple(kw.get(s, 0) for s in STATES)


def zero_states(**kw):
    return {s: kw.get(s, 0) for s in STATES}


WEB = [Owner(100 + i, "nginx", "www-data") for i in range(5)]
API = Owner(200, "api", "4242424")


def make_snapshot(**overrides):
    states = {(f, s): 0 for f in ("ipv4", "ipv6") for s in STATES}
    states |= {
        ("ipv4", "established"): 100,
        ("ipv6", "established"): 23,
        ("ipv4", "time_wait"): 301,
        ("ipv4", "close_wait"): 7,
        ("ipv4", "syn_recv"): 2,
        ("ipv4", "listen"): 2,
        ("ipv6", "listen"): 2,
    }
    local = PortTable(
        ports=(80, 8080, OTHER),
        counts=(
            counts(established=120, close_wait=7, time_wait=300, syn_recv=2, listen=2),
            counts(listen=1),
            counts(established=3, time_wait=1, listen=1),
        ),
        queues=(QueueStats(1536, 10 * 1024 * 1024, 1024, 9_000_000, 3, 2), QueueStats(), QueueStats()),
        folded=2,
    )
    remote = PortTable(
        ports=(5432, OTHER),
        counts=(
            counts(established=10),
            counts(established=113, close_wait=7, time_wait=301, syn_recv=2, listen=4),
        ),
        queues=(QueueStats(), QueueStats(0, 512, 0, 512, 0, 1)),
    )
    listeners = (  # deliberately not in display order
        Listener("ipv6", "::1", 8080, 0, 4096, 1),
        Listener("ipv4", "127.0.0.1", 9090, 5, 5, 1),
        Listener("ipv6", "::", 80, 0, 128, 1),
        Listener("ipv4", "0.0.0.0", 80, 110, 128, 4),
    )
    fields = dict(
        timestamp=1714564800.25,
        duration=0.0123,
        families=("ipv4", "ipv6"),
        states=states,
        local=local,
        remote=remote,
        listeners=listeners,
    )
    return Snapshot(**(fields | overrides))


def make_owners(**overrides):
    fields = dict(
        listeners={
            ("0.0.0.0", 80): tuple(WEB),
            ("::", 80): (WEB[0],),
            ("::1", 8080): (API,),
            ("127.0.0.1", 9090): (),
        },
        close_wait={80: ((WEB[0], 4), (WEB[1], 2)), OTHER: ((API, 1),)},
        unowned={80: 1},
        complete=True,
        note=None,
    )
    return OwnerInfo(**(fields | overrides))


def section(text, title):
    """Lines of one titled table: from the line after the title up to the blank line."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = lines.index("", start)
    return lines[start:end]


def assert_aligned(table, columns):
    """Every row's cells sit under their header: left columns start, right columns end there.

    columns: [(header label, "l" or "r")], in order.
    """
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


# --- build_report -------------------------------------------------------------------


def test_build_report_values():
    report = build_report(make_snapshot(), make_owners())

    assert report["timestamp"] == "2024-05-01T12:00:00.250Z"
    assert report["poll_duration_seconds"] == pytest.approx(0.0123)
    assert report["families"] == ["ipv4", "ipv6"]
    assert report["sockets"] == 437
    assert report["totals"] == zero_states(
        established=123, time_wait=301, close_wait=7, syn_recv=2, listen=4
    )
    assert report["totals_by_family"] == {
        "ipv4": zero_states(established=100, time_wait=301, close_wait=7, syn_recv=2, listen=2),
        "ipv6": zero_states(established=23, listen=2),
    }
    assert report["local_ports"][0] == {
        "port": 80,
        "total": 431,
        "states": zero_states(established=120, close_wait=7, time_wait=300, syn_recv=2, listen=2),
        "queues": {
            "receive_bytes": 1536,
            "send_bytes": 10485760,
            "receive_max_bytes": 1024,
            "send_max_bytes": 9_000_000,
            "receive_backlogged": 3,
            "send_backlogged": 2,
        },
    }
    assert [p["port"] for p in report["local_ports"]] == [80, 8080, OTHER]
    assert [p["port"] for p in report["remote_ports"]] == [5432, OTHER]
    assert report["remote_ports"][1]["queues"]["send_bytes"] == 512
    for side in ("local_ports", "remote_ports"):
        for port in report[side]:
            assert list(port["states"]) == list(STATES)  # every key, zeros included

    web = [{"pid": o.pid, "name": "nginx", "user": "www-data"} for o in WEB]
    api = {"pid": 200, "name": "api", "user": "4242424"}
    assert report["listeners"] == [
        {"family": "ipv4", "address": "0.0.0.0", "port": 80, "queue_length": 110,
         "queue_limit": 128, "fill_percent": 85.9, "members": 4, "owners": web},
        {"family": "ipv6", "address": "::", "port": 80, "queue_length": 0,
         "queue_limit": 128, "fill_percent": 0.0, "members": 1, "owners": web[:1]},
        {"family": "ipv6", "address": "::1", "port": 8080, "queue_length": 0,
         "queue_limit": 4096, "fill_percent": 0.0, "members": 1, "owners": [api]},
        {"family": "ipv4", "address": "127.0.0.1", "port": 9090, "queue_length": 5,
         "queue_limit": 5, "fill_percent": 100.0, "members": 1, "owners": []},
    ]
    assert report["close_wait_owners"] == [
        {"port": 80, "owners": [web[0] | {"sockets": 4}, web[1] | {"sockets": 2}], "unowned": 1},
        {"port": OTHER, "owners": [api | {"sockets": 1}], "unowned": 0},
    ]
    assert report["folded"] == {"local_ports": 2, "remote_ports": 0, "listeners": 0}
    assert report["dump_interrupted"] == 0
    assert report["owners"] == {"collected": True, "complete": True, "note": None}


def test_report_is_json():
    report = build_report(make_snapshot(), make_owners())
    assert json.loads(json.dumps(report)) == report


def test_report_without_owners():
    report = build_report(make_snapshot(), None)
    assert [l["owners"] for l in report["listeners"]] == [None] * 4
    assert report["close_wait_owners"] == []
    assert report["owners"] == {"collected": False, "complete": False, "note": None}
    json.dumps(report)


def test_report_with_incomplete_owners_keeps_what_was_found():
    report = build_report(make_snapshot(), make_owners(complete=False, note=NOTE))
    assert report["owners"] == {"collected": True, "complete": False, "note": NOTE}
    assert report["listeners"][2]["owners"] == [{"pid": 200, "name": "api", "user": "4242424"}]


def test_single_family_totals():
    snap = make_snapshot(
        families=("ipv4",),
        states={("ipv4", s): 0 for s in STATES} | {("ipv4", "established"): 5},
    )
    report = build_report(snap, None)
    assert report["families"] == ["ipv4"]
    assert list(report["totals_by_family"]) == ["ipv4"]
    assert report["totals"]["established"] == 5
    assert "ipv6 " not in render_text(report)


@pytest.mark.parametrize(
    ("length", "limit", "percent"),
    [(110, 128, 85.9), (0, 128, 0.0), (5, 5, 100.0), (6, 5, 120.0), (0, 0, 0.0), (1, 0, 100.0)],
)
def test_fill_percent(length, limit, percent):
    assert fill_percent(length, limit) == percent


# --- render_text --------------------------------------------------------------------


@pytest.fixture
def text():
    return render_text(build_report(make_snapshot(), make_owners()))


def test_header_and_totals_hide_zero_states(text):
    first = text.split("\n")[0]
    assert first == (
        "sockscope snapshot  2024-05-01T12:00:00.250Z  sockets 437  poll 12.3 ms"
        "  families ipv4,ipv6"
    )
    totals = section(text, "TOTALS")
    header = next(l for l in text.split("\n") if l.startswith("TOTALS"))
    assert header.split() == ["TOTALS", "ESTAB", "SYN-RECV", "TIME-WAIT", "CLOSE-WAIT", "LISTEN"]
    assert [row.split() for row in totals] == [
        ["all", "123", "2", "301", "7", "4"],
        ["ipv4", "100", "2", "301", "7", "2"],
        ["ipv6", "23", "0", "0", "0", "2"],
    ]
    for hidden in ("SYN-SENT", "FIN-WAIT-1", "FIN-WAIT-2", "LAST-ACK", "CLOSING"):
        assert hidden not in text


def test_local_ports_table(text):
    table = section(text, "LOCAL PORTS")
    assert table[0].split() == [
        "PORT", "ESTAB", "CLOSE-WAIT", "TIME-WAIT", "OTHER", "STATES",
        "RECV-Q", "SEND-Q", "BACKLOGGED(R/S)",
    ]
    assert table[1].split() == ["80", "120", "7", "300", "SYN-RECV:2", "LISTEN:2", "1.5K", "10M", "3/2"]
    assert table[2].split() == ["8080", "0", "0", "0", "LISTEN:1", "0", "0", "0/0"]
    assert table[3].split() == ["other", "3", "0", "1", "LISTEN:1", "0", "0", "0/0"]
    assert_aligned(
        table,
        [("PORT", "r"), ("ESTAB", "r"), ("CLOSE-WAIT", "r"), ("TIME-WAIT", "r"),
         ("OTHER STATES", "l"), ("RECV-Q", "r"), ("SEND-Q", "r"), ("BACKLOGGED(R/S)", "r")],
    )


def test_remote_ports_table(text):
    table = section(text, "REMOTE PORTS")
    assert [row.split()[0] for row in table] == ["PORT", "5432", "other"]
    assert table[1].split()[4] == "-"  # no other states
    assert table[2].split()[-3:] == ["0", "512B", "0/1"]
    assert_aligned(table, [("PORT", "r"), ("ESTAB", "r"), ("OTHER STATES", "l"), ("SEND-Q", "r")])


def test_listeners_table_marks_full_queues(text):
    title = next(l for l in text.split("\n") if l.startswith("LISTENERS"))
    assert "! = accept queue >= 80% full" in title
    table = section(text, "LISTENERS")
    assert table[0].split() == ["ADDRESS:PORT", "QUEUE", "FILL", "MEMBERS", "PROCESS"]
    rows = table[1:]
    assert [r.split()[0] if r.startswith(" ") else r.split()[1] for r in rows] == [
        "0.0.0.0:80", "[::]:80", "[::1]:8080", "127.0.0.1:9090",
    ]
    assert [r[0] for r in rows] == ["!", " ", " ", "!"]  # 85.9% and 100% marked
    assert rows[0].split()[1:] == ["0.0.0.0:80", "110/128", "86%", "4", "nginx[100,101,102,+2]", "www-data"]
    assert rows[2].split()[-2:] == ["api[200]", "4242424"]
    assert rows[3].split()[-1] == "-"  # no process found
    assert_aligned(
        table,
        [("ADDRESS:PORT", "l"), ("QUEUE", "r"), ("FILL", "r"), ("MEMBERS", "r"), ("PROCESS", "l")],
    )


def test_fill_mark_threshold():
    snap = make_snapshot(
        listeners=(Listener("ipv4", "10.0.0.1", 1, 79, 100, 1), Listener("ipv4", "10.0.0.1", 2, 80, 100, 1))
    )
    rows = section(render_text(build_report(snap, None)), "LISTENERS")[1:]
    assert [r[0] for r in rows] == [" ", "!"]


def test_close_wait_owners(text):
    table = section(text + "\n", "CLOSE-WAIT OWNERS")
    assert [re.split(r"\s{2,}", r.strip()) for r in table] == [
        ["PORT", "PROCESS (PID/NAME/USER)", "SOCKETS"],
        ["80", "100/nginx/www-data", "4"],
        ["80", "101/nginx/www-data", "2"],
        ["80", "(no process: not accepted or not visible)", "1"],
        ["other", "200/api/4242424", "1"],
    ]
    assert_aligned(table, [("PORT", "r"), ("PROCESS (PID/NAME/USER)", "l"), ("SOCKETS", "r")])
    assert "owners:" not in text


def test_close_wait_owners_are_capped_per_port():
    many = tuple((Owner(300 + i, "w", "u"), 10 - i) for i in range(8))
    report = build_report(make_snapshot(), make_owners(close_wait={80: many}, unowned={}))
    table = section(render_text(report) + "\n", "CLOSE-WAIT OWNERS")
    assert len(table) == 1 + 5 + 1
    assert re.split(r"\s{2,}", table[-1].strip()) == ["80", "(3 more processes)", "12"]


def test_incomplete_owners_show_what_was_found_and_the_note():
    text = render_text(build_report(make_snapshot(), make_owners(complete=False, note=NOTE)))
    assert f"owners: {NOTE}\n" in text
    assert "PROCESS" in section(text, "LISTENERS")[0]
    assert "nginx" in text
    assert "CLOSE-WAIT OWNERS" in text


def test_missing_owners_say_run_as_root():
    text = render_text(build_report(make_snapshot(), None))
    assert text.rstrip("\n").split("\n")[-1] == "owners: run as root to see processes"
    assert "PROCESS" not in text


def test_status_lines():
    snap = make_snapshot(dump_interrupted=1, folded_listeners=3)
    snap = dataclasses.replace(snap, remote=dataclasses.replace(snap.remote, folded=5))
    lines = render_text(build_report(snap, None)).split("\n")
    assert lines[1].startswith("warning: 1 dump(s) changed while being read")
    assert lines[2] == "folded into 'other': 2 local ports, 5 remote ports"
    assert lines[3] == "listeners not tracked: 3"


def test_empty_snapshot():
    empty = PortTable(ports=(OTHER,), counts=(counts(),), queues=(QueueStats(),))
    snap = make_snapshot(
        states={("ipv4", s): 0 for s in STATES}, families=("ipv4",), local=empty, remote=empty,
        listeners=(),
    )
    text = render_text(build_report(snap, make_owners(listeners={}, close_wait={}, unowned={})))
    assert "TOTALS  no sockets" in text
    assert "LISTENERS: none" in text
    assert "CLOSE-WAIT OWNERS: none" in text


def test_text_is_deterministic():
    a = render_text(build_report(make_snapshot(), make_owners()))
    snap = make_snapshot()
    shuffled = dataclasses.replace(snap, listeners=tuple(reversed(snap.listeners)))
    b = render_text(build_report(shuffled, make_owners()))
    assert a == b
    assert a == render_text(build_report(make_snapshot(), make_owners()))


def test_format_helpers():
    assert [format_bytes(n) for n in (0, 1, 1023, 1024, 1536, 10 * 1024, 5 * 1024**3)] == [
        "0", "1B", "1023B", "1.0K", "1.5K", "10K", "5.0G",
    ]
    assert endpoint("ipv6", "::1", 80) == "[::1]:80"
    assert endpoint("ipv4", "0.0.0.0", 80) == "0.0.0.0:80"
