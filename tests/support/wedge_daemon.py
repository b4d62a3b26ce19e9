"""The real sockscope daemon (cli.main, same argv) with faults the test can inject.

Signals (real-time ones: sockscope itself handles SIGUSR1/SIGUSR2):
- SIGRTMIN: every following poll blocks inside the reader, as a dump stuck in the kernel
  would: the poll loop stops completing, so WATCHDOG=1 must stop while /metrics keeps
  answering. The block is bounded (WEDGE_LIMIT) so nothing outlives the test.
- SIGRTMIN+1: toggles a failure of the window peaks (PeakTracker.observe raises), which
  ended the poller thread before issue 9.
- SIGRTMIN+2: the next poll raises SystemExit in the reader, which no `except Exception`
  catches: the poller thread ends, and the daemon must notice and exit with status 1.

No production code knows about this: cli.main takes `reader_factory` (the same seam
Service has), and this script passes one wrapping the real netlink Reader; the peaks
failure patches PeakTracker in this process only.
"""

from __future__ import annotations

import signal
import sys
import threading

from sockscope import cli
from sockscope.peaks import PeakTracker
from sockscope.service import make_reader

WEDGE_LIMIT = 60.0
wedged = threading.Event()
never = threading.Event()
peaks_broken = threading.Event()
exit_poller = threading.Event()


class WedgeableReader:
    def __init__(self, real):
        self.real = real

    def poll(self, start, states=None):
        if exit_poller.is_set():
            raise SystemExit("injected: the poller thread ends")
        if wedged.is_set():
            never.wait(WEDGE_LIMIT)
        return self.real.poll(start, states)

    def close(self) -> None:
        self.real.close()

    def __getattr__(self, name):
        return getattr(self.real, name)


_real_observe = PeakTracker.observe


def _observe(self, values, now):
    if peaks_broken.is_set():
        raise RuntimeError("injected peaks failure")
    return _real_observe(self, values, now)


def _toggle_peaks(*_):
    if peaks_broken.is_set():
        peaks_broken.clear()
    else:
        peaks_broken.set()


if __name__ == "__main__":
    PeakTracker.observe = _observe
    signal.signal(signal.SIGRTMIN, lambda *_: wedged.set())
    signal.signal(signal.SIGRTMIN + 1, _toggle_peaks)
    signal.signal(signal.SIGRTMIN + 2, lambda *_: exit_poller.set())
    sys.exit(cli.main(sys.argv[1:], reader_factory=lambda cfg, need: WedgeableReader(make_reader(cfg, need))))
