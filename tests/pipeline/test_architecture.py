"""The map in docs/architecture.md is the code's: every import of every module of pipeline/
(lazy ones included) follows it, so the page a newcomer reads cannot drift from the code."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "pipeline").rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> set[str]:
    """Every module name `path` imports anywhere (functions too), but under `if TYPE_CHECKING`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            found.update(subs)                             # from pkg import mod: the module
            if len(subs) < len(node.names):
                found.add(node.module)                     # from mod import name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _pipeline_imports(mod: str) -> set[str]:
    """The pipeline modules `mod` imports (names that are modules, not functions)."""
    return {n for n in _imports(MODULES[mod]) if n in MODULES and n != "pipeline"} - {mod}


def _package(mod: str) -> str:
    return mod.split(".")[1] if mod.count(".") else mod


def _map() -> dict[str, list[str]]:
    """package -> the packages it may import, in the table's order (lowest first)."""
    rows = re.findall(r"^\| `pipeline/([a-z_]+)(?:/|\.py)` \|.*\| ([^|]*) \|$", DOC, re.M)
    return {pkg: [p.strip() for p in allowed.split(",") if p.strip() not in ("", "—")]
            for pkg, allowed in rows}


def _listed(label: str) -> set[str]:
    """The backticked module names after `**<label>**` up to the next full stop."""
    text = DOC.split(f"**{label}**", 1)[1]
    text = text[:re.search(r"\.\s", text).start()]
    return set(re.findall(r"`(pipeline\.[a-z_.]+)`", text))


def test_the_map_names_every_package_once_and_only_lower_ones():
    mapped = _map()
    packages = {_package(m) for m in MODULES if m != "pipeline"}
    assert set(mapped) == packages, "docs/architecture.md's table and pipeline/ differ"
    order = list(mapped)
    for pkg, allowed in mapped.items():
        higher = [a for a in allowed if order.index(a) >= order.index(pkg)]
        assert not higher, f"{pkg} may import {higher}, not below it in the table"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_every_import_follows_the_map(mod):
    allowed = set(_map()[_package(mod)]) | {_package(mod)} if mod != "pipeline" else set()
    bad = sorted(n for n in _pipeline_imports(mod) if _package(n) not in allowed)
    assert not bad, f"{mod} imports {bad}; its package may import only {sorted(allowed)}"
    outside = sorted(n for n in _imports(MODULES[mod])
                     if n.split(".")[0] in ("ray", "jobs", "runtime"))
    assert not outside, f"{mod} imports {outside}: Ray and jobs stay out of pipeline/"


def test_compute_never_imports_a_storage_module():
    storage, edge = _listed("Storage modules"), _listed("Edge modules")
    assert storage and edge and (storage | edge) <= set(MODULES), "stale module names in the doc"
    for mod in sorted(set(MODULES) - storage - edge - {"pipeline"}):
        reached = _pipeline_imports(mod) & storage
        assert not reached, (f"{mod} is compute (not listed as storage or edge in "
                             f"docs/architecture.md) but imports {sorted(reached)}")


def test_no_module_imports_itself_round_a_circle():
    graph = {m: _pipeline_imports(m) for m in MODULES}
    state: dict[str, int] = {}

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                walk(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
