"""Handlers for the in-service consumer tests (they leave a trace the test can read), and
the CPU-heavy work of the heartbeat tests."""

from __future__ import annotations

import os
import time

from kzpool.consumer.listener import Listener, Message

HEARTBEAT = 2
CPU_SECONDS = 4 * HEARTBEAT  # the broker drops a peer silent for two heartbeat intervals


def burn(seconds: float) -> None:
    """Hold the GIL (and an event loop): nothing else of this process runs meanwhile."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1


def _trace(line: str) -> None:
    with open(os.environ["KZT_TRACE"], "a", encoding="utf-8") as out:
        out.write(f"{line}\n")


def record(message: Message) -> None:
    _trace(f"{os.getpid()} {message.routing_key} {message.body.decode()}")


def fail(message: Message) -> None:
    _trace(f"{os.getpid()} failing {message.body.decode()}")
    raise RuntimeError(f"cannot handle {message.body!r}")


def stuck(message: Message) -> None:
    _trace(f"{os.getpid()} stuck {message.body.decode()}")
    while True:  # a handler that never returns, holding the GIL as CPU-bound code does
        time.monotonic()


class Billing(Listener):
    """A Listener subclass as a handler: responders by routing key."""

    def __post_init__(self) -> None:
        self.responders["billing.#"] = lambda m: _trace(f"{os.getpid()} billing {m.body.decode()}")


not_callable = 42


def answer(message: Message) -> None:
    """Record where the message came from; answer it if it asks for a reply."""
    _trace(f"{os.getpid()} {message.routing_key} {message.body.decode()} {message.zone}")
    if message.properties.reply_to:
        message.reply(b"re: " + message.body)
