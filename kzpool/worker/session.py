"""Worker side of a lease: one client socket bound to one pika channel.

From the moment a worker binds a client's socket to a channel, the client and the worker
talk directly, in :mod:`kzpool.common.wire` frames.  Everything here runs in the worker's
pika ``IOLoop``: no call blocks.  Output to the client is buffered per session and flushed
once per loop pass, and bounded in bytes: a client that stops reading is held back, its
consumers cancelled at the broker until it reads again (:mod:`.outbox`).

Broker events on the channel go to the client in the order they came: deliveries, returns,
and the broker's cancel of a consumer (:class:`~kzpool.common.messages.Cancelled`, after the
consumer's last delivery).

A session ends when the client goes away (``released``), when its channel or connection is
lost (``lost``: the client comes back and replays its topology), or when the master moves
it to another broker (``moved``, after the client says ``bye``).
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import pika.exceptions
from pika import spec
from pika.adapters.select_connection import IOLoop

from ..common import messages, props, wire
from ..common.errors import LimitExceeded, ProtocolError
from ..common.messages import LeaseEvent, Message
from ..common.options import LeaseOptions
from ..common.wire import Flag, Kind
from . import amqp
from .bulk import Bulk
from .calls import (
    CHANNEL_CLOSED,
    CHANNEL_STATE,
    RPC_METHODS,
    CancelOk,
    check_args,
    consuming,
    fields,
    reason_of,
)
from .handover import Handover
from .holding import Holding
from .linger import Linger
from .outbox import Consume, Outbox, Pause, Pot
from .reading import Reading
from .spec import WorkerSpec
from .timeouts import ConsumeTimeout

log = logging.getLogger("kzpool.session")

_NOT_BULK = ("confirm_delivery", "tx_select")  # modes that keep publishes on the channel


class SessionHost(Protocol):
    """What a session needs of its worker."""

    ioloop: IOLoop
    counters: dict[str, int]  # the worker's, counted here
    spec: WorkerSpec  # its settings
    pot: Pot  # what its leases hold toward their clients, together
    bulk: Bulk  # its second connection, for leases publishing flat out (:mod:`.bulk`)

    def recycle(self, channel: Any, settled_first: bool) -> None: ...

    def session_ended(self, session: Session, how: LeaseEvent, why: str) -> None: ...

    @property
    def exclusives(self) -> CallGuard: ...  # a client's calls go through it


class CallGuard(Protocol):
    """What a client's call goes through first: its exclusive queues' owners
    (:mod:`kzpool.worker.exclusive`), which pass it on with :meth:`Session.forward`."""

    def call(self, session: Session, request: messages.Request) -> None: ...


class Session:
    """One lease on this worker.  Not thread-safe: the worker's loop only."""

    def __init__(self, host: SessionHost, sock: socket.socket, lease: str, channel: Any,
                 options: LeaseOptions) -> None:
        self.host = host
        self.ioloop = host.ioloop
        self.sock = sock
        self.fd = sock.fileno()
        self.lease = lease
        self.channel = channel
        self.options = options  # the client's, whole: what this session honours
        self.pause = Pause(self.ioloop, channel, self._on_message, lease)
        self.outbox = Outbox(self, host.spec.settings, host.pot, self.pause)
        self.writing = False
        self.ended: LeaseEvent | None = None
        self.gets: deque[tuple[int, bool]] = deque()  # basic.gets in flight: id, auto_ack
        self.handover: Handover | None = None  # moved by the master: settling first
        self.moving = False  # told to move: waiting for its bye
        self.qos_set = False
        self.watching_cancels = False
        self.close_code, self.close_text = 0, "Normal shutdown"  # the client's, at close
        self.linger: Linger | None = None  # closed by the client, until it has the answer
        self.clean = True  # nothing of this lease stays on the channel: it may serve another
        self.unanswered = 0  # calls sent to the broker, not answered yet
        self.unsure = False  # published or settled: the broker may still close the channel
        self.counters = host.counters
        self.consumers: set[str] = set()  # tags of its consumers, while they consume
        self.number = channel.channel_number
        self.holding = Holding(self.number)  # the deliveries the broker holds for it
        self.connection = channel.connection  # a BatchedConnection: frames past pika
        self.timeout = ConsumeTimeout.of(options, host.spec.settings, self.connection)
        self.connection.add_sink(self.number, self)
        self.lane: tuple[Any, int] = (self.connection, self.number)  # where publishes go
        self.bulk_channel: Any = None  # its channel on the bulk connection, if it went there
        self.bulk_ok = True  # no confirms, transactions, mandatory publishes: it may go there
        self.bulk = host.bulk
        self.reading = Reading(self)
        sock.setblocking(False)
        self.ioloop.add_handler(self.fd, self._on_io, IOLoop.READ)
        log.debug("lease %s on channel %d: %s", lease, self.number, options)

    @property
    def done(self) -> bool:
        return self.ended is not None

    # ----- output ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.outbox.send(data)

    def event(self, message: Message) -> None:
        self.outbox.send(messages.encode(message))

    def flush(self) -> None:
        self.outbox.flush()

    def watch(self) -> None:  # reading unless its read side or its outbox holds it back
        reading = self.reading.events if self.outbox.reading else 0
        self.ioloop.update_handler(self.fd, reading | (IOLoop.WRITE if self.writing else 0))

    def client_gone(self) -> None:
        self.end(LeaseEvent.RELEASED, "client gone")

    def over_budget(self, error: LimitExceeded) -> None:
        """Held back, its client reading nothing: closed, told why (:mod:`.outbox`)."""
        self.outbox.cut()
        self.event(messages.Lost(reason_of(error)))
        self.end(LeaseEvent.LOST, str(error), answer=True)  # a linger, its answer that Lost

    # ----- input ------------------------------------------------------------------------------

    def _on_io(self, _fd: int, events: int) -> None:
        if self.linger is not None:
            self.linger.on_io(events)
            return
        if events & IOLoop.WRITE:
            self.flush()
        if events & IOLoop.READ and self.ended is None:
            self.reading.on_readable()  # held back, in turns, bounded: :mod:`.reading`

    def request(self, payload: bytes) -> None:
        """A client's JSON frame (its publishes and settles are :mod:`.reading`'s)."""
        self._request(messages.decode(payload, messages.TO_SESSION))

    def publish_content(self, flags: int, properties: bytes) -> bool:
        """Whether a publish may go to the broker (its body is the caller's to send)."""
        amqp.check_properties(properties)  # a bad one would close the whole connection
        if flags & Flag.MANDATORY:
            self.clean = self.bulk_ok = False  # a return may still come back on this channel
        self.unsure = True  # a missing exchange closes the channel, later
        self.counters["publishes"] += 1
        if not self.channel.is_open:
            self.event(messages.Error(CHANNEL_CLOSED))
            return False
        return True

    def _request(self, request: Message) -> None:
        match request:
            case messages.Close() | messages.Bye():
                pass  # ending leaves nothing on the channel
            case messages.Call(method=method) if method not in CHANNEL_STATE:
                pass
            case _:  # consumers, deliveries, QoS, confirm or tx mode live on the channel
                self.clean = False  # and with confirms or a transaction, no bulk publishes:
                self.bulk_ok &= getattr(request, "method", "") not in _NOT_BULK
        match request:
            case messages.Bye():
                self.end(LeaseEvent.MOVED, "moved")
            case messages.Close():
                self.close_code, self.close_text = request.reply_code, request.reply_text
                self.end(LeaseEvent.RELEASED, "closed by the client", answer=True)
            case messages.Call() | messages.Consume() | messages.ConfirmSelect() | \
                    messages.Get():
                self.host.exclusives.call(self, request)

    def forward(self, request: messages.Request,
                seen: Callable[[Any], None] | None = None) -> bool:
        """Make a client's call on the channel; ``seen`` gets the broker's answer first.
        ``False``: it could not be made (the client is told why)."""
        try:
            self._channel_call(request, seen)
        except (TypeError, ValueError, pika.exceptions.AMQPError) as exc:
            self.event(messages.Reply(request.id, error=reason_of(exc)))
            return False
        return True

    def _channel_call(self, request: messages.Request,
                      seen: Callable[[Any], None] | None) -> None:
        args, reply = request.args, self._replier(request.id, seen)
        check_args(args)  # pika would fail to encode them after it began, and end the connection
        match request:
            case messages.Call(method="basic_cancel") if not consuming(self.channel, args):
                self.pause.forget(str(args.get("consumer_tag", "")))  # held back, maybe
                reply(CancelOk(str(args.get("consumer_tag", ""))))  # pika would not answer
            case messages.Call(method="flow"):
                self.channel.flow(bool(args.get("active")), callback=lambda active: self.event(
                    messages.Reply(request.id, "Channel.FlowOk", {"active": active})))
            case messages.Call(method=method) if method in RPC_METHODS:
                self.qos_set = self.qos_set or method == "basic_qos"
                if method == "basic_cancel":  # what is still on its way goes to pika now
                    self.consumers.discard(str(args.get("consumer_tag", "")))
                elif method == "queue_declare":
                    self.timeout.declared(args)
                elif method == "basic_recover":  # what it held comes again, tagged anew
                    self.holding.take_all()
                if method in ("basic_recover", "tx_select"):  # see holding.py
                    self.holding.singly = True
                kwargs = {k: args[k] for k in RPC_METHODS[method] if k in args}
                getattr(self.channel, method)(callback=reply, **kwargs)
            case messages.Consume():
                self._bound_prefetch()
                if not self.watching_cancels:  # the channel is never handed on after this
                    self.watching_cancels = True
                    self.channel.add_on_cancel_callback(self._on_cancelled)
                queue = str(args.get("queue", ""))
                how = Consume(queue, bool(args.get("auto_ack")), bool(args.get("exclusive")),
                              self.timeout.arguments(queue, args.get("arguments")))
                self.channel.basic_consume(
                    queue, self._on_message, auto_ack=how.auto_ack, exclusive=how.exclusive,
                    consumer_tag=args.get("consumer_tag"), arguments=how.arguments,
                    callback=self._consumed(reply, how))
            case messages.ConfirmSelect():
                self.channel.confirm_delivery(self._on_confirm, callback=reply)
            case messages.Get():
                self.gets.append((request.id, bool(args.get("auto_ack"))))
                self.channel.basic_get(str(args.get("queue", "")), self._on_get_ok,
                                       auto_ack=bool(args.get("auto_ack")))
            case _:
                raise ProtocolError(f"unknown call {request.method[:40]!r}")

    def _bound_prefetch(self) -> None:
        """A consumer without QoS would let the broker push without limit: bound it."""
        prefetch = self.host.spec.settings.default_prefetch
        if not self.qos_set and prefetch:
            self.channel.basic_qos(prefetch_count=prefetch)
            self.qos_set = True

    def _consumed(self, reply: Callable[[Any], None], how: Consume) -> Callable[[Any], None]:
        """A consume's reply: from then on its deliveries come by the fast path."""
        def consumed(frame: Any) -> None:
            tag = self.holding.consuming(str(frame.method.consumer_tag), how.auto_ack)
            self.consumers.add(tag)
            self.pause.consuming(tag, how)
            reply(frame)
        return consumed

    def _replier(self, rid: int, seen: Callable[[Any], None] | None) -> Callable[[Any], None]:
        self.unanswered += 1

        def reply(frame: Any) -> None:
            self.unanswered -= 1
            if seen is not None:
                seen(frame)
            method = frame.method
            self.event(messages.Reply(rid, method.NAME, fields(method)))
        return reply

    # ----- broker events ----------------------------------------------------------------------

    def _on_message(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """A delivery pika read (one the fast path did not claim)."""
        self.deliver(method.consumer_tag, method.delivery_tag, method.redelivered,
                     wire.names(method.exchange, method.routing_key), props.encode(properties),
                     body)

    # the fast path's sink (kzpool.worker.fastpath): deliveries and confirms as bytes

    def claims(self, consumer_tag: str) -> bool:
        return consumer_tag in self.consumers or consumer_tag in self.holding.cancelled

    def deliver(self, consumer_tag: str, tag: int, redelivered: bool, names: bytes,
                properties: bytes, body: bytes) -> None:
        if self.ended is not None:
            return
        if consumer_tag in self.holding.cancelled or (  # late, after the broker cancelled it,
                self.outbox.full and consumer_tag not in self.holding.no_ack):  # or unseen
            self.connection.send_raw(amqp.settle(self.number, amqp.NACK, tag, False, True))
            return
        self.holding.delivered(tag, consumer_tag)
        self.counters["deliveries"] += 1
        if redelivered:
            self.counters["redeliveries"] += 1
        self.send(wire.deliver(tag, 0, consumer_tag, names, properties, body,
                               Flag.REDELIVERED if redelivered else 0))

    def confirm(self, tag: int, multiple: bool, nack: bool) -> None:
        self.send(wire.tagged(Kind.CONFIRM, tag, (Flag.MULTIPLE if multiple else 0)
                              | (Flag.NACK if nack else 0)))

    def _on_cancelled(self, frame: Any) -> None:
        """The broker cancelled a consumer, taking back what it held (see :mod:`.holding`)."""
        tag = str(frame.method.consumer_tag)
        self.consumers.discard(tag)
        self.pause.forget(tag)  # never consumed again, held back or not
        taken = self.holding.cancel(tag, self.counters, self.lease)
        self.connection.send_raw(amqp.cancel(self.number, tag))
        self.event(messages.Cancelled(tag, taken))
        if self.handover is not None:
            self.handover.check()

    def _on_get_ok(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        rid, auto_ack = self.gets.popleft() if self.gets else (0, True)
        self.holding.got(method.delivery_tag, auto_ack)
        flags = Flag.GET | (Flag.REDELIVERED if method.redelivered else 0)
        self.send(wire.deliver(method.delivery_tag, method.message_count, "",
                               wire.names(method.exchange, method.routing_key),
                               props.encode(properties), body, flags))
        self.event(messages.Reply(rid, "Basic.GetOk"))

    def on_get_empty(self) -> None:
        rid = self.gets.popleft()[0] if self.gets else 0
        self.event(messages.Reply(rid, "Basic.GetEmpty"))

    def _on_confirm(self, frame: Any) -> None:
        """A confirm pika read (the fast path takes them while the session is bound)."""
        method = frame.method
        self.confirm(method.delivery_tag, method.multiple, isinstance(method, spec.Basic.Nack))

    def on_return(self, method: Any, properties: Any, body: bytes) -> None:
        self.send(wire.returned(method.reply_code, method.reply_text, method.exchange,
                                method.routing_key, props.encode(properties), body))

    def on_channel_closed(self, reason: BaseException) -> None:
        if self.ended is None:
            taken = self.holding.closed(reason, self.counters, self.lease)
            self.event(messages.Lost(reason_of(reason), taken))
            self.end(LeaseEvent.LOST, str(reason))
        elif self.linger is not None:  # the broker's CloseOk (or the connection gone)
            self.linger.answer()

    # ----- ending -----------------------------------------------------------------------------

    def move(self) -> None:
        """The master moves this lease: handed over once it settled what it holds."""
        if self.handover is None and self.ended is None:
            self.consumers.difference_update(self.pause.stop())  # cancelled here already
            self.handover = Handover(self, self.host.spec.settings.move_grace)

    def end(self, how: LeaseEvent, why: str, answer: bool = False) -> None:
        """Close the channel and the client socket (``answer``: once the client has the
        answer to its close, :mod:`.linger`); tell the worker."""
        if self.ended is not None:
            return
        self.reading.pass_on()
        self.ended = how
        self.outbox.close()
        self.connection.remove_sink(self.number)
        self.reading.close()
        handed_on = self.channel.is_open and how is LeaseEvent.RELEASED and self.clean and \
            not self.unanswered
        if handed_on:
            self.host.recycle(self.channel, settled_first=self.unsure)
        elif self.channel.is_open:  # its consumers stay on (pika would cancel them first):
            # the broker then requeues what they had before its CloseOk, not a moment after
            self.channel._cancelled.update(getattr(self.channel, "_consumers", ()))
            self.channel.close(self.close_code, self.close_text)
        if answer:
            self.linger = Linger(self, at_once=handed_on)
        else:
            self.flush()
            self.ioloop.remove_handler(self.fd)
            self.sock.close()
        self.host.session_ended(self, how, why)
