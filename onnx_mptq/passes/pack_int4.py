"""Store low-bit weight codes as ONNX INT4 (two codes a byte), in a form ORT still runs as integers.

``pack_int4(model, storage)`` is applied to an emitted QDQ model (:mod:`onnx_mptq.passes.emit_qdq`)
and returns a :class:`PackResult` with a new model (the input proto is never mutated) and what
was packed. Every weight ``DequantizeLinear(q, s, z, axis)`` whose codes ``q`` are a constant
int8 tensor with all values in ``[-8, 7]`` (every symmetric weight of 4 bits or fewer:
``qrange(b, True) = [-(2^(b-1) - 1), 2^(b-1) - 1]``) and whose zero point is all zeros becomes::

    q4 = q  (INT4 initializer, packed: element 2i in the low nibble of byte i, 2i+1 in the high)
    q  = Cast(q4, to=INT8)                 exact: every int4 value is an int8 value
    W_hat = DequantizeLinear(q, s, z, axis)   unchanged

so ``W_hat`` is bit for bit the same. The all-zero zero point ``z`` is dropped (ONNX's default
for an absent one) where only MatMuls read ``W_hat``: ORT fuses ``MatMulIntegerToFloat`` without
it, but not ``QGemm``, so a Gemm's weight keeps it. Why the Cast, measured with ONNX Runtime 1.31 (CPU,
``ORT_ENABLE_EXTENDED`` and ``ORT_ENABLE_ALL``, ``tools/check_int_kernels.py``):

* ``DQ(int4 initializer) -> MatMul`` is **not** fused: ORT keeps a float ``DequantizeLinear`` and a
  float ``MatMul`` (its int4 fusion, ``MatMulNBits``, wants block-wise DQ and a float activation);
* ``Cast(int4 initializer -> int8) -> DQ -> MatMul``: the session's constant folding (level 1)
  evaluates the Cast into an int8 initializer before the QDQ fusions (level 2) run, so the graph
  ORT executes is the int8 one, ``MatMulIntegerToFloat`` / ``QGemm`` as before, with the same
  outputs; only the file (and the proto in memory) holds the packed form.

INT4 needs opset >= 21 (``Cast`` and ``DequantizeLinear`` accept int4 from 21 on). The project
does not upgrade an opset silently, so :class:`~onnx_mptq.config.WeightStorage` is a stated choice:

* ``auto`` (default): INT4 where the model's opset is already >= 21, else today's int8 form,
  unchanged (a note says which);
* ``int8``: never pack;
* ``int4``: pack (where some weight has 4 bits or fewer); a model below opset 21 is first converted to opset 21 by
  ``onnx.version_converter`` (recorded in :attr:`PackResult.opset_before` / ``opset_after`` and in
  the plan's ``weight_storage``, so ``--plan`` re-emission makes the same bytes).

Declined, with a reason (:class:`Skip`): weights stored as uint8 + 128 (``weight_container``
uint8: their codes are not int4 values), codes outside ``[-8, 7]`` (more than 4 bits), non-zero
zero points, codes shared with a non-DQ consumer. Running the pass twice is a no-op (the codes of
a packed weight reach the DQ through the Cast, not as a constant). A weight too small to gain
(``n - ceil(n / 2)`` bytes saved, no more than the Cast node and its names cost) is left int8.
"""

from __future__ import annotations

import dataclasses
import logging

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..plan import WeightStorage
from ..errors import UnsupportedModelError
from ..graph.io import opset_of

log = logging.getLogger(__name__)

#: the first default-domain opset whose Cast / DequantizeLinear accept INT4
INT4_OPSET = 21
INT4_MIN, INT4_MAX = -8, 7
#: the first IR version that defines the INT4 element type
INT4_IR_VERSION = 10


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    dequantize: str  # the weight DequantizeLinear node
    codes: str  # the int4 initializer's name
    shape: tuple[int, ...]
    bytes_int8: int  # raw bytes of the int8 codes
    bytes_int4: int  # raw bytes of the packed codes (ceil(n / 2))


@dataclasses.dataclass(frozen=True)
class Skip:
    dequantize: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PackResult:
    model: onnx.ModelProto
    requested: WeightStorage
    storage: WeightStorage  # what was used: INT8 (today's form) or INT4
    opset_before: int
    opset_after: int
    packed: tuple[PackedWeight, ...] = ()
    skipped: tuple[Skip, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def saved_bytes(self) -> int:
        return sum(p.bytes_int8 - p.bytes_int4 for p in self.packed)

    @property
    def upgraded(self) -> bool:
        return self.opset_after != self.opset_before

    def summary(self) -> str:
        """One line for the quantize summary: which form was used, and why."""
        if self.storage is WeightStorage.INT4:
            up = f", opset {self.opset_before} -> {self.opset_after} (--weight-storage int4)" if self.upgraded else ""
            return (f"weight storage: int4 ({len(self.packed)} weights packed, {self.saved_bytes / 1e6:.3f} MB saved"
                    f"{up}; {len(self.skipped)} left int8)")
        return f"weight storage: int8 ({'; '.join(self.notes) or 'as requested'})"


def resolve_storage(requested: WeightStorage | str, opset: int, packable: bool = True) -> WeightStorage:
    """``auto`` -> INT4 at opset >= 21, else INT8; ``int8`` / ``int4`` as given, except that
    nothing to pack (``packable`` False: no weight of 4 bits or fewer) is always INT8, so a
    W8 model is never converted to opset 21 for nothing."""
    requested = WeightStorage(requested)
    if not packable:
        return WeightStorage.INT8
    if requested is WeightStorage.AUTO:
        return WeightStorage.INT4 if opset >= INT4_OPSET else WeightStorage.INT8
    return requested


def int8_reason(requested: WeightStorage | str, opset: int, packable: bool) -> str:
    """Why :func:`resolve_storage` chose int8, for the summary."""
    if WeightStorage(requested) is WeightStorage.INT8:
        return "as requested: one code a byte"
    if not packable:
        return "no weight of 4 bits or fewer to pack"
    return f"the model is at opset {opset} < {INT4_OPSET}; --weight-storage int4 converts it to {INT4_OPSET} and packs"


def upgrade_opset(model: onnx.ModelProto, target: int = INT4_OPSET) -> onnx.ModelProto:
    """The model with its default domain converted to ``target`` by ``onnx.version_converter``
    (a new proto; the ONNX checker must accept the result)."""
    try:
        out = onnx.version_converter.convert_version(model, target)
        # the converter runs shape inference and writes what it inferred into value_info; keep the
        # model's own annotations instead (ORT infers shapes itself), so the file does not grow
        have = {vi.name for vi in out.graph.value_info}
        kept = [vi for vi in model.graph.value_info if vi.name in have]
        del out.graph.value_info[:]
        out.graph.value_info.extend(kept)
        onnx.checker.check_model(out)
    except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError / ValidationError / others
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(
            f"cannot convert the quantized model from opset {opset_of(model)} to {target} for int4 weights "
            f"({first}); use --weight-storage int8, or export the model at opset {target}"
        ) from None
    return out


def _int4_constant(name: str, codes: np.ndarray) -> gs.Constant:
    proto = numpy_helper.from_array(codes.astype(ml_dtypes.int4), name)  # packed raw_data
    return gs.Constant(name, gs.ir.tensor.LazyValues(proto))


def _cast_overhead(name: str) -> int:
    """Bytes the Cast adds to the file: its node (name, op, attribute, two tensor references) and the
    new tensor name twice (Cast output, DQ input); a weight is packed only where it saves more."""
    return 3 * len(name) + 48


def _unique(graph: gs.Graph, base: str) -> str:
    taken = set(graph.tensors().keys())
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def pack_int4(model: onnx.ModelProto, storage: WeightStorage | str = WeightStorage.INT4) -> PackResult:
    """Pack the int8 weight codes that fit INT4 (see the module docstring)."""
    requested = WeightStorage(storage)
    before = opset_of(model)
    use = resolve_storage(requested, before)
    if use is WeightStorage.INT8:
        note = int8_reason(requested, before, True)
        same = onnx.ModelProto()
        same.CopyFrom(model)
        return PackResult(same, requested, use, before, before, notes=(note,))

    work = upgrade_opset(model) if before < INT4_OPSET else model
    graph = gs.import_onnx(work)
    # analyse: every DequantizeLinear whose codes are a constant
    matches: list[tuple[gs.Node, gs.Constant]] = []
    skipped: list[Skip] = []
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or not isinstance(node.inputs[0], gs.Constant):
            continue
        q = node.inputs[0]
        codes = np.asarray(q.values)
        zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        zvals = np.asarray(zp.values) if isinstance(zp, gs.Constant) else None
        if codes.dtype != np.int8:
            skipped.append(Skip(node.name, f"codes stored as {codes.dtype} (weight_container), not int8"))
        elif codes.size and (int(codes.min()) < INT4_MIN or int(codes.max()) > INT4_MAX):
            skipped.append(Skip(node.name, f"codes span [{int(codes.min())}, {int(codes.max())}]: more than 4 bits"))
        elif zp is not None and (zvals is None or np.any(zvals != 0)):
            skipped.append(Skip(node.name, "non-zero zero point"))
        elif any(c.op != "DequantizeLinear" for c in q.outputs):
            skipped.append(Skip(node.name, f"codes {q.name} are also read by a non-DequantizeLinear node"))
        elif codes.size - (codes.size + 1) // 2 <= _cast_overhead(q.name):
            skipped.append(Skip(node.name, f"{codes.size} codes: packing saves fewer bytes than the Cast node costs"))
        else:
            matches.append((node, q))
    # mutate: one int4 initializer + Cast per codes tensor (shared codes stay shared)
    casts: dict[str, gs.Variable] = {}
    zero_points_dropped = 0
    packed: list[PackedWeight] = []
    new_nodes: list[gs.Node] = []
    for node, q in matches:
        if q.name not in casts:
            codes = np.asarray(q.values)
            # the int4 initializer takes the int8 one's name (no node reads that one any more)
            c4 = _int4_constant(q.name, codes)
            out = gs.Variable(_unique(graph, f"{q.name}_i8"))  # no dtype / shape: no value_info entry
            new_nodes.append(gs.Node("Cast", _unique(graph, f"{q.name}_cast"), attrs={"to": onnx.TensorProto.INT8},
                                     inputs=[c4], outputs=[out]))
            casts[q.name] = out
            packed.append(PackedWeight(node.name, c4.name, tuple(int(d) for d in codes.shape), int(codes.size),
                                       (int(codes.size) + 1) // 2))
        node.inputs[0] = casts[q.name]
        # an all-zero int8 zero point is the default: drop it where only MatMuls read the weight
        # (ORT still fuses MatMulIntegerToFloat; its QGemm fusion needs the zero point, so a Gemm keeps it)
        if len(node.inputs) > 2 and all(c.op == "MatMul" for c in node.outputs[0].outputs):
            node.inputs = node.inputs[:2]
            zero_points_dropped += 1
    graph.nodes.extend(new_nodes)
    graph.toposort()  # the int8 codes, now unread, are not exported
    exported = gs.export_onnx(graph, do_type_check=False)
    out = onnx.ModelProto()
    out.CopyFrom(work)
    out.graph.CopyFrom(exported.graph)
    if packed and out.ir_version < INT4_IR_VERSION:
        out.ir_version = INT4_IR_VERSION
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:  # a bug in this pass, not the user's fault
        raise RuntimeError(f"pack_int4 produced an invalid model: {str(e).splitlines()[0]}") from e
    notes = []
    if zero_points_dropped:
        notes.append(f"{zero_points_dropped} all-zero weight zero points dropped (the DequantizeLinear default)")
    if before < INT4_OPSET:
        notes.append(f"converted from opset {before} to {INT4_OPSET} (onnx.version_converter) for int4 weights")
    log.info("int4 weights: %d packed (%.3f MB saved), %d left int8", len(packed),
             sum(p.bytes_int8 - p.bytes_int4 for p in packed) / 1e6, len(skipped))
    return PackResult(out, requested, WeightStorage.INT4, before, opset_of(out), tuple(packed), tuple(skipped), tuple(notes))
