"""The house rules, checked over the source: layers that import one way, no import cycles, and
method names looked up in the registry instead of compared as strings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from toolchain import registry

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolchain", "export", "eval")

# Lowest first; a module may import its own layer and those below. Modules not named are in
# the layer of their package: toolchain's bottom, export, eval (measurement); the orchestration
# (registry, results, pipeline, sweep, report, CLI) sits on top.
TOP = {"toolchain.registry", "toolchain.results", "toolchain.pipeline", "toolchain.sweep", "toolchain.cli",
       "toolchain.__main__", "eval.report"}
LAYERS = ("toolchain", "export", "eval", "top")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every project module `name` imports, at the top or inside a function (a deferred import
    is an import all the same)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    return LAYERS.index("top" if module in TOP else module.split(".")[0])


def test_no_module_imports_one_that_imports_it_back():
    """No cycles in the import graph, direct or through other modules (Tarjan's components)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


def test_layers_import_downward_only():
    upward = [(m, t) for m, targets in GRAPH.items() for t in targets
              if _layer(t) > _layer(m) and not (t == "toolchain" or t.endswith(".__init__"))]
    assert not upward


def test_the_graph_sees_deferred_and_relative_imports():
    """The checks above would pass on an empty graph: make sure it holds what the code imports."""
    assert "eval.report" in GRAPH["toolchain.sweep"]  # deferred, inside run_sweep
    assert "toolchain.registry" in GRAPH["toolchain.pipeline"]  # relative
    assert "toolchain.methods" in GRAPH["toolchain.methods.first"]  # from . import


def _method_name_comparisons() -> list[str]:
    names = {m.name for m in registry.METHODS} | {m.display for m in registry.METHODS}
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            constants = [c.value for o in operands for c in ast.walk(o)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            if names & set(constants):
                found.append(f"{module}:{node.lineno}")
    return found


def test_method_names_are_looked_up_in_the_registry_not_compared():
    assert _method_name_comparisons() == []


def test_the_comparison_finder_finds_comparisons(tmp_path, monkeypatch):
    """Against a file that compares a method name, the check above would go red."""
    (tmp_path / "bad.py").write_text('def f(cfg):\n    return cfg.method == "first" or "l1" in cfg.methods\n')
    monkeypatch.setitem(MODULES, "bad", tmp_path / "bad.py")
    assert _method_name_comparisons() == ["bad:2", "bad:2"]  # two comparisons on that line


@pytest.mark.parametrize("option", registry.method_specific_options())
def test_every_method_specific_option_is_a_cli_option(option):
    from toolchain.cli import export
    assert option in {p.name for p in export.params}
