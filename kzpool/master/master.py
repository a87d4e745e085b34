"""The master: forks and supervises the connection workers, the consumers and the registry.

One loop, one :meth:`Master.tick` in a fixed order: wait for I/O (worker links, the lease
socket, the signal pipe), handle recorded signals, reap dead children, place waiting leases,
check the workers' liveness and memory, fork what is missing, publish the tables.  Signal
handlers only record the signal; the tick acts on it.

The parts, each its own object: :class:`~.workers.WorkerSet` (the connection workers),
:class:`~.consumers.ConsumerSet` (the in-service consumers), :class:`~.leasebook.LeaseBook`
(lease placement and fail-back), :class:`~.control.LeaseSocket` (the clients),
:class:`~.registry.Registry` (the shared tables), and the :class:`~.ladder.Ladder` of a stop.

Start-up blocks until the local zone's primary broker is connected (see
:func:`kzpool.master.slots.startup_settled`) or ``startup_timeout`` passes, or every local
broker failed for a reason a retry will not fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
from typing import Any

from ..common import config as config_mod
from ..common import exitcodes, messages, proc, status
from ..common.access import Access
from ..common.config import Config
from ..common.errors import ConfigError, KzpoolError, StartupError
from ..common.messages import Message
from ..common.sockets import LimitEpisode, at_file_limit
from ..common.states import PoolState
from ..common.wakeup import SignalPipe
from . import metrics
from .assign import zone_primary
from .consumers import ConsumerSet
from .control import LeaseSocket, fit_file_limit
from .ladder import Ladder
from .leasebook import LeaseBook
from .life import exit_reason
from .notify import Notifier
from .registry import Registry, Row
from .slots import Slot, broker_key, masked, startup_hopeless, startup_settled
from .system import HANDLED, OsSystem, System
from .workers import WorkerEvents, WorkerSet

log = logging.getLogger("kzpool.master")

FLUSH_INTERVAL = 0.1  # the registry is written at most this often
SAMPLE_INTERVAL = 1.0  # seconds between two RSS/CPU samples of the children


class Master:
    """The pre-fork supervisor.  Not thread-safe; everything runs in :meth:`run`'s loop."""

    def __init__(self, config: Config, system: System | None = None) -> None:
        self.config = config
        self.settings = config.settings
        self.system = system or OsSystem()
        self.pid = os.getpid()
        self.state = PoolState.STARTING
        self.signals = SignalPipe(HANDLED)
        self.selector = selectors.DefaultSelector()
        self.tally = metrics.Tally()  # what the metrics count, by the modules that see it
        self.workers = WorkerSet(config, self.system, self.selector,
                                 WorkerEvents(self._on_lease_news, self._on_worker_exit),
                                 self.tally)
        self.leases = LeaseBook(self.workers, self.selector, self.system, self.tally)
        self.metrics: metrics.Server | None = None
        self.primary_changes = metrics.PrimaryChanges(self.tally)  # failovers, fail-backs
        self.consumers = ConsumerSet(config.consumers, self.settings, self.system,
                                     self.leases.request)
        self.registry = Registry(self.settings.socket, self._registry_child_setup,
                                 self.system.fork)
        self.control: LeaseSocket | None = None
        self.notifier = Notifier()
        self.ladder: Ladder | None = None
        self.next_flush = self.next_sample = 0.0
        self.unflushed = False  # something happened since the registry was last written
        self.primaries: tuple[str | None, ...] = ()
        self.deadline = 0.0  # monotonic: the start-up deadline
        self.exit_code = exitcodes.OK
        self.started_at = self.system.time()
        self.me = self.system.process(self.pid)
        self.rss = 0
        self.readings = LimitEpisode(log, "reading the master's memory")
        self.handlers = LimitEpisode(log, "a socket event")

    # ----- life cycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, return the exit code."""
        proc.set_title("kzpool: master")
        fit_file_limit(self.settings.max_peers,
                       len(self.config.brokers) * self.settings.connections_per_broker)
        self.control = LeaseSocket(self.settings.socket, self.selector,
                                   Access(self.settings.allow_users, self.settings.allow_groups),
                                   self.answer, self.leases.request, self.settings,
                                   lambda: len(self.leases.waiting), self.system.monotonic,
                                   lambda code: self.tally.inc("lease_requests_refused",
                                                               reason=code))
        if self.settings.metrics_port:
            self._serve_metrics()
        self.selector.register(self.signals.install(), selectors.EVENT_READ,
                               lambda _fd: self.signals.drain())
        self.registry.start()
        self.workers.start()
        self.deadline = self.system.monotonic() + self.settings.startup_timeout
        log.info("starting %d connection worker(s); waiting up to %.0f s for the primary",
                 len(self.workers.slots), self.settings.startup_timeout)
        try:
            while self.state is not PoolState.STOPPED:
                self.tick()
        finally:
            self._close()
        return self.exit_code

    def tick(self) -> None:
        self._wait_io(self._timeout())
        self.handle_signals()
        self.reap()
        now = self.system.monotonic()
        self.notifier.tick(now)
        if self.state is PoolState.STARTING:
            self._check_startup(now)
        if self.control is not None:
            self.control.sweep(now)
        if self.metrics is not None:
            self.metrics.expire(now)
        if self.state is PoolState.STOPPING:
            self._check_stop(now)
            return
        if self.registry.restart_due(now):
            self._start_registry()
        self.leases.place_waiting(now)
        sample = now >= self.next_sample
        if sample:
            self.next_sample = now + SAMPLE_INTERVAL
            self.leases.forget_dead_clients()
            self.consumers.sample()
            self._sample_self()
        self.workers.check(now, sample)
        self.workers.spawn_due(now)
        self.consumers.spawn_due(now)
        self._publish(now)

    def _sample_self(self) -> None:
        """The master's own memory, for the pool table; skipped at the file limit."""
        self.me = self.me or self.system.process(self.pid)
        reading = proc.rss_and_cpu(self.me) if self.me is not None else None
        self.readings.hit() if reading is None else self.readings.clear()
        self.rss = reading[0] if reading is not None else self.rss

    def _timeout(self) -> float:
        if self.state is PoolState.STOPPING:
            return 0.05
        now = self.system.monotonic()
        soonest = min(t for t in (self.workers.next_respawn(), self.consumers.next_deadline(),
                                  self.leases.next_deadline(), self.next_sample,
                                  self.notifier.next_ping if self.notifier.watchdog else None,
                                  self.control.next_deadline() if self.control else None,
                                  self.metrics.next_deadline() if self.metrics else None,
                                  self.registry.restart_at or None,
                                  now + 0.05 if self.leases.waiting else None,
                                  self.next_flush if self.unflushed else None)
                      if t is not None)
        return max(0.0, min(SAMPLE_INTERVAL, soonest - now))

    def _check_startup(self, now: float) -> None:
        if startup_settled(self.workers.slots.values()):
            self.state = PoolState.RUNNING
            primary = zone_primary(self.workers.slots.values(), self.config.local_zone)
            log.info("ready in %.2f s; primary %s", self.system.time() - self.started_at,
                     masked(self.workers.slots.values(), primary))
            self.consumers.start()
            self.notifier.ready(self.summary())
        elif now >= self.deadline or startup_hopeless(self.workers.slots.values()):
            tried = "; ".join(f"{s.spec.broker.uri.masked}: {s.error or s.state.value}"
                              for s in self.workers.slots.values() if s.spec.broker.local)
            why = (f" after {self.settings.startup_timeout:g} s" if now >= self.deadline
                   else ": every local broker failed for good")
            error = StartupError(f"no local primary broker{why} ({tried})")
            log.error("%s", error)
            self.exit_code = exitcodes.STARTUP
            self.stop(graceful=True)

    def stop(self, graceful: bool) -> None:
        """Begin (or hurry) the shutdown ladder."""
        now = self.system.monotonic()
        if self.ladder is None:
            log.info("stopping (%s)", "graceful" if graceful else "quick")
            self.notifier.stopping()
            self.state = PoolState.STOPPING
            self.workers.stopping = self.consumers.stopping = True
            if self.control is not None:
                self.control.accepting_leases = False
            self.ladder = Ladder(self.settings.shutdown_timeout, now)
            self._send(self.ladder.begin(self.consumers.pids()).signals)
        if not graceful:
            self.ladder.hurry(now)

    def _check_stop(self, now: float) -> None:
        assert self.ladder is not None
        consumers, workers = self.consumers.pids(), self.workers.pids()
        step = self.ladder.step(now, consumers, workers, self.registry.pid,
                                self.registry.tables is not None)
        if step.final_reap:
            log.warning("shutdown_timeout passed; killing %d worker(s)", len(workers))
        elif step.signals and consumers:
            log.warning("%d consumer(s) still busy; killing them", len(consumers))
        self._send(step.signals)
        if step.stop_registry:
            self.registry.stop()  # the workers are gone: the tables may go too
        if step.final_reap:
            self._final_reap([*consumers, *workers, self.registry.pid])
        if step.done:
            self.state = PoolState.STOPPED

    def _send(self, signals: list[tuple[list[int], int]]) -> None:
        for pids, sig in signals:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    self.system.kill(pid, sig)

    def _final_reap(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                if pid:
                    self.system.waitpid(pid, 0)
        self.registry.forget()

    def _close(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        self.workers.close()
        self.registry.close()
        log.info("stopped")

    # ----- signals and children ---------------------------------------------------------------

    def handle_signals(self) -> None:
        while (signum := self.signals.take()) is not None:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop(graceful=self.state is not PoolState.STOPPING)
            elif signum == signal.SIGQUIT:
                self.stop(graceful=False)
            elif signum == signal.SIGHUP:
                self.handle_hup()

    def reap(self) -> None:
        """Reap every child that exited; say why each one did."""
        while True:
            try:
                pid, wait_status = self.system.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.registry.pid:
                self._registry_died(wait_status)
            elif not self.workers.exited(pid, wait_status):
                self.consumers.exited(pid, wait_status)

    def _registry_died(self, wait_status: int) -> None:
        self.registry.forget()
        if self.state is PoolState.STOPPING:
            return
        if self.registry.restart_at:  # killed by us: it did not answer
            log.info("the registry that did not answer is gone; a new one follows")
            return
        log.error("the registry process %s; starting a new one", exit_reason(wait_status))
        self._start_registry()

    def _start_registry(self) -> None:
        """A new registry, written again from the workers' latest reports; if it does not
        answer, it is killed and another one tried a little later."""
        try:
            self.registry.start()
        except (KzpoolError, OSError, EOFError) as exc:
            self.registry.abandon(f"{type(exc).__name__}: {exc}", self.system.monotonic())
            return
        self.leases.dirty.update(self.leases.rows)
        for slot in self.workers.slots.values():
            self.workers.send(slot, messages.ReportNow())

    def _registry_child_setup(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.close_fds_except(0, 1, 2)
        proc.die_with_parent(signal.SIGKILL)
        proc.set_title("kzpool: registry")

    def _on_lease_news(self, slot: Slot, news: messages.LeaseNews) -> None:
        self.leases.on_news(slot, news)

    def _on_worker_exit(self, slot: Slot) -> None:
        self.leases.on_worker_exit(slot)

    def handle_hup(self) -> None:
        """Re-read the config: add and remove brokers, leave unchanged connections alone,
        apply changed consumer sections."""
        if self.state is PoolState.STOPPING:
            return
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            self.notifier.ready(self.summary())
            return
        brokers_changed = [(b.uri, b.zone) for b in new.brokers] != [
            (b.uri, b.zone) for b in self.config.brokers]
        self.workers.reconfigure(new)
        self.consumers.reconfigure(new.consumers, new.settings, brokers_changed,
                                   self.state is PoolState.RUNNING)
        self.config, self.settings = new, new.settings
        if self.control is not None:
            self.control.access = Access(new.settings.allow_users, new.settings.allow_groups)
            self.control.limits = new.settings
        fit_file_limit(new.settings.max_peers, len(self.workers.slots))
        log.info("reloaded %s: %d connection worker(s)", new.path, len(self.workers.slots))
        self.notifier.ready(self.summary())

    # ----- I/O --------------------------------------------------------------------------------

    def _wait_io(self, timeout: float) -> None:
        registered = self.selector.get_map()
        for key, _events in self.selector.select(timeout):
            self.unflushed = True  # what it changed reaches the registry within FLUSH_INTERVAL
            if registered.get(key.fd) is key:  # an earlier handler may have dropped it
                try:
                    key.data(key.fd)
                except OSError as exc:  # a file or socket it could not open: next time
                    if not at_file_limit(exc):
                        raise
                    self.handlers.hit(exc)
                else:
                    self.handlers.clear()

    def _serve_metrics(self) -> None:
        collector = metrics.Collector(lambda: self.workers.slots.values(),
                                      lambda: self.leases.rows.values(),
                                      lambda: self.leases.moves, self.tally.snapshot)
        self.metrics = metrics.Server(
            metrics.listen(self.settings.metrics_address, self.settings.metrics_port),
            self.selector, collector, lambda: status.health(self.status()),
            self.system.monotonic)

    def answer(self, request: Message) -> dict[str, Any]:
        """A document for ``ping``, ``status`` or ``brokers``."""
        match request:
            case messages.StatusRequest():
                return self.status()
            case messages.Ping():
                return {"pid": self.pid, "state": self.state.value}
            case messages.BrokersRequest():
                rows = [s.row() for s in self.workers.live()]
                return {"local_zone": self.config.local_zone, "brokers": [
                    {"broker": b["broker"], "zone": b["zone"], "hidden": b["hidden"],
                     "available": b["available"] > 0}
                    for b in status.broker_summary(rows, [])]}
        raise KzpoolError(f"unknown request {request.OP!r}", op=request.OP)

    # ----- the tables -------------------------------------------------------------------------

    def _publish(self, now: float) -> None:
        """Recompute the primary, tell workers whose role changed, fail back, write tables."""
        primaries = tuple(zone_primary(self.workers.slots.values(), z) for z in self.config.zones)
        for slot in self.workers.slots.values():
            is_primary = broker_key(slot.spec.broker) in primaries  # of its own zone
            if is_primary != slot.primary:
                slot.primary = is_primary
                self.workers.send(slot, messages.Role(is_primary))
        if primaries != self.primaries:
            self.primaries = primaries
            self.leases.check_moves = True
            self.primary_changes.seen(self.config.zones, primaries,
                                      {broker_key(b): b.order for b in self.config.brokers})
        self.leases.fail_back()
        if now >= self.next_flush:
            self.flush_registry()
            if self.state is PoolState.RUNNING and self.notifier.address:
                self.notifier.status(self.summary())

    def _rows(self) -> dict[str, dict[str, Row]]:
        """Every table but the assignments (the lease book keeps those), as rows by key."""
        pool = {"pid": self.pid, "state": self.state.value, "config": self.config.path,
                "socket": self.settings.socket, "local_zone": self.config.local_zone,
                "rss": self.rss}
        return {"connections": {s.spec.id: s.row() for s in self.workers.slots.values()},
                "consumers": {f"{c.consumer.name}#{c.index}": c.row()
                              for c in self.consumers.slots},
                "pool": {"pool": pool}}

    def flush_registry(self) -> None:
        """Write the rows that changed to the registry (at most every FLUSH_INTERVAL)."""
        now = self.system.monotonic()
        self.next_flush, self.unflushed = now + FLUSH_INTERVAL, False
        if self.registry.tables is not None:
            self.registry.write(self._rows(), *self.leases.changes(), now)

    def status(self) -> dict[str, Any]:
        rows = self._rows()
        return status.document({"connections": list(rows["connections"].values()),
                                "consumers": list(rows["consumers"].values()),
                                "pool": list(rows["pool"].values()),
                                "assignments": self.leases.table()})

    def summary(self) -> str:
        """systemd's one-line STATUS."""
        slots = self.workers.slots.values()
        up = sum(1 for s in slots if s.available)
        primary = zone_primary(slots, self.config.local_zone)
        leases = sum(1 for r in self.leases.rows.values() if r.state.placed)
        return (f"{up}/{len(self.workers.slots)} connections up, primary"
                f" {masked(self.workers.slots.values(), primary)}, {leases} leases")
