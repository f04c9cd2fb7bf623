"""Payments tests reuse the mediator's network helpers (real mediatord and storaged on 127.0.0.1)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "mediatord"))
sys.path.insert(0, str(Path(__file__).parent.parent))
