"""Fixtures: real pools, a real extra RabbitMQ node shared by the xdist workers."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from filelock import FileLock

from kzpool.testing import Pool

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("KZPOOL_BROKERS_DIR", "/tmp/kzpool-brokers"))
EXTRA_NODE = ("kzp1@localhost", 5701)


def _load_brokers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kzpool_test_brokers",
                                                  ROOT / "scripts" / "brokers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


brokers = _load_brokers()


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    """``pools(uris, **pool_settings)`` makes a Pool in its own directory; all are killed after."""
    made: list[Pool] = []

    def make(uris: Any, **settings: Any) -> Pool:
        directory = tmp_path / f"pool{len(made)}"
        directory.mkdir()
        pool = Pool(directory, uris, **settings)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()
        print(f"--- log of the pool at {pool.socket}:\n{pool.logs()}")  # shown on failure


@pytest.fixture(scope="session")
def extra_node() -> Iterator[Any]:
    """The extra node kzp1 on 5701, started once and stopped by the last xdist worker."""
    STATE.mkdir(parents=True, exist_ok=True)
    users = STATE / "kzp1.users"
    with FileLock(str(STATE / "kzp1.lock")):
        node = brokers.start_node(*EXTRA_NODE)
        count = json.loads(users.read_text()) if users.exists() else 0
        users.write_text(json.dumps(count + 1))
    yield node
    with FileLock(str(STATE / "kzp1.lock")):
        count = json.loads(users.read_text()) - 1
        users.write_text(json.dumps(count))
        if count <= 0:
            brokers.stop_node(node)
            users.unlink()


@pytest.fixture
def faulty_node(extra_node: Any) -> Iterator[Any]:
    """The extra node, held exclusively: this test may stop, kill or silence it."""
    with FileLock(str(STATE / "kzp1.fault.lock")):
        brokers.start_node(*EXTRA_NODE)  # a test before may have killed it
        yield extra_node
        brokers.start_node(*EXTRA_NODE)


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost on the default broker: a second, independent 'broker' URI for free."""
    name = f"kzt-{uuid.uuid4().hex[:8]}"
    brokers_run(["add_vhost", name])
    brokers_run(["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
    yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    brokers_run(["delete_vhost", name])


def brokers_run(args: list[str]) -> None:
    import subprocess

    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)
