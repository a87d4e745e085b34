"""Pure logic: wire format, backoff, topology replay rules, placement decisions."""

from __future__ import annotations

import pytest

import kzpool
from kzpool.common import wire as protocol
from kzpool.common.backoff import Backoff
from kzpool.common.config import Broker, loads
from kzpool.common.errors import ProtocolError
from kzpool.common.options import LeaseOptions
from kzpool.common.states import ConnState
from kzpool.common.uri import BrokerURI
from kzpool.common.wire import Flag
from kzpool.lease.topology import Topology
from kzpool.master.assign import Assignment, RowState, choose_slot, to_move, zone_primary
from kzpool.master.life import Life
from kzpool.master.slots import Slot, startup_hopeless, startup_settled
from kzpool.worker.spec import WorkerSpec

FLOAT, STICKY = LeaseOptions(), LeaseOptions("sticky", broker="amqp://h2/")


def test_public_api() -> None:
    assert sorted(kzpool.__all__) == sorted([
        "Binding", "BrokerURI", "BrokerURIError", "BrokerUnavailable", "ChannelClosedByBroker",
        "ClientClosed", "Config",
        "ConfigError", "Confirm", "Connection", "ConnectionBlockedTimeout",
        "ConnectionClosedByBroker", "DeliveryTakenBack", "KzpoolError", "Lease",
        "LeaseClosed", "LeaseNotYours", "LeaseOptions", "LeaseRequestError", "LeaseTimeout",
        "LimitExceeded",
        "Listener", "Message", "MoveEvent",
        "NackError",
        "PoolAccessDenied", "PoolClient", "PoolNotRunning", "ProtocolError", "StartupError",
        "TransactionLost", "UnroutableError", "__version__", "connect", "load"])
    for name in kzpool.__all__:
        assert getattr(kzpool, name) is not None


# ----- wire format -------------------------------------------------------------------------

def test_frames_round_trip_in_one_feed() -> None:
    data = (protocol.document({"op": "x", "n": 1})
            + protocol.publish("ex", "rk", b"\x00\x01", b"body", mandatory=True)
            + protocol.deliver(7, 3, "ctag", protocol.names("ex", "rk"), b"", b"payload",
                               Flag.REDELIVERED)
            + protocol.tagged(protocol.Kind.CONFIRM, 9, Flag.MULTIPLE))
    reader = protocol.FrameReader()
    frames = []
    for i in range(0, len(data), 5):  # arrives in pieces
        frames += list(reader.feed(data[i:i + 5]))
    kinds = [f[0] for f in frames]
    assert kinds == [protocol.Kind.JSON, protocol.Kind.PUBLISH, protocol.Kind.DELIVER,
                     protocol.Kind.CONFIRM]
    assert protocol.read_document(frames[0][2]) == {"op": "x", "n": 1}
    assert protocol.read_publish(frames[1][2]) == ("ex", "rk", b"\x00\x01", b"body")
    assert frames[1][1] == Flag.MANDATORY
    assert protocol.read_deliver(frames[2][2]) == (7, 3, "ctag", "ex", "rk", b"", b"payload")
    assert protocol.read_tag(frames[3][2]) == 9


@pytest.mark.parametrize(("data", "error"), [
    (b"GARBAGE!" * 2, "bad frame header"),
    (bytes([75, 2, 1, 0, 0, 0, 0, 2]) + b"{}", "version 2"),
    (bytes([75, 1, 99, 0, 0, 0, 0, 0]), "unexpected frame kind 99"),
    (bytes([75, 1, 1, 0, 0xFF, 0, 0, 0]), "over the"),
    (protocol.frame(protocol.Kind.JSON, b"[1, 2]"), "not a JSON object"),
    (protocol.frame(protocol.Kind.JSON, b"\xff\xfe"), "not JSON"),
])
def test_bad_frames_are_protocol_errors(data: bytes, error: str) -> None:
    reader = protocol.FrameReader(max_frame=1 << 20)
    with pytest.raises(ProtocolError, match=error):
        for kind, _flags, payload in reader.feed(data):
            if kind == protocol.Kind.JSON:
                protocol.read_document(payload)


def test_truncated_payload_fields_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        protocol.read_publish(b"\x05ab")
    with pytest.raises(ProtocolError, match="truncated"):
        protocol.read_deliver(b"\x00" * 5)


def test_a_partial_frame_waits_for_the_rest() -> None:
    reader = protocol.FrameReader()
    frame = protocol.document({"op": "x"})
    assert list(reader.feed(frame[:-1])) == []
    assert [protocol.read_document(p) for _k, _f, p in reader.feed(frame[-1:])] == [{"op": "x"}]


# ----- backoff ---------------------------------------------------------------------------------

def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.1, 5.0)
    assert [backoff.next_delay() for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    backoff.reset()
    assert backoff.next_delay() == 0.1
    respawn = Backoff(0.1, 1.0, immediate=True)
    assert [respawn.next_delay() for _ in range(3)] == [0.0, 0.1, 0.2]


# ----- topology --------------------------------------------------------------------------------

def test_topology_records_what_creates_state_and_forgets_what_is_undone() -> None:
    topo = Topology()
    topo.record("call", "exchange_declare", {"exchange": "x"})
    topo.record("call", "queue_declare", {"queue": "q"})
    topo.record("call", "queue_declare", {"queue": "q", "passive": True})
    topo.record("call", "queue_bind", {"queue": "q", "exchange": "x", "routing_key": "a"})
    topo.record("call", "queue_bind", {"queue": "q", "exchange": "x", "routing_key": "b"})
    topo.record("call", "basic_qos", {"prefetch_count": 5})
    topo.record("consume", "basic_consume", {"queue": "q", "consumer_tag": "t1"})
    topo.record("confirm", "confirm_delivery", {})
    topo.record("call", "queue_purge", {"queue": "q"})
    topo.record("call", "queue_unbind", {"queue": "q", "exchange": "x", "routing_key": "a"})
    topo.record("call", "basic_cancel", {"consumer_tag": "t1"})
    assert [(s.method, s.args.get("routing_key")) for s in topo.steps] == [
        ("exchange_declare", None), ("queue_declare", None), ("queue_bind", "b"),
        ("basic_qos", None), ("confirm_delivery", None)]
    topo.record("call", "exchange_delete", {"exchange": "x"})
    assert [s.method for s in topo.steps] == ["queue_declare", "basic_qos", "confirm_delivery"]
    assert topo.confirming


def test_server_named_queues_follow_renames() -> None:
    topo = Topology()
    topo.renamed("amq.gen-1", "amq.gen-2")
    topo.renamed("amq.gen-2", "amq.gen-3")
    assert topo.name("amq.gen-1") == topo.name("amq.gen-2") == "amq.gen-3"
    assert topo.name("plain") == "plain"


# ----- placement -------------------------------------------------------------------------------

CONFIG = loads("[zone:a]\nuri = amqp://h1/\nuri = amqp://h2/\n[zone:b]\nuri = amqp://h3/\n"
               "[pool]\nzone = a\n", environ={})


def slot(n: int, state: ConnState = ConnState.CONNECTED, broker: Broker | None = None) -> Slot:
    broker = broker or CONFIG.brokers[n]
    s = Slot(WorkerSpec(f"c{n}", broker, 1, CONFIG.settings), Life(Backoff(0.1, 1)), state=state)
    s.life.pid = 100 + n
    return s


def test_primary_is_the_first_available_broker_in_config_order() -> None:
    slots = [slot(0, ConnState.WAITING), slot(1), slot(2)]
    assert zone_primary(slots, "a") == "amqp://h2/"
    slots[0].state = ConnState.CONNECTED
    assert zone_primary(slots, "a") == "amqp://h1/"
    assert zone_primary(slots, "b") == "amqp://h3/"
    hidden = Broker(BrokerURI.parse("amqp://h0/"), "a", True, -1, hidden=True)
    assert zone_primary([slot(9, broker=hidden), *slots], "a") == "amqp://h1/"


def test_startup_waits_for_earlier_brokers_to_be_tried() -> None:
    first, second = slot(0, ConnState.CONNECTING), slot(1)
    assert not startup_settled([first, second])  # the primary must be the first if it comes
    first.tried, first.state = True, ConnState.WAITING
    assert startup_settled([first, second])


def test_startup_gives_up_at_once_when_every_local_broker_failed_for_good() -> None:
    first, second = slot(0, ConnState.FAILED), slot(1, ConnState.WAITING)
    assert not startup_hopeless([first, second])  # the second may still come
    second.state = ConnState.FAILED
    assert startup_hopeless([first, second]) and not startup_settled([first, second])
    assert not startup_hopeless([])


def test_choose_slot_spreads_and_skips_unavailable() -> None:
    a, b, down = slot(0), slot(0), slot(0, ConnState.WAITING)
    b.spec = WorkerSpec("c7", a.spec.broker, 2, CONFIG.settings)
    assert choose_slot([a, b, down], "amqp://h1/", lambda: {"c0": 3, "c7": 1}) is b
    assert choose_slot([down], "amqp://h1/", dict) is None
    assert choose_slot([a], None, dict) is None


def test_float_leases_off_the_primary_are_moved_back() -> None:
    slots = [slot(0), slot(1)]
    on_secondary = Assignment("l1", FLOAT, "a", 1, state=RowState.ASSIGNED, slot=slots[1])
    on_primary = Assignment("l2", FLOAT, "a", 1, state=RowState.ASSIGNED, slot=slots[0])
    sticky = Assignment("l3", STICKY, "a", 1, "amqp://h2/", RowState.ASSIGNED, slots[1])
    assert to_move([on_secondary, on_primary, sticky], slots) == [on_secondary]
    slots[0].state = ConnState.WAITING
    assert to_move([on_secondary, on_primary, sticky], slots) == [on_primary]


def test_broker_summary_counts_connections_and_leases() -> None:
    from kzpool.common.status import broker_summary

    slots = [slot(0), slot(1)]
    slots[0].primary, slots[0].prechannels = True, 7
    rows = [Assignment("l1", FLOAT, "a", 1, state=RowState.ASSIGNED, slot=slots[0]),
            Assignment("l2", STICKY, "a", 1, "amqp://h2/", RowState.ASSIGNED,
                       slots[1]),
            Assignment("l3", STICKY, "a", 1, "amqp://h2/", RowState.WAITING)]
    summary = {b["broker"]: b for b in broker_summary([s.row() for s in slots],
                                                      [r.row() for r in rows])}
    first, second = summary["amqp://guest:***@h1:5672/%2F"], summary["amqp://guest:***@h2:5672/%2F"]
    assert (first["primary"], first["connections"], first["prechannels"], first["float"]) == (
        True, 1, 7, 1)
    assert (second["sticky"], second["waiting"], second["float"]) == (1, 1, 0)


@pytest.mark.parametrize(("pattern", "key", "matches"), [
    ("billing.*", "billing.new", True), ("billing.*", "billing.new.x", False),
    ("billing.#", "billing", True), ("billing.#", "billing.a.b", True),
    ("#", "anything.at.all", True), ("*.new", "billing.new", True),
    ("a.#.z", "a.z", True), ("a.#.z", "a.b.c.z", True), ("a.#.z", "a.b.c", False),
    ("billing.new", "billing.old", False),
])
def test_topic_patterns(pattern: str, key: str, matches: bool) -> None:
    from kzpool.consumer.listener import topic_matches

    assert topic_matches(pattern, key) is matches


def test_a_confirm_is_a_future_to_every_caller() -> None:
    """Its lock-free path keeps Future's behaviour: results, errors, callbacks, a second
    resolution refused, and concurrent.futures.wait from another thread."""
    import concurrent.futures
    import threading
    from collections.abc import Callable

    from kzpool.lease.confirms import Confirm

    def reads(done: Callable[[], bool], _timeout: float | None) -> bool:
        return done()
    ok, failed, later = Confirm(reads, "L"), Confirm(reads, "L"), Confirm(reads, "L")
    heard: list[concurrent.futures.Future[None]] = []
    failed.add_done_callback(heard.append)
    ok.set_result(None)
    failed.set_exception(ValueError("nacked"))
    assert isinstance(ok, concurrent.futures.Future)
    assert ok.done() and ok.result() is None and ok.exception() is None
    assert heard == [failed] and isinstance(failed.exception(), ValueError)
    with pytest.raises(ValueError, match="nacked"):
        failed.result()
    with pytest.raises(concurrent.futures.InvalidStateError):
        ok.set_result(None)
    with pytest.raises(kzpool.LeaseTimeout):
        later.result(0)
    threading.Timer(0.05, later.set_result, (None,)).start()
    done, not_done = concurrent.futures.wait([ok, later], timeout=10)
    assert done == {ok, later} and not not_done


def test_a_primary_reconnecting_at_once_keeps_the_pool_healthy() -> None:
    from kzpool.common.status import health

    def status(state: str, available: bool) -> dict[str, object]:
        return {"pool": {"state": "running", "local_zone": "local"}, "connections": [
            {"zone": "local", "broker": "amqp://h1/", "primary": True, "state": state,
             "available": available}]}
    assert health(status("reconnecting", False)).ok  # a client's call closed it: 503
    assert not health(status("waiting", False)).ok  # its broker is away
    assert health(status("connected", True)).ok
