"""INT4 weight storage (passes/pack_int4.py): same outputs, integer kernels kept, smaller file."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import random_images, tiny_vit
from onnx import TensorProto, numpy_helper

from onnx_mptq import pipeline
from onnx_mptq.calibrate.session import make_session
from onnx_mptq.cli import main
from onnx_mptq.config import Config, EmissionConfig, OptmConfig, Providers, QuantConfig, RuntimeConfig
from onnx_mptq.plan import WeightStorage
from onnx_mptq.graph.io import load_model, opset_of, save_model
from onnx_mptq.passes.pack_int4 import INT4_OPSET, pack_int4, resolve_storage, upgrade_opset
from onnx_mptq.plan import QuantPlan
from onnx_mptq.validate import compare_outputs

CPU = RuntimeConfig(providers=Providers.CPU, threads=1)
ROOT = Path(__file__).resolve().parents[1]


def _kernels_tool():
    spec = importlib.util.spec_from_file_location("check_int_kernels", ROOT / "tools" / "check_int_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_int_kernels", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    """One tiny ViT quantized at W4A4 with today's int8 storage (opset 17), its calibration data and folder."""
    root = tmp_path_factory.mktemp("pack")
    model = tiny_vit(dim=64, mlp=128)  # weights large enough for packing to pay (>= 4096 codes)
    calib = {"input": random_images(16)}
    cfg = Config(runtime=CPU, quant=QuantConfig(w_bits=4, a_bits=4, emission=EmissionConfig(weight_storage=WeightStorage.INT8)))
    res = pipeline.quantize(model, calib, cfg)
    assert res.storage.storage is WeightStorage.INT8 and opset_of(res.model) == 17
    return model, res, root


def _weight_dqs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        src = n.input[0]
        if src in inits or (src in producers and producers[src].op_type == "Cast"):
            out.append(n)
    return out


def test_packed_model_runs_with_the_same_outputs_and_integer_kernels(emitted):
    _, res, root = emitted
    int8_model = res.model
    packed = pack_int4(int8_model, WeightStorage.INT4)
    m = packed.model
    assert packed.storage is WeightStorage.INT4 and (packed.opset_before, packed.opset_after) == (17, INT4_OPSET)
    assert opset_of(m) == INT4_OPSET and m.ir_version >= 10
    # every weight DQ now reads Cast(INT4 initializer -> int8); the codes are the int8 ones, packed
    inits = {t.name: t for t in m.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in int8_model.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    dqs = _weight_dqs(m)
    assert len(dqs) == len(packed.packed) == res.emit_report.weight_dequantize_nodes > 0
    old_dq = {n.name: n for n in int8_model.graph.node}
    for n in dqs:
        cast = producers[n.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.INT8
        t = inits[cast.input[0]]
        assert t.data_type == TensorProto.INT4 and len(t.raw_data) == math.ceil(math.prod(t.dims) / 2)
        np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), old[old_dq[n.name].input[0]])
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT8
                   for n in m.graph.node)  # no weight codes left in int8
    # same outputs as the int8 form: ORT with graph optimizations on (Cast folded) and off (Cast run)
    feeds = [{"input": random_images(8, seed=s)} for s in (3, 4)]
    for optimize in (True, False):
        assert compare_outputs(int8_model, m, feeds, CPU, optimize=optimize).max_abs == 0.0
    # integer kernels remain: the graph ORT runs has the int8 form's integer matmuls, no extra float one
    tool = _kernels_tool()
    p8, p4 = save_model(int8_model, root / "int8.onnx"), save_model(m, root / "int4.onnx")
    k8, k4 = tool.count_kernels(p8), tool.count_kernels(p4)
    assert k4["integer"] == k8["integer"] and sum(k4["integer"].values()) > 0
    assert k4["float_ops"] == k8["float_ops"]
    # and the file is smaller by the packed bytes
    assert p4.stat().st_size < p8.stat().st_size
    p21 = save_model(upgrade_opset(int8_model), root / "int8_opset21.onnx")  # the same opset, int8 codes
    assert p21.stat().st_size - p4.stat().st_size >= 0.9 * packed.saved_bytes


def test_int4_nibbles_match_a_numpy_packing():
    codes = np.resize(np.array([-8, 7, 3, 1, -1, 0, 5, -7, 2], np.int8), (25, 9))  # 225 codes -> 113 bytes
    w = onnx.helper.make_tensor("w", TensorProto.INT8, codes.shape, codes.ravel().tolist())
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=1)], "g", [],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, codes.shape)],
        [w, numpy_helper.from_array(np.full(9, 0.5, np.float32), "s"), numpy_helper.from_array(np.zeros(9, np.int8), "z")])
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    res = pack_int4(model)
    (t,) = [t for t in res.model.graph.initializer if t.data_type == TensorProto.INT4]
    flat = codes.ravel().astype(np.int16) & 0xF  # two's complement nibbles
    flat = np.append(flat, 0)  # odd count: the last high nibble is 0
    want = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()  # element 2i low, 2i+1 high
    assert t.raw_data == want
    assert res.opset_before == res.opset_after == 21  # already 21: no conversion
    sess = make_session(res.model, CPU)
    np.testing.assert_array_equal(sess.run({})[0], codes.astype(np.float32) * 0.5)


def test_what_is_not_packed_and_why(emitted):
    _, res, _ = emitted
    cfg8 = Config(runtime=CPU, quant=QuantConfig(w_bits=8, a_bits=8, emission=EmissionConfig(weight_storage=WeightStorage.INT8, weight_container="int8")))
    w8 = pipeline.quantize(emitted[0], {"input": random_images(16)}, cfg8).model
    r = pack_int4(w8, WeightStorage.INT4)
    assert r.packed == () and r.skipped
    assert all(s.reason.startswith("codes span [") and s.reason.endswith("]: more than 4 bits") for s in r.skipped)
    cfg_u8 = Config(runtime=CPU, quant=QuantConfig(w_bits=4, a_bits=4, emission=EmissionConfig(weight_storage=WeightStorage.INT8, weight_container="uint8")))
    u8 = pipeline.quantize(emitted[0], {"input": random_images(16)}, cfg_u8).model
    r = pack_int4(u8, WeightStorage.INT4)
    assert r.packed == () and all(s.reason == "codes stored as uint8 (weight_container), not int8" for s in r.skipped)


def test_packing_twice_is_a_no_op_and_int8_keeps_the_model(emitted):
    _, res, _ = emitted
    once = pack_int4(res.model, WeightStorage.INT4)
    twice = pack_int4(once.model, WeightStorage.INT4)
    assert twice.packed == () and twice.model.SerializeToString() == once.model.SerializeToString()
    same = pack_int4(res.model, WeightStorage.INT8)
    assert same.storage is WeightStorage.INT8 and same.model.SerializeToString() == res.model.SerializeToString()
    auto = pack_int4(res.model, WeightStorage.AUTO)  # opset 17: today's form, and the summary says why
    assert auto.storage is WeightStorage.INT8 and auto.model.SerializeToString() == res.model.SerializeToString()
    assert "opset 17 < 21" in auto.summary() and "--weight-storage int4" in auto.summary()  # how to get the small file
    up = upgrade_opset(res.model)
    auto21 = pack_int4(up, WeightStorage.AUTO)  # already 21: auto packs without converting
    assert auto21.storage is WeightStorage.INT4 and not auto21.upgraded and auto21.packed


def test_resolve_storage():
    assert resolve_storage("auto", 17) is WeightStorage.INT8
    assert resolve_storage("auto", 21) is WeightStorage.INT4
    assert resolve_storage("int4", 17) is WeightStorage.INT4
    assert resolve_storage("int4", 17, packable=False) is WeightStorage.INT8  # no opset change for nothing
    assert resolve_storage("int8", 21) is WeightStorage.INT8


def test_choice_is_recorded_in_the_plan_and_reemission_reproduces_bytes(emitted, tmp_path):
    model, _, _ = emitted
    cfg = Config(runtime=CPU, quant=QuantConfig(w_bits=4, a_bits=4, emission=EmissionConfig(weight_storage=WeightStorage.INT4)))
    res = pipeline.quantize(model, {"input": random_images(16)}, cfg)
    assert res.plan.emission.weight_storage is WeightStorage.INT4 and opset_of(res.model) == INT4_OPSET
    plan = QuantPlan.from_json(res.plan.to_json())
    assert plan.emission.weight_storage is WeightStorage.INT4
    again = pipeline.emit_from_plan(model, plan).model  # no flag: the plan's record decides
    assert again.SerializeToString() == res.model.SerializeToString()
    edited = dataclasses.replace(plan, emission=dataclasses.replace(plan.emission, weight_storage=WeightStorage.INT8))  # a hand edit back to int8
    int8 = pipeline.emit_from_plan(model, edited).model
    assert opset_of(int8) == 17 and int8.ByteSize() > res.model.ByteSize()


def test_cli_weight_storage_flag_and_file_size_line(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(tiny_vit(dim=64, mlp=128), model)
    calib = tmp_path / "c.npz"
    np.savez(calib, input=random_images(16))
    sizes = {}
    for ws in ("int8", "int4"):
        out = tmp_path / f"q_{ws}.onnx"
        assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--w-bits", "4", "--a-bits", "4",
                     "--weight-storage", ws, "--plan-out", str(tmp_path / f"{ws}.json"), "--providers", "cpu"]) == 0
        text = capsys.readouterr().out
        sizes[ws] = out.stat().st_size
        fp = model.stat().st_size
        assert f"file size: {sizes[ws] / 1e6:.3f} MB (FP32 {fp / 1e6:.3f} MB: {100 * sizes[ws] / fp:.1f} %)" in text
        assert json.loads((tmp_path / f"{ws}.json").read_text())["emission"]["weight_storage"] == ws
    assert "weight storage: int4 (" in text and "opset 17 -> 21 (--weight-storage int4)" in text
    assert sizes["int4"] < sizes["int8"]
    assert opset_of(load_model(tmp_path / "q_int4.onnx")) == INT4_OPSET


@pytest.mark.slow
@pytest.mark.torch
def test_timm_deit_packed_file_is_at_the_floor(tiny_onnx, tmp_path):
    """On a timm DeiT export: the W4A4 int4 file is its int8 form minus half the code bytes (and
    the dropped zero points), up to the Cast nodes' cost; a W8A8 int4 request changes nothing."""
    src = load_model(tiny_onnx("deit"))
    shape = [d.dim_value for d in src.graph.input[0].type.tensor_type.shape.dim[1:]]
    calib = {"input": np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)}
    q = QuantConfig(w_bits=4, a_bits=4, optm=OptmConfig(enabled=False), emission=EmissionConfig(weight_storage=WeightStorage.INT8))
    int8 = pipeline.quantize(src, calib, Config(runtime=CPU, quant=q)).model
    packed = pack_int4(int8, WeightStorage.INT4)
    assert packed.packed and not packed.skipped
    p8 = save_model(upgrade_opset(int8), tmp_path / "int8.onnx").stat().st_size
    p4 = save_model(packed.model, tmp_path / "int4.onnx").stat().st_size
    zero_points = sum(w.shape[-1] if len(w.shape) == 2 else w.shape[0] for w in packed.packed)  # upper bound
    cast_cost = sum(3 * len(w.codes) + 64 for w in packed.packed)
    assert p8 - packed.saved_bytes - zero_points - cast_cost <= p4 <= p8 - packed.saved_bytes + cast_cost
    w8 = pipeline.quantize(src, calib, Config(runtime=CPU, quant=dataclasses.replace(
        q, w_bits=8, a_bits=8, emission=EmissionConfig(weight_storage=WeightStorage.INT4))))
    assert w8.plan.emission.weight_storage is WeightStorage.INT8 and opset_of(w8.model) == opset_of(src)


def _graph_bytes(m: onnx.ModelProto) -> int:
    """Bytes of the file that are not initializers: nodes, names, value_info, metadata."""
    return m.ByteSize() - sum(t.ByteSize() for t in m.graph.initializer)


def test_compact_graph_form_brings_the_w4a4_file_nearer_half_the_w8a8_one(emitted):
    """W4A4 (int4) / W8A8 file-size ratio on a tiny ViT, compact vs verbose graph form (the same
    plans): the compact form's ratio is lower, its graph bytes fall by more than the value_info it
    drops, and the packed codes are half the int8 ones."""
    from onnx_mptq.plan import GraphForm

    model, _, _ = emitted
    calib = {"input": random_images(16)}
    plans = {}
    for b in (8, 4):
        q = QuantConfig(w_bits=b, a_bits=b, optm=OptmConfig(enabled=False),
                        emission=EmissionConfig(weight_storage=WeightStorage.INT4))
        plans[b] = pipeline.quantize(model, calib, Config(runtime=CPU, quant=q)).plan
    files = {}
    for form in GraphForm:
        for b, p in plans.items():
            plan = dataclasses.replace(p, emission=dataclasses.replace(p.emission, graph_form=form))
            files[form, b] = pipeline.emit_from_plan(model, plan).model
    ratio = {f: files[f, 4].ByteSize() / files[f, 8].ByteSize() for f in GraphForm}
    assert ratio[GraphForm.COMPACT] < ratio[GraphForm.VERBOSE]
    for b in (8, 4):
        c, v = files[GraphForm.COMPACT, b], files[GraphForm.VERBOSE, b]
        vi = sum(x.ByteSize() for x in v.graph.value_info)
        assert vi > 0 and _graph_bytes(c) < _graph_bytes(v) - vi
    # the int4 codes are half the int8 ones (to the byte, up to odd sizes) in both forms
    codes = {b: sum(len(t.raw_data) for t in files[GraphForm.COMPACT, b].graph.initializer
                    if t.data_type in (TensorProto.INT4, TensorProto.INT8, TensorProto.UINT8) and len(t.dims) >= 2)
             for b in (8, 4)}
    assert codes[4] <= codes[8] / 2 + len(plans[4].layers)


@pytest.mark.slow
@pytest.mark.torch
def test_timm_deit_tiny_w4a4_file_is_at_most_55_percent_of_w8a8(tmp_path):
    """Issue 16's size target on a full-size timm DeiT-T (random weights, so no download): the
    W4A4 int4 file, compact graph form, is at most 55 % of the W8A8 file (BENCHMARKS.md section 9:
    54.2 % with searched plans; the verbose form was 55.7 %)."""
    pytest.importorskip("timm")
    from onnx_mptq.export import export_timm

    src = tmp_path / "deit_t.onnx"
    export_timm("deit_tiny_patch16_224", src, runtime=CPU, check_samples=1)
    calib = {"input": np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)}
    size = {}
    for b in (8, 4):
        q = QuantConfig(w_bits=b, a_bits=b, optm=OptmConfig(enabled=False),
                        emission=EmissionConfig(weight_storage=WeightStorage.INT4))
        res = pipeline.quantize(load_model(src), calib, Config(runtime=CPU, quant=q))
        size[b] = save_model(res.model, tmp_path / f"w{b}.onnx").stat().st_size
    assert size[4] <= 0.55 * size[8], size[4] / size[8]


# ---------------------------------------------------------------------------------------------
# float constants as float16 (passes/constants.py): rounded before calibration, stored exactly


def _constants_graph() -> onnx.ModelProto:
    """x (1, 4, 32) -> LayerNorm(gamma, beta) -> + pos -> MatMul(Transpose(Wt)) + b -> Div sqrt ->
    Mul small -> + big; plus a per-channel DQ (its scale), an int64 shape and an overridable initializer."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {
        "gamma": f(32), "beta": f(32) * 1e-3, "pos": f(1, 4, 32), "Wt": f(32, 32), "b": f(32),
        "sqrt": np.float32(2.0), "small": f(8), "big": np.full(32, 1e5, np.float32), "shape": np.array([4, 32], np.int64),
        "codes": rng.integers(-7, 8, (32, 32)).astype(np.int8), "wscale": np.abs(f(32)) + 0.1, "over": f(32),
    }
    n = onnx.helper.make_node
    nodes = [
        n("Tile", ["small", "rep"], ["small_b"], name="tile"),
        n("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        n("Add", ["ln", "pos"], ["e"], name="add_pos"),
        n("Transpose", ["Wt"], ["W"], name="tr", perm=[1, 0]),
        n("MatMul", ["e", "W"], ["mm"], name="mm"),
        n("Add", ["mm", "b"], ["yb"], name="add_b"),
        n("Div", ["yb", "sqrt"], ["yd"], name="div"),
        n("Reshape", ["yd", "shape"], ["yr"], name="rs"),
        n("Add", ["yr", "big"], ["yg"], name="add_big"),
        n("DequantizeLinear", ["codes", "wscale"], ["wq"], name="dq", axis=1),
        n("MatMul", ["yg", "wq"], ["y0"], name="mm2"),
        n("Add", ["y0", "over"], ["y1"], name="add_over"),
        n("Mul", ["y1", "small_b"], ["y"], name="mul"),
    ]
    inits["rep"] = np.array([4], np.int64)
    g = onnx.helper.make_graph(
        nodes, "c", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32]),
                     onnx.helper.make_tensor_value_info("over", TensorProto.FLOAT, [32])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def test_which_float_constants_are_rounded_and_which_are_not():
    from onnx_mptq.passes.constants import float_constants, round_constants, to_float16_values

    model = _constants_graph()
    onnx.checker.check_model(model)
    c = float_constants(model)
    assert c.names == ("gamma", "beta", "pos", "b")  # LayerNorm, embedding, bias; in initializer order
    why = {d.tensor: d.reason for d in c.declined}
    assert why == {"Wt": "a weight (MatMul mm input 1)", "big": why["big"], "wscale": "read by DequantizeLinear dq",
                   "over": "also a graph input"}
    assert why["big"].startswith("values beyond float16")
    # scalars, short vectors (< 32 elements: sqrt, small) and integer tensors are not even candidates
    r = round_constants(model)
    assert r.rounded == c.names and 0 < r.max_rel_change <= 2.0 ** -11
    before = {t.name: t for t in model.graph.initializer}
    for t in r.model.graph.initializer:
        old = numpy_helper.to_array(before[t.name])
        if t.name in c.names:
            new = numpy_helper.to_array(t)
            assert new.dtype == np.float32 and new.shape == old.shape and not np.array_equal(new, old)
            np.testing.assert_array_equal(new, old.astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(to_float16_values(old), new)
        else:
            assert t.SerializeToString() == before[t.name].SerializeToString()
    assert list(r.model.graph.node) == list(model.graph.node)  # the graph itself is untouched
    assert round_constants(r.model).model.SerializeToString() == r.model.SerializeToString()  # twice: a no-op
    assert model.SerializeToString() == _constants_graph().SerializeToString()  # the input is not mutated


def test_store_float16_is_exact_and_keeps_what_is_not_float16():
    from onnx_mptq.passes.constants import round_constants, store_float16

    rounded = round_constants(_constants_graph()).model
    # a constant changed after the rounding (a compensated bias b' + delta) is not float16: kept float32
    for t in rounded.graph.initializer:
        if t.name == "b":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + np.float32(1e-4), "b"))
    s = store_float16(rounded)
    assert s.stored == ("gamma", "beta", "pos") and [k.tensor for k in s.kept] == ["b"]
    inits = {t.name: t for t in s.model.graph.initializer}
    casts = [n for n in s.model.graph.node if n.op_type == "Cast"]
    assert [n.output[0] for n in casts] == list(s.stored)  # the model's own names, produced by the Casts
    old = {t.name: numpy_helper.to_array(t) for t in rounded.graph.initializer}
    for n in casts:
        h = inits[n.input[0]]
        assert h.data_type == TensorProto.FLOAT16 and n.attribute[0].i == TensorProto.FLOAT
        np.testing.assert_array_equal(numpy_helper.to_array(h).astype(np.float32), old[n.output[0]])
    assert s.saved_bytes == 2 * (32 + 32 + 128)
    assert s.model.ByteSize() < rounded.ByteSize()
    feeds = [{"x": np.random.default_rng(1).standard_normal((1, 4, 32)).astype(np.float32)}]
    for optimize in (True, False):
        assert compare_outputs(rounded, s.model, feeds, CPU, optimize=optimize).max_abs == 0.0
    assert store_float16(s.model).model.SerializeToString() == s.model.SerializeToString()  # twice: a no-op


@pytest.fixture(scope="module")
def f16_pair(emitted):
    """The tiny ViT at W4A4 (int4 storage) with float32 and with float16 constants."""
    model = emitted[0]
    calib = {"input": random_images(16)}
    out = {}
    for cs in ("float32", "float16"):
        q = QuantConfig(w_bits=4, a_bits=4, emission=EmissionConfig(weight_storage=WeightStorage.INT4, constant_storage=cs))
        out[cs] = pipeline.quantize(model, calib, Config(runtime=CPU, quant=q))
    return model, out


def _rounded_work(model, plan, rounded: bool = True):
    """The float graph a float16-constants plan was made on, rebuilt: smoothed, then rounded."""
    from onnx_mptq.graph.analysis import analyze, prepare
    from onnx_mptq.passes.constants import round_constants
    from onnx_mptq.passes.smooth import apply_smoothing

    work = prepare(model)
    work = prepare(apply_smoothing(work, plan.smoothing, analyze(work, prepared=True)).model)
    return round_constants(work).model if rounded else work


def test_float16_constants_plan_is_exact_for_its_rounded_graph(f16_pair, tmp_path):
    from onnx_mptq.graph.analysis import analyze
    from onnx_mptq.graph.io import graph_digest
    from onnx_mptq.passes.emit_qdq import emit_qdq
    from onnx_mptq.plan import ConstantStorage

    model, res = f16_pair
    r16, r32 = res["float16"], res["float32"]
    plan = r16.plan
    assert plan.emission.constant_storage is ConstantStorage.FLOAT16
    assert r32.plan.emission.constant_storage is ConstantStorage.FLOAT32
    work = _rounded_work(model, plan)
    assert graph_digest(work) == plan.model_digest  # the plan was made on the rounded graph
    m = r16.model
    inits = {t.name: t for t in m.graph.initializer}
    casts = [n for n in m.graph.node if n.op_type == "Cast" and inits.get(n.input[0]) is not None
             and inits[n.input[0]].data_type == TensorProto.FLOAT16]
    assert len(casts) >= 10  # biases, LayerNorms, position embedding, cls token of the tiny ViT
    work_inits = {t.name: numpy_helper.to_array(t) for t in work.graph.initializer}
    for n in casts:  # the stored values are the plan's graph's, bit for bit
        np.testing.assert_array_equal(numpy_helper.to_array(inits[n.input[0]]).astype(np.float32), work_inits[n.output[0]])
    assert not [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 1
                and t.dims[0] >= 32 and t.name in work_inits]  # no bias / LayerNorm vector left float32
    # the same plan written with float32 constants (the rounded graph's values as float32): the same outputs
    as32 = dataclasses.replace(plan, emission=dataclasses.replace(plan.emission, constant_storage=ConstantStorage.FLOAT32))
    plain = pack_int4(emit_qdq(work, as32, analyze(work, prepared=True)).model, WeightStorage.INT4).model
    feeds = [{"input": random_images(8, seed=s)} for s in (5, 6)]
    for optimize in (True, False):
        assert compare_outputs(plain, m, feeds, CPU, optimize=optimize).max_abs == 0.0
    # against its rounded float graph the quantized model errs as the float32-constants one does
    # against its own graph (the error is the quantization's, not the rounding's): rms within 1.5x
    def rms_rel(q, f):
        a, b = make_session(q, CPU).run(feeds[0])[0], make_session(f, CPU).run(feeds[0])[0]
        return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))

    work32 = _rounded_work(model, r32.plan, rounded=False)  # the float32 plan's graph: smoothed, not rounded
    assert graph_digest(work32) == r32.plan.model_digest
    e16, e32 = rms_rel(m, work), rms_rel(r32.model, work32)
    assert e16 < 1.5 * e32 and e32 < 1.5 * e16, (e16, e32)
    # the integer kernels are the float32-constants file's, and the file is smaller
    tool = _kernels_tool()
    p16, p32 = save_model(m, tmp_path / "c16.onnx"), save_model(r32.model, tmp_path / "c32.onnx")
    k16, k32 = tool.count_kernels(p16), tool.count_kernels(p32)
    assert k16["integer"] == k32["integer"] and sum(k16["integer"].values()) > 0 and k16["float_ops"] == k32["float_ops"]
    assert p16.stat().st_size < p32.stat().st_size
    # validation is against the user's unrounded model
    assert graph_digest(model) == plan.source_digest


def test_float16_constants_plan_round_trip_and_byte_identical_reemission(f16_pair):
    from onnx_mptq.plan import ConstantStorage

    model, res = f16_pair
    for cs, r in res.items():
        doc = json.loads(r.plan.to_json())
        assert doc["emission"]["constant_storage"] == cs
        plan = QuantPlan.from_json(r.plan.to_json())
        assert plan == r.plan
        assert pipeline.emit_from_plan(model, plan).model.SerializeToString() == r.model.SerializeToString()
    # a plan written before the field existed was made with float32 constants and re-emits the same bytes
    doc = json.loads(res["float32"].plan.to_json())
    del doc["emission"]["constant_storage"]
    old = QuantPlan.from_dict(doc)
    assert old.emission.constant_storage is ConstantStorage.FLOAT32
    assert pipeline.emit_from_plan(model, old).model.SerializeToString() == res["float32"].model.SerializeToString()
    # a float16 plan edited to float32 no longer matches its graph: refused, not silently re-rounded
    doc = json.loads(res["float16"].plan.to_json())
    doc["emission"]["constant_storage"] = "float32"
    from onnx_mptq.errors import PlanError

    with pytest.raises(PlanError, match="did not reproduce the graph the plan was made for"):
        pipeline.emit_from_plan(model, QuantPlan.from_dict(doc))


def test_cli_constant_storage_flag_summary_and_plan_mismatch(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(tiny_vit(dim=64, mlp=128), model)
    calib = tmp_path / "c.npz"
    np.savez(calib, input=random_images(16))
    base = ["quantize", str(model), "--calib", str(calib), "--w-bits", "4", "--a-bits", "4", "--providers", "cpu"]
    assert main([*base, "-o", str(tmp_path / "q32.onnx")]) == 0
    text = capsys.readouterr().out
    assert "float constants: float32 (" in text and "--constant-storage float16 halves them" in text
    plan = tmp_path / "p16.json"
    assert main([*base, "-o", str(tmp_path / "q16.onnx"), "--constant-storage", "float16", "--plan-out", str(plan)]) == 0
    text = capsys.readouterr().out
    assert "stored float16 + Cast (" in text
    assert (tmp_path / "q16.onnx").stat().st_size < (tmp_path / "q32.onnx").stat().st_size
    out = tmp_path / "re.onnx"
    assert main(["quantize", str(model), "-o", str(out), "--plan", str(plan), "--constant-storage", "float32"]) == 2
    err = capsys.readouterr().err
    assert f"{plan}: it was made with float16 constants" in err and "needs a new plan" in err and not out.exists()
    assert main(["quantize", str(model), "-o", str(out), "--plan", str(plan), "--constant-storage", "float16"]) == 0
    assert out.read_bytes() == (tmp_path / "q16.onnx").read_bytes()
