"""Closed-form compensation of a Linear's quantization error (numpy only).

A Linear ``y = x W`` (effective weight ``W (K, N)``, :meth:`onnx_mptq.graph.analysis.Unit.effective`)
quantized with input quantizer ``Qa`` and per-output-channel symmetric weight steps ``s_c``
computes ``Qa(x) W_hat`` with ``W_hat = C * s`` (integer codes ``C``, ``|C| <= qmax(b)``). On
calibration rows ``X (T, K)`` and ``Xq = Qa(X)`` the error is measured through Gram matrices
(``G_xx = X^T X``, ``G_qx = Xq^T X``, ``G_qq = Xq^T Xq``)::

    E(W_hat) = ||X W - Xq W_hat||_F^2
             = tr(W^T G_xx W) - 2 tr(W^T G_qx^T W_hat) + tr(W_hat^T G_qq W_hat)     (output_error)

Three closed-form steps reduce it, each one used only where it lowers ``E`` (the pass,
:mod:`onnx_mptq.search.compensate`, measures and keeps the better):

* **GPTQ rounding** (:func:`gptq_codes`): with ``H = G + lambda I`` (``lambda = damp * mean diag G``),
  round the rows of ``W`` (one per input channel) in input-channel order; the rounding error of
  row ``i``, ``e_i = (w_i - c_i s) / U_ii``, is pushed onto the rows not yet rounded,
  ``w_j -= U_ij e_i`` (``j > i``), where ``U`` is the upper Cholesky factor of ``H^-1``
  (``H^-1 = U^T U``). This is the optimal (OBS) update of the remaining rows for the quadratic
  ``tr((W - W_hat)^T H (W - W_hat))`` once row ``i`` is fixed. Updates are applied lazily in
  blocks of rows (the same arithmetic, one matrix product per block).
* **Activation-error compensation** (:func:`ridge_weight`): the weight that best maps the quantized
  input to the float output, ``W' = argmin ||Xq W' - X W||^2 + lambda ||W' - W||^2``, solves the
  normal equations ``(G_qq + lambda I) W' = G_qx W + lambda W``; then ``W'`` is rounded by GPTQ
  with ``H = G_qq`` (``E(W_hat) = ||X W - Xq W'||^2 + ||Xq (W' - W_hat)||^2`` up to the ridge term).
* **Bias correction** (:func:`bias_delta`): ``delta = mean_t (x_t W - Qa(x_t) W_hat)`` added to
  the Linear's bias zeroes the mean output error over the calibration rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Grams:
    """Gram matrices of one Linear's calibration rows (float64): ``xx = X^T X``, ``qx = Xq^T X``,
    ``qq = Xq^T Xq``; ``mean_x``, ``mean_q``: the column means of ``X`` and ``Xq``; ``rows``: T."""

    xx: np.ndarray
    qx: np.ndarray
    qq: np.ndarray
    mean_x: np.ndarray
    mean_q: np.ndarray
    rows: int

    @classmethod
    def of(cls, x: np.ndarray, xq: np.ndarray) -> "Grams":
        x = np.asarray(x, dtype=np.float64)
        xq = np.asarray(xq, dtype=np.float64)
        if x.shape != xq.shape or x.ndim != 2:
            raise ValueError(f"x and Qa(x) must be equal (T, K) arrays, got {x.shape} and {xq.shape}")
        return cls(x.T @ x, xq.T @ x, xq.T @ xq, x.mean(axis=0), xq.mean(axis=0), int(x.shape[0]))


def damped(h: np.ndarray, damp: float) -> np.ndarray:
    """``h + lambda I`` with ``lambda = damp * mean(diag h)`` (1 where the diagonal is all zero);
    an all-zero diagonal entry (a dead input channel) gets ``lambda`` as well."""
    h = np.array(h, dtype=np.float64, copy=True)
    d = np.diag(h)
    scale = float(np.mean(d)) if np.mean(d) > 0 else 1.0
    lam = max(damp, 1e-12) * scale
    h[np.diag_indices_from(h)] += lam
    return h


def nearest_codes(w: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """int32 ``clamp(rint(w / s_c), +-qmax)`` of a (K, N) weight (float32 division, as emission)."""
    top = 2 ** (bits - 1) - 1
    s = np.asarray(scales, dtype=np.float32).reshape(1, -1)
    return np.clip(np.rint(np.asarray(w, np.float32) / s), -top, top).astype(np.int32)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 ``codes * s_c`` (the weight emission's DequantizeLinear produces)."""
    return codes.astype(np.float32) * np.asarray(scales, dtype=np.float32).reshape(1, -1)


def gptq_codes(w: np.ndarray, h: np.ndarray, scales: np.ndarray, bits: int, damp: float = 0.01,
               block: int = 128) -> np.ndarray:
    """int32 codes (K, N) of ``w`` rounded row by row (input channels in order) with the rounding
    error pushed onto the later rows through ``H = h + lambda I`` (module docstring)."""
    w = np.array(w, dtype=np.float64, copy=True)
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"H has shape {h.shape}, the weight has {k} input channels")
    s = np.asarray(scales, dtype=np.float64).reshape(-1)
    if s.shape != (n,):
        raise ValueError(f"{s.size} scales for {n} output channels")
    top = 2 ** (bits - 1) - 1
    hd = damped(h, damp)
    hinv = np.linalg.inv(np.linalg.cholesky(hd))  # L^-1, H^-1 = L^-T L^-1
    hinv = hinv.T @ hinv
    hinv = (hinv + hinv.T) / 2
    u = np.linalg.cholesky(hinv).T  # upper, H^-1 = U^T U
    codes = np.zeros((k, n), dtype=np.int32)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[b0:b1].copy()
        err = np.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            q = np.clip(np.rint(wb[j] / s), -top, top)
            codes[b0 + j] = q
            e = (wb[j] - q * s) / ub[j, j]
            wb[j + 1:] -= np.outer(ub[j, j + 1:], e)
            err[j] = e
        if b1 < k:
            w[b1:] -= u[b0:b1, b1:].T @ err
    return codes


def ridge_weight(g: Grams, w: np.ndarray, ridge: float) -> np.ndarray:
    """float64 ``W' = (G_qq + lambda I)^-1 (G_qx W + lambda W)``, ``lambda = ridge * mean diag G_qq``:
    the minimiser of ``||Xq W' - X W||^2 + lambda ||W' - W||^2``."""
    w = np.asarray(w, dtype=np.float64)
    d = float(np.mean(np.diag(g.qq)))
    lam = max(ridge, 1e-12) * (d if d > 0 else 1.0)
    a = g.qq + lam * np.eye(g.qq.shape[0])
    return np.linalg.solve(a, g.qx @ w + lam * w)


def output_error(g: Grams, w: np.ndarray, w_hat: np.ndarray) -> float:
    """``||X W - Xq W_hat||_F^2`` from the Gram matrices (module docstring)."""
    w = np.asarray(w, dtype=np.float64)
    w_hat = np.asarray(w_hat, dtype=np.float64)
    return float(np.sum(w * (g.xx @ w)) - 2.0 * np.sum(w_hat * (g.qx @ w)) + np.sum(w_hat * (g.qq @ w_hat)))


def bias_delta(g: Grams, w: np.ndarray, w_hat: np.ndarray) -> np.ndarray:
    """float32 (N,) ``mean_t (x_t W - Qa(x_t) W_hat)``: added to the bias, the mean output error
    over the calibration rows is zero."""
    return (g.mean_x @ np.asarray(w, np.float64) - g.mean_q @ np.asarray(w_hat, np.float64)).astype(np.float32)


def error_with_bias(g: Grams, w: np.ndarray, w_hat: np.ndarray, delta: np.ndarray) -> float:
    """``||X W - (Xq W_hat + 1 delta^T)||_F^2`` (the bias removes ``T ||mean error||^2`` at the optimum)."""
    m = g.mean_x @ np.asarray(w, np.float64) - g.mean_q @ np.asarray(w_hat, np.float64)
    d = np.asarray(delta, np.float64)
    return output_error(g, w, w_hat) - g.rows * float(2.0 * m @ d - d @ d)
