"""After ``fork()``: what a client's objects made before it are in the child.

A child of ``fork()`` (gunicorn's ``--preload``, Celery's prefork pool, ``multiprocessing``'s
fork start method, a plain ``os.fork()``) inherits the parent's pool clients and leases, and
with them the parent's sockets: each is the parent's conversation with a pool worker, and a
word of the child's on one would be taken for the parent's (its confirms and deliveries
read by the wrong process, the parent's and the child's frames mixed into nonsense).  So
each client object registers here (:func:`watch`), and in the child, right after the fork
(``os.register_at_fork``), each one's ``after_fork()`` puts the parent's sockets out of the
child's reach without a word on them: the blocking client's leases then get channels of
their own on their next use (:data:`FORKED` is their move's reason); kzpool.aio's channels
refuse to be used (:func:`forked_error`: an event loop does not survive a fork).  Nothing
changes for the parent.

The objects are held weakly: a client that is gone is not kept for a fork that may never
come.  The set is module state on purpose: a fork hook is the process's, registered once,
as ``logging`` keeps a weak set of its handlers for its own.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

from ..common.errors import KzpoolError
from ..common.messages import Reason

FORKED = "forked"  # a move's reason: the lease's first channel in a child of fork()
FORKED_REASON = Reason("Forked", 0, FORKED)


class Forkable(Protocol):
    def after_fork(self) -> None:
        """Called in the child, right after ``fork()``: the parent's sockets must be left
        alone (never written), and no lock may be waited for (other threads are gone)."""


_LIVE: weakref.WeakSet[Forkable] = weakref.WeakSet()


def watch(obj: Forkable) -> None:
    """Have ``obj.after_fork()`` called in each child of a ``fork()`` while ``obj`` lives."""
    _LIVE.add(obj)


def forked_error(what: str, parent: int, instead: str) -> KzpoolError:
    """Why ``what``, made in process ``parent`` before a fork, cannot be used in this child
    (``instead``: what to do)."""
    return KzpoolError(f"{what} was made in process {parent}, before fork(): this process"
                       f" (pid {os.getpid()}) has a copy it may not use; {instead}",
                       reason=FORKED)


def _in_child() -> None:
    for obj in list(_LIVE):
        obj.after_fork()


os.register_at_fork(after_in_child=_in_child)
