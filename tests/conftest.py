"""Fixtures: real pools, real extra RabbitMQ nodes shared by the xdist workers, and the
``broker`` marker.

``KZPOOL_TEST_RABBITMQ=4`` runs the suite against RabbitMQ 4.x (kzpool/testing/nodes.py
says which nodes): the default broker is then a 4.x node of its own, started by the first
test (of any xdist worker) that needs a broker and stopped by the last, like the extra
nodes.  Every test outside ``BROKER_FREE``'s modules is marked ``broker``; ``-m "not
broker"`` runs the others, which need no broker at all.
"""

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

import pika
import pika.exceptions
import pytest
from filelock import FileLock

import kzpool
from kzpool.testing import DEFAULT_URI, LAYOUT, Pool, default_uri

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("KZPOOL_BROKERS_DIR", "/tmp/kzpool-brokers"))
RABBITMQ = LAYOUT.rabbitmq  # 3: the machine's RabbitMQ; 4: the 4.x chroot's
DEFAULT_NODE = LAYOUT.default  # name, port; the machine's own node unless RABBITMQ is 4
EXTRA_NODE = LAYOUT.extra
TLS_NODE = LAYOUT.tls  # name, AMQP port, TLS port: this suite's own
CLUSTER = list(LAYOUT.cluster)
TIMEOUT_NODE = LAYOUT.timeouts  # consumer_timeout 5 s (and 4.x's deprecated features denied)
T = TypeVar("T")

# Modules whose tests need no broker and no pool (fakes, pure logic): every other test is
# marked ``broker``.
BROKER_FREE = frozenset({
    "test_aio_link", "test_amqp_frames", "test_config", "test_layout", "test_lease_link",
    "test_holding", "test_master_decisions", "test_prechannels", "test_turns", "test_units",
})


def short(name: str) -> str:
    """kzp1@localhost -> kzp1: the name of its lock and user count under STATE."""
    return name.partition("@")[0]


CLUSTER_NAME = short(CLUSTER[0][0]).rstrip("0123456789")  # kzcl, kz4cl


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "broker: needs a real RabbitMQ node or a real pool (set by conftest on every "
                   "test outside its BROKER_FREE modules); -m 'not broker' runs without a broker")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem not in BROKER_FREE:
            item.add_marker(pytest.mark.broker)


_held = contextlib.ExitStack()  # what this process holds for its broker tests, till it ends
_held_state: dict[str, str] = {}  # "held": the default broker is held; "failed": why not


def pytest_collection_finish(session: pytest.Session) -> None:
    """RabbitMQ 4's chroot, built once per machine (minutes) if a selected test needs a
    broker: here, not in a test, whose timeout would cut the build short."""
    if RABBITMQ == brokers.RMQ4 and any(i.get_closest_marker("broker") for i in session.items):
        try:
            brokers.ensure_rmq4()
        except (RuntimeError, OSError) as e:
            _held_state["failed"] = f"no RabbitMQ 4 to run the broker tests on: {e}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a broker test's first fixture (a module's own pool too): the default broker
    (a 4.x node, started by the first user of all the xdist workers) and the clean-up of the
    queues tests leave on it, held till this process ends."""
    if item.get_closest_marker("broker") is None or "held" in _held_state:
        return
    if "failed" in _held_state:
        pytest.fail(_held_state["failed"], pytrace=False)
    try:
        if not LAYOUT.default_is_machines:
            _held.enter_context(shared(short(DEFAULT_NODE[0]), _start_default, brokers.stop_node))
        leftovers = ("leftovers" if LAYOUT.default_is_machines
                     else f"{short(DEFAULT_NODE[0])}.leftovers")
        _held.enter_context(shared(leftovers, lambda: None, lambda _: _delete_idle_test_queues()))
    except Exception as e:
        _held_state["failed"] = f"the default broker {DEFAULT_NODE[0]} is not available: {e}"
        raise
    _held_state["held"] = "yes"


def pytest_sessionfinish() -> None:
    _held.close()


def _start_default() -> Any:
    return brokers.start_node(*DEFAULT_NODE, rabbitmq=RABBITMQ)


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


def _delete_idle_test_queues() -> None:
    """Queues a test left on the default broker (a failed test, a queue declared
    ``auto_delete`` but never consumed) are deleted when the last test run of this machine
    ends: every idle queue named ``kzt-...``."""
    import pika

    listed = default_ctl("list_queues", "name", "consumers", "--formatter", "json", check=False)
    try:
        rows = json.loads(listed.stdout) if listed.returncode == 0 else []
    except ValueError:
        rows = []
    idle = [row["name"] for row in rows
            if str(row.get("name", "")).startswith("kzt-") and row.get("consumers") == 0]
    if not idle:
        return
    with pika.BlockingConnection(pika.URLParameters(default_uri())) as conn:
        channel = conn.channel()
        for name in idle:
            channel.queue_delete(name)


@pytest.fixture(scope="session")
def extra_node() -> Iterator[Any]:
    """The extra node (kzp1 on 5701; kz4p1 on 5721 for RabbitMQ 4), started once and stopped
    by the last xdist worker."""
    with shared(short(EXTRA_NODE[0]), _start_extra, brokers.stop_node) as node:
        yield node


def _start_extra() -> Any:
    return brokers.start_node(*EXTRA_NODE, rabbitmq=RABBITMQ)


@pytest.fixture(scope="session")
def tls_node() -> Iterator[Any]:
    """A node with a TLS listener that wants a client certificate (``fail_if_no_peer_cert``),
    and the CA, server and client certificates made for it: ``(node, certs)``.  Shared by the
    xdist workers like kzp1; its certificates live beside it, made by the first user."""
    certs = brokers.Certs(STATE / f"{short(TLS_NODE[0])}.certs")

    def start() -> Any:
        if not certs.client_key.exists():
            brokers.stop_node(TLS_NODE[0])  # one left running trusts certificates now gone
            brokers.make_certs(certs.dir)
        return brokers.start_node(*TLS_NODE[:2], tls_port=TLS_NODE[2], certs=certs,
                                  rabbitmq=RABBITMQ)

    def stop(node: Any) -> None:
        brokers.stop_node(node)
        shutil.rmtree(certs.dir, ignore_errors=True)

    with shared(short(TLS_NODE[0]), start, stop) as node:
        yield node, certs


@pytest.fixture(scope="session")
def timeout_node() -> Iterator[Any]:
    """A node whose ``consumer_timeout`` is 5 s (kzct on 5733; kz4ct on 5731 for RabbitMQ
    4, which also denies what 4.x deprecates: global QoS, transient non-exclusive queues),
    shared by the xdist workers like kzp1.  RabbitMQ 3.x checks the timeout once a channel
    tick, a minute by default: once a second here."""
    with shared(short(TIMEOUT_NODE[0]), _start_timeouts, brokers.stop_node) as node:
        yield node


def _start_timeouts() -> Any:
    denied = brokers.DENY_DEPRECATED if RABBITMQ == brokers.RMQ4 else ()
    node = brokers.start_node(*TIMEOUT_NODE, rabbitmq=RABBITMQ,
                              conf=["consumer_timeout = 5000", *denied])
    if RABBITMQ != brokers.RMQ4:  # read by each channel as it opens
        brokers._ctl(node.name, "-q", "eval",
                     "application:set_env(rabbit, channel_tick_interval, 1000).")
    return node


@pytest.fixture
def pool(pools: Callable[..., Pool]) -> Pool:
    """A started pool on the default broker, 2 prechannels (a module may have its own)."""
    started = pools([DEFAULT_URI], prechannels=2).start()
    started.wait_ready()
    return started


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
    with shared(CLUSTER_NAME, lambda: brokers.start_cluster(CLUSTER, rabbitmq=RABBITMQ),
                brokers.stop_cluster) as nodes:
        yield nodes


@pytest.fixture
def faulty_cluster(cluster: list[Any]) -> Iterator[list[Any]]:
    """The cluster, held exclusively: this test may stop its nodes' apps (started again
    after)."""
    with FileLock(str(STATE / f"{CLUSTER_NAME}.fault.lock")):
        yield cluster
        for node in cluster:
            if not brokers.port_open(node.port):
                brokers.start_app(node.name)


@pytest.fixture
def faulty_node(extra_node: Any) -> Iterator[Any]:
    """The extra node, held exclusively: this test may stop, kill or silence it."""
    with FileLock(str(STATE / f"{short(EXTRA_NODE[0])}.fault.lock")):
        _start_extra()  # a test before may have killed it
        yield extra_node
        _start_extra()


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost on the default broker: a second, independent 'broker' URI for free."""
    name = f"kzt-{uuid.uuid4().hex[:8]}"
    brokers_run(["add_vhost", name])
    brokers_run(["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
    yield default_uri(name)
    brokers_run(["delete_vhost", name])


def default_ctl(*args: str, check: bool = True) -> Any:
    """rabbitmqctl ARGS against the default broker, by the install that runs it (the
    machine's, or the 4.x chroot's); its CompletedProcess."""
    name = None if LAYOUT.default_is_machines else DEFAULT_NODE[0]
    return brokers._ctl(name, "-q", *args, check=check)


def brokers_run(args: list[str]) -> None:
    """rabbitmqctl ARGS against the default broker; fails the test if it fails."""
    default_ctl(*args)


Names = Callable[[str], str]


@pytest.fixture
def names() -> Iterator[Names]:
    """``names("q")``: a name of this test's own; the queues and exchanges named so are
    deleted afterwards."""
    made: list[str] = []
    prefix = f"kzt-{uuid.uuid4().hex[:8]}"

    def name(what: str) -> str:
        made.append(f"{prefix}-{what}")
        return made[-1]

    yield name
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        for made_name in made:
            for delete in ("queue_delete", "exchange_delete"):
                # one exclusive to a connection still open goes with it
                with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                    getattr(conn.channel(), delete)(made_name)


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue name of this test's own; the queue is deleted afterwards."""
    name = f"kzt-{uuid.uuid4().hex[:10]}"
    yield name
    with pika.BlockingConnection(pika.URLParameters(DEFAULT_URI)) as conn:
        conn.channel().queue_delete(name)
