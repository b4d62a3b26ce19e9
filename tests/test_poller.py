"""Poller behaviour with a scripted reader (no kernel): publish, keep last good, log once, timing."""

import logging
import socket
import time

from sockscope.aggregate import Rules
from sockscope.netlink import DumpStats, NetlinkError
from sockscope.poller import Poller

LO4 = socket.inet_aton("127.0.0.1") + bytes(12)


class FakeReader:
    """poll(start) feeds `n` ESTABLISHED sockets, or raises the next scripted error."""

    def __init__(self, outcomes, delay=0.0):
        self.outcomes = list(outcomes)
        self.delay = delay
        self.starts = []
        self.closed = False

    def poll(self, start):
        self.starts.append(time.monotonic())
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if self.delay:
            time.sleep(self.delay)
        if isinstance(outcome, Exception):
            raise outcome
        sink = start()
        sink([(socket.AF_INET, 1, 80, 40000 + i, LO4, LO4, 0, 0, 0, 1) for i in range(outcome)])
        return DumpStats(("ipv4",), outcome, retries=1, interrupted=0)

    def close(self):
        self.closed = True


def test_success_publishes_snapshot_and_counters():
    p = Poller(FakeReader([3]), Rules(local=(80,)), 5.0)
    st = p.poll()
    assert st.snapshot.sockets == 3
    assert st.snapshot.states[("ipv4", "established")] == 3
    assert (st.polls, st.errors, st.dump_retries) == (1, 0, 1)
    assert st.last_success_monotonic is not None
    assert p.status() is st


def test_failure_keeps_last_good_snapshot_and_logs_each_distinct_error_once(caplog):
    err_a, err_b = NetlinkError("dump failed: A"), NetlinkError("dump failed: B")
    p = Poller(FakeReader([2, err_a, err_a, err_a, err_b, 5]), Rules(), 5.0)
    caplog.set_level(logging.INFO, logger="sockscope")
    good = p.poll().snapshot
    for _ in range(4):
        st = p.poll()
        assert st.snapshot is good
    assert (st.polls, st.errors, st.last_error) == (5, 4, "dump failed: B")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["poll failed: dump failed: A", "poll failed: dump failed: B"]
    st = p.poll()
    assert st.snapshot.sockets == 5 and st.last_error is None
    assert "recovered after 4 failed polls" in caplog.text


def test_unexpected_exception_does_not_kill_the_poller(caplog):
    p = Poller(FakeReader([ValueError("bug"), 1]), Rules(), 5.0)
    assert p.poll().errors == 1
    assert "Traceback" in caplog.text  # unexpected errors keep their traceback in the log
    assert p.poll().snapshot.sockets == 1


def test_run_skips_missed_slots_and_stops_promptly():
    # Each poll takes 0.13 s with a 0.05 s interval: slots are skipped, not burst through.
    reader = FakeReader([1], delay=0.13)
    p = Poller(reader, Rules(), 0.05)
    p.start()
    time.sleep(0.7)
    t0 = time.monotonic()
    p.stop(timeout=2)
    assert time.monotonic() - t0 < 0.3
    gaps = [b - a for a, b in zip(reader.starts, reader.starts[1:])]
    assert len(reader.starts) in range(3, 7)
    assert all(g >= 0.13 for g in gaps)
    assert all(abs(round(g / 0.05) * 0.05 - g) < 0.03 for g in gaps), gaps  # on the grid
    assert reader.closed


def test_stop_interrupts_a_long_wait():
    p = Poller(FakeReader([1]), Rules(), 3600.0)
    p.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    p.stop(timeout=2)
    assert time.monotonic() - t0 < 0.5
    assert p.status().polls == 1


def test_run_keeps_the_interval():
    reader = FakeReader([1])
    p = Poller(reader, Rules(), 0.05)
    p.start()
    time.sleep(0.5)
    p.stop(timeout=2)
    assert 8 <= len(reader.starts) <= 12
