"""Shared fixtures. Tests import tiny graph builders from tests/graphs.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("ONNX_MPTQ_NO_PROGRESS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """Factory: tiny random-weight timm model exported once per session -> Path (None if the
    dynamo exporter fails on it)."""
    pytest.importorskip("timm")
    from onnx_mptq.errors import ExportError
    from onnx_mptq.export import export_timm, tiny_model_kwargs

    root = tmp_path_factory.mktemp("tiny_timm")
    cache: dict[tuple, Path | None] = {}

    def get(kind: str, opset: int = 17, dynamo: bool = False) -> Path | None:
        key = (kind, opset, dynamo)
        if key not in cache:
            name, kwargs, img = tiny_model_kwargs(kind)
            out = root / f"{kind}_o{opset}{'_dyn' if dynamo else ''}.onnx"
            try:
                export_timm(name, out, img_size=img, opset=opset, dynamo=dynamo, model_kwargs=kwargs)
                cache[key] = out
            except ExportError:
                if not dynamo:
                    raise
                cache[key] = None
        return cache[key]

    return get
