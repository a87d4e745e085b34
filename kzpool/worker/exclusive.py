"""Exclusive queues of a worker's leases: which client connection owns each, and their end.

RabbitMQ scopes an exclusive queue to the AMQP connection that declared it: another
connection that touches it gets 405 ``RESOURCE_LOCKED``, and the broker deletes it when
that connection closes.  Every lease of a worker shares the worker's one connection, which
outlives every client, so the broker alone would let any lease use any of them and delete
none.  A worker keeps the owner a pika user expects instead: the client connection object
the lease came from (its :attr:`~kzpool.common.options.LeaseOptions.connection_id`, with the
uid of the client's peer credentials, so that a process of another user cannot claim it; a
lease without one is its own owner).

* **What each owns.**  An exclusive ``queue_declare`` the broker answers is recorded under
  its owner, by the name the broker gave (server-named included); a ``queue_delete``
  forgets it.  A named declare claims its name while it waits for the broker.
* **Locked for the others.**  A lease of another owner that declares (even passively),
  consumes from, gets from, binds, unbinds, purges or deletes it is answered as the broker
  answers another connection: its channel is closed with 405 ``RESOURCE_LOCKED`` and the
  broker's text (first asking the broker, on the worker's own channel, whether the queue is
  still there: one auto-deleted or expired is another's to declare).  Publishing to it is
  allowed, as the broker allows it (RPC replies).
* **Deleted when the owner leaves this worker**: when no lease of that client connection
  is bound here any more, its exclusive queues are deleted on the worker's own channel
  (:mod:`.janitor`; the broker cancels their consumers).  A lease leaves when it is closed
  or its client socket closes (its connection closed, its process gone, however), or when
  it moves to another worker.  A lease whose channel was closed for a channel error is not
  gone: it comes back on its next call, so its owner's queues stay until it does or its
  process ends (a pidfd says when).
* **Moves.**  A server-named queue that its own lease declares again on a new channel here
  (a replay after a channel error) keeps its name and its messages; elsewhere the replay
  makes a new one (renamed, as any move).
* A lost broker connection took all its exclusive queues with it: all is forgotten.

Runs on the worker's loop; nothing blocks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pika.exceptions
from pika.adapters.select_connection import IOLoop

from ..common import messages
from ..common.messages import LeaseEvent
from .janitor import Janitor
from .session import Session

log = logging.getLogger("kzpool.worker")

LOCKED = 405
LOCKED_TEXT = ("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in"
               " vhost '{vhost}'. It could be originally declared on another connection or"
               " the exclusive property value does not match that of the original"
               " declaration.")  # RabbitMQ's words (3.x and 4.x)
# calls on a queue that another connection's exclusive queue refuses (basic_consume and
# basic_get come as their own requests)
QUEUE_CALLS = frozenset({"queue_declare", "queue_bind", "queue_unbind", "queue_purge",
                         "queue_delete"})
REPLAYED_NAME = "_name"  # a replayed server-named declare: the name it had (lease.topology)
MAX_LOST = 64  # leases of one owner kept for, lost to a channel error and not back yet


@dataclass(frozen=True)
class Owner:
    """A client connection, as a worker knows it."""

    key: str  # its connection_id (a lease without one: the lease's own id)
    uid: int  # from the peer credentials of its leases

    @classmethod
    def of(cls, session: Session, uid: int) -> Owner:
        return cls(session.options.connection_id or f"lease/{session.lease}", uid)


@dataclass
class Holding:
    """One owner on this worker."""

    sessions: set[Session] = field(default_factory=set)  # its leases bound here now
    queues: set[str] = field(default_factory=set)  # its exclusive queues here
    lost: dict[str, int] = field(default_factory=dict)  # leases that will come back → pid

    @property
    def idle(self) -> bool:
        return not self.sessions and not self.lost


class Exclusives:
    """The exclusive queues of one worker's connection (see the module); ``vhost`` is the
    connection's, for the broker's text."""

    def __init__(self, ioloop: Any, vhost: str) -> None:
        self.ioloop = ioloop
        self.vhost = vhost
        self.janitor = Janitor(ioloop)
        self.holdings: dict[Owner, Holding] = {}
        self.owners: dict[Session, tuple[Owner, int]] = {}  # each bound session: owner, pid
        self.queues: dict[str, Owner] = {}  # each exclusive queue: its owner
        self.claims: dict[str, tuple[Owner, Any]] = {}  # named declares unanswered: channel
        self.watches: dict[int, int] = {}  # pid of a lease that will come back → its pidfd

    # ----- the broker connection ----------------------------------------------------------

    def start(self, connection: Any) -> None:
        self.janitor.start(connection)

    def reset(self) -> None:
        """The broker connection is gone, and every exclusive queue with it."""
        self.janitor.stop()
        for pid in list(self.watches):
            self._unwatch(pid)
        self.holdings.clear()
        self.owners.clear()
        self.queues.clear()
        self.claims.clear()

    def channel_closed(self, channel: Any) -> None:
        """A lease's channel closed: a named declare it had in flight was not answered."""
        if self.claims:
            self.claims = {q: c for q, c in self.claims.items() if c[1] is not channel}

    # ----- leases ---------------------------------------------------------------------------

    def attach(self, session: Session, pid: int, uid: int) -> None:
        """``session`` (of process ``pid``, user ``uid``) is bound here."""
        owner = Owner.of(session, uid)
        self.owners[session] = (owner, pid)
        holding = self.holdings.setdefault(owner, Holding())
        holding.sessions.add(session)
        lost = holding.lost.pop(session.lease, None)
        if lost is not None:
            self._prune(lost)

    def detach(self, session: Session, how: LeaseEvent) -> None:
        """``session`` ended (``how``); its owner's queues go if it has no lease here now."""
        owner, pid = self.owners.pop(session, (None, 0))
        holding = self.holdings.get(owner) if owner is not None else None
        if owner is None or holding is None:
            return
        holding.sessions.discard(session)
        if how is LeaseEvent.LOST and holding.queues and self.janitor.connection is not None \
                and self._watch(pid):
            holding.lost[session.lease] = pid  # its lease comes back on its next call
            while len(holding.lost) > MAX_LOST:  # the oldest were given up, most likely
                self._prune(holding.lost.pop(next(iter(holding.lost))))
        self._settle(owner)

    def _settle(self, owner: Owner) -> None:
        holding = self.holdings.get(owner)
        if holding is None or not holding.idle:
            return
        del self.holdings[owner]
        gone = sorted(q for q in holding.queues if self.queues.get(q) == owner)
        if gone:
            log.info("a client connection of uid %d left: deleting its exclusive queues %s",
                     owner.uid, ", ".join(gone))
        for queue in gone:  # locked until deleted: the janitor checks after it deletes
            self.janitor.delete(queue, functools.partial(self._deleted, queue, owner))

    def _deleted(self, queue: str, owner: Owner, _gone: bool) -> None:
        """The janitor deleted ``owner``'s queue: it is nobody's now."""
        holding = self.holdings.get(owner)
        if self.queues.get(queue) == owner and (holding is None or queue not in holding.queues):
            del self.queues[queue]

    # ----- processes whose lease will come back ---------------------------------------------

    def _watch(self, pid: int) -> bool:
        """Learn when process ``pid`` ends; ``False`` if it is gone (or cannot be watched)."""
        if pid in self.watches:
            return True
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        self.watches[pid] = fd
        self.ioloop.add_handler(fd, self._on_exit, IOLoop.READ)
        return True

    def _on_exit(self, fd: int, _events: int) -> None:
        pid = next((p for p, f in self.watches.items() if f == fd), None)
        if pid is None:
            return
        self._unwatch(pid)
        for owner, holding in list(self.holdings.items()):
            holding.lost = {lease: p for lease, p in holding.lost.items() if p != pid}
            self._settle(owner)

    def _prune(self, pid: int) -> None:
        if not any(pid in h.lost.values() for h in self.holdings.values()):
            self._unwatch(pid)

    def _unwatch(self, pid: int) -> None:
        fd = self.watches.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.ioloop.remove_handler(fd)
            os.close(fd)

    # ----- calls ----------------------------------------------------------------------------

    def call(self, session: Session, request: messages.Request) -> None:
        """Pass a lease's call on to its channel, refuse it as the broker would, or hold it
        while the worker's own channel asks the broker something first."""
        entry = self.owners.get(session)
        queue = named_queue(request)
        if entry is None or (queue is None and request.method != "queue_declare"):
            session.forward(request)
            return
        owner = entry[0]
        holder = self._holder(queue) if queue else None
        if holder is not None and holder != owner:
            self._locked(session, request, queue or "")
        elif request.method == "queue_declare":
            self._declare(session, request, owner, queue)
        elif request.method == "queue_delete" and queue:
            session.forward(request, lambda _frame: self._forget(queue))
        else:
            session.forward(request)

    def _holder(self, queue: str) -> Owner | None:
        claim = self.claims.get(queue)
        return claim[0] if claim is not None else self.queues.get(queue)

    def _declare(self, session: Session, request: messages.Request, owner: Owner,
                 queue: str | None) -> None:
        args = request.args
        if not args.get("exclusive") or args.get("passive"):
            session.forward(request)
        elif queue:
            self.claims[queue] = (owner, session.channel)
            if not session.forward(request, lambda frame: self._declared(owner, frame)):
                self.claims.pop(queue, None)
        elif self.queues.get(old := str(args.get(REPLAYED_NAME) or "")) == owner:
            self.janitor.check(old, lambda there: self._replay(session, request, old, there))
        else:
            session.forward(request, lambda frame: self._declared(owner, frame))

    def _declared(self, owner: Owner, frame: Any) -> None:
        """The broker made (or found) ``owner``'s exclusive queue."""
        queue = str(frame.method.queue)
        claim = self.claims.get(queue)
        if claim is not None and claim[0] == owner:
            del self.claims[queue]
        holding = self.holdings.get(owner)
        if holding is None:  # its owner left before the answer came
            self.queues[queue] = owner
            self.janitor.delete(queue, functools.partial(self._deleted, queue, owner))
            return
        self.queues[queue] = owner
        holding.queues.add(queue)

    def _replay(self, session: Session, request: messages.Request, old: str,
                there: bool) -> None:
        """A server-named queue declared again by its own connection: the same queue, if
        it is still there (a passive declare of it answers with its name)."""
        if session.done:
            return
        owner = self.owners[session][0]
        if there and self.queues.get(old) == owner:
            args = {**request.args, "queue": old, "passive": True}
            session.forward(messages.Call(request.id, "queue_declare", args))
            return
        self._forget(old)
        session.forward(request, lambda frame: self._declared(owner, frame))

    def _forget(self, queue: str) -> None:
        owner = self.queues.pop(queue, None)
        holding = self.holdings.get(owner) if owner is not None else None
        if holding is not None:
            holding.queues.discard(queue)

    def _locked(self, session: Session, request: messages.Request, queue: str) -> None:
        """Another owner's queue: 405, unless the broker says it is gone (a claim is not
        answered yet: taken)."""
        if queue in self.claims:
            self._refuse(session, queue)
            return

        def checked(there: bool) -> None:
            if session.done:
                return
            if there:  # (if its owner just left, it is being deleted: still locked)
                self._refuse(session, queue)
                return
            self._forget(queue)  # auto-deleted, expired, deleted by an operator
            self.call(session, request)
        self.janitor.check(queue, checked)

    def _refuse(self, session: Session, queue: str) -> None:
        text = short_string(LOCKED_TEXT.format(queue=queue, vhost=self.vhost))
        log.info("lease %s: %d on queue %s, exclusive to another client connection",
                 session.lease, LOCKED, queue)
        session.on_channel_closed(pika.exceptions.ChannelClosedByBroker(LOCKED, text))


def short_string(text: str) -> str:
    """``text`` as the broker sends a reply text: over AMQP's 255 bytes, its first 252 and
    ``...``."""
    data = text.encode()
    if len(data) <= 255:
        return text
    return data[:252].decode(errors="ignore") + "..."


def named_queue(request: messages.Request) -> str | None:
    """The queue a call names, if it names one (``""``: a new server-named one, or the
    channel's last)."""
    if not isinstance(request, messages.Consume | messages.Get) and \
            request.method not in QUEUE_CALLS:
        return None
    queue = request.args.get("queue")
    return queue if isinstance(queue, str) and queue else None
