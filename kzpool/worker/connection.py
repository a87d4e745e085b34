"""The worker's pika connection: its parameters, its output batched per loop pass, and the
per-message frames read and written without pika's objects (:mod:`.fastpath`,
:mod:`.amqp`)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pika
from pika import frame
from pika.adapters.select_connection import SelectConnection
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

from ..common import tls
from . import amqp
from .fastpath import Inbound, Sink
from .spec import WorkerSpec
from .turns import LOWAT, Budget, Content, Turns, set_lowat, unsent

RECV_SIZE = 64 << 10  # bytes read from the broker at a time
_CONNECTION_CLOSE = amqp.FRAME_HEAD.pack(amqp.FRAME_METHOD, 0, 0)[:3]

class BatchedConnection(SelectConnection):  # type: ignore[misc]
    """pika's ``SelectConnection``, sending what one loop pass produced in one write, and
    reading deliveries and confirms past pika for the channels that have a :class:`Sink`.

    pika hands the transport every frame on its own (three per publish), and the transport
    makes a ``send()`` per frame.  ``_adapter_emit_data`` is pika's adapter hook for output:
    here it collects the frames and flushes them once, at the end of the loop pass.  Input:
    pika's ``_on_data_available`` (the adapter's hook for what the socket read) is replaced,
    once the connection is open, by :class:`~kzpool.worker.fastpath.Inbound`, which hands
    pika every frame that is not a sink's.
    """

    _frame_buffer: bytes  # pika's: what the socket read that is not a whole frame yet
    _opened: bool  # pika's: the connection opened (it stays so while it closes)

    def __init__(self, *args: Any, budget: Budget, **kwargs: Any) -> None:
        self._out: list[bytes] = []
        self._flush_due = False
        self.inbound = Inbound(self._to_pika)
        self.turns = Turns(budget)  # once open, every frame goes out in turns (:mod:`.turns`)
        self._turning = False
        self._watch_fd = -1  # a second descriptor of the broker socket, watched for room
        self._watching = False
        self._polling = False  # without that descriptor (TLS): a timer while frames wait
        super().__init__(*args, **kwargs)

    def add_sink(self, channel: int, sink: Sink) -> None:
        self.inbound.sinks[channel] = sink

    def remove_sink(self, channel: int) -> None:
        self.inbound.forget(channel)

    @property
    def body_max(self) -> int:
        """The largest body frame the broker takes (frame_max less the frame's envelope)."""
        return int(self._body_max_length)

    def send_raw(self, data: bytes) -> None:
        """Frames made by :mod:`.amqp`, sent as pika sends its own (counted, batched)."""
        self.bytes_sent += len(data)
        self._adapter_emit_data(data)

    def send_content(self, content: Content) -> None:
        """A publish sent from the client's own buffer, a frame at a time, in turns."""
        self.bytes_sent += len(content.head) + len(content.body)
        self.turns.put_content(content)
        self._flush_soon()

    def _proto_connection_made(self, transport: Any) -> None:
        transport._MAX_RECV_BYTES = RECV_SIZE  # pika's 4 KiB: a read per ten deliveries
        super()._proto_connection_made(transport)

    def _on_data_available(self, data_in: bytes) -> None:
        # The handshake goes pika's way; from the open on, every frame goes through the
        # fast path, the close's too: a delivery it took the method frame of may still be
        # under way, and its header or body alone would break pika's frame assembly
        # (``'NoneType' object has no attribute 'body_size'``: the connection lost).
        if not self._opened:
            super()._on_data_available(data_in)
            return
        buffered: bytes = self._frame_buffer
        data = buffered + data_in if buffered else data_in
        used = self.inbound.feed(data)
        self._frame_buffer = data[used:]
        self.bytes_received += used

    def _to_pika(self, data: bytes) -> None:
        _used, value = frame.decode_frame(data)
        if value is not None:
            self._process_frame(value)

    def _adapter_emit_data(self, data: bytes) -> None:
        if not self._turning and self.is_open and self._start_turns():
            self._turning = True
        if not self._turning:
            self._out.append(data)
        elif data[:3] == _CONNECTION_CLOSE and data[7:11] == b"\x00\x0a\x00\x32":
            self.turns.put_last(data)  # Connection.Close: after what the leases sent
        else:
            self.turns.put(data)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Send at the end of the loop pass; once open, the first frames of a pass at once
        too, so a lease's lone frame does not wait for what the others' handlers do."""
        if not self._flush_due:
            self._flush_due = True
            self.ioloop.call_later(0, self._flush_out)
            if self._turning:
                self._pump()

    def _start_turns(self) -> bool:
        transport = self._transport
        if transport is None or self._out:
            return False
        sock = transport._sock
        set_lowat(sock)
        if type(transport) is _AsyncPlaintextTransport:
            with contextlib.suppress(OSError):  # at the file limit: pika's buffer, polled
                self._watch_fd = os.dup(sock.fileno())
        return True

    def _flush_out(self) -> None:
        self._flush_due = False
        if self._turning:
            self._pump()
            return
        data, self._out = b"".join(self._out), []
        transport = self._transport
        if not data or transport is None:
            return
        if type(transport) is _AsyncPlaintextTransport and not transport.get_write_buffer_size() \
                and transport._state == transport._STATE_ACTIVE:
            # pika's transport sends only when the loop next says the socket is writable: a
            # wait, and two changes to the poller, on every hop of every message.  Send now;
            # what does not fit (and any error) goes pika's way.
            with contextlib.suppress(OSError):
                data = data[transport._sock.send(data):]
            if not data:
                return
        super()._adapter_emit_data(data)

    def _pump(self) -> None:
        """Send rounds while the kernel holds less than :data:`LOWAT` unsent; then wait
        until it does again (or, through pika's own buffer on TLS, poll)."""
        transport, turns = self._transport, self.turns
        if transport is None or transport._state != transport._STATE_ACTIVE:
            return
        if self._watch_fd < 0 or transport.get_write_buffer_size():
            while turns.pending and transport.get_write_buffer_size() < LOWAT:
                super()._adapter_emit_data(turns.rest or turns.round())
                turns.rest = b""
            if turns.pending and not self._polling:
                self._polling = True
                self.ioloop.call_later(0.002, self._poll)
            return
        sock = transport._sock
        while turns.rest or (turns.pending and unsent(sock) < LOWAT):
            data = turns.rest or turns.round()
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # pika's transport meets it too, and fails the connection
                turns.rest = b""
                super()._adapter_emit_data(data)
                return
            turns.rest = data[sent:]
        self._watch(turns.pending)

    def _poll(self) -> None:
        self._polling = False
        self._pump()

    def _watch(self, on: bool) -> None:
        if on != self._watching:
            self._watching = on
            if on:
                self.ioloop.add_handler(self._watch_fd, self._on_room, self.ioloop.WRITE)
            else:
                self.ioloop.remove_handler(self._watch_fd)

    def _on_room(self, _fd: int, _events: int) -> None:
        self._pump()

    def _proto_connection_lost(self, error: BaseException | None) -> None:
        if self._watch_fd >= 0:
            self._watch(False)
            os.close(self._watch_fd)
            self._watch_fd = -1
        super()._proto_connection_lost(error)


def parameters(spec: WorkerSpec) -> pika.ConnectionParameters:
    """pika's parameters for ``spec``'s broker: one attempt, the pool's timeouts, TLS from
    the broker's URI and the ``[pool]`` defaults (:mod:`kzpool.common.tls`).

    Built from the parsed URI, never by pika from the URI's text: pika would refuse Kazoo's
    TLS options, and would ``literal_eval`` its own.  Reads the TLS files (blocks on the file
    system); raises :class:`~kzpool.common.errors.TLSError` naming a file that cannot be used.
    """
    settings, uri = spec.settings, spec.broker.uri
    files = tls.resolve(uri, settings)
    ssl_options = None if files is None else pika.SSLOptions(tls.context(files),
                                                              files.server_name)
    params = pika.ConnectionParameters(
        host=uri.host, port=uri.port, virtual_host=uri.vhost,
        credentials=pika.PlainCredentials(uri.user, uri.password, erase_on_connect=False),
        heartbeat=_int(uri.option("heartbeat"), settings.heartbeat),
        connection_attempts=1, socket_timeout=settings.connect_timeout,
        stack_timeout=settings.connect_timeout, ssl_options=ssl_options,
        client_properties={"connection_name": spec.title(False)[8:], "product": "kzpool"})
    for name in ("channel_max", "frame_max"):
        value = uri.option(name)
        if value is not None:
            setattr(params, name, int(value))
    return params


def _int(text: str | None, default: int) -> int:
    return default if text is None else int(text)
