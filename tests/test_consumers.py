"""In-service consumers: [consumer:NAME] sections run by the pool in their own processes."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

import kzpool
from kzpool.testing import (
    DEFAULT_MASKED,
    DEFAULT_URI,
    Pool,
    consumer_count,
    gone,
    queue_depth,
    titles,
    wait_for,
)

PoolMaker = Callable[..., Pool]


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:8]
    found = {"queue": f"kzt-c-{tag}", "exchange": f"kzt-x-{tag}"}
    yield found
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        channel.queue_delete(found["queue"])
        channel.exchange_delete(found["exchange"])


def consumer_pool(pools: PoolMaker, tmp_path: Path, names: dict[str, str], handler: str,
                  uris: list[str] | dict[str, list[str]] | None = None,
                  pool_settings: dict[str, object] | None = None,
                  **options: object) -> tuple[Pool, Path]:
    """A pool running one [consumer:billing] section with ``handler`` of tests.handlers."""
    pool = pools(uris or [DEFAULT_URI], shutdown_timeout=options.pop("shutdown_timeout", 5),
                 **(pool_settings or {}))
    lines = ["[consumer:billing]", f"handler = tests.handlers:{handler}",
             f"queue = {names['queue']}", f"exchange = {names['exchange']}",
             "bindings = billing.*, audit.#"]
    lines += [f"{k} = {v}" for k, v in options.items()]
    pool.config.write_text(pool.config.read_text() + "\n".join(lines) + "\n")
    trace = tmp_path / "trace.txt"
    trace.touch()
    root = Path(__file__).resolve().parent.parent
    pool.start(env={"KZT_TRACE": str(trace), "PYTHONPATH": str(root)})
    pool.wait_ready()
    if handler != "not_callable":  # the others consume: wait until they do, or what is
        wait_for(lambda: consumer_count(names["queue"]), 15, "the consumer")  # published is lost
    return pool, trace


def publish(names: dict[str, str], keys: list[str]) -> None:
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        channel = conn.channel()
        channel.exchange_declare(names["exchange"], "topic")
        for i, key in enumerate(keys):
            channel.basic_publish(names["exchange"], key, b"%d" % i)


def traced(trace: Path) -> list[list[str]]:
    return [line.split(" ") for line in trace.read_text().splitlines()]


def consumers(pool: Pool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pool.status()["consumers"]
    return rows


def test_consumers_run_in_their_own_processes(pools: PoolMaker, tmp_path: Path,
                                              names: dict[str, str]) -> None:
    pool, trace = consumer_pool(pools, tmp_path, names, "record", processes=2)
    rows = wait_for(lambda: [r for r in consumers(pool) if r["state"] == "running"
                             and r["pid"]] if len(consumers(pool)) == 2 else None, 10,
                    "two consumer processes")
    wait_for(lambda: {"kzpool: consumer billing #1", "kzpool: consumer billing #2"}
             <= set(titles(pool).values()), 10, "consumer titles")
    publish(names, ["billing.new"] * 10 + ["audit.x.y"] * 10 + ["other.key"] * 5)
    done = wait_for(lambda: len(traced(trace)) == 20 and traced(trace), 15, "20 messages handled")
    assert sorted(int(body) for _pid, _key, body in done) == list(range(20))
    assert {int(pid) for pid, _k, _b in done} <= {r["pid"] for r in rows}
    wait_for(lambda: queue_depth(names["queue"]) == 0, 5, "every message acked")


@pytest.mark.parametrize("requeue", [False, True])
def test_a_failing_handler_drops_or_requeues(pools: PoolMaker, tmp_path: Path,
                                             names: dict[str, str], requeue: bool) -> None:
    pool, trace = consumer_pool(pools, tmp_path, names, "fail", requeue_on_error=str(requeue))
    publish(names, ["billing.a"])
    wait_for(lambda: "RuntimeError: cannot handle b'0'" in pool.logs(), 10, "the failure logged")
    if requeue:
        wait_for(lambda: len(traced(trace)) >= 2, 10, "the message handled again")
        assert {body for _pid, _kind, body in traced(trace)} == {"0"}
        return
    pool.stop(10)  # a message still unsettled goes back to the queue as the channel closes
    assert queue_depth(names["queue"]) == 0
    assert [body for _pid, _kind, body in traced(trace)] == ["0"]


def test_a_handler_that_cannot_load_is_not_restarted(pools: PoolMaker, tmp_path: Path,
                                                     names: dict[str, str]) -> None:
    pool, _trace = consumer_pool(pools, tmp_path, names, "not_callable")
    rows = wait_for(lambda: [r for r in consumers(pool) if r["state"] == "failed"], 10,
                    "the consumer to fail")
    assert rows[0]["error"] == "cannot load tests.handlers:not_callable"
    assert pool.logs().count("could not load its handler or declare its queue") == 1
    assert pool.status()["pool"]["state"] == "running"


def test_killed_and_recycled_consumers_come_back(pools: PoolMaker, tmp_path: Path,
                                                 names: dict[str, str]) -> None:
    pool, trace = consumer_pool(pools, tmp_path, names, "Billing", max_messages=5)
    first = wait_for(lambda: consumers(pool)[0]["pid"], 10, "the consumer")
    os.kill(int(first), signal.SIGKILL)
    second = wait_for(lambda: consumers(pool)[0]["pid"] not in (None, first) and
                      consumers(pool)[0]["pid"], 10, "a new consumer")
    publish(names, ["billing.x"] * 12)
    done = wait_for(lambda: len(traced(trace)) >= 12 and traced(trace), 20, "12 handled")
    pids = {pid for pid, _kind, _body in done}
    assert len(pids) >= 3 and str(second) in pids  # recycled after every 5 messages
    assert consumers(pool)[0]["restarts"] >= 3
    assert "recycled" in pool.logs()


def test_stop_is_bounded_with_a_stuck_handler(pools: PoolMaker, tmp_path: Path,
                                              names: dict[str, str]) -> None:
    pool, trace = consumer_pool(pools, tmp_path, names, "stuck", shutdown_timeout=3,
                                prefetch=1)
    publish(names, ["billing.forever", "billing.later"])
    wait_for(lambda: traced(trace), 10, "the handler to be stuck")
    consumer = int(consumers(pool)[0]["pid"])
    elapsed = pool.stop(3 + 1 + 2)  # shutdown_timeout + 1 s, and a margin for a loaded machine
    assert elapsed < 3 + 1 + 2, elapsed
    assert gone(consumer)
    wait_for(lambda: queue_depth(names["queue"]) == 2, 5, "the stuck message back on its queue")


def test_sighup_applies_changed_consumer_sections(pools: PoolMaker, tmp_path: Path,
                                                 names: dict[str, str]) -> None:
    pool, trace = consumer_pool(pools, tmp_path, names, "record")
    first = wait_for(lambda: consumers(pool)[0]["pid"], 10, "the consumer")
    base = pool.config.read_text()
    audit = f"[consumer:audit]\nhandler = tests.handlers:record\nqueue = {names['queue']}-a\n"
    pool.config.write_text(base.replace("handler = tests.handlers:record",
                                        "handler = tests.handlers:record\nprocesses = 2")
                           + audit)
    pool.signal(signal.SIGHUP)
    rows = wait_for(lambda: [r for r in consumers(pool) if r["state"] == "running" and r["pid"]
                             and r["pid"] != first] if len(consumers(pool)) == 3 else None,
                    15, "billing with 2 new processes, and audit")
    assert sorted((r["name"], r["index"]) for r in rows) == [
        ("audit", 1), ("billing", 1), ("billing", 2)]
    wait_for(lambda: gone(int(first)), 10, "the old billing process to stop")
    publish(names, ["billing.after"])
    done = wait_for(lambda: traced(trace), 10, "a message handled after the reload")
    assert int(done[0][0]) in {r["pid"] for r in rows if r["name"] == "billing"}

    audit_pid = next(r["pid"] for r in rows if r["name"] == "audit")
    billing = sorted(r["pid"] for r in rows if r["name"] == "billing")
    pool.config.write_text(pool.config.read_text().replace(audit, ""))  # only audit goes
    pool.signal(signal.SIGHUP)
    wait_for(lambda: [r["name"] for r in consumers(pool)] == ["billing"] * 2, 10,
             "audit removed")
    wait_for(lambda: gone(int(audit_pid)), 10, "the audit process to stop")
    assert sorted(r["pid"] for r in consumers(pool)) == billing  # unchanged: left alone
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().queue_delete(f"{names['queue']}-a")


def test_consumers_get_their_lease_through_a_socket_pair(pools: PoolMaker, tmp_path: Path,
                                                        names: dict[str, str]) -> None:
    """The master asks for each consumer's lease itself: the consumer needs no access to the
    lease socket (here it admits only nobody, and the pool and its consumers run as us)."""
    pool = pools([DEFAULT_URI], allow_users="nobody", allow_groups="nogroup")
    pool.config.write_text(pool.config.read_text() + "[consumer:billing]\n"
                           f"handler = tests.handlers:record\nqueue = {names['queue']}\n")
    trace = tmp_path / "trace.txt"
    trace.touch()
    pool.start(env={"KZT_TRACE": str(trace), "PYTHONPATH": str(Path(__file__).parent.parent)})
    wait_for(lambda: consumer_count(names["queue"]), 20, "the consumer consuming")
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().basic_publish("", names["queue"], b"through the pair")
    done = wait_for(lambda: traced(trace), 10, "the message handled")
    assert done[0][1:] == [names["queue"], "through", "the", "pair"]
    with pytest.raises(kzpool.PoolAccessDenied):
        kzpool.connect(pool.socket)  # we, like the consumer, may not use the socket


def test_a_listener_in_any_process(pools: PoolMaker, names: dict[str, str]) -> None:
    pool = pools([DEFAULT_URI]).start()
    pool.wait_ready()
    seen: list[tuple[str, bytes]] = []
    listener = kzpool.Listener(queue=names["queue"], exchange=names["exchange"],
                               bindings=["billing.*", "audit.#"])

    @listener.responder("billing.*")
    def billing(message: kzpool.Message) -> None:
        seen.append(("billing", message.body))

    @listener.responder("audit.#")
    def audit(message: kzpool.Message) -> None:
        assert message.broker == DEFAULT_MASKED
        seen.append(("audit", message.body))
        raise RuntimeError("audit handler fails: the message is dropped, not requeued")

    listener.start(kzpool.connect(pool.socket))
    publish(names, ["billing.a", "audit.x.y", "other", "billing.b"])
    assert listener.run(kzpool.connect(pool.socket), max_messages=3) == 3
    listener.close()
    assert seen == [("billing", b"0"), ("audit", b"1"), ("billing", b"3")]
    assert queue_depth(names["queue"]) == 0
