#!/usr/bin/env python3
"""Start, stop and break local RabbitMQ nodes for kzpool's tests and benchmarks.

Importable (stdlib only, no side effects at import) and a CLI:

    python3 scripts/brokers.py up [--nodes N]   default node + kzp1..kzpN on 5701..
    python3 scripts/brokers.py up --rabbitmq 4 [--nodes N]   kz4 on 5720 + kz4p1..kz4pN on 5721..
    python3 scripts/brokers.py down             stop every extra node recorded (3.10 and 4.x)
    python3 scripts/brokers.py status
    python3 scripts/brokers.py start NAME PORT [--tls-port P --certs DIR] [--rabbitmq 4]
                                [--conf 'KEY = VALUE' ...] [--deny-deprecated]
    python3 scripts/brokers.py stop NAME | kill NAME | stop-app NAME | start-app NAME
    python3 scripts/brokers.py drain NAME | revive NAME   maintenance mode (rabbitmq-upgrade)
    python3 scripts/brokers.py ctl NAME ARGS... rabbitmqctl of the install that runs NAME
    python3 scripts/brokers.py ensure-default
    python3 scripts/brokers.py certs DIR        a CA, a server and a client certificate
    python3 scripts/brokers.py cluster NAME:PORT NAME:PORT ... [--rabbitmq 4]   joined to the first
    python3 scripts/brokers.py rmq4 ensure|status|remove   the RabbitMQ 4 chroot

Each extra node lives in its own directory under $KZPOOL_BROKERS_DIR (default
/tmp/kzpool-brokers/<node name>/): config, mnesia, logs, pid file and a
node.json record, so a later `down` finds nodes started by an earlier `up`.
The default node (rabbit@localhost on 127.0.0.1:5672) is only ever started.

RabbitMQ 4 nodes (`--rabbitmq 4`) run from a Debian sid chroot with its
rabbitmq-server (4.3.x, its own Erlang), made once per machine by `rmq4 ensure`
under $KZPOOL_RMQ4_DIR (default /var/tmp/kzpool-rmq4; ~3 minutes, ~600 MB).
Such a node's directory is inside the chroot (<chroot>/var/lib/kzpool-nodes/
<node name>/, where the node can read it); its node.json record, under
$KZPOOL_BROKERS_DIR like any other, names the chroot, so every command below
drives it with the chroot's own rabbitmqctl. The chroot's nodes share the
machine's network and epmd: their ports must differ from every other node's.
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
SYSTEM_RABBITMQ = 3  # the machine's package (Debian 12: 3.10)
RMQ4 = 4  # the Debian sid chroot's package (4.3.x)
RMQ4_SUITE = "sid"
RMQ4_MIRROR = "http://deb.debian.org/debian"  # when the machine's sources name none
RMQ4_DEFAULT_NODE = "kz4@localhost"  # `up --rabbitmq 4`: a default-like 4.x node
RMQ4_DEFAULT_PORT = 5720
# rabbitmq.conf lines that deny what RabbitMQ 4.x deprecates (4.3 denies these by default;
# naming them makes a 3.12+ or 4.0-4.2 node deny them too)
DENY_DEPRECATED = ("deprecated_features.permit.global_qos = false",
                   "deprecated_features.permit.transient_nonexcl_queues = false")
NODES_IN_CHROOT = "var/lib/kzpool-nodes"  # 4.x nodes' directories, inside the chroot
CHROOT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Node:
    name: str  # e.g. "kzp1@localhost"
    port: int
    base: Path  # as this machine sees it (inside the chroot for a 4.x node)
    tls_port: int | None = None  # a TLS listener too (client certificate required)
    root: Path | None = None  # the chroot that runs it; None: the machine's own RabbitMQ

    @property
    def rabbitmq(self) -> int:
        """The RabbitMQ major version that runs it: SYSTEM_RABBITMQ (3) or RMQ4 (4)."""
        return SYSTEM_RABBITMQ if self.root is None else RMQ4

    def inner(self, path: Path) -> str:
        """`path` (on this machine) as the node sees it: relative to its chroot, if any."""
        return str(path) if self.root is None else "/" + str(path.relative_to(self.root))

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


_RECORDED = Path("(recorded)")  # _ctl's root: the one node `name`'s record names


def _root_of(name: str | None) -> Path | None:
    """The chroot that runs node `name`, from its record; None: the machine's RabbitMQ."""
    node = load_node(name) if name and full_name(name) != DEFAULT_NODE else None
    return node.root if node else None


def _chroot_cmd(root: Path, *cmd: str) -> list[str]:
    chroot = _tool("chroot")
    if chroot is None:
        raise RuntimeError("chroot not found (coreutils)")
    return [chroot, str(root), *cmd]


def _chroot_env(root: Path) -> dict[str, str]:
    """_clean_env() for a program run in the chroot: its own PATH, HOME and locale, and
    Erlang distribution on the loopback only (as the machine's rabbitmq-env.conf has it)."""
    return {**_clean_env(), "PATH": CHROOT_PATH, "HOME": "/var/lib/rabbitmq",
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "ERL_EPMD_ADDRESS": HOST,
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}"}


def _ctl(
    name: str | None, *args: str, timeout: float = CTL_TIMEOUT, check: bool = True,
    root: Path | None = _RECORDED,
) -> subprocess.CompletedProcess[str]:
    """Run rabbitmqctl against node `name` (None: the default node).

    The rabbitmqctl is that of the install that runs the node: the machine's, or
    the chroot's for a 4.x node (`root`; by default the one its record names).
    rabbitmqctl gets the timeout itself: its CLI beam runs in a session of its
    own (the Debian wrapper su's to rabbitmq), which killing `su` would orphan.
    """
    if root is _RECORDED:
        root = _root_of(name)
    flags = [*(["-n", name] if name else []), "--timeout", str(max(int(timeout), 1)), *args]
    if root is None:
        cmd, env = [_need_tool("rabbitmqctl"), *flags], _clean_env()
    else:
        cmd, env = _chroot_cmd(root, "/usr/sbin/rabbitmqctl", *flags), _chroot_env(root)
    try:
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from e
    if check and res.returncode != 0:
        lines = (res.stderr.strip() or res.stdout.strip()).splitlines()
        out = [ln.strip() for ln in lines if ln.strip()][:2]  # the diagnostics trail on
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}): " + " | ".join(out))
    return res


def upgrade(name: str, *args: str, timeout: float = CTL_TIMEOUT) -> None:
    """rabbitmq-upgrade ARGS against node `name` (an extra node), by the install that runs
    it: `drain` puts it in maintenance (it closes every client connection and refuses new
    ones), `revive` puts it back in service."""
    name = full_name(name)
    _refuse_default(name)
    root = _root_of(name)
    flags = ["-n", name, "--timeout", str(max(int(timeout), 1)), *args]
    if root is None:
        cmd, env = [_need_tool("rabbitmq-upgrade"), *flags], _clean_env()
    else:
        cmd, env = _chroot_cmd(root, "/usr/sbin/rabbitmq-upgrade", *flags), _chroot_env(root)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30,
                         stdin=subprocess.DEVNULL, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}): "
                           f"{(res.stderr.strip() or res.stdout.strip())[:300]}")
    _say(f"{name}: rabbitmq-upgrade {' '.join(args)}")


def is_running(name: str, root: Path | None = _RECORDED) -> bool:
    """True when the Erlang node answers (its app may still be stopped)."""
    return _ctl(full_name(name), "ping", timeout=10, check=False, root=root).returncode == 0


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


def _rabbitmq_ids(root: Path) -> tuple[int, int]:
    """uid and gid of user rabbitmq in the chroot `root` (its own /etc/passwd)."""
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "rabbitmq" and len(fields) > 3:
            return int(fields[2]), int(fields[3])
    raise RuntimeError(f"no user rabbitmq in {root}/etc/passwd")


def _chown_rabbitmq(path: Path, root: Path | None = None) -> None:
    """The server runs as user rabbitmq (the Debian wrapper su's to it as root): the
    machine's, or the chroot `root`'s (its own uid)."""
    if os.geteuid() != 0:
        return
    if root is None:
        for p in [path, *path.rglob("*")]:
            shutil.chown(p, "rabbitmq", "rabbitmq")
        return
    uid, gid = _rabbitmq_ids(root)
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, gid, follow_symlinks=False)


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
           "tls_port": node.tls_port, "root": str(node.root) if node.root else None}
    path.write_text(json.dumps(rec) + "\n")


def _load(path: Path) -> Node | None:
    try:
        rec = json.loads(path.read_text())
        tls_port, root = rec.get("tls_port"), rec.get("root")
        return Node(str(rec["name"]), int(rec["port"]), Path(rec["base"]),
                    int(tls_port) if tls_port is not None else None,
                    Path(root) if root else None)
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


# --- RabbitMQ 4: a Debian sid chroot ------------------------------------------------

RMQ4_COMPLETE = ".kzpool-rmq4.json"  # written last in a build, before the rename


def rmq4_dir() -> Path:
    """Where the RabbitMQ 4 chroot is kept between runs: $KZPOOL_RMQ4_DIR."""
    return Path(os.environ.get("KZPOOL_RMQ4_DIR", "/var/tmp/kzpool-rmq4"))


def rmq4_root() -> Path:
    """The finished chroot: it exists only once complete (built beside it, then renamed)."""
    return rmq4_dir() / "root"


def rmq4_ready(root: Path | None = None) -> bool:
    return ((root or rmq4_root()) / RMQ4_COMPLETE).is_file()


def install_version(root: Path | None) -> str:
    """The RabbitMQ version an install carries, read from its files: '3.10.8'."""
    found = sorted(((root or Path("/")) / "usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"))
    return found[-1].name.partition("-")[2] if found else "?"


def _debian_mirror() -> str:
    """The machine's Debian mirror (the first non-security URIs of its deb822 sources, or
    a `deb` line of sources.list), else deb.debian.org."""
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list.d/debian.sources").read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                return words[1]
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            urls = [w for w in line.split()[1:] if "://" in w]
            if line.startswith("deb ") and urls and "security" not in urls[0]:
                return urls[0]
    return RMQ4_MIRROR


def _unescape_mount(path: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code in ("040", "011", "012", "134"):
        path = path.replace("\\" + code, chr(int(code, 8)))
    return path


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first."""
    top = Path(os.path.realpath(path))
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = Path(_unescape_mount(line.split()[4]))
            if point == top or top in point.parents:
                found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unmount_all(path: Path) -> None:
    for point in _mounts_under(path):
        res = subprocess.run(["umount", str(point)], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=60)
        if res.returncode != 0:  # busy: detach it now, the kernel frees it when unused
            subprocess.run(["umount", "-l", str(point)], capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=60)


def _pids_in(path: Path) -> list[int]:
    """Processes whose root or working directory is at or below `path`."""
    top = os.path.realpath(path)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for link in ("root", "cwd"):
            with contextlib.suppress(OSError):
                where = os.readlink(entry / link)
                if where == top or where.startswith(top + "/"):
                    found.append(int(entry.name))
                    break
    return found


def _remove_tree(path: Path) -> None:
    """rm -rf a chroot, never through a mount point (its proc, sys, a bound /dev): each
    is unmounted first, and the tree is left alone if one stays or a process runs in it."""
    busy = _pids_in(path)
    if busy:
        raise RuntimeError(f"{path}: processes {busy} run in it: not removing it")
    _unmount_all(path)
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"{path}: still mounted: {', '.join(map(str, left))}")
    shutil.rmtree(path)


@contextlib.contextmanager
def _rmq4_lock(what: str) -> Iterator[None]:
    top = rmq4_dir()
    top.mkdir(parents=True, exist_ok=True)
    with open(top / f".{what}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _install_debootstrap() -> str:
    if shutil.which("apt-get") is None:
        raise RuntimeError("debootstrap is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "debootstrap"]
    for cmd in (install, ["apt-get", "update"], install):  # update only if need be
        _say("running: " + " ".join(cmd))
        ok = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode == 0
        if ok and cmd is install and _tool("debootstrap"):
            break
    path = _tool("debootstrap")
    if path is None:
        raise RuntimeError("could not install debootstrap: apt-get install -y debootstrap")
    return path


MACHINE_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")


def _prepare_chroot(root: Path) -> None:
    """What the chroot's nodes need besides debootstrap's work (idempotent; nothing may run
    in the chroot): an /etc/hosts that resolves localhost (minbase writes none, and a node
    named ...@localhost then waits forever in its prelaunch phase), and the Erlang cookie of
    the machine's rabbitmq user (one for every node, as the machine's nodes share theirs:
    the chroot's nodes cluster, and the machine's rabbitmqctl reaches them too), or one
    made here if the machine has none."""
    hosts = root / "etc/hosts"
    known = hosts.read_text() if hosts.exists() else ""
    if not any(line.split()[1:2] == ["localhost"] for line in known.splitlines()
               if line.strip() and not line.startswith("#")):
        hosts.write_text(f"127.0.0.1 localhost\n::1 localhost ip6-localhost\n{known}")
    cookie = root / "var/lib/rabbitmq/.erlang.cookie"
    try:
        wanted = MACHINE_COOKIE.read_text().strip()
    except OSError:
        wanted = ""
    if not wanted and cookie.exists():
        return
    if not wanted:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        wanted = "".join(alphabet[b % 26] for b in os.urandom(20))
    with contextlib.suppress(OSError):
        if cookie.read_text().strip() == wanted:
            return
    cookie.unlink(missing_ok=True)
    cookie.write_text(wanted)
    uid, gid = _rabbitmq_ids(root)
    os.chown(cookie, uid, gid)
    cookie.chmod(0o400)


def ensure_rmq4() -> Path:
    """The RabbitMQ 4 chroot (Debian sid's rabbitmq-server), built if need be; its path.

    Made once per machine by `debootstrap --variant=minbase --include=rabbitmq-server sid`
    from the machine's Debian mirror (~3 minutes, ~600 MB) in a directory beside it, renamed
    into place when complete: an interrupted build is never taken for a finished one (the
    next call removes it and starts over).  Concurrent callers wait for one build; once it
    is there, a call returns at once.
    """
    root = rmq4_root()
    if rmq4_ready(root):
        return root
    if os.geteuid() != 0:
        raise RuntimeError("building the RabbitMQ 4 chroot needs root (debootstrap, chroot): "
                           "sudo python3 scripts/brokers.py rmq4 ensure")
    top = rmq4_dir()
    with _rmq4_lock("build"):
        if rmq4_ready(root):
            return root
        if root.exists():
            raise RuntimeError(f"{root} exists but is not a finished chroot (no "
                               f"{RMQ4_COMPLETE}): remove it (brokers.py rmq4 remove)")
        for stale in sorted(top.glob("build-*")):
            _say(f"removing an unfinished build: {stale}")
            _remove_tree(stale)
        debootstrap = _tool("debootstrap") or _install_debootstrap()
        build, mirror, log_path = top / f"build-{os.getpid()}", _debian_mirror(), top / "build.log"
        cmd = [debootstrap, "--variant=minbase", "--include=rabbitmq-server", RMQ4_SUITE,
               str(build), mirror]
        _say(f"building the RabbitMQ 4 chroot (~3 minutes, ~600 MB): {' '.join(cmd)}; "
             f"log: {log_path}")
        started = time.monotonic()
        with open(log_path, "wb") as log:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode
        _unmount_all(build)  # debootstrap unmounts what it mounted; a failure may not have
        version = install_version(build)
        if rc != 0 or not (build / "usr/sbin/rabbitmq-server").exists():
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            with contextlib.suppress(RuntimeError, OSError):
                _remove_tree(build)
            raise RuntimeError(f"debootstrap failed (exit {rc}); tail of {log_path}:\n"
                               + "\n".join(tail))
        _prepare_chroot(build)
        seconds = time.monotonic() - started
        record = {"rabbitmq": version, "suite": RMQ4_SUITE, "mirror": mirror,
                  "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds)}
        (build / RMQ4_COMPLETE).write_text(json.dumps(record) + "\n")
        os.rename(build, root)
    _say(f"RabbitMQ {version} chroot ready in {root} (built in {seconds:.0f} s)")
    return root


def _mount_proc(root: Path) -> None:
    """/proc in the chroot, mounted once (by the first node that starts there)."""
    with _rmq4_lock("mount"):
        if not _pids_in(root):  # nothing runs there: a cookie may change
            _prepare_chroot(root)  # a chroot built by an earlier version of this script
        if not os.path.ismount(root / "proc"):
            subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True,
                           capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


def release_rmq4(root: Path | None = None) -> bool:
    """Unmount the chroot's /proc if nothing runs in it any more; True if nothing does."""
    root = root or rmq4_root()
    if not root.exists():
        return True
    with _rmq4_lock("mount"):
        if _pids_in(root):
            return False
        _unmount_all(root)
    return True


def remove_rmq4() -> None:
    """Remove the chroot (none of its nodes may be recorded or running)."""
    root = rmq4_root()
    recorded = [n.name for n in recorded_nodes() if n.root == root]
    if recorded:
        raise RuntimeError(f"nodes of the chroot are recorded: {', '.join(recorded)}: "
                           "stop them first (brokers.py down)")
    with _rmq4_lock("build"):
        for tree in [root, *sorted(rmq4_dir().glob("build-*"))]:
            if tree.exists():
                _remove_tree(tree)
                _say(f"removed {tree}")


def _rmq4_status() -> None:
    root = rmq4_root()
    if not rmq4_ready(root):
        print(f"RabbitMQ 4 chroot: not built ({root}); brokers.py rmq4 ensure")
        return
    record: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((root / RMQ4_COMPLETE).read_text())
    proc = "mounted" if os.path.ismount(root / "proc") else "not mounted"
    print(f"RabbitMQ 4 chroot: {root}: RabbitMQ {install_version(root)}, "
          f"built {record.get('built', '?')} in {record.get('seconds', '?')} s "
          f"from {record.get('mirror', '?')}; /proc {proc}; {len(_pids_in(root))} processes")


# --- extra nodes -----------------------------------------------------------------


CLIENT_MEMORY = ("connection_readers", "connection_writers", "connection_channels",
                 "connection_other")  # memory_breakdown's categories for client connections


def memory_breakdown(name: str | None, timeout: float = CTL_TIMEOUT) -> dict[str, int]:
    """`rabbitmq-diagnostics memory_breakdown` of node `name` (None: the default node), by the
    install that runs it: bytes per category (CLIENT_MEMORY: the connections' and channels')."""
    root = _root_of(name)
    flags = [*(["-n", full_name(name)] if name else []), "--timeout", str(max(int(timeout), 1)),
             "memory_breakdown", "--unit", "bytes", "--formatter", "json"]
    if root is None:
        cmd, env = [_need_tool("rabbitmq-diagnostics"), *flags], _clean_env()
    else:
        cmd = _chroot_cmd(root, "/usr/sbin/rabbitmq-diagnostics", *flags)
        env = _chroot_env(root)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30,
                         stdin=subprocess.DEVNULL, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}): "
                           f"{(res.stderr.strip() or res.stdout.strip())[:300]}")
    try:
        rows = json.loads(res.stdout)
        return {key: int(row["bytes"]) for key, row in rows.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RuntimeError(f"{' '.join(cmd)}: unexpected output {res.stdout[:200]!r}") from e


def collect_garbage(name: str, timeout: float = CTL_TIMEOUT) -> None:
    """A full garbage collection of every Erlang process of extra node `name`, so that a
    memory_breakdown after it shows what its processes hold at rest, not heaps grown by
    traffic (never the default node: it serves other people's tests)."""
    name = full_name(name)
    _refuse_default(name)
    _ctl(name, "eval", "[erlang:garbage_collect(P) || P <- erlang:processes()], ok.",
         timeout=timeout)


def client_counts(name: str | None, vhost: str | None = None,
                  timeout: float = CTL_TIMEOUT) -> tuple[int, int]:
    """Client connections and channels open on node `name` (None: the default node), on
    `vhost` only if one is named."""
    counts = []
    for what in ("list_connections", "list_channels"):  # (neither takes a vhost to list)
        res = _ctl(name and full_name(name), what, "vhost", "--no-table-headers", "--quiet",
                   timeout=timeout)
        rows = [line.strip() for line in res.stdout.splitlines() if line.strip()]
        counts.append(sum(1 for row in rows if vhost is None or row == vhost))
    return counts[0], counts[1]


def start_node(name: str, port: int, base: Path | None = None, timeout: float = 90,
               tls_port: int | None = None, certs: Certs | None = None,
               rabbitmq: int | None = None, conf: Sequence[str] = ()) -> Node:
    """Start (or find already running) an independent node listening on `port`.

    `conf`: more lines of its rabbitmq.conf (`consumer_timeout = 5000`; DENY_DEPRECATED),
    for a node started here (one found running keeps the config it has).

    With `tls_port` and `certs`, the node also listens for TLS there (its certificate is
    `certs.server_cert`; it verifies clients against `certs.ca` and refuses a client that
    presents no certificate).  `rabbitmq` picks the install that runs it: 3, the machine's
    package, or 4, the chroot's (made by ensure_rmq4 if need be); None: the install of the
    node's record if there is one (a node killed and started again), else the machine's.
    """
    name = full_name(name)
    _refuse_default(name)
    if DEFAULT_PORT in (port, tls_port):
        raise ValueError(f"port {DEFAULT_PORT} belongs to the default node")
    if (tls_port is None) != (certs is None):
        raise ValueError("a TLS listener needs both tls_port and certs")
    if rabbitmq not in (None, SYSTEM_RABBITMQ, RMQ4):
        raise ValueError(f"RabbitMQ {rabbitmq}: only {SYSTEM_RABBITMQ} (the machine's) "
                         f"or {RMQ4} (the chroot's)")
    if rabbitmq is None:
        recorded = load_node(name)
        rabbitmq = recorded.rabbitmq if recorded else SYSTEM_RABBITMQ
    root = ensure_rmq4() if rabbitmq == RMQ4 else None
    if base is None:
        base = state_dir() / name if root is None else root / NODES_IN_CHROOT / name
    elif root is not None and not Path(base).is_relative_to(root):
        raise ValueError(f"a RabbitMQ 4 node's directory must be inside {root}")
    node = Node(name, port, Path(base), tls_port, root)
    deadline = time.monotonic() + timeout
    with _lock(name):
        known = load_node(name)
        if known is not None and known.root != root:  # recorded as run by the other install
            if is_running(name, root=known.root):
                raise RuntimeError(f"{name} is running RabbitMQ {known.rabbitmq}: stop it "
                                   f"before starting it with RabbitMQ {rabbitmq}")
            shutil.rmtree(known.base, ignore_errors=True)
            known = None
        pid = _read_pid((known or node).pid_file)
        live = pid is not None and _pid_alive(pid) and _is_beam_of(pid, name)
        if live or is_running(name, root=root):  # never launch a second beam: it would break
            if known is None:                     # the first
                _save(node)
            if not port_open(port):
                start_app(name, timeout=max(deadline - time.monotonic(), 1))
            return known or node
        for taken in (p for p in (port, tls_port) if p is not None and port_open(p)):
            raise RuntimeError(f"port {taken} is already taken by something other than {name}")

        if root is None:
            server, env = [_need_tool("rabbitmq-server")], _clean_env()
        else:
            _mount_proc(root)
            server = _chroot_cmd(root, "/usr/sbin/rabbitmq-server")
            env = _chroot_env(root)
        version = f"RabbitMQ {install_version(root)}"
        _say(f"starting {name} ({version}) on port {port} in {node.base}")
        node.base.mkdir(parents=True, exist_ok=True)
        text = f"listeners.tcp.local = {HOST}:{port}\nloopback_users = none\n"
        if tls_port is not None and certs is not None:
            text += _tls_listener(node, tls_port, certs)
        text += "".join(f"{line.strip()}\n" for line in conf)
        (node.base / "rabbitmq.conf").write_text(text)
        node.pid_file.unlink(missing_ok=True)  # a stale one would fool `wait`
        _save(node)
        _chown_rabbitmq(node.base, root)
        env.update({
            "RABBITMQ_CONFIG_FILE": node.inner(node.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": node.inner(node.base / "enabled_plugins"),
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(port + DIST_PORT_OFFSET),
            "RABBITMQ_MNESIA_BASE": node.inner(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": node.inner(node.base / "log"),
            "RABBITMQ_PID_FILE": node.inner(node.pid_file),
        })
        try:
            with open(node.base / "startup.log", "ab") as log:
                rc = subprocess.run(
                    [*server, "-detached"],
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
            _ctl(name, "wait", node.inner(node.pid_file), timeout=left, root=root)
            for listening in (p for p in (port, tls_port) if p is not None):
                _wait_port(listening, True, max(deadline - time.monotonic(), 1),
                           f"{name} to accept on port {listening}")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(
                f"could not start {name} ({version}) on port {port} (dist port "
                f"{port + DIST_PORT_OFFSET}): {e}\n{_log_tail(node)}"
            ) from e
    _say(f"{name} up ({version}): {node.url}")
    return node


def stop_node(node_or_name: Node | str, timeout: float = 60) -> None:
    """Stop an extra node (fine if already stopped) and remove its directory."""
    name = full_name(node_or_name if isinstance(node_or_name, str) else node_or_name.name)
    _refuse_default(name)
    with _lock(name):
        node = node_or_name if isinstance(node_or_name, Node) else load_node(name)
        pid = _read_pid(node.pid_file) if node else None
        root = node.root if node else _RECORDED
        res = _ctl(name, "stop", "--idempotent", timeout=timeout, check=False, root=root)
        if res.returncode != 0 and is_running(name, root=root):
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
            f"ssl_options.cacertfile = {node.inner(tls / certs.ca.name)}\n"
            f"ssl_options.certfile = {node.inner(tls / certs.server_cert.name)}\n"
            f"ssl_options.keyfile = {node.inner(tls / certs.server_key.name)}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n")


# --- clusters ----------------------------------------------------------------------


def cluster_members(name: str) -> set[str]:
    """The nodes of `name`'s cluster (running or not), as `name` knows them."""
    res = _ctl(full_name(name), "cluster_status", "--formatter", "json", timeout=30)
    status = json.loads(res.stdout)
    return set(status.get("disk_nodes", [])) | set(status.get("ram_nodes", []))


def start_cluster(nodes: Sequence[tuple[str, int]], timeout: float = 120,
                  rabbitmq: int | None = None) -> list[Node]:
    """Start each node (or find it running) and join every one to the first's cluster.

    Idempotent: a node already in the first one's cluster is left alone.  `rabbitmq` as
    for start_node (the nodes of one cluster run one install).
    """
    if rabbitmq == RMQ4:
        ensure_rmq4()  # once, before the boots
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:  # boots overlap
        started = list(pool.map(lambda spec: start_node(spec[0], spec[1], timeout=timeout,
                                                        rabbitmq=rabbitmq), nodes))
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
    system = f"rabbitmq {install_version(None)}"
    print(f"{DEFAULT_NODE:<24} port {DEFAULT_PORT:<6} {up:<12} {system:<16} (default node)")
    for n in recorded_nodes():
        pid = _read_pid(n.pid_file)
        alive = pid is not None and _pid_alive(pid)
        state = "up" if port_open(n.port) else "app stopped" if alive else "down"
        version = f"rabbitmq {install_version(n.root)}"
        tls = f" tls {n.tls_port}" if n.tls_port is not None else ""
        print(f"{n.name:<24} port {n.port:<6} {state:<12} {version:<16} "
              f"pid {pid if alive else '-'}{tls}  {n.base}")
    _rmq4_status()


def _down() -> int:
    failed = 0
    roots = {n.root for n in recorded_nodes() if n.root is not None} | {rmq4_root()}
    for n in recorded_nodes():
        try:
            stop_node(n)
        except (RuntimeError, OSError) as e:
            _say(f"error stopping {n.name}: {e}")
            failed += 1
    for root in roots:  # the chroots' /proc, once none of their nodes runs
        if not release_rmq4(root):
            _say(f"{root}: processes still run in it; its /proc stays mounted")
    if not failed:
        _say("no extra nodes left")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brokers.py", description="Local RabbitMQ nodes for kzpool.")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="default node + kzp1..kzpN on ports 5701.. (with "
                        f"--rabbitmq 4: {RMQ4_DEFAULT_NODE} on {RMQ4_DEFAULT_PORT} + "
                        f"kz4p1..kz4pN on {RMQ4_DEFAULT_PORT + 1}..)")
    up.add_argument("--nodes", type=int, default=1)
    sub.add_parser("down", help="stop every extra node recorded (never the default)")
    sub.add_parser("status", help="list nodes")
    sub.add_parser("ensure-default", help="install/start the default node if needed")
    start = sub.add_parser("start", help="start an extra node")
    start.add_argument("name")
    start.add_argument("port", type=int)
    start.add_argument("--tls-port", type=int, help="also listen for TLS on this port")
    start.add_argument("--certs", type=Path, help="a directory made by `certs` (with --tls-port)")
    start.add_argument("--conf", action="append", default=[], metavar="'KEY = VALUE'",
                       help="one more line of the node's rabbitmq.conf (repeatable), e.g."
                            " 'consumer_timeout = 5000'")
    start.add_argument("--deny-deprecated", action="store_true",
                       help="deny global_qos and transient non-exclusive queues, as RabbitMQ"
                            " 4.3 does by default")
    certs = sub.add_parser("certs", help="make a CA, a server and a client certificate in DIR")
    certs.add_argument("dir", type=Path)
    cluster = sub.add_parser("cluster", help="start nodes and join them to the first")
    cluster.add_argument("nodes", nargs="+", metavar="NAME:PORT")
    for cmd in ("stop", "stop-app", "start-app", "kill", "drain", "revive"):
        sub.add_parser(cmd).add_argument("name")
    for cmd_parser in (up, start, cluster):
        cmd_parser.add_argument(
            "--rabbitmq", type=int, choices=(SYSTEM_RABBITMQ, RMQ4), default=None,
            help=f"{SYSTEM_RABBITMQ}: the machine's RabbitMQ (default); {RMQ4}: the RabbitMQ 4 "
                 "chroot's (built first if need be)")
    ctl = sub.add_parser("ctl", help="rabbitmqctl -n NAME ARGS, by the install that runs NAME "
                                     f"({DEFAULT_NODE}: the machine's)")
    ctl.add_argument("name")
    ctl.add_argument("args", nargs=argparse.REMAINDER)
    rmq4 = sub.add_parser("rmq4", help="the RabbitMQ 4 chroot: build it once per machine "
                                       "(ensure), show it (status), remove it (remove)")
    rmq4.add_argument("action", choices=("ensure", "status", "remove"))
    args = p.parse_args(argv)

    try:
        if args.cmd == "up" and args.rabbitmq == RMQ4:
            print(start_node(RMQ4_DEFAULT_NODE, RMQ4_DEFAULT_PORT, rabbitmq=RMQ4).url)
            for i in range(1, args.nodes + 1):
                print(start_node(f"kz4p{i}@localhost", RMQ4_DEFAULT_PORT + i,
                                 rabbitmq=RMQ4).url)
        elif args.cmd == "up":
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
            conf = [*args.conf, *(DENY_DEPRECATED if args.deny_deprecated else ())]
            node = start_node(args.name, args.port, tls_port=args.tls_port, certs=tls,
                              rabbitmq=args.rabbitmq, conf=conf)
            print(node.url if node.tls_port is None else f"{node.url}\n{node.tls_url}")
        elif args.cmd == "certs":
            made = make_certs(args.dir)
            print("\n".join(str(p) for p in (made.ca, made.server_cert, made.server_key,
                                              made.client_cert, made.client_key)))
        elif args.cmd == "cluster":
            specs = [(n.rpartition(":")[0], int(n.rpartition(":")[2])) for n in args.nodes]
            for node in start_cluster(specs, rabbitmq=args.rabbitmq):
                print(node.url)
        elif args.cmd == "stop":
            stop_node(args.name)
        elif args.cmd == "stop-app":
            stop_app(args.name)
        elif args.cmd == "start-app":
            start_app(args.name)
        elif args.cmd == "kill":
            kill_node(args.name)
        elif args.cmd in ("drain", "revive"):
            upgrade(args.name, args.cmd)
        elif args.cmd == "ctl":
            name = full_name(args.name)
            res = _ctl(None if name == DEFAULT_NODE else name, *args.args, check=False)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            return res.returncode
        elif args.cmd == "rmq4" and args.action == "ensure":
            print(ensure_rmq4())
        elif args.cmd == "rmq4" and args.action == "status":
            _rmq4_status()
        elif args.cmd == "rmq4":
            remove_rmq4()
    except (RuntimeError, ValueError, OSError) as e:
        _say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
