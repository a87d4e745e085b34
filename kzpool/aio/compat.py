"""What kzpool.aio takes from aio-pika where it is installed, and its stand-ins where not.

* Enums: :class:`ExchangeType`, :class:`DeliveryMode` and :class:`TransactionState` are
  kzpool's own, equal in value to aio-pika's; every call takes either (or a plain ``str`` /
  ``int``).
* Frames: replies (``Queue.DeclareOk``, ``Basic.QosOk``, ...) and confirms
  (``Basic.Ack``, ``Basic.Nack``, ``Basic.Return``) are pamqp's classes where pamqp is
  installed (aio-pika's own tutorials test ``isinstance(result, pamqp.commands.Basic.Ack)``),
  else :class:`Frame` objects with the same ``name`` and fields.
* A returned publish is aiormq's ``DeliveredMessage`` where aiormq is installed, else a
  :class:`DeliveredMessage` with the same fields (:func:`delivered`).
* ``register`` makes kzpool.aio's classes virtual subclasses of aio-pika's ABCs (its
  ``Channel``, ``IncomingMessage``, ... and ``aio_pika.abc``'s); :func:`base` gives the
  classes kzpool.aio subclasses where aio-pika's are plain classes (``Queue``,
  ``Transaction``), ``object`` without aio-pika.  Nothing of aio-pika is imported where it
  is not installed.

Pure: nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import logging
import struct
from types import ModuleType
from typing import Any

from ..common import props

log = logging.getLogger("kzpool.aio")


@functools.cache
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


class TransactionState(enum.StrEnum):
    """A transaction's state, as aio-pika's (its spelling of "commited" included)."""

    CREATED = "created"
    COMMITED = "commited"
    ROLLED_BACK = "rolled back"
    STARTED = "started"


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


def register(pairs: dict[str, type]) -> None:
    """Register each class as a virtual subclass of the aio-pika class its dotted name
    names (``"aio_pika.abc.AbstractChannel"``, ``"aio_pika.Channel"``), where aio-pika is
    installed and that class is an ABC."""
    for dotted, cls in pairs.items():
        module, _, name = dotted.rpartition(".")
        found = optional_module(module)
        register_as = getattr(getattr(found, name, None), "register", None)
        if register_as is not None:
            register_as(cls)


def base(module: str, name: str) -> type:
    """aio-pika's class ``module.name`` to subclass where it is installed, else ``object``."""
    found = optional_module(module)
    cls = getattr(found, name, None)
    return cls if isinstance(cls, type) else object


@dataclasses.dataclass(frozen=True)
class DeliveredMessage:
    """aiormq's ``DeliveredMessage`` where aiormq is not installed: the same fields."""

    delivery: Any
    header: Any
    body: bytes
    channel: Any

    @property
    def routing_key(self) -> str | None:
        return getattr(self.delivery, "routing_key", None)

    @property
    def exchange(self) -> str | None:
        return getattr(self.delivery, "exchange", None)

    @property
    def delivery_tag(self) -> int | None:
        return getattr(self.delivery, "delivery_tag", None)


@dataclasses.dataclass(frozen=True)
class ContentHeader:
    """pamqp's ``ContentHeader`` where pamqp is not installed: properties (pika's) and size."""

    properties: Any
    body_size: int


_HEADER = struct.Struct(">HHQ")


def content_header(encoded: bytes, body_size: int) -> Any:
    """The content header of a message whose properties are ``encoded`` (the wire's)."""
    header_cls = getattr(optional_module("pamqp.header"), "ContentHeader", None)
    if header_cls is None:
        return ContentHeader(props.decode(encoded), body_size)
    header = header_cls()
    header.unmarshal(_HEADER.pack(60, 0, body_size) + encoded)
    return header


def delivered(delivery: Any, encoded: bytes, body: bytes, channel: Any) -> Any:
    """A returned (or got) message as aiormq gives it: its ``DeliveredMessage``."""
    cls = getattr(optional_module("aiormq.abc"), "DeliveredMessage", DeliveredMessage)
    return cls(delivery=delivery, header=content_header(encoded, len(body)), body=body,
               channel=channel)
