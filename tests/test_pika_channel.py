"""A lease behaves as pika's BlockingChannel, checked against the real default broker.

Each test asks for what a pika user relies on (return shapes, exceptions, callbacks and
when they run, what goes back to the queue), through ``kzpool.connect()`` and
``connection.channel()``.  One pool serves the module; every test has its own names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from pika.exchange_type import ExchangeType

import kzpool
from kzpool.testing import DEFAULT_URI, Pool, queue_depth, wait_for

from .conftest import Names


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    served = Pool(Path(tmp_path_factory.mktemp("pika-channel")), [DEFAULT_URI], prechannels=4)
    try:
        served.start().wait_ready()
        yield served
    finally:
        served.close()




def publish(connection: kzpool.Connection, queue: str, *bodies: bytes) -> None:
    with connection.channel() as publisher:
        publisher.confirm_delivery()
        for body in bodies:
            publisher.basic_publish("", queue, body)


# ----- what a channel is ----------------------------------------------------------------------

def test_a_channel_is_open_until_closed_and_a_second_close_raises_wrong_state(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    assert channel.is_open and not channel.is_closed and channel.connection is connection
    assert int(channel) == channel.channel_number > 0
    channel.close()
    assert channel.is_closed and not channel.is_open
    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        channel.close()
    with pytest.raises(pika.exceptions.ChannelWrongStateError):
        channel.queue_declare(names("q"))
    with connection.channel() as managed:
        managed.close()  # closed inside the block: the exit does not raise
    with connection.channel() as managed:
        pass
    assert managed.is_closed


def test_a_channel_error_leaves_the_with_block_and_the_channel_closed(
        connection: kzpool.Connection, names: Names) -> None:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info, \
            connection.channel() as channel:
        channel.exchange_declare(names("missing"), passive=True)
    assert info.value.args[0] == 404 and channel.is_closed


def test_declarations_return_pikas_frames_and_send_enums_by_value(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    exchange, queue = names("x"), names("q")
    declared = channel.exchange_declare(exchange, exchange_type=ExchangeType.direct)
    assert isinstance(declared.method, pika.spec.Exchange.DeclareOk)
    assert isinstance(channel.exchange_declare(exchange, passive=True).method,
                      pika.spec.Exchange.DeclareOk)
    assert isinstance(channel.exchange_delete(exchange).method, pika.spec.Exchange.DeleteOk)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.exchange_declare(exchange, passive=True)
    assert info.value.args[0] == 404
    ok = channel.queue_declare(queue, exclusive=True).method  # the lease carries on
    assert isinstance(ok, pika.spec.Queue.DeclareOk) and ok.queue == queue
    assert (ok.message_count, ok.consumer_count) == (0, 0)
    with pytest.raises(TypeError, match="queue must be a str"):
        channel.queue_declare([1, 2, 3])  # type: ignore[arg-type]
    assert isinstance(channel.queue_delete(queue).method, pika.spec.Queue.DeleteOk)
    server_named = channel.queue_declare("", exclusive=True).method.queue
    assert server_named.startswith("amq.gen-")


def test_bindings_route_and_purge_counts(connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    source, destination, queue = names("src"), names("dst"), names("q")
    assert channel.confirm_delivery() is None
    channel.exchange_declare(source, ExchangeType.direct)
    channel.exchange_declare(destination, ExchangeType.direct)
    channel.queue_declare(queue, exclusive=True)
    assert isinstance(channel.queue_bind(queue, destination, "rk").method,
                      pika.spec.Queue.BindOk)
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish(source, "rk", b"nowhere yet", mandatory=True)
    bound = channel.exchange_bind(destination=destination, source=source, routing_key="rk")
    assert isinstance(bound.method, pika.spec.Exchange.BindOk)
    channel.basic_publish(source, "rk", b"through both", mandatory=True)
    unbound = channel.exchange_unbind(destination=destination, source=source, routing_key="rk")
    assert isinstance(unbound.method, pika.spec.Exchange.UnbindOk)
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish(source, "rk", b"nowhere again", mandatory=True)
    assert isinstance(channel.queue_unbind(queue, destination, "rk").method,
                      pika.spec.Queue.UnbindOk)
    purged = channel.queue_purge(queue).method
    assert isinstance(purged, pika.spec.Queue.PurgeOk) and purged.message_count == 1


# ----- publishing, returns, confirms ------------------------------------------------------------

def test_unroutable_mandatory_publishes_without_confirms_reach_the_return_callback(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    exchange = names("x")
    channel.exchange_declare(exchange, ExchangeType.direct, auto_delete=True)
    returned: list[tuple[Any, ...]] = []
    channel.add_on_return_callback(lambda *args: returned.append(args))
    assert channel.basic_publish(exchange, "a", b"first", mandatory=True) is None
    assert channel.basic_publish(exchange, "b", b"second", mandatory=True) is None
    assert returned == []  # callbacks run in a dispatcher only
    while len(returned) < 2:
        connection.process_data_events()
    assert [(ch, m.reply_code, m.routing_key, body) for ch, m, _p, body in returned] == [
        (channel, 312, "a", b"first"), (channel, 312, "b", b"second")]


def test_with_confirms_an_unroutable_publish_raises_and_reaches_the_callback_after(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    exchange = names("x")
    channel.exchange_declare(exchange, ExchangeType.direct, auto_delete=True)
    channel.confirm_delivery()
    returned: list[bytes] = []
    channel.add_on_return_callback(lambda _ch, _m, _p, body: returned.append(body))
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        channel.basic_publish(exchange, "rk", b"", pika.BasicProperties(headers={"n": 1}),
                              mandatory=True)
    (message,) = info.value.messages
    assert isinstance(message.method, pika.spec.Basic.Return)
    assert (message.method.reply_code, message.method.exchange) == (312, exchange)
    assert message.properties.headers == {"n": 1} and message.body == b""
    assert returned == []
    connection.process_data_events()
    assert returned == [b""]
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        channel.basic_publish(names("missing"), "rk", b"x")  # no such exchange: 404
    assert closed.value.args[0] == 404


def test_a_nacked_publish_raises_nack_error(connection: kzpool.Connection,
                                            names: Names) -> None:
    channel = connection.channel()
    queue = names("full")
    channel.queue_declare(queue, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.NackError) as info:
        channel.basic_publish("", queue, b"no room")
    assert len(info.value.messages) == 1


# ----- getting and settling ----------------------------------------------------------------------

def test_basic_get_and_the_settles_requeue_as_asked(connection: kzpool.Connection,
                                                     names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    assert channel.basic_get(queue) == (None, None, None)
    publish(connection, queue, b"1", b"2")
    method, properties, body = channel.basic_get(queue)
    assert isinstance(method, pika.spec.Basic.GetOk) and body == b"1"
    assert (method.redelivered, method.exchange, method.routing_key) == (False, "", queue)
    assert method.message_count == 1 and properties.headers is None
    second = channel.basic_get(queue)[0]
    channel.basic_reject(second.delivery_tag, requeue=True)
    channel.basic_nack(method.delivery_tag, multiple=False, requeue=False)  # "1" dropped
    again = channel.basic_get(queue)
    assert again[2] == b"2" and again[0].redelivered
    channel.basic_ack(again[0].delivery_tag)
    with pytest.raises(TypeError):
        channel.basic_reject("1")  # type: ignore[arg-type]
    assert channel.basic_get(queue) == (None, None, None)


def test_basic_recover_redelivers_to_the_same_generator(connection: kzpool.Connection,
                                                         names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"1", b"2")
    seen: list[tuple[bytes, bool]] = []
    for method, _props, body in channel.consume(queue):
        seen.append((body, method.redelivered))
        if len(seen) == 2:
            channel.basic_recover(requeue=True)
        if len(seen) == 4:
            channel.basic_ack(method.delivery_tag, multiple=True)
            break
    assert seen == [(b"1", False), (b"2", False), (b"1", True), (b"2", True)]
    channel.cancel()


# ----- transactions and flow --------------------------------------------------------------------

def test_transactions_commit_and_roll_back(connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    assert isinstance(channel.tx_select().method, pika.spec.Tx.SelectOk)
    channel.basic_publish("", queue, b"kept")
    assert queue_depth(queue) == 0
    assert isinstance(channel.tx_commit().method, pika.spec.Tx.CommitOk)
    assert queue_depth(queue) == 1
    channel.basic_publish("", queue, b"dropped")
    assert isinstance(channel.tx_rollback().method, pika.spec.Tx.RollbackOk)
    assert queue_depth(queue) == 1
    assert channel.basic_get(queue, auto_ack=True)[2] == b"kept"


def test_flow_true_keeps_deliveries_coming(connection: kzpool.Connection,
                                           names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    channel.basic_consume(queue, lambda *_: None)
    assert channel.flow(True) is True
    assert channel.queue_declare(queue, passive=True).method.consumer_count == 1


# ----- consumers ---------------------------------------------------------------------------------

def test_a_consumer_gets_its_deliveries_in_a_dispatcher_and_its_tag_is_listed(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"1", b"2")
    channel.basic_qos(prefetch_count=1)
    got: list[tuple[Any, ...]] = []
    tag = channel.basic_consume(queue, lambda *args: got.append(args), consumer_tag="mine")
    assert tag == "mine" and channel.consumer_tags == ["mine"]
    with pytest.raises(pika.exceptions.DuplicateConsumerTag):
        channel.basic_consume(queue, lambda *_: None, consumer_tag="mine")
    while not got:
        connection.process_data_events(time_limit=None)
    ((ch, method, _props, body),) = got  # prefetch 1: one at a time
    assert ch is channel and body == b"1" and isinstance(method, pika.spec.Basic.Deliver)
    assert (method.consumer_tag, method.delivery_tag, method.redelivered) == ("mine", 1, False)
    channel.basic_ack(method.delivery_tag)
    while len(got) < 2:
        connection.process_data_events(time_limit=None)
    assert got[1][1].delivery_tag == 2 and got[1][3] == b"2"
    channel.basic_ack(2)


def test_two_consumers_on_one_channel_get_their_own_messages_in_order(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    first, second = names("q1"), names("q2")
    for queue in (first, second):
        channel.queue_declare(queue)
    publish(connection, first, *[b"a%d" % i for i in range(30)])
    publish(connection, second, *[b"b%d" % i for i in range(40)])
    got: dict[str, list[bytes]] = {first: [], second: []}
    tags = {channel.basic_consume(q, lambda _c, m, _p, b, q=q: got[q].append(b), auto_ack=True): q
            for q in (first, second)}
    while len(got[first]) + len(got[second]) < 70:
        connection.process_data_events(time_limit=None)
    assert got[first] == [b"a%d" % i for i in range(30)]
    assert got[second] == [b"b%d" % i for i in range(40)]
    assert sorted(channel.consumer_tags) == sorted(tags)


def test_a_broker_cancel_ends_start_consuming_and_runs_the_cancel_callbacks(
        connection: kzpool.Connection, names: Names) -> None:
    channel, other = connection.channel(), connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    cancels: list[Any] = []
    channel.add_on_cancel_callback(cancels.append)
    tag = channel.basic_consume(queue, lambda *_: None)
    connection.add_callback_threadsafe(lambda: other.queue_delete(queue))
    channel.start_consuming()  # returns: the broker cancelled the only consumer
    assert [frame.method.consumer_tag for frame in cancels] == [tag]
    assert isinstance(cancels[0].method, pika.spec.Basic.Cancel)
    assert channel.consumer_tags == []


def test_a_broker_cancel_ends_the_consume_generator(connection: kzpool.Connection,
                                                    names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    for rounds, _item in enumerate(channel.consume(queue, inactivity_timeout=0.05)):
        if rounds == 0:
            channel.queue_delete(queue)
        assert rounds < 1000, "the generator did not end on the broker's cancel"
    assert channel.consumer_tags == [] and channel.get_waiting_message_count() == 0


def test_basic_cancel_hands_back_what_an_auto_ack_consumer_had_not_dispatched(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"1" * 1024, b"2" * 2048)
    tag = channel.basic_consume(queue, lambda *_: pytest.fail("dispatched"), auto_ack=True)
    wait_for(lambda: queue_depth(queue) == 0, 5, "both delivered to the lease")
    pending = channel.basic_cancel(tag)
    assert [(type(m), body[:1]) for m, _p, body in pending] == [
        (pika.spec.Basic.Deliver, b"1"), (pika.spec.Basic.Deliver, b"2")]
    assert queue_depth(queue) == 0 and channel.basic_cancel(tag) == []


def test_basic_cancel_requeues_what_an_ackable_consumer_had_not_dispatched(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"1", b"2")
    tag = channel.basic_consume(queue, lambda *_: pytest.fail("dispatched"))
    wait_for(lambda: queue_depth(queue) == 0, 5, "both delivered to the lease")
    assert channel.basic_cancel(tag) == []
    wait_for(lambda: queue_depth(queue) == 2, 5, "both back on the queue")


def test_stop_consuming_in_a_callback_ends_start_consuming_and_requeues_the_rest(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"1", b"2")
    channel.basic_qos(prefetch_count=2)

    def first_only(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        ch.stop_consuming()
        ch.basic_ack(method.delivery_tag)  # still allowed after the cancel

    channel.basic_consume(queue, first_only)
    wait_for(lambda: queue_depth(queue) == 0, 5, "both delivered to the lease")
    channel.start_consuming()
    channel.close()
    with connection.channel() as check:
        assert check.basic_get(queue, auto_ack=True)[2] == b"2"
        assert check.basic_get(queue) == (None, None, None)


def test_closing_the_channel_in_its_callback_ends_start_consuming_and_requeues(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"1", b"2")
    channel.basic_consume(queue, lambda ch, *_: ch.close())
    channel.start_consuming()
    assert channel.is_closed
    wait_for(lambda: queue_depth(queue) == 2, 5, "both messages back")
    with connection.channel() as check:
        assert [check.basic_get(queue, auto_ack=True)[2] for _ in range(2)] == [b"1", b"2"]


def test_close_from_the_callback_returns_once_the_broker_requeued_its_deliveries(
        connection: kzpool.Connection, names: Names) -> None:
    """pika's TestCloseChannelFromBasicConsumeCallback, many times over: ``close()`` returns
    after the broker's CloseOk, so a ``basic_get`` on another lease right after finds both
    messages back in the queue (no wait: a close that returned early shows here)."""
    queue = names("q")
    with connection.channel() as setup:
        setup.queue_declare(queue)
    check = connection.channel()
    for round_ in range(60):
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"1", mandatory=True)
        channel.basic_publish("", queue, b"2", mandatory=True)
        channel.basic_consume(queue, lambda ch, *_: ch.close())
        channel.start_consuming()
        assert channel.is_closed
        got = [check.basic_get(queue, auto_ack=True)[2] for _ in range(3)]
        assert got == [b"1", b"2", None], f"round {round_}: {got}"
    check.close()
    # leases that left nothing on their channels are answered at once, even those whose
    # channel the worker then closes (more are handed back than it keeps ready): a close
    # that waited for their CloseOk would wait here for the lease's hour
    spare = [connection.channel(timeout=3600) for _ in range(12)]
    for lease in spare:
        lease.queue_declare(queue, passive=True)
        lease.close()


def test_a_thread_acks_through_add_callback_threadsafe(connection: kzpool.Connection,
                                                       names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"msg1", b"last-msg")
    channel.basic_qos(prefetch_count=1)
    done: list[bytes] = []

    def handled(method: Any, body: bytes) -> None:  # in the connection's thread
        channel.basic_ack(method.delivery_tag)
        done.append(body)
        if body == b"last-msg":
            channel.basic_cancel(method.consumer_tag)

    def on_message(_ch: Any, method: Any, _props: Any, body: bytes) -> None:
        worker = threading.Thread(target=lambda: connection.add_callback_threadsafe(
            lambda: handled(method, body)))
        worker.start()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    assert done == [b"msg1", b"last-msg"] and queue_depth(queue) == 0


def test_a_consume_generator_and_a_callback_consumer_share_a_channel(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    source, destination = names("src"), names("dst")
    channel.queue_declare(source)
    channel.queue_declare(destination)
    channel.confirm_delivery()

    def forward(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        ch.basic_publish("", destination, body, properties, mandatory=True)  # confirmed
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(source, forward)
    channel.basic_publish("", source, b"via-publish")
    for _method, _props, body in channel.consume(destination, auto_ack=True):
        assert body == b"via-publish"  # the generator's wait ran the callback
        break
    assert len(channel.consumer_tags) == 2
    with pytest.raises(ValueError, match="cancel"):
        next(channel.consume(destination, auto_ack=False))
    channel.cancel()
    assert len(channel.consumer_tags) == 1


def test_the_consume_generator_yields_nothing_after_inactivity_and_takes_a_tag(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    stream = channel.consume(queue, inactivity_timeout=0.05, consumer_tag="gen")
    assert channel.consumer_tags == []  # nothing happens before the first next()
    assert next(stream) == (None, None, None)
    assert channel.consumer_tags == ["gen"]
    publish(connection, queue, b"a", b"b")
    first = next(stream)
    while first == (None, None, None):
        first = next(stream)
    assert first[2] == b"a"
    wait_for(lambda: connection.process_data_events(0.05) or
             channel.get_waiting_message_count() == 1, 5, "the second read, not yielded")
    assert channel.cancel() == 0
    wait_for(lambda: queue_depth(queue) == 1, 5, "the one not yielded requeued")
    channel.close()
    wait_for(lambda: queue_depth(queue) == 2, 5, "the unacked one back with the channel")


def test_start_consuming_raises_a_channel_error_once_then_carries_on(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    got: list[bytes] = []

    def on_message(ch: Any, method: Any, _props: Any, body: bytes) -> None:
        got.append(body)
        ch.basic_ack(method.delivery_tag)
        ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    connection.add_callback_threadsafe(
        lambda: channel.basic_publish(names("missing"), "rk", b"x"))  # no confirms: async 404
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.start_consuming()
    assert info.value.args[0] == 404
    publish(connection, queue, b"after")  # kzpool: the lease recovers, its consumer too
    channel.start_consuming()
    assert got == [b"after"]


# ----- more of what pika's channel tests ask -------------------------------------------------

def test_consuming_from_an_unknown_queue_raises_channel_closed(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.basic_consume(names("unknown"), lambda *_: None)
    assert info.value.args[0] == 404 and channel.consumer_tags == []


def test_nack_multiple_requeues_in_order(connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"1", b"2")
    tags = [channel.basic_get(queue)[0].delivery_tag for _ in range(2)]
    channel.basic_nack(tags[1], multiple=True, requeue=True)
    wait_for(lambda: queue_depth(queue) == 2, 5, "both requeued")
    assert [channel.basic_get(queue, auto_ack=True)[2] for _ in range(2)] == [b"1", b"2"]


def test_a_return_that_comes_while_confirms_turn_on_goes_to_the_callback_only(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    returned: list[bytes] = []
    channel.add_on_return_callback(lambda _ch, _m, _p, body: returned.append(body))
    channel.basic_publish("", names("nobody"), b"early", mandatory=True)
    channel.confirm_delivery()  # the return may come while this waits: no error for it
    channel.basic_publish("", names("nobody2"), b"plain")  # not mandatory: confirmed
    while not returned:
        connection.process_data_events()
    assert returned == [b"early"]


def test_a_return_without_a_callback_is_dropped_and_later_publishes_arrive(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    channel.basic_publish("", names("nobody"), b"unroutable", mandatory=True)
    connection.channel().close()  # some I/O
    channel.basic_publish("", queue, b"routable-message")
    wait_for(lambda: queue_depth(queue) == 1, 5, "the routable one")
    method, _props, body = channel.basic_get(queue)
    assert (method.delivery_tag, method.routing_key, body) == (1, queue, b"routable-message")
    connection.process_data_events()  # nothing queued: the return went nowhere
    channel.basic_ack(method.delivery_tag)


def test_a_huge_message_and_many_through_the_generator(connection: kzpool.Connection,
                                                       names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    huge = bytes(range(256)) * 3907  # just over a million bytes
    channel.basic_publish("", queue, huge)
    method, _props, body = next(channel.consume(queue))
    assert body == huge and (method.delivery_tag, method.routing_key) == (1, queue)
    channel.basic_ack(method.delivery_tag)
    channel.cancel()
    for i in range(500):
        channel.basic_publish("", queue, b"%04d" % i * 256)
    tags = []
    for method, _props, _body in channel.consume(queue, auto_ack=True):
        tags.append(method.delivery_tag)
        if len(tags) == 500:
            break
    assert tags == list(range(2, 502))  # in order, after the huge one's tag
    channel.close()  # auto-acked: nothing goes back
    assert queue_depth(queue) == 0


def test_a_thread_cancels_the_generator_through_add_callback_threadsafe(
        connection: kzpool.Connection, names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    publish(connection, queue, b"msg1", b"last-msg")
    channel.basic_qos(prefetch_count=1)
    done: list[bytes] = []

    def handled(method: Any, body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        done.append(body)
        if body == b"last-msg":
            channel.cancel()

    for method, _props, body in channel.consume(queue):
        threading.Thread(target=lambda m=method, b=body: connection.add_callback_threadsafe(
            lambda: handled(m, b))).start()
    assert done == [b"msg1", b"last-msg"]  # the loop ended on cancel()


def test_cancel_after_the_broker_cancelled_the_generator(connection: kzpool.Connection,
                                                         names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    for _item in channel.consume(queue, inactivity_timeout=0.05):
        channel.queue_delete(queue)  # the broker cancels the consumer
        connection.process_data_events(0.05)  # its cancel is read into the generator
        assert channel.cancel() == 0  # the consumer is gone already: no wait for an answer
    assert channel.consumer_tags == []


def test_the_generator_raises_a_channel_error_from_its_wait(connection: kzpool.Connection,
                                                            names: Names) -> None:
    channel = connection.channel()
    queue = names("q")
    channel.queue_declare(queue)
    connection.add_callback_threadsafe(
        lambda: channel.basic_publish(names("missing"), "rk", b"x"))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        for _item in channel.consume(queue):
            pass
    assert info.value.args[0] == 404
