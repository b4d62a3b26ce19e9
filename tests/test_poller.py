"""Poller behaviour with a scripted reader (no kernel): publish, keep last good, log once, timing."""

import logging
import socket
import time

import pytest

from sockscope.aggregate import Rules
from sockscope.batch import Batch
from sockscope.features.kernel import KernelCounters
from sockscope.features.peaks import WindowPeaks
from sockscope.features.tcp import TcpSockets
from sockscope.netlink import DumpStats, NetlinkError
from sockscope.poller import Poller

LO4 = socket.inet_aton("127.0.0.1") + bytes(12)
TCP = socket.IPPROTO_TCP


def poller(reader, rules=Rules(), interval=5.0, extra=(), **kwargs) -> Poller:
    """A Poller of the TCP feature (and `extra` features) over `reader`."""
    return Poller([TcpSockets(rules), *extra], {TCP: reader}, interval, **kwargs)


class FakeReader:
    """poll(start) feeds `n` ESTABLISHED sockets, or raises the next scripted error."""

    def __init__(self, outcomes, delay=0.0):
        self.outcomes = list(outcomes)
        self.delay = delay
        self.starts = []
        self.closed = False

    def poll(self, start, states=None):
        self.starts.append(time.monotonic())
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if self.delay:
            time.sleep(self.delay)
        if isinstance(outcome, BaseException):
            raise outcome
        sink = start()
        sink(Batch.from_records([(socket.AF_INET, 1, 80, 40000 + i, LO4, LO4, 0, 0, 0, 1)
                                 for i in range(outcome)]))
        return DumpStats(("ipv4",), outcome, retries=1, interrupted=0)

    def close(self):
        self.closed = True


def test_success_publishes_snapshot_and_counters():
    p = poller(FakeReader([3]), Rules(local=(80,)), 5.0)
    st = p.poll()
    assert st.snapshot.sockets == 3
    assert st.snapshot.states[("ipv4", "established")] == 3
    assert (st.polls, st.errors, st.dump_retries) == (1, 0, 1)
    assert st.last_success_monotonic is not None
    assert p.status() is st


def test_failure_keeps_last_good_snapshot_and_logs_each_distinct_error_once(caplog):
    err_a, err_b = NetlinkError("dump failed: A"), NetlinkError("dump failed: B")
    p = poller(FakeReader([2, err_a, err_a, err_a, err_b, 5]), Rules(), 5.0)
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
    p = poller(FakeReader([ValueError("bug"), 1]))
    assert p.poll().errors == 1
    assert "Traceback" in caplog.text  # unexpected errors keep their traceback in the log
    assert p.poll().snapshot.sockets == 1


def test_run_skips_missed_slots_and_stops_promptly():
    # Each poll takes 0.13 s with a 0.05 s interval: slots are skipped, not burst through.
    reader = FakeReader([1], delay=0.13)
    p = poller(reader, Rules(), 0.05)
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
    p = poller(FakeReader([1]), Rules(), 3600.0)
    p.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    p.stop(timeout=2)
    assert time.monotonic() - t0 < 0.5
    assert p.status().polls == 1


def test_run_keeps_the_interval():
    reader = FakeReader([1])
    p = poller(reader, Rules(), 0.05)
    p.start()
    time.sleep(0.5)
    p.stop(timeout=2)
    assert 8 <= len(reader.starts) <= 12


# -- nothing in a poll may kill the poller (issue 9, defect 6) -----------------------------


class BrokenPeaks(WindowPeaks):
    """Window peaks that raise while `broken`."""

    def __init__(self):
        super().__init__(60.0, list(TcpSockets.metrics))
        self.broken = True

    def after(self, samples, ctx, fresh):
        if self.broken:
            raise RuntimeError("peaks exploded")
        return super().after(samples, ctx, fresh)


class BrokenKernel:
    def read(self):
        raise OSError("kernel counters exploded")

    def close(self):
        pass


def errors_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_raising_feature_is_a_counted_source_error_and_the_others_go_on(caplog):
    # Before (issue 9): peaks.apply ran outside the poll's try; the exception ended the
    # poller thread. Now a feature that raises fails on its own: its series are left out,
    # sockscope_source_up{source} is 0 and sockscope_source_errors_total counts it, logged
    # once with its traceback; the TCP figures go on.
    peaks = BrokenPeaks()
    p = poller(FakeReader([1, 2, 3, 4]), extra=[peaks])
    caplog.set_level(logging.INFO, logger="sockscope")
    for _ in range(3):
        st = p.poll()
    assert (st.polls, st.errors, st.snapshot.sockets) == (3, 0, 3)
    assert st.sources["peaks"].up is False and st.source_errors["peaks"] == 3
    assert "sockscope_tcp_sockets_peak" not in st.samples.series
    assert errors_logged(caplog) == ["peaks source failed: peaks exploded"]  # once
    assert "Traceback" in caplog.text
    peaks.broken = False
    st = p.poll()
    assert st.sources["peaks"].up and st.samples.value("sockscope_tcp_sockets_peak", "ipv4", "established") == 4
    assert caplog.text.count("peaks source failed: recovered after 3 failures") == 1


def test_a_raising_kernel_reader_is_a_counted_source_error(caplog):
    kernel = KernelCounters(reader=BrokenKernel())
    p = poller(FakeReader([1]), extra=[kernel])
    caplog.set_level(logging.INFO, logger="sockscope")
    first, second = p.poll(), p.poll()
    assert (first.errors, second.errors, second.source_errors["kernel"]) == (0, 0, 2)
    assert second.sources["kernel"].up is False and second.sources["tcp"].up
    assert errors_logged(caplog) == ["kernel source failed: kernel counters exploded"]


def test_a_raising_consumer_is_counted_and_the_new_snapshot_kept(caplog):
    seen = []

    def consumer(status):
        seen.append(status)
        if len(seen) <= 2:
            raise ValueError("consumer exploded")

    p = poller(FakeReader([1, 2, 3]), Rules(), 5.0, on_poll=consumer)
    caplog.set_level(logging.INFO, logger="sockscope")
    first, second, third = p.poll(), p.poll(), p.poll()
    assert [s.snapshot.sockets for s in seen] == [1, 2, 3]  # consumers had every good snapshot
    assert (first.errors, first.last_error) == (1, "poll consumer failed: consumer exploded")
    assert (second.errors, third.errors, third.last_error) == (2, 2, None)
    assert p.status() is third and third.snapshot.sockets == 3
    assert errors_logged(caplog) == ["poll consumer failed: consumer exploded"]
    assert "poll recovered after 2 failed polls" in caplog.text


def test_a_failed_poll_whose_consumer_fails_too_counts_once(caplog):
    def consumer(status):
        raise RuntimeError("consumer exploded")

    p = poller(FakeReader([NetlinkError("dump failed")]), on_poll=consumer)
    caplog.set_level(logging.INFO, logger="sockscope")
    for _ in range(4):
        st = p.poll()
    assert (st.polls, st.errors, st.last_error) == (4, 4, "dump failed")
    # Two distinct messages, alternating every poll: each logged once, not once per poll.
    assert errors_logged(caplog) == ["poll failed: dump failed", "poll consumer failed: consumer exploded"]


def test_service_dispatch_hands_the_poll_to_every_consumer_then_raises():
    from sockscope import config
    from sockscope.poller import ConsumerError
    from sockscope.service import Service

    service = Service(config.from_mapping({"poll": {"kernel_stats": False}}), reader_factory=lambda c, need: FakeReader([1]))
    got = []

    def bad(status):
        raise KeyError("boom")

    service.on_poll(bad)
    service.on_poll(got.append)
    st = service.poller.poll()
    assert [s.snapshot.sockets for s in got] == [1]  # the consumer after the failing one ran
    assert st.errors == 1 and st.last_error == "poll consumer failed: bad: 'boom'"
    try:
        service._dispatch(st)
    except ConsumerError as e:
        assert isinstance(e.__cause__, KeyError)
    else:
        raise AssertionError("no ConsumerError")


def test_the_loop_survives_a_broken_schedule(caplog):
    reader = FakeReader([1])
    p = poller(reader, Rules(), 0.05)
    caplog.set_level(logging.INFO, logger="sockscope")
    p.start()
    try:
        time.sleep(0.2)
        p.reconfigure(interval=0)  # ZeroDivisionError in the slot arithmetic
        time.sleep(0.3)
        assert p._thread.is_alive() and not p.ended_unexpectedly
        assert "poll loop failed" in caplog.text
        p.reconfigure(interval=0.05)  # wakes the loop at once
        before = len(reader.starts)
        time.sleep(0.3)
        assert len(reader.starts) >= before + 3
    finally:
        p.stop(timeout=2)
    assert not p.ended_unexpectedly and reader.closed


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_only_a_base_exception_ends_the_thread_and_it_is_reported(caplog):
    reader = FakeReader([1, 1, SystemExit(3)])
    p = poller(reader, Rules(), 0.02)
    assert not p.ended_unexpectedly  # not started
    p.start()
    p._thread.join(2)
    assert p.ended_unexpectedly and reader.closed
    assert p.status().polls == 2
    assert "the poll loop ended on SystemExit: 3" in caplog.text


def test_a_failing_close_of_a_replaced_reader_loses_no_other_change(caplog):
    class BadClose(FakeReader):
        def close(self):
            raise OSError("close exploded")

    p = poller(BadClose([1]), Rules(), 5.0)
    new_features = [TcpSockets(Rules(local=(80,)))]
    p.reconfigure(readers={TCP: FakeReader([2])}, features=new_features, interval=7.0)
    st = p.poll()
    assert (p.features, p.interval, st.snapshot.sockets, st.errors) == (new_features, 7.0, 2, 0)
    assert st.snapshot.local.ports == (80, "other")
    assert "closing BadClose failed" in caplog.text
