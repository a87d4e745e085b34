"""A lease's consumers and its queued events, as pika's ``BlockingChannel`` keeps them.

``basic_consume`` consumers get their deliveries through callbacks, which run only inside a
dispatcher (:mod:`.dispatch`); the ``consume()`` generator's consumer has a buffer of its
own that only the generator reads.  The broker's cancel of a consumer (its queue deleted)
comes after that consumer's last delivery: it ends the generator, or runs the
``add_on_cancel_callback`` callbacks and ends ``start_consuming`` once no consumer is left.
Returns go to the ``add_on_return_callback`` callbacks (none registered: dropped, as pika
does).  A :class:`~kzpool.client.lease.Lease` holds its :class:`Consumers`, which are also
what the dispatcher sees of it (a :class:`~kzpool.client.dispatch.Member`).  Deliveries read
together are handed out one at a time; after a callback that ran a while, the lease reads
what came meanwhile first, so a channel lost during that callback voids the deliveries read
before the loss (the broker gives them again) rather than handing them out with dead tags.

Hazards: not thread-safe; every call blocks; a callback's exception goes through the
dispatcher to its caller, and the events after it stay queued.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pika import frame as pika_frame
from pika import spec, validators
from pika.adapters.blocking_connection import ReturnedMessage

from ..common.errors import DuplicateConsumerTag, LeaseClosed, ReentrancyError
from .bound import Delivery
from .dispatch import Dispatcher
from .link import LeaseLink

log = logging.getLogger("kzpool.lease")

# a callback (or a generator's caller) that ran this long may have outlived its channel: the
# lease reads what came meanwhile before it hands out another delivery read before it, so a
# loss voids them (the broker gives them again) instead of their running with dead tags
STALE_AFTER = 0.001

OnMessage = Callable[[Any, Any, Any, bytes], None]
OnCancel = Callable[[Any], None]
OnReturn = Callable[[Any, Any, Any, bytes], None]
NOTHING = (None, None, None)


class Cancel:
    """The broker cancelled a ``basic_consume`` consumer: its callbacks' frame."""

    __slots__ = ("frame",)

    def __init__(self, frame: Any) -> None:
        self.frame = frame


class Returned:
    """A returned message, for the ``add_on_return_callback`` callbacks."""

    __slots__ = ("message",)

    def __init__(self, message: ReturnedMessage) -> None:
        self.message = message


CANCELLED = Cancel(None)  # in a generator's buffer: the broker cancelled its consumer
Event = Delivery | Cancel | Returned


@dataclass
class Consumer:
    callback: OnMessage
    auto_ack: bool


@dataclass
class Generator:
    """The ``consume()`` generator's consumer: resumed by a ``consume()`` with the same
    queue, ``auto_ack`` and ``exclusive``."""

    tag: str
    params: tuple[str, bool, bool]
    buffer: deque[Delivery | Cancel] = field(default_factory=deque)


class Consumers:
    """A lease's consumers, generator and event queue, on its ``link``.  Callbacks get
    ``channel`` (the lease) as their channel; ``reject(tag)`` gives a delivery back to its
    queue as the lease's ``basic_reject`` does."""

    def __init__(self, link: LeaseLink, dispatcher: Dispatcher, channel: object,
                 reject: Callable[[int], None]) -> None:
        self.link = link
        self.dispatcher = dispatcher
        self.channel = channel
        self.reject = reject
        self.events: deque[Event] = deque()
        self.consumers: dict[str, Consumer] = {}
        self.gen: Generator | None = None
        self.cancel_callbacks: list[OnCancel] = []
        self.return_callbacks: list[OnReturn] = []

    @property
    def more_waiting(self) -> bool:
        """Read deliveries wait to be dispatched or yielded (a settle may be batched)."""
        gen = self.gen
        return bool(self.events or (gen and gen.buffer))

    def clear(self) -> None:
        """The lease is closing: forget every consumer and what was queued."""
        self.events.clear()
        self.consumers.clear()
        self.gen = None

    # ----- callbacks --------------------------------------------------------------------

    def add_on_cancel_callback(self, callback: OnCancel) -> None:
        """``callback(method_frame)`` when the broker cancels a ``basic_consume`` consumer
        (``method_frame.method`` is a ``Basic.Cancel``)."""
        validators.require_callback(callback)
        self.cancel_callbacks.append(callback)

    def add_on_return_callback(self, callback: OnReturn) -> None:
        """``callback(lease, method, properties, body)`` for each message the broker
        returns (``method`` is a ``Basic.Return``), in a dispatcher."""
        validators.require_callback(callback)
        self.return_callbacks.append(callback)

    @property
    def consumer_tags(self) -> list[str]:
        """The tags of the consumers of this lease, the generator's included."""
        return [*self.consumers, *([self.gen.tag] if self.gen is not None else [])]

    def get_waiting_message_count(self) -> int:
        """Deliveries the ``consume()`` generator has read but not yielded yet."""
        gen = self.gen
        return 0 if gen is None else sum(1 for item in gen.buffer if item is not CANCELLED)

    # ----- basic_consume ----------------------------------------------------------------

    def basic_consume(self, queue: str, on_message_callback: OnMessage, auto_ack: bool = False,
                      exclusive: bool = False, consumer_tag: str | None = None,
                      arguments: dict[str, Any] | None = None) -> str:
        """Start a consumer; its deliveries go to ``on_message_callback(lease, method,
        properties, body)`` in a dispatcher.  Blocks until the broker's ``ConsumeOk``."""
        validators.require_string(queue, "queue")
        validators.require_callback(on_message_callback, "on_message_callback")
        tag = self._start_consumer(queue, auto_ack, exclusive, consumer_tag, arguments)
        self.consumers[tag] = Consumer(on_message_callback, auto_ack)
        return tag

    def basic_cancel(self, consumer_tag: str) -> list[Delivery]:
        """Cancel a consumer.  Its deliveries not yet dispatched are rejected (requeued),
        or, for an ``auto_ack`` consumer, returned, in order.  An unknown tag: ``[]``."""
        gen = self.gen
        if gen is not None and consumer_tag == gen.tag:
            self.cancel()
            return []
        consumer = self.consumers.get(consumer_tag)
        if consumer is None:
            log.warning("basic_cancel: no consumer %r on lease %s", consumer_tag, self.link.id)
            return []
        try:
            self._stop_consumer(consumer_tag)
        finally:
            self.consumers.pop(consumer_tag, None)
        left = self._take_events(consumer_tag)
        if consumer.auto_ack:
            return left
        for method, _properties, _body in left:
            self.reject(method.delivery_tag)
        return []

    def start_consuming(self) -> None:
        """Run the dispatcher until this lease has no ``basic_consume`` consumer left
        (cancelled by its owner or by the broker, or the lease closed).  Raises a
        callback's exception, and :class:`ChannelClosedByBroker` once if the broker closes
        the channel (the lease recovers after: calling it again carries on)."""
        if self.dispatcher.dispatching:
            raise ReentrancyError("start_consuming may not be called from inside a callback")
        link = self.link
        if link.closed:
            raise LeaseClosed("the lease is closed", lease=link.id)
        while self.consumers:
            link.ready()
            self.dispatcher.process(None, stop=lambda: link.lost)

    def stop_consuming(self, consumer_tag: str | None = None) -> None:
        """Cancel one consumer, or every one (the generator's first): ``start_consuming``
        returns once the callback that called this does."""
        if consumer_tag:
            self.basic_cancel(consumer_tag)
            return
        self.cancel()
        for tag in list(self.consumers):
            self.basic_cancel(tag)

    # ----- the consume() generator ------------------------------------------------------

    def consume(self, queue: str, auto_ack: bool = False, exclusive: bool = False,
                arguments: dict[str, Any] | None = None,
                inactivity_timeout: float | None = None,
                consumer_tag: str | None = None) -> Iterator[Any]:
        """Yield ``(method, properties, body)``; ``(None, None, None)`` after each
        ``inactivity_timeout`` seconds without one.  Nothing happens before the first
        ``next()``.  Ends when the broker cancels the consumer, or on ``cancel()`` or
        ``close()``; a ``consume()`` with the same queue, ``auto_ack`` and ``exclusive``
        resumes it (breaking out of the loop does not cancel it)."""
        link = self.link
        if link.closed:
            raise LeaseClosed("the lease is closed", lease=link.id)
        params = (queue, auto_ack, exclusive)
        gen = self.gen
        if gen is None:
            validators.require_string(queue, "queue")
            tag = self._start_consumer(queue, auto_ack, exclusive, consumer_tag, arguments)
            gen = self.gen = Generator(tag, params)
            gen.buffer.extend(self._take_events(tag))  # read with the ConsumeOk
        elif gen.params != params:
            raise ValueError(f"consume({params}) while the lease's consume() generator runs"
                             f" with {gen.params}: cancel() it first")
        while self.gen is gen:
            if gen.buffer:
                item = gen.buffer.popleft()
                if isinstance(item, Cancel):
                    self.gen = None
                    return
                handed = time.monotonic()
                yield item
                if gen.buffer and time.monotonic() - handed >= STALE_AFTER:
                    link.drain()  # a loss read now voids the rest (on_lost)
            elif not self._wait_generator(gen, inactivity_timeout):
                yield NOTHING

    def _wait_generator(self, gen: Generator, timeout: float | None) -> bool:
        """Dispatch until the generator has something (``False``: ``timeout`` passed)."""
        link = self.link
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.gen is gen and not gen.buffer:
            link.ready()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.dispatcher.process(
                left, stop=lambda: bool(gen.buffer) or link.lost or self.gen is not gen)
        return True

    def cancel(self) -> int:
        """Cancel the ``consume()`` generator; what it had not yielded is requeued (unless
        ``auto_ack``).  Returns 0, as pika does."""
        gen, self.gen = self.gen, None
        if gen is None:
            return 0
        self._stop_consumer(gen.tag)
        if not gen.params[1]:
            for item in gen.buffer:
                if not isinstance(item, Cancel):
                    self.reject(item[0].delivery_tag)
        return 0

    # ----- consumers on the link --------------------------------------------------------

    def _start_consumer(self, queue: str, auto_ack: bool, exclusive: bool,
                        consumer_tag: str | None, arguments: dict[str, Any] | None) -> str:
        if consumer_tag is not None and consumer_tag in self.consumer_tags:
            raise DuplicateConsumerTag(f"consumer tag {consumer_tag!r} is in use on this lease")
        reply = self.link.call("consume", "basic_consume", {
            "queue": queue, "auto_ack": auto_ack, "exclusive": exclusive,
            "consumer_tag": consumer_tag, "arguments": arguments})
        tag = str(reply.fields["consumer_tag"])
        self.link.state.topology.steps[-1].args["consumer_tag"] = tag  # replay keeps the same tag
        return tag

    def _stop_consumer(self, tag: str) -> None:
        """Cancel on the broker; a lease that lost its channel only forgets the consumer
        (it is gone with the channel)."""
        link = self.link
        if link.closed:
            return
        if link.lost and not link.failed:
            link.state.topology.record("call", "basic_cancel", {"consumer_tag": tag})
            return
        link.call("call", "basic_cancel", {"consumer_tag": tag})

    def _take_events(self, tag: str) -> list[Delivery]:
        """Take this consumer's queued deliveries (and its broker cancel) off the queue."""
        taken: list[Delivery] = []
        kept: deque[Event] = deque()
        for event in self.events:
            if isinstance(event, tuple) and event[0].consumer_tag == tag:
                taken.append(event)
            elif not (isinstance(event, Cancel) and event.frame.method.consumer_tag == tag):
                kept.append(event)
        self.events = kept
        return taken

    # ----- what the link tells the lease ------------------------------------------------

    def on_delivery(self, delivery: Delivery) -> None:
        gen = self.gen
        if gen is not None and delivery[0].consumer_tag == gen.tag:
            gen.buffer.append(delivery)
        else:
            self.events.append(delivery)

    def on_cancelled(self, tag: str) -> None:
        gen = self.gen
        if gen is not None and tag == gen.tag:
            gen.buffer.append(CANCELLED)
        elif tag in self.consumers:
            method = spec.Basic.Cancel(consumer_tag=tag, nowait=True)
            self.events.append(Cancel(pika_frame.Method(self.link.state.channel_number, method)))

    def on_returned(self, message: ReturnedMessage) -> None:
        if self.return_callbacks:
            self.events.append(Returned(message))

    def on_lost(self) -> None:
        """The deliveries read so far are void: the broker redelivers them."""
        self.events = deque(e for e in self.events if not isinstance(e, tuple))
        if self.gen is not None:
            self.gen.buffer = deque(e for e in self.gen.buffer if isinstance(e, Cancel))

    # ----- what the dispatcher sees (a Member) ---------------------------------------------

    def after_fork(self, parent: int, connection_id: str) -> None:
        """In a child of ``fork()`` (see :meth:`LeaseLink.after_fork`): what the parent's
        channel delivered is the parent's to handle."""
        self.link.after_fork(parent, connection_id)
        self.on_lost()

    @property
    def owner(self) -> int:
        return self.link.thread

    @property
    def blocked(self) -> bool:
        return self.link.state.blocked

    def wait_fd(self) -> int | None:
        sock = self.link.sock
        return None if sock is None else sock.fileno()

    def prepare_wait(self) -> None:
        """Before a dispatcher waits: settles out; a consuming lease that lost its channel
        (not by its own fault, which its next call raises) gets a new one now."""
        link = self.link
        link.flush()
        if link.lost and not link.failed and not link.closed and (self.consumers or self.gen):
            link.ready()

    def read_now(self) -> None:
        self.link.drain()

    def has_events(self) -> bool:
        return bool(self.events)

    def dispatch_events(self) -> None:
        link, clock = self.link, time.monotonic
        started = clock()
        while self.events and not link.closed:  # a callback may cancel or close
            self._dispatch(self.events.popleft())
            if self.events:
                now = clock()
                if now - started >= STALE_AFTER:
                    link.drain()  # a loss read now voids the rest (on_lost)
                    now = clock()
                started = now

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, tuple):
            method, properties, body = event
            consumer = self.consumers.get(method.consumer_tag)
            if consumer is not None:
                consumer.callback(self.channel, method, properties, body)
        elif isinstance(event, Cancel):
            if self.consumers.pop(event.frame.method.consumer_tag, None) is not None:
                for callback in list(self.cancel_callbacks):
                    callback(event.frame)
        else:
            message = event.message
            for on_return in list(self.return_callbacks):
                on_return(self.channel, message.method, message.properties, message.body)
