"""The package's shape: no import cycle between its modules, none too big, the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import kzpool

PACKAGE = Path(kzpool.__file__).resolve().parent
MAX_LINES = 420  # "about 400"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every kzpool module ``name`` imports, at any depth of its code: under
    ``TYPE_CHECKING`` and inside functions too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from a import b": the module a.b if there is one, else the package a
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules() -> None:
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(f"{t}.")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_too_big() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert not {n: s for n, s in sizes.items() if s > MAX_LINES}


def test_one_folder_per_process() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders >= {"common", "master", "worker", "lease", "client", "aio", "consumer"}


# ----- the blocking and asyncio twins ------------------------------------------------------------

# Operations one twin has and the other has not, and why: each twin module holds the same
# classes with the same names, over the shared core in kzpool/lease/.
ONLY_BLOCKING = {
    "PoolClient": {"lease": "the blocking client makes leases; kzpool.aio's Connection makes"
                            " channels (aio-pika's shape)"},
    "LeaseLink": dict.fromkeys(
        ("pump", "drain", "flush", "wait", "wait_confirm", "sock"),
        "nothing reads a blocking lease's socket in the background: its owner reads in calls")
    | dict.fromkeys(("lost", "failed"), "a blocking lease recovers in its next call, so it"
                                        " keeps its loss until then")
    | {"publish": "a publish without confirms is sent again if the worker went before reading"
                  " it (the next call recovers first)",
       "aborted": "federators give up a blocking lease through an abort callable"},
    "Bound": dict.fromkeys(("pump", "drain", "flush"), "read by its owner, not by a loop"),
}
ONLY_ASYNCIO = {
    "LeaseLink": dict.fromkeys(("recover", "changed", "send_call"),
                               "recovery runs in a task of its own; waiters wake on changes")
    | dict.fromkeys(("paused", "writable", "wait_unblocked"),
                    "asyncio's write buffer and flow control are awaited")
    | {"read_up": "a settle lets the loop read what came while a coroutine held it (a"
                  " blocking settle reads the socket itself)"},
    "Bound": dict.fromkeys(("attach", "call", "take_get", "live"),
                           "a stream attached to the loop resolves each call's future"),
}
TWINS = ("pool", "link", "recovery", "bound")


def operations(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_blocking_and_asyncio_twins_offer_the_same_operations() -> None:
    import importlib

    for name in TWINS:
        blocking = importlib.import_module(f"kzpool.client.{name}")
        asyncio_ = importlib.import_module(f"kzpool.aio.{name}")
        classes = {n for n, v in vars(blocking).items()
                   if isinstance(v, type) and v.__module__ == blocking.__name__
                   and not n.startswith("_") and n in vars(asyncio_)}
        assert classes, f"kzpool.client.{name} and kzpool.aio.{name} share no class name"
        for cls in classes:
            ours, theirs = operations(getattr(blocking, cls)), operations(getattr(asyncio_, cls))
            assert ours - theirs == set(ONLY_BLOCKING.get(cls, {})), (name, cls)
            assert theirs - ours == set(ONLY_ASYNCIO.get(cls, {})), (name, cls)
