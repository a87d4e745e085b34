"""What the kombu transport raises: py-amqp's classes, so kombu and Celery sort them.

kombu decides from a transport's error tuples whether to retry, reconnect or give up
(``connection_errors``, ``channel_errors`` and their recoverable subsets), and code written
for kombu's amqp transport catches ``amqp.exceptions.NotFound`` and the like.  So every
error of a lease leaves the transport as one of py-amqp's:

- what the broker said (it closed the channel or the connection, with a reply code) is
  py-amqp's own class for that code (``amqp.exceptions.error_for_code``): ``NotFound``,
  ``PreconditionFailed``, ``ResourceLocked``, ``AccessRefused``, ``InvalidCommand``, ...;
- what the pool said is a class below that is both kzpool's error and py-amqp's of the
  same kind, as kzpool's lease errors are pika's: :class:`PoolNotRunning` is a
  ``kzpool.PoolNotRunning`` and a ``RecoverableConnectionError`` (kombu retries it), a
  refused peer (:class:`PoolAccessDenied`) an ``AccessRefused`` (a worker stops, as with
  bad credentials), a nacked publish :class:`MessageNacked`, and so on through
  :data:`CLASSES`, one table.

Each is raised ``from`` the lease's error, which says more.  ``ValueError`` and
``TypeError`` (a bad argument, bad lease options) pass through: retrying cannot fix them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import amqp.exceptions as amqp

from ..common import errors

P = ParamSpec("P")
R = TypeVar("R")


class _Translated(errors.KzpoolError):
    """A kzpool error re-raised as py-amqp's kind (made from the lease's error)."""

    amqp_code = 0  # the AMQP reply code py-amqp's class would carry

    def __init__(self, message: str, **fields: object) -> None:
        Exception.__init__(self, message)
        self.message, self.fields = message, fields
        self.reply_text, self.reply_code = message, self.amqp_code
        self.method_sig, self.method_name = None, ""

    def __str__(self) -> str:
        return self.message


class PoolNotRunning(_Translated, errors.PoolNotRunning, amqp.RecoverableConnectionError):
    """No pool answers on the socket: kombu retries the connection."""


class PoolAccessDenied(_Translated, errors.PoolAccessDenied, amqp.AccessRefused):
    """The pool refused this process (its user or group): as bad credentials, not retried."""

    amqp_code = 403


class BrokerUnavailable(_Translated, errors.BrokerUnavailable,
                        amqp.RecoverableConnectionError):
    """No broker could serve a lease within its timeout: kombu reconnects and retries."""


class LeaseTimedOut(_Translated, amqp.RecoverableConnectionError):
    """A call had no reply within the lease's timeout.  Not a ``TimeoutError``: kombu reads
    those from ``drain_events`` as "nothing came"."""

    code = "timeout"


class LeaseClosed(_Translated, errors.LeaseClosed, amqp.RecoverableConnectionError):
    """The channel (lease) was closed."""


class ClientClosed(_Translated, errors.ClientClosed, amqp.RecoverableConnectionError):
    """The connection was closed."""


class Forked(_Translated, amqp.RecoverableConnectionError):
    """A connection or channel used in a process forked after it was made: it is the
    parent's.  kombu reconnects (a connection of the child's own)."""

    code = "forked"


class LimitExceeded(_Translated, errors.LimitExceeded, amqp.ResourceError):
    """One of the pool's limits (``setting`` names it)."""

    amqp_code = 506

    def __init__(self, message: str, setting: str = "", **fields: object) -> None:
        super().__init__(message, setting=setting, **fields)
        self.setting = setting


class ConnectionBlockedTimeout(_Translated, errors.ConnectionBlockedTimeout, amqp.Blocked):
    """The broker blocked the connection (flow control) longer than the lease waits."""


class DuplicateConsumerTag(_Translated, errors.DuplicateConsumerTag, amqp.NotAllowed):
    """``basic_consume`` named a consumer tag in use on the channel."""

    amqp_code = 530


class MessageNacked(_Translated, amqp.MessageNacked):
    """The broker nacked a publish (with ``confirm_publish``)."""

    code = "nack"


class PoolError(_Translated, amqp.RecoverableConnectionError):
    """Any other error of the pool (its protocol, a lease id not this process's): kombu
    reconnects."""


# kzpool's error -> the transport's; the first class of an error's MRO found here is used
CLASSES: dict[type[errors.KzpoolError], type[_Translated]] = {
    errors.PoolAccessDenied: PoolAccessDenied,
    errors.PoolNotRunning: PoolNotRunning,
    errors.BrokerUnavailable: BrokerUnavailable,
    errors.LeaseTimeout: LeaseTimedOut,
    errors.LeaseClosed: LeaseClosed,
    errors.ClientClosed: ClientClosed,
    errors.LimitExceeded: LimitExceeded,
    errors.ConnectionBlockedTimeout: ConnectionBlockedTimeout,
    errors.DuplicateConsumerTag: DuplicateConsumerTag,
    errors.NackError: MessageNacked,
    errors.KzpoolError: PoolError,
}


def amqp_error(exc: BaseException) -> BaseException:
    """What the transport raises for ``exc`` (``exc`` itself if it needs no change)."""
    if isinstance(exc, amqp.AMQPError | amqp.MessageNacked) or not isinstance(
            exc, errors.KzpoolError) or isinstance(exc, errors.LeaseRequestError):
        return exc
    if isinstance(exc, errors.ChannelClosedByBroker):
        return by_code(exc.reply_code, exc.reply_text, amqp.ChannelError)
    if isinstance(exc, errors.ConnectionClosedByBroker):
        return by_code(exc.reply_code, exc.reply_text, amqp.ConnectionError)
    cls = next(CLASSES[c] for c in type(exc).__mro__ if c in CLASSES)
    if cls is LimitExceeded:
        return LimitExceeded(exc.message, getattr(exc, "setting", ""))
    return cls(exc.message, **exc.fields)


def translating(method: Callable[P, R]) -> Callable[P, R]:
    """Raise what ``method`` raises as :func:`amqp_error` says."""
    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except errors.KzpoolError as exc:
            translated = amqp_error(exc)
            if translated is exc:
                raise
            raise translated from exc
    return call


def by_code(reply_code: int, reply_text: str, default: type[Exception],
            method: tuple[int, int] | None = None) -> Exception:
    """py-amqp's error for a broker's reply code (``default`` for a code it has none for)."""
    error: Exception = amqp.error_for_code(reply_code, reply_text, method, default)
    return error


def returned_error(reply_code: int, reply_text: str) -> Exception:
    """py-amqp's error for a ``basic.return`` (``NO_ROUTE``: a plain ``ChannelError``)."""
    return by_code(reply_code, reply_text, amqp.ChannelError, (60, 50))
