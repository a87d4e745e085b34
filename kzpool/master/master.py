"""The master: forks and supervises the connection workers and the registry.

One loop, one :meth:`Master.tick` in a fixed order: wait for I/O (worker links, the lease
socket, the signal pipe), handle recorded signals, reap dead children, check the workers'
liveness and memory, fork what is missing, publish the tables.  Signal handlers only record
the signal; the tick acts on it.

Start-up blocks until the local zone's primary broker is connected (see
:func:`kzpool.slots.startup_settled`) or ``startup_timeout`` passes.  Stopping is a ladder:
SIGTERM to every child, wait up to ``shutdown_timeout``, SIGKILL what is left, final reap;
a second SIGTERM/SIGINT (or SIGQUIT) skips the wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from typing import Any

import psutil

from ..common import config as config_mod
from ..common import exitcodes, proc, wire
from ..common.access import Access
from ..common.config import Config
from ..common.errors import ConfigError, KzpoolError, ProtocolError, StartupError
from ..common.states import ConnState, PoolState
from ..worker.worker import WorkerSpec
from . import control, metrics
from .assign import broker_summary, zone_primary
from .children import HANDLED_SIGNALS, SAMPLE_INTERVAL, Children
from .leasebook import LeaseBook
from .notify import Notifier
from .registry import Registry
from .slots import ConsumerSlot, Slot, broker_key, plan, startup_settled

log = logging.getLogger("kzpool.master")

FLUSH_INTERVAL = 0.1  # the registry is written at most this often


class Master(Children):
    """The pre-fork supervisor.  Not thread-safe; everything runs in :meth:`run`'s loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.settings
        self.pid = os.getpid()
        self.state = PoolState.STARTING
        self.slots: dict[str, Slot] = {}
        self.by_pid: dict[int, Slot] = {}
        self.consumers = [s for c in config.consumers for s in self.consumer_slots(c)]
        self.by_consumer_pid: dict[int, ConsumerSlot] = {}
        self.workers_stopping = False
        self.signals: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.registry = Registry(self._registry_child_setup)
        self.listener: socket.socket | None = None
        self.peers: dict[int, control.Peer] = {}
        self.written: dict[str, dict[str, Any]] = {}
        self.leases = LeaseBook(self)
        self.notifier = Notifier()
        self.access = Access(self.settings.allow_users, self.settings.allow_groups)
        self.next_flush = 0.0
        self.primaries: tuple[str | None, ...] = ()
        self.next_id = 1
        self.deadline = 0.0  # monotonic: start-up or stop deadline
        self.next_sample = 0.0
        self.exit_code = exitcodes.OK
        self.started_at = time.time()

    # ----- life cycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, return the exit code."""
        proc.set_title("kzpool: master")
        self.listener = control.bind(self.settings.socket)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        if self.settings.metrics_port:
            scrapes = metrics.listen(self.settings.metrics_address, self.settings.metrics_port)
            collector = metrics.Collector(self)
            self.selector.register(scrapes, selectors.EVENT_READ,
                                   lambda _fd: self._scrape(scrapes, collector))
        self._install_signals()
        self.registry.start()
        for broker, index in plan(self.config):
            self._add_slot(WorkerSpec(self._new_id(), broker, index, self.settings))
        self.deadline = time.monotonic() + self.settings.startup_timeout
        log.info("starting %d connection worker(s); waiting up to %.0f s for the primary",
                  len(self.slots), self.settings.startup_timeout)
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
        now = time.monotonic()
        self.notifier.tick(now)
        if self.state is PoolState.STARTING:
            self._check_startup(now)
        if self.state is PoolState.STOPPING:
            self._check_stop(now)
            return
        self.leases.place_waiting(now)
        self._check_workers(now)
        self._spawn_missing(now)
        self._publish(now)

    def _timeout(self) -> float:
        if self.state is PoolState.STOPPING:
            return 0.05
        waits = [s.respawn_at for s in self.slots.values() if s.respawn_at]
        waits += [c.respawn_at for c in self.consumers if c.respawn_at]
        waits += [c.kill_at for c in self.by_consumer_pid.values() if c.kill_at]
        deadline = self.leases.next_deadline()
        soonest = min([*waits, self.next_sample, deadline or self.next_sample])
        if self.notifier.watchdog:
            soonest = min(soonest, self.notifier.next_ping)
        if self.leases.waiting:
            soonest = min(soonest, time.monotonic() + 0.05)
        return max(0.0, min(SAMPLE_INTERVAL, soonest - time.monotonic()))

    def _check_startup(self, now: float) -> None:
        if startup_settled(self.slots.values()):
            self.state = PoolState.RUNNING
            primary = zone_primary(self.slots.values(), self.config.local_zone)
            log.info("ready in %.2f s; primary %s", time.time() - self.started_at,
                     self._masked(primary))
            for consumer in self.consumers:
                self._spawn_consumer(consumer)
            self.notifier.ready(self.summary())
        elif now >= self.deadline:
            tried = "; ".join(f"{s.spec.broker.uri.masked}: {s.error or s.state.value}"
                              for s in self.slots.values() if s.spec.broker.local)
            error = StartupError(f"no local primary broker after {self.settings.startup_timeout:g}"
                                 f" s ({tried})")
            log.error("%s", error)
            self.exit_code = exitcodes.STARTUP
            self.stop(graceful=True)

    def stop(self, graceful: bool) -> None:
        """Begin (or hurry) the shutdown ladder."""
        if self.state is PoolState.STOPPING and graceful:
            return
        if self.state is not PoolState.STOPPING:
            log.info("stopping (%s)", "graceful" if graceful else "quick")
            self.notifier.stopping()
            self.state = PoolState.STOPPING
            self.deadline = time.monotonic() + self.settings.shutdown_timeout
            self._kill(self._consumer_pids(), signal.SIGTERM)  # they finish, then workers go
        if not graceful:
            self.deadline = time.monotonic()

    def _check_stop(self, now: float) -> None:
        consumers = self._consumer_pids()
        grace = min(1.0, self.settings.shutdown_timeout / 3)  # left for the workers to close
        if not self.workers_stopping and (not consumers or now >= self.deadline - grace):
            if consumers:
                log.warning("%d consumer(s) still busy; killing them", len(consumers))
                self._kill(consumers, signal.SIGKILL)  # their unacked messages are requeued
            self._kill([s.pid for s in self.slots.values() if s.pid], signal.SIGTERM)
            self.workers_stopping = True
        workers = [s for s in self.slots.values() if s.pid]
        if not workers and self.registry.tables is not None:
            self.registry.stop()  # the workers are gone: the tables may go too
        if not workers and not consumers and not self.registry.pid:
            self.state = PoolState.STOPPED
        elif now >= self.deadline:
            log.warning("shutdown_timeout passed; killing %d worker(s)", len(workers))
            self._kill(self._all_pids(), signal.SIGKILL)
            self._final_reap()
            self.state = PoolState.STOPPED

    def _consumer_pids(self) -> list[int]:
        return list(self.by_consumer_pid)

    def _all_pids(self) -> list[int]:
        workers = [s.pid for s in self.slots.values() if s.pid]
        return [*self._consumer_pids(), *workers, *([self.registry.pid] if self.registry.pid
                                                    else [])]

    @staticmethod
    def _kill(pids: list[int], sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _final_reap(self) -> None:
        for pid in self._all_pids():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.registry.forget()

    def _close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            for path in [self.settings.socket, *map(self._worker_socket, self.slots.values())]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for peer in self.peers.values():
            peer.sock.close()
        log.info("stopped")

    # ----- signals ----------------------------------------------------------------------------

    def _install_signals(self) -> None:
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(write_end)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)
        self.selector.register(read_end, selectors.EVENT_READ, self._drain_signal_pipe)

    def _record_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)

    def _drain_signal_pipe(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 4096)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop(graceful=self.state is not PoolState.STOPPING)
            elif signum == signal.SIGQUIT:
                self.stop(graceful=False)
            elif signum == signal.SIGHUP:
                self.handle_hup()

    def handle_hup(self) -> None:
        """Re-read the config: add and remove brokers, leave unchanged connections alone."""
        if self.state is PoolState.STOPPING:
            return
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            self.notifier.ready(self.summary())
            return
        wanted = {(broker_key(b), i): b for b, i in plan(new)}
        kept: set[tuple[str, int]] = set()
        for slot in list(self.slots.values()):
            key = (broker_key(slot.spec.broker), slot.spec.index)
            if slot.spec.broker.hidden:
                continue
            if key in wanted and not slot.removed:
                kept.add(key)
                slot.spec = WorkerSpec(slot.spec.id, wanted[key], slot.spec.index, new.settings)
                if slot.state.final:
                    slot.state, slot.respawn_at = ConnState.DEAD, time.monotonic()
            else:
                self._remove_slot(slot)
        for key, broker in wanted.items():
            if key not in kept:
                self._add_slot(WorkerSpec(self._new_id(), broker, key[1], new.settings))
        brokers_changed = [(b.uri, b.zone) for b in new.brokers] != [
            (b.uri, b.zone) for b in self.config.brokers]
        self.config, self.settings = new, new.settings
        self.reload_consumers(new.consumers, brokers_changed)
        self.access = Access(new.settings.allow_users, new.settings.allow_groups)
        log.info("reloaded %s: %d connection worker(s)", new.path, len(self.slots))
        self.notifier.ready(self.summary())

    # ----- I/O --------------------------------------------------------------------------------

    def _wait_io(self, timeout: float) -> None:
        registered = self.selector.get_map()
        for key, _events in self.selector.select(timeout):
            if registered.get(key.fd) is key:  # an earlier handler may have dropped it
                key.data(key.fd)

    def _read_link(self, slot: Slot, to_end: bool = False) -> None:
        """Take a worker's reports; ``to_end``: everything up to EOF (it has exited)."""
        assert slot.link is not None
        try:
            data = slot.link.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            slot.state = ConnState.DEAD  # the reaper will tell why
            with contextlib.suppress(KeyError):
                self.selector.unregister(slot.link)
            return
        if to_end:
            self._read_link(slot, to_end)
        slot.last_seen = time.monotonic()
        try:
            for message in slot.reader.messages(data):
                op = message.get("op")
                if op == "report":
                    slot.apply_report(message)
                elif op == "lease":
                    self.leases.on_worker_event(slot, message)
        except ProtocolError as exc:
            log.error("worker %d sent a bad frame (%s); killing it", slot.pid, exc)
            os.kill(slot.pid, signal.SIGKILL)

    def drain_links(self) -> None:
        """Read whatever the workers have said, without waiting."""
        for slot in list(self.slots.values()):
            if slot.link is not None and slot.state is not ConnState.DEAD:
                self._read_link(slot)

    def send(self, slot: Slot, message: dict[str, Any]) -> None:
        if slot.link is None:
            return
        with contextlib.suppress(OSError):  # the reaper will see it die
            slot.link.sendall(wire.encode(message))

    def pass_socket(self, slot: Slot, sock: socket.socket, request: dict[str, Any]) -> bool:
        """Hand a client's socket to ``slot``'s worker; ``False`` if its link is broken."""
        if slot.link is None:
            return False
        try:
            socket.send_fds(slot.link, [wire.encode({"op": "adopt", **request})],
                            [sock.fileno()])
            return True
        except OSError:
            slot.state = ConnState.DEAD
            return False

    def _accept(self, _fd: int) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        refusal = self.access.refusal(sock)
        if refusal is not None:
            log.warning("%s", refusal)
            control.refuse(sock, "access", refusal)
            return
        peer = control.Peer(sock)
        self.peers[sock.fileno()] = peer
        self.selector.register(sock, selectors.EVENT_READ, self._serve_peer)
        self._serve_peer(sock.fileno())  # a client sends its request right after connecting

    def _scrape(self, listener: socket.socket, collector: metrics.Collector) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            metrics.serve(listener.accept()[0], collector)

    def _serve_peer(self, fd: int) -> None:
        peer = self.peers[fd]
        messages = peer.read()
        if messages is None:
            self._drop_peer(fd)
            return
        for message in messages:
            if message.get("op") == "lease" and self.state is not PoolState.STOPPING:
                self._drop_peer(fd, close=False)
                self.leases.request(peer.sock, message)
                return
            if not peer.answer(self.handle_request, message):
                self._drop_peer(fd)
                return

    def _drop_peer(self, fd: int, close: bool = True) -> None:
        peer = self.peers.pop(fd)
        self.selector.unregister(peer.sock)
        if close:
            peer.sock.close()

    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return self.status()
        if op == "ping":
            return {"pid": self.pid, "state": self.state.value}
        if op == "brokers":
            return {"local_zone": self.config.local_zone, "brokers": [
                {"broker": b["broker"], "zone": b["zone"], "hidden": b["hidden"],
                 "available": b["available"] > 0}
                for b in broker_summary([s for s in self.slots.values() if not s.removed], ())]}
        raise KzpoolError(f"unknown request {op!r}", op=op)

    # ----- the tables -------------------------------------------------------------------------

    def _publish(self, now: float) -> None:
        """Recompute the primary, tell workers whose role changed, fail back, write tables."""
        primaries = tuple(zone_primary(self.slots.values(), z) for z in self.config.zones)
        for slot in self.slots.values():
            is_primary = broker_key(slot.spec.broker) in primaries  # of its own zone
            if is_primary != slot.primary:
                slot.primary = is_primary
                self.send(slot, {"op": "role", "primary": is_primary})
        if primaries != self.primaries:
            self.primaries = primaries
            self.leases.check_moves = True
        self.leases.fail_back()
        if now >= self.next_flush:
            self.flush_registry()
            if self.state is PoolState.RUNNING and self.notifier.address:
                self.notifier.status(self.summary())

    def flush_registry(self) -> None:
        """Write the rows that changed: one Manager call per table, none when nothing did."""
        self.next_flush = time.monotonic() + FLUSH_INTERVAL
        tables = self.registry.tables
        if tables is None:
            return
        rows = {s.spec.id: s.row() for s in self.slots.values()}
        changed = {k: r for k, r in rows.items() if self.written.get(k) != r}
        gone = [k for k in self.written if k not in rows]
        if changed or gone:
            tables.update("connections", changed, gone)
            self.written = rows
        put, drop = self.leases.changes()
        if put or drop:
            tables.update("assignments", put, drop)

    def status(self) -> dict[str, Any]:
        self.flush_registry()
        if self.registry.tables is not None:
            tables: dict[str, Any] = self.registry.tables.snapshot()
        else:
            tables = {"connections": [s.row() for s in self.slots.values()],
                      "assignments": self.leases.table()}
        tables["connections"].sort(key=lambda r: int(r["id"][1:]))
        tables["consumers"] = [c.row() for c in self.consumers]
        tables["federators"] = [{**r, "broker": r["broker"] or r["pinned"]}
                                for r in tables["assignments"] if r.get("federates")]
        tables["brokers"] = broker_summary(self.slots.values(), self.leases.rows.values())
        return {"pool": {"pid": self.pid, "state": self.state.value,
                         "config": self.config.path, "socket": self.settings.socket,
                         "local_zone": self.config.local_zone,
                         "rss": proc.rss_and_cpu(psutil.Process())[0]},
                **tables}

    def summary(self) -> str:
        """systemd's one-line STATUS."""
        up = sum(1 for s in self.slots.values() if s.available)
        primary = zone_primary(self.slots.values(), self.config.local_zone)
        leases = sum(1 for r in self.leases.rows.values() if r.state.placed)
        return (f"{up}/{len(self.slots)} connections up, primary {self._masked(primary)},"
                f" {leases} leases")

    def _masked(self, key: str | None) -> str:
        for slot in self.slots.values():
            if broker_key(slot.spec.broker) == key:
                return slot.spec.broker.uri.masked
        return "none"
