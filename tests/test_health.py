"""`kzpool health` and `GET /healthz`: 0/200 when the master answers and the local zone has a
primary, else 1/503, with one line saying why."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kzpool.common.status import Health, health
from kzpool.testing import DEFAULT_MASKED, DEFAULT_PORT, DEFAULT_URI, Forwarder, Pool, wait_for

PoolMaker = Callable[..., Pool]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def kzpool_health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kzpool", "health", *args],
                          capture_output=True, text=True, timeout=60)


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def test_healthy_when_the_local_zone_has_a_primary(pools: PoolMaker) -> None:
    port = free_port()
    pool = pools([DEFAULT_URI], metrics_port=port).start()
    pool.wait_ready()
    result = kzpool_health("-c", str(pool.config))
    line = f"primary {DEFAULT_MASKED} in zone local, 1/1 connections up"
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"kzpool: healthy: {line}\n", "")
    assert get(port, "/healthz") == (200, f"{line}\n")
    assert kzpool_health("--socket", pool.socket).returncode == 0


def test_unhealthy_with_the_reason_when_the_primary_is_gone(pools: PoolMaker) -> None:
    forwarder = Forwarder(("127.0.0.1", DEFAULT_PORT))
    port = free_port()
    broker = f"amqp://guest:guest@127.0.0.1:{forwarder.port}/%2F"
    try:
        pool = pools([broker], metrics_port=port, reconnect_backoff_max=0.5).start()
        pool.wait_ready()
    finally:
        forwarder.close()  # the only broker is gone: connections cut, reconnects refused
    masked = broker.replace("guest:guest", "guest:***")
    result = wait_for(lambda: (r := kzpool_health("-c", str(pool.config))).returncode == 1
                      and r, 15, "kzpool health to say unhealthy")
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kzpool: unhealthy: no primary in local zone local: {masked}: ")
    code, body = get(port, "/healthz")
    assert code == 503 and body.startswith(f"no primary in local zone local: {masked}: ")


def test_unhealthy_when_the_master_does_not_answer(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    os.kill(pool.pid, signal.SIGSTOP)  # the registry still answers `status`; health asks it
    try:
        result = kzpool_health("-c", str(pool.config), "--timeout", "1")
    finally:
        os.kill(pool.pid, signal.SIGCONT)
    assert result.returncode == 1
    assert result.stderr == (f"kzpool: unhealthy: the pool at {pool.socket} did not answer"
                             " within 1 s: timed out\n")
    assert kzpool_health("-c", str(pool.config)).returncode == 0


def test_unhealthy_without_a_pool_or_with_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "c.ini"
    config.write_text(f"[pool]\nsocket = {tmp_path}/none.sock\n[amqp]\nuri = {DEFAULT_URI}\n")
    result = kzpool_health("-c", str(config))
    assert (result.returncode, result.stderr) == (
        1, f"kzpool: unhealthy: no pool is running at {tmp_path}/none.sock (no such socket)\n")
    config.write_text("[pool]\nprechannels = x\nheartbeat = y\n")
    result = kzpool_health("-c", str(config))
    assert (result.returncode, result.stderr) == (
        1, f"kzpool: unhealthy: invalid config: {config}: no brokers: add an [amqp] section"
           " with uri = lines (and 2 more)\n")


# ----- the verdict itself: a pure function of the status document ----------------------


def row(broker: str, zone: str = "local", **fields: Any) -> dict[str, Any]:
    return {"broker": broker, "zone": zone, "hidden": False, "primary": False,
            "available": False, "state": "waiting", "error": None, **fields}


def doc(state: str, *rows: dict[str, Any], zone: str = "local") -> dict[str, Any]:
    return {"pool": {"pid": 7, "state": state, "local_zone": zone}, "connections": list(rows)}


@pytest.mark.parametrize(("status", "expected"), [
    (doc("running", row("a", error="connection refused"),
         row("b", primary=True, available=True, state="connected")),
     Health(True, "primary b in zone local, 1/2 connections up")),
    (doc("starting", row("a")), Health(False, "pool 7 is starting, not running"
                                              " (0/1 connections up)")),
    (doc("stopping", row("a", primary=True, available=True)),
     Health(False, "pool 7 is stopping, not running (1/1 connections up)")),
    (doc("running", row("a", error="heartbeats missed"), row("a", error="connection reset"),
         row("b", state="failed", error="authentication refused: x"),
         row("w", zone="west", primary=True, available=True), zone="east"),
     Health(False, "no primary in local zone east: it lists no broker")),
    (doc("running", row("a", error="heartbeats missed"), row("a", error="connection reset"),
         row("b", state="failed", error="authentication refused: x"),
         row("h", hidden=True, primary=True, available=True)),
     Health(False, "no primary in local zone local: a: heartbeats missed;"
                   " b: authentication refused: x")),
    ({}, Health(False, "pool None is in an unknown state, not running (0/0 connections up)")),
])
def test_the_verdict_reads_the_status_document(status: dict[str, Any], expected: Health) -> None:
    assert health(status) == expected
