"""Fixtures: real pools, a real extra RabbitMQ node shared by the xdist workers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from filelock import FileLock

import kzpool
from kzpool.testing import Pool

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("KZPOOL_BROKERS_DIR", "/tmp/kzpool-brokers"))
EXTRA_NODE = ("kzp1@localhost", 5701)
TLS_NODE = ("kztls1@localhost", 5741, 5742)  # name, AMQP port, TLS port: this suite's own
CLUSTER = [("kzcl1@localhost", 5751), ("kzcl2@localhost", 5752), ("kzcl3@localhost", 5753)]
T = TypeVar("T")


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


@contextlib.contextmanager
def shared(name: str, start: Callable[[], T], stop: Callable[[T], None]) -> Iterator[T]:
    """Something the test runs on this machine share (a broker node): the first user starts
    it, the last one stops it, under a file lock named ``name``."""
    STATE.mkdir(parents=True, exist_ok=True)
    users = STATE / f"{name}.users"
    with FileLock(str(STATE / f"{name}.lock")):
        thing = start()
        count = json.loads(users.read_text()) if users.exists() else 0
        users.write_text(json.dumps(count + 1))
    try:
        yield thing
    finally:
        with FileLock(str(STATE / f"{name}.lock")):
            count = json.loads(users.read_text()) - 1
            users.write_text(json.dumps(count))
            if count <= 0:
                stop(thing)
                users.unlink()


@pytest.fixture(scope="session", autouse=True)
def leftovers() -> Iterator[None]:
    """Queues a test left on the default broker (a failed test, a queue declared
    ``auto_delete`` but never consumed) are deleted when the last test run of this machine
    ends: every idle queue named ``kzt-...``."""
    with shared("leftovers", lambda: None, lambda _: _delete_idle_test_queues()):
        yield


def _delete_idle_test_queues() -> None:
    import subprocess

    import pika

    listed = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "consumers"],
                            capture_output=True, text=True, timeout=60)
    idle = [line.split("\t")[0] for line in listed.stdout.splitlines()[1:]
            if line.startswith("kzt-") and line.rstrip().endswith("\t0")]
    if not idle:
        return
    with pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F")
                                 ) as conn:
        channel = conn.channel()
        for name in idle:
            channel.queue_delete(name)


@pytest.fixture(scope="session")
def extra_node() -> Iterator[Any]:
    """The extra node kzp1 on 5701, started once and stopped by the last xdist worker."""
    with shared("kzp1", lambda: brokers.start_node(*EXTRA_NODE), brokers.stop_node) as node:
        yield node


@pytest.fixture(scope="session")
def tls_node() -> Iterator[Any]:
    """A node with a TLS listener that wants a client certificate (``fail_if_no_peer_cert``),
    and the CA, server and client certificates made for it: ``(node, certs)``.  Shared by the
    xdist workers like kzp1; its certificates live beside it, made by the first user."""
    certs = brokers.Certs(STATE / "kztls1.certs")

    def start() -> Any:
        if not certs.client_key.exists():
            brokers.stop_node(TLS_NODE[0])  # one left running trusts certificates now gone
            brokers.make_certs(certs.dir)
        return brokers.start_node(*TLS_NODE[:2], tls_port=TLS_NODE[2], certs=certs)

    def stop(node: Any) -> None:
        brokers.stop_node(node)
        shutil.rmtree(certs.dir, ignore_errors=True)

    with shared("kztls1", start, stop) as node:
        yield node, certs


@pytest.fixture
def connection(pool: Pool) -> Iterator[kzpool.Connection]:
    """``kzpool.connect()`` to the test module's own ``pool`` fixture; closed after."""
    conn = kzpool.connect(pool.socket)
    yield conn
    if conn.is_open:
        conn.close()


@pytest.fixture(scope="session")
def cluster() -> Iterator[list[Any]]:
    """Three nodes joined in one cluster, shared by the xdist workers."""
    with shared("kzcl", lambda: brokers.start_cluster(CLUSTER), brokers.stop_cluster) as nodes:
        yield nodes


@pytest.fixture
def faulty_cluster(cluster: list[Any]) -> Iterator[list[Any]]:
    """The cluster, held exclusively: this test may stop its nodes' apps (started again
    after)."""
    with FileLock(str(STATE / "kzcl.fault.lock")):
        yield cluster
        for node in cluster:
            if not brokers.port_open(node.port):
                brokers.start_app(node.name)


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
