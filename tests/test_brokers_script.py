"""What scripts/brokers.py tells of a node for bench/scale.py: the connections and channels
open on it, the memory its client connections take (``memory_breakdown``), and that it
never garbage-collects the default node, which serves other tests."""

from __future__ import annotations

import contextlib
from urllib.parse import unquote

import pika
import pytest

from kzpool.testing import LAYOUT

from .conftest import brokers

DEFAULT = None if LAYOUT.default_is_machines else LAYOUT.default[0]


def test_counts_name_the_connections_and_channels_open_on_a_vhost(vhost: str) -> None:
    name = unquote(vhost.rpartition("/")[2])
    assert brokers.client_counts(DEFAULT, vhost=name) == (0, 0)
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            conn = stack.enter_context(pika.BlockingConnection(pika.URLParameters(vhost)))
            conn.channel()
            conn.channel()
        assert brokers.client_counts(DEFAULT, vhost=name) == (3, 6)


def test_memory_breakdown_shows_what_client_connections_take(vhost: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(vhost)) as conn:
        conn.channel()
        memory = brokers.memory_breakdown(DEFAULT)
    assert set(brokers.CLIENT_MEMORY) <= set(memory)
    assert memory["connection_readers"] > 0  # this test's connection's, at least
    assert memory["connection_channels"] > 0


def test_the_default_node_is_never_garbage_collected() -> None:
    with pytest.raises(ValueError, match="default node"):
        brokers.collect_garbage(brokers.DEFAULT_NODE)
