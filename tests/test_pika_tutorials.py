"""RabbitMQ's six Python tutorials, with only ``pika.BlockingConnection(...)`` swapped for
``kzpool.connect()`` (examples/tutorials/), run as the tutorials run them: separate
processes, found by ``$KZPOOL_SOCKET``, receivers stopped with Ctrl-C.  The pool serves a
vhost of this module's own, so the tutorials' fixed names meet no other test's."""

from __future__ import annotations

import os
import queue as queues
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kzpool.testing import Pool, default_uri

from .conftest import brokers_run

TUTORIALS = Path(__file__).resolve().parent.parent / "examples" / "tutorials"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    vhost = f"kzt-tut-{uuid.uuid4().hex[:8]}"
    brokers_run(["add_vhost", vhost])
    brokers_run(["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])
    served = Pool(Path(tmp_path_factory.mktemp("tutorials")),
                  [default_uri(vhost)], prechannels=4)
    try:
        served.start().wait_ready()
        yield served
    finally:
        served.close()
        brokers_run(["delete_vhost", vhost])


class Script:
    """One tutorial program, running; its output read line by line."""

    def __init__(self, pool: Pool, name: str, *args: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self._eof = False
        self._new: queues.Queue[str | None] = queues.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(TUTORIALS / f"{name}.py"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, env={**os.environ, "KZPOOL_SOCKET": pool.socket})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def expect(self, pattern: str, timeout: float = 20) -> str:
        """The next line (after those seen already) that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queues.Empty:
                raise AssertionError(f"{self.name}: no line like {pattern!r} within"
                                     f" {timeout} s; output: {self.lines}") from None
            if line is None:
                self._eof = True
                raise AssertionError(f"{self.name} exited {self.proc.wait()} before a line"
                                     f" like {pattern!r}; output: {self.lines}")
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def finish(self, timeout: float = 20) -> list[str]:
        """Wait for a program that ends by itself; its whole output."""
        assert self.proc.wait(timeout) == 0, f"{self.name} failed: {self.rest()}"
        return self.rest()

    def interrupt(self) -> list[str]:
        """Ctrl-C, as the tutorials stop their receivers; the rest of the output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return self.rest()

    def rest(self) -> list[str]:
        """Every line, once the program's output has ended."""
        while not self._eof:
            line = self._new.get(timeout=10)
            if line is None:
                self._eof = True
            else:
                self.lines.append(line)
        return self.lines


@pytest.fixture
def run(pool: Pool) -> Iterator[type[Script]]:
    started: list[Script] = []

    class Started(Script):
        def __init__(self, name: str, *args: str) -> None:
            super().__init__(pool, name, *args)
            started.append(self)

    yield Started  # type: ignore[misc]
    for script in started:
        script.interrupt()


def test_hello_world(run: type[Script]) -> None:
    receiver = run("receive")
    receiver.expect(r"Waiting for messages")
    assert run("send").finish() == [" [x] Sent 'Hello World!'"]
    receiver.expect(r"^ \[x\] Received Hello World!$")
    assert receiver.interrupt()[-1] == "Interrupted"


def test_work_queues_share_the_tasks_fairly(run: type[Script]) -> None:
    workers = [run("worker"), run("worker")]
    for worker in workers:
        worker.expect(r"Waiting for messages")
    tasks = ["slow.", "task-1", "task-2", "task-3"]
    for task in tasks:
        run("new_task", task).finish()
    done: dict[str, int] = {}
    deadline = time.monotonic() + 20
    while len(done) < len(tasks):
        assert time.monotonic() < deadline, f"tasks done: {done}"
        for n, worker in enumerate(workers):
            try:
                line = worker.expect(r"Done", timeout=0.2)
            except AssertionError:
                continue
            task = line.split()[-1]
            assert task not in done, f"{task} done twice"
            done[task] = n
    assert set(done.values()) == {0, 1}  # the one sleeping on "slow." holds no other task


def test_publish_subscribe_reaches_every_subscriber(run: type[Script]) -> None:
    subscribers = [run("receive_logs"), run("receive_logs")]
    for subscriber in subscribers:
        subscriber.expect(r"Waiting for logs")
    run("emit_log", "info:", "to", "all").finish()
    for subscriber in subscribers:
        subscriber.expect(r"^ \[x\] info: to all$")


def test_routing_by_severity(run: type[Script]) -> None:
    errors, everything = run("receive_logs_direct", "error"), run(
        "receive_logs_direct", "info", "warning", "error")
    for subscriber in (errors, everything):
        subscriber.expect(r"Waiting for logs")
    run("emit_log_direct", "info", "just", "so").finish()
    run("emit_log_direct", "error", "it", "broke").finish()
    everything.expect(r"^ \[x\] info:just so$")
    everything.expect(r"^ \[x\] error:it broke$")
    errors.expect(r"^ \[x\] error:it broke$")
    assert not any("info" in line for line in errors.lines)  # it came before the error
    usage = run("receive_logs_direct")
    assert usage.proc.wait(20) == 1 and "Usage" in usage.rest()[-1]


def test_topics_by_pattern(run: type[Script]) -> None:
    kernel, critical = run("receive_logs_topic", "kern.*"), run("receive_logs_topic",
                                                                "*.critical")
    for subscriber in (kernel, critical):
        subscriber.expect(r"Waiting for logs")
    run("emit_log_topic", "kern.info", "booted").finish()
    run("emit_log_topic", "kern.critical", "A critical kernel error").finish()
    kernel.expect(r"^ \[x\] kern.info:booted$")
    kernel.expect(r"^ \[x\] kern.critical:A critical kernel error$")
    critical.expect(r"^ \[x\] kern.critical:A critical kernel error$")
    assert not any("booted" in line for line in critical.lines)
    assert kernel.interrupt()[-1] == "Interrupted"


def test_rpc(run: type[Script]) -> None:
    server = run("rpc_server")
    server.expect(r"Awaiting RPC requests")
    assert run("rpc_client").finish(60) == [" [x] Requesting fib(30)", " [.] Got 832040"]
    server.expect(r"fib\(30\)")
