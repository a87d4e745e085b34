"""The master's children: forking, reaping and watching connection workers and the registry.

A mixin of :class:`kzpool.master.Master`, kept apart so that each file holds one idea: this
one is gunicorn's ``spawn_worker``/``reap_workers``/``murder_workers``.  It runs in the
master's loop only.  Hazards: ``reap`` must be the only ``waitpid`` in the process (it reaps
the registry too); a worker exiting with :data:`~kzpool.exitcodes.WORKER_FATAL` is not
respawned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

import psutil

from ..common import exitcodes, proc, wire
from ..common.backoff import Backoff
from ..common.config import Broker, Consumer
from ..common.states import ConnState, PoolState, ProcState
from ..common.uri import BrokerURI
from ..consumer.process import CONSUMER_LEASE_TIMEOUT, run_consumer
from ..worker.worker import WorkerSpec, run_worker
from . import control
from .slots import STABLE_AFTER, ConsumerSlot, Slot

if TYPE_CHECKING:
    from ..common.config import Config, Settings
    from .leasebook import LeaseBook
    from .registry import Registry

log = logging.getLogger("kzpool.master")

SAMPLE_INTERVAL = 1.0  # seconds between two RSS/CPU samples of the workers
HIDDEN_ORDER = 1_000_000  # hidden brokers sort after every configured one
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)


class Children:
    """Forks, reaps and watches; the state it uses is the master's."""

    pid: int
    state: PoolState
    config: Config
    settings: Settings
    slots: dict[str, Slot]
    by_pid: dict[int, Slot]
    consumers: list[ConsumerSlot]
    by_consumer_pid: dict[int, ConsumerSlot]  # every live consumer, retired ones included
    selector: selectors.BaseSelector
    registry: Registry
    leases: LeaseBook
    written: dict[str, dict[str, Any]]
    next_id: int
    next_sample: float

    def send(self, slot: Slot, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _read_link(self, slot: Slot, to_end: bool = False) -> None:
        raise NotImplementedError

    def _new_id(self) -> str:
        self.next_id += 1
        return f"c{self.next_id - 1}"

    def _add_slot(self, spec: WorkerSpec) -> Slot:
        slot = Slot(spec, Backoff(self.settings.reconnect_backoff_min,
                                  self.settings.respawn_backoff_max, immediate=True))
        self.slots[spec.id] = slot
        self._spawn(slot)
        return slot

    def add_hidden_broker(self, uri: BrokerURI) -> Broker:
        """A sticky lease names a broker the config does not: connect to it, hidden."""
        broker = Broker(uri, self.config.local_zone, True, HIDDEN_ORDER + self.next_id, True)
        log.info("adding hidden broker %s for a sticky lease", uri.masked)
        for index in range(1, self.settings.connections_per_broker + 1):
            self._add_slot(WorkerSpec(self._new_id(), broker, index, self.settings))
        return broker
    def _remove_slot(self, slot: Slot) -> None:
        slot.removed = True
        log.info("removing %s", slot.spec.broker.uri.masked)
        if slot.pid:
            os.kill(slot.pid, signal.SIGTERM)
        else:
            self._forget_slot(slot)

    def _forget_slot(self, slot: Slot) -> None:
        self.slots.pop(slot.spec.id, None)

    def _spawn(self, slot: Slot) -> None:
        """Fork a worker into ``slot``: its link and its lease socket are made before the fork."""
        ours, theirs = socket.socketpair()
        listener = control.bind_worker(self._worker_socket(slot))
        pid = os.fork()
        if pid == 0:
            code = exitcodes.ERROR
            try:
                code = run_worker(slot.spec, theirs, listener, self.pid)
            except BaseException:
                log.exception("connection worker crashed")
            finally:
                os._exit(code)
        theirs.close()
        listener.close()  # the worker's now; the path stays until the worker is reaped
        ours.setblocking(False)
        now = time.monotonic()
        slot.pid, slot.link, slot.process = pid, ours, psutil.Process(pid)
        slot.state, slot.started, slot.last_seen, slot.respawn_at = (
            ConnState.STARTING, now, now, 0.0)
        slot.reader = wire.FrameReader()
        self.by_pid[pid] = slot
        self.selector.register(ours, selectors.EVENT_READ, lambda _fd: self._read_link(slot))
        self.send(slot, {"op": "role", "primary": slot.primary})

    def _worker_socket(self, slot: Slot) -> str:
        return f"{self.settings.socket}.{slot.spec.id}"

    def _registry_child_setup(self, keep: int) -> None:
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.close_fds_except(0, 1, 2, keep)
        proc.die_with_parent(signal.SIGKILL)
        proc.set_title("kzpool: registry")

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.registry.pid:
                self.handle_registry_death(status)
            elif pid in self.by_pid:
                self.handle_worker_exit(self.by_pid.pop(pid), status)
            elif pid in self.by_consumer_pid:
                self.handle_consumer_exit(self.by_consumer_pid.pop(pid), status)

    def handle_worker_exit(self, slot: Slot, status: int) -> None:
        why = _exit_reason(status)
        if slot.link is not None:
            self._read_link(slot, to_end=True)  # its last report may still be unread
            with contextlib.suppress(KeyError):  # unregistered already on EOF
                self.selector.unregister(slot.link)
            slot.link.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._worker_socket(slot))
        slot.pid, slot.link, slot.process, slot.tried = 0, None, None, True
        slot.rss = slot.cpu = slot.prechannels = slot.channels = 0
        self.leases.on_worker_exit(slot)
        if self.state is PoolState.STOPPING or slot.removed:
            if slot.removed:
                self._forget_slot(slot)
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == exitcodes.WORKER_FATAL:
            slot.state = ConnState.FAILED
            log.error("worker for %s %s: %s; not respawning (SIGHUP retries)",
                      slot.spec.broker.uri.masked, why, slot.error)
            return
        if slot.retiring or time.monotonic() - slot.started > STABLE_AFTER:
            slot.backoff.reset()
        delay = slot.backoff.next_delay()
        slot.retiring = False
        slot.state, slot.error = ConnState.DEAD, f"worker {why}"
        slot.respawn_at = time.monotonic() + delay
        log.warning("worker for %s %s; respawning in %.1f s", slot.spec.broker.uri.masked,
                    why, delay)

    def handle_registry_death(self, status: int) -> None:
        self.registry.forget()
        if self.state is PoolState.STOPPING:
            return
        log.error("the registry process %s; starting a new one", _exit_reason(status))
        self.registry.start()
        self.written.clear()  # rewrite every row from the workers' reports
        self.leases.dirty.update(self.leases.rows)
        for slot in self.slots.values():
            self.send(slot, {"op": "report"})

    def _check_workers(self, now: float) -> None:
        sample = now >= self.next_sample
        if sample:
            self.next_sample = now + SAMPLE_INTERVAL
            self.leases.forget_dead_clients()
        for slot in list(self.slots.values()):
            if not slot.pid or slot.process is None:
                continue
            if now - slot.last_seen > self.settings.worker_timeout:
                log.error("worker %d for %s silent for %.1f s; killing it", slot.pid,
                          slot.spec.broker.uri.masked, now - slot.last_seen)
                os.kill(slot.pid, signal.SIGKILL)
                slot.last_seen = now
            elif sample:
                self._sample(slot)
        if sample:
            for consumer in self.consumers:
                if consumer.process is not None:
                    consumer.rss = proc.rss_and_cpu(consumer.process)[0]

    def _sample(self, slot: Slot) -> None:
        assert slot.process is not None
        slot.rss, slot.cpu = proc.rss_and_cpu(slot.process)
        limit = self.settings.worker_max_rss
        if limit and slot.rss > limit and not slot.retiring:
            log.warning("worker %d for %s uses %d MiB > worker_max_rss; replacing it",
                        slot.pid, slot.spec.broker.uri.masked, slot.rss >> 20)
            slot.retiring = True
            os.kill(slot.pid, signal.SIGTERM)

    def _spawn_missing(self, now: float) -> None:
        for slot in list(self.slots.values()):
            if not slot.pid and slot.respawn_at and now >= slot.respawn_at and not slot.removed:
                self._spawn(slot)
        for consumer in self.consumers:
            if not consumer.pid and consumer.respawn_at and now >= consumer.respawn_at:
                self._spawn_consumer(consumer)
        self._kill_retired(now)

    # ----- in-service consumers -----------------------------------------------------------

    def consumer_slots(self, consumer: Consumer) -> list[ConsumerSlot]:
        return [ConsumerSlot(consumer, i, Backoff(self.settings.reconnect_backoff_min,
                                                  self.settings.respawn_backoff_max))
                for i in range(1, consumer.settings.processes + 1)]

    def reload_consumers(self, consumers: tuple[Consumer, ...], brokers_changed: bool) -> None:
        """Apply the ``[consumer:*]`` sections of a reloaded config.

        An unchanged section keeps its processes (one that could not load its handler is
        tried again: the handler may have been fixed).  A changed or removed section's
        processes are retired: SIGTERM, so they finish the message in hand, and SIGKILL
        after ``shutdown_timeout``.  A changed or new section starts its processes at once.
        A federating section counts as changed when the brokers did: its federators follow.
        """
        now = time.monotonic()
        wanted = {c.name: c for c in consumers}
        kept: dict[str, list[ConsumerSlot]] = {}
        for slot in self.consumers:
            same = wanted.get(slot.consumer.name) == slot.consumer
            if same and not (brokers_changed and slot.consumer.settings.federate):
                kept.setdefault(slot.consumer.name, []).append(slot)
                if slot.state is ProcState.FAILED:
                    slot.state, slot.error, slot.respawn_at = ProcState.DEAD, None, now
            else:
                self._retire_consumer(slot, now)
        self.consumers = []
        for consumer in consumers:
            slots = kept.get(consumer.name)
            if slots is None:
                slots = self.consumer_slots(consumer)
                log.info("consumer %s: starting %d process(es) with its new section",
                         consumer.name, len(slots))
                for slot in slots:
                    slot.respawn_at = now if self.state is PoolState.RUNNING else 0.0
            self.consumers += slots

    def _retire_consumer(self, slot: ConsumerSlot, now: float) -> None:
        slot.retired, slot.respawn_at = True, 0.0
        if slot.pid:
            log.info("%s: its section changed or went; stopping it", slot.title)
            slot.kill_at = now + self.settings.shutdown_timeout
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)

    def _kill_retired(self, now: float) -> None:
        for slot in self.by_consumer_pid.values():
            if slot.retired and slot.kill_at and now >= slot.kill_at:
                log.warning("%s still busy %g s after it was told to stop; killing it",
                            slot.title, self.settings.shutdown_timeout)
                slot.kill_at = 0.0
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)

    def _spawn_consumer(self, slot: ConsumerSlot) -> None:
        """Fork one consumer process and ask for its lease on its behalf, on a socket pair:
        the child waits for the answer on its end while it imports its handler."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            code = exitcodes.ERROR
            try:
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                proc.close_fds_except(0, 1, 2, theirs.fileno())
                code = run_consumer(slot.consumer, slot.index, self.settings.socket, self.pid,
                                    self.settings.shutdown_timeout, theirs)
            except BaseException:
                log.exception("%s crashed", slot.title)
            finally:
                os._exit(code)
        theirs.close()
        s = slot.consumer.settings
        self.leases.request(ours, {"op": "lease", "kind": s.lease, "broker": s.broker,
                                   "timeout": CONSUMER_LEASE_TIMEOUT}, client_pid=pid)
        slot.pid, slot.process = pid, psutil.Process(pid)
        slot.state, slot.started, slot.respawn_at = ProcState.RUNNING, time.monotonic(), 0.0
        slot.since = time.time()
        self.by_consumer_pid[pid] = slot

    def handle_consumer_exit(self, slot: ConsumerSlot, status: int) -> None:
        why = _exit_reason(status)
        slot.pid, slot.process, slot.rss, slot.state = 0, None, 0, ProcState.DEAD
        if self.state is PoolState.STOPPING or slot.retired:
            return
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if code == exitcodes.CONSUMER_BOOT:
            slot.state = ProcState.FAILED
            slot.error = f"cannot load {slot.consumer.settings.handler}"
            log.error("%s %s; not restarting (fix the handler, then reload: SIGHUP)",
                      slot.title, why)
            return
        recycled = code == exitcodes.OK
        if recycled or time.monotonic() - slot.started > STABLE_AFTER:
            slot.backoff.reset()
        delay = 0.0 if recycled else slot.backoff.next_delay()
        slot.restarts += 1
        slot.error = None if recycled else f"process {why}"
        slot.respawn_at = time.monotonic() + delay
        log.log(logging.INFO if recycled else logging.WARNING, "%s %s; starting another in %.1f s",
                slot.title, "recycled" if recycled else why, delay)


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return exitcodes.describe(os.WEXITSTATUS(status))
