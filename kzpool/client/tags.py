"""Delivery tags that stay unique across a lease's channels.

Each new channel numbers its deliveries from 1 again.  The lease shows its owner
``channel tag + base``, where ``base`` is the highest tag shown before the move, so a tag
never means two messages; a settle of a tag from an earlier channel is dropped (the broker
redelivers that message on the new channel), never applied to another message.  Pure.
"""

from __future__ import annotations


class TagMap:
    __slots__ = ("base", "highest")

    def __init__(self) -> None:
        self.base = 0  # tags up to here belong to earlier channels
        self.highest = 0  # the highest tag shown so far

    def shown(self, channel_tag: int) -> int:
        """The tag the owner sees for a delivery of the current channel."""
        tag = channel_tag + self.base
        if tag > self.highest:
            self.highest = tag
        return tag

    def channel_tag(self, tag: int) -> int | None:
        """The current channel's tag for a tag the owner settles; ``None`` if it belongs to
        an earlier channel.  ``0`` (every unsettled delivery, with ``multiple``) stays 0."""
        if not tag:
            return 0
        return tag - self.base if tag > self.base else None

    def new_channel(self) -> None:
        self.base = self.highest
