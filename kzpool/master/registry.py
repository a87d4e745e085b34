"""The shared registry: the connections, assignments, consumers and pool tables.

The tables live in a ``multiprocess`` Manager process that the master forks and supervises
like any other child.  The master writes them (state changes only, at most ten times a
second, never per message); ``kzpool status`` reads them straight from the registry
(:func:`read`), so a status of ten thousand leases never holds up the master's loop.

The registry listens on a Unix socket beside the pool's, ``SOCKET.registry``, mode 0600:
only the pool's own user (and root) may connect, with the key in ``SOCKET.registry.key``
(0600 too).  It serves at most :data:`MAX_CONNECTIONS` connections at once (one more is
closed at once), and drops one that is silent for :data:`IDLE_TIMEOUT` seconds or that does
not read what it is sent for as long (the master's own connection hears from the master
every second).

Every call to it is bounded: each connection a client of the registry opens (the master,
``kzpool status``) connects, authenticates, sends and reads within :data:`CALL_TIMEOUT`
seconds, or fails.  A call of the master's that fails (a registry stopped, stuck or gone)
makes the master kill it; as when the Manager process dies, the master then starts a new one
and writes the tables again from the workers' latest reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from multiprocess import connection, managers
from multiprocess.managers import BaseManager, Server

from ..common.errors import KzpoolError

log = logging.getLogger("kzpool.registry")

Row = dict[str, Any]
TABLES = ("connections", "assignments", "consumers", "pool")
MAX_CONNECTIONS = 16
IDLE_TIMEOUT = 5.0
PING_INTERVAL = 1.0  # the master's connection is never silent longer than this
START_TIMEOUT = 5.0
CALL_TIMEOUT = 2.0  # seconds one connect, handshake, send or read may take
RESTART_DELAY = 1.0  # seconds between two failed starts
SERIALIZER = "kzpool"  # multiprocess's pickle, over connections with timeouts


class Tables:
    """Lives in the Manager process; every method is one proxy call."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Row]] = {name: {} for name in TABLES}

    def update(self, table: str, put: dict[str, Row], drop: list[str]) -> None:
        """Write changed rows and drop gone ones of one table."""
        rows = self._rows[table]
        rows.update(put)
        for key in drop:
            rows.pop(key, None)

    def snapshot(self) -> dict[str, list[Row]]:
        return {name: list(rows.values()) for name, rows in self._rows.items()}

    def ping(self) -> None:
        """Keeps the master's connection from looking idle."""


_TABLES = Tables()


def _tables() -> Tables:
    return _TABLES  # in the Manager process: the one Tables every proxy talks to


def _timed_client(address: str, family: str | None = None,
                  authkey: bytes | None = None) -> Any:
    """multiprocess's ``Client`` for a Unix socket, each step bounded by
    :data:`CALL_TIMEOUT`: connect, the handshake, and every later send and read (the kernel's
    SO_RCVTIMEO / SO_SNDTIMEO: a read that waits longer raises ``BlockingIOError``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CALL_TIMEOUT)
        sock.connect(address)
        sock.settimeout(None)
        _io_timeouts(sock.fileno(), CALL_TIMEOUT)
        conn = connection.Connection(sock.detach())
    try:
        if authkey is not None:
            connection.answer_challenge(conn, authkey)
            connection.deliver_challenge(conn, authkey)
    except BaseException:
        conn.close()
        raise
    return conn


# the serializer name picks the listener and client pair that managers and proxies use
managers.listener_client[SERIALIZER] = (connection.Listener, _timed_client)


class _Manager(BaseManager):  # type: ignore[misc]
    pass


_Manager.register("tables", callable=_tables)


class _Server(Server):  # type: ignore[misc]
    """multiprocess's server, with a bound on connections and on silent ones."""

    def accepter(self) -> None:
        slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                time.sleep(0.01)  # at the file limit: the peer waits in the backlog
                continue
            if not slots.acquire(blocking=False):
                conn.close()
                continue
            _io_timeouts(conn.fileno(), IDLE_TIMEOUT)
            threading.Thread(target=self._serve, args=(_Idle(conn), slots), daemon=True).start()

    def _serve(self, conn: Any, slots: threading.BoundedSemaphore) -> None:
        try:
            self.handle_request(conn)
        finally:
            slots.release()


class _Idle:
    """A served connection on which a read that timed out is the client's EOF: the server
    then ends that connection's thread, rather than answering the timeout and reading again
    (what multiprocess's ``serve_client`` does with any other error)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def recv(self) -> Any:
        try:
            return self._conn.recv()
        except BlockingIOError:
            raise EOFError("silent for too long") from None

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        try:
            data: bytes = self._conn.recv_bytes(maxlength)
        except BlockingIOError:
            raise EOFError("silent for too long") from None
        return data

    def send(self, obj: Any) -> None:
        self._conn.send(obj)

    def send_bytes(self, buf: bytes, offset: int = 0, size: int | None = None) -> None:
        self._conn.send_bytes(buf, offset, size)

    def fileno(self) -> int:
        return int(self._conn.fileno())

    def close(self) -> None:
        self._conn.close()


def _io_timeouts(fd: int, seconds: float) -> None:
    """Bound every blocking read and write on socket ``fd`` to ``seconds``."""
    value = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    finally:
        sock.close()


def paths(pool_socket: str) -> tuple[str, str]:
    """The registry's socket and key file, beside the pool's socket."""
    return f"{pool_socket}.registry", f"{pool_socket}.registry.key"


class Registry:
    """Master-side handle on the Manager process and its :class:`Tables`.

    ``start`` forks the Manager process with ``child_setup`` run in it first (process title,
    parent-death signal, descriptors closed but ``keep``).  The master reaps that pid itself;
    ``pid`` tells it which one.  Not thread-safe: only the master's main loop calls it.
    """

    def __init__(self, pool_socket: str, child_setup: Callable[[], None],
                 fork: Callable[[], int]) -> None:
        self.address, self.key_path = paths(pool_socket)
        self._child_setup = child_setup
        self._fork = fork
        self.pid = 0
        self.tables: Any = None
        self.written: dict[str, dict[str, Row]] = {}  # what the registry holds, as we know
        self.next_ping = 0.0
        self.restart_at = 0.0  # monotonic; when to start a new one (0: none due)

    def write(self, rows: dict[str, dict[str, Row]], put: dict[str, Row], drop: list[str],
              now: float) -> None:
        """Write what changed: of ``rows`` (whole tables, by key), the rows that differ from
        what was written; of the assignments, ``put`` and ``drop``.  One Manager call per
        table that changed, none when nothing did but a ping now and then, so that the
        registry does not take the master's connection for a silent one.

        A call that fails (timed out, connection gone) abandons this registry: see
        :meth:`abandon`.  Never raises.
        """
        try:
            self._write(rows, put, drop, now)
        except Exception as exc:  # OSError, EOFError, RemoteError: stuck, stopped or gone
            self.abandon(f"{type(exc).__name__}: {exc}", now)

    def _write(self, rows: dict[str, dict[str, Row]], put: dict[str, Row], drop: list[str],
               now: float) -> None:
        calls = 0
        for name, table in rows.items():
            old = self.written.get(name, {})
            changed = {k: r for k, r in table.items() if old.get(k) != r}
            gone = [k for k in old if k not in table]
            if changed or gone:
                self.tables.update(name, changed, gone)
                calls += 1
            self.written[name] = table
        if put or drop:
            self.tables.update("assignments", put, drop)
            calls += 1
        if not calls and now >= self.next_ping:
            self.tables.ping()
        if calls or now >= self.next_ping:
            self.next_ping = now + PING_INTERVAL

    def abandon(self, why: str, now: float) -> None:
        """The registry did not answer: kill it (the master reaps it) and start another one
        after :data:`RESTART_DELAY`; until then nothing is written."""
        log.error("the registry did not answer (%s); replacing it", why)
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.tables = None
        self.restart_at = now + RESTART_DELAY

    def restart_due(self, now: float) -> bool:
        """The old registry is reaped and the time to start a new one has come."""
        return not self.pid and bool(self.restart_at) and now >= self.restart_at

    def start(self) -> None:
        """Fork the Manager process and connect to it; raises :class:`KzpoolError` (or
        :class:`OSError`, ``EOFError``) if it does not answer within ``START_TIMEOUT``."""
        self.restart_at = 0.0
        authkey = os.urandom(32)
        _write_key(self.key_path, authkey)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        pid = self._fork()
        if pid == 0:  # the Manager process
            try:
                self._child_setup()
                os.umask(0o077)  # no moment when another user could connect
                server = _Server(_Manager._registry, self.address, authkey, SERIALIZER)
                os.chmod(self.address, 0o600)
                server.serve_forever()
            finally:
                os._exit(0)
        self.pid = pid
        self.written.clear()  # a new registry holds nothing yet
        self.tables = _connect(self.address, authkey, START_TIMEOUT)

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

    def close(self) -> None:
        """The master stops: the socket and the key go."""
        for path in (self.address, self.key_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _write_key(path: str, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)


def _connect(address: str, authkey: bytes, timeout: float) -> Any:
    """A proxy to the registry's tables, once its socket answers (tried for ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            manager = _Manager(address=address, authkey=authkey, serializer=SERIALIZER)
            manager.connect()
            return manager.tables()
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise KzpoolError(f"the registry did not answer at {address} within"
                                  f" {timeout:g} s", socket=address) from None
            time.sleep(0.005)


def read(pool_socket: str, timeout: float = START_TIMEOUT) -> dict[str, list[Row]]:
    """The tables, read from the registry of the pool at ``pool_socket``.

    Raises :class:`OSError` (no such file, permission denied: not the pool's user) or
    :class:`~kzpool.common.errors.KzpoolError` when the registry cannot be read.
    """
    address, key_path = paths(pool_socket)
    with open(key_path, "rb") as handle:
        authkey = handle.read()
    try:
        tables = _connect(address, authkey, timeout)
        snapshot: dict[str, list[Row]] = tables.snapshot()
    except (EOFError, BlockingIOError, connection.AuthenticationError) as exc:
        raise KzpoolError(f"the registry at {address} could not be read: {exc}") from exc
    return snapshot
