"""Hostile clients for the isolation tests: raw sockets that send what a buggy or malicious
client would, and the check that the pool is whole afterwards (its master and, where one
client alone was at fault, its workers the same processes; a fresh client gets a lease and
publishes)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kzpool
from kzpool.common import messages, wire
from kzpool.testing import Pool, wait_for

NOBODY = pwd.getpwnam("nobody")


def raw(path: str) -> socket.socket:
    """A plain connection to a pool's or a worker's socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def send(sock: socket.socket, data: bytes) -> None:
    """Send, not minding a pool that already hung up (its answer may wait to be read)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def json_frame(text: str | bytes) -> bytes:
    return wire.frame(wire.Kind.JSON, text.encode() if isinstance(text, str) else text)


def nested(depth: int, op: str = "lease") -> bytes:
    """A JSON frame of a message whose ``kind`` is arrays nested ``depth`` deep."""
    return json_frame(f'{{"op": "{op}", "kind": ' + "[" * depth + "]" * depth + "}")


def read_answers(sock: socket.socket, timeout: float = 10.0,
                 until_eof: bool = True) -> list[dict[str, Any]]:
    """The JSON answers the pool sends on ``sock``: all of them up to EOF (or the first one,
    ``until_eof=False``); fails if none comes within ``timeout``."""
    reader = wire.FrameReader()
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _readable(sock, deadline - time.monotonic()):
            break
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            return answers
        answers += [wire.read_document(p) for k, _f, p in reader.feed(data)
                    if k == wire.Kind.JSON]
        if answers and not until_eof:
            return answers
    raise AssertionError(f"no {'EOF' if until_eof else 'answer'} within {timeout} s"
                         f" (got {answers})")


def _readable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()  # select() stops at descriptor 1024; a flood test passes it
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def refusal(sock: socket.socket, timeout: float = 10.0) -> dict[str, Any]:
    """The one refusal the pool answers and hangs up with."""
    answers = read_answers(sock, timeout)
    assert [a.get("op") for a in answers] == ["refused"], answers
    return answers[0]


@dataclass(frozen=True)
class Pids:
    master: int
    workers: dict[str, int]  # connection id → worker pid


def pids(pool: Pool) -> Pids:
    rows = pool.connections()
    return Pids(pool.status()["pool"]["pid"], {r["id"]: r["pid"] for r in rows})


def assert_whole(pool: Pool, before: Pids, workers_too: bool = True) -> None:
    """The master is the same process, a fresh client (no route cached) gets a lease and a
    confirmed publish lands; with ``workers_too``, every worker is the same process."""
    assert pool.proc is not None and pool.proc.poll() is None, pool.logs()
    assert pool.status()["pool"]["pid"] == before.master
    queue = f"kzt-whole-{uuid.uuid4().hex[:8]}"
    with kzpool.connect(pool.socket).lease("float") as lease:
        lease.queue_declare(queue, auto_delete=False)
        lease.confirm_delivery()
        lease.basic_publish("", queue, b"still whole")  # raises if the broker refused it
        assert lease.queue_declare(queue, passive=True).method.message_count == 1
        lease.queue_delete(queue)
    if workers_too:
        assert pids(pool).workers == before.workers


def as_nobody(action: Callable[[], str]) -> str:
    """Run ``action`` in a child process as user nobody; its result comes back as text."""
    return in_child(action, NOBODY.pw_uid, NOBODY.pw_gid)


def in_child(action: Callable[[], str], uid: int | None = None,
             gid: int | None = None, timeout: float = 60.0) -> str:
    """Run ``action`` in a forked child (as ``uid``/``gid`` if given); its result as text.
    A child that has not answered within ``timeout`` is killed and the test fails."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if uid is not None and gid is not None:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            result = action()
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        os.write(write_end, result.encode()[:8000])
        os._exit(0)
    os.close(write_end)
    try:
        return read_within(read_end, timeout, "the child's answer").decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)


def read_within(fd: int, timeout: float, what: str) -> bytes:
    """Everything on pipe ``fd`` up to EOF, failing the test if that takes over ``timeout``."""
    chunks = []
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(int(left * 1000)):
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def ask(path: str, request: messages.Message | bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request on a new connection; the first answer."""
    with raw(path) as sock:
        send(sock, request if isinstance(request, bytes) else messages.encode(request))
        return read_answers(sock, timeout, until_eof=False)[0]


def open_up(pool: Pool) -> None:
    """As if an administrator made the sockets world-writable: the pool must still refuse."""
    directory = os.path.dirname(pool.socket)
    os.chmod(directory, 0o777)
    for name in os.listdir(directory):
        if not name.endswith((".registry", ".key")):
            os.chmod(os.path.join(directory, name), 0o777)


def master_fds(pool: Pool) -> int:
    return len(os.listdir(f"/proc/{pool.pid}/fd"))


def wait_eof(socks: list[socket.socket], timeout: float, what: str) -> None:
    """Every socket in ``socks`` reaches EOF (whatever it read before)."""
    open_ones = list(socks)

    def all_closed() -> bool:
        for sock in list(open_ones):
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                open_ones.remove(sock)
        return not open_ones
    wait_for(all_closed, timeout, what)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()
