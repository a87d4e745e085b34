"""`kzpool serve` against the real default broker: start-up, titles, status, signals."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable

import psutil

from kzpool.master.registry import read as read_registry
from kzpool.testing import (
    DEFAULT_HOSTPORT,
    DEFAULT_MASKED,
    DEFAULT_URI,
    Pool,
    default_uri,
    titles,
    wait_for,
)

PoolMaker = Callable[..., Pool]


def test_start_status_and_graceful_stop(pools: PoolMaker, vhost: str) -> None:
    pool = pools([DEFAULT_URI, vhost], prechannels=4).start()
    status = pool.wait_ready()
    rows = pool.wait_rows(lambda rs: all(r["prechannels"] == 4 for r in rs), 10,
                          "prechannels to fill")
    assert [r["broker"] for r in rows] == [DEFAULT_MASKED,
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
    assert not os.listdir(os.path.dirname(pool.socket))  # no socket file left behind


def test_titles_show_roles_and_no_password(pools: PoolMaker, vhost: str) -> None:
    pool = pools([DEFAULT_URI, vhost]).start()
    pool.wait_ready()
    expected = {"kzpool: master", "kzpool: registry",
                f"kzpool: connection amqp://{DEFAULT_HOSTPORT}/%2F [local, primary]",
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
    assert DEFAULT_MASKED in human.stdout
    assert "connected" in human.stdout and "guest:guest" not in human.stdout
    as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30)
    data = json.loads(as_json.stdout)
    assert set(data) >= {"connections", "assignments", "brokers", "consumers"}
    assert data["brokers"][0]["primary"] and data["brokers"][0]["connections"] == 1
    assert "brokers:" in human.stdout
    assert data["connections"][0]["prechannels"] == 2
    assert "guest:guest" not in as_json.stdout and "guest:guest" not in pool.logs()


def test_status_reads_the_registry_even_while_the_master_is_stopped(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], prechannels=2).start()
    pool.wait_ready()
    registry, key = f"{pool.socket}.registry", f"{pool.socket}.registry.key"
    wait_for(lambda: read_registry(pool.socket)["connections"][0]["prechannels"] == 2, 10,
             "the registry to have the prechannels (it is written within 0.1 s)")
    assert stat.S_IMODE(os.stat(registry).st_mode) == stat.S_IMODE(os.stat(key).st_mode) == 0o600
    cli = [sys.executable, "-m", "kzpool", "status", "--json", "--socket", pool.socket]
    pool.signal(signal.SIGSTOP)  # the master's loop answers nothing now
    try:
        shown = subprocess.run(cli, capture_output=True, text=True, timeout=30)
    finally:
        pool.signal(signal.SIGCONT)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["pool"]["pid"] == pool.pid and data["pool"]["state"] == "running"
    assert data["connections"][0]["prechannels"] == 2 and data["brokers"][0]["primary"]
    pool.stop(10)
    assert not os.path.exists(registry) and not os.path.exists(key)


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
    bad = default_uri(password="wrong")
    pool = pools([vhost, bad]).start()
    pool.wait_ready()
    # the worker says it failed, then exits: the row ends failed, with no process
    rows = pool.wait_rows(lambda rs: rs[1]["state"] == "failed" and rs[1]["pid"] is None, 10,
                          "the bad broker to fail and its worker to be gone")
    assert "authentication refused" in rows[1]["error"]
    assert not rows[1]["available"]
    # it stays failed: a SIGHUP (no change) retries it once, and it fails once more
    pool.signal(signal.SIGHUP)
    wait_for(lambda: pool.logs().count("not respawning") == 2, 10, "a second failure")
    rows = pool.wait_rows(lambda rs: rs[1]["state"] == "failed", 10, "failed again")
    assert pool.logs().count("not respawning") == 2
    assert ":wrong@" not in pool.logs()


def test_unknown_vhost_fails_with_its_reason(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI, default_uri("kzt-no-such-vhost")]).start()
    pool.wait_ready()
    rows = pool.wait_rows(lambda rs: rs[1]["state"] == "failed", 10, "the vhost to fail")
    assert "vhost" in rows[1]["error"] and "not found" in rows[1]["error"]


def test_worker_kill_9_is_respawned_and_refilled(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], prechannels=5).start()
    pool.wait_ready()
    old = pool.wait_rows(lambda rs: rs[0]["prechannels"] == 5, 10, "prechannels")[0]["pid"]
    psutil.Process(old).send_signal(signal.SIGKILL)
    # the new worker reports itself available; the master makes it primary again after
    rows = pool.wait_rows(lambda rs: rs[0]["pid"] not in (None, old) and rs[0]["available"]
                          and rs[0]["prechannels"] == 5 and rs[0]["primary"], 10,
                          "a new worker with prechannels, primary again")
    assert rows[0]["primary"]
    assert "was killed by SIGKILL" in pool.logs()


def test_sighup_adds_and_removes_brokers(pools: PoolMaker, vhost: str) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    kept = pool.connections()[0]
    pool.config.write_text(pool.config.read_text().replace(
        f"uri = {DEFAULT_URI}", f"uri = {DEFAULT_URI}\nuri = {vhost}"))
    pool.signal(signal.SIGHUP)
    rows = pool.wait_rows(lambda rs: len(rs) == 2 and rs[1]["available"], 10, "the added broker")
    assert rows[0]["pid"] == kept["pid"] and rows[0]["id"] == kept["id"]
    added = rows[1]
    pool.config.write_text(pool.config.read_text().replace(f"uri = {DEFAULT_URI}\n", ""))
    pool.signal(signal.SIGHUP)
    rows = pool.wait_rows(lambda rs: len(rs) == 1, 10, "the removed broker to go")
    assert rows[0]["pid"] == added["pid"] and rows[0]["id"] == added["id"]  # left alone
    assert rows[0]["broker"].endswith(vhost.split("/")[-1])
    wait_for(lambda: not psutil.pid_exists(kept["pid"]) or
             psutil.Process(kept["pid"]).status() == "zombie", 5, "the removed worker to exit")
    # adding it back works: no stale row is left behind
    pool.config.write_text(pool.config.read_text().replace(
        f"uri = {vhost}", f"uri = {vhost}\nuri = {DEFAULT_URI}"))
    pool.signal(signal.SIGHUP)
    pool.wait_rows(lambda rs: len(rs) == 2 and all(r["available"] for r in rs), 10,
                   "the broker added again")


def test_sighup_with_a_bad_config_keeps_running(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    before = pool.connections()
    pool.config.write_text(pool.config.read_text().replace("[pool]\n",
                                                           "[pool]\nprechannels = lots\n"))
    pool.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in pool.logs(), 5, "the reload to be refused")
    assert "'lots'" in pool.logs()
    assert [r["pid"] for r in pool.connections()] == [r["pid"] for r in before]


def test_master_kill_9_leaves_no_orphans(pools: PoolMaker, vhost: str) -> None:
    pool = pools([DEFAULT_URI, vhost]).start()
    pool.wait_ready()
    wait_for(lambda: len(pool.group()) == 4, 5, "master, registry and two workers")
    pool.signal(signal.SIGKILL)
    pool.wait_exit(5)
    wait_for(lambda: not pool.group(), 5, "every child to exit after the master's death")


def test_registry_kill_9_rebuilds_the_tables(pools: PoolMaker, vhost: str) -> None:
    pool = pools([DEFAULT_URI, vhost]).start()
    pool.wait_ready()
    before = pool.wait_rows(lambda rs: all(r["prechannels"] == 10 for r in rs), 10, "ready rows")
    registry = next(p for p, t in titles(pool).items() if t == "kzpool: registry")
    psutil.Process(registry).send_signal(signal.SIGKILL)
    wait_for(lambda: "starting a new one" in pool.logs(), 20, "the registry restart")
    rows = pool.wait_rows(lambda rs: len(rs) == 2 and all(r["prechannels"] == 10 for r in rs),
                          20, "tables rebuilt")
    assert [r["pid"] for r in rows] == [r["pid"] for r in before]
    assert registry not in titles(pool)


def test_worker_over_max_rss_is_replaced(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], worker_max_rss="1M", respawn_backoff_max=0.5).start()
    pool.wait_ready()
    wait_for(lambda: pool.logs().count("> worker_max_rss; replacing it") >= 2, 30,
             "the worker to be replaced twice")


def test_second_signal_stops_at_once(pools: PoolMaker) -> None:
    pool = pools([DEFAULT_URI], shutdown_timeout=30).start()
    pool.wait_ready()
    worker = pool.connections()[0]["pid"]
    psutil.Process(worker).send_signal(signal.SIGSTOP)  # a worker that will not stop by itself
    pool.signal(signal.SIGTERM)
    wait_for(lambda: "stopping (graceful)" in pool.logs(), 5, "the graceful stop to begin")
    pool.signal(signal.SIGINT)
    assert pool.wait_exit(5) == 0
    assert "killing 1 worker" in pool.logs()
    assert not pool.group()


FORK_THEN_TERM = """
import os, signal, time
from kzpool.common.wakeup import SignalPipe
from kzpool.master.system import HANDLED, OsSystem
SignalPipe(HANDLED).install()   # the master's recorder
pid = OsSystem().fork()
if pid == 0:
    time.sleep(30)   # a child that never gets as far as its own handlers
    os._exit(0)
os.kill(pid, signal.SIGTERM)   # at once: a worker replaced as it starts
_, status = os.waitpid(pid, 0)
print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)
"""


def test_a_signal_sent_as_a_child_is_forked_reaches_it_with_its_default_action() -> None:
    """The master's fork holds its signals until the child has put their defaults back:
    a SIGTERM sent right after the fork ends the child, instead of being recorded by the
    child's copy of the master's handler and lost (the worker never replaced)."""
    done = subprocess.run([sys.executable, "-c", FORK_THEN_TERM], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == "True"
