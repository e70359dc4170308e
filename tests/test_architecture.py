"""The package's layers import downward only, and no modules import each other in a loop.

Layers (lowest first): the formats and subspace math; kernels and sharding; the gradient
transformations; aliases, memory accounting and the Flax side (models, data, reparam); the
trainer. A module may import its own layer or the ones below (lazy imports inside functions
count too). Every module must be assigned a layer here, so a new one is placed on purpose.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "lowrank_jax"

# longest matching prefix wins
LAYERS = {
    "lowrank_jax.quantization": 0,
    "lowrank_jax.targets": 0,
    "lowrank_jax.projection": 0,
    "lowrank_jax.kernels": 1,
    "lowrank_jax.sharding": 1,
    "lowrank_jax.transforms": 2,
    "lowrank_jax.optimizers": 3,
    "lowrank_jax.memory": 3,
    "lowrank_jax.analysis": 3,
    "lowrank_jax.models": 3,
    "lowrank_jax.data": 3,
    "lowrank_jax.reparam": 3,
    "lowrank_jax.generate": 4,
    "lowrank_jax.train": 5,
    "lowrank_jax.examples": 8,  # written as user code: imports the package root
    "lowrank_jax": 7,  # the package's own __init__: re-exports only
}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        candidates = []
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            candidates = [s for s in subs if s in mods] or [base]
        for candidate in candidates:
            # `import a.b.c` also runs a and a.b: the nearest module that exists is imported
            while candidate and candidate not in mods:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def _layer(name: str) -> int:
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")]
    prefix = max(matches, key=len)
    if prefix == "lowrank_jax" and name != "lowrank_jax":
        pytest.fail(f"module {name} has no layer: add it to LAYERS in tests/test_architecture.py")
    return LAYERS[prefix]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in _graph():
        _layer(name)


def test_layers_import_downward_only():
    upward = [
        f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
        for name, deps in _graph().items()
        for dep in sorted(deps)
        if _layer(dep) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other in a loop: {cycles}"


def test_the_checks_see_an_upward_import(tmp_path, monkeypatch):
    """The walker resolves relative and `from a import b` forms (so the tests above can fail)."""
    pkg = tmp_path / "lowrank_jax"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("")
    (pkg / "kernels" / "__init__.py").write_text("def f():\n    from .. import train\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    graph = _graph()
    assert graph["lowrank_jax.kernels"] == {"lowrank_jax.train"}
