"""The pipeline through the Python API: data kinds, plan re-emission, fidelity on the demo model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_mptq
from graphs import random_images, tiny_vit
from onnx_mptq.config import Config, OptmConfig, OptmSelect, QuantConfig, RuntimeConfig, SmoothConfig
from onnx_mptq.errors import DataError, PlanError
from onnx_mptq.graph.analysis import analyze
from onnx_mptq.validate import compare_outputs

MODELS = Path(__file__).resolve().parents[1] / "models"
CPU = RuntimeConfig(providers="cpu")


def _cfg(optm: OptmConfig = OptmConfig(), **quant) -> Config:
    return Config(runtime=CPU, quant=QuantConfig(optm=optm, **quant))


def test_reader_and_generator_calibration_data() -> None:
    m = tiny_vit()
    x = random_images(32)

    class Reader:  # ORT CalibrationDataReader protocol, one pass only
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(x):
                return None
            self.i += 8
            return {"input": x[self.i - 8:self.i]}

    r1 = onnx_mptq.quantize(m, Reader(), _cfg(w_bits=6, a_bits=6))
    r2 = onnx_mptq.quantize(m, ({"input": x[i:i + 8]} for i in range(0, 32, 8)), _cfg(w_bits=6, a_bits=6))
    units = {u.name for u in analyze(m).units}
    assert {lp.unit for lp in r1.plan.layers} == units
    # same samples in the same order: the same plan and model, whatever the container
    assert r1.plan.to_json() == r2.plan.to_json()
    assert r1.model.SerializeToString() == r2.model.SerializeToString()


def test_plan_reemission_is_exact_and_edits_take_effect() -> None:
    m = tiny_vit(seed=3)
    res = onnx_mptq.quantize(m, [{"input": random_images(16, seed=1)}], _cfg(w_bits=8, a_bits=8))
    plan = onnx_mptq.QuantPlan.from_json(res.plan.to_json())
    again = onnx_mptq.emit_from_plan(m, plan).model
    assert again.SerializeToString() == res.model.SerializeToString()
    # hand edit: one Linear down to 4-bit weights
    target = next(lp for lp in plan.layers if lp.weight is not None and lp.role == "fc1")
    w = dataclasses.replace(target.weight, bits=4)
    edited = dataclasses.replace(plan, layers=tuple(dataclasses.replace(lp, weight=w) if lp is target else lp for lp in plan.layers))
    q4 = onnx_mptq.emit_from_plan(m, onnx_mptq.QuantPlan.from_json(edited.to_json())).model
    codes = [onnx.numpy_helper.to_array(i) for i in q4.graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims]
    assert any(c.ndim == 2 and c.max() <= 7 and c.min() >= -7 and c.shape == (target.params // c.shape[1], c.shape[1]) for c in codes)
    assert q4.SerializeToString() != res.model.SerializeToString()


def test_plan_for_another_model_is_refused() -> None:
    res = onnx_mptq.quantize(tiny_vit(seed=1), [{"input": random_images(8)}], _cfg())
    with pytest.raises(PlanError, match="the plan was made for another model"):
        onnx_mptq.emit_from_plan(tiny_vit(seed=2), res.plan)


def test_smoothing_keeps_the_fp32_function() -> None:
    m = tiny_vit(seed=5)
    x = random_images(16, seed=7)
    res = onnx_mptq.smooth(m, [{"input": x}], Config(runtime=CPU))
    assert all(n.mode.value == "folded" for n in res.plan.norms if n.consumers)
    diff = compare_outputs(m, res.model, [{"input": x}], CPU)
    assert diff.rel_max_abs < 1e-4


def test_no_calibration_data() -> None:
    with pytest.raises(DataError, match="no calibration data"):
        onnx_mptq.quantize(tiny_vit(), None, _cfg())


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not (MODELS / "digits_vit.onnx").exists(), reason="demo model missing")
@pytest.mark.parametrize("bits,min_agree,min_top1", [(8, 99.0, 97.0), (4, 95.0, 95.0)])
def test_demo_model_fidelity(bits: int, min_agree: float, min_top1: float) -> None:
    res = onnx_mptq.quantize(MODELS / "digits_vit.onnx", MODELS / "digits_calib.npz", _cfg(w_bits=bits, a_bits=bits),
                             eval_data=MODELS / "digits_eval.npz")
    v = res.validation
    assert v.num_samples == 400
    assert v.top1_agreement >= min_agree and v.top1 >= min_top1, v
    assert res.plan.avg_weight_bits == bits and res.plan.avg_activation_bits == bits


@pytest.mark.slow
@pytest.mark.skipif(not (MODELS / "digits_vit.onnx").exists(), reason="demo model missing")
def test_sqb_and_optm_are_applied_by_default() -> None:
    res = onnx_mptq.quantize(MODELS / "digits_vit.onnx", MODELS / "digits_calib.npz", _cfg(w_bits=4, a_bits=4))
    assert res.plan.smoothing is not None and any(n.mode.value == "folded" for n in res.plan.smoothing.norms)
    # OPT-m searched a twin quantizer for every eligible operand (GELU fc2 inputs, softmax P) and
    # chose between it and the uniform one on the network
    eligible = {lp.unit for lp in res.plan.layers if lp.role in ("fc2", "attn_av")}  # digits_vit: GELU MLPs
    assert res.optm is not None and {d.unit for d in res.optm.decisions} == eligible
    twin_units = {lp.unit for lp in res.plan.layers if any(q.scheme.value == "twin" for q in lp.inputs)}
    assert twin_units == {d.unit for d in res.optm.decisions if d.chosen}
    assert res.optm.nmse <= res.optm.nmse_uniform and res.optm.kl <= res.optm.kl_uniform
    layer = onnx_mptq.quantize(MODELS / "digits_vit.onnx", MODELS / "digits_calib.npz",
                               _cfg(w_bits=4, a_bits=4, optm=OptmConfig(select=OptmSelect.LAYER)))
    assert any(q.scheme.value == "twin" for lp in layer.plan.layers for q in lp.inputs), \
        "the per-layer rule chose no twin-region quantizer at 4 bits on the demo model"
    off = onnx_mptq.quantize(MODELS / "digits_vit.onnx", MODELS / "digits_calib.npz",
                             dataclasses.replace(_cfg(w_bits=4, a_bits=4, optm=OptmConfig(enabled=False)), smooth=SmoothConfig(enabled=False)))
    assert off.plan.smoothing is None
    assert not [q for lp in off.plan.layers for q in lp.inputs if q.scheme.value == "twin"]
    assert np.isfinite(off.plan.avg_weight_bits)


def test_alpha_search_through_the_pipeline() -> None:
    m = tiny_vit(seed=11)
    x = random_images(16, seed=2)
    grid = (0.3, 0.5, 0.7)
    res = onnx_mptq.smooth(m, [{"input": x}], Config(runtime=CPU, smooth=SmoothConfig(alpha_search=True, alpha_grid=grid)))
    alphas = {n.alpha for n in res.plan.norms if n.consumers}
    assert alphas and alphas <= set(grid)
    assert compare_outputs(m, res.model, [{"input": x}], CPU).rel_max_abs < 1e-4


# ---------------------------------------------------------------------------------------------
# layers: the pipeline computes, the report renders; search/ loads no ORT at import


def test_search_modules_do_not_import_onnxruntime() -> None:
    import subprocess
    import sys

    code = ("import sys, onnx_mptq.search.scales, onnx_mptq.search.mixed, onnx_mptq.search.optm, onnx_mptq.pipeline; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'onnxruntime'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_results_are_typed() -> None:
    from onnx_mptq.pipeline import LayerMeasure, ModelSizes, QuantizeResult, SmoothResult

    for cls in (QuantizeResult, SmoothResult, LayerMeasure, ModelSizes):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        for name, ann in cls.__annotations__.items():
            assert "Any" not in str(ann), f"{cls.__name__}.{name}: {ann}"


def test_report_renders_what_the_pipeline_measured(tmp_path, monkeypatch) -> None:
    import json

    from onnx_mptq import validate
    from onnx_mptq.evaluate import evaluator as sensitivity
    from onnx_mptq.passes import smooth as smooth_pass
    from onnx_mptq.report import write_report

    m = tiny_vit(seed=3)
    fast = Config(runtime=CPU, quant=QuantConfig(w_bits=6, a_bits=6, optm=OptmConfig(enabled=False)))
    plain = onnx_mptq.quantize(m, [{"input": random_images(16)}], fast, eval_data=[{"input": random_images(8, seed=4)}])
    assert plain.fp32 is None and all(lm.sqnr_db is None for lm in plain.layers)
    res = onnx_mptq.quantize(m, [{"input": random_images(16)}], fast, eval_data=[{"input": random_images(8, seed=4)}],
                             measure=True)
    assert [lm.unit for lm in res.layers] == [lp.unit for lp in res.plan.layers]
    assert all(lm.sqnr_db is not None and np.isfinite(lm.sqnr_db) and lm.sqnr_db > 10 for lm in res.layers)
    assert res.fp32 is not None and res.fp32.top1_agreement is None  # the FP32 model alone: no reference
    assert res.sizes.quantized_onnx_mb == res.model.ByteSize() / 1e6 and res.sizes.fp32_onnx_mb == m.ByteSize() / 1e6
    assert res.sizes.quantized_packed_mb < res.sizes.fp32_onnx_mb

    def rerun(*a, **k):
        raise AssertionError("the report re-ran a stage")

    for mod, name in ((smooth_pass, "apply_smoothing"), (sensitivity, "unit_output_sqnr"), (validate, "evaluate")):
        monkeypatch.setattr(mod, name, rerun)
    write_report(tmp_path / "rep", res)
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["sqnr_db"] for r in doc["layers"]] == [lm.sqnr_db for lm in res.layers]
    assert doc["fp32"]["num_samples"] == res.fp32.num_samples and doc["quantized"]["top1_agreement"] is not None
    assert doc["size_mb"] == {"fp32_onnx": res.sizes.fp32_onnx_mb, "quantized_onnx": res.sizes.quantized_onnx_mb,
                              "quantized_packed": res.sizes.quantized_packed_mb}
