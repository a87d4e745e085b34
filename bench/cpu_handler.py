"""The handler of bench/consumers.py: about 1 ms of CPU per message, then a trace line."""

from __future__ import annotations

import os
import time
from typing import Any

from kzpool.consumer.listener import Message

CPU_SECONDS = 0.001
_trace: list[int] = []  # this process's O_APPEND descriptor, opened on first use


def burn(message: Message) -> None:
    end = time.thread_time() + CPU_SECONDS
    while time.thread_time() < end:
        pass
    if not _trace:
        _trace.append(os.open(os.environ["KZB_TRACE"], os.O_WRONLY | os.O_APPEND))
    os.write(_trace[0], b"x\n")


def burn_pika(channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
    """The same work for a plain pika consumer (bench/consumers.py's side-by-side run)."""
    end = time.thread_time() + CPU_SECONDS
    while time.thread_time() < end:
        pass
    channel.basic_ack(method.delivery_tag)
    if not _trace:
        _trace.append(os.open(os.environ["KZB_TRACE"], os.O_WRONLY | os.O_APPEND))
    os.write(_trace[0], b"x\n")
