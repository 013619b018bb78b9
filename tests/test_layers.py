"""The layers of docs/architecture.md, read from the source with ``ast``.

Every import counts: at module level, inside functions (deferred for
start-up time) and under ``TYPE_CHECKING`` (a type is a dependency too).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("supervisor", "events", "plugins", "rootfs")

# (importer prefix, imported prefix, why not): a module under the first may
# not import anything under the second.
FORBIDDEN = [
    ("events", "supervisor", "events imports nothing of ours"),
    ("events", "plugins", "events imports nothing of ours"),
    ("events", "rootfs", "events imports nothing of ours"),
    ("rootfs", "supervisor", "rootfs is used by the runtime, never the reverse"),
    ("rootfs", "plugins", "rootfs is used by the runtime, never the reverse"),
    ("supervisor", "plugins", "the supervisor loads plugins by entry point, never by import"),
    ("supervisor._errors", "supervisor.", "the exception tree is a leaf"),
    ("supervisor._runtime", "supervisor._core", "the runtime is below the supervisor core"),
    ("supervisor._runtime", "supervisor._control", "the runtime is below the control plane"),
    ("supervisor._runtime", "supervisor._cli", "the runtime is below the CLI"),
    ("supervisor._core", "supervisor._control", "the core is below the control plane"),
    ("supervisor._core", "supervisor._cli", "the core is below the CLI"),
    ("supervisor._control", "supervisor._cli", "the control plane is below the CLI"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """The modules of ours that *name* imports, with the line of each import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from pkg import submodule`` depends on the submodule.
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph[name] = set()
        for target, _ in _imports(name, path):
            # ``import a.b.c`` names a module of ours or a name inside one.
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def _under(name: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def test_the_source_tree_is_what_the_test_reads() -> None:
    """The walk finds the layers' packages (so the rules below test something)."""
    for pkg in ("supervisor._runtime._linux", "supervisor._core", "supervisor._control"):
        assert pkg in MODULES
    assert "supervisor._cli" in MODULES
    assert len(MODULES) > 50


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN)
def test_no_layer_imports_one_above_it(importer: str, imported: str, why: str) -> None:
    """A lower layer never imports a higher one (docs/architecture.md)."""
    bad = [
        f"{name}:{line} imports {target}"
        for name, path in MODULES.items()
        if _under(name, importer)
        for target, line in _imports(name, path)
        if _under(target, imported)
    ]
    assert not bad, f"{why}: " + "; ".join(bad)


def test_there_are_no_import_circles() -> None:
    """No module depends on itself through others (Tarjan's strongly connected components)."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """The circle finder and the rules flag a planted circle and an upward import."""
    saved = dict(MODULES)
    a = tmp_path / "a.py"
    b = tmp_path / "b.py"
    a.write_text("from supervisor._control import _server\n")
    b.write_text("def f() -> None:\n    from supervisor._runtime import _planted_a\n")
    try:
        MODULES["supervisor._runtime._planted_a"] = a
        MODULES["supervisor._control._server_planted"] = b
        # a (runtime) imports the control plane: a rule breaks.
        bad = [t for t, _ in _imports("supervisor._runtime._planted_a", a)]
        assert any(_under(t, "supervisor._control") for t in bad)
        # b imports a, a imports control._server: no circle yet; b -> a -> b is one.
        a.write_text("from supervisor._control import _server_planted\n")
        graph = _graph()
        assert "supervisor._control._server_planted" in graph["supervisor._runtime._planted_a"]
        assert "supervisor._runtime._planted_a" in graph["supervisor._control._server_planted"]
        with pytest.raises(AssertionError, match="import circles"):
            test_there_are_no_import_circles()
    finally:
        MODULES.clear()
        MODULES.update(saved)
