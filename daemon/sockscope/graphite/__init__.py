"""Graphite push: every poll as plaintext lines `<path> <value> <timestamp>`, to carbon.

The only package that imports graphyte. graphyte builds the lines (`Sender.build_message`)
and is the send seam (`Sender.send_message`, overridden by `Transport` to keep one
connection); everything graphyte leaves out is here, one concern per module:

- `lines`: the catalogue's samples as lines per naming (sockscope paths, tags, collectd
  tcpconns), sanitising and validation; the pusher's own series (`METRICS`).
- `buffer`: the bounded buffer of lines not yet sent (drops the oldest, counted).
- `transport`: one persistent connection to carbon; what carbon's TCP acknowledged and
  the window it advertises (SIOCOUTQ, tcp_info).
- `pusher`: `Pusher` (render in the poller thread, deliver in its own thread, confirm,
  resend, hand over on reload), its counters (`GraphiteStats`), the default buffer size.

Delivery semantics: `pusher`'s docstring and docs/graphite.md.
"""

from .buffer import Chunk, Drops, LineBuffer, pack
from .lines import (
    COLLECTD_STATES,
    MAX_LINE_BYTES,
    METRICS,
    InvalidLine,
    LineBuilder,
    Rendered,
    check_value,
    collectd_hostname,
    sanitize,
    stats_samples,
    tag_value,
)
from .pusher import (
    MAX_DEFAULT_BUFFER_LINES,
    SELF_SERIES,
    SETTLE_AFTER,
    SOURCE_SERIES,
    GraphiteStats,
    Pusher,
    default_buffer_lines,
)
from .transport import TCP_CHUNK_BYTES, UDP_DATAGRAM_BYTES, Probe, Transport

__all__ = [
    "COLLECTD_STATES",
    "MAX_DEFAULT_BUFFER_LINES",
    "MAX_LINE_BYTES",
    "METRICS",
    "SELF_SERIES",
    "SETTLE_AFTER",
    "SOURCE_SERIES",
    "TCP_CHUNK_BYTES",
    "UDP_DATAGRAM_BYTES",
    "Chunk",
    "Drops",
    "GraphiteStats",
    "InvalidLine",
    "LineBuffer",
    "LineBuilder",
    "Probe",
    "Pusher",
    "Rendered",
    "Transport",
    "check_value",
    "collectd_hostname",
    "default_buffer_lines",
    "pack",
    "sanitize",
    "stats_samples",
    "tag_value",
]
