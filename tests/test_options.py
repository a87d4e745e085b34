"""A lease's options: one value, checked as it is made, carried whole to the worker's
session on every path (asked at a worker directly, placed by the master, after a move);
refusals as data."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import kzpool
import kzpool.aio
from kzpool.common import codec, errors, messages
from kzpool.common.options import LeaseOptions, OptionFields
from kzpool.testing import DEFAULT_URI, wait_for

# ----- the value --------------------------------------------------------------------------------


def test_every_option_is_a_keyword_of_channel() -> None:
    """But those the connection sets (its metadata says so): a caller naming one is told."""
    fields = dataclasses.fields(LeaseOptions)
    assert set(OptionFields.__annotations__) == {f.name for f in fields if not f.metadata}
    assert {f.name for f in fields if f.metadata} == {"connection_id"}
    with pytest.raises(kzpool.LeaseRequestError, match="set by the connection") as caught:
        LeaseOptions.of(connection_id="mine")
    assert caught.value.fields["option"] == "connection_id"
    with pytest.raises(kzpool.LeaseRequestError, match="'no way' is not 1 to 64"):
        LeaseOptions(connection_id="no way")


def test_each_connection_object_gives_its_leases_its_own_id() -> None:
    """The id a worker scopes exclusive queues to: one per connection object, and another
    in a child process after a fork."""
    first, second = kzpool.PoolClient("/x"), kzpool.PoolClient("/x")
    third = kzpool.aio.pool.PoolClient("/x")
    ids = first.identity.value, second.identity.value, third.identity.value
    assert len(set(ids)) == 3 and first.identity.value == ids[0]
    given = LeaseOptions(zone="z", connection_id=ids[1])  # options copied from another's lease
    assert given.for_connection(ids[0]) == LeaseOptions(zone="z", connection_id=ids[0])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, first.identity.value.encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 64).decode() not in ("", ids[0])
    os.close(read)
    os.close(write)


@pytest.mark.parametrize(("fields", "option", "text"), [
    ({"kind": "wobbly"}, "kind", "unknown lease kind 'wobbly'"),
    ({"kind": "sticky"}, "broker", "sticky lease needs a broker URI"),
    ({"broker": "amqp://h/"}, "broker", "a float lease takes no broker"),
    ({"kind": "sticky", "broker": "amqp://h/?heartbeat=1"}, "broker", "takes no options"),
    ({"timeout": -1}, "timeout", "timeout -1 is not between 0 and 3600"),
    ({"zonee": "east"}, "zonee", "unknown lease option 'zonee'"),
])
def test_a_bad_option_is_named_where_the_lease_is_asked_for(fields: dict[str, Any], option: str,
                                                             text: str) -> None:
    with pytest.raises(kzpool.LeaseRequestError, match=text) as caught:
        LeaseOptions.of(**fields)
    assert caught.value.fields["option"] == option


def test_the_options_cross_the_wire_whole_and_are_checked_as_they_are_read() -> None:
    request = messages.LeaseRequest(LeaseOptions("sticky", broker="amqp://u:p@h/", timeout=3.5),
                                    lease="abc", wait=2.0)
    assert messages.decode(messages.encode(request)[8:], messages.TO_MASTER_FROM_CLIENT) \
        == request
    bad = {"op": "lease", "options": {"kind": "float", "broker": "amqp://h/"}}
    with pytest.raises(kzpool.LeaseRequestError, match="a float lease takes no broker"):
        messages.from_wire(bad, messages.TO_MASTER_FROM_CLIENT)
    with pytest.raises(kzpool.ProtocolError, match=r"lease\.options\.kind"):
        codec.build(messages.LeaseRequest, {"options": {"kind": 7}}, "lease")


def test_a_refusal_carries_its_code_and_setting_to_the_error_the_client_raises() -> None:
    limit = errors.LimitExceeded("over 8 leases ([pool] max_leases_per_process = 8)",
                                 "max_leases_per_process")
    refused = messages.Refused.of(limit)
    assert (refused.code, refused.setting) == ("limit", "max_leases_per_process")
    again = messages.from_wire(codec.to_wire(refused), messages.TO_CLIENT)
    assert isinstance(again, messages.Refused)
    error = again.exception()
    assert isinstance(error, kzpool.LimitExceeded) and error.setting == "max_leases_per_process"
    for code, cls in errors.REFUSALS.items():
        assert type(messages.Refused(code, "why").exception()) is cls
    assert type(messages.Refused("who-knows", "why").exception()) is kzpool.KzpoolError


# ----- the value, end to end ---------------------------------------------------------------------

# Loaded at start-up (sitecustomize) by the pool and by the client below: a throwaway lease
# option, "probe", added where options are declared and nowhere else.
ADD_PROBE = '''
import dataclasses, importlib.abc, importlib.util, sys

class AddProbe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "kzpool.common.options":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            probe = dataclasses.make_dataclass(
                "LeaseOptions", [("probe", str, dataclasses.field(default=""))],
                bases=(module.LeaseOptions,), frozen=True, slots=True)
            probe.__module__ = name
            module.LeaseOptions = probe
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, AddProbe())
'''

CLIENT = textwrap.dedent('''
    import sys, kzpool
    connection = kzpool.connect()
    first = connection.channel(probe="via-master")   # no route yet: the master places it
    second = connection.channel(probe="direct")      # its worker's socket, asked directly
    print(first.id, second.id, flush=True)
    sys.stdin.readline()                             # its worker is killed meanwhile
    first.queue_declare("")                          # moves (placed again), then goes on
    print("moved", flush=True)
''')


def sessions(log: str, lease: str) -> list[tuple[str, str]]:
    """(worker pid, options) of each session the pool's log shows for ``lease``."""
    found = []
    for line in log.splitlines():
        if f"kzpool.session: lease {lease} on channel" in line:
            found.append((line.split()[2], line.split(": ", 2)[-1]))
    return found


def test_a_new_option_reaches_the_worker_on_every_path_and_after_a_move(pools: Any,
                                                                        tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(ADD_PROBE)
    env = {"PYTHONPATH": str(tmp_path)}
    pool = pools([DEFAULT_URI], log_level="debug").start(env=env)
    pool.wait_ready()
    client = subprocess.Popen([sys.executable, "-c", CLIENT], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, **env, "KZPOOL_SOCKET": pool.socket})
    try:
        assert client.stdout is not None and client.stdin is not None
        first, second = client.stdout.readline().split()
        log = pool.logs()
        assert f"lease {first} placed here by the master" in log
        assert f"lease {second} asked for here" in log
        ((worker, options),) = sessions(log, first)
        assert "probe='via-master'" in options
        assert "probe='direct'" in sessions(log, second)[0][1]
        os.kill(int(worker), signal.SIGKILL)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "moved"
        assert client.wait(30) == 0
    finally:
        client.kill()
    moved = wait_for(lambda: sessions(pool.logs(), first)[1:], 10, "the moved session")
    assert moved[0][0] != worker and "probe='via-master'" in moved[0][1]
