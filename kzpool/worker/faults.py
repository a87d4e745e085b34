"""What a broker connection failure means: fatal (a restart will not fix it) or not.

A worker that meets a fatal one exits with :data:`~kzpool.common.exitcodes.WORKER_FATAL` and
the master does not respawn it; every other failure is recoverable: reconnect with backoff.
"""

from __future__ import annotations

import re
import ssl

import pika.adapters.utils.connection_workflow as wf
import pika.exceptions as pe

from ..common.errors import TLSError
from ..common.messages import Reason

HEARTBEATS_MISSED = "heartbeats missed"  # the reason, as reports and status carry it


def classify(exc: BaseException | str) -> tuple[bool, str]:
    """Classify a broker connection failure: ``(fatal, short reason)``.

    Fatal means a reconnect or a restart will not fix it (credentials refused, vhost missing
    or denied, the broker's TLS certificate failing verification, a TLS file that cannot be
    loaded); everything else (refused, reset, timed out, heartbeats missed, closed by the
    broker, a TLS handshake cut short) is recoverable: reconnect with backoff.  After a fix
    on either side, ``SIGHUP`` retries a failed worker.
    """
    if isinstance(exc, str):
        return False, exc
    tls = _tls_failure(exc)
    if tls is not None:
        return tls
    if isinstance(exc, pe.ProbableAuthenticationError | pe.AuthenticationError):
        return True, f"authentication refused: {_innermost(exc)}"
    if isinstance(exc, pe.ProbableAccessDeniedError):
        return True, f"vhost refused: {_innermost(exc)}"
    if isinstance(exc, pe.ConnectionClosedByBroker):
        return False, f"closed by broker: {exc.reply_code} {exc.reply_text}"
    if isinstance(exc, pe.AMQPHeartbeatTimeout):
        return False, HEARTBEATS_MISSED
    return False, _innermost(exc)


def _tls_failure(exc: BaseException) -> tuple[bool, str] | None:
    """A TLS failure anywhere in pika's nested errors, named; ``None`` if it is not one.

    Only this pool's check of the broker's certificate is fatal: the broker's refusal of
    this pool's certificate reaches the client as an alert or, as often (TLS 1.3), as a bare
    EOF, which a broker that is starting up may also give: that one is retried.
    """
    for inner in _chain(exc):
        if isinstance(inner, TLSError):
            return True, f"TLS: {inner}"
        if isinstance(inner, ssl.SSLCertVerificationError):
            why = inner.verify_message or inner.reason or str(inner)
            return True, f"TLS: the broker's certificate failed verification: {why}{_hint(why)}"
        found = _SSL_TEXT.search(str(inner))
        if found is not None:
            return False, _alert(found.group(1), found.group(2).strip())
        if isinstance(inner, pe.IncompatibleProtocolError) and "SSLEOFError" in str(inner):
            return False, HANDSHAKE_CUT
    return None


HANDSHAKE_CUT = ("TLS: the broker closed the connection during the handshake (does it refuse"
                 " this pool's client certificate, or want one?)")
_SSL_TEXT = re.compile(r"\[SSL: ([A-Z0-9_]+)\] ([^(]+)")
_REFUSED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED",
            "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED")


def _hint(why: str) -> str:
    if "mismatch" in why:  # Hostname mismatch, IP address mismatch
        return " (the URI's host, or server_name_indication, must be a name in it)"
    if "issuer" in why or "self-signed" in why or "self signed" in why:
        return " (is cacertfile, or [pool] tls_ca, the CA that signed it?)"
    return ""


def _alert(code: str, text: str) -> str:
    """An OpenSSL error code and text (pika often hands them over as text only), named."""
    if "CERTIFICATE_REQUIRED" in code:
        return f"TLS: the broker wants a client certificate (certfile, or [pool] tls_cert): {text}"
    if "ALERT" in code and any(what in code for what in _REFUSED):
        return f"TLS: the broker refused this pool's client certificate: {text}"
    return f"TLS error: {text}"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors pika nested in it, outermost first."""
    found = [exc]
    while len(found) < 16:
        inner: BaseException | None = None
        if isinstance(exc, wf.AMQPConnectionWorkflowFailed) and exc.exceptions:
            inner = exc.exceptions[-1]
        elif isinstance(exc, wf.AMQPConnectorPhaseErrorBase) and exc.exception:
            inner = exc.exception
        elif isinstance(exc, pe.AMQPConnectionError) and exc.args and isinstance(
                exc.args[0], BaseException):
            inner = exc.args[0]
        if inner is None:
            break
        found.append(inner)
        exc = inner
    return found


def _innermost(exc: BaseException) -> str:
    """The most specific text of pika's nested connection errors."""
    while True:
        if isinstance(exc, wf.AMQPConnectionWorkflowFailed) and exc.exceptions:
            exc = exc.exceptions[-1]
        elif isinstance(exc, wf.AMQPConnectorPhaseErrorBase) and exc.exception:
            exc = exc.exception
        elif isinstance(exc, wf.AMQPConnectorStackTimeout):
            return "timed out"
        elif isinstance(exc, pe.AMQPConnectionError) and exc.args and isinstance(
                exc.args[0], BaseException):
            exc = exc.args[0]
        else:
            break
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, pe.ConnectionClosedByBroker):
        return f"{exc.reply_code} {exc.reply_text}"
    text = str(exc).replace("ConnectionClosedByBroker: ", "")
    text = re.sub(r"\((\d+)\) '([^']*)'?", r"\1 \2", text).strip("()\",' ")
    return text or type(exc).__name__


def in_maintenance(exc: BaseException | str, reason: str,
                   since: str | None) -> tuple[str | None, str]:
    """Whether the broker is in maintenance after failure ``exc`` (``reason``, as
    :func:`classify` says it), and the error to report: (why it is, or ``None``; error).

    A broker whose node was put into maintenance (``rabbitmq-upgrade drain``) closes the
    connection with 320 ``CONNECTION_FORCED - Node was put into maintenance mode`` and
    refuses connections until it is revived or restarted; ``since`` is the reason it said so
    before (kept until the worker is connected again).  RabbitMQ gives no code of its own
    for it: its text says so."""
    if isinstance(exc, pe.ConnectionClosedByBroker) and exc.reply_code == 320 and \
            "maintenance" in str(exc.reply_text).lower():
        since = reason
    return since, reason if since in (None, reason) else f"in maintenance ({since}): {reason}"


def connection_lost(exc: BaseException) -> Reason:
    """What a lease hears when the connection goes: the broker's reply code and text if it
    closed the connection (a call of that lease may be why), else that it was lost."""
    if isinstance(exc, pe.ConnectionClosedByBroker):
        return Reason("ConnectionClosedByBroker", exc.reply_code, exc.reply_text)
    return Reason("ConnectionClosed", 0, "connection to the broker lost")
