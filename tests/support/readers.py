"""Hand-made dump readers for Poller tests (tests/test_peaks.py, tests/test_kernelstats.py)."""

from __future__ import annotations

import socket

from sockscope.batch import Batch
from sockscope.netlink import DumpStats


class OneSocketReader:
    """Reports `n[0]` CLOSE-WAIT sockets on local port 8080."""

    def __init__(self):
        self.n = [0]

    def poll(self, start, states=None):
        sink = start()
        lo = socket.inet_aton("127.0.0.1") + bytes(12)
        sink(Batch.from_records(
            [(socket.AF_INET, 10, 8080, 0, lo, bytes(16), 0, 128, 0, 1)]
            + [(socket.AF_INET, 8, 8080, 40000 + i, lo, lo, 1, 0, 0, 2 + i) for i in range(self.n[0])]))
        return DumpStats(("ipv4",), 1 + self.n[0], 0, 0)

    def close(self):
        pass
