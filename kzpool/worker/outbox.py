"""What a worker holds toward one lease's client, bounded in bytes: ``[pool] lease_buffer``.

A session's :class:`Outbox` is what the worker has for its client and the client has not
read yet: deliveries (``auto_ack`` ones, and those of a consumer without prefetch, too),
returns, answers.  Past ``lease_buffer`` bytes, or past 64 KiB while the leases of the worker
hold a quarter of ``worker_max_rss`` together (:class:`Pot`), that lease alone is *held
back*: its consumers are cancelled at the broker (:class:`Pause`), which keeps the rest of
their queues, and they consume again, same tags and arguments, once the client has read
its outbox down to :data:`FLOOR`.  Deliveries already on their way when the cancel went
out still reach the client, but one of a consumer that acks, arriving while the outbox
holds twice ``lease_buffer`` (twice :data:`FLOOR` while the pot is over), is nacked back to
its queue instead (it comes again, marked redelivered): the client had not seen it.  While
the outbox holds twice ``lease_buffer`` the worker also stops reading the client's socket,
so that its publishes (and their returns) wait in the client.  A lease held back whose
client reads nothing for ``lease_buffer_grace`` seconds is closed: its client is told
:class:`LimitExceeded` naming ``lease_buffer``, after the rest of the frame it was reading,
and the rest is dropped (what its consumers held unacked goes back to their queues with the
channel).

Runs in the worker's loop only; nothing here blocks.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pika.adapters.select_connection import IOLoop

from ..common.errors import LimitExceeded
from ..common.settings import PoolSettings

log = logging.getLogger("kzpool.session")

FLOOR = 64 << 10  # bytes: a lease held back consumes again at this; the pot's bound spares it
CHECK = 1.0  # seconds between the checks of a held-back lease's progress


@dataclass
class Pot:
    """What every lease of one worker holds toward its client, together; ``held``: the
    leases held back now, and how many were since the worker started."""

    limit: int  # 0: no bound but each lease's own
    total: int = 0
    held: set[str] = field(default_factory=set)
    holds: int = 0  # leases held back, ever
    closed: int = 0  # leases closed for it, ever
    changed: Callable[[], None] = lambda: None  # a lease was held back, or is no more

    @classmethod
    def of(cls, settings: PoolSettings, changed: Callable[[], None]) -> Pot:
        return cls(settings.worker_max_rss // 4, changed=changed)

    @property
    def over(self) -> bool:
        return bool(self.limit) and self.total > self.limit

    def counters(self) -> dict[str, int]:
        """For the worker's report: leases held back now (a gauge), ever, and closed."""
        return {"leases_held_back": len(self.held), "lease_holds": self.holds,
                "leases_closed_unread": self.closed, "client_buffered_bytes": self.total}


@dataclass(frozen=True, slots=True)
class Consume:
    """A consumer as the client made it: what consuming again repeats."""

    queue: str
    auto_ack: bool
    exclusive: bool
    arguments: dict[str, Any] | None


class Owner(Protocol):
    """What an outbox needs of its session."""

    ioloop: IOLoop
    sock: socket.socket
    fd: int
    lease: str
    writing: bool  # it waits for its socket to be writable (set here)

    def watch(self) -> None: ...  # watch its socket for what it wants now

    def client_gone(self) -> None: ...

    def over_budget(self, error: LimitExceeded) -> None: ...


class Outbox:
    """One session's bytes toward its client, and whether it is held back (see the module).
    ``pause`` cancels and restarts its consumers."""

    def __init__(self, owner: Owner, settings: PoolSettings, pot: Pot, pause: Pause) -> None:
        self.owner, self.pot, self.pause = owner, pot, pause
        self.limit, self.grace = settings.lease_buffer, settings.lease_buffer_grace
        self.out = bytearray()
        self.flush_pending = False
        self.reading = True
        self.added = self.sent = self.boundary = 0  # bytes ever: queued, sent, last frame end
        self.ends: deque[int] = deque()  # where each frame queued and not all sent ends
        self.held_since: float | None = None
        self.read_at = time.monotonic()  # the client last took something
        self.timer: object | None = None

    @property
    def full(self) -> bool:
        """Twice ``lease_buffer`` is queued (twice :data:`FLOOR` while the pot is over): what
        acks may go back to its queue."""
        return len(self.out) > 2 * self.limit or (self.pot.over and len(self.out) > 2 * FLOOR)

    def send(self, data: bytes) -> None:
        """Queue whole frames for the client."""
        self.out += data
        self.added += len(data)
        self.ends.append(self.added)
        self.pot.total += len(data)
        if self.held_since is None and (len(self.out) > self.limit or (
                self.pot.over and len(self.out) > FLOOR)):
            self._hold()
        if not self.flush_pending and not self.owner.writing:
            self.flush_pending = True
            self.owner.ioloop.call_later(0, self.flush)

    def flush(self) -> None:
        self.flush_pending = False
        out, sock = self.out, self.owner.sock
        if not out or sock.fileno() < 0:
            return
        try:
            sent = sock.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.owner.client_gone()
            return
        if sent:
            del out[:sent]
            self._took(sent)
        self._watch()

    def _took(self, sent: int) -> None:
        self.sent += sent
        self.pot.total -= sent
        self.read_at = time.monotonic()
        ends = self.ends
        while ends and ends[0] <= self.sent:
            self.boundary = ends.popleft()
        if self.held_since is not None and len(self.out) <= min(FLOOR, self.limit // 2):
            self._resume()

    def _watch(self) -> None:
        """Poll for writable while something waits; stop reading the client while its
        outbox holds twice ``lease_buffer``."""
        writing, reading = bool(self.out), len(self.out) <= 2 * self.limit
        if (writing, reading) != (self.owner.writing, self.reading):
            self.owner.writing, self.reading = writing, reading
            self.owner.watch()

    # ----- held back ------------------------------------------------------------------------

    def _hold(self) -> None:
        self.held_since = self.read_at = time.monotonic()
        self.pot.held.add(self.owner.lease)
        self.pot.holds += 1
        self.pot.changed()
        self.pause.hold()
        self.timer = self.owner.ioloop.call_later(CHECK, self._check)
        log.info("lease %s held back: %d bytes unread by its client", self.owner.lease,
                 len(self.out))

    def _resume(self) -> None:
        self.held_since = None
        self.pot.held.discard(self.owner.lease)
        self.pot.changed()
        if self.timer is not None:
            self.owner.ioloop.remove_timeout(self.timer)
            self.timer = None
        self.pause.resume()

    def _check(self) -> None:
        self.timer = None
        if self.held_since is None:
            return
        idle = time.monotonic() - self.read_at
        if idle < self.grace:
            self.timer = self.owner.ioloop.call_later(CHECK, self._check)
            return
        self.pot.closed += 1
        error = LimitExceeded(
            f"lease {self.owner.lease} was held back with {len(self.out)} bytes its client"
            f" did not read for {idle:.0f} s ([pool] lease_buffer = {self.limit},"
            f" lease_buffer_grace = {self.grace:g})", "lease_buffer")
        log.warning("lease %s: closing it: %s", self.owner.lease, error)
        self.owner.over_budget(error)

    def cut(self) -> None:
        """Drop what is queued, all but the rest of the frame the client is reading."""
        keep = self.ends[0] - self.sent if self.ends and self.boundary < self.sent else 0
        self.pot.total -= len(self.out) - keep
        del self.out[keep:]
        self.ends.clear()
        self.added = self.sent + keep
        if keep:
            self.ends.append(self.added)

    def close(self) -> None:
        """The session ended: what it held is the pot's no more."""
        if self.held_since is not None:
            self.pot.held.discard(self.owner.lease)
            self.held_since = None
            self.pot.changed()
        if self.timer is not None:
            self.owner.ioloop.remove_timeout(self.timer)
            self.timer = None
        self.pot.total -= len(self.out)
        self.pot = Pot(0)  # what the client may still read (a linger) is its own


class Pause:
    """A lease's consumers, cancelled at the broker while it is held back and started
    again, same tags and arguments, when it is not (see the module).  ``channel``: pika's;
    ``on_message``: pika's consumer callback for them.

    pika runs every ``CancelOk`` callback of a channel on each ``CancelOk``, and forgets a
    tag only after them: whether a cancel is done is read off pika's channel, a loop pass
    later."""

    def __init__(self, ioloop: IOLoop, channel: Any, on_message: Callable[..., None],
                 lease: str) -> None:
        self.ioloop, self.channel, self.on_message, self.lease = ioloop, channel, on_message, lease
        self.consumers: dict[str, Consume] = {}  # consuming, by tag
        self.paused: dict[str, Consume] = {}  # cancelled here (or being cancelled), by tag
        self.holding = False

    def consuming(self, tag: str, consume: Consume) -> None:
        self.consumers[tag] = consume
        if self.holding:
            self.hold()

    def forget(self, tag: str) -> None:
        """The client or the broker cancelled ``tag``: never consume it again."""
        self.consumers.pop(tag, None)
        self.paused.pop(tag, None)

    def stop(self) -> list[str]:
        """Consume again no more (the lease moves): the tags cancelled here (what still
        comes for one goes to pika, which requeues it)."""
        done = list(self.paused)
        self.consumers.clear()
        self.paused.clear()
        self.holding = False
        return done

    def hold(self) -> None:
        self.holding = True
        if not self.channel.is_open:
            return
        known, cancelling = self.channel._consumers, self.channel._cancelled  # pika's
        for tag in list(self.consumers):
            consume = self.consumers.pop(tag)
            if tag in known and tag not in cancelling:  # else the client or broker cancelled it
                self.paused[tag] = consume
                self.channel.basic_cancel(tag, callback=self._cancel_ok)

    def resume(self) -> None:
        self.holding = False
        self._again()

    def _cancelling(self, tag: str) -> bool:
        return tag in getattr(self.channel, "_cancelled", ()) or \
            tag in getattr(self.channel, "_consumers", ())

    def _cancel_ok(self, _frame: Any) -> None:
        self.ioloop.call_later(0, self._again)

    def _again(self) -> None:
        """Consume again with every tag whose cancel is done, unless held back."""
        if self.holding or not self.channel.is_open:
            return
        for tag in [t for t in self.paused if not self._cancelling(t)]:
            consume = self.consumers[tag] = self.paused.pop(tag)
            self.channel.basic_consume(
                consume.queue, self.on_message, auto_ack=consume.auto_ack,
                exclusive=consume.exclusive, consumer_tag=tag, arguments=consume.arguments,
                callback=lambda _frame: None)
            log.debug("lease %s: consumer %s consumes again", self.lease, tag)
