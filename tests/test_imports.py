"""The import graph of the library follows one direction (DESIGN.md section 2).

config -> pipeline -> methods / statistics / tasks -> models; the CLI (`astra.run`) is a thin shell that
nothing imports; `analysis` reads the results store and the shared maths module only; `baselines` import
the method contract and the statistics engine, never the reverse.

The graph is read from the source (ast), not by importing, so a lazy import inside a function counts as
much as one at the top of a module: it is the same dependency, only deferred. Imports under
`if TYPE_CHECKING:` are left out (they do not run). Registration by `importlib.import_module` of a
computed name (`astra.methods.load_methods`) is not an edge, by design.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("astra", "baselines", "analysis", "experiments")
CLI = "astra.run"
ANALYSIS_MAY_IMPORT = {"astra.results", "astra.erank"}  # pure modules: no torch, no pipeline


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def library_modules() -> dict[str, Path]:
    """Every module of the library packages by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements anywhere in the tree (functions included), except `if TYPE_CHECKING:` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against the importer)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def targets(importer: str, path: Path) -> set[str]:
    """Library modules that `importer` imports (`from pkg import mod` names the submodule)."""
    modules = library_modules()
    found: set[str] = set()
    for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = absolute(node, importer, path.name == "__init__.py")
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found - {importer}


@cache
def import_graph() -> dict[str, frozenset[str]]:
    return {name: frozenset(targets(name, path)) for name, path in library_modules().items()}


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(rule) -> list[str]:
    return sorted(
        f"{importer} imports {target}"
        for importer, imported in import_graph().items()
        for target in sorted(imported)
        if rule(importer, target)
    )


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


# --- the walker itself, on a tree with known answers ---------------------------------------------------
def test_walker_resolves_relative_lazy_and_type_checking_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "astra"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import b\nif TYPE_CHECKING:\n    from astra import c\n"
        "def f():\n    import analysis.tables\n"
    )
    (pkg / "b.py").write_text("from .a import f\nimport torch\n")
    (pkg / "c.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    library_modules.cache_clear()
    import_graph.cache_clear()
    try:
        graph = import_graph()
        assert graph["astra.a"] == {"astra.b", "analysis.tables"}  # lazy counts, TYPE_CHECKING does not
        assert graph["astra.b"] == {"astra.a"}
        assert cycles(graph) == [["astra.a", "astra.b"]]
    finally:
        library_modules.cache_clear()
        import_graph.cache_clear()


def test_the_graph_sees_the_whole_library():
    graph = import_graph()
    assert {"astra.methods", "astra.models", "astra.run", "baselines.lora", "analysis.tables"} <= set(graph)
    assert "astra.config" in {t for imported in graph.values() for t in imported}


# --- the rules ---------------------------------------------------------------------------------------------
def test_no_import_cycle_among_library_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("packages", [("astra", "baselines")])
def test_library_imports_neither_analysis_nor_the_cli(packages):
    bad = violations(
        lambda importer, target: (
            under(importer, *packages) and importer != CLI and (under(target, "analysis") or target == CLI)
        )
    )
    assert not bad, "the library must not import analysis or the CLI module:\n" + "\n".join(bad)


def test_nothing_imports_the_cli_module():
    bad = violations(lambda importer, target: target == CLI)
    assert not bad, f"{CLI} is a thin shell over astra.pipeline; import the pipeline:\n" + "\n".join(bad)


def test_analysis_reads_only_the_results_store_and_the_maths_module():
    bad = violations(
        lambda importer, target: (
            under(importer, "analysis")
            and not under(target, "analysis")
            and target not in ANALYSIS_MAY_IMPORT
        )
    )
    assert not bad, f"analysis may import only {sorted(ANALYSIS_MAY_IMPORT)}:\n" + "\n".join(bad)


def test_methods_do_not_import_back_into_baselines_or_experiments():
    """baselines import the method contract and the statistics engine, never the reverse."""
    bad = violations(
        lambda importer, target: (
            under(importer, "astra", "baselines", "analysis")
            and under(target, "experiments")
            or under(importer, "astra")
            and under(target, "baselines")
        )
    )
    assert not bad, "\n".join(bad)


ENTRY_POINTS = {
    "astra.pipeline",
    CLI,
    "astra.sweeps",
    "astra.init_cli",
    "astra.evaluate_only",
}  # compose and run
# what sits above the models layer: methods, statistics, tasks, the trainer, and the entry points
ABOVE_MODELS = {"astra.methods", "astra.build", "astra.astra_init", "astra.stats", "astra.eigen", "astra.calib",
                "astra.data", "astra.nlg", "astra.trainer", "astra.probes", *ENTRY_POINTS}  # fmt: skip


def reachable(start: str) -> set[str]:
    """Every library module `start` imports, directly or through others."""
    graph, seen, stack = import_graph(), set(), [start]
    while stack:
        for target in graph.get(stack.pop(), ()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_the_pipeline_sits_above_methods_statistics_tasks_and_models():
    """config -> pipeline -> methods / statistics / tasks -> models: nothing below reaches back up."""
    bad = violations(
        lambda importer, target: (
            under(importer, "astra", "baselines") and importer not in ENTRY_POINTS and target in ENTRY_POINTS
        )
    )
    bad += [f"astra.models reaches {m}" for m in sorted(reachable("astra.models") & ABOVE_MODELS)]
    bad += [f"{m} reaches baselines" for m in ("astra.models", "astra.stats") if under_any(reachable(m))]
    assert not bad, "\n".join(bad)


def under_any(modules: set[str]) -> bool:
    return any(under(m, "baselines") for m in modules)
