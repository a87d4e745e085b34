"""A real second broker node stopped and started under a running pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kzpool.testing import DEFAULT_URI, Pool

from .conftest import brokers

PoolMaker = Callable[..., Pool]


def test_stop_app_moves_the_primary_and_start_app_brings_it_back(
        pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([faulty_node.url, DEFAULT_URI], prechannels=3, reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    rows = pool.wait_rows(lambda rs: all(r["prechannels"] == 3 for r in rs), 10, "prechannels")
    assert [r["primary"] for r in rows] == [True, False]
    worker = rows[0]["pid"]

    brokers.stop_app(faulty_node.name)
    rows = pool.wait_rows(lambda rs: not rs[0]["available"] and rs[1]["primary"], 10,
                          "the primary to move to the second broker")
    assert rows[0]["error"] and rows[0]["prechannels"] == 0
    assert rows[0]["pid"] == worker  # the worker reconnects; it is not restarted

    brokers.start_app(faulty_node.name)
    rows = pool.wait_rows(lambda rs: rs[0]["available"] and rs[0]["primary"]
                          and rs[0]["prechannels"] == 3, 15, "the first broker to return")
    assert rows[0]["error"] is None and not rows[1]["primary"]
    assert rows[0]["pid"] == worker


def test_killed_node_is_reconnected_after_restart(pools: PoolMaker, faulty_node: Any) -> None:
    pool = pools([DEFAULT_URI, faulty_node.url], reconnect_backoff_max=0.5).start()
    pool.wait_ready()
    pool.wait_rows(lambda rs: rs[1]["available"], 10, "the second broker")
    brokers.kill_node(faulty_node.name)
    rows = pool.wait_rows(lambda rs: not rs[1]["available"], 15, "the killed node to be seen")
    assert rows[0]["primary"] and rows[0]["available"]
    brokers.start_node(faulty_node.name, faulty_node.port)
    pool.wait_rows(lambda rs: rs[1]["available"], 30, "the restarted node")
