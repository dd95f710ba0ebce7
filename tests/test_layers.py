"""The package layering of reconciler/__init__.py, enforced: a layer imports only layers below it, and
pure modules do no logging, networking, processes or clock reading."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "reconciler"



def charter() -> tuple[dict[str, int], set[str]]:
    """The layer table of ``reconciler/__init__.py``: module -> rank, and the pure modules."""
    doc = ast.get_docstring(ast.parse((PKG / "__init__.py").read_text())) or ""
    ranks: dict[str, int] = {}
    pure: set[str] = set()
    for line in doc.splitlines():
        m = re.match(r"^\s{4}(\d+)\s{2}(\S.*?)(?:\s{2,}.*)?$", line)
        if not m:
            continue
        for name in m.group(2).split():
            module = f"reconciler.{name.rstrip('*')}"
            ranks[module] = int(m.group(1))
            if name.endswith("*"):
                pure.add(module)
    return ranks, pure


# rank: a module may import modules of equal or lower rank only (same rank: only within its package)
RANKS, PURE = charter()
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


def test_the_charter_names_every_module_and_package() -> None:
    listed = set(RANKS)
    assert len(listed) >= 20 and "reconciler.loop" in listed and "reconciler.errors" in PURE, listed
    for name, _ in modules():
        layer_of(name)  # raises for a module no line of the charter covers
    assert not {m for m in listed if not (PKG.parent / (m.replace(".", "/") + ".py")).exists()
                and not (PKG.parent / m.replace(".", "/")).is_dir()}, "the charter lists a module that is gone"


def test_every_package_says_whether_it_is_pure() -> None:
    for init in PKG.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring"


def test_the_architecture_doc_shows_the_charter_as_it_stands() -> None:
    """docs/architecture.md copies the layer table: it must not drift from the charter."""
    doc = ast.get_docstring(ast.parse((PKG / "__init__.py").read_text())) or ""
    rows = [line[4:] for line in doc.splitlines() if re.match(r"^\s{4}\d+\s{2}", line)]
    text = (PKG.parent / "docs" / "architecture.md").read_text()
    assert "```\n" + "\n".join(rows) + "\n```" in text
