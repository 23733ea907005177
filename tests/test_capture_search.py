"""Capture of unit inputs (bounded reservoirs, statistics) and the scale search (QuantPlan)."""

from __future__ import annotations

import dataclasses
import gzip
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import random_images, tiny_vit
from onnx_mptq.calibrate.capture import CaptureKind, Reservoir, capture_unit_inputs
from onnx_mptq.config import Config, OptmConfig, QuantConfig, RuntimeConfig, ScaleMethod, ScaleSearchConfig
from onnx_mptq.errors import CalibrationError, ConfigError
from onnx_mptq.graph.analysis import GELU_KINDS, Role, analyze
from onnx_mptq.plan import QuantPlan, Scheme
from onnx_mptq.numerics.conv import ConvGeometry, im2col
from onnx_mptq.numerics.quant import dequantized_bounds
from onnx_mptq.search.scales import layer_output_errors, search_scales

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-vit"
RT = RuntimeConfig(threads=1)
OPTM_NOTE = re.compile(r"optm (\S+): twin (\w+) m=\d+ delta1=\S+ (chosen|rejected) "
                       r"\(relative output error twin (\S+), uniform (\S+)\)")


def _batches(x: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{"input": x[i:i + size]} for i in range(0, len(x), size)]


def _cfg(bits: int = 4, method: str = "mse", optm: bool = True, **search) -> Config:
    return Config(quant=QuantConfig(w_bits=bits, a_bits=bits, search=ScaleSearchConfig(method=ScaleMethod(method), **search),
                                    optm=OptmConfig(enabled=optm)))


# ---------------------------------------------------------------------------------------------
# reservoir and capture properties


def test_reservoir_bounded_deterministic_and_uniform():
    sizes = np.random.default_rng(1).integers(0, 23, size=40)
    n_total = int(sizes.sum())

    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        res = Reservoir(25, np.random.default_rng(seed))
        start = 0
        for n in sizes:
            idx = np.arange(start, start + n, dtype=np.float32)
            res.add(idx[:, None], -idx)  # two arrays sampled jointly
            start += n
            assert res.data is None or res.data[0].shape[0] == min(25, res.seen)
        return res.data[0][:, 0], res.data[1]

    a, b = run(7)
    assert a.shape == (25,) and np.array_equal(b, -a)  # same slices for both arrays
    assert len(np.unique(a)) == 25
    a2, _ = run(7)
    assert np.array_equal(a, a2)
    assert not np.array_equal(np.sort(a), np.sort(run(8)[0]))
    # every index is kept with probability 25 / n_total
    counts = np.zeros(n_total)
    trials = 400
    for s in range(trials):
        counts[run(1000 + s)[0].astype(int)] += 1
    expected = trials * 25 / n_total
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < n_total + 6 * np.sqrt(2 * n_total), chi2  # df = n_total - 1, ~6 sigma


def test_capture_is_bounded_and_deterministic():
    model = tiny_vit(name_nodes=False)
    analysis = analyze(model)
    images = random_images(60, seed=3)
    cap = capture_unit_inputs(model, analysis, _batches(images, 7), RT, tokens_per_layer=50, attn_samples=3,
                              progress=False)
    assert cap.samples == 60 and cap.batches == 9
    assert set(cap.units) == {u.name for u in analysis.units}
    for u in analysis.units:
        c = cap[u.name]
        if c.kind is CaptureKind.LINEAR:
            assert c.rows.shape == (min(50, c.seen), u.in_features)
            assert c.seen % 60 == 0  # rows per sample x samples: tokens, or 1 for the head
        elif c.kind is CaptureKind.ATTENTION:
            assert c.pairs[0].shape[0] == c.pairs[1].shape[0] == 3 and c.seen == 60
            assert c.pairs[0].shape[-1] == c.pairs[1].shape[-2]
        else:
            assert c.kind is CaptureKind.CONV and c.images.shape == (8, 3, 8, 8)
        assert all(e > 0 for e in c.elems_per_sample)
    again = capture_unit_inputs(model, analysis, _batches(images, 7), RT, tokens_per_layer=50, attn_samples=3,
                                progress=False)
    other = capture_unit_inputs(model, analysis, _batches(images, 7), RT, tokens_per_layer=50, attn_samples=3,
                                seed=1, progress=False)
    fc1 = analysis.by_role(Role.FC1)[0].name
    for u in analysis.units:
        a, b = cap[u.name], again[u.name]
        for x, y in [(a.rows, b.rows), (a.images, b.images)] + list(zip(a.pairs or (), b.pairs or ())):
            assert (x is None and y is None) or np.array_equal(x, y)
    assert not np.array_equal(cap[fc1].rows, other[fc1].rows)


def test_statistics_and_percentiles_match_the_full_data():
    model = tiny_vit()
    analysis = analyze(model)
    images = random_images(40, seed=5)
    # tokens_per_layer above the token count: the rows are every token, in order
    cap = capture_unit_inputs(model, analysis, _batches(images, 8), RT, tokens_per_layer=10_000, tail=64,
                              value_samples=100_000, progress=False)
    unit = analysis.by_role(Role.FC2)[0]
    x = cap[unit.name].rows  # (40 * 5 tokens, 32)
    assert x.shape == (200, 32)
    st = cap.stats[unit.inputs[0]]
    assert st.count == x.size and st.min == float(x.min()) and st.max == float(x.max())
    for q in (0.0, 0.05, 1.0, 50.0, 99.0, 99.9, 100.0):
        assert st.percentile(q) == pytest.approx(float(np.percentile(x.astype(np.float64), q)), rel=1e-6, abs=1e-7)
    assert st.percentile(99.9, absolute=True) == pytest.approx(float(np.percentile(np.abs(x).astype(np.float64), 99.9)), rel=1e-6)
    # a small tail and sample: still exact in the tail, an estimate in the middle
    small = capture_unit_inputs(model, analysis, _batches(images, 8), RT, tokens_per_layer=16, tail=32,
                                value_samples=2000, progress=False)
    s2 = small.stats[unit.inputs[0]]
    assert s2.percentile(99.9) == pytest.approx(st.percentile(99.9), rel=1e-6)
    assert abs(s2.percentile(50.0) - st.percentile(50.0)) < 0.1 * float(np.std(x))


def test_capture_rejects_empty_data():
    model = tiny_vit()
    with pytest.raises(CalibrationError, match="no samples"):
        capture_unit_inputs(model, analyze(model), [], RT, progress=False)


def test_im2col_matches_onnxruntime_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 11, 10)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    attrs = dict(kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 2, 1], dilations=[2, 1])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    g = ConvGeometry(strides=(2, 3), pads=(1, 0, 2, 1), dilations=(2, 1))
    cols = im2col(x, (3, 2), g)  # (2 * OH * OW, 3 * 3 * 2)
    assert cols.dtype == np.float32 and cols.shape == (2 * y.shape[2] * y.shape[3], 3 * 3 * 2)
    out = (cols @ w.reshape(5, -1).T).reshape(2, y.shape[2], y.shape[3], 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# scale search on a tiny ViT (Conv patch embedding, Gemm transB head, unnamed nodes)


def test_tiny_plan_covers_units_round_trips_and_honours_bits():
    model = tiny_vit(name_nodes=False)
    analysis = analyze(model)
    cap = capture_unit_inputs(model, analysis, _batches(random_images(32, seed=2), 8), RT, progress=False)
    cfg = _cfg(4, grid_size=40)
    plan = search_scales(model, analysis, cap, cfg, source_digest="src", progress=False).plan
    assert [lp.unit for lp in plan.layers] == [u.name for u in analysis.units]
    assert QuantPlan.from_json(plan.to_json()) == plan
    assert search_scales(model, analysis, cap, cfg, source_digest="src", progress=False).plan.to_json() == plan.to_json()
    assert plan.model_digest == analysis.model_digest and plan.source_digest == "src"
    for u, lp in zip(analysis.units, plan.layers):
        assert lp.role == u.role.value
        assert [q.tensor for q in lp.inputs] == list(u.inputs)
        for q in lp.inputs:
            if q.scheme is Scheme.UNIFORM:  # the grid holds 0; its range is derived, not stored
                lo, hi = dequantized_bounds(q.params())
                assert lo <= 0.0 <= hi
                assert hi - lo == pytest.approx(q.scale * (2 ** q.bits - 1 - (q.symmetric)), rel=1e-6)
        if u.role in (Role.ATTN_QK, Role.ATTN_AV):
            assert lp.weight is None and lp.params == 0 and len(lp.inputs) == 2
        else:
            assert len(lp.weight.scales) == u.out_features and lp.weight.bits == 4
            assert lp.params == u.in_features * u.out_features
    conv = analysis.by_role(Role.PATCH_EMBED)[0]
    pe = plan.layer(conv.name)
    assert conv.op_type == "Conv" and pe.inputs[0].bits == 8 and pe.act_elems == 0
    assert plan.input_quant == pe.inputs[0] and plan.input_quant.tensor == "input"
    assert plan.avg_weight_bits == 4.0 and plan.avg_activation_bits == 4.0
    errs = layer_output_errors(model, analysis, cap, plan)
    assert list(errs) == [u.name for u in analysis.units] and all(0.0 <= e < 1.0 for e in errs.values())
    # per-unit bits: fc2 at 8/2 (a 2-bit input gets no twin quantizer), everything else at 4
    fc2 = analysis.by_role(Role.FC2)[0]
    mixed = search_scales(model, analysis, cap, cfg, bits={fc2.name: (8, 2)}, source_digest="src", progress=False).plan
    lp = mixed.layer(fc2.name)
    assert lp.w_bits == 8 and lp.a_bits == 2 and lp.inputs[0].scheme is Scheme.UNIFORM
    assert mixed.avg_weight_bits > 4.0 and mixed.avg_activation_bits < 4.0
    with pytest.raises(ConfigError, match="unknown unit"):
        search_scales(model, analysis, cap, cfg, bits={"nope": (4, 4)}, source_digest="src", progress=False)


def test_relu_inputs_stay_uniform():
    model = tiny_vit(act="relu")
    analysis = analyze(model)
    cap = capture_unit_inputs(model, analysis, _batches(random_images(16, seed=4), 8), RT, progress=False)
    plan = search_scales(model, analysis, cap, _cfg(4, grid_size=30), source_digest="s", progress=False).plan
    for u in analysis.by_role(Role.FC2):
        assert plan.layer(u.name).inputs[0].scheme is Scheme.UNIFORM
        assert not any(n.startswith(f"optm {u.name}:") for n in plan.notes)


# ---------------------------------------------------------------------------------------------
# the real MNIST ViT


@pytest.fixture(scope="module")
def mnist():
    model_path = MNIST / "vit_mnist_fp32.onnx"
    images_path = MNIST / "t10k-images-idx3-ubyte.gz"
    if not model_path.exists() or not images_path.exists():
        pytest.skip("the real MNIST ViT is not available")
    raw = np.frombuffer(gzip.open(images_path).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:128]
    x = ((raw / 255.0 - 0.1307) / 0.3081).astype(np.float32)
    model = onnx.load(str(model_path))
    analysis = analyze(model)
    cap = capture_unit_inputs(model, analysis, _batches(x, 32), RT, tokens_per_layer=1024, progress=False)
    plan = search_scales(model, analysis, cap, _cfg(4), source_digest="mnist", progress=False).plan
    return model, analysis, cap, plan



@pytest.mark.shared
def test_mnist_plan_covers_every_unit(mnist):
    model, analysis, cap, plan = mnist
    assert cap.samples == 128
    assert [lp.unit for lp in plan.layers] == [u.name for u in analysis.units]
    assert QuantPlan.from_json(plan.to_json()) == plan
    assert plan.avg_weight_bits == 4.0 and plan.avg_activation_bits == 4.0
    assert plan.input_quant is not None and plan.input_quant.bits == 8
    for u in analysis.units:
        if u.role in (Role.ATTN_QK, Role.ATTN_AV):
            continue
        assert len(plan.layer(u.name).weight.scales) == u.out_features


@pytest.mark.shared
def test_mnist_mse_beats_minmax_at_4_bits(mnist):
    model, analysis, cap, _ = mnist
    sub = dataclasses.replace(analysis, units=tuple(u for u in analysis.units if u.block in (0, 1) or u.role is Role.HEAD))
    errs = {}
    for method in ("minmax", "mse"):
        plan = search_scales(model, sub, cap, _cfg(4, method, optm=False), source_digest="m", progress=False).plan
        errs[method] = layer_output_errors(model, sub, cap, plan)
    ratios = []
    for u in sub.units:
        mse, mm = errs["mse"][u.name], errs["minmax"][u.name]
        if u.role not in (Role.ATTN_QK, Role.ATTN_AV):  # minmax is one of the mse candidates
            assert mse <= mm * (1 + 1e-9), (u.name, mse, mm)
        ratios.append(mse / mm)
    assert float(np.exp(np.mean(np.log(ratios)))) < 0.8, ratios


@pytest.mark.shared
def test_mnist_optm_kept_only_when_it_lowers_the_error(mnist):
    model, analysis, cap, plan = mnist
    notes = [OPTM_NOTE.fullmatch(n) for n in plan.notes if n.startswith("optm ")]
    assert notes and all(notes)
    candidates = {u.name for u in analysis.units
                  if (u.role is Role.FC2 and u.activation in GELU_KINDS) or u.role is Role.ATTN_AV}
    assert {m.group(1) for m in notes} == candidates
    errs = layer_output_errors(model, analysis, cap, plan)
    chosen = 0
    for m in notes:
        unit, kind, verdict, e_twin, e_uni = m.group(1), m.group(2), m.group(3), float(m.group(4)), float(m.group(5))
        q = plan.layer(unit).inputs[0]
        assert (verdict == "chosen") == (e_twin <= e_uni)
        if verdict == "chosen":
            chosen += 1
            assert q.scheme is Scheme.TWIN and q.twin_kind.value == kind and q.m is not None
            assert errs[unit] == pytest.approx(e_twin, rel=1e-4)
        else:
            assert q.scheme is Scheme.UNIFORM
            assert errs[unit] == pytest.approx(e_uni, rel=1e-4)
    assert chosen >= len(notes) // 2


# ---------------------------------------------------------------------------------------------
# the fast capture paths (issue 14) against the straightforward computations


class _ConcatReservoir:
    """The reservoir as it was: concatenate and re-index at every chunk (same random draws)."""

    def __init__(self, capacity, rng):
        self.capacity, self.rng, self.seen, self.data = capacity, rng, 0, None

    def add(self, *arrays):
        n = int(arrays[0].shape[0])
        if n == 0:
            return
        cap, old = self.capacity, self.data
        held = 0 if old is None else int(old[0].shape[0])
        if self.seen + n <= cap:
            new = tuple(np.array(a, dtype=np.float32) for a in arrays)
            self.data = new if old is None else tuple(np.concatenate([o, a]) for o, a in zip(old, new))
        else:
            k_new = int(self.rng.hypergeometric(n, self.seen, cap)) if self.seen > 0 else cap
            new_idx = np.sort(self.rng.choice(n, size=k_new, replace=False)) if k_new else np.zeros(0, np.int64)
            old_idx = np.sort(self.rng.choice(held, size=cap - k_new, replace=False)) if cap - k_new else np.zeros(0, np.int64)
            self.data = tuple(np.asarray(a, np.float32)[new_idx] if old is None else
                              np.concatenate([old[i][old_idx], np.asarray(a, np.float32)[new_idx]])
                              for i, a in enumerate(arrays))
        self.seen += n


def test_slot_reservoir_equals_the_concatenating_one():
    rng = np.random.default_rng(0)
    for trial in range(150):
        cap = int(rng.integers(1, 40))
        a, b = _ConcatReservoir(cap, np.random.default_rng(trial)), Reservoir(cap, np.random.default_rng(trial))
        for _ in range(int(rng.integers(1, 14))):
            c = rng.standard_normal((int(rng.integers(0, 30)), 2, 3)).astype(np.float32)
            a.add(c, c[:, 0]), b.add(c, c[:, 0])
            if rng.random() < 0.4 or a.data is None:  # reading in between must not change later draws
                assert (a.data is None) == (b.data is None)
                if a.data is not None:
                    assert all(np.array_equal(x, y) for x, y in zip(a.data, b.data))
        assert all(np.array_equal(x, y) for x, y in zip(a.data, b.data))


def test_tails_are_exact_and_value_sample_uniform():
    from onnx_mptq.calibrate.capture import ValueSample, _StatsAcc

    rng = np.random.default_rng(2)
    chunks = [np.round(rng.standard_normal(int(rng.integers(0, 3000))) * (1 + i % 4), 1).astype(np.float32)
              for i in range(30)]  # rounded: many ties at the thresholds
    acc = _StatsAcc("t", np.random.default_rng(0), 500, 700)
    for c in chunks:
        acc.update(c)
    r = acc.result()
    allv = np.sort(np.concatenate(chunks))
    assert np.array_equal(r.top, allv[-500:]) and np.array_equal(r.bottom, allv[:500])
    assert np.array_equal(r.abs_top, np.sort(np.abs(allv))[-500:])
    assert r.sample.size == 700 and np.all(np.isin(r.sample, allv))
    with pytest.raises(CalibrationError, match="non-finite"):
        acc.update(np.array([1.0, np.nan], np.float32))
    # every value is kept with probability capacity / seen
    hits = np.zeros(60)
    for s in range(2000):
        vs = ValueSample(12, np.random.default_rng(s))
        for part in np.split(np.arange(60, dtype=np.float32), [5, 6, 20, 41]):
            vs.add(part)
        assert np.unique(vs.data).size == 12
        hits[vs.data.astype(int)] += 1
    expected = 2000 * 12 / 60
    chi2 = float(np.sum((hits - expected) ** 2 / expected))
    assert chi2 < 59 + 6 * np.sqrt(2 * 59), chi2
