#!/usr/bin/env python3
"""Start, stop and break local RabbitMQ nodes for kzpool's tests and benchmarks.

Importable (stdlib only, no side effects at import) and a CLI:

    python3 scripts/brokers.py up [--nodes N]   default node + kzp1..kzpN on 5701..
    python3 scripts/brokers.py down             stop every extra node recorded
    python3 scripts/brokers.py status
    python3 scripts/brokers.py start NAME PORT [--tls-port P --certs DIR] | stop NAME | kill NAME
    python3 scripts/brokers.py stop-app NAME | start-app NAME | ensure-default
    python3 scripts/brokers.py certs DIR        a CA, a server and a client certificate
    python3 scripts/brokers.py cluster NAME:PORT NAME:PORT ...   nodes joined to the first

Each extra node lives in its own directory under $KZPOOL_BROKERS_DIR (default
/tmp/kzpool-brokers/<node name>/): config, mnesia, logs, pid file and a
node.json record, so a later `down` finds nodes started by an earlier `up`.
The default node (rabbit@localhost on 127.0.0.1:5672) is only ever started.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_NODE = "rabbit@localhost"
DEFAULT_PORT = 5672
DIST_PORT_OFFSET = 20000
CTL_TIMEOUT = 60.0
INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y rabbitmq-server"


@dataclass(frozen=True)
class Node:
    name: str  # e.g. "kzp1@localhost"
    port: int
    base: Path
    tls_port: int | None = None  # a TLS listener too (client certificate required)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/%2F"

    @property
    def tls_url(self) -> str:
        """The TLS listener's URI, without its TLS options (the caller adds those)."""
        if self.tls_port is None:
            raise ValueError(f"{self.name} has no TLS listener")
        return f"amqps://guest:guest@{HOST}:{self.tls_port}/%2F"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"


# --- small helpers -----------------------------------------------------------


def _say(msg: str) -> None:
    print(f"brokers: {msg}", file=sys.stderr, flush=True)


def state_dir() -> Path:
    return Path(os.environ.get("KZPOOL_BROKERS_DIR", "/tmp/kzpool-brokers"))


def full_name(name: str) -> str:
    """kzp1 -> kzp1@localhost; a name that has a host is kept."""
    return name if "@" in name else f"{name}@localhost"


def port_open(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _wait_port(port: int, open_: bool, timeout: float, what: str) -> None:
    _wait(lambda: port_open(port) == open_, timeout, what)


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin")


def _need_tool(name: str) -> str:
    path = _tool(name)
    if path is None:
        raise RuntimeError(
            f"{name} not found (RabbitMQ is not installed); run: "
            "python3 scripts/brokers.py ensure-default"
        )
    return path


def _clean_env() -> dict[str, str]:
    """Our environment without RABBITMQ_* variables that could redirect a node."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}


def _ctl(
    name: str | None, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run rabbitmqctl against node `name` (None: the default node).

    rabbitmqctl gets the timeout itself: its CLI beam runs in a session of its
    own (the Debian wrapper su's to rabbitmq), which killing `su` would orphan.
    """
    ctl = _need_tool("rabbitmqctl")
    cmd = [ctl, *(["-n", name] if name else []), "--timeout", str(max(int(timeout), 1)), *args]
    try:
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            stdin=subprocess.DEVNULL,
            env=_clean_env(),
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from e
    if check and res.returncode != 0:
        lines = (res.stderr.strip() or res.stdout.strip()).splitlines()
        out = [ln.strip() for ln in lines if ln.strip()][:2]  # the diagnostics trail on
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}): " + " | ".join(out))
    return res


def is_running(name: str) -> bool:
    """True when the Erlang node answers (its app may still be stopped)."""
    return _ctl(full_name(name), "ping", timeout=10, check=False).returncode == 0


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead


def _is_beam_of(pid: int, name: str) -> bool:
    """Does OS process `pid` look like the beam.smp of node `name`?"""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "beam.smp":
            return False
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except PermissionError:
        return True  # comm said beam.smp; environ is not ours to read
    except OSError:
        return False
    return f"RABBITMQ_NODENAME={name}".encode() in environ.split(b"\0")


def _beam_pids(name: str) -> list[int]:
    """OS pids of the live beam.smp processes of node `name`."""
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [pid for pid in pids if _is_beam_of(pid, name) and _pid_alive(pid)]


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _refuse_default(name: str) -> None:
    if name == DEFAULT_NODE:
        raise ValueError(f"{DEFAULT_NODE} is the machine's default node: not touching it")


def _chown_rabbitmq(path: Path) -> None:
    """The server runs as user rabbitmq (the Debian wrapper su's to it as root)."""
    if os.geteuid() != 0:
        return
    for p in [path, *path.rglob("*")]:
        shutil.chown(p, "rabbitmq", "rabbitmq")


def _log_tail(node: Node, lines: int = 30) -> str:
    files = [node.base / "startup.log", *sorted((node.base / "log").glob("*.log"))]
    parts = []
    for f in files:
        with contextlib.suppress(OSError):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                parts.append(f"--- tail of {f} ---\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no logs under {node.base})"


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialise start/stop of one node across processes (pytest-xdist workers)."""
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# --- state records -------------------------------------------------------------


def _record_path(name: str) -> Path:
    return state_dir() / name / "node.json"


def _save(node: Node) -> None:
    path = _record_path(node.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"name": node.name, "port": node.port, "base": str(node.base),
           "tls_port": node.tls_port}
    path.write_text(json.dumps(rec) + "\n")


def _load(path: Path) -> Node | None:
    try:
        rec = json.loads(path.read_text())
        tls_port = rec.get("tls_port")
        return Node(str(rec["name"]), int(rec["port"]), Path(rec["base"]),
                    int(tls_port) if tls_port is not None else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_node(name: str) -> Node | None:
    return _load(_record_path(full_name(name)))


def recorded_nodes() -> list[Node]:
    """Every extra node recorded under state_dir(), running or not."""
    found = (_load(p) for p in sorted(state_dir().glob("*/node.json")))
    return [n for n in found if n is not None]


# --- the default node ----------------------------------------------------------


def _write_default_config() -> None:
    """On a fresh install: make the default node rabbit@localhost on 127.0.0.1:5672."""
    etc = Path("/etc/rabbitmq")
    etc.mkdir(parents=True, exist_ok=True)
    conf, env = etc / "rabbitmq.conf", etc / "rabbitmq-env.conf"
    if not conf.exists():
        conf.write_text(f"listeners.tcp.local = {HOST}:{DEFAULT_PORT}\n")
    if not env.exists():
        env.write_text(
            "NODENAME=rabbit@localhost\nERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )


def _install_rabbitmq() -> None:
    if os.geteuid() != 0:
        raise RuntimeError(
            "RabbitMQ is not installed (no rabbitmq-server on PATH or in /usr/sbin) "
            f"and installing it needs root. Run: {INSTALL_HINT}"
        )
    if shutil.which("apt-get") is None:
        raise RuntimeError("RabbitMQ is not installed and there is no apt-get to install it")
    _write_default_config()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "rabbitmq-server"]):
        _say("running: " + " ".join(cmd))
        if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed; try by hand: {INSTALL_HINT}")


def ensure_default(timeout: float = 120) -> None:
    """Make sure the default node accepts AMQP on 127.0.0.1:5672 (install/start it)."""
    if port_open(DEFAULT_PORT):
        return
    deadline = time.monotonic() + timeout
    if _tool("rabbitmq-server") is None:
        _install_rabbitmq()
        if port_open(DEFAULT_PORT):  # the package's postinst may have started it
            return
    if _ctl(None, "ping", timeout=10, check=False).returncode == 0:
        _say("default node is up but its app is stopped: rabbitmqctl start_app")
        _ctl(None, "start_app", timeout=timeout)
    else:
        _say("starting the default node: rabbitmq-server -detached")
        subprocess.run(
            [_need_tool("rabbitmq-server"), "-detached"],
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

        def booted() -> bool:  # await_startup fails at once until the node is registered
            return _ctl(None, "await_startup", timeout=10, check=False).returncode == 0

        _wait(
            booted,
            max(deadline - time.monotonic(), 1),
            "the default node to boot (see /var/log/rabbitmq/)",
        )
    _wait(
        lambda: port_open(DEFAULT_PORT),
        max(deadline - time.monotonic(), 1),
        f"the default node on {HOST}:{DEFAULT_PORT} (see /var/log/rabbitmq/)",
    )
    _say(f"default node up on {HOST}:{DEFAULT_PORT}")


# --- extra nodes -----------------------------------------------------------------


def start_node(name: str, port: int, base: Path | None = None, timeout: float = 90,
               tls_port: int | None = None, certs: Certs | None = None) -> Node:
    """Start (or find already running) an independent node listening on `port`.

    With `tls_port` and `certs`, the node also listens for TLS there (its certificate is
    `certs.server_cert`; it verifies clients against `certs.ca` and refuses a client that
    presents no certificate).
    """
    name = full_name(name)
    _refuse_default(name)
    if DEFAULT_PORT in (port, tls_port):
        raise ValueError(f"port {DEFAULT_PORT} belongs to the default node")
    if (tls_port is None) != (certs is None):
        raise ValueError("a TLS listener needs both tls_port and certs")
    node = Node(name, port, Path(base) if base else state_dir() / name, tls_port)
    deadline = time.monotonic() + timeout
    with _lock(name):
        known = load_node(name)
        pid = _read_pid((known or node).pid_file)
        live = pid is not None and _pid_alive(pid) and _is_beam_of(pid, name)
        if live or is_running(name):  # never launch a second beam: it would break the first
            if known is None:
                _save(node)
            if not port_open(port):
                start_app(name, timeout=max(deadline - time.monotonic(), 1))
            return known or node
        for taken in (p for p in (port, tls_port) if p is not None and port_open(p)):
            raise RuntimeError(f"port {taken} is already taken by something other than {name}")

        server = _need_tool("rabbitmq-server")
        _say(f"starting {name} on port {port} in {node.base}")
        node.base.mkdir(parents=True, exist_ok=True)
        conf = f"listeners.tcp.local = {HOST}:{port}\nloopback_users = none\n"
        if tls_port is not None and certs is not None:
            conf += _tls_listener(node, tls_port, certs)
        (node.base / "rabbitmq.conf").write_text(conf)
        node.pid_file.unlink(missing_ok=True)  # a stale one would fool `wait`
        _save(node)
        _chown_rabbitmq(node.base)
        env = {
            **_clean_env(),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(port + DIST_PORT_OFFSET),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.pid_file),
        }
        try:
            with open(node.base / "startup.log", "ab") as log:
                rc = subprocess.run(
                    [server, "-detached"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=60,
                ).returncode
            if rc != 0:
                raise RuntimeError(f"rabbitmq-server -detached exited with {rc}")
            launched = time.monotonic()

            def pid_file_written() -> bool:  # fail fast if the beam died during boot
                if node.pid_file.exists():
                    return True
                if time.monotonic() - launched > 5 and not _beam_pids(name):
                    raise RuntimeError("its beam.smp exited before writing the pid file")
                return False

            _wait(pid_file_written, max(deadline - time.monotonic(), 1), f"{node.pid_file}")
            left = max(deadline - time.monotonic(), 1)
            _ctl(name, "wait", str(node.pid_file), timeout=left)
            for listening in (p for p in (port, tls_port) if p is not None):
                _wait_port(listening, True, max(deadline - time.monotonic(), 1),
                           f"{name} to accept on port {listening}")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(
                f"could not start {name} on port {port} (dist port {port + DIST_PORT_OFFSET}): "
                f"{e}\n{_log_tail(node)}"
            ) from e
    _say(f"{name} up: {node.url}")
    return node


def stop_node(node_or_name: Node | str, timeout: float = 60) -> None:
    """Stop an extra node (fine if already stopped) and remove its directory."""
    name = full_name(node_or_name if isinstance(node_or_name, str) else node_or_name.name)
    _refuse_default(name)
    with _lock(name):
        node = node_or_name if isinstance(node_or_name, Node) else load_node(name)
        pid = _read_pid(node.pid_file) if node else None
        res = _ctl(name, "stop", "--idempotent", timeout=timeout, check=False)
        if res.returncode != 0 and is_running(name):
            raise RuntimeError(f"could not stop {name}: {res.stderr.strip() or res.stdout.strip()}")
        if pid is not None and _is_beam_of(pid, name):
            _wait(lambda: not _pid_alive(pid), timeout, f"{name} (pid {pid}) to exit")
        if node is not None:
            shutil.rmtree(node.base, ignore_errors=True)
        shutil.rmtree(_record_path(name).parent, ignore_errors=True)
    _say(f"{name} stopped")


# --- certificates and TLS listeners ----------------------------------------------


@dataclass(frozen=True)
class Certs:
    """A CA and the certificates it signed, as PEM files in `dir` (see make_certs)."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"


def _openssl(*args: str) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        raise RuntimeError("openssl not found: apt-get install -y openssl")
    res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.strip()[:300]}")


def make_ca(directory: Path, name: str = "ca", days: int = 30) -> tuple[Path, Path]:
    """A self-signed CA (EC P-256): (certificate, key) as `name`.pem and `name`.key."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(days),
             "-subj", f"/CN=kzpool test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_cert(directory: Path, name: str, ca: tuple[Path, Path], *, server: bool,
              days: int = 30, is_ca: bool = False) -> tuple[Path, Path]:
    """A certificate signed by `ca` (cert, key): a server one names 127.0.0.1 and localhost
    in subjectAltName; `is_ca` makes an intermediate CA instead."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    ext = directory / f"{name}.ext"
    if is_ca:
        ext.write_text("basicConstraints=critical,CA:TRUE\n"
                       "keyUsage=critical,keyCertSign,cRLSign\n")
    elif server:
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    else:
        ext.write_text("keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj",
             f"/CN={'localhost' if server else 'kzpool test ' + name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", str(days), "-extfile", str(ext))
    csr.unlink()
    ext.unlink()
    return cert, key


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate (127.0.0.1, localhost) and a client certificate."""
    certs = Certs(Path(directory))
    ca = make_ca(certs.dir)
    make_cert(certs.dir, "server", ca, server=True)
    make_cert(certs.dir, "client", ca, server=False)
    for key in certs.dir.glob("*.key"):
        key.chmod(0o600)
    return certs


def _tls_listener(node: Node, tls_port: int, certs: Certs) -> str:
    """rabbitmq.conf lines for a TLS listener; the files are copied beside the node's config
    (the node runs as rabbitmq and must read them)."""
    tls = node.base / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    for source in (certs.ca, certs.server_cert, certs.server_key):
        shutil.copyfile(source, tls / source.name)
    return (f"listeners.ssl.default = {HOST}:{tls_port}\n"
            f"ssl_options.cacertfile = {tls / certs.ca.name}\n"
            f"ssl_options.certfile = {tls / certs.server_cert.name}\n"
            f"ssl_options.keyfile = {tls / certs.server_key.name}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n")


# --- clusters ----------------------------------------------------------------------


def cluster_members(name: str) -> set[str]:
    """The nodes of `name`'s cluster (running or not), as `name` knows them."""
    res = _ctl(full_name(name), "cluster_status", "--formatter", "json", timeout=30)
    status = json.loads(res.stdout)
    return set(status.get("disk_nodes", [])) | set(status.get("ram_nodes", []))


def start_cluster(nodes: Sequence[tuple[str, int]], timeout: float = 120) -> list[Node]:
    """Start each node (or find it running) and join every one to the first's cluster.

    Idempotent: a node already in the first one's cluster is left alone.
    """
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:  # boots overlap
        started = list(pool.map(lambda spec: start_node(spec[0], spec[1], timeout=timeout),
                                nodes))
    first = started[0].name
    for node in started[1:]:
        with _lock(node.name):
            if node.name in cluster_members(first):
                continue
            _say(f"joining {node.name} to {first}")
            _ctl(node.name, "stop_app", timeout=timeout)
            _ctl(node.name, "join_cluster", first, timeout=timeout)
            _ctl(node.name, "start_app", timeout=timeout)
            _wait_port(node.port, True, timeout, f"{node.name} to accept on port {node.port}")
    return started


def stop_cluster(nodes: Sequence[Node | str], timeout: float = 60) -> None:
    """Stop every node of a cluster started by start_cluster (last joined first)."""
    for node in reversed(nodes):
        stop_node(node, timeout=timeout)


def _port_of(name: str) -> int | None:
    if name == DEFAULT_NODE:
        return DEFAULT_PORT
    node = load_node(name)
    return node.port if node else None


def stop_app(name: str, timeout: float = 60) -> None:
    """Stop the RabbitMQ app (the Erlang node stays up); returns once the port is closed."""
    name = full_name(name)
    _refuse_default(name)
    _ctl(name, "stop_app", timeout=timeout)
    port = _port_of(name)
    if port is not None:
        _wait(lambda: not port_open(port), timeout, f"{name} to close port {port}")
    _say(f"{name}: app stopped")


def start_app(name: str, timeout: float = 60) -> None:
    """Start the RabbitMQ app again; returns once the port accepts connections."""
    name = full_name(name)
    _ctl(name, "start_app", timeout=timeout)
    port = _port_of(name)
    if port is not None:
        _wait(lambda: port_open(port), timeout, f"{name} to accept on port {port}")
    _say(f"{name}: app started")


def _node_os_pid(name: str) -> int:
    node = load_node(name)
    pid = _read_pid(node.pid_file) if node else None
    if pid is not None and _pid_alive(pid) and _is_beam_of(pid, name):
        return pid
    found = _beam_pids(name)
    if len(found) == 1:
        return found[0]
    res = _ctl(name, "eval", "os:getpid().", check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{name} is not running: no pid to kill")
    return int(res.stdout.strip().strip('"'))


def kill_node(name: str, timeout: float = 30) -> None:
    """SIGKILL the node's beam.smp (a crash, no clean shutdown); keeps its directory."""
    name = full_name(name)
    _refuse_default(name)
    pid = _node_os_pid(name)
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not _pid_alive(pid), timeout, f"{name} (pid {pid}) to die")
    port = _port_of(name)
    if port is not None:
        _wait(lambda: not port_open(port), timeout, f"port {port} to close")
    _say(f"{name}: killed pid {pid}")


# --- CLI -----------------------------------------------------------------------


def _status() -> None:
    up = "up" if port_open(DEFAULT_PORT) else "down"
    print(f"{DEFAULT_NODE:<24} port {DEFAULT_PORT:<6} {up:<12} (default node)")
    for n in recorded_nodes():
        pid = _read_pid(n.pid_file)
        alive = pid is not None and _pid_alive(pid)
        state = "up" if port_open(n.port) else "app stopped" if alive else "down"
        print(f"{n.name:<24} port {n.port:<6} {state:<12} pid {pid if alive else '-'}  {n.base}")


def _down() -> int:
    failed = 0
    for n in recorded_nodes():
        try:
            stop_node(n)
        except (RuntimeError, OSError) as e:
            _say(f"error stopping {n.name}: {e}")
            failed += 1
    if not failed:
        _say("no extra nodes left")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brokers.py", description="Local RabbitMQ nodes for kzpool.")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="default node + kzp1..kzpN on ports 5701..")
    up.add_argument("--nodes", type=int, default=1)
    sub.add_parser("down", help="stop every extra node recorded (never the default)")
    sub.add_parser("status", help="list nodes")
    sub.add_parser("ensure-default", help="install/start the default node if needed")
    start = sub.add_parser("start", help="start an extra node")
    start.add_argument("name")
    start.add_argument("port", type=int)
    start.add_argument("--tls-port", type=int, help="also listen for TLS on this port")
    start.add_argument("--certs", type=Path, help="a directory made by `certs` (with --tls-port)")
    certs = sub.add_parser("certs", help="make a CA, a server and a client certificate in DIR")
    certs.add_argument("dir", type=Path)
    cluster = sub.add_parser("cluster", help="start nodes and join them to the first")
    cluster.add_argument("nodes", nargs="+", metavar="NAME:PORT")
    for cmd in ("stop", "stop-app", "start-app", "kill"):
        sub.add_parser(cmd).add_argument("name")
    args = p.parse_args(argv)

    try:
        if args.cmd == "up":
            ensure_default()
            for i in range(1, args.nodes + 1):
                print(start_node(f"kzp{i}@localhost", 5700 + i).url)
        elif args.cmd == "down":
            return _down()
        elif args.cmd == "status":
            _status()
        elif args.cmd == "ensure-default":
            ensure_default()
        elif args.cmd == "start":
            tls = Certs(args.certs) if args.certs else None
            node = start_node(args.name, args.port, tls_port=args.tls_port, certs=tls)
            print(node.url if node.tls_port is None else f"{node.url}\n{node.tls_url}")
        elif args.cmd == "certs":
            made = make_certs(args.dir)
            print("\n".join(str(p) for p in (made.ca, made.server_cert, made.server_key,
                                              made.client_cert, made.client_key)))
        elif args.cmd == "cluster":
            specs = [(n.rpartition(":")[0], int(n.rpartition(":")[2])) for n in args.nodes]
            for node in start_cluster(specs):
                print(node.url)
        elif args.cmd == "stop":
            stop_node(args.name)
        elif args.cmd == "stop-app":
            stop_app(args.name)
        elif args.cmd == "start-app":
            start_app(args.name)
        elif args.cmd == "kill":
            kill_node(args.name)
    except (RuntimeError, ValueError, OSError) as e:
        _say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
