"""The floors of docs/architecture.md, read from the code: every import (module-level AND
function-local: a lazy import that climbs up is still a dependency on the floor above) goes to
the same floor or a lower one, never sideways between two floors of the same height, and no
two files or two floors import each other in a circle.

Only ``import``/``from ... import`` statements count. The registries' string lookups
(``builtin_modules=("defenses",)``, ``"module:attr"`` lazy entries, entry points) are data,
resolved at run time by name, so the ground floor's registry can list the defenses without
importing them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "defenses", "attacks", "leaderboard")

#: (floor, height, module prefixes): a module belongs to the floor of its longest prefix
FLOORS: list[tuple[str, int, tuple[str, ...]]] = [
    ("core", 0, ("bench.core", "bench")),
    ("data", 1, ("bench.data",)),
    ("models", 2, ("bench.models",)),
    ("artifacts", 3, ("bench.artifacts",)),
    ("defenses", 4, ("defenses",)),
    ("attacks", 5, ("attacks",)),
    ("leaderboard", 5, ("leaderboard",)),
    ("harness", 6, ("bench.harness",)),
    ("submission", 7, ("bench.harness.submission",)),
    ("cli", 8, ("bench.cli", "bench.__main__")),
]
HEIGHT = {name: h for name, h, _ in FLOORS}

#: narrower rules on top of the heights: floor -> the floors (or exact modules) it may import
ONLY = {
    "leaderboard": {"core", "leaderboard"},
    "attacks": {"core", "data", "models", "artifacts", "attacks", "defenses.base"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor_of(module: str) -> str:
    best, length = None, -1
    for name, _, prefixes in FLOORS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = name, len(p)
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported project module) for every import statement anywhere in the file."""
    me = module_name(path) if path.is_relative_to(ROOT) else path.stem
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import submodule`` imports the submodule
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            while name not in modules and "." in name:  # an attribute of a module
                name = name.rpartition(".")[0]
            if name in modules and name != me:
                found.append((node.lineno, name))
    return found


def graph() -> dict[str, list[tuple[int, str]]]:
    modules = project_modules()
    return {m: imports_of(p, modules) for m, p in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_on_a_floor():
    for m in project_modules():
        floor_of(m)


def test_imports_go_down_or_stay_on_their_floor():
    bad = []
    for mod, imps in graph().items():
        mine = floor_of(mod)
        for line, target in imps:
            theirs = floor_of(target)
            allowed = ONLY.get(mine)
            if allowed is not None:
                ok = theirs in allowed or target in allowed
            else:
                ok = theirs == mine or HEIGHT[theirs] < HEIGHT[mine]
            if not ok:
                bad.append(f"{mod}:{line} ({mine}) imports {target} ({theirs})")
    assert not bad, "imports that climb or cross floors:\n" + "\n".join(bad)


def test_no_import_circle_between_files():
    edges = {m: {t for _, t in imps} for m, imps in graph().items()}
    cycles = _cycles(edges)
    assert not cycles, f"import circles between files: {cycles}"


@pytest.mark.parametrize("level", ["package", "floor"])
def test_no_import_circle_between_packages_or_floors(level):
    def unit(m: str) -> str:
        if level == "floor":
            return floor_of(m)
        if m == "bench.__main__":  # `python -m bench` is the CLI's launcher
            return "bench.cli"
        return m if (ROOT / m.replace(".", "/")).is_dir() else m.rpartition(".")[0] or m

    edges: dict[str, set[str]] = {}
    for mod, imps in graph().items():
        for _, t in imps:
            if unit(t) != unit(mod):
                edges.setdefault(unit(mod), set()).add(unit(t))
    cycles = _cycles(edges)
    assert not cycles, f"import circles between {level}s: {cycles}"


def test_the_checker_sees_a_climbing_lazy_import(tmp_path):
    """The walk finds function-local imports (a regression guard for the test itself)."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from bench.harness.runner import MatrixRunner\n")
    modules = {**project_modules(), "mod": src}
    assert (2, "bench.harness.runner") in [(ln, t) for ln, t in imports_of(src, modules)]
