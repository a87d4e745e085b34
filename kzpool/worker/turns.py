"""The worker's output toward its broker, served in turns: one lane per channel.

Every frame the worker sends its broker goes into the lane of its channel (channel 0, the
connection's own frames and heartbeats, first in every round).  Each round gives every
lane with something queued one turn: its frames up to :data:`TURN` bytes (at least one
frame, never part of one), so frames of different channels interleave as AMQP allows while
each channel's own stay in order.  The kernel's queue is kept short too: the broker socket
has ``TCP_NOTSENT_LOWAT`` set to :data:`LOWAT`, and a round is sent only while less than that
is unsent (``SIOCOUTQNSD``), so a frame of one lease waits behind at most a round and
:data:`LOWAT` of another's backlog, whatever that backlog is.

What one lane may hold is bounded (``share``): a lane past it tells its session, which
stops reading its client's socket until the lane is below half of it (:meth:`Turns.wait`).
What all lanes hold together, and what the sessions reserved for frames still arriving, is
bounded by ``budget`` (``[pool] worker_buffer``): past it a session reserves nothing more
until the others' bytes have gone out; one reservation is always granted when none is held,
so a frame larger than the budget still passes, alone.

Not thread-safe: the worker's loop only.  A send error leaves the bytes to pika's own
transport, which then fails the connection its own way.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
from collections import deque
from collections.abc import Callable

from . import amqp

SHARE = 256 << 10  # bytes one lane may hold before its session stops reading its client
TURN = 16 << 10  # bytes a lane sends in one turn (at least one frame)
LOWAT = 64 << 10  # unsent bytes the kernel may hold for the broker before a round waits
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
SIOCOUTQNSD = 0x894B  # Linux: bytes of a TCP socket not sent yet
_INT = struct.Struct("i")
_FRAME = struct.Struct(">BHI")


class Content:
    """A publish whose body is sent from the client's own buffer, a frame at a time.

    ``head``: the method and content header frames; ``body``: a view of the frame the
    client sent, released (with the reservation it held) once its last frame is out.
    """

    __slots__ = ("body", "body_max", "channel", "head", "pos", "reserved")

    def __init__(self, channel: int, head: bytes, body: memoryview, body_max: int,
                 reserved: int) -> None:
        self.channel, self.head, self.body, self.body_max = channel, head, body, body_max
        self.pos = -1  # -1: the head not sent yet
        self.reserved = reserved

    def take(self, want: int) -> tuple[list[bytes], bool]:
        """Whole frames worth about ``want`` bytes, and whether that was the last."""
        out: list[bytes] = []
        got = 0
        if self.pos < 0:
            out.append(self.head)
            got, self.pos = len(self.head), 0
        while self.pos < len(self.body) and (got < want or not out):
            chunk = self.body[self.pos:self.pos + self.body_max]
            out.append(amqp.frame(amqp.FRAME_BODY, self.channel, chunk))  # one copy: the frame
            got += len(chunk) + 8
            self.pos += len(chunk)
        done = self.pos >= len(self.body)
        if done:
            self.body.release()
        return out, done


def _frames(data: bytes, pos: int, want: int, first: bool) -> int:
    """The end of the whole frames of ``data`` from ``pos`` that fit in ``want`` bytes (at
    least one, if ``first``)."""
    end, size = pos, len(data)
    while end < size:
        (_kind, _channel, length) = _FRAME.unpack_from(data, end)
        after = end + 8 + length
        if after - pos > want and (end > pos or not first):
            break
        end = after
    return min(end, size)


class Lane:
    __slots__ = ("bytes", "pieces", "pos")

    def __init__(self) -> None:
        self.pieces: deque[bytes | Content] = deque()
        self.pos = 0  # into the first piece, when it is bytes
        self.bytes = 0  # queued, reservations of its contents included


class Budget:
    """What a worker buffers toward its broker, all lanes of its connections together, and
    what its sessions reserved for large frames still arriving (``[pool] worker_buffer``)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self.reserving: deque[Callable[[], None]] = deque()  # sessions waiting for room

    def reserve(self, size: int, resume: Callable[[], None]) -> bool:
        """Hold ``size`` bytes for a frame still arriving; ``False``: not now, ``resume()``
        is called (in the loop) once the others have sent theirs: ask again then."""
        if self.held and self.held + size > self.total:
            self.reserving.append(resume)
            return False
        self.held += size
        return True

    def unreserve(self, size: int) -> None:
        self.held -= size
        self.wake()

    def wake(self) -> None:
        while self.reserving and self.held < self.total:
            self.reserving.popleft()()


class Turns:
    """Lanes of frames toward the broker, served by :meth:`round`; ``budget`` is shared
    with the worker's other connection (:mod:`.bulk`)."""

    def __init__(self, budget: Budget, share: int = SHARE) -> None:
        self.share, self.budget = share, budget
        self.last: list[bytes] = []  # the connection's close: after every lane's frames
        self.lanes: dict[int, Lane] = {}
        self.order: deque[int] = deque()  # channels with frames queued, in turn order
        self.rest = b""  # the end of a round the socket did not take
        self.waiters: dict[int, Callable[[], None]] = {}  # lanes over their share

    # ----- in -----------------------------------------------------------------------------

    def put(self, data: bytes) -> None:
        """Frames of one channel (its number read from the first frame)."""
        channel = int.from_bytes(data[1:3], "big")
        self._queue(channel, data, len(data))

    def put_content(self, content: Content) -> None:
        self._queue(content.channel, content, 0)  # its bytes are held as reserved

    def _queue(self, channel: int, piece: bytes | Content, size: int) -> None:
        lane = self.lanes.get(channel)
        if lane is None:
            lane = self.lanes[channel] = Lane()
        if not lane.pieces and channel:
            self.order.append(channel)
        lane.pieces.append(piece)
        lane.bytes += size + (piece.reserved if isinstance(piece, Content) else 0)
        self.budget.held += size

    def over(self, channel: int) -> bool:
        """Whether ``channel``'s lane holds its share or more."""
        lane = self.lanes.get(channel)
        return lane is not None and lane.bytes >= self.share

    def queued(self, channel: int) -> int:
        lane = self.lanes.get(channel)
        return 0 if lane is None else lane.bytes

    def wait(self, channel: int, resume: Callable[[], None]) -> None:
        """``resume()`` once ``channel``'s lane is under half its share."""
        self.waiters[channel] = resume

    def forget(self, channel: int) -> None:
        """A session gone: no more waking it (what its lane holds still goes out)."""
        self.waiters.pop(channel, None)

    def put_last(self, data: bytes) -> None:
        """The connection's close: sent once every lane is empty."""
        self.last.append(data)

    # ----- out ----------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return bool(self.rest or self.order or self.last or (0 in self.lanes
                                                             and self.lanes[0].pieces))

    def round(self) -> bytes:
        """One turn of every lane with frames queued: the connection's own first."""
        out: list[bytes] = []
        if 0 in self.lanes:
            self._turn(0, self.lanes[0], out, 1 << 30)
        for _ in range(len(self.order)):
            channel = self.order.popleft()
            if self._turn(channel, self.lanes[channel], out, TURN):
                self.order.append(channel)
        if self.last and not self.order and not (0 in self.lanes and self.lanes[0].pieces):
            out += self.last
            self.last = []
        self._wake()
        return b"".join(out)

    def _turn(self, channel: int, lane: Lane, out: list[bytes], want: int) -> bool:
        """Up to ``want`` bytes of ``lane`` into ``out``; whether it has more."""
        got = 0
        while lane.pieces and got < want:
            piece = lane.pieces[0]
            if isinstance(piece, Content):
                frames, done = piece.take(want - got)
                out += frames
                got += sum(map(len, frames))
                if done:
                    lane.pieces.popleft()
                    lane.bytes -= piece.reserved
                    self.budget.held -= piece.reserved
                continue
            end = len(piece) if len(piece) - lane.pos <= want - got else \
                _frames(piece, lane.pos, want - got, not got)  # whole frames: all fit
            if end == lane.pos:
                break
            out.append(piece[lane.pos:end] if lane.pos or end < len(piece) else piece)
            size = end - lane.pos
            got += size
            lane.bytes -= size
            self.budget.held -= size
            if end >= len(piece):
                lane.pieces.popleft()
                lane.pos = 0
            else:
                lane.pos = end
        if not lane.pieces and channel:
            del self.lanes[channel]
        return bool(lane.pieces)

    def _wake(self) -> None:
        for channel in [c for c in self.waiters if not self._above_half(c)]:
            self.waiters.pop(channel)()
        self.budget.wake()

    def _above_half(self, channel: int) -> bool:
        lane = self.lanes.get(channel)
        return lane is not None and lane.bytes > self.share // 2


def unsent(sock: socket.socket) -> int:
    """Bytes the kernel holds for ``sock`` not sent yet (0 where that cannot be read)."""
    with contextlib.suppress(OSError):
        return int(_INT.unpack(fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0" * 4))[0])
    return 0


def set_lowat(sock: socket.socket) -> None:
    """Writable only while less than :data:`LOWAT` is unsent (TCP only; else nothing)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, LOWAT)
