"""Test modules share one namespace (rootdir import mode, no packages), so two files with one basename would
make pytest refuse to collect the second. This keeps a new clash from reaching CI."""

from collections import Counter
from pathlib import Path


def test_test_module_basenames_are_unique() -> None:
    root = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in root.rglob("*.py") if p.name != "conftest.py" and "__pycache__" not in p.parts)
    assert names, "no test modules found"
    clashes = sorted(name for name, count in names.items() if count > 1)
    assert clashes == [], f"test module basenames used twice: {clashes}"
