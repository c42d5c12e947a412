"""The package's shape: no import cycles, no import from a layer above, no oversized source file, and every
package says what lives in it. Read from the source (ast), so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Layers, lowest first; a module may import from its own layer or any below. Keys are module-name prefixes
# (the longest matching prefix decides).
LAYERS = [
    {"wmfast", "wmfast.telemetry", "wmfast.testing", "wmfast.kernels"},
    {"wmfast.ops"},
    {"wmfast.modules"},
    {"wmfast.models", "wmfast.data", "wmfast.metrics"},
    {"wmfast.tasks"},
    {"wmfast.train", "wmfast.inference"},
    {"wmfast.env", "wmfast.bench", "wmfast.cli", "wmfast.train.__main__"},  # entry points and reports
]
MAX_LINES, MAX_LINES_KERNELS = 400, 600


def _modules():
    """module name -> source path, for wmfast/ and kernels/ (installed as wmfast.kernels)."""
    out = {}
    for root, name in ((REPO / "wmfast", "wmfast"), (REPO / "kernels", "wmfast.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _walk_run_time(node):
    """ast.walk, less the bodies of `if TYPE_CHECKING:` (imports for annotations only, never executed)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for stmt in child.orelse for n in _walk_run_time(stmt))
            continue
        yield from _walk_run_time(child)


def _imports(module: str, source: str, is_package: bool = False) -> set[str]:
    """wmfast modules `module` imports anywhere in its source (`from a.b import c` -> a.b.c when that is a
    module, else a.b; a parent package's implicit import is not an edge)."""
    tree = ast.parse(source)
    found = set()
    for node in _walk_run_time(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import wmfast.ops.adaln as x` names a module already
                name = name.rpartition(".")[0]
            if name.startswith("wmfast") and name != module:
                found.add(name)
    return found


GRAPH = {m: _imports(m, p.read_text(), p.name == "__init__.py") for m, p in MODULES.items()}


def _layer(module: str) -> int:
    best, layer = "", None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, layer = p, i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, as [a, b, ..., a]."""
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_from_a_layer_above():
    bad = [f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
           for m, deps in sorted(GRAPH.items()) for n in sorted(deps) if _layer(n) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_cycles_and_layers():
    # a lazy import inside a function is an edge, an `if TYPE_CHECKING:` import is not, relative imports resolve
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wmfast.cli import main\n"
              "def f():\n    from .dispatch import select_backend\n    import wmfast.kernels.adaln\n")
    assert _imports("wmfast.ops.adaln", source) == {"wmfast.ops.dispatch", "wmfast.kernels.adaln"}
    assert _resolve("wmfast.ops", True, 1, "adaln") == "wmfast.ops.adaln"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("wmfast.kernels.adaln") < _layer("wmfast.ops.adaln") < _layer("wmfast.cli")
    assert _layer("wmfast.train.__main__") == _layer("wmfast.cli") > _layer("wmfast.train.loop")


@pytest.mark.parametrize("root", ["wmfast", "kernels", "benchmarks", "tests"])
def test_no_oversized_source_file(root):
    limit = MAX_LINES_KERNELS if root == "kernels" else MAX_LINES
    big = [f"{p.relative_to(REPO)}: {n} lines" for p in sorted((REPO / root).rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > limit]
    assert not big, f"over {limit} lines: " + ", ".join(big)


def test_every_package_says_what_lives_in_it():
    missing = [str(p.relative_to(REPO)) for m, p in MODULES.items() if p.name == "__init__.py"
               and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, "packages without a docstring: " + ", ".join(missing)
