"""kzpool's one error tree.

Every error kzpool raises derives from :class:`KzpoolError`.  Errors carry fields (the
broker, the config key, the reply code) rather than only a message, and a stable ``code``
so that they can cross a process boundary as data, never as a pickled exception.
"""

from __future__ import annotations

import pika.exceptions as _pe


class KzpoolError(Exception):
    """Root of every error kzpool raises."""

    code = "error"

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.fields.items())
        return f"{type(self).__name__}({self.message!r}{extra})"

    def __str__(self) -> str:
        return self.message


class ConfigError(KzpoolError):
    """The configuration is invalid; ``problems`` holds one line per fault."""

    code = "config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems), problems=problems)
        self.problems = problems


class BrokerURIError(KzpoolError):
    """A broker URI cannot be used (scheme, port, vhost, ...)."""

    code = "bad_uri"


class TLSError(KzpoolError):
    """A TLS file cannot be used (missing, unreadable, not PEM, a key that does not match its
    certificate); the message names the file or files, never a key's password."""

    code = "tls"


class PoolNotRunning(KzpoolError, _pe.AMQPConnectionError):
    """No pool answers on the lease socket (pika code catching ``AMQPConnectionError``
    around its connect catches this too)."""

    code = "no_pool"


class ProtocolError(KzpoolError):
    """A peer sent a frame that breaks the wire format."""

    code = "protocol"


class LimitExceeded(KzpoolError):
    """A request would pass one of the pool's limits; ``setting`` names the ``[pool]``
    setting that sets it (``max_leases_per_process``, ``max_peers``, ...), or is empty
    where no setting does (the process's file limit)."""

    code = "limit"

    def __init__(self, message: str, setting: str, **fields: object) -> None:
        super().__init__(message, setting=setting, **fields)
        self.setting = setting


class LeaseNotYours(KzpoolError):
    """A request named a lease id that another client process got: a lease id serves only
    the process it was given to (its peer credentials), never another one."""

    code = "not_owner"


class StartupError(KzpoolError):
    """The pool could not reach its local primary broker within ``startup_timeout``."""

    code = "startup"


# ----- lease errors: subclasses of pika's where one matches, so pika code keeps working ------


class PoolAccessDenied(PoolNotRunning):
    """The lease socket exists but this process may not use it."""

    code = "access"


class LeaseRequestError(KzpoolError, ValueError):
    """The pool refused a lease request as malformed: unknown kind, zone, bad broker URI."""

    code = "bad_request"


class BrokerUnavailable(KzpoolError):
    """No broker could serve the lease within its timeout; ``broker`` names the one waited for."""

    code = "unavailable"


class LeaseTimeout(KzpoolError, TimeoutError):
    """A wait on a lease (confirms, a call across a move) passed its timeout."""

    code = "timeout"


class LeaseClosed(KzpoolError, _pe.ChannelWrongStateError):
    """The lease was closed by its owner."""

    code = "closed"


class ChannelClosedByBroker(KzpoolError, _pe.ChannelClosedByBroker):
    """The broker closed the lease's channel because of a call; the lease recovers after."""

    code = "channel_closed"

    def __init__(self, reply_code: int, reply_text: str, **fields: object) -> None:
        _pe.ChannelClosedByBroker.__init__(self, reply_code, reply_text)
        self.message = f"{reply_code} {reply_text}"
        self.fields = {"reply_code": reply_code, **fields}

    def __str__(self) -> str:
        return self.message


class DeliveryTakenBack(ChannelClosedByBroker):
    """An ack, nack or reject of a delivery the broker no longer holds: it took it back
    (its consumer cancelled: a consumer timeout elapsed, or its queue was deleted; or its
    channel closed: RabbitMQ 3.x answers a consumer timeout so), and gives it again.  The
    settle did nothing.  ``reply_code`` is 406 (PRECONDITION_FAILED), as the broker's own
    close for a consumer timeout; fields ``delivery_tag`` and ``consumer_tag``."""

    code = "taken_back"


class _Undelivered(KzpoolError):
    """Publishes the broker did not take; ``messages`` as pika gives them."""

    what = "not delivered"

    def __init__(self, messages: list[object]) -> None:
        super(KzpoolError, self).__init__(messages)  # pika's own __init__, next in the MRO
        self.message = f"{len(messages)} message(s) {self.what}"
        self.fields = {}

    def __str__(self) -> str:
        return self.message


class UnroutableError(_Undelivered, _pe.UnroutableError):
    """A mandatory publish was returned by the broker: no queue took it."""

    code = "unroutable"
    what = "returned by the broker: no queue took them"


class NackError(_Undelivered, _pe.NackError):
    """The broker nacked a publish."""

    code = "nack"
    what = "nacked by the broker"


class ConnectionBlockedTimeout(KzpoolError, _pe.ConnectionBlockedTimeout):
    """The broker blocked the connection (flow control) longer than the lease waits."""

    code = "blocked"


class ConnectionClosedByBroker(KzpoolError, _pe.ConnectionClosedByBroker):
    """The broker closed the whole connection because of a call this lease had in flight
    (an unknown exchange type, ``flow(False)``, ...).  The call is not sent again; the
    lease's next call runs on a new channel, and the other leases move once."""

    code = "connection_closed"

    def __init__(self, reply_code: int, reply_text: str, **fields: object) -> None:
        _pe.ConnectionClosedByBroker.__init__(self, reply_code, reply_text)
        self.message = f"{reply_code} {reply_text}"
        self.fields = {"reply_code": reply_code, **fields}

    def __str__(self) -> str:
        return self.message


class ClientClosed(KzpoolError, _pe.ConnectionWrongStateError):
    """The pool client (what ``kzpool.connect()`` returned) was closed by its owner."""

    code = "client_closed"


class ReentrancyError(KzpoolError, _pe.ReentrancyError):
    """``start_consuming()`` was called from inside a callback that a dispatcher runs."""

    code = "reentrancy"


class DuplicateConsumerTag(KzpoolError, _pe.DuplicateConsumerTag):
    """``basic_consume`` named a consumer tag already in use on the lease."""

    code = "duplicate_tag"


class TransactionLost(KzpoolError, _pe.AMQPChannelError):
    """The lease lost its channel inside a transaction (``tx_select``): what it published
    and settled since the last commit was rolled back by the broker, so ``tx_commit``
    raises this instead of committing an empty transaction.  The lease is in transaction
    mode again on its new channel: publish again, then commit."""

    code = "tx_lost"


# the errors a refusal of the pool may name, by their stable code: a refusal carries its code
# (and the [pool] setting that set the limit) as fields, and becomes one of these in the client
REFUSALS: dict[str, type[KzpoolError]] = {cls.code: cls for cls in (
    BrokerUnavailable, PoolAccessDenied, LeaseRequestError, LimitExceeded, LeaseNotYours,
    ProtocolError)}


def refusal_error(code: str, text: str, setting: str | None = None) -> KzpoolError:
    """The error a pool's refusal names, by its stable code (one of :data:`REFUSALS`)."""
    cls = REFUSALS.get(code)
    if cls is None:
        return KzpoolError(text, reason=code)
    if cls is LimitExceeded:
        return LimitExceeded(text, setting or "")
    return cls(text)
