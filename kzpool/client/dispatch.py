"""Who runs the callbacks: pika's dispatch rules for the leases of one pool client.

A lease's blocking calls never run user callbacks.  What comes meanwhile (deliveries to
``basic_consume`` consumers, the broker's cancels, returns) is queued on its lease; fired
timers, thread-safe callbacks and blocked/unblocked notices are queued on the client.  They
run only inside a dispatcher: :meth:`Dispatcher.process` (``process_data_events``), which
``sleep``, ``start_consuming`` and the ``consume()`` generator's waits use.  One call waits
until something can run (or its time limit), then runs the client's events queued so far,
then each lease's, in arrival order.  Inside a callback a dispatcher only reads: nothing is
run nested (pika's rule), and ``start_consuming`` raises :class:`ReentrancyError`.

Threads: a lease belongs to the thread that used it last, and a dispatcher reads and runs
only the calling thread's leases.  Timers and thread-safe callbacks run in the client's
*home* thread (the one that last called one of its own methods: ``channel()``,
``process_data_events()``, ``sleep()``, ``call_later()``), so a listener's federator threads
never run them.  :meth:`Dispatcher.add_threadsafe` is the one method any thread may call.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from ..common.errors import ClientClosed
from ..common.sockets import readable

Callback = Callable[[], Any]


class Member(Protocol):
    """What a dispatcher needs of a lease (its :class:`~kzpool.client.consuming.Consumers`)."""

    @property
    def channel(self) -> object:
        """The lease itself (what its callbacks get)."""
        ...

    @property
    def owner(self) -> int:
        """The thread that used the lease last."""
        ...

    @property
    def blocked(self) -> bool: ...

    def wait_fd(self) -> int | None: ...

    def prepare_wait(self) -> None: ...

    def after_fork(self, parent: int, connection_id: str) -> None: ...

    def read_now(self) -> None: ...

    def has_events(self) -> bool: ...

    def dispatch_events(self) -> None: ...


class Timer:
    """A ``call_later`` timer: what :meth:`Dispatcher.remove_timeout` takes."""

    __slots__ = ("callback", "deadline", "removed", "seq")

    def __init__(self, deadline: float, seq: int, callback: Callback) -> None:
        self.deadline, self.seq, self.callback, self.removed = deadline, seq, callback, False

    def __lt__(self, other: Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)

    def __repr__(self) -> str:
        removed = " removed" if self.removed else ""
        return f"<Timer {self.callback!r} at {self.deadline:.3f}{removed}>"


class Dispatcher:
    """The dispatch state of one pool client.  Not thread-safe, but for
    :meth:`add_threadsafe`."""

    def __init__(self, wakeable: bool = False) -> None:
        self.members: dict[int, Member] = {}  # by id(), in the order they came
        self.home = threading.get_ident()
        self.closed = False
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._ready: deque[Callback] = deque()  # fired timers, thread-safe callbacks
        self._lock = threading.Lock()
        self._local = threading.local()  # .depth: dispatchers running in this thread
        self._blocked = False
        self._on_blocked: list[Callable[[bool], None]] = []
        self._wake: tuple[int, int] | None = None
        self._close_wake: Callable[[], None] = lambda: None
        if wakeable:  # a pipe another thread writes to, to wake a wait of the home thread
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.set_blocking(write_end, False)
            self._wake = (read_end, write_end)
            self._close_wake = weakref.finalize(self, _close_fds, read_end, write_end)

    # ----- members and connection events ----------------------------------------------------

    def add(self, member: Member) -> None:
        with self._lock:  # threads sharing a client add theirs while another dispatches
            self.members[id(member)] = member

    def discard(self, member: Member) -> None:
        with self._lock:
            self.members.pop(id(member), None)

    def snapshot(self) -> list[Member]:
        with self._lock:
            return list(self.members.values())

    @property
    def wake_fd(self) -> int | None:
        """The read end of the wake pipe (``None`` unless wakeable): readable once another
        thread has added a callback (:meth:`add_threadsafe`), until a dispatch of the home
        thread reads it."""
        return None if self._wake is None else self._wake[0]

    @property
    def dispatching(self) -> bool:
        """A dispatcher of this thread is running a callback now."""
        return bool(getattr(self._local, "depth", 0))

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def remove_timeout(self, timer: Timer) -> None:
        """Safe on a timer that fired, fired but not yet ran, or was removed already."""
        timer.removed = True

    def add_threadsafe(self, callback: Callback) -> None:
        """From any thread: run ``callback`` in the home thread's next dispatch."""
        with self._lock:
            if self.closed:
                raise ClientClosed("the connection is closed")
            self._ready.append(callback)
            if self._wake is not None:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake[1], b"x")

    def on_blocked(self, callback: Callable[[bool], None]) -> None:
        """``callback(blocked)`` runs in a dispatch when the home thread's leases go from
        none blocked to one blocked by its broker (flow control), and back."""
        self._on_blocked.append(callback)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._ready.clear()
            self._timers.clear()
            self._wake = None
            self._close_wake()

    def after_fork(self, parent: int, connection_id: str) -> None:
        """In a child of ``fork()``: locks and the wake pipe of its own (another thread may
        have held a lock at the fork, and the pipe is shared with the parent: a wake of the
        child's would wake the parent); then each lease (:meth:`Member.after_fork`)."""
        self._lock = threading.Lock()
        self._local = threading.local()
        self.home = threading.get_ident()
        if self._wake is not None:
            self._close_wake()  # the child's copies only
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.set_blocking(write_end, False)
            self._wake = (read_end, write_end)
            self._close_wake = weakref.finalize(self, _close_fds, read_end, write_end)
        for member in list(self.members.values()):
            member.after_fork(parent, connection_id)

    # ----- dispatching ----------------------------------------------------------------------

    def process(self, time_limit: float | None,
                stop: Callable[[], bool] | None = None) -> None:
        """pika's ``process_data_events``: read until something can run, ``stop()`` is
        true, or ``time_limit`` seconds passed (``None``: no limit; at least one read
        always), then run what is queued.  Nested in a callback it only reads."""
        deadline = None if time_limit is None else time.monotonic() + time_limit
        read = False
        while True:
            home = threading.get_ident() == self.home
            mine = self._mine()
            for member in mine:  # settles out; recoveries (they may read deliveries)
                member.prepare_wait()
            if home:
                self._fire_timers()
            if self._runnable(mine, home) or (stop is not None and stop()) or self.closed:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if read and ((left is not None and left <= 0) or (
                    self.dispatching and deadline is None and stop is None)):
                break  # (nested without a limit: one read, where pika would wait forever)
            if not self._read(mine, home, left):
                break  # nothing can ever come: no lease, no timer, no thread to wake us
            read = True
        if not self.dispatching:
            self._run(mine, threading.get_ident() == self.home)

    def _mine(self) -> list[Member]:
        me = threading.get_ident()
        return [m for m in self.snapshot() if m.owner == me]

    def _runnable(self, mine: list[Member], home: bool) -> bool:
        if self.dispatching:
            return False  # nested: nothing will run, so nothing cuts the wait short
        return (home and bool(self._ready)) or any(m.has_events() for m in mine)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].deadline <= now:
            timer = heapq.heappop(self._timers)
            if not timer.removed:
                self._ready.append(_fired(timer))

    def _read(self, mine: list[Member], home: bool, left: float | None) -> bool:
        """Wait up to ``left`` (capped by the next timer) for any of the leases' sockets
        or the wake pipe, and read what came; ``False`` if there was nothing to wait on."""
        fds: dict[int, Member | None] = {}
        for member in mine:
            fd = member.wait_fd()
            if fd is not None:
                fds[fd] = member
        if home:
            if self._wake is not None:
                fds[self._wake[0]] = None
            if self._timers:
                due = max(0.0, self._timers[0].deadline - time.monotonic())
                left = due if left is None else min(left, due)
        if not fds:
            if left is None:
                return False
            time.sleep(max(0.0, left))
            return True
        for fd in readable(list(fds), left):
            reader = fds[fd]
            if reader is not None:
                reader.read_now()
            else:
                self._clear_wake()
        if home:
            self._note_blocked(mine)
        return True

    def _note_blocked(self, mine: list[Member]) -> None:
        blocked = any(m.blocked for m in mine)
        if blocked != self._blocked:
            self._blocked = blocked
            for callback in self._on_blocked:
                self._ready.append(functools.partial(callback, blocked))

    def _run(self, mine: list[Member], home: bool) -> None:
        """Run the client's events queued now (not those they queue), then each lease's."""
        local = self._local
        local.depth = getattr(local, "depth", 0) + 1
        try:
            if home:  # a callback that raises leaves the rest queued, as pika does
                self._clear_wake()  # (before taking them: a later one writes it again)
                for _ in range(len(self._ready)):
                    if not self._ready:
                        break
                    self._ready.popleft()()
            for member in mine:
                if member.has_events():
                    member.dispatch_events()
        finally:
            local.depth -= 1


    def _clear_wake(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake[0], 4096)


def _fired(timer: Timer) -> Callback:
    """A fired timer's run: not if it was removed after it fired."""
    def run() -> None:
        if not timer.removed:
            timer.callback()
    return run


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
