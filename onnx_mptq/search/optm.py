"""OPT-m's network-level choice: where a twin-region quantizer really helps the model.

The scale search (:mod:`onnx_mptq.search.scales`) searches, for every eligible operand (an fc2
input behind a GELU, the probabilities of ``P @ V``), a uniform quantizer and a twin-region one,
each minimising that layer's output error on the captured inputs. A lower layer error does not
always mean a closer network: on ``../shared/data/mnist-vit`` at W4A4 the per-layer rule took 11
twin quantizers and lost 0.13 points of top-1 agreement to all-uniform (BENCHMARKS.md section 3),
and each twin quantizer costs a second integer matmul at run time.

:func:`select_twins` decides per operand on the whole network instead. On a seeded calibration
subset (``quant.optm.subset`` samples, by default sized by compute like mixed precision's; :class:`onnx_mptq.evaluate.evaluator.ParamEvaluator`,
one ORT session whose quantization parameters are inputs, nothing rebuilt) it measures the
quantized logits ``z_q`` against the FP32 ones ``z`` by two distances::

    nmse = sum (z - z_q)^2 / sum z^2            (10^(-SQNR / 10))
    kl   = mean KL(softmax(z) || softmax(z_q))

Starting from every eligible operand uniform, it first tries the layer-wise choice as a whole,
then visits the operands in order of their layer-level gain (largest ``error_uniform -
error_twin`` first), switching one operand at a time. A switch is kept only where it lowers
**both** mean distances and the mean per-sample decrease of ``err / nmse_U + kl / kl_U`` (``_U``:
all-uniform) clears ``z_family`` standard errors: a trade of logit error for a worse class
distribution (or the reverse) is not a gain, and a change inside the subset's noise is not
worth the twin's extra elementwise work (or, outside the uint8 lattice, a second matmul).
``z_family`` is ``quant.optm.z`` (default 2) corrected for the number of comparisons made
(Bonferroni, :func:`onnx_mptq.numerics.metrics.family_z`: 3.1 for DeiT-S's 24 operands): with
many operands each tested at z = 2, one of them passing by chance is likely, and measured on a
random-weight DeiT-S at W4A4 such a pass (one fc2 twin, z between 2 and 3 on the 64 calibration
images) lowered agreement, SQNR and KL on the held-out images. The result can only be at least
as close to FP32 on the subset as all-uniform. Each decision and its measurements are recorded
in the plan's ``notes`` (``optm-net: ...``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx
from tqdm import tqdm

from ..config import Config
from ..errors import CalibrationError, PlanError
from ..graph.analysis import ModelAnalysis
from ..numerics.metrics import family_z, kl_per_sample, paired_improvement
from ..plan import LayerPlan, QuantPlan, average_bits
from .scales import TwinOption

if TYPE_CHECKING:
    from ..calibrate.capture import CapturedInputs

log = logging.getLogger(__name__)

class LogitSource(Protocol):
    """What :func:`select_twins` needs of an evaluator (``ParamEvaluator`` has it)."""

    reference_logits: np.ndarray
    samples: int

    def logits(self, layers: Mapping[str, LayerPlan]) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Measure:
    """Per-sample distances of one assignment's logits from FP32 on the subset."""

    err: np.ndarray  # (n,) squared logit error of each sample / the mean squared FP32 logit norm
    kl: np.ndarray  # (n,) KL(softmax(z) || softmax(z_q)) of each sample

    @property
    def nmse(self) -> float:
        return float(np.mean(self.err))

    @property
    def mean_kl(self) -> float:
        return float(np.mean(self.kl))


@dataclasses.dataclass(frozen=True)
class TwinDecision:
    unit: str
    kind: str  # "gelu" | "softmax"
    chosen: bool  # the plan holds the twin quantizer
    layer_error_uniform: float
    layer_error_twin: float

    def note(self) -> str:
        return (f"optm {self.unit}: {'twin' if self.chosen else 'uniform'} ({self.kind} operand); layer output error "
                f"uniform {self.layer_error_uniform:.6g}, twin {self.layer_error_twin:.6g}")


@dataclasses.dataclass(frozen=True)
class TwinStep:
    """One network-level comparison: ``units`` switched to ``to``, kept or not."""

    units: tuple[str, ...]
    to: str  # "layer-wise" | "twin" | "uniform"
    nmse: float  # of the trial assignment
    kl: float
    gain: float  # mean per-sample decrease of the score (see the module docstring)
    stderr: float
    kept: bool

    def note(self) -> str:
        what = "the layer-wise OPT-m choice" if self.to == "layer-wise" else f"{self.units[0]} -> {self.to}"
        return (f"optm-net: {what} {'kept' if self.kept else 'not kept'} (logit nmse {self.nmse:.6g}, KL {self.kl:.6g}, "
                f"score gain {self.gain:.4g} +- {self.stderr:.3g})")


@dataclasses.dataclass(frozen=True)
class TwinSelection:
    plan: QuantPlan
    decisions: tuple[TwinDecision, ...]
    steps: tuple[TwinStep, ...]
    samples: int
    nmse_uniform: float  # every eligible operand uniform
    kl_uniform: float
    nmse: float  # the chosen assignment
    kl: float
    evaluations: int
    seconds: float
    z: float = 2.0  # quant.optm.z, per comparison
    z_family: float = 2.0  # the threshold applied: z corrected for the comparisons made

    @property
    def twins(self) -> int:
        return sum(1 for d in self.decisions if d.chosen)


def measure_logits(ref: np.ndarray, out: np.ndarray) -> Measure:
    """Per-sample distances of ``out`` from ``ref`` (both (n, classes))."""
    ref = np.asarray(ref, dtype=np.float64).reshape(ref.shape[0], -1)
    out = np.asarray(out, dtype=np.float64).reshape(ref.shape[0], -1)
    power = max(float(np.mean(np.sum(ref * ref, axis=1))), 1e-30)
    err = np.sum(np.square(ref - out), axis=1) / power
    kl = kl_per_sample(ref, out)
    if not (np.all(np.isfinite(err)) and np.all(np.isfinite(kl))):
        raise CalibrationError("the quantized model produced non-finite logits while choosing OPT-m quantizers")
    return Measure(err, kl)


def significant_gain(before: Measure, after: Measure, uniform: Measure, z: float) -> tuple[bool, float, float]:
    """Whether ``after`` is closer to FP32 than ``before`` beyond the subset's noise: the mean
    per-sample decrease of ``err / nmse_U + kl / kl_U`` exceeds ``z`` standard errors and
    neither mean distance grows. Returns (verdict, gain, standard error)."""
    nu = max(uniform.nmse, 1e-30)
    ku = max(uniform.mean_kl, 1e-30)
    gain, se = paired_improvement(before.err / nu + before.kl / ku, after.err / nu + after.kl / ku)
    ok = gain > z * se and after.nmse <= before.nmse and after.mean_kl <= before.mean_kl
    return bool(ok), gain, se


def make_evaluator(model: onnx.ModelProto, analysis: ModelAnalysis, captured: "CapturedInputs", data: Any,
                   config: Config) -> Any:
    """OPT-m's evaluator: :func:`onnx_mptq.evaluate.factory.make_evaluator` on
    ``config.quant.optm.subset`` calibration samples (None: sized by compute,
    :func:`onnx_mptq.evaluate.factory.subset_size`), measuring logit nmse (and KL from the logits)."""
    from ..evaluate.factory import make_evaluator as _make

    return _make(model, analysis, captured, data, config, samples=config.quant.optm.subset, metric="nmse")


def select_twins(plan: QuantPlan, options: Mapping[str, TwinOption], evaluator: LogitSource, *,
                 z: float = 2.0, progress: bool = True) -> TwinSelection:
    """Choose uniform or twin per eligible operand of ``plan`` on the network (module docstring).

    ``options`` comes from :func:`onnx_mptq.search.scales.search_scales` (``twin_options``);
    ``evaluator`` gives the logits of an assignment and holds the FP32 ones. Returns ``plan``
    with the chosen layers (bits and averages unchanged: a twin quantizer has the uniform one's bits)."""
    t0 = time.perf_counter()
    layers = {lp.unit: lp for lp in plan.layers}
    for name, opt in options.items():
        if name not in layers:
            raise PlanError(f"OPT-m option for unit {name!r}, which the plan does not have")
        if opt.uniform.unit != name or opt.twin.unit != name:
            raise PlanError(f"OPT-m option for unit {name!r} holds layers of another unit")
    ref = np.asarray(evaluator.reference_logits)
    set_base = getattr(evaluator, "set_base", None)
    evaluations = 0

    def measure(assign: Mapping[str, LayerPlan]) -> Measure:
        nonlocal evaluations
        evaluations += 1
        return measure_logits(ref, np.asarray(evaluator.logits(assign)))

    uniform = dict(layers)
    layerwise = dict(layers)
    for name, opt in options.items():
        uniform[name] = opt.uniform
        layerwise[name] = opt.twin if opt.chosen == "twin" else opt.uniform
    if set_base is not None:
        set_base(uniform)
    uni = measure(uniform)
    cur, layers = uni, uniform
    steps: list[TwinStep] = []
    order = sorted(options.values(), key=lambda o: -(o.error_uniform - o.error_twin))
    zf = family_z(z, len(order) + (1 if layerwise != uniform else 0))
    quiet = not progress
    with tqdm(total=len(order) + 2, desc="OPT-m choice", unit="eval", disable=quiet, leave=False) as bar:
        bar.update()
        if layerwise != uniform:
            lw = measure(layerwise)
            ok, gain, se = significant_gain(uni, lw, uni, zf)
            steps.append(TwinStep(tuple(n for n in options if layerwise[n] is not uniform[n]), "layer-wise",
                                  lw.nmse, lw.mean_kl, gain, se, ok))
            if ok:
                cur, layers = lw, layerwise
                if set_base is not None:
                    set_base(layers)
        bar.update()
        for opt in order:
            trial = dict(layers)
            to_twin = layers[opt.unit] is not opt.twin
            trial[opt.unit] = opt.twin if to_twin else opt.uniform
            new = measure(trial)
            ok, gain, se = significant_gain(cur, new, uni, zf)
            steps.append(TwinStep((opt.unit,), "twin" if to_twin else "uniform", new.nmse, new.mean_kl, gain, se, ok))
            if ok:
                layers, cur = trial, new
                if set_base is not None:
                    set_base(layers)
            bar.update()
    decisions = tuple(TwinDecision(o.unit, o.kind, layers[o.unit] is o.twin, o.error_uniform, o.error_twin)
                      for o in (options[lp.unit] for lp in plan.layers if lp.unit in options))
    final = tuple(layers[lp.unit] for lp in plan.layers)
    avg_w, avg_a = average_bits(final)
    notes = tuple(n for n in plan.notes if not any(n.startswith(f"optm {u}:") for u in options))
    notes += tuple(d.note() for d in decisions) + tuple(st.note() for st in steps)
    out = dataclasses.replace(plan, layers=final, avg_weight_bits=avg_w, avg_activation_bits=avg_a, notes=notes)
    res = TwinSelection(out, decisions, tuple(steps), int(evaluator.samples), uni.nmse, uni.mean_kl, cur.nmse,
                        cur.mean_kl, evaluations, time.perf_counter() - t0, float(z), float(zf))
    log.info("OPT-m: %d of %d twin quantizers kept on the network (nmse %.4g -> %.4g, KL %.4g -> %.4g, %d evaluations, %.1f s)",
             res.twins, len(decisions), uni.nmse, cur.nmse, uni.mean_kl, cur.mean_kl, evaluations, res.seconds)
    return res


__all__ = ["LogitSource", "Measure", "TwinDecision", "TwinSelection", "TwinStep", "make_evaluator", "measure_logits",
           "select_twins", "significant_gain"]
