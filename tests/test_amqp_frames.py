"""The worker's hand-made AMQP frames are byte for byte what pika makes (pure logic)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika import frame, spec

from kzpool.common import props, wire
from kzpool.common.errors import ProtocolError
from kzpool.worker import amqp
from kzpool.worker.fastpath import Inbound

PROPS = spec.BasicProperties(content_type="text/plain", delivery_mode=2, headers={"a": 1},
                             correlation_id="c1", reply_to="r")
FRAME_MAX = 131072


def pika_publish(channel: int, exchange: str, key: str, properties: spec.BasicProperties,
                 body: bytes, mandatory: bool) -> bytes:
    pieces = [frame.Method(channel, spec.Basic.Publish(exchange=exchange, routing_key=key,
                                                       mandatory=mandatory)).marshal(),
              frame.Header(channel, len(body), properties).marshal()]
    step = FRAME_MAX - 8
    pieces += [frame.Body(channel, body[i:i + step]).marshal() for i in range(0, len(body), step)]
    return b"".join(pieces)


@pytest.mark.parametrize("body", [b"", bytes(range(256)), bytes(3 * FRAME_MAX + 5)])
@pytest.mark.parametrize("properties", [PROPS, spec.BasicProperties()])
def test_publish_frames_are_pikas(body: bytes, properties: spec.BasicProperties) -> None:
    ours = amqp.publish(3, wire.names("ex", "rk"), props.encode(properties), body, True,
                        FRAME_MAX - 8)
    assert ours == pika_publish(3, "ex", "rk", properties, body, True)


def test_settles_are_pikas() -> None:
    assert amqp.settle(2, amqp.ACK, 77, True, False) == frame.Method(
        2, spec.Basic.Ack(77, True)).marshal()
    assert amqp.settle(2, amqp.NACK, 77, False, True) == frame.Method(
        2, spec.Basic.Nack(77, False, True)).marshal()
    assert amqp.settle(2, amqp.REJECT, 77, False, False) == frame.Method(
        2, spec.Basic.Reject(77, False)).marshal()
    with pytest.raises(ValueError, match="not a settle"):
        amqp.settle(2, amqp.PUBLISH, 1, False, False)


def test_a_no_wait_cancel_is_pikas() -> None:
    assert amqp.cancel(5, "ctag1.x") == frame.Method(
        5, spec.Basic.Cancel("ctag1.x", nowait=True)).marshal()


def test_deliveries_and_confirms_read_as_pika_wrote_them() -> None:
    method = frame.Method(5, spec.Basic.Deliver("ctag", 99, True, "ex", "rk")).marshal()
    assert amqp.method_id(method[7:-1]) == (amqp.BASIC, amqp.DELIVER)
    assert amqp.deliver(method[7:-1]) == ("ctag", 99, True, b"\x02ex\x02rk")
    header = frame.Header(5, 256, PROPS).marshal()
    assert amqp.header(header[7:-1]) == (256, props.encode(PROPS))
    assert amqp.header(frame.Header(5, 0, spec.BasicProperties()).marshal()[7:-1]) == (0, b"")
    ack = frame.Method(1, spec.Basic.Ack(12, True)).marshal()
    assert amqp.confirm(ack[7:-1]) == (12, True)
    nack = frame.Method(1, spec.Basic.Nack(13, False, True)).marshal()
    assert amqp.method_id(nack[7:-1]) == (amqp.BASIC, amqp.NACK)
    assert amqp.confirm(nack[7:-1]) == (13, False)


class _Sink:
    def __init__(self) -> None:
        self.got: list[tuple[object, ...]] = []

    def claims(self, consumer_tag: str) -> bool:
        return consumer_tag != "pikas"

    def deliver(self, *fields: object) -> None:
        self.got.append(fields)

    def confirm(self, tag: int, multiple: bool, nack: bool) -> None:
        self.got.append(("confirm", tag, multiple, nack))


def _delivery(channel: int, ctag: str, tag: int, body: bytes) -> bytes:
    step = FRAME_MAX - 8
    return b"".join([frame.Method(channel, spec.Basic.Deliver(ctag, tag, False, "", "q")).marshal(),
                     frame.Header(channel, len(body), PROPS).marshal()] + [
        frame.Body(channel, body[i:i + step]).marshal() for i in range(0, len(body), step)])


@pytest.mark.parametrize("chunk", [1, 7, 300, 1 << 20])
def test_deliveries_reach_their_sink_whole_however_the_bytes_come(chunk: int) -> None:
    data = b"".join([
        _delivery(1, "c", 1, b""), _delivery(1, "c", 2, b"small"),
        _delivery(1, "pikas", 3, b"not ours"),  # a consumer the session does not claim
        _delivery(1, "c", 4, bytes(2 * FRAME_MAX + 3)),  # several body frames
        frame.Method(1, spec.Basic.Ack(9, True)).marshal(),
        _delivery(2, "c", 1, b"no sink on channel 2"),
        frame.Method(1, spec.Basic.Qos(prefetch_count=1)).marshal(), _delivery(1, "c", 5, b"x")])
    to_pika: list[bytes] = []
    inbound, sink = Inbound(to_pika.append), _Sink()
    inbound.sinks[1] = sink
    buffer = b""
    for at in range(0, len(data), chunk):
        buffer += data[at:at + chunk]
        buffer = buffer[inbound.feed(buffer):]
    assert buffer == b""
    names, properties = wire.names("", "q"), props.encode(PROPS)
    assert sink.got == [("c", 1, False, names, properties, b""),
                        ("c", 2, False, names, properties, b"small"),
                        ("c", 4, False, names, properties, bytes(2 * FRAME_MAX + 3)),
                        ("confirm", 9, True, False), ("c", 5, False, names, properties, b"x")]
    assert b"".join(to_pika) == _delivery(1, "pikas", 3, b"not ours") + _delivery(
        2, "c", 1, b"no sink on channel 2") + frame.Method(
        1, spec.Basic.Qos(prefetch_count=1)).marshal()
    assert len(to_pika) == 7  # one whole frame at a time, as pika cuts them


def test_truncated_frames_are_value_errors() -> None:
    method = frame.Method(5, spec.Basic.Deliver("ctag", 99, True, "ex", "rk")).marshal()
    for cut in (5, 9, 20):
        with pytest.raises(ValueError):
            amqp.deliver(method[7:7 + cut])
    with pytest.raises(ValueError):
        amqp.header(b"\x00\x3c")


_short = st.text(max_size=40)
_octet = st.integers(0, 255)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "content_type": _short, "content_encoding": _short, "delivery_mode": _octet,
    "priority": _octet, "correlation_id": _short, "reply_to": _short, "expiration": _short,
    "message_id": _short, "timestamp": st.integers(0, 2**64 - 1), "type": _short,
    "user_id": _short, "app_id": _short, "cluster_id": _short,
    "headers": st.dictionaries(_short, st.one_of(_short, st.integers(-2**31, 2**31 - 1),
                                                 st.booleans(), st.none()), max_size=4)}))
def test_properties_decode_as_pikas_decoder_does(fields: dict[str, object]) -> None:
    encoded = props.encode(spec.BasicProperties(**fields))
    theirs = spec.BasicProperties()
    if encoded:
        theirs.decode(encoded)
    assert props.decode(encoded) == theirs
    assert repr(props.decode(encoded)) == repr(theirs)


def test_a_short_string_that_is_not_utf8_stays_bytes_as_in_pika() -> None:
    encoded = b"\x80\x00" + b"\x02\xff\xfe"  # content_type, two bytes that are not UTF-8
    theirs = spec.BasicProperties()
    theirs.decode(encoded)
    assert props.decode(encoded) == theirs and theirs.content_type == b"\xff\xfe"


@pytest.mark.parametrize("encoded", [b"\x80", b"\x80\x00\x05ab", b"\x20\x00\x00\x00\x00\x09",
                                     b"\x00\x40"])
def test_properties_that_do_not_parse_are_protocol_errors(encoded: bytes) -> None:
    with pytest.raises(ProtocolError, match="bad message properties"):
        props.decode(encoded)


@pytest.mark.parametrize("properties", [PROPS, spec.BasicProperties(timestamp=1, priority=3,
                                                                    cluster_id="c")])
def test_a_publishs_properties_as_pika_encodes_them_pass_the_check(
        properties: spec.BasicProperties) -> None:
    amqp.check_properties(props.encode(properties))


@pytest.mark.parametrize(("encoded", "fault"), [
    (b"\x00\x01", "unknown flags"),  # a continuation flag word
    (b"\x80\x00\x05ab", "bad message properties"),  # content_type runs past the end
    (props.encode(PROPS) + b"x", "length does not match"),  # a byte left over
    (b"\x20\x00\x00\x00\x00\x03\x01a", "bad message headers"),  # a table that does not parse
])
def test_a_publishs_properties_that_would_close_the_connection_are_refused(
        encoded: bytes, fault: str) -> None:
    with pytest.raises(ValueError, match=fault):
        amqp.check_properties(encoded)


_header_value = st.recursive(
    st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-2**31, 2**31 - 1),
              _short, st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(_short, inner, max_size=3)), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_short, _header_value, min_size=1, max_size=4))
def test_float_headers_travel_as_doubles_both_ways_as_py_amqp_has_them(
        headers: dict[str, object]) -> None:
    from amqp.basic_message import Message

    ours = props.encode(spec.BasicProperties(content_type="c", headers=headers, priority=1))
    read = Message()
    read._load_properties(read.CLASS_ID, ours, 0)  # py-amqp reads what we send
    assert read.properties == {"content_type": "c", "application_headers": headers,
                               "priority": 1}
    amqp.check_properties(ours)  # and a worker lets it through
    theirs = Message(b"", content_type="c", application_headers=headers,
                     priority=1)._serialize_properties()
    assert props.decode(theirs) == spec.BasicProperties(content_type="c", headers=headers,
                                                        priority=1)


def test_a_publishs_names_pass_through_as_they_are_and_bad_ones_are_refused() -> None:
    payload = wire.publish("ex", "r\u00e9", b"\x00\x00", b"body", False)[wire.HEADER.size:]
    names, properties, start = wire.read_publish_head(payload)
    assert names == wire.names("ex", "r\u00e9") and properties == b"\x00\x00"
    assert payload[start:] == b"body"
    for bad in (b"", b"\x05ab", b"\x02ab\x01", b"\x01\xff\x00\x00\x00", b"\x00\x00\x00\x09ab"):
        with pytest.raises(ProtocolError):
            wire.read_publish_head(bad)
