"""The core's packages import one way only, as proxy/__init__.py describes them, and only `cli` knows
the adapters: a newcomer can trust the folder names, and a change that breaks that fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parents[2] / "proxy"
# Bottom to top: a package may import those before it, never those after it.
ORDER = ["vocabulary", "observe", "record", "cedar", "calls", "settings", "decision", "oversight", "notify", "runtime",
         "cli"]
ADAPTERS = ("mitmproxy", "fastapi", "starlette", "uvicorn", "addons", "override_api")


def _layer(path: Path) -> str:
    return path.relative_to(PROXY).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Top-level module names a file imports, with `proxy.X` given as X; imports for type checking only
    count too (a type is a dependency)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "proxy":
                modules = [f"proxy.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            names.add(parts[1] if parts[0] == "proxy" and len(parts) > 1 else parts[0])
    return names


SOURCES = sorted(p for p in PROXY.rglob("*.py") if p.parent != PROXY or p.name == "runtime.py")


def test_every_module_belongs_to_a_known_package() -> None:
    assert {_layer(p) for p in SOURCES} == set(ORDER)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PROXY)))
def test_a_package_imports_only_packages_beneath_it(path: Path) -> None:
    layer = ORDER.index(_layer(path))
    above = {name for name in _imports(path) if name in ORDER and ORDER.index(name) > layer}
    assert not above, f"{path.relative_to(PROXY)} imports {sorted(above)}, above its package"


@pytest.mark.parametrize("path", [p for p in SOURCES if _layer(p) != "cli"], ids=lambda p: str(p.relative_to(PROXY)))
def test_only_cli_knows_the_adapters(path: Path) -> None:
    assert not _imports(path) & set(ADAPTERS), f"{path.relative_to(PROXY)} imports an adapter"
