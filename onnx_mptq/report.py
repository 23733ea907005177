"""A readable report of one quantization run: ``report.md`` + ``report.json`` + PNG plots.

``write_report(dir, result)`` renders a :class:`onnx_mptq.pipeline.QuantizeResult` (run with
``measure=True`` for the per-layer SQNR and the FP32 row) and writes:

* ``report.md``: the summary table (FP32 against the quantized model: top-1, top-1 agreement,
  SQNR and KL of the logits, model size, latency), the achieved average bits against the budget,
  the mixed-precision search statistics, and a per-layer table (bits, quantizer schemes, search
  sensitivity, SQNR of the layer output);
* ``bits.png``: weight and activation bits per layer;
* ``sensitivity.png`` (when mixed precision ran): the increase of the search metric (KL of the
  softmaxes, or the noise-to-signal ratio of the logits) when lowering each layer's weight
  or activation one candidate, measured at the start of the search (log scale);
* ``sqnr.png`` (when measured): per-layer SQNR of the quantized model's unit outputs against the
  FP32 (smoothed, numerically identical) graph, on a few calibration samples;
* ``allocation.png`` (when mixed precision ran): the metric and average bits along the greedy steps;
* ``report.json``: the same numbers, machine-readable.

Sizes (:class:`onnx_mptq.pipeline.ModelSizes`): "ONNX" is the serialized model (8-bit containers
for every bit-width); "packed" counts each quantized weight at its bit-width plus float32 scales
and every other parameter in float32. MB = 10^6 bytes.

Everything is written into a temporary sibling directory and renamed into place, so a failed
run leaves no half-written report; an existing report directory is replaced. The folder gets the usual mode (0o777 minus the umask).
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

from .config import SensitivityMetric
from .pipeline import LayerMeasure, QuantizeResult
from .plan import LayerPlan, QuantPlan, Scheme

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One line of the per-layer table: the plan's layer, where it sits, and what was measured."""

    layer: LayerPlan
    label: str  # block.role
    block: int | None
    pinned: bool
    sens: tuple[float | None, float | None]  # metric increase of the first weight / activation drop
    sqnr_db: float | None  # of the unit's output

    def as_dict(self) -> dict:
        lp = self.layer
        return {"unit": lp.unit, "label": self.label, "role": lp.role, "block": self.block, "w_bits": lp.w_bits,
                "a_bits": [a.bits for a in lp.inputs], "schemes": [a.scheme.value for a in lp.inputs],
                "pinned": self.pinned, "sens_w": _finite(self.sens[0]), "sens_a": _finite(self.sens[1]),
                "sqnr_db": _finite(self.sqnr_db)}


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _label(m: LayerMeasure) -> str:
    return f"{m.block}.{m.role}" if m.block is not None else m.role


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


_METRIC_NAMES = {SensitivityMetric.KL.value: "KL", SensitivityMetric.NMSE.value: "logit noise/signal"}


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
    wb = [r.layer.w_bits if r.layer.w_bits is not None else 0 for r in rows]
    ab = [max((a.bits for a in r.layer.inputs), default=0) for r in rows]
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

    if allocation is not None and any(v is not None for r in rows for v in r.sens):
        fig, ax = plt.subplots(figsize=(width, 3.8))
        sw = [r.sens[0] if r.sens[0] is not None else np.nan for r in rows]
        sa = [r.sens[1] if r.sens[1] is not None else np.nan for r in rows]
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


def write_report(dir: Path, result: QuantizeResult) -> Path:
    """Render ``result`` (a :class:`onnx_mptq.pipeline.QuantizeResult`) into the folder ``dir``.

    Nothing is measured here: the per-layer SQNR and the FP32 evaluation come with the result
    (``quantize(..., measure=True)``; without it the report says they were not measured), the
    quantized model's evaluation is ``result.validation``."""
    dest = Path(dir)
    plan: QuantPlan = result.plan
    allocation = result.allocation
    notes: list[str] = []
    measures = {m.unit: m for m in result.layers}
    if not any(m.sqnr_db is not None for m in result.layers):
        notes.append("per-layer SQNR not measured (quantize(..., measure=True); the CLI does with --report)")

    pinned = {u.unit for u in allocation.units if u.pinned} if allocation is not None else set()
    rows: list[LayerRow] = []
    for lp in plan.layers:
        m = measures.get(lp.unit)
        sw = sa = None
        if allocation is not None:
            e = allocation.sensitivity.of(lp.unit, "weight")
            sw = e.delta if e is not None else None
            e = allocation.sensitivity.of(lp.unit, "activation")
            sa = e.delta if e is not None else None
        rows.append(LayerRow(lp, _label(m) if m is not None else lp.role, m.block if m is not None else None,
                             lp.unit in pinned, (sw, sa), m.sqnr_db if m is not None else None))

    fp, q = result.fp32, result.validation
    sizes = result.sizes
    fp_size, q_size, packed = ((sizes.fp32_onnx_mb, sizes.quantized_onnx_mb, sizes.quantized_packed_mb)
                               if sizes is not None else (None, None, None))

    tmp = _new_dir(dest)
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
    log.debug("report written to %s", dest)
    return dest


def _new_dir(dest: Path) -> Path:
    """A temporary sibling of ``dest`` with the mode a new folder gets (0o777 minus the umask;
    ``mkdtemp`` alone would leave it 0o700)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    return tmp


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
        "weight_storage": plan.emission.weight_storage.value,
        "timings_s": dict(result.timings),
        "optm": _optm_json(result.optm),
        "allocation": None if allocation is None else {
            "evaluations": allocation.evaluations, "seconds": allocation.seconds,
            "eval_seconds": allocation.eval_seconds, "steps": len(allocation.history),
            "subset_samples": allocation.sensitivity.samples, "metric": allocation.sensitivity.metric, "base": _finite(allocation.sensitivity.base),
            "final": _finite(allocation.distance)},
        "layers": [r.as_dict() for r in rows],
        "notes": list(notes) + list(plan.notes),
    }


def _twin_forms(result: Any) -> dict[str, str]:
    """unit -> how its twin operand was emitted (from the emit report's matmul count)."""
    rep = result.emit_report
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
    L.append(f"| FP32 | {_fmt(fpd.get('top1'))} | {_fmt(fpd.get('top5'))} | 100.00 | inf | 0 | {_fmt(fp_size, 3)} | "
             f"{_fmt(fp_packed, 3)} | {_fmt(fpd.get('latency_ms_b1'), 3)} | {_fmt(fpd.get('latency_ms_batch'), 2)} |")
    sq = qd.get("sqnr_db")
    sq_s = _fmt(sq) if sq is not None else ("inf" if qd.get("top1_agreement") is not None else "-")
    L.append(f"| quantized (W {plan.avg_weight_bits:.2f} / A {plan.avg_activation_bits:.2f} bits) | "
             f"{_fmt(qd.get('top1'))} | {_fmt(qd.get('top5'))} | {_fmt(qd.get('top1_agreement'))} | {sq_s} | "
             f"{_fmt(qd.get('kl'), 4)} | {_fmt(q_size, 3)} | {_fmt(packed, 3)} | {_fmt(qd.get('latency_ms_b1'), 3)} | "
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
    L.extend(_optm_section(plan, result.optm, result))
    L.append("## Layers")
    L.append("")
    md = allocation.sensitivity.metric if allocation is not None else "metric"
    L.append(f"| # | layer | unit | W bits | A bits | scheme | d{md} (W) | d{md} (A) | SQNR dB |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        pin = " (pinned)" if r.pinned else ""
        lp = r.layer
        L.append(f"| {i} | {r.label}{pin} | `{lp.unit}` | {_fmt(lp.w_bits)} | {'/'.join(str(a.bits) for a in lp.inputs)} | "
                 f"{'/'.join(a.scheme.value for a in lp.inputs)} | {_sci(r.sens[0])} | {_sci(r.sens[1])} | "
                 f"{_fmt(r.sqnr_db, 1)} |")
    L.append("")
    timings = dict(result.timings)
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
