"""Window peaks (sockscope.peaks): bucket arithmetic with a fake clock, the poller and
collector path, and a real CLOSE-WAIT spike that rises and falls between two scrapes."""

from __future__ import annotations

import socket
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sockscope.aggregate import Rules
from sockscope.catalogue import Samples
from sockscope.config import ConfigError, from_mapping
from sockscope.features import PollContext
from sockscope.features import tcp as tcp_feature
from sockscope.features.peaks import WindowPeaks
from sockscope.features.tcp import TcpSockets
from sockscope.peaks import BUCKETS
from sockscope.poller import Poller
from sockscope.prometheus import StatusCollector
from sockscope.snapshot import OTHER, STATES, Listener, PortTable, QueueStats, Snapshot
from support.daemon import samples, scrape, start_daemon
from support.readers import OneSocketReader

CW = STATES.index("close_wait")
TOTAL = "sockscope_tcp_sockets_peak"
LOCAL = "sockscope_tcp_local_port_sockets_peak"
QUEUE = "sockscope_tcp_listen_queue_length_peak"


class Tracker:
    """WindowPeaks over the TCP feature's samples of hand-made Snapshots."""

    def __init__(self, window: float) -> None:
        self.peaks = WindowPeaks(window, list(TcpSockets.metrics))

    def observe(self, snapshot: Snapshot, now: float) -> dict:
        """{(peak metric name, label values): value} after a poll that saw `snapshot`."""
        live = Samples()
        tcp_feature.samples(snapshot, live)
        out = self.peaks.after(live, PollContext(0.0, now), True)
        return {(metric.name, labels): value for metric, rows in out for labels, value in rows}

    def series(self) -> int:
        return self.peaks.tracker.series()


def snap(close_wait: int = 0, *, ports=(8080, OTHER), queue: int = 0) -> Snapshot:
    """close_wait sockets on the first local port; a listener on 8080 with `queue` waiting."""
    states = {(f, s): 0 for f in ("ipv4",) for s in STATES}
    states[("ipv4", "close_wait")] = close_wait
    rows = tuple(tuple(close_wait if (i == 0 and j == CW) else 0 for j in range(len(STATES)))
                 for i in range(len(ports)))
    table = PortTable(ports=tuple(ports), counts=rows, queues=(QueueStats(),) * len(ports))
    empty = PortTable(ports=(OTHER,), counts=((0,) * len(STATES),), queues=(QueueStats(),))
    return Snapshot(timestamp=0.0, duration=0.0, families=("ipv4",), states=states, local=table,
                    remote=empty, listeners=(Listener("ipv4", "0.0.0.0", 8080, queue, 128),))


def test_peak_holds_for_at_least_the_window_and_at_most_one_bucket_more():
    window = 60.0
    width = window / BUCKETS
    for seen_at in (100.0, 100.0 + width / 2, 100.0 + width - 0.001):
        t = Tracker(window)
        t.observe(snap(0), seen_at - 1)
        assert t.observe(snap(7), seen_at)[(TOTAL, ("ipv4", "close_wait"))] == 7
        # Polls every second after the spike: the peak must survive the whole window...
        now = seen_at + 1
        while now < seen_at + window:
            p = t.observe(snap(0), now)
            assert p[(TOTAL, ("ipv4", "close_wait"))] == 7, (seen_at, now)
            assert p[(LOCAL, ("8080", "close_wait"))] == 7
            now += 1
        # ...and be gone no later than window + one bucket.
        p = t.observe(snap(0), seen_at + window + width + 0.001)
        assert p[(TOTAL, ("ipv4", "close_wait"))] == 0
        assert p[(LOCAL, ("8080", "close_wait"))] == 0


def test_peak_is_max_over_polls_and_never_below_the_live_value():
    t = Tracker(10.0)
    for now, n in ((0.0, 3), (0.5, 9), (1.0, 4), (1.5, 2)):
        p = t.observe(snap(n, queue=n * 10), now)
    assert p[(TOTAL, ("ipv4", "close_wait"))] == 9
    assert p[(QUEUE, ("0.0.0.0", "8080"))] == 90
    assert p[("sockscope_peak_window_seconds", ())] == 10.0
    assert t.observe(snap(12), 2.0)[(TOTAL, ("ipv4", "close_wait"))] == 12


def test_memory_is_bounded_by_series_times_buckets_not_polls():
    t = Tracker(5.0)
    series = len(snap().states) + 2 * len(STATES) + len(STATES) + 1  # states, local, remote, listener
    for i in range(5000):  # 5000 polls at 10 ms: 50 s, ten windows
        t.observe(snap(i % 17), i * 0.01)
    assert t.series() <= (BUCKETS + 1) * series
    assert len(t.peaks.tracker._buckets) <= BUCKETS + 1


def test_tracked_port_set_changes():
    """A newly tracked port starts from the polls since it is tracked; a dropped port
    loses its peak series with its live series."""
    t = Tracker(60.0)
    t.observe(snap(5, ports=(8080, OTHER)), 0.0)
    p = t.observe(snap(1, ports=(9090, 8080, OTHER)), 1.0)

    def close_wait(p):
        return {k[1][0]: v for k, v in p.items() if k[0] == LOCAL and k[1][1] == "close_wait"}

    assert close_wait(p) == {"9090": 1, "8080": 5, "other": 0}  # 9090 is new; 8080 keeps its 5
    p = t.observe(snap(0, ports=(9090, OTHER)), 2.0)
    assert close_wait(p) == {"9090": 1, "other": 0}  # 8080 gone with its live row


def test_clock_going_back_starts_over_instead_of_keeping_stale_buckets():
    t = Tracker(60.0)
    t.observe(snap(9), 1000.0)
    assert t.observe(snap(1), 10.0)[(TOTAL, ("ipv4", "close_wait"))] == 1


def test_poller_publishes_peaks_and_every_scraper_sees_the_same_values():
    clock = [100.0]
    reader = OneSocketReader()
    features = [TcpSockets(Rules()), WindowPeaks(30.0, list(TcpSockets.metrics))]
    poller = Poller(features, {socket.IPPROTO_TCP: reader}, 1.0, monotonic=lambda: clock[0])
    for n in (0, 6, 6, 0):
        reader.n[0] = n
        poller.poll()
        clock[0] += 1
    status = poller.status()
    assert status.snapshot.states[("ipv4", "close_wait")] == 0
    assert status.samples.value(TOTAL, "ipv4", "close_wait") == 6
    registry = CollectorRegistry()
    registry.register(StatusCollector(poller.status, 10.0, monotonic=lambda: clock[0]))
    bodies = [generate_latest(registry) for _ in range(3)]
    assert bodies[0] == bodies[1] == bodies[2]  # no reset on scrape
    text = bodies[0].decode()
    assert 'sockscope_tcp_local_port_sockets_peak{port="8080",state="close_wait"} 6.0' in text
    assert 'sockscope_tcp_local_port_sockets{port="8080",state="close_wait"} 0.0' in text
    assert "sockscope_peak_window_seconds 30.0" in text


def test_without_a_window_there_are_no_peak_series():
    poller = Poller([TcpSockets(Rules())], {socket.IPPROTO_TCP: OneSocketReader()}, 1.0)
    poller.poll()
    registry = CollectorRegistry()
    registry.register(StatusCollector(poller.status, 10.0))
    assert b"_peak" not in generate_latest(registry)


def test_peak_window_config():
    assert from_mapping({}).poll.peak_window == 60.0
    assert from_mapping({"poll": {"peak_window": 0}}).poll.peak_window == 0
    assert from_mapping({"poll": {"interval": "2s", "peak_window": "2s"}}).poll.peak_window == 2.0
    with pytest.raises(ConfigError, match=r"poll.peak_window: 1s is less than poll.interval \(5s\)"):
        from_mapping({"poll": {"peak_window": "1s"}})
    with pytest.raises(ConfigError, match="poll.peak_window"):
        from_mapping({"poll": {"peak_window": "-1s"}})


# -- the real thing: a spike between two scrapes ------------------------------------------------

SPIKE = 6
PORT = 18084
WINDOW = 4.0


def test_close_wait_spike_between_two_scrapes(netns, sockmix_factory, tmp_path):
    """CLOSE-WAIT sockets that live ~2 poll intervals, all between two scrapes: the second
    scrape shows peak = N while the live gauge is back to 0; the peak expires after the
    window."""
    daemon = start_daemon(
        tmp_path,
        f"poll:\n  interval: 500ms\n  peak_window: {WINDOW}s\n  kernel_stats: false\n"
        f"ports:\n  local: [{PORT}]\n",
        netns=netns.name,
    )
    live = ("sockscope_tcp_local_port_sockets", (("port", str(PORT)), ("state", "close_wait")))
    peak = ("sockscope_tcp_local_port_sockets_peak", live[1])
    total_peak = ("sockscope_tcp_sockets_peak", (("family", "ipv4"), ("state", "close_wait")))
    try:
        before = samples(scrape(daemon.url))  # scrape 1
        assert before[live] == 0 and before[peak] == 0
        mix = sockmix_factory({"close_wait": {"host": "127.0.0.1", "port": PORT, "n": SPIKE}}, ns=netns)
        time.sleep(1.0)  # ~2 poll intervals
        mix.stop()
        stopped = time.monotonic()
        time.sleep(1.6)  # >= 3 polls after the sockets are gone, no scrape meanwhile
        after = samples(scrape(daemon.url))  # scrape 2
        polls = ("sockscope_polls_total", ())
        assert after[polls] - before[polls] >= 5, "the spike must span polls between the scrapes"
        assert after[live] == 0, "the live gauge must be back to its old value"
        assert after[peak] == SPIKE
        assert after[total_peak] >= SPIKE
        assert after[("sockscope_peak_window_seconds", ())] == WINDOW
        # Expiry: gone within window + one bucket (+ a poll) of the last poll that saw it.
        deadline = time.monotonic() + WINDOW * 2 + 3
        while time.monotonic() < deadline:
            if samples(scrape(daemon.url))[peak] == 0:
                # The last poll that saw the spike ran before the stop: it must have been
                # kept for at least the window from there.
                assert time.monotonic() - stopped >= WINDOW - 0.6
                break
            time.sleep(0.25)
        else:
            pytest.fail("the peak did not expire after the window")
    finally:
        assert daemon.stop() == 0, daemon.log()
