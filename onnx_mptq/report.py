"""A readable report of one quantization run: ``report.md`` + ``report.json`` + PNG plots.

``write_report(dir, result, source_model, calib=..., eval_data=..., runtime=...)`` writes:

* ``report.md``: the summary table (FP32 against the quantized model: top-1, top-1 agreement,
  SQNR and KL of the logits, model size, latency), the achieved average bits against the budget,
  the mixed-precision search statistics, and a per-layer table (bits, quantizer schemes, search
  sensitivity, SQNR of the layer output);
* ``bits.png``: weight and activation bits per layer;
* ``sensitivity.png`` (when mixed precision ran): the increase of the search metric (KL of the
  softmaxes, or the noise-to-signal ratio of the logits) when lowering each layer's weight
  or activation one candidate, measured at the start of the search (log scale);
* ``sqnr.png`` (when calibration data is given): per-layer SQNR of the quantized model's unit
  outputs against the FP32 (smoothed, numerically identical) graph, on a few calibration samples;
* ``allocation.png`` (when mixed precision ran): the metric and average bits along the greedy steps;
* ``report.json``: the same numbers, machine-readable.

Sizes: "ONNX" is the serialized model (8-bit containers for every bit-width); "packed" counts
each quantized weight at its bit-width (``params * bits / 8``) plus float32 scales and every
other parameter in float32 -- what a bit-packing runtime would store. MB = 10^6 bytes.

Everything is written into a temporary sibling directory and renamed into place, so a failed
run leaves no half-written report; an existing report directory is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .config import RuntimeConfig
from .graph.io import model_file_bytes
from .plan import QuantPlan, Scheme

log = logging.getLogger(__name__)

SQNR_SAMPLES = 8  # calibration samples the per-layer SQNR is measured on


@dataclasses.dataclass(frozen=True)
class LayerRow:
    unit: str
    label: str
    role: str
    block: int | None
    w_bits: int | None
    a_bits: tuple[int, ...]
    schemes: tuple[str, ...]
    pinned: bool
    sens_w: float | None  # metric increase of the first weight drop
    sens_a: float | None
    sqnr_db: float | None  # of the unit's output


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _label(unit, index: int) -> str:
    return f"{unit.block}.{unit.role.value}" if unit.block is not None else unit.role.value


def _float_graph(source: onnx.ModelProto, plan: QuantPlan):
    """The (smoothed) float graph the plan refers to, and its analysis; None when it cannot be
    rebuilt exactly."""
    from .graph.analysis import analyze, prepare
    from .graph.io import graph_digest
    from .passes.smooth import apply_smoothing

    work = prepare(source)
    if plan.smoothing is not None:
        work, _ = apply_smoothing(work, plan.smoothing, analyze(work, prepared=True))
        work = prepare(work)
    if graph_digest(work) != plan.model_digest:
        return None, None
    return work, analyze(work, prepared=True)


def _packed_size_mb(plan: QuantPlan, model: onnx.ModelProto) -> float:
    wbits = sum(lp.params * lp.weight.bits for lp in plan.layers if lp.weight is not None)
    welems = sum(lp.params for lp in plan.layers if lp.weight is not None)
    channels = sum(len(lp.weight.scales) for lp in plan.layers if lp.weight is not None)
    floats = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            floats += int(np.prod(init.dims)) if len(init.dims) else 1
    return (wbits / 8 + 4 * channels + 4 * max(floats - welems, 0)) / 1e6


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{nd}f}"
    return str(v)


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


# ---------------------------------------------------------------------------------------------
# plots


_METRIC_NAMES = {"kl": "KL", "nmse": "logit noise/signal"}


def _plots(tmp: Path, rows: list[LayerRow], allocation: Any) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out: list[tuple[str, str]] = []
    mname = _METRIC_NAMES.get(allocation.sensitivity.metric, "metric") if allocation is not None else "metric"
    x = np.arange(len(rows))
    labels = [r.label for r in rows]
    width = max(8.0, 0.22 * len(rows) + 2.0)

    def finish(fig, ax, name: str, title: str) -> None:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_xlim(-0.7, len(rows) - 0.3)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp / name, dpi=110)
        plt.close(fig)
        out.append((name, title))

    fig, ax = plt.subplots(figsize=(width, 3.8))
    wb = [r.w_bits if r.w_bits is not None else 0 for r in rows]
    ab = [max(r.a_bits) if r.a_bits else 0 for r in rows]
    ax.bar(x - 0.2, wb, 0.4, label="weight bits", color="#3b6ea8")
    ax.bar(x + 0.2, ab, 0.4, label="activation bits", color="#e0892b")
    for i, r in enumerate(rows):
        if r.pinned:
            ax.annotate("pin", (i, max(wb[i], ab[i]) + 0.1), ha="center", fontsize=6)
    ax.set_ylim(0, 9)
    ax.set_ylabel("bits")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("bits per layer")
    finish(fig, ax, "bits.png", "Bits per layer")

    if allocation is not None and any(r.sens_w is not None or r.sens_a is not None for r in rows):
        fig, ax = plt.subplots(figsize=(width, 3.8))
        sw = [r.sens_w if r.sens_w is not None else np.nan for r in rows]
        sa = [r.sens_a if r.sens_a is not None else np.nan for r in rows]
        ax.bar(x - 0.2, sw, 0.4, label="weight: one candidate down", color="#3b6ea8")
        ax.bar(x + 0.2, sa, 0.4, label="activation: one candidate down", color="#e0892b")
        top = float(np.nanmax(np.abs([*sw, *sa]))) if np.isfinite(np.nanmax(np.abs([*sw, *sa]))) else 1.0
        ax.set_yscale("symlog", linthresh=max(top * 1e-3, 1e-12))
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_ylabel(f"{mname} increase")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title("sensitivity per layer (from the highest candidate, rest of the network at it)")
        finish(fig, ax, "sensitivity.png", "Sensitivity per layer")

    if any(r.sqnr_db is not None for r in rows):
        fig, ax = plt.subplots(figsize=(width, 3.8))
        vals = [r.sqnr_db if r.sqnr_db is not None and math.isfinite(r.sqnr_db) else np.nan for r in rows]
        ax.bar(x, vals, 0.6, color="#4c9a5b")
        ax.set_ylabel("SQNR (dB)")
        ax.set_title("per-layer SQNR of the quantized model against FP32 (layer outputs)")
        finish(fig, ax, "sqnr.png", "Per-layer SQNR against FP32")

    if allocation is not None and allocation.history:
        steps = [h.step for h in allocation.history]
        fig, ax1 = plt.subplots(figsize=(8, 3.6))
        ax1.plot(steps, [h.avg_weight_bits for h in allocation.history], label="avg weight bits", color="#3b6ea8")
        ax1.plot(steps, [h.avg_activation_bits for h in allocation.history], label="avg activation bits", color="#e0892b")
        if allocation.target_bits is not None:
            ax1.axhline(allocation.target_bits, color="grey", ls="--", lw=1, label="target")
        ax1.set_xlabel("greedy step")
        ax1.set_ylabel("bits")
        ax2 = ax1.twinx()
        ex = [h for h in allocation.history if h.exact]
        kl0 = allocation.sensitivity.base
        xs = [0] + [h.step for h in ex] + [steps[-1]]
        ys = [kl0] + [h.distance for h in ex] + [allocation.distance]
        ax2.plot(xs, [max(v, 1e-12) for v in ys], "o-", ms=2.5, lw=1,
                 color="#a33", label=f"{mname} (measured on the subset)")
        ax2.set_yscale("log")
        ax2.set_ylabel(f"{mname} (subset)")
        h1, l1 = ax1.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
        ax1.set_title("greedy allocation")
        fig.tight_layout()
        fig.savefig(tmp / "allocation.png", dpi=110)
        plt.close(fig)
        out.append(("allocation.png", "Greedy allocation"))
    return out


# ---------------------------------------------------------------------------------------------
# the report


def write_report(dir: Path, result: Any, source_model: onnx.ModelProto, *, calib: Any = None, eval_data: Any = None,
                 runtime: RuntimeConfig | None = None, fp32_eval: Any = None) -> Path:
    """Write the report of ``result`` (a :class:`onnx_mptq.pipeline.QuantizeResult`) into ``dir``.

    ``calib``: calibration data (a few samples give the per-layer SQNR); ``eval_data``: held-out
    data to evaluate the FP32 model on for the summary table (the quantized side comes from
    ``result.validation``, or is evaluated here when missing); ``fp32_eval``: an FP32
    :class:`~onnx_mptq.validate.EvaluationReport` already at hand."""
    from .calibrate.sensitivity import first_samples, unit_output_sqnr
    from .validate import evaluate

    runtime = runtime or RuntimeConfig()
    dest = Path(dir)
    plan: QuantPlan = result.plan
    allocation = getattr(result, "allocation", None)
    notes: list[str] = []

    work, analysis = _float_graph(source_model, plan)
    if analysis is None:
        notes.append("the plan's float graph could not be rebuilt from the source model: no per-layer SQNR")
    units = {u.name: u for u in analysis.units} if analysis is not None else {}

    sqnr: dict[str, float] = {}
    if calib is not None and work is not None:
        names = [i.name for i in work.graph.input if i.name not in {t.name for t in work.graph.initializer}]
        inputs = first_samples(calib, names, SQNR_SAMPLES)
        tensors = [units[lp.unit].output for lp in plan.layers if lp.unit in units and units[lp.unit].output]
        by_tensor = unit_output_sqnr(work, result.model, tensors, inputs, runtime)
        sqnr = {lp.unit: by_tensor[units[lp.unit].output] for lp in plan.layers
                if lp.unit in units and units[lp.unit].output in by_tensor}
    elif calib is None:
        notes.append("no calibration data given to the report: no per-layer SQNR")

    fp = fp32_eval
    q = result.validation
    if eval_data is not None:
        from .data import DataSource, input_specs, open_data

        if not isinstance(eval_data, DataSource):
            eval_data = open_data(eval_data, input_specs(source_model), batch_size=runtime.batch_size)
        if fp is None:
            fp = evaluate(source_model, eval_data, runtime, reference=None, progress=False)
        if q is None:
            q = evaluate(result.model, eval_data, runtime, reference=source_model, progress=False)

    pinned = {u.unit for u in allocation.units if u.pinned} if allocation is not None else set()
    rows: list[LayerRow] = []
    for i, lp in enumerate(plan.layers):
        u = units.get(lp.unit)
        sw = sa = None
        if allocation is not None:
            e = allocation.sensitivity.of(lp.unit, "weight")
            sw = e.delta if e is not None else None
            e = allocation.sensitivity.of(lp.unit, "activation")
            sa = e.delta if e is not None else None
        rows.append(LayerRow(
            unit=lp.unit, label=_label(u, i) if u is not None else lp.role, role=lp.role,
            block=u.block if u is not None else None, w_bits=lp.w_bits,
            a_bits=tuple(a.bits for a in lp.inputs), schemes=tuple(a.scheme.value for a in lp.inputs),
            pinned=lp.unit in pinned, sens_w=sw, sens_a=sa, sqnr_db=sqnr.get(lp.unit)))

    fp_size = source_model.ByteSize() / 1e6
    q_size = model_file_bytes(result.model) / 1e6  # the file as written: int4-packed weights where stored so
    packed = _packed_size_mb(plan, work if work is not None else source_model)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        images = _plots(tmp, rows, allocation)
        data = _json(plan, allocation, rows, fp, q, fp_size, q_size, packed, result, notes)
        (tmp / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(_markdown(plan, allocation, rows, fp, q, fp_size, q_size, packed, result,
                                                 images, notes), encoding="utf-8")
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("report written to %s", dest)
    return dest


def _replace_dir(tmp: Path, dest: Path) -> None:
    if dest.exists():
        if not dest.is_dir():
            raise NotADirectoryError(f"{dest}: exists and is not a directory")
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _eval_dict(rep: Any) -> dict | None:
    if rep is None:
        return None
    d = rep.to_dict() if hasattr(rep, "to_dict") else dict(rep)
    return {k: _finite(v) for k, v in d.items() if k not in ("kind", "schema_version")}


def _optm_json(sel: Any) -> dict | None:
    if sel is None:
        return None
    return {"samples": sel.samples, "z": sel.z, "z_family": getattr(sel, "z_family", sel.z), "twins": sel.twins, "eligible": len(sel.decisions),
            "nmse_uniform": _finite(sel.nmse_uniform), "nmse": _finite(sel.nmse), "kl_uniform": _finite(sel.kl_uniform),
            "kl": _finite(sel.kl), "evaluations": sel.evaluations, "seconds": sel.seconds,
            "operands": [{"unit": d.unit, "kind": d.kind, "twin": d.chosen, "layer_error_uniform": _finite(d.layer_error_uniform),
                          "layer_error_twin": _finite(d.layer_error_twin)} for d in sel.decisions]}


def _json(plan, allocation, rows, fp, q, fp_size, q_size, packed, result, notes) -> dict:
    return {
        "kind": "quantization_report",
        "schema_version": 1,
        "source_digest": plan.source_digest,
        "model_digest": plan.model_digest,
        "avg_weight_bits": plan.avg_weight_bits,
        "avg_activation_bits": plan.avg_activation_bits,
        "target_bits": allocation.target_bits if allocation is not None else None,
        "target_size_mb": allocation.target_size_mb if allocation is not None else None,
        "fp32": _eval_dict(fp),
        "quantized": _eval_dict(q),
        "size_mb": {"fp32_onnx": fp_size, "quantized_onnx": q_size, "quantized_packed": packed},
        "weight_storage": plan.weight_storage.value if plan.weight_storage is not None else None,
        "timings_s": dict(getattr(result, "timings", {}) or {}),
        "optm": _optm_json(getattr(result, "optm", None)),
        "allocation": None if allocation is None else {
            "evaluations": allocation.evaluations, "seconds": allocation.seconds,
            "eval_seconds": allocation.eval_seconds, "steps": len(allocation.history),
            "subset_samples": allocation.sensitivity.samples, "metric": allocation.sensitivity.metric, "base": _finite(allocation.sensitivity.base),
            "final": _finite(allocation.distance)},
        "layers": [{k: _finite(v) if not isinstance(v, tuple) else list(v) for k, v in dataclasses.asdict(r).items()}
                   for r in rows],
        "notes": list(notes) + list(plan.notes),
    }


def _twin_forms(result: Any) -> dict[str, str]:
    """unit -> how its twin operand was emitted (from the emit report's matmul count)."""
    rep = getattr(result, "emit_report", None)
    out = {}
    for eu in getattr(rep, "units", ()) or ():
        if "twin" in eu.schemes:
            out[eu.unit] = "2 integer matmuls" if eu.matmuls > 1 else "1 integer matmul (delta1 lattice)"
    return out


def _optm_section(plan: QuantPlan, selection: Any, result: Any = None) -> list[str]:
    """What OPT-m applied where: the network-level choice when it ran, else the plan's notes."""
    forms = _twin_forms(result)
    if selection is not None and selection.decisions:
        zf = getattr(selection, "z_family", selection.z)
        L = ["## OPT-m", "",
             f"Twin-region quantizers on **{selection.twins} of {len(selection.decisions)}** eligible operands, chosen "
             f"on the network on {selection.samples} calibration samples: logit noise/signal "
             f"{selection.nmse_uniform:.4g} with every eligible operand uniform, {selection.nmse:.4g} as chosen; KL "
             f"{selection.kl_uniform:.4g} -> {selection.kl:.4g}. A change is kept only where it lowers both and clears "
             f"{zf:.3g} standard errors of the subset's noise ({selection.z:g} per comparison, corrected for "
             f"the comparisons made; {selection.evaluations} evaluations, {selection.seconds:.1f} s).", "",
             "| unit | operand | layer error, uniform | layer error, twin | quantizer | emitted as |",
             "|---|---|---|---|---|---|"]
        for d in selection.decisions:
            L.append(f"| `{d.unit}` | {'post-GELU fc2 input' if d.kind == 'gelu' else 'post-Softmax P'} | "
                     f"{d.layer_error_uniform:.4g} | {d.layer_error_twin:.4g} | {'**twin**' if d.chosen else 'uniform'} | "
                     f"{forms.get(d.unit, '1 integer matmul') if d.chosen else '1 integer matmul'} |")
        return L + [""]
    lines = [n for n in plan.notes if n.startswith("optm ")]
    if not lines:
        return []
    return ["## OPT-m", "", *(f"- {n}" for n in lines), ""]


def _markdown(plan, allocation, rows, fp, q, fp_size, q_size, packed, result, images, notes) -> str:
    fpd = _eval_dict(fp) or {}
    qd = _eval_dict(q) or {}
    L: list[str] = ["# onnx-mptq quantization report", ""]
    L.append(f"Source model digest `{plan.source_digest}`, quantized graph digest `{plan.model_digest}`, "
             f"{len(plan.layers)} quantized layers.")
    L.append("")
    L.append("## Summary")
    L.append("")
    L.append("| | top-1 % | top-5 % | agreement with FP32 % | SQNR dB | KL | size MB (ONNX) | size MB (packed) | "
             "latency ms (batch 1) | latency ms (batch) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    fp_packed = fp_size
    L.append(f"| FP32 | {_fmt(fpd.get('top1'))} | {_fmt(fpd.get('top5'))} | 100.00 | inf | 0 | {fp_size:.3f} | "
             f"{fp_packed:.3f} | {_fmt(fpd.get('latency_ms_b1'), 3)} | {_fmt(fpd.get('latency_ms_batch'), 2)} |")
    sq = qd.get("sqnr_db")
    sq_s = _fmt(sq) if sq is not None else ("inf" if qd.get("top1_agreement") is not None else "-")
    L.append(f"| quantized (W {plan.avg_weight_bits:.2f} / A {plan.avg_activation_bits:.2f} bits) | "
             f"{_fmt(qd.get('top1'))} | {_fmt(qd.get('top5'))} | {_fmt(qd.get('top1_agreement'))} | {sq_s} | "
             f"{_fmt(qd.get('kl'), 4)} | {q_size:.3f} | {packed:.3f} | {_fmt(qd.get('latency_ms_b1'), 3)} | "
             f"{_fmt(qd.get('latency_ms_batch'), 2)} |")
    L.append("")
    if not fpd and not qd:
        L.append("No evaluation data was given (`--eval`): accuracy, agreement and latency are not measured.")
        L.append("")
    elif qd:
        L.append(f"Evaluated on {qd.get('num_samples')} held-out samples with {qd.get('provider')}. "
                 "Packed size: weights at their bit-widths, scales and other parameters in float32.")
        L.append("")
    L.append("## Bits")
    L.append("")
    L.append(f"Achieved averages: **{plan.avg_weight_bits:.4f}** weight bits (parameter-weighted), "
             f"**{plan.avg_activation_bits:.4f}** activation bits (element-weighted).")
    if allocation is not None:
        tgt = []
        if allocation.target_bits is not None:
            tgt.append(f"average bits <= {allocation.target_bits:g}")
        if allocation.target_size_mb is not None:
            tgt.append(f"packed size <= {allocation.target_size_mb:g} MB (search-time size {allocation.size_mb:.3f} MB)")
        L.append(f"Budget: {', '.join(tgt)}; candidates {', '.join(str(c) for c in allocation.candidates)}.")
        L.append("")
        L.append(f"Mixed-precision search: {len(allocation.history)} greedy steps, {allocation.evaluations} evaluations "
                 f"on {allocation.sensitivity.samples} calibration samples, {allocation.seconds:.1f} s "
                 f"({allocation.eval_seconds:.1f} s in ONNX Runtime). Sensitivity metric "
                 f"{_METRIC_NAMES.get(allocation.sensitivity.metric, allocation.sensitivity.metric)} on the subset: "
                 f"{allocation.sensitivity.base:.4g} at the highest candidate, {allocation.distance:.4g} at the final assignment.")
    L.append("")
    for name, title in images:
        L.append(f"### {title}")
        L.append("")
        L.append(f"![{title}]({name})")
        L.append("")
    L.extend(_optm_section(plan, getattr(result, "optm", None), result))
    L.append("## Layers")
    L.append("")
    md = allocation.sensitivity.metric if allocation is not None else "metric"
    L.append(f"| # | layer | unit | W bits | A bits | scheme | d{md} (W) | d{md} (A) | SQNR dB |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        pin = " (pinned)" if r.pinned else ""
        L.append(f"| {i} | {r.label}{pin} | `{r.unit}` | {_fmt(r.w_bits)} | {'/'.join(str(b) for b in r.a_bits)} | "
                 f"{'/'.join(r.schemes)} | {_sci(r.sens_w)} | {_sci(r.sens_a)} | {_fmt(r.sqnr_db, 1)} |")
    L.append("")
    timings = dict(getattr(result, "timings", {}) or {})
    if timings:
        L.append("## Time")
        L.append("")
        L.append(", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        L.append("")
    all_notes = list(notes) + [n for n in plan.notes if not n.startswith(("optm ", "optm-net:"))]
    twins = sum(1 for lp in plan.layers for a in lp.inputs if a.scheme is Scheme.TWIN)
    all_notes.append(f"{twins} operand(s) use an OPT-m twin-region quantizer")
    L.append("## Notes")
    L.append("")
    L.extend(f"- {n}" for n in all_notes)
    L.append("")
    return "\n".join(L)
