"""fincryptfs/core/ is the pure, I/O-free core: it must not import any I/O or event-loop library."""

import ast
from pathlib import Path

import pytest

CORE_DIR = Path(__file__).resolve().parents[2] / "fincryptfs" / "core"

FORBIDDEN = {
    "trio",
    "httpx",
    "pyfuse3",
    "sqlite3",
    "hypercorn",
    "bitcoinlib",
    "anyio",
    "socket",
    "asyncio",
}


def core_files() -> list[Path]:
    return sorted(CORE_DIR.rglob("*.py"))


def forbidden_imports(path: Path) -> list[str]:
    """Every forbidden import in ``path``, at any nesting level, as 'line: module'."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def test_core_has_python_files() -> None:
    assert core_files(), f"no .py files under {CORE_DIR}: the purity check would pass vacuously"


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(CORE_DIR)))
def test_core_module_is_pure(path: Path) -> None:
    assert forbidden_imports(path) == [], f"{path} imports I/O libraries"


def test_checker_catches_nested_and_from_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"
        "import trio.lowlevel\n"
        "from httpx import AsyncClient\n"
        "def f():\n"
        "    import sqlite3\n"
        "    from . import socket\n"  # relative import of a sibling module: allowed
        "class C:\n"
        "    def g(self):\n"
        "        if True:\n"
        "            import asyncio as aio\n"
    )
    assert forbidden_imports(sample) == ["2: trio.lowlevel", "3: httpx", "5: sqlite3", "10: asyncio"]
