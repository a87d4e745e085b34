"""aio-pika's ``Exchange`` on a kzpool channel: declare, publish, bind, unbind, delete.

``publish`` waits for the broker's confirm when the channel has confirms on (the default)
and returns the ``Basic.Ack``; a nack raises :class:`~kzpool.aio.errors.DeliveryError`; a
mandatory message that no queue took is returned as aiormq's ``DeliveredMessage``
(``on_return_raises=False``, the default) or raises
:class:`~kzpool.aio.errors.PublishError`.  Across a move the publish is sent again on the
new channel before it resolves.  Without confirms it returns ``None`` once the frame is
queued for the worker.  An exchange works through its ``channel`` at each call, so it works
again once a closed channel is reopened.
"""

from __future__ import annotations

from typing import Any

from .compat import exchange_type
from .core import Owner


def exchange_name(value: Any) -> str:
    """An exchange's name, from an exchange object (kzpool.aio's or anything with a name)
    or a str."""
    name = value if isinstance(value, str) else getattr(value, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"{value!r} is neither an exchange nor an exchange name")
    return name


class Exchange:
    def __init__(self, channel: Owner, name: str, type: Any = "direct", *,
                 auto_delete: bool = False, durable: bool = False, internal: bool = False,
                 passive: bool = False, arguments: dict[str, Any] | None = None) -> None:
        self.channel = channel
        self.name = name
        self._type = exchange_type(type)
        self.durable = durable
        self.auto_delete = auto_delete
        self.internal = internal
        self.passive = passive
        self.arguments = arguments or {}

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<Exchange({self.name}): durable={self.durable}, type={self._type}>"

    async def declare(self, timeout: float | None = None, robust: bool = True) -> Any:
        return await self.channel._live().rpc("exchange_declare", {
            "exchange": self.name, "exchange_type": self._type, "passive": self.passive,
            "durable": self.durable, "auto_delete": self.auto_delete,
            "internal": self.internal, "arguments": self.arguments or None}, timeout, robust)

    async def publish(self, message: Any, routing_key: str, *, mandatory: bool = True,
                      immediate: bool = False, timeout: float | None = None) -> Any:
        """Publish; with confirms, the ``Basic.Ack`` (or the returned message)."""
        if self.internal:
            raise ValueError(f"cannot publish to internal exchange {self.name!r}")
        if immediate:
            raise ValueError("immediate=True is not supported by RabbitMQ")
        if len(routing_key.encode()) > 255:
            raise ValueError("Routing key too long (max 255 bytes)")
        return await self.channel._live().publish(self.name, routing_key, message, mandatory,
                                                  timeout)

    async def bind(self, exchange: Any, routing_key: str = "", *,
                   arguments: dict[str, Any] | None = None, timeout: float | None = None,
                   robust: bool = True) -> Any:
        """Bind this exchange (the destination) to ``exchange`` (the source)."""
        return await self.channel._live().rpc("exchange_bind", {
            "destination": self.name, "source": exchange_name(exchange),
            "routing_key": routing_key, "arguments": arguments}, timeout, robust)

    async def unbind(self, exchange: Any, routing_key: str = "",
                     arguments: dict[str, Any] | None = None,
                     timeout: float | None = None) -> Any:
        return await self.channel._live().rpc("exchange_unbind", {
            "destination": self.name, "source": exchange_name(exchange),
            "routing_key": routing_key, "arguments": arguments}, timeout)

    async def delete(self, if_unused: bool = False, timeout: float | None = None) -> Any:
        return await self.channel.exchange_delete(self.name, timeout=timeout,
                                                  if_unused=if_unused)


class RobustExchange(Exchange):
    """An exchange of a robust channel (the same calls: every channel replays what it
    declared and bound after a move)."""
