"""OpenTelemetry tracing for kzpool's leases, blocking and asyncio (``kzpool[otel]``).

    from kzpool.instrumentation import KzpoolInstrumentor
    KzpoolInstrumentor().instrument()          # tracer_provider=... optional

gives blocking leases (``basic_publish``, ``basic_consume`` callbacks, the ``consume()``
generator, ``basic_get``) and asyncio channels (``Exchange.publish``, ``Queue.consume``
callbacks, queue iterators, ``Queue.get``) the spans OpenTelemetry's pika and aio-pika
instrumentations give those libraries (:mod:`.spans`), with the trace context carried in
each message's headers, so a trace started by a publisher goes on in its consumer across
the pool, whichever of kzpool's clients each one uses.  It wraps kzpool's own classes, as
those instrumentations wrap pika's and aio-pika's: nothing in the clients knows of tracing.
``uninstrument()`` takes the wrappers off.  ``opentelemetry-instrument`` finds it by its
entry point.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
        BaseInstrumentor,
    )
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(f"kzpool.instrumentation needs OpenTelemetry: pip install"
                      f" 'kzpool[otel]' ({exc})") from exc

from .. import __version__
from . import aio, blocking
from .spans import SCHEMA_URL

__all__ = ["KzpoolInstrumentor"]


class KzpoolInstrumentor(BaseInstrumentor):  # type: ignore[misc]  # untyped upstream
    """Traces kzpool's leases (blocking and asyncio); one per process (a singleton, as
    every OpenTelemetry instrumentor)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()  # kzpool itself: nothing else to be installed

    def _instrument(self, **kwargs: Any) -> None:
        tracer = trace.get_tracer(__name__, __version__, kwargs.get("tracer_provider"),
                                  schema_url=SCHEMA_URL)
        blocking.instrument(tracer)
        aio.instrument(tracer)

    def _uninstrument(self, **kwargs: Any) -> None:
        blocking.uninstrument()
        aio.uninstrument()
