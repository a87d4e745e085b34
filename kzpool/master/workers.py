"""The master's connection workers: one :class:`~.slots.Slot` per worker it keeps.

Forks each worker (its link and its lease socket are made before the fork), reads what it
reports, passes it client sockets, notices when it is silent or too big, and respawns it by
the one rule of :mod:`.life`.  Runs in the master's loop only.

Hazards: :meth:`WorkerSet.exited` must be called with every worker pid the master reaps; a
worker exiting with :data:`~kzpool.common.exitcodes.WORKER_FATAL` is not respawned.  The
links are non-blocking both ways: what the master says waits in the slot's
:class:`~kzpool.common.sockets.Outbox` (a client socket it passes with it) until the worker
reads it, so a partial write never cuts a frame; a worker that leaves
:data:`~.slots.LINK_LIMIT` bytes unread is killed.  Once a worker is reaped its pid may
belong to anyone: nothing is sent to it any more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..common import exitcodes, messages, proc
from ..common.backoff import Backoff
from ..common.config import Broker, Config
from ..common.errors import ProtocolError
from ..common.messages import LeaseNews, Message
from ..common.sockets import LimitEpisode, Outbox, at_file_limit, receive
from ..common.states import ConnState
from ..common.uri import BrokerURI
from ..common.wire import FrameReader, Kind
from ..worker.faults import HEARTBEATS_MISSED
from ..worker.spec import WorkerSpec
from ..worker.worker import run_worker
from . import control
from .life import Life, judge
from .metrics import RestartReason, Tally
from .slots import LINK_LIMIT, Slot, broker_key, plan
from .system import System

log = logging.getLogger("kzpool.master")

HIDDEN_ORDER = 1_000_000  # hidden brokers sort after every configured one
SPAWN_RETRY = 1.0  # seconds before trying again to fork a worker that could not start
HOLD_MARGIN = 1.0  # seconds past connect_timeout a reconnecting worker stays primary


@dataclass(frozen=True)
class WorkerEvents:
    """What the master hears from its workers beyond their reports."""

    lease_news: Callable[[Slot, LeaseNews], None]
    exited: Callable[[Slot], None]  # its leases are lost


def restart_reason(slot: Slot, status: int) -> RestartReason:
    """Why a worker that is started again ended."""
    if slot.retiring:
        return RestartReason.MEMORY
    if slot.silenced:
        return RestartReason.UNRESPONSIVE
    if os.WIFSIGNALED(status):
        return RestartReason.KILLED
    return RestartReason.CRASHED if os.WEXITSTATUS(status) else RestartReason.EXITED


class WorkerSet:
    def __init__(self, config: Config, system: System, selector: selectors.BaseSelector,
                 events: WorkerEvents, tally: Tally | None = None) -> None:
        self.tally = tally or Tally()  # restarts and missed heartbeats, for the metrics
        self.config = config
        self.settings = config.settings
        self.system = system
        self.selector = selector
        self.events = events
        self.slots: dict[str, Slot] = {}
        self.by_pid: dict[int, Slot] = {}
        self.stopping = False  # the pool stops: nothing is respawned
        self._next_id = 1
        self.readings = LimitEpisode(log, "reading the workers' memory")
        self.spawns = LimitEpisode(log, "starting workers")

    def live(self) -> list[Slot]:
        return [s for s in self.slots.values() if not s.removed]

    def pids(self) -> list[int]:
        return [s.pid for s in self.slots.values() if s.pid]

    # ----- the set --------------------------------------------------------------------------

    def start(self) -> None:
        for broker, index in plan(self.config):
            self.add(broker, index)

    def add(self, broker: Broker, index: int) -> Slot:
        spec = WorkerSpec(f"c{self._next_id}", broker, index, self.settings)
        self._next_id += 1
        slot = Slot(spec, Life(Backoff(self.settings.reconnect_backoff_min,
                                       self.settings.respawn_backoff_max, immediate=True)))
        self.slots[spec.id] = slot
        self._try_spawn(slot, self.system.monotonic())
        return slot

    def add_hidden(self, uri: BrokerURI) -> Broker:
        """A sticky lease names a broker the config does not: connect to it, hidden."""
        broker = Broker(uri, self.config.local_zone, True, HIDDEN_ORDER + self._next_id, True)
        log.info("adding hidden broker %s for a sticky lease", uri.masked)
        for index in range(1, self.settings.connections_per_broker + 1):
            self.add(broker, index)
        return broker

    def find(self, uri: BrokerURI) -> Slot | None:
        """A worker of the broker ``uri`` names (credentials aside)."""
        return next((s for s in self.live() if s.spec.broker.uri.short == uri.short), None)

    def remove(self, slot: Slot) -> None:
        slot.removed = True
        log.info("removing %s", slot.spec.broker.uri.masked)
        if slot.pid:
            self.kill(slot, signal.SIGTERM)
        else:
            self.slots.pop(slot.spec.id, None)

    def reconfigure(self, new: Config) -> None:
        """SIGHUP: keep the workers whose broker stays, remove the others, add new ones."""
        wanted = {(broker_key(b), i): b for b, i in plan(new)}
        kept: set[tuple[str, int]] = set()
        for slot in list(self.slots.values()):
            key = (broker_key(slot.spec.broker), slot.spec.index)
            if slot.spec.broker.hidden:
                continue
            if key in wanted and not slot.removed:
                kept.add(key)
                slot.spec = WorkerSpec(slot.spec.id, wanted[key], slot.spec.index, new.settings)
                if slot.state.final:  # failed for its config: the new one may do
                    slot.state, slot.life.respawn_at = ConnState.DEAD, self.system.monotonic()
            else:
                self.remove(slot)
        self.config, self.settings = new, new.settings
        for key, broker in wanted.items():
            if key not in kept:
                self.add(broker, key[1])

    # ----- processes ------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        """Fork a worker into ``slot``: its link and its lease socket are made before the fork.
        :class:`OSError` (the file limit, no memory to fork) leaves nothing behind."""
        ours, theirs = socket.socketpair()
        try:
            listener = control.bind_worker(self.socket_path(slot))
        except OSError:
            ours.close()
            theirs.close()
            raise
        master_pid = os.getpid()
        try:
            pid = self.system.fork()
        except OSError:
            for sock in (ours, theirs, listener):
                sock.close()
            raise
        if pid == 0:
            code = exitcodes.ERROR
            try:
                code = run_worker(slot.spec, theirs, listener, master_pid)
            except BaseException:
                log.exception("connection worker crashed")
            finally:
                os._exit(code)
        theirs.close()
        listener.close()  # the worker's now; the path stays until the worker is reaped
        ours.setblocking(False)
        now = self.system.monotonic()
        slot.life.born(pid, self.system.process(pid), now)
        slot.link, slot.reader, slot.state, slot.last_seen = ours, FrameReader(), (
            ConnState.STARTING), now
        slot.outbox.close()
        slot.outbox, slot.writing = Outbox(LINK_LIMIT), False
        self.by_pid[pid] = slot
        self.selector.register(ours, selectors.EVENT_READ, lambda _fd: self._on_link(slot))
        self.send(slot, messages.Role(slot.primary))

    def socket_path(self, slot: Slot) -> str:
        return f"{self.settings.socket}.{slot.spec.id}"

    def kill(self, slot: Slot, sig: int) -> None:
        """Signal the slot's worker, if it has one (never pid 0: that is our group)."""
        if slot.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                self.system.kill(slot.pid, sig)

    def exited(self, pid: int, status: int) -> bool:
        """A reaped pid: ``True`` if it was one of our workers (then dealt with)."""
        slot = self.by_pid.pop(pid, None)
        if slot is None:
            return False
        if slot.link is not None:
            self.read_link(slot, to_end=True)  # its last reports may still be unread
            with contextlib.suppress(KeyError, ValueError):  # unregistered already on EOF
                self.selector.unregister(slot.link)
            slot.link.close()
        slot.outbox.close()  # client sockets it never got: their clients ask again
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path(slot))
        slot.life.died()
        slot.link, slot.tried, slot.hold_until = None, True, 0.0
        slot.rss = slot.cpu = slot.prechannels = slot.channels = 0
        self.events.exited(slot)
        if self.stopping or slot.removed:
            if slot.removed:
                self.slots.pop(slot.spec.id, None)
            return True
        now = self.system.monotonic()
        verdict = judge(slot.life, status, now, exitcodes.WORKER_FATAL, slot.retiring)
        reason = restart_reason(slot, status)
        slot.retiring = slot.silenced = False
        if not verdict.respawn:
            slot.state = ConnState.FAILED
            log.error("worker for %s %s: %s; not respawning (SIGHUP retries)",
                      slot.spec.broker.uri.masked, verdict.why, slot.error)
            return True
        slot.state, slot.error = ConnState.DEAD, f"worker {verdict.why}"
        slot.life.respawn_at = now + verdict.delay
        self.tally.inc("worker_restarts", broker=slot.spec.broker.uri.masked,
                       reason=reason.value)
        log.warning("worker for %s %s; respawning in %.1f s", slot.spec.broker.uri.masked,
                    verdict.why, verdict.delay)
        return True

    def spawn_due(self, now: float) -> None:
        for slot in list(self.slots.values()):
            if slot.life.due(now) and not slot.removed:
                self._try_spawn(slot, now)

    def _try_spawn(self, slot: Slot, now: float) -> None:
        """Spawn, or (out of descriptors or memory) try again in :data:`SPAWN_RETRY` s."""
        try:
            self.spawn(slot)
        except OSError as exc:
            slot.state, slot.error = ConnState.DEAD, f"cannot start a worker: {exc}"
            slot.life.respawn_at = now + SPAWN_RETRY
            if at_file_limit(exc):
                self.spawns.hit(exc)  # said once while the limit lasts
                return
            log.error("cannot start a worker for %s (%s); trying again in %g s",
                      slot.spec.broker.uri.masked, exc, SPAWN_RETRY)
            return
        self.spawns.clear()

    def next_respawn(self) -> float | None:
        return min((s.life.respawn_at for s in self.slots.values() if s.life.respawn_at),
                   default=None)

    def check(self, now: float, sample: bool) -> None:
        """Kill a worker silent for ``worker_timeout``; replace one above ``worker_max_rss``."""
        for slot in list(self.slots.values()):
            if not slot.pid:
                continue
            if slot.hold_until and now >= slot.hold_until:
                log.warning("worker %d for %s did not connect again in time; its zone fails"
                            " over", slot.pid, slot.spec.broker.uri.masked)
                slot.hold_until = 0.0
            if now - slot.last_seen > self.settings.worker_timeout:
                log.error("worker %d for %s silent for %.1f s; killing it", slot.pid,
                          slot.spec.broker.uri.masked, now - slot.last_seen)
                slot.silenced = True
                self.kill(slot, signal.SIGKILL)
                slot.last_seen = now
            elif sample:
                self._sample(slot)

    def _sample(self, slot: Slot) -> None:
        """Read a worker's memory and CPU; at the file limit, skip it this time."""
        process = slot.life.process
        if process is None:  # its handle could not be made when it was born (file limit)
            process = slot.life.process = self.system.process(slot.pid)
        reading = proc.rss_and_cpu(process) if process is not None else None
        if reading is None:
            self.readings.hit()
            return
        self.readings.clear()
        slot.rss, slot.cpu = reading
        limit = self.settings.worker_max_rss
        if limit and slot.rss > limit and not slot.retiring:
            log.warning("worker %d for %s uses %d MiB > worker_max_rss; replacing it",
                        slot.pid, slot.spec.broker.uri.masked, slot.rss >> 20)
            slot.retiring = True
            self.kill(slot, signal.SIGTERM)

    # ----- the links ------------------------------------------------------------------------

    def read_link(self, slot: Slot, to_end: bool = False) -> None:
        """Take a worker's reports; ``to_end``: everything up to EOF (it has exited)."""
        while slot.link is not None:
            data = receive(slot.link, 65536)
            if data is None:
                return
            if not data:
                slot.state = ConnState.DEAD  # the reaper will tell why
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(slot.link)
                return
            slot.last_seen = self.system.monotonic()
            try:
                for kind, _flags, payload in slot.reader.feed(data):
                    if kind != Kind.JSON:
                        raise ProtocolError(f"unexpected frame kind {kind}")
                    self._on_message(slot, messages.decode(payload,
                                                           messages.TO_MASTER_FROM_WORKER))
            except ProtocolError as exc:
                log.error("worker %d sent a bad frame (%s)%s", slot.pid, exc,
                          "" if to_end else "; killing it")
                if not to_end:  # reaped already: its pid may be another process's now
                    self.kill(slot, signal.SIGKILL)
                return
            if not to_end:
                return

    def _on_message(self, slot: Slot, message: Message) -> None:
        match message:
            case messages.Report():
                was = slot.state
                slot.apply_report(message)
                self._hold(slot, was)
                if was is ConnState.CONNECTED and slot.error == HEARTBEATS_MISSED:
                    self.tally.inc("missed_heartbeats", connection=slot.spec.id,
                                   broker=slot.spec.broker.uri.masked)
            case messages.LeaseNews():
                self.events.lease_news(slot, message)

    def _hold(self, slot: Slot, was: ConnState) -> None:
        """A worker reconnecting at once (the broker closed its connection for a client's
        call) stays its zone's primary for a connect's time: no failover for a broker that
        is up, and leases wait for that worker rather than move away and back."""
        if slot.state is not ConnState.RECONNECTING:
            slot.hold_until = 0.0
        elif was is not ConnState.RECONNECTING:
            slot.hold_until = self.system.monotonic() + self.settings.connect_timeout + HOLD_MARGIN

    def drain(self) -> None:
        """Read whatever the workers have said, without waiting."""
        for slot in list(self.slots.values()):
            if slot.link is not None and slot.state is not ConnState.DEAD:
                self.read_link(slot)

    def send(self, slot: Slot, message: Message) -> None:
        """Say ``message`` to a worker, now or as soon as its link takes it."""
        if slot.link is not None and self._queue(slot, messages.encode(message)):
            self._flush(slot)

    def pass_socket(self, slot: Slot, sock: socket.socket, adopt: messages.Adopt) -> bool:
        """Hand a client's socket to ``slot``'s worker, with ``adopt``; from ``True`` on the
        socket is the link's (closed here once passed).  ``False``: the link is broken or
        full, and the socket is still the caller's."""
        if slot.link is None or slot.state is ConnState.DEAD:
            return False
        if not self._queue(slot, messages.encode(adopt), sock):
            return False
        self._flush(slot)
        return True

    def _queue(self, slot: Slot, data: bytes, passing: socket.socket | None = None) -> bool:
        if slot.outbox.put(data, passing):
            return True
        log.error("worker %d leaves over %d MiB unread on its link; killing it", slot.pid,
                  LINK_LIMIT >> 20)
        self.kill(slot, signal.SIGKILL)
        slot.state = ConnState.DEAD
        return False

    def _flush(self, slot: Slot) -> None:
        assert slot.link is not None
        try:
            done = slot.outbox.flush(slot.link)
        except OSError:  # the worker is gone: the reaper will tell why
            slot.state, done = ConnState.DEAD, True
            slot.outbox.close()
        if done == slot.writing:
            slot.writing = not done
            if slot.writing:
                log.debug("the link to worker %d is full: %d bytes wait", slot.pid,
                          slot.outbox.size)
            with contextlib.suppress(KeyError, ValueError):  # unregistered on EOF
                self.selector.modify(slot.link, selectors.EVENT_READ | (
                    selectors.EVENT_WRITE if slot.writing else 0), lambda _fd: self._on_link(slot))

    def _on_link(self, slot: Slot) -> None:
        if slot.writing and slot.link is not None:
            self._flush(slot)
        self.read_link(slot)

    def close(self) -> None:
        """The master stops: the workers' socket files go."""
        for slot in self.slots.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path(slot))
