"""What a lease has declared, in order, so it can be replayed on a new channel.

Kazoo's gen_listener rebuilds queue, QoS, consume and bindings when handed a new channel;
kzpool does it for any lease.  Each successful call that creates broker state is recorded;
deletions and cancels (the owner's or the broker's) remove what they undo; passive declares,
purges, commits and the like are not recorded.
:meth:`Topology.replay` sends the steps on a new channel through the lease's ``send``; an
asyncio link sends them itself and hands each reply to :meth:`Topology.replayed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..common.errors import ChannelClosedByBroker
from ..common.messages import Reply

log = logging.getLogger("kzpool.lease")

# calls that leave nothing a new channel needs again
NOT_RECORDED = frozenset({"queue_purge", "basic_recover", "basic_get", "flow", "tx_commit",
                          "tx_rollback"})

Send = Callable[[str, str, dict[str, Any]], Reply | None]  # one call; None: channel lost
Refusal = Callable[[int, str], Exception]  # (reply code, text) -> the error to raise


@dataclass
class Step:
    op: str  # "call", "consume" or "confirm"
    method: str  # the pika method name
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Topology:
    steps: list[Step] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # server-named queue: old → current

    def name(self, queue: str) -> str:
        """The current name of a queue the client may know by an older server-given name."""
        return self.names.get(queue, queue)

    def record(self, op: str, method: str, args: dict[str, Any]) -> None:
        if method in ("exchange_declare", "queue_declare") and args.get("passive"):
            return
        if method in NOT_RECORDED:
            return
        undo = _UNDO.get(method)
        if undo is not None:
            self.steps = [s for s in self.steps if not undo(s, args)]
            return
        self.steps.append(Step(op, method, dict(args)))

    def renamed(self, old: str, new: str) -> None:
        """A server-named queue came back with a new name on the new channel."""
        for known, current in list(self.names.items()):
            if current == old:
                self.names[known] = new
        self.names[old] = new

    @property
    def confirming(self) -> bool:
        return any(s.op == "confirm" for s in self.steps)

    def replay(self, send: Send, renamed: dict[str, str]) -> bool:
        """Send every step again, in order, on a new channel; ``False`` if that channel was
        lost too.  Each reply goes through :meth:`replayed`."""
        for step in self.steps:
            reply = send(step.op, step.method, step.args)
            if reply is None:
                return False
            self.replayed(step, reply, renamed)
        return True

    def replayed(self, step: Step, reply: Reply, renamed: dict[str, str],
                 refused: Refusal = ChannelClosedByBroker) -> None:
        """What the new channel answered to ``step``.  A step the broker refuses raises
        ``refused(code, text)`` naming it (pika's :class:`ChannelClosedByBroker` unless
        told otherwise).  A server-named queue that came back with a new name is renamed
        (and put in ``renamed``, old name to new)."""
        if reply.error is not None:
            raise refused(reply.error.code, f"replaying {step.method}: {reply.error.text}")
        old = step.args.get("_name")
        if step.method == "queue_declare" and old:
            new = str(reply.fields.get("queue"))
            if new != old:
                log.warning("server-named queue %s is now %s", old, new)
                self.renamed(old, new)
                renamed[old] = new
                step.args["_name"] = new


def _same(step: Step, method: str, args: dict[str, Any], *keys: str) -> bool:
    return step.method == method and all(step.args.get(k) == args.get(k) for k in keys)


def _undo_queue_delete(step: Step, args: dict[str, Any]) -> bool:
    queue = args.get("queue")
    return (step.method in ("queue_declare", "queue_bind") and step.args.get("queue") == queue) \
        or (step.op == "consume" and step.args.get("queue") == queue)


def _undo_exchange_delete(step: Step, args: dict[str, Any]) -> bool:
    exchange = args.get("exchange")
    return (_same(step, "exchange_declare", args, "exchange")
            or (step.method == "queue_bind" and step.args.get("exchange") == exchange)
            or (step.method == "exchange_bind"
                and exchange in (step.args.get("source"), step.args.get("destination"))))


_UNDO: dict[str, Callable[[Step, dict[str, Any]], bool]] = {
    "queue_delete": _undo_queue_delete,
    "exchange_delete": _undo_exchange_delete,
    "queue_unbind": lambda s, a: _same(s, "queue_bind", a, "queue", "exchange", "routing_key"),
    "exchange_unbind": lambda s, a: _same(s, "exchange_bind", a, "destination", "source",
                                          "routing_key"),
    "basic_cancel": lambda s, a: s.op == "consume" and s.args.get("consumer_tag") == a.get(
        "consumer_tag"),
}
