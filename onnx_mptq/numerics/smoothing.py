"""SQ-b: SmoothQuant with a bias (shift) term, the math only (numpy only; method.md section 2).

A LayerNorm output ``Y = xhat * gamma + beta`` (C channels) feeds Linears ``Y @ W_k + b_k`` that
share one per-channel shift ``mu`` and one smoothing scale ``eps`` (> 0)::

    Y @ W + b == ((Y - mu) / eps) @ (eps[:, None] * W) + (b + mu @ W)

    gamma' = gamma / eps,          beta' = (beta - mu) / eps           (fold_layernorm)
    W'     = eps[:, None] * W,     b'    = b + mu @ W   (original W)   (fold_linear)

    eps_j  = max_t |Y_tj - mu_j| ^ alpha / max_{k,i} |W_k[j, i]| ^ (1 - alpha)   (smoothing_factors)

``mu`` is the per-channel mean of Y (``'mean'``, the paper) or the midpoint of its range
(``'midpoint'``, which minimises clamping of a symmetric quantizer). ``max_t |Y_tj - mu_j|`` is
exact from per-channel min/max: ``max(max_j - mu_j, mu_j - min_j)`` (:func:`shifted_absmax`).
Folded values are computed in float64 and returned as float32.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

EPS_MIN = 1e-5
EPS_MAX = 1e5


def _vec(name: str, v, c: int | None = None) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1 or (c is not None and a.shape[0] != c):
        want = "(C,)" if c is None else f"({c},)"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def shifted_absmax(minv: np.ndarray, maxv: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``max_t |Y_tj - mu_j|`` from per-channel min/max: ``max(max - mu, mu - min)``, (C,) float32."""
    lo = _vec("minv", minv)
    hi = _vec("maxv", maxv, lo.shape[0])
    m = _vec("mu", mu, lo.shape[0])
    return np.maximum(np.abs(hi - m), np.abs(m - lo)).astype(np.float32)


def weight_absmax_rows(weights: Sequence[np.ndarray]) -> np.ndarray:
    """``max_{k,i} |W_k[j, i]|`` over the rows j of all consumers' weights (K, N_k): (K,) float32."""
    if not weights:
        raise ValueError("need at least one consumer weight")
    ws = [np.asarray(w, dtype=np.float32) for w in weights]
    k = ws[0].shape[0]
    if any(w.ndim != 2 or w.shape[0] != k for w in ws):
        raise ValueError(f"consumer weights must all be (K, N) with K={k}, got {[w.shape for w in ws]}")
    return np.max(np.stack([np.abs(w).max(axis=1) for w in ws]), axis=0)


def smoothing_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``eps = act_absmax^alpha / weight_absmax^(1 - alpha)``, (C,) float32.

    act_absmax: ``max_t |Y_tj - mu_j|`` (C,); weight_absmax: ``max |W[j, :]|`` over the rows of all
    consumers (C,). A channel whose activation or weight max is 0 gets eps = 1; the result is
    clipped to [1e-5, 1e5], so it is finite and > 0.
    """
    if not (isinstance(alpha, (int, float, np.floating)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    a = _vec("act_absmax", act_absmax)
    w = _vec("weight_absmax", weight_absmax, a.shape[0])
    if np.any(a < 0) or np.any(w < 0):
        raise ValueError("absolute maxima must be >= 0")
    ok = (a > 0) & (w > 0)
    a_safe = np.where(ok, a, 1.0)
    w_safe = np.where(ok, w, 1.0)
    eps = np.exp(alpha * np.log(a_safe) - (1.0 - alpha) * np.log(w_safe))  # (C,)
    eps = np.where(ok, eps, 1.0)
    return np.clip(eps, EPS_MIN, EPS_MAX).astype(np.float32)


def shift_vector(mean: np.ndarray, minv: np.ndarray, maxv: np.ndarray, mode="mean") -> np.ndarray:
    """Per-channel shift mu (C,) float32: the mean (``'mean'``) or ``(min + max) / 2``
    (``'midpoint'``)."""
    name = mode.value if isinstance(mode, enum.Enum) else mode
    mu = _vec("mean", mean)
    lo = _vec("minv", minv, mu.shape[0])
    hi = _vec("maxv", maxv, mu.shape[0])
    if name == "mean":
        return mu.astype(np.float32)
    if name == "midpoint":
        return (0.5 * (lo + hi)).astype(np.float32)
    raise ValueError(f"mode must be 'mean' or 'midpoint', got {mode!r}")


def _check_eps(eps: np.ndarray, c: int) -> np.ndarray:
    e = _vec("eps", eps, c)
    if np.any(e <= 0):
        raise ValueError("eps must be > 0")
    return e


def fold_layernorm(gamma: np.ndarray, beta: np.ndarray, mu: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(gamma / eps, (beta - mu) / eps)``, float32 (C,) each."""
    g = _vec("gamma", gamma)
    c = g.shape[0]
    b = _vec("beta", beta, c)
    m = _vec("mu", mu, c)
    e = _check_eps(eps, c)
    return (g / e).astype(np.float32), ((b - m) / e).astype(np.float32)


def fold_linear(w: np.ndarray, b: np.ndarray | None, mu: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(eps[:, None] * w, b + mu @ w)`` with the original w; a missing bias counts as 0.

    w (K, N), b (N,) or None, mu and eps (K,). Returns float32 (K, N) and (N,).
    """
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim != 2:
        raise ValueError(f"w must be (K, N), got {w64.shape}")
    k, n = w64.shape
    m = _vec("mu", mu, k)
    e = _check_eps(eps, k)
    b64 = np.zeros(n) if b is None else _vec("b", b, n)
    w_new = e[:, None] * w64  # (K, N)
    b_new = b64 + m @ w64  # (N,)
    return w_new.astype(np.float32), b_new.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """How badly a LayerNorm output is conditioned for per-tensor quantization.

    range: ``max(maxv) - min(minv)`` (the per-tensor range); max_abs_mean: the largest per-channel
    ``|mean|``; mean_to_range: ``max_abs_mean / range`` (0 when the range is 0).
    """

    range: float
    max_abs_mean: float
    mean_to_range: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def conditioning(minv: np.ndarray, maxv: np.ndarray, mean: np.ndarray) -> Conditioning:
    """Per-tensor range and the largest per-channel |mean| relative to it."""
    lo = _vec("minv", minv)
    hi = _vec("maxv", maxv, lo.shape[0])
    mu = _vec("mean", mean, lo.shape[0])
    rng = float(np.max(hi) - np.min(lo))
    mam = float(np.max(np.abs(mu)))
    return Conditioning(range=rng, max_abs_mean=mam, mean_to_range=mam / rng if rng > 0 else 0.0)
