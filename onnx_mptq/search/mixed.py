"""Greedy mixed precision: per-layer weight and activation bits under a budget (method.md section 4).

Items. Every unit contributes up to two items: its weight bits (units with a weight) and its
activation bits (every unit whose operands count in the activation average; the image entering
the patch embedding stays at ``quant.input_bits``). Each item moves down the candidate ladder
(``mixed.candidates``, default 8 > 6 > 5 > 4) one rung at a time. Pins (``mixed.keep``, entries
``BITS:GLOB``; the glob is matched with :func:`fnmatch.fnmatchcase` against the unit name and its
role, the first matching entry wins) fix both of a unit's bit-widths.

Budget (``plan.average_bits`` computes the same numbers from the final plan)::

    avg_w = sum_u params_u w_u / sum_u params_u            (units with a weight)
    avg_a = sum_u elems_u a_u / sum_u elems_u              (elems = operand elements per sample)
    size  = (sum_u params_u w_u / 8 + 4 sum_u channels_u + 4 * other float parameters) / 1e6  [MB]

``mixed.target_bits = B`` asks ``avg_w <= B`` and ``avg_a <= B``; ``mixed.target_size_mb = S``
asks ``size <= S`` (weights only; both may be given). The search stops at the first assignment
meeting every requested bound, so the achieved averages never exceed the budget; when even the
lowest candidates (with the pins) cannot meet it, :class:`ConfigError` says so before any work.

Sensitivity. How far the network's outputs move from FP32 on a calibration subset
(``mixed.subset`` samples; by default as many as a fixed amount of compute per evaluation
allows, :func:`onnx_mptq.evaluate.factory.subset_size`), measured with the whole network fake-quantized at the current
assignment (``ParamEvaluator``: one ORT session whose quantization parameters are inputs; the
integer graph of :func:`onnx_mptq.evaluate.fakequant.build_param_graph`, which runs the emitted
model's integer kernels, unless ``quant.optm.lattice`` is off and twins outside the uint8
lattice are possible). The
metric (**choice**, settled by measurement) is the noise-to-signal ratio of the logits,
``nmse = sum (z - z_q)^2 / sum z^2`` (= 10^(-SQNR/10)); the method's KL of the softmaxes,
``mean KL(softmax(z) || softmax(z_q))``, is the other option (``metric="kl"``). Measured on the
real models of ../shared/data at 5 bits against uniform W5A5 (held-out split): with KL,
mnist-vit agreement 99.27-99.34 % over three subset seeds (W5A5: 99.37 %) and cifar10-vit top-1
71.52 % (W5A5: 71.69 %); with nmse, 99.36-99.44 % and 71.83 %, better than uniform on top-1,
agreement, SQNR and KL alike. The per-sample KL is heavy-tailed -- a few uncertain samples carry
most of it -- so a 32-sample subset ranks layers by those few samples; the logit error averages
over every sample and class. The cost of lowering item ``i`` one rung is::

    score_i = (D(assignment with i lowered) - D(assignment)) / saved_i
    saved_i = params_u (b - b') / sum params      (weight item: the drop of avg_w)
              elems_u  (b - b') / sum elems        (activation item: the drop of avg_a)

Greedy with lazy re-evaluation: every item's first drop is measured once at the start (the
sensitivity table); then the item with the smallest score among the bounds not yet met is
lowered, provided its score was measured at most ``max_age`` steps ago, else it is measured again
and put back. After a drop, the item's next drop is measured when it comes up. Scores are
relative to the current D, which is re-measured at least every ``max_age`` steps.

Quantizers used while searching (cached per unit and bits; the final plan re-runs the full scale
search of :mod:`onnx_mptq.search.scales` for the chosen bits): the same quantizer families,
candidate grids and OPT-m choice as the final search, made cheap enough to compute for every
(unit, bits) a search visits -- weight steps by the per-channel grid search of the weight error;
activation steps by the coarse-to-fine grid (plus the min/max and percentile ranges) on the
diagonal proxy of the consuming matmul's output error, ``sum_tk h_k (x_tk - Q(x)_tk)^2`` with
``h = diag(W W^T)`` (attention: the squared rows of the other operand), on a subsample of the
captured inputs (``SEARCH_TOKENS`` rows, ``SEARCH_PAIRS`` attention samples).
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import onnx
from tqdm import tqdm

from ..calibrate.capture import CapturedInputs, CaptureKind, TensorStats
from ..config import Config, MixedConfig, Pin, ScaleMethod
from ..errors import CalibrationError, ConfigError
from ..graph.analysis import GELU_KINDS, Activation, ModelAnalysis, Role, Unit
from ..numerics.quant import UniformParams, fake_quant, params_from_range
from ..numerics.search import candidate_fractions, coarse_to_fine, search_weight_scales
from ..numerics.twin import search_twin, search_twin_operand, twin_fake_quant
from ..plan import ActQuant, LayerPlan, WeightQuant
from ..records import Record
from ..evaluate.factory import evaluation_graph, make_evaluator
from .scales import _best_of, _range_params, twin_max_m

log = logging.getLogger(__name__)

SEARCH_TOKENS = 128  # captured rows per Linear used to choose the search-time activation steps
SEARCH_PAIRS = 2  # captured attention samples used likewise
MAX_AGE = 16  # steps a measured score stays usable, at least (see allocate_bits)
METRIC = "nmse"  # sensitivity metric of the default evaluator: "nmse" or "kl" (module docstring)
_MIN_TWIN_BITS = 3


class ItemKind(str, enum.Enum):
    WEIGHT = "weight"
    ACTIVATION = "activation"


# ---------------------------------------------------------------------------------------------
# records


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """KL increase when one item moves one rung down from the highest candidate."""

    unit: str
    role: str
    kind: ItemKind
    from_bits: int
    to_bits: int
    delta: float  # increase of the metric
    saved: float  # drop of the average (bits) it buys
    score: float  # delta / saved


@dataclasses.dataclass(frozen=True)
class SensitivityTable(Record):
    KIND = "sensitivity_table"
    SCHEMA_VERSION = 1

    model_digest: str
    metric: str  # "kl": mean KL(softmax(FP32) || softmax(quantized)); "nmse": logit noise / signal; on the subset
    samples: int
    base: float  # the metric with every unpinned item at the highest candidate
    entries: tuple[Sensitivity, ...]

    def of(self, unit: str, kind: ItemKind | str) -> Sensitivity | None:
        k = ItemKind(kind)
        for e in self.entries:
            if e.unit == unit and e.kind is k:
                return e
        return None


@dataclasses.dataclass(frozen=True)
class AllocationStep:
    step: int
    unit: str
    kind: ItemKind
    from_bits: int
    to_bits: int
    delta: float  # increase of the metric, as measured when chosen
    age: int  # steps between that measurement and the choice
    distance: float  # the metric after the step: measured when ``exact``, else the previous one + delta (>= 0)
    exact: bool
    avg_weight_bits: float
    avg_activation_bits: float


@dataclasses.dataclass(frozen=True)
class UnitBits:
    """One unit's bits as allocated, and the counts its bits are weighed by in the averages."""

    unit: str
    role: str
    w_bits: int | None  # None: no weight
    a_bits: int
    pinned: bool  # by mixed.keep
    params: int  # weight elements (0: no weight)
    act_elems: int  # operand elements per sample in the activation average (0: not counted)


@dataclasses.dataclass(frozen=True)
class AllocationResult(Record):
    """What :func:`allocate_bits` chose, how close it came to FP32 and what it cost."""

    KIND = "bit_allocation"
    SCHEMA_VERSION = 1

    model_digest: str
    target_bits: float | None  # the budget asked (mixed.target_bits, mixed.target_size_mb)
    target_size_mb: float | None
    candidates: tuple[int, ...]  # the ladder, highest first
    units: tuple[UnitBits, ...]
    avg_weight_bits: float  # achieved
    avg_activation_bits: float
    size_mb: float
    distance: float  # the metric of the final assignment on the subset
    sensitivity: SensitivityTable
    history: tuple[AllocationStep, ...]
    evaluations: int
    seconds: float  # whole allocation
    eval_seconds: float  # of which ORT evaluations

    @property
    def bits(self) -> dict[str, tuple[int, int]]:
        """unit -> (w_bits, a_bits) as :func:`onnx_mptq.search.scales.search_scales` takes it
        (units without a weight report their a_bits as w_bits, which the search ignores)."""
        return {u.unit: (u.w_bits if u.w_bits is not None else u.a_bits, u.a_bits) for u in self.units}


class Evaluator(Protocol):
    """What the greedy needs: the distance of a full assignment's outputs from FP32 (see
    evaluate.evaluator.ParamEvaluator); ``set_base`` (optional) announces the assignment later
    ones are compared with."""

    samples: int
    evaluations: int
    seconds: float
    metric: str

    def distance(self, layers: Mapping[str, LayerPlan]) -> float: ...


# ---------------------------------------------------------------------------------------------
# budget


@dataclasses.dataclass(frozen=True)
class _Budget:
    target_bits: float | None
    target_size_mb: float | None
    params: dict[str, int]  # units with a weight
    elems: dict[str, int]  # units counted in the activation average
    channels: dict[str, int]
    other_params: int  # float parameters that stay float (biases, norms, embeddings)

    def avg_w(self, w: Mapping[str, int]) -> float:
        tot = sum(self.params.values())
        return sum(self.params[u] * w[u] for u in self.params) / tot if tot else 0.0

    def avg_a(self, a: Mapping[str, int]) -> float:
        tot = sum(self.elems.values())
        return sum(self.elems[u] * a[u] for u in self.elems) / tot if tot else 0.0

    def size_mb(self, w: Mapping[str, int]) -> float:
        bits = sum(self.params[u] * w[u] for u in self.params)
        return (bits / 8 + 4 * sum(self.channels.values()) + 4 * self.other_params) / 1e6

    def w_met(self, w: Mapping[str, int]) -> bool:
        ok = True
        if self.target_bits is not None:
            ok &= self.avg_w(w) <= self.target_bits
        if self.target_size_mb is not None:
            ok &= self.size_mb(w) <= self.target_size_mb
        return ok

    def a_met(self, a: Mapping[str, int]) -> bool:
        return self.target_bits is None or self.avg_a(a) <= self.target_bits


def pinned_bits(unit: Unit, pins: Iterable[Pin]) -> int | None:
    for pin in pins:
        if pin.matches(unit.name, unit.role.value):
            return pin.bits
    return None


def _other_float_params(model: onnx.ModelProto, weight_elems: int) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            total += int(np.prod(init.dims)) if len(init.dims) else 1
    return max(total - weight_elems, 0)


# ---------------------------------------------------------------------------------------------
# quantizers used while searching


def _rows(x: np.ndarray, n: int) -> np.ndarray:
    """n evenly spaced rows of x (deterministic)."""
    if x.shape[0] <= n:
        return x
    return x[np.unique(np.linspace(0, x.shape[0] - 1, n).astype(np.int64))]


class UnitQuantizers:
    """Search-time quantizers per (unit, bits), cached (module docstring)."""

    def __init__(self, analysis: ModelAnalysis, captured: CapturedInputs, weights: Mapping[str, tuple[np.ndarray, int]],
                 cfg: Config, *, tokens: int = SEARCH_TOKENS, pairs: int = SEARCH_PAIRS) -> None:
        self.cfg = cfg
        self.units = {u.name: u for u in analysis.units}
        self.captured = captured
        self.weights = dict(weights)  # unit -> (weight as read, output-channel axis)
        self.tokens = tokens
        self.pairs = pairs
        self._w: dict[tuple[str, int], WeightQuant] = {}
        self._a: dict[tuple[str, int], tuple[ActQuant, ...]] = {}
        self._obj: dict[str, tuple] = {}
        self.seconds = 0.0

    def weight(self, unit: str, bits: int) -> WeightQuant:
        key = (unit, bits)
        if key not in self._w:
            t = time.perf_counter()
            w, axis = self.weights[unit]
            p = search_weight_scales(w, bits, x=None, axis=axis)
            self._w[key] = WeightQuant.from_params(p)
            self.seconds += time.perf_counter() - t
        return self._w[key]

    def acts(self, unit: str, bits: int) -> tuple[ActQuant, ...]:
        key = (unit, bits)
        if key not in self._a:
            t = time.perf_counter()
            self._a[key] = self._acts(self.units[unit], bits)
            self.seconds += time.perf_counter() - t
        return self._a[key]

    def _acts(self, u: Unit, bits: int) -> tuple[ActQuant, ...]:
        q = self.cfg.quant
        sym = q.act_symmetric
        method = ScaleMethod(q.search.method)
        grid = dict(grid_size=q.search.grid_size, low=q.search.grid_low, high=q.search.grid_high)
        cap = self.captured[u.name]
        stats = self.captured.operand_stats(u.name)
        if u.role is Role.PATCH_EMBED:  # the image: quant.input_bits, not a candidate
            p = _range_params(stats[0], q.input_bits, sym, ScaleMethod.MINMAX, q.search.percentile)
            return (ActQuant.from_params(u.inputs[0], p),)
        if cap.kind is CaptureKind.CONV:  # an inner conv (captured as images): min/max at the candidate bits
            p = _range_params(stats[0], bits, sym, ScaleMethod.MINMAX, q.search.percentile)
            return (ActQuant.from_params(u.inputs[0], p),)
        if method is not ScaleMethod.OUTPUT_MSE:
            return tuple(ActQuant.from_params(t, _range_params(st, bits, sym, method, q.search.percentile))
                         for t, st in zip(u.inputs, stats))
        if cap.kind is CaptureKind.ATTENTION:
            a, b = self._pairs(u)
            obj_a = _Proxy(a, np.sum(np.square(b, dtype=np.float64), axis=-1)[..., None, :])  # h (S, H, 1, K)
            pa = self._uniform(obj_a, stats[0], bits, sym)
            qa = ActQuant.from_params(u.inputs[0], pa)
            if (q.optm.enabled and u.role is Role.ATTN_AV and u.activation is Activation.SOFTMAX
                    and _MIN_TWIN_BITS <= bits <= q.optm.max_bits and twin_max_m(self.cfg, "softmax", bits) >= 0):
                tp = search_twin_operand(a, b, 0, bits, "softmax", max_m=twin_max_m(self.cfg, "softmax", bits), n_exact=1,
                                         refine_steps=0, **grid)
                if obj_a(lambda v: twin_fake_quant(v, tp)) <= obj_a(lambda v: fake_quant(v, pa)):
                    qa = ActQuant.from_params(u.inputs[0], tp)
            a_fq = qa.fake_quant(a)
            obj_b = _Proxy(b, np.sum(np.square(a_fq, dtype=np.float64), axis=-2)[..., :, None])  # h (S, H, K, 1)
            return (qa, ActQuant.from_params(u.inputs[1], self._uniform(obj_b, stats[1], bits, sym)))
        x, w, obj = self._linear(u)
        up = self._uniform(obj, stats[0], bits, sym)
        act = ActQuant.from_params(u.inputs[0], up)
        if (q.optm.enabled and u.role is Role.FC2 and u.activation in GELU_KINDS and _MIN_TWIN_BITS <= bits <= q.optm.max_bits
                and twin_max_m(self.cfg, "gelu", bits) >= 0):
            tp = search_twin(x, w, bits, "gelu", max_m=twin_max_m(self.cfg, "gelu", bits), n_exact=1, refine_steps=0, **grid)
            if obj(lambda v: twin_fake_quant(v, tp)) <= obj(lambda v: fake_quant(v, up)):
                act = ActQuant.from_params(u.inputs[0], tp)
        return (act,)

    def _uniform(self, obj: "_Proxy", stats: TensorStats, bits: int, sym: bool) -> UniformParams:
        q = self.cfg.quant
        lo, hi = float(obj.operand.min()), float(obj.operand.max())
        up = _grid_search(obj, lo, hi, bits, sym, q.search.grid_size, q.search.grid_low, q.search.grid_high)
        return _best_of(obj, [up, _range_params(stats, bits, sym, ScaleMethod.MINMAX, q.search.percentile),
                              _range_params(stats, bits, sym, ScaleMethod.PERCENTILE, q.search.percentile)])

    def _pairs(self, u: Unit) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.captured[u.name].pairs  # type: ignore[misc]
        return a[: self.pairs], b[: self.pairs]

    def _linear(self, u: Unit):
        """(token subsample, effective weight, proxy objective), cached per unit."""
        if u.name not in self._obj:
            rows = self.captured[u.name].rows
            x = _rows(rows, self.tokens)  # (tokens, K)
            w = u.effective(self.weights[u.name][0])  # (K, N)
            h = np.sum(np.square(w, dtype=np.float64), axis=1)[None, :]  # (1, K) = diag(W W^T)
            self._obj[u.name] = (x, w, _Proxy(x, h))
        return self._obj[u.name]


class _Proxy:
    """The diagonal proxy of a matmul's output error when one operand is fake-quantized:
    ``sum h * (x - fq(x))^2`` with ``h`` the squared norms of the other operand's matching rows
    (``diag(W W^T)`` for ``x @ W``)."""

    def __init__(self, operand: np.ndarray, h: np.ndarray) -> None:
        self.operand = np.asarray(operand, dtype=np.float32)
        self.channel_weights = np.asarray(h, dtype=np.float32)

    def __call__(self, fq) -> float:
        d = self.operand - fq(self.operand)
        return float(np.sum(self.channel_weights * (d * d), dtype=np.float64))


def _grid_search(obj, lo: float, hi: float, bits: int, symmetric: bool, grid_size: int, low: float,
                 high: float) -> UniformParams:
    """The output-error grid search of numerics.search (fractions of the min/max step,
    coarse-to-fine) with a prebuilt objective."""
    fracs = candidate_fractions(grid_size, low, high)
    cands: dict[int, UniformParams] = {}

    def cand(f: float) -> UniformParams:
        if symmetric:
            amax = max(abs(lo), abs(hi))
            return params_from_range(-f * amax, f * amax, bits, True)
        return params_from_range(f * lo, f * hi, bits, False)

    def err(i: int) -> float:
        p = cands.setdefault(i, cand(float(fracs[i])))
        return obj(lambda v: fake_quant(v, p))

    one = int(np.flatnonzero(fracs == 1.0)[0])
    best, _ = coarse_to_fine(len(fracs), err, n_coarse=20, always=(one,))
    return cands[best]


# ---------------------------------------------------------------------------------------------
# the greedy


@dataclasses.dataclass
class _Entry:
    score: float
    delta: float
    measured: int  # step of the measurement, -1: estimate only
    to_bits: int
    trial: float  # the metric measured with the item lowered


def _ladder(cands: tuple[int, ...]) -> list[int]:
    return sorted(set(cands), reverse=True)


def _check_feasible(budget: _Budget, w_low: Mapping[str, int], a_low: Mapping[str, int], cfg: Config) -> None:
    mixed = cfg.mixed
    cands = ", ".join(str(b) for b in _ladder(mixed.candidates))
    pins = f" and pins {', '.join(map(str, mixed.keep))}" if mixed.keep else ""
    if mixed.target_bits is not None:
        aw, aa = budget.avg_w(w_low), budget.avg_a(a_low)
        if aw > mixed.target_bits or aa > mixed.target_bits:
            raise ConfigError(
                f"mixed.target_bits {mixed.target_bits:g} cannot be met with candidates {cands}{pins}: the lowest "
                f"reachable averages are {aw:.3f} weight bits and {aa:.3f} activation bits")
    if mixed.target_size_mb is not None:
        s = budget.size_mb(w_low)
        if s > mixed.target_size_mb:
            raise ConfigError(
                f"mixed.target_size_mb {mixed.target_size_mb:g} cannot be met with candidates {cands}{pins}: the "
                f"smallest reachable model is {s:.3f} MB")


def allocate_bits(model: onnx.ModelProto, analysis: ModelAnalysis, captured: CapturedInputs, data: Any,
                  config: Config, *, progress: bool = True, evaluator: Evaluator | None = None,
                  max_age: int | None = None, metric: str | None = None) -> AllocationResult:
    """Greedy bit allocation under ``config.mixed``'s budget (module docstring).

    ``model`` is the (smoothed) float graph ``analysis`` and ``captured`` describe; ``data`` the
    calibration data (the sensitivity subset is drawn from it). ``evaluator`` replaces the default
    :class:`onnx_mptq.evaluate.evaluator.ParamEvaluator` (tests, other metrics). ``max_age``:
    greedy steps a measured score stays usable (default ``max(MAX_AGE, items // 2)``: on the real
    models of ../shared/data a longer age gave the same accuracy with a third fewer evaluations).

    The steps: check the request; the budget (:func:`_make_budget`); the starting assignment and
    the items that may move (:func:`_start`, which also refuses an unreachable budget); the
    sensitivity table (:func:`_sensitivity_table`); the greedy loop (:func:`_greedy`); the result
    (:func:`_finalize`)."""
    t_start = time.perf_counter()
    _check_request(config, analysis, captured, max_age)
    mixed = config.mixed
    ladder = _ladder(mixed.candidates)
    graph = evaluation_graph(model, analysis, config)
    weights = {s.unit: (s.weight, s.axis) for s in graph.weights}
    budget = _make_budget(model, analysis, captured, weights, mixed)
    start = _start(analysis, budget, ladder, config)
    if max_age is None:
        max_age = max(MAX_AGE, len(start.items) // 2)
    if evaluator is None:
        evaluator = make_evaluator(model, analysis, captured, data, config, samples=mixed.subset,
                                   metric=metric or mixed.metric.value, graph=graph)
    asg = _Assignment(analysis, budget, ladder, UnitQuantizers(analysis, captured, weights, config), start)
    quiet = not progress
    bar = _Progress(sum(1 for u, kind in start.items if asg.next_bits(asg.bits(kind, u)) is not None), asg.gap(),
                    disable=quiet)
    base, entries, table = _sensitivity_table(asg, evaluator, start.items, bar)
    history = _greedy(asg, evaluator, entries, base, max_age, bar)
    final = evaluator.distance(asg.layers) if history else base
    bar.close()
    return _finalize(analysis, mixed, asg, evaluator, base, table, history, final, time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------
# the steps of allocate_bits


def _check_request(config: Config, analysis: ModelAnalysis, captured: CapturedInputs, max_age: int | None) -> None:
    mixed = config.mixed
    if mixed.target_bits is None and mixed.target_size_mb is None:
        raise ConfigError("mixed.target_bits (or mixed.target_size_mb) is required with mixed precision")
    if max_age is not None and max_age < 0:
        raise ConfigError(f"max_age must be >= 0, got {max_age}")
    if captured.model_digest != analysis.model_digest:
        raise CalibrationError("the captured inputs belong to another graph; capture again on this model")


def _make_budget(model: onnx.ModelProto, analysis: ModelAnalysis, captured: CapturedInputs,
                 weights: Mapping[str, tuple[np.ndarray, int]], mixed: MixedConfig) -> _Budget:
    """The counts the averages weigh by: parameters and output channels of the units with a
    weight, operand elements per sample of the units counted in the activation average (all but
    the patch embedding, whose input stays at ``quant.input_bits``)."""
    params: dict[str, int] = {}
    channels: dict[str, int] = {}
    elems: dict[str, int] = {}
    for u in analysis.units:
        if u.name in weights:
            w, axis = weights[u.name]
            params[u.name] = int(w.size)
            channels[u.name] = int(w.shape[axis])
        cap = captured[u.name]
        if u.role is not Role.PATCH_EMBED:
            e = int(sum(cap.elems_per_sample)) if cap.kind is CaptureKind.ATTENTION else int(cap.elems_per_sample[0])
            if e > 0:
                elems[u.name] = e
    return _Budget(mixed.target_bits, mixed.target_size_mb, params, elems, channels,
                   _other_float_params(model, sum(params.values())))


@dataclasses.dataclass(frozen=True)
class _Start:
    """The starting assignment: every unpinned item at the highest candidate, pinned units at
    their pin, the patch embedding's input at ``quant.input_bits``; ``items`` may move."""

    pinned: dict[str, int]
    w_bits: dict[str, int]
    a_bits: dict[str, int]
    items: tuple[tuple[str, ItemKind], ...]


def _start(analysis: ModelAnalysis, budget: _Budget, ladder: list[int], config: Config) -> _Start:
    top, low = ladder[0], ladder[-1]
    units = analysis.units
    pins = config.mixed.keep
    pinned = {u.name: b for u in units if (b := pinned_bits(u, pins)) is not None}
    w_bits = {u: pinned.get(u, top) for u in budget.params}
    a_bits: dict[str, int] = {u.name: pinned.get(u.name, top) for u in units}
    for u in units:
        if u.role is Role.PATCH_EMBED:
            a_bits[u.name] = config.quant.input_bits
    items: list[tuple[str, ItemKind]] = []
    for u in units:
        if u.name in pinned:
            continue
        if u.name in budget.params:
            items.append((u.name, ItemKind.WEIGHT))
        if u.name in budget.elems:
            items.append((u.name, ItemKind.ACTIVATION))
    _check_feasible(budget, {u: (w_bits[u] if u in pinned else low) for u in budget.params},
                    {u: (a_bits[u] if u in pinned else low) for u in a_bits}, config)
    return _Start(pinned, w_bits, a_bits, tuple(items))


class _Assignment:
    """The assignment being lowered: bits per unit and the plan layers they give (search-time
    quantizers, :class:`UnitQuantizers`)."""

    def __init__(self, analysis: ModelAnalysis, budget: _Budget, ladder: list[int], quant: UnitQuantizers,
                 start: _Start) -> None:
        self.budget = budget
        self.ladder = ladder
        self.quant = quant
        self.units = {u.name: u for u in analysis.units}
        self.pinned = start.pinned
        self.w_bits = dict(start.w_bits)
        self.a_bits = dict(start.a_bits)
        self.layers = {u: self.layer(u, self.w_bits.get(u), self.a_bits[u]) for u in self.units}

    def layer(self, u: str, wb: int | None, ab: int) -> LayerPlan:
        unit = self.units[u]
        wq = self.quant.weight(u, wb) if wb is not None else None
        return LayerPlan(unit=u, role=unit.role.value, inputs=self.quant.acts(u, ab), weight=wq,
                         params=self.budget.params.get(u, 0), act_elems=self.budget.elems.get(u, 0))

    def bits(self, kind: ItemKind, u: str) -> int:
        return self.w_bits[u] if kind is ItemKind.WEIGHT else self.a_bits[u]

    def next_bits(self, b: int) -> int | None:
        lower = [c for c in self.ladder if c < b]
        return lower[0] if lower else None

    def trial(self, kind: ItemKind, u: str, nb: int) -> dict[str, LayerPlan]:
        """The assignment with item ``(u, kind)`` at ``nb`` bits."""
        lp = self.layer(u, nb if kind is ItemKind.WEIGHT else self.w_bits.get(u),
                        nb if kind is ItemKind.ACTIVATION else self.a_bits[u])
        trial = dict(self.layers)
        trial[u] = lp
        return trial

    def lower(self, kind: ItemKind, u: str, nb: int) -> None:
        if kind is ItemKind.WEIGHT:
            self.w_bits[u] = nb
        else:
            self.a_bits[u] = nb
        self.layers[u] = self.layer(u, self.w_bits.get(u), self.a_bits[u])

    def saved(self, kind: ItemKind, u: str, b: int, nb: int) -> float:
        """The drop of the average (bits) that lowering ``(u, kind)`` from ``b`` to ``nb`` buys."""
        if kind is ItemKind.WEIGHT:
            return self.budget.params[u] * (b - nb) / sum(self.budget.params.values())
        return self.budget.elems[u] * (b - nb) / sum(self.budget.elems.values())

    def met(self, kind: ItemKind | None = None) -> bool:
        """Whether the bound(s) of ``kind`` (None: every bound) are met."""
        if kind is ItemKind.WEIGHT:
            return self.budget.w_met(self.w_bits)
        if kind is ItemKind.ACTIVATION:
            return self.budget.a_met(self.a_bits)
        return self.budget.w_met(self.w_bits) and self.budget.a_met(self.a_bits)

    def gap(self) -> float:
        return _gap(self.budget, self.w_bits, self.a_bits)


GAP_TICKS = 1000  # resolution of the greedy progress bar (share of the starting budget gap closed)


class _Progress:
    """Progress of :func:`allocate_bits` against quantities fixed before each phase starts.

    Phase 1, the sensitivity table: ``table`` evaluations (one per item that can move, plus the
    starting assignment), counted as they run. Phase 2, the greedy: the share of the starting
    budget gap closed, ``1 - gap / gap0`` (:func:`_gap`) in ``GAP_TICKS`` ticks; bits only go down,
    so the gap never grows and the bar never moves back, and it is full when the budget is met.
    The time left is the bar's own estimate from the time measured so far, and the postfix shows
    the evaluations made and their measured mean time."""

    def __init__(self, table: int, gap0: float, *, disable: bool) -> None:
        self.gap0 = gap0
        self.disable = disable
        self.evals = 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=table + 1, desc="mixed precision: sensitivity", unit="eval", disable=disable, leave=False)
        self.phase = 1
        self.ticks = 0

    def evaluated(self) -> None:
        self.evals += 1
        if self.phase == 1:
            self.bar.update()

    def greedy(self) -> None:
        """Phase 2 starts."""
        self.bar.close()
        self.phase = 2
        self.bar = tqdm(total=GAP_TICKS, desc="mixed precision: budget", disable=self.disable, leave=False,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        self.ticks = 0

    def lowered(self, gap: float) -> None:
        """An item was lowered; ``gap`` is the new gap."""
        ticks = GAP_TICKS if self.gap0 <= 0 or gap <= 0 else int(GAP_TICKS * (1.0 - gap / self.gap0))
        if ticks > self.ticks:
            self.bar.update(ticks - self.ticks)
            self.ticks = ticks
        secs = (time.perf_counter() - self.t0) / max(self.evals, 1)
        self.bar.set_postfix_str(f"{self.evals} evals, {secs:.2f} s/eval", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _sensitivity_table(asg: _Assignment, evaluator: Evaluator, items: tuple[tuple[str, ItemKind], ...],
                       bar: _Progress) -> tuple[float, dict[tuple[str, ItemKind], _Entry], list[Sensitivity]]:
    """The metric at the starting assignment (``base``) and every item's first drop measured on
    it: the greedy's first entries and the sensitivity table."""
    set_base = getattr(evaluator, "set_base", None)
    if set_base is not None:
        set_base(asg.layers)
    base = evaluator.distance(asg.layers)
    bar.evaluated()
    entries: dict[tuple[str, ItemKind], _Entry] = {}
    table: list[Sensitivity] = []
    for u, kind in items:
        b = asg.bits(kind, u)
        nb = asg.next_bits(b)
        if nb is None:
            continue
        k = evaluator.distance(asg.trial(kind, u, nb))
        bar.evaluated()
        s = asg.saved(kind, u, b, nb)
        e = _Entry((k - base) / s, k - base, 0, nb, k)
        entries[(u, kind)] = e
        table.append(Sensitivity(u, asg.units[u].role.value, kind, b, nb, k - base, s, e.score))
    return base, entries, table


def _greedy(asg: _Assignment, evaluator: Evaluator, entries: dict[tuple[str, ItemKind], _Entry], base: float,
            max_age: int, bar: _Progress) -> list[AllocationStep]:
    """Lower the cheapest item until the budget is met (lazy re-evaluation, module docstring)."""
    set_base = getattr(evaluator, "set_base", None)
    budget = asg.budget
    heap = [(e.score, i, key) for i, (key, e) in enumerate(entries.items())]
    heapq.heapify(heap)
    counter = len(heap)
    step = 0
    cur = base
    exact_at = 0  # the step whose assignment cur was measured on
    history: list[AllocationStep] = []
    bar.greedy()
    while not asg.met():
        if not heap:  # cannot happen after the feasibility check; guards against an endless loop
            raise ConfigError("mixed precision: no item left to lower before the budget was met")
        score, _, key = heapq.heappop(heap)
        u, kind = key
        e = entries.get(key)
        if e is None or e.score != score:
            continue  # a superseded heap record
        if asg.met(kind):
            del entries[key]  # that bound is met: the item is not needed any more
            continue
        b = asg.bits(kind, u)
        if e.measured < 0 or step - e.measured > max_age:
            if step - exact_at > max_age:
                cur, exact_at = evaluator.distance(asg.layers), step
                bar.evaluated()
            k = evaluator.distance(asg.trial(kind, u, e.to_bits))
            bar.evaluated()
            s = asg.saved(kind, u, b, e.to_bits)
            ne = _Entry((k - cur) / s, k - cur, step, e.to_bits, k)
            entries[key] = ne
            heapq.heappush(heap, (ne.score, counter, key))
            counter += 1
            continue
        # lower the item
        nb = e.to_bits
        asg.lower(kind, u, nb)
        if set_base is not None:
            set_base(asg.layers)
        age = step - e.measured
        step += 1
        exact = age == 0 and exact_at == step - 1
        if exact:
            cur, exact_at = e.trial, step  # measured on exactly this assignment
        else:
            cur = max(cur + e.delta, 0.0)
        history.append(AllocationStep(step, u, kind, b, nb, e.delta, age, cur, exact, budget.avg_w(asg.w_bits),
                                      budget.avg_a(asg.a_bits)))
        log.debug("step %d: %s %s %d -> %d (dKL %.3g, age %d)", step, u, kind.value, b, nb, e.delta, age)
        bar.lowered(asg.gap())
        del entries[key]
        nnb = asg.next_bits(nb)
        if nnb is not None:
            # first guess for the next rung, from this one (noise power ~ 4^-bits); measured when it comes up
            est = max(e.delta, 0.0) * (4.0 ** -nnb - 4.0 ** -nb) / (4.0 ** -nb - 4.0 ** -b)
            ne = _Entry(est / asg.saved(kind, u, nb, nnb), est, -1, nnb, math.nan)
            entries[key] = ne
            heapq.heappush(heap, (ne.score, counter, key))
            counter += 1
    bar.lowered(asg.gap())
    return history


def _finalize(analysis: ModelAnalysis, mixed: MixedConfig, asg: _Assignment, evaluator: Evaluator, base: float,
              table: list[Sensitivity], history: list[AllocationStep], final: float, seconds: float) -> AllocationResult:
    budget, w_bits, a_bits = asg.budget, asg.w_bits, asg.a_bits
    sens = SensitivityTable(model_digest=analysis.model_digest, metric=str(evaluator.metric), samples=int(evaluator.samples),
                            base=float(base), entries=tuple(table))
    ub = tuple(UnitBits(u.name, u.role.value, w_bits.get(u.name), a_bits[u.name], u.name in asg.pinned,
                        budget.params.get(u.name, 0), budget.elems.get(u.name, 0)) for u in analysis.units)
    res = AllocationResult(
        model_digest=analysis.model_digest, target_bits=mixed.target_bits, target_size_mb=mixed.target_size_mb,
        candidates=tuple(asg.ladder), units=ub, avg_weight_bits=budget.avg_w(w_bits), avg_activation_bits=budget.avg_a(a_bits),
        size_mb=budget.size_mb(w_bits), distance=float(final), sensitivity=sens, history=tuple(history),
        evaluations=int(evaluator.evaluations), seconds=seconds, eval_seconds=float(evaluator.seconds))
    log.info("mixed precision: %d steps, %d evaluations (%.1f s of %.1f s), avg bits W %.3f A %.3f, size %.3f MB, %s %.4g",
             len(history), res.evaluations, res.eval_seconds, res.seconds, res.avg_weight_bits, res.avg_activation_bits,
             res.size_mb, res.sensitivity.metric, res.distance)
    return res


def _gap(budget: _Budget, w_bits: Mapping[str, int], a_bits: Mapping[str, int]) -> float:
    """How far the assignment is from the budget, as the larger relative excess (0 when met)."""
    gaps = [0.0]
    if budget.target_bits is not None:
        gaps += [budget.avg_w(w_bits) - budget.target_bits, budget.avg_a(a_bits) - budget.target_bits]
    if budget.target_size_mb is not None:
        gaps.append((budget.size_mb(w_bits) - budget.target_size_mb) / max(budget.target_size_mb, 1e-9))
    return max(gaps)
