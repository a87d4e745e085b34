"""The worker's output in turns and its buffer budget (:mod:`kzpool.worker.turns`): pure
logic over bytes, no broker."""

from __future__ import annotations

from kzpool.common import wire
from kzpool.worker import amqp
from kzpool.worker.turns import TURN, Budget, Content, Turns, _frames


def frames_of(data: bytes) -> list[tuple[int, int]]:
    """(channel, payload size) of each AMQP frame in ``data``, in order."""
    out, pos = [], 0
    while pos < len(data):
        _kind, channel, size = amqp.FRAME_HEAD.unpack_from(data, pos)
        assert data[pos + 7 + size] == 0xCE
        out.append((channel, size))
        pos += 8 + size
    return out


def body(channel: int, size: int) -> bytes:
    return amqp.frame(amqp.FRAME_BODY, channel, bytes(size))


def test_every_lane_gets_a_turn_and_the_connection_goes_first() -> None:
    turns = Turns(Budget(1 << 30))
    for _ in range(10):
        turns.put(body(1, 4000))  # a backlog on channel 1
    turns.put(body(2, 10))
    turns.put(amqp.frame(amqp.FRAME_HEARTBEAT, 0, b""))
    first = frames_of(turns.round())
    assert first[0] == (0, 0)
    assert (2, 10) in first  # behind at most one turn of channel 1's backlog
    assert sum(size for channel, size in first if channel == 1) <= TURN
    rest = []
    while turns.pending:
        rest += frames_of(turns.round())
    assert [f for f in first + rest if f[0] == 1] == [(1, 4000)] * 10  # whole, in order


def test_a_frame_larger_than_a_turn_goes_whole() -> None:
    turns = Turns(Budget(1 << 30))
    turns.put(body(1, 3 * TURN) + body(1, 5))
    assert frames_of(turns.round()) == [(1, 3 * TURN)]
    assert frames_of(turns.round()) == [(1, 5)]
    assert not turns.pending
    assert _frames(body(1, 5) * 3, 0, 1, True) == 13
    assert _frames(body(1, 5) * 3, 0, 1, False) == 0


def test_the_connection_close_goes_after_every_lane() -> None:
    turns = Turns(Budget(1 << 30))
    turns.put(body(1, 3 * TURN))
    turns.put_last(amqp.frame(amqp.FRAME_METHOD, 0, b"\x00\x0a\x00\x32"))
    turns.put(body(1, 3 * TURN))
    order = []
    while turns.pending:
        order += frames_of(turns.round())
    assert order == [(1, 3 * TURN), (1, 3 * TURN), (0, 4)]


def test_a_lane_over_its_share_is_woken_under_half() -> None:
    turns = Turns(Budget(1 << 30), share=4 * TURN)
    for _ in range(8):
        turns.put(body(3, TURN - 8))
    assert turns.over(3)
    woken: list[int] = []
    turns.wait(3, lambda: woken.append(turns.queued(3)))
    turns.round()
    assert woken == []  # still above half
    while not woken:
        turns.round()
    assert woken[0] <= 2 * TURN
    assert not turns.over(3)


def test_a_content_is_sent_from_its_buffer_frame_by_frame_holding_its_reservation() -> None:
    budget = Budget(10 << 20)
    turns = Turns(budget)
    payload = bytearray(b"x" * 300_000)
    assert budget.reserve(len(payload), lambda: None)
    head = amqp.publish_head(5, wire.names("", "q"), b"", len(payload), False)
    turns.put_content(Content(5, head, memoryview(payload), 131_064, len(payload)))
    assert turns.over(5) and budget.held == len(payload)
    sent = b""
    while turns.pending:
        sent += turns.round()
    assert sent == amqp.publish(5, wire.names("", "q"), b"", bytes(payload), False, 131_064)
    assert budget.held == 0 and not turns.over(5)


def test_the_budget_lets_one_frame_through_alone_and_wakes_waiters_in_order() -> None:
    budget = Budget(1000)
    assert budget.reserve(5000, lambda: None)  # none held: it passes, larger or not
    woken: list[str] = []
    assert not budget.reserve(10, lambda: woken.append("a"))
    assert not budget.reserve(10, lambda: woken.append("b"))
    budget.unreserve(5000)
    assert woken == ["a", "b"]
