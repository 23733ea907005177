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
allows, :func:`subset_size`), measured with the whole network fake-quantized at the current
assignment (``ParamEvaluator``: one ORT session whose quantization parameters are inputs; the
integer graph of :func:`onnx_mptq.passes.fakequant.build_param_graph`, which runs the emitted
model's integer kernels, unless ``quant.optm_lattice`` is off and twins outside the uint8
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
import fnmatch
import heapq
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import onnx
from tqdm import tqdm

from ..calibrate.capture import CapturedInputs, CaptureKind, TensorStats
from ..config import Config, ScaleMethod
from ..errors import CalibrationError, ConfigError
from ..graph.analysis import GELU_KINDS, Activation, ModelAnalysis, Role, Unit
from ..numerics.quant import UniformParams, fake_quant, params_from_range
from ..numerics.search import candidate_fractions, coarse_to_fine, search_weight_scales
from ..numerics.twin import search_twin, search_twin_operand, twin_fake_quant
from ..plan import ActQuant, LayerPlan, WeightQuant
from ..records import Record
from .scales import _best_of, _range_params, evaluation_graph, twin_max_m

log = logging.getLogger(__name__)

SEARCH_TOKENS = 128  # captured rows per Linear used to choose the search-time activation steps
SEARCH_PAIRS = 2  # captured attention samples used likewise
MAX_AGE = 16  # steps a measured score stays usable, at least (see allocate_bits)
METRIC = "nmse"  # sensitivity metric of the default evaluator: "nmse" or "kl" (module docstring)
SUBSET_MACS = 1.5e11  # multiply-accumulates of one evaluation of the default subset (35 DeiT-S images)
SUBSET_RANGE = (32, 1024)  # the default subset's bounds (samples)
EVAL_CHUNK_ELEMS = 1 << 21  # samples per evaluation run: the widest captured operand stays under this
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
    unit: str
    role: str
    w_bits: int | None  # None: no weight
    a_bits: int
    pinned: bool
    params: int
    act_elems: int


@dataclasses.dataclass(frozen=True)
class AllocationResult(Record):
    KIND = "bit_allocation"
    SCHEMA_VERSION = 1

    model_digest: str
    target_bits: float | None
    target_size_mb: float | None
    candidates: tuple[int, ...]
    units: tuple[UnitBits, ...]
    avg_weight_bits: float
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
    calibrate.sensitivity.ParamEvaluator); ``set_base`` (optional) announces the assignment later
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


def parse_pins(keep: Iterable[str]) -> list[tuple[int, str]]:
    out = []
    for k in keep:
        bits, _, pattern = str(k).partition(":")
        out.append((int(bits), pattern))
    return out


def pinned_bits(unit: Unit, pins: list[tuple[int, str]]) -> int | None:
    for bits, pattern in pins:
        if fnmatch.fnmatchcase(unit.name, pattern) or fnmatch.fnmatchcase(unit.role.value, pattern):
            return bits
    return None


def _other_float_params(model: onnx.ModelProto, weight_elems: int) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            total += int(np.prod(init.dims)) if len(init.dims) else 1
    return max(total - weight_elems, 0)


# ---------------------------------------------------------------------------------------------
# quantizers used while searching


def macs_per_sample(analysis: ModelAnalysis, captured: CapturedInputs) -> float:
    """Multiply-accumulates of the Linear and Conv units per sample: input elements times output
    channels (exact for Linears and for a Conv whose stride equals its kernel, as patch
    embeddings have; attention matmuls are left out, a small share in ViTs)."""
    total = 0.0
    for u in analysis.units:
        if u.out_features and u.name in captured:
            total += float(captured[u.name].elems_per_sample[0]) * float(u.out_features)
    return total


def subset_size(requested: int | None, analysis: ModelAnalysis, captured: CapturedInputs) -> int:
    """Samples of a network-level evaluation subset: ``requested``, or (None) as many as
    ``SUBSET_MACS`` of compute per evaluation allows, within ``SUBSET_RANGE``. More samples make
    the measured differences less noisy: on mnist-vit at a 5-bit budget, 32 samples allocated bits
    that tied uniform W5A5 on agreement, the whole 1,000-sample calibration set beat it on top-1,
    agreement, SQNR and KL (BENCHMARKS.md section 5); DeiT-S (4.24 GMAC) gets 35, for search time."""
    if requested is not None:
        return int(requested)
    macs = max(macs_per_sample(analysis, captured), 1.0)
    lo, hi = SUBSET_RANGE
    return int(min(hi, max(lo, SUBSET_MACS // macs)))


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
        method = ScaleMethod(q.scale_method)
        grid = dict(grid_size=q.grid_size, low=q.grid_low, high=q.grid_high)
        cap = self.captured[u.name]
        stats = self.captured.operand_stats(u.name)
        if u.role is Role.PATCH_EMBED or cap.kind is CaptureKind.CONV:
            p = _range_params(stats[0], q.input_bits, sym, ScaleMethod.MINMAX, q.percentile)
            return (ActQuant.from_params(u.inputs[0], p),)
        if method is not ScaleMethod.OUTPUT_MSE:
            return tuple(ActQuant.from_params(t, _range_params(st, bits, sym, method, q.percentile))
                         for t, st in zip(u.inputs, stats))
        if cap.kind is CaptureKind.ATTENTION:
            a, b = self._pairs(u)
            obj_a = _Proxy(a, np.sum(np.square(b, dtype=np.float64), axis=-1)[..., None, :])  # h (S, H, 1, K)
            pa = self._uniform(obj_a, stats[0], bits, sym)
            qa = ActQuant.from_params(u.inputs[0], pa)
            if (q.optm and u.role is Role.ATTN_AV and u.activation is Activation.SOFTMAX
                    and _MIN_TWIN_BITS <= bits <= q.optm_max_bits and twin_max_m(self.cfg, "softmax", bits) >= 0):
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
        if (q.optm and u.role is Role.FC2 and u.activation in GELU_KINDS and _MIN_TWIN_BITS <= bits <= q.optm_max_bits
                and twin_max_m(self.cfg, "gelu", bits) >= 0):
            tp = search_twin(x, w, bits, "gelu", max_m=twin_max_m(self.cfg, "gelu", bits), n_exact=1, refine_steps=0, **grid)
            if obj(lambda v: twin_fake_quant(v, tp)) <= obj(lambda v: fake_quant(v, up)):
                act = ActQuant.from_params(u.inputs[0], tp)
        return (act,)

    def _uniform(self, obj: "_Proxy", stats: TensorStats, bits: int, sym: bool) -> UniformParams:
        q = self.cfg.quant
        lo, hi = float(obj.operand.min()), float(obj.operand.max())
        up = _grid_search(obj, lo, hi, bits, sym, q.grid_size, q.grid_low, q.grid_high)
        return _best_of(obj, [up, _range_params(stats, bits, sym, ScaleMethod.MINMAX, q.percentile),
                              _range_params(stats, bits, sym, ScaleMethod.PERCENTILE, q.percentile)])

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
    pins = f" and pins {', '.join(mixed.keep)}" if mixed.keep else ""
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
    :class:`onnx_mptq.calibrate.sensitivity.ParamEvaluator` (tests, other metrics). ``max_age``:
    greedy steps a measured score stays usable (default ``max(MAX_AGE, items // 2)``: on the real
    models of ../shared/data a longer age gave the same accuracy with a third fewer evaluations)."""
    t_start = time.perf_counter()
    mixed = config.mixed
    if mixed.target_bits is None and mixed.target_size_mb is None:
        raise ConfigError("mixed.target_bits (or mixed.target_size_mb) is required with mixed precision")
    if max_age is not None and max_age < 0:
        raise ConfigError(f"max_age must be >= 0, got {max_age}")
    if captured.model_digest != analysis.model_digest:
        raise CalibrationError("the captured inputs belong to another graph; capture again on this model")
    ladder = _ladder(mixed.candidates)
    top = ladder[0]
    pins = parse_pins(mixed.keep)

    from ..calibrate.sensitivity import ParamEvaluator

    graph = evaluation_graph(model, analysis, config)
    weights = {s.unit: (s.weight, s.axis) for s in graph.weights}
    units = list(analysis.units)
    params: dict[str, int] = {}
    channels: dict[str, int] = {}
    elems: dict[str, int] = {}
    for u in units:
        if u.name in weights:
            w, axis = weights[u.name]
            params[u.name] = int(w.size)
            channels[u.name] = int(w.shape[axis])
        cap = captured[u.name]
        if u.role is not Role.PATCH_EMBED:
            e = int(sum(cap.elems_per_sample)) if cap.kind is CaptureKind.ATTENTION else int(cap.elems_per_sample[0])
            if e > 0:
                elems[u.name] = e
    budget = _Budget(mixed.target_bits, mixed.target_size_mb, params, elems, channels,
                     _other_float_params(model, sum(params.values())))

    pinned = {u.name: b for u in units if (b := pinned_bits(u, pins)) is not None}
    w_bits = {u: pinned.get(u, top) for u in params}
    a_bits: dict[str, int] = {u.name: pinned.get(u.name, top) for u in units}
    for u in units:
        if u.role is Role.PATCH_EMBED:
            a_bits[u.name] = config.quant.input_bits
    items: list[tuple[str, ItemKind]] = []
    for u in units:
        if u.name in pinned:
            continue
        if u.name in params:
            items.append((u.name, ItemKind.WEIGHT))
        if u.name in elems:
            items.append((u.name, ItemKind.ACTIVATION))
    if max_age is None:
        max_age = max(MAX_AGE, len(items) // 2)
    low = ladder[-1]
    _check_feasible(budget, {u: (w_bits[u] if u in pinned else low) for u in params},
                    {u: (a_bits[u] if u in pinned else low) for u in a_bits}, config)

    if evaluator is None:
        widest = max((e for u in units for e in captured[u.name].elems_per_sample), default=1)
        chunk = int(min(config.runtime.batch_size, max(1, EVAL_CHUNK_ELEMS // max(widest, 1))))
        evaluator = ParamEvaluator(graph, model, data, config.runtime, samples=subset_size(mixed.subset, analysis, captured),
                                   seed=config.seed,
                                   batch_size=chunk, metric=metric or mixed.metric)
    quant = UnitQuantizers(analysis, captured, weights, config)
    role = {u.name: u.role.value for u in units}

    def layer(u: Unit, wb: int | None, ab: int) -> LayerPlan:
        wq = quant.weight(u.name, wb) if wb is not None else None
        return LayerPlan(unit=u.name, role=u.role.value, inputs=quant.acts(u.name, ab), weight=wq,
                         params=params.get(u.name, 0), act_elems=elems.get(u.name, 0))

    by_name = {u.name: u for u in units}
    layers = {u.name: layer(u, w_bits.get(u.name), a_bits[u.name]) for u in units}

    def current(kind: ItemKind, u: str) -> int:
        return w_bits[u] if kind is ItemKind.WEIGHT else a_bits[u]

    def next_bits(b: int) -> int | None:
        lower = [c for c in ladder if c < b]
        return lower[0] if lower else None

    def saved(kind: ItemKind, u: str, b: int, nb: int) -> float:
        if kind is ItemKind.WEIGHT:
            return params[u] * (b - nb) / sum(params.values())
        return elems[u] * (b - nb) / sum(elems.values())

    def measure(kind: ItemKind, u: str, nb: int) -> float:
        lp = layer(by_name[u], nb if kind is ItemKind.WEIGHT else w_bits.get(u),
                   nb if kind is ItemKind.ACTIVATION else a_bits[u])
        trial = dict(layers)
        trial[u] = lp
        return evaluator.distance(trial)

    def done() -> bool:
        return budget.w_met(w_bits) and budget.a_met(a_bits)

    quiet = not progress or os.environ.get("ONNX_MPTQ_NO_PROGRESS", "") == "1"
    est_steps = _estimate_steps(items, ladder, budget)
    bar = tqdm(total=len(items) + 1 + int(1.5 * est_steps), desc="mixed precision", unit="eval", disable=quiet,
               leave=False)
    gap0 = _gap(budget, w_bits, a_bits)

    def tick(n: int = 1) -> None:
        bar.update(n)

    set_base = getattr(evaluator, "set_base", None)
    if set_base is not None:
        set_base(layers)
    base = evaluator.distance(layers)
    tick()
    cur = base
    entries: dict[tuple[str, ItemKind], _Entry] = {}
    table: list[Sensitivity] = []
    for u, kind in items:
        b = current(kind, u)
        nb = next_bits(b)
        if nb is None:
            continue
        k = measure(kind, u, nb)
        tick()
        s = saved(kind, u, b, nb)
        e = _Entry((k - base) / s, k - base, 0, nb, k)
        entries[(u, kind)] = e
        table.append(Sensitivity(u, role[u], kind, b, nb, k - base, s, e.score))

    heap = [(e.score, i, key) for i, (key, e) in enumerate(entries.items())]
    heapq.heapify(heap)
    counter = len(heap)
    step = 0
    exact_at = 0  # the step whose assignment cur was measured on
    history: list[AllocationStep] = []
    while not done():
        w_ok, a_ok = budget.w_met(w_bits), budget.a_met(a_bits)
        if not heap:  # cannot happen after the feasibility check; guards against an endless loop
            raise ConfigError("mixed precision: no item left to lower before the budget was met")
        score, _, key = heapq.heappop(heap)
        u, kind = key
        e = entries.get(key)
        if e is None or e.score != score:
            continue  # a superseded heap record
        if (kind is ItemKind.WEIGHT and w_ok) or (kind is ItemKind.ACTIVATION and a_ok):
            del entries[key]  # that bound is met: the item is not needed any more
            continue
        b = current(kind, u)
        if e.measured < 0 or step - e.measured > max_age:
            if step - exact_at > max_age:
                cur, exact_at = evaluator.distance(layers), step
                tick()
            k = measure(kind, u, e.to_bits)
            tick()
            s = saved(kind, u, b, e.to_bits)
            ne = _Entry((k - cur) / s, k - cur, step, e.to_bits, k)
            entries[key] = ne
            heapq.heappush(heap, (ne.score, counter, key))
            counter += 1
            continue
        # lower the item
        nb = e.to_bits
        if kind is ItemKind.WEIGHT:
            w_bits[u] = nb
        else:
            a_bits[u] = nb
        layers[u] = layer(by_name[u], w_bits.get(u), a_bits[u])
        if set_base is not None:
            set_base(layers)
        age = step - e.measured
        step += 1
        exact = age == 0 and exact_at == step - 1
        if exact:
            cur, exact_at = e.trial, step  # measured on exactly this assignment
        else:
            cur = max(cur + e.delta, 0.0)
        history.append(AllocationStep(step, u, kind, b, nb, e.delta, age, cur, exact, budget.avg_w(w_bits),
                                      budget.avg_a(a_bits)))
        log.debug("step %d: %s %s %d -> %d (dKL %.3g, age %d)", step, u, kind.value, b, nb, e.delta, age)
        done_frac = 1.0 - _gap(budget, w_bits, a_bits) / gap0 if gap0 > 0 else 1.0
        if done_frac > 0.05:  # re-estimate the evaluations still to come from the pace so far
            per_step = (bar.n - len(items) - 1) / step
            bar.total = max(bar.n + 1, int(bar.n + per_step * step * (1.0 - done_frac) / done_frac) + 1)
        del entries[key]
        nnb = next_bits(nb)
        if nnb is not None:
            # first guess for the next rung, from this one (noise power ~ 4^-bits); measured when it comes up
            est = max(e.delta, 0.0) * (4.0 ** -nnb - 4.0 ** -nb) / (4.0 ** -nb - 4.0 ** -b)
            ne = _Entry(est / saved(kind, u, nb, nnb), est, -1, nnb, math.nan)
            entries[key] = ne
            heapq.heappush(heap, (ne.score, counter, key))
            counter += 1
    final = evaluator.distance(layers) if history else base
    tick()
    bar.close()

    sens = SensitivityTable(model_digest=analysis.model_digest, metric=str(evaluator.metric), samples=int(evaluator.samples),
                            base=float(base), entries=tuple(table))
    ub = tuple(UnitBits(u.name, u.role.value, w_bits.get(u.name), a_bits[u.name], u.name in pinned,
                        params.get(u.name, 0), elems.get(u.name, 0)) for u in units)
    res = AllocationResult(
        model_digest=analysis.model_digest, target_bits=mixed.target_bits, target_size_mb=mixed.target_size_mb,
        candidates=tuple(ladder), units=ub, avg_weight_bits=budget.avg_w(w_bits), avg_activation_bits=budget.avg_a(a_bits),
        size_mb=budget.size_mb(w_bits), distance=float(final), sensitivity=sens, history=tuple(history),
        evaluations=int(evaluator.evaluations), seconds=time.perf_counter() - t_start,
        eval_seconds=float(evaluator.seconds))
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


def _estimate_steps(items, ladder, budget: _Budget) -> int:
    """A first guess of the number of greedy steps (for the progress bar, refined as it runs)."""
    if budget.target_bits is None:
        return max(len(items) // 2, 1)
    rungs = [b for b in ladder if b >= budget.target_bits]
    return len(items) * max(len(rungs) - 1, 1)
