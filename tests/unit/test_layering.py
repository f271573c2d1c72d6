"""The floors of the design (README, Layout): every import points down or stays in its own folder.

    harness                      launchers, fixtures, CLI, benchmarks, test-side frontends
    stack | backends             the guest and dom0, side by side, never importing each other
    base  xenabi  guests         process supervision and errors, the ABI and wire protocols, the guest schema

Everything installs under one import name, `xenpv`; a bare `import harness` would pick up an unrelated
PyPI package of that name, so it is an error too."""
from __future__ import annotations

import ast
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
