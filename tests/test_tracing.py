"""kzpool.instrumentation: the spans OpenTelemetry's pika and aio-pika instrumentations
give, on blocking leases and asyncio channels, and a trace that crosses the pool from a
publisher on one client to a consumer on the other.  OpenTelemetry's in-memory exporter;
a real pool on the default broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import kzpool
import kzpool.aio
from kzpool.client.lease import Lease
from kzpool.instrumentation import KzpoolInstrumentor
from kzpool.testing import DEFAULT_MASKED, DEFAULT_PORT, DEFAULT_URI, Pool, wait_for

BROKER = {"server.address": "127.0.0.1", "server.port": DEFAULT_PORT,
          "net.peer.name": "127.0.0.1", "net.peer.port": DEFAULT_PORT,
          "kzpool.broker": DEFAULT_MASKED}  # the broker the lease is on


@pytest.fixture(scope="module")
def socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pool = Pool(tmp_path_factory.mktemp("tracing"), [DEFAULT_URI]).start()
    try:
        pool.wait_ready()
        yield pool.socket
    finally:
        pool.close()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    KzpoolInstrumentor().instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        KzpoolInstrumentor().uninstrument()


@pytest.fixture
def name() -> str:
    return f"kzt-otel-{uuid.uuid4().hex[:10]}"


def finished(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    return wait_for(lambda: (lambda got: got if len(got) >= count else None)(
        list(exporter.get_finished_spans())), 10, f"{count} spans")


def by_kind(found: list[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in found if s.kind is kind]


def wrapped(cls: type, name: str) -> bool:
    return hasattr(vars(cls)[name], "__wrapped__")


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_a_trace_goes_from_a_blocking_publisher_to_an_asyncio_consumer(
        socket: str, name: str, spans: InMemorySpanExporter) -> None:
    lease = kzpool.connect(socket).lease("float")
    lease.queue_declare(name, auto_delete=True)
    lease.confirm_delivery()
    properties = pika.BasicProperties(message_id="m-1", correlation_id="c-1")
    lease.basic_publish("", name, b"traced", properties)
    assert "traceparent" in properties.headers  # the caller's properties carry it
    lease.close()
    seen: list[trace.Span] = []

    async def consume() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(name, auto_delete=True)
            got = asyncio.Event()

            async def on_message(message: kzpool.aio.IncomingMessage) -> None:
                seen.append(trace.get_current_span())
                await message.ack()
                got.set()
            await queue.consume(on_message)
            await asyncio.wait_for(got.wait(), 10)
    asyncio.run(consume())
    [send] = by_kind(finished(spans, 2), SpanKind.PRODUCER)
    [receive] = by_kind(finished(spans, 2), SpanKind.CONSUMER)
    assert (send.name, receive.name) == (f"{name} send", f"{name} receive")
    assert receive.context.trace_id == send.context.trace_id
    assert parent_of(receive) == send.context.span_id
    assert seen[0].get_span_context().span_id == receive.context.span_id  # the callback's
    for span in (send, receive):
        assert span.attributes is not None
        assert {k: span.attributes.get(k) for k in BROKER} == BROKER
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.destination"] == name
        assert span.attributes["messaging.message.id"] == "m-1"
        assert span.attributes["messaging.conversation_id"] == "c-1"
        assert len(str(span.attributes["kzpool.lease.id"])) > 0
    assert receive.attributes is not None and receive.attributes["messaging.operation"] == \
        "receive"
    assert send.instrumentation_scope is not None
    assert send.instrumentation_scope.name == "kzpool.instrumentation"


def test_blocking_consumers_continue_an_asyncio_publishers_trace(
        socket: str, name: str, spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")

    async def publish() -> None:
        async with await kzpool.aio.connect(socket) as connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(name, "fanout", auto_delete=True)
            for queue in ("cb", "gen", "get"):
                await (await channel.declare_queue(f"{name}-{queue}")).bind(exchange)
            with tracer.start_as_current_span("request"):
                message = kzpool.aio.Message(b"fan out")
                await exchange.publish(message, routing_key="k")
                assert "traceparent" in message.headers
    asyncio.run(publish())
    [send] = by_kind(finished(spans, 1), SpanKind.PRODUCER)
    assert send.name == f"{name} send" and send.attributes is not None
    assert send.attributes["messaging.rabbitmq.destination.routing_key"] == "k"
    lease = kzpool.connect(socket).lease("float")
    inside: dict[str, int] = {}

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        inside["callback"] = trace.get_current_span().get_span_context().span_id
        ch.basic_ack(method.delivery_tag)
        ch.stop_consuming()
    lease.basic_consume(f"{name}-cb", on_message)
    lease.start_consuming()
    for method, _properties, _body in lease.consume(f"{name}-gen"):
        inside["generator"] = trace.get_current_span().get_span_context().span_id
        lease.basic_ack(method.delivery_tag)
        break
    assert not trace.get_current_span().get_span_context().is_valid  # left with the loop
    lease.cancel()
    method, _properties, _body = wait_for(
        lambda: (lambda got: got if got[0] is not None else None)(
            lease.basic_get(f"{name}-get", auto_ack=True)), 10, "the message to get")
    for queue in ("cb", "gen", "get"):
        lease.queue_delete(f"{name}-{queue}")
    lease.close()
    receives = by_kind(finished(spans, 4), SpanKind.CONSUMER)
    assert [s.name for s in receives] == [f"{name} receive"] * 3  # exchange, not queue
    assert {parent_of(s) for s in receives} == {send.context.span_id}
    assert {s.context.trace_id for s in receives} == {send.context.trace_id}
    assert sorted(inside.values()) == sorted(s.context.span_id for s in receives[:2])


def test_asyncio_iterators_and_get_and_instrumenting_off_and_on(
        socket: str, name: str, spans: InMemorySpanExporter) -> None:
    async def main() -> list[int]:
        current: list[int] = []
        async with await kzpool.aio.connect_robust(socket) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(name)
            for body in (b"1", b"2", b"3"):
                await channel.default_exchange.publish(kzpool.aio.Message(body), name)
            async with queue.iterator() as messages:
                async for message in messages:
                    current.append(trace.get_current_span().get_span_context().span_id)
                    await message.ack()
                    if message.body == b"2":
                        break
            assert not trace.get_current_span().get_span_context().is_valid
            got = await queue.get(no_ack=True)
            assert got is not None and got.body == b"3"
            with suppress_instrumentation():
                await channel.default_exchange.publish(kzpool.aio.Message(b"dark"), name)
            await queue.delete(if_unused=False, if_empty=False)
        return current
    current = asyncio.run(main())
    found = finished(spans, 6)
    sends, receives = by_kind(found, SpanKind.PRODUCER), by_kind(found, SpanKind.CONSUMER)
    assert len(sends) == 3 and len(receives) == 3  # none for the suppressed publish
    assert current == [s.context.span_id for s in receives[:2]]
    assert [parent_of(s) for s in receives] == [s.context.span_id for s in sends]
    assert all(s.end_time is not None for s in receives)
    KzpoolInstrumentor().uninstrument()
    assert not wrapped(Lease, "basic_publish")
    assert not wrapped(kzpool.aio.Exchange, "publish")
    spans.clear()
    lease = kzpool.connect(socket).lease("float")
    lease.queue_declare(name, auto_delete=True)
    lease.basic_publish("", name, b"untraced")
    assert lease.basic_get(name, auto_ack=True)[2] == b"untraced"
    assert list(spans.get_finished_spans()) == []
    KzpoolInstrumentor().instrument(tracer_provider=trace.get_tracer_provider())
    assert wrapped(Lease, "basic_publish")
    lease.close()


def test_garbage_trace_headers_start_a_trace_of_their_own(
        socket: str, name: str, spans: InMemorySpanExporter) -> None:
    """A message whose trace headers are garbage (not UTF-8, a wrong format, a number) is
    received all the same, in a span of a trace of its own, on either client."""
    garbage = [{"traceparent": b"\xff\xfe\x00 not text"}, {"traceparent": "00-zz-yy-01"},
               {"traceparent": 7, "tracestate": b"\x80" * 5000, "baggage": "=;=,"}]
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as direct:
        channel = direct.channel()
        channel.queue_declare(name)
        for headers in garbage * 2:
            channel.basic_publish("", name, b"g", pika.BasicProperties(headers=headers))
    lease = kzpool.connect(socket).lease("float")
    got = [wait_for(lambda: (lambda m: m if m[0] is not None else None)(
        lease.basic_get(name, auto_ack=True)), 10, "a message")[2] for _ in garbage]
    lease.close()

    async def main() -> list[bytes]:
        async with await kzpool.aio.connect(socket) as connection:
            queue = await (await connection.channel()).declare_queue(name)
            bodies = [(await queue.get(no_ack=True)).body for _ in garbage]
            await queue.delete()
            return bodies
    got += asyncio.run(main())
    assert got == [b"g"] * 6
    receives = by_kind(finished(spans, 6), SpanKind.CONSUMER)
    assert len(receives) == 6 and all(s.parent is None for s in receives)
    assert len({s.context.trace_id for s in receives}) == 6


WITHOUT_OPENTELEMETRY = """
import sys

class NoOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(f"no {name} here")

sys.meta_path.insert(0, NoOpenTelemetry())
import kzpool, kzpool.aio
try:
    import kzpool.instrumentation
except ImportError as exc:
    print(exc)
"""


def test_without_opentelemetry_the_clients_work_and_the_instrumentation_says_what_to_install(
        ) -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPENTELEMETRY], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'kzpool[otel]'" in done.stdout
