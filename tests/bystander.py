"""What the fairness and frame tests share: a bystander lease that publishes with confirms
in a thread of its own, and the worker's resident memory sampled while a test runs."""

from __future__ import annotations

import threading
import uuid
from types import TracebackType

import psutil

import kzpool
from kzpool.testing import Pool, queue_depth, wait_for


class Bystander:
    """A lease publishing 100 bytes with confirms, one by one, while in the ``with``: what
    it confirmed and its moves are counted, a publish that raised kept in ``errors``.  Its
    client is the caller's to close (after :meth:`all_there`)."""

    def __init__(self, pool: Pool) -> None:
        self.client = kzpool.connect(pool.socket)
        self.moves: list[kzpool.MoveEvent] = []
        self.lease = self.client.lease("float", on_move=self.moves.append)
        self.queue = f"kzt-by-{uuid.uuid4().hex[:8]}"
        self.lease.queue_declare(self.queue, auto_delete=True)
        self.lease.confirm_delivery()
        self.confirmed = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Bystander:
        self._thread.start()
        wait_for(lambda: self.confirmed >= 10, 10, "the bystander's first confirms")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.lease.basic_publish("", self.queue, b"b" * 100)
            except Exception as exc:  # kept for the test to show
                self.errors.append(exc)
                return
            self.confirmed += 1

    def unharmed(self) -> bool:
        """Never moved, no error, every confirmed publish in its queue (after
        :meth:`__exit__`)."""
        return self.moves == [] and not self.errors and self.all_there()

    def all_there(self) -> bool:
        """Every publish it saw confirmed is in its queue (after :meth:`__exit__`)."""
        return queue_depth(self.queue) == self.confirmed

    def keeps_confirming(self, more: int = 20, timeout: float = 30) -> None:
        """``more`` publishes confirmed from now on (within ``timeout``)."""
        target = self.confirmed + more
        wait_for(lambda: self.confirmed >= target or self.errors, timeout,
                 f"{more} more confirms of the bystander")
        assert not self.errors, self.errors


class PeakRSS:
    """The highest resident memory of process ``pid`` while in the ``with``, read every
    20 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return


def worker_pid(pool: Pool) -> int:
    rows = pool.connections()
    assert len(rows) == 1, rows
    return int(rows[0]["pid"])
