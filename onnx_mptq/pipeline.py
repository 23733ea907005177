"""The only module that knows the stage order.

export -> load + preflight -> analyse -> calibrate (float stats) -> SQ-b smooth + fold ->
capture layer inputs (smoothed graph) -> [bit allocation] -> scale search (+ OPT-m choice) ->
[error compensation] -> emit QDQ -> validate against the FP32 model [-> per-layer measurements for a report].

Stages are plain functions handing typed records to each other; this module wires them and
returns them as one :class:`QuantizeResult`. It writes nothing: the CLI (``cli.py``) maps files
and flags onto it and writes the outputs, ``report.py`` renders a result, ``demo.py`` runs the
embedded demo through it.

Progress bars: every function here takes ``progress: bool | None`` (None: on only when stderr
is a terminal, :func:`resolve_progress`) and hands the stages a plain bool.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .config import Config, OptmSelect, RuntimeConfig
from .data import check_shapes_fit
from .errors import DataError, PlanError
from .graph.analysis import ModelAnalysis, analyze, prepare
from .graph.io import graph_digest, load_model, model_file_bytes, opset_of
from .numerics.search import blas_threads_limited
from .passes.constants import round_for_storage
from .plan import CompensatedWeights, QuantPlan, SmoothingPlan

if TYPE_CHECKING:
    from .passes.emit_qdq import EmitReport, EmitResult
    from .passes.pack_int4 import PackResult
    from .passes.smooth import SmoothReport
    from .search.compensate import CompensationResult
    from .search.mixed import AllocationResult
    from .search.optm import TwinSelection
    from .validate import EvaluationReport

log = logging.getLogger(__name__)

SQNR_SAMPLES = 8  # calibration samples the per-layer SQNR of a report is measured on


def resolve_progress(progress: bool | None) -> bool:
    """The usual convention: progress bars when asked, else only when stderr is a terminal."""
    if progress is not None:
        return bool(progress)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class SmoothResult:
    model: onnx.ModelProto
    plan: SmoothingPlan | None
    report: SmoothReport


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """MB = 10^6 bytes. ``*_onnx``: the serialized models; ``quantized_packed``: each quantized
    weight at its bit-width (``params * bits / 8``) plus float32 scales and every other
    parameter in float32 -- what a bit-packing runtime would store."""

    fp32_onnx_mb: float
    quantized_onnx_mb: float
    quantized_packed_mb: float


@dataclasses.dataclass(frozen=True)
class LayerMeasure:
    """One quantized unit as a report shows it: where it sits, and (when measured) the SQNR of
    its output in the quantized model against the (smoothed, numerically identical) float graph,
    ``10 log10(sum y^2 / sum (y - y_q)^2)`` over :data:`SQNR_SAMPLES` calibration samples."""

    unit: str
    role: str
    block: int | None
    sqnr_db: float | None = None


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    plan: QuantPlan
    smooth_report: SmoothReport | None
    emit_report: EmitReport
    validation: EvaluationReport | None  # against the FP32 model, when eval data was given
    timings: dict[str, float]
    allocation: AllocationResult | None = None  # when mixed precision ran
    optm: TwinSelection | None = None  # when OPT-m chose its quantizers on the network
    sizes: ModelSizes | None = None
    layers: tuple[LayerMeasure, ...] = ()  # in plan order; SQNR only with ``measure=True``
    fp32: EvaluationReport | None = None  # the FP32 model on the eval data (``measure=True``)
    storage: PackResult | None = None  # how the weight codes are stored in ``model`` (int8 / int4)
    weights: CompensatedWeights | None = None  # the compensated codes the plan's layers read (write them beside it)
    compensation: CompensationResult | None = None  # when error compensation ran


def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        from .graph.io import preflight

        preflight(model)
        return model
    return load_model(model)


def _data(spec: Any, model: onnx.ModelProto, batch_size: int, limit: int | None):
    from .data import DataSource, input_specs, open_data

    if spec is None:
        raise DataError("no calibration data given (pass --calib DATA)")
    ds = spec if isinstance(spec, DataSource) else open_data(spec, input_specs(model), limit=limit, batch_size=batch_size)
    if not ds.reiterable:
        # the pipeline reads calibration data several times (statistics, capture, sensitivity):
        # a one-shot reader or generator is read once into memory (calibration sets are small)
        log.info("%s can be read only once; keeping its batches in memory", ds.name)
        ds = open_data(list(ds), input_specs(model), batch_size=batch_size)
    return ds


# ---------------------------------------------------------------------------------------------
# stages


def smooth(model: onnx.ModelProto, calib: Any, config: Config = Config(), *, analysis: ModelAnalysis | None = None,
           prepared: onnx.ModelProto | None = None, progress: bool | None = None) -> SmoothResult:
    """SQ-b: statistics of the LayerNorm outputs through ORT, then shift + smooth, folded."""
    from .calibrate.stats import collect_channel_stats
    from .passes.smooth import apply_smoothing, plan_smoothing

    show = resolve_progress(progress)
    prepared = prepared if prepared is not None else prepare(model)
    analysis = analysis if analysis is not None else analyze(prepared, prepared=True)
    data = _data(calib, prepared, config.calib.batch_size, config.calib.limit)
    check_shapes_fit(prepared, data)
    tensors = sorted({ln.output for ln in analysis.layernorms if ln.consumers})
    if tensors:
        stats = collect_channel_stats(prepared, tensors, data, config.runtime, progress=show)
    else:  # no LayerNorm feeds a Linear (the analysis notes it): an empty plan, the model unchanged
        from .calibrate.stats import CalibrationStats

        stats = CalibrationStats(model_digest=graph_digest(prepared), samples=0, tensors=())
    samples = None
    if config.smooth.alpha_search and tensors:
        samples = _layernorm_samples(prepared, analysis, data, config, show)
    splan = plan_smoothing(analysis, stats, prepared, config.smooth, source_digest=graph_digest(model), samples=samples)
    res = apply_smoothing(prepared, splan, analysis, stats=stats)
    return SmoothResult(res.model, splan, res.report)


def _layernorm_samples(prepared: onnx.ModelProto, analysis: ModelAnalysis, data: Any, config: Config,
                       progress: bool) -> dict:
    """Token rows of every smoothed LayerNorm output (alpha search): the captured inputs of its
    first consumer Linear, which reads the LayerNorm output through channel-preserving ops."""
    from .calibrate.capture import capture_unit_inputs

    wanted = {ln.consumers[0] for ln in analysis.layernorms if ln.consumers}
    sub = dataclasses.replace(analysis, units=tuple(u for u in analysis.units if u.name in wanted))
    captured = capture_unit_inputs(prepared, sub, data, config.runtime, tokens_per_layer=config.capture.tokens_per_layer,
                                   seed=config.seed, progress=progress)
    return {ln.output: captured[ln.consumers[0]].rows for ln in analysis.layernorms if ln.consumers}


@blas_threads_limited  # numpy BLAS threads fight ORT's and wait on a small machine (numerics/search.py)
def quantize(model: onnx.ModelProto | str | os.PathLike, calib: Any, config: Config = Config(), *,
             eval_data: Any = None, measure: bool = False, progress: bool | None = None) -> QuantizeResult:
    """The whole pipeline in one call: returns the QDQ model, its plan and a validation report.

    ``calib`` (and ``eval_data``) is anything :func:`onnx_mptq.data.open_data` accepts: an .npz
    path, an image folder, an ORT CalibrationDataReader or an iterable of input dicts.
    ``measure``: also take what a report shows beyond the plan (``onnx_mptq.report``): the
    per-layer SQNR on a few calibration samples and, with ``eval_data``, the FP32 model's own
    evaluation (``QuantizeResult.layers`` / ``.fp32``)."""
    from .calibrate.capture import capture_unit_inputs
    from .search.scales import search_scales

    show = resolve_progress(progress)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = _as_model(model)
    source_digest = graph_digest(source)
    prepared = prepare(source)
    analysis0 = analyze(prepared, prepared=True)
    timings["analyse_s"] = time.perf_counter() - t0
    data = _data(calib, prepared, config.calib.batch_size, config.calib.limit)
    check_shapes_fit(prepared, data)

    splan = None
    sreport = None
    work = prepared
    if config.smooth.enabled and any(ln.consumers for ln in analysis0.layernorms):  # else nothing to smooth (noted)
        t = time.perf_counter()
        sres = smooth(source, data, config, analysis=analysis0, prepared=prepared, progress=show)
        work, splan, sreport = sres.model, sres.plan, sres.report
        timings["smooth_s"] = time.perf_counter() - t
    work = round_for_storage(prepare(work), config.quant.emission.constant_storage)  # float16 constants: before calibration
    analysis = analyze(work, prepared=True)

    t = time.perf_counter()
    captured = capture_unit_inputs(work, analysis, data, config.runtime, tokens_per_layer=config.capture.tokens_per_layer,
                                   seed=config.seed, progress=show)
    timings["capture_s"] = time.perf_counter() - t

    bits = None
    allocation = None
    if config.mixed.enabled:
        from .search.mixed import allocate_bits

        t = time.perf_counter()
        allocation = allocate_bits(work, analysis, captured, data, config, progress=show)
        bits = allocation.bits
        timings["allocate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    searched = search_scales(work, analysis, captured, config, bits=bits, source_digest=source_digest, smoothing=splan,
                             progress=show)
    plan, options = searched.plan, searched.twin_options
    timings["search_s"] = time.perf_counter() - t
    selection = None
    if options and config.quant.optm.select is OptmSelect.NETWORK:
        from .search.optm import make_evaluator, select_twins

        t = time.perf_counter()
        evaluator = make_evaluator(work, analysis, captured, data, config)
        selection = select_twins(plan, options, evaluator, z=config.quant.optm.z, progress=show)
        plan = selection.plan
        timings["optm_select_s"] = time.perf_counter() - t

    weights = None
    compensation = None
    if config.quant.compensate.any:

        t = time.perf_counter()
        compensation = compensation_stage(work, analysis, captured, plan, data, config, progress=show)
        plan, weights = compensation.plan, compensation.weights
        timings["compensate_s"] = time.perf_counter() - t

    plan = _resolve_storage(plan, work)
    emitted = _emit(work, plan, analysis, weights)
    qmodel, ereport = emitted.model, emitted.report
    eval_ds = None
    validation = None
    if eval_data is not None:
        t = time.perf_counter()
        eval_ds = _eval_source(eval_data, source, config.runtime.batch_size)
        validation = validate_against(qmodel, source, eval_ds, config.runtime, progress=show)
        timings["validate_s"] = time.perf_counter() - t
    layers = _layer_measures(plan, analysis)
    fp32 = None
    if measure:
        t = time.perf_counter()
        layers = _with_sqnr(layers, plan, analysis, work, qmodel, data, config.runtime)
        if eval_ds is not None:
            from .validate import evaluate

            fp32 = evaluate(source, eval_ds, config.runtime, reference=None, latency_batch_size=config.runtime.batch_size,
                            progress=False)
        timings["measure_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    sizes = ModelSizes(model_file_bytes(source) / 1e6, model_file_bytes(qmodel) / 1e6, packed_size_mb(plan, work))
    return QuantizeResult(qmodel, plan, sreport, ereport, validation, timings, allocation, selection,
                          sizes=sizes, layers=layers, fp32=fp32, storage=emitted.storage, weights=weights,
                          compensation=compensation)


def _resolve_storage(plan: QuantPlan, work: onnx.ModelProto) -> QuantPlan:
    """The plan with ``emission.weight_storage`` resolved to INT8 or INT4 and recorded (before
    emission: the emitted model's marker holds the plan's digest). AUTO packs only a model already
    at opset >= 21; nothing of 4 bits or fewer is never packed (no opset change for nothing)."""
    from .passes.pack_int4 import resolve_storage

    packable = any(lp.weight is not None and lp.weight.bits <= 4 for lp in plan.layers)
    storage = resolve_storage(plan.emission.weight_storage, opset_of(work), packable)
    return dataclasses.replace(plan, emission=dataclasses.replace(plan.emission, weight_storage=storage))


def _emit(work: onnx.ModelProto, plan: QuantPlan, analysis: ModelAnalysis,
          weights: CompensatedWeights | None = None) -> EmitResult:
    """QDQ emission, then the weight storage the plan records (passes/pack_int4.py)."""
    from .passes.emit_qdq import emit_qdq
    from .passes.pack_int4 import pack_int4

    emitted = emit_qdq(work, plan, analysis, weights)
    stored = pack_int4(emitted.model, plan.emission.weight_storage)
    return dataclasses.replace(emitted, model=stored.model, storage=stored)

def compensation_stage(work: onnx.ModelProto, analysis: ModelAnalysis, captured: Any, plan: QuantPlan, data: Any,
                       config: Config, *, progress: bool = False) -> CompensationResult:
    """Error compensation of ``plan`` (:func:`onnx_mptq.search.compensate.compensate`) with the
    inputs ``quant.compensate.inputs`` names: ``float``: the captured float rows; ``network``: the
    rows of the plan emitted with nearest rounding, captured once; ``sequential`` / ``blocks``: per
    group of units reading one tensor / per transformer block, the rows of the model quantized (and
    compensated) upstream of them, captured on the
    first ``quant.compensate.samples`` calibration samples, paired with the float rows of the
    same samples. Captures sample rows by the seed, the data and its order only, so two captures
    of one data subset keep the same tokens."""
    from .calibrate.capture import capture_unit_inputs
    from .config import CompensateInputs
    from .passes.emit_qdq import emit_qdq
    from .search.compensate import compensate

    c = config.quant.compensate
    weighted = dataclasses.replace(analysis, units=tuple(u for u in analysis.units if u.weight is not None))
    kw = dict(tokens_per_layer=config.capture.tokens_per_layer, seed=config.seed, progress=False)
    fits_inputs = c.activation or c.bias
    if not fits_inputs or c.inputs is CompensateInputs.FLOAT:
        return compensate(work, analysis, captured, plan, c, progress=progress)
    if c.inputs is CompensateInputs.NETWORK:
        qmodel = emit_qdq(work, plan, analysis).model
        captured_q = capture_unit_inputs(qmodel, weighted, data, config.runtime, **kw)
        return compensate(work, analysis, captured, plan, c, captured_q=captured_q, progress=progress)
    subset = _first_batches(data, c.samples)
    floats = capture_unit_inputs(work, weighted, subset, config.runtime, **kw)

    def network(partial: QuantPlan, weights: CompensatedWeights | None, units: tuple[str, ...]):
        qmodel = emit_qdq(work, partial, analysis, weights).model
        only = dataclasses.replace(analysis, units=tuple(u for u in analysis.units if u.name in units))
        return capture_unit_inputs(qmodel, only, subset, config.runtime, **kw)

    return compensate(work, analysis, floats, plan, c, network=network, by_block=c.inputs is CompensateInputs.BLOCKS,
                      progress=progress)


def _first_batches(data: Any, samples: int) -> list:
    """The first batches of ``data`` holding at least ``samples`` samples (or all of them)."""
    out, n = [], 0
    for batch in data:
        out.append(batch)
        inputs = getattr(batch, "inputs", batch)
        n += len(next(iter(inputs.values())))
        if n >= samples:
            break
    return out


def _layer_measures(plan: QuantPlan, analysis: ModelAnalysis) -> tuple[LayerMeasure, ...]:
    units = {u.name: u for u in analysis.units}
    return tuple(LayerMeasure(lp.unit, units[lp.unit].role.value if lp.unit in units else lp.role,
                              units[lp.unit].block if lp.unit in units else None) for lp in plan.layers)


def _with_sqnr(layers: tuple[LayerMeasure, ...], plan: QuantPlan, analysis: ModelAnalysis, work: onnx.ModelProto,
               qmodel: onnx.ModelProto, data: Any, runtime: RuntimeConfig) -> tuple[LayerMeasure, ...]:
    """Per-layer SQNR of the unit outputs (the quantized model against ``work``, the float graph
    the plan was made on) on the first :data:`SQNR_SAMPLES` calibration samples."""
    from .evaluate.evaluator import first_samples, unit_output_sqnr

    outputs = {u.name: u.output for u in analysis.units if u.output}
    inits = {t.name for t in work.graph.initializer}
    inputs = first_samples(data, [i.name for i in work.graph.input if i.name not in inits], SQNR_SAMPLES)
    tensors = [outputs[lp.unit] for lp in plan.layers if lp.unit in outputs]
    by_tensor = unit_output_sqnr(work, qmodel, tensors, inputs, runtime)
    return tuple(dataclasses.replace(m, sqnr_db=by_tensor.get(outputs.get(m.unit, ""))) for m in layers)


def packed_size_mb(plan: QuantPlan, model: onnx.ModelProto) -> float:
    """Size of the model with each quantized weight at its bit-width (see :class:`ModelSizes`);
    ``model`` is the float graph the plan was made on."""
    wbits = sum(lp.params * lp.weight.bits for lp in plan.layers if lp.weight is not None)
    welems = sum(lp.params for lp in plan.layers if lp.weight is not None)
    channels = sum(len(lp.weight.scales) for lp in plan.layers if lp.weight is not None)
    floats = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            floats += int(np.prod(init.dims)) if len(init.dims) else 1
    return (wbits / 8 + 4 * channels + 4 * max(floats - welems, 0)) / 1e6


def emit_from_plan(model: onnx.ModelProto | str | os.PathLike, plan: QuantPlan,
                   weights: CompensatedWeights | None = None) -> EmitResult:
    """Re-emit a QDQ model from a (possibly hand-edited) plan, without calibration data: a
    :class:`onnx_mptq.passes.emit_qdq.EmitResult` (the plan's ``emission`` says how it is written;
    ``weights``: the compensated codes, needed when the plan has compensated layers)."""
    from .passes.smooth import apply_smoothing

    source = _as_model(model)
    plan.check_source(graph_digest(source), "plan")
    work = prepare(source)
    if plan.smoothing is not None:
        work = apply_smoothing(work, plan.smoothing, analyze(work, prepared=True)).model
    work = round_for_storage(prepare(work), plan.emission.constant_storage)
    digest = graph_digest(work)
    if digest != plan.model_digest:
        raise PlanError(
            f"plan: smoothing the model did not reproduce the graph the plan was made for (digest {digest}, "
            f"plan expects {plan.model_digest}); was the plan's smoothing section edited?"
        )
    analysis = analyze(work, prepared=True)
    known = {u.name for u in analysis.units}
    for lp in plan.layers:
        if lp.unit not in known:
            raise PlanError(f"plan: layer {lp.unit!r} is not a quantizable unit of this model")
    return _emit(work, _resolve_storage(plan, work), analysis, weights)


def _eval_source(data: Any, reference: onnx.ModelProto, batch_size: int):
    from .data import DataSource, input_specs, open_data

    return data if isinstance(data, DataSource) else open_data(data, input_specs(reference), batch_size=batch_size)


def validate_against(qmodel: onnx.ModelProto, reference: onnx.ModelProto, data: Any, runtime: RuntimeConfig,
                     batch_size: int | None = None, *, progress: bool | None = None) -> EvaluationReport:
    """``qmodel`` against its FP32 ``reference`` on ``data`` (accuracy, fidelity, latency)."""
    from .validate import evaluate

    ds = _eval_source(data, reference, batch_size or runtime.batch_size)
    check_shapes_fit(reference, ds)
    return evaluate(qmodel, ds, runtime, reference=reference, latency_batch_size=batch_size or runtime.batch_size,
                    progress=resolve_progress(progress))


__all__ = ["quantize", "smooth", "emit_from_plan", "validate_against", "QuantizeResult", "SmoothResult",
           "LayerMeasure", "ModelSizes", "resolve_progress"]
