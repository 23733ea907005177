"""Closed-form error compensation (issue 15): each part against a direct numpy computation of its
objective on small random problems, the pass on a tiny ViT, the emitted model against the numpy
reference in ORT, and plans with stored codes (re-emission, hand edits, missing files)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import random_images, smoothed_capture, tiny_vit

from onnx_mptq.cli import main
from onnx_mptq.config import CompensateConfig, Config, QuantConfig
from onnx_mptq.errors import ConfigError, PlanError
from onnx_mptq.graph.io import graph_digest
from onnx_mptq.numerics.compensate import (Grams, bias_delta, dequantize_codes, error_with_bias, gptq_codes,
                                           nearest_codes, output_error, ridge_weight)
from onnx_mptq.numerics.quant import fake_quant, params_from_range, weight_params
from onnx_mptq.passes.emit_qdq import emit_qdq
from onnx_mptq.passes.simulate import ConvGeometry, simulate_unit
from onnx_mptq.plan import CompensatedWeights, CompensationPart, QuantPlan, weights_path
from onnx_mptq.search.compensate import compensate
from onnx_mptq.search.scales import search_scales
from test_emit import TOL_STEPS, Weights, operand_step, run


def _problem(seed: int, t: int = 256, k: int = 24, n: int = 12, bits: int = 3):
    """Correlated inputs X (t, k), a weight W (k, n), its per-channel min/max steps, and X
    quantized per tensor at 4 bits."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((t, k)) @ (np.eye(k) + 2 * mix) + rng.standard_normal(k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    s = weight_params(w, bits, axis=1).scale
    xq = fake_quant(x, params_from_range(float(x.min()), float(x.max()), 4, False))
    return x, xq, w, s, bits


@pytest.mark.parametrize("seed", range(6))
def test_gptq_never_worse_than_nearest(seed: int) -> None:
    x, _, w, s, bits = _problem(seed)
    near = dequantize_codes(nearest_codes(w, s, bits), s).astype(np.float64)
    codes = gptq_codes(w, x.T.astype(np.float64) @ x, s, bits)
    assert np.abs(codes).max() <= 2 ** (bits - 1) - 1
    ours = dequantize_codes(codes, s).astype(np.float64)
    xd, wd = x.astype(np.float64), w.astype(np.float64)
    e_near = np.linalg.norm(xd @ wd - xd @ near)
    e_gptq = np.linalg.norm(xd @ wd - xd @ ours)
    assert e_gptq <= e_near
    assert e_gptq < 0.9 * e_near  # and clearly better on correlated inputs


def test_output_error_is_the_direct_error() -> None:
    x, xq, w, s, bits = _problem(7)
    w_hat = dequantize_codes(nearest_codes(w, s, bits), s)
    direct = np.sum((x.astype(np.float64) @ w - xq.astype(np.float64) @ w_hat) ** 2)
    assert output_error(Grams.of(x, xq), w, w_hat) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("ridge", [1e-3, 0.1, 1.0])
def test_ridge_solution_satisfies_the_normal_equations(ridge: float) -> None:
    x, xq, w, _, _ = _problem(3)
    xd, xqd, wd = x.astype(np.float64), xq.astype(np.float64), w.astype(np.float64)
    w2 = ridge_weight(Grams.of(x, xq), w, ridge)
    lam = ridge * np.mean(np.sum(xqd * xqd, axis=0))  # mean diagonal of Xq^T Xq
    lhs = xqd.T @ xqd @ w2 + lam * w2
    rhs = xqd.T @ xd @ wd + lam * wd
    np.testing.assert_allclose(lhs, rhs, rtol=1e-8, atol=1e-8 * np.abs(rhs).max())
    # and it is the minimum: the objective grows along a random direction either way
    obj = lambda v: np.sum((xqd @ v - xd @ wd) ** 2) + lam * np.sum((v - wd) ** 2)  # noqa: E731
    d = np.random.default_rng(0).standard_normal(w2.shape) * 1e-3
    assert obj(w2) < obj(w2 + d) and obj(w2) < obj(w2 - d)


def test_bias_correction_zeroes_the_mean_error() -> None:
    x, xq, w, s, bits = _problem(5)
    w_hat = dequantize_codes(nearest_codes(w, s, bits), s)
    g = Grams.of(x, xq)
    delta = bias_delta(g, w, w_hat)
    err = x.astype(np.float64) @ w - (xq.astype(np.float64) @ w_hat + delta)
    before = x.astype(np.float64) @ w - xq.astype(np.float64) @ w_hat
    assert np.abs(before.mean(axis=0)).max() > 1e-2  # there was a mean error to remove
    np.testing.assert_allclose(err.mean(axis=0), 0.0, atol=1e-5 * np.abs(before).max())
    assert error_with_bias(g, w, w_hat, delta) == pytest.approx(np.sum(err ** 2), rel=1e-6)


def test_cli_flags_turn_each_part_away_from_its_default() -> None:
    from onnx_mptq.cli import _config_from, build_parser

    args = build_parser().parse_args(["quantize", "m.onnx", "-o", "q.onnx", "--gptq", "--act-compensation",
                                      "--bias-correction", "--compensate-inputs", "blocks", "--ridge", "0.5"])
    c = _config_from(args).quant.compensate
    assert (c.gptq, c.activation, c.bias, c.inputs.value, c.ridge) == (True, True, True, "blocks", 0.5)
    assert not dataclasses.replace(c, gptq=False, activation=False, bias=False).any


def test_config_checks_the_section() -> None:
    with pytest.raises(ConfigError, match="quant.compensate.ridge"):
        CompensateConfig(ridge=0)
    with pytest.raises(ConfigError, match="quant.compensate.gptq"):
        CompensateConfig(gptq="yes")  # type: ignore[arg-type]
    cfg = Config.from_dict({"quant": {"compensate": {"gptq": True, "damp": 0.05}}})
    assert cfg.quant.compensate.gptq and cfg.quant.compensate.damp == 0.05


# ---------------------------------------------------------------------------------------------
# the pass on a tiny ViT, emitted and run in ORT


ALL = CompensateConfig(gptq=True, activation=True, bias=True)


@pytest.fixture(scope="module")
def compensated():
    sc = smoothed_capture(blocks=1, samples=32)
    cfg = Config(quant=QuantConfig(w_bits=4, a_bits=4, compensate=ALL))
    plan = search_scales(sc.work, sc.an, sc.cap, cfg, source_digest=graph_digest(sc.src), smoothing=sc.splan,
                         progress=False).plan
    res = compensate(sc.work, sc.an, sc.cap, plan, ALL)
    return sc, plan, res


def test_pass_lowers_every_layers_error_and_records_it(compensated) -> None:
    sc, plan, res = compensated
    weight_units = [lp.unit for lp in plan.layers if lp.weight is not None]
    assert {m.unit for m in res.layers} == set(weight_units)  # the patch-embedding Conv included
    for m in res.layers:
        errs = dict(m.errors)
        final = errs["bias"] if CompensationPart.BIAS in m.kept else errs[m.kept[0].value] if m.kept else errs["nearest"]
        assert final <= errs["nearest"]
        lp = res.plan.layer(m.unit)
        if m.kept:
            assert lp.compensation is not None and lp.compensation.parts == m.kept
            assert lp.compensation.error == pytest.approx(final)
    assert res.weights is not None and res.plan.weights_digest == res.weights.digest()
    assert len(res.weights.layers) >= len(weight_units) - 1


def test_emitted_model_computes_the_compensated_layers(compensated) -> None:
    sc, _, res = compensated
    q = emit_qdq(sc.work, res.plan, sc.an, res.weights).model
    feeds = {"input": random_images(4, seed=11)}
    weights = Weights(sc.work)
    names = [t for u in sc.an.units for t in u.inputs] + [u.output for u in sc.an.units]
    out = run(q, feeds, names)
    checked = 0
    for u in sc.an.units:
        lp = res.plan.layer(u.name)
        if lp.compensation is None:
            continue
        w, b, attrs = weights(u)
        cl = res.weights.layers[u.name]
        w_hat = dequantize_codes(cl.codes, cl.scales)  # effective (K, N)
        kw = {}
        if u.op_type == "Conv":
            w_hat = w_hat.T.reshape(w.shape)
            kw["conv"] = ConvGeometry.from_attrs(attrs)
        bias = (0 if b is None else b) + (cl.bias if cl.bias is not None else 0)
        assert not np.array_equal(w_hat, fake_quant(w, lp.weight.params(0 if u.op_type == "Conv" else 1)))
        ref = simulate_unit(u, lp, [out[t] for t in u.inputs], w_hat, bias, **kw)
        step = float(np.prod([operand_step(a) for a in lp.inputs])) * min(lp.weight.scales)
        assert np.abs(out[u.output] - ref).max() <= TOL_STEPS * step, u.name
        checked += 1
    assert checked >= 4


def test_reemission_from_the_plan_and_its_weights_file_is_byte_identical(compensated, tmp_path: Path) -> None:
    sc, _, res = compensated
    first = emit_qdq(sc.work, res.plan, sc.an, res.weights).model
    (tmp_path / "p.json").write_text(res.plan.to_json())
    res.weights.save(weights_path(tmp_path / "p.json"))
    plan = QuantPlan.from_json((tmp_path / "p.json").read_text())
    weights = CompensatedWeights.load(tmp_path / "p.weights.npz")
    again = emit_qdq(sc.work, plan, sc.an, weights).model
    assert again.SerializeToString() == first.SerializeToString()
    with pytest.raises(PlanError, match="weights file.*not given"):
        emit_qdq(sc.work, plan, sc.an)
    other = CompensatedWeights({k: dataclasses.replace(v, bias=None) for k, v in weights.layers.items()})
    with pytest.raises(PlanError, match="not the one this plan was made with"):
        emit_qdq(sc.work, plan, sc.an, other)


def test_hand_edited_bits_of_a_compensated_layer_rederive_it_by_nearest_rounding(compensated) -> None:
    sc, _, res = compensated
    lp = next(lp for lp in res.plan.layers if lp.compensation is not None and lp.role != "patch_embed")
    edited = dataclasses.replace(lp, weight=dataclasses.replace(lp.weight, bits=3))  # step_bits stays 4
    plan = dataclasses.replace(res.plan, layers=tuple(edited if x.unit == lp.unit else x for x in res.plan.layers))
    out = emit_qdq(sc.work, plan, sc.an, res.weights)
    notes = [n for n in out.rederived if lp.unit in n]
    assert any("re-derived by nearest rounding" in n for n in notes), out.rederived
    # the other compensated layers still use their stored codes
    assert any("compensated codes" in n for u in out.report.units if u.unit != lp.unit for n in u.notes)


def test_cli_writes_the_weights_file_and_reemits_from_it(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tiny_vit(blocks=1), model)
    calib = tmp_path / "c.npz"
    np.savez(calib, input=random_images(16))
    q, plan, again = tmp_path / "q.onnx", tmp_path / "new" / "plan.json", tmp_path / "again.onnx"
    assert main(["quantize", str(model), "-o", str(q), "--calib", str(calib), "--plan-out", str(plan), "--w-bits", "4",
                 "--a-bits", "4", "--gptq", "--act-compensation", "--bias-correction", "--providers", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"compensated codes in {tmp_path / 'new' / 'plan.weights.npz'}" in out
    doc = json.loads(plan.read_text())
    assert doc["weights_digest"] and any(lp["compensation"] for lp in doc["layers"])
    assert main(["quantize", str(model), "-o", str(again), "--plan", str(plan), "--providers", "cpu"]) == 0
    assert again.read_bytes() == q.read_bytes()
    (tmp_path / "new" / "plan.weights.npz").unlink()
    assert main(["quantize", str(model), "-o", str(tmp_path / "x.onnx"), "--plan", str(plan), "--providers", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan.weights.npz" in err[0] and not (tmp_path / "x.onnx").exists()


def test_sequential_inputs_come_from_the_network_quantized_upstream(compensated) -> None:
    from onnx_mptq.calibrate.capture import capture_unit_inputs
    from onnx_mptq.config import CompensateInputs
    from onnx_mptq.pipeline import compensation_stage

    sc, plan, _ = compensated
    order = [u.name for u in sc.an.units]
    calls = []

    def network(partial, weights, units):
        first = min(order.index(u) for u in units)
        assert [lp.unit for lp in partial.layers] == [u for u in order[:first] if u in {x.unit for x in plan.layers}]
        compensated_upstream = [lp.unit for lp in partial.layers if lp.compensation is not None]
        assert (weights is None) == (not compensated_upstream)
        q = emit_qdq(sc.work, partial, sc.an, weights).model  # the partial plan is a valid plan
        only = dataclasses.replace(sc.an, units=tuple(u for u in sc.an.units if u.name in units))
        got = capture_unit_inputs(q, only, sc.data, Config().runtime, tokens_per_layer=256, progress=False)
        for u in units:  # the same tokens as the float capture, changed by the upstream quantizers
            a, b = sc.cap[u].rows, got[u].rows
            assert a.shape == b.shape and not np.array_equal(a, b)
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8
        calls.append(units)
        return got

    res = compensate(sc.work, sc.an, sc.cap, plan, CompensateConfig(activation=True), network=network)
    assert len(calls) >= 4 and res.weights is not None  # every group of Linears after the patch embedding
    cfg = Config(quant=QuantConfig(w_bits=4, a_bits=4, compensate=CompensateConfig(
        activation=True, inputs=CompensateInputs.SEQUENTIAL, samples=16)))
    staged = compensation_stage(sc.work, sc.an, sc.cap, plan, sc.data, cfg)
    assert staged.weights is not None and emit_qdq(sc.work, staged.plan, sc.an, staged.weights).model is not None
