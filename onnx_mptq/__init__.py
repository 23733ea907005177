"""onnx-mptq: mixed-precision post-training quantization of vision transformers in ONNX.

The public surface::

    onnx_mptq.quantize(model, calib, config)   -> QuantizeResult(model, plan, validation, ...)
    onnx_mptq.write_report(dir, result)        -> a Markdown + JSON + plots report of a result
    onnx_mptq.smooth(model, calib, config)     -> SmoothResult(model, plan, report)
    onnx_mptq.emit_from_plan(model, plan)      -> EmitResult (QDQ model, emit report, re-derived steps)
    onnx_mptq.analyze(model)                   -> ModelAnalysis
    onnx_mptq.evaluate(model, data, runtime, reference=...) -> EvaluationReport
"""

from __future__ import annotations

from typing import Any

from .config import Config
from .errors import MptqError
from .graph.analysis import ModelAnalysis, analyze
from .plan import QuantPlan, SmoothingPlan

__version__ = "0.1.0"


def quantize(model: Any, calib: Any, config: Config = Config(), *, eval_data: Any = None, measure: bool = False,
             progress: bool | None = None):
    """Quantize ``model`` (path or ModelProto) with calibration data; see pipeline.quantize.

    ``progress``: progress bars on stderr (None: only when stderr is a terminal)."""
    from .pipeline import quantize as _quantize

    return _quantize(model, calib, config, eval_data=eval_data, measure=measure, progress=progress)


def smooth(model: Any, calib: Any, config: Config = Config(), *, progress: bool | None = None):
    """SQ-b only: the smoothed FP32 model, its plan and report; see pipeline.smooth."""
    from .graph.io import load_model
    from .pipeline import smooth as _smooth

    m = load_model(model) if not hasattr(model, "graph") else model
    return _smooth(m, calib, config, progress=progress)


def write_report(dir: Any, result: Any):
    """Render a QuantizeResult (from ``quantize(..., measure=True)``) into the folder ``dir``."""
    from .report import write_report as _write

    return _write(dir, result)


def emit_from_plan(model: Any, plan: QuantPlan):
    """Re-emit a QDQ model from a (possibly edited) plan without calibration."""
    from .pipeline import emit_from_plan as _emit

    return _emit(model, plan)


def evaluate(model: Any, data: Any, runtime: Any = None, *, reference: Any = None, progress: bool | None = None):
    """Accuracy / fidelity / latency of ``model`` in ONNX Runtime on ``data``."""
    from .config import RuntimeConfig
    from .data import DataSource, input_specs, open_data
    from .graph.io import load_model
    from .validate import evaluate as _evaluate

    rt = runtime or RuntimeConfig()
    m = load_model(model) if not hasattr(model, "graph") else model
    ref = load_model(reference) if isinstance(reference, (str, bytes)) or hasattr(reference, "__fspath__") else reference
    ds = data if isinstance(data, DataSource) else open_data(data, input_specs(m), batch_size=rt.batch_size)
    from .pipeline import resolve_progress

    return _evaluate(m, ds, rt, reference=ref, latency_batch_size=rt.batch_size, progress=resolve_progress(progress))


__all__ = [
    "Config",
    "ModelAnalysis",
    "MptqError",
    "QuantPlan",
    "SmoothingPlan",
    "__version__",
    "analyze",
    "emit_from_plan",
    "evaluate",
    "quantize",
    "smooth",
    "write_report",
]
