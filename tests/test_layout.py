"""The shape of the package (DESIGN.md section 2): stages import downwards only.

Every module of ``src/mapsim`` is read with :mod:`ast`; each ``import`` and ``from ... import``
statement (also those inside functions and ``if TYPE_CHECKING:`` blocks) is an edge of the
import graph, relative imports resolved. Implicit imports of parent packages are not edges,
and neither are the plugins the registry loads through entry points at run time. On that
graph:

1. every module imports in a fresh interpreter (all in one subprocess, mapsim's modules
   dropped from ``sys.modules`` before each one);
2. no import cycles;
3. no upward imports: each module has a stage rank (``STAGES``) and may import only modules
   of its own rank or lower; nothing outside ``mapsim.plugins`` imports a plugin module
   (plugins are found through entry points only), and nothing inside the package imports the
   public facade ``mapsim`` (``mapsim/__init__.py``) but the plugins;
4. plugin modules import only the public ``mapsim`` package (as a third party would) and
   modules of their own plugin sub-package;
5. no file is longer than ``MAX_LINES`` lines.

Every failure message lists all the offending edges or files.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mapsim

PACKAGE = "mapsim"
SRC = Path(mapsim.__file__).resolve().parent
MAX_LINES = 550

#: stage rank by the module's first component under mapsim (a folder or a top-level module);
#: a module may import modules of its own rank or lower.
STAGES: dict[str, int] = {
    # the foundation: plugin base classes, errors, hooks, discovery, devices, value types
    "api": 0, "errors": 0, "hookspecs": 0, "registry": 0, "devices": 0, "types": 0,
    "observers": 0, "_version": 0, "prune_api": 0,
    "spec": 1,
    "models": 2,
    "io": 3,
    "engine": 4,
    "tables": 5, "segmentation": 5,  # scores from masks, pure numpy (used by training)
    "runner": 6, "run": 6,
    # consumers of results and models
    "plots": 7, "training": 7, "pruning": 7, "results": 7, "session": 7, "cli": 7,
    "data_cli": 7, "__main__": 7, "run_summary": 7,
    "testing": 7,  # the metric contract suite drives the engine
}
#: the public facade (mapsim/__init__.py) and the plugins sit above every stage
FACADE_RANK = 8
PLUGINS = f"{PACKAGE}.plugins"
#: modules not imported by check 1, with the reason
NOT_IMPORTED = {f"{PACKAGE}.__main__": "importing it runs the command line"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        path = MODULES[self.source].relative_to(SRC.parent)
        return f"{self.source} -> {self.target}  ({path}:{self.line})"


def _find_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


MODULES = _find_modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from`` statement (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base.pop()
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """``name`` or its closest enclosing module of mapsim (``mapsim.x.Y`` -> ``mapsim.x``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _edges_of(module: str) -> list[Edge]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), str(MODULES[module]))
    edges = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from mapsim import hookspecs` imports the module mapsim.hookspecs
                targets.append(submodule if submodule in MODULES else base)
        for target in targets:
            if target.split(".")[0] != PACKAGE:
                continue
            known = _known(target)
            if known is not None and known != module:
                edges.append(Edge(module, known, node.lineno))
    return sorted(set(edges), key=lambda e: (e.target, e.line))


EDGES: dict[str, list[Edge]] = {m: _edges_of(m) for m in MODULES}


def _is_plugin(module: str) -> bool:
    return module == PLUGINS or module.startswith(PLUGINS + ".")


def _rank(module: str) -> int:
    if module == PACKAGE or _is_plugin(module):
        return FACADE_RANK
    first = module.split(".")[1]
    assert first in STAGES, f"{module} has no stage: add {first!r} to STAGES in {__file__}"
    return STAGES[first]


def _plugin_home(module: str) -> str:
    """What a plugin module may import besides ``mapsim``: its own plugin sub-package."""
    parts = module.split(".")
    if len(parts) <= 2:  # mapsim.plugins itself
        return module
    home = ".".join(parts[:3])  # mapsim.plugins.<name>
    if _is_package(home):
        return home
    return module  # a single-module plugin has no sub-package


def _report(title: str, lines: list[str]) -> str:
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------


def test_every_module_has_a_stage():
    missing = sorted({m.split(".")[1] for m in MODULES
                      if m != PACKAGE and not _is_plugin(m)} - set(STAGES))
    assert not missing, f"modules without a stage rank in STAGES: {missing}"


_IMPORT_EACH = r"""
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "mapsim" or m.startswith("mapsim.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-4)
print(json.dumps(failures))
"""


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in MODULES if m not in NOT_IMPORTED)
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    message = "\n".join(f"--- {name}\n{tb}" for name, tb in failures.items())
    assert not failures, f"modules that fail to import on their own ({len(failures)}):\n{message}"


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The cycles of ``graph``: one shortest cycle through each strongly connected component
    (of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan (iterative enough for this graph's depth)
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
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        members = set(component)
        best: list[str] | None = None
        for start in component:  # shortest cycle through `start`, breadth first
            paths = {start: [start]}
            queue = [start]
            while queue:
                v = queue.pop(0)
                for w in graph[v]:
                    if w == start:
                        cycle = paths[v] + [start]
                        if best is None or len(cycle) < len(best):
                            best = cycle
                        queue = []
                        break
                    if w in members and w not in paths:
                        paths[w] = paths[v] + [w]
                        queue.append(w)
        cycles.append(best or component)
    return cycles


def _edge(source: str, target: str) -> Edge:
    return next(e for e in EDGES[source] if e.target == target)


def test_no_import_cycles():
    lines = []
    graph = {m: sorted({e.target for e in EDGES[m]}) for m in MODULES}
    for cycle in _cycles(graph):
        lines.append(" -> ".join(cycle))
        lines.extend(f"    {_edge(a, b)}" for a, b in itertools.pairwise(cycle))
    assert not lines, _report("import cycles (each with its edges)", lines)


def test_no_upward_imports():
    """A stage imports only its own or lower stages; plugins and the facade are imported by
    nobody inside the package (the plugins import the facade)."""
    bad = []
    for module, edges in EDGES.items():
        if module == PACKAGE or _is_plugin(module):
            continue  # the facade exports from every stage; plugins: see the next test
        for edge in edges:
            if _is_plugin(edge.target):
                bad.append(f"{edge}   [plugins are loaded through entry points only]")
            elif edge.target == PACKAGE:
                bad.append(f"{edge}   [the facade `mapsim` sits above every stage (it "
                           "re-exports run, load_spec): import the defining module]")
            elif _rank(edge.target) > _rank(module):
                bad.append(f"{edge}   [stage {_rank(module)} imports stage {_rank(edge.target)}]")
    assert not bad, _report("upward imports", bad)


def test_plugins_import_only_the_public_package():
    bad = []
    for module, edges in EDGES.items():
        if not _is_plugin(module):
            continue
        home = _plugin_home(module)
        for edge in edges:
            if edge.target == PACKAGE:
                continue
            if edge.target == home or edge.target.startswith(home + "."):
                continue
            bad.append(f"{edge}   [a plugin imports only `mapsim` and {home}.*]")
    assert not bad, _report("plugin modules importing mapsim internals", bad)


def test_no_file_is_too_long():
    long = []
    for path in MODULES.values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long.append(f"{path.relative_to(SRC.parent)}: {n} lines")
    assert not long, _report(f"files over {MAX_LINES} lines", long)


def test_the_graph_is_read_correctly():
    """The parser's own checks: relative imports, imports inside functions, submodules."""
    assert Edge("mapsim.registry", "mapsim.hookspecs", 0).target in {
        e.target for e in EDGES["mapsim.registry"]}
    # an import inside a function is an edge (cli imports the registry lazily)
    assert "mapsim.registry" in {e.target for e in EDGES["mapsim.cli"]}
    tree = ast.parse("from . import geometry\nfrom .. import hooks\nfrom .render import x")
    froms = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert _resolve("mapsim.plugins.vessels", froms[0]) == "mapsim.plugins.vessels"
    assert _resolve("mapsim.plugins.vessels.render", froms[1]) == "mapsim.plugins"
    assert _resolve("mapsim.plugins.vessels.geometry", froms[2]) == (
        "mapsim.plugins.vessels.render")
    assert _plugin_home("mapsim.plugins.vessels.render") == "mapsim.plugins.vessels"
    assert _plugin_home("mapsim.plugins.metrics.cka") == "mapsim.plugins.metrics"
    assert _plugin_home("mapsim.plugins.files") == "mapsim.plugins.files"


def test_the_cycle_finder_finds_cycles():
    graph = {"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": [], "e": ["f"], "f": ["e"]}
    assert sorted(_cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert _cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


_PUBLIC = r"""
import json, sys
import mapsim
eager = sorted(m for m in sys.modules if m.split(".")[0] in {"pandas", "matplotlib"}
               or m.startswith(("mapsim.runner", "mapsim.plots", "mapsim.training",
                                "mapsim.engine", "mapsim.tables", "mapsim.plugins")))
missing = {}
for name in mapsim.__all__:
    try:
        getattr(mapsim, name)
    except Exception as exc:
        missing[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"eager": eager, "missing": missing}))
"""


def test_the_public_package_is_cheap_and_complete():
    """``import mapsim`` (which every plugin module does) loads no pandas, matplotlib, engine,
    tables, runner, plots, training or plugin module; every name of ``__all__`` resolves."""
    proc = subprocess.run([sys.executable, "-c", _PUBLIC], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not found["eager"], f"`import mapsim` imports {found['eager']}"
    lines = [f"mapsim.{name}: {why}" for name, why in found["missing"].items()]
    assert not lines, _report("names of mapsim.__all__ that do not resolve", lines)
