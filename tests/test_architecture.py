"""The package's import structure: no module imports one that imports it back (at any depth,
including imports inside functions), and layers only look down:

    cli                     the ``diffmem`` command
    experiments, tools      the paper's experiments; bench and demo
    lab                     data, denoisers, diffusion, files, metrics, theory, training (and
                            the package root, which re-exports the lab and the ops)
    ops                     the op layer: knows nothing of the others

The lab reaches the ops through their public modules only (no ``diffmem.ops._*``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import diffmem

PACKAGE = Path(diffmem.__file__).resolve().parent
LAB = {"data", "denoisers", "diffusion", "files", "metrics", "theory", "training"}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name: file} of every module under root (packages by their __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def is_module(dotted: str, modules) -> bool:
    """A module of the package: a source file, or a compiled or generated one at the top
    (diffmem._C, diffmem._cuda, diffmem._build_info), which need not exist in a checkout."""
    if dotted in modules:
        return True
    parent, _, last = dotted.rpartition(".")
    return parent == PACKAGE.name and last.startswith("_") and not last.startswith("__")


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The package modules that module `name` imports anywhere in its body, relative imports
    resolved; ``from X import y`` counts as importing X.y when that is a module, else X."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            targets = [f"{prefix}.{a.name}" if is_module(f"{prefix}.{a.name}", modules) else prefix
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and not is_module(target, modules):  # `import a.b.c`, c not a module
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] == PACKAGE.name and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> str:
    """ops, lab, experiments, tools, cli, root, or private (compiled / generated modules)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    top = parts[1]
    if top in LAB:
        return "lab"
    if top in ("ops", "experiments", "tools", "cli"):
        return top
    return "private" if top.startswith("_") else "unknown"


ALLOWED = {  # what each layer may import
    "ops": {"ops", "private"},
    "lab": {"ops", "lab", "private"},
    "root": {"ops", "lab", "root", "private"},
    "experiments": {"ops", "lab", "root", "experiments", "private"},
    "tools": {"ops", "lab", "root", "tools", "private"},
    "cli": {"ops", "lab", "root", "experiments", "tools", "private"},
}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer(target) not in ALLOWED.get(layer(module), set()):
                bad.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
            elif (layer(module) == "lab" and layer(target) == "ops"
                  and any(p.startswith("_") for p in target.split(".")[2:])):
                bad.append(f"{module} (lab) imports private {target}")
    return bad


def test_every_module_has_a_layer():
    assert not [m for m in import_graph() if layer(m) == "unknown"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_only_look_down():
    assert layer_violations(import_graph()) == []


def test_the_checks_catch_a_cycle_and_a_layer_violation(tmp_path):
    """The same analysis on a small package with a lazy cycle and an upward import."""
    pkg = tmp_path / PACKAGE.name
    for sub in ("ops", "training", "experiments"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .ops import op\n")
    (pkg / "ops" / "op.py").write_text("def op():\n    from ..training import loop\n")
    (pkg / "training" / "loop.py").write_text("from ..ops.op import op\n")
    (pkg / "experiments" / "run.py").write_text(
        "def run():\n    from . import kind\n")
    (pkg / "experiments" / "kind.py").write_text(
        "from .run import run\nimport diffmem.training.loop\n")
    graph = import_graph(pkg)
    assert graph[f"{PACKAGE.name}.ops.op"] == {f"{PACKAGE.name}.training.loop"}
    found = cycles(graph)
    p = PACKAGE.name
    assert sorted(found) == [[f"{p}.experiments.kind", f"{p}.experiments.run"],
                             [f"{p}.ops.op", f"{p}.training.loop"]]
    assert layer_violations(graph) == [
        f"{PACKAGE.name}.ops.op (ops) imports {PACKAGE.name}.training.loop (lab)"]


@pytest.mark.parametrize("name", ["diffmem.experiments.runner", "diffmem.cli"])
def test_graph_sees_lazy_imports(name):
    """Imports inside functions count: the CLI's lazy imports of the experiments are edges."""
    graph = import_graph()
    assert graph[name]
    assert "diffmem.experiments.runner" in graph["diffmem.cli"]
