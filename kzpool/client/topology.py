"""What a lease has declared, in order, so it can be replayed on a new channel.

Kazoo's gen_listener rebuilds queue, QoS, consume and bindings when handed a new channel;
kzpool does it for any lease.  Each successful call that creates broker state is recorded;
deletions and cancels remove what they undo; passive declares and purges are not recorded.
Pure data: the lease sends what :meth:`Topology.steps` lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
        if method in ("queue_purge", "basic_recover", "basic_get"):
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
