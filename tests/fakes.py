"""Fakes for the decision tests: an operating system that forks nothing and a clock the test
moves (the master's :class:`~kzpool.master.system.System`), and a scripted worker on the far
end of a socket pair for a lease."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from kzpool.common import messages, wire
from kzpool.common.messages import Message


def exited(code: int) -> int:
    """A wait status: exited with ``code``."""
    return code << 8


def killed(sig: int = signal.SIGKILL) -> int:
    """A wait status: killed by ``sig``."""
    return sig


class FakeSystem:
    """fork returns a new pid (the child never runs), waitpid hands out what the test said
    exited, kill records; ``now`` is the monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.next_pid = 5000
        self.forked: list[int] = []
        self.killed: list[tuple[int, int]] = []
        self.exits: list[tuple[int, int]] = []
        self.alive: set[int] = {os.getpid()}

    def fork(self) -> int:
        self.next_pid += 1
        self.forked.append(self.next_pid)
        self.alive.add(self.next_pid)
        return self.next_pid

    def exit(self, pid: int, status: int) -> None:
        self.alive.discard(pid)
        self.exits.append((pid, status))

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        if not self.exits:
            if not self.alive - {os.getpid()}:
                raise ChildProcessError
            return 0, 0
        return self.exits.pop(0)

    def kill(self, pid: int, sig: int) -> None:
        if pid not in self.alive:
            raise ProcessLookupError(pid)
        self.killed.append((pid, sig))

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    def process(self, pid: int) -> Any:
        return None

    def pid_exists(self, pid: int) -> bool:
        return pid in self.alive


class FakeWorker:
    """The worker's end of a lease's socket, in a thread: each message the lease sends is
    answered by ``script(message, worker)``, which may ``send`` anything back; a close is
    then answered as a worker answers it."""

    def __init__(self, sock: socket.socket,
                 script: Callable[[Message | tuple[int, int, bytes], FakeWorker], None]) -> None:
        self.sock = sock
        self.script = script
        self.received: list[Message | tuple[int, int, bytes]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def send(self, data: bytes | Message) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else messages.encode(data))

    def _run(self) -> None:
        reader = wire.FrameReader(wire.MAX_DATA_FRAME)
        accepted = {**messages.TO_SESSION, **messages.TO_WORKER_FROM_CLIENT}
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for kind, flags, payload in reader.feed(data):
                item: Message | tuple[int, int, bytes] = (
                    messages.decode(payload, accepted) if kind == wire.Kind.JSON
                    else (kind, flags, payload))
                self.received.append(item)
                self.script(item, self)
                if isinstance(item, messages.Close):  # as a worker answers a lease's close
                    with contextlib.suppress(OSError):
                        self.send(messages.Closed())

    def close(self) -> None:
        self.sock.close()


class FakeBackend:
    """Every connect gives the lease one end of a new socket pair, the other to a new
    :class:`FakeWorker` running ``script``; while ``refuse`` is above 0, a connect is
    refused instead (and counts it down), as a pool that is restarting refuses."""

    def __init__(self, script: Callable[[Any, FakeWorker], None]) -> None:
        self.script = script
        self.workers: list[FakeWorker] = []
        self.paths: list[str] = []
        self.refuse = 0
        self.refused = 0

    def connect(self, path: str) -> socket.socket:
        if self.refuse > 0:
            self.refuse -= 1
            self.refused += 1
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        ours, theirs = socket.socketpair()
        self.paths.append(path)
        self.workers.append(FakeWorker(theirs, self.script))
        return ours
