"""features/units.py: TCP sockets per systemd unit / container from each socket's cgroup id.

Pure tests on hand-built batches (Batch.from_records with INET_DIAG_CGROUP_ID attributes,
a directory tree standing in for the cgroup2 mount); the real-kernel test (cgroups made
under the machine's cgroup2 mount, compared with `ss --cgroup`) is in
test_units_kernel.py.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest

from sockscope import config, features
from sockscope.batch import Batch
from sockscope.catalogue import Samples
from sockscope.cgroupmap import CgroupMap
from sockscope.features import DumpStats, PollContext
from sockscope.features.units import INET_DIAG_CGROUP_ID, NONE, OTHER, TcpUnits, cgroup_ids
from sockscope.poller import merge_needs
from sockscope.states import STATES

LO = socket.inet_pton(socket.AF_INET, "127.0.0.1")
ESTABLISHED, TIME_WAIT, CLOSE_WAIT, LISTEN, NEW_SYN_RECV = 1, 6, 8, 10, 12


def rec(state: int, sport: int, dport: int = 0, rq: int = 0, wq: int = 0) -> tuple:
    return (socket.AF_INET, state, sport, dport, LO, LO, rq, wq, 0, 0 if state in (TIME_WAIT, NEW_SYN_RECV) else 7)


def cg(cgroup_id: int) -> list[tuple[int, bytes]]:
    # what the kernel sends besides: INET_DIAG_SHUTDOWN (8, u8) before, INET_DIAG_SOCKOPT (22) after
    return [(8, b"\0"), (INET_DIAG_CGROUP_ID, struct.pack("=Q", cgroup_id)), (22, b"\0\0")]


def batch(rows: list[tuple[tuple, int | None]]) -> Batch:
    return Batch.from_records([r for r, _ in rows], attributes=[[] if i is None else cg(i) for _, i in rows])


@pytest.fixture
def tree(tmp_path):
    ino = {}
    for p in ("system.slice/nginx.service", "system.slice/nginx.service/worker", "system.slice/redis.service",
              "system.slice/db.service"):
        os.makedirs(tmp_path / p)
        ino[p.rsplit("/", 1)[-1] if "worker" not in p else "worker"] = os.stat(tmp_path / p).st_ino
    return tmp_path, ino


def run(feature: TcpUnits, *batches: Batch):
    fold = feature.fold(PollContext(0.0, 0.0))
    for b in batches:
        b.attributes((INET_DIAG_CGROUP_ID,))
        fold.add(b)
    result = fold.finish(DumpStats(("ipv4",), sum(len(b) for b in batches), 0, 0))
    out = Samples()
    feature.samples(result, out)
    return result, out


def counts(out: Samples, unit: str) -> dict[str, float]:
    return {labels[1]: v for labels, v in out.get("sockscope_tcp_unit_sockets") if labels[0] == unit and v}


def test_cgroup_ids_read_the_u64_and_zero_without_one():
    big = (1 << 40) + 12345  # both words matter
    b = batch([(rec(ESTABLISHED, 80), big), (rec(TIME_WAIT, 80), None), (rec(LISTEN, 80), 1)])
    assert cgroup_ids(b).tolist() == [big, 0, 1]


def test_sockets_fold_by_unit_and_state(tree):
    root, ino = tree
    f = TcpUnits(cgroups=CgroupMap(str(root)))
    rows = ([(rec(LISTEN, 80, rq=3, wq=128), ino["nginx.service"])]
            + [(rec(ESTABLISHED, 80, 5000 + i, rq=10, wq=1), ino["nginx.service"]) for i in range(4)]
            + [(rec(CLOSE_WAIT, 80, 6000 + i, rq=1), ino["worker"]) for i in range(2)]
            + [(rec(ESTABLISHED, 6379, 7000 + i), ino["redis.service"]) for i in range(3)]
            + [(rec(TIME_WAIT, 80, 8000 + i), None) for i in range(5)]
            + [(rec(NEW_SYN_RECV, 80, 9000), None)])
    result, out = run(f, batch(rows[:6]), batch(rows[6:]))  # two batches: rows found in both
    assert counts(out, "nginx.service") == {"listen": 1, "established": 4, "close_wait": 2}  # worker folded in
    assert counts(out, "redis.service") == {"established": 3}
    assert counts(out, NONE) == {"time_wait": 5, "syn_recv": 1}
    assert counts(out, OTHER) == {}
    # zero fill: every exported unit has every state, in STATES order
    nginx = [labels[1] for labels, _ in out.get("sockscope_tcp_unit_sockets") if labels[0] == "nginx.service"]
    assert nginx == list(STATES)
    assert out.value("sockscope_tcp_unit_receive_queue_bytes", "nginx.service") == 4 * 10 + 2  # LISTEN left out
    assert out.value("sockscope_tcp_unit_send_queue_bytes", "nginx.service") == 4
    assert [labels for labels, _ in out.get("sockscope_tcp_listen_unit_info")] == [("127.0.0.1", "80", "nginx.service")]
    assert [r.unit for r in result.units] == ["nginx.service", "redis.service", NONE, OTHER]
    assert out.value("sockscope_folded_units") == 0


def test_the_biggest_units_are_kept_and_the_rest_is_other(tree):
    root, ino = tree
    f = TcpUnits(max_tracked=1, cgroups=CgroupMap(str(root)))
    rows = ([(rec(ESTABLISHED, 80, 5000 + i), ino["nginx.service"]) for i in range(5)]
            + [(rec(ESTABLISHED, 6379, 6000 + i), ino["redis.service"]) for i in range(3)]
            + [(rec(CLOSE_WAIT, 5432, 7000 + i), ino["db.service"]) for i in range(2)])
    _, out = run(f, batch(rows))
    assert {labels[0] for labels, _ in out.get("sockscope_tcp_unit_sockets")} == {"nginx.service", NONE, OTHER}
    assert counts(out, OTHER) == {"established": 3, "close_wait": 2}
    assert out.value("sockscope_folded_units") == 2
    total = sum(v for _, v in out.get("sockscope_tcp_unit_sockets"))
    assert total == len(rows)
    assert sum(len(r) for _, r in out) <= f.max_series()


def test_ids_the_tree_lacks_are_unknown(tree):
    root, ino = tree
    f = TcpUnits(cgroups=CgroupMap(str(root)))
    _, out = run(f, batch([(rec(ESTABLISHED, 80, 5000), 987654321), (rec(ESTABLISHED, 80, 5001), ino["db.service"])]))
    assert counts(out, "unknown") == {"established": 1}
    assert counts(out, "db.service") == {"established": 1}


def test_a_unit_without_sockets_disappears_from_the_next_poll(tree):
    root, ino = tree
    f = TcpUnits(cgroups=CgroupMap(str(root)))
    _, first = run(f, batch([(rec(ESTABLISHED, 80, 5000), ino["nginx.service"]),
                             (rec(ESTABLISHED, 6379, 5001), ino["redis.service"])]))
    _, second = run(f, batch([(rec(ESTABLISHED, 80, 5000), ino["nginx.service"])]))
    assert "redis.service" in {labels[0] for labels, _ in first.get("sockscope_tcp_unit_sockets")}
    assert "redis.service" not in {labels[0] for labels, _ in second.get("sockscope_tcp_unit_sockets")}
    assert f.seen.tolist() == [0, ino["nginx.service"]]  # the next poll's id table starts with these only
    _, third = run(f, batch([(rec(ESTABLISHED, 6379, 5001), ino["redis.service"])]))
    assert counts(third, "redis.service") == {"established": 1}
    assert "nginx.service" not in {labels[0] for labels, _ in third.get("sockscope_tcp_unit_sockets")}


def test_the_need_is_the_attribute_without_an_extension_bit():
    need = TcpUnits(cgroups=CgroupMap("/nonexistent")).needs()
    assert (need.protocol, need.ext, need.attributes) == (socket.IPPROTO_TCP, 0, (INET_DIAG_CGROUP_ID,))
    built = features.build(config.from_mapping({"units": {"enabled": True}, "tcp_info": {"enabled": True}}))
    merged = merge_needs(built)[socket.IPPROTO_TCP]
    assert INET_DIAG_CGROUP_ID in merged.attributes and merged.ext == 1 << 1  # tcp_info's bit only


def test_config_defaults_and_bounds():
    assert config.DEFAULTS.units.enabled is True and config.DEFAULTS.units.max_tracked == 64
    with pytest.raises(config.ConfigError, match="units.max_tracked"):
        config.from_mapping({"units": {"max_tracked": 5000}})
    f = TcpUnits.from_config(config.from_mapping({"units": {"enabled": True, "max_tracked": 3},
                                                  "listeners": {"max_tracked": 7}}))
    assert (f.max_tracked, f.max_listeners) == (3, 7)


def test_the_snapshot_fold_names_listeners_and_close_wait_units(tree):
    from sockscope.features.units import SnapshotUnits
    from sockscope.report import _close_wait_units

    root, ino = tree
    f = SnapshotUnits(cgroups=CgroupMap(str(root)))
    rows = ([(rec(LISTEN, 80), ino["nginx.service"]), (rec(LISTEN, 6379), ino["redis.service"])]
            + [(rec(CLOSE_WAIT, 80, 5000 + i), ino["worker"]) for i in range(3)]
            + [(rec(CLOSE_WAIT, 80, 6000), ino["db.service"])]
            + [(rec(CLOSE_WAIT, 6379, 7000 + i), ino["redis.service"]) for i in range(2)]
            + [(rec(ESTABLISHED, 80, 8000), ino["nginx.service"]), (rec(TIME_WAIT, 80, 8001), None)])
    fold = f.fold(PollContext(0.0, 0.0))
    fold.add(batch(rows))
    tables = fold.finish(DumpStats(("ipv4",), len(rows), 0, 0))
    assert tables.listeners == {("127.0.0.1", 80): ("nginx.service",), ("127.0.0.1", 6379): ("redis.service",)}
    assert tables.close_wait == {80: (("nginx.service", 3), ("db.service", 1)), 6379: (("redis.service", 2),)}
    shown, other = _close_wait_units(None, tables, top=1)  # type: ignore[arg-type]
    assert shown == [{"port": 80, "units": [{"unit": "nginx.service", "sockets": 3},
                                            {"unit": "db.service", "sockets": 1}]}]
    assert other == {"ports": 1, "sockets": 2}


def test_with_tcp_info_the_oldest_close_wait_per_unit(tree):
    from sockscope import tcpinfo

    root, ino = tree

    def info(last_ack_ms: int) -> bytes:
        raw = bytearray(232)  # a 4.10+ struct tcp_info's length is more than this field needs
        off = tcpinfo.FIELDS["last_ack_recv"].offset
        raw[off:off + 4] = struct.pack("=I", last_ack_ms)
        return bytes(raw)

    recs, attrs = [], []
    for state, sport, cgroup, age in ((CLOSE_WAIT, 80, ino["nginx.service"], 1500),
                                      (CLOSE_WAIT, 80, ino["worker"], 42_000),
                                      (ESTABLISHED, 80, ino["nginx.service"], 99_000),  # not CLOSE-WAIT
                                      (CLOSE_WAIT, 6379, ino["redis.service"], 700),
                                      (CLOSE_WAIT, 5432, ino["db.service"], 9000)):
        recs.append(rec(state, sport, 5000 + len(recs)))
        attrs.append([(tcpinfo.INET_DIAG_INFO, info(age)), *cg(cgroup)])
    f = TcpUnits(max_tracked=2, cgroups=CgroupMap(str(root)), close_wait_age=True)
    assert f.needs().ext == tcpinfo.INFO_EXT
    b = Batch.from_records(recs, attributes=attrs)
    b.attributes((INET_DIAG_CGROUP_ID, tcpinfo.INET_DIAG_INFO))
    _, out = run(f, b)
    ages = dict((labels[0], v) for labels, v in out.get("sockscope_tcp_unit_oldest_close_wait_seconds"))
    # nginx (3 sockets) and db/redis tie at 1: db.service sorts first; redis is folded into other
    assert ages == {"nginx.service": 42.0, "db.service": 9.0, NONE: 0.0, OTHER: 0.7}
    assert sum(len(r) for _, r in out) <= f.max_series()
    # without tcp_info: no such series
    _, plain = run(TcpUnits(cgroups=CgroupMap(str(root))), Batch.from_records(recs, attributes=attrs))
    assert plain.get("sockscope_tcp_unit_oldest_close_wait_seconds") == []


def test_walks_and_failed_walks_are_counted(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("25 30 0:23 / /sys rw - sysfs sysfs rw\n")  # no cgroup2 mount
    f = TcpUnits(cgroups=CgroupMap(mountinfo=str(info)))
    _, out = run(f, batch([(rec(ESTABLISHED, 80, 5000), 4242)]))
    assert counts(out, "unknown") == {"established": 1}
    assert out.value("sockscope_tcp_unit_cgroup_walks") == 1
    assert out.value("sockscope_tcp_unit_cgroup_walk_errors") == 1
