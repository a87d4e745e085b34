"""The master's decisions, without a broker or a real child: respawn and backoff, the stop
ladder, SIGHUP diffs, reservation expiry, fail-back.  Forks and waits are faked, the clock
is the test's (tests/fakes.py)."""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kzpool.common import messages, wire
from kzpool.common.backoff import Backoff
from kzpool.common.config import Config, loads
from kzpool.common.exitcodes import CONSUMER_BOOT, OK, WORKER_FATAL
from kzpool.common.messages import LeaseEvent, LeaseNews, LeaseRequest, Report
from kzpool.common.options import LeaseOptions
from kzpool.common.states import ConnState, ProcState
from kzpool.master.assign import RowState, zone_primary
from kzpool.master.consumers import ConsumerSet, changed_sections
from kzpool.master.ladder import Ladder
from kzpool.master.leasebook import LeaseBook
from kzpool.master.life import STABLE_AFTER, Life, judge
from kzpool.master.slots import Slot, broker_key
from kzpool.master.workers import WorkerEvents, WorkerSet

from .fakes import FakeSystem, exited, killed

BROKERS = "[zone:east]\nuri = amqp://h1/\nuri = amqp://h2/\n[zone:west]\nuri = amqp://h3/\n"


def config(tmp: Path, extra: str = "", brokers: str = BROKERS) -> Config:
    return loads(f"[pool]\nzone = east\nsocket = {tmp}/kz.sock\nreconnect_backoff_min = 0.1\n"
                 f"respawn_backoff_max = 1\nworker_timeout = 10\n{extra}\n{brokers}",
                 environ={})


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """AF_UNIX paths are short: a directory of our own under /tmp."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kzu-", dir="/tmp") as name:
        yield Path(name)


class Workers:
    """A WorkerSet on a fake system, and what it told the master."""

    def __init__(self, tmp: Path, extra: str = "") -> None:
        self.system = FakeSystem()
        self.selector = selectors.DefaultSelector()
        self.news: list[LeaseNews] = []
        self.gone: list[Slot] = []
        self.set = WorkerSet(config(tmp, extra), self.system, self.selector,
                             WorkerEvents(lambda _s, n: self.news.append(n), self.gone.append))
        # the workers' ends of the links are never used (nothing is really forked): what
        # the master says to a worker is recorded
        self.said: list[tuple[Slot, messages.Message]] = []
        self.set.send = lambda slot, message: self.said.append((slot, message))  # type: ignore
        self.set.pass_socket = lambda slot, sock, adopt: (  # type: ignore
            self.said.append((slot, adopt)) or True)
        self.set.start()

    def slot(self, index: int) -> Slot:
        return list(self.set.slots.values())[index]

    def connect(self, slot: Slot) -> None:
        slot.apply_report(Report(state="connected", since=1.0, prechannels=3))

    def die(self, slot: Slot, status: int) -> None:
        pid = slot.pid
        self.system.exit(pid, status)
        assert self.set.exited(*self.system.waitpid(-1, 0))


# ----- respawn and backoff --------------------------------------------------------------------

def test_a_crash_respawns_at_once_then_with_doubling_backoff(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    slot = w.slot(0)
    delays = []
    for _ in range(5):
        first = slot.pid
        w.die(slot, killed())
        assert slot.pid == 0 and slot.state is ConnState.DEAD and "SIGKILL" in str(slot.error)
        delays.append(round(slot.life.respawn_at - w.system.now, 3))
        w.system.now = slot.life.respawn_at
        w.set.spawn_due(w.system.now)
        assert slot.pid not in (0, first)
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8]
    w.system.now += STABLE_AFTER + 1  # it lived long enough: the next crash is a first one
    w.die(slot, exited(1))
    assert slot.life.respawn_at == w.system.now


def test_a_fatal_exit_is_not_respawned_and_a_replaced_worker_is_at_once(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    fatal, big = w.slot(0), w.slot(1)
    w.die(fatal, exited(WORKER_FATAL))
    assert fatal.state is ConnState.FAILED and fatal.life.respawn_at == 0
    w.set.spawn_due(w.system.now + 3600)
    assert fatal.pid == 0
    w.die(big, killed())  # a crash first: the next delay would be 0.1 s
    w.set.spawn_due(w.system.now)
    big.retiring = True  # replaced for its RSS: not a crash
    w.die(big, exited(OK))
    assert big.life.respawn_at == w.system.now and not big.retiring


def test_a_dead_worker_loses_its_leases_and_nothing_respawns_while_stopping(
        short_tmp: Path) -> None:
    w = Workers(short_tmp)
    slot = w.slot(0)
    w.set.stopping = True
    w.die(slot, killed(signal.SIGTERM))
    assert w.gone == [slot] and slot.life.respawn_at == 0


def test_a_silent_worker_is_killed(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    slot = w.slot(0)
    w.system.now += 11
    w.set.check(w.system.now, sample=False)
    assert (slot.pid, signal.SIGKILL) in w.system.killed


def test_consumers_that_cannot_load_fail_and_recycled_ones_come_back_at_once(
        short_tmp: Path) -> None:
    cfg = config(short_tmp, brokers=BROKERS + "[consumer:billing]\nhandler = a.b:c\n"
                 "processes = 2\n")
    system = FakeSystem()
    asked: list[tuple[LeaseRequest, int]] = []
    consumers = ConsumerSet(cfg.consumers, cfg.settings, system,
                            lambda sock, req, pid: (asked.append((req, pid)), sock.close()))
    consumers.start()
    first, second = consumers.slots
    assert [pid for _req, pid in asked] == [first.pid, second.pid]
    system.exit(first.pid, exited(CONSUMER_BOOT))
    system.exit(second.pid, exited(OK))
    for _ in range(2):
        assert consumers.exited(*system.waitpid(-1, 0))
    assert first.state is ProcState.FAILED and "a.b:c" in str(first.error)
    assert second.life.respawn_at == system.now and second.life.restarts == 1
    consumers.spawn_due(system.now)
    assert second.pid and not first.pid


def test_judge_reads_wait_statuses() -> None:
    life = Life(Backoff(0.1, 1))
    assert not judge(life, exited(WORKER_FATAL), 0, WORKER_FATAL, False).respawn
    assert "out of memory?" in judge(life, killed(), 0, WORKER_FATAL, False).why
    assert judge(life, exited(3), 0, WORKER_FATAL, False).why == "exited with code 3"


# ----- the stop ladder ----------------------------------------------------------------------

def test_the_ladder_stops_consumers_then_workers_then_the_registry() -> None:
    ladder = Ladder(timeout=9, now=0)
    assert ladder.begin([11, 12]).signals == [([11, 12], signal.SIGTERM)]
    assert ladder.step(1, [11], [21], 31, True).signals == []  # a consumer is still busy
    step = ladder.step(2, [], [21], 31, True)
    assert step.signals == [([21], signal.SIGTERM)] and not step.stop_registry
    step = ladder.step(3, [], [], 31, True)
    assert step.stop_registry and not step.done
    assert ladder.step(3.1, [], [], 0, False).done


def test_the_ladder_kills_a_stuck_consumer_a_grace_before_the_deadline() -> None:
    ladder = Ladder(timeout=3, now=0)
    assert ladder.step(1.9, [11], [21], 31, True).signals == []
    step = ladder.step(2.0, [11], [21], 31, True)  # 1 s (the grace) before the deadline
    assert step.signals == [([11], signal.SIGKILL), ([21], signal.SIGTERM)]
    step = ladder.step(3.0, [], [21], 31, True)
    assert step.signals == [([21, 31], signal.SIGKILL)] and step.final_reap and step.done


def test_a_second_signal_hurries_the_ladder() -> None:
    ladder = Ladder(timeout=10, now=0)
    ladder.hurry(1)
    step = ladder.step(1, [11], [21], 31, True)
    assert ([11, 21, 31], signal.SIGKILL) in step.signals and step.done


# ----- SIGHUP --------------------------------------------------------------------------------

def test_sighup_keeps_unchanged_brokers_removes_gone_ones_and_retries_failed(
        short_tmp: Path) -> None:
    w = Workers(short_tmp)
    h1, h2, h3 = (w.slot(i) for i in range(3))
    w.die(h1, exited(WORKER_FATAL))
    pids = h2.pid, h3.pid
    new = config(short_tmp, brokers="[zone:east]\nuri = amqp://h1/\nuri = amqp://h4/\n"
                 "[zone:west]\nuri = amqp://h3/\n")
    w.set.reconfigure(new)
    assert h1.state is ConnState.DEAD and h1.life.respawn_at == w.system.now  # tried again
    assert h2.removed and (h2.pid, signal.SIGTERM) in w.system.killed
    assert h3.pid == pids[1] and not h3.removed
    added = [s for s in w.set.slots.values() if s.spec.broker.uri.host == "h4"]
    assert len(added) == 1 and added[0].pid
    w.die(h2, killed(signal.SIGTERM))
    assert h2.spec.id not in w.set.slots  # gone for good once it exited


def test_sighup_diff_of_consumer_sections() -> None:
    old = loads(BROKERS + "[pool]\nzone = east\n[consumer:a]\nhandler = m:f\n[consumer:b]\n"
                "handler = m:f\n[consumer:c]\nhandler = m:f\nfederate = true\nexchange = x\n"
                "bindings = k\n", environ={})
    new = loads(BROKERS + "[pool]\nzone = east\n[consumer:a]\nhandler = m:f\n[consumer:b]\n"
                "handler = m:g\n[consumer:c]\nhandler = m:f\nfederate = true\nexchange = x\n"
                "bindings = k\n", environ={})
    slots = ConsumerSet(old.consumers, old.settings, FakeSystem(), lambda *_: None).slots
    kept, retire = changed_sections(slots, new.consumers, brokers_changed=False)
    assert sorted(kept) == ["a", "c"] and [s.consumer.name for s in retire] == ["b"]
    kept, retire = changed_sections(slots, new.consumers, brokers_changed=True)
    assert sorted(kept) == ["a"]  # a federating section follows the brokers


# ----- leases: reservations and fail-back -------------------------------------------------------

def refused(sock: socket.socket) -> messages.Refused:
    sock.settimeout(5)
    frames = list(wire.FrameReader().feed(sock.recv(65536)))
    message = messages.decode(frames[0][2], messages.TO_CLIENT)
    assert isinstance(message, messages.Refused)
    return message


def test_a_reservation_waits_for_a_broker_then_expires(short_tmp: Path) -> None:
    w = Workers(short_tmp)  # no worker connected yet
    book = LeaseBook(w.set, w.selector, w.system)
    client, ours = socket.socketpair()
    book.request(ours, LeaseRequest(LeaseOptions(), wait=2))
    assert len(book.waiting) == 1
    w.system.now += 1
    book.place_waiting(w.system.now)
    assert len(book.waiting) == 1
    w.system.now += 1.5
    book.place_waiting(w.system.now)
    assert not book.waiting and not book.rows
    answer = refused(client)
    assert answer.code == "unavailable" and "no broker of zone 'east'" in answer.error


def test_a_reservation_is_placed_on_the_primary_once_it_connects(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    book = LeaseBook(w.set, w.selector, w.system)
    client, ours = socket.socketpair()
    book.request(ours, LeaseRequest(LeaseOptions(), wait=5))
    h2 = w.slot(1)
    w.connect(h2)  # the second broker of the zone is up: it is the primary while h1 is not
    book.place_waiting(w.system.now)
    (row,) = book.rows.values()
    assert row.state is RowState.ASSIGNING and row.slot is h2
    assert (h2, messages.Adopt(row.lease, LeaseOptions())) in w.said
    book.on_news(h2, LeaseNews(LeaseEvent.ASSIGNED, row.lease, channel=1, options=LeaseOptions()))
    assert row.state is RowState.ASSIGNED
    client.close()


def test_fail_back_moves_float_leases_to_the_primary_when_it_returns(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    book = LeaseBook(w.set, w.selector, w.system)
    h1, h2 = w.slot(0), w.slot(1)
    w.connect(h2)
    book.on_news(h2, LeaseNews(LeaseEvent.ASSIGNED, "l1", channel=1,
                               options=LeaseOptions(zone="east")))
    book.fail_back()
    assert book.rows["l1"].state is RowState.ASSIGNED  # h2 is the primary
    w.connect(h1)
    book.check_moves = True  # the master does this when a primary changes
    book.fail_back()
    assert book.rows["l1"].state is RowState.MOVING
    assert (h2, messages.MoveLease("l1")) in w.said


def test_a_client_that_hangs_up_while_waiting_is_forgotten(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    book = LeaseBook(w.set, w.selector, w.system)
    client, ours = socket.socketpair()
    book.request(ours, LeaseRequest(LeaseOptions(), wait=60))
    client.close()
    for key, _events in w.selector.select(1):
        if key.fileobj is ours:
            key.data(key.fd)
    assert not book.waiting and not book.rows


# ----- a dead worker's link ------------------------------------------------------------------

def test_a_dead_workers_link_is_read_to_the_end_in_order(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    slot = w.slot(0)
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    slot.link = ours  # what the worker wrote before it died: over 64 KiB of news
    sent = [LeaseNews(LeaseEvent.RELEASED, f"l{i:05d}") for i in range(1500)]
    data = b"".join(messages.encode(n) for n in sent)
    assert len(data) > 64 << 10
    theirs.setblocking(False)
    theirs.sendall(data)  # the buffer takes it all: nothing reads it before the death
    theirs.close()
    w.die(slot, killed())
    assert w.news == sent


def test_a_bad_frame_on_a_reaped_workers_link_signals_nobody(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    slot = w.slot(0)
    pid = slot.pid
    ours, theirs = socket.socketpair()
    slot.link = ours
    theirs.sendall(b"\x00" * 64)  # garbage, then it died
    theirs.close()
    w.system.exit(pid, killed())
    w.system.alive.add(pid)  # its pid belongs to another process by now
    assert w.set.exited(*w.system.waitpid(-1, 0))
    assert not [k for k in w.system.killed if k[0] == pid]


# ----- who may have a lease ------------------------------------------------------------------

def asked(book: LeaseBook, request: LeaseRequest) -> messages.Refused | None:
    """Ask from a socket pair of our own (the peer is this process); the refusal, if any."""
    client, ours = socket.socketpair()
    book.request(ours, request)
    client.setblocking(False)
    try:
        data = client.recv(65536)
    except BlockingIOError:
        return None
    finally:
        client.close()
    message = messages.decode(next(wire.FrameReader().feed(data))[2], messages.TO_CLIENT)
    assert isinstance(message, messages.Refused)
    return message


def test_a_lease_id_serves_only_the_process_that_got_it(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    book = LeaseBook(w.set, w.selector, w.system)
    w.connect(w.slot(0))
    book.on_news(w.slot(0), LeaseNews(LeaseEvent.ASSIGNED, "theirs", channel=1,
                                      client_pid=1))  # pid 1's lease
    refusal = asked(book, LeaseRequest(LeaseOptions(), lease="theirs"))
    assert refusal is not None and refusal.code == "not_owner"
    assert "belongs to another process (pid 1)" in refusal.error
    assert book.rows["theirs"].state is RowState.ASSIGNED  # untouched


def test_leases_per_process_count_every_worker_but_not_lost_ones(short_tmp: Path) -> None:
    w = Workers(short_tmp, "max_leases_per_process = 2")
    book = LeaseBook(w.set, w.selector, w.system)
    h1, h2 = w.slot(0), w.slot(1)
    for slot, lease in ((h1, "a"), (h2, "b")):
        w.connect(slot)
        book.on_news(slot, LeaseNews(LeaseEvent.ASSIGNED, lease, channel=1, options=LeaseOptions(),
                                     client_pid=os.getpid()))
    refusal = asked(book, LeaseRequest(LeaseOptions()))
    assert refusal is not None and refusal.code == "limit"
    assert "max_leases_per_process = 2" in refusal.error
    book.on_news(h2, LeaseNews(LeaseEvent.LOST, "b"))  # a lost lease holds nothing
    assert asked(book, LeaseRequest(LeaseOptions())) is None
    assert asked(book, LeaseRequest(LeaseOptions(), lease="b")) is not None  # its own: but full


def test_a_lease_a_worker_served_past_the_limit_is_moved(short_tmp: Path) -> None:
    w = Workers(short_tmp, "max_leases_per_process = 1")
    book = LeaseBook(w.set, w.selector, w.system)
    h1, h2 = w.slot(0), w.slot(1)
    book.on_news(h1, LeaseNews(LeaseEvent.ASSIGNED, "a", channel=1, options=LeaseOptions(),
                               client_pid=os.getpid()))
    book.on_news(h2, LeaseNews(LeaseEvent.ASSIGNED, "b", channel=1, options=LeaseOptions(),
                               client_pid=os.getpid()))  # served at h2 directly: one too many
    assert (h2, messages.MoveLease("b")) in w.said and book.rows["b"].state is RowState.MOVING
    assert (h1, messages.MoveLease("a")) not in w.said


def test_hidden_brokers_are_refused_bounded_and_unused_ones_retired(short_tmp: Path) -> None:
    w = Workers(short_tmp)
    book = LeaseBook(w.set, w.selector, w.system)
    refusal = asked(book, LeaseRequest(LeaseOptions("sticky", broker="amqp://u:p@nowhere1/")))
    assert refusal is not None and refusal.code == "limit"
    assert "hidden_brokers = 0" in refusal.error and "u:p" not in refusal.error
    w = Workers(short_tmp, "hidden_brokers = 1")
    book = LeaseBook(w.set, w.selector, w.system)
    client, ours = socket.socketpair()
    book.request(ours, LeaseRequest(LeaseOptions("sticky", broker="amqp://u:p@nowhere1/"), wait=60))
    first = [s for s in w.set.live() if s.spec.broker.hidden]
    assert len(first) == 1 and len(book.waiting) == 1
    refusal = asked(book, LeaseRequest(LeaseOptions("sticky", broker="amqp://u:p@nowhere2/")))
    assert refusal is not None and "are all in use" in refusal.error
    client.close()  # the first one's client gives up: nothing uses that broker any more
    for key, _events in w.selector.select(1):
        if key.fileobj is ours:
            key.data(key.fd)
    assert asked(book, LeaseRequest(LeaseOptions("sticky", broker="amqp://u:p@nowhere2/"),
                                    wait=60)) is None
    assert first[0].removed and (first[0].pid, signal.SIGTERM) in w.system.killed
    assert [s.spec.broker.uri.host for s in w.set.live() if s.spec.broker.hidden] == [
        "nowhere2"]


def test_a_worker_that_cannot_be_forked_at_the_file_limit_is_tried_again(
        short_tmp: Path) -> None:
    w = Workers(short_tmp)
    slot = w.slot(0)
    w.die(slot, killed())
    fork = w.system.fork

    def out_of_files() -> int:
        raise OSError(errno.EMFILE, "Too many open files")
    w.system.fork = out_of_files  # type: ignore[method-assign]
    w.set.spawn_due(w.system.now)  # the loop goes on: no exception
    assert slot.pid == 0 and "Too many open files" in str(slot.error)
    assert slot.life.respawn_at == w.system.now + 1.0
    w.system.fork = fork  # type: ignore[method-assign]
    w.system.now += 1.0
    w.set.spawn_due(w.system.now)
    assert slot.pid


def test_a_worker_reconnecting_at_once_stays_primary_for_a_connect_then_fails_over(
        short_tmp: Path) -> None:
    w = Workers(short_tmp)
    book = LeaseBook(w.set, w.selector, w.system)
    client, ours = socket.socketpair()
    book.request(ours, LeaseRequest(LeaseOptions(), wait=30))  # before a worker connects
    h1, h2 = w.slot(0), w.slot(1)
    w.connect(h1)
    w.connect(h2)
    h1_key, h2_key = (broker_key(s.spec.broker) for s in (h1, h2))
    # the broker closed h1's connection for a client's call (503): it is up, and h1 says it
    # connects again at once
    w.set._on_message(h1, Report(state="reconnecting", since=1.0))
    assert zone_primary(w.set.slots.values(), "east") == h1_key  # no failover
    book.place_waiting(w.system.now)
    assert book.waiting  # the lease waits for h1 rather than move to h2 and back
    w.system.now += 0.05
    w.set._on_message(h1, Report(state="connected", since=2.0, prechannels=3))
    book.place_waiting(w.system.now)
    (row,) = book.rows.values()
    assert row.state is RowState.ASSIGNING and row.slot is h1
    # again, but the connect does not come back within connect_timeout and a second
    w.set._on_message(h1, Report(state="reconnecting", since=3.0))
    w.system.now += w.set.settings.connect_timeout + 0.5
    w.set.check(w.system.now, sample=False)
    assert zone_primary(w.set.slots.values(), "east") == h1_key
    w.system.now += 1.0
    w.set.check(w.system.now, sample=False)
    assert zone_primary(w.set.slots.values(), "east") == h2_key  # now the zone fails over
    client.close()
