"""The feature registry and reload by config diff (pure, no kernel)."""

from __future__ import annotations

import socket

from sockscope import config, features
from sockscope.aggregate import Rules
from sockscope.batch import Batch
from sockscope.features import DumpNeed
from sockscope.features.kernel import KernelCounters
from sockscope.features.tcp import TcpSockets
from sockscope.netlink import DumpStats
from sockscope.poller import merge_needs

LO = socket.inet_aton("127.0.0.1") + bytes(12)


def cfg(**sections) -> config.Config:
    return config.from_mapping(sections)


def test_changed_keys_names_exactly_the_keys_that_differ():
    a = cfg(poll={"interval": "5s"}, ports={"local": [80]})
    b = cfg(poll={"interval": "2s"}, ports={"local": [80, 443]}, graphite={"enabled": True})
    assert config.changed_keys(a, a) == set()
    assert config.changed_keys(a, b) == {"poll.interval", "poll.stale_after", "ports.local",
                                         "graphite.enabled"}


def test_features_rebuilt_are_those_whose_keys_changed():
    # all three track the same ports
    assert features.changed_features({"ports.local"}) == {"tcp", "tcp_info", "connections", "owners"}
    assert features.changed_features({"tcp_info.enabled"}) == {"tcp_info", "units"}  # units' CLOSE-WAIT age
    assert features.changed_features({"poll.peak_window"}) == {"peaks"}
    # connections: its receiver thread listens in the namespace
    assert features.changed_features({"poll.netns"}) == {"kernel", "udp_counters", "connections"}
    assert features.changed_features({"poll.interval", "graphite.enabled"}) == set()


def test_build_follows_the_configuration_and_keeps_what_did_not_change():
    on = features.build(config.DEFAULTS)
    assert [f.name for f in on] == ["tcp", "units", "peaks", "kernel", "udp", "udp_counters"]  # the registry's order
    off = features.build(cfg(poll={"peak_window": 0, "kernel_stats": False}, udp={"enabled": False},
                             units={"enabled": False}))
    assert [f.name for f in off] == ["tcp"]
    # A reload that changed only ports: the peaks (with their buckets) and the kernel
    # counters (with their open files) are the same objects.
    keep = [f for f in on if f.name not in features.changed_features({"ports.local"})]
    again = features.build(cfg(ports={"local": [9999]}), keep=keep)
    by = {f.name: f for f in again}
    assert by["peaks"] is on[2] and by["kernel"] is on[3] and by["tcp"] is not on[0] and by["units"] is on[1]
    assert by["tcp"].rules.local == (9999,)
    # The kept peaks track the rebuilt feature's metrics.
    assert set(by["peaks"]._twins) >= {m.name for m in by["tcp"].metrics if m.peak}


def test_needs_of_one_protocol_are_merged():
    class Extra(TcpSockets):
        name = "extra"

        def needs(self):
            return DumpNeed(socket.IPPROTO_TCP, states=1 << 8, ext=1 << 1, attributes=(2,))

    merged = merge_needs([TcpSockets(Rules()), Extra(Rules()),
                          KernelCounters(reader=object())])
    assert list(merged) == [socket.IPPROTO_TCP]
    need = merged[socket.IPPROTO_TCP]
    assert (need.states, need.ext, need.attributes) == (0xFFF, 1 << 1, (2,))


def test_every_metric_name_is_unique():
    names = [m.name for f in features.build(config.DEFAULTS) for m in f.metrics]
    assert len(names) == len(set(names))


def test_peaks_survive_a_reload_that_changed_other_features():
    """Service.reload keeps the WindowPeaks of an unchanged poll.peak_window: a spike seen
    before the reload is still the peak after it."""
    from sockscope.service import Service

    class Reader:
        def __init__(self, n):
            self.n = n

        def poll(self, start, states=None):
            sink = start()
            sink(Batch.from_records([(socket.AF_INET, 8, 80, 40000 + i, LO, LO, 0, 0, 0, 1)
                                     for i in range(self.n[0])]))
            return DumpStats(("ipv4",), self.n[0], 0, 0)

        def close(self):
            pass

    n = [7]
    first = cfg(poll={"kernel_stats": False}, prometheus={"enabled": False})
    service = Service(first, reader_factory=lambda c, need: Reader(n))
    service.poller.poll()
    n[0] = 1
    service.reload(cfg(poll={"kernel_stats": False}, prometheus={"enabled": False}, ports={"local": [80]}))
    st = service.poller.poll()
    assert st.snapshot.local.ports == (80, "other")
    assert st.samples.value("sockscope_tcp_sockets_peak", "ipv4", "close_wait") == 7
    assert st.samples.value("sockscope_tcp_sockets", "ipv4", "close_wait") == 1
    service.stop()
