"""Pure pattern matching of ViT-family graphs: quantizable units, LayerNorms, activations.

Analysis never mutates the graph. It returns a :class:`ModelAnalysis` record that names, for an
arbitrary ViT / DeiT / Swin-style ONNX graph and the family's variants (CaiT, XCiT, BEiT, EVA-02,
PVT, LeViT, TinyViT, MobileViT, hybrids, Hugging Face and torchvision exports):

* every quantizable unit: each Linear (``MatMul`` or ``Gemm`` whose weight is a constant, i.e.
  computable from initializers: onnx-graphsurgeon's ``fold_constants`` runs on a copy), the
  patch-embedding ``Conv`` and the dense convs behind it (conv stems, hybrids), and the two
  attention matmuls (``Q @ K^T`` and ``P @ V``) of every softmax attention, with a role (qkv, q,
  k, v, proj, fc1, fc2, fc1_g / fc1_x / fc1_glu of gated MLPs, talking_heads, head, patch_embed,
  conv, reduction, attn_qk, attn_av, and linear where none fits);
* the LayerNorm feeding a unit (the ``LayerNormalization`` op or its decomposed form
  ``ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add``), seen through channel-preserving
  data movement (Reshape keeping the last dimension, Transpose keeping the last axis, Slice /
  Gather / Pad / Concat on other axes);
* the activation in front of a unit (GELU as the op, its erf form or tanh form, ReLU, SiLU,
  HardSwish, the gated product ``silu(g) * x``, Softmax);
* for each LayerNorm, whether SQ-b can be folded into it exactly, and if not, why;
* notes: what is declined and why (a run-time matmul that is not a softmax attention, a fused
  Attention op, grouped convs, convs of constants), layer scales, class attention, a model with
  no LayerNorm for SQ-b.

Structure is recovered from the graph's data flow only, never from node names.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import deque
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UnsupportedModelError
from ..records import Record
from .io import assign_node_names, graph_digest, opset_of

log = logging.getLogger(__name__)


class Role(str, enum.Enum):
    QKV = "qkv"
    Q = "q"
    K = "k"
    V = "v"
    PROJ = "proj"
    FC1 = "fc1"
    FC2 = "fc2"
    FC1_G = "fc1_g"  # gated MLP: the Linear whose output goes through the gate's SiLU
    FC1_X = "fc1_x"  # gated MLP: the Linear multiplied by the gate
    FC1_GLU = "fc1_glu"  # gated MLP: one Linear holding both halves (split into gate and value)
    TALKING_HEADS = "talking_heads"  # a Linear over the heads axis of the attention scores (CaiT)
    HEAD = "head"
    PATCH_EMBED = "patch_embed"
    CONV = "conv"  # a convolution fed by an inner activation (conv stems, hybrids): own input quantizer
    REDUCTION = "reduction"
    ATTN_QK = "attn_qk"
    ATTN_AV = "attn_av"
    LINEAR = "linear"  # a Linear that matches no known role


class Activation(str, enum.Enum):
    GELU = "gelu"  # the Gelu op (exact)
    GELU_ERF = "gelu_erf"  # decomposed: x * 0.5 * (1 + erf(x / sqrt 2))
    GELU_TANH = "gelu_tanh"  # tanh approximation (op attribute or decomposed)
    GELU_SIGMOID = "gelu_sigmoid"  # x * sigmoid(1.702 x)
    RELU = "relu"
    SILU = "silu"  # x * sigmoid(x)
    HARDSWISH = "hardswish"
    SWIGLU = "swiglu"  # gated MLP product: silu(g) * x
    SOFTMAX = "softmax"


GELU_KINDS = frozenset({Activation.GELU, Activation.GELU_ERF, Activation.GELU_TANH, Activation.GELU_SIGMOID})
LINEAR_ROLES = frozenset(
    {Role.QKV, Role.Q, Role.K, Role.V, Role.PROJ, Role.FC1, Role.FC2, Role.FC1_G, Role.FC1_X, Role.FC1_GLU,
     Role.TALKING_HEADS, Role.HEAD, Role.PATCH_EMBED, Role.REDUCTION, Role.LINEAR}
)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One quantizable layer."""

    name: str  # the node's name (unique after analysis assigns missing names)
    op_type: str  # MatMul | Gemm | Conv
    role: Role
    inputs: tuple[str, ...]  # activation tensors quantized in front of the node (1, or 2 for attention)
    weight: str | None = None  # constant tensor holding the weight (after Identity resolution)
    weight_input: str | None = None  # the tensor the node reads as its weight (may be a Transpose output)
    weight_transposed: bool = False  # effective (K, N) weight = W^T of the stored constant
    bias: str | None = None  # constant bias tensor (Gemm's C or the Add that follows a MatMul)
    bias_node: str | None = None  # the Add node carrying the bias of a MatMul
    in_features: int | None = None
    out_features: int | None = None
    layernorm: str | None = None  # name of the LayerNorm feeding this unit
    activation: Activation | None = None  # activation in front of the first input
    block: int | None = None
    output: str = ""  # the unit's output (after its bias for MatMul+Add)
    weight_axis: int | None = None  # output-channel axis of the weight as the node reads it (weight_axis_of)

    @property
    def is_linear(self) -> bool:
        return self.role in LINEAR_ROLES and self.op_type != "Conv"

    def weight_as_read(self, view: "GraphView") -> np.ndarray:
        """float32 weight in the layout the node reads it (a constant chain in front folded):
        MatMul ``(K, N)``; Gemm ``B`` (``(N, K)`` with ``transB``); Conv ``(O, C, kh, kw)``.
        Its output channels lie along :attr:`weight_axis`."""
        t = view.tensors.get(self.weight_input or "")
        w = view.const(t)
        if w is None:
            raise UnsupportedModelError(f"unit {self.name}: weight {self.weight_input!r} is not a constant")
        return np.asarray(w, dtype=np.float32)

    def effective(self, w_read: np.ndarray) -> np.ndarray:
        """The effective ``(K, N)`` weight of a weight as read (a view): ``y = x @ W``; a Conv as
        ``(C*kh*kw, O)``, patches flattened in (C, kh, kw) order (``conv(x, W) == patches(x) @ W``)."""
        if self.op_type == "Conv":
            return w_read.reshape(w_read.shape[0], -1).T
        return w_read if self.weight_axis == 1 else w_read.T

    def effective_weight(self, view: "GraphView") -> np.ndarray:
        """``effective(weight_as_read(view))``: the ``(K, N)`` float32 weight (a view)."""
        return self.effective(self.weight_as_read(view))


def weight_axis_of(node: gs.Node) -> int:
    """Output-channel axis of a unit's weight as ``node`` reads it: MatMul ``(K, N)`` 1; Gemm 0
    with ``transB`` else 1; Conv ``(O, C, kh, kw)`` 0."""
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1 if node.op == "MatMul" else 0


@dataclasses.dataclass(frozen=True)
class LayerNormInfo:
    name: str  # LayerNormalization node name, or the first node of a decomposed form
    form: str  # "op" | "decomposed"
    input: str
    output: str
    nodes: tuple[str, ...]
    gamma: str | None  # constant tensor (None if absent or not constant)
    beta: str | None
    gamma_node: str | None  # decomposed form: the Mul applying gamma
    beta_node: str | None  # decomposed form: the Add applying beta
    axis_last: bool
    epsilon: float
    channels: int | None
    consumers: tuple[str, ...]  # units fed (as activation input) through channel-preserving ops
    foldable: bool
    reason: str | None  # why SQ-b cannot be folded exactly, when not foldable
    other_consumers: tuple[str, ...] = ()  # nodes (not quantizable Linears) that also read the output


@dataclasses.dataclass(frozen=True)
class ModelAnalysis(Record):
    KIND = "model_analysis"
    SCHEMA_VERSION = 1

    model_digest: str
    opset: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    units: tuple[Unit, ...]
    layernorms: tuple[LayerNormInfo, ...]
    notes: tuple[str, ...] = ()

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    def layernorm(self, name: str) -> LayerNormInfo:
        for ln in self.layernorms:
            if ln.name == name:
                return ln
        raise KeyError(name)

    def by_role(self, *roles: Role) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.role in roles)

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for u in self.units:
            counts[u.role.value] = counts.get(u.role.value, 0) + 1
        return counts


# ---------------------------------------------------------------------------------------------
# graph view

_SHAPE_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Dropout"}
_SELECT_OPS = {"Slice", "Gather", "Split", "Concat", "Pad"}


class GraphView:
    """Read-only helpers over a graphsurgeon graph: producers, consumers, constant values.

    Constant values come from onnx-graphsurgeon's ``fold_constants`` run on a *copy* of the graph
    when the view is made (the caller's graph is never changed): a tensor is constant when every
    path into it starts at initializers or ``Constant`` nodes (shape-derived values are not folded,
    so dynamic dimensions stay dynamic). Tensors created after the view only count when they are
    ``gs.Constant`` themselves."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.tensors = graph.tensors()
        self.output_names = {t.name for t in graph.outputs}
        self.input_names = {t.name for t in graph.inputs}
        self.nodes = list(graph.nodes)
        self.order = {id(n): i for i, n in enumerate(self.nodes)}
        self._folded = _folded_values(graph)

    def producer(self, t: gs.Tensor) -> gs.Node | None:
        return t.inputs[0] if len(t.inputs) else None

    def consumers(self, t: gs.Tensor) -> list[gs.Node]:
        return list(t.outputs)

    def const(self, t: gs.Tensor | None) -> np.ndarray | None:
        """Value of a tensor computable from constants alone, else None."""
        if t is None:
            return None
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        return self._folded.get(t.name)

    def const_source(self, t: gs.Tensor) -> tuple[gs.Constant | None, list[gs.Node]]:
        """The initializer a constant tensor comes from and the nodes in between."""
        chain: list[gs.Node] = []
        cur = t
        for _ in range(8):
            if isinstance(cur, gs.Constant):
                return cur, chain
            node = self.producer(cur)
            if node is None or node.op not in ("Identity", "Transpose", "Reshape") or not node.inputs:
                return None, chain
            chain.append(node)
            cur = node.inputs[0]
        return None, chain

    def is_const(self, t: gs.Tensor) -> bool:
        return self.const(t) is not None

    def only_consumer(self, t: gs.Tensor) -> gs.Node | None:
        cons = self.consumers(t)
        return cons[0] if len(cons) == 1 and t.name not in self.output_names else None

    def non_const_inputs(self, node: gs.Node) -> list[gs.Tensor]:
        return [i for i in node.inputs if i.name and not self.is_const(i)]

    def static_last_dim(self, t: gs.Tensor) -> int | None:
        shape = getattr(t, "shape", None)
        if shape is None or len(shape) == 0:
            return None
        d = shape[-1]
        return int(d) if isinstance(d, (int, np.integer)) and d > 0 else None


_FOLD_LIMIT_BYTES = 1 << 28  # tensors above this are not folded (a computed weight is far below)


def _folded_values(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Name -> value of every non-initializer tensor that ``fold_constants`` (on a copy) computes."""
    if not any(all(isinstance(i, gs.Constant) or (i.inputs and i.inputs[0].op == "Constant") for i in n.inputs)
               or n.op == "Constant" for n in graph.nodes):
        return {}
    work = graph.copy()
    severity = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.CRITICAL
    try:
        work.fold_constants(fold_shapes=False, error_ok=True, size_threshold=_FOLD_LIMIT_BYTES)
    except Exception:  # folding is an aid: without it only initializers count as constants
        log.debug("constant folding failed; only initializers count as constants", exc_info=True)
        return {}
    finally:
        gs.logger.G_LOGGER.severity = severity
    original = graph.tensors()
    return {name: np.asarray(t.values) for name, t in work.tensors().items()
            if isinstance(t, gs.Constant) and not isinstance(original.get(name), gs.Constant)}


def _scalar(v: np.ndarray | None) -> float | None:
    if v is None or v.size != 1:
        return None
    return float(v.reshape(-1)[0])


# ---------------------------------------------------------------------------------------------
# LayerNorm recognition


@dataclasses.dataclass
class _LN:
    name: str
    form: str
    input: gs.Tensor
    output: gs.Tensor
    nodes: list[gs.Node]
    gamma: gs.Tensor | None
    beta: gs.Tensor | None
    gamma_node: gs.Node | None
    beta_node: gs.Node | None
    axis_last: bool
    epsilon: float


def _reduce_axes(view: GraphView, node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1:
        v = view.const(node.inputs[1])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return None


def _find_layernorms(view: GraphView) -> list[_LN]:
    found: list[_LN] = []
    for node in view.nodes:
        if node.op == "LayerNormalization":
            rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
            axis = int(node.attrs.get("axis", -1))
            axis_last = axis == -1 or (rank is not None and axis == rank - 1)
            gamma = node.inputs[1] if len(node.inputs) > 1 else None
            beta = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            found.append(
                _LN(node.name, "op", node.inputs[0], node.outputs[0], [node], gamma, beta, None, None, axis_last,
                    float(node.attrs.get("epsilon", 1e-5)))
            )
        elif node.op == "Div":
            ln = _match_decomposed(view, node)
            if ln is not None:
                found.append(ln)
    return found


def _match_decomposed(view: GraphView, div: gs.Node) -> _LN | None:
    """Div(Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Pow(Sub, 2)), eps))) [* gamma] [+ beta]."""
    if len(div.inputs) != 2:
        return None
    sub = view.producer(div.inputs[0])
    sqrt = view.producer(div.inputs[1])
    if sub is None or sqrt is None or sub.op != "Sub" or sqrt.op != "Sqrt":
        return None
    mean1 = view.producer(sub.inputs[1])
    if mean1 is None or mean1.op != "ReduceMean" or mean1.inputs[0] is not sub.inputs[0]:
        return None
    x = sub.inputs[0]
    add_eps = view.producer(sqrt.inputs[0])
    if add_eps is None or add_eps.op != "Add":
        return None
    eps_val = None
    var_t = None
    for a, b in ((0, 1), (1, 0)):
        v = view.const(add_eps.inputs[b])
        if v is not None:
            eps_val, var_t = _scalar(v), add_eps.inputs[a]
    if var_t is None:
        return None
    mean2 = view.producer(var_t)
    if mean2 is None or mean2.op != "ReduceMean":
        return None
    sq = view.producer(mean2.inputs[0])
    if sq is None:
        return None
    if sq.op == "Pow":
        if sq.inputs[0] is not sub.outputs[0] or _scalar(view.const(sq.inputs[1])) != 2.0:
            return None
    elif sq.op == "Mul":
        if not (sq.inputs[0] is sub.outputs[0] and sq.inputs[1] is sub.outputs[0]):
            return None
    else:
        return None
    axes1, axes2 = _reduce_axes(view, mean1), _reduce_axes(view, mean2)
    rank = len(x.shape) if x.shape is not None else None
    def last_only(axes: list[int] | None) -> bool:
        return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))
    axis_last = last_only(axes1) and last_only(axes2)
    nodes = [mean1, sub, sq, mean2, add_eps, sqrt, div]
    out = div.outputs[0]
    gamma, gamma_node = _const_operand(view, out, "Mul")
    if gamma_node is not None:
        nodes.append(gamma_node)
        out = gamma_node.outputs[0]
    beta, beta_node = _const_operand(view, out, "Add")
    if beta_node is not None:
        nodes.append(beta_node)
        out = beta_node.outputs[0]
    return _LN(mean1.name, "decomposed", x, out, nodes, gamma, beta, gamma_node, beta_node, axis_last,
               float(eps_val if eps_val is not None else 0.0))


def _const_operand(view: GraphView, t: gs.Tensor, op: str) -> tuple[gs.Tensor | None, gs.Node | None]:
    """(constant, node) when the only consumer of ``t`` is ``op`` with a constant other operand."""
    nxt = view.only_consumer(t)
    if nxt is None or nxt.op != op:
        return None, None
    other = nxt.inputs[1] if nxt.inputs[0] is t else nxt.inputs[0]
    return (other, nxt) if view.is_const(other) else (None, None)


# ---------------------------------------------------------------------------------------------
# activations


def _gelu_tail(view: GraphView, start: gs.Node, x: gs.Tensor) -> gs.Tensor | None:
    """Walk forward from erf/tanh through the (1 + .) * x * 0.5 chain; return GELU's output."""
    cur = start.outputs[0]
    used_x = False
    last: gs.Tensor | None = None
    for _ in range(4):
        node = view.only_consumer(cur)
        if node is None or node.op not in ("Add", "Mul", "Div"):
            break
        others = [i for i in node.inputs if i is not cur]
        if any(o is x for o in others):
            used_x = True
        elif not all(view.is_const(o) for o in others):
            # the chain may multiply x*0.5 computed on the side: accept Mul(x*0.5, .)
            side = [view.producer(o) for o in others]
            if not all(s is not None and s.op == "Mul" and any(i is x for i in s.inputs) for s in side):
                break
            used_x = True
        cur = node.outputs[0]
        if used_x:
            last = cur
            nxt = view.only_consumer(cur)
            # absorb a trailing constant multiply (the 0.5)
            if nxt is not None and nxt.op == "Mul" and all(view.is_const(i) for i in nxt.inputs if i is not cur):
                last = nxt.outputs[0]
            break
    return last if used_x else None


def _find_activations(view: GraphView) -> dict[str, Activation]:
    """Map activation output tensor name -> kind."""
    acts: dict[str, Activation] = {}
    for node in view.nodes:
        op = node.op
        if op == "Relu":
            acts[node.outputs[0].name] = Activation.RELU
        elif op == "Softmax":
            acts[node.outputs[0].name] = Activation.SOFTMAX
        elif op == "Gelu":
            kind = Activation.GELU_TANH if node.attrs.get("approximate", "none") == "tanh" else Activation.GELU
            acts[node.outputs[0].name] = kind
        elif op == "Erf":
            pre = view.producer(node.inputs[0])
            if pre is None or pre.op not in ("Div", "Mul"):
                continue
            x = pre.inputs[0] if not view.is_const(pre.inputs[0]) else pre.inputs[1]
            out = _gelu_tail(view, node, x)
            if out is not None:
                acts[out.name] = Activation.GELU_ERF
        elif op == "Tanh":
            # tanh(sqrt(2/pi) * (x + 0.044715 x^3)): find x as the tensor raised to 3 upstream
            x = _tanh_gelu_input(view, node)
            if x is not None:
                out = _gelu_tail(view, node, x)
                if out is not None:
                    acts[out.name] = Activation.GELU_TANH
        elif op == "HardSwish":
            acts[node.outputs[0].name] = Activation.HARDSWISH
        elif op == "Sigmoid":
            silu = _silu_output(view, node)
            if silu is not None:
                acts[silu.name] = Activation.SILU
                gated = _gated_product(view, silu)
                if gated is not None:
                    acts[gated.name] = Activation.SWIGLU
                continue
            pre = view.producer(node.inputs[0])
            if pre is not None and pre.op == "Mul":
                x = pre.inputs[0] if not view.is_const(pre.inputs[0]) else pre.inputs[1]
                c = _scalar(view.const(pre.inputs[1] if x is pre.inputs[0] else pre.inputs[0]))
                nxt = view.only_consumer(node.outputs[0])
                if c is not None and abs(c - 1.702) < 1e-2 and nxt is not None and nxt.op == "Mul" and any(i is x for i in nxt.inputs):
                    acts[nxt.outputs[0].name] = Activation.GELU_SIGMOID
    return acts


def _silu_output(view: GraphView, sigmoid: gs.Node) -> gs.Tensor | None:
    """``x * sigmoid(x)``: the Mul reading both the Sigmoid's input and its output."""
    x = sigmoid.inputs[0]
    nxt = view.only_consumer(sigmoid.outputs[0])
    if nxt is not None and nxt.op == "Mul" and len(nxt.inputs) == 2 and any(i is x for i in nxt.inputs):
        return nxt.outputs[0]
    return None


def _gated_product(view: GraphView, silu: gs.Tensor) -> gs.Tensor | None:
    """``silu(g) * x`` with ``x`` computed at run time (a SwiGLU MLP's gate), else None."""
    nxt = view.only_consumer(silu)
    if nxt is None or nxt.op != "Mul" or len(nxt.inputs) != 2:
        return None
    other = nxt.inputs[1] if nxt.inputs[0] is silu else nxt.inputs[0]
    return None if view.is_const(other) else nxt.outputs[0]


def _tanh_gelu_input(view: GraphView, tanh: gs.Node) -> gs.Tensor | None:
    seen = 0
    frontier = [tanh.inputs[0]]
    while frontier and seen < 12:
        t = frontier.pop()
        seen += 1
        node = view.producer(t)
        if node is None:
            continue
        if node.op == "Pow" and _scalar(view.const(node.inputs[1])) == 3.0:
            return node.inputs[0]
        frontier.extend(i for i in node.inputs if not view.is_const(i))
    return None


# ---------------------------------------------------------------------------------------------
# linears and attention


@dataclasses.dataclass
class _Lin:
    node: gs.Node
    x: gs.Tensor
    weight: gs.Constant | None
    weight_input: gs.Tensor
    wmat: np.ndarray  # effective (K, N)
    transposed: bool
    bias: gs.Tensor | None
    bias_node: gs.Node | None
    output: gs.Tensor


def _linear_of(view: GraphView, node: gs.Node) -> _Lin | None:
    if node.op == "MatMul" and len(node.inputs) == 2:
        w = view.const(node.inputs[1])
        if w is None or w.ndim != 2 or view.is_const(node.inputs[0]) or w.dtype != np.float32:
            return None
        src, chain = view.const_source(node.inputs[1])
        transposed = sum(1 for c in chain if c.op == "Transpose") % 2 == 1
        out = node.outputs[0]
        bias = bias_node = None
        nxt = view.only_consumer(out)
        if nxt is not None and nxt.op == "Add":
            other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
            b = view.const(other)
            if b is not None and b.size == w.shape[1] and b.shape[-1:] == (w.shape[1],):
                bias, bias_node, out = other, nxt, nxt.outputs[0]
        return _Lin(node, node.inputs[0], src, node.inputs[1], w, transposed, bias, bias_node, out)
    if node.op == "Gemm" and len(node.inputs) >= 2:
        w = view.const(node.inputs[1])
        if w is None or w.ndim != 2 or view.is_const(node.inputs[0]):
            return None
        if int(node.attrs.get("transA", 0)) != 0:
            return None
        trans_b = int(node.attrs.get("transB", 0)) != 0
        wmat = w.T if trans_b else w
        src, chain = view.const_source(node.inputs[1])
        transposed = (sum(1 for c in chain if c.op == "Transpose") + trans_b) % 2 == 1
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        return _Lin(node, node.inputs[0], src, node.inputs[1], wmat, transposed, bias, None, node.outputs[0])
    return None


def _walk_tensors(start: gs.Tensor, limit: int | None = None):
    """Breadth-first over tensors from ``start``: yields each tensor once with the queue, which
    the caller extends with the tensors to visit next; stops after ``limit`` tensors."""
    seen: set[str] = set()
    queue: deque[gs.Tensor] = deque([start])
    while queue and (limit is None or len(seen) < limit):
        t = queue.popleft()
        if t.name in seen:
            continue
        seen.add(t.name)
        yield t, queue


def _passthrough_forward(view: GraphView, node: gs.Node, cur: gs.Tensor) -> bool:
    """Ops that move values without mixing them with other data (for role tracing)."""
    if node.op in _SHAPE_OPS or node.op in _SELECT_OPS:
        return True
    if node.op in ("Mul", "Div", "Add", "Sub"):  # scaling by constants, attention bias/mask adds
        return True
    if node.op in ("Where", "Expand", "BatchNormalization"):  # BatchNorm: a per-channel affine map
        return True
    return False


def _forward_reach(view: GraphView, start: gs.Tensor, stop_ids: set[int], limit: int = 64,
                   through: set[int] | frozenset = frozenset()) -> list[tuple[gs.Node, int]]:
    """Nodes in ``stop_ids`` reached from ``start`` through pass-through ops (and the nodes in
    ``through``), with input index."""
    hits: list[tuple[gs.Node, int]] = []
    for t, queue in _walk_tensors(start, limit):
        for node in view.consumers(t):
            if id(node) in stop_ids:
                for idx, i in enumerate(node.inputs):
                    if i is t:
                        hits.append((node, idx))
                continue
            if id(node) in through:
                queue.extend(node.outputs)
                continue
            if node.op in ("Softmax", "LayerNormalization", "MatMul", "Gemm", "Conv", "ReduceMean"):
                continue
            if _passthrough_forward(view, node, t):
                queue.extend(node.outputs)
    return hits


# element-wise ops walked backwards; Where: masked_fill, and the NaN guard Where(IsNaN(p), 0, p) that
# torch's dynamo exporter puts between the Softmax and P @ V of a fused attention
_BACKWARD_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Where"})


def _backward_source(view: GraphView, start: gs.Tensor, accept, limit: int = 32, extra_ops: set[str] | frozenset = frozenset(),
                     through: set[int] | frozenset = frozenset()):
    """Walk producers through pass-through ops (and through the first input of the nodes in
    ``through``) until ``accept(node)`` says yes."""
    for t, queue in _walk_tensors(start, limit):
        node = view.producer(t)
        if node is None:
            continue
        hit = accept(node, t)
        if hit is not None:
            return hit
        if id(node) in through:
            queue.append(node.inputs[0])
        elif node.op in _SHAPE_OPS or node.op in _SELECT_OPS or node.op in _BACKWARD_OPS or node.op in extra_ops:
            queue.extend(i for i in node.inputs if i.name and not view.is_const(i))
    return None


def _channel_preserving(view: GraphView, node: gs.Node, t: gs.Tensor, channels: int) -> bool:
    """Does ``node`` move the last-axis channels of ``t`` without mixing them?"""
    op = node.op
    out = node.outputs[0] if node.outputs else None
    if op in ("Identity", "Cast", "Dropout"):
        return True
    if out is None:
        return False
    out_last = view.static_last_dim(out)
    rank_in = len(t.shape) if t.shape is not None else None
    # unknown (symbolic) last dimensions are accepted; a known different one is not. The Linear
    # reached at the end must still read `channels` features (checked by the caller).
    if op == "Reshape":
        return out_last in (None, channels)
    if op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and rank_in is not None and int(perm[-1]) == rank_in - 1
    if op in ("Squeeze", "Unsqueeze", "Flatten"):
        return out_last in (None, channels)
    if op in ("Slice",):
        axes = view.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        if axes is None:
            return out_last in (None, channels) and len(node.inputs) <= 3
        return all(int(a) != -1 and (rank_in is None or int(a) != rank_in - 1) for a in axes.reshape(-1)) and out_last in (None, channels)
    if op == "Gather":
        axis = int(node.attrs.get("axis", 0))
        return node.inputs[0] is t and axis != -1 and (rank_in is None or axis != rank_in - 1)
    if op == "Concat":
        axis = int(node.attrs.get("axis", 0))
        return axis != -1 and (rank_in is None or axis != rank_in - 1) and out_last in (None, channels)
    if op == "Split":
        axis = int(node.attrs.get("axis", 0))
        return axis != -1 and (rank_in is None or axis != rank_in - 1)
    if op == "Pad":
        return node.inputs[0] is t and out_last in (None, channels)
    if op == "ReduceMean":  # token pooling: mean((Y - mu) / s) == (mean(Y) - mu) / s
        axes = _reduce_axes(view, node)
        return axes is not None and all(int(a) != -1 and (rank_in is None or int(a) != rank_in - 1) for a in axes) and out_last in (None, channels)
    return False


def _ln_fanout(view: GraphView, ln_out: gs.Tensor, channels: int, linear_x: dict[int, "_Lin"]):
    """Follow an LN output through channel-preserving ops.

    Returns (linear nodes reached as activation input, other consumer nodes, reaches graph output,
    passes through Pad)."""
    lin: list[gs.Node] = []
    other: list[gs.Node] = []
    graph_out = False
    via_pad = False
    for t, queue in _walk_tensors(ln_out):
        if t.name in view.output_names:
            graph_out = True
        for node in view.consumers(t):
            if node.op in ("Shape", "Size"):
                continue  # reads the shape, not the values
            if id(node) in linear_x and node.inputs[0] is t and linear_x[id(node)].wmat.shape[0] == channels:
                lin.append(node)
            elif _channel_preserving(view, node, t, channels):
                if node.op == "Pad":
                    via_pad = True
                if node.op == "Concat" and not all(
                    i is t or view.is_const(i) or _same_origin(view, i, ln_out) for i in node.inputs
                ):
                    other.append(node)
                    continue
                queue.extend(node.outputs)
            else:
                other.append(node)
    return lin, other, graph_out, via_pad


def _walk_up(view: GraphView, t: gs.Tensor, ops: set[str] | frozenset, arrived, limit: int = 16) -> bool:
    """Follow first inputs through ``ops`` from ``t`` until ``arrived(tensor)``; False at any
    other producer or after ``limit`` steps."""
    cur = t
    for _ in range(limit):
        if arrived(cur):
            return True
        node = view.producer(cur)
        if node is None or node.op not in ops:
            return False
        cur = node.inputs[0]
    return False


def _same_origin(view: GraphView, t: gs.Tensor, origin: gs.Tensor, limit: int = 16) -> bool:
    # for Concat, all inputs are checked by the caller level by level
    return _walk_up(view, t, _SHAPE_OPS | {"Slice", "Gather", "Pad", "Concat"}, lambda cur: cur is origin, limit)


# ---------------------------------------------------------------------------------------------
# the analysis


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with unique node names and inferred shapes (the user's proto is untouched)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assign_node_names(m)
    return _infer_shapes(m)


def _infer_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    """Infer shapes with dynamic input dims pinned to 1, so Shape->Reshape chains resolve.

    The pinned copy only serves shape reading; value_info with the pinned batch is copied back
    as last-dimension facts onto the original graph."""
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    del probe.graph.value_info[:]
    for vi in probe.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    try:
        probe = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is an aid, not a requirement
        return m
    out = onnx.ModelProto()
    out.CopyFrom(m)
    del out.graph.value_info[:]
    known = {vi.name for vi in list(out.graph.input) + list(out.graph.output)}
    for vi in probe.graph.value_info:
        if vi.name in known:
            continue
        new = out.graph.value_info.add()
        new.CopyFrom(vi)
        dims = new.type.tensor_type.shape.dim
        # keep only the channel (last) dimension as a fact; others become symbolic
        for d in list(dims)[:-1]:
            d.Clear()  # unknown
    return out


@dataclasses.dataclass
class _Ctx:
    """What the analysis steps share: the graph view and what earlier steps found."""

    view: GraphView
    acts: dict[str, Activation]
    lins: dict[int, _Lin]
    attn_qk: dict[int, gs.Node] = dataclasses.field(default_factory=dict)
    attn_av: dict[int, gs.Node] = dataclasses.field(default_factory=dict)
    talking: set[int] = dataclasses.field(default_factory=set)  # Linears over the heads axis
    roles: dict[int, Role] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def act_before(self, t: gs.Tensor) -> tuple[Activation | None, gs.Tensor | None]:
        """The activation whose output reaches ``t`` through pass-through ops."""
        if t.name in self.acts:
            return self.acts[t.name], t
        hit = _backward_source(self.view, t, lambda node, tt: (self.acts[tt.name], tt) if tt.name in self.acts else None,
                               limit=8)
        return hit if hit is not None else (None, None)

    def unassigned(self) -> list[tuple[int, _Lin]]:
        return [(nid, lin) for nid, lin in self.lins.items() if nid not in self.roles]


def analyze(model: onnx.ModelProto, *, prepared: bool = False) -> ModelAnalysis:
    """Find every quantizable unit and LayerNorm of a ViT-family graph.

    The steps, in order: Linears and activations; the attention matmuls (both operands computed
    at run time, one side reaching a Softmax); the Linears' roles from where their outputs go
    (attention projections, talking-heads mixers, patch embedding, head, MLP including gated
    ones, the rest by their LayerNorm); the LayerNorms with their SQ-b foldability; the
    convolutions; the units in graph order with block numbers.

    Raises :class:`UnsupportedModelError` naming what is missing when the graph is not a
    transformer (no attention matmuls feeding a Softmax, or no Linear layers)."""
    m = model if prepared else prepare(model)
    graph = gs.import_onnx(m)
    view = GraphView(graph)
    lns = _find_layernorms(view)
    ctx = _Ctx(view=view, acts=_find_activations(view), lins=_find_linears(view))
    _find_attention(ctx)
    _attention_roles(ctx)
    _patch_and_head_roles(ctx)
    _mlp_roles(ctx)
    ln_records, ln_of_unit = _layernorm_records(ctx, lns)
    for nid, lin in ctx.unassigned():
        ctx.roles[nid] = Role.REDUCTION if nid in ln_of_unit or _merges_patches(view, lin) else Role.LINEAR
    convs = _find_convs(ctx)
    _structure_notes(ctx, ln_records)
    return ModelAnalysis(
        model_digest=graph_digest(m),
        opset=opset_of(m),
        inputs=tuple(t.name for t in graph.inputs),
        outputs=tuple(t.name for t in graph.outputs),
        units=tuple(_assemble_units(ctx, convs, ln_of_unit)),
        layernorms=tuple(ln_records),
        notes=tuple(ctx.notes),
    )


def _merges_patches(view: GraphView, lin: _Lin) -> bool:
    """Patch merging without a LayerNorm in front (Swin V2 normalises after it): a Linear halving
    the channels of neighbourhoods regrouped by Reshape / Concat (4C -> 2C)."""
    k, n = lin.wmat.shape
    src = view.producer(lin.x)
    return k == 2 * n and src is not None and src.op in ("Reshape", "Flatten", "Concat")


def _find_linears(view: GraphView) -> dict[int, _Lin]:
    lins: dict[int, _Lin] = {}
    for node in view.nodes:
        lin = _linear_of(view, node)
        if lin is not None:
            lins[id(node)] = lin
    return lins


_MAX_HEADS = 64
_FUSED_ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})


def _find_attention(ctx: _Ctx) -> None:
    """``P @ V``: a run-time matmul whose first operand comes from a Softmax; ``Q @ K^T``: one
    whose output reaches a Softmax. Pass-through ops between them (scaling, bias and mask adds,
    relative-position and RoPE terms, transposes of the cross-covariance form) and talking-heads
    mixers (a Linear with a square weight of at most 64 heads reading the scores or the
    probabilities, CaiT) do not break the pattern."""
    view = ctx.view
    dyn = [n for n in view.nodes if n.op == "MatMul" and id(n) not in ctx.lins and len(view.non_const_inputs(n)) == 2]
    dyn_ids = {id(n) for n in dyn}
    softmax = {id(n) for n in view.nodes if n.op == "Softmax"}

    def from_scores(t: gs.Tensor) -> bool:
        node = view.producer(t)
        return node is not None and (id(node) in softmax or id(node) in dyn_ids)

    def to_scores(t: gs.Tensor) -> bool:  # through Transposes only, into a Softmax or operand 0 of a matmul
        for node in view.consumers(t):
            if node.op == "Transpose" and to_scores(node.outputs[0]):
                return True
            if id(node) in softmax or (id(node) in dyn_ids and node.inputs[0] is t):
                return True
        return False

    for nid, lin in ctx.lins.items():
        k, n = lin.wmat.shape
        if k == n <= _MAX_HEADS and _walk_up(view, lin.x, {"Transpose", "Mul", "Div", "Add"}, from_scores, limit=4) and to_scores(lin.output):
            ctx.talking.add(nid)  # a mixer over the heads axis: permuted in, permuted back out
    for n in dyn:
        if _backward_source(view, n.inputs[0], lambda node, t: node if id(node) in softmax else None, limit=8,
                            through=ctx.talking) is not None:
            ctx.attn_av[id(n)] = n
    for n in dyn:
        if id(n) not in ctx.attn_av and _forward_reach(view, n.outputs[0], softmax, limit=16, through=ctx.talking):
            ctx.attn_qk[id(n)] = n
    for n in dyn:
        if id(n) not in ctx.attn_av and id(n) not in ctx.attn_qk:
            ctx.notes.append(f"matmul {n.name}: both operands dynamic but neither reaches nor reads a Softmax "
                             f"(not a softmax attention); left in float")
    fused = [n for n in view.nodes if n.op in _FUSED_ATTENTION_OPS]
    for n in fused:
        ctx.notes.append(f"attention {n.name}: fused {n.op} op (its two matmuls run inside one kernel, no operand "
                         f"to quantize); left in float")
    missing = []
    if fused and ctx.lins:
        return
    if not ctx.attn_qk:
        missing.append("no Q @ K^T matmul feeding a Softmax")
    if not ctx.attn_av:
        missing.append("no Softmax @ V matmul")
    if not ctx.lins:
        missing.append("no Linear (MatMul/Gemm with a constant weight)")
    if missing:
        raise UnsupportedModelError(f"not a transformer: {'; '.join(missing)}")


def _attention_roles(ctx: _Ctx) -> None:
    """qkv / q / k / v by which attention operands a Linear's output reaches; proj for a Linear
    reading ``P @ V`` (also behind an activation, LeViT); talking_heads for the head mixers."""
    view = ctx.view
    attn_ids = set(ctx.attn_av) | set(ctx.attn_qk)
    for nid in ctx.talking:
        ctx.roles[nid] = Role.TALKING_HEADS
    for nid, lin in ctx.unassigned():
        hits = _forward_reach(view, lin.output, attn_ids)
        slots = {("qk" if id(n) in ctx.attn_qk else "av", idx) for n, idx in hits}
        if {("qk", 0), ("qk", 1), ("av", 1)} <= slots:
            ctx.roles[nid] = Role.QKV
        elif slots == {("qk", 0)}:
            ctx.roles[nid] = Role.Q
        elif slots == {("qk", 1)}:
            ctx.roles[nid] = Role.K
        elif slots == {("av", 1)}:
            ctx.roles[nid] = Role.V
        elif slots:
            ctx.roles[nid] = Role.QKV  # partial fused projection (e.g. kv)
    for nid, lin in ctx.unassigned():
        src = _backward_source(view, lin.x, lambda node, t: node if id(node) in ctx.attn_av else None, limit=16,
                               extra_ops=_POINTWISE_ACTS)
        if src is not None:
            ctx.roles[nid] = Role.PROJ


_POINTWISE_ACTS = frozenset({"Relu", "HardSwish", "Gelu", "Sigmoid"})


def _patch_and_head_roles(ctx: _Ctx) -> None:
    """patch_embed: a Linear reading a graph input; head: a Linear whose output reaches a graph
    output through element-wise and shape ops, and the Linears that feed only heads (a
    pre-logits MLP)."""
    view = ctx.view
    for nid, lin in ctx.unassigned():
        if _from_graph_input(view, lin.x):
            ctx.roles[nid] = Role.PATCH_EMBED
    heads = {nid for nid, lin in ctx.unassigned() if _reaches_output(view, lin.output)}
    lin_ids = set(ctx.lins)
    changed = True
    while changed:
        changed = False
        for nid, lin in ctx.unassigned():
            if nid in heads:
                continue
            reached = _forward_reach(view, lin.output, lin_ids, limit=32)
            if reached and all(id(n) in heads for n, _ in reached) and not _feeds_residual(view, lin.output):
                heads.add(nid)
                changed = True
    for nid in heads:
        ctx.roles[nid] = Role.HEAD


def _reaches_output(view: GraphView, t: gs.Tensor) -> bool:
    ok = _SHAPE_OPS | _SELECT_OPS | {"Add", "Sub", "Mul", "Div", "Softmax", "Sigmoid", "ReduceMean"}
    for cur, queue in _walk_tensors(t):
        if cur.name in view.output_names:
            return True
        for node in view.consumers(cur):
            if node.op in ok:
                queue.extend(node.outputs)
    return False


_ACT_OPS = frozenset({"Relu", "Erf", "Tanh", "Sigmoid", "Gelu", "Pow", "HardSwish", "BatchNormalization"})


def _mlp_roles(ctx: _Ctx) -> None:
    """fc2: a Linear behind an activation. fc1: the Linear feeding that activation (also through
    a depthwise conv, PVT v2). Behind a gated product ``silu(g) * x``: fc1_g and fc1_x, or
    fc1_glu when one Linear holds both halves (EVA-02)."""
    view = ctx.view
    depthwise = {id(n) for n in view.nodes if n.op == "Conv" and int(n.attrs.get("group", 1)) > 1}

    def free_linear(node: gs.Node, t: gs.Tensor) -> gs.Node | None:
        return node if id(node) in ctx.lins and id(node) not in ctx.roles else None

    for nid, lin in ctx.unassigned():
        if nid in ctx.roles:  # assigned as an fc1 of an earlier fc2
            continue
        kind, act_t = ctx.act_before(lin.x)
        if kind is None or kind is Activation.SOFTMAX:
            continue
        ctx.roles[nid] = Role.FC2
        if kind is Activation.SWIGLU:
            _gate_roles(ctx, act_t, free_linear)
            continue
        src = _backward_source(view, act_t, free_linear, limit=24, extra_ops=_ACT_OPS, through=depthwise)
        if src is not None:
            ctx.roles[id(src)] = Role.FC1


def _gate_roles(ctx: _Ctx, product: gs.Tensor, free_linear) -> None:
    view = ctx.view
    mul = view.producer(product)  # silu(g) * x, both operands produced by nodes (see _gated_product)
    s = 0 if ctx.acts.get(mul.inputs[0].name) is Activation.SILU else 1
    silu_mul, value_t = mul.i(s), mul.inputs[1 - s]  # silu(g) = g * sigmoid(g)
    gate_t = silu_mul.inputs[1] if silu_mul.inputs[0].inputs and silu_mul.i(0).op == "Sigmoid" else silu_mul.inputs[0]
    g = _backward_source(view, gate_t, free_linear, limit=12)
    x = _backward_source(view, value_t, free_linear, limit=12)
    if g is not None and g is x:
        ctx.roles[id(g)] = Role.FC1_GLU
        return
    if g is not None:
        ctx.roles[id(g)] = Role.FC1_G
    if x is not None:
        ctx.roles[id(x)] = Role.FC1_X


def _layernorm_records(ctx: _Ctx, lns: list[_LN]) -> tuple[list[LayerNormInfo], dict[int, str]]:
    """Every LayerNorm with the Linears it feeds and whether SQ-b folds into it exactly."""
    view = ctx.view
    ln_records: list[LayerNormInfo] = []
    ln_of_unit: dict[int, str] = {}
    for ln in lns:
        channels = view.static_last_dim(ln.output) or view.static_last_dim(ln.input)
        if channels is None and ln.gamma is not None:
            g = view.const(ln.gamma)
            channels = int(g.size) if g is not None else None
        lin_nodes, other, graph_out, via_pad = _ln_fanout(view, ln.output, channels or -1, ctx.lins)
        for n in lin_nodes:
            ln_of_unit.setdefault(id(n), ln.name)
        reason = _fold_reason(view, ln, lin_nodes, other, graph_out, ctx.lins, channels)
        if reason is None and via_pad:
            ctx.notes.append(
                f"layernorm {ln.name}: reaches its Linears through a Pad; folding is exact while the pad "
                f"amount is zero (feature map divisible by the window)"
            )
        ln_records.append(
            LayerNormInfo(
                name=ln.name,
                form=ln.form,
                input=ln.input.name,
                output=ln.output.name,
                nodes=tuple(n.name for n in ln.nodes),
                gamma=_const_name(view, ln.gamma),
                beta=_const_name(view, ln.beta),
                gamma_node=ln.gamma_node.name if ln.gamma_node is not None else None,
                beta_node=ln.beta_node.name if ln.beta_node is not None else None,
                axis_last=ln.axis_last,
                epsilon=ln.epsilon,
                channels=channels,
                consumers=tuple(n.name for n in lin_nodes),
                foldable=reason is None,
                reason=reason,
                other_consumers=tuple(sorted({n.name for n in other})),
            )
        )
    return ln_records, ln_of_unit


def _find_convs(ctx: _Ctx) -> dict[int, Role]:
    """Convolutions with a constant weight: patch_embed when fed by the graph input (image
    quantizer), conv when fed by an inner activation (its own input quantizer). Declined, with
    the reason in the notes: a conv whose input is itself constant (computed once, e.g. XCiT's
    Fourier position encoding) and grouped / depthwise convs (the output-error search works on
    dense im2col patches)."""
    view = ctx.view
    convs: dict[int, Role] = {}
    for node in view.nodes:
        if node.op != "Conv" or len(node.inputs) < 2:
            continue
        w = view.const(node.inputs[1])
        if w is None:
            ctx.notes.append(f"conv {node.name}: weight computed at run time; left in float")
            continue
        if view.is_const(node.inputs[0]):
            ctx.notes.append(f"conv {node.name}: its input is a constant (the conv runs once on fixed values); left in float")
        elif _from_graph_input(view, node.inputs[0]):
            convs[id(node)] = Role.PATCH_EMBED
        elif int(node.attrs.get("group", 1)) != 1:
            ctx.notes.append(f"conv {node.name}: grouped convolution (group={int(node.attrs['group'])}); left in float")
        elif w.ndim != 4:
            ctx.notes.append(f"conv {node.name}: {w.ndim - 2}-d convolution; left in float")
        else:
            convs[id(node)] = Role.CONV
    return convs


def _structure_notes(ctx: _Ctx, ln_records: list[LayerNormInfo]) -> None:
    """What the analysis saw around the units: layer scales, class attention, no LayerNorm."""
    view = ctx.view
    scaled = 0
    for nid, lin in ctx.lins.items():
        if ctx.roles[nid] not in (Role.PROJ, Role.FC2):
            continue
        nxt = view.only_consumer(lin.output)
        if nxt is not None and nxt.op == "Mul":
            other = nxt.inputs[1] if nxt.inputs[0] is lin.output else nxt.inputs[0]
            v = view.const(other)
            if v is not None and v.size == lin.wmat.shape[1] > 1:
                scaled += 1
    if scaled:
        ctx.notes.append(f"layer scale: {scaled} proj/fc2 outputs scaled per channel before the residual Add (float)")
    one_query = [nid for nid, lin in ctx.lins.items() if ctx.roles[nid] is Role.Q
                 and (src := view.producer(lin.x)) is not None and src.op in ("Gather", "Slice")]
    if one_query:
        ctx.notes.append(f"class attention: {len(one_query)} block(s) whose queries come from the class token only")
    tokens = sum(_learned_tokens(view, n) for n in view.nodes if n.op == "Concat")
    if tokens > 1:
        ctx.notes.append(f"tokens: {tokens} learned tokens joined to the patch tokens (class and distillation / "
                         f"register tokens; float, they enter through the first LayerNorm)")
    if not any(ln.consumers for ln in ln_records):
        ctx.notes.append("no LayerNorm feeds a Linear (e.g. BatchNorm models): SQ-b has nothing to smooth and is skipped")


def _learned_tokens(view: GraphView, concat: gs.Node) -> int:
    """Rows of learned (constant) tokens a Concat puts beside run-time tokens: each input that is
    a constant ``(1, T, C)`` broadcast over the batch by an Expand."""
    if len(view.non_const_inputs(concat)) < 2:
        return 0
    rows = 0
    for t in concat.inputs:
        src = view.producer(t)
        v = view.const(src.inputs[0]) if src is not None and src.op == "Expand" else None
        if v is not None and v.ndim == 3 and v.shape[0] == 1:
            rows += int(v.shape[1])
    return rows


def _assemble_units(ctx: _Ctx, convs: dict[int, Role], ln_of_unit: dict[int, str]) -> list[Unit]:
    """Units in graph order; a block starts at each attention score matmul (its q/qkv projection
    just before it belongs to it)."""
    view = ctx.view
    units: list[Unit] = []
    block = -1
    for node in view.nodes:
        nid = id(node)
        if nid in ctx.attn_qk:
            block += 1
        blk = block if block >= 0 else None
        if nid in ctx.lins:
            lin = ctx.lins[nid]
            role = ctx.roles[nid]
            if role in (Role.QKV, Role.Q):
                blk = block + 1  # projections precede their block's score matmul
            units.append(
                Unit(
                    name=node.name,
                    op_type=node.op,
                    role=role,
                    inputs=(lin.x.name,),
                    weight=lin.weight.name if lin.weight is not None else None,
                    weight_input=lin.weight_input.name,
                    weight_transposed=lin.transposed,
                    bias=_const_name(view, lin.bias),
                    bias_node=lin.bias_node.name if lin.bias_node is not None else None,
                    in_features=int(lin.wmat.shape[0]),
                    out_features=int(lin.wmat.shape[1]),
                    layernorm=ln_of_unit.get(nid),
                    activation=ctx.act_before(lin.x)[0],
                    block=None if role in (Role.HEAD, Role.PATCH_EMBED) else blk,
                    output=lin.output.name,
                    weight_axis=weight_axis_of(node),
                )
            )
        elif nid in ctx.attn_qk or nid in ctx.attn_av:
            units.append(
                Unit(
                    name=node.name,
                    op_type=node.op,
                    role=Role.ATTN_QK if nid in ctx.attn_qk else Role.ATTN_AV,
                    inputs=(node.inputs[0].name, node.inputs[1].name),
                    activation=ctx.act_before(node.inputs[0])[0] if nid in ctx.attn_av else None,
                    block=blk,
                    output=node.outputs[0].name,
                )
            )
        elif nid in convs:
            w = view.const(node.inputs[1])
            src, _ = view.const_source(node.inputs[1])
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            units.append(
                Unit(
                    name=node.name,
                    op_type="Conv",
                    role=convs[nid],
                    inputs=(node.inputs[0].name,),
                    weight=src.name if src is not None else None,
                    weight_input=node.inputs[1].name,
                    bias=_const_name(view, bias),
                    in_features=int(np.prod(w.shape[1:])),
                    out_features=int(w.shape[0]),
                    activation=ctx.act_before(node.inputs[0])[0] if convs[nid] is Role.CONV else None,
                    block=blk if convs[nid] is Role.CONV else None,
                    output=node.outputs[0].name,
                    weight_axis=weight_axis_of(node),
                )
            )
    return units


def _const_name(view: GraphView, t: gs.Tensor | None) -> str | None:
    if t is None:
        return None
    src, _ = view.const_source(t)
    if src is not None:
        return src.name
    return t.name if view.is_const(t) else None


def _feeds_residual(view: GraphView, t: gs.Tensor) -> bool:
    for node in view.consumers(t):
        if node.op == "Add" and len(view.non_const_inputs(node)) == 2:
            return True
    return False


def _from_graph_input(view: GraphView, t: gs.Tensor) -> bool:
    return _walk_up(view, t, _SHAPE_OPS | {"Slice", "Pad"}, lambda cur: cur.name in view.input_names)


def _fold_reason(view: GraphView, ln: _LN, lin_nodes: list[gs.Node], other: list[gs.Node], graph_out: bool,
                 lins: dict[int, _Lin], channels: int | None) -> str | None:
    if not lin_nodes:
        return "feeds no quantizable Linear"
    if not ln.axis_last:
        return "normalises over an axis other than the last"
    if channels is None:
        return "channel count unknown (no static last dimension)"
    if graph_out:
        return "its output is also a graph output"
    if other:
        kinds = sorted({f"{n.op} {n.name}" for n in other})
        first = kinds[0]
        more = f" and {len(kinds) - 1} more" if len(kinds) > 1 else ""
        residual = any(n.op == "Add" for n in other)
        what = "the residual Add" if residual else "a non-Linear consumer"
        return f"its output also feeds {what} ({first}{more})"
    if ln.form == "op" and (ln.gamma is None or view.const(ln.gamma) is None):
        return "gamma is not a constant"
    if ln.form == "op" and ln.beta is not None and view.const(ln.beta) is None:
        return "beta is not a constant"
    if ln.form == "decomposed" and ln.gamma is None and ln.beta is None:
        pass  # fold creates Mul/Add? no: refuse, an extra node would remain
    if ln.form == "decomposed" and (ln.gamma is None or ln.beta is None):
        return "decomposed LayerNorm without a constant gamma and beta to fold into"
    group = {id(n) for n in lin_nodes}
    for n in lin_nodes:
        lin = lins[id(n)]
        if lin.weight is None:
            return f"weight of {n.name} is not a constant initializer"
        for user in lin.weight.outputs:
            if id(user) in group:
                continue
            # a Transpose/Identity chain feeding a group member is fine
            if user.op in ("Identity", "Transpose", "Reshape") and all(id(c) in group for c in _chain_users(user)):
                continue
            return f"weight {lin.weight.name} of {n.name} is shared with node {user.name} outside the group"
    return None


def _chain_users(node: gs.Node) -> Iterable[gs.Node]:
    for o in node.outputs:
        for c in o.outputs:
            if c.op in ("Identity", "Transpose", "Reshape"):
                yield from _chain_users(c)
            else:
                yield c
