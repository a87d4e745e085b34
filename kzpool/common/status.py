"""``kzpool status``: Kazoo's broker_summary, connection_summary and channel_summary.

:func:`document` makes the status JSON from the registry's tables (rows as the master
writes them), wherever they were read: from the registry process, or from the master's own
copy.  :func:`render` prints it as tables.  :func:`health` judges it for ``kzpool health``
and ``GET /healthz``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]
PLACED = frozenset({"assigning", "assigned", "moving"})  # a lease on a channel

CONNECTION_COLUMNS = ("id", "broker", "zone", "primary", "state", "pid", "prechannels",
                      "channels", "blocked", "held_back", "rss", "since", "error")
BROKER_COLUMNS = ("broker", "zone", "primary", "connections", "available", "prechannels",
                  "float", "sticky", "waiting")
CONSUMER_COLUMNS = ("name", "index", "pid", "state", "queue", "restarts", "rss", "since",
                    "error")
FEDERATOR_COLUMNS = ("lease", "federates", "zone", "broker", "state", "client_pid", "since",
                     "moves")
ASSIGNMENT_COLUMNS = ("lease", "kind", "client_pid", "broker", "pid", "channel", "since",
                      "moves")


def document(tables: dict[str, list[Row]]) -> dict[str, Any]:
    """The status JSON: ``pool``, ``brokers``, ``connections``, ``assignments``,
    ``consumers``, ``federators``."""
    pools = tables.get("pool") or [{}]
    connections = sorted(tables.get("connections", []), key=lambda r: int(r["id"][1:]))
    assignments = list(tables.get("assignments", []))
    return {
        "pool": pools[0],
        "connections": connections,
        "assignments": assignments,
        "consumers": sorted(tables.get("consumers", []), key=lambda r: (r["name"], r["index"])),
        "federators": [{**r, "broker": r["broker"] or r["pinned"]}
                       for r in assignments if r.get("federates")],
        "brokers": broker_summary(connections, assignments),
    }


def broker_summary(connections: list[Row], assignments: list[Row]) -> list[Row]:
    """Per broker: its connections, available ones, prechannels, leases on it by kind, and
    leases waiting for it (a sticky lease pinned to it while it is down)."""
    brokers: dict[str, Row] = {}
    for row in connections:
        entry = brokers.setdefault(row["broker"], {
            "broker": row["broker"], "zone": row["zone"], "hidden": row["hidden"],
            "primary": False, "connections": 0, "available": 0, "prechannels": 0, "float": 0,
            "sticky": 0, "waiting": 0})
        entry["connections"] += 1
        entry["available"] += bool(row["available"])
        entry["prechannels"] += row["prechannels"]
        entry["primary"] = entry["primary"] or row["primary"]
    for row in assignments:
        placed = row["state"] in PLACED
        target = brokers.get(row["broker"] if placed else row["pinned"])
        if target is not None:
            target[row["kind"] if placed else "waiting"] += 1
    return list(brokers.values())


@dataclass(frozen=True)
class Health:
    """Is the pool serving: ``ok``, and one line saying why (or why not)."""

    ok: bool
    reason: str


def health(status: dict[str, Any]) -> Health:
    """Healthy when the pool is running and its local zone has a primary (a connected broker
    that float leases go to).  Pure: the status document in, a verdict out."""
    pool = status.get("pool") or {}
    state, zone = pool.get("state"), pool.get("local_zone")
    connections = status.get("connections") or []
    up = sum(1 for row in connections if row.get("available"))
    count = f"{up}/{len(connections)} connections up"
    if state != "running":
        return Health(False, f"pool {pool.get('pid')} is {state or 'in an unknown state'},"
                             f" not running ({count})")
    local = [row for row in connections if row.get("zone") == zone and not row.get("hidden")]
    primary = next((row for row in local if row.get("primary") and _serving(row)), None)
    if primary is not None:
        return Health(True, f"primary {primary['broker']} in zone {zone}, {count}")
    seen: dict[str, str] = {}
    for row in local:  # one reason per broker, in config order
        seen.setdefault(str(row.get("broker")), str(row.get("error") or row.get("state")))
    why = "; ".join(f"{broker}: {reason}" for broker, reason in seen.items())
    return Health(False, f"no primary in local zone {zone}: {why or 'it lists no broker'}")


def _serving(row: dict[str, Any]) -> bool:
    """Connected, or connecting again at once because the broker closed the connection for
    a client's call (the broker is up, and the zone keeps it as its primary meanwhile)."""
    return bool(row.get("available")) or row.get("state") == "reconnecting"


def render(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    pool = status.get("pool", {})
    lines = [f"pool {pool.get('pid')} {pool.get('state')}, local zone {pool.get('local_zone')},"
             f" socket {pool.get('socket')}", "", "brokers:"]
    lines += _table(BROKER_COLUMNS, status.get("brokers", []), now)
    lines += ["", "connections:"]
    lines += _table(CONNECTION_COLUMNS, status.get("connections", []), now)
    lines += ["", "assignments:"]
    lines += _table(ASSIGNMENT_COLUMNS, status.get("assignments", []), now) or ["  (none)"]
    if status.get("consumers"):
        lines += ["", "consumers:", *_table(CONSUMER_COLUMNS, status["consumers"], now)]
    if status.get("federators"):
        lines += ["", "federators:", *_table(FEDERATOR_COLUMNS, status["federators"], now)]
    return "\n".join(lines)


def _cell(column: str, value: Any, now: float) -> str:
    if value is None:
        return "-"
    if column == "since":
        return _age(now - float(value))
    if column == "rss":
        return f"{int(value) / (1 << 20):.1f}M"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _table(columns: tuple[str, ...], rows: list[dict[str, Any]], now: float) -> list[str]:
    if not rows:
        return []
    cells = [[_cell(c, row.get(c), now) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out = ["  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    out += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return [line.rstrip() for line in out]
