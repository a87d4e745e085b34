"""A real pool in its own process group, and waits on conditions with deadlines."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from ..client.pool import PoolClient
from ..common.errors import PoolNotRunning

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.02, ignore: tuple[type[Exception], ...] = ()) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail naming ``what``.

    An exception raised by ``predicate`` fails the wait at once, unless it is one of
    ``ignore``: kzpool's errors reach the caller (a lease error is what a test is after).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def write_config(path: Path, uris: list[str] | dict[str, list[str]], **pool: Any) -> Path:
    lines = ["[pool]"] + [f"{k} = {v}" for k, v in pool.items()]
    if isinstance(uris, dict):
        for zone, zone_uris in uris.items():
            lines += [f"[zone:{zone}]"] + [f"uri = {u}" for u in zone_uris]
    else:
        lines += ["[amqp]"] + [f"uri = {u}" for u in uris]
    path.write_text("\n".join(lines) + "\n")
    return path


class Pool:
    """A real ``kzpool serve`` in its own session; ``close`` kills whatever is left."""

    def __init__(self, tmp: Path, uris: list[str] | dict[str, list[str]], **pool: Any) -> None:
        # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer
        self.rundir = Path(tempfile.mkdtemp(prefix="kzt-", dir="/tmp"))
        self.socket = str(self.rundir / "kzpool.sock")
        pool.setdefault("startup_timeout", 20)
        pool.setdefault("shutdown_timeout", 5)
        pool.setdefault("heartbeat", 5)
        self.config = write_config(tmp / "config.ini", uris, socket=self.socket, **pool)
        self.log = tmp / "pool.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, env: dict[str, str] | None = None) -> Pool:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kzpool", "serve", "-c", str(self.config), *args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **(env or {})})
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        return PoolClient(self.socket).status()

    def connections(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.status()["connections"]
        return rows

    def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"pool exited {self.proc.returncode}:\n{self.logs()}")
            status = self.status()
            return status if status["pool"]["state"] == "running" else None
        return wait_for(ready, timeout, "the pool to be ready", ignore=(PoolNotRunning, OSError))

    def wait_rows(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float,
                  what: str) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            rows = self.connections()
            return rows if predicate(rows) else None
        return wait_for(check, timeout, what, ignore=(PoolNotRunning, OSError))

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float) -> float:
        """SIGTERM, then wait up to ``timeout`` for the master to exit; the seconds it took."""
        started = time.monotonic()
        self.signal(signal.SIGTERM)
        self.wait_exit(timeout)
        return time.monotonic() - started

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def group(self) -> list[psutil.Process]:
        """Live (non-zombie) processes of the pool's process group."""
        found = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) == self.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def close(self) -> None:
        if self.proc is None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        wait_for(lambda: not self.group(), 10, "the pool's processes to be gone")
        shutil.rmtree(self.rundir, ignore_errors=True)


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def titles(pool: Pool) -> dict[int, str]:
    """The title of each of the pool's processes, by pid; one that exits meanwhile (a
    registry being replaced, say) is left out."""
    found = {}
    for process in pool.group():
        with contextlib.suppress(psutil.Error):
            found[process.pid] = " ".join(process.cmdline()).strip()
    return found
