"""Numpy fake-quant reference of a planned unit: what the emitted QDQ model must compute.

For a Linear (MatMul / Gemm) with input quantizer ``Qa`` (uniform or twin-region) and
per-output-channel weight quantizer ``Qw``::

    y = alpha * (Qa(x) @ Qw(W)) + b           W: the effective (K, N) weight

for the patch-embedding Conv ``y = conv(Qa(x), Qw(W)) + b`` and for an attention matmul
``y = Qa(a) @ Qb(b)``. The fake-quantized operands are exact float32 grid values (as the emitted
DequantizeLinear produces them); the products are accumulated in float64 and rounded once to
float32, so the reference sits within float32 rounding of both ORT paths (the float matmul of
the dequantized values, and the integer kernels, which accumulate exactly in int32 and scale
once). Numpy only: capturing the unit's operands from a model is the caller's business.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import PlanError
from ..graph.analysis import Role, Unit
from ..numerics.quant import UniformParams, fake_quant
from ..numerics.twin import twin_fake_quant
from ..plan import ActQuant, LayerPlan, Scheme, WeightQuant
from .emit_qdq import twin_params, uniform_params


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Attributes of a 2-D Conv (group 1)."""

    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)

    @classmethod
    def from_attrs(cls, attrs: dict) -> "ConvGeometry":
        if int(attrs.get("group", 1)) != 1:
            raise ValueError("only group=1 convolutions are simulated")
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            raise ValueError("auto_pad SAME_* is not simulated")
        return cls(tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("pads", (0, 0, 0, 0))),
                   tuple(attrs.get("dilations", (1, 1))))


def fake_quant_operand(x: np.ndarray, aq: ActQuant) -> np.ndarray:
    """float32 ``Qa(x)``: the uniform or twin-region fake quantization the plan describes."""
    x = np.asarray(x, dtype=np.float32)
    if aq.scheme is Scheme.TWIN:
        return twin_fake_quant(x, twin_params(aq))
    return fake_quant(x, uniform_params(aq))


def fake_quant_weight(w: np.ndarray, wq: WeightQuant, axis: int) -> np.ndarray:
    """float32 ``Qw(W)``, per output channel along ``axis`` (1 for a (K, N) weight, 0 for Conv)."""
    w = np.asarray(w, dtype=np.float32)
    scales = np.asarray(wq.scales, dtype=np.float32)
    if scales.shape[0] != w.shape[axis]:
        raise PlanError(f"{scales.shape[0]} weight scales for {w.shape[axis]} output channels")
    p = UniformParams(scales, np.zeros(scales.shape, np.int32), wq.bits, True, axis=axis)
    return fake_quant(w, p)


def _conv2d(x: np.ndarray, w: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """float64 NCHW convolution by im2col. x (B, C, H, W), w (O, C, kh, kw) -> (B, O, H', W')."""
    b, c, h, wd = x.shape
    o, ci, kh, kw = w.shape
    if ci != c:
        raise ValueError(f"conv weight expects {ci} channels, the input has {c}")
    pt, pl, pb, pr = geo.pads
    sh, sw = geo.strides
    dh, dw = geo.dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((b, ho, wo, c, kh, kw), dtype=np.float64)  # (B, H', W', C, kh, kw)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, :, i, j] = xp[:, :, i * dh: i * dh + sh * ho: sh, j * dw: j * dw + sw * wo: sw].transpose(0, 2, 3, 1)
    y = cols.reshape(b * ho * wo, -1) @ w.reshape(o, -1).T.astype(np.float64)  # (B H' W', O)
    return y.reshape(b, ho, wo, o).transpose(0, 3, 1, 2)


def simulate_unit(
    unit: Unit,
    layer_plan: LayerPlan,
    inputs: list[np.ndarray],
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    alpha: float = 1.0,
    conv: ConvGeometry | None = None,
) -> np.ndarray:
    """The unit's float32 output from fake-quantized operands (and weight).

    inputs: the unit's activation operands (float, before quantization; dequantized values work
    too, the quantizers being idempotent on their grids). weight: the effective (K, N) weight of a
    Linear (Gemm's B transposed when transB), the (O, C, kh, kw) kernel of a Conv, None for an
    attention matmul. bias: added in float32 after the product (Linear / Conv). alpha: Gemm's
    alpha. conv: the Conv's geometry (required for a Conv).
    """
    if len(inputs) != len(layer_plan.inputs):
        raise PlanError(f"unit {unit.name}: {len(inputs)} operand(s) given, the plan has {len(layer_plan.inputs)}")
    ops = [fake_quant_operand(x, aq).astype(np.float64) for x, aq in zip(inputs, layer_plan.inputs)]
    if unit.role in (Role.ATTN_QK, Role.ATTN_AV):
        return np.matmul(ops[0], ops[1]).astype(np.float32)
    if weight is None or layer_plan.weight is None:
        raise PlanError(f"unit {unit.name}: a weight and a weight quantizer are needed")
    if unit.op_type == "Conv":
        if conv is None:
            raise ValueError(f"unit {unit.name}: simulating a Conv needs its geometry (conv=...)")
        wq = fake_quant_weight(weight, layer_plan.weight, axis=0)
        y = _conv2d(ops[0], wq.astype(np.float64), conv).astype(np.float32)
        if bias is not None:
            y = y + np.asarray(bias, np.float32).reshape(1, -1, 1, 1)
        return y
    wq = fake_quant_weight(weight, layer_plan.weight, axis=1).astype(np.float64)  # (K, N)
    y = np.matmul(ops[0], wq)
    if alpha != 1.0:
        y = y * np.float32(alpha)
    y = y.astype(np.float32)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)
    return y
