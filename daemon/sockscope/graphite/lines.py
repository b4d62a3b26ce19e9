"""Graphite lines per naming: the catalogue's samples as `<path> <value> <timestamp>`.

Pure: no I/O, no clock (the host name functions are injected and called at most once).
`LineBuilder.series` walks every Metric that has a `catalogue.GraphitePath`: the
features' samples of a PollStatus, the poll loop's own (selfmetrics) and the pusher's
(`METRICS`, `stats_samples`). Each naming writes them as docs/graphite.md says:
- "sockscope": `<prefix>.` + the sockscope path, `{label}` filled and sanitised;
- "sockscope" with tags: `<prefix>.<tag name>;label=value...;host=<host>`, sockscope's own
  series (paths starting with `sockscope`) as paths with the host tag;
- "collectd": collectd tcpconns' paths where collectd has an equivalent, everything else
  under `<host>.sockscope.` + the sockscope path.
graphyte builds each line (`Sender.build_message`); values and lengths are checked first.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import graphyte

from .. import selfmetrics
from ..catalogue import GraphitePath, Metric, Samples
from ..snapshot import OTHER, PollStatus
from ..states import COUNTED

if TYPE_CHECKING:
    from .pusher import GraphiteStats

log = logging.getLogger("sockscope.graphite")

__all__ = [
    "COLLECTD_STATES",
    "MAX_LINE_BYTES",
    "METRICS",
    "InvalidLine",
    "LineBuilder",
    "Rendered",
    "check_value",
    "collectd_hostname",
    "sanitize",
    "stats_samples",
    "tag_value",
]

# carbon's LineReceiver (twisted LineOnlyReceiver.MAX_LENGTH): a longer line makes carbon
# drop the connection and, with it, the rest of the batch. Counted with the newline.
MAX_LINE_BYTES = 16384

# collectd tcpconns' names for the kernel states (src/tcpconns.c, tcp_state[]), keyed by
# sockscope's label values. collectd never sees TCP_NEW_SYN_RECV; sockscope counts request
# sockets as syn_recv, as `ss` shows them.
COLLECTD_STATES = {s.label: s.collectd for s in COUNTED}

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_UNSAFE_PREFIX = re.compile(r"[^A-Za-z0-9_.-]")
_TAG_VALUE_UNSAFE = re.compile(r"[\s;]")
_PLACEHOLDER = re.compile(r"\{(hostname|fqdn)\}")


class InvalidLine(ValueError):
    """A value or path that must not reach carbon."""


def sanitize(component: str) -> str:
    """One path component: every character outside [A-Za-z0-9_-] becomes `_`
    (dots in host names and IP addresses included). Never empty."""
    return _UNSAFE.sub("_", component) or "_"


def tag_value(value: str) -> str:
    """A Graphite 1.1 tag value: non-empty, no `;` (nor whitespace, which would split the
    line), not starting with `~`. Offending characters become `_`."""
    cleaned = _TAG_VALUE_UNSAFE.sub("_", value)
    if cleaned.startswith("~"):
        cleaned = "_" + cleaned[1:]
    if not cleaned:
        raise InvalidLine("empty tag value")
    return cleaned


def check_value(value) -> int | float:
    """The value as carbon accepts it: an int or a finite float, never a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidLine(f"value {value!r} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidLine(f"value {value!r} is not finite")
    return value


def expand(template: str, hostname: Callable[[], str], fqdn: Callable[[], str]) -> list[str]:
    """`template` split into path components with {hostname}/{fqdn} expanded, each
    sanitised (a placeholder is one component: `web1.example.com` -> `web1_example_com`).
    Empty components (a trailing `.`) are kept as ""; the caller decides."""
    values = {}

    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            values[key] = sanitize((hostname if key == "hostname" else fqdn)())
        return values[key]

    return [sanitize(_PLACEHOLDER.sub(sub, part)) if part else "" for part in template.split(".")]


def expand_raw(template: str, hostname: Callable[[], str], fqdn: Callable[[], str]) -> str:
    """`template` with {hostname}/{fqdn} replaced verbatim (dots kept)."""
    return _PLACEHOLDER.sub(lambda m: (hostname if m.group(1) == "hostname" else fqdn)(), template)


def collectd_hostname(gethostname: Callable[[], str] = socket.gethostname,
                      getaddrinfo: Callable = socket.getaddrinfo) -> str:
    """The host name collectd 5.12 uses with its defaults (no `Hostname`, `FQDNLookup
    true`; src/daemon/collectd.c init_hostname): gethostname(), then the canonical name of
    the first result of getaddrinfo(name, NULL, {ai_flags = AI_CANONNAME}) that has one
    (glibc: the first name of the /etc/hosts line that matched, or DNS's CNAME target).

    Not socket.getfqdn(): that is a reverse lookup of the address the name resolves to,
    and picks the first name with a dot, so `127.0.1.1 web1 web1.example.net` gives
    `web1.example.net` where collectd writes `web1`.

    collectd refuses to start when the lookup fails; sockscope logs a warning and uses the
    plain host name instead."""
    name = gethostname()
    try:
        # bytes: passed to the resolver as is, like collectd's char[] (a str would be
        # IDNA-encoded first, which refuses names the resolver accepts).
        infos = getaddrinfo(os.fsencode(name), None, 0, 0, 0, socket.AI_CANONNAME)
    except (OSError, UnicodeError) as exc:
        log.warning("graphite: looking up the host name %r failed (%s); using it as is for {fqdn} "
                    "(collectd with FQDNLookup true would not start)", name, exc)
        return name
    for info in infos:
        if info[3]:  # ai_canonname; Python gives "" for NULL
            return info[3]
    return name



# -- the pusher's own series --------------------------------------------------------------


_G = ("sockscope", "graphite")
SENT = Metric("sockscope_graphite_sent_lines", "counter",
              "Lines delivered to carbon: TCP, read by carbon as far as sockscope can confirm (docs/graphite.md); "
              "UDP, accepted by the kernel.", (), GraphitePath((*_G, "sent_lines")))
SEND_ERRORS = Metric("sockscope_graphite_send_errors", "counter",
                     "Failed connects and sends, and connections carbon closed before confirming what was written "
                     "on them (those lines are sent again).", (), GraphitePath((*_G, "send_errors")))
DROPPED = Metric("sockscope_graphite_dropped_lines", "counter",
                 "Oldest lines dropped from the full buffer before they were written: they never reach carbon.",
                 (), GraphitePath((*_G, "dropped_lines")))
DROPPED_UNCONFIRMED = Metric("sockscope_graphite_dropped_unconfirmed_lines", "counter",
                             "Oldest lines dropped from the full buffer after being written, before carbon "
                             "confirmed them.", (), GraphitePath((*_G, "dropped_unconfirmed_lines")))
RESENT = Metric("sockscope_graphite_resent_lines", "counter",
                "Lines written again because their connection failed before carbon confirmed them.",
                (), GraphitePath((*_G, "resent_lines")))
INVALID = Metric("sockscope_graphite_invalid_lines", "counter",
                 "Lines refused before queueing (NaN/inf/bool value, line over 16384 bytes).",
                 (), GraphitePath((*_G, "invalid_lines")))
PUSHES = Metric("sockscope_graphite_pushes", "counter", "Polls rendered and queued for Graphite.",
                (), GraphitePath((*_G, "pushes")))
QUEUE = Metric("sockscope_graphite_queue_lines", "gauge",
               "Lines not yet confirmed sent: waiting, being written, or written and unconfirmed.",
               (), GraphitePath((*_G, "queue_lines")))
UNCONFIRMED = Metric("sockscope_graphite_unconfirmed_lines", "gauge",
                     "Queued lines written on the current connection and not yet confirmed read by carbon.",
                     (), GraphitePath((*_G, "unconfirmed_lines")))
CAPACITY = Metric("sockscope_graphite_queue_capacity_lines", "gauge",
                  "Size of the buffer in lines (graphite.buffer_lines, resolved).", (),
                  GraphitePath((*_G, "queue_capacity_lines")))
LAST_SUCCESS = Metric("sockscope_graphite_last_success_timestamp_seconds", "gauge",
                      "UNIX time lines were last counted in sockscope_graphite_sent_lines_total (0 before the first).",
                      (), GraphitePath((*_G, "last_success_timestamp_seconds")))
CONNECTED = Metric("sockscope_graphite_connected", "gauge",
                   "1 while a connection (or UDP socket) to carbon is open.", (), GraphitePath((*_G, "connected")))
METRICS = (SENT, SEND_ERRORS, DROPPED, DROPPED_UNCONFIRMED, RESENT, INVALID, PUSHES, QUEUE, UNCONFIRMED,
           CAPACITY, LAST_SUCCESS, CONNECTED)


def stats_samples(stats: GraphiteStats | None) -> Samples | None:
    """The pusher's own series (None while Graphite is disabled)."""
    if stats is None:
        return None
    out = Samples()
    for metric, value in ((SENT, stats.sent_lines), (SEND_ERRORS, stats.send_errors),
                          (DROPPED, stats.dropped_lines), (DROPPED_UNCONFIRMED, stats.dropped_unconfirmed_lines),
                          (RESENT, stats.resent_lines), (INVALID, stats.invalid_lines), (PUSHES, stats.pushes),
                          (QUEUE, stats.queue_lines), (UNCONFIRMED, stats.unconfirmed_lines),
                          (CAPACITY, stats.capacity_lines), (LAST_SUCCESS, stats.last_success_timestamp),
                          (CONNECTED, 1.0 if stats.connected else 0.0)):
        out.add(metric, (), value)
    return out



# -- lines --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rendered:
    lines: list[bytes]
    invalid: list[str]  # one reason per refused line


class LineBuilder:
    """Renders a Snapshot as Graphite plaintext lines. Pure: no I/O, no clock.

    naming "sockscope": `<prefix>.tcp.states.<family>.<state>` ... (docs/graphite.md);
    tags=True: `<prefix>.tcp.local_port_sockets;port=8080;state=close_wait;host=<host>`;
    naming "collectd": `<prefix><host>.tcpconns-<port>-local.tcp_connections-<STATE>`.
    `prefix` and `host` are the configured strings; {hostname} and {fqdn} in them are
    expanded with the given functions (called at most once each, here). The default prefix
    of naming "sockscope" is `sockscope.<host>`, the host as one component.
    """

    def __init__(
        self,
        *,
        naming: str = "sockscope",
        tags: bool = False,
        prefix: str = "",
        host: str = "{fqdn}",
        hostname: Callable[[], str] = socket.gethostname,
        fqdn: Callable[[], str] = collectd_hostname,
    ) -> None:
        if naming not in ("sockscope", "collectd"):
            raise ValueError(f"unknown naming {naming!r}")
        if tags and naming != "sockscope":
            raise ValueError("tags need naming 'sockscope'")
        self.naming = naming
        self.tags = tags
        cache: dict[str, str] = {}

        def once(name: str, fn: Callable[[], str]) -> Callable[[], str]:
            return lambda: cache[name] if name in cache else cache.setdefault(name, fn())

        hostname, fqdn = once("hostname", hostname), once("fqdn", fqdn)
        # The host as resolved (dots kept): collectd paths, the host tag, the default prefix.
        self.host = expand_raw(host, hostname, fqdn)
        if naming == "collectd":
            # collectd: Prefix is glued to the host as written ("collectd." or ""); the
            # host has its dots escaped as write_graphite's EscapeCharacter "_" does.
            self._base = _UNSAFE_PREFIX.sub("_", expand_raw(prefix, hostname, fqdn)) + sanitize(self.host)
            self._host_tag = ""
        else:
            if prefix:
                parts = expand(prefix, hostname, fqdn)
            elif tags:
                parts = ["sockscope"]
            else:
                parts = ["sockscope", sanitize(self.host)]
            if any(p == "" for p in parts):
                raise ValueError(f"prefix {prefix!r} has an empty path component")
            self._base = ".".join(parts)
            self._host_tag = tag_value(self.host) if tags else ""
        # graphyte's line format: "<metric> <value> <int(round(timestamp))>\n", UTF-8.
        self._graphyte = graphyte.Sender(host=None, prefix=None)

    # -- series: (path or name;tags, value) -------------------------------------------------

    def series(self, status: PollStatus, stats: GraphiteStats | None = None,
               poll_interval: float | None = None) -> Iterator[tuple[str, object]]:
        """Every series of one push: the features' samples (status.samples), the poll
        loop's own series, the pusher's; each metric as its catalogue entry says
        (catalogue.GraphitePath), metrics without a Graphite path left out."""
        parts = [status.samples, selfmetrics.poll_samples(status, poll_interval)]
        own = stats_samples(stats)
        if own is not None:
            parts.append(own)
        for samples in parts:
            for metric, rows in samples:
                if metric.graphite is not None and rows:
                    yield from self._metric_series(metric, rows)

    def _metric_series(self, metric: Metric, rows) -> Iterator[tuple[str, object]]:
        g = metric.graphite
        if g is None:
            return
        if self.naming == "collectd":
            if g.collectd_total is not None:
                totals: dict[tuple[str, ...], float] = {}
                for labels, value in rows:
                    values = dict(zip(metric.labels, labels))
                    key = tuple(_format(c, values) for c in g.collectd_total)
                    totals[key] = totals.get(key, 0) + value
                for key, value in totals.items():
                    yield ".".join([self._base, *(sanitize(c) for c in key)]), _number(value)
            elif g.collectd is not None:
                for labels, value in rows:
                    if OTHER in labels:  # collectd has no such bucket
                        continue
                    values = dict(zip(metric.labels, labels))
                    yield ".".join([self._base, *(sanitize(_format(c, values)) for c in g.collectd)]), _number(value)
            else:
                path = g.sockscope if g.sockscope[0] == "sockscope" else ("sockscope", *g.sockscope)
                for labels, value in rows:
                    values = dict(zip(metric.labels, labels))
                    yield ".".join([self._base, *(sanitize(_format(c, values)) for c in path)]), _number(value)
            return
        own = g.sockscope[0] == "sockscope"  # sockscope's own series: a path even with tags
        for labels, value in rows:
            values = dict(zip(metric.labels, labels))
            if not self.tags:
                yield ".".join([self._base, *(sanitize(_format(c, values)) for c in g.sockscope)]), _number(value)
            elif own:
                own_path = ".".join(sanitize(_format(c, values)) for c in g.sockscope)
                yield f"{self._base}.{own_path};host={self._host_tag}", _number(value)
            else:
                suffix = "".join(f";{k}={tag_value(v)}" for k, v in zip(metric.labels, labels))
                yield f"{self._base}.{metric.tag_name}{suffix};host={self._host_tag}", _number(value)

    # -- lines ------------------------------------------------------------------------------

    def line(self, path: str, value, timestamp: int) -> bytes:
        """One validated line. Raises InvalidLine (bad value, too long)."""
        check_value(value)
        try:
            data = self._graphyte.build_message(path, value, timestamp)
        except (TypeError, ValueError) as exc:  # whitespace in the path
            raise InvalidLine(f"{path!r}: {exc}") from None
        if len(data) > MAX_LINE_BYTES:
            raise InvalidLine(f"line of {len(data)} bytes for {path[:80]!r}... exceeds carbon's {MAX_LINE_BYTES}")
        return data

    def render(self, status: PollStatus, timestamp: int, stats: GraphiteStats | None = None,
               poll_interval: float | None = None) -> Rendered:
        lines: list[bytes] = []
        invalid: list[str] = []
        for path, value in self.series(status, stats, poll_interval):
            try:
                lines.append(self.line(path, value, timestamp))
            except InvalidLine as exc:
                invalid.append(str(exc))
        return Rendered(lines, invalid)


def _format(component: str, labels: dict[str, str]) -> str:
    """A path template component with {label} (and {STATE}: collectd's state name) filled."""
    if "{" not in component:
        return component
    if "state" in labels:
        labels = {**labels, "STATE": COLLECTD_STATES.get(labels["state"], labels["state"])}
    return component.format(**labels)


def _number(value: float) -> int | float:
    """Counts and byte sums as integers (carbon stores floats either way; the line reads
    as it always did), other values as they are."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value

