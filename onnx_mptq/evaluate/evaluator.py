"""Fast evaluation of bit assignments, and per-layer SQNR between two models (ORT side).

:class:`ParamEvaluator` holds ONE ONNX Runtime session of a parametric fake-quant graph
(:func:`onnx_mptq.evaluate.fakequant.build_param_graph`; or one session per stage of it, see the
class), a fixed calibration subset and the FP32 logits on it. ``distance(layers)`` feeds the
quantization parameters of a full assignment (one :class:`~onnx_mptq.plan.LayerPlan` per unit)
and returns how far the quantized logits ``z_q`` are from the FP32 ones ``z``::

    nmse = sum (z - z_q)^2 / sum z^2                                  (= 10^(-SQNR / 10))
    kl   = mean over subset samples of KL(softmax(z) || softmax(z_q))

No session is rebuilt between evaluations; weight feeds (int8 codes and steps in the integer
graph) are cached per ``(unit, weight quantizer)`` so an evaluation costs (at most) one forward
pass of the subset.

Subset: a uniform random sample (reservoir, seeded) of ``samples`` calibration samples, kept in
stream order, so a calibration set sorted by class still gives a mixed subset.

:func:`unit_output_sqnr` runs a reference and a quantized model on the same samples with the
given tensors (e.g. every unit's output) as extra outputs and returns
``10 log10(sum ref^2 / sum (ref - out)^2)`` per tensor.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ..calibrate.session import make_session
from ..config import RuntimeConfig
from ..errors import CalibrationError, DataError, PlanError
from ..graph.edit import produced_tensors, with_outputs
from ..numerics.metrics import kl_softmax
from ..plan import LayerPlan, WeightQuant
from .fakequant import ParamGraph, Stage, split_stages

log = logging.getLogger(__name__)

METRICS = ("kl", "nmse")
_MAX_WEIGHT_CACHE = 4096  # fake-quantized weight arrays kept (per unit and quantizer)


def _batch_inputs(batch, names: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The arrays of a Batch (or a dict of arrays), which must hold every input in ``names``."""
    inputs = getattr(batch, "inputs", batch)
    if not isinstance(inputs, Mapping):
        raise DataError(f"data must yield Batch objects or dicts of arrays, got {type(batch).__name__}")
    missing = [k for k in names if k not in inputs]
    if missing:
        raise DataError(f"{what} lacks model input(s) {', '.join(missing)}")
    return {k: np.asarray(v) for k, v in inputs.items()}


def sample_subset(data: Iterable, names: Sequence[str], samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A uniform random subset (reservoir, seeded) of at most ``samples`` samples of ``data``,
    in stream order: ``{input name: (n, ...)}``."""
    if samples < 1:
        raise CalibrationError(f"the sensitivity subset needs at least 1 sample, got {samples}")
    rng = np.random.default_rng([int(seed), 7013])
    kept: list[tuple[int, dict[str, np.ndarray]]] = []
    seen = 0
    for batch in data:
        feeds = _batch_inputs(batch, names, "calibration batch")
        n = int(feeds[names[0]].shape[0])
        for i in range(n):
            sample = {k: feeds[k][i:i + 1] for k in names}
            if seen < samples:
                kept.append((seen, sample))
            else:
                j = int(rng.integers(0, seen + 1))
                if j < samples:
                    kept[j] = (seen, sample)
            seen += 1
    if not kept:
        raise CalibrationError("calibration data yielded no samples")
    kept.sort(key=lambda p: p[0])
    return {k: np.concatenate([s[k] for _, s in kept]) for k in names}


def first_samples(data: Iterable, names: Sequence[str], samples: int) -> dict[str, np.ndarray]:
    """The first ``samples`` samples of ``data`` (stops reading there): ``{input name: (n, ...)}``."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    n = 0
    for batch in data:
        feeds = _batch_inputs(batch, names, "data batch")
        take = min(samples - n, int(feeds[names[0]].shape[0]))
        for k in names:
            parts[k].append(feeds[k][:take])
        n += take
        if n >= samples:
            break
    if n == 0:
        raise CalibrationError("the data yielded no samples")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _quiet(model: onnx.ModelProto, runtime: RuntimeConfig):
    """A session for a stage model. Stages recompute the constant (shape) computations they read,
    and ORT warns about every Constant it folds away there: only errors are logged meanwhile."""
    ort.set_default_logger_severity(3)
    try:
        return make_session(model, runtime)
    finally:
        ort.set_default_logger_severity(2)


def _first_output(outs: list[np.ndarray], n: int) -> np.ndarray:
    y = np.asarray(outs[0], dtype=np.float32)
    return y.reshape(n, -1)  # (n, classes)


class ParamEvaluator:
    """KL of a quantized assignment against FP32 on a calibration subset (module docstring).

    Staged evaluation (``staged=True``): the parametric graph is cut into stages
    (:func:`onnx_mptq.evaluate.fakequant.split_stages`, one session each, built once). The tensors
    at the cuts are cached for a *base* assignment (:meth:`set_base`); an evaluation that differs
    from the base only in later units starts from the first stage those units touch. Results are
    identical to a run of the whole graph."""

    def __init__(self, graph: ParamGraph, reference: onnx.ModelProto, data: Iterable, runtime: RuntimeConfig, *,
                 samples: int = 32, seed: int = 0, batch_size: int | None = None, staged: bool = True,
                 metric: str = "kl") -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.metric = metric
        self.graph = graph
        self.names = tuple(graph.data_inputs)
        self.inputs = sample_subset(data, self.names, samples, seed)
        self.samples = int(self.inputs[self.names[0]].shape[0])
        bs = batch_size or runtime.batch_size
        self._chunks = [(s, min(s + bs, self.samples)) for s in range(0, self.samples, bs)]
        ref = make_session(reference, runtime)
        self.reference_logits = self._run_whole(ref, {})
        if staged:
            self.stages = split_stages(graph)
        else:
            g = graph.model.graph
            params = tuple(i.name for i in g.input if i.name not in set(self.names))
            self.stages = (Stage(graph.model, self.names, params, tuple(o.name for o in g.output)),)
        self.sessions = [_quiet(st.model, runtime) for st in self.stages] if len(self.stages) > 1 else \
            [make_session(self.stages[0].model, runtime)]
        self.provider = self.sessions[0].provider
        first: dict[str, int] = {}
        for k, st in enumerate(self.stages):
            for p in st.params:
                first.setdefault(p, k)
        self._unit_stage: dict[str, int] = {}
        for s in graph.acts:
            for name in s.inputs:
                self._unit_stage[s.unit] = min(self._unit_stage.get(s.unit, len(self.stages)), first.get(name, len(self.stages)))
        for w in graph.weights:
            for name in (w.input, w.scale_input):
                if name is not None:
                    self._unit_stage[w.unit] = min(self._unit_stage.get(w.unit, len(self.stages)),
                                                   first.get(name, len(self.stages)))
        self._wcache: dict[tuple[str, WeightQuant], dict[str, np.ndarray]] = {}
        self._base: dict[str, LayerPlan] | None = None
        self._base_feeds: dict[str, np.ndarray] = {}
        self._cuts: list[list[dict[str, np.ndarray]] | None] = [None] * (len(self.stages) + 1)
        self._valid = 0  # cuts[0 .. valid-1] hold the base assignment's values
        self._trial: tuple[dict[str, LayerPlan], int, list] | None = None
        self.evaluations = 0
        self.seconds = 0.0

    # plumbing ------------------------------------------------------------------------------------
    def _run_whole(self, session, params: Mapping[str, np.ndarray]) -> np.ndarray:
        outs = []
        for a, b in self._chunks:
            feeds = {k: v[a:b] for k, v in self.inputs.items()}
            feeds.update(params)
            outs.append(_first_output(session.run(feeds, session.output_names[:1]), b - a))
        return np.concatenate(outs)  # (samples, classes)

    def unit_feeds(self, lp: LayerPlan) -> dict[str, np.ndarray]:
        """Parameter feeds of one unit (weight feeds cached per quantizer)."""
        g = self.graph
        out = g.act_feeds(lp)
        if lp.weight is not None or g.weight_slot(lp.unit) is not None:
            key = (lp.unit, lp.weight)
            wf = self._wcache.get(key)  # type: ignore[arg-type]
            if wf is None:
                wf = g.weight_feeds(lp)
                if len(self._wcache) >= _MAX_WEIGHT_CACHE:
                    self._wcache.pop(next(iter(self._wcache)))
                self._wcache[key] = wf  # type: ignore[index]
            out.update(wf)
        return out

    def feeds(self, layers: Mapping[str, LayerPlan]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for unit in self.graph.units:
            lp = layers.get(unit)
            if lp is None:
                raise PlanError(f"no quantizer for unit {unit!r}")
            out.update(self.unit_feeds(lp))
        return out

    def _run_stage(self, k: int, cut: list[dict[str, np.ndarray]], params: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        st, sess = self.stages[k], self.sessions[k]
        out = []
        for c, (a, b) in enumerate(self._chunks):
            feeds = {t: (cut[c][t] if t in cut[c] else self.inputs[t][a:b]) for t in st.inputs}
            feeds.update({p: params[p] for p in st.params})
            vals = sess.run(feeds, st.outputs)
            out.append(dict(zip(st.outputs, vals)))
        return out

    def _diff(self, layers: Mapping[str, LayerPlan]) -> dict[str, LayerPlan]:
        base = self._base or {}
        diff = {}
        for unit in self.graph.units:
            lp = layers.get(unit)
            if lp is None:
                raise PlanError(f"no quantizer for unit {unit!r}")
            old = base.get(unit)
            if old is not lp and old != lp:
                diff[unit] = lp
        return diff

    def _extend(self, upto: int) -> None:
        """Make cuts[0 .. upto] hold the base assignment's values."""
        if self._valid == 0:
            self._cuts[0] = [{} for _ in self._chunks]
            self._valid = 1
        while self._valid <= upto:
            k = self._valid - 1
            self._cuts[k + 1] = self._run_stage(k, self._cuts[k], self._base_feeds)  # type: ignore[arg-type]
            self._valid += 1

    # API -----------------------------------------------------------------------------------------
    def set_base(self, layers: Mapping[str, LayerPlan]) -> None:
        """Make ``layers`` the assignment later evaluations are compared with (cut tensors of the
        unchanged leading stages, and of the last evaluation when it equals ``layers``, are kept)."""
        if self._base is None:
            self._base = {u: layers[u] for u in self.graph.units}
            self._base_feeds = self.feeds(self._base)
            self._valid = 0
            return
        diff = self._diff(layers)
        if not diff:
            return
        for u, lp in diff.items():
            self._base_feeds.update(self.unit_feeds(lp))
            self._base[u] = lp
        trial = self._trial
        j = min(self._unit_stage.get(u, 0) for u in diff)
        if trial is not None and trial[0].keys() == diff.keys() and all(trial[0][u] == diff[u] for u in diff) \
                and self._valid > trial[1]:
            for k, cut in enumerate(trial[2]):
                self._cuts[trial[1] + 1 + k] = cut
            self._valid = len(self.stages) + 1
        else:
            self._valid = min(self._valid, j + 1)
        self._trial = None

    def logits(self, layers: Mapping[str, LayerPlan]) -> np.ndarray:
        """Quantized logits (samples, classes) of the assignment ``layers`` (unit -> LayerPlan)."""
        t = time.perf_counter()
        if self._base is None:
            self.set_base(layers)
        diff = self._diff(layers)
        n = len(self.stages)
        if not diff:
            self._extend(n)
            y = self._cuts[n]
        else:
            j = min(self._unit_stage.get(u, 0) for u in diff)
            self._extend(j)
            params = dict(self._base_feeds)
            for lp in diff.values():
                params.update(self.unit_feeds(lp))
            cut = self._cuts[j]
            made = []
            for k in range(j, n):
                cut = self._run_stage(k, cut, params)  # type: ignore[arg-type]
                made.append(cut)
            self._trial = (diff, j, made)
            y = cut
        first = self.stages[-1].outputs[0]
        out = np.concatenate([_first_output([c[first]], b - a) for c, (a, b) in zip(y, self._chunks)])  # type: ignore[union-attr]
        self.evaluations += 1
        self.seconds += time.perf_counter() - t
        return out

    def kl(self, layers: Mapping[str, LayerPlan]) -> float:
        """Mean KL(softmax(FP32) || softmax(quantized)) over the subset."""
        return self.distance(layers, "kl")

    def distance(self, layers: Mapping[str, LayerPlan], metric: str | None = None) -> float:
        """How far the assignment's logits are from FP32 on the subset, by ``metric`` (default
        ``self.metric``): ``"kl"`` mean KL of the softmaxes, ``"nmse"`` the noise-to-signal ratio
        ``sum (ref - out)^2 / sum ref^2`` of the logits (``10^(-SQNR / 10)``)."""
        metric = metric or self.metric
        out = self.logits(layers)
        ref = self.reference_logits
        if metric == "kl":
            v = kl_softmax(ref, out)
        elif metric == "nmse":
            v = float(np.sum(np.square(ref - out, dtype=np.float64)) / max(np.sum(np.square(ref, dtype=np.float64)), 1e-30))
        else:
            raise ValueError(f"metric must be 'kl' or 'nmse', got {metric!r}")
        if not math.isfinite(v):
            raise CalibrationError("the quantized model produced non-finite logits during the sensitivity search")
        return float(v)


# ---------------------------------------------------------------------------------------------
# per-layer SQNR


def unit_output_sqnr(reference: onnx.ModelProto, quantized: onnx.ModelProto, tensors: Sequence[str],
                     inputs: Mapping[str, np.ndarray], runtime: RuntimeConfig,
                     batch_size: int | None = None) -> dict[str, float]:
    """SQNR (dB) of each tensor of ``quantized`` against the same-named tensor of ``reference``
    on ``inputs`` ({input: (n, ...)}); tensors missing from either model are left out."""
    def produced(m: onnx.ModelProto) -> set[str]:
        return produced_tensors(m, inputs=False) | {o.name for o in m.graph.output}

    names = [t for t in dict.fromkeys(tensors) if t in produced(reference) and t in produced(quantized)]
    if not names:
        return {}
    rs = make_session(with_outputs(reference, names), runtime)
    qs = make_session(with_outputs(quantized, names), runtime)
    n = int(next(iter(inputs.values())).shape[0])
    bs = batch_size or runtime.batch_size
    sig = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for a in range(0, n, bs):
        feeds = {k: v[a:a + bs] for k, v in inputs.items()}
        r = rs.run({k: feeds[k] for k in rs.input_names}, names)
        q = qs.run({k: feeds[k] for k in qs.input_names}, names)
        for name, rv, qv in zip(names, r, q):
            rv = np.asarray(rv, dtype=np.float64)
            qv = np.asarray(qv, dtype=np.float64)
            if rv.shape != qv.shape:
                continue
            sig[name] += float(np.sum(rv * rv))
            noise[name] += float(np.sum((rv - qv) ** 2))
    out = {}
    for name in names:
        if noise[name] == 0.0:
            out[name] = float("inf")
        elif sig[name] == 0.0:
            out[name] = float("-inf")
        else:
            out[name] = 10.0 * math.log10(sig[name] / noise[name])
    return out


__all__ = ["ParamEvaluator", "first_samples", "sample_subset", "unit_output_sqnr"]
