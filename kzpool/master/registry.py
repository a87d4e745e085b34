"""The shared registry: the connections table and the assignments table.

The tables live in a ``multiprocess`` Manager process that the master forks and supervises
like any other child.  Each call through the proxy is a round trip to that process (about
0.3 ms): the registry is written on state changes only and is never on a per-message path.

If the Manager process dies, the master starts a new one and writes the tables again from
the workers' latest reports (see :meth:`kzpool.master.Master.handle_registry_death`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

from multiprocess.managers import BaseManager

Row = dict[str, Any]


class Tables:
    """Lives in the Manager process; every method is one proxy call."""

    def __init__(self) -> None:
        self._connections: dict[str, Row] = {}
        self._assignments: dict[str, Row] = {}

    def update(self, table: str, put: dict[str, Row], drop: list[str]) -> None:
        """Write changed rows and drop gone ones of ``connections`` or ``assignments``."""
        rows = self._connections if table == "connections" else self._assignments
        rows.update(put)
        for key in drop:
            rows.pop(key, None)

    def snapshot(self) -> dict[str, list[Row]]:
        return {
            "connections": list(self._connections.values()),
            "assignments": list(self._assignments.values()),
        }


class _Manager(BaseManager):  # type: ignore[misc]
    pass


_Manager.register("Tables", Tables)


class Registry:
    """Master-side handle on the Manager process and its :class:`Tables`.

    ``start`` forks the Manager process with ``child_setup`` run in it first (process title,
    parent-death signal).  The master reaps that pid itself; ``pid`` tells it which one.
    Not thread-safe: only the master's main loop calls it.
    """

    def __init__(self, child_setup: Callable[[int], None]) -> None:
        self._child_setup = child_setup
        self.pid = 0
        self.tables: Any = None

    def start(self) -> None:
        authkey = os.urandom(32)
        # TCP on loopback, not AF_UNIX: the parent's unix listener unlinks its path on close
        server = _Manager(address=("127.0.0.1", 0), authkey=authkey).get_server()
        pid = os.fork()
        if pid == 0:  # the Manager process
            try:
                self._child_setup(server.listener._listener._socket.fileno())
                server.serve_forever()
            finally:
                os._exit(0)
        server.listener.close()
        client = _Manager(address=server.address, authkey=authkey)
        client.connect()
        self.pid = pid
        self.tables = client.Tables()

    def stop(self) -> None:
        """SIGTERM the Manager process; the master reaps it."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        self.tables = None

    def forget(self) -> None:
        """The Manager process died: drop the proxy, keep nothing of it."""
        self.pid = 0
        self.tables = None
