"""One client cannot hurt the pool or another client: each row of issue #11's table, tried
again as a hostile client would, with real processes.  Afterwards the master is the same
process and a fresh client gets a lease and publishes; where one client alone was at fault,
every worker is the same process too."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psutil
import pytest

import kzpool
from kzpool.common import messages, wire
from kzpool.common.errors import LimitExceeded
from kzpool.common.options import LeaseOptions
from kzpool.common.status import render
from kzpool.master.registry import MAX_CONNECTIONS
from kzpool.master.registry import read as read_registry
from kzpool.testing import DEFAULT_URI, Pool, gone, titles, wait_for

from .conftest import brokers
from .hostile import (
    as_nobody,
    ask,
    assert_whole,
    in_child,
    json_frame,
    nested,
    open_up,
    pids,
    raw,
    read_answers,
    read_within,
    refusal,
    send,
    wait_eof,
)

PoolMaker = Callable[..., Pool]


def worker_socket(pool: Pool) -> str:
    return f"{pool.socket}.c1"


def dropped(lease: kzpool.Lease) -> bool:
    """The worker hung up on this lease's socket (read within 10 s)."""
    lease._impl.wait(lambda: lease._impl.lost, 10)
    return lease._impl.lost


# ----- a JSON frame nested 5,000 levels deep ---------------------------------------------------

def test_json_nested_5000_deep_is_a_protocol_error_on_every_socket(pool: Pool) -> None:
    before = pids(pool)
    client = kzpool.connect(pool.socket)
    moves: list[kzpool.MoveEvent] = []
    bystander = client.lease("float", on_move=moves.append)
    queue = f"kzt-deep-{uuid.uuid4().hex[:8]}"
    bystander.queue_declare(queue, auto_delete=True)
    bystander.confirm_delivery()
    deep = nested(5000)
    assert len(deep) > 10_000
    for path in (pool.socket, worker_socket(pool)):
        with raw(path) as sock:
            send(sock, deep)
            answer = refusal(sock)
        assert answer["code"] == "protocol" and "not JSON" in answer["error"], answer
    # as a call on a bound lease: nested past the recursion limit, and past the codec's bound
    for depth in (5000, 100):
        lease = client.lease("float")
        arguments = "[" * depth + "]" * depth
        lease._impl.send(json_frame('{"op": "call", "id": 1, "method": "queue_declare",'
                                    ' "args": {"queue": "kzt-x", "arguments": {"a": '
                                    + arguments + "}}}"))
        assert dropped(lease)  # the worker drops that client
        lease.close()
    bystander.basic_publish("", queue, b"unmoved")
    assert bystander.queue_declare(queue, passive=True).method.message_count == 1
    assert not moves  # the other lease kept its channel
    bystander.queue_delete(queue)  # never consumed: auto_delete would not take it
    bystander.close()
    assert "dropping the client" in pool.logs()
    assert_whole(pool, before)


def test_calls_pika_cannot_encode_fail_alone(pool: Pool) -> None:
    """Values pika cannot put on the wire: a prefetch over 16 bits is refused to its caller
    (a ValueError; the lease goes on), a number over 64 bits breaks the codec (that client
    is dropped); the other lease stays where it is."""
    before = pids(pool)
    client = kzpool.connect(pool.socket)
    moves: list[kzpool.MoveEvent] = []
    bystander = client.lease("float", on_move=moves.append)
    with client.lease("float") as lease:
        with pytest.raises(ValueError, match="prefetch_count"):
            lease.basic_qos(prefetch_count=1 << 40)
        lease.basic_qos(prefetch_count=10)  # the same channel, still there
    lease = client.lease("float")
    lease._impl.send(json_frame(json.dumps({"op": "call", "id": 1, "method": "queue_declare",
                                            "args": {"queue": "kzt-x",
                                                     "arguments": {"x-n": 1 << 70}}})))
    assert dropped(lease)
    lease.close()
    bystander.queue_declare("", exclusive=True)
    assert not moves  # the other lease kept its channel
    bystander.close()
    assert_whole(pool, before)


def test_a_queue_name_over_255_bytes_fails_that_call_alone(pool: Pool) -> None:
    """AMQP's short strings are 255 bytes: the worker refuses a longer one to its caller
    before pika, which would end the shared connection half-way through a frame."""
    client = kzpool.connect(pool.socket)
    moves: list[kzpool.MoveEvent] = []
    bystander = client.lease("float", on_move=moves.append)
    with client.lease("float") as lease:
        with pytest.raises(ValueError, match="255 bytes"):
            lease.basic_consume("q" * 300, lambda *_: None)
        lease.queue_declare("", exclusive=True)  # the same lease goes on
    bystander.queue_declare("", exclusive=True)
    assert not moves  # the other lease kept its channel
    bystander.close()


# ----- about 1,015 connections, and max_peers -------------------------------------------------

def test_connections_up_to_the_file_limit_are_turned_away_and_the_others_served(
        pool: Pool) -> None:
    before = pids(pool)
    _soft, hard = resource.prlimit(pool.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pool.pid, resource.RLIMIT_NOFILE, (1024, hard))  # systemd's default
    served = raw(pool.socket)  # a client that connected before the flood
    flood: list[socket.socket] = []
    try:
        for _ in range(1100):
            flood.append(raw(pool.socket))
        turned_away = []
        for sock in flood[-50:]:
            answer = refusal(sock)
            turned_away.append(answer)
        assert all(a["code"] == "limit" for a in turned_away), turned_away[:3]
        assert "limit of 1024 open files" in turned_away[-1]["error"]
        assert "max_peers" in turned_away[-1]["error"]
        send(served, messages.encode(messages.Ping()))  # the others are still served
        assert read_answers(served, until_eof=False)[0]["pid"] == before.master
    finally:
        for sock in [served, *flood]:
            sock.close()
        resource.prlimit(pool.pid, resource.RLIMIT_NOFILE, (_soft, hard))
    assert_whole(pool, before)


def test_max_peers_turns_new_clients_away_naming_it(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], max_peers=20).start()
    pool.wait_ready()
    before = pids(pool)
    for path in (pool.socket, worker_socket(pool)):
        idle = [raw(path) for _ in range(20)]
        with raw(path) as extra:
            answer = refusal(extra)
        assert answer["code"] == "limit" and "max_peers = 20" in answer["error"], answer
        if path == pool.socket:  # the twenty are still served
            send(idle[0], messages.encode(messages.Ping()))
            assert read_answers(idle[0], until_eof=False)[0]["pid"] == before.master
        for sock in idle:
            sock.close()
    with pytest.raises(LimitExceeded, match="max_peers = 20") as info:  # through the client
        clients = [raw(pool.socket) for _ in range(20)]
        try:
            kzpool.connect(pool.socket)
        finally:
            for sock in clients:
                sock.close()
    assert info.value.setting == "max_peers"
    wait_for(lambda: _pings(pool), 10, "the idle clients to be gone", ignore=(LimitExceeded,))
    assert_whole(pool, before)


def _pings(pool: Pool) -> bool:
    return bool(kzpool.connect(pool.socket))


# ----- connected and sent nothing; never read an answer ------------------------------------

def test_silent_clients_stall_nobody_and_are_dropped(pool: Pool) -> None:
    before = pids(pool)
    silent = [raw(pool.socket) for _ in range(10)] + [raw(worker_socket(pool))
                                                      for _ in range(10)]
    trickle = raw(pool.socket)
    send(trickle, messages.encode(messages.Ping())[:5])  # half a header, then nothing
    assert_whole(pool, before)  # while all of them are there
    for sock in [*silent, trickle]:
        answer = refusal(sock, timeout=20)
        assert answer["code"] == "protocol" and "within 5 s" in answer["error"], answer
        sock.close()


def test_a_client_that_never_reads_its_answers(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], prechannels=2, max_leases_per_process=1000).start()
    pool.wait_ready()
    before = pids(pool)
    client = kzpool.connect(pool.socket)
    held = [client.lease("float") for _ in range(300)]  # a status of about 100 KB
    baseline = len(os.listdir(f"/proc/{pool.pid}/fd"))
    hog = raw(pool.socket)
    send(hog, messages.encode(messages.StatusRequest()) * 8)  # and never reads
    assert_whole(pool, before)  # the master goes on meanwhile
    with raw(pool.socket) as greedy:  # more than max_pending_per_peer at once
        send(greedy, messages.encode(messages.Ping()) * 9)
        answer = refusal(greedy)
    assert answer["code"] == "limit" and "max_pending_per_peer = 8" in answer["error"]
    with raw(pool.socket) as patient:  # as many as it allows
        send(patient, messages.encode(messages.Ping()) * 8)
        answers = read_answers(patient, timeout=20)
    assert [a.get("pid") for a in answers[:8]] == [before.master] * 8
    wait_for(lambda: len(os.listdir(f"/proc/{pool.pid}/fd")) <= baseline, 20,
             "the master to drop the client that does not read")
    statuses = read_answers(hog)  # what it had been sent before it was dropped, then EOF
    assert len(statuses) < 8
    for lease in held:
        lease.close()
    assert_whole(pool, before)


# ----- a lease request with a 400 KB lease id; a link to a worker that is full ---------------

def test_a_400_kb_lease_id_is_refused_where_it_is_sent(pool: Pool) -> None:
    before = pids(pool)
    for path in (pool.socket, worker_socket(pool)):
        answer = ask(path, wire.document({"op": "lease", "lease": "x" * 400_000}))
        assert answer["code"] == "protocol" and "over the 65536 limit" in answer["error"]
        answer = ask(path, wire.document({"op": "lease", "lease": "x" * 100}))
        assert answer["code"] == "protocol" and "is not a lease id" in answer["error"]
        answer = ask(path, wire.document({"op": "lease", "options": {"zone": "z" * 300}}))
        assert answer["code"] == "protocol" and "lease.zone: 300 characters" in answer["error"]
    assert not pool.status()["assignments"]
    assert_whole(pool, before)
    assert "bad frame" not in pool.logs()


def test_a_full_link_to_a_worker_loses_no_frame(pools: PoolMaker) -> None:
    """The worker stops reading its link while the master passes it 600 clients' sockets:
    the link fills, the master keeps the rest (each socket with its adopt) and sends it once
    the worker reads again; every client gets its own lease."""
    pool = pools([DEFAULT_URI], max_leases_per_process=1000, log_level="debug",
                 worker_timeout=30).start()
    pool.wait_ready()
    before = pids(pool)
    worker = before.workers["c1"]
    os.kill(worker, signal.SIGSTOP)
    clients = []
    try:
        for _ in range(600):
            sock = raw(pool.socket)
            send(sock, messages.encode(messages.LeaseRequest(LeaseOptions(), wait=60)))
            clients.append(sock)
        wait_for(lambda: "the link to worker" in pool.logs(), 20, "the link to fill up")
    finally:
        os.kill(worker, signal.SIGCONT)
    leased = [read_answers(sock, timeout=30, until_eof=False)[0] for sock in clients]
    assert {a["op"] for a in leased} == {"leased"}
    assert len({a["lease"] for a in leased}) == 600
    assert "bad frame" not in pool.logs()
    for sock in clients:
        sock.close()
    wait_for(lambda: not pool.status()["assignments"], 20, "every lease to be released")
    assert_whole(pool, before)


# ----- asked for a lease and hung up at once --------------------------------------------------

def test_clients_that_hang_up_at_once_leave_nothing_behind(pool: Pool) -> None:
    before = pids(pool)
    with kzpool.connect(pool.socket).lease("float") as lease:
        assert lease._impl.pool.routes  # it learned the worker's socket
    request = messages.encode(messages.LeaseRequest(LeaseOptions()))
    for _ in range(30):
        for path in (pool.socket, worker_socket(pool)):
            sock = raw(path)
            send(sock, request)
            sock.close()

    def ask_and_die() -> str:  # a client killed in the middle of its request
        sock = raw(worker_socket(pool))
        send(sock, request)
        os.kill(os.getpid(), signal.SIGKILL)
        return "not reached"
    for _ in range(10):
        pid = os.fork()
        if pid == 0:
            ask_and_die()
        os.waitpid(pid, 0)
    wait_for(lambda: not pool.status()["assignments"], 10, "no lease row left behind")
    assert "Traceback" not in pool.logs()
    assert_whole(pool, before)


# ----- sticky requests naming brokers nobody runs --------------------------------------------

def nowhere(i: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{61000 + i}/%2F"


def test_sticky_leases_may_name_only_configured_brokers_by_default(pool: Pool) -> None:
    before = pids(pool)
    client = kzpool.connect(pool.socket)
    for i in range(40):
        with pytest.raises(LimitExceeded, match=r"hidden_brokers = 0") as info:
            client.lease("sticky", broker=nowhere(i), timeout=1)
        assert info.value.setting == "hidden_brokers"
        assert "guest:guest" not in str(info.value)
    assert len(pool.connections()) == 1
    assert_whole(pool, before)


def test_hidden_brokers_are_bounded_and_unused_ones_make_room(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], hidden_brokers=2).start()
    pool.wait_ready()
    before = pids(pool)
    outcomes: list[str] = []

    def lease(i: int) -> None:
        try:
            kzpool.connect(pool.socket).lease("sticky", broker=nowhere(i), timeout=2)
            outcomes.append("leased")
        except kzpool.KzpoolError as exc:
            outcomes.append(type(exc).__name__ + (": in use" if "in use" in str(exc) else ""))
    threads = [threading.Thread(target=lease, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(outcomes)) == ["BrokerUnavailable", "LimitExceeded: in use"], outcomes
    assert outcomes.count("BrokerUnavailable") == 2
    # both waited and gave up: nothing uses them, so a third one takes the place of one
    with pytest.raises(kzpool.BrokerUnavailable, match="61040"):
        kzpool.connect(pool.socket).lease("sticky", broker=nowhere(40), timeout=1)
    rows = pool.wait_rows(lambda rs: len(rs) == 3, 10, "two hidden connections at most")
    assert sorted(r["broker"].rsplit(":", 1)[1] for r in rows if r["hidden"])[-1] == "61040/%2F"
    assert_whole(pool, before, workers_too=False)  # retired hidden workers are gone
    assert pids(pool).workers["c1"] == before.workers["c1"]


# ----- leased in a loop without closing ------------------------------------------------------

def test_leasing_in_a_loop_stops_at_max_leases_per_process(pool: Pool) -> None:
    before = pids(pool)
    client = kzpool.connect(pool.socket)
    held = []
    with pytest.raises(LimitExceeded) as info:
        for _ in range(1100):
            held.append(client.lease("float"))
    assert len(held) == 256 and info.value.setting == "max_leases_per_process"
    assert "max_leases_per_process = 256" in str(info.value)
    held[-1].queue_declare("", exclusive=True)  # what it holds still works
    for lease in held:
        lease.close()
    wait_for(lambda: not pool.status()["assignments"], 10, "every lease released")
    assert_whole(pool, before)


def test_the_processes_of_one_uid_share_max_leases_per_uid(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], max_leases_per_uid=30).start()
    pool.wait_ready()
    before = pids(pool)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # takes 20 and holds them until told (or until the test is gone)
        os.close(ready_r)
        os.close(done_w)
        client = kzpool.connect(pool.socket)
        leases = [client.lease("float") for _ in range(20)]
        os.close(ready_w)
        os.read(done_r, 1)
        for lease in leases:
            lease.close()
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        read_within(ready_r, 60, "the holder's twenty leases")

        def take_all() -> str:
            client = kzpool.connect(pool.socket)
            got = []
            try:
                while len(got) < 100:
                    got.append(client.lease("float"))
            except LimitExceeded as exc:
                return f"{len(got)} {exc.setting}"
            return f"{len(got)} none"
        assert in_child(take_all) == "10 max_leases_per_uid"
    finally:
        os.close(done_w)  # the holder lets go
        os.close(ready_r)
        os.waitpid(holder, 0)
    wait_for(lambda: not pool.status()["assignments"], 10, "both processes' leases to go")
    assert_whole(pool, before)


def test_a_lease_over_the_limit_served_by_another_worker_is_moved_and_refused(
        pools: PoolMaker) -> None:
    """Two workers for one broker: the process's leases are on both, each under the limit
    locally; the master counts them all, moves the one too many, and refuses it."""
    pool = pools([DEFAULT_URI], connections_per_broker=2, max_leases_per_process=6).start()
    pool.wait_ready()
    pool.wait_rows(lambda rs: all(r["available"] for r in rs), 10, "both workers")
    first = kzpool.connect(pool.socket)
    on_one = [first.lease("float") for _ in range(4)]
    second = kzpool.connect(pool.socket)  # its own route: the master sends it to the other
    on_other = [second.lease("float") for _ in range(2)]
    assert {on_one[0]._impl.pool.routes[("float", None)],
            second.routes[("float", None)]} == {f"{pool.socket}.c1", f"{pool.socket}.c2"}
    extra = second.lease("float")  # served there directly: the seventh

    def refused() -> bool:
        try:
            extra.queue_declare("", exclusive=True)
        except LimitExceeded as exc:
            return exc.setting == "max_leases_per_process"
        return False
    wait_for(refused, 10, "the seventh lease to be moved and refused")
    on_one[0].queue_declare("", exclusive=True)  # the six it may hold still work
    on_other[1].queue_declare("", exclusive=True)
    for lease in [*on_one, *on_other, extra]:
        lease.close()


# ----- a second uid reused a victim's lease id ------------------------------------------------

def test_a_lease_id_serves_only_the_process_that_got_it(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], allow_users="root, nobody").start()
    pool.wait_ready()
    open_up(pool)
    before = pids(pool)
    queue = f"kzt-victim-{uuid.uuid4().hex[:8]}"
    victim = kzpool.connect(pool.socket).lease("float")
    victim.queue_declare(queue, auto_delete=True)
    victim.confirm_delivery()
    row = wait_for(lambda: next((r for r in pool.status()["assignments"]
                                 if r["lease"] == victim.id and r["state"] == "assigned"), None),
                   5, "the victim's row, assigned")

    def take_over() -> str:  # read from status, asked for at the master and at the worker
        request = messages.LeaseRequest(LeaseOptions(), lease=victim.id)
        at_master = ask(pool.socket, request)
        at_worker = ask(worker_socket(pool), request)
        return f"{at_master.get('code')} {at_worker['op']} {at_master.get('error')}"
    for result in (as_nobody(take_over), in_child(take_over)):  # another uid; another pid
        code, at_worker, text = result.split(" ", 2)
        assert (code, at_worker) == ("not_owner", "redirect"), result
        assert f"belongs to another process (pid {os.getpid()})" in text
    assert next(r for r in pool.status()["assignments"] if r["lease"] == victim.id) == row
    victim.basic_publish("", queue, b"mine")  # confirmed on the victim's own channel
    assert victim.queue_declare(queue, passive=True).method.message_count == 1
    victim.queue_delete(queue)
    victim.close()
    assert_whole(pool, before)


# ----- idle connections to the registry; a registry that does not answer ---------------------

def registry_pid(pool: Pool) -> int | None:
    return next((p for p, t in titles(pool).items() if t == "kzpool: registry"), None)


def cli_status(pool: Pool) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kzpool", "status", "--json", "--socket",
                           pool.socket], capture_output=True, text=True, timeout=30)


def test_idle_connections_to_the_registry_are_bounded_and_dropped(pool: Pool) -> None:
    before = pids(pool)
    registry = psutil.Process(registry_pid(pool))
    path = f"{pool.socket}.registry"
    assert as_nobody(lambda: str(raw(path))).startswith("PermissionError")  # 0600
    idle = [raw(path) for _ in range(200)]
    wait_for(lambda: registry.num_threads() >= MAX_CONNECTIONS, 10, "the registry to be full")
    threads = [registry.num_threads() for _ in range(20)]
    assert max(threads) <= MAX_CONNECTIONS + 3, threads  # no thread per connection past 16
    status = cli_status(pool)  # answered all the same (by the master, the registry is full)
    assert status.returncode == 0 and json.loads(status.stdout)["pool"]["pid"] == before.master
    wait_eof(idle, 20, "every idle connection to be dropped")
    for sock in idle:
        sock.close()
    wait_for(lambda: read_registry(pool.socket)["pool"], 10, "the registry to answer again",
             ignore=(kzpool.KzpoolError, OSError))
    assert registry.pid == registry_pid(pool)
    assert_whole(pool, before)


def test_a_registry_that_does_not_answer_is_replaced_and_stalls_nobody(pool: Pool) -> None:
    before = pids(pool)
    stopped = registry_pid(pool)
    assert stopped is not None
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert_whole(pool, before)  # every call of the master's to it times out
        wait_for(lambda: registry_pid(pool) not in (None, stopped), 20, "a new registry")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    assert "the registry did not answer" in pool.logs()
    wait_for(lambda: read_registry(pool.socket)["connections"], 10, "the new registry's tables",
             ignore=(kzpool.KzpoolError, OSError))
    assert_whole(pool, before)


# ----- a memory alarm on the broker ------------------------------------------------------------

def test_a_memory_alarm_shows_in_status_and_no_worker_crashes(pools: PoolMaker,
                                                              faulty_node: Any) -> None:
    pool = pools([faulty_node.url]).start()
    pool.wait_ready()
    before = pids(pool)
    queue = f"kzt-alarm-{uuid.uuid4().hex[:8]}"
    lease = kzpool.connect(pool.socket).lease("float")
    lease.queue_declare(queue, auto_delete=True)
    brokers._ctl(faulty_node.name, "set_vm_memory_high_watermark", "0.0000001")
    try:
        lease.basic_publish("", queue, b"blocks the connection")
        rows = pool.wait_rows(lambda rs: rs[0]["blocked"], 20, "status to show the block")
        assert rows[0]["pid"] == before.workers["c1"]
        assert "blocked" in render(pool.status())
    finally:
        brokers._ctl(faulty_node.name, "set_vm_memory_high_watermark", "0.4")
    pool.wait_rows(lambda rs: not rs[0]["blocked"], 20, "the block to be lifted")
    lease.close()
    assert_whole(pool, before)


# ----- a worker died with more than 64 KiB of reports unread on its link -------------------------

def test_a_worker_killed_with_reports_unread_on_its_link(pool: Pool) -> None:
    before = pids(pool)
    worker = before.workers["c1"]
    client = kzpool.connect(pool.socket)
    client.lease("float").close()  # the route to the worker is known: no master needed
    os.kill(pool.pid, signal.SIGSTOP)
    try:
        for _ in range(2000):  # two lease news each, about 200 KB the master does not read
            client.lease("float").close()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: gone(worker), 10, "the worker to die")
    finally:
        os.kill(pool.pid, signal.SIGCONT)
    pool.wait_rows(lambda rs: rs[0]["pid"] not in (None, worker) and rs[0]["available"], 20,
                   "a new worker")
    assert "bad frame" not in pool.logs() and "Traceback" not in pool.logs()
    # the news it had not sent died with it: those leases are lost, none is on a channel
    assert all(r["state"] == "lost" for r in pool.status()["assignments"])
    assert_whole(pool, before, workers_too=False)  # that worker was killed: not its fault
