"""The broker's bytes cut into frames, the per-message ones kept from pika.

Once a connection is open, every frame the broker sends is cut here.  A delivery
(``basic.deliver`` and its content) or a publisher confirm (``basic.ack``, ``basic.nack``) on
a channel whose lease has a :class:`Sink` goes to that sink as bytes, properties untouched;
everything else (replies, returns, ``basic.get``, closes, heartbeats, a delivery for a
consumer the sink does not claim) is handed to pika as one frame, as pika would have cut it.
Frames are cut with a moving offset: the buffer is trimmed once per read, not once per frame.
A delivery whose three frames (method, header, one body) are all in the bytes read, as most
are, is taken in one step.

Runs in the worker's loop; a frame that breaks AMQP is pika's ``InvalidFrameError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pika.exceptions import InvalidFrameError

from . import amqp

_HEAD = amqp.FRAME_HEAD
_END = 0xCE
_DELIVER = bytes((0, amqp.BASIC, 0, amqp.DELIVER))  # a method payload's class and method


class Sink(Protocol):
    """A lease's session, taking its channel's deliveries and confirms."""

    def claims(self, consumer_tag: str) -> bool: ...

    def deliver(self, consumer_tag: str, tag: int, redelivered: bool, names: bytes,
                properties: bytes, body: bytes) -> None:
        """``names``: the exchange and routing key as two short strings."""

    def confirm(self, tag: int, multiple: bool, nack: bool) -> None: ...


class _Content:
    """A message whose method frame came, its header and body still coming."""

    __slots__ = ("chunks", "got", "method", "properties", "sink", "size")

    def __init__(self, sink: Sink | None, method: tuple[str, int, bool, bytes]) -> None:
        self.sink = sink  # None: pika's, frames handed on as they come
        self.method = method
        self.size = -1  # from the header; -1 until it came
        self.properties = b""
        self.chunks: list[bytes] = []
        self.got = 0


class Inbound:
    """``to_pika(frame_bytes)`` gets what is not a sink's, one whole frame at a time."""

    def __init__(self, to_pika: Callable[[bytes], None]) -> None:
        self.to_pika = to_pika
        self.sinks: dict[int, Sink] = {}  # by channel number
        self._content: dict[int, _Content] = {}

    def forget(self, channel: int) -> None:
        """No sink for ``channel`` any more (a message under way still goes where it went)."""
        self.sinks.pop(channel, None)

    def feed(self, data: bytes) -> int:
        """Handle every whole frame of ``data``; the number of bytes used."""
        pos, size = 0, len(data)
        sinks, content = self.sinks, self._content
        while size - pos >= 8:
            kind, channel, length = _HEAD.unpack_from(data, pos)
            end = pos + 8 + length
            if end > size:
                break
            if data[end - 1] != _END:
                raise InvalidFrameError("Invalid FRAME_END marker")
            if kind == amqp.FRAME_METHOD and channel in sinks and channel not in content and \
                    data[pos + 7:pos + 11] == _DELIVER:
                whole = self._delivery(data, pos + 7, end, channel)
                if whole:
                    pos = whole
                    continue
            payload = data[pos + 7:end - 1]
            if not (channel in self.sinks or channel in self._content) or not self._take(
                    kind, channel, payload):
                self.to_pika(data[pos:end])
            pos = end
        return pos

    def _delivery(self, data: bytes, start: int, end: int, channel: int) -> int:
        """A delivery whose header and body follow its method frame (at ``start`` .. ``end``)
        in ``data``, taken whole: where it ends; 0 if they do not, or it is not ours."""
        size = len(data)
        if size - end < 8:
            return 0
        kind, on, length = _HEAD.unpack_from(data, end)
        after: int = end + 8 + length
        if kind != amqp.FRAME_HEADER or on != channel or after > size or \
                data[after - 1] != _END:
            return 0
        try:
            body_size, properties = amqp.header(data[end + 7:after - 1])
            body = b""
            if body_size:
                if size - after < 8:
                    return 0
                kind, on, length = _HEAD.unpack_from(data, after)
                body_end = after + 8 + length
                if kind != amqp.FRAME_BODY or on != channel or length != body_size or \
                        body_end > size or data[body_end - 1] != _END:
                    return 0
                body, after = data[after + 7:body_end - 1], body_end
            method = amqp.deliver(data[start:end - 1])
        except ValueError as exc:
            raise InvalidFrameError(str(exc)) from None
        sink = self.sinks[channel]
        if not sink.claims(method[0]):
            return 0  # pika's: cut one frame at a time
        sink.deliver(*method, properties, body)
        return after

    def _take(self, kind: int, channel: int, payload: bytes) -> bool:
        """Whether a frame of a channel with a sink (or a content under way) was taken."""
        content = self._content.get(channel)
        if content is not None and kind in (amqp.FRAME_HEADER, amqp.FRAME_BODY):
            return self._more(channel, content, kind, payload)
        sink = self.sinks.get(channel)
        if kind != amqp.FRAME_METHOD or sink is None:
            return False
        try:
            klass, method = amqp.method_id(payload)
            if klass != amqp.BASIC:
                return False
            if method == amqp.DELIVER:
                deliver = amqp.deliver(payload)
                ours = sink.claims(deliver[0])
                self._content[channel] = _Content(sink if ours else None, deliver)
                return ours
            if method in (amqp.ACK, amqp.NACK):
                tag, multiple = amqp.confirm(payload)
                sink.confirm(tag, multiple, method == amqp.NACK)
                return True
        except ValueError as exc:
            raise InvalidFrameError(str(exc)) from None
        return False

    def _more(self, channel: int, content: _Content, kind: int, payload: bytes) -> bool:
        """A header or body frame of the content under way on ``channel``."""
        try:
            if kind == amqp.FRAME_HEADER:
                content.size, content.properties = amqp.header(payload)
            else:
                content.chunks.append(payload)
                content.got += len(payload)
        except ValueError as exc:
            raise InvalidFrameError(str(exc)) from None
        if 0 <= content.size <= content.got:
            del self._content[channel]
            if content.sink is not None:
                body = content.chunks[0] if len(content.chunks) == 1 else b"".join(
                    content.chunks)
                content.sink.deliver(*content.method, content.properties, body)
        return content.sink is not None
