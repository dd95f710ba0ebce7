"""The package layering of reconciler/__init__.py, enforced: a layer imports only layers below it, and
pure modules do no logging, networking, processes or clock reading."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "reconciler"

# rank: a module may import modules of equal or lower rank only (same rank: only within its package)
RANKS = {
    "reconciler.errors": 0,
    "reconciler.settings": 1, "reconciler.parse": 1, "reconciler.fsutil": 1,
    "reconciler.model": 2, "reconciler.schema": 2, "reconciler.layout": 2,
    "reconciler.validate": 3, "reconciler.render": 3, "reconciler.diff": 3, "reconciler.status": 3,
    "reconciler.statustable": 3,
    "reconciler.sources": 4, "reconciler.caddy": 4, "reconciler.state": 4,
    "reconciler.loop": 5,
    "reconciler.api": 6,
    "reconciler.app": 7,
    "reconciler.commands": 8,
    "reconciler.cli": 9,
}
PURE = {"reconciler.errors", "reconciler.settings", "reconciler.parse", "reconciler.model", "reconciler.schema",
        "reconciler.validate", "reconciler.render", "reconciler.diff", "reconciler.status", "reconciler.layout",
        "reconciler.statustable"}
IMPURE_IMPORTS = {"logging", "structlog", "httpx", "watchdog", "subprocess", "socket", "time", "threading",
                  "random", "datetime"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in RANKS:
            return key
    raise AssertionError(f"{module} is not assigned to a layer in tests/test_layers.py")


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        if name == "reconciler":
            continue
        out.append((name, path))
    return out


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


@pytest.mark.parametrize(("name", "path"), modules(), ids=[m for m, _ in modules()])
def test_module_imports_only_lower_layers(name: str, path: Path) -> None:
    mine = layer_of(name)
    for imported in imports(path):
        if imported == "reconciler" or not imported.startswith("reconciler."):
            continue
        theirs = layer_of(imported)
        assert RANKS[theirs] < RANKS[mine] or theirs == mine, f"{name} (layer {mine}) imports {imported}"


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_do_no_io(name: str) -> None:
    path = PKG.parent / (name.replace(".", "/") + ".py")
    bad = [i for i in imports(path) if i.split(".")[0] in IMPURE_IMPORTS]
    assert not bad, f"pure module {name} imports {bad}"


def test_every_package_says_whether_it_is_pure() -> None:
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring"
