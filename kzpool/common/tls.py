"""TLS to brokers: which files and checks an ``amqps`` broker uses, and its ``ssl.SSLContext``.

What the broker's URI gives (Kazoo's option names) wins; what it does not give comes from
``[pool]``:

* the CA: ``cacertfile``, else ``tls_ca``, else the system's CAs (``SSL_CERT_FILE`` and
  ``SSL_CERT_DIR`` are honoured);
* the client certificate and its key, as a pair: ``certfile`` (+ ``keyfile``, + ``password``
  if the key is encrypted), else ``tls_cert`` + ``tls_key``; never one of each;
* ``verify``, else ``tls_verify``;
* ``server_name_indication``: the name sent to the broker (SNI) and checked in its
  certificate; by default the URI's host; ``disable``: none sent, none checked;
* ``depth``: how many intermediate CAs may stand between the broker's certificate and the
  CA, checked right after the handshake.

Hazards: OpenSSL asks for a key's password on the terminal when it is not given, which would
block a worker's loop: a password callable is always passed, and an encrypted key without
one is a :class:`~kzpool.common.errors.TLSError`.  :func:`context` reads files (a few small
local reads, blocking): a worker builds its context at every connect, so a renewed
certificate is used from the next reconnect on, and its loop waits for those reads.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from .errors import TLSError
from .settings import PoolSettings
from .uri import BrokerURI


@dataclass(frozen=True)
class TLSFiles:
    """The TLS an amqps broker uses, resolved from its URI and the ``[pool]`` defaults."""

    ca: str | None  # None: the system's CAs
    cert: str | None
    key: str | None  # None with a cert: the key is in the certificate's file
    password: str | None = field(repr=False)
    verify: bool = True
    server_name: str | None = None  # None: no SNI, no host name check
    depth: int | None = None
    cert_from_pool: bool = False  # the pair is [pool] tls_cert / tls_key
    ca_from_pool: bool = False

    @property
    def files(self) -> tuple[str | None, str | None, str | None, str | None]:
        """What loading depends on: two brokers with the same files load the same."""
        return self.ca, self.cert, self.key, self.password


def resolve(uri: BrokerURI, settings: PoolSettings) -> TLSFiles | None:
    """The TLS ``uri`` uses, or ``None`` for an ``amqp`` broker."""
    if not uri.tls:
        return None
    ca = uri.option("cacertfile")
    cert, key = uri.option("certfile"), uri.option("keyfile")
    from_pool = cert is None
    if from_pool:
        cert, key = settings.tls_cert, settings.tls_key
    sni = uri.option("server_name_indication") or uri.host
    depth = uri.option("depth")
    return TLSFiles(
        ca=ca or settings.tls_ca, cert=cert, key=key, password=uri.option("password"),
        verify=(uri.option("verify") or settings.tls_verify) == "verify_peer",
        server_name=None if sni == "disable" else sni,
        depth=int(depth) if depth is not None else None,
        cert_from_pool=from_pool and cert is not None, ca_from_pool=ca is None and (
            settings.tls_ca is not None))


def pool_defaults(settings: PoolSettings) -> TLSFiles:
    """The ``[pool]`` TLS defaults alone, as a broker naming none of its own would use them."""
    files = resolve(BrokerURI.parse("amqps://localhost/"), settings)
    assert files is not None
    return files


def context(files: TLSFiles) -> ssl.SSLContext:
    """A client context for ``files``; :class:`TLSError` naming the file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.verify:
        _load_ca(ctx, files.ca)
        ctx.check_hostname = files.server_name is not None
        if files.depth is not None:
            ctx.sslsocket_class = _depth_limited(files.depth)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if files.cert is not None:
        _load_pair(ctx, files.cert, files.key, files.password)
    return ctx


def _load_ca(ctx: ssl.SSLContext, ca: str | None) -> None:
    if ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return
    _readable(ca, "CA file")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        why = "no PEM certificate in it" if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND" else (
            f"cannot load it ({exc.reason or exc})")
        raise TLSError(f"CA file {ca}: {why}", file=ca, part="ca") from None


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str | None, password: str | None) -> None:
    """Load a certificate and its key; every failure named after its file or files."""
    cert_text = _readable(cert, "certificate")
    key_text = _readable(key, "key") if key is not None else cert_text
    key_name = key or cert
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise TLSError(f"certificate {cert}: no PEM certificate in it", file=cert, part="cert")
    if "PRIVATE KEY-----" not in key_text:
        where = f"key {key}" if key is not None else f"certificate {cert} (no keyfile given)"
        raise TLSError(f"{where}: no PEM private key in it", file=key_name, part="key")
    encrypted = "ENCRYPTED" in key_text
    if encrypted and password is None:
        raise TLSError(f"key {key_name} is encrypted: give its password (password= in the"
                       " broker's URI)", file=key_name, part="key")

    def give_password() -> str:
        return password or ""

    try:
        ctx.load_cert_chain(cert, key, password=give_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(f"key {key_name} does not match certificate {cert}",
                           file=key_name, cert=cert, part="pair") from None
        if encrypted:
            raise TLSError(f"key {key_name}: cannot decrypt it with the password given",
                           file=key_name, part="key") from None
        raise TLSError(f"certificate {cert} with key {key_name}: cannot load them"
                       f" ({exc.reason or exc})", file=key_name, cert=cert, part="pair"
                       ) from None


def _readable(path: str, what: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read(1 << 20)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise TLSError(f"{what} {path}: cannot read it: {reason}", file=path,
                       part="ca" if what == "CA file" else "key" if what == "key" else "cert"
                       ) from None


def _depth_limited(depth: int) -> type[ssl.SSLSocket]:
    """An ``SSLSocket`` that, after the handshake, refuses a chain with more than ``depth``
    intermediate CAs (Erlang's ``depth``; Python's ssl has no setting for it)."""

    class DepthLimited(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            chain = _verified_chain(self)
            if chain is not None and len(chain) - 2 > depth:
                message = (f"the broker's certificate chain has {len(chain) - 2} intermediate"
                           f" CA(s), more than depth={depth}")
                error = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
                error.verify_message = message
                error.reason = "CERTIFICATE_VERIFY_FAILED"
                raise error

    return DepthLimited


def _verified_chain(sock: ssl.SSLSocket) -> list[object] | None:
    """The verified chain, peer first, trust anchor last (public from Python 3.13)."""
    getter = getattr(sock, "get_verified_chain", None) or getattr(
        getattr(sock, "_sslobj", None), "get_verified_chain", None)
    if getter is None:
        return None
    chain = getter()
    return list(chain) if chain is not None else None
