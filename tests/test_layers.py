"""The layout keeps its layers: every module imports only from its own layer or the ones below, no
import cycle exists (lazy imports inside functions included), and no module grows past 500 lines.

Read from the source (ast), so a violation is caught whether or not a test happens to import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500

# Bottom to top: a module may import from its own layer and any layer listed before it.
LAYERS = [
    ("blsgpu.errors", "blsgpu._env", "blsgpu._trace", "blsgpu._provenance", "blsgpu.kernels"),
    ("blsgpu.counters",),
    ("blsgpu.transport",),
    ("blsgpu.exchange",),
    ("blsgpu.world", "blsgpu.backend", "blsgpu._autoload"),
    ("blsgpu.lookup",),
    ("blsgpu.embedding",),
    ("blsgpu.dlrm",),
    ("blsgpu.bench",),
    ("blsgpu.cli", "blsgpu.__main__"),
    ("blsgpu",),  # the package's own __init__: re-exports only
]


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "blsgpu").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "blsgpu.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        files[name] = path
    return files


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def _imports(module: str, path: Path) -> set[str]:
    """The blsgpu modules `module` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]  # a module, or a name in `base`
        else:
            continue
        found.update(n for n in names if n == "blsgpu" or n.startswith("blsgpu."))
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import name lands in (`from blsgpu.x import y`: y may be a name in x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    modules = _module_files()
    graph = {}
    for module, path in modules.items():
        targets = {_resolve(n, modules) for n in _imports(module, path)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def test_every_module_imports_only_its_layer_or_below():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            if target == "blsgpu" and module != "blsgpu":
                wrong.append(f"{module} imports the package root (import the module that defines it)")
            elif _layer(target) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_there_is_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("module", sorted(_module_files()))
def test_no_module_is_longer_than_the_limit(module):
    lines = len(_module_files()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines (limit {MAX_LINES}): split it by job"


def test_the_checker_sees_a_violation():
    # The checks above must be able to fail: an exchange module that imports the embedding layer.
    assert _layer("blsgpu.exchange.channel") < _layer("blsgpu.embedding._sharded")
    tree_imports = _imports("blsgpu.exchange.x", ROOT / "blsgpu" / "exchange" / "__init__.py")
    assert all(n.startswith("blsgpu") for n in tree_imports)
    assert _resolve("blsgpu.transport.base.PointToPoint", _module_files()) == "blsgpu.transport.base"
