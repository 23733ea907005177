"""Plans determine the model: the emission section, byte-for-byte re-emission (API and CLI),
fields that would be ignored or contradict another, edited bits, and reading schema version 1.

One searched plan of the tiny ViT (W4A4, twin quantizers placed on the fc2 inputs and the
softmax operands by hand so that every emission choice has something to act on) serves the API
tests; the CLI tests quantize the tiny ViT file themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import random_images, tiny_vit
from onnx import numpy_helper

import onnx_mptq
from onnx_mptq.cli import main
from onnx_mptq.config import Config, EmissionConfig, QuantConfig, RuntimeConfig, ScaleSearchConfig
from onnx_mptq.errors import PlanError
from onnx_mptq.numerics.quant import dequantized_bounds, params_from_range, qrange
from onnx_mptq.numerics.twin import TwinParams, fixed_ratio_twin
from onnx_mptq.passes.simulate import fake_quant_operand, fake_quant_weight
from onnx_mptq.plan import (ActQuant, Emission, GraphForm, QuantPlan, RangeForm, Scheme, SymmetricContainer, TwinForm,
                            WeightContainer, WeightStorage, WeightQuant, rederive_steps)

CPU = RuntimeConfig(providers="cpu")


def _cfg(**quant) -> Config:
    return Config(runtime=CPU, quant=QuantConfig(**quant))


def _with_twins(plan: QuantPlan) -> QuantPlan:
    """Hand-set (PTQ4ViT fixed-ratio) twin quantizers on every fc2 input and P @ V probability operand."""
    layers = []
    for lp in plan.layers:
        if lp.role in ("fc2", "attn_av"):
            kind = "gelu" if lp.role == "fc2" else "softmax"
            aq = lp.inputs[0]
            tp = fixed_ratio_twin(np.array([4.0], np.float32), aq.bits, kind)
            lp = dataclasses.replace(lp, inputs=(ActQuant.from_params(aq.tensor, tp), *lp.inputs[1:]))
        layers.append(lp)
    return dataclasses.replace(plan, layers=tuple(layers))


@pytest.fixture(scope="module")
def searched():
    model = tiny_vit(seed=4)
    res = onnx_mptq.quantize(model, [{"input": random_images(16, seed=1)}],
                             _cfg(w_bits=4, a_bits=4, act_symmetric=True, emission=EmissionConfig(weight_container="int8"),
                                  search=ScaleSearchConfig(grid_size=20)))
    return model, _with_twins(res.plan), res


def _emit(model, plan: QuantPlan):
    return onnx_mptq.emit_from_plan(model, plan)


def _json_round_trip(plan: QuantPlan) -> QuantPlan:
    return QuantPlan.from_json(plan.to_json())


# ---------------------------------------------------------------------------------------------
# the emission section


def test_search_records_the_configured_container(searched) -> None:
    _, _, res = searched
    # auto weight storage is resolved before emission and recorded: int8 for an opset-17 model
    assert res.plan.emission == Emission(weight_container=WeightContainer.INT8, weight_storage=WeightStorage.INT8)
    assert json.loads(res.plan.to_json())["emission"]["weight_container"] == "int8"
    assert res.emit_report.weight_container == "int8"


@pytest.mark.parametrize("field,value", [("symmetric_container", SymmetricContainer.INT8),
                                         ("range_form", RangeForm.FLOAT), ("twin_form", TwinForm.SPLIT),
                                         ("weight_container", WeightContainer.UINT8)])
def test_every_emission_choice_is_read_and_reproduced_from_json(searched, field: str, value) -> None:
    model, plan, _ = searched
    base = _emit(model, plan).model.SerializeToString()
    edited = dataclasses.replace(plan, emission=dataclasses.replace(plan.emission, **{field: value}))
    first = _emit(model, edited).model.SerializeToString()
    assert first != base, f"emission.{field} = {value.value} did not change the model"
    again = _emit(model, _json_round_trip(edited))
    assert again.model.SerializeToString() == first and again.rederived == ()


def test_cli_reemission_from_the_plan_alone_is_byte_identical(tmp_path: Path, capsys) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(tiny_vit(seed=2), src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=random_images(16, seed=3))
    q, plan = tmp_path / "q.onnx", tmp_path / "plan.json"
    # a non-default container: re-emission must take it from the plan, not from a default
    assert main(["quantize", str(src), "-o", str(q), "--calib", str(calib), "--plan-out", str(plan), "--w-bits", "8",
                 "--weight-container", "int8", "--providers", "cpu"]) == 0
    again = tmp_path / "again.onnx"
    assert main(["quantize", str(src), "-o", str(again), "--plan", str(plan), "--providers", "cpu"]) == 0
    assert again.read_bytes() == q.read_bytes()
    auto = tmp_path / "auto.onnx"
    assert main(["quantize", str(src), "-o", str(auto), "--plan", str(plan), "--weight-container", "auto",
                 "--providers", "cpu"]) == 0
    assert auto.read_bytes() != q.read_bytes()  # 8-bit codes beyond +-64: uint8 storage under auto
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# fields emission would ignore, or that contradict another: PlanError naming layer and field


def _doc(plan: QuantPlan) -> dict:
    return json.loads(plan.to_json())


def _layer_index(doc: dict, role: str) -> int:
    return next(i for i, lp in enumerate(doc["layers"]) if lp["role"] == role)


def test_a_twin_quantizer_with_a_scale_is_refused(searched) -> None:
    _, plan, _ = searched
    doc = _doc(plan)
    i = _layer_index(doc, "fc2")
    doc["layers"][i]["inputs"][0]["scale"] = 0.01
    with pytest.raises(PlanError, match=f"layer {doc['layers'][i]['unit']}: .*field scale is not used by a twin"):
        QuantPlan.from_dict(doc)
    doc = _doc(plan)
    doc["layers"][i]["inputs"][0]["symmetric"] = True
    with pytest.raises(PlanError, match="field symmetric is not used by a twin"):
        QuantPlan.from_dict(doc)


def test_a_uniform_quantizer_with_twin_fields_is_refused(searched) -> None:
    _, plan, _ = searched
    doc = _doc(plan)
    i = _layer_index(doc, "fc1")
    doc["layers"][i]["inputs"][0]["delta1"] = 0.5
    with pytest.raises(PlanError, match=f"layer {doc['layers'][i]['unit']}: .*field delta1 is not used by a uniform"):
        QuantPlan.from_dict(doc)


def test_clip_bounds_are_not_part_of_version_2(searched) -> None:
    _, plan, _ = searched
    doc = _doc(plan)
    i = _layer_index(doc, "proj")
    doc["layers"][i]["inputs"][0]["clip_max"] = 1.0
    with pytest.raises(PlanError, match=f"layer {doc['layers'][i]['unit']}: .*unknown field\\(s\\) clip_max"):
        QuantPlan.from_dict(doc)


def test_inconsistent_quantizers_and_emission_values_are_refused(searched) -> None:
    _, plan, _ = searched
    doc = _doc(plan)
    i = _layer_index(doc, "fc1")
    doc["layers"][i]["inputs"][0].update(symmetric=False, zero_point=300)
    with pytest.raises(PlanError, match=f"layer {doc['layers'][i]['unit']}: activation .*zero_point must be in"):
        QuantPlan.from_dict(doc)
    doc = _doc(plan)
    doc["emission"]["twin_form"] = "fused"
    with pytest.raises(PlanError, match="emission.twin_form: 'fused' is not one of auto, split, lattice"):
        QuantPlan.from_dict(doc)


# ---------------------------------------------------------------------------------------------
# edited bits: steps re-derived (and said so), or refused


def _codes(model: onnx.ModelProto, unit: str) -> np.ndarray:
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == unit)
    dq = next(producers[x] for x in node.input if x in producers and producers[x].op_type == "DequantizeLinear"
              and producers[x].input[0] in inits and inits[producers[x].input[0]].ndim >= 2)
    return inits[dq.input[0]].astype(np.int16) - inits[dq.input[2]].astype(np.int16)  # (K, N) - (N,): fc1 is a MatMul


def test_edited_weight_bits_get_steps_for_the_new_bits(searched, tmp_path: Path) -> None:
    model, plan, _ = searched
    plan = dataclasses.replace(plan, emission=Emission())
    doc = _doc(plan)
    i = _layer_index(doc, "fc1")
    unit = doc["layers"][i]["unit"]
    doc["layers"][i]["weight"]["bits"] = 3  # a hand edit: bits only
    edited = QuantPlan.from_dict(doc)
    res = _emit(model, edited)
    assert len(res.rederived) == 1 and res.rederived[0].startswith(f"layer {unit}: weight bits 4 -> 3")
    assert res.rederived[0] in res.report.notes
    # the same model as a plan whose scales a user re-derived by hand for 3 bits (same range)
    wq = plan.layers[i].weight
    by_hand = dataclasses.replace(plan, layers=tuple(
        dataclasses.replace(lp, weight=WeightQuant(3, tuple(float(np.float32(s * 7 / 3)) for s in wq.scales)))
        if k == i else lp for k, lp in enumerate(plan.layers)))
    want = _emit(model, by_hand)
    assert want.rederived == ()
    codes = _codes(res.model, unit)
    np.testing.assert_array_equal(codes, _codes(want.model, unit))
    lo, hi = qrange(3, True)
    assert codes.min() >= lo and codes.max() <= hi
    assert np.mean(np.abs(codes) == hi) < 0.5  # the grid covers the weight, it does not clip most of it
    # through the CLI: the command says so
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    run = subprocess.run([sys.executable, "-m", "onnx_mptq.cli", "quantize", str(src), "-o", str(tmp_path / "q.onnx"),
                          "--plan", str(path), "--providers", "cpu"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"layer {unit}: weight bits 4 -> 3" in run.stderr and "re-derived" in run.stderr


def test_edited_activation_bits_keep_the_range() -> None:
    aq = ActQuant.from_params("x", params_from_range(-0.5, 3.0, 8, False))
    edited = dataclasses.replace(aq, bits=4)  # step_bits stays 8
    plan = QuantPlan(source_digest="s", model_digest="m", layers=(), input_quant=edited)
    res = rederive_steps(plan)
    new = res.plan.input_quant
    assert new.bits == new.step_bits == 4 and len(res.notes) == 1 and "input_quant: activation x" in res.notes[0]
    old_lo, old_hi = dequantized_bounds(aq.params())
    new_lo, new_hi = dequantized_bounds(new.params())
    step = new.scale
    assert abs(new_lo - old_lo) <= step and abs(new_hi - old_hi) <= step  # the same range on the 4-bit grid
    assert rederive_steps(res.plan).plan is res.plan  # nothing left to re-derive


def test_edited_twin_bits_and_clipping_scales_are_refused(searched) -> None:
    model, plan, _ = searched
    doc = _doc(plan)
    i = _layer_index(doc, "fc2")
    doc["layers"][i]["inputs"][0]["bits"] = 6
    with pytest.raises(PlanError, match=f"layer {doc['layers'][i]['unit']}: activation .*search the layer again"):
        _emit(model, QuantPlan.from_dict(doc))
    doc = _doc(plan)
    j = _layer_index(doc, "fc1")
    doc["layers"][j]["weight"]["bits"] = 2
    doc["layers"][j]["weight"]["step_bits"] = 2  # "these scales are for 2 bits": they are 4-bit scales
    with pytest.raises(PlanError, match=f"layer {doc['layers'][j]['unit']}: field weight.scales: the 2-bit grid clips"):
        _emit(model, QuantPlan.from_dict(doc))


# ---------------------------------------------------------------------------------------------
# schema version 1


def _as_v1(plan: QuantPlan) -> dict:
    """The document version 1 (the code before this schema) wrote for ``plan``: clip bounds on
    every activation record, a twin's scale = delta1 and symmetric = (kind == gelu), no
    emission section, no step_bits."""
    doc = _doc(plan)
    doc["schema_version"] = 1
    del doc["emission"]

    def act(a: dict) -> None:
        del a["step_bits"]
        if a["scheme"] == "twin":
            tp = TwinParams(a["twin_kind"], a["bits"], a["delta1"], a["m"], a["split"])
            n = tp.levels
            a.update(symmetric=tp.kind == "gelu", scale=tp.delta1, zero_point=0,
                     clip_min=float(-n * tp.delta1 if tp.kind == "gelu" else 0.0), clip_max=float(n * tp.delta2))
        else:
            lo, hi = dequantized_bounds(ActQuant(**{k: v for k, v in a.items() if k != "scheme"}).params())
            a.update(clip_min=float(lo), clip_max=float(hi))

    for lp in doc["layers"]:
        for a in lp["inputs"]:
            act(a)
        if lp["weight"] is not None:
            del lp["weight"]["step_bits"]
    act(doc["input_quant"])
    return doc


def test_version_1_documents_are_upgraded(searched) -> None:
    model, plan, _ = searched
    # version 1 emitted with the defaults of its day, names spelled out (the verbose graph form)
    plan = dataclasses.replace(plan, emission=Emission(graph_form=GraphForm.VERBOSE))
    v1 = _as_v1(plan)
    assert any("clip_max" in a for lp in v1["layers"] for a in lp["inputs"])
    up = QuantPlan.from_dict(copy.deepcopy(v1))
    assert up == plan and up.to_json() == plan.to_json()
    assert QuantPlan.from_json(json.dumps(v1)).to_dict()["schema_version"] == 2
    assert _emit(model, up).model.SerializeToString() == _emit(model, plan).model.SerializeToString()


def test_plans_without_graph_form_re_emit_in_the_verbose_form(searched) -> None:
    """A plan written before emission.graph_form existed re-emits the bytes it made then."""
    model, plan, _ = searched
    assert plan.emission.graph_form is GraphForm.COMPACT  # new plans: the compact default
    assert _json_round_trip(plan) == plan
    doc = _doc(plan)
    del doc["emission"]["graph_form"]
    old = QuantPlan.from_dict(doc)
    assert old.emission.graph_form is GraphForm.VERBOSE
    verbose = dataclasses.replace(plan, emission=dataclasses.replace(plan.emission, graph_form=GraphForm.VERBOSE))
    assert _emit(model, old).model.SerializeToString() == _emit(model, verbose).model.SerializeToString()
    assert _emit(model, old).model.SerializeToString() != _emit(model, plan).model.SerializeToString()


def test_version_1_contradictions_name_layer_and_field(searched) -> None:
    _, plan, _ = searched
    v1 = _as_v1(plan)
    i = _layer_index(v1, "fc1")
    bad = copy.deepcopy(v1)
    bad["layers"][i]["inputs"][0]["clip_max"] *= 2  # does not match bits, scale and zero point
    with pytest.raises(PlanError, match=f"layer {v1['layers'][i]['unit']}: activation .*field clip_max"):
        QuantPlan.from_dict(bad)
    j = _layer_index(v1, "fc2")
    bad = copy.deepcopy(v1)
    bad["layers"][j]["inputs"][0]["scale"] = 0.3  # a twin's "scale" that is not its delta1
    with pytest.raises(PlanError, match=f"layer {v1['layers'][j]['unit']}: activation .*field scale"):
        QuantPlan.from_dict(bad)


# ---------------------------------------------------------------------------------------------
# the one conversion, checked against the reference's own arithmetic


@pytest.mark.parametrize("aq", [
    ActQuant.from_params("t", params_from_range(-0.7, 2.5, 4, False)),
    ActQuant.from_params("t", params_from_range(-1.5, 1.5, 6, True)),
    ActQuant.from_params("t", params_from_range(-3.0, 9.0, 8, False)),
    ActQuant.from_params("t", TwinParams("gelu", 4, 0.17 / 7, 3)),
    ActQuant.from_params("t", TwinParams("softmax", 5, 1 / 2 ** 9, 4)),
    ActQuant.from_params("t", TwinParams("softmax", 4, 0.01, 2, split=0.05)),
], ids=["u4", "s6", "u8", "gelu4", "softmax5", "softmax4_split"])
def test_params_agree_with_the_reference_arithmetic(aq: ActQuant) -> None:
    x = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 2.0
    np.testing.assert_array_equal(aq.fake_quant(x), fake_quant_operand(x, aq))
    assert ActQuant.from_params(aq.tensor, aq.params()) == aq
    assert aq.scheme is (Scheme.TWIN if aq.twin_kind is not None else Scheme.UNIFORM)


def test_weight_params_agree_with_the_reference_arithmetic() -> None:
    w = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    wq = WeightQuant(4, tuple(float(s) for s in np.linspace(0.1, 0.4, 5, dtype=np.float32)))
    np.testing.assert_array_equal(wq.fake_quant(w, 1), fake_quant_weight(w, wq, 1))
    np.testing.assert_array_equal(wq.fake_quant(w.T, 0), fake_quant_weight(w.T, wq, 0))
    assert WeightQuant.from_params(wq.params(1)) == wq
    with pytest.raises(PlanError, match="5 weight scales for 6 output channels"):
        wq.codes(w, 0)
