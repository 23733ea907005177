"""A parametric fake-quant graph: one float model whose quantization parameters are graph inputs.

Mixed-precision search evaluates hundreds of bit assignments. Emitting a QDQ model and building
an ONNX Runtime session for each would dominate the cost, so :func:`build_param_graph` builds
ONE float graph in which every planned operand is fake-quantized with parameters fed at run time.
Any assignment is then one ``session.run`` with different feeds.

Activation operands (per unit and operand, so units reading one tensor get their own quantizer)
get the ops the emitted model uses, with the step ``s`` (float32), the zero point ``zp`` and the
allowed codes ``[lo, hi]`` (uint8 scalars) fed at run time::

    uniform form:   FQ(x; s, zp, lo, hi) = DequantizeLinear(Clip(QuantizeLinear(x, s, zp), lo, hi), s, zp)

value for value what :mod:`onnx_mptq.passes.emit_qdq` writes (``clamp(rint(x / s) + zp, lo, hi)``,
then ``(q - zp) * s``; a symmetric b-bit quantizer is held in uint8 with ``zp = 128``). Operands
that may carry an OPT-m twin-region quantizer get one of (``n = 2^(k-1) - 1``, ``d2 = 2^m d1``)::

    sum form (a Linear behind a GELU):      y = FQ(x; s1, zp1, lo1, hi1) + FQ(x; s2, zp2, lo2, hi2)
    split form (operand 0 of P @ V):        y = where(x < t, FQ(x; s1, zp1, lo1, hi1), FQ(x; s2, zp2, lo2, hi2))

The sum form holds a uniform quantizer (region 2 with ``lo = hi = zp = 0`` gives 0) or a twin
GELU one (region 1: ``d1, n, 0, n``, codes -n..0; region 2: ``d2, 0, 0, n``), exactly the
emitted sum. The split form holds all three:

    ============  =====  =============================  =============================
    quantizer     t      region 1 (s, zp, lo, hi)       region 2
    ============  =====  =============================  =============================
    uniform       +inf   the uniform quantizer          (not selected)
    twin GELU     0      d1, n, 0, n  (codes -n..0)     d2, 0, 0, n
    twin Softmax  split  d1, 0, 0, n                    d2, 0, 0, n
    ============  =====  =============================  =============================

equal to the emitted sum of the two regions, each region's codes being zero outside it.

Weights: the node's weight input is replaced by graph inputs in the layout the node reads
(MatMul ``(K, N)``, Gemm ``B`` in its own layout, Conv ``(O, I, kh, kw)``). In the **integer**
graph (``integer=True``, the default) they are the int8 codes (or uint8 codes + 128,
``weight_dtype``) and the per-channel steps, read
through a per-axis ``DequantizeLinear`` exactly as the emitted model does; in the float graph a
caller feeds pre-fake-quantized weights (:func:`fake_quant_weight_as_read`), the same values.

Integer graph. ONNX Runtime fuses ``DQ(x) -> MatMul <- DQ(w)`` into ``MatMulIntegerToFloat`` with
quantization parameters that are graph inputs, so the uniform slots already run integer
matmuls. The sum and split slots end in a float ``Add`` / ``Where``; the integer graph
requantizes their value once more, ``y = DQ(Q(y0; s3, zp3); s3, zp3)``, which is exact for
values on the grid of step ``s3``: the uniform quantizer's own step and zero point, or a twin
quantizer's delta1 lattice (GELU: zp3 = n; Softmax: 0) where its codes fit uint8
(:func:`onnx_mptq.numerics.twin.lattice_fits`, what ``quant.optm.lattice`` guarantees); a twin
that does not fit is refused with :class:`PlanError` there (the float graph holds any). So the
evaluation runs the deployed model's integer kernels: measured on a random-weight DeiT-S, one
evaluation of the integer graph takes about half the float graph's time.

Scalar parameters are rank-0 graph inputs named ``mptq_fq/<unit>/a<i>/<param>``; weights
are ``mptq_fq/<unit>/w``. :class:`ParamGraph` records which inputs belong to which unit and
:meth:`ParamGraph.feeds` turns plan records (:class:`~onnx_mptq.plan.LayerPlan`) into feeds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import PlanError, UnsupportedModelError
from ..graph.analysis import GELU_KINDS, Activation, GraphView, ModelAnalysis, Role, Unit
from ..graph.io import assign_node_names, graph_digest
from ..numerics.quant import qrange
from ..numerics.twin import lattice_fits, twin_lattice_range
from ..plan import ActQuant, LayerPlan, Scheme, WeightQuant
from ..passes.emit_qdq import WeightContainer, weight_codes

log = logging.getLogger(__name__)

PREFIX = "mptq_fq"
UNIFORM_PARAMS = ("s", "zp", "lo", "hi")
SUM_PARAMS = ("s1", "zp1", "lo1", "hi1", "s2", "zp2", "lo2", "hi2")
SPLIT_PARAMS = ("t", *SUM_PARAMS)
LATTICE_PARAMS = ("s3", "zp3")  # the integer graph's requantization of a sum / split slot
FORMS = ("uniform", "sum", "split")
_FLOAT_PARAMS = frozenset({"s", "t", "s1", "s2", "s3"})


@dataclasses.dataclass(frozen=True)
class ActSlot:
    """The fake quantizer in front of operand ``operand`` of ``unit``."""

    unit: str
    operand: int
    tensor: str  # the float tensor quantized
    form: str  # "uniform" | "sum" (uniform or twin GELU) | "split" (uniform or any twin)
    inputs: tuple[str, ...]  # graph input names, in UNIFORM_PARAMS / SUM_PARAMS / SPLIT_PARAMS order


@dataclasses.dataclass(frozen=True, eq=False)
class WeightSlot:
    """The graph input replacing ``unit``'s weight, in the layout the node reads."""

    unit: str
    input: str  # integer graph: the int8 codes; float graph: the fake-quantized float32 weight
    axis: int  # output-channel axis of the read layout (MatMul 1, Gemm transB 0 / else 1, Conv 0)
    weight: np.ndarray  # float32 weight as the node reads it (the values being fake-quantized)
    scale_input: str | None = None  # integer graph: the per-channel steps (float32, one per channel)


@dataclasses.dataclass(frozen=True, eq=False)
class ParamGraph:
    """The parametric model and the map from units to its parameter inputs."""

    model: onnx.ModelProto
    model_digest: str  # the float graph it was built from (``ModelAnalysis.model_digest``)
    data_inputs: tuple[str, ...]  # the original graph inputs (the image)
    acts: tuple[ActSlot, ...]
    weights: tuple[WeightSlot, ...]
    integer: bool = False  # integer weights and requantized sum / split slots (module docstring)
    weight_dtype: str = "int8"  # integer graph: "int8" codes, or "uint8" codes + 128 (zero point 128)

    def act_slots(self, unit: str) -> tuple[ActSlot, ...]:
        return tuple(s for s in self.acts if s.unit == unit)

    def weight_slot(self, unit: str) -> WeightSlot | None:
        for s in self.weights:
            if s.unit == unit:
                return s
        return None

    @property
    def units(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for s in self.acts:
            seen.setdefault(s.unit, None)
        for w in self.weights:
            seen.setdefault(w.unit, None)
        return tuple(seen)

    def act_feeds(self, layer: LayerPlan) -> dict[str, np.ndarray]:
        """Scalar feeds of every activation operand of ``layer``."""
        slots = self.act_slots(layer.unit)
        if len(slots) != len(layer.inputs):
            raise PlanError(f"layer {layer.unit}: {len(layer.inputs)} operand quantizer(s), the graph has {len(slots)}")
        out: dict[str, np.ndarray] = {}
        for slot, aq in zip(slots, layer.inputs):
            vals = act_values(aq, slot.form, where=f"layer {layer.unit} operand {slot.operand}",
                              integer=self.integer)
            if len(vals) != len(slot.inputs):
                raise PlanError(f"layer {layer.unit} operand {slot.operand}: {len(vals)} parameters for "
                                f"{len(slot.inputs)} slot inputs")
            out.update({name: v for name, v in zip(slot.inputs, vals)})
        return out

    def weight_feeds(self, layer: LayerPlan) -> dict[str, np.ndarray]:
        """The weight inputs of ``layer`` (empty for a unit without weight): int8 codes and
        per-channel steps (integer graph) or the fake-quantized float32 weight."""
        slot = self.weight_slot(layer.unit)
        if slot is None:
            if layer.weight is not None:
                raise PlanError(f"layer {layer.unit}: the graph has no weight input for it")
            return {}
        if layer.weight is None:
            raise PlanError(f"layer {layer.unit}: a weight quantizer is needed")
        if slot.scale_input is None:
            return {slot.input: fake_quant_weight_as_read(slot.weight, layer.weight, slot.axis)}
        codes, scales = quantize_weight_as_read(slot.weight, layer.weight, slot.axis)
        if self.weight_dtype == "uint8":
            codes = weight_codes(codes, WeightContainer.UINT8)[0]
        return {slot.input: codes, slot.scale_input: scales}

    def feeds(self, layers: Mapping[str, LayerPlan]) -> dict[str, np.ndarray]:
        """Every parameter feed for ``layers`` (one per unit of the graph; weights computed here,
        callers that evaluate often should cache :meth:`weight_feed` per quantizer)."""
        missing = [u for u in self.units if u not in layers]
        if missing:
            raise PlanError(f"no quantizer for unit(s) {', '.join(missing[:5])}")
        out: dict[str, np.ndarray] = {}
        for unit in self.units:
            out.update(self.act_feeds(layers[unit]))
            out.update(self.weight_feeds(layers[unit]))
        return out


# ---------------------------------------------------------------------------------------------
# values


def _region(scale: float, zp: int, lo: int, hi: int) -> tuple[np.ndarray, ...]:
    return (np.array(scale, dtype=np.float32), np.array(zp, dtype=np.uint8), np.array(lo, dtype=np.uint8),
            np.array(hi, dtype=np.uint8))


def act_values(aq: ActQuant, form: str, where: str = "operand", integer: bool = False) -> tuple[np.ndarray, ...]:
    """The scalar parameters of ``aq`` for a slot of ``form`` (module docstring), in
    ``UNIFORM_PARAMS`` / ``SUM_PARAMS`` / ``SPLIT_PARAMS`` order (``integer``: sum and split slots
    also get ``LATTICE_PARAMS``): float32 steps and split, uint8 codes."""
    vals = _act_values(aq, form, where)
    if not integer or form == "uniform":
        return vals
    if aq.scheme is Scheme.UNIFORM:
        s3, zp3 = float(np.float32(aq.scale)), (128 if aq.symmetric else int(aq.zero_point))
    else:
        try:
            tp = aq.params()
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None
        if not lattice_fits(tp):
            lo, hi = twin_lattice_range(tp)
            raise PlanError(
                f"{where}: its twin-region quantizer (m={tp.m}, {tp.bits} bits) spans {hi - lo + 1} codes of delta1, more "
                f"than one uint8 lattice holds; the integer evaluation graph cannot run it (use quant.optm.lattice)")
        s3, zp3 = float(np.float32(tp.delta1)), -twin_lattice_range(tp)[0]
    return (*vals, np.array(s3, dtype=np.float32), np.array(zp3, dtype=np.uint8))


def _act_values(aq: ActQuant, form: str, where: str) -> tuple[np.ndarray, ...]:
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if aq.scheme is Scheme.UNIFORM:
        qmin, qmax = qrange(aq.bits, aq.symmetric)
        zp = 128 if aq.symmetric else int(aq.zero_point)
        off = 128 if aq.symmetric else 0
        region = _region(float(np.float32(aq.scale)), zp, qmin + off, qmax + off)
        if form == "uniform":
            return region
        if form == "sum":
            return (*region, *_region(1.0, 0, 0, 0))  # region 2 always gives 0
        return (np.array(np.inf, dtype=np.float32), *region, *region)
    kind = aq.twin_kind.value if aq.twin_kind is not None else None
    if form == "uniform" or (form == "sum" and kind != "gelu"):
        raise PlanError(f"{where}: a {kind} twin-region quantizer on an operand the graph quantizes with the {form} form")
    try:
        tp = aq.params()
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None
    n, d1, d2 = tp.levels, tp.delta1, tp.delta2  # delta2: an exact power-of-two multiple of the float32 delta1
    if kind == "gelu":
        regions = (*_region(d1, n, 0, n), *_region(d2, 0, 0, n))
        return regions if form == "sum" else (np.array(0.0, dtype=np.float32), *regions)
    return (np.array(tp.split, dtype=np.float32), *_region(d1, 0, 0, n), *_region(d2, 0, 0, n))


def quantize_weight_as_read(w: np.ndarray, wq: WeightQuant, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and float32 per-channel steps of a weight in the layout its node reads (the
    integers the emitted model stores)."""
    return np.ascontiguousarray(wq.codes(w, axis)), np.asarray(wq.scales, dtype=np.float32)


def fake_quant_weight_as_read(w: np.ndarray, wq: WeightQuant, axis: int) -> np.ndarray:
    """Symmetric per-channel fake quantization of a weight in the layout its node reads."""
    return np.ascontiguousarray(wq.fake_quant(w, axis))


# ---------------------------------------------------------------------------------------------
# the pass


def slot_form(unit: Unit, operand: int) -> str:
    """The form of an operand's fake quantizer: "split" where an OPT-m softmax quantizer may be
    planned (operand 0 of ``P @ V``), "sum" where a GELU one may (a Linear behind a GELU),
    "uniform" elsewhere."""
    if operand != 0 or unit.role in (Role.ATTN_QK, Role.PATCH_EMBED):
        return "uniform"
    if unit.role is Role.ATTN_AV or unit.activation is Activation.SOFTMAX:
        return "split"
    return "sum" if unit.activation in GELU_KINDS else "uniform"


class _Builder:
    """Adds the fake quantizers' nodes through onnx-graphsurgeon's ``Graph.layer`` (which names
    the new tensors uniquely). The parameter inputs get exact names under ``PREFIX``, which
    :func:`build_param_graph` has checked the model does not use."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph

    def scalar_input(self, name: str) -> gs.Variable:
        param = name.rsplit("/", 1)[-1]
        v = gs.Variable(name, dtype=np.float32 if param in _FLOAT_PARAMS else np.uint8, shape=())
        self.graph.inputs.append(v)
        return v

    def op(self, op: str, base: str, inputs: list, dtype=np.float32, **attrs) -> gs.Variable:
        (out,) = self.graph.layer(op=op, name=f"{base}/{op}", inputs=inputs, outputs=[f"{base}/{op.lower()}_out"],
                                  attrs=attrs)
        out.dtype = dtype  # typed: the stage cut looks for float tensors
        return out

    def fq(self, x: gs.Tensor, s: gs.Tensor, zp: gs.Tensor, lo: gs.Tensor, hi: gs.Tensor, base: str) -> gs.Variable:
        """DequantizeLinear(Clip(QuantizeLinear(x, s, zp), lo, hi), s, zp)"""
        q = self.op("QuantizeLinear", base, [x, s, zp], dtype=np.uint8)
        q = self.op("Clip", base, [q, lo, hi], dtype=np.uint8)
        return self.op("DequantizeLinear", base, [q, s, zp])


def build_param_graph(model: onnx.ModelProto, analysis: ModelAnalysis, *,
                      units: tuple[str, ...] | None = None, integer: bool = True,
                      weight_dtype: str = "int8") -> ParamGraph:
    """The parametric fake-quant model of ``model`` (the float graph ``analysis`` describes).

    Every unit of ``analysis`` (or only ``units``) gets fake quantizers on its activation operands
    and weight graph inputs; the caller's proto is not modified. Graph outputs are unchanged.
    ``integer``: the integer graph (module docstring); False: float weights and no
    requantization (holds twin quantizers of any ratio). ``weight_dtype`` (integer graph): the
    weight codes' container, ``"int8"`` or ``"uint8"`` (codes + 128, zero point 128: exact on CPUs
    whose ``uint8 x int8`` kernel saturates, :func:`onnx_mptq.calibrate.session.cpu_u8s8_exact`).
    """
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"weight_dtype must be 'int8' or 'uint8', not {weight_dtype!r}")
    wdt = np.int8 if weight_dtype == "int8" else np.uint8
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assign_node_names(m)
    digest = graph_digest(m)
    if digest != analysis.model_digest:
        raise PlanError(f"the analysis was made for another graph (analysis {analysis.model_digest}, model {digest})")
    wanted = None if units is None else set(units)
    graph = gs.import_onnx(m)
    taken = sorted(t for t in [*graph.tensors(), *(n.name for n in graph.nodes)] if t.startswith(f"{PREFIX}/"))
    if taken:
        raise UnsupportedModelError(f"the model already has tensors or nodes named {PREFIX}/... ({taken[0]!r}); "
                                    f"it looks like a parametric evaluation graph itself")
    data_inputs = tuple(t.name for t in graph.inputs)
    view = GraphView(graph)
    nodes = {n.name: n for n in graph.nodes}
    b = _Builder(graph)
    acts: list[ActSlot] = []
    weights: list[WeightSlot] = []
    plan: list[tuple[Unit, gs.Node]] = []
    for unit in analysis.units:  # checks first
        if wanted is not None and unit.name not in wanted:
            continue
        node = nodes.get(unit.name)
        if node is None or node.op != unit.op_type:
            raise PlanError(f"unit {unit.name}: no {unit.op_type} node of that name in the model")
        for i, t in enumerate(unit.inputs):
            if node.inputs[i].name != t:
                raise PlanError(f"unit {unit.name}: input {i} is {node.inputs[i].name!r}, the analysis says {t!r}")
        if unit.role not in (Role.ATTN_QK, Role.ATTN_AV) and view.const(node.inputs[1]) is None:
            raise UnsupportedModelError(f"unit {unit.name}: its weight is not a constant")
        plan.append((unit, node))
    for unit, node in plan:
        base = f"{PREFIX}/{unit.name}"
        for i, t in enumerate(unit.inputs):
            x = node.inputs[i]
            ab = f"{base}/a{i}"
            form = slot_form(unit, i)
            if form == "split":
                ins = [b.scalar_input(f"{ab}/{p}") for p in SPLIT_PARAMS + (LATTICE_PARAMS if integer else ())]
                mask = b.op("Less", ab, [x, ins[0]], dtype=np.bool_)
                y = b.op("Where", ab, [mask, b.fq(x, *ins[1:5], f"{ab}/r1"), b.fq(x, *ins[5:9], f"{ab}/r2")])
            elif form == "sum":
                ins = [b.scalar_input(f"{ab}/{p}") for p in SUM_PARAMS + (LATTICE_PARAMS if integer else ())]
                y = b.op("Add", ab, [b.fq(x, *ins[0:4], f"{ab}/r1"), b.fq(x, *ins[4:8], f"{ab}/r2")])
            else:
                ins = [b.scalar_input(f"{ab}/{p}") for p in UNIFORM_PARAMS]
                y = b.fq(x, *ins, ab)
            if integer and form != "uniform":  # requantize on the slot's grid: the matmul reads integers
                s3, zp3 = ins[-2], ins[-1]
                y = b.op("DequantizeLinear", f"{ab}/r3", [b.op("QuantizeLinear", f"{ab}/r3", [y, s3, zp3], dtype=np.uint8),
                                                           s3, zp3])
            names = tuple(v.name for v in ins)
            node.inputs[i] = y
            acts.append(ActSlot(unit.name, i, t, form, names))
        if unit.role in (Role.ATTN_QK, Role.ATTN_AV):
            continue
        w = np.ascontiguousarray(np.asarray(view.const(node.inputs[1]), dtype=np.float32))
        axis = unit.weight_axis
        if integer:
            wq = gs.Variable(f"{base}/wq", dtype=wdt, shape=list(w.shape))
            ws = gs.Variable(f"{base}/ws", dtype=np.float32, shape=[int(w.shape[axis])])
            graph.inputs.extend([wq, ws])
            zp = gs.Constant(f"{base}/wzp", np.full(int(w.shape[axis]), 0 if wdt is np.int8 else 128, wdt))
            node.inputs[1] = b.op("DequantizeLinear", f"{base}/w", [wq, ws, zp], axis=axis)
            weights.append(WeightSlot(unit.name, wq.name, axis, w, ws.name))
            continue
        wv = gs.Variable(f"{base}/w", dtype=np.float32, shape=list(w.shape))
        graph.inputs.append(wv)
        node.inputs[1] = wv
        weights.append(WeightSlot(unit.name, wv.name, axis, w))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    out = onnx.ModelProto()
    out.CopyFrom(m)
    out.graph.CopyFrom(exported.graph)
    if integer:
        _place_before_consumers(out.graph, {w.input for w in weights})
    log.debug("parametric graph: %d activation quantizers, %d weight inputs", len(acts), len(weights))
    return ParamGraph(model=out, model_digest=digest, data_inputs=data_inputs, acts=tuple(acts), weights=tuple(weights),
                      integer=integer, weight_dtype=weight_dtype if integer else "int8")


def _place_before_consumers(g: onnx.GraphProto, sources: set[str]) -> None:
    """Move each node reading one of ``sources`` (the weight dequantizers, which read graph
    inputs and constants only) to just before the first node reading its output, so that its
    float output is alive only there (topological sorting may put them all first, which would
    leave no point where one float tensor is alive, and no stage cut)."""
    nodes = list(g.node)
    movers = {id(n) for n in nodes if any(t in sources for t in n.input)}
    out_of = {o: n for n in nodes if id(n) in movers for o in n.output}
    rest = [n for n in nodes if id(n) not in movers]
    order: list[onnx.NodeProto] = []
    placed: set[int] = set()
    for n in rest:
        for t in n.input:
            mv = out_of.get(t)
            if mv is not None and id(mv) not in placed:
                order.append(mv)
                placed.add(id(mv))
        order.append(n)
    order.extend(n for n in nodes if id(n) in movers and id(n) not in placed)  # unread (none expected)
    del g.node[:]
    g.node.extend(order)


# ---------------------------------------------------------------------------------------------
# stages: the parametric graph cut where little is alive, for evaluations that start mid-network


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """A contiguous run of the parametric graph's nodes as a model of its own.

    ``inputs``: the cut tensors it reads from the previous stage (for the first stage none) plus
    the data inputs it reads; ``params``: the parameter inputs it reads; ``outputs``: the cut
    tensors the next stages need (the graph outputs for the last stage)."""

    model: onnx.ModelProto
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    outputs: tuple[str, ...]


def _static_tensors(g: onnx.GraphProto) -> set[str]:
    """Tensors computable from initializers alone (Constant nodes and what follows them)."""
    static = {i.name for i in g.initializer}
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            continue
        if all((not t) or t in static for t in n.input):
            static.update(o for o in n.output if o)
    return static


def split_stages(pg: ParamGraph, max_stages: int = 8) -> tuple[Stage, ...]:
    """Cut ``pg.model`` into stages (at most ``max_stages``) so that an evaluation that changes
    only the parameters of later units can start from cached cut tensors.

    A cut is placed between two nodes (in the graph's topological order) where exactly one float
    tensor, plus any number of non-float (shape) tensors, is computed before and still read after
    (initializer-only computations excluded, as each stage recomputes them); per unit, the latest
    such cut before the first node reading the unit's parameters is used. Returns one stage (the
    whole graph) when no cut exists or the graph has subgraphs."""
    m = pg.model
    g = m.graph
    nodes = list(g.node)
    data = set(pg.data_inputs)
    params = {i.name for i in g.input} - data
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return (Stage(m, tuple(pg.data_inputs), tuple(sorted(params)), tuple(o.name for o in g.output)),)
    static = _static_tensors(g)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    prod: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if all(o in static for o in n.output if o):
            continue
        for o in n.output:
            if o:
                prod[o] = i
        for t in n.input:
            if t and t not in static and t not in data and t not in params:
                last[t] = max(last.get(t, -1), i)
    for o in g.output:
        last[o.name] = len(nodes)
    # live dynamic tensors after each node, by a sweep
    starts: dict[int, list[str]] = {}
    for t, p in prod.items():
        if last.get(t, -1) > p:
            starts.setdefault(p, []).append(t)
    live: set[str] = set()
    valid: dict[int, tuple[str, ...]] = {}  # boundary after node i -> cut tensors
    for i in range(len(nodes) - 1):
        live.update(starts.get(i, ()))
        live = {t for t in live if last[t] > i}
        floats = [t for t in live if types.get(t) == onnx.TensorProto.FLOAT]
        if len(floats) == 1 and all(t in types for t in live):
            valid[i] = tuple(sorted(live))
    first_param_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t in params and t not in first_param_use:
                first_param_use[t] = i
    unit_first = {}
    for s in pg.acts:
        for name in s.inputs:
            unit_first[s.unit] = min(unit_first.get(s.unit, len(nodes)), first_param_use.get(name, len(nodes)))
    for w in pg.weights:
        unit_first[w.unit] = min(unit_first.get(w.unit, len(nodes)), first_param_use.get(w.input, len(nodes)))
    cuts: list[int] = []
    bounds = sorted(valid)
    for pos in sorted(unit_first.values()):
        cand = [b for b in bounds if b < pos]
        if cand and (not cuts or cand[-1] > cuts[-1]):
            cuts.append(cand[-1])
    if len(cuts) > max_stages - 1:
        keep = np.unique(np.linspace(0, len(cuts) - 1, max_stages - 1).round().astype(int))
        cuts = [cuts[k] for k in keep]
    if not cuts:
        return (Stage(m, tuple(pg.data_inputs), tuple(sorted(params)), tuple(o.name for o in g.output)),)

    edges = [-1, *cuts, len(nodes) - 1]
    spans = []
    for k in range(len(edges) - 1):
        part = nodes[edges[k] + 1:edges[k + 1] + 1]
        read = [t for n in part for t in n.input if t]
        cut_in = valid[edges[k]] if k > 0 else ()
        ins = tuple(dict.fromkeys([*cut_in, *(t for t in read if t in data)]))
        used_params = tuple(dict.fromkeys(t for t in read if t in params))
        outs = valid[edges[k + 1]] if k < len(edges) - 2 else tuple(o.name for o in g.output)
        spans.append((ins, used_params, outs))
    # each stage is what its outputs need back to its inputs; the initializer-only computations
    # it reads (Constants, shape arithmetic) come along, recomputed in every stage that reads them
    ex = onnx.utils.Extractor(m)
    for ins, used_params, outs in spans:
        for t in (*ins, *used_params, *outs):
            if t not in ex.value_infos:  # cut tensors the export gave no type: their type from the sweep above
                ex.value_infos[t] = onnx.helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None)
    stages = [Stage(ex.extract_model([*ins, *used_params], list(outs)), ins, used_params, outs)
              for ins, used_params, outs in spans]
    log.debug("parametric graph in %d stages", len(stages))
    return tuple(stages)
