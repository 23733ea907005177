"""Output-error scale search for uniform quantizers (numpy only).

A quantizer's step is not simply its min/max step: it is searched on a grid of fractions of the
max-based step, minimising the error of the consuming matmul's output on captured calibration
inputs (method.md section 3)::

    weights      (per output channel c):  min_f || X W_c - X Q_f(W_c) ||^2   (or || W_c - Q_f(W_c) ||^2)
    activations  (per tensor):            min_f || X W - Q_f(X) W_fq ||^2
    matmul operands (attention):          min_f || A B - Q_f(A) B_fq ||^2   or  || A B - A_fq Q_f(B) ||^2

``f`` runs over the candidate fractions; ``f = 1`` (the min/max quantizer) is always a candidate
and is always evaluated, so the searched quantizer is never worse than min/max on the objective.
For an asymmetric quantizer both ends of the range are scaled by ``f`` (``[f lo, f hi]``, which
keeps 0 inside).

Cost. Evaluating one candidate costs one matmul of the captured operand. Two reductions keep it
cheap without approximating the objective:

* ``E = X W - Q(X) W_fq = (X - Q(X)) W_fq + X (W - W_fq)``; when ``N > K`` a thin QR factor
  ``W_fq^T = Qw Rw`` gives ``||E||^2 = ||(X - Q(X)) Rw^T + C Qw||^2 + ||C_perp||^2`` with
  ``C = X (W - W_fq)``, so each candidate costs ``tokens * K * min(K, N)``;
* weight candidates use ``||X d||^2 = ||R d||^2`` with ``R`` the triangular factor of ``X``
  (``K x K`` instead of ``tokens x K``).

Activation / operand searches are coarse-to-fine: about ``n_coarse`` evenly spaced grid points
(plus ``f = 1``), then every grid point between the best coarse point's neighbours. The error is
not unimodal in ``f`` in general, so this is a heuristic; with ``n_coarse >= grid_size`` it is
exhaustive. Memory stays bounded: candidates are evaluated one at a time, in row blocks.

Speed without changing a decision (issue 14). Only the argmin of the grid matters, and the
squared error is a sum over row blocks of non-negative terms, so a partial sum is a lower bound
of the total: an objective called with ``bound`` (the best error so far) stops as soon as its
partial sum exceeds it and returns that partial sum (still ``> bound``, so the candidate still
loses). :func:`coarse_to_fine` with ``bounded=True`` evaluates the always-evaluated points first
and passes the running best, so clearly worse candidates cost a block or two. A candidate that
is not pruned is summed completely, exactly as before. Uniform candidates are passed as
:class:`UniformParams` and fake-quantized by :func:`fake_quant_into`, the same float32
arithmetic as :func:`onnx_mptq.numerics.quant.fake_quant` (bitwise equal) without its integer
round trip and temporaries.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

from .quant import UniformParams, fake_quant, minmax_params, params_from_range, percentile_params, qrange

logger = logging.getLogger(__name__)

FakeQuant = Callable[[np.ndarray], np.ndarray]

_BLOCK_ELEMS = 1 << 22  # elements per row block of a temporary (16 MB of float32)
_PRUNE_BLOCKS = 8  # an objective is summed in at least this many blocks, checked against its bound after each
_MIN_BLOCK_ROWS = 256  # ... of at least this many rows


BLAS_THREADS = 1  # numpy BLAS threads while the pipeline runs (:func:`blas_threads_limited`)


def blas_threads_limited(fn):
    """Decorator: run ``fn`` with numpy's BLAS limited to :data:`BLAS_THREADS` threads
    (threadpoolctl). The search's products are many and small (a few MFLOP each); with several
    BLAS threads each one waits for its threads to be scheduled, which on a loaded or small
    machine costs more than the product (measured on 2 shared cores: a (512, 64) x (64, 64)
    product 17 ms with OpenBLAS's 2 threads, 0.2 ms with one), and idle BLAS threads spinning
    between products take cores from ONNX Runtime's own threads. Nested uses are harmless."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


def _block(total: int, cap: int) -> int:
    """Rows (samples) per block: at most ``cap``, about total / _PRUNE_BLOCKS, at least _MIN_BLOCK_ROWS."""
    return max(1, min(cap, max(_MIN_BLOCK_ROWS, -(-total // _PRUNE_BLOCKS))))


def fake_quant_into(x: np.ndarray, p: UniformParams, out: np.ndarray | None = None) -> np.ndarray:
    """``fake_quant(x, p)`` for float32 x, bitwise equal, written into ``out`` (x's shape, float32)::

        out = clip(rint(x / scale), qmin - z, qmax - z) * scale

    ``quantize`` adds z to the clipped integer and ``dequantize`` subtracts it again before the
    float32 multiply; both steps are exact on integers this small, so they are skipped."""
    x = np.asarray(x, dtype=np.float32)
    scale, zp = p.scale, p.zero_point
    if scale.ndim:  # per channel
        ax = p.axis + x.ndim if p.axis < 0 else p.axis  # type: ignore[operator]
        if x.shape[ax] != scale.shape[0]:
            raise ValueError(f"{scale.shape[0]} channels do not match axis {p.axis} of shape {x.shape}")
        shape = [1] * x.ndim
        shape[ax] = scale.shape[0]
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    qmin, qmax = qrange(p.bits, p.symmetric)
    lo = (qmin - zp).astype(np.float32)
    hi = (qmax - zp).astype(np.float32)
    with np.errstate(over="ignore"):
        out = np.divide(x, scale, out=out)
    np.rint(out, out=out)
    np.clip(out, lo, hi, out=out)
    np.multiply(out, scale, out=out)
    return out


def _residual(xb: np.ndarray, fq, buf: np.ndarray | None) -> np.ndarray:
    """``xb - fq(xb)``; fq is a fake-quantizer callable or a :class:`UniformParams`."""
    if isinstance(fq, UniformParams):
        out = fake_quant_into(xb, fq, None if buf is None else buf[:xb.shape[0]])
        return np.subtract(xb, out, out=out)
    return xb - fq(xb)


def _method_name(method) -> str:
    name = method.value if isinstance(method, enum.Enum) else method
    if name not in ("mse", "minmax", "percentile"):
        raise ValueError(f"method must be 'mse', 'minmax' or 'percentile', got {method!r}")
    return name


def output_error(a: np.ndarray, b: np.ndarray, a_fq: np.ndarray | None = None,
                 b_fq: np.ndarray | None = None) -> float:
    """``|| a @ b - a_fq @ b_fq ||^2`` (float64 sum); a missing fake-quant operand means exact."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    ref = a @ b
    out = (a if a_fq is None else np.asarray(a_fq, np.float32)) @ (b if b_fq is None else np.asarray(b_fq, np.float32))
    return float(np.sum(np.square((ref - out).astype(np.float64))))


def gram_root(x: np.ndarray) -> np.ndarray:
    """An upper-triangular r (K, K) with ``r^T r == x^T x`` for x (rows, K).

    Cholesky of the float64 Gram matrix (about 20x faster than a QR of x for many rows); a
    rank-deficient Gram matrix gets a relative jitter of 1e-12 on its diagonal, and QR is the
    fallback when even that fails."""
    x64 = np.asarray(x, dtype=np.float64)
    g = x64.T @ x64  # (K, K)
    jitter = 1e-12 * max(float(np.trace(g)) / max(g.shape[0], 1), 1e-30)
    try:
        lower = np.linalg.cholesky(g + jitter * np.eye(g.shape[0]))
        return lower.T.astype(np.float32)
    except np.linalg.LinAlgError:
        return np.linalg.qr(x64, mode="r").astype(np.float32)


class LinearObjective:
    """``err(fq) = || x @ w - fq(x) @ w_fq ||^2`` for a fixed captured input x (tokens, K).

    Precomputes the reductions described in the module docstring; ``fq`` is any elementwise
    fake-quantizer (float32 in, float32 out). ``channel_weights`` is ``diag(w_fq w_fq^T)``
    broadcast to x, the weights of the diagonal proxy ``sum_tk h_k (x_tk - fq(x)_tk)^2``.
    """

    def __init__(self, x: np.ndarray, w: np.ndarray, w_fq: np.ndarray | None = None) -> None:
        x = np.asarray(x, dtype=np.float32)
        w = np.asarray(w, dtype=np.float32)
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
            raise ValueError(f"need x (tokens, K) and w (K, N), got {x.shape} and {w.shape}")
        wq = w if w_fq is None else np.asarray(w_fq, dtype=np.float32)
        if wq.shape != w.shape:
            raise ValueError(f"w_fq shape {wq.shape} differs from w shape {w.shape}")
        self.operand = x  # (tokens, K)
        k, n = w.shape
        has_c = w_fq is not None and not np.array_equal(wq, w)
        self._const = 0.0
        if n > k:
            # ||E wq||^2 == ||E L||^2 with L L^T = wq wq^T; qw = wq^T L^-T has orthonormal columns
            lw = gram_root(wq.T).T.astype(np.float64)  # (K, K) lower-triangular factor
            self._m = lw.astype(np.float32)  # (K, K)
            if has_c:
                c = x @ (w - wq)  # (tokens, N)
                cq = np.linalg.solve(lw, (c.astype(np.float64) @ wq.T.astype(np.float64)).T).T  # (tokens, K) = c qw
                self._c = cq.astype(np.float32)
                self._const = max(float(np.sum(np.square(c, dtype=np.float64)) - np.sum(np.square(cq))), 0.0)
            else:
                self._c = None
        else:
            self._m = wq  # (K, N)
            self._c = (x @ (w - wq)) if has_c else None  # (tokens, N)
        self.channel_weights = np.sum(np.square(wq.astype(np.float64)), axis=1)[None, :]  # (1, K)
        self._rows = _block(x.shape[0], max(1, _BLOCK_ELEMS // max(k, self._m.shape[1])))
        self._buf: np.ndarray | None = None

    def __call__(self, fq: FakeQuant | UniformParams, bound: float = math.inf) -> float:
        """The error of ``fq`` (a fake-quantizer callable or a :class:`UniformParams`); with a
        ``bound``, possibly only a partial sum once that exceeds it (module docstring)."""
        x = self.operand
        if self._buf is None and isinstance(fq, UniformParams):
            self._buf = np.empty((min(self._rows, x.shape[0]), x.shape[1]), np.float32)
        total = self._const
        for s in range(0, x.shape[0], self._rows):
            xb = x[s:s + self._rows]  # (rows, K)
            e = _residual(xb, fq, self._buf) @ self._m  # (rows, r)
            if self._c is not None:
                e += self._c[s:s + self._rows]
            total += float(np.sum(np.square(e, dtype=np.float64)))
            if total > bound:
                break
        return total


class OperandObjective:
    """Error of a batched matmul ``a @ b`` when one operand is fake-quantized.

    a (..., M, K), b (..., K, N) with equal leading shapes (flattened to S samples).
    which=0: ``err(fq) = || a b - fq(a) b_fq ||^2``; which=1: ``|| a b - a_fq fq(b) ||^2``;
    the other operand's fake-quantized value (``other_fq``) defaults to the exact one.
    ``channel_weights`` (broadcastable to the operand) are the diagonal-proxy weights:
    ``sum_n b_fq[s, k, n]^2`` for a[s, m, k], ``sum_m a_fq[s, m, k]^2`` for b[s, k, n].
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, which: int, other_fq: np.ndarray | None = None) -> None:
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        if which not in (0, 1):
            raise ValueError(f"which must be 0 or 1, got {which!r}")
        if a.ndim < 2 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"need a (..., M, K) and b (..., K, N) with equal leading dims, got {a.shape} and {b.shape}")
        m, k = a.shape[-2:]
        n = b.shape[-1]
        a = a.reshape(-1, m, k)  # (S, M, K)
        b = b.reshape(-1, k, n)  # (S, K, N)
        other = b if which == 0 else a
        oq = other if other_fq is None else np.asarray(other_fq, dtype=np.float32).reshape(other.shape)
        self.which = which
        self.operand = a if which == 0 else b
        self._other = oq
        if other_fq is not None and not np.array_equal(oq, other):
            self._c = a @ (b - oq) if which == 0 else (a - oq) @ b  # (S, M, N)
        else:
            self._c = None
        if which == 0:
            self.channel_weights = np.sum(np.square(oq.astype(np.float64)), axis=2)[:, None, :]  # (S, 1, K)
        else:
            self.channel_weights = np.sum(np.square(oq.astype(np.float64)), axis=1)[:, :, None]  # (S, K, 1)
        self._samples = max(1, min(_BLOCK_ELEMS // max(m * k, k * n, m * n), -(-a.shape[0] // _PRUNE_BLOCKS)))
        self._buf: np.ndarray | None = None

    def __call__(self, fq: FakeQuant | UniformParams, bound: float = math.inf) -> float:
        """As :meth:`LinearObjective.__call__`, in blocks of samples."""
        total = 0.0
        step = self._samples
        if self._buf is None and isinstance(fq, UniformParams):
            self._buf = np.empty((min(step, self.operand.shape[0]),) + self.operand.shape[1:], np.float32)
        for s in range(0, self.operand.shape[0], step):
            op = self.operand[s:s + step]
            d = _residual(op, fq, self._buf)
            e = d @ self._other[s:s + step] if self.which == 0 else self._other[s:s + step] @ d  # (s, M, N)
            if self._c is not None:
                e += self._c[s:s + step]
            total += float(np.sum(np.square(e, dtype=np.float64)))
            if total > bound:
                break
        return total


def candidate_fractions(grid_size: int, low: float, high: float) -> np.ndarray:
    """``linspace(low, high, grid_size)`` plus 1.0 (the min/max step), sorted, float64."""
    if grid_size < 1 or not 0.0 < low <= high:
        raise ValueError(f"need grid_size >= 1 and 0 < low <= high, got {grid_size}, {low}, {high}")
    return np.unique(np.concatenate([np.linspace(low, high, grid_size), [1.0]]))


def coarse_to_fine(n: int, err: Callable[..., float], n_coarse: int = 20,
                   always: Sequence[int] = (), bounded: bool = False) -> tuple[int, float]:
    """Minimise ``err(i)`` over grid indices ``0..n-1``; returns ``(best index, its error)``.

    Evaluates about ``n_coarse`` evenly spaced indices plus ``always``, then every index strictly
    between the best evaluated index's evaluated neighbours. Ties go to the lower index.
    ``bounded``: ``err(i, bound)`` is called with the lowest error so far and may return any
    value above ``bound`` when the error is above it (a partial sum); ``always`` is evaluated
    first. The chosen index and its error are the same as without bounds.
    """
    if n < 1:
        raise ValueError("empty grid")
    seen: dict[int, float] = {}
    best_err = math.inf

    def ev(i: int) -> None:
        nonlocal best_err
        if i not in seen:
            seen[i] = float(err(i, best_err) if bounded else err(i))
            best_err = min(best_err, seen[i])

    coarse = np.unique(np.rint(np.linspace(0, n - 1, max(1, min(n_coarse, n)))).astype(int))
    first = [int(i) for i in always] if bounded else []
    for i in first + sorted(set(coarse.tolist()) | {int(i) for i in always}):
        ev(i)
    best = min(seen, key=lambda i: (seen[i], i))
    done = sorted(seen)
    pos = done.index(best)
    left = done[pos - 1] if pos > 0 else best
    right = done[pos + 1] if pos + 1 < len(done) else best
    for i in range(left + 1, right):
        ev(i)
    best = min(seen, key=lambda i: (seen[i], i))
    return best, seen[best]


def _uniform_candidate(lo: float, hi: float, f: float, bits: int, symmetric: bool) -> UniformParams:
    if symmetric:
        amax = max(abs(lo), abs(hi))
        return params_from_range(-f * amax, f * amax, bits, True)
    return params_from_range(f * lo, f * hi, bits, False)


def search_uniform(objective: "LinearObjective | OperandObjective", bits: int, symmetric: bool,
                   grid_size: int = 100, low: float = 0.01, high: float = 1.2,
                   n_coarse: int = 20) -> tuple[UniformParams, float]:
    """The 'mse' search of :func:`search_activation_scale` / :func:`search_matmul_operand_scale`
    on a prebuilt objective (its operand's min/max, coarse-to-fine, bounded): the chosen
    quantizer and its exact error ``objective(params)``."""
    operand = objective.operand
    lo, hi = float(operand.min()), float(operand.max())
    fracs = candidate_fractions(grid_size, low, high)
    cands: dict[int, UniformParams] = {}

    def err(i: int, bound: float) -> float:
        p = cands.setdefault(i, _uniform_candidate(lo, hi, float(fracs[i]), bits, symmetric))
        return objective(p, bound)

    one = int(np.flatnonzero(fracs == 1.0)[0])
    best, e = coarse_to_fine(len(fracs), err, n_coarse=n_coarse, always=(one,), bounded=True)
    logger.debug("uniform search: fraction %.4f of the min/max step, error %.6g", fracs[best], e)
    return cands[best], e


def _search_uniform(objective, operand: np.ndarray, bits: int, symmetric: bool, grid_size: int,
                    low: float, high: float, method, pct: float, n_coarse: int) -> UniformParams:
    name = _method_name(method)
    if name == "minmax":
        return minmax_params(operand, bits, symmetric)
    if name == "percentile":
        return percentile_params(operand, bits, symmetric, pct)
    return search_uniform(objective, bits, symmetric, grid_size, low, high, n_coarse)[0]


def search_activation_scale(x: np.ndarray, w: np.ndarray, bits: int, symmetric: bool,
                            w_fq: np.ndarray | None = None, grid_size: int = 100, low: float = 0.01,
                            high: float = 1.2, method="mse", pct: float = 99.99,
                            n_coarse: int = 20) -> UniformParams:
    """Per-tensor quantizer of a Linear's input x (tokens, K) with weight w (K, N).

    method 'mse' minimises ``|| x @ w - Q(x) @ w_fq ||^2`` (w_fq defaults to w) over
    ``candidate_fractions(grid_size, low, high)`` x the min/max step, coarse-to-fine;
    'minmax' and 'percentile' (at ``pct``) ignore w.
    """
    x = np.asarray(x, dtype=np.float32)
    if _method_name(method) != "mse":
        return _search_uniform(None, x, bits, symmetric, grid_size, low, high, method, pct, n_coarse)
    obj = LinearObjective(x, w, w_fq)
    return _search_uniform(obj, x, bits, symmetric, grid_size, low, high, method, pct, n_coarse)


def search_matmul_operand_scale(a: np.ndarray, b: np.ndarray, which: int, bits: int, symmetric: bool,
                                other_fq: np.ndarray | None = None, grid_size: int = 100,
                                low: float = 0.01, high: float = 1.2, method="mse",
                                pct: float = 99.99, n_coarse: int = 20) -> UniformParams:
    """Per-tensor quantizer of one operand of a batched activation matmul ``a @ b``.

    a (..., M, K), b (..., K, N) are captured samples (e.g. Q and K^T, or the probabilities and
    V). which=0 quantizes a: minimises ``|| a b - Q(a) b_fq ||^2``; which=1 quantizes b:
    ``|| a b - a_fq Q(b) ||^2``. ``other_fq`` (the other operand, fake-quantized) defaults to
    the exact operand. Same grid and methods as :func:`search_activation_scale`.
    """
    if which not in (0, 1):
        raise ValueError(f"which must be 0 or 1, got {which!r}")
    operand = np.asarray(a if which == 0 else b, dtype=np.float32)
    if _method_name(method) != "mse":
        return _search_uniform(None, operand, bits, symmetric, grid_size, low, high, method, pct, n_coarse)
    obj = OperandObjective(a, b, which, other_fq)
    return _search_uniform(obj, obj.operand, bits, symmetric, grid_size, low, high, method, pct, n_coarse)


_TRI_BLOCK = 128  # rows of the triangular factor per product in _triangular_sq_norms


def _triangular_sq_norms(r: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Column norms ``sum((r @ d)**2, axis=0)`` (float64) for an upper-triangular (or
    trapezoidal) r: row block ``i0:i1`` of ``r @ d`` is ``r[i0:i1, i0:] @ d[i0:]`` (the columns
    left of i0 are zero), about half the multiply-adds of the full product."""
    e = np.zeros(d.shape[1], np.float64)
    for i0 in range(0, r.shape[0], _TRI_BLOCK):
        part = r[i0:i0 + _TRI_BLOCK, i0:] @ d[i0:]
        e += np.sum(np.square(part, dtype=np.float64), axis=0)
    return e


def search_weight_scales(w: np.ndarray, bits: int, x: np.ndarray | None = None,
                         grid: Sequence[float] | np.ndarray | None = None, axis: int = 1) -> UniformParams:
    """Symmetric per-output-channel weight quantizer with searched steps.

    w is (K, N) with output channels on ``axis=1`` (MatMul), or any tensor with its output
    channels on ``axis`` (Conv (O, I, kh, kw): ``axis=0``), viewed as (K', C) with
    ``moveaxis(w, axis, -1).reshape(-1, C)``; x, if given, is (tokens, K') in that row order
    (for a Conv, im2col patches flattened as (I, kh, kw)).

    For each channel c independently, the step is ``f * max|W_c| / qmax`` with f in ``grid``
    (default ``linspace(0.5, 1.0, 50)``; 1.0 always added), minimising ``|| X W_c - X Q(W_c) ||^2``
    if x is given, else ``|| W_c - Q(W_c) ||^2``. Every fraction is evaluated, vectorised over
    channels. Ties keep the larger fraction (min/max first).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise ValueError(f"a weight has at least 2 dims, got shape {w.shape}")
    ax = axis + w.ndim if axis < 0 else axis
    if not 0 <= ax < w.ndim:
        raise ValueError(f"axis {axis} out of range for shape {w.shape}")
    c = w.shape[ax]
    w2 = np.moveaxis(w, ax, -1).reshape(-1, c)  # (K', C)
    fr = np.linspace(0.5, 1.0, 50) if grid is None else np.asarray(grid, dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or np.any(fr <= 0):
        raise ValueError("grid must be a non-empty list of positive fractions")
    fr = np.unique(np.concatenate([fr, [1.0]]))[::-1]  # descending: 1.0 side first wins ties
    if x is None:
        r = None
    else:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != w2.shape[0]:
            raise ValueError(f"x must be (tokens, {w2.shape[0]}), got {x.shape}")
        r = gram_root(x)  # (K', K'): r^T r == x^T x
    amax = np.abs(w2).max(axis=0).astype(np.float64)  # (C,)
    best_err = np.full(c, np.inf)
    best_scale = np.zeros(c, dtype=np.float32)
    buf = np.empty_like(w2)
    for f in fr:
        p = params_from_range(-f * amax, f * amax, bits, True, axis=1)
        d = np.subtract(w2, fake_quant_into(w2, p, buf), out=buf)  # (K', C)
        if r is None:
            e = np.sum(np.square(d, dtype=np.float64), axis=0)  # (C,)
        else:
            e = _triangular_sq_norms(r, d)  # (C,) ||r d_c||^2
        better = e < best_err
        best_err = np.where(better, e, best_err)
        best_scale = np.where(better, p.scale, best_scale)
    return UniformParams(scale=best_scale, zero_point=np.zeros(c, dtype=np.int32), bits=bits,
                         symmetric=True, axis=axis)
