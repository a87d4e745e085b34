"""The connection worker: one process, one broker connection, its heartbeats, its prechannels.

The master forks a worker per broker URI (times ``connections_per_broker``).  Everything the
worker does runs in one pika ``IOLoop``: the AMQP connection (:mod:`.connection`, heartbeats
included), the link to the master (:mod:`.uplink`), its own lease socket (:mod:`.intake`),
ready channels (:mod:`.prechannels`), a :mod:`.session` per lease, a signal pipe, a second
connection for leases that publish flat out (:mod:`.bulk`).  No callback blocks.

Hazards:

* The worker is forked from the master: it closes every inherited descriptor but its link
  before opening anything (:func:`kzpool.common.proc.close_fds_except`).
* Signal handlers only write to a pipe (``signal.set_wakeup_fd``); the loop does the work.
* If the master dies, the link reads EOF and Linux sends SIGTERM (PDEATHSIG): the worker
  closes its connection and exits with :data:`~kzpool.common.exitcodes.WORKER_PARENT_GONE`.
* A failure a reconnect will not fix (credentials, vhost) is reported, then the worker exits
  with :data:`~kzpool.common.exitcodes.WORKER_FATAL` and the master does not respawn it.
* An exception from a client's socket drops that client only (:mod:`.loop`); what clients
  hold is bounded (:mod:`.clients`, :mod:`.turns`); a resume goes to the master.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

import pika.exceptions
from pika import spec as amqp
from pika.adapters.select_connection import SelectConnection

from ..common import exitcodes, messages, proc
from ..common.access import Access, peer
from ..common.backoff import Backoff
from ..common.errors import KzpoolError, TLSError
from ..common.messages import LeaseEvent, LeaseNews, LeaseRequest, Message, Reason
from ..common.options import LeaseOptions
from ..common.sockets import out_of_files
from ..common.states import ConnState
from .bulk import Bulk
from .clients import Clients, Waiting, full
from .connection import BatchedConnection, parameters
from .exclusive import Exclusives
from .faults import classify, connection_lost, in_maintenance
from .intake import Intake, answer
from .loop import GuardedLoop
from .outbox import Pot
from .prechannels import Prechannels
from .session import Session
from .spec import WorkerSpec
from .turns import Budget
from .uplink import Uplink

log = logging.getLogger("kzpool.worker")

NOT_CONNECTED = Reason("ConnectionClosed", 0, "broker not connected")
FULL = Reason("ConnectionClosed", 0, "this connection serves max_peers clients")


class ConnectionWorker:
    """Runs in the forked child; :meth:`run` returns the process exit code."""

    def __init__(self, spec: WorkerSpec, link: socket.socket, listener: socket.socket | None,
                 master_pid: int) -> None:
        self.spec = spec
        self.ioloop = GuardedLoop(self._client_fault, lambda e: self._on_open_error(None, e))
        self.state = ConnState.STARTING
        self.error: str | None = None
        self.since = time.time()
        self.blocked = False
        self.counters = dict.fromkeys(("publishes", "deliveries", "redeliveries", "acks",
                                       "consumers_cancelled", "deliveries_taken_back"), 0)
        self.blocked_since = 0.0
        self.blocked_seconds = 0.0
        self.primary = False
        self.maintenance: str | None = None  # the broker said it went into maintenance
        self.connection: SelectConnection | None = None
        self.prechannels = Prechannels(spec.settings.prechannels, self.ioloop,
                                       spec.broker.uri.masked, self._offer,
                                       lambda: len(self.waiting), lambda: self.uplink.report_soon())
        self.prechannels.on_open = self._on_channel_open
        self.sessions: dict[str, Session] = {}  # by lease id
        self.pot = Pot.of(spec.settings, lambda: self.uplink.report_soon())  # (.outbox)
        self.bound: dict[int, Session] = {}  # by channel number
        self.waiting: list[Waiting] = []  # clients waiting for a channel
        self.clients = Clients()  # the client process of each lease bound or waiting
        self.exclusives = Exclusives(self.ioloop, spec.broker.uri.vhost)  # their owners
        self.uplink = Uplink(link, self.ioloop, master_pid, self._report, self._on_master,
                             self._master_gone)
        settings = spec.settings
        self.intake = Intake(self, listener, Access(settings.allow_users, settings.allow_groups))
        self.exit_code = exitcodes.OK
        cap = (settings.reconnect_backoff_max if spec.broker.local
               else settings.reconnect_backoff_max_remote)
        self.backoff = Backoff(settings.reconnect_backoff_min, cap)
        self.budget = Budget(settings.worker_buffer)  # what its connections buffer, together
        self.bulk = Bulk(self.ioloop, spec, self.budget)  # for leases publishing flat out

    # ----- life cycle -------------------------------------------------------------------

    def run(self) -> int:
        self.ioloop.watch_signals((signal.SIGTERM, signal.SIGINT, signal.SIGHUP), self._on_signal)
        self.uplink.start()
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
        self.bulk.stop()
        connection = self.connection
        if connection is None or connection.is_closed:
            self.ioloop.stop()
        elif not connection.is_closing:
            try:
                connection.close()  # _on_closed or _on_open_error stops the loop
            except pika.exceptions.ConnectionWrongStateError:
                self.ioloop.stop()

    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            parent = os.getppid() == self.uplink.master_pid
            self.stop(exitcodes.OK if parent else exitcodes.WORKER_PARENT_GONE)

    def _master_gone(self) -> None:
        if self.state is not ConnState.STOPPING:
            log.warning("the master is gone; closing")
            self.uplink.stop_reading()
            self.stop(exitcodes.WORKER_PARENT_GONE)

    # ----- the broker connection ----------------------------------------------------------

    def _connect(self) -> None:
        if self.state is ConnState.STOPPING:
            return
        if self.state is not ConnState.RECONNECTING:  # that one stays primary meanwhile
            self._set_state(ConnState.CONNECTING)
        try:
            params = parameters(self.spec)
        except (OSError, TLSError) as exc:  # a TLS file gone or changed, or the file limit
            self._lost(f"at the file limit: {exc}" if out_of_files() else exc)
            return
        self.connection = BatchedConnection(
            params, on_open_callback=self._on_open, on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed, custom_ioloop=self.ioloop, budget=self.budget)

    def _on_open(self, connection: SelectConnection) -> None:
        log.info("connected to %s", self.spec.broker.uri.masked)
        self.backoff.reset()
        self.error = self.maintenance = None  # in service: its listeners accept again
        self.blocked = False
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._set_state(ConnState.CONNECTED)
        self.prechannels.connection = connection
        self.prechannels.fill()
        self.exclusives.start(connection)

    def _on_open_error(self, connection: Any, exc: BaseException | str) -> None:
        """A connect failed (``None``: pika could not make its socket, at the file limit)."""
        current = self.connection
        if current is None or connection not in (None, current) or current.is_open:
            return  # an attempt given up already
        self.connection = None
        self._lost(exc)

    def _on_closed(self, _connection: SelectConnection, exc: BaseException) -> None:
        self.connection = None
        self.exclusives.reset()  # the broker deleted the connection's exclusive queues
        self.prechannels.clear()
        self.bound.clear()
        lost = messages.Lost(connection_lost(exc))
        again = lost.reason.connection_error and self.state is not ConnState.STOPPING
        if again:  # said before the leases hear of it: the master keeps this one primary
            self.error = f"closed by broker: {lost.reason.code} {lost.reason.text}"
            self._set_state(ConnState.RECONNECTING)
        for session in list(self.sessions.values()):
            session.event(lost)
            session.end(LeaseEvent.LOST, "connection lost")
        waiting, self.waiting = self.waiting, []
        for entry in waiting:  # nothing can be bound any more
            self._turn_away(entry.lease, entry.sock)
        if self.state is ConnState.STOPPING:
            self.ioloop.stop()
        elif again:
            log.warning("%s: %s; connecting again at once", self.spec.broker.uri.masked, self.error)
            self.ioloop.call_later(0, self._connect)
        else:
            self._lost(exc)

    def _lost(self, exc: BaseException | str) -> None:
        if self.state is ConnState.STOPPING:
            self.ioloop.stop()
            return
        fatal, reason = classify(exc)
        self.maintenance, self.error = in_maintenance(exc, reason, self.maintenance)
        if fatal:
            log.error("%s: %s; not retrying", self.spec.broker.uri.masked, reason)
            self._set_state(ConnState.FAILED)
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
        self._tell_sessions(messages.Blocked())
        self.uplink.report_soon()

    def _on_unblocked(self, _connection: SelectConnection, _frame: Any) -> None:
        log.info("%s unblocked the connection", self.spec.broker.uri.masked)
        if self.blocked:
            self.blocked_seconds += time.monotonic() - self.blocked_since
        self.blocked = False
        self._tell_sessions(messages.Unblocked())
        self.uplink.report_soon()

    def _tell_sessions(self, event: Message) -> None:
        for session in self.sessions.values():
            session.event(event)

    # ----- channels ------------------------------------------------------------------------

    def _on_channel_open(self, channel: Any) -> None:
        """Channel callbacks are set once, here, and find the lease bound at the time."""
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.add_callback(self._on_get_empty, [amqp.Basic.GetEmpty], one_shot=False)

    def _offer(self, channel: Any) -> bool:
        """A ready channel: to the first client waiting for one (``False``: none waits)."""
        if not self.waiting:
            return False
        self._bind(self.waiting.pop(0), channel)
        return True

    def recycle(self, channel: Any, settled_first: bool) -> None:
        """A released lease left nothing on its channel (:meth:`Prechannels.hand_back`)."""
        self.bound.pop(channel.channel_number, None)
        self.prechannels.hand_back(channel, settled_first)

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        session = self.bound.pop(channel.channel_number, None)
        self.prechannels.closed(channel)
        self.exclusives.channel_closed(channel)
        if session is not None:
            session.on_channel_closed(reason)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        session = self.bound.get(channel.channel_number)
        if session is not None:
            session.on_return(method, properties, body)

    def _on_get_empty(self, frame: Any) -> None:
        session = self.bound.get(frame.channel_number)
        if session is not None:
            session.on_get_empty()

    # ----- leases ---------------------------------------------------------------------------

    def serves(self, request: LeaseRequest) -> bool:
        """A lease asked for at this worker directly: is this worker what it wants?  A
        resume (the request names a lease) never is: the master checks whose lease it is."""
        broker, options = self.spec.broker, request.options
        if request.lease is not None:
            return False
        if self.state is not ConnState.CONNECTED or self.prechannels.exhausted:
            return False  # the master knows which other connection has room
        if options.kind == "float":
            in_zone = broker.local if options.zone is None else options.zone == broker.zone
            return self.primary and in_zone and not broker.hidden
        return options.broker_id == broker.uri.short

    def refusal(self, pid: int, uid: int) -> KzpoolError | None:
        """A limit that process ``pid`` of ``uid`` meets here if it asks for one more."""
        return self.clients.refusal(pid, uid, self.spec.settings)

    def room(self) -> KzpoolError | None:
        """Why no more client connection fits here now (``max_peers``, the file limit)."""
        return full(len(self.sessions) + len(self.waiting) + len(self.intake.pending),
                    self.spec.settings)

    def admit(self, lease: str, sock: socket.socket, options: LeaseOptions,
              ids: tuple[int, int] | None = None) -> None:
        """Bind ``sock`` to a channel for ``lease`` (now, or when the next one opens);
        ``ids``: the client's (pid, uid), when the intake read them already."""
        if ids is None:
            try:
                ids = peer(sock)[:2]  # before anything is sent: a failed send closes it
            except OSError:
                self._turn_away(lease, sock)
                return
        pid, uid = ids
        if self.state is not ConnState.CONNECTED or self.connection is None or \
                self.prechannels.exhausted:
            self._turn_away(lease, sock)
            return
        if full(len(self.sessions) + len(self.waiting), self.spec.settings) is not None:
            self._turn_away(lease, sock, FULL)  # the master learns from the report
            return
        client = Waiting(lease, sock, options, pid, uid)
        channel = self.prechannels.take()
        if channel is not None:
            self._bind(client, channel)
        else:
            self.waiting.append(client)
            self.clients.hold(lease, pid, uid)
            self.prechannels.fill()

    def _turn_away(self, lease: str, sock: socket.socket, reason: Reason = NOT_CONNECTED) -> None:
        self.clients.drop(lease)
        answer(sock, messages.Lost(reason))
        self.uplink.news(LeaseNews(LeaseEvent.LOST, lease))

    def _bind(self, client: Waiting, channel: Any) -> None:
        broker, lease, options = self.spec.broker, client.lease, client.options
        old = self.sessions.get(lease)
        if old is not None:  # placed here again before its old session ended
            old.end(LeaseEvent.LOST, "placed again")
        self.clients.hold(lease, client.pid, client.uid)
        session = Session(self, client.sock, lease, channel, options)
        self.sessions[lease] = session
        self.exclusives.attach(session, client.pid, client.uid)
        self.bound[channel.channel_number] = session
        session.event(messages.Leased(lease, broker.uri.masked, broker.zone,
                                      channel.channel_number, os.getpid(), self.blocked,
                                      self.intake.route))
        session.flush()  # the client waits for this: before anything else
        if session.done:  # it hung up at once: its release is told already
            return
        self.uplink.news(LeaseNews(LeaseEvent.ASSIGNED, lease, channel.channel_number, options,
                                   client.pid, client.uid))
        self.uplink.report_soon()

    def _client_fault(self, fd: int, exc: Exception) -> bool:
        """A handler of ``fd`` raised: drop that client, if it is one (``False``: it is not)."""
        session = next((s for s in self.sessions.values() if s.fd == fd), None)
        if session is None:
            return self.intake.drop(fd, exc)
        log.warning("lease %s (pid %d): dropping the client after %r", session.lease,
                    self.clients.owners.get(session.lease, (0, 0))[0], exc, exc_info=exc)
        try:
            session.end(LeaseEvent.RELEASED, repr(exc))
        except Exception:  # it could not end itself: let it go all the same
            log.exception("lease %s: could not end it cleanly", session.lease)
            self.bound = {n: s for n, s in self.bound.items() if s is not session}
            with contextlib.suppress(KeyError, ValueError):
                self.ioloop.remove_handler(fd)
            session.sock.close()
            self.session_ended(session, LeaseEvent.RELEASED, repr(exc))
        return True

    def session_ended(self, session: Session, how: LeaseEvent, why: str) -> None:
        self.exclusives.detach(session, how)
        if self.sessions.get(session.lease) is session:
            del self.sessions[session.lease]
            self.clients.drop(session.lease)
        log.debug("lease %s %s: %s", session.lease, how.value, why)
        self.uplink.news(LeaseNews(how, session.lease))
        self.prechannels.fill()
        self.uplink.report_soon()

    # ----- what the master says ---------------------------------------------------------------

    def _on_master(self, message: Message, sock: socket.socket | None) -> None:
        match message:
            case messages.Role(primary=primary):
                self.primary = primary
                proc.set_title(self.spec.title(primary))
            case messages.ReportNow():
                self.uplink.report_now()
            case messages.Adopt() if sock is not None:
                log.debug("lease %s placed here by the master", message.lease)
                self.admit(message.lease, sock, message.options)
            case messages.Adopt():  # its socket did not come along
                self.uplink.news(LeaseNews(LeaseEvent.LOST, message.lease))
            case messages.MoveLease(lease=lease) if lease in self.sessions:
                self.sessions[lease].move()

    def _set_state(self, state: ConnState) -> None:
        if state is not self.state:
            self.state = state
            self.since = time.time()
            self.uplink.report_now()  # the master decides on it: at once

    def _report(self) -> messages.Report:
        return messages.Report(
            state=self.state.value, since=self.since, error=self.error, blocked=self.blocked,
            full=self.prechannels.full,
            counters={**self.counters, "channels_reused": self.prechannels.reused,
                      "blocked_seconds": round(self.blocked_seconds, 3), **self.pot.counters()},
            prechannels=len(self.prechannels), channels=len(self.sessions))


def run_worker(spec: WorkerSpec, link: socket.socket, listener: socket.socket,
               master_pid: int) -> int:
    """Entry point in the forked child (its signals at their defaults: the master's fork)."""
    proc.close_fds_except(link.fileno(), listener.fileno(), 0, 1, 2)
    proc.die_with_parent(signal.SIGTERM)
    proc.set_title(spec.title(False))
    if os.getppid() != master_pid:
        return exitcodes.WORKER_PARENT_GONE
    return ConnectionWorker(spec, link, listener, master_pid).run()
