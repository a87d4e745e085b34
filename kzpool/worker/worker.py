"""The connection worker: one process, one broker connection, its heartbeats, its prechannels.

The master forks a worker per broker URI (times ``connections_per_broker``).  Everything the
worker does runs in one pika ``IOLoop``: the AMQP connection (pika ``SelectConnection``,
heartbeats included), the link to the master (a socketpair) and a signal pipe.  No callback
blocks, so heartbeats are answered even while clients are busy elsewhere.

Hazards:

* The worker is forked from the master: it closes every inherited descriptor but its link
  before opening anything (:func:`kzpool.proc.close_fds_except`).
* Signal handlers only write to a pipe (``signal.set_wakeup_fd``); the loop does the work.
* If the master dies, the link reads EOF and Linux sends SIGTERM (PDEATHSIG): the worker
  closes its connection and exits with :data:`~kzpool.exitcodes.WORKER_PARENT_GONE`.
* A failure a reconnect will not fix (credentials, vhost) is reported, then the worker exits
  with :data:`~kzpool.exitcodes.WORKER_FATAL` and the master does not respawn it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika import spec
from pika.adapters.select_connection import IOLoop, SelectConnection

from ..common import exitcodes, proc
from ..common.backoff import Backoff
from ..common.config import Broker, Settings
from ..common.errors import ProtocolError, connection_fault
from ..common.states import ConnState
from ..common.wire import FrameReader, encode
from .intake import Intake
from .session import End, Session

log = logging.getLogger("kzpool.worker")

BEAT_INTERVAL = 1.0
NEWS_DELAY = 0.005  # seconds counter changes, assignments, releases may wait for the master
READ = IOLoop.READ


class BatchedConnection(SelectConnection):  # type: ignore[misc]
    """pika's ``SelectConnection``, sending what one loop pass produced in one write.

    pika hands the transport every frame on its own (three per publish), and the transport
    makes a ``send()`` per frame.  ``_adapter_emit_data`` is pika's adapter hook for output:
    here it collects the frames and flushes them once, at the end of the loop pass.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._out: list[bytes] = []
        self._flush_due = False
        super().__init__(*args, **kwargs)

    def _adapter_emit_data(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_due:
            self._flush_due = True
            self.ioloop.call_later(0, self._flush_out)

    def _flush_out(self) -> None:
        self._flush_due = False
        data, self._out = b"".join(self._out), []
        if data and self._transport is not None:
            super()._adapter_emit_data(data)


@dataclass(frozen=True)
class WorkerSpec:
    """What the master decides for a worker before it forks it."""

    id: str  # "c1": the connection row's key
    broker: Broker
    index: int  # 1..connections_per_broker
    settings: Settings

    def title(self, primary: bool) -> str:
        roles = [self.broker.zone] + (["primary"] if primary else [])
        suffix = f" #{self.index}" if self.settings.connections_per_broker > 1 else ""
        return f"kzpool: connection {self.broker.uri.short}{suffix} [{', '.join(roles)}]"


class ConnectionWorker:
    """Runs in the forked child; :meth:`run` returns the process exit code."""

    def __init__(self, spec: WorkerSpec, link: socket.socket, listener: socket.socket | None,
                 master_pid: int) -> None:
        self.spec = spec
        self.link = link
        self.master_pid = master_pid
        self.ioloop = IOLoop()
        self.state = ConnState.STARTING
        self.error: str | None = None
        self.since = time.time()
        self.blocked = False
        self.full = False  # the connection has channel_max channels
        self.counters = dict.fromkeys(("publishes", "deliveries", "redeliveries", "acks"), 0)
        self.blocked_since = 0.0
        self.blocked_seconds = 0.0
        self.primary = False
        self.connection: SelectConnection | None = None
        self.prechannels: list[Any] = []
        self.sessions: dict[str, Session] = {}  # by lease id
        self.bound: dict[int, Session] = {}  # by channel number
        self.intake = Intake(self, listener)
        self._fds: list[int] = []  # passed by the master, not yet claimed
        self.exit_code = exitcodes.OK
        settings = spec.settings
        cap = (settings.reconnect_backoff_max if spec.broker.local
               else settings.reconnect_backoff_max_remote)
        self.backoff = Backoff(settings.reconnect_backoff_min, cap)
        self._reader = FrameReader()
        self._report_pending = False
        self._opening = 0  # channels asked for, not yet open
        self._lease_news: list[dict[str, Any]] = []
        self._lease_news_due = False

    # ----- life cycle -------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self.ioloop.add_handler(self.link.fileno(), self._on_link, READ)
        self.ioloop.call_later(BEAT_INTERVAL, self._beat)
        self._connect()
        self.ioloop.start()
        return self.exit_code

    def stop(self, code: int = exitcodes.OK) -> None:
        """Close the connection gracefully, then leave the loop (bounded)."""
        if self.state is ConnState.STOPPING:
            return
        self.exit_code = code
        self._set_state(ConnState.STOPPING)
        self.ioloop.call_later(self.spec.settings.shutdown_timeout, self.ioloop.stop)
        connection = self.connection
        if connection is None or connection.is_closed:
            self.ioloop.stop()
        elif not connection.is_closing:
            try:
                connection.close()  # _on_closed or _on_open_error stops the loop
            except pika.exceptions.ConnectionWrongStateError:
                self.ioloop.stop()

    def _install_signals(self) -> None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # record only: the wakeup fd carries it
        self.ioloop.add_handler(read_end, self._on_signal, READ)

    def _on_signal(self, fd: int, _events: int) -> None:
        for signum in os.read(fd, 64):
            if signum in (signal.SIGTERM, signal.SIGINT):
                code = exitcodes.OK if os.getppid() == self.master_pid else (
                    exitcodes.WORKER_PARENT_GONE)
                self.stop(code)

    # ----- the broker connection ----------------------------------------------------------

    def _parameters(self) -> pika.URLParameters:
        settings = self.spec.settings
        params = pika.URLParameters(self.spec.broker.uri.uri)
        params.heartbeat = settings.heartbeat
        params.connection_attempts = 1
        params.socket_timeout = settings.connect_timeout
        params.stack_timeout = settings.connect_timeout
        params.client_properties = {"connection_name": self.spec.title(False)[8:],
                                    "product": "kzpool"}
        return params

    def _connect(self) -> None:
        if self.state is ConnState.STOPPING:
            return
        self._set_state(ConnState.CONNECTING)
        self.connection = BatchedConnection(
            self._parameters(),
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self.ioloop,
        )

    def _on_open(self, connection: SelectConnection) -> None:
        log.info("connected to %s", self.spec.broker.uri.masked)
        self.backoff.reset()
        self.error = None
        self.blocked = False
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._set_state(ConnState.CONNECTED)
        self.fill_prechannels()

    def _on_open_error(self, _connection: SelectConnection, exc: BaseException | str) -> None:
        self.connection = None
        self._lost(exc)

    def _on_closed(self, _connection: SelectConnection, exc: BaseException) -> None:
        self.connection = None
        self.prechannels.clear()
        self.bound.clear()
        self._opening = 0
        lost = {"op": "lost", "reason": {"class": "ConnectionClosed", "code": 0,
                                         "text": "connection to the broker lost"}}
        for session in list(self.sessions.values()):
            session.event(lost)
            session.end(End.LOST, "connection lost")
        self.intake.connection_lost()
        if self.state is ConnState.STOPPING:
            self.ioloop.stop()
            return
        self._lost(exc)

    def _lost(self, exc: BaseException | str) -> None:
        if self.state is ConnState.STOPPING:
            self.ioloop.stop()
            return
        fatal, reason = connection_fault(exc)
        self.error = reason
        if fatal:
            log.error("%s: %s; not retrying", self.spec.broker.uri.masked, reason)
            self._set_state(ConnState.FAILED)
            self._flush_report()
            self.exit_code = exitcodes.WORKER_FATAL
            self.ioloop.stop()
            return
        delay = self.backoff.next_delay()
        log.warning("%s: %s; reconnecting in %.1f s", self.spec.broker.uri.masked, reason, delay)
        self._set_state(ConnState.WAITING)
        self.ioloop.call_later(delay, self._connect)

    def _on_blocked(self, _connection: SelectConnection, _frame: Any) -> None:
        log.warning("%s blocked the connection (flow control)", self.spec.broker.uri.masked)
        self.blocked = True
        self.blocked_since = time.monotonic()
        self._tell_sessions({"op": "blocked"})
        self.report_soon()

    def _on_unblocked(self, _connection: SelectConnection, _frame: Any) -> None:
        log.info("%s unblocked the connection", self.spec.broker.uri.masked)
        if self.blocked:
            self.blocked_seconds += time.monotonic() - self.blocked_since
        self.blocked = False
        self._tell_sessions({"op": "unblocked"})
        self.report_soon()

    def _tell_sessions(self, event: dict[str, Any]) -> None:
        for session in self.sessions.values():
            session.event(event)

    # ----- prechannels ----------------------------------------------------------------------

    def fill_prechannels(self) -> None:
        """Open channels until ``prechannels`` are ready or opening."""
        connection = self.connection
        if connection is None or not connection.is_open:
            return
        wanted = self.spec.settings.prechannels + len(self.intake.waiting)
        for _ in range(wanted - len(self.prechannels) - self._opening):
            try:
                connection.channel(on_open_callback=self._on_channel_open)
            except pika.exceptions.NoFreeChannels:  # channel_max: other connections serve
                if not self.full:
                    log.warning("%s: channel_max reached", self.spec.broker.uri.masked)
                    self.full = True
                    self.report_soon()
                return
            self._opening += 1

    def _on_channel_open(self, channel: Any) -> None:
        """Channel callbacks are set once, here, and find the lease bound at the time."""
        self._opening -= 1
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.add_callback(self._on_get_empty, [spec.Basic.GetEmpty], one_shot=False)
        self._give(channel)

    def _give(self, channel: Any) -> None:
        """A ready channel: to the first client waiting for one, else to the prechannels."""
        if not self.intake.channel_opened(channel):
            self.prechannels.append(channel)
        self.report_soon()

    def recycle(self, channel: Any) -> None:
        """A released lease left nothing on its channel: it serves the next one as is."""
        self.bound.pop(channel.channel_number, None)
        self._give(channel)

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if self.full:
            self.full = False
            self.report_soon()
        session = self.bound.pop(channel.channel_number, None)
        if session is not None:
            session.on_channel_closed(reason)
        elif channel in self.prechannels:
            self.prechannels.remove(channel)
            self.fill_prechannels()
            self.report_soon()

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        session = self.bound.get(channel.channel_number)
        if session is not None:
            session.on_return(method, properties, body)

    def _on_get_empty(self, frame: Any) -> None:
        session = self.bound.get(frame.channel_number)
        if session is not None:
            session.on_get_empty()

    # ----- leases ---------------------------------------------------------------------------

    def lease_event(self, event: dict[str, Any]) -> None:
        """Tell the master what became of a lease.

        A lost or moved lease is told at once (its client is about to ask the master for a
        new channel); assignments and releases wait up to ``NEWS_DELAY`` to go
        together, so that a burst of short leases wakes the master once, not per lease.
        """
        self._lease_news.append({"op": "lease", **event})
        if event["event"] in (End.LOST.value, End.MOVED.value):
            self._flush_lease_news()
        elif not self._lease_news_due:
            self._lease_news_due = True
            self.ioloop.call_later(NEWS_DELAY, self._flush_lease_news)

    def _flush_lease_news(self) -> None:
        self._lease_news_due = False
        if self._lease_news:
            news, self._lease_news = self._lease_news, []
            with contextlib.suppress(OSError):
                self.link.sendall(b"".join(encode(n) for n in news))

    def session_ended(self, session: Session, how: End, why: str) -> None:
        if self.sessions.get(session.lease) is session:
            del self.sessions[session.lease]
        log.debug("lease %s %s: %s", session.lease, how.value, why)
        self.lease_event({"event": how.value, "lease": session.lease})
        self.fill_prechannels()
        self.report_soon()

    # ----- the link to the master -------------------------------------------------------------

    def _on_link(self, fd: int, _events: int) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.link, 65536, 64)
        except OSError:
            data, fds = b"", []
        self._fds += fds
        if not data:
            self._master_gone()
            return
        try:
            for message in self._reader.messages(data):
                self._handle(message)
        except ProtocolError as exc:
            log.error("bad frame from the master: %s", exc)
            self._master_gone()

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "role":
            self.primary = bool(message.get("primary"))
            proc.set_title(self.spec.title(self.primary))
        elif op == "report":
            self._flush_report()
        elif op == "adopt" and self._fds:
            sock = socket.socket(fileno=self._fds.pop(0))
            self.intake.admit(str(message.get("lease")), sock, message)
        elif op == "move" and message.get("lease") in self.sessions:
            self.sessions[message["lease"]].move()

    def _master_gone(self) -> None:
        if self.state is not ConnState.STOPPING:
            log.warning("the master is gone; closing")
            self.ioloop.remove_handler(self.link.fileno())
            self.stop(exitcodes.WORKER_PARENT_GONE)

    def _beat(self) -> None:
        if os.getppid() != self.master_pid:
            self._master_gone()
            return
        self.send({"op": "beat"})
        self.ioloop.call_later(BEAT_INTERVAL, self._beat)

    def _set_state(self, state: ConnState) -> None:
        if state is not self.state:
            self.state = state
            self.since = time.time()
            self._flush_report()  # the master decides on it: at once

    def report_soon(self) -> None:
        """Coalesce counter changes (prechannels, channels) for ``NEWS_DELAY``: a burst of
        short leases then wakes the master once, not per lease."""
        if not self._report_pending:
            self._report_pending = True
            self.ioloop.call_later(NEWS_DELAY, self._flush_report)

    def _flush_report(self) -> None:
        self._report_pending = False
        self.send({
            "op": "report",
            "state": self.state.value,
            "error": self.error,
            "since": self.since,
            "blocked": self.blocked,
            "full": self.full,
            "counters": {**self.counters, "blocked_seconds": round(self.blocked_seconds, 3)},
            "prechannels": len(self.prechannels),
            "channels": len(self.sessions),
        })

    def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the master is gone: the link's EOF stops us
            self.link.sendall(encode(message))


def run_worker(spec: WorkerSpec, link: socket.socket, listener: socket.socket,
               master_pid: int) -> int:
    """Entry point in the forked child."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    proc.close_fds_except(link.fileno(), listener.fileno(), 0, 1, 2)
    proc.die_with_parent(signal.SIGTERM)
    proc.set_title(spec.title(False))
    if os.getppid() != master_pid:
        return exitcodes.WORKER_PARENT_GONE
    link.setblocking(True)
    return ConnectionWorker(spec, link, listener, master_pid).run()
