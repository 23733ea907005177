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

The quantizers are computed here from the plan record's numbers by their own short arithmetic
(float32 division, round half to even), deliberately not through :meth:`ActQuant.params` or the
emitter, so that a mistake in the one conversion the package uses shows up as a disagreement
with this reference::

    uniform  x_hat = (clamp(rint(x / s) + z, lo, hi) - z) s,  lo, hi = -(2^(b-1) - 1), 2^(b-1) - 1
                                                               (symmetric) or 0, 2^b - 1
    twin     n = 2^(b-1) - 1, d2 = 2^m d1
             gelu:    x < 0: -d1 clamp(rint(-x / d1), 0, n),  else d2 clamp(rint(x / d2), 0, n)
             softmax: x < t: d1 clamp(rint(x / d1), 0, n),   else d2 clamp(rint(x / d2), 0, n)
                      (t = split, default 2^(b-1) d1)
    weight   W_hat[.., c, ..] = clamp(rint(W / s_c), -(2^(b-1) - 1), 2^(b-1) - 1) s_c
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import PlanError
from ..graph.analysis import Role, Unit
from ..numerics.conv import ConvGeometry as _Geometry
from ..numerics.conv import im2col
from ..plan import ActQuant, LayerPlan, Scheme, WeightQuant


@dataclasses.dataclass(frozen=True)
class ConvGeometry(_Geometry):
    """Attributes of a 2-D Conv (group 1), read from a node's attributes."""

    @classmethod
    def from_attrs(cls, attrs: dict) -> "ConvGeometry":
        if int(attrs.get("group", 1)) != 1:
            raise ValueError("only group=1 convolutions are simulated")
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            raise ValueError("auto_pad SAME_* is not simulated")
        return cls(tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("pads", (0, 0, 0, 0))),
                   tuple(attrs.get("dilations", (1, 1))))


def _grid(x: np.ndarray, step, lo, hi, zp=0) -> np.ndarray:
    """float32 ``(clamp(rint(x / step) + zp, lo, hi) - zp) * step`` (float32 division)."""
    step = np.asarray(step, dtype=np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(x / step) + np.float32(zp), np.float32(lo), np.float32(hi))
    return ((q - np.float32(zp)) * step).astype(np.float32)


def fake_quant_operand(x: np.ndarray, aq: ActQuant) -> np.ndarray:
    """float32 ``Qa(x)``: the uniform or twin-region fake quantization the record describes."""
    x = np.asarray(x, dtype=np.float32)
    b = aq.bits
    if aq.scheme is Scheme.TWIN:
        n = 2 ** (b - 1) - 1
        d1 = np.float32(aq.delta1)
        d2 = np.float32(d1 * np.float32(2.0 ** int(aq.m)))
        if aq.twin_kind.value == "gelu":  # type: ignore[union-attr]
            return np.where(x < 0, -_grid(-np.minimum(x, 0), d1, 0, n), _grid(np.maximum(x, 0), d2, 0, n))
        split = np.float32(d1 * 2 ** (b - 1) if aq.split is None else aq.split)
        return np.where(x < split, _grid(x, d1, 0, n), _grid(x, d2, 0, n))
    if aq.symmetric:
        lo, hi = -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
    else:
        lo, hi = 0, 2**b - 1
    return _grid(x, np.float32(aq.scale), lo, hi, int(aq.zero_point))


def fake_quant_weight(w: np.ndarray, wq: WeightQuant, axis: int) -> np.ndarray:
    """float32 ``Qw(W)``, per output channel along ``axis`` (1 for a (K, N) weight, 0 for Conv)."""
    w = np.asarray(w, dtype=np.float32)
    if len(wq.scales) != w.shape[axis]:
        raise PlanError(f"{len(wq.scales)} weight scales for {w.shape[axis]} output channels")
    shape = [1] * w.ndim
    shape[axis] = -1
    top = 2 ** (wq.bits - 1) - 1
    return _grid(w, np.asarray(wq.scales, dtype=np.float32).reshape(shape), -top, top)


def _conv2d(x: np.ndarray, w: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    """float64 NCHW convolution by im2col. x (B, C, H, W), w (O, C, kh, kw) -> (B, O, H', W')."""
    b, c = x.shape[:2]
    o, ci, kh, kw = w.shape
    if ci != c:
        raise ValueError(f"conv weight expects {ci} channels, the input has {c}")
    pt, pl, pb, pr = geo.pads
    (sh, sw), (dh, dw) = geo.strides, geo.dilations
    ho = (x.shape[2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cols = im2col(np.asarray(x, dtype=np.float64), (kh, kw), geo)  # (B H' W', C kh kw)
    y = cols @ w.reshape(o, -1).T.astype(np.float64)  # (B H' W', O)
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
