"""Twin-region quantizers and the OPT-m search (numpy only; method.md section 3).

A k-bit twin-region quantizer gives each of two regions k-1 bits of magnitude codes
``q in [0, n]``, ``n = 2^(k-1) - 1`` (``qrange(k - 1, symmetric=False)``), and its own step; the
steps are tied by a power of two::

    delta2 = 2^m * delta1,   m >= 0 an integer

so every representable value is an integer multiple of delta1 (integer hardware aligns the
regions with a shift). delta1 is rounded to float32 on construction, so delta2 and every grid
value are exact float32 numbers, as in an emitted ONNX scale.

post-GELU (``kind='gelu'``; inputs of fc2, range about [-0.17, +inf)), split = 0::

    region 1 (x < 0):   q1 = clamp(rint(-x / delta1), 0, n),  x_hat = -delta1 * q1
    region 2 (x >= 0):  q2 = clamp(rint( x / delta2), 0, n),  x_hat =  delta2 * q2

  Equivalently ``x_hat = Q1(min(x, 0)) + Q2(max(x, 0))`` with Q1, Q2 the symmetric k-bit
  uniform quantizers of steps delta1 and delta2 (:func:`twin_region_params`): the emitted form
  ``y = Q1(min(x, 0)) @ W + Q2(max(x, 0)) @ W``.

post-Softmax (``kind='softmax'``; attention probabilities, range [0, 1], most mass near 0),
split defaults to ``2^(k-1) * delta1`` (just above the top of region 1's grid)::

    region 1 (x < split):   q1 = clamp(rint(x / delta1), 0, n),  x_hat = delta1 * q1
    region 2 (x >= split):  q2 = clamp(rint(x / delta2), 0, n),  x_hat = delta2 * q2

  Region 2's grid also starts at 0 (it is ``{0, delta2, ..., n delta2}``), so its values are
  multiples of ``2^m`` delta1 and the two regions share one integer lattice. Equivalently
  ``x_hat = Q1(where(x < split, x, 0)) + Q2(where(x < split, 0, x))`` with Q1, Q2 the unsigned
  (k-1)-bit quantizers of zero point 0.

With ``m = 0`` both kinds reduce to the symmetric k-bit uniform quantizer of step delta1 (on
x >= 0 for softmax), so OPT-m contains the symmetric uniform quantizer.

OPT-m search (:func:`search_twin`, :func:`search_twin_operand`): minimise the consuming matmul's
output error ``|| x W - Q(x) W_fq ||^2`` jointly over ``m in 0..max_m`` and
``delta2 = f * top / n`` (``top = max(x)``, f on ``candidate_fractions(grid_size, low, high)``),
``delta1 = delta2 / 2^m``. The joint grid (e.g. 13 x 101 points) is too large to evaluate
exactly, so it is ranked by a diagonal proxy ``sum_e h_e (x_e - Q(x)_e)^2`` (``h`` = squared row
norms of the other matmul operand, i.e. ``diag(W W^T)``), computed exactly for every candidate in
O(levels log N) from sorted values and weighted cumulative sums. The ``n_exact`` best proxy
candidates (always including the best at m = 0, the symmetric uniform quantizer) are evaluated on
the exact objective, then a hill climb over (m, f) grid neighbours with exact evaluations refines
the winner.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math

import numpy as np

from .quant import MIN_RANGE, UniformParams, qrange
from .search import LinearObjective, OperandObjective, candidate_fractions

logger = logging.getLogger(__name__)

KINDS = ("gelu", "softmax")

GELU_MIN = 0.17
"""|min GELU(x)| = 0.16997..., rounded up: the hand-set region-1 range of :func:`fixed_ratio_twin`."""

_MAX_PROXY_ELEMS = 1 << 22


def _kind(kind) -> str:
    name = kind.value if isinstance(kind, enum.Enum) else kind
    if name not in KINDS:
        raise ValueError(f"kind must be 'gelu' or 'softmax', got {kind!r}")
    return name


def _levels(bits: int) -> int:
    """n = 2^(bits-1) - 1, the top magnitude code of each region (bits 3..16)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits < 3:
        raise ValueError(f"a twin-region quantizer needs bits >= 3 (2 bits per region), got {bits!r}")
    return qrange(int(bits) - 1, symmetric=False)[1]


@dataclasses.dataclass(frozen=True)
class TwinParams:
    """A twin-region quantizer (see the module docstring for the exact definition).

    kind: 'gelu' | 'softmax'; bits: k (3..16); delta1: region-1 step (> 0, rounded to float32);
    m: delta2 = 2^m * delta1; split: region boundary (0 for gelu; default 2^(k-1) * delta1 for
    softmax).
    """

    kind: str
    bits: int
    delta1: float
    m: int
    split: float | None = None

    def __post_init__(self) -> None:
        kind = _kind(self.kind)
        object.__setattr__(self, "kind", kind)
        _levels(self.bits)
        object.__setattr__(self, "bits", int(self.bits))
        if isinstance(self.m, bool) or not isinstance(self.m, (int, np.integer)) or not 0 <= self.m <= 30:
            raise ValueError(f"m must be an integer from 0 to 30, got {self.m!r}")
        object.__setattr__(self, "m", int(self.m))
        d1 = float(np.float32(self.delta1))
        if not (math.isfinite(d1) and d1 > 0 and math.isfinite(d1 * 2.0**self.m)):
            raise ValueError(f"delta1 must be finite and > 0 (also times 2^m), got {self.delta1!r}")
        object.__setattr__(self, "delta1", d1)
        if kind == "gelu":
            if self.split not in (None, 0, 0.0):
                raise ValueError(f"a gelu twin quantizer splits at 0, got split={self.split!r}")
            object.__setattr__(self, "split", 0.0)
        else:
            split = d1 * 2 ** (self.bits - 1) if self.split is None else float(np.float32(self.split))
            if not (math.isfinite(split) and split > 0):
                raise ValueError(f"split must be finite and > 0, got {self.split!r}")
            object.__setattr__(self, "split", split)

    @property
    def delta2(self) -> float:
        return self.delta1 * 2.0**self.m  # exact: a power-of-two multiple

    @property
    def levels(self) -> int:
        """n = 2^(k-1) - 1, the top code of each region."""
        return _levels(self.bits)


def twin_quantize(x: np.ndarray, p: TwinParams) -> tuple[np.ndarray, np.ndarray]:
    """Region codes ``(q1, q2)`` (int32, shape of x, each in [0, n]; 0 outside its region)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.float32(p.levels)
    d1, d2 = np.float32(p.delta1), np.float32(p.delta2)
    with np.errstate(over="ignore"):  # huge x / tiny step -> inf, clipped to n
        if p.kind == "gelu":
            q1 = np.clip(np.rint(-np.minimum(x, 0) / d1), 0, n)
            q2 = np.clip(np.rint(np.maximum(x, 0) / d2), 0, n)
        else:
            r1 = x < np.float32(p.split)
            q1 = np.where(r1, np.clip(np.rint(x / d1), 0, n), np.float32(0))
            q2 = np.where(r1, np.float32(0), np.clip(np.rint(x / d2), 0, n))
    return q1.astype(np.int32), q2.astype(np.int32)


def twin_dequantize(q1: np.ndarray, q2: np.ndarray, p: TwinParams) -> np.ndarray:
    """float32 values of region codes: ``-delta1 q1 + delta2 q2`` (gelu), ``delta1 q1 + delta2 q2``
    (softmax)."""
    sign = np.float32(-1.0 if p.kind == "gelu" else 1.0)
    return (sign * np.float32(p.delta1)) * np.asarray(q1).astype(np.float32) + \
        np.float32(p.delta2) * np.asarray(q2).astype(np.float32)


def twin_fake_quant(x: np.ndarray, p: TwinParams) -> np.ndarray:
    """``twin_dequantize(*twin_quantize(x, p), p)``: float32, same shape as x."""
    return twin_dequantize(*twin_quantize(x, p), p)


def twin_region_params(p: TwinParams) -> tuple[UniformParams, UniformParams]:
    """The two regions as uniform quantizers, for emission.

    gelu: symmetric k-bit, steps delta1 / delta2, applied to ``min(x, 0)`` / ``max(x, 0)``.
    softmax: unsigned (k-1)-bit with zero point 0, steps delta1 / delta2, applied to
    ``where(x < split, x, 0)`` / ``where(x < split, 0, x)``.
    The sum of the two fake-quantized parts equals :func:`twin_fake_quant`.
    """
    if p.kind == "gelu":
        bits, sym = p.bits, True
    else:
        bits, sym = p.bits - 1, False
    zp = np.zeros((), dtype=np.int32)
    return (UniformParams(np.float32(p.delta1), zp, bits, sym),
            UniformParams(np.float32(p.delta2), zp, bits, sym))


def twin_lattice_range(p: TwinParams) -> tuple[int, int]:
    """The twin quantizer's values as integer multiples of delta1: ``(lo, hi)`` with every
    ``x_hat / delta1`` in ``[lo, hi]`` (gelu: ``[-n, 2^m n]``; softmax: ``[0, max(n_1, 2^m n)]``,
    ``n_1`` = region 1's top code below the split)."""
    n = p.levels
    if p.kind == "gelu":
        return -n, n * 2**p.m
    top1 = min(n, int(math.ceil(p.split / p.delta1)))  # codes rint(x / d1) of x < split
    return 0, max(top1, n * 2**p.m)


def lattice_fits(p: TwinParams, levels: int = 256) -> bool:
    """Whether the lattice codes of ``p`` fit one container of ``levels`` codes (uint8: 256),
    i.e. the operand can reach its matmul as one integer tensor at step delta1."""
    lo, hi = twin_lattice_range(p)
    return hi - lo <= levels - 1


def lattice_max_m(kind, bits: int, levels: int = 256) -> int:
    """The largest m whose twin quantizer (default split) fits a container of ``levels`` codes
    (:func:`lattice_fits`): gelu ``n (2^m + 1) <= levels - 1``, softmax ``n 2^m <= levels - 1``;
    -1 where not even m = 0 fits."""
    kind = _kind(kind)
    n = _levels(bits)
    m = -1
    while m < 30:
        span = n * (2 ** (m + 1) + 1) if kind == "gelu" else n * 2 ** (m + 1)
        if span > levels - 1:
            break
        m += 1
    return m


def fixed_ratio_twin(x: np.ndarray, bits: int, kind) -> TwinParams:
    """Hand-set PTQ4ViT-style twin quantizer (no search; the baseline OPT-m improves on).

    gelu: region 1 covers the GELU minimum, ``delta1 = 0.17 / n``; m is the smallest integer
    with ``n * delta2 = 0.17 * 2^m >= max(x)`` (region 2 covers the data without clipping).
    softmax: region 2 covers [0, 1] with ``delta2 = 1 / n`` and ``m = k - 1``, so
    ``split = 2^(k-1) delta1 = delta2``: region 1 spans [0, delta2) finely and the grids mesh
    (x is not used).
    """
    kind = _kind(kind)
    n = _levels(bits)
    if kind == "gelu":
        top = float(np.max(np.asarray(x, dtype=np.float32)))
        m = 0 if top <= GELU_MIN else int(math.ceil(math.log2(top / GELU_MIN)))
        return TwinParams("gelu", bits, GELU_MIN / n, min(m, 30))
    m = bits - 1
    return TwinParams("softmax", bits, (1.0 / n) / 2.0**m, m)


class _ProxyTable:
    """Sorted values with weighted cumulative sums: the exact weighted SSE of rounding the values
    in an interval to a uniform grid, in O(levels log N) per grid."""

    def __init__(self, operand: np.ndarray, weights: np.ndarray, max_elems: int = _MAX_PROXY_ELEMS) -> None:
        last = operand.shape[-1]
        rows = operand.size // last
        keep = max(1, max_elems // last)
        if rows > keep:  # evenly spaced rows (deterministic), whole rows keep the channel structure
            idx = np.unique(np.linspace(0, rows - 1, keep).astype(np.int64))
        else:
            idx = np.arange(rows)
        lead = operand.shape[:-1]
        multi = np.unravel_index(idx, lead) if lead else ()
        v = operand.reshape(rows, last)[idx]  # (rows', last)
        wsel = tuple(mi if weights.shape[d] > 1 else np.zeros_like(mi) for d, mi in enumerate(multi))
        w = np.broadcast_to(weights[wsel] if lead else weights, v.shape)  # (rows', last)
        v = v.ravel().astype(np.float64)
        w = np.asarray(w, dtype=np.float64).ravel()
        order = np.argsort(v, kind="stable")
        self.v = v[order]
        w = w[order]
        self.s0 = np.concatenate([[0.0], np.cumsum(w)])
        self.s1 = np.concatenate([[0.0], np.cumsum(w * self.v)])
        self.s2 = np.concatenate([[0.0], np.cumsum(w * self.v * self.v)])

    def sse(self, steps: np.ndarray, jmin: int, jmax: int, lo, hi) -> np.ndarray:
        """For each step (S,): weighted SSE of the values in [lo, hi) (scalars or (S,)) rounded
        to ``clamp(round(v / step), jmin, jmax) * step``. Returns (S,)."""
        steps = np.asarray(steps, dtype=np.float64)[:, None]  # (S, 1)
        lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), steps.shape[:1])[:, None]  # (S, 1)
        hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), steps.shape[:1])[:, None]  # (S, 1)
        j = np.arange(jmin, jmax + 1, dtype=np.float64)[None, :]  # (1, L)
        inner = (np.arange(jmin, jmax, dtype=np.float64)[None, :] + 0.5) * steps  # (S, L-1)
        edges = np.concatenate([lo, np.clip(inner, lo, hi), hi], axis=1)  # (S, L+1)
        idx = np.searchsorted(self.v, edges, side="left")  # (S, L+1)
        a, b = idx[:, :-1], idx[:, 1:]
        c = j * steps  # (S, L) level values
        s0 = self.s0[b] - self.s0[a]
        s1 = self.s1[b] - self.s1[a]
        s2 = self.s2[b] - self.s2[a]
        return np.sum(np.maximum(s2 - 2.0 * c * s1 + c * c * s0, 0.0), axis=1)


def _proxy_grid(table: _ProxyTable, kind: str, bits: int, fracs: np.ndarray, top: float,
                max_m: int) -> tuple[np.ndarray, np.ndarray]:
    """Proxy SSE over the joint grid and the float32 delta1 of each point: both (max_m+1, F)."""
    n = _levels(bits)
    d2_base = fracs * top / n  # (F,)
    proxies = np.empty((max_m + 1, fracs.size))
    deltas = np.empty((max_m + 1, fracs.size))
    for m in range(max_m + 1):
        d1 = (d2_base / 2.0**m).astype(np.float32).astype(np.float64)  # (F,)
        d2 = d1 * 2.0**m
        deltas[m] = d1
        if kind == "gelu":
            e = table.sse(d1, -n, 0, -np.inf, 0.0) + table.sse(d2, 0, n, 0.0, np.inf)
        else:
            split = d1 * 2 ** (bits - 1)
            e = table.sse(d1, 0, n, -np.inf, split) + table.sse(d2, 0, n, split, np.inf)
        proxies[m] = e
    return proxies, deltas


def _search_twin(objective, operand: np.ndarray, bits: int, kind, max_m: int, grid_size: int,
                 low: float, high: float, n_exact: int, refine_steps: int) -> TwinParams:
    kind = _kind(kind)
    _levels(bits)  # validates bits
    if isinstance(max_m, bool) or not isinstance(max_m, (int, np.integer)) or not 0 <= max_m <= 30:
        raise ValueError(f"max_m must be an integer from 0 to 30, got {max_m!r}")
    if operand.size == 0:
        raise ValueError("cannot search a quantizer on an empty array")
    top = float(operand.max())
    if kind == "gelu" and top <= 0:
        top = float(np.abs(operand).max())
    top = max(top, MIN_RANGE)
    fracs = candidate_fractions(grid_size, low, high)
    table = _ProxyTable(operand, objective.channel_weights)
    proxies, deltas = _proxy_grid(table, kind, bits, fracs, top, max_m)
    del table

    exact: dict[tuple[int, int], float] = {}

    def params(mi: int, fi: int) -> TwinParams:
        return TwinParams(kind, bits, float(deltas[mi, fi]), mi)

    def ev(mi: int, fi: int) -> float:
        if (mi, fi) not in exact:
            p = params(mi, fi)
            exact[(mi, fi)] = objective(lambda v: twin_fake_quant(v, p))
        return exact[(mi, fi)]

    order = np.argsort(proxies, axis=None, kind="stable")
    starts = [tuple(int(t) for t in np.unravel_index(i, proxies.shape)) for i in order[:max(1, n_exact)]]
    starts.append((0, int(np.argmin(proxies[0]))))
    for mi, fi in starts:
        ev(mi, fi)
    best = min(exact, key=lambda k: (exact[k], k))
    for _ in range(max(0, refine_steps)):
        mi, fi = best
        nbrs = [(mi + dm, fi + df) for dm, df in ((0, -1), (0, 1), (-1, 0), (1, 0))
                if 0 <= mi + dm <= max_m and 0 <= fi + df < fracs.size]
        for nb in nbrs:
            ev(*nb)
        new = min(exact, key=lambda k: (exact[k], k))
        if new == best:
            break
        best = new
    p = params(*best)
    logger.debug("OPT-m %s: m=%d delta1=%.6g (fraction %.4f), error %.6g after %d exact evaluations",
                 kind, p.m, p.delta1, fracs[best[1]], exact[best], len(exact))
    return p


def search_twin(x: np.ndarray, w: np.ndarray, bits: int, kind, max_m: int = 12,
                grid_size: int = 100, low: float = 0.01, high: float = 1.2,
                w_fq: np.ndarray | None = None, n_exact: int = 8, refine_steps: int = 16) -> TwinParams:
    """OPT-m: twin quantizer of a Linear's input x (tokens, K) with weight w (K, N), minimising
    ``|| x @ w - Q(x) @ w_fq ||^2`` jointly over m in 0..max_m and the step (module docstring)."""
    obj = LinearObjective(x, w, w_fq)
    return _search_twin(obj, obj.operand, bits, kind, max_m, grid_size, low, high, n_exact, refine_steps)


def search_twin_operand(a: np.ndarray, b: np.ndarray, which: int, bits: int, kind="softmax",
                        max_m: int = 12, grid_size: int = 100, low: float = 0.01, high: float = 1.2,
                        other_fq: np.ndarray | None = None, n_exact: int = 8,
                        refine_steps: int = 16) -> TwinParams:
    """OPT-m for one operand of a batched matmul, e.g. the attention probabilities a (..., M, K)
    in ``a @ V`` (which=0). Objective as in
    :func:`onnx_mptq.numerics.search.search_matmul_operand_scale`."""
    obj = OperandObjective(a, b, which, other_fq)
    return _search_twin(obj, obj.operand, bits, kind, max_m, grid_size, low, high, n_exact, refine_steps)
