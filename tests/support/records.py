"""Hand-built sock_diag records and a Survey of them (tests/test_survey.py, test_report.py,
test_cli.py): a small host whose every figure the tests know."""

from __future__ import annotations

import socket

from sockscope.aggregate import Rules
from sockscope.batch import Batch
from sockscope.survey import Filter, Tally

V4, V6 = socket.AF_INET, socket.AF_INET6
EST, SYN_SENT, SYN_RECV, TIME_WAIT, CLOSE_WAIT, LISTEN, NEW_SYN_RECV = 1, 2, 3, 6, 8, 10, 12


def a4(text):
    return socket.inet_aton(text) + bytes(12)


def a6(text):
    return socket.inet_pton(V6, text)


def rec(state, sport, dport, rq=0, wq=0, fam=V4, src=None, dst=None, inode=0):
    src = src or (a4("127.0.0.1") if fam == V4 else a6("::1"))
    dst = dst or (a4("10.0.0.9") if fam == V4 else a6("fe80::9"))
    return (fam, state, sport, dport, src, dst, rq, wq, 0, inode)


# A small host: a web server on 80 (v4 + v6 listeners), a client pool to 5432, CLOSE-WAIT
# and TIME-WAIT from two peers, a request socket, a queue or two.
RECORDS = [
    rec(LISTEN, 80, 0, 3, 128, src=a4("0.0.0.0"), inode=11),
    rec(LISTEN, 80, 0, 0, 128, fam=V6, src=a6("::"), inode=12),
    rec(LISTEN, 9000, 0, 0, 16, src=a4("127.0.0.1"), inode=13),
    rec(EST, 80, 40001, rq=100, inode=21),
    rec(EST, 80, 40002, wq=50, inode=22),
    rec(EST, 80, 40003, fam=V6, inode=23),
    rec(CLOSE_WAIT, 80, 40004, rq=1, dst=a4("10.0.0.7"), inode=24),
    rec(CLOSE_WAIT, 80, 40005, rq=1, dst=a4("10.0.0.7"), inode=25),
    rec(CLOSE_WAIT, 80, 40006, rq=1, dst=a4("10.0.0.8"), inode=0),  # not accepted yet
    rec(TIME_WAIT, 80, 40007, dst=a4("10.0.0.8")),
    rec(NEW_SYN_RECV, 80, 40008),
    # this host's clients: local ports ephemeral, remote 5432 (and one to 6379)
    rec(EST, 51000, 5432, dst=a4("10.0.0.5"), inode=31),
    rec(EST, 51001, 5432, dst=a4("10.0.0.5"), inode=32),
    rec(EST, 51002, 5432, wq=7, dst=a4("10.0.0.5"), inode=33),
    rec(CLOSE_WAIT, 51003, 5432, dst=a4("10.0.0.5"), inode=34),  # the pool leak
    rec(TIME_WAIT, 51004, 6379, dst=a4("10.0.0.6")),
    rec(TIME_WAIT, 51005, 6379, fam=V6, dst=a6("fd00::6")),
    rec(SYN_SENT, 51006, 443, dst=a4("10.0.0.4"), inode=35),
]


def survey_of(records, flt=Filter(), rules=Rules(), batches=3):
    tally = Tally(flt)
    # listeners first, as the kernel dumps them (the client/server split relies on it)
    parts = [records[i::batches] for i in range(batches)]
    parts = sorted(parts, key=lambda p: not any(r[1] == LISTEN for r in p))
    for part in parts:
        tally.add(Batch.from_records(part))
    return tally.finish(rules, families=("ipv4", "ipv6"), timestamp=100.0, duration=0.01)
