"""The package's import graph (docs/map.md): no import cycle outside the family registry, and the
persistence modules import what they use at the top (no late import to get around a cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import resona_adapt

ROOT = Path(resona_adapt.__file__).parent
# The family registry is a cycle by design: families register themselves with the registry, which imports them.
REGISTRY = {"resona_adapt.surgery.registry", "resona_adapt.surgery.families"}
PERSISTENCE = ("files", "state", "retrofit", "lora", "resolve", "loading", "formats")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(mods: dict[str, Path], module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement of ``module`` imports."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = module.split(".")
        if node.level:
            base = base if mods[module].name == "__init__.py" else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
    return [n for n in names if n in mods and n != module]


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    late = []
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(mods, module, node):
                    edges[module].add(target)
                    if node.col_offset > 0:
                        late.append((module, target))
    return edges, late


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_outside_the_family_registry():
    edges, _ = _graph()
    cycles = [c for c in _cycles(edges) if not all(m.startswith(tuple(REGISTRY)) for m in c)]
    assert cycles == []


def test_persistence_modules_import_at_the_top():
    _, late = _graph()
    names = tuple(f"resona_adapt.{m}" for m in PERSISTENCE)
    assert [(a, b) for a, b in late if a.startswith(names) and b.startswith(names)] == []


def test_a_retrofitted_model_saves_merged_when_only_the_core_is_imported(tmp_path):
    code = (
        "import sys, torch\n"
        "from transformers import MambaConfig, MambaForCausalLM\n"
        "from resona_adapt.retrofit import retrofit\n"
        "m = retrofit(MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, state_size=4)))\n"
        "m.save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], check=True, cwd=ROOT.parent, timeout=300)
    assert (tmp_path / "out" / "resona.safetensors").is_file()


def test_the_old_persist_module_still_works_and_says_where_its_names_went():
    import importlib

    import pytest

    sys.modules.pop("resona_adapt.persist", None)
    with pytest.warns(DeprecationWarning, match="resona_adapt.persist is deprecated"):
        persist = importlib.import_module("resona_adapt.persist")
    from resona_adapt import formats, loading, state

    assert persist.save_retrofitted is formats.save_retrofitted and persist.load_retrofitted is loading.load_retrofitted
    assert persist.base_view is state.base_view and persist.attach_retrofitted is formats.attach_retrofitted
