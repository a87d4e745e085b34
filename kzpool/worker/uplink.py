"""The worker's link to the master: a socketpair made before the fork.

Up go reports (the connection's state and counters), lease news (what became of each lease)
and a beat every second; down come :mod:`~kzpool.common.messages` from the master, an
:class:`~kzpool.common.messages.Adopt` with the client socket it passes (SCM_RIGHTS).

Counter changes and the news of assignments and releases wait up to :data:`NEWS_DELAY`, so
a burst of short leases wakes the master once, not per lease; a lost or moved lease is told
at once (its client is about to ask the master for a new channel), and so is a state change
(the master decides on it).  Runs in the worker's loop only.

The link is non-blocking: what the master does not read yet waits in an
:class:`~kzpool.common.sockets.Outbox`, so the worker's loop (and its heartbeats) never
waits on the master; a master that leaves :data:`UPLINK_LIMIT` bytes unread is taken for
gone.  A client socket the master passes rides on the first byte of its ``adopt``, and
Linux ends a read right after the bytes that carried descriptors, so one read brings at most
one passed socket, that of the one ``adopt`` whose first byte it brought.  If the kernel had
to drop it (the worker at its file limit: ``MSG_CTRUNC``, no descriptor), that ``adopt``
comes without its socket: the worker tells the master the lease is lost (its client asks
again), and the next sockets still pair with their ``adopt`` messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable

from pika.adapters.select_connection import IOLoop

from ..common import messages
from ..common.errors import ProtocolError
from ..common.messages import LeaseEvent, LeaseNews, Message, Report
from ..common.sockets import LimitEpisode, Outbox
from ..common.wire import FrameReader, Kind

log = logging.getLogger("kzpool.worker")

BEAT_INTERVAL = 1.0
NEWS_DELAY = 0.005  # seconds counter changes, assignments, releases may wait for the master
URGENT = frozenset({LeaseEvent.LOST, LeaseEvent.MOVED})
UPLINK_LIMIT = 64 << 20

OnMessage = Callable[[Message, socket.socket | None], None]


class Uplink:
    """``on_message(message, sock)`` gets what the master says (``sock``: the client socket
    an ``adopt`` carries); ``on_gone()`` is called once the master is gone."""

    def __init__(self, sock: socket.socket, ioloop: IOLoop, master_pid: int,
                 report: Callable[[], Report], on_message: OnMessage,
                 on_gone: Callable[[], None]) -> None:
        self.sock = sock
        self.ioloop = ioloop
        self.master_pid = master_pid
        self._report = report
        self._on_message = on_message
        self._on_gone = on_gone
        self._reader = FrameReader()
        self._fds: list[int | None] = []  # passed by the master, not yet claimed (None:
        # one the kernel dropped at the file limit)
        self.dropped = LimitEpisode(log, "client sockets the master passes (their leases"
                                    " are placed again)")
        self._news: list[LeaseNews] = []
        self._news_due = False
        self._report_due = False
        self._outbox = Outbox(UPLINK_LIMIT)
        self._events = IOLoop.READ
        self._reading = False

    def start(self) -> None:
        self.sock.setblocking(False)
        self.ioloop.add_handler(self.sock.fileno(), self._on_io, IOLoop.READ)
        self._reading = True
        self.ioloop.call_later(BEAT_INTERVAL, self._beat)

    def stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            with contextlib.suppress(KeyError, ValueError):
                self.ioloop.remove_handler(self.sock.fileno())

    # ----- up --------------------------------------------------------------------------------

    def send(self, *batch: Message) -> None:
        if not self._outbox.put(b"".join(map(messages.encode, batch))):
            log.error("the master leaves over %d MiB unread on the link; taking it for gone",
                      UPLINK_LIMIT >> 20)
            self._outbox.close()
            self._on_gone()
            return
        self._flush()

    def _flush(self) -> None:
        try:
            done = self._outbox.flush(self.sock)
        except OSError:  # the master is gone: the link's EOF stops us
            self._outbox.close()
            done = True
        events = IOLoop.READ | (0 if done else IOLoop.WRITE)
        if events != self._events and self._reading:
            self._events = events
            self.ioloop.update_handler(self.sock.fileno(), events)

    def news(self, news: LeaseNews) -> None:
        self._news.append(news)
        if news.event in URGENT:
            self._flush_news()
        elif not self._news_due:
            self._news_due = True
            self.ioloop.call_later(NEWS_DELAY, self._flush_news)

    def _flush_news(self) -> None:
        self._news_due = False
        if self._news:
            batch, self._news = self._news, []
            self.send(*batch)

    def report_soon(self) -> None:
        if not self._report_due:
            self._report_due = True
            self.ioloop.call_later(NEWS_DELAY, self.report_now)

    def report_now(self) -> None:
        self._report_due = False
        self.send(self._report())

    def _beat(self) -> None:
        if os.getppid() != self.master_pid:
            self._on_gone()
            return
        self.send(messages.Beat())
        self.ioloop.call_later(BEAT_INTERVAL, self._beat)

    # ----- down ------------------------------------------------------------------------------

    def _on_io(self, _fd: int, events: int) -> None:
        if events & IOLoop.WRITE:
            self._flush()
        if events & IOLoop.READ:
            self._on_readable()

    def _on_readable(self) -> None:
        try:
            data, fds, flags, _addr = socket.recv_fds(self.sock, 65536, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, flags = b"", [], 0
        if flags & socket.MSG_CTRUNC and not fds:
            # the kernel could not give us the socket of the one adopt whose first byte
            # this read brought (the worker at its file limit): that adopt comes without it
            self.dropped.hit()
            self._fds.append(None)
        else:
            self._fds += fds
            self.dropped.clear()
        if not data:
            self._on_gone()
            return
        try:
            for kind, _flags, payload in self._reader.feed(data):
                if kind != Kind.JSON:
                    raise ProtocolError(f"unexpected frame kind {kind}")
                message = messages.decode(payload, messages.TO_WORKER_FROM_MASTER)
                self._on_message(message, self._claim_fd(message))
        except ProtocolError as exc:
            log.error("bad frame from the master: %s", exc)
            self._on_gone()

    def _claim_fd(self, message: Message) -> socket.socket | None:
        if isinstance(message, messages.Adopt) and self._fds:
            fd = self._fds.pop(0)
            return None if fd is None else socket.socket(fileno=fd)
        return None
