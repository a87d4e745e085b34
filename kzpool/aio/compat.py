"""What kzpool.aio takes from aio-pika where it is installed, and its stand-ins where not.

* Enums: :class:`ExchangeType` and :class:`DeliveryMode` are kzpool's own, equal in value
  to aio-pika's; every call takes either (or a plain ``str`` / ``int``).
* Frames: replies (``Queue.DeclareOk``, ``Basic.QosOk``, ...) and confirms
  (``Basic.Ack``, ``Basic.Nack``, ``Basic.Return``) are pamqp's classes where pamqp is
  installed (aio-pika's own tutorials test ``isinstance(result, pamqp.commands.Basic.Ack)``),
  else :class:`Frame` objects with the same ``name`` and fields.
* ``register_abcs``: kzpool.aio's classes are registered as virtual subclasses of
  ``aio_pika.abc``'s, so ``isinstance(channel, aio_pika.abc.AbstractChannel)`` holds.

Pure: nothing here does I/O.
"""

from __future__ import annotations

import enum
import importlib
import logging
from types import ModuleType
from typing import Any

log = logging.getLogger("kzpool.aio")


def optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class ExchangeType(enum.StrEnum):
    FANOUT = "fanout"
    DIRECT = "direct"
    TOPIC = "topic"
    HEADERS = "headers"
    X_DELAYED_MESSAGE = "x-delayed-message"
    X_CONSISTENT_HASH = "x-consistent-hash"
    X_MODULUS_HASH = "x-modulus-hash"


class DeliveryMode(enum.IntEnum):
    NOT_PERSISTENT = 1
    PERSISTENT = 2


def exchange_type(value: Any) -> str:
    """The AMQP name of an exchange type: an ``ExchangeType`` of either library, or a str."""
    value = getattr(value, "value", value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"exchange type {value!r} is not an ExchangeType or a type name")
    return value


class Frame:
    """A reply or confirm frame where pamqp is not installed: ``name`` and the fields."""

    def __init__(self, name: str, **fields: Any) -> None:
        self.name = name
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "name")
        return f"{self.name}({fields})"


def _pamqp_classes() -> dict[str, type]:
    commands = optional_module("pamqp.commands")
    if commands is None:
        return {}
    found: dict[str, type] = {}
    for group in vars(commands).values():
        if isinstance(group, type):
            for member in vars(group).values():
                name = getattr(member, "name", None)
                if isinstance(member, type) and isinstance(name, str):
                    found[name] = member
    return found


_PAMQP = _pamqp_classes()


def frame(name: str, fields: dict[str, Any] | None = None) -> Any:
    """The frame ``name`` with ``fields``: pamqp's class if it has one, else a Frame."""
    fields = fields or {}
    cls = _PAMQP.get(name)
    if cls is not None:
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:  # fields pamqp would not take: say so, go on
            log.debug("pamqp %s refused %r: %s", name, fields, exc)
    return Frame(name, **fields)


_ACK = _PAMQP.get("Basic.Ack")


def ack(delivery_tag: int) -> Any:
    """A publish's confirm: ``Basic.Ack`` (pamqp's where installed)."""
    if _ACK is not None:
        return _ACK(delivery_tag=delivery_tag)
    return Frame("Basic.Ack", delivery_tag=delivery_tag, multiple=False)


def nack(delivery_tag: int) -> Any:
    return frame("Basic.Nack", {"delivery_tag": delivery_tag, "multiple": False})


def returned(reply_code: int, reply_text: str, exchange: str, routing_key: str) -> Any:
    return frame("Basic.Return", {"reply_code": reply_code, "reply_text": reply_text,
                                  "exchange": exchange, "routing_key": routing_key})


def register_abcs(pairs: dict[str, type]) -> None:
    """Register each class as a virtual subclass of ``aio_pika.abc.<name>`` (if installed;
    aio-pika's ``AbstractQueue`` is no ABC, so a Queue cannot be registered)."""
    abc = optional_module("aio_pika.abc")
    if abc is None:
        return
    for name, cls in pairs.items():
        base = getattr(abc, name, None)
        register = getattr(base, "register", None)
        if register is not None:
            register(cls)
