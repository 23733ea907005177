"""SQ-b: SmoothQuant with a bias (shift) term, folded into the graph (method.md section 2).

A LayerNorm output ``Y`` (C channels) feeds Linears ``Y @ W_k + b_k`` (effective weights
``W_k`` of shape (C, N_k)). All consumers share one per-channel shift ``mu`` and one smoothing
scale ``eps`` (> 0)::

    Y @ W + b == ((Y - mu) / eps) @ (eps[:, None] * W) + (b + mu @ W)

    gamma' = gamma / eps,          beta' = (beta - mu) / eps
    W'     = eps[:, None] * W,     b'    = b + mu @ W          (original W)

    mu_j   = mean_t Y_tj  (shift "mean")   or   (max_t Y_tj + min_t Y_tj) / 2  ("midpoint")
    eps_j  = max_t |Y_tj - mu_j| ^ alpha / max_{k,i} |W_k[j, i]| ^ (1 - alpha)

``max_t |Y_tj - mu_j| = max(max_j - mu_j, mu_j - min_j)`` is exact from the per-channel
calibration statistics. For a ``Gemm`` (``alpha_g * A @ B + beta_g * C``) the bias correction is
``C' = C + (alpha_g / beta_g) * mu @ W``.

Three modes per LayerNorm (:class:`~onnx_mptq.plan.FoldMode`):

* ``folded``: the LayerNorm output only reaches the Linears (through channel-preserving ops), so
  ``(Y - mu) / eps`` is computed by the LayerNorm itself with gamma'/beta'. No node is added
  (except a bias ``Add`` behind a ``MatMul`` that had none).
* ``explicit``: the output also feeds something else (a residual ``Add`` in post-norm blocks, a
  graph output, ...) or the fold is otherwise not exact. ``Sub(mu) -> Mul(1 / eps)`` is inserted
  on the Linear branch only (one pair per distinct tensor the Linears read), so the other users
  keep the original values. Exact for any tensor the Linears read, zero padding included.
* ``skipped``: nothing changes (``smooth.fallback = skip``, no Linear consumers, already smoothed,
  or the weights are not constants).

Surgery rules: initializers are never edited in place (timm exports share LN gammas/betas and
zero biases across many nodes). Every changed constant is a new initializer (``{node}.sqb_weight``,
``{node}.sqb_bias``, ``{ln}.sqb_gamma``, ``{ln}.sqb_beta``...) wired only into the node that
changes. A weight read through an exclusive Identity/Transpose/Reshape chain keeps its storage
layout (the new initializer replaces the chain's source); a shared chain is bypassed.

Idempotence: the result carries the metadata entry ``onnx_mptq.smoothed`` (a JSON list of the
smoothed LayerNorm names); LayerNorms listed there are planned and applied as ``skipped`` with the
reason ``already smoothed``, so running the pass twice changes nothing the second time.

Optional alpha search (``smooth.alpha_search``): per LayerNorm, each alpha of ``smooth.alpha_grid``
is scored on captured samples of ``Y`` (tokens, C) by the consumers' output error under a 4-bit
fake quantization -- per-tensor symmetric min/max for the smoothed input ``(Y - mu) / eps``,
per-output-channel symmetric min/max for ``eps[:, None] * W``::

    err(alpha) = sum_k || (Y - mu) @ W_k - Q4(Ys) @ Q4(eps[:, None] * W_k) ||^2 / || (Y - mu) @ W_k ||^2

(the bias ``b + mu @ W`` is exact in float and cancels). The smallest error wins; ties keep the
earlier grid value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..config import FoldFallback, ShiftMode, SmoothConfig
from ..errors import CalibrationError, PlanError
from ..graph.analysis import GraphView, LayerNormInfo, ModelAnalysis, Unit
from ..graph.io import assign_node_names, graph_digest
from ..numerics.quant import fake_quant, minmax_params, weight_params
from ..numerics.smoothing import (
    Conditioning,
    conditioning,
    fold_layernorm,
    fold_linear,
    shift_vector,
    shifted_absmax,
    smoothing_factors,
    weight_absmax_rows,
)
from ..plan import FoldMode, SmoothedNorm, SmoothingPlan
from ..records import Record
from .naming import UniqueNames

log = logging.getLogger(__name__)

SMOOTHED_KEY = "onnx_mptq.smoothed"
ALREADY_SMOOTHED = "already smoothed"
DISABLED = "smoothing is disabled (smooth.enabled = false)"
SEARCH_BITS = 4  # fake-quant bits of the alpha-search criterion
SEARCH_MAX_ROWS = 4096  # rows of Y used by the alpha search


class _ChannelStatsLike(Protocol):
    mean: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]


class _StatsLike(Protocol):
    """What the pass reads of :class:`onnx_mptq.calibrate.stats.CalibrationStats` (passes do not
    import calibrate)."""

    model_digest: str

    def get(self, tensor: str) -> _ChannelStatsLike: ...


# ---------------------------------------------------------------------------------------------
# report


@dataclasses.dataclass(frozen=True)
class NormReport:
    layernorm: str
    mode: FoldMode
    reason: str | None
    alpha: float
    shift: str | None  # "mean" | "midpoint" | "custom" (plan values match neither); None without stats
    consumers: tuple[str, ...]
    before: Conditioning | None  # from the calibration statistics
    after: Conditioning | None  # analytic: ((mean, min, max) - mu) / eps
    nodes_added: int = 0


@dataclasses.dataclass(frozen=True)
class SmoothReport(Record):
    KIND = "smooth_report"
    SCHEMA_VERSION = 1

    source_digest: str  # the graph the pass was applied to
    model_digest: str  # the result
    nodes_before: int
    nodes_after: int
    norms: tuple[NormReport, ...]

    def norm(self, layernorm: str) -> NormReport:
        for n in self.norms:
            if n.layernorm == layernorm:
                return n
        raise KeyError(layernorm)

    def count(self, mode: FoldMode) -> int:
        return sum(1 for n in self.norms if n.mode is mode)

    @property
    def changed(self) -> bool:
        return any(n.mode is not FoldMode.SKIPPED for n in self.norms)


# ---------------------------------------------------------------------------------------------
# helpers


def smoothed_layernorms(model: onnx.ModelProto) -> frozenset[str]:
    """Names of the LayerNorms a previous run of this pass smoothed (from the model metadata)."""
    for p in model.metadata_props:
        if p.key == SMOOTHED_KEY:
            try:
                names = json.loads(p.value)
            except json.JSONDecodeError:
                names = None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise PlanError(f"model metadata {SMOOTHED_KEY!r} must be a JSON list of LayerNorm names, got {p.value[:80]!r}")
            return frozenset(names)
    return frozenset()


def _named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assign_node_names(m)
    return m


def _open(model: onnx.ModelProto, analysis: ModelAnalysis) -> tuple[onnx.ModelProto, gs.Graph, GraphView, dict[str, gs.Node]]:
    m = _named_copy(model)
    if graph_digest(m) != analysis.model_digest:
        raise PlanError(
            f"the analysis was made for another model (analysis digest {analysis.model_digest}, model digest {graph_digest(m)})"
        )
    graph = gs.import_onnx(m)
    view = GraphView(graph)
    nodes = {n.name: n for n in graph.nodes}
    return m, graph, view, nodes


def _stats_arrays(stats: _StatsLike, ln: LayerNormInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        s = stats.get(ln.output)
    except KeyError:
        raise CalibrationError(
            f"no calibration statistics for {ln.output!r} (output of LayerNorm {ln.name}); collect them for "
            f"every LayerNorm output with Linear consumers"
        ) from None
    mean = np.asarray(s.mean, dtype=np.float64)
    lo = np.asarray(s.min, dtype=np.float64)
    hi = np.asarray(s.max, dtype=np.float64)
    if ln.channels is not None and mean.shape != (ln.channels,):
        raise CalibrationError(f"statistics of {ln.output!r} have {mean.shape[0]} channels, LayerNorm {ln.name} has {ln.channels}")
    return mean, lo, hi


def _explicit_possible(ln: LayerNormInfo, view: GraphView, nodes: dict[str, gs.Node]) -> str | None:
    """Why the explicit fallback cannot apply either, or None."""
    if not ln.consumers:
        return ln.reason or "feeds no quantizable Linear"
    if not ln.axis_last or ln.channels is None:
        return ln.reason
    for c in ln.consumers:
        node = nodes.get(c)
        if node is None or view.const(node.inputs[1]) is None:
            return f"weight of {c} is not a constant"
    return None


def _pad_between(view: GraphView, ln: LayerNormInfo, nodes: dict[str, gs.Node]) -> str | None:
    """Name of a Pad on the data path from the LayerNorm output to one of its Linears, if any."""
    for c in ln.consumers:
        t = nodes[c].inputs[0]
        for _ in range(32):
            if t.name == ln.output:
                break
            node = view.producer(t)
            if node is None or not node.inputs:
                break
            if node.op == "Pad":
                return node.name
            t = node.inputs[0]
    return None


def _rows(y: np.ndarray, channels: int, limit: int = SEARCH_MAX_ROWS) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32).reshape(-1, channels)  # (tokens, C)
    if y.shape[0] > limit:
        idx = np.linspace(0, y.shape[0] - 1, limit).round().astype(np.int64)
        y = y[idx]
    return y


def alpha_search_error(y: np.ndarray, mu: np.ndarray, eps: np.ndarray, weights: list[np.ndarray],
                       bits: int = SEARCH_BITS) -> float:
    """Summed relative output error of the consumers under ``bits``-bit fake quantization of the
    smoothed input (per-tensor, symmetric min/max) and the scaled weights (per output channel)."""
    ys = ((y - mu) / eps).astype(np.float32)  # (T, C)
    xq = fake_quant(ys, minmax_params(ys, bits, symmetric=True))  # (T, C)
    err = 0.0
    for w in weights:
        ws = (eps[:, None] * w).astype(np.float32)  # (C, N)
        wq = fake_quant(ws, weight_params(ws, bits, axis=1))  # (C, N)
        ref = ys.astype(np.float64) @ ws.astype(np.float64)  # (T, N) == (Y - mu) @ W
        out = xq.astype(np.float64) @ wq.astype(np.float64)  # (T, N)
        den = float(np.sum(ref * ref))
        err += float(np.sum((ref - out) ** 2)) / (den if den > 0 else 1.0)
    return err


def _search_alpha(y: np.ndarray, mu: np.ndarray, act_absmax: np.ndarray, w_absmax: np.ndarray,
                  weights: list[np.ndarray], grid: tuple[float, ...]) -> tuple[float, np.ndarray]:
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in grid:
        eps = smoothing_factors(act_absmax, w_absmax, alpha)  # (C,)
        err = alpha_search_error(y, mu, eps, weights)
        if best is None or err < best[0]:
            best = (err, float(alpha), eps)
    assert best is not None  # the grid is non-empty (SmoothConfig validates it)
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# planning


def plan_smoothing(
    analysis: ModelAnalysis,
    stats: _StatsLike,
    model: onnx.ModelProto,
    cfg: SmoothConfig,
    source_digest: str,
    samples: Mapping[str, np.ndarray] | None = None,
) -> SmoothingPlan:
    """Shift and scale of every LayerNorm with Linear consumers, and how each is applied.

    ``stats``: per-channel statistics of the LayerNorm outputs (a ``CalibrationStats``).
    ``samples``: LayerNorm output name -> captured values (tokens, C), needed only with
    ``cfg.alpha_search``. ``source_digest`` binds the plan to the user's model.
    """
    _, _, view, nodes = _open(model, analysis)
    digests = {analysis.model_digest, graph_digest(model)}
    if stats.model_digest not in digests:
        raise PlanError(
            f"the calibration statistics were collected on another model (stats digest {stats.model_digest}, "
            f"model digest {analysis.model_digest})"
        )
    done = smoothed_layernorms(model)
    norms: list[SmoothedNorm] = []
    for ln in analysis.layernorms:
        skip_reason: str | None = None
        if ln.name in done:
            skip_reason = ALREADY_SMOOTHED
        elif not cfg.enabled:
            skip_reason = DISABLED
        elif not ln.consumers:
            skip_reason = ln.reason or "feeds no quantizable Linear"
        elif not ln.foldable:
            why_not = _explicit_possible(ln, view, nodes)
            if why_not is not None:
                skip_reason = why_not
            elif cfg.fallback is FoldFallback.SKIP:
                skip_reason = ln.reason
        if skip_reason is not None:
            norms.append(SmoothedNorm(ln.name, FoldMode.SKIPPED, float(cfg.alpha), (), (), tuple(ln.consumers), skip_reason))
            continue
        mode = FoldMode.FOLDED if ln.foldable else FoldMode.EXPLICIT

        mean, lo, hi = _stats_arrays(stats, ln)
        mu = shift_vector(mean, lo, hi, cfg.shift)  # (C,)
        act_absmax = shifted_absmax(lo, hi, mu)  # (C,)
        weights = [analysis.unit(c).effective_weight(view) for c in ln.consumers]  # [(C, N_k)]
        w_absmax = weight_absmax_rows(weights)  # (C,)
        if cfg.alpha_search:
            if samples is None or ln.output not in samples:
                raise CalibrationError(
                    f"smooth.alpha_search needs captured samples of {ln.output!r} (output of LayerNorm {ln.name})"
                )
            y = _rows(samples[ln.output], mu.shape[0])
            alpha, eps = _search_alpha(y, mu.astype(np.float32), act_absmax, w_absmax, weights, cfg.alpha_grid)
        else:
            alpha = float(cfg.alpha)
            eps = smoothing_factors(act_absmax, w_absmax, alpha)  # (C,)
        if not (np.all(np.isfinite(eps)) and np.all(eps > 0)):
            bad = int(np.flatnonzero(~(np.isfinite(eps) & (eps > 0)))[0])
            norms.append(SmoothedNorm(ln.name, FoldMode.SKIPPED, alpha, (), (), tuple(ln.consumers),
                                      f"scale of channel {bad} is non-finite or <= 0"))
            continue
        reason = ln.reason
        if mode is FoldMode.FOLDED:
            pad = _pad_between(view, ln, nodes)
            reason = None if pad is None else (
                f"folded through Pad {pad}: exact while the pad amount is zero (feature map divisible by the window)"
            )
        norms.append(
            SmoothedNorm(
                layernorm=ln.name,
                mode=mode,
                alpha=alpha,
                shift=tuple(float(v) for v in mu),
                scale=tuple(float(v) for v in eps),
                consumers=tuple(ln.consumers),
                reason=reason,
            )
        )
    return SmoothingPlan(source_digest=source_digest, norms=tuple(norms))


# ---------------------------------------------------------------------------------------------
# surgery


@dataclasses.dataclass
class _ConstEdit:
    """Replace the constant read by ``node.inputs[index]`` with ``value`` (in the layout the node
    reads). ``head`` is the exclusive chain node whose input 0 receives ``stored`` instead."""

    node: gs.Node
    index: int
    value: np.ndarray
    name: str
    head: gs.Node | None = None
    stored: np.ndarray | None = None


@dataclasses.dataclass
class _AppendConst:
    """Set optional input ``index`` of ``node`` (absent or empty) to a new constant."""

    node: gs.Node
    index: int
    value: np.ndarray
    name: str
    attrs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _BiasAdd:
    """Insert ``Add(bias)`` behind a MatMul without a bias."""

    node: gs.Node
    value: np.ndarray
    name: str


@dataclasses.dataclass
class _ShiftScale:
    """Insert ``Sub(mu) -> Mul(1/eps)`` in front of ``consumers`` reading ``tensor``."""

    ln: str
    tensor: gs.Tensor
    consumers: list[gs.Node]
    mu: np.ndarray
    inv_eps: np.ndarray
    suffix: str


def _exclusive_chain(view: GraphView, t: gs.Tensor) -> list[gs.Node] | None:
    """Identity/Transpose/Reshape nodes between a gs.Constant and ``t`` (node side first), when
    every tensor along the chain has exactly one reader; None when shared or not a chain."""
    chain: list[gs.Node] = []
    cur = t
    for _ in range(8):
        if isinstance(cur, gs.Constant):
            return chain
        if len(cur.outputs) != 1 or cur.name in view.output_names:
            return None
        node = view.producer(cur)
        if node is None or node.op not in ("Identity", "Transpose", "Reshape") or not node.inputs:
            return None
        chain.append(node)
        cur = node.inputs[0]
    return None


def _to_storage(view: GraphView, chain: list[gs.Node], value: np.ndarray) -> np.ndarray:
    """Invert the chain: the array to put at the chain's source so the node reads ``value``."""
    v = value
    for node in chain:
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            v = np.transpose(v, np.argsort(perm)) if perm is not None else np.transpose(v)
        elif node.op == "Reshape":
            src = view.const(node.inputs[0])
            assert src is not None  # the chain ends in a constant
            v = v.reshape(src.shape)
    return np.ascontiguousarray(v)


def _const_edit(view: GraphView, node: gs.Node, index: int, value: np.ndarray, name: str) -> _ConstEdit:
    value = np.ascontiguousarray(value, dtype=np.float32)
    old = view.const(node.inputs[index])
    chain = _exclusive_chain(view, node.inputs[index])
    if chain and old is not None and old.shape == value.shape:
        return _ConstEdit(node, index, value, name, head=chain[-1], stored=_to_storage(view, chain, value))
    return _ConstEdit(node, index, value, name)


def _const_index(view: GraphView, node: gs.Node) -> int:
    for i, t in enumerate(node.inputs):
        if view.is_const(t):
            return i
    raise PlanError(f"{node.name}: no constant input")


def _per_channel(v: np.ndarray, c: int) -> np.ndarray:
    """A gamma/beta constant as a (C,) float64 vector (a scalar is broadcast)."""
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if a.size == 1:
        return np.full(c, a[0])
    if a.size != c:
        raise PlanError(f"a LayerNorm affine constant has {a.size} values for {c} channels")
    return a


def _shaped_like(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    return new.reshape(old.shape) if old.size == new.size else new


def _linear_edits(view: GraphView, unit: Unit, node: gs.Node, unit_bias_node: gs.Node | None, mu: np.ndarray,
                  eps: np.ndarray, names: UniqueNames) -> list:
    """Scale the weight rows by eps and add mu @ W to the bias of one Linear."""
    edits: list = []
    w = unit.effective_weight(view)  # (K, N)
    if node.op == "Gemm":
        alpha_g = float(node.attrs.get("alpha", 1.0))
        beta_g = float(node.attrs.get("beta", 1.0))
        w_new, _ = fold_linear(w, None, mu, eps)  # (K, N)
        has_c = len(node.inputs) > 2 and bool(node.inputs[2].name)
        c_old = view.const(node.inputs[2]) if has_c else None
        if has_c and c_old is None:
            raise PlanError(f"{node.name}: bias C is not a constant")
        mu_w64 = np.asarray(w, dtype=np.float64).T @ np.asarray(mu, dtype=np.float64)  # (N,)
        if c_old is not None and beta_g != 0.0:
            c_new = np.asarray(c_old, dtype=np.float64) + (alpha_g / beta_g) * mu_w64  # broadcast over C's shape
            edits.append(_const_edit(view, node, 2, c_new.astype(np.float32), names(f"{node.name}.sqb_bias")))
        else:  # no C (or beta = 0, C ignored): C' = alpha * mu @ W with beta = 1
            edits.append(_AppendConst(node, 2, (alpha_g * mu_w64).astype(np.float32), names(f"{node.name}.sqb_bias"),
                                      attrs={"beta": 1.0}))
    else:
        if unit_bias_node is not None:
            idx = _const_index(view, unit_bias_node)
            b_old = np.asarray(view.const(unit_bias_node.inputs[idx]))
            w_new, b_new = fold_linear(w, b_old.reshape(-1), mu, eps)  # (K, N), (N,)
            edits.append(_const_edit(view, unit_bias_node, idx, _shaped_like(b_new, b_old), names(f"{node.name}.sqb_bias")))
        else:
            w_new, b_new = fold_linear(w, None, mu, eps)
            edits.append(_BiasAdd(node, b_new, names(f"{node.name}.sqb_bias")))
    stored = unit.effective(w_new)  # back to the layout the node reads: (K, N), or (N, K) for transB (its own inverse)
    edits.insert(0, _const_edit(view, node, 1, stored, names(f"{node.name}.sqb_weight")))
    return edits


def _layernorm_edits(view: GraphView, nodes: dict[str, gs.Node], ln: LayerNormInfo, mu: np.ndarray, eps: np.ndarray,
                     names: UniqueNames) -> list:
    c = mu.shape[0]
    if ln.form == "op":
        node = nodes[ln.name]
        g_old = np.asarray(view.const(node.inputs[1]))
        has_beta = len(node.inputs) > 2 and bool(node.inputs[2].name)
        b_old = np.asarray(view.const(node.inputs[2])) if has_beta else np.zeros_like(g_old)
        g_new, b_new = fold_layernorm(_per_channel(g_old, c), _per_channel(b_old, c), mu, eps)
        edits: list = [_const_edit(view, node, 1, _shaped_like(g_new, g_old), names(f"{ln.name}.sqb_gamma"))]
        if has_beta:
            edits.append(_const_edit(view, node, 2, _shaped_like(b_new, b_old), names(f"{ln.name}.sqb_beta")))
        else:
            edits.append(_AppendConst(node, 2, _shaped_like(b_new, g_old), names(f"{ln.name}.sqb_beta")))
        return edits
    gnode, bnode = nodes[ln.gamma_node], nodes[ln.beta_node]  # foldable decomposed: both exist
    gi, bi = _const_index(view, gnode), _const_index(view, bnode)
    g_old = np.asarray(view.const(gnode.inputs[gi]))
    b_old = np.asarray(view.const(bnode.inputs[bi]))
    g_new, b_new = fold_layernorm(_per_channel(g_old, c), _per_channel(b_old, c), mu, eps)
    return [
        _const_edit(view, gnode, gi, _shaped_like(g_new, g_old), names(f"{ln.name}.sqb_gamma")),
        _const_edit(view, bnode, bi, _shaped_like(b_new, b_old), names(f"{ln.name}.sqb_beta")),
    ]


def _apply_edit(graph: gs.Graph, edit, names: UniqueNames) -> int:
    """Perform one edit; returns the number of nodes added."""
    if isinstance(edit, _ConstEdit):
        if edit.head is not None:
            edit.head.inputs[0] = gs.Constant(edit.name, np.ascontiguousarray(edit.stored, dtype=np.float32))
        else:
            edit.node.inputs[edit.index] = gs.Constant(edit.name, edit.value)
        return 0
    if isinstance(edit, _AppendConst):
        const = gs.Constant(edit.name, np.ascontiguousarray(edit.value, dtype=np.float32))
        while len(edit.node.inputs) < edit.index:
            edit.node.inputs.append(gs.Variable.empty())
        if len(edit.node.inputs) > edit.index:
            edit.node.inputs[edit.index] = const
        else:
            edit.node.inputs.append(const)
        edit.node.attrs.update(edit.attrs)
        return 0
    if isinstance(edit, _BiasAdd):
        out = edit.node.outputs[0]
        tmp = gs.Variable(names(f"{edit.node.name}.sqb_unbiased"), dtype=out.dtype or np.float32, shape=out.shape)
        edit.node.outputs[0] = tmp
        const = gs.Constant(edit.name, np.ascontiguousarray(edit.value, dtype=np.float32))
        graph.layer(op="Add", name=names(f"{edit.node.name}.sqb_bias_add"), inputs=[tmp, const], outputs=[out])
        return 1
    if isinstance(edit, _ShiftScale):
        x = edit.tensor
        dtype = getattr(x, "dtype", None) or np.float32
        shape = getattr(x, "shape", None)
        mu = gs.Constant(names(f"{edit.ln}.sqb_mu{edit.suffix}"), np.ascontiguousarray(edit.mu, dtype=np.float32))
        inv = gs.Constant(names(f"{edit.ln}.sqb_inv_scale{edit.suffix}"), np.ascontiguousarray(edit.inv_eps, dtype=np.float32))
        shifted = gs.Variable(names(f"{edit.ln}.sqb_shifted{edit.suffix}"), dtype=dtype, shape=shape)
        smoothed = gs.Variable(names(f"{edit.ln}.sqb_smoothed{edit.suffix}"), dtype=dtype, shape=shape)
        graph.layer(op="Sub", name=names(f"{edit.ln}.sqb_sub{edit.suffix}"), inputs=[x, mu], outputs=[shifted])
        graph.layer(op="Mul", name=names(f"{edit.ln}.sqb_mul{edit.suffix}"), inputs=[shifted, inv], outputs=[smoothed])
        for node in edit.consumers:
            node.inputs[0] = smoothed
        return 2
    raise TypeError(f"unknown edit {type(edit).__name__}")


def _check_norm(sn: SmoothedNorm, ln: LayerNormInfo) -> tuple[np.ndarray, np.ndarray]:
    c = ln.channels
    mu = np.asarray(sn.shift, dtype=np.float64)
    eps = np.asarray(sn.scale, dtype=np.float64)
    where = f"smoothing plan, LayerNorm {sn.layernorm}"
    if c is None or mu.shape != (c,) or eps.shape != (c,):
        raise PlanError(f"{where}: shift and scale need {c} values each, got {mu.shape[0]} and {eps.shape[0]}")
    if not np.all(np.isfinite(mu)):
        raise PlanError(f"{where}: shift must be finite")
    if not (np.all(np.isfinite(eps)) and np.all(eps > 0)):
        raise PlanError(f"{where}: scale must be finite and > 0")
    if not sn.consumers:
        raise PlanError(f"{where}: no consumers to smooth")
    unknown = sorted(set(sn.consumers) - set(ln.consumers))
    if unknown:
        raise PlanError(f"{where}: {', '.join(unknown)} is not a Linear fed by this LayerNorm")
    if sn.mode is FoldMode.FOLDED:
        if not ln.foldable:
            raise PlanError(f"{where}: cannot be folded ({ln.reason}); use mode explicit or skipped")
        missing = sorted(set(ln.consumers) - set(sn.consumers))
        if missing:
            raise PlanError(f"{where}: a folded LayerNorm must smooth all its Linears (missing {', '.join(missing)})")
    return mu.astype(np.float32), eps.astype(np.float32)


def _shift_name(mu: np.ndarray, mean: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> str:
    for mode in (ShiftMode.MEAN, ShiftMode.MIDPOINT):
        ref = shift_vector(mean, lo, hi, mode).astype(np.float64)
        if np.allclose(mu, ref, rtol=1e-6, atol=1e-7):
            return mode.value
    return "custom"


def _conditioning(stats: _StatsLike | None, ln: LayerNormInfo, mu: np.ndarray | None, eps: np.ndarray | None):
    """(shift name, before, after) of one LayerNorm output, or Nones without statistics."""
    if stats is None:
        return None, None, None
    try:
        s = stats.get(ln.output)
    except KeyError:
        return None, None, None
    mean = np.asarray(s.mean, dtype=np.float64)
    lo = np.asarray(s.min, dtype=np.float64)
    hi = np.asarray(s.max, dtype=np.float64)
    before = conditioning(lo, hi, mean)
    if mu is None or eps is None:
        return None, before, before
    m64, e64 = mu.astype(np.float64), eps.astype(np.float64)
    after = conditioning((lo - m64) / e64, (hi - m64) / e64, (mean - m64) / e64)  # eps > 0 keeps min <= max
    return _shift_name(m64, mean, lo, hi), before, after


@dataclasses.dataclass(frozen=True)
class SmoothingResult:
    """What :func:`apply_smoothing` returns: the smoothed model and its report."""

    model: onnx.ModelProto
    report: SmoothReport


def apply_smoothing(
    model: onnx.ModelProto,
    plan: SmoothingPlan,
    analysis: ModelAnalysis,
    stats: _StatsLike | None = None,
) -> SmoothingResult:
    """Apply ``plan`` to a copy of ``model``; returns the new model and a report.

    ``analysis`` must describe ``model``; ``stats`` (optional, the statistics the plan was made
    from) adds the conditioning before/after to the report. LayerNorms listed in the model's
    ``onnx_mptq.smoothed`` metadata are skipped as already smoothed.
    """
    m, graph, view, nodes = _open(model, analysis)
    digest = graph_digest(m)
    done = smoothed_layernorms(model)
    lns = {ln.name: ln for ln in analysis.layernorms}
    units = {u.name: u for u in analysis.units}
    pending = [sn for sn in plan.norms if sn.mode is not FoldMode.SKIPPED and sn.layernorm not in done]
    if pending and plan.source_digest not in (digest, graph_digest(model)):
        raise PlanError(
            f"the smoothing plan was made for another model (plan digest {plan.source_digest}, model digest {digest})"
        )
    names = UniqueNames(graph)
    claimed: dict[str, str] = {}

    # 1. compute every edit from the unmodified graph
    work: list[tuple[SmoothedNorm, LayerNormInfo, list, np.ndarray | None, np.ndarray | None, str | None, FoldMode]] = []
    for sn in plan.norms:
        ln = lns.get(sn.layernorm)
        if ln is None:
            raise PlanError(f"smoothing plan names LayerNorm {sn.layernorm!r}, which the model does not have")
        if sn.layernorm in done:
            work.append((sn, ln, [], None, None, ALREADY_SMOOTHED, FoldMode.SKIPPED))
            continue
        if sn.mode is FoldMode.SKIPPED:
            work.append((sn, ln, [], None, None, sn.reason, FoldMode.SKIPPED))
            continue
        mu, eps = _check_norm(sn, ln)
        for c in sn.consumers:
            if c in claimed:
                raise PlanError(f"smoothing plan: {c} is claimed by LayerNorms {claimed[c]} and {sn.layernorm}")
            claimed[c] = sn.layernorm
        edits: list = []
        for c in sn.consumers:
            u = units[c]
            bias_node = nodes[u.bias_node] if u.bias_node is not None else None
            edits += _linear_edits(view, u, nodes[c], bias_node, mu, eps, names)
        if sn.mode is FoldMode.FOLDED:
            edits += _layernorm_edits(view, nodes, ln, mu, eps, names)
        else:
            groups: dict[str, list[gs.Node]] = {}
            for c in sn.consumers:
                groups.setdefault(nodes[c].inputs[0].name, []).append(nodes[c])
            inv_eps = (1.0 / eps.astype(np.float64)).astype(np.float32)
            for i, tname in enumerate(sorted(groups)):
                edits.append(_ShiftScale(sn.layernorm, groups[tname][0].inputs[0], groups[tname], mu, inv_eps,
                                         "" if i == 0 else f"_{i}"))
        work.append((sn, ln, edits, mu, eps, sn.reason, sn.mode))

    # 2. mutate
    nodes_before = len(m.graph.node)
    reports: list[NormReport] = []
    newly: list[str] = []
    for sn, ln, edits, mu, eps, reason, mode in work:
        added = sum(_apply_edit(graph, e, names) for e in edits)
        if mode is not FoldMode.SKIPPED:
            newly.append(ln.name)
        shift, before, after = _conditioning(stats, ln, mu, eps)
        reports.append(NormReport(ln.name, mode, reason, float(sn.alpha), shift, tuple(sn.consumers), before, after, added))

    if not newly:
        result = m
    else:
        graph.cleanup().toposort()
        exported = gs.export_onnx(graph)
        result = onnx.ModelProto()
        result.CopyFrom(m)
        result.graph.CopyFrom(exported.graph)
        marks = sorted(done | set(newly))
        for p in list(result.metadata_props):
            if p.key == SMOOTHED_KEY:
                result.metadata_props.remove(p)
        result.metadata_props.add(key=SMOOTHED_KEY, value=json.dumps(marks))
        try:
            onnx.checker.check_model(result)
        except ValueError as e:  # a proto past 2 GB cannot be checked in memory
            log.debug("checker skipped: %s", e)
    report = SmoothReport(
        source_digest=digest,
        model_digest=graph_digest(result),
        nodes_before=nodes_before,
        nodes_after=len(result.graph.node),
        norms=tuple(reports),
    )
    log.info(
        "SQ-b: %d folded, %d explicit, %d skipped; nodes %d -> %d",
        report.count(FoldMode.FOLDED), report.count(FoldMode.EXPLICIT), report.count(FoldMode.SKIPPED),
        nodes_before, report.nodes_after,
    )
    return SmoothingResult(result, report)
