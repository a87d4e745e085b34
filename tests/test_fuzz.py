"""Fuzzing the parsers that face the outside: frames from clients, config files, URIs.

Bounded (a few hundred examples each, no deadline) so CI stays fast.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kzpool.common import config
from kzpool.common import wire as protocol
from kzpool.common.errors import BrokerURIError, ConfigError, ProtocolError
from kzpool.common.uri import BrokerURI

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
