"""Makes tests/netfixtures.py importable (tests/ has no __init__.py, so only this folder is on sys.path)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
