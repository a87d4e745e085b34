"""Process exit codes: the contract between the master, its workers, systemd and scripts.

A worker exiting with :data:`WORKER_FATAL` failed for a reason a restart will not fix
(authentication refused, unknown vhost): the master does not respawn it.
"""

from __future__ import annotations

OK = 0
ERROR = 1
CONFIG = 2  # invalid configuration (kzpool check / serve)
STARTUP = 3  # no local primary broker within startup_timeout
NO_POOL = 4  # kzpool status: nothing listens on the socket
WORKER_FATAL = 10  # worker: a restart will not fix this (credentials, vhost)
WORKER_PARENT_GONE = 11  # worker: the master died
CONSUMER_BOOT = 12  # consumer: its handler cannot be loaded, or the broker denies its queue as
# configured (a transient one, where RabbitMQ 4's deprecated features are denied); a restart
# will not fix it

MEANINGS = {
    OK: "exited cleanly",
    ERROR: "failed",
    WORKER_FATAL: "failed for a reason a restart will not fix",
    CONSUMER_BOOT: "could not load its handler or declare its queue",
    WORKER_PARENT_GONE: "exited because the master is gone",
}


def describe(code: int) -> str:
    """A human phrase for a child's exit code."""
    return MEANINGS.get(code, f"exited with code {code}")
