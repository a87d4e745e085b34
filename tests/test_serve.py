"""`kzpool serve` against the real default broker: start-up, titles, status, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable

import psutil

from .helpers import DEFAULT_URI, Pool, titles, wait_for

PoolMaker = Callable[..., Pool]


def test_start_status_and_graceful_stop(pools: PoolMaker, vhost: str) -> None:
    pool = pools([DEFAULT_URI, vhost], prechannels=4).start()
    status = pool.wait_ready()
    rows = pool.wait_rows(lambda rs: all(r["prechannels"] == 4 for r in rs), 10,
                          "prechannels to fill")
    assert [r["broker"] for r in rows] == ["amqp://guest:***@127.0.0.1:5672/%2F",
                                           vhost.replace("guest:guest", "guest:***")]
    assert [r["primary"] for r in rows] == [True, False]
    for row in rows:
        assert row["available"] and row["state"] == "connected"
        assert psutil.pid_exists(row["pid"])
        assert row["rss"] > 0 and row["zone"] == "local" and row["error"] is None
        for key in ("channels", "blocked", "since"):
            assert key in row
    assert status["assignments"] == []
    worker_pids = [r["pid"] for r in rows]

    pool.signal(signal.SIGTERM)
    assert pool.wait_exit(10) == 0
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                             for p in worker_pids), 5, "workers to exit")
    assert "stopped" in pool.logs()


def test_titles_show_roles_and_no_password(pools: PoolMaker, vhost: str) -> None:
    pool = pools([DEFAULT_URI, vhost]).start()
    pool.wait_ready()
    expected = {"kzpool: master", "kzpool: registry",
                "kzpool: connection amqp://127.0.0.1:5672/%2F [local, primary]",
                f"kzpool: connection {vhost.replace('guest:guest@', '')} [local]"}
    wait_for(lambda: set(titles(pool).values()) >= expected, 5, "process titles")
    assert not any("guest:guest" in t for t in titles(pool).values())


def test_status_cli_human_and_json(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], prechannels=2).start()
    pool.wait_ready()
    pool.wait_rows(lambda rs: rs[0]["prechannels"] == 2, 10, "prechannels")
    cli = [sys.executable, "-m", "kzpool", "status", "-c", str(pool.config)]
    human = subprocess.run(cli, capture_output=True, text=True, timeout=30)
    assert human.returncode == 0, human.stderr
    assert "amqp://guest:***@127.0.0.1:5672/%2F" in human.stdout
    assert "connected" in human.stdout and "guest:guest" not in human.stdout
    as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30)
    data = json.loads(as_json.stdout)
    assert set(data) >= {"connections", "assignments"}
    assert data["connections"][0]["prechannels"] == 2
    assert "guest:guest" not in as_json.stdout and "guest:guest" not in pool.logs()


def test_status_without_a_pool_says_so(tmp_path: object) -> None:
    result = subprocess.run([sys.executable, "-m", "kzpool", "status", "--socket",
                             f"{tmp_path}/none.sock"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 4
    assert f"no pool is running at {tmp_path}/none.sock" in result.stderr


def test_unreachable_broker_at_startup_fails_in_time(pools: PoolMaker) -> None:
    dead = "amqp://guest:guest@127.0.0.1:5799/%2F"
    pool = pools([dead], startup_timeout=2).start()
    assert pool.wait_exit(2 + 5 + 3) == 3
    logs = pool.logs()
    assert "no local primary broker after 2 s" in logs
    assert "amqp://guest:***@127.0.0.1:5799/%2F: connection refused" in logs
    assert not pool.group()


def test_wrong_password_is_not_respawned_in_a_loop(pools: PoolMaker, vhost: str) -> None:
    bad = "amqp://guest:wrong@127.0.0.1:5672/%2F"
    pool = pools([vhost, bad]).start()
    pool.wait_ready()
    rows = pool.wait_rows(lambda rs: rs[1]["state"] == "failed", 10, "the bad broker to fail")
    assert "authentication refused" in rows[1]["error"]
    assert rows[1]["pid"] is None and not rows[1]["available"]
    # it stays failed: a SIGHUP (no change) retries it once, and it fails once more
    pool.signal(signal.SIGHUP)
    wait_for(lambda: pool.logs().count("not respawning") == 2, 10, "a second failure")
    rows = pool.wait_rows(lambda rs: rs[1]["state"] == "failed", 10, "failed again")
    assert pool.logs().count("not respawning") == 2
    assert ":wrong@" not in pool.logs()


def test_unknown_vhost_fails_with_its_reason(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI, "amqp://guest:guest@127.0.0.1:5672/kzt-no-such-vhost"]).start()
    pool.wait_ready()
    rows = pool.wait_rows(lambda rs: rs[1]["state"] == "failed", 10, "the vhost to fail")
    assert "vhost" in rows[1]["error"] and "not found" in rows[1]["error"]
