"""Uniform affine quantizers (numpy only).

A b-bit uniform quantizer with step ``delta`` (> 0) and integer zero point ``z``::

    q     = clamp(rint(x / delta) + z, qmin, qmax)       # quantize   (int32 codes)
    x_hat = (q - z) * delta                              # dequantize (float32)

``rint`` rounds half to even, as ONNX ``QuantizeLinear`` does, and ``x / delta`` is a float32
division, as in ONNX Runtime's kernel, so :func:`fake_quant` reproduces an emitted
``QuantizeLinear -> DequantizeLinear`` pair value for value.

Integer ranges come from :func:`qrange` and nowhere else:

* symmetric (signed):   ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, zero point 0 (the most negative code
  ``-2^(b-1)`` is never used, so the grid is symmetric about 0);
* asymmetric (unsigned): ``[0, 2^b - 1]``, zero point in that range, so 0 is exactly representable.

Containers. Emission stores b-bit codes in an 8-bit ONNX type (:func:`container_dtype`: int8 for
symmetric, uint8 for asymmetric; 16-bit types for internal b > 8). For b < 8 the container holds
more codes than the quantizer may use; clamping ``x`` to :func:`dequantized_bounds` before a
``QuantizeLinear`` with the same scale and zero point restricts the codes to ``qrange(b, ...)``
and reproduces :func:`quantize` exactly.

Per-channel parameters have ``scale`` and ``zero_point`` of shape ``(C,)`` and broadcast along
``axis`` of the quantized tensor; per-tensor parameters have shape ``()`` and ``axis=None``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

logger = logging.getLogger(__name__)

MIN_RANGE = 1e-8
"""Smallest clipping range (hi - lo) a scale is built from; a zero range is widened to this."""

_MAX_BITS = 16


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range ``(qmin, qmax)`` of a ``bits``-bit quantizer.

    symmetric: ``(-(2^(bits-1) - 1), 2^(bits-1) - 1)``; asymmetric: ``(0, 2^bits - 1)``.
    ``bits`` must be an integer from 2 to 16 (2 to 8 are user-facing; up to 16 for internal use).
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be an integer from 2 to {_MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def container_dtype(symmetric: bool, bits: int = 8) -> np.dtype:
    """ONNX container type of the codes: int8 (symmetric) / uint8 (asymmetric) for bits <= 8,
    int16 / uint16 for 8 < bits <= 16. Codes are restricted to ``qrange(bits, symmetric)``."""
    qrange(bits, symmetric)  # validates bits
    if bits <= 8:
        return np.dtype(np.int8) if symmetric else np.dtype(np.uint8)
    return np.dtype(np.int16) if symmetric else np.dtype(np.uint16)


@dataclasses.dataclass(frozen=True, eq=False)
class UniformParams:
    """Parameters of a uniform quantizer.

    scale: float32, shape () per-tensor or (C,) per-channel, every entry finite and > 0.
    zero_point: int32, same shape, inside ``qrange(bits, symmetric)``; all 0 when symmetric.
    axis: the channel axis of the quantized tensor for per-channel parameters, else None.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    symmetric: bool
    axis: int | None = None

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale, dtype=np.float32)
        zp = np.asarray(self.zero_point)
        if zp.dtype.kind == "f":
            if not np.all(zp == np.rint(zp)):
                raise ValueError(f"zero_point must be integers, got {zp!r}")
        zp = zp.astype(np.int32)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp)
        qmin, qmax = qrange(self.bits, self.symmetric)
        if scale.ndim > 1:
            raise ValueError(f"scale must have shape () or (C,), got {scale.shape}")
        if zp.shape != scale.shape:
            raise ValueError(f"zero_point shape {zp.shape} differs from scale shape {scale.shape}")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("scale must be finite and > 0")
        if np.any(zp < qmin) or np.any(zp > qmax):
            raise ValueError(f"zero_point must be in [{qmin}, {qmax}]")
        if self.symmetric and np.any(zp != 0):
            raise ValueError("a symmetric quantizer has zero_point 0")
        if scale.ndim == 1 and self.axis is None:
            raise ValueError("per-channel parameters need an axis")
        if scale.ndim == 0 and self.axis is not None:
            raise ValueError("per-tensor parameters take axis=None")

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]


def _broadcast(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a (C,) parameter so that it broadcasts along ``axis`` of an ndim-array."""
    if v.ndim == 0:
        return v
    if axis is None:
        raise ValueError("per-channel parameters need an axis")
    ax = axis + ndim if axis < 0 else axis
    if not 0 <= ax < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-d array")
    shape = [1] * ndim
    shape[ax] = v.shape[0]
    return v.reshape(shape)


def _check_channels(x: np.ndarray, p: UniformParams) -> None:
    if p.per_channel:
        ax = p.axis + x.ndim if p.axis < 0 else p.axis  # type: ignore[operator]
        if not 0 <= ax < x.ndim or x.shape[ax] != p.scale.shape[0]:
            raise ValueError(f"{p.scale.shape[0]} channels do not match axis {p.axis} of shape {x.shape}")


def quantize(x: np.ndarray, p: UniformParams) -> np.ndarray:
    """int32 codes ``clamp(rint(x / scale) + zero_point, qmin, qmax)`` (float32 division)."""
    x = np.asarray(x, dtype=np.float32)
    _check_channels(x, p)
    scale = _broadcast(p.scale, x.ndim, p.axis)
    zp = _broadcast(p.zero_point, x.ndim, p.axis)
    with np.errstate(over="ignore"):  # huge x / tiny scale -> inf, clipped below
        q = np.rint(x / scale)  # float32, half to even
    lo = (p.qmin - zp).astype(np.float32)
    hi = (p.qmax - zp).astype(np.float32)
    q = np.clip(q, lo, hi)  # clip before the cast: no int overflow on inf/huge values
    return q.astype(np.int32) + zp


def dequantize(q: np.ndarray, p: UniformParams) -> np.ndarray:
    """float32 ``(q - zero_point) * scale``."""
    q = np.asarray(q)
    _check_channels(q, p)
    scale = _broadcast(p.scale, q.ndim, p.axis)
    zp = _broadcast(p.zero_point, q.ndim, p.axis)
    return (q.astype(np.int32) - zp).astype(np.float32) * scale


def fake_quant(x: np.ndarray, p: UniformParams) -> np.ndarray:
    """``dequantize(quantize(x, p), p)``, float32, same shape as x."""
    return dequantize(quantize(x, p), p)


def dequantized_bounds(p: UniformParams) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``((qmin - z) * scale, (qmax - z) * scale)``: the representable interval.

    Clamping x to it before an 8-bit container ``QuantizeLinear`` restricts the codes to
    ``qrange(p.bits, p.symmetric)``.
    """
    lo = (np.int32(p.qmin) - p.zero_point).astype(np.float32) * p.scale
    hi = (np.int32(p.qmax) - p.zero_point).astype(np.float32) * p.scale
    return lo, hi


def params_from_range(lo, hi, bits: int, symmetric: bool, axis: int | None = None) -> UniformParams:
    """Quantizer whose grid covers ``[lo, hi]`` (scalars or (C,) arrays, vectorised).

    symmetric:  ``scale = max(|lo|, |hi|) / qmax``, zero point 0.
    asymmetric: the range is first widened to include 0 (``lo <= 0 <= hi``) so 0 is exactly
    representable; ``scale = (hi - lo) / (qmax - qmin)``, ``z = clamp(rint(qmin - lo / scale))``.
    A range narrower than ``MIN_RANGE`` is widened to it, so the scale is always > 0.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.shape != hi.shape or lo.ndim > 1:
        raise ValueError(f"lo and hi must share a shape () or (C,), got {lo.shape} and {hi.shape}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("lo and hi must be finite")
    if np.any(lo > hi):
        raise ValueError("lo must be <= hi")
    if lo.ndim == 1 and axis is None:
        raise ValueError("per-channel ranges need an axis")
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = np.maximum(np.maximum(np.abs(lo), np.abs(hi)), MIN_RANGE / 2)
        scale = (amax / qmax).astype(np.float32)
        zp = np.zeros(scale.shape, dtype=np.int32)
    else:
        lo = np.minimum(lo, 0.0)
        hi = np.maximum(hi, 0.0)
        span = np.maximum(hi - lo, MIN_RANGE)
        scale = (span / (qmax - qmin)).astype(np.float32)
        zp = np.clip(np.rint(qmin - lo / scale.astype(np.float64)), qmin, qmax).astype(np.int32)
    return UniformParams(scale=scale, zero_point=zp, bits=bits, symmetric=symmetric,
                         axis=axis if scale.ndim == 1 else None)


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...] | None:
    if axis is None:
        return None
    ax = axis + ndim if axis < 0 else axis
    if not 0 <= ax < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-d array")
    return tuple(i for i in range(ndim) if i != ax)


def minmax_params(x: np.ndarray, bits: int, symmetric: bool, axis: int | None = None) -> UniformParams:
    """Min/max quantizer of x: per-tensor (axis=None) or per-channel along ``axis``."""
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        raise ValueError("cannot compute a range of an empty array")
    red = _reduce_axes(x.ndim, axis)
    return params_from_range(x.min(axis=red), x.max(axis=red), bits, symmetric, axis=axis)


def percentile_params(x: np.ndarray, bits: int, symmetric: bool, pct: float = 99.99) -> UniformParams:
    """Per-tensor quantizer clipping at percentiles.

    symmetric: ``amax = percentile(|x|, pct)``; asymmetric: ``[percentile(x, 100 - pct),
    percentile(x, pct)]``. ``pct`` in (50, 100].
    """
    if not 50.0 < pct <= 100.0:
        raise ValueError(f"pct must be in (50, 100], got {pct!r}")
    x = np.asarray(x, dtype=np.float32).ravel()
    if x.size == 0:
        raise ValueError("cannot compute a range of an empty array")
    if symmetric:
        amax = np.percentile(np.abs(x), pct)
        return params_from_range(-amax, amax, bits, True)
    lo, hi = np.percentile(x, [100.0 - pct, pct])
    return params_from_range(lo, hi, bits, False)


def weight_params(w: np.ndarray, bits: int, axis: int) -> UniformParams:
    """Symmetric per-output-channel min/max quantizer of a weight.

    MatMul weight (K, N): ``axis=1``; Conv weight (O, I, kh, kw): ``axis=0``.
    """
    return minmax_params(w, bits, symmetric=True, axis=axis)

