"""survey.py: the `snapshot` dump folded column-wise, on hand-built records (pure).

Records are fed as batch.Batch objects (the messages the kernel would send for them). The
figures are checked against the daemon's own Accumulator where both compute them.
"""

from __future__ import annotations

import numpy as np
import pytest

from sockscope.aggregate import Accumulator, Rules
from sockscope.batch import Batch
from sockscope.netlink import ALL_STATES, DumpStats, Reader
from sockscope.snapshot import STATES
from sockscope.survey import (
    SS_NAME,
    SS_STATES,
    STATE_GROUPS,
    Filter,
    peer_address,
    state_mask,
    take,
)
from support.records import (
    CLOSE_WAIT,
    EST,
    LISTEN,
    NEW_SYN_RECV,
    RECORDS,
    SYN_RECV,
    SYN_SENT,
    V4,
    rec,
    survey_of,
)

S = {name: i for i, name in enumerate(STATES)}


def reference(records, rules):
    acc = Accumulator()
    acc.add(Batch.from_records(records))
    return acc.finish(rules, families=("ipv4", "ipv6"), timestamp=100.0, duration=0.01)


def test_figures_equal_the_daemons_accumulator():
    survey = survey_of(RECORDS)
    rules = Rules(local=(80, 9000, 51003), remote=(5432, 6379, 443), auto_listen=False)
    ref = reference(RECORDS, rules)
    assert survey.states == ref.states
    assert survey.sockets == len(RECORDS)
    for rows, table in ((survey.local, ref.local), (survey.remote, ref.remote)):
        ports = [p for p in table.ports if isinstance(p, int)]
        counts, queues = rows.rows(ports)
        assert [tuple(c) for c in counts.tolist()] == list(table.counts[:-1])
        for q, expect in zip(queues.tolist(), table.queues[:-1]):
            assert tuple(q) == (expect.receive_bytes, expect.send_bytes, expect.receive_max_bytes,
                                expect.send_max_bytes, expect.receive_backlogged,
                                expect.send_backlogged)
        rest_counts, rest_queues, _ = rows.rest(ports)
        assert tuple(rest_counts.tolist()) == table.counts[-1]
        assert rest_queues.tolist()[:2] == [table.queues[-1].receive_bytes, table.queues[-1].send_bytes]
    assert survey.listeners == ref.listeners


def test_listening_ports_and_client_side_remote_ports():
    survey = survey_of(RECORDS)
    assert survey.listening == (80, 9000)
    client = dict(zip(survey.remote.ports.tolist(), survey.remote_client.tolist()))
    # The server's ends (local port 80) are not clients: their remote ports count 0.
    assert {p: n for p, n in client.items() if n} == {5432: 4, 6379: 2, 443: 1}
    assert client[40001] == 0


def test_peers_of_close_wait_and_time_wait():
    survey = survey_of(RECORDS)
    cw = [(peer_address(k), n) for k, n in survey.close_wait_peers.top(10)]
    assert cw == [(("ipv4", "10.0.0.7"), 2), (("ipv4", "10.0.0.5"), 1), (("ipv4", "10.0.0.8"), 1)]
    tw = [(peer_address(k), n) for k, n in survey.time_wait_peers.top(10)]
    assert tw == [(("ipv4", "10.0.0.6"), 1), (("ipv4", "10.0.0.8"), 1), (("ipv6", "fd00::6"), 1)]
    assert survey.close_wait_peers.total == 4
    key = survey.close_wait_peers.top(1)[0][0]
    assert survey.close_wait_peers.count(key) == 2
    assert survey.close_wait_peers.count((V4, 1, 2)) == 0


def test_socket_index_and_listener_inodes():
    survey = survey_of(RECORDS)
    index = survey.sockets_index
    with_inode = [r for r in RECORDS if r[9]]
    assert sorted(index.inode.tolist()) == sorted(r[9] for r in with_inode)
    by_inode = {i: (s, d, st) for i, s, d, st in zip(index.inode.tolist(), index.sport.tolist(),
                                                      index.dport.tolist(), index.slot.tolist())}
    assert by_inode[34] == (51003, 5432, S["close_wait"])
    assert survey.listener_inodes == {("0.0.0.0", 80): {11}, ("::", 80): {12},
                                      ("127.0.0.1", 9000): {13}}
    assert survey.without_index().sockets_index is None


def test_port_filter_keeps_sockets_with_either_port():
    survey = survey_of(RECORDS, Filter.of(ports=[5432]))
    assert survey.sockets == 4
    assert survey.local.ports.tolist() == [51000, 51001, 51002, 51003]
    assert survey.remote.ports.tolist() == [5432]
    assert survey.listeners == ()
    # Listening ports are known even when their sockets are filtered out.
    assert survey.listening == (80, 9000)


def test_state_filter():
    survey = survey_of(RECORDS, Filter.of(states=["close-wait", "syn-recv"]))
    totals = dict(zip(STATES, survey.totals().tolist()))
    assert totals == {s: 0 for s in STATES} | {"close_wait": 4, "syn_recv": 1}
    assert survey.time_wait_peers.total == 0


def test_state_names_and_groups():
    assert state_mask("close-wait") == state_mask("close_wait") == 1 << CLOSE_WAIT
    assert state_mask("syn-recv") == (1 << SYN_RECV) | (1 << NEW_SYN_RECV)
    assert state_mask("listen") == state_mask("listening") == 1 << LISTEN
    assert state_mask("all") == ALL_STATES
    # ss.c: connected = all but LISTEN and CLOSE; synchronized = connected but SYN-SENT;
    # bucket = the minisockets (SYN-RECV, TIME-WAIT); big = all but bucket.
    assert STATE_GROUPS["connected"] & SS_STATES["listening"] == 0
    assert STATE_GROUPS["connected"] & SS_STATES["established"]
    assert STATE_GROUPS["synchronized"] == STATE_GROUPS["connected"] & ~(1 << SYN_SENT)
    assert (STATE_GROUPS["bucket"] | STATE_GROUPS["big"]) & ALL_STATES == ALL_STATES
    assert Filter.of(states=["all", "syn-recv"]) == Filter()
    # Request sockets (NEW_SYN_RECV) go with SYN-RECV in every group that has it.
    assert Filter.of(states=["connected"]).states & (1 << NEW_SYN_RECV)
    with pytest.raises(ValueError, match="not a TCP state"):
        state_mask("closed-wait")
    assert [SS_NAME[s] for s in STATES][:3] == ["established", "syn-sent", "syn-recv"]
    assert not Filter() and Filter.of(states=["all"]) == Filter()
    assert Filter.of(ports=[80])


def test_unknown_state_numbers_are_skipped_and_counted():
    survey = survey_of([*RECORDS, rec(13, 80, 1)])
    assert survey.sockets == len(RECORDS)
    assert survey.unknown_states == 1


def test_memory_is_per_port_not_per_socket():
    many = [rec(EST, 8080, 20000 + i % 40000) for i in range(50_000)]
    survey = survey_of(many, batches=10)
    assert survey.sockets == 50_000
    # one row per port seen, one per distinct peer: not one per socket
    assert len(survey.local.ports) == 1 and len(survey.remote.ports) == 40_000
    assert survey.sockets_index.inode.nbytes == 0  # inode 0: nothing to name


class FakeReader:
    """Reader.poll's contract: start() per attempt, batches into the sink, DumpStats."""

    def __init__(self, attempts):
        self.attempts = attempts
        self.states_asked = None

    def poll(self, start, states=ALL_STATES):
        self.states_asked = states
        for records in self.attempts:
            sink = start()
            sink(Batch.from_records(records))
        return DumpStats(("ipv4", "ipv6"), sum(map(len, self.attempts)), len(self.attempts) - 1, 0)


def test_take_keeps_only_the_last_attempt_and_asks_the_kernel_for_the_states():
    reader = FakeReader([RECORDS[:3], RECORDS])
    survey = take(reader, Filter.of(states=["close-wait"]), Rules(), clock=lambda: 5.0)
    assert survey.timestamp == 5.0
    assert survey.sockets == 4  # the second attempt only, CLOSE-WAIT only
    # LISTEN is always asked for: listening ports decide which remote ports are clients'.
    assert reader.states_asked == (1 << CLOSE_WAIT) | (1 << LISTEN)
    np.testing.assert_array_equal(survey.local.ports, [80, 51003])


def test_the_kernel_filters_a_state_mask(sockmix, ss_figures):
    """Reader.poll(states=): the dump carries only the states asked for (what makes
    `snapshot --state close-wait` cheap on a large table)."""
    seen = []
    with Reader(netns=sockmix.ns.name) as reader:
        stats = reader.poll(lambda: lambda batch: seen.extend(r[1] for r in batch),
                            states=1 << CLOSE_WAIT)
    assert set(seen) == {CLOSE_WAIT}
    assert stats.messages == len(seen) == ss_figures(sockmix.ns).state("close_wait") > 0
