"""systemd's notify protocol (sd_notify), for ``Type=notify`` units.

One datagram per message to the AF_UNIX socket named in ``$NOTIFY_SOCKET`` (a leading ``@``
is the abstract namespace).  Without ``$NOTIFY_SOCKET`` every call does nothing.  The
watchdog interval comes from ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, when set, must be
ours).  Sending never blocks and never raises: systemd being gone must not stop the pool.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        ours = env.get("WATCHDOG_PID") in (None, "", str(os.getpid()))
        self.watchdog = usec / 1e6 if usec > 0 and ours and self.address else 0.0
        self.next_ping = 0.0
        self.last_status = ""

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX,
                                                         socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(fields).encode(), self.address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")
        self.last_status = status

    def reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def status(self, status: str) -> None:
        if status != self.last_status:
            self.send(f"STATUS={status}")
            self.last_status = status

    def tick(self, now: float) -> None:
        """Ping the watchdog at half its interval; called from the master's tick."""
        if self.watchdog and now >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = now + self.watchdog / 2
