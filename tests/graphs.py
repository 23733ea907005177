"""Tiny ViT graphs built in code (onnx.helper, seeded weights) for analysis and pass tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _B:
    def __init__(self, seed: int, name_nodes: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.k = 0
        self.name_nodes = name_nodes

    def t(self, prefix: str) -> str:
        self.k += 1
        return f"{prefix}_{self.k}"

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str] | str:
        outs = [self.t(op.lower()) for _ in range(n_out)]
        name = self.t(f"n_{op}") if self.name_nodes else ""
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def w(self, *shape: int, scale: float = 0.2) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def const(self, value, dtype=np.float32) -> str:
        return self.init(self.t("c"), np.asarray(value, dtype=dtype))

    def layernorm(self, x: str, dim: int, form: str) -> str:
        gamma = self.init(self.t("gamma"), (1.0 + 0.1 * self.rng.standard_normal(dim)).astype(np.float32))
        beta = self.init(self.t("beta"), (0.5 * self.rng.standard_normal(dim)).astype(np.float32))
        if form == "op":
            return self.node("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)
        mean = self.node("ReduceMean", [x], axes=[-1])
        d = self.node("Sub", [x, mean])
        sq = self.node("Pow", [d, self.const(2.0)])
        var = self.node("ReduceMean", [sq], axes=[-1])
        den = self.node("Sqrt", [self.node("Add", [var, self.const(1e-5)])])
        xh = self.node("Div", [d, den])
        return self.node("Add", [self.node("Mul", [xh, gamma]), beta])

    def linear(self, x: str, k: int, n: int, bias: bool = True, gemm: bool = False) -> str:
        if gemm:
            w = self.init(self.t("W"), self.w(n, k))
            ins = [x, w] + ([self.init(self.t("b"), self.w(n, scale=0.1))] if bias else [])
            return self.node("Gemm", ins, transB=1)
        w = self.init(self.t("W"), self.w(k, n))
        y = self.node("MatMul", [x, w])
        if bias:
            y = self.node("Add", [self.init(self.t("b"), self.w(n, scale=0.1)), y])
        return y

    def act(self, x: str, kind: str) -> str:
        if kind == "relu":
            return self.node("Relu", [x])
        if kind == "gelu_tanh":
            x3 = self.node("Pow", [x, self.const(3.0)])
            inner = self.node("Add", [x, self.node("Mul", [x3, self.const(0.044715)])])
            t = self.node("Tanh", [self.node("Mul", [inner, self.const(0.7978845608)])])
            return self.node("Mul", [self.node("Mul", [x, self.node("Add", [t, self.const(1.0)])]), self.const(0.5)])
        if kind == "gelu_op":  # the Gelu op (opset 20)
            return self.node("Gelu", [x])
        if kind == "gelu_op_tanh":
            return self.node("Gelu", [x], approximate="tanh")
        if kind == "gelu_sigmoid":  # x * sigmoid(1.702 x)
            return self.node("Mul", [x, self.node("Sigmoid", [self.node("Mul", [x, self.const(1.702)])])])
        if kind == "gelu_erf_half_first":  # 0.5 * x * (1 + erf(x * (1 / sqrt 2))), as other exporters write it
            e = self.node("Erf", [self.node("Mul", [x, self.const(0.70710678)])])
            return self.node("Mul", [self.node("Mul", [self.const(0.5), x]), self.node("Add", [self.const(1.0), e])])
        # erf form as torch's TorchScript exporter writes it
        e = self.node("Erf", [self.node("Div", [x, self.const(1.4142135)])])
        return self.node("Mul", [self.node("Mul", [x, self.node("Add", [e, self.const(1.0)])]), self.const(0.5)])


def tiny_vit(
    *,
    blocks: int = 2,
    dim: int = 16,
    heads: int = 2,
    mlp: int = 32,
    img: int = 8,
    patch: int = 4,
    classes: int = 5,
    ln: str = "op",
    act: str = "gelu_erf",
    post_norm: bool = False,
    qkv_bias: bool = True,
    gemm_head: bool = True,
    seed: int = 0,
    name_nodes: bool = True,
    opset: int = 17,
    attn: str = "plain",
    mlp_kind: str = "plain",
    layer_scale: bool = False,
    conv_stem: bool = False,
    extra_tokens: int = 0,
) -> onnx.ModelProto:
    """A small ViT: patch Conv, cls token, pos embed, attention blocks, LN head on the cls token.

    Variants (the patterns of the ViT family, not whole models): ``attn`` "plain" |
    "talking_heads" (a Linear over heads before and after the Softmax, CaiT) | "rel_bias" (a
    constant bias added to the scores, BEiT/Swin) | "rope" (rotary terms on q and k, EVA-02) |
    "xca" (cross-covariance: softmax over ``q^T k`` of L2-normalised channels, XCiT) | "sdpa"
    (the scale split over q and k^T and a NaN guard on the probabilities, as torch's dynamo
    exporter writes fused attention);
    ``mlp_kind`` "plain" (``act``) | "swiglu" (fc1_g, fc1_x) | "glu" (one fc1 split in halves);
    ``ln`` "op" | "decomposed" | "none" (no LayerNorm at all, e.g. BatchNorm models);
    ``layer_scale``: per-channel Mul on proj/fc2 outputs; ``conv_stem``: a 3x3 stride-2 conv and a
    ReLU in front of the patch conv (an inner conv fed by an activation); ``extra_tokens``: learned
    tokens beside the class token (distillation / register tokens)."""
    b = _B(seed, name_nodes)
    tokens = (img // patch) ** 2 + 1 + extra_tokens
    hd = dim // heads
    if conv_stem:
        s0 = b.node("Conv", ["input", b.init("stem_w", b.w(8, 3, 3, 3)), b.init("stem_b", b.w(8, scale=0.1))],
                    kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        stem, cin, k = b.node("Relu", [s0]), 8, patch // 2
    else:
        stem, cin, k = "input", 3, patch
    x = b.node("Conv", [stem, b.init("patch_w", b.w(dim, cin, k, k)), b.init("patch_b", b.w(dim, scale=0.1))],
               kernel_shape=[k, k], strides=[k, k])
    x = b.node("Reshape", [x, b.const([0, dim, -1], np.int64)])
    x = b.node("Transpose", [x], perm=[0, 2, 1])  # (N, P, D)
    batch = b.node("Slice", [b.node("Shape", [x]), b.const([0], np.int64), b.const([1], np.int64)])
    cls = b.node("Expand", [b.init("cls", b.w(1, 1, dim)), b.node("Concat", [batch, b.const([1, dim], np.int64)], axis=0)])
    extra = [b.node("Expand", [b.init("reg", b.w(1, extra_tokens, dim)),
                               b.node("Concat", [batch, b.const([extra_tokens, dim], np.int64)], axis=0)])] if extra_tokens else []
    x = b.node("Concat", [cls, *extra, x], axis=1)
    x = b.node("Add", [x, b.init("pos", b.w(1, tokens, dim))])
    norm = (lambda t: t) if ln == "none" else (lambda t: b.layernorm(t, dim, ln))
    scale = (lambda t: b.node("Mul", [t, b.const(0.1 + 0.05 * b.rng.random(dim))])) if layer_scale else (lambda t: t)
    for _ in range(blocks):
        y = x if post_norm else norm(x)
        qkv = b.linear(y, dim, 3 * dim, bias=qkv_bias)
        qkv = b.node("Reshape", [qkv, b.const([0, tokens, 3, heads, hd], np.int64)])
        qkv = b.node("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
        q, k, v = b.node("Split", [qkv, b.const([1, 1, 1], np.int64)], n_out=3, axis=0)
        q = b.node("Squeeze", [q, b.const([0], np.int64)])
        k = b.node("Squeeze", [k, b.const([0], np.int64)])
        v = b.node("Squeeze", [v, b.const([0], np.int64)])
        o = _attention(b, q, k, v, attn, heads, tokens, hd)  # (N, H, T, hd)
        o = b.node("Reshape", [b.node("Transpose", [o], perm=[0, 2, 1, 3]), b.const([0, tokens, dim], np.int64)])
        o = scale(b.linear(o, dim, dim))
        x = b.node("Add", [x, o])
        if post_norm:
            x = norm(x)
        y = x if post_norm else norm(x)
        h = scale(b.linear(_mlp_hidden(b, y, dim, mlp, act, mlp_kind), mlp, dim))
        x = b.node("Add", [x, h])
        if post_norm:
            x = norm(x)
    c = b.node("Gather", [x, b.const(0, np.int64)], axis=1)
    c = norm(c)
    logits = b.linear(c, dim, classes, gemm=gemm_head)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="out" if name_nodes else ""))
    graph = helper.make_graph(
        b.nodes, "tiny_vit",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, img, img])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset >= 20 else 8
    onnx.checker.check_model(model)
    return model


def _attention(b: _B, q: str, k: str, v: str, kind: str, heads: int, tokens: int, hd: int) -> str:
    """Softmax attention of q, k, v (N, H, T, hd) in one of the variants of :func:`tiny_vit`."""
    if kind == "xca":  # XCiT: channels attend to channels; q, k L2-normalised over tokens
        qt, kt, vt = (b.node("Transpose", [t], perm=[0, 1, 3, 2]) for t in (q, k, v))  # (N, H, hd, T)
        qn = b.node("Div", [qt, b.node("ReduceL2", [qt], axes=[-1], keepdims=1)])
        kn = b.node("Div", [kt, b.node("ReduceL2", [kt], axes=[-1], keepdims=1)])
        s = b.node("MatMul", [qn, b.node("Transpose", [kn], perm=[0, 1, 3, 2])])  # (N, H, hd, hd)
        s = b.node("Mul", [s, b.init(b.t("temperature"), (1.0 + b.rng.random((heads, 1, 1))).astype(np.float32))])
        o = b.node("MatMul", [b.node("Softmax", [s], axis=-1), vt])  # (N, H, hd, T)
        return b.node("Transpose", [o], perm=[0, 1, 3, 2])
    if kind == "rope":  # x * cos + rotate_half(x) * sin on q and k
        cos = b.const(np.cos(b.rng.random((tokens, hd))))
        sin = b.const(np.sin(b.rng.random((tokens, hd))))

        def rope(t: str) -> str:
            lo = b.node("Slice", [t, b.const([0], np.int64), b.const([hd // 2], np.int64), b.const([-1], np.int64)])
            hi = b.node("Slice", [t, b.const([hd // 2], np.int64), b.const([hd], np.int64), b.const([-1], np.int64)])
            rot = b.node("Concat", [b.node("Neg", [hi]), lo], axis=-1)
            return b.node("Add", [b.node("Mul", [t, cos]), b.node("Mul", [rot, sin])])
        q, k = rope(q), rope(k)
    kt = b.node("Transpose", [k], perm=[0, 1, 3, 2])
    if kind == "sdpa":  # scale sqrt(s) on both operands
        r = b.const(hd ** -0.25)
        s = b.node("MatMul", [b.node("Mul", [q, r]), b.node("Mul", [kt, r])])
    else:
        s = b.node("Mul", [b.node("MatMul", [q, kt]), b.const(hd ** -0.5)])
    if kind == "rel_bias":
        s = b.node("Add", [s, b.const(b.w(1, heads, tokens, tokens, scale=0.5))])

    def over_heads(t: str) -> str:  # a Linear mixing the H axis: (N, H, T, T) -> (N, T, T, H) -> Linear -> back
        u = b.linear(b.node("Transpose", [t], perm=[0, 2, 3, 1]), heads, heads)
        return b.node("Transpose", [u], perm=[0, 3, 1, 2])
    if kind == "talking_heads":
        s = over_heads(s)
    p = b.node("Softmax", [s], axis=-1)
    if kind == "sdpa":  # the dynamo exporter's NaN guard: Where(IsNaN(p), 0, p)
        p = b.node("Where", [b.node("IsNaN", [p]), b.const(0.0), p])
    if kind == "talking_heads":
        p = over_heads(p)
    return b.node("MatMul", [p, v])


def _mlp_hidden(b: _B, y: str, dim: int, mlp: int, act: str, kind: str) -> str:
    """The fc2 input of an MLP: act(fc1(y)), silu(fc1_g(y)) * fc1_x(y), or a fused gate split in halves."""
    def silu(t: str) -> str:
        return b.node("Mul", [t, b.node("Sigmoid", [t])])
    if kind == "swiglu":
        return b.node("Mul", [silu(b.linear(y, dim, mlp)), b.linear(y, dim, mlp)])
    if kind == "glu":
        g, x = b.node("Split", [b.linear(y, dim, 2 * mlp), b.const([mlp, mlp], np.int64)], n_out=2, axis=-1)
        return b.node("Mul", [silu(g), x])
    if act == "silu":
        return silu(b.linear(y, dim, mlp))
    if act == "hardswish":
        return b.node("HardSwish", [b.linear(y, dim, mlp)])
    return b.act(b.linear(y, dim, mlp), act)


def mlp_only(seed: int = 0) -> onnx.ModelProto:
    """Not a transformer: two Linears and a ReLU."""
    b = _B(seed, True)
    h = b.node("Relu", [b.linear("input", 8, 16)])
    y = b.linear(h, 16, 4)
    b.nodes.append(helper.make_node("Identity", [y], ["logits"], name="out"))
    graph = helper.make_graph(
        b.nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def random_images(n: int, img: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, img, img)).astype(np.float32)


def smoothed_capture(blocks: int = 2, samples: int = 48, seed: int = 1, tokens: int = 256):
    """A tiny ViT (``tiny_vit(blocks)``) smoothed with SQ-b on ``samples`` random images, analysed
    and its unit inputs captured, as ``onnx_mptq.pipeline.quantize`` runs those stages:
    a namespace with ``src, data, work, an, cap, splan``."""
    from types import SimpleNamespace

    from onnx_mptq.calibrate.capture import capture_unit_inputs
    from onnx_mptq.config import Config
    from onnx_mptq.graph.analysis import analyze, prepare
    from onnx_mptq.pipeline import smooth

    src = tiny_vit(blocks=blocks)
    x = random_images(samples, seed=seed)
    data = [{"input": x[i:i + 16]} for i in range(0, len(x), 16)]
    cfg = Config()
    prepared = prepare(src)
    sres = smooth(src, data, cfg, analysis=analyze(prepared, prepared=True), prepared=prepared)
    work = prepare(sres.model)
    an = analyze(work, prepared=True)
    cap = capture_unit_inputs(work, an, data, cfg.runtime, tokens_per_layer=tokens, progress=False)
    return SimpleNamespace(src=src, data=data, work=work, an=an, cap=cap, splan=sres.plan)
