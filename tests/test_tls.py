"""TLS to brokers: Kazoo's amqps URI options and the [pool] defaults, against a real node whose
TLS listener wants a client certificate; what `kzpool check` says of bad TLS files; how a
failed verification reads in status, the log and `kzpool serve`'s exit."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kzpool
from kzpool.common import tls
from kzpool.common.config import loads
from kzpool.common.errors import BrokerURIError, TLSError
from kzpool.common.uri import BrokerURI, mask
from kzpool.testing import DEFAULT_URI, Pool, titles
from kzpool.worker.connection import parameters
from kzpool.worker.faults import HANDSHAKE_CUT, classify
from kzpool.worker.spec import WorkerSpec

from .conftest import brokers

PoolMaker = Callable[..., Pool]
SECRET = "kz-keypass-5f1c9e"  # the client key's password: it must never be shown


def with_options(uri: str, **options: Any) -> str:
    query = "&".join(f"{name}={value}" for name, value in options.items() if value)
    return f"{uri}?{query}" if query else uri


def tls_uri(node: Any, **options: Any) -> str:
    return with_options(node.tls_url, **options)


def amqps(**options: Any) -> str:
    """A URI of no running broker: for `kzpool check`, which loads files and connects to
    nothing."""
    return with_options("amqps://guest:pw@127.0.0.1:5671/%2F", **options)


def encrypt_key(source: Path, target: Path, password: str) -> Path:
    subprocess.run(["openssl", "pkey", "-in", str(source), "-aes256", "-passout",
                    f"pass:{password}", "-out", str(target)], check=True, capture_output=True)
    return target


def kzpool_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kzpool", *args], capture_output=True,
                          text=True, timeout=60)


def round_trip(pool: Pool, count: int) -> tuple[str, list[bytes]]:
    """Confirmed publishes to a queue of its own, consumed and acked on the same lease."""
    with kzpool.connect(pool.socket).lease("float") as lease:
        queue = lease.queue_declare(f"kzt-tls-{uuid.uuid4().hex[:8]}", exclusive=True
                                    ).method.queue
        lease.confirm_delivery()
        for i in range(count):
            lease.basic_publish("", queue, b"%d" % i)  # returns once confirmed
        got: list[bytes] = []
        for method, _props, body in lease.consume(queue, inactivity_timeout=5):
            assert method is not None, f"only {len(got)} of {count} came back"
            got.append(body)
            lease.basic_ack(method.delivery_tag)
            if len(got) == count:
                break
        lease.cancel()
        return lease.broker, got


def test_a_lease_publishes_and_consumes_over_tls_with_a_client_certificate(
        pools: PoolMaker, tls_node: Any, tmp_path: Path) -> None:
    node, certs = tls_node
    key = encrypt_key(certs.client_key, tmp_path / "client.key", SECRET)
    uri = tls_uri(node, cacertfile=certs.ca, certfile=certs.client_cert, keyfile=key,
                  password=SECRET, verify="verify_peer", server_name_indication="localhost",
                  depth=2)
    pool = pools([uri]).start()
    pool.wait_ready()
    broker, got = round_trip(pool, 20)
    assert broker == f"amqps://guest:***@127.0.0.1:{node.tls_port}/%2F"
    assert got == [b"%d" % i for i in range(20)]
    # the broker's side: the pool's connection is TLS, with the client certificate
    listed = brokers._ctl(node.name, "-q", "list_connections", "ssl", "peer_cert_subject",
                          "--formatter", "json").stdout
    assert {"ssl": True, "peer_cert_subject": "CN=kzpool test client"} in json.loads(listed)
    # the key's password is shown nowhere: status, the log, process titles, check
    shown = [kzpool_cli("status", "-c", str(pool.config)).stdout,
             kzpool_cli("status", "--json", "-c", str(pool.config)).stdout,
             kzpool_cli("check", "-c", str(pool.config)).stdout, pool.logs(),
             *titles(pool).values()]
    assert "amqps://guest:***@127.0.0.1" in shown[0]
    assert not [text for text in shown if SECRET in text]


def test_pool_defaults_serve_an_amqps_broker_that_names_no_files(pools: PoolMaker,
                                                                  tls_node: Any) -> None:
    node, certs = tls_node
    pool = pools([node.tls_url], tls_ca=certs.ca, tls_cert=certs.client_cert,
                 tls_key=certs.client_key).start()
    pool.wait_ready()
    assert round_trip(pool, 3)[1] == [b"0", b"1", b"2"]


def test_a_wrong_ca_is_named_in_status_the_log_and_the_exit_of_serve(
        pools: PoolMaker, tls_node: Any, tmp_path: Path) -> None:
    node, certs = tls_node
    wrong_ca, _key = brokers.make_ca(tmp_path, "other-ca")
    uri = tls_uri(node, cacertfile=wrong_ca, certfile=certs.client_cert,
                  keyfile=certs.client_key)
    masked = f"amqps://guest:***@127.0.0.1:{node.tls_port}/%2F"
    served = pools([uri, DEFAULT_URI]).start()  # the next broker serves meanwhile
    rows = served.wait_rows(lambda rs: rs[0]["state"] == "failed", 10, "the worker to fail")
    assert rows[0]["error"].startswith(
        "TLS: the broker's certificate failed verification: self-signed certificate in"
        " certificate chain (is cacertfile, or [pool] tls_ca, the CA that signed it?)")
    assert served.wait_ready()["pool"]["state"] == "running"
    pool = pools([uri], startup_timeout=60).start()
    assert pool.wait_exit(20) == 3  # at once: no local broker left that could come up
    log = pool.logs()
    assert f"ERROR kzpool.worker: {masked}: TLS: the broker's certificate failed" in log
    assert (f"no local primary broker: every local broker failed for good ({masked}: TLS:"
            " the broker's certificate failed verification") in log


def test_a_pool_without_a_client_certificate_hears_why(pools: PoolMaker,
                                                       tls_node: Any) -> None:
    node, certs = tls_node
    pool = pools([tls_uri(node, cacertfile=certs.ca)], startup_timeout=30).start()
    rows = pool.wait_rows(lambda rs: bool(rs[0]["error"]), 10, "the worker's first failure")
    # TLS 1.3: the broker's alert, or (as the handshake races) only its EOF
    assert rows[0]["error"] in (
        "TLS: the broker wants a client certificate (certfile, or [pool] tls_cert): tlsv13"
        " alert certificate required", HANDSHAKE_CUT)
    assert rows[0]["state"] in ("waiting", "connecting")  # it keeps trying: not fatal


# ----- kzpool check: TLS files, no broker needed -----------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> brokers.Certs:
    return brokers.make_certs(tmp_path_factory.mktemp("pki"))


def check(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    path = tmp_path / "c.ini"
    path.write_text(text)
    result = kzpool_cli("check", "-c", str(path))
    assert SECRET not in result.stdout + result.stderr
    return result.returncode, result.stderr.strip().splitlines()


def test_check_names_both_files_of_a_key_that_does_not_match_its_certificate(
        tmp_path: Path, pki: brokers.Certs) -> None:
    uri = amqps(certfile=pki.client_cert, keyfile=pki.server_key)
    code, lines = check(tmp_path, f"[amqp]\nuri = {uri}\n")
    assert code == 2
    assert lines == [f"{tmp_path}/c.ini:2: [amqp] uri = 'amqps://guest:***@127.0.0.1:5671/%2F':"
                     f" key {pki.server_key} does not match certificate {pki.client_cert}"]
    code, lines = check(tmp_path, f"[pool]\ntls_cert = {pki.client_cert}\n"
                                  f"tls_key = {pki.server_key}\n[amqp]\nuri = {amqps()}\n")
    assert code == 2
    assert lines == [f"{tmp_path}/c.ini:3: [pool] tls_key = '{pki.server_key}': key"
                     f" {pki.server_key} does not match certificate {pki.client_cert}"]


def test_check_names_each_unusable_tls_file(tmp_path: Path, pki: brokers.Certs) -> None:
    encrypted = encrypt_key(pki.client_key, tmp_path / "enc.key", SECRET)
    (tmp_path / "empty.pem").write_text("")
    pair = {"certfile": pki.client_cert, "keyfile": encrypted}
    cases = {
        amqps(cacertfile=tmp_path / "nope.pem"):
            f"CA file {tmp_path}/nope.pem: cannot read it: no such file or directory",
        amqps(cacertfile=pki.client_key):
            f"CA file {pki.client_key}: no PEM certificate in it",
        amqps(certfile=tmp_path / "empty.pem"):
            f"certificate {tmp_path}/empty.pem: no PEM certificate in it",
        amqps(certfile=pki.client_cert):
            f"certificate {pki.client_cert} (no keyfile given): no PEM private key in it",
        amqps(**pair): f"key {encrypted} is encrypted: give its password (password= in the"
                       " broker's URI)",
        amqps(**pair, password=SECRET + "x"):
            f"key {encrypted}: cannot decrypt it with the password given",
    }
    for uri, expected in cases.items():
        code, lines = check(tmp_path, f"[amqp]\nuri = {uri}\n")
        assert code == 2 and len(lines) == 1 and lines[0].endswith(": " + expected), lines
    good = amqps(cacertfile=pki.ca, **pair, password=SECRET)
    assert check(tmp_path, f"[amqp]\nuri = {good}\n")[0] == 0


@pytest.mark.parametrize(("query", "expected"), [
    ("ssl_options=%7B%27certfile%27%3A+%27%2Fetc%2Fshadow%27%7D",
     "option 'ssl_options' is pika's Python literal and is not accepted"),
    ("cacertfile=ca.pem", "option cacertfile='ca.pem': must be an absolute path"),
    ("verify=maybe", "option verify='maybe': must be verify_peer or verify_none"),
    ("depth=-1", "option depth='-1': must be a whole number from 0 to 64"),
    ("keyfile=/k.pem", "keyfile needs certfile"),
    (f"certfile=/c.pem&password={SECRET}&password=x", "option 'password' given twice"),
    ("cacertfile=/a&fail_if_no_peer_cert=true", "unknown option 'fail_if_no_peer_cert'"),
    ("server_name_indication=not_a_host", "must be a host name, or disable"),
])
def test_check_names_each_bad_uri_option(tmp_path: Path, query: str, expected: str) -> None:
    code, lines = check(tmp_path, f"[amqp]\nuri = amqps://u:pw@h/?{query}\n")
    assert code == 2
    assert any("c.ini:2: [amqp] uri = 'amqps://u:***@h/?" in line and expected in line
               for line in lines), lines


def test_tls_options_on_an_amqp_uri_are_refused(tmp_path: Path) -> None:
    code, lines = check(tmp_path, "[amqp]\nuri = amqp://u:pw@h/?cacertfile=/ca.pem\n")
    assert code == 2
    assert f"{tmp_path}/c.ini:2: [amqp] uri = 'amqp://u:***@h/?cacertfile=/ca.pem': TLS option"\
           " 'cacertfile' on an amqp URI (use amqps)" in lines


# ----- depth: a real handshake with a chain through an intermediate CA ------------------


@pytest.fixture
def chained_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server whose certificate is signed by an intermediate CA: (port, root CA)."""
    root = brokers.make_ca(tmp_path, "root")
    middle = brokers.make_cert(tmp_path, "middle", root, server=False, is_ca=True)
    leaf = brokers.make_cert(tmp_path, "leaf", middle, server=True)
    chain = tmp_path / "chain.pem"
    chain.write_text(leaf[0].read_text() + middle[0].read_text())
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(chain, leaf[1])
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                server.wrap_socket(conn, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], root[0]
    stop.set()
    listener.close()
    thread.join(5)


def handshake(port: int, files: tls.TLSFiles) -> None:
    context = tls.context(files)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(
            raw, server_hostname=files.server_name) as sock:
        assert sock.version() is not None


def test_depth_limits_the_intermediate_cas(chained_server: tuple[int, Path]) -> None:
    port, root = chained_server
    files = tls.TLSFiles(ca=str(root), cert=None, key=None, password=None,
                         server_name="localhost", depth=1)
    handshake(port, files)  # one intermediate: allowed by depth=1
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(port, tls.TLSFiles(**{**files.__dict__, "depth": 0}))
    assert classify(info.value) == (True, (
        "TLS: the broker's certificate failed verification: the broker's certificate chain"
        " has 1 intermediate CA(s), more than depth=0"))


def test_a_tls_file_gone_at_connect_time_is_a_named_fatal_reason(tmp_path: Path) -> None:
    files = tls.TLSFiles(ca=str(tmp_path / "gone.pem"), cert=None, key=None, password=None)
    with pytest.raises(TLSError) as info:
        tls.context(files)
    assert classify(info.value) == (
        True, f"TLS: CA file {tmp_path}/gone.pem: cannot read it: no such file or directory")


# ----- URIs and pika's parameters: pure ---------------------------------------------------


def test_a_clients_uri_names_a_broker_and_nothing_else() -> None:
    plain = BrokerURI.parse_client("amqps://u:pw@h:5671/v")
    assert (plain.host, plain.port, plain.vhost, plain.options) == ("h", 5671, "v", ())
    for query in ("cacertfile=/etc/shadow", "certfile=/c.pem&keyfile=/k.pem", "heartbeat=1",
                  "verify=verify_none"):
        with pytest.raises(BrokerURIError) as info:
            BrokerURI.parse_client(f"amqps://u:pw@h/?{query}")
        assert "a lease's broker URI takes no options" in str(info.value)
        assert "TLS files and connection options come from the pool's config" in str(info.value)


def test_key_passwords_are_masked_wherever_a_uri_is_shown(tmp_path: Path,
                                                           pki: brokers.Certs) -> None:
    text = f"amqps://u:pw@h/?certfile=/c@x.pem&password={SECRET}&depth=2"
    assert mask(text) == "amqps://u:***@h/?certfile=/c@x.pem&password=***&depth=2"
    uri = BrokerURI.parse(text)
    assert uri.option("password") == SECRET and SECRET not in uri.masked + uri.short
    with pytest.raises(BrokerURIError) as info:
        BrokerURI.parse(f"amqps://u:pw@h/?certfile=/c.pem&password={SECRET}&bogus=1")
    assert SECRET not in str(info.value) and "password=***" in str(info.value)
    key = encrypt_key(pki.client_key, tmp_path / "enc.key", SECRET)
    uri_text = amqps(certfile=pki.client_cert, keyfile=key, password=SECRET)
    assert SECRET in loads(f"[amqp]\nuri = {uri_text}\n", environ={}).passwords  # hidden


def spec_for(uri: str, **pool: str) -> WorkerSpec:
    settings = "".join(f"{k} = {v}\n" for k, v in pool.items())
    config = loads(f"[pool]\n{settings}[amqp]\nuri = {uri}\n", environ={})
    return WorkerSpec("c1", config.brokers[0], 1, config.settings)


def test_pikas_parameters_come_from_the_parsed_uri(pki: brokers.Certs) -> None:
    params = parameters(spec_for("amqp://bob:s%2Fcret@h:5999/my%2Fvhost?heartbeat=3"
                                 "&channel_max=99&frame_max=8192", heartbeat="10"))
    assert (params.host, params.port, params.virtual_host) == ("h", 5999, "my/vhost")
    assert (params.credentials.username, params.credentials.password) == ("bob", "s/cret")
    assert (params.heartbeat, params.channel_max, params.frame_max) == (3, 99, 8192)
    assert params.ssl_options is None and params.connection_attempts == 1
    tls_params = parameters(spec_for(
        f"amqps://h/?server_name_indication=rabbit.example&certfile={pki.client_cert}"
        f"&keyfile={pki.client_key}", tls_ca=str(pki.ca)))
    assert tls_params.port == 5671 and tls_params.heartbeat == 10
    assert tls_params.ssl_options.server_hostname == "rabbit.example"
    context = tls_params.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    unverified = parameters(spec_for("amqps://h/?server_name_indication=disable",
                                     tls_verify="verify_none")).ssl_options
    assert unverified.server_hostname is None
    assert unverified.context.verify_mode == ssl.CERT_NONE
