"""What a lease's client sends its worker, cut into frames, bounded in time and in bytes.

A frame of at most :data:`BIG` bytes is cut from one buffer, as :class:`~kzpool.common.wire.
FrameReader` cuts them.  A larger one (a large publish) is read into a buffer of its own,
never copied again, once the worker's budget has room for all it announced
(:meth:`kzpool.worker.turns.Budget.reserve`): until then nothing more is read from that
client, whose sends wait in its own process.  A publish so read goes to the broker from that
very buffer (:class:`~kzpool.worker.turns.Content`), which holds the reservation until its
last frame is out.

A frame under way for :data:`FRAME_TIME` seconds of reading (the time the worker itself held
the client back not counted) is :meth:`Inbox.late`: the session drops that lease alone, as
the pool's own socket drops a request that does not arrive whole.

Not thread-safe: the worker's loop only.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Protocol

from ..common import wire
from ..common.errors import ProtocolError
from ..common.sockets import READ_SIZE, receive
from ..common.wire import HEADER, MAGIC, VERSION, Kind

BIG = 256 << 10  # a frame above this is read into its own buffer, reserved from the budget
FRAME_TIME = 5.0  # seconds a frame may take to arrive whole
KINDS = frozenset((int(Kind.PUBLISH), int(Kind.SETTLE), int(Kind.JSON)))

Frame = tuple[int, int, bytes | bytearray, int]  # kind, flags, payload, bytes reserved


class Budget(Protocol):
    """The worker's bound on what it buffers (:class:`~kzpool.worker.turns.Budget`)."""

    def reserve(self, size: int, resume: Callable[[], None]) -> bool: ...

    def unreserve(self, size: int) -> None: ...


class Inbox:
    """Frames from one client socket.  ``resume()`` is called when a frame that waited for
    the budget may be read (the session reads again then)."""

    def __init__(self, budget: Budget, resume: Callable[[], None]) -> None:
        self.budget = budget
        self.resume = resume
        self.buffer = bytearray()
        self.big: bytearray | None = None  # a large frame arriving
        self.head = (0, 0)  # its kind and flags
        self.reserved = 0  # budget held for it
        self.stalled = False  # a large frame's header read, waiting for the budget
        self.since = 0.0  # monotonic start of the frame under way (0: none)

    @property
    def partial(self) -> bool:
        return bool(self.buffer or self.big is not None)

    def late(self, now: float) -> bool:
        """Whether the frame under way has taken :data:`FRAME_TIME` of reading."""
        return bool(self.since) and not self.stalled and now - self.since >= FRAME_TIME

    def restart_clock(self) -> None:
        """The worker held this client back: its frame's time starts again."""
        self.since = time.monotonic() if self.partial else 0.0

    def read(self, sock: socket.socket) -> list[Frame] | None:
        """The frames one read completes; ``None``: the client is gone."""
        frames: list[Frame] = []
        if self.big is not None:
            if not self._fill(sock, frames):
                return None
            return frames
        if not self.stalled:
            data = receive(sock, READ_SIZE)
            if not data and data is not None:
                return None
            self.buffer += data or b""
        self._cut(frames)
        return frames

    def close(self) -> None:
        """The lease ends: what a frame under way held goes back to the budget."""
        if self.reserved:
            self.budget.unreserve(self.reserved)
        self.big, self.reserved, self.buffer = None, 0, bytearray()

    def _fill(self, sock: socket.socket, frames: list[Frame]) -> bool:
        """More of the large frame (grown as it comes: a buffer made whole at once would be
        written through, and count in full, for a frame that may never come)."""
        big = self.big
        assert big is not None
        data = receive(sock, min(READ_SIZE, self.reserved - len(big)))
        if data is None:
            return True
        if not data:
            return False
        big += data
        if len(big) == self.reserved:
            frames.append((*self.head, big, self.reserved))
            self.big, self.reserved = None, 0
            self.restart_clock()
        return True

    def _cut(self, frames: list[Frame]) -> None:
        buffer, pos = self.buffer, 0
        try:
            while len(buffer) - pos >= 8:
                magic, version, kind, flags, length = HEADER.unpack_from(buffer, pos)
                _check(magic, version, kind, length)
                if length > BIG:
                    pos = self._start_big(buffer, pos, kind, flags, length)
                    break
                end = pos + 8 + length
                if end > len(buffer):
                    break
                frames.append((kind, flags, bytes(buffer[pos + 8:end]), 0))
                pos = end
        finally:
            del buffer[:pos]
        if not self.partial:
            self.since = 0.0
        elif frames or not self.since:
            self.since = time.monotonic()

    def _start_big(self, buffer: bytearray, pos: int, kind: int, flags: int,
                   length: int) -> int:
        """Take a large frame's first bytes into a buffer of its own, once the budget has
        room; the position in ``buffer`` after what was taken."""
        if not self.budget.reserve(length, self._granted):
            self.stalled = True
            return pos
        self.stalled = False
        self.reserved = length
        have = min(len(buffer) - pos - 8, length)
        self.big = bytearray(buffer[pos + 8:pos + 8 + have])
        self.head = (kind, flags)
        self.since = time.monotonic()
        return pos + 8 + have

    def _granted(self) -> None:
        self.resume()  # the session reads again, and the frame asks for its room again


def _check(magic: int, version: int, kind: int, length: int) -> None:
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad frame header (magic {magic}, version {version})")
    if kind not in KINDS:
        raise ProtocolError(f"unexpected frame kind {kind} from a client")
    limit = wire.MAX_JSON if kind == Kind.JSON else wire.MAX_DATA_FRAME
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes is over the {limit} limit")
