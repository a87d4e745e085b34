"""One socket to the pool or to a worker, on the event loop: frames in, batched writes out.

A :class:`FrameStream` is an ``asyncio.Protocol``: each complete frame it reads goes to
``on_frame`` at once, from the loop's own read callback (no task per frame).  Writes are
gathered and sent once per pass of the loop, so a thousand publishes or acks made in one
pass cost one ``send``.  When the peer hangs up, or sends a frame that breaks the wire
format, ``on_close`` hears why, once; after :meth:`close` nothing more is read or sent.

:class:`AioBackend` is the seam through which sockets are opened (non-blocking, connected
with ``loop.sock_connect``); :func:`call` is one request to the pool and its answer, the
twin of :func:`kzpool.client.pool.call`.  Nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any, Protocol

from ..common import messages, wire
from ..common.errors import KzpoolError
from ..common.messages import Message, Reason
from ..common.sockets import READ_SIZE
from ..lease.asking import not_running, read_answer

WORKER_GONE = Reason("ConnectionClosed", 0, "worker gone")
WRITE_HIGH = 4 << 20  # bytes buffered before writers wait (drain)


class AioBackend(Protocol):
    async def connect(self, path: str) -> socket.socket:
        """A connected, non-blocking stream socket to ``path``; ``OSError`` if none answers."""
        ...


class UnixBackend:
    async def connect(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return sock


class FrameStream(asyncio.Protocol):
    """Not thread-safe: the loop's thread only."""

    def __init__(self, on_frame: Callable[[int, int, bytes], None],
                 on_close: Callable[[Reason], None]) -> None:
        self.on_frame = on_frame
        self.on_close = on_close
        self.reader = wire.FrameReader(wire.MAX_DATA_FRAME)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._out: list[bytes] = []
        self._flush: asyncio.Handle | None = None
        self._paused: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        # asyncio's socket transports read 256 KiB at a time: an mmap a read (READ_SIZE)
        with contextlib.suppress(AttributeError):  # a loop whose transports have no such field
            transport.max_size = READ_SIZE  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            for kind, flags, payload in self.reader.feed(data):
                if self.closed:
                    return
                self.on_frame(kind, flags, payload)
        except KzpoolError as exc:
            self._closed_by(Reason("ProtocolError", 0, f"bad frame from the pool: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_by(WORKER_GONE)
        self._unpause()

    def _closed_by(self, reason: Reason) -> None:
        if not self.closed:
            self.close()
            self.on_close(reason)

    # ----- output ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data``; it is sent at the end of this pass of the loop."""
        if self.closed:
            return
        self._out.append(data)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush = None
        if self._out and not self.closed and self.transport is not None:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self.transport.write(data)

    @property
    def paused(self) -> bool:
        return self._paused is not None

    async def drain(self) -> None:
        """Wait while the socket's buffer is over its high mark (or the stream closes)."""
        if self._paused is not None:
            await asyncio.shield(self._paused)

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._unpause()

    def _unpause(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def close(self, last: bytes = b"") -> None:
        """Send what is queued (and ``last``), then close; nothing more is read."""
        if self.closed:
            return
        if last:
            self._out.append(last)
        self.flush()
        self.closed = True
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.transport is not None:
            self.transport.close()
        self._unpause()


async def attach(sock: socket.socket, on_frame: Callable[[int, int, bytes], None],
                 on_close: Callable[[Reason], None]) -> FrameStream:
    """A :class:`FrameStream` on ``sock`` (connected, non-blocking)."""
    loop = asyncio.get_running_loop()
    _transport, stream = await loop.create_unix_connection(
        lambda: FrameStream(on_frame, on_close), sock=sock)
    return stream


async def call(backend: AioBackend, path: str, request: Message,
               timeout: float = 5.0) -> dict[str, Any]:
    """One request to the pool at ``path`` and its answer, a document.

    :class:`~kzpool.PoolNotRunning` if nothing answers; the error a refusal names if
    refused; ``TimeoutError`` or ``ConnectionError`` if the pool does not answer in time.
    """
    loop = asyncio.get_running_loop()
    try:
        sock = await backend.connect(path)
    except OSError as exc:
        raise not_running(path, exc) from exc
    with sock:
        async with asyncio.timeout(timeout):
            # the pool may have answered (a refusal) and hung up before reading: read on
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await loop.sock_sendall(sock, messages.encode(request))
            reader = wire.FrameReader()
            while (answer := read_answer(reader, await loop.sock_recv(sock, 65536))) is None:
                pass
    return answer
