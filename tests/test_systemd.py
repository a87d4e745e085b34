"""The systemd unit verifies, and the pool speaks systemd's notify protocol to a real socket."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kzpool.testing import DEFAULT_URI, Pool

ROOT = Path(__file__).resolve().parent.parent


class NotifySocket:
    """What a service manager would hear: one datagram per sd_notify call."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.heard: list[str] = []

    def wait_for(self, field: str, timeout: float = 10, after: int = 0) -> int:
        """Index of the first message (from ``after`` on) holding ``field``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.heard[after:], start=after):
                if field in message.split("\n"):
                    return i
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {field} within {timeout} s; heard {self.heard}")
            self.sock.settimeout(remaining)
            with contextlib.suppress(TimeoutError):
                self.heard.append(self.sock.recv(4096).decode())


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    directory = Path(tempfile.mkdtemp(prefix="kzn-", dir="/tmp"))  # AF_UNIX paths are short
    listener = NotifySocket(directory / "notify")
    yield listener
    listener.sock.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_ready_status_watchdog_reload_and_stop(pools: Callable[..., Pool],
                                               notify: NotifySocket) -> None:
    pool = pools([DEFAULT_URI]).start(env={"NOTIFY_SOCKET": notify.path,
                                           "WATCHDOG_USEC": "400000"})
    ready = notify.wait_for("READY=1")
    assert any(f.startswith("STATUS=1/1 connections up, primary amqp://guest:***@")
               for f in notify.heard[ready].split("\n"))
    first = notify.wait_for("WATCHDOG=1")
    notify.wait_for("WATCHDOG=1", after=first + 1)  # pinged again, at half the interval
    pool.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", after=ready + 1)
    assert any(f.startswith("MONOTONIC_USEC=") for f in notify.heard[reloading].split("\n"))
    notify.wait_for("READY=1", after=reloading + 1)
    pool.signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert pool.wait_exit(10) == 0
    assert not any("guest:guest" in m for m in notify.heard)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_unit_file_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "kzpool.service").read_text()
    for key in ("Type=notify", "KillMode=mixed", "User=kzpool", "Group=kzpool",
                "RuntimeDirectory=kzpool", "WatchdogSec=", "ExecReload=/bin/kill -HUP"):
        assert key in unit
    # verify needs ExecStart's program to exist: point it at this checkout's kzpool
    kzpool = Path(sys.executable).parent / "kzpool"
    (tmp_path / "kzpool.service").write_text(unit.replace("/opt/kzpool/venv/bin/kzpool",
                                                          str(kzpool)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "kzpool.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_timeouts_cover_the_default_settings() -> None:
    from kzpool.common.settings import BY_NAME

    unit = (ROOT / "systemd" / "kzpool.service").read_text()
    values = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line
                  and not line.startswith("#"))
    assert float(values["TimeoutStopSec"]) > float(str(BY_NAME["shutdown_timeout"].default))
    assert float(values["TimeoutStartSec"]) > float(str(BY_NAME["startup_timeout"].default))
