"""`sockscope snapshot` output: a JSON-able report of one Snapshot and its text rendering.

build_report() is the single source of truth (the `--json` output); render_text() only
formats that dict, so the two views never disagree. JSON keeps every state key (zeros
included) so scripts can rely on them; the text view hides zero states.
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime, timezone

from sockscope.owners import Owner, OwnerInfo
from sockscope.snapshot import FAMILIES, OTHER, STATES, PortTable, QueueStats, Snapshot

# Listeners whose accept queue is at least this full are marked in the text view.
FILL_MARK_PERCENT = 80.0
FILL_MARK = "!"
NO_OWNERS_NOTE = "run as root to see processes"
MAX_CLOSE_WAIT_OWNERS = 5  # per port, in the text view; the rest are summed on one row
MAX_PIDS = 3  # pids shown per process group in the LISTENERS table

# `ss` spellings, for the text view.
STATE_LABELS = {
    "established": "ESTAB",
    "syn_sent": "SYN-SENT",
    "syn_recv": "SYN-RECV",
    "fin_wait1": "FIN-WAIT-1",
    "fin_wait2": "FIN-WAIT-2",
    "time_wait": "TIME-WAIT",
    "close": "CLOSE",
    "close_wait": "CLOSE-WAIT",
    "last_ack": "LAST-ACK",
    "listen": "LISTEN",
    "closing": "CLOSING",
}
# States with their own column in the port tables; the others share one compact column.
PORT_COLUMNS = ("established", "close_wait", "time_wait")
_QUEUE_FIELDS = tuple(f.name for f in fields(QueueStats))


# --- build_report -------------------------------------------------------------------


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


def _ports(table: PortTable) -> list[dict]:
    out = []
    for port, counts, queues in zip(table.ports, table.counts, table.queues):
        out.append(
            {
                "port": port,
                "total": sum(counts),
                "states": dict(zip(STATES, counts)),
                "queues": {name: getattr(queues, name) for name in _QUEUE_FIELDS},
            }
        )
    return out


def _port_order(port: int | str) -> tuple[int, int]:
    return (1, 0) if port == OTHER else (0, int(port))


def build_report(snapshot: Snapshot, owners: OwnerInfo | None) -> dict:
    """Everything `sockscope snapshot` shows, as plain JSON types (json.dumps-able).

    Owner fields are None when `owners` is None (not collected); when the scan was
    incomplete they hold what was found and `owners.complete` is False.
    """
    families = list(snapshot.families)
    by_family = {
        fam: {state: snapshot.states.get((fam, state), 0) for state in STATES} for fam in families
    }
    totals = dict.fromkeys(STATES, 0)  # over every key, so it always sums to snapshot.sockets
    for (_fam, state), n in snapshot.states.items():
        totals[state] = totals.get(state, 0) + n

    listeners = []
    family_rank = {f: i for i, f in enumerate(FAMILIES)}
    for lst in sorted(
        snapshot.listeners,
        key=lambda l: (l.port, family_rank.get(l.family, len(FAMILIES)), l.address),
    ):
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
        listeners.append(entry)

    close_wait = []
    if owners is not None:
        for port in sorted(set(owners.close_wait) | set(owners.unowned), key=_port_order):
            close_wait.append(
                {
                    "port": port,
                    "owners": [
                        _owner_dict(o) | {"sockets": n} for o, n in owners.close_wait.get(port, ())
                    ],
                    "unowned": owners.unowned.get(port, 0),
                }
            )

    return {
        "timestamp": _iso_utc(snapshot.timestamp),
        "poll_duration_seconds": round(snapshot.duration, 6),
        "families": families,
        "sockets": snapshot.sockets,
        "totals": totals,
        "totals_by_family": by_family,
        "local_ports": _ports(snapshot.local),
        "remote_ports": _ports(snapshot.remote),
        "listeners": listeners,
        "close_wait_owners": close_wait,
        "folded": {
            "local_ports": snapshot.local.folded,
            "remote_ports": snapshot.remote.folded,
            "listeners": snapshot.folded_listeners,
        },
        "dump_interrupted": snapshot.dump_interrupted,
        "owners": {
            "collected": owners is not None,
            "complete": bool(owners is not None and owners.complete),
            "note": owners.note if owners is not None else None,
        },
    }


# --- render_text --------------------------------------------------------------------


def format_bytes(n: int) -> str:
    """Compact byte count: 0, 512B, 1.5K, 12K, 3.0M (powers of 1024)."""
    if n == 0:
        return "0"
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in "KMGTP":
        value /= 1024
        if value < 1024 or unit == "P":
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    raise AssertionError("unreachable")


def endpoint(family: str, address: str, port: int) -> str:
    """address:port, IPv6 in brackets."""
    return f"[{address}]:{port}" if family == "ipv6" else f"{address}:{port}"


def _table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Aligned lines; align has one 'l' or 'r' per column; two spaces between columns."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = []
    for cells in [headers, *rows]:
        parts = [
            c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


def _process_groups(owners: list[dict]) -> str:
    """name[pid,pid,+N] user; ...  grouping processes with the same name and user."""
    if not owners:
        return "-"
    groups: dict[tuple[str, str], list[int]] = {}
    for o in owners:
        groups.setdefault((o["name"], o["user"]), []).append(o["pid"])
    parts = []
    for (name, user), pids in sorted(groups.items(), key=lambda g: (min(g[1]), g[0])):
        pids = sorted(pids)
        shown = ",".join(str(p) for p in pids[:MAX_PIDS])
        if len(pids) > MAX_PIDS:
            shown += f",+{len(pids) - MAX_PIDS}"
        parts.append(f"{name}[{shown}] {user}")
    return "; ".join(parts)


def _port_rows(ports: list[dict]) -> list[str]:
    headers = ["PORT", *(STATE_LABELS[s] for s in PORT_COLUMNS), "OTHER STATES",
               "RECV-Q", "SEND-Q", "BACKLOGGED(R/S)"]
    rows = []
    for p in ports:
        states, q = p["states"], p["queues"]
        other = " ".join(
            f"{STATE_LABELS[s]}:{n}" for s, n in states.items() if n and s not in PORT_COLUMNS
        )
        rows.append(
            [
                str(p["port"]),
                *(str(states[s]) for s in PORT_COLUMNS),
                other or "-",
                format_bytes(q["receive_bytes"]),
                format_bytes(q["send_bytes"]),
                f"{q['receive_backlogged']}/{q['send_backlogged']}",
            ]
        )
    return _table(headers, rows, "rrrrlrrr")


def render_text(report: dict) -> str:
    """A compact, aligned summary for a terminal. Deterministic for a given report."""
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

    out.append(
        f"sockscope snapshot  {report['timestamp']}  sockets {report['sockets']}"
        f"  poll {report['poll_duration_seconds'] * 1000:.1f} ms"
        f"  families {','.join(report['families']) or '-'}"
    )
    if report["dump_interrupted"]:
        out.append(
            f"warning: {report['dump_interrupted']} dump(s) changed while being read;"
            " counts may be slightly inconsistent"
        )
    folded = report["folded"]
    folded_parts = []
    if folded["local_ports"]:
        folded_parts.append(f"{folded['local_ports']} local ports")
    if folded["remote_ports"]:
        folded_parts.append(f"{folded['remote_ports']} remote ports")
    if folded_parts:
        out.append(f"folded into '{OTHER}': {', '.join(folded_parts)}")
    if folded["listeners"]:
        out.append(f"listeners not tracked: {folded['listeners']}")

    # TOTALS: one column per non-zero state, a row for all families and one per family.
    out.append("")
    shown = [s for s in STATES if report["totals"][s]]
    if not shown:
        out.append("TOTALS  no sockets")
    else:
        rows = [["all", *(str(report["totals"][s]) for s in shown)]]
        if len(report["families"]) > 1:
            for fam in report["families"]:
                counts = report["totals_by_family"][fam]
                rows.append([fam, *(str(counts[s]) for s in shown)])
        out += _table(["TOTALS", *(STATE_LABELS[s] for s in shown)], rows, "l" + "r" * len(shown))

    for title, key in (("LOCAL PORTS", "local_ports"), ("REMOTE PORTS", "remote_ports")):
        out.append("")
        if report[key]:
            out.append(title)
            out += _port_rows(report[key])
        else:
            out.append(f"{title}: none")

    out.append("")
    if report["listeners"]:
        out.append(f"LISTENERS  ({FILL_MARK} = accept queue >= {FILL_MARK_PERCENT:.0f}% full)")
        headers = ["", "ADDRESS:PORT", "QUEUE", "FILL", "MEMBERS"]
        align = "llrrr"
        if show_owners:
            headers.append("PROCESS")
            align += "l"
        rows = []
        for lst in report["listeners"]:
            row = [
                FILL_MARK if lst["fill_percent"] >= FILL_MARK_PERCENT else "",
                endpoint(lst["family"], lst["address"], lst["port"]),
                f"{lst['queue_length']}/{lst['queue_limit']}",
                f"{lst['fill_percent']:.0f}%",
                str(lst["members"]),
            ]
            if show_owners:
                row.append(_process_groups(lst["owners"]))
            rows.append(row)
        out += _table(headers, rows, align)
    else:
        out.append("LISTENERS: none")

    out.append("")
    if owner_note:
        out.append(f"owners: {owner_note}")
    if not show_owners:
        pass
    elif not report["close_wait_owners"]:
        out.append("CLOSE-WAIT OWNERS: none")
    else:
        out.append("CLOSE-WAIT OWNERS")
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
        out += _table(["PORT", "PROCESS (PID/NAME/USER)", "SOCKETS"], rows, "rlr")
    return "\n".join(out) + "\n"
