"""sdnotify: the datagram protocol against real AF_UNIX sockets, watchdog timing with a
fake clock, and what ServiceNotifier sends for a sequence of polls."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from sockscope.sdnotify import Notifier, ServiceNotifier, Watchdog, status_text, watchdog_interval
from sockscope.snapshot import PollStatus


def _bound(tmp_path, abstract: bool):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"sockscope-sdnotify-test-{os.getpid()}"
        s.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "n.sock")
        s.bind(address)
    s.settimeout(2)
    return s, address


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_of_lines(tmp_path, abstract):
    sock, address = _bound(tmp_path, abstract)
    with sock:
        n = Notifier({"NOTIFY_SOCKET": address})
        assert n.enabled
        assert n.notify("READY=1", "STATUS=two\nlines")
        assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"
        n.close()


def test_no_notify_socket_means_silence():
    n = Notifier({})
    assert not n.enabled
    assert n.notify("READY=1") is False


def test_send_errors_are_logged_once_and_never_raised(tmp_path, caplog):
    path = tmp_path / "later.sock"
    n = Notifier({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.INFO, logger="sockscope.sdnotify"):
        for _ in range(5):
            assert n.notify("WATCHDOG=1") is False
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "cannot notify systemd" in warnings[0].getMessage()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        with sock:
            assert n.notify("WATCHDOG=1") is True
            assert sock.recv(100) == b"WATCHDOG=1"
        assert any("works again" in r.getMessage() for r in caplog.records)


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None


class _Recorder(Notifier):
    def __init__(self):
        super().__init__({})
        self.sent: list[tuple[str, ...]] = []

    def notify(self, *lines):
        self.sent.append(lines)
        return True


def test_watchdog_kicks_at_most_once_per_interval():
    now = [100.0]
    rec = _Recorder()
    wd = Watchdog(rec, 1.0, monotonic=lambda: now[0])
    sent = []
    for _ in range(25):  # a poll every 0.2 s for 5 s
        sent.append(wd.kick())
        now[0] += 0.2
    assert sent.count(True) == 5
    assert rec.sent == [("WATCHDOG=1",)] * 5


def _status(snapshot, error=None, polls=1, errors=0):
    return PollStatus(results={"tcp": snapshot} if snapshot else {},
                      last_success_monotonic=1.0 if snapshot else None,
                      polls=polls, errors=errors, last_error=error)


def test_ready_only_after_the_first_good_poll(fake_snapshot):
    now = [0.0]
    rec = _Recorder()
    sn = ServiceNotifier(rec, Watchdog(rec, 10.0, monotonic=lambda: now[0]), monotonic=lambda: now[0])
    sn.reloaded()  # a SIGHUP before the first good poll: no READY yet
    sn.on_poll(_status(None, "netlink dump ipv4 failed: boom", errors=1))
    assert not any("READY=1" in m for m in rec.sent)
    assert ("STATUS=poll failed (1 of 1 failed): netlink dump ipv4 failed: boom",) in rec.sent
    now[0] += 0.1
    sn.on_poll(_status(fake_snapshot, polls=2, errors=1))
    ready = [m for m in rec.sent if "READY=1" in m]
    assert len(ready) == 1 and f"MAINPID={os.getpid()}" in ready[0]
    assert any(line.startswith("STATUS=") and "TCP sockets" in line for line in ready[0])
    count = len(rec.sent)
    now[0] += 0.1
    sn.on_poll(_status(fake_snapshot, polls=3, errors=1))  # < 1 s later, same outcome: quiet
    assert len(rec.sent) == count
    sn.reloading()
    sn.reloaded()
    sn.stopping()
    assert rec.sent[-3][0] == "RELOADING=1"
    assert rec.sent[-2][0] == "READY=1"
    assert rec.sent[-1][0] == "STOPPING=1"


def test_status_text_has_the_figures(fake_snapshot):
    text = status_text(_status(fake_snapshot))
    assert text.startswith(f"{fake_snapshot.sockets} TCP sockets")
    assert "poll took" in text
    failed = status_text(_status(fake_snapshot, "dump failed", polls=4, errors=2))
    assert failed.startswith("poll failed (2 of 4 failed): dump failed; serving the poll of")


@pytest.fixture
def fake_snapshot():
    from sockscope.aggregate import Accumulator, Rules
    from sockscope.batch import Batch, Record

    acc = Accumulator()
    lo = socket.inet_pton(socket.AF_INET, "127.0.0.1") + bytes(12)
    acc.add(Batch.from_records([Record(socket.AF_INET, 10, 80, 0, lo, bytes(16), 0, 128, 0, 1),
                                Record(socket.AF_INET, 1, 80, 5000, lo, lo, 0, 0, 0, 2)]))
    return acc.finish(Rules(), families=("ipv4",), timestamp=0.0, duration=0.002, messages=2,
                      dump_interrupted=False)
