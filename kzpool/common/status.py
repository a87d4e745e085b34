"""``kzpool status``: Kazoo's connection_summary and channel_summary as a table."""

from __future__ import annotations

import time
from typing import Any

CONNECTION_COLUMNS = ("id", "broker", "zone", "primary", "state", "pid", "prechannels",
                      "channels", "blocked", "rss", "since", "error")
BROKER_COLUMNS = ("broker", "zone", "primary", "connections", "available", "prechannels",
                  "float", "sticky", "waiting")
CONSUMER_COLUMNS = ("name", "index", "pid", "state", "queue", "restarts", "rss", "since",
                    "error")
FEDERATOR_COLUMNS = ("lease", "federates", "zone", "broker", "state", "client_pid", "since",
                     "moves")
ASSIGNMENT_COLUMNS = ("lease", "kind", "client_pid", "broker", "pid", "channel", "since",
                      "moves")


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
