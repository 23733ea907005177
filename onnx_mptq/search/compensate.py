"""Closed-form error compensation: a pass between the scale search and emission.

For every planned unit with a weight (Linears and the patch-embedding Conv through its im2col
rows), on the captured calibration rows ``X`` of its float input and ``Xq = Qa(X~)``, the layer's
planned input quantizer on the same tokens' input ``X~`` as ``quant.compensate.inputs`` says
(:class:`~onnx_mptq.config.CompensateInputs`): ``float``, ``X~ = X`` (upstream quantization error
is not seen); ``network``, the whole network quantized with nearest rounding (each layer then
also corrects upstream errors that the upstream layers correct themselves); ``sequential``, the
network quantized *and compensated* upstream of the layer, captured group by group of layers
reading one tensor (:func:`onnx_mptq.pipeline.compensation_stage`) --
with the searched per-output-channel steps kept as they are, it measures the output error
``E = ||X W - Xq W_hat||^2`` (:func:`onnx_mptq.numerics.compensate.output_error`) of:

* nearest rounding (what emission does without compensation);
* with ``quant.compensate.gptq``: GPTQ rounding of ``W`` with ``H = X^T X``;
* with ``quant.compensate.activation``: the ridge solution ``W'`` on ``Xq``, GPTQ-rounded with
  ``H = Xq^T Xq``;

keeps the candidate with the lowest ``E`` (so a part never makes a layer's calibration error
worse than the parts before it), and with ``quant.compensate.bias`` folds the mean output error
into the bias. A layer whose codes end up the nearest-rounded ones and without a bias correction
is left uncompensated. The result is a plan whose compensated layers carry a
:class:`~onnx_mptq.plan.Compensation` record and the arrays they need
(:class:`~onnx_mptq.plan.CompensatedWeights`, bound by ``plan.weights_digest``); emission reads
both, so ``--plan`` re-emits the same model without calibration data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
from tqdm import tqdm

from ..config import CompensateConfig
from ..graph.analysis import ModelAnalysis, Unit
from ..numerics.compensate import (Grams, bias_delta, dequantize_codes, error_with_bias, gptq_codes, nearest_codes,
                                   output_error, ridge_weight)
from ..plan import CompensatedLayer, CompensatedWeights, Compensation, CompensationPart, LayerPlan, QuantPlan
from .scales import _ModelWeights, _operands

if TYPE_CHECKING:
    from ..calibrate.capture import CapturedInputs

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerCompensation:
    """One unit's measured errors ``E / ||X W||^2`` on its calibration rows for each candidate
    tried (``nearest``, ``gptq``, ``activation``, ``bias``: the chosen codes plus the bias
    correction), and the parts kept."""

    unit: str
    errors: tuple[tuple[str, float], ...]
    kept: tuple[CompensationPart, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class CompensationResult:
    plan: QuantPlan
    weights: CompensatedWeights | None  # None: no layer compensated
    layers: tuple[LayerCompensation, ...] = ()
    notes: tuple[str, ...] = ()


def _compensate_unit(unit: Unit, lp: LayerPlan, x: np.ndarray, w: np.ndarray, cfg: CompensateConfig,
                     x_net: np.ndarray | None = None) -> tuple[LayerCompensation, CompensatedLayer | None, Compensation | None]:
    wq = lp.weight
    assert wq is not None
    s = np.asarray(wq.scales, dtype=np.float32)
    xq = lp.inputs[0].fake_quant(np.asarray(x if x_net is None else x_net, np.float32))
    g = Grams.of(x, xq)
    ref = float(np.sum(w.astype(np.float64) * (g.xx @ w.astype(np.float64))))
    ref = ref if ref > 0 else 1.0
    cands: list[tuple[tuple[CompensationPart, ...], np.ndarray]] = [((), nearest_codes(w, s, wq.bits))]
    if cfg.gptq:
        cands.append(((CompensationPart.GPTQ,), gptq_codes(w, g.xx, s, wq.bits, cfg.damp)))
    if cfg.activation:
        w2 = ridge_weight(g, w, cfg.ridge)
        cands.append(((CompensationPart.ACTIVATION,), gptq_codes(w2, g.qq, s, wq.bits, cfg.damp)))
    errs = [output_error(g, w, dequantize_codes(c, s)) for _, c in cands]
    names = ["nearest"] + [p[0].value for p, _ in cands[1:]]
    best = int(np.argmin(errs))
    parts, codes = cands[best]
    err = errs[best]
    table = [(n, e / ref) for n, e in zip(names, errs)]
    delta = None
    if cfg.bias:
        d = bias_delta(g, w, dequantize_codes(codes, s))
        eb = error_with_bias(g, w, dequantize_codes(codes, s), d)
        table.append(("bias", eb / ref))
        if eb < err:
            delta, err, parts = d, eb, parts + (CompensationPart.BIAS,)
    measured = LayerCompensation(unit.name, tuple(table), parts)
    if not parts:
        return measured, None, None
    stored = CompensatedLayer(codes.astype(np.int8), s, wq.bits, delta)
    return measured, stored, Compensation(parts, bias=delta is not None, error_nearest=errs[0] / ref, error=err / ref)


NetworkInputs = Callable[[QuantPlan, "CompensatedWeights | None", tuple[str, ...]], "CapturedInputs"]


def _stages(analysis: ModelAnalysis, wanted: set[str], blocks: bool) -> list[list[str]]:
    """The wanted units grouped by the tensor they read (q, k, v share one) or, with ``blocks``, by
    transformer block (units outside a block by tensor), in graph order."""
    groups: dict[object, list[str]] = {}
    for u in analysis.units:
        if u.name in wanted:
            key = ("block", u.block) if blocks and u.block is not None else ("tensor", u.inputs[0])
            groups.setdefault(key, []).append(u.name)
    return list(groups.values())


def compensate(model: onnx.ModelProto, analysis: ModelAnalysis, captured: CapturedInputs, plan: QuantPlan,
               cfg: CompensateConfig, *, captured_q: CapturedInputs | None = None,
               network: NetworkInputs | None = None, by_block: bool = False,
               progress: bool = False) -> CompensationResult:
    """``plan`` with its weight units compensated as ``cfg`` enables (module docstring); ``model``
    is the (smoothed) float graph the plan and the captured inputs belong to. The quantized
    inputs ``X~`` (``captured`` holds the float rows ``X``):

    * ``network`` given (sequential): for each group of units reading one tensor (with
      ``by_block``: each transformer block), in graph order, ``network(partial_plan, its_weights,
      units)`` captures the same tokens' inputs from the model with every unit before the group
      quantized as planned so far (compensated ones with their codes), the group itself in float;
    * else ``captured_q`` (the whole quantized network's inputs, :func:`onnx_mptq.pipeline.quantized_inputs`);
    * else ``X~ = X``."""
    if not cfg.any:
        return CompensationResult(plan, None)
    mw = _ModelWeights(model)
    units = {u.name: u for u in analysis.units}
    order = {u.name: i for i, u in enumerate(analysis.units)}
    layers = list(plan.layers)
    index = {lp.unit: i for i, lp in enumerate(layers)}
    stored: dict[str, CompensatedLayer] = {}
    measured: list[LayerCompensation] = []
    notes: list[str] = []
    todo = {lp.unit for lp in layers if lp.weight is not None and lp.unit in units and lp.unit in captured}
    stages = _stages(analysis, todo, by_block)
    sequential = network is not None and (cfg.activation or cfg.bias)
    for stage in tqdm(stages, desc="compensate", unit="stage", disable=not progress, leave=False):
        net = captured_q
        if sequential:
            first = min(order[u] for u in stage)
            upstream = [lp for lp in layers if lp.unit in order and order[lp.unit] < first]
            net = None
            if upstream:
                sub = {lp.unit: stored[lp.unit] for lp in upstream if lp.unit in stored}
                w = CompensatedWeights(sub) if sub else None
                partial = dataclasses.replace(plan, layers=tuple(upstream), weights_digest=w.digest() if w else None)
                net = network(partial, w, tuple(stage))  # type: ignore[misc]
        for name in stage:
            i = index[name]
            lp = layers[i]
            unit = units[lp.unit]
            if unit.op_type == "Gemm" and float(mw.node(unit).attrs.get("alpha", 1.0)) != 1.0:
                notes.append(f"unit {unit.name}: Gemm with alpha != 1 is not compensated")
                continue
            ops = _operands(unit, captured, mw)
            if ops.x is None or ops.w is None:
                notes.append(f"unit {unit.name}: no input rows to compensate on ({ops.note or 'not captured'})")
                continue
            x_net = None
            if net is not None and lp.unit in net:
                x_net = _operands(unit, net, mw).x
                if x_net is not None and x_net.shape != ops.x.shape:
                    raise ValueError(f"unit {unit.name}: the quantized network's rows {x_net.shape} do not pair with "
                                     f"the float rows {ops.x.shape}")
            m, cl, rec = _compensate_unit(unit, lp, ops.x, ops.w, cfg, x_net)
            measured.append(m)
            if cl is not None:
                stored[lp.unit] = cl
                layers[i] = dataclasses.replace(lp, compensation=rec)
    if not stored:
        return CompensationResult(plan, None, tuple(measured), tuple(notes))
    weights = CompensatedWeights(stored)
    n_before = sum(dict(m.errors)["nearest"] for m in measured)
    n_after = sum(dict(m.errors).get(m.kept[-1].value, 0.0) if m.kept else dict(m.errors)["nearest"] for m in measured)
    log.info("compensated %d of %d weight layers (sum of relative output errors %.4g -> %.4g)", len(stored),
             len(measured), n_before, n_after)
    new = dataclasses.replace(plan, layers=tuple(layers), weights_digest=weights.digest(), notes=plan.notes + tuple(notes))
    return CompensationResult(new, weights, tuple(measured), tuple(notes))
