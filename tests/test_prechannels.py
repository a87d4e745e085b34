"""A worker's prechannels, as bookkeeping (pure logic: fake channels and loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kzpool.worker.prechannels import FILL_DELAY, Prechannels


class Channel:
    def __init__(self, number: int) -> None:
        self.number, self.is_open = number, True
        self.qos: list[Callable[[Any], None]] = []

    def basic_qos(self, prefetch_count: int, callback: Callable[[Any], None]) -> None:
        assert prefetch_count == 0
        self.qos.append(callback)

    def close(self) -> None:
        self.is_open = False


class Connection:
    is_open = True

    def __init__(self) -> None:
        self.opened: list[Callable[[Any], None]] = []

    def channel(self, on_open_callback: Callable[[Any], None]) -> None:
        self.opened.append(on_open_callback)


class Loop:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))


Made = tuple[Prechannels, Connection, Loop, list[Any], list[Any]]


def ready_pool(target: int) -> Made:
    """``target`` channels ready; then the pool, its connection and loop, the clients
    waiting (append to make one wait) and the channels offered to them."""
    loop, connection = Loop(), Connection()
    waiting: list[Any] = []
    offered: list[Any] = []
    pre = Prechannels(target, loop, "b", lambda ch: bool(waiting) and not offered.append(ch),
                      lambda: len(waiting), lambda: None)
    pre.connection = connection
    pre.fill()
    for n, opened in enumerate(list(connection.opened)):
        opened(Channel(n + 1))
    connection.opened.clear()
    return pre, connection, loop, waiting, offered


def test_a_taken_channel_is_replaced_later_and_one_handed_back_in_time_serves_again() -> None:
    pre, connection, loop, _waiting, _offered = ready_pool(4)
    channel = pre.take()
    assert len(pre) == 3 and not connection.opened and loop.timers[0][0] == FILL_DELAY
    pre.hand_back(channel, settled_first=False)
    assert len(pre) == 4 and pre.reused == 1
    loop.timers.pop()[1]()
    assert not connection.opened  # nothing to replace any more


def test_below_half_a_taken_channel_is_replaced_at_once_and_extras_are_closed() -> None:
    pre, connection, loop, _waiting, _offered = ready_pool(2)
    first = pre.take()
    assert not connection.opened and len(loop.timers) == 1  # half are left: later
    second = pre.take()
    assert len(connection.opened) == 2  # none left: both replaced at once
    assert first is not None and second is not None
    pre.hand_back(first, settled_first=False)  # two on their way already: closed
    assert not first.is_open and len(pre) == 0 and pre.reused == 0


def test_a_channel_a_publish_may_still_close_waits_for_a_round_trip() -> None:
    """A publish to a missing exchange, or an ack of an unknown tag, is answered later by
    the broker closing the channel: the next lease must never get that channel."""
    pre, _connection, _loop, _waiting, _offered = ready_pool(4)
    doomed, fine = pre.take(), pre.take()
    pre.hand_back(doomed, settled_first=True)
    pre.hand_back(fine, settled_first=True)
    assert len(pre) == 2  # neither is back before the broker answered
    doomed.close()  # the broker's Channel.Close came first
    doomed.qos.pop()(None)
    fine.qos.pop()(None)
    assert pre.ready[-1] is fine and len(pre) == 3 and pre.reused == 1


def test_a_channel_handed_back_goes_to_a_waiting_client_first() -> None:
    pre, _connection, _loop, waiting, offered = ready_pool(1)
    channel = pre.take()
    waiting.append("client")
    pre.hand_back(channel, settled_first=False)
    assert offered == [channel] and len(pre) == 0 and pre.reused == 1


def test_a_channel_opened_for_a_client_served_meanwhile_is_not_kept_above_the_target() -> None:
    """A waiting client gets one more channel opened for it; when a handed-back channel
    serves that client first, the extra one is closed as it opens, not kept ready."""
    pre, connection, _loop, waiting, offered = ready_pool(2)
    first, _second = pre.take(), pre.take()
    assert len(connection.opened) == 2  # none left: both replaced at once
    waiting.append("client")
    pre.fill()  # the worker, as the client starts waiting
    assert len(connection.opened) == 3  # one more, for the client
    pre.hand_back(first, settled_first=False)  # it serves the client first
    assert offered == [first]
    waiting.clear()
    extras = [Channel(10 + n) for n in range(3)]
    for opened, channel in zip(connection.opened, extras, strict=True):
        opened(channel)
    assert len(pre) == 2 and pre.ready == extras[:2]
    assert not extras[2].is_open
