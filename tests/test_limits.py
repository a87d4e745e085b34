"""The pieces that bound what one client may do, on real sockets in this process: the outbox
that finishes partial writes (sockets passed along included), the master's lease socket
(deadlines, unanswered requests, max_peers), the codec's bounds, the registry's client."""

from __future__ import annotations

import json
import os
import selectors
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kzpool.common import messages, wire
from kzpool.common.access import Access
from kzpool.common.errors import ProtocolError
from kzpool.common.options import LeaseOptions
from kzpool.common.sockets import Outbox, receive
from kzpool.master import registry
from kzpool.master.control import REQUEST_TIMEOUT, LeaseSocket


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kzl-", dir="/tmp") as name:
        yield Path(name)


# ----- reads -----------------------------------------------------------------------------------

def test_a_read_tells_data_nothing_yet_and_the_peer_gone() -> None:
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    with first, first_peer, second, second_peer:
        for sock in (first, second):
            sock.setblocking(False)
        assert receive(first, 1024) is None  # nothing there yet
        first_peer.sendall(b"a" * 100)
        second_peer.sendall(b"b" * 100_000)
        one = receive(first, 64)
        two = receive(second, 512 << 10)
        assert one == b"a" * 64 and two is not None and set(two) == {ord("b")}
        assert receive(first, 1024) == b"a" * 36
        first_peer.close()
        assert receive(first, 1024) == b""  # EOF


# ----- the outbox ------------------------------------------------------------------------------

def test_an_outbox_finishes_partial_writes_and_passes_each_socket_with_its_frame() -> None:
    """A link with a small buffer and nobody reading: the frames and the sockets riding on
    them wait in the outbox, and arrive whole, in order, each socket with its own frame."""
    link, worker = socket.socketpair()
    link.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    link.setblocking(False)
    outbox = Outbox(64 << 20)
    clients = []
    for i in range(300):
        ours, theirs = socket.socketpair()
        ours.sendall(b"%05d" % i)  # what the worker will read on the socket it gets
        clients.append(ours)
        adopt = messages.encode(messages.Adopt(f"lease{i:05d}" + "x" * 40, LeaseOptions(zone="z")))
        assert outbox.put(adopt, theirs)
    assert not outbox.flush(link) and outbox.pending  # the link is full
    reader, fds, got = wire.FrameReader(), [], []
    while outbox.pending or len(got) < 300:
        outbox.flush(link)
        data, new_fds, _flags, _addr = socket.recv_fds(worker, 65536, 16)
        fds += new_fds
        for _kind, _flags2, payload in reader.feed(data):
            adopt = messages.decode(payload, messages.TO_WORKER_FROM_MASTER)
            assert isinstance(adopt, messages.Adopt)
            with socket.socket(fileno=fds.pop(0)) as passed:
                got.append((adopt.lease[:10], passed.recv(5).decode()))
    assert got == [(f"lease{i:05d}", f"{i:05d}") for i in range(300)]
    assert outbox.size == 0 and not fds
    for sock in (*clients, link, worker):
        sock.close()


def test_an_outbox_refuses_past_its_limit_and_closes_what_it_held() -> None:
    outbox = Outbox(100)
    ours, theirs = socket.socketpair()
    assert outbox.put(b"x" * 60, theirs)
    assert not outbox.put(b"y" * 60)  # over the limit: nothing queued
    outbox.close()
    assert theirs.fileno() == -1 and ours.recv(1) == b""
    ours.close()


# ----- the master's lease socket ---------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Limits:
    max_peers = 3
    max_pending_per_peer = 2


@pytest.fixture
def lease_socket(short_tmp: Path) -> Iterator[tuple[LeaseSocket, Clock]]:
    clock = Clock()
    selector = selectors.DefaultSelector()
    leases: list[Any] = []
    control = LeaseSocket(str(short_tmp / "kz.sock"), selector, Access(frozenset(), frozenset()),
                          lambda _request: {"pid": 7}, lambda s, r: leases.append((s, r)),
                          Limits(), lambda: 0, clock)
    yield control, clock
    control.close()


def turn(control: LeaseSocket, times: int = 3) -> None:
    """What the master's loop does with the lease socket's events."""
    for _ in range(times):
        for key, _events in control.selector.select(0.05):
            key.data(key.fd)


def answers(sock: socket.socket) -> list[dict[str, Any]]:
    sock.settimeout(5)
    reader, out = wire.FrameReader(), []
    while data := sock.recv(65536):
        out += [wire.read_document(p) for _k, _f, p in reader.feed(data)]
    return out


def test_a_silent_peer_is_dropped_after_its_deadline_and_told_why(
        lease_socket: tuple[LeaseSocket, Clock]) -> None:
    control, clock = lease_socket
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(control.path)
    turn(control)
    assert len(control.peers) == 1
    control.sweep(clock.now + REQUEST_TIMEOUT - 0.1)
    assert len(control.peers) == 1
    control.sweep(clock.now + REQUEST_TIMEOUT)
    assert not control.peers
    [answer] = answers(silent)
    assert answer["code"] == "protocol" and "no whole request" in answer["error"]
    silent.close()


def test_unanswered_requests_and_peers_are_bounded(
        lease_socket: tuple[LeaseSocket, Clock]) -> None:
    control, _clock = lease_socket
    greedy = socket.socket(socket.AF_UNIX)
    greedy.connect(control.path)
    greedy.sendall(messages.encode(messages.Ping()) * 3)  # two may wait unanswered
    turn(control)
    [answer] = answers(greedy)
    assert answer["code"] == "limit" and "max_pending_per_peer = 2" in answer["error"]
    peers = []
    for _ in range(4):
        peers.append(socket.socket(socket.AF_UNIX))
        peers[-1].connect(control.path)
        turn(control)
    [answer] = answers(peers[-1])
    assert answer["code"] == "limit" and "max_peers = 3" in answer["error"]
    peers[0].sendall(messages.encode(messages.Ping()) * 2)  # the others are served
    turn(control)
    peers[0].shutdown(socket.SHUT_WR)
    turn(control)
    assert [a.get("pid") for a in answers(peers[0])] == [7, 7]
    for sock in (greedy, *peers):
        sock.close()


def test_an_answer_the_peer_does_not_read_waits_in_its_outbox(
        lease_socket: tuple[LeaseSocket, Clock]) -> None:
    control, _clock = lease_socket
    control.answer = lambda _request: {"pad": "x" * (1 << 20)}  # a status of 1 MiB
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(control.path)
    slow.sendall(messages.encode(messages.StatusRequest()))
    turn(control)
    (peer,) = control.peers.values()
    assert peer.outbox.pending  # the socket took what it could; the loop did not wait
    slow.setblocking(True)
    slow.settimeout(5)
    reader, got = wire.FrameReader(), []
    while not got:
        turn(control, 1)
        got = [wire.read_document(p) for _k, _f, p in reader.feed(slow.recv(1 << 20))]
    assert len(got[0]["pad"]) == 1 << 20
    slow.close()


# ----- the codec's bounds ----------------------------------------------------------------------

@pytest.mark.parametrize(("args", "error"), [
    ({"a": json.loads("[" * 32 + "]" * 32)}, "nested over 32 levels deep"),
    ({"n": 1 << 63}, "does not fit 64 bits"),
    ({"n": [-(1 << 63) - 1]}, "does not fit 64 bits"),
])
def test_object_fields_are_bounded(args: dict[str, Any], error: str) -> None:
    payload = json.dumps({"op": "call", "id": 1, "method": "queue_declare", "args": args})
    with pytest.raises(ProtocolError, match=error):
        messages.decode(payload.encode(), messages.TO_SESSION)


def test_what_fits_the_bounds_decodes() -> None:
    args = {"a": json.loads("[" * 31 + "]" * 31), "n": (1 << 63) - 1, "m": -(1 << 63)}
    payload = json.dumps({"op": "call", "id": 1, "method": "queue_declare", "args": args})
    assert messages.decode(payload.encode(), messages.TO_SESSION) == messages.Call(
        1, "queue_declare", args)


# ----- the registry's client ---------------------------------------------------------------------

def test_the_registry_client_gives_up_on_a_registry_that_never_answers(
        short_tmp: Path) -> None:
    """A socket that accepts and never says a word (a stopped registry): connecting and
    authenticating fail after CALL_TIMEOUT instead of waiting for ever."""
    path = str(short_tmp / "silent.registry")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    with pytest.raises(OSError):  # BlockingIOError: the read timed out
        registry._timed_client(path, authkey=os.urandom(32))
    listener.close()
