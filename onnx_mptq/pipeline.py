"""The only module that knows the stage order.

export -> load + preflight -> analyse -> calibrate (float stats) -> SQ-b smooth + fold ->
capture layer inputs (smoothed graph) -> scale search (+ OPT-m) -> [bit allocation] ->
emit QDQ -> validate against the FP32 model.

Stages are plain functions handing typed records to each other; this module wires them, and
(with the CLI) is the only place that touches the filesystem. Outputs are written atomically
and only after every stage succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import onnx

from .config import Config, OptmSelect, RuntimeConfig
from .data import check_shapes_fit
from .errors import ConfigError, DataError, OutputError, PlanError
from .graph.analysis import ModelAnalysis, analyze, prepare
from .graph.io import graph_digest, load_model, save_model, write_text_atomic
from .plan import QuantPlan, SmoothingPlan

log = logging.getLogger(__name__)


def progress_enabled() -> bool:
    return os.environ.get("ONNX_MPTQ_NO_PROGRESS", "") != "1"


@dataclasses.dataclass(frozen=True)
class SmoothResult:
    model: onnx.ModelProto
    plan: SmoothingPlan | None
    report: Any  # passes.smooth.SmoothReport


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    plan: QuantPlan
    smooth_report: Any | None
    emit_report: Any
    validation: Any | None  # validate.EvaluationReport against the FP32 model, when eval data was given
    timings: dict[str, float]
    allocation: Any | None = None  # search.mixed.AllocationResult, when mixed precision ran
    optm: Any | None = None  # search.optm.TwinSelection, when OPT-m chose its quantizers on the network


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
           prepared: onnx.ModelProto | None = None) -> SmoothResult:
    """SQ-b: statistics of the LayerNorm outputs through ORT, then shift + smooth, folded."""
    from .calibrate.stats import collect_channel_stats
    from .passes.smooth import apply_smoothing, plan_smoothing

    prepared = prepared if prepared is not None else prepare(model)
    analysis = analysis if analysis is not None else analyze(prepared, prepared=True)
    data = _data(calib, prepared, config.calib.batch_size, config.calib.limit)
    check_shapes_fit(prepared, data)
    tensors = sorted({ln.output for ln in analysis.layernorms if ln.consumers})
    if tensors:
        stats = collect_channel_stats(prepared, tensors, data, config.runtime, progress=progress_enabled())
    else:  # no LayerNorm feeds a Linear (the analysis notes it): an empty plan, the model unchanged
        from .calibrate.stats import CalibrationStats

        stats = CalibrationStats(model_digest=graph_digest(prepared), samples=0, tensors=())
    samples = None
    if config.smooth.alpha_search and tensors:
        samples = _layernorm_samples(prepared, analysis, data, config)
    splan = plan_smoothing(analysis, stats, prepared, config.smooth, source_digest=graph_digest(model), samples=samples)
    smoothed, report = apply_smoothing(prepared, splan, analysis, stats=stats)
    return SmoothResult(smoothed, splan, report)


def _layernorm_samples(prepared: onnx.ModelProto, analysis: ModelAnalysis, data: Any, config: Config) -> dict:
    """Token rows of every smoothed LayerNorm output (alpha search): the captured inputs of its
    first consumer Linear, which reads the LayerNorm output through channel-preserving ops."""
    from .calibrate.capture import capture_unit_inputs

    wanted = {ln.consumers[0] for ln in analysis.layernorms if ln.consumers}
    sub = dataclasses.replace(analysis, units=tuple(u for u in analysis.units if u.name in wanted))
    captured = capture_unit_inputs(prepared, sub, data, config.runtime, tokens_per_layer=config.calib.tokens_per_layer,
                                   seed=config.seed, progress=progress_enabled())
    return {ln.output: captured[ln.consumers[0]].rows for ln in analysis.layernorms if ln.consumers}


def quantize(model: onnx.ModelProto | str | os.PathLike, calib: Any, config: Config = Config(), *,
             eval_data: Any = None) -> QuantizeResult:
    """The whole pipeline in one call: returns the QDQ model, its plan and a validation report.

    ``calib`` (and ``eval_data``) is anything :func:`onnx_mptq.data.open_data` accepts: an .npz
    path, an image folder, an ORT CalibrationDataReader or an iterable of input dicts."""
    from .calibrate.capture import capture_unit_inputs
    from .passes.emit_qdq import emit_qdq
    from .search.scales import search_scales

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
        sres = smooth(source, data, config, analysis=analysis0, prepared=prepared)
        work, splan, sreport = sres.model, sres.plan, sres.report
        timings["smooth_s"] = time.perf_counter() - t
    work = prepare(work)
    analysis = analyze(work, prepared=True)

    t = time.perf_counter()
    captured = capture_unit_inputs(work, analysis, data, config.runtime, tokens_per_layer=config.calib.tokens_per_layer,
                                   seed=config.seed, progress=progress_enabled())
    timings["capture_s"] = time.perf_counter() - t

    bits = None
    allocation = None
    if config.mixed.enabled:
        from .search.mixed import allocate_bits

        t = time.perf_counter()
        allocation = allocate_bits(work, analysis, captured, data, config, progress=progress_enabled())
        bits = allocation.bits
        timings["allocate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    options: dict = {}
    plan = search_scales(work, analysis, captured, config, bits=bits, source_digest=source_digest, smoothing=splan,
                         progress=progress_enabled(), twin_options=options)
    timings["search_s"] = time.perf_counter() - t
    selection = None
    if options and config.quant.optm_select is OptmSelect.NETWORK:
        from .search.optm import make_evaluator, select_twins

        t = time.perf_counter()
        evaluator = make_evaluator(work, analysis, captured, data, config)
        selection = select_twins(plan, options, evaluator, z=config.quant.optm_z, progress=progress_enabled())
        plan = selection.plan
        timings["optm_select_s"] = time.perf_counter() - t

    qmodel, ereport = emit_qdq(work, plan, analysis, _emit_options(config))
    validation = None
    if eval_data is not None:
        t = time.perf_counter()
        validation = validate_against(qmodel, source, eval_data, config.runtime)
        timings["validate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return QuantizeResult(qmodel, plan, sreport, ereport, validation, timings, allocation, selection)


def emit_from_plan(model: onnx.ModelProto | str | os.PathLike, plan: QuantPlan,
                   options: Any = None) -> tuple[onnx.ModelProto, Any]:
    """Re-emit a QDQ model from a (possibly hand-edited) plan, without calibration data.

    ``options``: a :class:`onnx_mptq.passes.emit_qdq.EmitOptions` (default: the defaults)."""
    from .passes.emit_qdq import EmitOptions, emit_qdq
    from .passes.smooth import apply_smoothing

    source = _as_model(model)
    plan.check_source(graph_digest(source), "plan")
    work = prepare(source)
    if plan.smoothing is not None:
        work, _ = apply_smoothing(work, plan.smoothing, analyze(work, prepared=True))
    work = prepare(work)
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
    return emit_qdq(work, plan, analysis, options if options is not None else EmitOptions())


def validate_against(qmodel: onnx.ModelProto, reference: onnx.ModelProto, data: Any, runtime: RuntimeConfig,
                     batch_size: int | None = None):
    from .data import DataSource, input_specs, open_data
    from .validate import evaluate

    ds = data if isinstance(data, DataSource) else open_data(data, input_specs(reference), batch_size=batch_size or runtime.batch_size)
    check_shapes_fit(reference, ds)
    return evaluate(qmodel, ds, runtime, reference=reference, latency_batch_size=batch_size or runtime.batch_size,
                    progress=progress_enabled())


# ---------------------------------------------------------------------------------------------
# file-level entry points for the CLI


def _data_from_args(args: Any, spec: str, model: onnx.ModelProto, batch_size: int, limit: int | None):
    from .data import input_specs, open_data, parse_preprocess_args

    pre = parse_preprocess_args(args.preprocess, args.size, args.mean, args.std, args.interpolation, args.crop_pct)
    return open_data(spec, input_specs(model), limit=limit, batch_size=batch_size, preprocess=pre)


def _check_output_path(inp: Path, out: Path) -> None:
    if inp.resolve() == out.resolve():
        raise ConfigError(f"{out}: the output would overwrite the input model; choose another path")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name for the output")


def smooth_file(inp: Path, out: Path, args: Any, config: Config, report_path: Path | None = None) -> str:
    _check_output_path(inp, out)
    source = load_model(inp)
    data = _data_from_args(args, args.calib, source, config.calib.batch_size, config.calib.limit)
    res = smooth(source, data, config)
    save_model(res.model, out)
    if report_path is not None:
        write_text_atomic(report_path, res.report.to_json() + "\n")
    return _smooth_summary(res, out) + f"\nprovider: {_provider(config)}"


def _provider(config: Config) -> str:
    from .calibrate.session import planned_provider

    return planned_provider(config.runtime)


def _smooth_summary(res: SmoothResult, out: Path) -> str:
    rep = res.report
    lines = [f"smoothed model written to {out}"]
    norms = getattr(rep, "norms", ())
    counts: dict[str, int] = {}
    for n in norms:
        mode = getattr(n, "mode", None)
        key = getattr(mode, "value", str(mode))
        counts[key] = counts.get(key, 0) + 1
    if counts:
        lines.append("layernorms: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for n in norms:
        reason = getattr(n, "reason", None)
        if reason:
            lines.append(f"  {n.layernorm}: {getattr(n.mode, 'value', n.mode)} ({reason})")
    return "\n".join(lines)


def _emit_options(config: Config) -> Any:
    from .passes.emit_qdq import EmitOptions

    return EmitOptions(weight_container=config.quant.weight_container)


def quantize_file(inp: Path, out: Path, args: Any, config: Config) -> str:
    _check_output_path(inp, out)
    source = load_model(inp)
    lines: list[str] = []
    if args.plan:
        try:
            text = Path(args.plan).read_text()
        except FileNotFoundError:
            raise PlanError(f"{args.plan}: no such plan file") from None
        try:
            plan = QuantPlan.from_json(text)
            qmodel, _ = emit_from_plan(source, plan, _emit_options(config))
        except PlanError as e:  # name the plan file
            raise PlanError(f"{args.plan}: {str(e).removeprefix('plan: ')}") from None
        validation = None
        if args.eval:
            validation = validate_against(qmodel, source, _data_from_args(args, args.eval, source, config.runtime.batch_size, None), config.runtime)
        save_model(qmodel, out)
        lines.append(f"re-emitted {out} from plan {args.plan}")
    else:
        if not args.calib:
            raise DataError("quantize needs --calib DATA (or --plan PLAN.json to re-emit without calibrating)")
        calib = _data_from_args(args, args.calib, source, config.calib.batch_size, config.calib.limit)
        eval_ds = _data_from_args(args, args.eval, source, config.runtime.batch_size, None) if args.eval else None
        res = quantize(source, calib, config, eval_data=eval_ds)
        plan, qmodel, validation = res.plan, res.model, res.validation
        if args.report:
            from .report import write_report

            write_report(Path(args.report), res, source, calib=calib, eval_data=eval_ds, runtime=config.runtime)
        # every stage succeeded: write the outputs
        if args.plan_out:
            write_text_atomic(args.plan_out, plan.to_json() + "\n")
        save_model(qmodel, out)
        lines.append(f"quantized model written to {out} ({len(plan.layers)} layers, "
                     f"avg weight bits {plan.avg_weight_bits:.2f}, avg activation bits {plan.avg_activation_bits:.2f})")
        if args.plan_out:
            lines.append(f"plan written to {args.plan_out}")
        lines.append("time (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in res.timings.items()))
    lines.append(f"provider: {_provider(config)}")
    if validation is not None:
        d = validation.to_dict()
        lines.append(
            "validation vs FP32: "
            + ", ".join(f"{k} {d[k]:.4g}" for k in ("top1", "top1_agreement", "sqnr_db", "cosine", "kl") if d.get(k) is not None)
            + f" [{d.get('provider')}]"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# demo


def demo_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models"


def run_demo(config: Config, out_dir: Path | None = None, only: Iterable[str] | None = None) -> str:
    """Whole pipeline on the embedded digits ViT: FP32 against quantized settings, as a table.

    ``only`` keeps the named rows (``W8A8``, ``W6A6``, ``W4A4``, ``MP5``); default all."""
    from .data import input_specs, open_data
    from .validate import evaluate

    root = demo_dir()
    model_path = root / "digits_vit.onnx"
    if not model_path.exists():
        raise DataError(f"{model_path}: the embedded demo model is missing (run tools/train_demo_model.py)")
    source = load_model(model_path)
    specs = input_specs(source)
    calib = open_data(root / "digits_calib.npz", specs, batch_size=config.calib.batch_size)
    evald = open_data(root / "digits_eval.npz", specs, batch_size=config.runtime.batch_size)
    rows = []
    fp = evaluate(source, evald, config.runtime, reference=None, latency_batch_size=config.runtime.batch_size, progress=False)
    rows.append(("FP32", fp.to_dict(), "-", "-"))
    settings = [("W8A8", 8, 8, False), ("W6A6", 6, 6, False), ("W4A4", 4, 4, False)]
    if _mixed_available():
        settings.append(("MP5 (W/A)", 8, 8, True))
    if only is not None:
        wanted = set(only)
        unknown = sorted(wanted - {label.split()[0] for label, *_ in settings})
        if unknown:
            raise ConfigError(f"demo: unknown setting(s) {', '.join(unknown)} (known: {', '.join(x[0].split()[0] for x in settings)})")
        settings = [x for x in settings if x[0].split()[0] in wanted]
    keep_dir = out_dir
    tmp = None
    if keep_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="onnx-mptq-demo-")
        keep_dir = Path(tmp.name)
    try:
        for label, wb, ab, mixed in settings:
            qcfg = dataclasses.replace(config.quant, w_bits=wb, a_bits=ab)
            mcfg = dataclasses.replace(config.mixed, enabled=True, target_bits=5.0) if mixed else config.mixed
            cfg = dataclasses.replace(config, quant=qcfg, mixed=mcfg)
            res = quantize(source, calib, cfg)
            save_model(res.model, keep_dir / f"digits_vit_{label.split()[0].lower()}.onnx")
            rep = evaluate(res.model, evald, config.runtime, reference=source, latency_batch_size=config.runtime.batch_size, progress=False)
            rows.append((label, rep.to_dict(), f"{res.plan.avg_weight_bits:.2f}", f"{res.plan.avg_activation_bits:.2f}"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return _demo_table(rows, fp.to_dict().get("provider"), out_dir)


def _mixed_available() -> bool:
    try:
        from .search import mixed  # noqa: F401
    except ImportError:
        return False
    return True


def _demo_table(rows: list, provider: str | None, out_dir: Path | None) -> str:
    def f(v: Any, nd: int = 2) -> str:
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    head = f"{'model':<10} {'w bits':>6} {'a bits':>6} {'top-1 %':>8} {'agree %':>8} {'SQNR dB':>8} {'KL':>8} {'ms/img b1':>9} {'ms b32':>8}"
    lines = ["onnx-mptq demo: a small ViT trained on scikit-learn's 8x8 digits (models/), evaluated on its held-out split", head, "-" * len(head)]
    for label, d, wb, ab in rows:
        lines.append(
            f"{label:<10} {wb:>6} {ab:>6} {f(d.get('top1')):>8} {f(d.get('top1_agreement')):>8} {f(d.get('sqnr_db'), 1):>8} "
            f"{f(d.get('kl'), 4):>8} {f(d.get('latency_ms_b1'), 3):>9} {f(d.get('latency_ms_batch'), 2):>8}"
        )
    lines.append(f"provider: {provider}" + (f"; models kept in {out_dir}" if out_dir else ""))
    return "\n".join(lines)


def load_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None


__all__: Iterable[str] = ["quantize", "smooth", "emit_from_plan", "validate_against", "QuantizeResult", "SmoothResult"]
