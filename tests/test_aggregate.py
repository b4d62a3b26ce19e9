"""Aggregation rules on hand-built records (pure), fed as batch.Batch objects encoded from
record tuples (batch.Batch.from_records: the messages the kernel would send), in several
batches as datagrams arrive.
"""

import random
import socket

import pytest

from sockscope.aggregate import Accumulator, Rules
from sockscope.batch import Batch
from sockscope.snapshot import OTHER, STATES, QueueStats

V4, V6 = socket.AF_INET, socket.AF_INET6
ANY4 = bytes(16)
LO4 = socket.inet_aton("127.0.0.1") + bytes(12)
LO6 = socket.inet_pton(V6, "::1")
EST, SYN_RECV, TIME_WAIT, CLOSE_WAIT, LISTEN, NEW_SYN_RECV = 1, 3, 6, 8, 10, 12
S = {name: i for i, name in enumerate(STATES)}


def rec(state, sport, dport, rq=0, wq=0, fam=V4, src=LO4):
    return (fam, state, sport, dport, src, LO4, rq, wq, 0, 1)


def feed_batch(acc, part, i):
    acc.add(Batch.from_records(part))


def snap(records, rules=Rules(), families=("ipv4", "ipv6"), batches=3):
    acc = Accumulator()
    # Several batches, as datagrams arrive.
    for i in range(batches):
        feed_batch(acc, records[i::batches], i)
    return acc.finish(rules, families=families, timestamp=1.0, duration=0.1)


def row(table, port):
    return dict(zip(STATES, table.counts[table.ports.index(port)]))


def queues(table, port):
    return table.queues[table.ports.index(port)]


def test_states_zero_filled_per_family_and_new_syn_recv_is_syn_recv():
    s = snap([rec(EST, 80, 5000), rec(NEW_SYN_RECV, 80, 5001), rec(SYN_RECV, 80, 5002),
              rec(EST, 80, 5003, fam=V6, src=LO6)])
    assert len(s.states) == 2 * len(STATES)
    assert s.states[("ipv4", "syn_recv")] == 2
    assert s.states[("ipv4", "established")] == 1
    assert s.states[("ipv6", "established")] == 1
    assert s.states[("ipv6", "close_wait")] == 0
    assert s.sockets == 4


def test_auto_listen_ports_tracked_and_sums_equal_totals():
    records = [rec(LISTEN, 80, 0, rq=0, wq=128, src=ANY4), rec(LISTEN, 443, 0, wq=511, src=ANY4)]
    records += [rec(EST, 80, 40000 + i) for i in range(5)]
    records += [rec(CLOSE_WAIT, 443, 41000 + i, rq=1) for i in range(3)]
    records += [rec(EST, 50000 + i, 5432) for i in range(4)]  # outgoing, to a database
    s = snap(records, Rules(remote=(5432,)))
    assert s.local.ports == (80, 443, OTHER)
    assert row(s.local, 80)["established"] == 5
    assert row(s.local, 443)["close_wait"] == 3
    assert row(s.local, OTHER)["established"] == 4
    assert row(s.local, 80)["listen"] == 1
    assert s.remote.ports == (5432, OTHER)
    assert row(s.remote, 5432)["established"] == 4
    # LISTEN sockets have remote port 0: they land in remote `other`.
    assert row(s.remote, OTHER)["listen"] == 2
    for table in (s.local, s.remote):
        for i, state in enumerate(STATES):
            assert sum(c[i] for c in table.counts) == sum(
                n for (_, st), n in s.states.items() if st == state)
    assert s.local.folded == 0 and s.remote.folded == 0


def test_auto_listen_off_tracks_only_configured_ports():
    s = snap([rec(LISTEN, 80, 0, src=ANY4), rec(EST, 22, 5000)],
             Rules(local=(22,), auto_listen=False))
    assert s.local.ports == (22, OTHER)
    assert row(s.local, OTHER)["listen"] == 1


def test_cap_folds_into_other_and_counts_configured_first():
    listeners = [rec(LISTEN, p, 0, src=ANY4) for p in range(1000, 1010)]
    s = snap(listeners + [rec(EST, 9999, 1), rec(EST, 1009, 2)],
             Rules(local=(9999,), max_local=4))
    # Configured 9999 first, then the lowest listening ports up to the cap.
    assert s.local.ports == (1000, 1001, 1002, 9999, OTHER)
    assert s.local.folded == 7
    assert row(s.local, OTHER)["listen"] == 7
    assert row(s.local, OTHER)["established"] == 1  # port 1009 folded
    assert row(s.local, 9999)["established"] == 1


def test_series_count_does_not_depend_on_traffic():
    rules = Rules(remote=(443,))
    base = snap([rec(LISTEN, 80, 0, src=ANY4), rec(EST, 80, 1)], rules)
    rnd = random.Random(7)
    scan = [rec(rnd.choice([SYN_RECV, EST, TIME_WAIT]), rnd.randrange(1, 65536),
                rnd.randrange(1, 65536)) for _ in range(20000)]
    scanned = snap([rec(LISTEN, 80, 0, src=ANY4)] + scan, rules)
    assert scanned.local.ports == base.local.ports
    assert scanned.remote.ports == base.remote.ports
    assert len(scanned.states) == len(base.states)


def test_queue_sums_exclude_listen_and_cover_other():
    records = [
        rec(LISTEN, 80, 0, rq=5, wq=128, src=ANY4),  # accept queue, not bytes
        rec(EST, 80, 40000, rq=100, wq=0),
        rec(EST, 80, 40001, rq=300, wq=7),
        rec(EST, 80, 40002),
        rec(EST, 7000, 443, rq=0, wq=999),  # untracked local port -> other
        rec(EST, 7001, 443, rq=50, wq=0),
    ]
    s = snap(records, Rules(remote=(443,)))
    assert queues(s.local, 80) == QueueStats(400, 7, 300, 7, 2, 1)
    assert queues(s.local, OTHER) == QueueStats(50, 999, 50, 999, 1, 1)
    assert queues(s.remote, 443) == QueueStats(50, 999, 50, 999, 1, 1)
    assert queues(s.remote, OTHER) == QueueStats(400, 7, 300, 7, 2, 1)


def test_tracked_port_without_sockets_is_zero_filled():
    s = snap([], Rules(local=(8080,), remote=(3306,)))
    assert row(s.local, 8080) == dict.fromkeys(STATES, 0)
    assert queues(s.remote, 3306) == QueueStats()
    assert s.listeners == ()


def test_listeners_reuseport_fullest_member_and_members():
    records = [
        rec(LISTEN, 80, 0, rq=10, wq=100, src=ANY4),
        rec(LISTEN, 80, 0, rq=9, wq=10, src=ANY4),  # 90 % full: the fullest
        rec(LISTEN, 80, 0, rq=0, wq=100, src=ANY4),
        rec(LISTEN, 80, 0, rq=1, wq=4096, fam=V6, src=bytes(16)),
        rec(LISTEN, 8080, 0, rq=0, wq=0, src=LO4),
    ]
    s = snap(records)
    got = [(lst.family, lst.address, lst.port, lst.queue_length, lst.queue_limit, lst.members)
           for lst in s.listeners]
    assert got == [
        ("ipv4", "0.0.0.0", 80, 9, 10, 3),
        ("ipv6", "::", 80, 1, 4096, 1),
        ("ipv4", "127.0.0.1", 8080, 0, 0, 1),
    ]


def test_listener_cap_is_counted():
    s = snap([rec(LISTEN, p, 0, src=ANY4) for p in range(1, 11)],
             Rules(max_listeners=4, max_local=64))
    assert [lst.port for lst in s.listeners] == [1, 2, 3, 4]
    assert s.folded_listeners == 6


def test_only_read_families_are_reported():
    s = snap([rec(EST, 1, 2)], families=("ipv4",))
    assert {f for f, _ in s.states} == {"ipv4"}


def test_unknown_state_numbers_are_skipped():
    acc = Accumulator()
    feed_batch(acc, [rec(EST, 1, 2), rec(13, 1, 2)], 0)
    feed_batch(acc, [rec(13, 1, 2)], 0)  # a batch of unknown states only
    s = acc.finish(Rules(), families=("ipv4",), timestamp=0, duration=0)
    assert s.sockets == 1 and acc.unknown == 2


def test_a_random_table_equals_a_naive_count():
    rnd = random.Random(11)
    listen = [rec(LISTEN, p, 0, rq=rnd.randrange(5), wq=128, src=ANY4) for p in (80, 443, 8080)]
    listen += [rec(LISTEN, 80, 0, rq=3, wq=4, fam=V6, src=bytes(16))]
    records = listen + [
        rec(rnd.choice([EST, EST, EST, TIME_WAIT, CLOSE_WAIT, NEW_SYN_RECV, 13]),
            rnd.choice([80, 443, 8080, rnd.randrange(1, 65536)]),
            rnd.choice([5432, rnd.randrange(1, 65536)]),
            rq=rnd.choice([0, 0, 0, rnd.randrange(1 << 32)]),
            wq=rnd.choice([0, 0, 0, rnd.randrange(1 << 20)]),
            fam=rnd.choice([V4, V4, V6]))
        for _ in range(5000)
    ]
    rules = Rules(local=(22, 65535), remote=(5432, 80), max_local=3)
    acc = Accumulator()
    for i in range(7):
        feed_batch(acc, records[i::7], i)
    got = acc.finish(rules, families=("ipv4", "ipv6"), timestamp=1, duration=0)
    # The same figures counted naively, one record at a time.
    known = [r for r in records if r[1] in (1, 3, 6, 8, 10, 12)]
    assert acc.unknown == len(records) - len(known) > 0
    slot = {n: STATES.index("syn_recv" if n == 12 else name)
            for n, name in ((1, "established"), (3, "syn_recv"), (6, "time_wait"), (8, "close_wait"),
                            (10, "listen"), (12, "syn_recv"))}
    for port in (22, 80, 65535):
        want = [0] * len(STATES)
        for r in known:
            if r[2] == port:
                want[slot[r[1]]] += 1
        assert row(got.local, port) == dict(zip(STATES, want)), port
    recv = sum(r[6] for r in known if r[3] == 5432 and r[1] != LISTEN)
    assert got.remote.queues[got.remote.ports.index(5432)].receive_bytes == recv
    assert got.local.folded > 0


def _random_table(seed, n=3000):
    rnd = random.Random(seed)
    listen = [rec(LISTEN, p, 0, rq=rnd.randrange(5), wq=128, src=ANY4) for p in rnd.sample(range(1, 2000), 4)]
    return listen + [
        rec(rnd.choice([EST, EST, TIME_WAIT, CLOSE_WAIT, NEW_SYN_RECV, 13]),
            rnd.choice([listen[0][2], rnd.randrange(1, 65536)]),
            rnd.choice([5432, 443, rnd.randrange(1, 65536)]),
            rq=rnd.choice([0, 0, rnd.randrange(1 << 32)]), wq=rnd.choice([0, 0, rnd.randrange(1 << 20)]),
            fam=rnd.choice([V4, V6]))
        for _ in range(n)
    ]


def test_a_reused_accumulator_equals_a_fresh_one_poll_after_poll():
    """The daemon's TCP feature keeps one Accumulator and resets it per poll (and per
    retried attempt, whose batches are thrown away half-fed): nothing of an earlier poll
    may leak into a later one, even where the port ranges of two polls differ."""
    rules = Rules(local=(22,), remote=(5432, 443), max_local=3)
    reused = Accumulator(remote=rules.remote)
    for seed in range(6):
        records = _random_table(seed, n=500 + 700 * seed)
        if seed % 2:  # an attempt thrown away after two batches
            reused.reset()
            for i in range(2):
                feed_batch(reused, records[i::5], i)
        reused.reset()
        for i in range(3):
            feed_batch(reused, records[i::3], i)
        got = reused.finish(rules, families=("ipv4", "ipv6"), timestamp=1.0, duration=0.1)
        assert got == snap(records, rules), seed


def test_counting_only_the_configured_remote_ports_changes_no_figure():
    """Accumulator(remote=ports) counts per remote port only those (a port -> row table;
    nothing per socket with none configured) and must give the dense side's figures."""
    records = _random_table(3)
    for remote in ((), (443,), (5432, 443, 1)):
        rules = Rules(remote=remote)
        acc = Accumulator(remote=remote)
        for i in range(3):
            feed_batch(acc, records[i::3], i)
        assert acc.finish(rules, families=("ipv4", "ipv6"), timestamp=1.0, duration=0.1) == snap(records, rules)
    with pytest.raises(ValueError, match="port 80"):
        acc.finish(Rules(remote=(80,)), families=("ipv4",), timestamp=1, duration=0)
