"""A lease its client closed: the client's socket, kept until it has the answer to its close.

pika's ``BlockingChannel.close()`` returns once the broker has confirmed the close
(``Channel.CloseOk``), so the channel's unacked deliveries are back in their queues by then:
a ``basic_get`` right after, on another channel, finds them.  A lease keeps that promise:
the worker answers the client's :class:`~kzpool.common.messages.Close` with
:class:`~kzpool.common.messages.Closed` at once if the channel was handed on clean (nothing
of the lease is on it, nothing to requeue) or is gone already, else when the broker's
``CloseOk`` comes (or the connection goes, which requeues as much); then it hangs up.  A
client that hangs up first, or leaves the answer unread past its lease's timeout and
:data:`GRACE`, is let go.  Runs in the worker's loop only.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol

from pika.adapters.select_connection import IOLoop

from ..common import messages
from ..common.messages import LeaseEvent, Message
from ..common.options import LeaseOptions
from ..common.sockets import READ_SIZE, receive
from .outbox import Outbox

GRACE = 5.0  # seconds past the lease's timeout a closed lease's socket is kept at most


class Lingering(Protocol):
    """What a linger needs of its session."""

    ioloop: IOLoop
    sock: socket.socket
    fd: int
    channel: Any
    options: LeaseOptions
    outbox: Outbox  # what the client has not read yet
    writing: bool  # the session waits for its socket to be writable
    ended: LeaseEvent | None  # LOST: the client was told why already

    def event(self, message: Message) -> None: ...

    def flush(self) -> None: ...


class Linger:
    """The end of a session its client closed (see the module)."""

    def __init__(self, session: Lingering, at_once: bool) -> None:
        """``at_once``: the channel was handed back clean (the worker may still close it,
        with nothing of the lease's on it, but that close is no longer the session's)."""
        self.session = session
        self.answered = session.ended is LeaseEvent.LOST  # closed over its budget: told so
        self.timer = session.ioloop.call_later(session.options.timeout + GRACE, self.hang_up)
        if self.answered:
            self._flushed_or_gone()
        elif at_once or not session.channel.is_closing:
            self.answer()

    def answer(self) -> None:
        """The channel is closed (or handed on): tell the client, then hang up."""
        if not self.answered:
            self.answered = True
            self.session.event(messages.Closed())
            self._flushed_or_gone()

    def on_io(self, events: int) -> None:
        if events & IOLoop.READ and receive(self.session.sock, READ_SIZE) == b"":
            self.hang_up()  # the client is gone, or stopped waiting
        elif events & IOLoop.WRITE and self.answered:
            self._flushed_or_gone()

    def _flushed_or_gone(self) -> None:
        session = self.session
        session.flush()
        if not session.outbox.out or not session.writing:  # all sent, or the client is gone
            self.hang_up()

    def hang_up(self) -> None:
        session = self.session
        if session.sock.fileno() >= 0:
            session.ioloop.remove_timeout(self.timer)  # the session goes with it
            session.ioloop.remove_handler(session.fd)
            session.sock.close()
