"""Graph analysis: units, roles, LayerNorms, activations, SQ-b foldability, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphs import mlp_only, tiny_vit
from onnx_mptq.cli import main
from onnx_mptq.errors import UnsupportedModelError
from onnx_mptq.graph.analysis import Activation, ModelAnalysis, Role, analyze

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR = SHARED / "cifar10-vit" / "vit_cifar10_fp32.onnx"
MNIST = SHARED / "mnist-vit" / "vit_mnist_fp32.onnx"


def roles(a: ModelAnalysis) -> dict[str, int]:
    return a.summary()


@pytest.mark.parametrize("ln", ["op", "decomposed"])
@pytest.mark.parametrize("act", ["gelu_erf", "gelu_tanh", "relu"])
def test_tiny_vit_units_and_roles(ln: str, act: str) -> None:
    a = analyze(tiny_vit(ln=ln, act=act, opset=17 if ln == "op" else 14))
    assert roles(a) == {"patch_embed": 1, "qkv": 2, "attn_qk": 2, "attn_av": 2, "proj": 2, "fc1": 2, "fc2": 2, "head": 1}
    kinds = {u.activation for u in a.by_role(Role.FC2)}
    assert kinds == {{"gelu_erf": Activation.GELU_ERF, "gelu_tanh": Activation.GELU_TANH, "relu": Activation.RELU}[act]}
    assert all(u.activation is Activation.SOFTMAX for u in a.by_role(Role.ATTN_AV))
    # pre-norm: every LN feeds only Linears and folds; qkv/fc1/head are fed by an LN
    assert len(a.layernorms) == 5
    assert all(ln_.form == ("op" if ln == "op" else "decomposed") for ln_ in a.layernorms)
    assert all(ln_.foldable and ln_.reason is None for ln_ in a.layernorms)
    for u in a.by_role(Role.QKV, Role.FC1, Role.HEAD):
        assert u.layernorm is not None
    assert [u.block for u in a.by_role(Role.QKV)] == [0, 1]
    head = a.by_role(Role.HEAD)[0]
    assert head.op_type == "Gemm" and head.weight_transposed and (head.in_features, head.out_features) == (16, 5)


@pytest.mark.parametrize("act,kind,opset", [
    ("gelu_op", Activation.GELU, 20), ("gelu_op_tanh", Activation.GELU_TANH, 20),
    ("gelu_sigmoid", Activation.GELU_SIGMOID, 17), ("gelu_erf_half_first", Activation.GELU_ERF, 17),
])
def test_every_gelu_form_is_found_and_gets_an_optm_option(act: str, kind: Activation, opset: int) -> None:
    """The Gelu op (exact / tanh), the sigmoid approximation and an erf chain in another operand
    order are all recognised, and OPT-m searches a twin quantizer for the fc2 behind them."""
    from onnx_mptq.calibrate.capture import capture_unit_inputs
    from onnx_mptq.config import Config, QuantConfig, RuntimeConfig, ScaleSearchConfig
    from onnx_mptq.search.scales import search_scales

    from graphs import random_images

    m = tiny_vit(act=act, opset=opset)
    a = analyze(m)
    assert {u.activation for u in a.by_role(Role.FC2)} == {kind}
    cap = capture_unit_inputs(m, a, [{"input": random_images(8, seed=3)}], RuntimeConfig(), tokens_per_layer=64,
                              progress=False)
    options = search_scales(m, a, cap, Config(quant=QuantConfig(w_bits=4, a_bits=4, search=ScaleSearchConfig(grid_size=10))),
                            source_digest=a.model_digest, progress=False).twin_options
    assert {n for n, o in options.items() if o.kind == "gelu"} == {u.name for u in a.by_role(Role.FC2)}
    # a ReLU MLP gets none (only the softmax operands)
    r = analyze(tiny_vit(act="relu"))
    assert {u.activation for u in r.by_role(Role.FC2)} == {Activation.RELU}


def test_post_norm_layernorms_are_not_foldable_with_reason() -> None:
    a = analyze(tiny_vit(post_norm=True, act="relu"))
    inner = [ln for ln in a.layernorms if ln.consumers and not ln.foldable]
    assert len(inner) == 3  # the ones that feed the next qkv/fc1 also feed a residual Add
    for ln in inner:
        assert ln.reason.startswith("its output also feeds the residual Add (Add ")
    last = [ln for ln in a.layernorms if not ln.consumers]
    assert last and all(ln.reason == "feeds no quantizable Linear" for ln in last)


def test_unnamed_nodes_get_unique_names() -> None:
    a = analyze(tiny_vit(name_nodes=False, qkv_bias=False))
    names = [u.name for u in a.units]
    assert all(names) and len(set(names)) == len(names)
    assert all(u.bias is None for u in a.by_role(Role.QKV))


def test_layernorm_output_that_is_a_graph_output_is_declined() -> None:
    m = tiny_vit()
    a0 = analyze(m)
    ln = a0.layernorms[0]
    m.graph.output.append(helper.make_tensor_value_info(ln.output, TensorProto.FLOAT, None))
    a = analyze(m)
    assert a.layernorm(ln.name).reason == "its output is also a graph output"
    assert not a.layernorm(ln.name).foldable


def test_weight_shared_outside_the_group_is_declined() -> None:
    m = tiny_vit()
    a0 = analyze(m)
    fc1 = a0.by_role(Role.FC1)[0]
    # another node reads fc1's weight: a MatMul of the proj output, exposed as a graph output
    proj = a0.by_role(Role.PROJ)[0]
    m.graph.node.append(helper.make_node("MatMul", [proj.output, fc1.weight], ["extra"], name="extra_mm"))
    m.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    a = analyze(m)
    ln = a.layernorm(a.unit(fc1.name).layernorm)
    assert not ln.foldable
    assert ln.reason == f"weight {fc1.weight} of {fc1.name} is shared with node extra_mm outside the group"


def test_not_a_transformer() -> None:
    with pytest.raises(UnsupportedModelError, match="not a transformer: no Q @ K\\^T matmul feeding a Softmax; no Softmax @ V matmul"):
        analyze(mlp_only())


def test_analysis_does_not_mutate_and_round_trips() -> None:
    m = tiny_vit(name_nodes=False)
    before = m.SerializeToString()
    a = analyze(m)
    assert m.SerializeToString() == before
    assert ModelAnalysis.from_json(a.to_json()) == a


@pytest.mark.shared
@pytest.mark.skipif(not CIFAR.exists(), reason="shared data missing")
def test_cifar10_vit_post_norm_relu() -> None:
    a = analyze(onnx.load(str(CIFAR)))
    assert roles(a) == {"patch_embed": 1, "qkv": 6, "attn_qk": 6, "attn_av": 6, "proj": 6, "fc1": 6, "fc2": 6, "head": 1}
    assert {u.activation for u in a.by_role(Role.FC2)} == {Activation.RELU}
    fed = [ln for ln in a.layernorms if ln.consumers]
    # 11 block LNs feed the next qkv/fc1 and the residual; the head LN folds
    assert sum(not ln.foldable for ln in fed) == 11
    assert all("residual Add" in ln.reason for ln in fed if not ln.foldable)
    head = a.by_role(Role.HEAD)[0]
    assert head.op_type == "Gemm" and a.layernorm(head.layernorm).foldable
    assert a.by_role(Role.PATCH_EMBED)[0].op_type == "Conv"


@pytest.mark.shared
@pytest.mark.skipif(not MNIST.exists(), reason="shared data missing")
def test_mnist_vit_pre_norm_gelu_qkv_without_bias() -> None:
    a = analyze(onnx.load(str(MNIST)))
    assert roles(a) == {"patch_embed": 1, "qkv": 6, "attn_qk": 6, "attn_av": 6, "proj": 6, "fc1": 6, "fc2": 6, "head": 2}
    assert all(u.bias is None for u in a.by_role(Role.QKV))
    assert {u.activation for u in a.by_role(Role.FC2)} == {Activation.GELU_ERF}
    assert all(ln.foldable for ln in a.layernorms) and len(a.layernorms) == 12
    pe = a.by_role(Role.PATCH_EMBED)[0]
    assert pe.op_type == "MatMul" and pe.in_features == 49


@pytest.mark.shared
@pytest.mark.skipif(not MNIST.exists(), reason="shared data missing")
def test_cli_inspect_json(capsys) -> None:
    assert main(["inspect", str(MNIST), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "model_analysis"
    assert all({"name", "op_type", "role"} <= set(u) for u in doc["units"])
    assert len(doc["units"]) == 39


def test_cli_inspect_errors(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"onnx-mptq: error: {bad}: not a readable ONNX model") and "\n" not in err
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    p = tmp_path / "mlp.onnx"
    onnx.save(mlp_only(), str(p))
    assert main(["inspect", str(p)]) == 2
    assert "not a transformer" in capsys.readouterr().err


# ---- timm exports (random weights) ------------------------------------------------------------

EXPECTED = {
    "vit": {"patch_embed": 1, "qkv": 2, "attn_qk": 2, "attn_av": 2, "proj": 2, "fc1": 2, "fc2": 2, "head": 1},
    "deit": {"patch_embed": 1, "qkv": 2, "attn_qk": 2, "attn_av": 2, "proj": 2, "fc1": 2, "fc2": 2, "head": 1},
    "deit_distilled": {"patch_embed": 1, "qkv": 2, "attn_qk": 2, "attn_av": 2, "proj": 2, "fc1": 2, "fc2": 2, "head": 2},
}


@pytest.mark.torch
@pytest.mark.parametrize("variant,kind", [
    pytest.param(v, k, marks=() if (v, k) in {("o17", "vit"), ("o17", "deit_distilled"), ("o14", "swin")}
                 else pytest.mark.slow)  # the rest (dynamo: test_export proves the exporter): more exports
    for v in ("o17", "o14", "dynamo") for k in ("vit", "deit", "deit_distilled", "swin")])
def test_timm_exports(kind: str, variant: str, tiny_onnx) -> None:
    opset = {"o17": 17, "o14": 14, "dynamo": 18}[variant]
    path = tiny_onnx(kind, opset, dynamo=variant == "dynamo")
    if path is None:
        pytest.skip("the dynamo exporter failed on this model")
    a = analyze(onnx.load(str(path)))
    s = roles(a)
    if kind in EXPECTED:
        assert s == EXPECTED[kind]
    else:  # swin: qkv/proj/fc1/fc2 per block, a patch-merging reduction between stages
        blocks = s["attn_qk"]
        assert blocks >= 2 and s["attn_av"] == blocks
        for r in ("qkv", "proj", "fc1", "fc2"):
            assert s[r] == blocks, (r, s)
        assert s["reduction"] >= 1 and s["head"] == 1 and s["patch_embed"] == 1
    fed = [ln for ln in a.layernorms if ln.consumers]
    assert fed and all(ln.foldable for ln in fed), [(ln.name, ln.reason) for ln in fed if not ln.foldable]
    assert all(u.layernorm for u in a.by_role(Role.QKV, Role.FC1))
    assert {u.activation for u in a.by_role(Role.FC2)} <= {Activation.GELU_ERF, Activation.GELU}
    if variant == "o14":
        assert all(ln.form == "decomposed" for ln in a.layernorms)
    else:
        assert all(ln.form == "op" for ln in a.layernorms)


# ---- the ViT family's variants as small graphs (issue 17) --------------------------------------

PLAIN = {"patch_embed": 1, "qkv": 2, "attn_qk": 2, "attn_av": 2, "proj": 2, "fc1": 2, "fc2": 2, "head": 1}


@pytest.mark.parametrize("attn", ["rel_bias", "rope", "xca", "sdpa", "talking_heads"])
def test_attention_variants_are_attention(attn: str) -> None:
    """Relative-position bias, RoPE, cross-covariance, the dynamo exporter's split scale and
    talking heads: every block's two matmuls are attn_qk / attn_av, the projections keep their
    roles, nothing is left in float."""
    a = analyze(tiny_vit(attn=attn))
    want = dict(PLAIN, **({"talking_heads": 4} if attn == "talking_heads" else {}))
    assert roles(a) == want
    assert not [n for n in a.notes if "left in float" in n]
    qk, av = a.by_role(Role.ATTN_QK), a.by_role(Role.ATTN_AV)
    assert [u.block for u in qk] == [u.block for u in av] == [0, 1]
    # the probabilities reach P @ V directly except behind a talking-heads mixer (no OPT-m twin there)
    assert {u.activation for u in av} == ({None} if attn == "talking_heads" else {Activation.SOFTMAX})
    if attn == "talking_heads":
        mixers = a.by_role(Role.TALKING_HEADS)
        assert all((u.in_features, u.out_features) == (2, 2) for u in mixers)
        assert {u.activation for u in mixers} == {None, Activation.SOFTMAX}  # one before, one after Softmax


def test_attention_matmul_without_softmax_is_declined_with_reason() -> None:
    m = tiny_vit()
    a0 = analyze(m)
    proj = a0.by_role(Role.PROJ)[0]
    m.graph.node.append(helper.make_node("MatMul", [proj.output, proj.output], ["gram"], name="gram_mm"))
    m.graph.node[-1].input[1] = "gram_t"
    m.graph.node.insert(len(m.graph.node) - 1, helper.make_node("Transpose", [proj.output], ["gram_t"], name="gram_t",
                                                                perm=[0, 2, 1]))
    m.graph.output.append(helper.make_tensor_value_info("gram", TensorProto.FLOAT, None))
    a = analyze(m)
    assert roles(a) == PLAIN
    assert any(n.startswith("matmul gram_mm: both operands dynamic but neither reaches nor reads a Softmax")
               and n.endswith("left in float") for n in a.notes)


@pytest.mark.parametrize("kind,want,act", [
    ("swiglu", {"fc1_g": 2, "fc1_x": 2}, Activation.SWIGLU),
    ("glu", {"fc1_glu": 2}, Activation.SWIGLU),
    ("silu", {"fc1": 2}, Activation.SILU),
    ("hardswish", {"fc1": 2}, Activation.HARDSWISH),
])
def test_mlp_variants(kind: str, want: dict, act: Activation) -> None:
    """Gated MLPs get fc1_g / fc1_x (two Linears) or fc1_glu (one Linear split in halves); SiLU
    and HardSwish MLPs are fc1 / fc2 with their activation named."""
    m = tiny_vit(mlp_kind=kind) if kind in ("swiglu", "glu") else tiny_vit(act=kind)
    a = analyze(m)
    expect = {k: v for k, v in PLAIN.items() if k != "fc1"} | want
    assert roles(a) == expect
    assert {u.activation for u in a.by_role(Role.FC2)} == {act}
    assert all(u.layernorm for u in a.by_role(Role.FC1, Role.FC1_G, Role.FC1_X, Role.FC1_GLU))
    if kind == "glu":
        assert all(u.out_features == 2 * 32 for u in a.by_role(Role.FC1_GLU))


def test_layer_scale_is_noted_and_keeps_roles() -> None:
    a = analyze(tiny_vit(layer_scale=True))
    assert roles(a) == PLAIN
    assert "layer scale: 4 proj/fc2 outputs scaled per channel before the residual Add (float)" in a.notes


def test_distillation_or_register_tokens_are_noted_and_keep_roles() -> None:
    a = analyze(tiny_vit(extra_tokens=4))
    assert roles(a) == PLAIN and all(ln.foldable for ln in a.layernorms)
    assert any(n.startswith("tokens: 5 learned tokens joined to the patch tokens") for n in a.notes)
    assert not [n for n in analyze(tiny_vit()).notes if n.startswith("tokens")]  # a class token alone is not noted


def test_model_without_layernorm_quantizes_without_sqb() -> None:
    """No LayerNorm (BatchNorm models such as LeViT): the analysis says SQ-b has nothing to do,
    and quantize runs without it (it used to fail: no tensors requested for statistics)."""
    from graphs import random_images
    from onnx_mptq.config import Config, QuantConfig, ScaleSearchConfig
    from onnx_mptq.pipeline import quantize

    m = tiny_vit(ln="none")
    a = analyze(m)
    assert roles(a) == PLAIN and not a.layernorms
    assert any(n.startswith("no LayerNorm feeds a Linear") for n in a.notes)
    res = quantize(m, {"input": random_images(16, seed=4)}, Config(quant=QuantConfig(w_bits=8, a_bits=8, search=ScaleSearchConfig(grid_size=10))),
                   eval_data={"input": random_images(8, seed=5)})
    assert res.plan.smoothing is None
    assert len(res.plan.layers) == len(a.units)
    assert res.validation.sqnr_db > 20.0
    # the smooth stage alone (the `smooth` command) returns the model unchanged with an empty plan
    from onnx_mptq.pipeline import smooth

    sres = smooth(m, {"input": random_images(4, seed=4)}, Config())
    assert sres.plan.norms == () and len(sres.model.graph.node) == len(m.graph.node)


def test_inner_conv_is_a_unit_with_its_own_quantizer() -> None:
    """A conv stem: the first conv reads the image (patch_embed, image quantizer), the second
    reads an inner ReLU (conv: its own activation quantizer); both are emitted as QDQ."""
    from graphs import random_images
    from onnx_mptq.config import Config, QuantConfig, ScaleSearchConfig
    from onnx_mptq.pipeline import quantize

    m = tiny_vit(conv_stem=True)
    a = analyze(m)
    assert roles(a) == dict(PLAIN, conv=1)
    conv = a.by_role(Role.CONV)[0]
    assert conv.op_type == "Conv" and conv.activation is Activation.RELU and conv.inputs[0] != "input"
    res = quantize(m, {"input": random_images(16, seed=4)}, Config(quant=QuantConfig(w_bits=8, a_bits=8, search=ScaleSearchConfig(grid_size=10))),
                   eval_data={"input": random_images(8, seed=5)})
    layer = next(lp for lp in res.plan.layers if lp.unit == conv.name)
    assert layer.inputs[0].tensor == conv.inputs[0] and layer.a_bits == 8
    qnodes = {n.input[0] for n in res.model.graph.node if n.op_type == "QuantizeLinear"}
    assert conv.inputs[0] in qnodes
    assert res.validation.sqnr_db > 20.0


def test_inner_conv_search_time_quantizer_follows_the_candidate_bits() -> None:
    """Mixed precision measures an inner conv's activation at each candidate's bits (the image
    entering the patch embedding stays at quant.input_bits), so lowering it has a cost."""
    from graphs import random_images
    from onnx_mptq.calibrate.capture import capture_unit_inputs
    from onnx_mptq.config import Config, RuntimeConfig
    from onnx_mptq.evaluate.fakequant import build_param_graph
    from onnx_mptq.search.mixed import UnitQuantizers

    m = tiny_vit(conv_stem=True)
    a = analyze(m)
    cap = capture_unit_inputs(m, a, [{"input": random_images(8, seed=3)}], RuntimeConfig(), tokens_per_layer=64)
    pg = build_param_graph(m, a)
    q = UnitQuantizers(a, cap, {w.unit: (w.weight, w.axis) for w in pg.weights}, Config())
    conv, patch = a.by_role(Role.CONV)[0], a.by_role(Role.PATCH_EMBED)[0]
    assert [q.acts(conv.name, b)[0].bits for b in (8, 4)] == [8, 4]
    assert [q.acts(patch.name, b)[0].bits for b in (8, 4)] == [8, 8]


def test_grouped_conv_and_constant_input_conv_are_declined_with_reason() -> None:
    m = tiny_vit()
    a0 = analyze(m)
    fc1 = a0.by_role(Role.FC1)[0]
    # a depthwise conv on the fc1 output (PVT v2's MLP) and a conv of a constant (XCiT's position encoding)
    g = m.graph
    g.initializer.extend([onnx.numpy_helper.from_array(np.ones((32, 1, 1, 1), np.float32), "dw_w"),
                          onnx.numpy_helper.from_array(np.ones((1, 32, 2, 2), np.float32), "pe_x"),
                          onnx.numpy_helper.from_array(np.ones((4, 32, 1, 1), np.float32), "pe_w")])
    g.node.extend([
        helper.make_node("Unsqueeze", [fc1.output, "ax"], ["fc1_4d"], name="to4d"),
        helper.make_node("Conv", ["fc1_4d", "dw_w"], ["dw"], name="dwconv", group=32),
        helper.make_node("Conv", ["pe_x", "pe_w"], ["pe"], name="pe_conv"),
    ])
    g.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "ax"))
    g.output.extend([helper.make_tensor_value_info("dw", TensorProto.FLOAT, None),
                     helper.make_tensor_value_info("pe", TensorProto.FLOAT, None)])
    a = analyze(m)
    assert roles(a) == PLAIN
    assert "conv dwconv: grouped convolution (group=32); left in float" in a.notes
    assert any(n.startswith("conv pe_conv: its input is a constant") for n in a.notes)


def test_weights_computed_from_constants_are_folded_on_a_copy() -> None:
    """A weight computed from initializers (Mul of a constant: weight standardisation, a
    transposed or scaled weight) counts as constant through graphsurgeon's constant folding, and
    a Linear whose *input* is constant (Swin V2's position-bias MLP) is not a unit. The caller's
    graph is not changed."""
    m = tiny_vit()
    a0 = analyze(m)
    fc2 = a0.by_role(Role.FC2)[0]
    node = next(n for n in m.graph.node if n.name == fc2.name)
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    m.graph.node.insert(0, helper.make_node("Mul", [node.input[1], "half"], ["w_scaled"], name="scale_w"))
    node.input[1] = "w_scaled"
    m.graph.initializer.extend([onnx.numpy_helper.from_array(np.ones((9, 2), np.float32), "table"),
                                onnx.numpy_helper.from_array(np.ones((2, 4), np.float32), "cpb_w")])
    m.graph.node.extend([helper.make_node("Abs", ["table"], ["table_abs"], name="cpb_abs"),
                         helper.make_node("MatMul", ["table_abs", "cpb_w"], ["cpb"], name="cpb_mm")])
    m.graph.output.append(helper.make_tensor_value_info("cpb", TensorProto.FLOAT, None))
    before = m.SerializeToString()
    a = analyze(m)
    assert m.SerializeToString() == before
    assert roles(a) == PLAIN
    assert a.unit(fc2.name).weight_input == "w_scaled"
    assert "cpb_mm" not in {u.name for u in a.units}


def test_fused_attention_op_is_declined_with_reason() -> None:
    """An ONNX Attention op (opset 23) holds both matmuls inside one kernel: noted, not an error."""
    b = helper
    inits = [onnx.numpy_helper.from_array(np.ones((8, 8), np.float32), n) for n in ("wq", "wk", "wv", "wo")]
    nodes = [b.make_node("MatMul", ["x", w], [w + "_y"], name=w + "_mm") for w in ("wq", "wk", "wv")]
    nodes += [b.make_node("Attention", ["wq_y", "wk_y", "wv_y"], ["att"], name="attention", q_num_heads=2, kv_num_heads=2),
              b.make_node("MatMul", ["att", "wo"], ["y"], name="wo_mm")]
    g = b.make_graph(nodes, "fused", [b.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                     [b.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])], inits)
    m = b.make_model(g, opset_imports=[b.make_opsetid("", 23)])
    a = analyze(m)
    assert "attention attention: fused Attention op (its two matmuls run inside one kernel, no operand to quantize); " \
           "left in float" in a.notes
    assert not a.by_role(Role.ATTN_QK, Role.ATTN_AV) and len(a.units) == 4


@pytest.mark.slow
@pytest.mark.torch
def test_dynamo_export_of_fused_sdpa_is_attention(tmp_path) -> None:
    """timm's fused scaled_dot_product_attention exported by torch's dynamo exporter (the scale
    split over q and k^T) is found as attention, like the explicit form."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from onnx_mptq.export import build_tiny_timm

    model = build_tiny_timm("vit")
    assert any(getattr(m, "fused_attn", False) for m in model.modules())
    path = tmp_path / "fused.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=18, dynamo=True, dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
    a = analyze(onnx.load(str(path)))
    assert roles(a) == EXPECTED["vit"]
    assert {u.activation for u in a.by_role(Role.ATTN_AV)} == {Activation.SOFTMAX}
