"""Paths shared by fixtures and tests (importable as `testenv`: several conftest.py files exist,
so `from conftest import ...` would pick whichever was imported first)."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_CACHE = Path(os.environ.get("TSUBASA_TEST_MODEL_CACHE", Path.home() / ".cache" / "tsubasa" / "models"))
