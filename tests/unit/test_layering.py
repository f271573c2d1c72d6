"""The floors of the design (README, Layout): every import points down or stays in its own folder.

    harness                      launchers, fixtures, CLI, benchmarks, test-side frontends
    stack | backends             the guest and dom0, side by side, never importing each other
    base  xenabi  guests         process supervision and errors, the ABI and wire protocols, the guest schema

Everything installs under one import name, `xenpv`; a bare `import harness` would pick up an unrelated
PyPI package of that name, so it is an error too."""
from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]

# What each folder may import from the others.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "harness": frozenset({"stack", "backends", "base", "xenabi", "guests"}),
    "stack": frozenset({"base", "xenabi", "guests"}),
    "backends": frozenset({"base", "xenabi", "guests"}),
    "guests": frozenset({"base"}),
    "xenabi": frozenset({"base"}),
    "base": frozenset(),
}


@dataclass(frozen=True)
class Arrow:
    source: str  # file, relative to the checkout
    line: int
    target: str  # the imported module
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: imports {self.target}: {self.reason}"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every absolute import anywhere in the module, function-level ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def bad_arrows(folder: str, source: str, text: str) -> list[Arrow]:
    arrows = []
    for line, module in imported_modules(ast.parse(text, filename=source)):
        parts = module.split(".")
        if parts[0] in MAY_IMPORT:
            arrows.append(Arrow(source, line, module, f"not under `xenpv.` (would import PyPI's `{parts[0]}`)"))
        elif parts[0] == "xenpv" and len(parts) > 1:
            target = parts[1]
            if target != folder and target not in MAY_IMPORT[folder]:
                way = "across" if target in ("stack", "backends") and folder in ("stack", "backends") else "up"
                arrows.append(Arrow(source, line, module, f"{folder} -> {target} points {way}"))
    return arrows


def project_modules() -> list[tuple[str, Path]]:
    return [(folder, path) for folder in MAY_IMPORT for path in sorted((TOP / folder).rglob("*.py"))]


def test_every_import_points_down() -> None:
    modules = project_modules()
    assert len(modules) > 150, "the walk found too few modules: is TOP right?"
    arrows = [a for folder, path in modules
              for a in bad_arrows(folder, str(path.relative_to(TOP)), path.read_text())]
    assert not arrows, "imports against the floors:\n" + "\n".join(map(str, arrows))


@pytest.mark.parametrize("folder, text, reason", [
    ("backends", "from xenpv.harness.machine import Machine\n", "backends -> harness points up"),
    ("stack", "import xenpv.backends.xenhv.control\n", "stack -> backends points across"),
    ("backends", "def f():\n    from xenpv.stack.vcpu import cpu\n", "backends -> stack points across"),
    ("xenabi", "from xenpv.guests.schema import GuestDefinition\n", "xenabi -> guests points up"),
    ("base", "from xenpv.xenabi import ring\n", "base -> xenabi points up"),
    ("harness", "from harness.errors import HarnessError\n", "not under `xenpv.`"),
])
def test_the_check_names_an_arrow_against_the_floors(folder: str, text: str, reason: str) -> None:
    arrows = bad_arrows(folder, f"{folder}/example.py", text)
    assert [a.reason.startswith(reason) or reason in a.reason for a in arrows] == [True], arrows


@pytest.mark.parametrize("folder, text", [
    ("harness", "from xenpv.stack.vcpu.qtest import QtestClient\nfrom xenpv.backends.host import HostServices\n"),
    ("stack", "from xenpv.xenabi.ring import FrontRing\nfrom xenpv.base.errors import HarnessError\n"),
    ("backends", "from xenpv.backends.xenhv import control\nimport os, logging\n"),
])
def test_downward_and_local_imports_pass(folder: str, text: str) -> None:
    assert bad_arrows(folder, f"{folder}/example.py", text) == []


# -- Circles inside a floor -----------------------------------------------------------------------------------
#
# Two modules that import each other make a reader hold both at once. Every import counts, including those
# under TYPE_CHECKING and inside functions: a reader follows those too. The circles that stay are listed
# below with the reason; a new one fails, and so does a listed one that is gone (the list stays exact).

def _circle(*modules: str) -> frozenset[str]:
    return frozenset(f"xenpv.{m}" for m in modules)


ALLOWED_CIRCLES: dict[frozenset[str], str] = {
    _circle("stack.drivers.xenbus.driver", "stack.drivers.xenbus.fdo", "stack.drivers.xenbus.pdo"):
        "mirrors XENBUS driver.c/fdo.c/pdo.c: the driver makes FDOs, an FDO its PDOs, and each keeps its "
        "parent (the C files include each other's headers the same way)",
    _circle("stack.drivers.xenvif.driver", "stack.drivers.xenvif.fdo", "stack.drivers.xenvif.pdo"):
        "mirrors XENVIF driver.c/fdo.c/pdo.c: the driver makes FDOs, an FDO its PDOs, and each keeps its "
        "parent (the C files include each other's headers the same way)",
    _circle("stack.drivers.xenvbd.adapter", "stack.drivers.xenvbd.target"):
        "mirrors XENVBD adapter.c/target.c: the adapter makes its targets and each target calls back into its "
        "adapter (AdapterGet*, the C files include each other's headers the same way)",
    _circle("stack.kernel.bugcheck", "stack.kernel.irql"):
        "one concept in two files: KeBugCheckEx acts on the processor (HIGH_LEVEL, callbacks, the dump's IRQL) "
        "and the IRQL rules raise bugchecks; bugcheck.py imports irql late, inside its functions",
}


@dataclass(frozen=True)
class Module:
    name: str  # xenpv.<folder>.<...>; a package is named by its folder
    is_package: bool  # an __init__.py
    source: str  # the file, for messages
    text: str


@dataclass(frozen=True)
class Edge:
    source: str  # file
    line: int
    target: str  # module

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}"


def module_of(folder: str, path: Path) -> Module:
    parts = list(path.relative_to(TOP / folder).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return Module(".".join(["xenpv", folder, *parts]), is_package, str(path.relative_to(TOP)), path.read_text())


def _import_base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative levels resolved against `module`'s package."""
    if node.level == 0:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if node.level - 1 >= len(package):
        raise ValueError(f"{module.source}:{node.lineno}: relative import beyond the top of the namespace")
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: Mapping[str, Module]) -> str | None:
    """The longest prefix of `name` that is a project module (None for a module from elsewhere)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: Mapping[str, Module]) -> dict[str, dict[str, Edge]]:
    """For every module, the project modules it imports (first import of each).

    `from package import name` points at the submodule when `name` is one and at the package's __init__
    otherwise: importing a submodule runs the package's __init__ too, but a reader of the submodule does
    not need it, so it is no circle."""
    graph: dict[str, dict[str, Edge]] = {}
    for module in modules.values():
        out: dict[str, Edge] = {}
        for node in ast.walk(ast.parse(module.text, filename=module.source)):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                line, targets = node.lineno, [_known(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _import_base(module, node)
                line, targets = node.lineno, [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                                              else _known(base, modules) for alias in node.names]
            for target in targets:
                if target is not None and target != module.name and target not in out:
                    out[target] = Edge(module.source, line, target)
        graph[module.name] = out
    return graph


def circles(graph: Mapping[str, Mapping[str, object]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan), in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found, key=sorted)


def circle_problems(graph: Mapping[str, Mapping[str, Edge]], allowed: Mapping[frozenset[str], str]) -> list[str]:
    found = circles(graph)
    problems = []
    for circle in found:
        if circle not in allowed:
            arrows = [str(edge) for m in sorted(circle) for t, edge in sorted(graph[m].items()) if t in circle]
            problems.append("import circle " + " <-> ".join(sorted(circle)) + ":\n    " + "\n    ".join(arrows))
    for circle in allowed:
        if circle not in found:
            problems.append("allowed circle " + " <-> ".join(sorted(circle)) +
                            " is gone (or changed): take it out of ALLOWED_CIRCLES")
    return problems


def project_graph() -> dict[str, dict[str, Edge]]:
    modules = {m.name: m for m in (module_of(folder, path) for folder, path in project_modules())}
    return import_graph(modules)


def test_no_import_circle_outside_the_allowed_list() -> None:
    graph = project_graph()
    assert len(graph) > 150, "the walk found too few modules: is TOP right?"
    problems = circle_problems(graph, ALLOWED_CIRCLES)
    assert not problems, "\n".join(problems)


def test_every_allowed_circle_says_why() -> None:
    for circle, reason in ALLOWED_CIRCLES.items():
        assert reason.startswith(("mirrors ", "one concept in two files: ", "to break (owner: ")), (sorted(circle), reason)


def _graph(files: dict[str, str]) -> dict[str, dict[str, Edge]]:
    """A synthetic project: {"xenpv.x.pkg/__init__": text, "xenpv.x.pkg.mod": text, ...}."""
    modules = {}
    for key, text in files.items():
        name, _, init = key.partition("/")
        modules[name] = Module(name, init == "__init__", f"{name.replace('.', '/')}.py", text)
    return import_graph(modules)


@pytest.mark.parametrize("files, expected", [
    # a TYPE_CHECKING back-reference is a circle
    ({"xenpv.s.a": "from xenpv.s.b import B\n",
      "xenpv.s.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from xenpv.s.a import A\n"},
     [{"xenpv.s.a", "xenpv.s.b"}]),
    # so is a function-level import, through relative imports, around three modules
    ({"xenpv.s.p/__init__": "",
      "xenpv.s.p.a": "from .b import f\n",
      "xenpv.s.p.b": "from . import c\n",
      "xenpv.s.p.c": "def g():\n    from ..p.a import h\n"},
     [{"xenpv.s.p.a", "xenpv.s.p.b", "xenpv.s.p.c"}]),
    # a package __init__ that re-exports a submodule which takes a name from the __init__ back
    ({"xenpv.s.p/__init__": "from xenpv.s.p.m import M\nX = 1\n",
      "xenpv.s.p.m": "from xenpv.s.p import X\n"},
     [{"xenpv.s.p", "xenpv.s.p.m"}]),
    # but taking a sibling submodule through the package is no circle with the __init__
    ({"xenpv.s.p/__init__": "from xenpv.s.p.m import M\n",
      "xenpv.s.p.m": "from xenpv.s.p import layout\nimport xenpv.s.p.layout as L\n",
      "xenpv.s.p.layout": "import os\n"},
     []),
    # a chain, and imports from outside the project, are no circle
    ({"xenpv.s.a": "import xenpv.s.b\nimport logging\n", "xenpv.s.b": "from xenpv.base import errors\n"}, []),
])
def test_the_finder_reports_a_circle(files: dict[str, str], expected: list[set[str]]) -> None:
    assert circles(_graph(files)) == [frozenset(c) for c in expected]


def test_a_circle_fails_the_check_unless_allowed_and_a_stale_allowance_fails_too() -> None:
    graph = _graph({"xenpv.s.a": "from xenpv.s.b import B\n", "xenpv.s.b": "def f():\n    import xenpv.s.a\n"})
    [problem] = circle_problems(graph, {})
    assert problem.startswith("import circle xenpv.s.a <-> xenpv.s.b")
    assert "xenpv/s/b.py:2 -> xenpv.s.a" in problem  # names the arrow that closes it
    assert circle_problems(graph, {frozenset({"xenpv.s.a", "xenpv.s.b"}): "mirrors x.c"}) == []
    [stale] = circle_problems(graph, {frozenset({"xenpv.s.a", "xenpv.s.b"}): "mirrors x.c",
                                      frozenset({"xenpv.s.c", "xenpv.s.d"}): "to break (owner: pending)"})
    assert "xenpv.s.c <-> xenpv.s.d is gone" in stale


def test_every_package_folder_installs() -> None:
    """setup.py finds packages by their __init__.py: a folder of modules without one works from the checkout
    (an editable install) and is missing from a wheel."""
    missing = [str(d.relative_to(TOP)) for folder in MAY_IMPORT for d in [TOP / folder, *(TOP / folder).rglob("*")]
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert not missing, f"package folders without __init__.py: {missing}"


def started_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """`[sys.executable, "-m", NAME, ...]`: the modules a launcher starts as processes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.List):
            items = node.elts
            for a, b in zip(items, items[1:]):
                if isinstance(a, ast.Constant) and a.value == "-m" and isinstance(b, ast.Constant) \
                        and isinstance(b.value, str) and not b.value[:1].isdigit():
                    found.append((b.lineno, b.value))
    return found


def test_every_started_process_is_a_xenpv_module() -> None:
    """`python -m backends.xenhv` worked only with the checkout as the working directory, and would start
    whatever `backends` the environment has."""
    wrong = [f"{path.relative_to(TOP)}:{line}: python -m {name}"
             for folder, path in project_modules() for line, name in started_modules(ast.parse(path.read_text()))
             if name.split(".")[0] in MAY_IMPORT]
    assert not wrong, "processes started outside the xenpv namespace:\n" + "\n".join(wrong)
    assert started_modules(ast.parse('argv = [sys.executable, "-m", "backends.xenhv"]')) == [(1, "backends.xenhv")]
