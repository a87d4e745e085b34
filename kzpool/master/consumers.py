"""The master's in-service consumers: the processes of the ``[consumer:NAME]`` sections.

Each process is forked with one end of a socket pair, on which the master asks for its first
lease on its behalf (so the first lease needs no access to the pool's socket); the child
imports its handler meanwhile.  A crashed process is started again by the one rule of
:mod:`.life`; one whose handler cannot load (:data:`~kzpool.common.exitcodes.CONSUMER_BOOT`)
is marked failed; one that exits 0 was recycled (``max_messages``, ``max_rss``) and is
replaced at once.  Runs in the master's loop only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable

from ..common import exitcodes, proc
from ..common.backoff import Backoff
from ..common.config import Consumer
from ..common.messages import LeaseRequest
from ..common.options import LeaseOptions
from ..common.settings import PoolSettings
from ..common.sockets import LimitEpisode
from ..common.states import ProcState
from ..consumer.process import CONSUMER_LEASE_TIMEOUT, run_consumer
from .life import Life, judge
from .slots import ConsumerSlot
from .system import System

log = logging.getLogger("kzpool.master")

# ask for a lease for a client: its socket, the request, the client's pid
RequestLease = Callable[[socket.socket, LeaseRequest, int], None]


class ConsumerSet:
    def __init__(self, consumers: tuple[Consumer, ...], settings: PoolSettings, system: System,
                 request_lease: RequestLease) -> None:
        self.settings = settings
        self.system = system
        self.request_lease = request_lease
        self.slots = [s for c in consumers for s in self._slots_of(c)]
        self.by_pid: dict[int, ConsumerSlot] = {}  # every live one, retired ones included
        self.stopping = False  # the pool stops: nothing is restarted
        self.readings = LimitEpisode(log, "reading the consumers' memory")

    def pids(self) -> list[int]:
        return list(self.by_pid)

    def _slots_of(self, consumer: Consumer) -> list[ConsumerSlot]:
        return [ConsumerSlot(consumer, i, Life(Backoff(self.settings.reconnect_backoff_min,
                                                       self.settings.respawn_backoff_max)))
                for i in range(1, consumer.settings.processes + 1)]

    def start(self) -> None:
        now = self.system.monotonic()
        for slot in self.slots:
            self._try_spawn(slot, now)

    def _try_spawn(self, slot: ConsumerSlot, now: float) -> None:
        """Spawn, or (out of descriptors or memory to fork) try again a second later."""
        try:
            self.spawn(slot)
        except OSError as exc:
            slot.life.respawn_at = now + 1.0
            log.error("cannot start %s (%s); trying again in 1 s", slot.title, exc)

    def spawn(self, slot: ConsumerSlot) -> None:
        """Fork one consumer process and ask for its lease on its behalf, on a socket pair:
        the child waits for the answer on its end while it imports its handler."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        master_pid = os.getpid()
        try:
            pid = self.system.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            code = exitcodes.ERROR
            try:
                proc.close_fds_except(0, 1, 2, theirs.fileno())
                code = run_consumer(slot.consumer, slot.index, self.settings.socket, master_pid,
                                    self.settings.shutdown_timeout, theirs)
            except BaseException:
                log.exception("%s crashed", slot.title)
            finally:
                os._exit(code)
        theirs.close()
        s = slot.consumer.settings
        options = LeaseOptions.of(s.lease, broker=s.broker or None,
                                  timeout=CONSUMER_LEASE_TIMEOUT)
        self.request_lease(ours, LeaseRequest(options, wait=CONSUMER_LEASE_TIMEOUT), pid)
        slot.life.born(pid, self.system.process(pid), self.system.monotonic())
        slot.state, slot.since = ProcState.RUNNING, self.system.time()
        self.by_pid[pid] = slot

    def exited(self, pid: int, status: int) -> bool:
        """A reaped pid: ``True`` if it was one of our consumers (then dealt with)."""
        slot = self.by_pid.pop(pid, None)
        if slot is None:
            return False
        slot.life.died()
        slot.rss, slot.state = 0, ProcState.DEAD
        if self.stopping or slot.retired:
            return True
        now = self.system.monotonic()
        recycled = os.WIFEXITED(status) and os.WEXITSTATUS(status) == exitcodes.OK
        verdict = judge(slot.life, status, now, exitcodes.CONSUMER_BOOT, recycled)
        if not verdict.respawn:
            slot.state = ProcState.FAILED
            slot.error = f"cannot load {slot.consumer.settings.handler}"
            log.error("%s %s; not restarting (fix the handler, then reload: SIGHUP)",
                      slot.title, verdict.why)
            return True
        slot.error = None if recycled else f"process {verdict.why}"
        slot.life.respawn_at = now + verdict.delay
        log.log(logging.INFO if recycled else logging.WARNING,
                "%s %s; starting another in %.1f s", slot.title,
                "recycled" if recycled else verdict.why, verdict.delay)
        return True

    def spawn_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.life.due(now):
                self._try_spawn(slot, now)
        for slot in self.by_pid.values():
            if slot.retired and slot.kill_at and now >= slot.kill_at:
                log.warning("%s still busy %g s after it was told to stop; killing it",
                            slot.title, self.settings.shutdown_timeout)
                slot.kill_at = 0.0
                self._kill(slot.pid, signal.SIGKILL)

    def next_deadline(self) -> float | None:
        times = [s.life.respawn_at for s in self.slots if s.life.respawn_at]
        times += [s.kill_at for s in self.by_pid.values() if s.kill_at]
        return min(times, default=None)

    def sample(self) -> None:
        """Read each consumer's memory; at the file limit, skip the readings this time."""
        for slot in self.slots:
            if not slot.pid:
                continue
            if slot.life.process is None:  # not made when it was born (the file limit)
                slot.life.process = self.system.process(slot.pid)
            reading = proc.rss_and_cpu(slot.life.process) if slot.life.process else None
            if reading is None:
                self.readings.hit()
                return
            self.readings.clear()
            slot.rss = reading[0]

    def _kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.system.kill(pid, sig)

    def reconfigure(self, consumers: tuple[Consumer, ...], settings: PoolSettings,
                    brokers_changed: bool, running: bool) -> None:
        """Apply the ``[consumer:*]`` sections of a reloaded config.

        An unchanged section keeps its processes (one that could not load its handler is
        tried again: the handler may have been fixed).  A changed or removed section's
        processes are retired: SIGTERM, so they finish the message in hand, and SIGKILL
        after ``shutdown_timeout``.  A changed or new section starts its processes at once
        (once the pool runs).  A federating section counts as changed when the brokers did:
        its federators follow.
        """
        now = self.system.monotonic()
        kept, retire = changed_sections(self.slots, consumers, brokers_changed)
        self.settings = settings
        for slot in retire:
            self._retire(slot, now)
        for slots in kept.values():
            for slot in slots:
                if slot.state is ProcState.FAILED:
                    slot.state, slot.error, slot.life.respawn_at = ProcState.DEAD, None, now
        self.slots = []
        for consumer in consumers:
            same = kept.get(consumer.name)
            if same is None:
                same = self._slots_of(consumer)
                log.info("consumer %s: starting %d process(es) with its new section",
                         consumer.name, len(same))
                for slot in same:
                    slot.life.respawn_at = now if running else 0.0
            self.slots += same

    def _retire(self, slot: ConsumerSlot, now: float) -> None:
        slot.retired, slot.life.respawn_at = True, 0.0
        if slot.pid:
            log.info("%s: its section changed or went; stopping it", slot.title)
            slot.kill_at = now + self.settings.shutdown_timeout
            self._kill(slot.pid, signal.SIGTERM)


def changed_sections(slots: list[ConsumerSlot], consumers: tuple[Consumer, ...],
                     brokers_changed: bool) -> tuple[dict[str, list[ConsumerSlot]],
                                                     list[ConsumerSlot]]:
    """SIGHUP's diff of consumer sections: the slots kept (by section) and those to retire."""
    wanted = {c.name: c for c in consumers}
    kept: dict[str, list[ConsumerSlot]] = {}
    retire = []
    for slot in slots:
        same = wanted.get(slot.consumer.name) == slot.consumer
        if same and not (brokers_changed and slot.consumer.settings.federate):
            kept.setdefault(slot.consumer.name, []).append(slot)
        else:
            retire.append(slot)
    return kept, retire
