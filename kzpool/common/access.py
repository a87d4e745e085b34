"""Who may use the pool: every peer's credentials (SO_PEERCRED) against the allowed users and
groups.  The socket's file mode is a first fence; this check holds even if that mode is
opened up.  The default allows the service's own user and group only.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

from .sockets import FILE_LIMIT_ERRORS

_UCRED = struct.Struct("3i")


def to_uids(text: str) -> frozenset[int]:
    """User names or numeric uids, separated by commas or spaces."""
    return frozenset(_resolve(text, lambda name: pwd.getpwnam(name).pw_uid, "user"))


def to_gids(text: str) -> frozenset[int]:
    """Group names or numeric gids, separated by commas or spaces."""
    return frozenset(_resolve(text, lambda name: grp.getgrnam(name).gr_gid, "group"))


def _resolve(text: str, lookup: object, what: str) -> list[int]:
    ids = []
    for item in text.replace(",", " ").split():
        if item.isdigit():
            ids.append(int(item))
            continue
        try:
            ids.append(lookup(item))  # type: ignore[operator]
        except KeyError:
            raise ValueError(f"no {what} named {item!r}") from None
    return ids


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket, as it was when it
    connected (they stay readable after it hung up).  :class:`OSError` on a closed socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def uid_of(pid: int) -> int | None:
    """The real uid of process ``pid`` (from /proc), ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _groups(pid: int, gid: int) -> set[int]:
    """The peer's primary and supplementary groups (the primary alone if it is gone).
    :class:`OSError` at the file limit: the peer cannot be checked now, so it must be
    turned away as the file limit's, not as refused access."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError as exc:
        if exc.errno in FILE_LIMIT_ERRORS:
            raise
    return groups


class Access:
    def __init__(self, uids: frozenset[int], gids: frozenset[int]) -> None:
        self.uids = uids or frozenset({os.getuid()})
        self.gids = gids or frozenset({os.getgid()})

    def refusal(self, sock: socket.socket) -> str | None:
        """``None`` if the peer may use the pool, else why not (for the peer to read)."""
        return self.refusal_for(*peer(sock))

    def refusal_for(self, pid: int, uid: int, gid: int) -> str | None:
        """:meth:`refusal` of a peer whose credentials were read already; :class:`OSError`
        if its groups cannot be read at the file limit."""
        if uid in self.uids or _groups(pid, gid) & self.gids:
            return None
        return (f"access refused: uid {uid} (pid {pid}) is not among the allowed users or"
                f" groups ([pool] allow_users, allow_groups)")
