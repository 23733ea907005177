"""Scale search: a :class:`QuantPlan` with every unit's steps, zero points and OPT-m
twin quantizers, chosen on captured calibration inputs (method.md section 3).

Per unit, with ``X`` its captured input rows ``(tokens, K)`` and ``W`` its effective ``(K, N)``
weight (the stored constant, transposed where the graph transposes it or Gemm has ``transB``)::

    weight     per output channel n, symmetric:  min_s || X W_n - X Q_s(W_n) ||^2
    activation per tensor (cfg.quant.search.method):
        mse         min_s || X W - Q_s(X) W_fq ||^2                (W_fq = the quantized weight)
                    over the grid of fractions of the captured min/max step, plus the minmax
                    and percentile quantizers below as extra candidates (the grid scales both
                    ends of a range by one fraction, a one-sided clip is not on it)
        minmax      [min, max] over all calibration values
        percentile  [p(100 - pct), p(pct)] (asymmetric) or p(|x|, pct) (symmetric), all values

Attention matmuls ``A @ B`` (``Q K^T`` and ``P V``) quantize both operands per tensor on captured
sample pairs: first ``A`` with ``B`` exact, then ``B`` with ``A`` fake-quantized.

The Conv patch embedding is searched as a Linear on im2col patches of the captured images:
``conv(x, W) == patches(x) @ W.reshape(O, -1).T`` per output position, patches flattened in
``(C, kh, kw)`` order (exact for ``group == 1``, any strides / pads / dilations). Its input (the
image, or the patch tensor of a MatMul patch embedding) is quantized at
``cfg.quant.input_bits`` and is also the plan's ``input_quant``; being held at a fixed precision it
is left out of the activation average (``act_elems = 0``).

OPT-m (``cfg.quant.optm.enabled``): fc2 inputs behind a GELU and operand 0 of ``P @ V`` (the softmax
probabilities) also get a twin-region quantizer searched by
:func:`onnx_mptq.numerics.twin.search_twin` / :func:`search_twin_operand`; it replaces the
uniform quantizer only when the unit's output error with it (all operands quantized) is not
larger than with the uniform one. Each decision and both relative errors are recorded in the
plan's ``notes`` (``optm <unit>: ...``). ReLU inputs stay uniform; a twin quantizer needs at
least 3 bits.

``act_elems`` of a unit is the number of elements of its quantized operands per calibration
sample; ``params`` its weight element count; the plan's averages come from
:func:`onnx_mptq.plan.average_bits`.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from ..config import Config, ScaleMethod
from ..errors import CalibrationError, ConfigError, PlanError, UnsupportedModelError
from ..graph.analysis import GELU_KINDS, Activation, GraphView, ModelAnalysis, Role, Unit
from ..numerics.conv import ConvGeometry, im2col
from ..numerics.quant import UniformParams, fake_quant, params_from_range
from ..numerics.search import (
    LinearObjective,
    OperandObjective,
    blas_threads_limited,
    search_uniform,
    search_weight_scales,
)
from ..numerics.twin import lattice_max_m, search_twin, search_twin_operand, twin_fake_quant
from ..plan import ActQuant, Emission, LayerPlan, QuantPlan, SmoothingPlan, WeightQuant, average_bits

if TYPE_CHECKING:  # records only: search does not import calibrate (and onnxruntime) at run time
    from ..calibrate.capture import CapturedInputs, TensorStats

log = logging.getLogger(__name__)

FakeQuant = Callable[[np.ndarray], np.ndarray]

_MIN_TWIN_BITS = 3


# ---------------------------------------------------------------------------------------------
# model access: effective weights and conv geometry


class _ModelWeights:
    """Constant values of unit weights (through Identity / Transpose / Reshape / Constant) and
    the nodes of units, found by data flow (tensor names), never by node names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.view = GraphView(gs.import_onnx(model))
        self.by_io: dict[tuple[str, str], gs.Node] = {}
        for n in self.view.nodes:
            if len(n.inputs) >= 2:
                self.by_io[(n.inputs[0].name, n.inputs[1].name)] = n

    def node(self, unit: Unit) -> gs.Node:
        n = self.by_io.get((unit.inputs[0], unit.weight_input or ""))
        if n is None or n.op != unit.op_type:
            raise PlanError(f"unit {unit.name}: no {unit.op_type} node reads {unit.inputs[0]!r} and "
                            f"{unit.weight_input!r} in this model (analysis of another model?)")
        return n

    def weight(self, unit: Unit) -> np.ndarray:
        """Linear: effective (K, N) float32 (:meth:`Unit.effective_weight`); Conv: (O, I, kh, kw)."""
        self.node(unit)
        w = unit.weight_as_read(self.view)
        if unit.op_type != "Conv":
            w = unit.effective(w)
        if unit.op_type != "Conv" and w.shape != (unit.in_features, unit.out_features):
            raise UnsupportedModelError(
                f"unit {unit.name}: effective weight has shape {w.shape}, expected "
                f"({unit.in_features}, {unit.out_features})")
        return np.ascontiguousarray(w)

    def conv_geometry(self, unit: Unit, w: np.ndarray) -> tuple[tuple[int, int], ConvGeometry] | str:
        """The kernel size and geometry, or the reason im2col does not apply."""
        a = self.node(unit).attrs
        if w.ndim != 4:
            return f"{w.ndim - 2}-d convolution"
        if int(a.get("group", 1)) != 1:
            return f"grouped convolution (group={a.get('group')})"
        auto = a.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto not in ("NOTSET", "VALID"):
            return f"auto_pad={auto}"
        kernel = tuple(int(k) for k in a.get("kernel_shape", w.shape[2:]))
        strides = tuple(int(s) for s in a.get("strides", (1, 1)))
        pads = tuple(int(p) for p in a.get("pads", (0, 0, 0, 0))) if auto == "NOTSET" else (0, 0, 0, 0)
        dil = tuple(int(d) for d in a.get("dilations", (1, 1)))
        return kernel, ConvGeometry(strides=strides, pads=pads, dilations=dil)  # type: ignore[return-value,arg-type]


def _patches(images: np.ndarray, kernel: tuple[int, int], g: ConvGeometry) -> np.ndarray:
    """float32 im2col rows (S * OH * OW, C * kh * kw) of the captured images
    (:func:`onnx_mptq.numerics.conv.im2col`)."""
    try:
        return im2col(np.asarray(images, dtype=np.float32), kernel, g)
    except ValueError as e:
        raise CalibrationError(f"{e} (the captured images)") from None


# ---------------------------------------------------------------------------------------------
# per-unit search


@dataclasses.dataclass
class _Operands:
    """Captured operands of one unit, in Linear form where it has a weight."""

    x: np.ndarray | None = None  # (tokens, K) rows (Linear) or im2col patches (Conv)
    w: np.ndarray | None = None  # (K, N) effective weight; Conv: (C*kh*kw, O)
    w_axis: int = 1  # output-channel axis of the stored-form weight used by search_weight_scales
    w_stored: np.ndarray | None = None  # weight as search_weight_scales receives it
    a: np.ndarray | None = None  # attention operand 0
    b: np.ndarray | None = None  # attention operand 1
    note: str | None = None


def _is_attention(unit: Unit) -> bool:
    return unit.role in (Role.ATTN_QK, Role.ATTN_AV)


def _operands(unit: Unit, captured: CapturedInputs, weights: _ModelWeights) -> _Operands:
    cap = captured[unit.name]
    if _is_attention(unit):
        a, b = cap.pairs  # type: ignore[misc]
        return _Operands(a=a, b=b)
    w = weights.weight(unit)
    if unit.op_type != "Conv":
        return _Operands(x=cap.rows, w=w, w_axis=1, w_stored=w)
    # Conv
    w2 = np.ascontiguousarray(w.reshape(w.shape[0], -1).T)  # (C*kh*kw, O)
    geom = weights.conv_geometry(unit, w)
    if isinstance(geom, str):
        return _Operands(x=None, w=w2, w_axis=0, w_stored=w,
                         note=f"unit {unit.name}: {geom}; weight steps from the weight error alone, input by min/max")
    return _Operands(x=_patches(cap.images, *geom), w=w2, w_axis=0, w_stored=w)


def _range_params(stats: TensorStats, bits: int, symmetric: bool, method: ScaleMethod, pct: float) -> UniformParams:
    if method is ScaleMethod.PERCENTILE:
        if symmetric:
            amax = stats.percentile(pct, absolute=True)
            return params_from_range(-amax, amax, bits, True)
        return params_from_range(stats.percentile(100.0 - pct), stats.percentile(pct), bits, False)
    return params_from_range(stats.min, stats.max, bits, symmetric)


def _range_candidates(stats: TensorStats, bits: int, symmetric: bool, pct: float) -> list[UniformParams]:
    """Min/max and percentile quantizers over all calibration values: extra candidates of the
    output-error search (the grid scales both ends of the range by one fraction, so a range
    clipped on one side only, as percentiles give, is not on it)."""
    return [_range_params(stats, bits, symmetric, ScaleMethod.MINMAX, pct),
            _range_params(stats, bits, symmetric, ScaleMethod.PERCENTILE, pct)]


def _best_of(objective: Callable[[FakeQuant], float], cands: list[UniformParams],
             known: tuple[float, ...] = ()) -> UniformParams:
    """The candidate with the lowest objective; ties keep the earlier one. ``known``: the errors
    of the first candidates, already measured on this objective. A :class:`LinearObjective` or
    :class:`OperandObjective` is called with the best error so far as its bound (a pruned
    candidate's partial sum is above it, so the choice is the same as with full sums)."""
    bounded = isinstance(objective, (LinearObjective, OperandObjective))
    errs = [float(e) for e in known]
    for p in cands[len(errs):]:
        if bounded:
            errs.append(objective(p, min(errs, default=np.inf)))
        else:
            errs.append(objective(lambda v, p=p: fake_quant(v, p)))
    return cands[int(np.argmin(errs))]


def twin_max_m(cfg: Config, kind: str, bits: int) -> int:
    """The largest m OPT-m searches for a ``kind`` operand at ``bits``: ``quant.optm.max_m``, and
    with ``quant.optm.lattice`` no more than fits one uint8 lattice
    (:func:`onnx_mptq.numerics.twin.lattice_max_m`); -1: no twin quantizer."""
    q = cfg.quant
    m = q.optm.max_m
    if q.optm.lattice:
        m = min(m, lattice_max_m(kind, bits))
    return m


def _rel(err: float, ref: float) -> float:
    return float(err / ref) if ref > 0 else float(err)


@dataclasses.dataclass(frozen=True)
class TwinOption:
    """Both quantizers OPT-m searched for one eligible unit, and their output errors on the
    captured inputs (relative to the float output): the plan holds ``chosen``'s layer."""

    unit: str
    kind: str  # "gelu" | "softmax"
    uniform: LayerPlan
    twin: LayerPlan
    error_uniform: float
    error_twin: float

    @property
    def chosen(self) -> str:
        return "twin" if self.error_twin <= self.error_uniform else "uniform"


@dataclasses.dataclass(frozen=True)
class _UnitResult:
    layer: LayerPlan
    notes: tuple[str, ...]
    option: TwinOption | None = None


def _search_linear(unit: Unit, ops: _Operands, stats: TensorStats, wb: int, ab: int, cfg: Config,
                   elems: int) -> _UnitResult:
    q = cfg.quant
    sym = q.act_symmetric
    method = ScaleMethod(q.search.method)
    grid = dict(grid_size=q.search.grid_size, low=q.search.grid_low, high=q.search.grid_high)
    notes: list[str] = [ops.note] if ops.note else []
    wp = search_weight_scales(ops.w_stored, wb, x=ops.x, axis=ops.w_axis)
    wq = WeightQuant.from_params(wp)
    w_fq = np.ascontiguousarray(np.moveaxis(fake_quant(ops.w_stored, wp), ops.w_axis, -1).reshape(ops.w.shape))

    obj = LinearObjective(ops.x, ops.w, w_fq) if ops.x is not None else None
    if obj is None or method is not ScaleMethod.OUTPUT_MSE:
        up = _range_params(stats, ab, sym, ScaleMethod.MINMAX if obj is None else method, q.search.percentile)
    else:
        up, e_up = search_uniform(obj, ab, sym, **grid)
        up = _best_of(obj, [up, *_range_candidates(stats, ab, sym, q.search.percentile)], known=(e_up,))
    act = ActQuant.from_params(unit.inputs[0], up)

    if (q.optm.enabled and unit.role is Role.FC2 and unit.activation in GELU_KINDS and obj is not None
            and _MIN_TWIN_BITS <= ab <= q.optm.max_bits and twin_max_m(cfg, "gelu", ab) >= 0):
        ref = float(np.sum(np.square(ops.x @ ops.w, dtype=np.float64)))
        e_uni = obj(act.fake_quant)
        tp = search_twin(ops.x, ops.w, ab, "gelu", max_m=twin_max_m(cfg, "gelu", ab), w_fq=w_fq, **grid)
        e_twin = obj(lambda v: twin_fake_quant(v, tp))
        keep = e_twin <= e_uni
        notes.append(
            f"optm {unit.name}: twin gelu m={tp.m} delta1={tp.delta1:.6g} "
            f"{'chosen' if keep else 'rejected'} (relative output error twin {_rel(e_twin, ref):.6g}, "
            f"uniform {_rel(e_uni, ref):.6g})")
        uni = LayerPlan(unit=unit.name, role=unit.role.value, inputs=(act,), weight=wq,
                        params=int(ops.w.size), act_elems=elems)
        twin = dataclasses.replace(uni, inputs=(ActQuant.from_params(unit.inputs[0], tp),))
        option = TwinOption(unit.name, "gelu", uni, twin, _rel(e_uni, ref), _rel(e_twin, ref))
        return _UnitResult(twin if keep else uni, tuple(notes), option)
    layer = LayerPlan(unit=unit.name, role=unit.role.value, inputs=(act,), weight=wq,
                      params=int(ops.w.size), act_elems=elems)
    return _UnitResult(layer, tuple(notes))


def _search_operand(a, b, which, bits, sym, method, stats, cfg, other_fq=None,
                    objective: OperandObjective | None = None) -> UniformParams:
    """One attention operand's quantizer; ``objective``: the prebuilt ``OperandObjective(a, b,
    which, other_fq)`` (built here when not given)."""
    q = cfg.quant
    if method is not ScaleMethod.OUTPUT_MSE:
        return _range_params(stats, bits, sym, method, q.search.percentile)
    obj = objective if objective is not None else OperandObjective(a, b, which, other_fq)
    p, e = search_uniform(obj, bits, sym, grid_size=q.search.grid_size, low=q.search.grid_low, high=q.search.grid_high)
    return _best_of(obj, [p, *_range_candidates(stats, bits, sym, q.search.percentile)], known=(e,))


def _attention_error(a, b, qa: ActQuant, qb: ActQuant) -> float:
    return OperandObjective(a, b, 1, other_fq=qa.fake_quant(a))(qb.fake_quant)


def _search_attention(unit: Unit, ops: _Operands, stats: tuple[TensorStats, TensorStats], ab: int, cfg: Config,
                      elems: int) -> _UnitResult:
    q = cfg.quant
    sym = q.act_symmetric
    method = ScaleMethod(q.search.method)
    a, b = ops.a, ops.b
    notes: list[str] = []

    def with_first(qa: ActQuant) -> tuple[ActQuant, float]:
        a_fq = qa.fake_quant(a)
        obj = OperandObjective(a, b, 1, other_fq=a_fq)
        pb = _search_operand(a, b, 1, ab, sym, method, stats[1], cfg, other_fq=a_fq, objective=obj)
        qb = ActQuant.from_params(unit.inputs[1], pb)
        return qb, obj(qb.fake_quant)

    pa = _search_operand(a, b, 0, ab, sym, method, stats[0], cfg)
    qa = ActQuant.from_params(unit.inputs[0], pa)
    qb, err = with_first(qa)
    if (q.optm.enabled and unit.role is Role.ATTN_AV and unit.activation is Activation.SOFTMAX
            and _MIN_TWIN_BITS <= ab <= q.optm.max_bits and twin_max_m(cfg, "softmax", ab) >= 0):
        ref = float(np.sum(np.square(np.matmul(a, b), dtype=np.float64)))
        tp = search_twin_operand(a, b, 0, ab, "softmax", max_m=twin_max_m(cfg, "softmax", ab), grid_size=q.search.grid_size,
                                 low=q.search.grid_low, high=q.search.grid_high)
        qa_twin = ActQuant.from_params(unit.inputs[0], tp)
        qb_twin, err_twin = with_first(qa_twin)
        keep = err_twin <= err
        notes.append(
            f"optm {unit.name}: twin softmax m={tp.m} delta1={tp.delta1:.6g} "
            f"{'chosen' if keep else 'rejected'} (relative output error twin {_rel(err_twin, ref):.6g}, "
            f"uniform {_rel(err, ref):.6g})")
        uni = LayerPlan(unit=unit.name, role=unit.role.value, inputs=(qa, qb), weight=None, params=0, act_elems=elems)
        twin = dataclasses.replace(uni, inputs=(qa_twin, qb_twin))
        option = TwinOption(unit.name, "softmax", uni, twin, _rel(err, ref), _rel(err_twin, ref))
        return _UnitResult(twin if keep else uni, tuple(notes), option)
    layer = LayerPlan(unit=unit.name, role=unit.role.value, inputs=(qa, qb), weight=None, params=0, act_elems=elems)
    return _UnitResult(layer, tuple(notes))


# ---------------------------------------------------------------------------------------------
# the stage


def _check_bits(bits: Mapping[str, tuple[int, int]] | None, analysis: ModelAnalysis) -> dict[str, tuple[int, int]]:
    if bits is None:
        return {}
    names = {u.name for u in analysis.units}
    out: dict[str, tuple[int, int]] = {}
    for name in sorted(bits):
        if name not in names:
            raise ConfigError(f"bits: unknown unit {name!r}")
        pair = tuple(bits[name])
        if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in pair):
            raise ConfigError(f"bits[{name!r}] must be (w_bits, a_bits) with integers from 2 to 8, got {bits[name]!r}")
        out[name] = pair  # type: ignore[assignment]
    return out


def _check_captured(analysis: ModelAnalysis, captured: CapturedInputs) -> None:
    if captured.model_digest != analysis.model_digest:
        raise CalibrationError(
            f"the captured inputs belong to another graph (digest {captured.model_digest}, analysis "
            f"{analysis.model_digest}); capture again on this model")
    missing = [u.name for u in analysis.units if u.name not in captured]
    if missing:
        raise CalibrationError(f"no captured inputs for unit(s) {', '.join(missing[:5])}")


@dataclasses.dataclass(frozen=True)
class ScaleSearchResult:
    """What :func:`search_scales` returns: the plan, and per unit where OPT-m searched a twin
    quantizer both of its layers (:class:`TwinOption`), for a network-level choice
    (:func:`onnx_mptq.search.optm.select_twins`); read-only."""

    plan: QuantPlan
    twin_options: Mapping[str, TwinOption] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))


@blas_threads_limited
def search_scales(
    model: onnx.ModelProto,
    analysis: ModelAnalysis,
    captured: CapturedInputs,
    cfg: Config,
    *,
    bits: Mapping[str, tuple[int, int]] | None = None,
    source_digest: str,
    smoothing: SmoothingPlan | None = None,
    progress: bool = True,
) -> ScaleSearchResult:
    """Build a :class:`QuantPlan` for every unit of ``analysis`` (module docstring).

    ``model`` is the (smoothed) float graph ``analysis`` and ``captured`` describe; ``bits`` maps
    unit names to ``(w_bits, a_bits)`` (others use ``cfg.quant.w_bits`` / ``a_bits``; an
    attention matmul's w_bits is ignored). ``source_digest`` is the user's FP32 model's digest.
    The plan's ``emission`` records how it is to be written (``cfg.quant.emission``, the
    other choices at their defaults); the result's ``twin_options`` holds a :class:`TwinOption`
    per unit where OPT-m searched a twin quantizer (both layers, whichever the plan holds).
    Deterministic: units in graph order, no random draws.
    """
    _check_captured(analysis, captured)
    per_unit = _check_bits(bits, analysis)
    q = cfg.quant
    weights = _ModelWeights(model)
    layers: list[LayerPlan] = []
    notes: list[str] = []
    input_quant: ActQuant | None = None
    twin_options: dict[str, TwinOption] = {}
    quiet = not progress
    for unit in tqdm(analysis.units, desc="scale search", unit="layer", disable=quiet, leave=False):
        wb, ab = per_unit.get(unit.name, (q.w_bits, q.a_bits))
        cap = captured[unit.name]
        stats = captured.operand_stats(unit.name)
        ops = _operands(unit, captured, weights)
        if _is_attention(unit):
            res = _search_attention(unit, ops, (stats[0], stats[1]), ab, cfg, int(sum(cap.elems_per_sample)))
        elif unit.role is Role.PATCH_EMBED:
            res = _search_linear(unit, ops, stats[0], wb, q.input_bits, cfg, 0)
            if input_quant is None:
                input_quant = res.layer.inputs[0]
        else:
            res = _search_linear(unit, ops, stats[0], wb, ab, cfg, int(cap.elems_per_sample[0]))
        layers.append(res.layer)
        notes.extend(res.notes)
        if res.option is not None:
            twin_options[unit.name] = res.option
        log.debug("unit %s: w%s a%d", unit.name, res.layer.w_bits, res.layer.a_bits)
    if input_quant is not None:
        notes.insert(0, f"input: {input_quant.tensor} at {q.input_bits} bits (left out of the activation average)")
    avg_w, avg_a = average_bits(layers)
    plan = QuantPlan(
        source_digest=source_digest,
        model_digest=analysis.model_digest,
        layers=tuple(layers),
        smoothing=smoothing,
        input_quant=input_quant,
        emission=q.emission.record(),
        avg_weight_bits=avg_w,
        avg_activation_bits=avg_a,
        notes=tuple(notes),
    )
    return ScaleSearchResult(plan, types.MappingProxyType(twin_options))


def layer_output_errors(
    model: onnx.ModelProto,
    analysis: ModelAnalysis,
    captured: CapturedInputs,
    plan: QuantPlan,
) -> dict[str, float]:
    """Relative output error ``|| X W - Q(X) Q(W) ||^2 / || X W ||^2`` of every unit of ``plan``
    on the captured inputs (attention: ``|| A B - Q(A) Q(B) ||^2 / || A B ||^2``), in graph order."""
    _check_captured(analysis, captured)
    if plan.model_digest != analysis.model_digest:
        raise PlanError(f"the plan was made for another graph (plan {plan.model_digest}, analysis {analysis.model_digest})")
    weights = _ModelWeights(model)
    out: dict[str, float] = {}
    for unit in analysis.units:
        lp = plan.layer(unit.name)
        ops = _operands(unit, captured, weights)
        if ops.a is not None:
            ref = float(np.sum(np.square(np.matmul(ops.a, ops.b), dtype=np.float64)))
            out[unit.name] = _rel(_attention_error(ops.a, ops.b, lp.inputs[0], lp.inputs[1]), ref)
            continue
        if ops.x is None:
            out[unit.name] = float("nan")
            continue
        if lp.weight is None:
            raise PlanError(f"plan layer {unit.name} has no weight quantizer")
        w_fq = np.moveaxis(lp.weight.fake_quant(ops.w_stored, ops.w_axis), ops.w_axis, -1).reshape(ops.w.shape)
        ref = float(np.sum(np.square(ops.x @ ops.w, dtype=np.float64)))
        out[unit.name] = _rel(LinearObjective(ops.x, ops.w, w_fq)(lp.inputs[0].fake_quant), ref)
    return out
