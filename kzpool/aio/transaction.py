"""aio-pika's ``Transaction`` on a kzpool channel: ``async with channel.transaction():``.

``select``, ``commit`` and ``rollback`` are AMQP's ``tx.*`` on the lease's channel, as a
blocking lease's ``tx_select``, ``tx_commit`` and ``tx_rollback`` are: transaction mode is
replayed after a move, and a transaction cut by a move raises
:class:`~kzpool.TransactionLost` at ``commit`` (its publishes and settles were rolled back
by the broker with the old channel).  A channel with publisher confirms has none (aio-pika's
``RuntimeError``).  Where aio-pika is installed :class:`Transaction` subclasses its class of
that name (no ABC there, so ``isinstance`` needs a subclass).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import compat
from .compat import TransactionState
from .core import Owner

if TYPE_CHECKING:
    _TransactionBase = object
else:
    _TransactionBase = compat.base("aio_pika.transaction", "Transaction")


class Transaction(_TransactionBase):
    def __init__(self, channel: Owner) -> None:
        self._channel = channel
        self.state = TransactionState.CREATED

    def __repr__(self) -> str:
        return f"<Transaction {self.state.value}>"

    def __str__(self) -> str:
        return self.state.value

    @property
    def channel(self) -> Owner:
        if self._channel.is_closed:
            raise RuntimeError("Closed channel")
        return self._channel

    async def select(self, timeout: float | None = None) -> Any:
        """Transaction mode: what the channel publishes and settles waits for ``commit``."""
        result = await self.channel._live().tx_select(timeout)
        self.state = TransactionState.STARTED
        return result

    async def rollback(self, timeout: float | None = None) -> Any:
        result = await self.channel._live().tx_rollback(timeout)
        self.state = TransactionState.ROLLED_BACK
        return result

    async def commit(self, timeout: float | None = None) -> Any:
        result = await self.channel._live().tx_commit(timeout)
        self.state = TransactionState.COMMITED
        return result

    async def __aenter__(self) -> Transaction:
        await self.select()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is not None:
            await self.rollback()
        else:
            await self.commit()
