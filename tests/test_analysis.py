"""Graph analysis: units, roles, LayerNorms, activations, SQ-b foldability, errors."""

from __future__ import annotations

import json
from pathlib import Path

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
