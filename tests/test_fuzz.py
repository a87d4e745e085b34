"""Fuzzing the parsers that face the outside: frames from clients (the pool's socket, a
worker's, a bound lease's: parsed here, and sent to a real pool), config files, URIs.

Bounded (a few hundred examples each, no deadline) so CI stays fast.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

import kzpool
from kzpool.common import config, messages
from kzpool.common import wire as protocol
from kzpool.common.errors import BrokerURIError, ConfigError, KzpoolError, ProtocolError
from kzpool.common.uri import BrokerURI
from kzpool.master import control
from kzpool.testing import DEFAULT_URI, Pool
from kzpool.worker import intake

from . import hostile

FUZZ = settings(max_examples=300, deadline=None)
names = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)


@FUZZ
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_any_bytes_are_frames_or_a_protocol_error(data: bytes, chunk: int) -> None:
    reader = protocol.FrameReader(max_frame=1 << 16)
    try:
        for i in range(0, len(data), chunk):
            for kind, _flags, payload in reader.feed(data[i:i + chunk]):
                if kind == protocol.Kind.JSON:
                    protocol.read_document(payload)
                elif kind == protocol.Kind.PUBLISH:
                    protocol.read_publish_head(payload)
                    protocol.read_publish(payload)
                elif kind == protocol.Kind.DELIVER:
                    protocol.read_deliver(payload)
                elif kind == protocol.Kind.RETURN:
                    protocol.read_return(payload)
                else:
                    protocol.read_tag(payload)
    except ProtocolError:
        pass


@FUZZ
@given(names, names, st.binary(max_size=64), st.binary(max_size=300), st.booleans(),
       st.integers(min_value=1, max_value=97))
def test_publish_frames_survive_any_split(exchange: str, routing_key: str, props: bytes,
                                          body: bytes, mandatory: bool, chunk: int) -> None:
    data = protocol.publish(exchange, routing_key, props, body, mandatory) * 2
    reader = protocol.FrameReader()
    frames = [f for i in range(0, len(data), chunk) for f in reader.feed(data[i:i + chunk])]
    assert len(frames) == 2
    for _kind, flags, payload in frames:
        assert protocol.read_publish(payload) == (exchange, routing_key, props, body)
        names, properties, start = protocol.read_publish_head(payload)
        assert (names, properties, payload[start:]) == (
            protocol.names(exchange, routing_key), props, body)
        assert bool(flags & protocol.Flag.MANDATORY) == mandatory


lines = st.lists(st.one_of(
    st.sampled_from(["[pool]", "[amqp]", "[zone:a]", "[zone]", "[consumer:x]", "[", "]", ""]),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(
        ["uri", "amqp_uri", "name", "zone", "prechannels", "heartbeat", "socket",
         "worker_max_rss", "allow_users", "bogus"]), st.text(max_size=30)),
    st.text(max_size=30)), max_size=12)


@FUZZ
@given(lines)
def test_any_config_text_loads_or_names_its_faults(text_lines: list[str]) -> None:
    try:
        loaded = config.loads("\n".join(text_lines), "fuzz.ini", environ={})
    except ConfigError as exc:
        assert exc.problems and all(p.startswith("fuzz.ini") or p.startswith("environment")
                                    or p.startswith("option") or "default" in p
                                    for p in exc.problems)
    else:
        assert loaded.brokers


@FUZZ
@given(st.text(max_size=80))
def test_any_uri_text_parses_or_is_a_uri_error(text: str) -> None:
    try:
        uri = BrokerURI.parse(text)
    except BrokerURIError as exc:
        assert "bad broker URI" in str(exc)
    else:
        assert uri.scheme in ("amqp", "amqps") and 0 < uri.port < 65536
        host_part = uri.short[len(uri.scheme) + 3:]
        assert uri.masked.endswith(f":***@{host_part}")  # the password never shows


# ----- the parsers of the pool's socket and a worker's, and of a bound lease ---------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                | st.text(max_size=20))
json_values = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)
OPS = sorted({*messages.TO_MASTER_FROM_CLIENT, *messages.TO_SESSION, "report", "adopt", "x"})
FIELDS = ["options", "lease", "wait", "id", "method", "args", "class"]
OPTIONS = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["float", "sticky", "x" * 300]) | json_values,
    "zone": st.text(max_size=8) | st.just("z" * 300) | json_values,
    "broker": st.sampled_from(["amqp://h/", "amqp://h/?heartbeat=1", "http://h/", "x" * 3000])
    | json_values,
    "timeout": st.floats(allow_nan=True) | st.integers() | json_values,
    "federates": st.text(max_size=8) | json_values})
KNOWN = {"options": OPTIONS | json_values,
         "lease": st.text(max_size=80) | st.just("a" * 100_000),
         "wait": st.floats(allow_nan=True) | st.integers(),
         "id": st.integers(), "args": st.dictionaries(st.text(max_size=12), json_values)}


def _deep(depth: int) -> str:
    return '{"op": "lease", "options": {"kind": ' + "[" * depth + "]" * depth + "}}"


messages_like = st.builds(
    lambda op, fields, known: json.dumps({"op": op, **fields, **known}),
    st.sampled_from(OPS), st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
    st.fixed_dictionaries({}, optional=KNOWN))
payloads = (messages_like | st.integers(1, 3000).map(_deep)
            | st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
frames = st.builds(lambda kind, flags, payload: protocol.frame(kind, payload.encode(), flags),
                   st.sampled_from([1, 1, 1, 2, 6, 9]), st.integers(0, 255), payloads)
streams = st.lists(frames | st.binary(max_size=16), min_size=1, max_size=4).map(b"".join)


@FUZZ
@given(streams, st.integers(min_value=1, max_value=200))
def test_the_pool_socket_parses_any_stream_or_names_the_fault(data: bytes, chunk: int) -> None:
    reader = protocol.FrameReader(protocol.MAX_REQUEST, frozenset({protocol.Kind.JSON}))
    try:
        for i in range(0, len(data), chunk):
            for request in control.parse(reader, data[i:i + chunk]):
                assert type(request) in messages.TO_MASTER_FROM_CLIENT.values()
                if isinstance(request, messages.LeaseRequest):
                    assert len(request.lease or "") <= protocol.MAX_LEASE_ID
                    assert len(request.options.zone or "") <= protocol.MAX_NAME
    except KzpoolError as exc:  # malformed (ProtocolError), or options that do not check
        assert str(exc)


@FUZZ
@given(streams)
def test_a_worker_socket_parses_any_first_request_or_names_the_fault(data: bytes) -> None:
    reader = protocol.FrameReader(protocol.MAX_REQUEST, frozenset({protocol.Kind.JSON}))
    try:
        request = intake.first_request(list(reader.feed(data)))
    except KzpoolError as exc:
        assert str(exc)
    else:
        assert isinstance(request, messages.LeaseRequest)
        assert len(request.options.broker or "") <= protocol.MAX_URI


@FUZZ
@given(streams)
def test_a_bound_lease_parses_any_stream_or_names_the_fault(data: bytes) -> None:
    """What a session reads: frames, then the JSON messages in them (bounded all the way)."""
    reader = protocol.FrameReader(protocol.MAX_DATA_FRAME)
    try:
        for kind, _flags, payload in reader.feed(data):
            if kind == protocol.Kind.JSON:
                message = messages.decode(payload, messages.TO_SESSION)
                assert type(message) in messages.TO_SESSION.values()
            elif kind == protocol.Kind.PUBLISH:
                protocol.read_publish(payload)
            elif kind == protocol.Kind.SETTLE:
                protocol.read_tag(payload)
    except ProtocolError as exc:
        assert str(exc)


# ----- the same streams, sent to a real pool ---------------------------------------------------

TARGETS = ("pool", "worker", "lease")


def test_a_real_pool_survives_any_stream(pools: Callable[..., Pool]) -> None:
    """Streams of frames sent to the pool's socket, a worker's, and a bound lease's: whatever
    comes back, the master and the worker stay the same processes and a fresh client still
    gets a lease and publishes."""
    pool = pools([DEFAULT_URI], prechannels=2).start()
    pool.wait_ready()
    before = hostile.pids(pool)
    client = kzpool.connect(pool.socket)

    @settings(max_examples=60, deadline=None)
    @given(st.sampled_from(TARGETS), streams)
    def send_one(target: str, data: bytes) -> None:
        if target == "lease":
            with client.lease("float") as lease:
                lease._impl.send(data)
                lease._impl.drain()
            return
        path = pool.socket if target == "pool" else f"{pool.socket}.c1"
        with hostile.raw(path) as sock:
            hostile.send(sock, data)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):  # an answer, a refusal: then it hangs up
                    pass
    send_one()
    hostile.assert_whole(pool, before)
