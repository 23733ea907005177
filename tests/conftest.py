"""Shared fixtures. Tests import tiny graph builders from tests/graphs.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_onnx  # noqa: E402,F401  (session fixture: tiny random-weight timm exports)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
