"""RabbitMQ's tutorials as aio-pika code, run on kzpool.aio: one test per pattern.

Each program below is written against aio-pika's API as its tutorials call it (imports from
``aio_pika``, ``print`` for output) and differs in one line: the connection comes from
``await kzpool.aio.connect()`` (the pool at ``$KZPOOL_SOCKET``) instead of
``await aio_pika.connect("amqp://guest:guest@localhost/")``.  The tutorials' own queue and
exchange names are kept: the module's pool serves a vhost of its own.  Programs that run
forever (the receivers) run as tasks and are cancelled once they printed what the test
waits for.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import pamqp.commands
import pika
import pytest
from aio_pika import DeliveryMode, ExchangeType, Message
from aiormq.exceptions import DeliveryError

import kzpool.aio
from kzpool.testing import Pool, consumer_count, default_uri

from .conftest import brokers_run

CONFIRMED = 1000  # messages of each publisher-confirms program (the tutorial sends 10,000)


@dataclass
class Site:
    socket: str
    uri: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A pool on a vhost of its own: the tutorials' names clash with nobody's."""
    vhost = f"kzt-aio-{uuid.uuid4().hex[:8]}"
    brokers_run(["add_vhost", vhost])
    brokers_run(["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])
    uri = default_uri(vhost)
    pool = Pool(tmp_path_factory.mktemp("aio-tutorials"), [uri]).start()
    try:
        pool.wait_ready()
        yield Site(pool.socket, uri)
    finally:
        pool.close()
        brokers_run(["delete_vhost", vhost])


@pytest.fixture
def socket(site: Site, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KZPOOL_SOCKET", site.socket)
    return site.socket


class Printed:
    """What the programs printed so far, line by line."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.lines: list[str] = []

    def read(self) -> list[str]:
        self.lines += self.capsys.readouterr().out.splitlines()
        return self.lines

    def count(self, text: str) -> int:
        return sum(text in line for line in self.read())


@pytest.fixture
def printed(capsys: pytest.CaptureFixture[str]) -> Printed:
    return Printed(capsys)


async def until(predicate: Callable[[], Any], what: str, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def consumers(site: Site, queue: str, count: int) -> None:
    """Until ``queue`` has ``count`` consumers (asked with plain pika, off the loop)."""
    deadline = asyncio.get_running_loop().time() + 15
    while await asyncio.to_thread(consumer_count, queue, site.uri) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{count} consumers on {queue}"
        await asyncio.sleep(0.02)


async def stop(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task


def forget(site: Site, queues: tuple[str, ...] = (), exchanges: tuple[str, ...] = ()) -> None:
    """Delete what a test declared (the vhost is the module's)."""
    with pika.BlockingConnection(pika.URLParameters(site.uri)) as conn:
        channel = conn.channel()
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in exchanges:
            channel.exchange_delete(exchange)


def run(main: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(main, 60))


# ----- 1. hello world --------------------------------------------------------------------------

async def hello_send() -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("hello")
        await channel.default_exchange.publish(Message(b"Hello World!"), routing_key=queue.name)
        print(" [x] Sent 'Hello World!'")


async def hello_receive() -> None:
    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        print(f" [x] Received message {message!r}")
        print(f"     Message body is: {message.body!r}")

    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("hello")
        await queue.consume(on_message, no_ack=True)
        print(" [*] Waiting for messages. To exit press CTRL+C")
        await asyncio.Future()


def test_hello_world(site: Site, socket: str, printed: Printed) -> None:
    async def main() -> None:
        receiver = asyncio.create_task(hello_receive())
        await until(lambda: printed.count("Waiting for messages"), "the receiver")
        await hello_send()
        await until(lambda: printed.count("Message body is: b'Hello World!'"), "the message")
        await stop(receiver)
    try:
        run(main())
    finally:
        forget(site, queues=("hello",))
    assert printed.count(" [x] Sent 'Hello World!'") == 1


# ----- 2. work queues --------------------------------------------------------------------------

async def new_task(argv: list[str]) -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        message_body = b" ".join(arg.encode() for arg in argv) or b"Hello World!"
        message = Message(message_body, delivery_mode=DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, routing_key="task_queue")
        print(f" [x] Sent {message!r}")


async def worker(name: str) -> None:
    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            print(f" [x] {name} received {message.body!r}")

    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.declare_queue("task_queue", durable=True)
        await queue.consume(on_message)
        print(" [*] Waiting for messages. To exit press CTRL+C")
        await asyncio.Future()


def test_work_queues(site: Site, socket: str, printed: Printed) -> None:
    tasks = [f"task {i}{'.' * i}" for i in range(1, 5)]

    async def main() -> None:
        workers = [asyncio.create_task(worker(name)) for name in ("A", "B")]
        await consumers(site, "task_queue", 2)
        for task in tasks:
            await new_task(task.split())
        await until(lambda: printed.count("received") == len(tasks), "every task done")
        await stop(*workers)
    try:
        run(main())
    finally:
        forget(site, queues=("task_queue",))
    done = [line for line in printed.read() if "received" in line]
    assert sorted(line.split("received ")[1] for line in done) == sorted(
        repr(t.encode()) for t in tasks)
    # prefetch 1: the first two tasks go to both workers, one each
    assert printed.count(" [x] A received") >= 1 and printed.count(" [x] B received") >= 1
    with pika.BlockingConnection(pika.URLParameters(site.uri)) as conn:
        assert conn.channel().queue_declare("task_queue", durable=True).method.message_count == 0


# ----- 3. publish/subscribe -------------------------------------------------------------------

async def emit_log(argv: list[str]) -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        logs_exchange = await channel.declare_exchange("logs", ExchangeType.FANOUT)
        message_body = b" ".join(arg.encode() for arg in argv) or b"info: Hello World!"
        message = Message(message_body, delivery_mode=DeliveryMode.PERSISTENT)
        await logs_exchange.publish(message, routing_key="info")
        print(f" [x] Sent {message!r}")


async def receive_logs(name: str) -> None:
    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            print(f"[x] {name}: {message.body!r}")

    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        logs_exchange = await channel.declare_exchange("logs", ExchangeType.FANOUT)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(logs_exchange)
        await queue.consume(on_message)
        print(f" [*] {name} waiting for logs. To exit press CTRL+C")
        await asyncio.Future()


def test_publish_subscribe(site: Site, socket: str, printed: Printed) -> None:
    async def main() -> None:
        receivers = [asyncio.create_task(receive_logs(n)) for n in ("one", "two")]
        await until(lambda: printed.count("waiting for logs") == 2, "both receivers")
        await emit_log(["info:", "a", "log", "line"])
        await until(lambda: printed.count("b'info: a log line'") == 2, "both to hear it")
        await stop(*receivers)
    try:
        run(main())
    finally:
        forget(site, exchanges=("logs",))
    assert printed.count("[x] one: b'info: a log line'") == 1
    assert printed.count("[x] two: b'info: a log line'") == 1


# ----- 4. routing -------------------------------------------------------------------------------

async def emit_log_direct(argv: list[str]) -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        logs_exchange = await channel.declare_exchange("logs", ExchangeType.DIRECT)
        message_body = b" ".join(arg.encode() for arg in argv[1:]) or b"Hello World!"
        message = Message(message_body, delivery_mode=DeliveryMode.PERSISTENT)
        routing_key = argv[0] if argv else "info"
        await logs_exchange.publish(message, routing_key=routing_key)
        print(f" [x] Sent {message.body!r}")


async def receive_logs_direct(name: str, severities: list[str]) -> None:
    """The callback style."""
    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            print(f" [x] {name} {message.routing_key!r}:{message.body!r}")

    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        direct_logs_exchange = await channel.declare_exchange("logs", ExchangeType.DIRECT)
        queue = await channel.declare_queue(durable=True)
        for severity in severities:
            await queue.bind(direct_logs_exchange, routing_key=severity)
        await queue.consume(on_message)
        print(f" [*] {name} waiting for logs. To exit press CTRL+C")
        await asyncio.Future()


async def receive_logs_direct_simple(name: str, severities: list[str]) -> None:
    """The iterator style."""
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        direct_logs_exchange = await channel.declare_exchange("logs", ExchangeType.DIRECT)
        queue = await channel.declare_queue(durable=True)
        for severity in severities:
            await queue.bind(direct_logs_exchange, routing_key=severity)
        print(f" [*] {name} waiting for logs. To exit press CTRL+C")
        async with queue.iterator() as iterator:
            async for message in iterator:
                async with message.process():
                    print(f" [x] {name} {message.routing_key!r}:{message.body!r}")


def test_routing(site: Site, socket: str, printed: Printed) -> None:
    async def main() -> None:
        receivers = [
            asyncio.create_task(receive_logs_direct("errors", ["error"])),
            asyncio.create_task(receive_logs_direct_simple("all", ["info", "warning", "error"]))]
        await until(lambda: printed.count("waiting for logs") == 2, "both receivers")
        for argv in (["info", "just", "saying"], ["error", "disk", "full"],
                     ["debug", "nobody", "listens"]):
            await emit_log_direct(argv)
        await until(lambda: printed.count(" [x] all 'error'") == 1, "the error to all")
        await until(lambda: printed.count(" [x] errors 'error'") == 1, "the error to errors")
        await until(lambda: printed.count(" [x] all 'info'") == 1, "the info to all")
        await stop(*receivers)
    try:
        run(main())
    finally:
        forget(site, exchanges=("logs",))
    assert printed.count(" [x] errors ") == 1  # the info and the debug line did not reach it
    assert printed.count(" [x] all ") == 2
    assert printed.count("debug") == 0


# ----- 5. topics --------------------------------------------------------------------------------

async def emit_log_topic(argv: list[str]) -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        topic_logs_exchange = await channel.declare_exchange("topic_logs", ExchangeType.TOPIC)
        routing_key = argv[0] if argv else "anonymous.info"
        message_body = b" ".join(arg.encode() for arg in argv[1:]) or b"Hello World!"
        message = Message(message_body, delivery_mode=DeliveryMode.PERSISTENT)
        await topic_logs_exchange.publish(message, routing_key=routing_key)
        print(f" [x] Sent {message!r}")


async def receive_logs_topic(binding_keys: list[str]) -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        topic_logs_exchange = await channel.declare_exchange("topic_logs", ExchangeType.TOPIC)
        queue = await channel.declare_queue("task_queue", durable=True)
        for binding_key in binding_keys:
            await queue.bind(topic_logs_exchange, routing_key=binding_key)
        print(" [*] Waiting for logs. To exit press CTRL+C")
        async with queue.iterator() as iterator:
            async for message in iterator:
                async with message.process():
                    print(f" [x] {message.routing_key!r}:{message.body!r}")


def test_topics(site: Site, socket: str, printed: Printed) -> None:
    async def main() -> None:
        receiver = asyncio.create_task(receive_logs_topic(["kern.*", "*.critical"]))
        await until(lambda: printed.count("Waiting for logs"), "the receiver")
        await consumers(site, "task_queue", 1)
        for argv in (["kern.info", "booted"], ["app.info", "started"],
                     ["app.critical", "disk", "full"], ["kern.critical", "panic"]):
            await emit_log_topic(argv)
        await until(lambda: printed.count(" [x] '") == 3, "the three matching logs")
        await stop(receiver)
    try:
        run(main())
    finally:
        forget(site, queues=("task_queue",), exchanges=("topic_logs",))
    got = [line for line in printed.read() if line.startswith(" [x] '")]
    assert got == [" [x] 'kern.info':b'booted'", " [x] 'app.critical':b'disk full'",
                   " [x] 'kern.critical':b'panic'"]


# ----- 6. RPC -------------------------------------------------------------------------------------

def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


async def rpc_server() -> None:
    connection = await kzpool.aio.connect()
    channel = await connection.channel()
    exchange = channel.default_exchange
    queue = await channel.declare_queue("rpc_queue")
    print(" [x] Awaiting RPC requests")
    try:
        async with queue.iterator() as qiterator:
            async for message in qiterator:
                try:
                    async with message.process(requeue=False):
                        assert message.reply_to is not None
                        n = int(message.body.decode())
                        print(f" [.] fib({n})")
                        response = str(fib(n)).encode()
                        await exchange.publish(
                            Message(body=response, correlation_id=message.correlation_id),
                            routing_key=message.reply_to)
                        print(" Request complete")
                except Exception:
                    print(" Processing error for message", message)
    finally:
        await connection.close()


class FibonacciRpcClient:
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    callback_queue: aio_pika.abc.AbstractQueue

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[bytes]] = {}

    async def connect(self) -> FibonacciRpcClient:
        self.connection = await kzpool.aio.connect()
        self.channel = await self.connection.channel()
        self.callback_queue = await self.channel.declare_queue(exclusive=True)
        await self.callback_queue.consume(self.on_response, no_ack=True)
        return self

    async def on_response(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.correlation_id is None:
            print(f"Bad message {message!r}")
            return
        future: asyncio.Future[bytes] = self.futures.pop(message.correlation_id)
        future.set_result(message.body)

    async def call(self, n: int) -> int:
        correlation_id = str(uuid.uuid4())
        future = asyncio.get_running_loop().create_future()
        self.futures[correlation_id] = future
        await self.channel.default_exchange.publish(
            Message(str(n).encode(), content_type="text/plain", correlation_id=correlation_id,
                    reply_to=self.callback_queue.name),
            routing_key="rpc_queue")
        return int(await future)


def test_rpc(site: Site, socket: str, printed: Printed) -> None:
    answers: dict[int, int] = {}

    async def main() -> None:
        server = asyncio.create_task(rpc_server())
        await until(lambda: printed.count("Awaiting RPC requests"), "the server")
        await consumers(site, "rpc_queue", 1)
        fibonacci_rpc = await FibonacciRpcClient().connect()
        print(" [x] Requesting fib(10)")
        answers[10] = await fibonacci_rpc.call(10)
        results = await asyncio.gather(*(fibonacci_rpc.call(n) for n in range(12)))
        answers.update(enumerate(results))
        await fibonacci_rpc.connection.close()
        # the reply can arrive before the server's own publish confirm does
        await until(lambda: printed.count(" Request complete") >= 13, "the server's confirms")
        await stop(server)
    try:
        run(main())
    finally:
        forget(site, queues=("rpc_queue",))
    assert answers == {n: fib(n) for n in range(12)}
    assert printed.count(" Request complete") == 13 and printed.count("error") == 0


# ----- 7. publisher confirms ----------------------------------------------------------------------

async def publish_individually(count: int) -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("hello")
        for i in range(count):
            await channel.default_exchange.publish(
                Message(f"Hello World {i}!".encode()), routing_key=queue.name, timeout=5.0)
        print(" [x] Sent and confirmed messages one by one")


async def publish_batches(count: int) -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("hello")
        batchsize = 100
        outstanding_messages: list[asyncio.Task[Any]] = []
        for i in range(count):
            outstanding_messages.append(asyncio.create_task(channel.default_exchange.publish(
                Message(f"Hello World {i}!".encode()), routing_key=queue.name, timeout=5.0)))
            await asyncio.sleep(0)
            if len(outstanding_messages) == batchsize:
                await asyncio.gather(*outstanding_messages)
                outstanding_messages.clear()
        if outstanding_messages:
            await asyncio.gather(*outstanding_messages)
        print(" [x] Sent and confirmed messages in batches")


async def publish_and_handle_confirm(exchange: aio_pika.abc.AbstractExchange, queue_name: str,
                                     message_body: bytes) -> None:
    try:
        confirmation = await exchange.publish(Message(message_body), routing_key=queue_name,
                                              timeout=5.0)
    except DeliveryError as e:
        print(f"Delivery of {message_body!r} failed with exception: {e}")
    except TimeoutError:
        print(f"Timeout occured for {message_body!r}")
    else:
        if not isinstance(confirmation, pamqp.commands.Basic.Ack):
            print(f"Message {message_body!r} was not acknowledged by broker!")


async def publish_asynchronously(count: int, queue_name: str = "hello") -> None:
    connection = await kzpool.aio.connect()
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("hello")
        tasks = []
        for i in range(count):
            tasks.append(asyncio.create_task(publish_and_handle_confirm(
                channel.default_exchange, queue_name or queue.name,
                f"Hello World {i}!".encode())))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        print(" [x] Sent and confirmed messages asynchronously")


def hello_depth(site: Site) -> int:
    with pika.BlockingConnection(pika.URLParameters(site.uri)) as conn:
        return int(conn.channel().queue_declare("hello", passive=True).method.message_count)


@pytest.mark.parametrize("program", [publish_individually, publish_batches,
                                     publish_asynchronously])
def test_publisher_confirms(site: Site, socket: str, printed: Printed,
                            program: Callable[[int], Awaitable[None]]) -> None:
    try:
        run(program(CONFIRMED))
        assert hello_depth(site) == CONFIRMED  # each publish returned after its confirm
    finally:
        forget(site, queues=("hello",))
    assert printed.count(" [x] Sent and confirmed messages") == 1
    assert not [line for line in printed.read() if "failed" in line or "not ackn" in line
                or "Timeout" in line]


def test_publisher_confirms_asynchronously_tells_unroutable_and_nacked(
        site: Site, socket: str, printed: Printed) -> None:
    """The asynchronous program's other branches: a message no queue takes comes back (not a
    ``Basic.Ack``); a queue that rejects publishes past its length nacks (DeliveryError)."""
    async def main() -> None:
        await publish_asynchronously(3, queue_name="no-such-queue")
        connection = await kzpool.aio.connect()
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue("bounded", arguments={
                "x-max-length": 1, "x-overflow": "reject-publish"})
            for i in range(3):
                await publish_and_handle_confirm(channel.default_exchange, "bounded",
                                                 f"bounded {i}".encode())
    try:
        run(main())
    finally:
        forget(site, queues=("hello", "bounded"))
    assert printed.count("was not acknowledged by broker!") == 3
    assert printed.count("b'bounded 0'") == 0
    assert printed.count("Delivery of b'bounded 1' failed with exception: Message delivery"
                         " failed: Basic.Nack") == 1
    assert printed.count("failed with exception") == 2
