"""Float constants stored as float16: rounded before calibration, so the file is exact for its plan.

A ViT's non-weight float constants (biases, position embedding and cls token, LayerNorm scale
and bias, SQ-b's explicit smoothing vectors) are a large part of a 4-bit file (cifar10-vit:
83 KB beside 397 KB of int4 codes, BENCHMARKS.md section 9). Storing them as float16 halves them,
but rewriting them after the plan was made changes a 4-bit network's outputs far beyond noise
(a value that moves across a rounding boundary flips a code downstream). So with
``emission.constant_storage = float16`` (:class:`~onnx_mptq.plan.ConstantStorage`) the rounding is
a modelling decision, taken on the (smoothed) float graph BEFORE capture and calibration:

    c' = fp32(fp16(c))          round to nearest even; |c - c'| <= 2^-11 |c| (normal range),
                                <= 2^-25 absolute below 2^-14 (fp16 subnormals)

for every tensor :func:`float_constants` names (:func:`round_constants`). Every later stage (capture,
scale search, OPT-m, mixed precision, compensation) sees ``c'``, the plan's ``model_digest`` is
the digest of the rounded graph, and ``--plan`` re-emission rounds the smoothed graph the same way
(a pure function of it) before checking that digest. At emission :func:`store_float16` writes each
such constant whose values are exactly float16 values as::

    c16 = c'  (FLOAT16 initializer, new short name)
    c   = Cast(c16, to=FLOAT)      exact: every float16 value is a float32 value

so the model computes with ``c'`` bit for bit; ORT's constant folding (level 1) evaluates the
Cast at session load, before its QDQ fusions, so the integer kernels are the same
(``tools/check_int_kernels.py``). A constant whose values are not all float16 values (a bias
that error compensation corrected after the rounding, ``b' + delta``; a Gemm bias moved out of
the Gemm as ``beta C`` with ``beta != 1``) stays float32: the emitted value is always the plan's
value, never rounded at emission. The user's FP32 model is never changed, and validation
compares against it, unrounded.

Which tensors (:func:`float_constants`, the one definition): float32 initializers of the main
graph with at least :data:`MIN_ELEMENTS` elements that are

* not a weight: no path through layout ops (Identity, Transpose, Reshape, Squeeze, Unsqueeze,
  Flatten, Cast) reaches a MatMul input, Gemm ``A`` / ``B``, Conv / ConvTranspose ``W`` or an
  Einsum operand (the quantized weights keep their float32 values and per-channel scales);
* not read by a QuantizeLinear / DequantizeLinear (scales, zero points);
* not a graph input (an overridable initializer);
* finite with ``|c| <= 65504`` (else declined: float16 would overflow).

Scalars and short vectors (``eps``, ``sqrt(d)``, GELU's constants) are never rounded: they are
structure, not data, and gain nothing. Integer tensors (shapes, indices) are never touched.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
from onnx import numpy_helper

from ..plan import ConstantStorage

log = logging.getLogger(__name__)

#: the fewest elements a float constant needs to be rounded / stored as float16
MIN_ELEMENTS = 32
#: the largest finite float16
FP16_MAX = 65504.0

_LAYOUT = {"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast"}
_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def _is_weight_slot(op: str, i: int) -> bool:
    if op in ("MatMul", "Einsum"):
        return True
    if op == "Gemm":
        return i in (0, 1)
    if op in ("Conv", "ConvTranspose"):
        return i == 1
    return False


@dataclasses.dataclass(frozen=True)
class Declined:
    tensor: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ConstantClasses:
    """What :func:`float_constants` found: the names to round / store, in initializer order, and
    the float32 initializers of at least :data:`MIN_ELEMENTS` elements declined with a reason
    (weights are listed as declined too)."""

    names: tuple[str, ...]
    declined: tuple[Declined, ...] = ()


def float_constants(model: onnx.ModelProto) -> ConstantClasses:
    """The non-weight float constants of ``model`` (module docstring); analysis only."""
    g = model.graph
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name:
                consumers.setdefault(name, []).append((n, i))
    graph_inputs = {vi.name for vi in g.input}

    def reaches_weight_or_qdq(name: str) -> str | None:
        todo, seen = [name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for n, i in consumers.get(t, []):
                if n.op_type in _QDQ:
                    return f"read by {n.op_type} {n.name}"
                if _is_weight_slot(n.op_type, i):
                    return f"a weight ({n.op_type} {n.name} input {i})"
                if n.op_type in _LAYOUT and i == 0:
                    todo.extend(o for o in n.output if o)
        return None

    names: list[str] = []
    declined: list[Declined] = []
    for init in g.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        size = int(np.prod(init.dims)) if len(init.dims) else 1
        if size < MIN_ELEMENTS:
            continue
        why = reaches_weight_or_qdq(init.name)
        if why is None and init.name in graph_inputs:
            why = "also a graph input"
        if why is None:
            values = numpy_helper.to_array(init)
            if not np.all(np.isfinite(values)) or float(np.abs(values).max()) > FP16_MAX:
                why = f"values beyond float16 (max |c| {float(np.abs(values).max()):.4g} or non-finite)"
        if why is None:
            names.append(init.name)
        else:
            declined.append(Declined(init.name, why))
    return ConstantClasses(tuple(names), tuple(declined))


def to_float16_values(values: np.ndarray) -> np.ndarray:
    """``fp32(fp16(values))``: the nearest float16 value of each entry, as float32."""
    return np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RoundResult:
    model: onnx.ModelProto
    rounded: tuple[str, ...]  # the initializers replaced by their float16 rounding
    declined: tuple[Declined, ...] = ()
    max_rel_change: float = 0.0  # max |c - c'| / max |c| over the rounded tensors


def round_constants(model: onnx.ModelProto) -> RoundResult:
    """A copy of ``model`` with every :func:`float_constants` tensor replaced by its float16
    rounding, still float32 (same names, shapes, dtype: the graph is otherwise byte-identical).
    Running it twice is a no-op the second time."""
    classes = float_constants(model)
    wanted = set(classes.names)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rel = 0.0
    for i, init in enumerate(out.graph.initializer):
        if init.name not in wanted:
            continue
        values = numpy_helper.to_array(init)
        rounded = to_float16_values(values)
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > 0:
            rel = max(rel, float(np.abs(rounded - values).max()) / peak)
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(rounded, init.name))
    log.info("float constants rounded to float16 values: %d tensors (max relative change %.2e)", len(classes.names), rel)
    return RoundResult(out, classes.names, classes.declined, rel)


def round_for_storage(model: onnx.ModelProto, storage: ConstantStorage | str) -> onnx.ModelProto:
    """The float graph the plan is made on: ``model`` itself for float32 constant storage, its
    :func:`round_constants` copy for float16 (the pipeline's step after SQ-b, and ``--plan``
    re-emission's before the digest check)."""
    if ConstantStorage(storage) is ConstantStorage.FLOAT32:
        return model
    return round_constants(model).model


@dataclasses.dataclass(frozen=True)
class StoreResult:
    model: onnx.ModelProto
    stored: tuple[str, ...]  # constants now FLOAT16 initializer + Cast
    kept: tuple[Declined, ...] = ()  # float constants left float32, with the reason
    saved_bytes: int = 0  # raw data bytes saved (2 per element), before the Cast nodes' cost

    def summary(self) -> str:
        """One line for the quantize summary."""
        kept = f"; {len(self.kept)} kept float32 (not float16 values)" if self.kept else ""
        return (f"float constants: float16 + Cast ({len(self.stored)} tensors, {self.saved_bytes / 1e3:.1f} KB of data "
                f"saved{kept})")


def _fresh(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def store_float16(model: onnx.ModelProto) -> StoreResult:
    """A copy of ``model`` with every :func:`float_constants` tensor whose values are all float16
    values stored as a FLOAT16 initializer and a ``Cast(to=FLOAT)`` that produces the original name
    (the consumers, and the model's own tensor names, are unchanged). Lossless by construction: a
    tensor that is not exactly float16 stays float32 (listed in ``kept``). The Casts come first in
    the node list, in initializer order; the initializer keeps its place. A second run is a no-op
    (the float16 initializers are not float32)."""
    classes = float_constants(model)
    wanted = set(classes.names)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    taken = {t.name for t in g.initializer} | {n.name for n in g.node}
    taken |= {o for n in g.node for o in n.output} | {vi.name for vi in g.input}
    casts: list[onnx.NodeProto] = []
    stored: list[str] = []
    kept: list[Declined] = []
    saved = 0
    for i, init in enumerate(g.initializer):
        if init.name not in wanted:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            kept.append(Declined(init.name, "values are not float16 values (changed after the rounding)"))
            continue
        name = init.name
        short = _fresh(taken, f"h{len(stored)}")
        g.initializer[i].CopyFrom(numpy_helper.from_array(half, short))  # init is this entry: name kept above
        cast = onnx.NodeProto()
        cast.op_type, cast.name = "Cast", _fresh(taken, f"{short}/Cast")
        cast.input.append(short)
        cast.output.append(name)
        attr = cast.attribute.add()
        attr.name, attr.type, attr.i = "to", onnx.AttributeProto.INT, onnx.TensorProto.FLOAT
        casts.append(cast)
        stored.append(name)
        saved += 2 * int(values.size)
    if casts:
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(casts + nodes)
        try:
            onnx.checker.check_model(out)
        except onnx.checker.ValidationError as e:  # a bug in this pass, not the user's fault
            raise RuntimeError(f"store_float16 produced an invalid model: {str(e).splitlines()[0]}") from e
    log.info("float constants stored as float16: %d tensors (%.1f KB saved), %d kept float32", len(stored),
             saved / 1e3, len(kept))
    return StoreResult(out, tuple(stored), tuple(kept), saved)


def constants_line(model: onnx.ModelProto) -> str:
    """One summary line on how an emitted model stores its float constants, with the way to a
    smaller file where they are float32."""
    g = model.graph
    half = {t.name: int(np.prod(t.dims)) if len(t.dims) else 1 for t in g.initializer
            if t.data_type == onnx.TensorProto.FLOAT16}
    cast16 = [n for n in g.node if n.op_type == "Cast" and n.input and n.input[0] in half]
    f32 = float_constants(model).names
    sizes = {t.name: int(np.prod(t.dims)) if len(t.dims) else 1 for t in g.initializer}
    f32_bytes = 4 * sum(sizes[n] for n in f32)
    if cast16:
        stored = 2 * sum(half[n.input[0]] for n in cast16)
        rest = f", {len(f32)} kept float32 ({f32_bytes / 1e3:.1f} KB)" if f32 else ""
        return f"float constants: {len(cast16)} stored float16 + Cast ({stored / 1e3:.1f} KB){rest}"
    if not f32:
        return "float constants: none to store (no bias, embedding or LayerNorm tensor of 32+ elements)"
    return (f"float constants: float32 ({len(f32)} tensors, {f32_bytes / 1e3:.1f} KB); --constant-storage float16 "
            f"halves them (rounded before calibration)")
