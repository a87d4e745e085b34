"""Who may use the pool, and what a misbehaving client can do to it: nothing."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import uuid
from collections.abc import Callable

import psutil
import pytest

import kzpool
from kzpool.common import messages
from kzpool.common import wire as protocol
from kzpool.common.options import LeaseOptions
from kzpool.testing import DEFAULT_URI, Pool, wait_for

PoolMaker = Callable[..., Pool]
NOBODY = pwd.getpwnam("nobody")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def as_nobody(action: Callable[[], str]) -> str:
    """Run ``action`` in a child process as user nobody; its result comes back as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            result = action()
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        os.write(write_end, result.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        result = reader.read().decode()
    os.waitpid(pid, 0)
    return result


def open_up(pool: Pool) -> None:
    """As if an administrator made the socket world-writable: the pool must still refuse."""
    os.chmod(os.path.dirname(pool.socket), 0o777)
    for name in os.listdir(os.path.dirname(pool.socket)):
        os.chmod(os.path.join(os.path.dirname(pool.socket), name), 0o777)


def lease_as_nobody(path: str) -> str:
    def action() -> str:
        kzpool.connect(path).lease("float").close()
        return "leased"
    return as_nobody(action)


def test_socket_modes(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    assert os.stat(pool.socket).st_mode & 0o777 == 0o660
    assert os.stat(f"{pool.socket}.c1").st_mode & 0o777 == 0o660
    # the test's own socket directory is 0700 (mkdtemp); the pool's default one is 0750
    result = lease_as_nobody(pool.socket)
    assert result.startswith("PoolAccessDenied: access to the pool at"), result
    assert "(permission denied)" in result


def test_other_users_are_refused_even_through_an_open_socket(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    open_up(pool)
    result = lease_as_nobody(pool.socket)
    assert result.startswith("PoolAccessDenied: access refused: uid 65534"), result

    def direct() -> str:  # straight at the worker's own socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(f"{pool.socket}.c1")
        with contextlib.suppress(BrokenPipeError):  # it may hang up before reading
            sock.sendall(messages.encode(messages.LeaseRequest(LeaseOptions())))
        return sock.recv(4096)[8:].decode()
    assert "access refused: uid 65534" in as_nobody(direct)
    assert "access refused: uid 65534" in pool.logs()


def test_allowed_users_get_in(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], allow_users="root, nobody").start()
    pool.wait_ready()
    open_up(pool)
    assert lease_as_nobody(pool.socket) == "leased"


@pytest.mark.parametrize("garbage", [
    b"\x00" * 64,                                                   # not a frame at all
    protocol.HEADER.pack(protocol.MAGIC, 9, 1, 0, 2) + b"{}",       # another version
    protocol.HEADER.pack(protocol.MAGIC, 1, 1, 0, 0x7FFFFFFF),      # oversized
    protocol.frame(protocol.Kind.JSON, b"not json"),
    protocol.frame(protocol.Kind.PUBLISH, b"\x05ab"),               # truncated fields
    protocol.HEADER.pack(protocol.MAGIC, 1, 1, 0, 100) + b"{",      # truncated, then gone
])
def test_garbage_drops_that_client_only(pools: PoolMaker, garbage: bytes) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    client = kzpool.connect(pool.socket)
    bystander = client.lease("float")
    queue = f"kzt-bystander-{uuid.uuid4().hex[:8]}"
    bystander.queue_declare(queue, auto_delete=True)
    worker = pool.connections()[0]["pid"]
    for target in (pool.socket, f"{pool.socket}.c1"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target)
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        while sock.recv(4096):  # the pool answers (or not) and hangs up
            pass
        sock.close()
    with client.lease("float") as garbled:  # a leased client sending garbage
        garbled._impl.send(garbage)  # raw bytes on its socket, past the pika surface
    bystander.queue_declare(queue, auto_delete=True)  # nobody else noticed
    bystander.basic_publish("", queue, b"fine")
    assert bystander.queue_delete(queue).method.message_count == 1
    bystander.close()
    assert pool.connections()[0]["pid"] == worker and pool.status()["pool"]["state"] == "running"


def test_leases_opened_and_dropped_leak_nothing(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], prechannels=4).start()
    pool.wait_ready()
    client = kzpool.connect(pool.socket)
    for _ in range(50):
        client.lease("float").close()
    pool.wait_rows(lambda rs: rs[0]["channels"] == 0, 10, "the warm-up leases to go")
    worker = psutil.Process(pool.connections()[0]["pid"])
    master = psutil.Process(pool.pid)
    fds = worker.num_fds(), master.num_fds()
    for i in range(2000):
        lease = client.lease("float")
        if i % 2:
            lease.queue_declare("", exclusive=True)  # a channel that is closed, not recycled
        lease.close()
    wait_for(lambda: not pool.status()["assignments"], 10, "every lease row to go")
    rows = pool.wait_rows(lambda rs: rs[0]["prechannels"] == 4 and rs[0]["channels"] == 0, 10,
                          "prechannels back, no channel in use")
    assert rows[0]["pid"] == worker.pid
    wait_for(lambda: worker.num_fds() <= fds[0] and master.num_fds() <= fds[1], 10,
             f"open fds (worker, master) back to at most {fds}")


def test_a_client_that_never_reads_does_not_grow_the_worker(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], default_prefetch=50).start()
    pool.wait_ready()
    client = kzpool.connect(pool.socket)
    queue = f"kzt-unread-{uuid.uuid4().hex[:8]}"
    with client.lease("float") as feeder:
        feeder.queue_declare(queue, auto_delete=False)
        feeder.confirm_delivery()  # all 2000 on the queue before the count below
        for _ in range(2000):
            feeder.basic_publish("", queue, b"x" * 10_000, wait=False)
        feeder.wait_for_confirms(30)
    lazy = client.lease("float")
    lazy.basic_consume(queue, lambda *_: None)  # then never reads
    worker = psutil.Process(pool.connections()[0]["pid"])
    before = worker.memory_info().rss
    with client.lease("float") as probe:  # the broker holds the rest back: QoS, not memory
        def unacked() -> int:
            return 2000 - int(probe.queue_declare(queue, passive=True)
                              .method.message_count)
        wait_for(lambda: unacked() >= 50, 10, "the prefetch to be delivered")
        assert unacked() == 50
    assert worker.memory_info().rss - before < 5 << 20
    lazy.close()
    with client.lease("float") as cleanup:
        cleanup.queue_delete(queue)


def test_peer_credentials_are_read_from_the_socket() -> None:
    left, right = socket.socketpair()
    from kzpool.common.access import peer

    assert peer(left) == (os.getpid(), os.getuid(), os.getgid())
    left.close()
    right.close()
