"""Logging for the master and its children: one stderr handler, passwords redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


class Redact(logging.Filter):
    """Mask the password of any ``user:password@host`` a record's text still holds.

    Belt and braces: kzpool itself logs only masked URIs, but pika or a traceback may not.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.needles = [f":{s}@" for s in sorted(set(secrets), key=len, reverse=True) if s]

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(needle in text for needle in self.needles):
            for needle in self.needles:
                text = text.replace(needle, ":***@")
            record.msg, record.args = text, None
        return True


def setup(level: str, secrets: Iterable[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(Redact(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every failed connect at ERROR, several lines each; the worker logs one line
    logging.getLogger("pika").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
