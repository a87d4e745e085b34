"""The worker's pika connection: its parameters, and output batched per loop pass."""

from __future__ import annotations

from typing import Any

import pika
from pika.adapters.select_connection import SelectConnection

from .spec import WorkerSpec


class BatchedConnection(SelectConnection):  # type: ignore[misc]
    """pika's ``SelectConnection``, sending what one loop pass produced in one write.

    pika hands the transport every frame on its own (three per publish), and the transport
    makes a ``send()`` per frame.  ``_adapter_emit_data`` is pika's adapter hook for output:
    here it collects the frames and flushes them once, at the end of the loop pass.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._out: list[bytes] = []
        self._flush_due = False
        super().__init__(*args, **kwargs)

    def _adapter_emit_data(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_due:
            self._flush_due = True
            self.ioloop.call_later(0, self._flush_out)

    def _flush_out(self) -> None:
        self._flush_due = False
        data, self._out = b"".join(self._out), []
        if data and self._transport is not None:
            super()._adapter_emit_data(data)


def parameters(spec: WorkerSpec) -> pika.URLParameters:
    """pika's parameters for ``spec``'s broker: one attempt, the pool's timeouts."""
    settings = spec.settings
    params = pika.URLParameters(spec.broker.uri.uri)
    params.heartbeat = settings.heartbeat
    params.connection_attempts = 1
    params.socket_timeout = settings.connect_timeout
    params.stack_timeout = settings.connect_timeout
    params.client_properties = {"connection_name": spec.title(False)[8:], "product": "kzpool"}
    return params
