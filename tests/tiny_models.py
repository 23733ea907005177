"""Tiny random-weight timm models exported to ONNX once per test session.

Use it from any test module (``tests/`` is on ``sys.path`` under pytest's default import mode)::

    import pytest
    from tiny_models import tiny_onnx  # noqa: F401  (the fixture)

    @pytest.mark.torch
    def test_something(tiny_onnx):
        path = tiny_onnx("vit", 17)             # kinds: vit, deit, deit_distilled, swin
        path14 = tiny_onnx("swin", opset=14)    # decomposed LayerNorm
        dyn = tiny_onnx("vit", 18, dynamo=True) # torch's dynamo exporter; None where it fails
                                                # (opset < 17, or Swin below opset 18)

Each model comes from :func:`onnx_mptq.export.build_tiny_timm` (seeded, LayerNorm gamma/beta and
Linear biases drawn at random so smoothing and folding see realistic values), is exported with
:func:`onnx_mptq.export.export_model` (checked against torch in ONNX Runtime) into a session
temporary directory, and the path is reused for the rest of the session. Paths are shared:
load them, never write to them. Tests needing this are skipped when torch or timm is missing.

Like the ``tiny_onnx`` of ``tests/conftest.py`` (same call, but timm's default initialisation),
a dynamo export that fails gives ``None`` rather than an error, so the two are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TinyOnnx = Callable[..., "Path | None"]


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> TinyOnnx:
    root = tmp_path_factory.mktemp("tiny_onnx")
    cache: dict[tuple[str, int, bool, int], Path | None] = {}

    def make(kind: str, opset: int = 17, dynamo: bool = False, *, seed: int = 0) -> Path | None:
        pytest.importorskip("torch")
        pytest.importorskip("timm")
        from onnx_mptq.config import Providers, RuntimeConfig
        from onnx_mptq.errors import ExportError
        from onnx_mptq.export import build_tiny_timm, export_model, tiny_model_kwargs

        key = (kind, int(opset), bool(dynamo), int(seed))
        if key not in cache:
            spec = tiny_model_kwargs(kind)
            model = build_tiny_timm(kind, seed=seed)
            out = root / f"{kind}_op{opset}{'_dynamo' if dynamo else ''}_s{seed}.onnx"
            try:
                result = export_model(
                    model,
                    out,
                    name=spec.name,
                    input_shape=(3, spec.img_size, spec.img_size),
                    opset=opset,
                    dynamo=dynamo,
                    runtime=RuntimeConfig(providers=Providers.CPU),
                    check_samples=1,
                )
            except ExportError:
                if not dynamo:
                    raise
                cache[key] = None
            else:
                cache[key] = result.path
        return cache[key]

    return make
