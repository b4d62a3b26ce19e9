"""The real sockscope daemon (cli.main, same argv) with a reader the test can wedge.

SIGUSR1 makes every following poll block inside the reader, as a dump stuck in the
kernel would: the poll loop stops completing, so WATCHDOG=1 must stop while /metrics
keeps answering. The block is bounded (WEDGE_LIMIT) so nothing outlives the test.

No production code knows about this: cli.main takes `reader_factory` (the same seam
Service has), and this script passes one wrapping the real netlink Reader.
"""

from __future__ import annotations

import signal
import sys
import threading

from sockscope import cli
from sockscope.service import make_reader

WEDGE_LIMIT = 60.0
wedged = threading.Event()
never = threading.Event()


class WedgeableReader:
    def __init__(self, real):
        self.real = real

    def poll(self, start):
        if wedged.is_set():
            never.wait(WEDGE_LIMIT)
        return self.real.poll(start)

    def close(self) -> None:
        self.real.close()

    def __getattr__(self, name):
        return getattr(self.real, name)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, lambda *_: wedged.set())
    sys.exit(cli.main(sys.argv[1:], reader_factory=lambda cfg: WedgeableReader(make_reader(cfg))))
