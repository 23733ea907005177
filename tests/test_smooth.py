"""SQ-b (passes/smooth.py) and per-channel calibration statistics (calibrate/stats.py).

Every case checks numerical invariance in ONNX Runtime with graph optimizations off and on,
idempotence (a second application is a no-op), node counts and the conditioning of the shifted
LayerNorm outputs.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import tiny_vit
from onnx_mptq.calibrate.session import make_session
from onnx_mptq.calibrate.stats import CalibrationStats, _with_outputs, collect_channel_stats
from onnx_mptq.config import FoldFallback, Providers, RuntimeConfig, ShiftMode, SmoothConfig
from onnx_mptq.errors import CalibrationError, PlanError
from onnx_mptq.graph.analysis import analyze
from onnx_mptq.graph.io import graph_digest, load_model
from onnx_mptq.passes import SMOOTHED_KEY, SmoothReport, apply_smoothing, plan_smoothing, smoothed_layernorms
from onnx_mptq.passes.smooth import ALREADY_SMOOTHED, DISABLED, alpha_search_error
from onnx_mptq.plan import FoldMode, SmoothingPlan

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST = SHARED / "mnist-vit"
CIFAR = SHARED / "cifar10-vit"
RT = RuntimeConfig(providers=Providers.CPU, threads=1)
TOL = 1e-4  # relative max abs difference (max |ref - out| / max |ref|)
B, T, C, N = 8, 6, 16, 12


def _unpack(res):
    """(model, report) of a SmoothingResult."""
    return res.model, res.report


# ---------------------------------------------------------------------------------------------
# tiny graphs


class _G:
    """Builds a small graph around an input x (N, T, C) with seeded initializers."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[str] = []
        self.k = 0

    def name(self, p: str) -> str:
        self.k += 1
        return f"{p}{self.k}"

    def init(self, arr: np.ndarray, name: str | None = None) -> str:
        name = name or self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower() + "_out")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def layernorm(self, x: str, form: str = "op", gamma: str | None = None, beta: str | None = None) -> str:
        gamma = gamma or self.init(1.0 + 0.3 * self.rng.standard_normal(C))
        beta = beta or self.init(1.5 * self.rng.standard_normal(C))  # large per-channel means
        if form == "op":
            return self.node("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)
        mean = self.node("ReduceMean", [x], axes=[-1])
        d = self.node("Sub", [x, mean])
        var = self.node("ReduceMean", [self.node("Pow", [d, self.init(2.0)])], axes=[-1])
        den = self.node("Sqrt", [self.node("Add", [var, self.init(1e-5)])])
        return self.node("Add", [self.node("Mul", [self.node("Div", [d, den]), gamma]), beta])

    def weight(self, k: int, n: int) -> np.ndarray:
        w = 0.3 * self.rng.standard_normal((k, n))
        w[3] *= 8.0  # an outlier input channel
        return w

    def linear(self, y: str, kind: str = "matmul_bias", w: str | None = None) -> str:
        if kind in ("gemm", "gemm_noc"):
            shape = self.name("shape")
            self.inits.append(numpy_helper.from_array(np.array([-1, C], dtype=np.int64), shape))
            y2 = self.node("Reshape", [y, shape])
            ins = [y2, self.init(self.weight(C, N).T)]  # stored (N, C), transB=1
            if kind == "gemm":
                ins.append(self.init(0.1 * self.rng.standard_normal(N)))
            return self.node("Gemm", ins, transB=1, alpha=1.5, beta=0.5)
        if kind == "transposed":  # weight stored (N, C) behind a Transpose node
            wt = self.node("Transpose", [self.init(self.weight(C, N).T)], perm=[1, 0])
            return self.node("Add", [self.node("MatMul", [y, wt]), self.init(0.1 * self.rng.standard_normal(N))])
        w = w or self.init(self.weight(C, N))
        h = self.node("MatMul", [y, w])
        if kind == "matmul_bias":
            h = self.node("Add", [self.init(0.1 * self.rng.standard_normal(N)), h])
        return h

    def attention(self, q: str, k: str, v: str) -> str:
        s = self.node("MatMul", [q, self.node("Transpose", [k], perm=[0, 2, 1])])
        return self.node("MatMul", [self.node("Softmax", [s], axis=-1), v])

    def model(self, opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, C])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in self.outputs], self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(m)
        types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for o in m.graph.output:
            o.type.CopyFrom(types[o.name])
        onnx.checker.check_model(m)
        return m


def one_linear(kind: str, form: str = "op") -> onnx.ModelProto:
    """x -> LN -> one Linear; plus an attention on x so that the graph is a transformer."""
    g = _G()
    g.outputs.append(g.linear(g.layernorm("x", form), kind))
    g.outputs.append(g.attention("x", "x", "x"))
    return g.model(17 if form == "op" else 14)


def qkv_fanout(form: str = "op", ln_graph_output: bool = False) -> onnx.ModelProto:
    g = _G(1)
    y = g.layernorm("x", form)
    q, k, v = g.linear(y), g.linear(y, "matmul"), g.linear(y)
    g.outputs.append(g.attention(q, k, v))
    if ln_graph_output:
        g.outputs.append(y)
    return g.model(17 if form == "op" else 14)


def shared_constants() -> onnx.ModelProto:
    """Two LNs sharing gamma/beta initializers and Linears sharing a zero bias via Identity, as
    deduplicating exporters write them."""
    g = _G(2)
    gamma, beta = g.init(1.0 + 0.3 * g.rng.standard_normal(C)), g.init(1.5 * g.rng.standard_normal(C))
    zero = g.node("Identity", [g.init(np.zeros(N))])
    for x in ("x", g.node("Mul", ["x", g.init(2.0)])):
        y = g.layernorm(x, "op", gamma, beta)
        g.outputs.append(g.node("Add", [g.linear(y, "matmul"), zero]))
    g.outputs.append(g.attention("x", "x", "x"))
    return g.model()


def shared_weight() -> onnx.ModelProto:
    g = _G(3)
    w = g.init(g.weight(C, N))
    g.outputs.append(g.linear(g.layernorm("x"), "matmul_bias", w=w))
    g.outputs.append(g.node("MatMul", ["x", w]))  # the same weight outside the group
    g.outputs.append(g.attention("x", "x", "x"))
    return g.model()


def post_norm_residual() -> onnx.ModelProto:
    g = _G(4)
    y = g.layernorm("x")
    h = g.linear(y)
    h = g.node("MatMul", [g.node("Relu", [h]), g.init(0.3 * g.rng.standard_normal((N, C)))])
    g.outputs.append(g.node("Add", [y, h]))  # the residual reads the LN output
    g.outputs.append(g.attention("x", "x", "x"))
    return g.model()


def tiny_inputs(n: int = B, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.standard_normal(C))
    return (rng.standard_normal((n, T, C)) * scale + 2.0 * rng.standard_normal(C)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# harness


def batches(name: str, x: np.ndarray, size: int = 4) -> list[dict[str, np.ndarray]]:
    return [{name: x[i:i + size]} for i in range(0, len(x), size)]


def run_all(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool) -> list[np.ndarray]:
    return make_session(model, RT, optimize=optimize).run(feeds)


def rel_diff(model_a: onnx.ModelProto, model_b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """Worst relative max abs difference over all graph outputs, optimizations off and on."""
    worst = 0.0
    for opt in (False, True):
        for ra, rb in zip(run_all(model_a, feeds, opt), run_all(model_b, feeds, opt)):
            worst = max(worst, float(np.max(np.abs(ra - rb)) / max(float(np.max(np.abs(ra))), 1e-12)))
    return worst


def ln_stats(model: onnx.ModelProto, x: np.ndarray, all_lns: bool = False) -> CalibrationStats:
    a = analyze(model)
    tensors = [ln.output for ln in a.layernorms if ln.consumers or all_lns]
    return collect_channel_stats(model, tensors, batches(a.inputs[0], x), RT, progress=False)


@dataclasses.dataclass
class Smoothed:
    model: onnx.ModelProto
    plan: SmoothingPlan
    report: SmoothReport
    diff: float


def smooth_and_check(model: onnx.ModelProto, x: np.ndarray, cfg: SmoothConfig = SmoothConfig(), samples=None) -> Smoothed:
    """Plan + apply, then: invariance (ORT, optimizations off and on), checker, idempotence,
    conditioning after a mean shift, and that the user's proto is untouched."""
    original = model.SerializeToString()
    a = analyze(model)
    stats = ln_stats(model, x)
    plan = plan_smoothing(a, stats, model, cfg, graph_digest(model), samples=samples)
    out, report = _unpack(apply_smoothing(model, plan, a, stats))
    assert model.SerializeToString() == original
    onnx.checker.check_model(out)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert out.opset_import == model.opset_import
    diff = rel_diff(model, out, {a.inputs[0]: x})
    assert diff < TOL, diff
    smoothed = {n.layernorm for n in report.norms if n.mode is not FoldMode.SKIPPED}
    assert smoothed_layernorms(out) == smoothed
    for n in report.norms:
        if n.mode is not FoldMode.SKIPPED and cfg.shift is ShiftMode.MEAN:
            assert n.shift == "mean"
            assert n.after.mean_to_range < 1e-5 and n.before.mean_to_range > 1e-3, n

    # second application: same plan, and a fresh plan on the smoothed model -> no-op
    a2 = analyze(out)
    again, rep2 = _unpack(apply_smoothing(out, plan, a2))
    assert again.SerializeToString() == out.SerializeToString()
    assert not rep2.changed
    plan2 = plan_smoothing(a2, ln_stats(out, x, all_lns=True), out, cfg, graph_digest(out), samples=samples)
    assert all(sn.mode is FoldMode.SKIPPED for sn in plan2.norms)
    assert {sn.layernorm for sn in plan2.norms if sn.reason == ALREADY_SMOOTHED} == smoothed
    again, rep3 = _unpack(apply_smoothing(out, plan2, a2))
    assert again.SerializeToString() == out.SerializeToString()
    assert rep3.nodes_after == rep3.nodes_before == len(out.graph.node)
    return Smoothed(out, plan, report, diff)


# ---------------------------------------------------------------------------------------------
# one LN -> one Linear


@pytest.mark.parametrize("kind", ["matmul_bias", "matmul", "gemm", "gemm_noc", "transposed"])
@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_one_linear_folds_exactly(kind: str, form: str) -> None:
    model = one_linear(kind, form)
    s = smooth_and_check(model, tiny_inputs())
    (n,) = s.report.norms
    assert n.mode is FoldMode.FOLDED and n.reason is None and len(n.consumers) == 1
    added = 1 if kind == "matmul" else 0  # a MatMul without bias gets an Add; Gemm gets a C input
    assert s.report.nodes_after == s.report.nodes_before + added == len(s.model.graph.node)
    assert n.nodes_added == added
    ops = [nd.op_type for nd in s.model.graph.node]
    assert "Sub" not in ops or form == "decomposed"  # nothing explicit when folded
    inits = {i.name: numpy_helper.to_array(i) for i in s.model.graph.initializer}
    ln = s.report.norms[0].layernorm
    assert f"{ln}.sqb_gamma" in inits and f"{ln}.sqb_beta" in inits
    unit = n.consumers[0]
    w = inits[f"{unit}.sqb_weight"]
    if kind in ("gemm", "gemm_noc", "transposed"):
        assert w.shape == (N, C)  # the storage layout of the original constant is kept
    else:
        assert w.shape == (C, N)
    if kind == "transposed":
        assert "Transpose" in [nd.op_type for nd in s.model.graph.node if nd.output[0].startswith("transpose")]
    if kind == "gemm_noc":
        gemm = next(nd for nd in s.model.graph.node if nd.op_type == "Gemm")
        assert len(gemm.input) == 3 and gemm.input[2] == f"{unit}.sqb_bias"


def test_qkv_fanout_shares_one_shift_and_scale() -> None:
    model = qkv_fanout()
    s = smooth_and_check(model, tiny_inputs())
    (n,) = s.report.norms
    assert n.mode is FoldMode.FOLDED and len(n.consumers) == 3
    (sn,) = s.plan.norms
    assert len(sn.shift) == len(sn.scale) == C and all(e > 0 for e in sn.scale)
    # the scale uses the max over the rows of all three weights
    a = analyze(model)
    stats = ln_stats(model, tiny_inputs())
    st = stats.get(a.layernorms[0].output)
    mu = np.asarray(sn.shift)
    act = np.maximum(np.asarray(st.max) - mu, mu - np.asarray(st.min))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    rows = np.max([np.abs(inits[a.unit(c).weight]).max(axis=1) for c in n.consumers], axis=0)
    np.testing.assert_allclose(sn.scale, np.sqrt(act) / np.sqrt(rows), rtol=1e-5)
    # one bias Add was inserted for k (no bias); q and v reuse theirs
    assert s.report.nodes_after == s.report.nodes_before + 1


def test_decomposed_fanout_folds_into_mul_and_add() -> None:
    s = smooth_and_check(qkv_fanout("decomposed"), tiny_inputs())
    (n,) = s.report.norms
    assert n.mode is FoldMode.FOLDED
    assert s.report.nodes_after == s.report.nodes_before + 1


def test_shared_initializers_are_never_edited_in_place() -> None:
    model = shared_constants()
    before = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    s = smooth_and_check(model, tiny_inputs())
    assert [n.mode for n in s.report.norms] == [FoldMode.FOLDED, FoldMode.FOLDED]
    # the shared Identity of the zero bias is bypassed by both new biases and disappears; no Add inserted
    assert s.report.nodes_after == s.report.nodes_before - 1
    after = {i.name: numpy_helper.to_array(i) for i in s.model.graph.initializer}
    for name, arr in after.items():
        if name in before:
            np.testing.assert_array_equal(arr, before[name])
    gammas = [k for k in after if k.endswith(".sqb_gamma")]
    assert len(gammas) == 2 and not np.array_equal(after[gammas[0]], after[gammas[1]])


# ---------------------------------------------------------------------------------------------
# declines and explicit mode


def test_ln_graph_output_goes_explicit_and_keeps_its_values() -> None:
    model = qkv_fanout(ln_graph_output=True)
    s = smooth_and_check(model, tiny_inputs())
    (n,) = s.report.norms
    assert n.mode is FoldMode.EXPLICIT and n.reason == "its output is also a graph output"
    assert s.report.nodes_after == s.report.nodes_before + 2 + 1  # Sub, Mul (one pair) + k's bias Add
    ops = [nd.op_type for nd in s.model.graph.node]
    assert ops.count("Sub") == 1 and ops.count("Mul") == 1
    # skip fallback: nothing changes, same reason
    skip = smooth_and_check(model, tiny_inputs(), SmoothConfig(fallback=FoldFallback.SKIP))
    (n,) = skip.report.norms
    assert n.mode is FoldMode.SKIPPED and n.reason == "its output is also a graph output"
    assert skip.report.nodes_after == skip.report.nodes_before and skip.diff == 0.0


def test_weight_shared_outside_the_group_is_declined_but_exact() -> None:
    model = shared_weight()
    a = analyze(model)
    ln = a.layernorms[0]
    assert not ln.foldable and ln.reason.startswith("weight ") and "is shared with node" in ln.reason
    s = smooth_and_check(model, tiny_inputs())
    (n,) = s.report.norms
    assert n.mode is FoldMode.EXPLICIT and n.reason == ln.reason
    w = a.unit(ln.consumers[0]).weight
    orig = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}[w]
    new = {i.name: numpy_helper.to_array(i) for i in s.model.graph.initializer}
    np.testing.assert_array_equal(new[w], orig)  # the outside user keeps the original weight


def test_post_norm_residual_goes_explicit() -> None:
    s = smooth_and_check(post_norm_residual(), tiny_inputs())
    (n,) = s.report.norms
    assert n.mode is FoldMode.EXPLICIT and n.reason.startswith("its output also feeds the residual Add (Add ")
    assert n.nodes_added == 2


@pytest.mark.parametrize("ln", ["op", "decomposed"])
def test_tiny_vit_pre_and_post_norm(ln: str) -> None:
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    pre = smooth_and_check(tiny_vit(ln=ln, opset=17 if ln == "op" else 14), x)
    assert {n.mode for n in pre.report.norms} == {FoldMode.FOLDED}
    assert pre.report.nodes_after == pre.report.nodes_before
    post = smooth_and_check(tiny_vit(ln=ln, post_norm=True, act="relu", opset=17 if ln == "op" else 14), x)
    assert [n.mode for n in post.report.norms].count(FoldMode.EXPLICIT) == 3


def test_unnamed_nodes_are_named_consistently() -> None:
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    s = smooth_and_check(tiny_vit(name_nodes=False, qkv_bias=False), x)
    names = [nd.name for nd in s.model.graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_disabled_changes_nothing() -> None:
    model = qkv_fanout()
    s = smooth_and_check(model, tiny_inputs(), SmoothConfig(enabled=False))
    assert all(n.mode is FoldMode.SKIPPED and n.reason == DISABLED for n in s.report.norms)
    assert s.diff == 0.0 and not smoothed_layernorms(s.model)


# ---------------------------------------------------------------------------------------------
# shift modes, alpha search, records, errors


def test_midpoint_shift_centres_the_range() -> None:
    model = qkv_fanout()
    s = smooth_and_check(model, tiny_inputs(), SmoothConfig(shift=ShiftMode.MIDPOINT))
    (n,) = s.report.norms
    assert n.shift == "midpoint"
    st = ln_stats(model, tiny_inputs()).get(analyze(model).layernorms[0].output)
    mu, eps = np.asarray(s.plan.norms[0].shift), np.asarray(s.plan.norms[0].scale)
    lo, hi = (np.asarray(st.min) - mu) / eps, (np.asarray(st.max) - mu) / eps
    np.testing.assert_allclose(lo, -hi, rtol=1e-5, atol=1e-6)


def ln_samples(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    a = analyze(model)
    names = [ln.output for ln in a.layernorms if ln.consumers]
    outs = make_session(_with_outputs(model, names), RT).run({a.inputs[0]: x}, names)
    return {n: o.reshape(-1, o.shape[-1]) for n, o in zip(names, outs)}


def test_alpha_search_picks_the_grid_minimum() -> None:
    model, x = qkv_fanout(), tiny_inputs()
    cfg = SmoothConfig(alpha_search=True, alpha_grid=(0.2, 0.5, 0.8))
    samples = ln_samples(model, x)
    s = smooth_and_check(model, x, cfg, samples=samples)
    (sn,) = s.plan.norms
    assert sn.alpha in cfg.alpha_grid and s.report.norms[0].alpha == sn.alpha
    # the chosen alpha scores no worse than the others
    from onnx_mptq.numerics.smoothing import shifted_absmax, smoothing_factors, weight_absmax_rows

    a = analyze(model)
    st = ln_stats(model, x).get(a.layernorms[0].output)
    mu = np.asarray(sn.shift, dtype=np.float32)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ws = [inits[a.unit(c).weight] for c in sn.consumers]
    act, rows = shifted_absmax(st.min, st.max, mu), weight_absmax_rows(ws)
    y = next(iter(samples.values()))
    errs = {al: alpha_search_error(y, mu, smoothing_factors(act, rows, al), ws) for al in cfg.alpha_grid}
    assert errs[sn.alpha] == min(errs.values())
    with pytest.raises(CalibrationError, match="alpha_search needs captured samples"):
        plan_smoothing(a, ln_stats(model, x), model, cfg, graph_digest(model))


def test_plan_and_report_round_trip_json() -> None:
    s = smooth_and_check(post_norm_residual(), tiny_inputs())
    assert SmoothingPlan.from_json(s.plan.to_json()) == s.plan
    assert SmoothReport.from_json(s.report.to_json()) == s.report
    # an edited plan re-applies without recalibration
    out = apply_smoothing(post_norm_residual(), SmoothingPlan.from_json(s.plan.to_json()), analyze(post_norm_residual())).model
    assert graph_digest(out) == graph_digest(s.model)


def test_plan_errors() -> None:
    model, other, x = qkv_fanout(), one_linear("matmul_bias"), tiny_inputs()
    a = analyze(model)
    stats = ln_stats(model, x)
    plan = plan_smoothing(a, stats, model, SmoothConfig(), graph_digest(model))
    with pytest.raises(PlanError, match="analysis was made for another model"):
        apply_smoothing(other, plan, a)
    with pytest.raises(PlanError, match="statistics were collected on another model"):
        plan_smoothing(analyze(other), stats, other, SmoothConfig(), graph_digest(other))
    with pytest.raises(PlanError, match="plan was made for another model"):
        apply_smoothing(model, dataclasses.replace(plan, source_digest="0" * 16), a)
    bad = dataclasses.replace(plan, norms=(dataclasses.replace(plan.norms[0], scale=plan.norms[0].scale[:-1]),))
    with pytest.raises(PlanError, match=f"shift and scale need {C} values each"):
        apply_smoothing(model, bad, a)
    neg = dataclasses.replace(plan, norms=(dataclasses.replace(plan.norms[0], scale=(-1.0,) * C),))
    with pytest.raises(PlanError, match="scale must be finite and > 0"):
        apply_smoothing(model, neg, a)
    partial = dataclasses.replace(plan, norms=(dataclasses.replace(plan.norms[0], consumers=plan.norms[0].consumers[:1]),))
    with pytest.raises(PlanError, match="must smooth all its Linears"):
        apply_smoothing(model, partial, a)
    post = post_norm_residual()
    ap = analyze(post)
    pplan = plan_smoothing(ap, ln_stats(post, x), post, SmoothConfig(), graph_digest(post))
    forced = dataclasses.replace(pplan, norms=(dataclasses.replace(pplan.norms[0], mode=FoldMode.FOLDED),))
    with pytest.raises(PlanError, match="cannot be folded \\(its output also feeds the residual Add"):
        apply_smoothing(post, forced, ap)
    empty = dataclasses.replace(ln_stats(post, x), tensors=())
    with pytest.raises(CalibrationError, match="no calibration statistics for"):
        plan_smoothing(ap, empty, post, SmoothConfig(), graph_digest(post))


# ---------------------------------------------------------------------------------------------
# calibration statistics


def test_channel_stats_match_numpy_and_leave_the_model_alone() -> None:
    model, x = qkv_fanout(), tiny_inputs(10)
    original = model.SerializeToString()
    a = analyze(model)
    t = a.layernorms[0].output
    stats = collect_channel_stats(model, [t, "x"], batches("x", x, 3), RT, progress=True)
    assert model.SerializeToString() == original
    assert stats.model_digest == graph_digest(model) and stats.samples == 10
    ref = ln_samples(model, x)[t].astype(np.float64)  # (tokens, C)
    s = stats.get(t)
    assert s.channels == C and s.count == 10 * T
    np.testing.assert_allclose(s.mean, ref.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.min, ref.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(s.max, ref.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(s.absmax, np.abs(ref).max(axis=0), rtol=1e-6)
    xs = stats.get("x")
    np.testing.assert_allclose(xs.mean, x.reshape(-1, C).astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-6)
    assert CalibrationStats.from_json(stats.to_json()) == stats


def test_channel_stats_errors() -> None:
    model = qkv_fanout()
    t = analyze(model).layernorms[0].output
    with pytest.raises(CalibrationError, match="no samples"):
        collect_channel_stats(model, [t], [], RT, progress=False)
    x = tiny_inputs()
    x[2, 1, 5] = np.inf
    with pytest.raises(CalibrationError, match=f"tensor {t!r}: non-finite"):
        collect_channel_stats(model, [t], batches("x", x), RT, progress=False)
    with pytest.raises(CalibrationError, match="'nope' is not produced"):
        collect_channel_stats(model, ["nope"], batches("x", tiny_inputs()), RT, progress=False)


# ---------------------------------------------------------------------------------------------
# real models


def mnist_images(n: int = 64) -> np.ndarray:
    raw = gzip.open(MNIST / "t10k-images-idx3-ubyte.gz").read()
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    return ((x / 255.0 - 0.1307) / 0.3081).astype(np.float32)


def cifar_images(n: int = 64) -> np.ndarray:
    from PIL import Image

    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2023, 0.1994, 0.2010])
    with zipfile.ZipFile(CIFAR / "cifar10_test_jpg.zip") as z:
        names = sorted(nm for nm in z.namelist() if nm.endswith(".jpg"))
        picked = names[:: len(names) // n][:n]  # spread over the classes
        x = np.stack([np.asarray(Image.open(io.BytesIO(z.read(nm))).convert("RGB")) for nm in picked])
    return ((x / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)


@pytest.mark.shared
def test_mnist_vit_pre_norm_folds() -> None:
    path = MNIST / "vit_mnist_fp32.onnx"
    if not path.exists():
        pytest.skip("mnist-vit not available")
    s = smooth_and_check(load_model(path), mnist_images())
    assert {n.mode for n in s.report.norms} == {FoldMode.FOLDED} and len(s.report.norms) == 12
    assert s.report.nodes_after == s.report.nodes_before + 6  # the six bias-free qkv MatMuls get an Add
    print(f"mnist-vit SQ-b rel max abs diff {s.diff:.2e}")


@pytest.mark.shared
def test_cifar10_vit_post_norm_goes_explicit() -> None:
    path = CIFAR / "vit_cifar10_fp32.onnx"
    if not path.exists():
        pytest.skip("cifar10-vit not available")
    s = smooth_and_check(load_model(path), cifar_images())
    modes = [n.mode for n in s.report.norms]
    assert modes.count(FoldMode.EXPLICIT) == 11 and modes.count(FoldMode.FOLDED) == 1
    assert all(n.reason.startswith("its output also feeds the residual Add") for n in s.report.norms if n.mode is FoldMode.EXPLICIT)
    assert s.report.nodes_after == s.report.nodes_before + 2 * 11
    print(f"cifar10-vit SQ-b rel max abs diff {s.diff:.2e}")


# ---------------------------------------------------------------------------------------------
# random-init timm models


@pytest.mark.torch
@pytest.mark.parametrize("kind,opset", [
    pytest.param(k, o, marks=() if (k, o) in {("vit", 17), ("swin", 14)} else pytest.mark.slow)
    for o in (17, 14) for k in ("vit", "deit", "swin")])
def test_tiny_timm(kind: str, opset: int, tiny_onnx) -> None:
    model = load_model(tiny_onnx(kind, opset))
    img = 64 if kind == "swin" else 32
    x = np.random.default_rng(0).standard_normal((8, 3, img, img)).astype(np.float32)
    s = smooth_and_check(model, x)
    folded = [n for n in s.report.norms if n.mode is FoldMode.FOLDED]
    assert len(folded) >= 5 and not any(n.mode is FoldMode.EXPLICIT for n in s.report.norms)
    if kind == "swin":  # the window partition pads dynamically (by zero at this resolution)
        assert any(n.reason and n.reason.startswith("folded through Pad ") for n in folded)
    else:
        assert all(n.reason is None for n in folded)
    # no node added except a bias Add behind bias-free Linears (Swin's patch-merging reduction)
    assert s.report.nodes_after - s.report.nodes_before == sum(n.nodes_added for n in folded) <= 1
