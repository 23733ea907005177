"""Tests of the numpy numerics layer: quantizers, scale search, twin-region quantizers, metrics,
SQ-b smoothing math."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnx_mptq.numerics import (
    LinearObjective, MetricAccumulator, OperandObjective, TwinParams, UniformParams, conditioning,
    container_dtype, cosine, dequantize, dequantized_bounds, fake_quant, fixed_ratio_twin,
    fold_layernorm, fold_linear, kl_softmax, minmax_params, output_error, params_from_range,
    percentile_params, qrange, quantize, search_activation_scale, search_matmul_operand_scale,
    search_twin, search_twin_operand, search_weight_scales, shift_vector, shifted_absmax,
    smoothing_factors, softmax, sqnr_db, top1_agreement, topk_accuracy, twin_dequantize,
    twin_fake_quant, twin_quantize, twin_region_params, weight_absmax_rows, weight_params,
)
from onnx_mptq.numerics.search import coarse_to_fine
from onnx_mptq.numerics.twin import _ProxyTable, lattice_fits, lattice_max_m, twin_lattice_range

SETTINGS = settings(max_examples=60, deadline=None)

finite32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)
bits_st = st.integers(2, 8)


def gelu(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))).astype(np.float32)


# ---------------------------------------------------------------- quant


def test_qrange_values_and_errors():
    assert qrange(8, True) == (-127, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-7, 7)
    assert qrange(2, False) == (0, 3)
    assert qrange(16, True) == (-32767, 32767)
    for bad in (1, 17, 0, True, 4.0, "8"):
        with pytest.raises(ValueError):
            qrange(bad, True)


def test_container_dtype():
    assert container_dtype(True) == np.int8
    assert container_dtype(False) == np.uint8
    assert container_dtype(True, 12) == np.int16
    assert container_dtype(False, 16) == np.uint16


def test_rounding_is_half_to_even():
    p = UniformParams(np.float32(1.0), np.int32(0), 8, True)
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], dtype=np.float32)
    assert quantize(x, p).tolist() == [0, 2, 2, 0, -2, -2]


def test_uniform_params_validation():
    with pytest.raises(ValueError):
        UniformParams(np.float32(0.0), np.int32(0), 8, True)
    with pytest.raises(ValueError):
        UniformParams(np.float32(1.0), np.int32(3), 8, True)  # symmetric => zp 0
    with pytest.raises(ValueError):
        UniformParams(np.float32(1.0), np.int32(300), 8, False)
    with pytest.raises(ValueError):
        UniformParams(np.ones(3, np.float32), np.zeros(3, np.int32), 8, True)  # no axis
    with pytest.raises(ValueError):
        UniformParams(np.ones(3, np.float32), np.zeros(2, np.int32), 8, True, axis=0)


@SETTINGS
@given(x=hnp.arrays(np.float32, st.integers(1, 40), elements=finite32), bits=bits_st, sym=st.booleans())
def test_roundtrip_within_half_step(x, bits, sym):
    p = minmax_params(x, bits, sym)
    err = np.abs(fake_quant(x, p).astype(np.float64) - x)
    # in-range values: error at most half a step (plus float32 rounding of x / scale)
    assert np.all(err <= 0.5 * float(p.scale) * (1 + 1e-5) + 1e-6 * np.abs(x))
    if sym:
        assert np.all(p.zero_point == 0)
    else:
        assert fake_quant(np.zeros(1, np.float32), p)[0] == 0.0  # 0 exactly representable


@SETTINGS
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=8), elements=finite32),
       bits=bits_st, axis=st.sampled_from([0, 1, -1]))
def test_per_channel_roundtrip_and_broadcast(x, bits, axis):
    p = weight_params(x, bits, axis)
    assert p.scale.shape == (x.shape[axis],) and np.all(p.zero_point == 0)
    out = fake_quant(x, p)
    xm = np.moveaxis(x, axis, -1)
    om = np.moveaxis(out, axis, -1)
    for c in range(xm.shape[-1]):  # each channel equals its own per-tensor quantizer
        pc = UniformParams(p.scale[c], np.int32(0), bits, True)
        np.testing.assert_array_equal(om[..., c], fake_quant(xm[..., c], pc))
        assert np.all(np.abs(om[..., c] - xm[..., c]) <= 0.5 * p.scale[c] * (1 + 1e-5) + 1e-6 * np.abs(xm[..., c]))


@SETTINGS
@given(x=hnp.arrays(np.float32, st.integers(1, 30), elements=st.floats(width=32, allow_nan=False)),
       lo=finite32, span=st.floats(0, 1e4, width=32), bits=bits_st, sym=st.booleans())
def test_quantize_within_qrange(x, lo, span, bits, sym):
    p = params_from_range(lo, lo + span, bits, sym)
    q = quantize(x, p)
    qmin, qmax = qrange(bits, sym)
    assert q.dtype == np.int32 and np.all(q >= qmin) and np.all(q <= qmax)
    assert float(p.scale) > 0 and np.isfinite(p.scale)
    if sym:
        assert int(p.zero_point) == 0
    else:
        assert qmin <= int(p.zero_point) <= qmax
        assert dequantize(p.zero_point, p) == 0.0


def test_params_from_range_edge_cases():
    p = params_from_range(0.0, 0.0, 8, False)  # zero range: tiny positive scale
    assert float(p.scale) > 0
    p = params_from_range(2.0, 5.0, 8, False)  # range widened to include 0
    assert int(p.zero_point) == 0 and math.isclose(float(p.scale), 5.0 / 255, rel_tol=1e-6)
    p = params_from_range(-5.0, -2.0, 8, False)
    assert int(p.zero_point) == 255
    p = params_from_range(np.array([-1.0, 0.0]), np.array([1.0, 0.0]), 4, True, axis=0)
    assert p.scale.shape == (2,) and np.all(p.scale > 0)
    with pytest.raises(ValueError):
        params_from_range(1.0, 0.0, 8, True)
    with pytest.raises(ValueError):
        params_from_range(0.0, np.inf, 8, True)


def test_percentile_params():
    x = np.concatenate([np.linspace(-1, 1, 9999), [100.0]]).astype(np.float32)
    p = percentile_params(x, 8, True, 99.9)
    assert float(p.scale) * 127 < 2.0
    assert float(percentile_params(x, 8, True, 100.0).scale) == float(minmax_params(x, 8, True).scale)
    pa = percentile_params(x, 8, False, 99.9)
    assert 0 < int(pa.zero_point) < 255
    with pytest.raises(ValueError):
        percentile_params(x, 8, True, 40.0)


@SETTINGS
@given(x=hnp.arrays(np.float32, st.integers(1, 30), elements=finite32), bits=st.integers(2, 7),
       sym=st.booleans(), shrink=st.floats(0.05, 1.0))
def test_clip_then_8bit_container_matches_quantize(x, bits, sym, shrink):
    # emission form for b < 8: clamp to the dequantized bounds, QuantizeLinear in an 8-bit container
    p = params_from_range(shrink * float(x.min()), shrink * float(x.max()), bits, sym)
    lo, hi = dequantized_bounds(p)
    cmin, cmax = qrange(8, sym)
    cmin = -128 if sym else cmin
    q8 = np.clip(np.rint(np.clip(x, lo, hi) / p.scale) + p.zero_point, cmin, cmax).astype(container_dtype(sym))
    np.testing.assert_array_equal(q8.astype(np.int32), quantize(x, p))


# ---------------------------------------------------------------- search


@pytest.fixture(scope="module")
def linear_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 32)).astype(np.float32) * np.linspace(0.2, 3, 32).astype(np.float32)
    x[:, 3] += 4.0  # an outlier channel
    w = (rng.standard_normal((32, 48)) / np.sqrt(32)).astype(np.float32)
    return x, w


@pytest.mark.parametrize("n", [48, 16])
def test_linear_objective_matches_direct(linear_data, n):
    x, w = linear_data
    w = w[:, :n]
    wq = fake_quant(w, weight_params(w, 4, 1))
    p = minmax_params(x, 4, False)
    for w_fq in (None, wq):
        obj = LinearObjective(x, w, w_fq)
        direct = output_error(x, w, fake_quant(x, p), w_fq)
        assert math.isclose(obj(lambda v: fake_quant(v, p)), direct, rel_tol=1e-4)


@pytest.mark.parametrize("which", [0, 1])
def test_operand_objective_matches_direct(which):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    b = rng.standard_normal((2, 3, 8, 6)).astype(np.float32)
    other = b if which == 0 else a
    other_fq = fake_quant(other, minmax_params(other, 4, True))
    op = a if which == 0 else b
    p = minmax_params(op, 4, True)
    obj = OperandObjective(a, b, which, other_fq)
    fa, fb = (fake_quant(a, p), other_fq) if which == 0 else (other_fq, fake_quant(b, p))
    assert math.isclose(obj(lambda v: fake_quant(v, p)), output_error(a, b, fa, fb), rel_tol=1e-4)


def test_coarse_to_fine_exhaustive_when_coarse_covers_grid():
    vals = [5.0, 3.0, 4.0, 1.0, 2.0, 0.5, 6.0]
    i, e = coarse_to_fine(len(vals), lambda k: vals[k], n_coarse=10)
    assert (i, e) == (5, 0.5)


@pytest.mark.parametrize("use_x", [False, True])
def test_weight_search_never_worse_than_minmax(linear_data, use_x):
    x, w = linear_data
    bits = 3
    p = search_weight_scales(w, bits, x=x if use_x else None, grid=np.linspace(0.3, 1.0, 15))
    pm = weight_params(w, bits, 1)
    assert p.scale.shape == (w.shape[1],) and p.axis == 1 and np.all(p.zero_point == 0)
    m = x if use_x else np.eye(w.shape[0], dtype=np.float32)
    err = np.sum(np.square(m @ (w - fake_quant(w, p)), dtype=np.float64), axis=0)  # (N,)
    err_mm = np.sum(np.square(m @ (w - fake_quant(w, pm)), dtype=np.float64), axis=0)
    assert np.all(err <= err_mm * (1 + 1e-5) + 1e-12)
    assert err.sum() < err_mm.sum()


def test_weight_search_conv_axis0():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 3, 2, 2)).astype(np.float32)
    p = search_weight_scales(w, 4, axis=0)
    assert p.scale.shape == (6,) and p.axis == 0
    assert fake_quant(w, p).shape == w.shape


@pytest.mark.parametrize("sym", [True, False])
def test_activation_search_never_worse_than_minmax(linear_data, sym):
    x, w = linear_data
    wq = fake_quant(w, weight_params(w, 4, 1))
    p = search_activation_scale(x, w, 4, sym, w_fq=wq)
    pm = minmax_params(x, 4, sym)
    e = output_error(x, w, fake_quant(x, p), wq)
    em = output_error(x, w, fake_quant(x, pm), wq)
    assert e <= em * (1 + 1e-6)
    assert p.symmetric == sym and p.axis is None


def test_activation_search_methods(linear_data):
    x, w = linear_data
    assert float(search_activation_scale(x, w, 8, True, method="minmax").scale) == float(minmax_params(x, 8, True).scale)
    pp = search_activation_scale(x, w, 8, False, method="percentile", pct=99.0)
    assert float(pp.scale) == float(percentile_params(x, 8, False, 99.0).scale)
    with pytest.raises(ValueError):
        search_activation_scale(x, w, 8, True, method="kl")


@pytest.mark.parametrize("which", [0, 1])
def test_operand_search_never_worse_than_minmax(which):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, 16, 8)).astype(np.float32)
    q[..., 0] *= 6
    kt = rng.standard_normal((4, 8, 16)).astype(np.float32)
    p = search_matmul_operand_scale(q, kt, which, 4, True)
    op = q if which == 0 else kt
    pm = minmax_params(op, 4, True)
    fq = (lambda pp: (fake_quant(q, pp), None)) if which == 0 else (lambda pp: (None, fake_quant(kt, pp)))
    assert output_error(q, kt, *fq(p)) <= output_error(q, kt, *fq(pm)) * (1 + 1e-6)


# ---------------------------------------------------------------- twin


@SETTINGS
@given(x=hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-2, 20, width=32)),
       bits=st.integers(3, 8), m=st.integers(0, 12), d1=st.floats(1e-4, 1.0), kind=st.sampled_from(["gelu", "softmax"]))
def test_twin_values_are_multiples_of_delta1(x, bits, m, d1, kind):
    p = TwinParams(kind, bits, d1, m)
    q1, q2 = twin_quantize(x, p)
    n = 2 ** (bits - 1) - 1
    assert np.all((q1 >= 0) & (q1 <= n) & (q2 >= 0) & (q2 <= n))
    assert np.all((q1 == 0) | (q2 == 0))
    y = twin_fake_quant(x, p)
    k = y.astype(np.float64) / p.delta1
    np.testing.assert_allclose(k, np.rint(k), atol=1e-3)
    np.testing.assert_array_equal(y, twin_dequantize(q1, q2, p))
    # emission form: the two regions as uniform quantizers, summed
    r1, r2 = twin_region_params(p)
    if kind == "gelu":
        parts = fake_quant(np.minimum(x, 0), r1) + fake_quant(np.maximum(x, 0), r2)
    else:
        low = x < np.float32(p.split)
        parts = fake_quant(np.where(low, x, 0), r1) + fake_quant(np.where(low, 0, x), r2)
    np.testing.assert_array_equal(parts, y)


@SETTINGS
@given(bits=st.integers(3, 8), m=st.integers(0, 12), d1=st.floats(1e-4, 1.0), kind=st.sampled_from(["gelu", "softmax"]),
       split_f=st.sampled_from([None, 0.5, 0.9]))
def test_twin_lattice_range_holds_every_value(bits, m, d1, kind, split_f):
    n = 2 ** (bits - 1) - 1
    split = None if kind == "gelu" or split_f is None else split_f * (n + 1) * d1
    p = TwinParams(kind, bits, d1, m, split)
    lo, hi = twin_lattice_range(p)
    # every value the quantizer can produce, as multiples of delta1
    x = np.concatenate([[0.0], np.linspace(-2 * n * p.delta1, 2 * n * p.delta2, 20001)]).astype(np.float32)
    if kind == "softmax":
        x = x[x >= 0]
    k = np.rint(twin_fake_quant(x, p).astype(np.float64) / p.delta1)
    assert lo <= k.min() and k.max() <= hi
    assert k.min() == lo and k.max() == hi  # the range is tight: both ends are reached
    assert lattice_fits(p) == (hi - lo <= 255)
    top = lattice_max_m(kind, bits)
    if split is None:
        assert lattice_fits(TwinParams(kind, bits, d1, max(top, 0))) == (top >= 0)
        assert top >= 30 or not lattice_fits(TwinParams(kind, bits, d1, top + 1))
        assert lattice_fits(p) == (m <= top)


def test_lattice_max_m_by_hand():
    # gelu: n (2^m + 1) <= 255; softmax: n 2^m <= 255
    assert [lattice_max_m("gelu", b) for b in range(3, 9)] == [6, 5, 4, 2, 1, 0]
    assert [lattice_max_m("softmax", b) for b in range(3, 9)] == [6, 5, 4, 3, 2, 1]
    assert lattice_max_m("gelu", 8, levels=254) == -1  # 127 * 2 = 254 > 253


def test_twin_m0_is_symmetric_uniform():
    x = np.linspace(-0.3, 1.5, 301, dtype=np.float32)
    u = UniformParams(np.float32(0.1), np.int32(0), 4, True)
    np.testing.assert_array_equal(twin_fake_quant(x, TwinParams("gelu", 4, 0.1, 0)), fake_quant(x, u))
    xs = np.linspace(0, 1, 301, dtype=np.float32)
    np.testing.assert_array_equal(twin_fake_quant(xs, TwinParams("softmax", 4, 0.1, 0)), fake_quant(xs, u))


def test_twin_params_validation():
    p = TwinParams("softmax", 4, 0.01, 3)
    assert p.split == pytest.approx(0.08) and p.delta2 == p.delta1 * 8
    assert TwinParams("gelu", 4, 0.01, 3).split == 0.0
    for bad in (dict(kind="relu", bits=4, delta1=0.1, m=0), dict(kind="gelu", bits=2, delta1=0.1, m=0),
                dict(kind="gelu", bits=4, delta1=0.0, m=0), dict(kind="gelu", bits=4, delta1=0.1, m=-1),
                dict(kind="gelu", bits=4, delta1=0.1, m=0, split=0.5)):
        with pytest.raises(ValueError):
            TwinParams(**bad)


def test_proxy_table_is_exact():
    rng = np.random.default_rng(4)
    x = gelu(rng.standard_normal((64, 12)).astype(np.float32) * 2)
    h = rng.uniform(0.5, 2, (1, 12))
    table = _ProxyTable(x, h)
    for kind in ("gelu", "softmax"):
        xx = x if kind == "gelu" else np.abs(x) / np.abs(x).max()
        t = table if kind == "gelu" else _ProxyTable(xx, h)
        p = TwinParams(kind, 4, 0.013, 3)
        direct = float(np.sum(h * (xx.astype(np.float64) - twin_fake_quant(xx, p)) ** 2))
        if kind == "gelu":
            prox = t.sse(np.array([p.delta1]), -7, 0, -np.inf, 0.0) + t.sse(np.array([p.delta2]), 0, 7, 0.0, np.inf)
        else:
            prox = t.sse(np.array([p.delta1]), 0, 7, -np.inf, p.split) + t.sse(np.array([p.delta2]), 0, 7, p.split, np.inf)
        assert prox[0] == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("which", [0, 1])
def test_proxy_table_operand_weights_and_subsampling(which):
    rng = np.random.default_rng(9)
    a = softmax(rng.standard_normal((3, 6, 5)).astype(np.float32) * 2)
    b = rng.standard_normal((3, 5, 4)).astype(np.float32)
    obj = OperandObjective(a, b, which)
    op = obj.operand
    p = TwinParams("softmax", 4, 0.02, 2)
    h = np.broadcast_to(obj.channel_weights, op.shape)
    direct = float(np.sum(h * (op.astype(np.float64) - twin_fake_quant(op, p)) ** 2))
    t = _ProxyTable(op, obj.channel_weights)
    prox = t.sse(np.array([p.delta1]), 0, 7, -np.inf, p.split) + t.sse(np.array([p.delta2]), 0, 7, p.split, np.inf)
    assert prox[0] == pytest.approx(direct, rel=1e-6)
    small = _ProxyTable(op, obj.channel_weights, max_elems=op.shape[-1] * 4)
    assert small.v.size == op.shape[-1] * 4
    tp = search_twin_operand(a, b, which, 4, "softmax", max_m=4, grid_size=20)
    assert tp.kind == "softmax" and 0 <= tp.m <= 4


@pytest.fixture(scope="module")
def gelu_data():
    rng = np.random.default_rng(5)
    pre = rng.standard_normal((512, 64)).astype(np.float32) * np.float32(1.5) - np.float32(0.5)
    x = gelu(pre)  # (tokens, K), range about [-0.17, 6]
    w = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    return x, w


@pytest.fixture(scope="module")
def softmax_data():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((8, 32, 32)).astype(np.float32) * np.float32(3)
    a = softmax(logits)  # (S, M, K) attention probabilities
    v = rng.standard_normal((8, 32, 16)).astype(np.float32)
    return a, v


def test_twin_gelu_beats_symmetric_uniform_and_hand_set(gelu_data):
    x, w = gelu_data
    obj = LinearObjective(x, w)
    tp = search_twin(x, w, 4, "gelu")
    e_twin = obj(lambda v: twin_fake_quant(v, tp))
    up = search_activation_scale(x, w, 4, True)
    e_uni = obj(lambda v: fake_quant(v, up))
    e_fixed = obj(lambda v: twin_fake_quant(v, fixed_ratio_twin(x, 4, "gelu")))
    assert e_twin <= e_uni
    assert e_twin <= e_fixed
    assert tp.m > 0  # the negative region got a finer step


def test_twin_softmax_beats_uniform(softmax_data):
    a, v = softmax_data
    obj = OperandObjective(a, v, 0)
    tp = search_twin_operand(a, v, 0, 4, "softmax")
    e_twin = obj(lambda z: twin_fake_quant(z, tp))
    for sym in (True, False):
        up = search_matmul_operand_scale(a, v, 0, 4, sym)
        assert e_twin <= obj(lambda z: fake_quant(z, up))
    assert e_twin <= obj(lambda z: twin_fake_quant(z, fixed_ratio_twin(a, 4, "softmax")))


def test_fixed_ratio_twin():
    x = np.array([-0.17, 0.0, 2.0], dtype=np.float32)
    p = fixed_ratio_twin(x, 4, "gelu")
    assert p.delta1 == pytest.approx(0.17 / 7) and p.delta2 * 7 >= 2.0 and p.m == 4
    s = fixed_ratio_twin(x, 4, "softmax")
    assert s.delta2 == pytest.approx(1 / 7) and s.split == pytest.approx(s.delta2)


# ---------------------------------------------------------------- metrics


def test_sqnr_and_cosine_by_hand():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    out = np.array([[3.0, 3.0], [0.0, 1.0]], dtype=np.float32)
    assert sqnr_db(ref, out) == pytest.approx(10 * math.log10(26 / 3))
    assert sqnr_db(ref, ref) == float("inf")
    assert cosine(ref, out) == pytest.approx((21 / (5 * math.sqrt(18)) + 0.0) / 2)
    z = np.zeros((1, 3))
    assert cosine(z, z) == 1.0 and cosine(z, np.ones((1, 3))) == 0.0


def test_softmax_kl_topk_by_hand():
    x = np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]])
    np.testing.assert_allclose(softmax(x), [[0.5, 0.5], [0.25, 0.75]])
    ref = np.array([[0.0, 0.0]])
    out = np.array([[0.0, math.log(3.0)]])
    assert kl_softmax(ref, out) == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert kl_softmax(out, out) == pytest.approx(0.0, abs=1e-12)
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.2, 0.6]])
    labels = np.array([2, 0, 1])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)  # row 3 tie: class 0 before 1
    assert topk_accuracy(logits, labels, 3) == 1.0
    assert top1_agreement(logits, logits[[0, 2, 1]]) == pytest.approx(1 / 3)


def test_accumulator_equals_batch_functions():
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((50, 10)).astype(np.float32)
    out = ref + 0.3 * rng.standard_normal((50, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 50)
    acc = MetricAccumulator(ks=(1, 5))
    for s in range(0, 50, 16):
        acc.update(ref[s:s + 16], out[s:s + 16], labels[s:s + 16])
    r = acc.summary()
    assert r.samples == 50
    assert r.sqnr_db == pytest.approx(sqnr_db(ref, out))
    assert r.cosine == pytest.approx(cosine(ref, out))
    assert r.kl == pytest.approx(kl_softmax(ref, out))
    assert r.top1_agreement == pytest.approx(top1_agreement(ref, out))
    assert r.topk == {1: pytest.approx(topk_accuracy(out, labels, 1)), 5: pytest.approx(topk_accuracy(out, labels, 5))}
    assert r.ref_topk[1] == pytest.approx(topk_accuracy(ref, labels, 1))
    plain = MetricAccumulator()
    plain.update(ref, out)
    assert plain.summary().topk is None
    with pytest.raises(ValueError):
        plain.update(ref, out, labels)


# ---------------------------------------------------------------- smoothing


def test_fold_identities_exact():
    rng = np.random.default_rng(8)
    t, c, n = 64, 16, 24
    xhat = rng.standard_normal((t, c)).astype(np.float32)
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    beta[2] += 8.0  # a channel with a large offset
    y = xhat * gamma + beta  # (tokens, C) LayerNorm output
    w = rng.standard_normal((c, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    for mode in ("mean", "midpoint"):
        mu = shift_vector(y.mean(0), y.min(0), y.max(0), mode)
        amax = shifted_absmax(y.min(0), y.max(0), mu)
        np.testing.assert_allclose(amax, np.abs(y - mu).max(0), rtol=1e-6)
        eps = smoothing_factors(amax, weight_absmax_rows([w]), 0.5)
        g2, b2 = fold_layernorm(gamma, beta, mu, eps)
        w2, bb2 = fold_linear(w, b, mu, eps)
        y2 = xhat * g2 + b2  # (tokens, C) == (y - mu) / eps
        np.testing.assert_allclose(y2, (y - mu) / eps, rtol=1e-5, atol=1e-5)
        ref = y.astype(np.float64) @ w + b
        np.testing.assert_allclose(y2 @ w2 + bb2, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())
        _, bb0 = fold_linear(w, None, mu, eps)
        np.testing.assert_allclose(bb0, mu.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_smoothing_factors_formula_and_safety():
    a = np.array([4.0, 0.0, 9.0, 1e12, 1.0])
    wm = np.array([1.0, 2.0, 0.0, 1.0, 1e-12])
    eps = smoothing_factors(a, wm, 0.5)
    assert eps.dtype == np.float32 and np.all(np.isfinite(eps)) and np.all(eps > 0)
    assert eps[0] == pytest.approx(2.0) and eps[1] == 1.0 and eps[2] == 1.0
    assert eps[3] == pytest.approx(1e5) and eps[4] == pytest.approx(1e5)
    np.testing.assert_allclose(smoothing_factors([4.0], [2.0], 1.0), [4.0])
    np.testing.assert_allclose(smoothing_factors([4.0], [2.0], 0.0), [0.5])
    with pytest.raises(ValueError):
        smoothing_factors(a, wm, 1.5)


def test_weight_absmax_rows_and_conditioning():
    w1 = np.array([[1.0, -3.0], [0.5, 0.0]])
    w2 = np.array([[2.0], [-4.0]])
    np.testing.assert_array_equal(weight_absmax_rows([w1, w2]), [3.0, 4.0])
    c = conditioning(np.array([-1.0, 2.0]), np.array([1.0, 9.0]), np.array([0.0, 5.0]))
    assert (c.range, c.max_abs_mean, c.mean_to_range) == (10.0, 5.0, 0.5)
    with pytest.raises(ValueError):
        shift_vector([0.0], [0.0], [1.0], "median")


# ---------------------------------------------------------------- fast search paths (issue 14)


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5)), elements=finite32),
       bits_st, st.booleans(), st.floats(1e-3, 1e3), st.floats(-1e3, 0.0))
def test_fake_quant_into_is_bitwise_fake_quant(x, bits, sym, span, lo):
    from onnx_mptq.numerics.search import fake_quant_into

    p = params_from_range(lo, lo + span, bits, sym)
    assert np.array_equal(fake_quant_into(x, p), fake_quant(x, p))
    pc = params_from_range(np.full(x.shape[1], lo), lo + span * np.linspace(1.0, 2.0, x.shape[1]), bits, sym, axis=1)
    out = np.empty_like(x)
    assert fake_quant_into(x, pc, out) is out and np.array_equal(out, fake_quant(x, pc))


def _old_search_uniform(obj, bits, sym, grid_size, low, high):
    """The per-candidate search as it was: every candidate summed in full, lambdas, no bounds."""
    from onnx_mptq.numerics.search import _uniform_candidate, candidate_fractions

    op = obj.operand
    lo, hi = float(op.min()), float(op.max())
    fracs = candidate_fractions(grid_size, low, high)
    cands = [_uniform_candidate(lo, hi, float(f), bits, sym) for f in fracs]
    one = int(np.flatnonzero(fracs == 1.0)[0])
    i, e = coarse_to_fine(len(fracs), lambda k: obj(lambda v: fake_quant(v, cands[k])), n_coarse=20, always=(one,))
    return cands[i], e


@pytest.mark.parametrize("seed", range(6))
def test_bounded_search_chooses_what_the_full_search_chooses(seed):
    from onnx_mptq.numerics.search import search_uniform

    rng = np.random.default_rng(seed)
    k, n, t = [(16, 48, 900), (40, 12, 2000), (24, 24, 3000)][seed % 3]
    x = (rng.standard_normal((t, k)) * rng.uniform(0.2, 3, k)).astype(np.float32)
    x[rng.integers(0, t, 5), rng.integers(0, k, 5)] += 20.0  # outliers make the grid non-trivial
    if seed % 2:
        x = np.maximum(x, -0.17)  # GELU-like
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    wq = fake_quant(w, weight_params(w, 4, 1))
    for bits, sym in ((4, False), (3, True), (8, False)):
        obj = LinearObjective(x, w, wq)
        p_old, e_old = _old_search_uniform(obj, bits, sym, 100, 0.01, 1.2)
        p_new, e_new = search_uniform(obj, bits, sym, 100, 0.01, 1.2)
        assert float(p_new.scale) == float(p_old.scale) and int(p_new.zero_point) == int(p_old.zero_point)
        assert math.isclose(e_new, e_old, rel_tol=1e-12)
    # attention operands, both sides
    a = rng.random((6, 20, 20)).astype(np.float32)
    a /= a.sum(-1, keepdims=True)
    b = rng.standard_normal((6, 20, 8)).astype(np.float32)
    for which in (0, 1):
        obj = OperandObjective(a, b, which)
        p_old, e_old = _old_search_uniform(obj, 4, False, 100, 0.01, 1.2)
        p_new, e_new = search_uniform(obj, 4, False, 100, 0.01, 1.2)
        assert float(p_new.scale) == float(p_old.scale) and math.isclose(e_new, e_old, rel_tol=1e-12)


def test_bounded_objective_is_exact_or_above_the_bound(linear_data):
    x, w = linear_data
    x = np.tile(x, (8, 1))  # 2048 rows: several blocks
    obj = LinearObjective(x, w)
    p = minmax_params(x, 3, False)
    full = obj(p)
    assert math.isclose(full, obj(lambda v: fake_quant(v, p)), rel_tol=1e-12)
    assert obj(p, bound=full) == full  # not above the bound: summed completely
    part = obj(p, bound=full / 4)
    assert full / 4 < part < full  # stopped early, still above the bound


def test_bounded_coarse_to_fine_matches_unbounded():
    rng = np.random.default_rng(3)
    for _ in range(50):
        vals = rng.random(int(rng.integers(5, 120)))
        vals[rng.integers(0, vals.size)] = vals.min()  # a tie
        always = (int(rng.integers(0, vals.size)),)
        calls = []

        def err(i, bound):
            calls.append(bound)
            return vals[i] if vals[i] <= bound else bound + 0.5 * (vals[i] - bound)  # a partial sum above it

        i0, e0 = coarse_to_fine(vals.size, lambda i: vals[i], always=always)
        i1, e1 = coarse_to_fine(vals.size, err, always=always, bounded=True)
        assert (i0, e0) == (i1, e1)
        assert calls[0] == math.inf


def test_weight_search_unchanged_by_fused_fake_quant(linear_data):
    x, w = linear_data
    p = search_weight_scales(w, 4, x=x)
    # the old loop, with fake_quant
    from onnx_mptq.numerics.search import gram_root

    r = gram_root(x)
    amax = np.abs(w).max(axis=0).astype(np.float64)
    best_e, best_s = np.full(w.shape[1], np.inf), np.zeros(w.shape[1], np.float32)
    for f in np.unique(np.concatenate([np.linspace(0.5, 1.0, 50), [1.0]]))[::-1]:
        q = params_from_range(-f * amax, f * amax, 4, True, axis=1)
        e = np.sum(np.square(r @ (w - fake_quant(w, q)), dtype=np.float64), axis=0)
        better = e < best_e
        best_e, best_s = np.where(better, e, best_e), np.where(better, q.scale, best_s)
    assert np.array_equal(p.scale, best_s)
