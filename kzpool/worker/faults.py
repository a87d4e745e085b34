"""What a broker connection failure means: fatal (a restart will not fix it) or not.

A worker that meets a fatal one exits with :data:`~kzpool.common.exitcodes.WORKER_FATAL` and
the master does not respawn it; every other failure is recoverable: reconnect with backoff.
"""

from __future__ import annotations

import re

import pika.adapters.utils.connection_workflow as wf
import pika.exceptions as pe


def classify(exc: BaseException | str) -> tuple[bool, str]:
    """Classify a broker connection failure: ``(fatal, short reason)``.

    Fatal means a reconnect or a restart will not fix it (credentials refused, vhost missing
    or denied); everything else (refused, reset, timed out, heartbeats missed, closed by the
    broker) is recoverable: reconnect with backoff.
    """
    if isinstance(exc, str):
        return False, exc
    if isinstance(exc, pe.ProbableAuthenticationError | pe.AuthenticationError):
        return True, f"authentication refused: {_innermost(exc)}"
    if isinstance(exc, pe.ProbableAccessDeniedError):
        return True, f"vhost refused: {_innermost(exc)}"
    if isinstance(exc, pe.ConnectionClosedByBroker):
        return False, f"closed by broker: {exc.reply_code} {exc.reply_text}"
    if isinstance(exc, pe.AMQPHeartbeatTimeout):
        return False, "heartbeats missed"
    return False, _innermost(exc)


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
