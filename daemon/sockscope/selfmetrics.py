"""sockscope's own series: liveness, the poll loop, each source's health, the build.

Written once here for the Prometheus exposition and the Graphite lines. `poll_samples`
depends only on a PollStatus (rendered once per poll); `scrape_samples` on the clock too
(sockscope_up and the snapshot age change between polls).
"""

from __future__ import annotations

import platform

from . import __version__
from .catalogue import GraphitePath, Metric, Samples
from .snapshot import PollStatus

__all__ = ["UP", "AGE", "POLL_METRICS", "SCRAPE_METRICS", "poll_samples", "scrape_samples"]

UP = Metric("sockscope_up", "gauge",
            "1 if the latest successful poll is at most poll.stale_after seconds old, else 0.")
AGE = Metric("sockscope_snapshot_age_seconds", "gauge", "Seconds since the latest successful poll.")
INTERVAL = Metric("sockscope_poll_interval_seconds", "gauge", "Configured seconds between two polls (poll.interval).")
DURATION = Metric("sockscope_poll_duration_seconds", "gauge",
                  "Seconds the TCP dump of the latest successful poll took, aggregation included.",
                  graphite=GraphitePath(("sockscope", "poll", "duration_seconds")))
SOCKETS = Metric("sockscope_poll_sockets", "gauge", "TCP sockets seen by the latest successful poll.",
                 graphite=GraphitePath(("sockscope", "poll", "sockets")))
LAST_SUCCESS = Metric("sockscope_last_poll_success_timestamp_seconds", "gauge",
                      "UNIX time at which the latest successful poll finished.")
POLLS = Metric("sockscope_polls", "counter", "Polls attempted since start, successful or not.")
ERRORS = Metric("sockscope_poll_errors", "counter",
                "Polls that failed: the TCP dump failed (the previous snapshot is kept) or a consumer raised.",
                graphite=GraphitePath(("sockscope", "poll", "errors")))
RETRIES = Metric("sockscope_netlink_dump_retries", "counter",
                 "sock_diag dumps restarted: flagged inconsistent (NLM_F_DUMP_INTR) or ENOBUFS.")
INTERRUPTED = Metric("sockscope_netlink_dump_interrupted", "counter",
                     "sock_diag dumps accepted still flagged inconsistent after every retry.")
SOURCE_UP = Metric("sockscope_source_up", "gauge",
                   "1 if the source (a dump: tcp, udp; a feature's own read or work: kernel, peaks) worked in "
                   "the latest poll.",
                   ("source",), GraphitePath(("sockscope", "source", "{source}", "up")))
SOURCE_ERRORS = Metric("sockscope_source_errors", "counter",
                       "Polls in which the source failed (logged once per distinct problem).", ("source",),
                       GraphitePath(("sockscope", "source", "{source}", "errors")))
SOURCE_DURATION = Metric("sockscope_source_duration_seconds", "gauge",
                         "Seconds the source took in the latest poll.", ("source",),
                         GraphitePath(("sockscope", "source", "{source}", "duration_seconds")))
BUILD = Metric("sockscope_build_info", "gauge", "Always 1; the labels carry the sockscope and Python versions.",
               ("version", "python_version"))

SCRAPE_METRICS = (UP, AGE)
POLL_METRICS = (INTERVAL, DURATION, SOCKETS, LAST_SUCCESS, POLLS, ERRORS, RETRIES, INTERRUPTED, SOURCE_UP,
                SOURCE_DURATION, SOURCE_ERRORS, BUILD)


def poll_samples(status: PollStatus, interval: float | None, *, version: str = __version__,
                 python_version: str = platform.python_version()) -> Samples:
    out = Samples()
    if interval is not None:
        out.add(INTERVAL, (), interval)
    snap = status.snapshot
    if snap is not None:
        out.add(DURATION, (), snap.duration)
        out.add(SOCKETS, (), snap.sockets)
        out.add(LAST_SUCCESS, (), snap.timestamp + snap.duration)
    out.add(POLLS, (), status.polls)
    out.add(ERRORS, (), status.errors)
    out.add(RETRIES, (), status.dump_retries)
    out.add(INTERRUPTED, (), status.dump_interrupted)
    for name, health in status.sources.items():
        out.add(SOURCE_UP, (name,), 1.0 if health.up else 0.0)
    for name, health in status.sources.items():
        out.add(SOURCE_DURATION, (name,), health.duration)
    for name in sorted(set(status.source_errors) | set(status.sources)):
        out.add(SOURCE_ERRORS, (name,), status.source_errors.get(name, 0))
    out.add(BUILD, (version, python_version), 1.0)
    return out


def scrape_samples(status: PollStatus, stale_after: float, now: float) -> Samples:
    out = Samples()
    age = None
    last = status.last_success_monotonic
    if status.snapshot is not None and last is not None:
        age = max(0.0, now - last)
    out.add(UP, (), 1.0 if age is not None and age <= stale_after else 0.0)
    if age is not None:
        out.add(AGE, (), age)
    return out
