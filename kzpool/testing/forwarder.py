"""A TCP forwarder the test controls: in front of a broker, it can go silent.

Silent means packets vanish: nothing is forwarded either way and no connection is closed,
as with a broker behind a dead network path.  Only heartbeats can tell.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class Forwarder:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.silent = False
        self.closing = False
        self.lock = threading.Lock()
        self.peer: dict[socket.socket, socket.socket] = {}  # each side to the other
        self.held: list[socket.socket] = []  # accepted while silent: never answered
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def silence(self) -> None:
        with self.lock:
            self.silent = True

    def resume(self) -> None:
        """Forward again.  The connections of before are dropped: their peers gave up."""
        with self.lock:
            for sock in [*self.peer, *self.held]:
                sock.close()
            self.peer.clear()
            self.held.clear()
            self.silent = False

    def close(self) -> None:
        self.closing = True
        self.thread.join(5)
        self.resume()
        self.listener.close()

    def _run(self) -> None:
        while not self.closing:
            with self.lock:
                watched = [self.listener] + ([] if self.silent else list(self.peer))
            readable, _, _ = select.select(watched, [], [], 0.05)
            with self.lock:
                for sock in readable:
                    if sock is self.listener:
                        self._accept()
                    elif not self.silent and sock in self.peer:
                        self._pump(sock)

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        if self.silent:
            self.held.append(client)
            return
        upstream = socket.create_connection(self.target)
        self.peer[client], self.peer[upstream] = upstream, client

    def _pump(self, source: socket.socket) -> None:
        sink = self.peer[source]
        with contextlib.suppress(OSError):
            data = source.recv(65536)
            if data:
                sink.sendall(data)
                return
        for sock in (source, sink):
            self.peer.pop(sock, None)
            sock.close()
