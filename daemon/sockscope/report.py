"""`sockscope snapshot` output: a JSON-able report of one Survey and its text rendering.

build_report() is the single source of truth (the `--json` output); render_text() only
formats that dict, so the two views never disagree. Which ports get a row is chosen here,
for a person rather than for Prometheus: local ports that listen or are configured, remote
ports that this host's clients connect to or that are configured, the `--top` N of each by
the `--sort` key, and everything else summed in an `other` row (so rows add up to the
totals). JSON types are fixed: `port` is always a number; the `other` rows are separate
`*_other` objects. Every state key is present (zeros included) so scripts can rely on them;
the text view hides zero states.

In watch mode each figure also carries its change since the previous frame and since the
first one (`since_last`, `since_start`), computed from the full Surveys, so a port that
just entered the top N still shows its true change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from .features.tcp_info import BUCKETS, LIMITS, PortInfo, PortTables
from .features.units import UnitTables
from .kernelstats import KernelStats
from .owners import Owner, PortOwners
from .snapshot import FAMILIES, STATES
from .states import COUNTED
from .survey import (
    ALL_STATES,
    CLOSE_WAIT_SLOT,
    QUEUE_FIELDS,
    SS_NAME,
    SS_STATES,
    PeerCounts,
    PortRows,
    Survey,
    peer_address,
)

DEFAULT_TOP = 10
# Listeners whose accept queue is at least this full are marked in the text view.
FILL_MARK_PERCENT = 80.0
FILL_MARK = "!"
NO_OWNERS_NOTE = "run as root to see processes"
MAX_CLOSE_WAIT_OWNERS = 5  # per port, in the text view; the rest are summed on one row
MAX_PIDS = 3  # pids shown per process group
MAX_GROUPS = 2  # process groups shown per port row
# --sort keys besides the ss state names (most first; `port` ascending).
STATE_OPTIONS = tuple(SS_NAME[s] for s in STATES)
SORT_KEYS = ("sockets", "port", "recv-q", "send-q", *STATE_OPTIONS)
_SORT_STATE = {SS_NAME[s]: i for i, s in enumerate(STATES)}

# `ss` spellings, for the text view.
STATE_LABELS = {s.label: s.shown for s in COUNTED}
# States with their own column in the port tables; the others share one compact column.
PORT_COLUMNS = ("established", "close_wait", "time_wait")
# Kernel counters on the watch-mode line: (KernelStats.counters stem, label).
KERNEL_LINE = (
    ("listen_overflows", "listen overflows"),
    ("listen_drops", "listen drops"),
    ("out_resets", "resets sent"),
    ("estab_resets", "established resets"),
    ("retransmitted_segments", "retransmitted segments"),
)


@dataclass(frozen=True, slots=True)
class View:
    """What the person asked to see."""

    top: int = DEFAULT_TOP
    sort: str = "sockets"
    local: tuple[int, ...] = ()  # configured ports.local: always candidates for a row
    remote: tuple[int, ...] = ()  # configured ports.remote
    netns: str | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """One reading: the Survey, the owners of its shown ports (None: not collected) and
    the kernel counters (None: not read)."""

    survey: Survey
    owners: PortOwners | None = None
    kernel: KernelStats | None = None


# --- choosing rows ---------------------------------------------------------------------


def _sort_values(rows: PortRows, ports: np.ndarray, key: str) -> np.ndarray:
    counts, queues = rows.rows(ports.tolist())
    if key == "sockets":
        return counts.sum(axis=1)
    if key == "recv-q":
        return queues[:, 0]
    if key == "send-q":
        return queues[:, 1]
    return counts[:, _SORT_STATE[key]]


def _ranked(rows: PortRows, candidates: set[int], view: View) -> list[int]:
    ports = np.array(sorted(candidates), np.int64)
    if not len(ports):
        return []
    if view.sort == "port":
        return ports[:view.top].tolist()
    value = _sort_values(rows, ports, view.sort)
    order = np.lexsort((ports, -value))  # most first, then by port
    return ports[order][:view.top].tolist()


def choose_ports(survey: Survey, view: View) -> tuple[list[int], list[int]]:
    """(local ports, remote ports) that get a row, in display order.

    Local: listening and configured ports (client sockets' ephemeral local ports are noise
    for a person); remote: configured ports and those of client-side sockets (whose local
    port does not listen), i.e. the services this host talks to. A `--port` asked for is a
    candidate on each side where it has sockets. Only configured ports get a row without
    sockets, and only when no port filter narrows the view.
    """
    asked = set(survey.filter.ports)
    local_present = set(survey.local.ports.tolist())
    local = (set(survey.listening) | asked) & local_present
    remote = set(survey.remote.ports[survey.remote_client > 0].tolist())
    remote |= asked & set(survey.remote.ports.tolist())
    if asked:
        local |= set(view.local) & local_present
        remote |= set(view.remote) & set(survey.remote.ports.tolist())
    else:
        local |= set(view.local)
        remote |= set(view.remote)
    return _ranked(survey.local, local, view), _ranked(survey.remote, remote, view)


# --- build_report ----------------------------------------------------------------------


def _iso_utc(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fill_percent(queue_length: int, queue_limit: int) -> float:
    """Accept-queue fill, 0..100+ (the kernel accepts limit+1 before dropping)."""
    if queue_limit <= 0:
        return 100.0 if queue_length > 0 else 0.0
    return round(100.0 * queue_length / queue_limit, 1)


def _owner_dict(owner: Owner) -> dict:
    return {"pid": owner.pid, "name": owner.name, "user": owner.user}


def _figures(counts: np.ndarray, queues: np.ndarray) -> dict:
    return {
        "total": int(counts.sum()),
        "states": dict(zip(STATES, counts.tolist())),
        "queues": dict(zip(QUEUE_FIELDS, queues.tolist())),
    }


def _minus(now: dict, then: dict) -> dict:
    """now - then over the numbers of two figure dicts of the same shape. Maxima are not
    differences of anything; they are left out."""
    out = {}
    for k, v in now.items():
        if isinstance(v, dict):
            out[k] = _minus(v, then[k])
        elif k not in ("receive_max_bytes", "send_max_bytes"):
            out[k] = v - then[k]
    return out


def _side(rows: PortRows, shown: list[int], owners: dict | None,
          before: dict[str, PortRows]) -> tuple[list[dict], dict]:
    counts, queues = rows.rows(shown)
    out = []
    for i, port in enumerate(shown):
        row = {"port": port, **_figures(counts[i], queues[i]), "owners": None}
        if owners is not None:
            row["owners"] = [_owner_dict(o) | {"sockets": n} for o, n in owners.get(port, ())]
        out.append(row)
    rest_counts, rest_queues, n_ports = rows.rest(shown)
    other = {"ports": n_ports, **_figures(rest_counts, rest_queues)}
    for when, old in before.items():
        old_counts, old_queues = old.rows(shown)
        for i, row in enumerate(out):
            row[when] = _minus(_figures(counts[i], queues[i]), _figures(old_counts[i], old_queues[i]))
        old_rest = old.rest(shown)
        other[when] = _minus(_figures(rest_counts, rest_queues), _figures(old_rest[0], old_rest[1]))
    return out, other


def bucket_quantile(hist, q: float) -> str | None:
    """The `le` (BUCKETS) of the RTT bucket holding the q-quantile of `hist` (sockets per
    bucket, not cumulative): the bucket of the ceil(q*n)-th smallest RTT, so the quantile is
    known to bucket resolution only (<= that bound, above the one before). None: no sockets."""
    cum = np.cumsum(np.asarray(hist, np.int64))
    if not len(cum) or not cum[-1]:
        return None
    return BUCKETS[int(np.searchsorted(cum, q * cum[-1], side="left"))]


def _ms_seconds(ms) -> float:
    return round(int(ms) / 1000, 3)


def _info_figures(waits, hist, rtt, busy, *, local: bool, interval: float | None) -> dict:
    """The tcp_info part of a port row (JSON). Waits are per local port only (a remote
    port's row has them null); busy is the growth over `interval`, null without one."""
    w = [_ms_seconds(v) if local else None for v in waits]
    return {
        "oldest_unaccepted_seconds": w[0],
        "oldest_unread_seconds": w[1],
        "oldest_close_wait_seconds": w[2],
        "rtt_sockets": int(np.sum(hist)),
        "rtt_sum_seconds": round(int(rtt) / 1e6, 6),
        "rtt_buckets": dict(zip(BUCKETS, np.cumsum(hist).tolist())),
        "rtt_p50_le": bucket_quantile(hist, 0.5),
        "rtt_p90_le": bucket_quantile(hist, 0.9),
        "busy_seconds": None if interval is None
        else {lim: round(int(v) / 1e3, 3) for lim, v in zip(LIMITS, busy)},
    }


def _info_side(table: PortInfo, rows: list[dict], other: dict, *, local: bool,
               interval: float | None) -> None:
    shown = [row["port"] for row in rows]
    for row, *figures in zip(rows, *table.rows(shown)):
        row["tcp_info"] = _info_figures(*figures, local=local, interval=interval)
    other["tcp_info"] = _info_figures(*table.rest(shown), local=local, interval=interval)


def _peers(peers: PeerCounts, top: int, before: dict[str, PeerCounts]) -> tuple[list[dict], dict]:
    rows = []
    shown = 0
    for key, n in peers.top(top):
        family, address = peer_address(key)
        row = {"family": family, "address": address, "sockets": n}
        for when, old in before.items():
            row[when] = {"sockets": n - old.count(key)}
        rows.append(row)
        shown += n
    other = {"peers": len(peers.counts) - len(rows), "sockets": peers.total - shown}
    return rows, other


def _listeners(survey: Survey, owners: PortOwners | None,
                before: dict[str, Survey]) -> list[dict]:
    """Every listener, in port order: not cut by --top (they are already bounded by
    listeners.max_tracked, and a full accept queue is what a person must not miss)."""
    family_rank = {f: i for i, f in enumerate(FAMILIES)}
    out = []
    for lst in sorted(survey.listeners,
                      key=lambda ln: (ln.port, family_rank.get(ln.family, 9), ln.address)):
        entry = {
            "family": lst.family,
            "address": lst.address,
            "port": lst.port,
            "queue_length": lst.queue_length,
            "queue_limit": lst.queue_limit,
            "fill_percent": fill_percent(lst.queue_length, lst.queue_limit),
            "members": lst.members,
            "owners": None,
        }
        if owners is not None:
            found = owners.listeners.get((lst.address, lst.port), ())
            entry["owners"] = [_owner_dict(o) for o in found]
        for when, old in before.items():
            then = next((o.queue_length for o in old.listeners
                         if (o.family, o.address, o.port) == (lst.family, lst.address, lst.port)), 0)
            entry[when] = {"queue_length": lst.queue_length - then}
        out.append(entry)
    return out


def _close_wait_units(survey: Survey, units: UnitTables, top: int) -> tuple[list[dict], dict]:
    """Local ports with CLOSE-WAIT sockets, most first (the top N), with the units holding
    them (a socket's unit: the cgroup of the process that created it, the listener's for an
    accepted one)."""
    ports = sorted(units.close_wait, key=lambda p: (-sum(n for _, n in units.close_wait[p]), p))
    out = [{"port": p, "units": [{"unit": u, "sockets": n} for u, n in units.close_wait[p]]}
           for p in ports[:top]]
    rest = ports[top:]
    return out, {"ports": len(rest), "sockets": sum(n for p in rest for _, n in units.close_wait[p])}


def _close_wait_owners(survey: Survey, owners: PortOwners, top: int) -> tuple[list[dict], dict]:
    """Local ports with CLOSE-WAIT sockets, most first, with their holders."""
    rows = survey.local
    cw = rows.counts[:, CLOSE_WAIT_SLOT]
    has = np.flatnonzero(cw)
    order = has[np.lexsort((rows.ports[has], -cw[has]))]
    out = []
    for i in order[:top].tolist():
        port, n = int(rows.ports[i]), int(cw[i])
        out.append({
            "port": port,
            "owners": [_owner_dict(o) | {"sockets": k} for o, k in owners.close_wait.get(port, ())],
            "unowned": n - owners.close_wait_owned.get(port, 0),
        })
    rest = order[top:]
    return out, {"ports": len(rest), "sockets": int(cw[rest].sum())}


def build_report(frame: Frame, view: View = View(), *, last: Frame | None = None,
                 start: Frame | None = None, frame_number: int | None = None,
                 interval: float | None = None) -> dict:
    """Everything `sockscope snapshot` shows, as plain JSON types (json.dumps-able).

    Owner fields are None when owners were not collected; when the scan was incomplete
    they hold what was found and `owners.complete` is False. With `last`/`start` (watch
    mode) every figure gets its change since those frames.
    """
    survey, owners = frame.survey, frame.owners
    before = {k: f for k, f in (("since_last", last), ("since_start", start)) if f is not None}
    families = list(survey.families)
    by_family = {
        fam: {state: survey.states.get((fam, state), 0) for state in STATES} for fam in families
    }
    totals = dict(zip(STATES, survey.totals().tolist()))
    local_ports, remote_ports = choose_ports(survey, view)
    local, local_other = _side(survey.local, local_ports,
                               owners.local if owners else None,
                               {k: f.survey.local for k, f in before.items()})
    remote, remote_other = _side(survey.remote, remote_ports,
                                 owners.remote if owners else None,
                                 {k: f.survey.remote for k, f in before.items()})
    listeners = _listeners(survey, owners, {k: f.survey for k, f in before.items()})
    cw_peers, cw_peers_other = _peers(survey.close_wait_peers, view.top,
                                      {k: f.survey.close_wait_peers for k, f in before.items()})
    tw_peers, tw_peers_other = _peers(survey.time_wait_peers, view.top,
                                      {k: f.survey.time_wait_peers for k, f in before.items()})
    cw_owners: list[dict] = []
    cw_owners_other = {"ports": 0, "sockets": 0}
    if owners is not None:
        cw_owners, cw_owners_other = _close_wait_owners(survey, owners, view.top)
    kernel = None
    if frame.kernel is not None:
        kernel = dict(frame.kernel.counters)
    info: PortTables | None = survey.results.get("tcp_info")
    if info is not None:
        _info_side(info.local, local, local_other, local=True, interval=info.interval)
        _info_side(info.remote, remote, remote_other, local=False, interval=info.interval)
    units: UnitTables | None = survey.results.get("units")
    if units is not None:
        for entry in listeners:
            entry["units"] = list(units.listeners.get((entry["address"], entry["port"]), ()))

    report = {
        "timestamp": _iso_utc(survey.timestamp),
        "poll_duration_seconds": round(survey.duration, 6),
        "netns": view.netns,
        "families": families,
        "filter": {
            "ports": sorted(survey.filter.ports),
            "states": [] if survey.filter.states == ALL_STATES
            else [name for name, bits in SS_STATES.items() if bits & survey.filter.states],
        },
        "sockets": survey.sockets,
        "totals": totals,
        "totals_by_family": by_family,
        "local_ports": local,
        "local_ports_other": local_other,
        "remote_ports": remote,
        "remote_ports_other": remote_other,
        "listeners": listeners,
        "close_wait_peers": cw_peers,
        "close_wait_peers_other": cw_peers_other,
        "time_wait_peers": tw_peers,
        "time_wait_peers_other": tw_peers_other,
        "close_wait_owners": cw_owners,
        "close_wait_owners_other": cw_owners_other,
        "kernel_counters": kernel,
        "folded": {"listeners": survey.folded_listeners},
        "dump_interrupted": survey.dump_interrupted,
        "owners": {
            "collected": owners is not None,
            "complete": bool(owners is not None and owners.complete),
            "note": owners.note if owners is not None else None,
            # When the processes were read: earlier than the table in watch mode on a host
            # where a /proc scan is slow (it is then repeated less often than frames).
            "scanned_at": _iso_utc(owners.scanned_at)
            if owners is not None and owners.scanned_at is not None else None,
        },
    }
    if units is not None:  # only with units.enabled, like tcp_info below
        report["close_wait_units"], report["close_wait_units_other"] = _close_wait_units(survey, units, view.top)
    if info is not None:  # only then: without tcp_info the report is what it always was
        report["tcp_info"] = {"busy_interval_seconds": None if info.interval is None
                              else round(info.interval, 3)}
    if frame_number is not None:
        report["frame"] = {"number": frame_number, "interval_seconds": interval,
                           "started": _iso_utc(start.survey.timestamp) if start else None}
    for when, old in before.items():
        old_totals = dict(zip(STATES, old.survey.totals().tolist()))
        report[when] = {
            "sockets": survey.sockets - old.survey.sockets,
            "totals": _minus(totals, old_totals),
            "kernel_counters": None if kernel is None or old.kernel is None else {
                k: v - old.kernel.counters[k] for k, v in kernel.items() if k in old.kernel.counters
            },
        }
    return report


# --- render_text -----------------------------------------------------------------------

# SGR codes of the styles the text view uses.
_SGR = {"bold": "1", "dim": "2", "alert": "1;31", "up": "33", "down": "36", "title": "1;4"}


def format_bytes(n: int) -> str:
    """Byte count with its unit: 0 B, 512 B, 1.5 KiB, 12 KiB, 3.0 MiB (powers of 1024)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{sign}{value:.1f} {unit}" if value < 10 else f"{sign}{value:.0f} {unit}"
    raise AssertionError("unreachable")


def endpoint(family: str, address: str, port: int) -> str:
    """address:port, IPv6 in brackets."""
    return f"[{address}]:{port}" if family == "ipv6" else f"{address}:{port}"


class _Cell:
    """Text of a table cell as (text, style) segments; width counts the text only."""

    __slots__ = ("parts",)

    def __init__(self, *parts: tuple[str, str | None]):
        self.parts = [p for p in parts if p[0]]

    def __len__(self) -> int:
        return sum(len(t) for t, _ in self.parts)

    def plain(self) -> str:
        return "".join(t for t, _ in self.parts)

    def paint(self, colour: bool) -> str:
        if not colour:
            return self.plain()
        return "".join(f"\x1b[{_SGR[s]}m{t}\x1b[0m" if s else t for t, s in self.parts)


def _cell(value, style: str | None = None) -> _Cell:
    return value if isinstance(value, _Cell) else _Cell((str(value), style))


def _signed(d: int, fmt=str) -> str:
    return ("+" if d >= 0 else "-") + fmt(abs(d))


def _changes(d_last, d_start, fmt=str) -> list[tuple[str, str | None]]:
    """` +1/+5` (since last frame / since start), coloured by direction; nothing when
    both are zero or unknown."""
    if d_last is None or (not d_last and not d_start):
        return []
    style = lambda d: "up" if d > 0 else "down" if d < 0 else "dim"  # noqa: E731
    return [(" ", None), (_signed(d_last, fmt), style(d_last)), ("/", "dim"),
            (_signed(d_start, fmt), style(d_start))]


def _figure(value: int, d_last=None, d_start=None, fmt=str, style=None) -> _Cell:
    return _Cell((fmt(value), style), *_changes(d_last, d_start, fmt))


def _table(headers: list[str], rows: list[list], align: str, colour: bool) -> list[str]:
    """Aligned lines; align has one 'l' or 'r' per column; two spaces between columns."""
    header_cells = [_Cell((h, "bold")) for h in headers]
    body = [[_cell(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header_cells)]
    lines = []
    for cells in [header_cells, *body]:
        parts = []
        for c, w, a in zip(cells, widths, align):
            pad = " " * (w - len(c))
            parts.append(pad + c.paint(colour) if a == "r" else c.paint(colour) + pad)
        lines.append("  ".join(parts).rstrip())
    return lines


def _process_groups(owners: list[dict] | None, max_groups: int | None = None) -> str:
    """name[pid,pid,+N] user; ... grouping processes with the same name and user, the
    groups holding the most sockets first."""
    if not owners:
        return "-"
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for o in owners:
        groups.setdefault((o["name"], o["user"]), []).append((o["pid"], o.get("sockets", 0)))
    ordered = sorted(groups.items(),
                     key=lambda g: (-sum(n for _, n in g[1]), min(p for p, _ in g[1]), g[0]))
    parts = []
    for (name, user), members in ordered[:max_groups]:
        pids = sorted(p for p, _ in members)
        shown = ",".join(str(p) for p in pids[:MAX_PIDS])
        if len(pids) > MAX_PIDS:
            shown += f",+{len(pids) - MAX_PIDS}"
        parts.append(f"{name}[{shown}] {user}")
    if max_groups is not None and len(ordered) > max_groups:
        parts.append(f"+{len(ordered) - max_groups} more")
    return "; ".join(parts)


def _delta(row: dict, when: str, *path: str):
    d = row.get(when)
    for key in path:
        if d is None:
            return None
        d = d.get(key)
    return d


def format_age(seconds: float | None) -> str:
    """A wait for a person: 350ms, 2.0s, 12m05s, 3h12m; `-` for 0 (none, or under 1 ms)."""
    if not seconds:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def format_le(le: str | None) -> str:
    """An RTT bucket bound for a person: <=50us, <=2.5ms, <=1s, >5s (+Inf); `-`: none."""
    if le is None:
        return "-"
    if le == "+Inf":
        return f">{format_le(BUCKETS[-2])[2:]}"
    v = float(le)
    text = f"{v * 1e6:g}us" if v < 1e-3 else f"{v * 1e3:g}ms" if v < 1 else f"{v:g}s"
    return "<=" + text


def format_busy_split(busy: dict | None) -> str:
    """Shares of busy time per LIMITS, in percent: `2/97/1%`; `-` when not busy."""
    total = sum(busy.values()) if busy else 0
    if not busy or not total:
        return "-"
    return "/".join(f"{100 * busy[lim] / total:.0f}" for lim in LIMITS) + "%"


# tcp_info columns of the port tables: (header, local only, cell of a row's tcp_info dict).
INFO_COLUMNS = (
    ("UNACCEPTED", True, lambda t: format_age(t["oldest_unaccepted_seconds"])),
    ("UNREAD", True, lambda t: format_age(t["oldest_unread_seconds"])),
    ("CLOSE-WAIT AGE", True, lambda t: format_age(t["oldest_close_wait_seconds"])),
    ("RTT P50", False, lambda t: format_le(t["rtt_p50_le"])),
    ("RTT P90", False, lambda t: format_le(t["rtt_p90_le"])),
)
BUSY_COLUMNS = (
    ("BUSY", lambda b: f"{sum(b.values()):.2f}s" if sum(b.values()) else "-"),
    ("NET/RCV/SNDBUF", format_busy_split),
)


def _port_rows(title: str, rows: list[dict], other: dict, columns: tuple[str, ...],
               show_owners: bool, colour: bool, *, local: bool = True) -> list[str]:
    headers = ["PORT", "SOCKETS", *(STATE_LABELS[s] for s in columns), "OTHER STATES",
               "RECV-Q", "SEND-Q", "BACKLOGGED(R/S)"]
    align = "rr" + "r" * len(columns) + "lrrr"
    info_columns: list[tuple[str, object]] = []
    if "tcp_info" in other:
        info_columns = [(h, cell) for h, local_only, cell in INFO_COLUMNS if local or not local_only]
        if other["tcp_info"]["busy_seconds"] is not None:
            info_columns += [(h, lambda t, f=f: f(t["busy_seconds"])) for h, f in BUSY_COLUMNS]
        headers += [h for h, _ in info_columns]
        align += "r" * len(info_columns)
    if show_owners:
        headers.append("PROCESS")
        align += "l"
    body = []
    for row in [*rows, other]:
        is_other = row is other
        if is_other and not row["total"] and not _delta(row, "since_start", "total"):
            continue
        states, q = row["states"], row["queues"]

        # called only within this iteration: the late binding of `row` is the one wanted
        def fig(value, *path, fmt=str, style=None):
            return _figure(value, _delta(row, "since_last", *path),  # noqa: B023
                           _delta(row, "since_start", *path), fmt, style)  # noqa: B023

        other_states = _Cell()
        for s, n in states.items():
            if s in columns or not (n or _delta(row, "since_start", "states", s)):
                continue
            if other_states.parts:
                other_states.parts.append((" ", None))
            other_states.parts += [(f"{STATE_LABELS[s]}:{n}", None),
                                   *_changes(_delta(row, "since_last", "states", s),
                                             _delta(row, "since_start", "states", s))]
        cells = [
            _cell("other" if is_other else str(row["port"]), "dim" if is_other else None),
            fig(row["total"], "total"),
            *(fig(states[s], "states", s) for s in columns),
            other_states if len(other_states) else _cell("-"),
            fig(q["receive_bytes"], "queues", "receive_bytes", fmt=format_bytes),
            fig(q["send_bytes"], "queues", "send_bytes", fmt=format_bytes),
            f"{q['receive_backlogged']}/{q['send_backlogged']}",
            *(cell(row["tcp_info"]) for _, cell in info_columns),  # type: ignore[operator]
        ]
        if show_owners:
            cells.append("" if is_other else _process_groups(row["owners"], MAX_GROUPS))
        body.append(cells)
    if not body:
        return [f"{title}: none"]
    return [_title(title, colour), *_table(headers, body, align, colour)]


def _title(text: str, colour: bool) -> str:
    return _Cell((text, "bold")).paint(colour)


def _peer_table(title: str, rows: list[dict], other: dict, colour: bool) -> list[str]:
    if not rows:
        return [f"{title}: none"]
    body = []
    for row in rows:
        body.append([row["address"], _figure(row["sockets"], _delta(row, "since_last", "sockets"),
                                             _delta(row, "since_start", "sockets"))])
    if other["peers"]:
        body.append([_cell(f"({other['peers']} more peers)", "dim"), str(other["sockets"])])
    return [_title(title, colour), *_table(["PEER", "SOCKETS"], body, "lr", colour)]


def _kernel_line(report: dict, colour: bool) -> str | None:
    counters = report.get("kernel_counters")
    last, start = report.get("since_last"), report.get("since_start")
    if counters is None or last is None or start is None:
        return None
    d_last, d_start = last.get("kernel_counters") or {}, start.get("kernel_counters") or {}
    parts = []
    for stem, label in KERNEL_LINE:
        if stem not in counters or stem not in d_last or stem not in d_start:
            continue
        a, b = d_last[stem], d_start[stem]
        cell = _Cell((f"{label} ", None), (_signed(a), "up" if a > 0 else None), ("/", "dim"),
                     (_signed(b), "up" if b > 0 else None))
        parts.append(cell.paint(colour))
    if not parts:
        return None
    return "kernel: " + "  ".join(parts)


def render_text(report: dict, *, colour: bool = False) -> str:
    """A compact, aligned summary for a terminal. Deterministic for a given report.
    `colour` adds ANSI SGR codes (the caller decides: a terminal, and no NO_COLOR)."""
    out: list[str] = []
    owner_state = report["owners"]
    # Owners found are shown even when the scan was incomplete (they are facts, not
    # guesses); the note then says what could not be seen.
    show_owners = owner_state["collected"]
    if not owner_state["collected"]:
        owner_note = NO_OWNERS_NOTE
    elif not owner_state["complete"]:
        owner_note = owner_state["note"] or "process scan incomplete"
    else:
        owner_note = None
    last, start = report.get("since_last"), report.get("since_start")
    watching = last is not None and start is not None
    scanned = owner_state.get("scanned_at")
    if show_owners and scanned and scanned < report["timestamp"]:
        owner_note = (f"{owner_note}; " if owner_note else "") + \
            f"processes as of {scanned} (a slow /proc scan is repeated less often than frames)"

    head = _Cell(("sockscope snapshot", "bold"), (f"  {report['timestamp']}  sockets ", None),
                 *_figure(report["sockets"], last and last["sockets"], start and start["sockets"]).parts,
                 (f"  poll {report['poll_duration_seconds'] * 1000:.1f} ms"
                  f"  families {','.join(report['families']) or '-'}", None))
    if report.get("netns"):
        head.parts.append((f"  netns {report['netns']}", None))
    out.append(head.paint(colour))
    if watching:
        frame = report.get("frame")
        if frame:
            out.append(_Cell((f"every {frame['interval_seconds']:g}s, frame {frame['number']}; "
                              "changes shown as +since last frame/+since start "
                              f"({frame['started']})", "dim")).paint(colour))
        line = _kernel_line(report, colour)
        if line:
            out.append(line)
    flt = report["filter"]
    if flt["ports"] or flt["states"]:
        what = []
        if flt["ports"]:
            what.append("port " + ",".join(map(str, flt["ports"])))
        if flt["states"]:
            what.append("state " + ",".join(flt["states"]))
        out.append("filter: " + "; ".join(what))
    if report["dump_interrupted"]:
        out.append(_Cell((f"warning: {report['dump_interrupted']} dump(s) changed while being "
                          "read; counts may be slightly inconsistent", "alert")).paint(colour))
    if report["folded"]["listeners"]:
        out.append(f"listeners not tracked (listeners.max_tracked): {report['folded']['listeners']}")

    # TOTALS: one column per non-zero state, a row for all families and one per family.
    out.append("")
    shown = [s for s in STATES if report["totals"][s] or (start and start["totals"][s])]
    if not shown:
        out.append("TOTALS  no sockets")
    else:
        rows = [["all", *(_figure(report["totals"][s], last and last["totals"][s],
                                  start and start["totals"][s]) for s in shown)]]
        if len(report["families"]) > 1:
            for fam in report["families"]:
                counts = report["totals_by_family"][fam]
                rows.append([fam, *(str(counts[s]) for s in shown)])
        out += _table(["TOTALS", *(STATE_LABELS[s] for s in shown)], rows,
                      "l" + "r" * len(shown), colour)

    states_asked = set(flt["states"])
    columns = tuple(s for s in PORT_COLUMNS if not states_asked or SS_NAME[s] in states_asked)
    info = report.get("tcp_info")
    if info is not None:
        interval = info["busy_interval_seconds"]
        out.append("")
        out.append("tcp_info: waits are the oldest per port (- none); RTT P50/P90 are bucket "
                   "bounds (the bucket holding the quantile); " +
                   (f"BUSY is the sockets' busy time in the last {interval:g}s, split "
                    "network/receiver/send_buffer" if interval is not None
                    else "no busy split (one dump: --busy-interval 0)"))
    for title, key in (("LOCAL PORTS", "local_ports"), ("REMOTE PORTS", "remote_ports")):
        out.append("")
        out += _port_rows(title, report[key], report[key + "_other"], columns, show_owners, colour,
                          local=key == "local_ports")

    out.append("")
    if report["listeners"]:
        out.append(_title(f"LISTENERS  ({FILL_MARK} = accept queue >= {FILL_MARK_PERCENT:.0f}% full)",
                          colour))
        headers = ["", "ADDRESS:PORT", "QUEUE", "FILL", "MEMBERS"]
        align = "llrrr"
        with_units = "units" in report["listeners"][0]
        if with_units:
            headers.append("UNIT")
            align += "l"
        if show_owners:
            headers.append("PROCESS")
            align += "l"
        rows = []
        for lst in report["listeners"]:
            full = lst["fill_percent"] >= FILL_MARK_PERCENT
            row = [
                _cell(FILL_MARK if full else "", "alert"),
                endpoint(lst["family"], lst["address"], lst["port"]),
                _Cell((f"{lst['queue_length']}/{lst['queue_limit']}", "alert" if full else None),
                      *_changes(_delta(lst, "since_last", "queue_length"),
                                _delta(lst, "since_start", "queue_length"))),
                _cell(f"{lst['fill_percent']:.0f}%", "alert" if full else None),
                str(lst["members"]),
            ]
            if with_units:
                row.append(",".join(lst["units"]) or "-")
            if show_owners:
                row.append(_process_groups(lst["owners"]))
            rows.append(row)
        out += _table(headers, rows, align, colour)
    else:
        out.append("LISTENERS: none")

    for title, key in (("CLOSE-WAIT BY PEER", "close_wait_peers"),
                       ("TIME-WAIT BY PEER", "time_wait_peers")):
        out.append("")
        out += _peer_table(title, report[key], report[key + "_other"], colour)
    if "close_wait_units" in report:
        out.append("")
        if not report["close_wait_units"]:
            out.append("CLOSE-WAIT BY UNIT: none")
        else:
            out.append(_title("CLOSE-WAIT BY UNIT", colour))
            rows = [[str(entry["port"]), u["unit"], str(u["sockets"])]
                    for entry in report["close_wait_units"] for u in entry["units"]]
            other = report["close_wait_units_other"]
            if other["ports"]:
                rows.append([_cell("other", "dim"), f"({other['ports']} more ports)", str(other["sockets"])])
            out += _table(["PORT", "UNIT", "SOCKETS"], rows, "rlr", colour)

    out.append("")
    if owner_note:
        out.append(f"owners: {owner_note}")
    if not show_owners:
        pass
    elif not report["close_wait_owners"]:
        out.append("CLOSE-WAIT OWNERS: none")
    else:
        out.append(_title("CLOSE-WAIT OWNERS", colour))
        rows = []
        for entry in report["close_wait_owners"]:
            port = str(entry["port"])
            owners = entry["owners"]
            for o in owners[:MAX_CLOSE_WAIT_OWNERS]:
                rows.append([port, f"{o['pid']}/{o['name']}/{o['user']}", str(o["sockets"])])
            rest = owners[MAX_CLOSE_WAIT_OWNERS:]
            if rest:
                rows.append(
                    [port, f"({len(rest)} more processes)", str(sum(o["sockets"] for o in rest))]
                )
            if entry["unowned"]:
                unowned = "(no process: not accepted or not visible)"
                rows.append([port, unowned, str(entry["unowned"])])
        other = report["close_wait_owners_other"]
        if other["ports"]:
            rows.append([_cell("other", "dim"), f"({other['ports']} more ports)", str(other["sockets"])])
        out += _table(["PORT", "PROCESS (PID/NAME/USER)", "SOCKETS"], rows, "rlr", colour)
    return "\n".join(out) + "\n"
