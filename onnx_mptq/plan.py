"""Plans: every decision that reaches the emitted model, as editable, versioned JSON.

A :class:`SmoothingPlan` holds the SQ-b shift and scale of every smoothed LayerNorm; a
:class:`QuantPlan` holds, for every quantizable unit, its weight and activation bits, steps, zero
points and (for OPT-m) twin-region ratios, the achieved average bits, and how the quantizers are
written as ONNX (:class:`Emission`). Both are bound to the model they were made for by graph
digests: ``source_digest`` is the user's FP32 model, ``model_digest`` the (smoothed) float graph
the quantizers apply to. Emission from a plan needs no calibration data and no other input: the
same plan gives the same model, byte for byte.

The records are the one conversion to quantizer parameters: :meth:`ActQuant.params` gives the
:class:`~onnx_mptq.numerics.quant.UniformParams` or :class:`~onnx_mptq.numerics.twin.TwinParams`
a record describes and :meth:`ActQuant.from_params` the record of given parameters;
:meth:`WeightQuant.params` the per-channel weight quantizer along an axis.

Honesty of a plan (schema version 2). Every field is read by emission; a field that emission
would ignore, or that contradicts another, is a :class:`PlanError` naming the layer and the field:

* a uniform quantizer is ``(bits, symmetric, scale, zero_point)``; its clip range is derived
  (``[(qmin - z) s, (qmax - z) s]``, :func:`onnx_mptq.numerics.quant.dequantized_bounds`), so
  version 2 does not store it;
* a twin-region quantizer is ``(bits, twin_kind, delta1, m, split)``; ``scale``, ``zero_point``
  and ``symmetric`` belong to uniform quantizers and must be left out (null / 0 / false);
* ``step_bits`` is the number of bits a quantizer's steps were chosen for (written equal to
  ``bits``; absent means equal). A plan whose ``bits`` were edited without new steps has
  ``bits != step_bits``: :func:`rederive_steps` (run by emission, which reports it) keeps the
  range the old steps covered and derives the steps for the new bits
  (``s' = s qmax(step_bits) / qmax(bits)``; asymmetric activations re-fit their zero point over
  the same ``[lo, hi]``); a twin quantizer is refused (search again), because its ratio and split
  depend on the bits. Whoever sets new steps by hand sets ``step_bits`` to the new bits as well.
  Emission also refuses a weight whose grid clips most of it (more than half the entries beyond
  ``qmax + 1/2`` steps: steps made for other bits; searched steps clip a few per cent at most).

Version 1 documents (clip bounds stored, a twin's ``scale`` = delta1, no emission section) are
upgraded on read: their clip bounds and twin fields must agree with what they duplicate, the
emission section gets the defaults (what version 1 emission used without options).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PlanError
from .numerics.quant import UniformParams, dequantized_bounds, fake_quant, params_from_range, qrange, quantize
from .numerics.twin import TwinParams, twin_fake_quant
from .records import Record, _from_plain


class Scheme(str, enum.Enum):
    UNIFORM = "uniform"
    TWIN = "twin"  # OPT-m twin-region quantizer


class TwinKind(str, enum.Enum):
    GELU = "gelu"
    SOFTMAX = "softmax"


class FoldMode(str, enum.Enum):
    FOLDED = "folded"  # folded into the LayerNorm and the Linears: no extra node
    EXPLICIT = "explicit"  # explicit (x - mu) / s ops on the Linear branch only
    SKIPPED = "skipped"


# ---------------------------------------------------------------------------------------------
# emission choices (how a quantizer is written as ONNX; passes/emit_qdq.py explains each)


class SymmetricContainer(str, enum.Enum):
    """Storage of symmetric activation codes."""

    UINT8 = "uint8"  # codes + 128 in uint8 (zero point 128): fuses everywhere in ORT CPU
    INT8 = "int8"  # int8, zero point 0


class TwinForm(str, enum.Enum):
    """How a twin-region operand reaches its consuming matmul."""

    AUTO = "auto"  # LATTICE where the operand's codes fit one uint8 container, else SPLIT
    SPLIT = "split"  # two integer matmuls (one per region), summed
    LATTICE = "lattice"  # one integer matmul on the delta1 lattice (AUTO's first choice)


class WeightContainer(str, enum.Enum):
    """Storage of weight codes (passes/emit_qdq.py, "Weights on CPUs without VNNI")."""

    AUTO = "auto"  # int8 where every code is within +-64, else uint8 + 128: exact on every CPU
    INT8 = "int8"  # int8, zero point 0 (U8S8): fastest on VNNI / ARM; saturates on AVX2 without VNNI
    UINT8 = "uint8"  # codes + 128 in uint8, zero point 128 (U8U8 kernels), for every weight


class WeightStorage(str, enum.Enum):
    """How weight codes are stored in the emitted file (passes/pack_int4.py)."""

    AUTO = "auto"  # int4 where the model's opset is >= 21 already, else int8 (no opset change)
    INT8 = "int8"  # one code a byte (today's form, every opset >= 13)
    INT4 = "int4"  # codes of 4 bits or fewer packed two a byte; converts the model to opset 21 if older


class GraphForm(str, enum.Enum):
    """Names and annotations of what emission adds (passes/emit_qdq.py, "Graph form")."""

    COMPACT = "compact"  # short names, shared scalar / zero-point constants, no value_info for added tensors
    VERBOSE = "verbose"  # names spelled out from the quantized tensor, one constant per use, typed value_info


class ConstantStorage(str, enum.Enum):
    """Storage of the non-weight float constants (biases, embeddings, LayerNorm, smoothing vectors;
    passes/constants.py). FLOAT16 rounds them to float16 values before calibration (the plan is
    made for the rounded graph) and stores them as float16 + Cast, exactly."""

    FLOAT32 = "float32"  # the model's own values, float32
    FLOAT16 = "float16"  # rounded to float16 values before calibration, stored float16 + Cast(to=float)


class RangeForm(str, enum.Enum):
    """How codes are held to a b-bit range narrower than the 8-bit container."""

    INTEGER = "integer"  # Q -> Clip(int codes) -> DQ
    FLOAT = "float"  # Clip(x, dequantized bounds) -> Q -> DQ


def _enum(cls: type[enum.Enum], value: Any, field: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in cls)
        raise PlanError(f"emission.{field}: {value!r} is not one of {allowed}") from None


@dataclasses.dataclass(frozen=True)
class Emission:
    """How the plan's quantizers are written as ONNX (each choice: :mod:`onnx_mptq.passes.emit_qdq`)."""

    symmetric_container: SymmetricContainer = SymmetricContainer.UINT8
    range_form: RangeForm = RangeForm.INTEGER
    twin_form: TwinForm = TwinForm.AUTO
    weight_container: WeightContainer = WeightContainer.AUTO
    # file storage of the codes (passes/pack_int4.py, applied after emission); AUTO is resolved to
    # INT8 or INT4 (with the opset-21 conversion it needs) before emission, and recorded
    weight_storage: WeightStorage = WeightStorage.AUTO
    # names and annotations of the added nodes / tensors; the quantized values are the same in both
    graph_form: GraphForm = GraphForm.COMPACT
    # the non-weight float constants: float16 = rounded before calibration (model_digest is the
    # rounded graph's), stored float16 + Cast; a plan without the field was made with float32
    constant_storage: ConstantStorage = ConstantStorage.FLOAT32

    def __post_init__(self) -> None:
        for f, cls in (("symmetric_container", SymmetricContainer), ("range_form", RangeForm),
                       ("twin_form", TwinForm), ("weight_container", WeightContainer),
                       ("weight_storage", WeightStorage), ("graph_form", GraphForm),
                       ("constant_storage", ConstantStorage)):
            object.__setattr__(self, f, _enum(cls, getattr(self, f), f))


# ---------------------------------------------------------------------------------------------
# quantizer records


def _top(bits: int, symmetric: bool) -> int:
    return qrange(bits, symmetric)[1]


def _check_bits(record: Any, where: str) -> None:
    """``bits`` and ``step_bits`` (None: ``bits``) of a quantizer record are integers 2..8."""
    if record.step_bits is None:
        object.__setattr__(record, "step_bits", record.bits)
    for field in ("bits", "step_bits"):
        v = getattr(record, field)
        if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
            raise PlanError(f"{where}{field} must be 2..8, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """Quantizer of one activation operand of a unit (the tensor feeding it).

    uniform: ``q = clamp(rint(x / scale) + zero_point, qrange(bits, symmetric))``;
    twin (OPT-m): k = ``bits`` bits, k-1 per region, ``delta2 = 2^m delta1``
    (:mod:`onnx_mptq.numerics.twin`). ``step_bits``: the bits the steps were chosen for (module
    docstring)."""

    tensor: str
    bits: int
    scheme: Scheme = Scheme.UNIFORM
    symmetric: bool = False  # uniform only
    scale: float | None = None  # uniform step
    zero_point: int = 0  # uniform only
    step_bits: int | None = None  # None: bits
    twin_kind: TwinKind | None = None
    delta1: float | None = None
    m: int | None = None
    split: float | None = None

    def __post_init__(self) -> None:
        where = f"activation {self.tensor}"
        _check_bits(self, f"{where}: ")
        object.__setattr__(self, "scheme", Scheme(self.scheme))
        if self.scheme is Scheme.UNIFORM:
            if self.scale is None or not self.scale > 0:
                raise PlanError(f"{where}: scale must be > 0, got {self.scale}")
            unused = [f for f in ("twin_kind", "delta1", "m", "split") if getattr(self, f) is not None]
            if unused:
                raise PlanError(f"{where}: field {unused[0]} is not used by a uniform quantizer; remove it")
        else:
            if self.twin_kind is None or self.delta1 is None or self.m is None or not self.delta1 > 0:
                raise PlanError(f"{where}: a twin quantizer needs twin_kind, delta1 > 0 and m")
            object.__setattr__(self, "twin_kind", TwinKind(self.twin_kind))
            for f, neutral in (("scale", None), ("zero_point", 0), ("symmetric", False)):
                if getattr(self, f) != neutral:
                    raise PlanError(f"{where}: field {f} is not used by a twin quantizer (its steps are delta1 "
                                    f"and 2^m delta1); remove it")
        if self.step_bits == self.bits:
            self.params()  # consistent, or PlanError naming the tensor

    def params(self) -> UniformParams | TwinParams:
        """The quantizer this record describes (PlanError naming the tensor when inconsistent)."""
        try:
            if self.scheme is Scheme.TWIN:
                return TwinParams(self.twin_kind.value, self.bits, float(self.delta1), int(self.m),  # type: ignore[union-attr,arg-type]
                                  self.split)
            return UniformParams(np.float32(self.scale), np.int32(self.zero_point), self.bits, self.symmetric)
        except (TypeError, ValueError) as e:
            raise PlanError(f"activation {self.tensor}: {e}") from None

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        """float32 ``Q(x)`` with this quantizer."""
        p = self.params()
        return twin_fake_quant(x, p) if isinstance(p, TwinParams) else fake_quant(x, p)

    @classmethod
    def from_params(cls, tensor: str, p: UniformParams | TwinParams) -> "ActQuant":
        """The record of per-tensor parameters ``p`` quantizing ``tensor``."""
        if isinstance(p, TwinParams):
            return cls(tensor=tensor, bits=p.bits, scheme=Scheme.TWIN, twin_kind=TwinKind(p.kind), delta1=p.delta1,
                       m=p.m, split=p.split)
        if p.per_channel:
            raise ValueError("an activation quantizer is per tensor")
        return cls(tensor=tensor, bits=p.bits, scheme=Scheme.UNIFORM, symmetric=p.symmetric, scale=float(p.scale),
                   zero_point=int(p.zero_point))


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """Symmetric per-output-channel weight quantizer: ``q = clamp(rint(W / scales[c]), +-qmax(bits))``
    along the unit's weight axis (:attr:`onnx_mptq.graph.analysis.Unit.weight_axis`)."""

    bits: int
    scales: tuple[float, ...]  # one per output channel (N of the effective (K, N) weight)
    step_bits: int | None = None  # the bits the scales were chosen for; None: bits

    def __post_init__(self) -> None:
        _check_bits(self, "weight ")
        if not self.scales or not all(s > 0 for s in self.scales):
            raise PlanError("weight scales must be a non-empty list of positive numbers")

    def params(self, axis: int) -> UniformParams:
        """The per-channel quantizer along ``axis`` of the weight as its node reads it."""
        scales = np.asarray(self.scales, dtype=np.float32)
        try:
            return UniformParams(scales, np.zeros(scales.shape, np.int32), self.bits, True, axis=axis)
        except ValueError as e:
            raise PlanError(f"weight: {e}") from None

    def _checked(self, w: np.ndarray, axis: int) -> tuple[np.ndarray, UniformParams]:
        w = np.asarray(w, dtype=np.float32)
        if len(self.scales) != w.shape[axis]:
            raise PlanError(f"{len(self.scales)} weight scales for {w.shape[axis]} output channels")
        return w, self.params(axis)

    def codes(self, w: np.ndarray, axis: int) -> np.ndarray:
        """int8 codes of ``w`` (channels along ``axis``), within ``qrange(bits, True)``."""
        w, p = self._checked(w, axis)
        return quantize(w, p).astype(np.int8)

    def fake_quant(self, w: np.ndarray, axis: int) -> np.ndarray:
        """float32 ``Qw(w)`` (channels along ``axis``)."""
        w, p = self._checked(w, axis)
        return fake_quant(w, p)

    def clipped_fraction(self, w: np.ndarray, axis: int) -> float:
        """The fraction of ``w``'s entries the grid clips: ``|w / s_c| > qmax + 1/2``."""
        w, p = self._checked(w, axis)
        shape = [1] * w.ndim
        shape[axis] = -1
        with np.errstate(over="ignore"):
            return float(np.mean(np.abs(w / p.scale.reshape(shape)) > np.float32(p.qmax + 0.5)))

    @classmethod
    def from_params(cls, p: UniformParams) -> "WeightQuant":
        if not p.symmetric or not p.per_channel:
            raise ValueError("a weight quantizer is symmetric per output channel")
        return cls(bits=p.bits, scales=tuple(float(s) for s in p.scale))


class CompensationPart(str, enum.Enum):
    """The closed-form error compensation steps (:mod:`onnx_mptq.numerics.compensate`)."""

    GPTQ = "gptq"  # GPTQ-style rounding with the input Gram matrix
    ACTIVATION = "activation"  # ridge solution on the quantized input, then GPTQ rounding
    BIAS = "bias"  # mean output error folded into the bias


@dataclasses.dataclass(frozen=True)
class Compensation:
    """What compensation did to one layer; its codes (and bias correction) are in the plan's
    :class:`CompensatedWeights` under the layer's unit name. ``parts``: the steps kept (each kept
    only where it lowered the layer's output error on the calibration rows); ``error_nearest`` /
    ``error``: ``||X W - Qa(X) W_hat||^2 / ||X W||^2`` before and after."""

    parts: tuple[CompensationPart, ...]
    bias: bool = False  # a bias correction is stored
    error_nearest: float = 0.0
    error: float = 0.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "parts", tuple(CompensationPart(p) for p in self.parts))
        except ValueError:
            allowed = ", ".join(p.value for p in CompensationPart)
            raise PlanError(f"compensation.parts: each must be one of {allowed}, got {list(self.parts)!r}") from None
        if (CompensationPart.BIAS in self.parts) != bool(self.bias):
            raise PlanError("compensation: bias must be true exactly when parts lists bias")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    unit: str  # node name in the (smoothed) graph
    role: str
    inputs: tuple[ActQuant, ...]  # one per quantized operand (2 for attention matmuls)
    weight: WeightQuant | None = None  # None for attention matmuls
    params: int = 0  # weight parameter count (for the weighted average)
    act_elems: int = 0  # activation elements per sample (for the weighted average)
    compensation: Compensation | None = None  # codes / bias from CompensatedWeights (module docstring)

    @property
    def w_bits(self) -> int | None:
        return self.weight.bits if self.weight is not None else None

    @property
    def a_bits(self) -> int:
        return max(q.bits for q in self.inputs)


@dataclasses.dataclass(frozen=True)
class SmoothedNorm:
    layernorm: str
    mode: FoldMode
    alpha: float
    shift: tuple[float, ...]  # mu (C,)
    scale: tuple[float, ...]  # eps (C,)
    consumers: tuple[str, ...]
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class SmoothingPlan(Record):
    KIND = "smoothing_plan"
    SCHEMA_VERSION = 1

    source_digest: str
    norms: tuple[SmoothedNorm, ...]


@dataclasses.dataclass(frozen=True)
class QuantPlan(Record):
    KIND = "quant_plan"
    SCHEMA_VERSION = 2

    source_digest: str  # the user's FP32 model
    model_digest: str  # the float graph (after smoothing) that the layers refer to
    layers: tuple[LayerPlan, ...]
    smoothing: SmoothingPlan | None = None
    input_quant: ActQuant | None = None  # the image entering the patch embedding (8 bits)
    emission: Emission = Emission()
    avg_weight_bits: float = 0.0
    avg_activation_bits: float = 0.0
    notes: tuple[str, ...] = ()
    weights_digest: str | None = None  # the CompensatedWeights the compensated layers read

    def __post_init__(self) -> None:
        compensated = [lp.unit for lp in self.layers if lp.compensation is not None]
        if compensated and not self.weights_digest:
            raise PlanError(f"layer {compensated[0]}: compensated, but the plan names no weights file "
                            f"(weights_digest); remove the compensation record or restore weights_digest")
        for lp in self.layers:
            if lp.compensation is not None and lp.weight is None:
                raise PlanError(f"layer {lp.unit}: compensation needs a weight quantizer")

    def layer(self, unit: str) -> LayerPlan:
        for lp in self.layers:
            if lp.unit == unit:
                return lp
        raise PlanError(f"plan has no layer {unit!r}")

    def check_source(self, digest: str, where: str) -> None:
        if digest != self.source_digest:
            raise PlanError(
                f"{where}: the plan was made for another model (plan digest {self.source_digest}, "
                f"model digest {digest})"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "QuantPlan":
        """Read a version 2 document, or upgrade a version 1 one (module docstring). Errors in a
        layer name the layer."""
        if isinstance(data, dict) and data.get("kind") == cls.KIND and data.get("schema_version") == 1:
            data = _upgrade_v1(data)
        if isinstance(data, dict) and data.get("kind") == cls.KIND:
            # a plan written before emission.graph_form existed was emitted in the verbose form
            em = data.get("emission")
            if em is None or (isinstance(em, dict) and "graph_form" not in em):
                data = {**data, "emission": {**(em or {}), "graph_form": GraphForm.VERBOSE.value}}
            # ... and before emission.constant_storage existed, with float32 constants
            em = data.get("emission")
            if isinstance(em, dict) and "constant_storage" not in em:
                data = {**data, "emission": {**em, "constant_storage": ConstantStorage.FLOAT32.value}}
        if isinstance(data, dict) and isinstance(data.get("layers"), list):
            for i, raw in enumerate(data["layers"]):
                name = raw.get("unit") if isinstance(raw, dict) else None
                try:
                    _parse(LayerPlan, raw, f"layers[{i}]")
                except PlanError as e:
                    raise PlanError(f"layer {name if name is not None else i}: {e}") from None
        return super().from_dict(data)


def _parse(cls: Any, raw: Any, where: str) -> Any:
    return _from_plain(cls, raw, where)


def average_bits(layers: tuple[LayerPlan, ...] | list[LayerPlan]) -> tuple[float, float]:
    """Parameter-weighted average weight bits and element-weighted average activation bits."""
    wp = sum(lp.params for lp in layers if lp.weight is not None)
    wb = sum(lp.params * lp.weight.bits for lp in layers if lp.weight is not None)
    ae = sum(lp.act_elems for lp in layers)
    ab = sum(lp.act_elems * lp.a_bits for lp in layers)
    return (wb / wp if wp else 0.0), (ab / ae if ae else 0.0)


# ---------------------------------------------------------------------------------------------
# edited bits: steps re-derived for the new bits


@dataclasses.dataclass(frozen=True)
class Rederived:
    """A plan with every quantizer's steps made for its bits, and one note per re-derived quantizer."""

    plan: QuantPlan
    notes: tuple[str, ...] = ()


def _rederive_act(aq: ActQuant, where: str, notes: list[str]) -> ActQuant:
    if aq.step_bits == aq.bits:
        return aq
    where = f"{where}: activation {aq.tensor}"
    if aq.scheme is Scheme.TWIN:
        raise PlanError(f"{where}: bits is {aq.bits} but the twin-region steps (delta1, m, split) were chosen for "
                        f"step_bits {aq.step_bits}; search the layer again for {aq.bits} bits, or set bits back")
    try:
        old = dataclasses.replace(aq, bits=aq.step_bits).params()  # the grid the step was chosen for
    except PlanError as e:
        raise PlanError(f"{where}: {e} (at step_bits {aq.step_bits})") from None
    assert isinstance(old, UniformParams)
    s = float(old.scale)
    lo, hi = (old.qmin - int(aq.zero_point)) * s, (old.qmax - int(aq.zero_point)) * s  # the old grid's range
    p = params_from_range(-hi, hi, aq.bits, True) if aq.symmetric else params_from_range(lo, hi, aq.bits, False)
    new = ActQuant.from_params(aq.tensor, p)
    notes.append(f"{where}: bits {aq.step_bits} -> {aq.bits} with its step left as it was: step re-derived for "
                 f"{aq.bits} bits over the same range [{lo:.6g}, {hi:.6g}] (scale {s:.6g} -> {new.scale:.6g})")
    return new


def _rederive_weight(wq: WeightQuant, where: str, notes: list[str]) -> WeightQuant:
    if wq.step_bits == wq.bits:
        return wq
    ratio = _top(int(wq.step_bits), True) / _top(wq.bits, True)  # type: ignore[arg-type]
    scales = tuple(float(np.float32(s * ratio)) for s in wq.scales)  # the same range qmax * s per channel
    notes.append(f"{where}: weight bits {wq.step_bits} -> {wq.bits} with its scales left as they were: scales "
                 f"re-derived for {wq.bits} bits over the same per-channel ranges (x {ratio:.6g})")
    return WeightQuant(bits=wq.bits, scales=scales)


def rederive_steps(plan: QuantPlan) -> Rederived:
    """``plan`` with the steps of every quantizer whose ``bits`` differ from its ``step_bits``
    re-derived for its bits over the range the old steps covered (module docstring); a twin
    quantizer so edited is a PlanError. Unchanged plans come back as they are (the same object)."""
    notes: list[str] = []
    layers = []
    for lp in plan.layers:
        inputs = tuple(_rederive_act(aq, f"layer {lp.unit}", notes) for aq in lp.inputs)
        weight = _rederive_weight(lp.weight, f"layer {lp.unit}", notes) if lp.weight is not None else None
        layers.append(lp if (inputs == lp.inputs and weight == lp.weight) else
                      dataclasses.replace(lp, inputs=inputs, weight=weight))
    input_quant = _rederive_act(plan.input_quant, "input_quant", notes) if plan.input_quant is not None else None
    if not notes:
        return Rederived(plan)
    return Rederived(dataclasses.replace(plan, layers=tuple(layers), input_quant=input_quant), tuple(notes))


# ---------------------------------------------------------------------------------------------
# compensated weights: the codes and bias corrections beside the plan


@dataclasses.dataclass(frozen=True, eq=False)
class CompensatedLayer:
    """One compensated layer's integer weight: ``codes`` int8 (K, N) in the effective layout
    (:meth:`onnx_mptq.graph.analysis.Unit.effective`), made for ``bits`` with the per-output-channel
    ``scales`` float32 (N,); ``bias``: float32 (N,) added to the layer's bias, or None."""

    codes: np.ndarray
    scales: np.ndarray
    bits: int
    bias: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class CompensatedWeights:
    """The arrays of every compensated layer, by unit name; :meth:`digest` binds them to a plan
    (``QuantPlan.weights_digest``)."""

    layers: dict[str, CompensatedLayer]

    def digest(self) -> str:
        """sha256 (16 hex digits) over every unit name, bits, shape and array byte, in name order."""
        h = hashlib.sha256()
        for name in sorted(self.layers):
            cl = self.layers[name]
            h.update(name.encode() + b"\0" + str((cl.bits, cl.codes.shape)).encode())
            for a in (cl.codes.astype(np.int8), cl.scales.astype(np.float32)):
                h.update(np.ascontiguousarray(a).tobytes())
            h.update(b"bias" + (np.ascontiguousarray(cl.bias, np.float32).tobytes() if cl.bias is not None else b""))
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (atomically: a temporary file renamed over ``path``)."""
        arrays: dict[str, np.ndarray] = {"names": np.array(sorted(self.layers), dtype=np.str_)}
        for i, name in enumerate(sorted(self.layers)):
            cl = self.layers[name]
            arrays[f"codes_{i}"] = cl.codes.astype(np.int8)
            arrays[f"scales_{i}"] = cl.scales.astype(np.float32)
            arrays[f"bits_{i}"] = np.int32(cl.bits)
            if cl.bias is not None:
                arrays[f"bias_{i}"] = cl.bias.astype(np.float32)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompensatedWeights":
        """Read a file :meth:`save` wrote (PlanError naming the file otherwise)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                names = [str(n) for n in z["names"]]
                layers = {}
                for i, name in enumerate(names):
                    bias = z[f"bias_{i}"] if f"bias_{i}" in z.files else None
                    layers[name] = CompensatedLayer(z[f"codes_{i}"].astype(np.int8), z[f"scales_{i}"].astype(np.float32),
                                                    int(z[f"bits_{i}"]), bias)
        except FileNotFoundError:
            raise PlanError(f"{path}: no such weights file (the compensated codes of the plan)") from None
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise PlanError(f"{path}: not a compensated-weights file ({e})") from None
        return cls(layers)


def weights_path(plan_path: str | os.PathLike) -> Path:
    """Where the compensated weights of the plan at ``plan_path`` live: ``NAME.weights.npz`` beside
    ``NAME.json``."""
    p = Path(plan_path)
    return p.with_name((p.name[:-5] if p.name.endswith(".json") else p.name) + ".weights.npz")


@dataclasses.dataclass(frozen=True)
class LayerWeight:
    """What emission writes for one layer's weight: stored ``codes`` (None: nearest rounding of
    the float weight) and a bias correction (None: none), with a note when a stored
    compensation was set aside."""

    codes: np.ndarray | None = None
    bias: np.ndarray | None = None
    note: str | None = None


def check_weights(plan: QuantPlan, weights: CompensatedWeights | None) -> None:
    """PlanError unless ``weights`` are the ones the plan's compensated layers were made with."""
    compensated = [lp.unit for lp in plan.layers if lp.compensation is not None]
    if not compensated:
        return
    if weights is None:
        raise PlanError(f"layer {compensated[0]} is compensated: its codes are in the plan's weights file "
                        f"(PLAN.weights.npz beside PLAN.json), which was not given")
    digest = weights.digest()
    if digest != plan.weights_digest:
        raise PlanError(f"the weights file is not the one this plan was made with (its digest {digest}, the plan's "
                        f"weights_digest {plan.weights_digest})")
    missing = [u for u in compensated if u not in weights.layers]
    if missing:
        raise PlanError(f"layer {missing[0]}: compensated, but the weights file has no codes for it")


def layer_weight(lp: LayerPlan, weights: CompensatedWeights | None) -> LayerWeight:
    """The stored codes and bias of a compensated layer whose weight quantizer still is the one
    they were made for; else nearest rounding with a note (after :func:`check_weights`)."""
    if lp.compensation is None or lp.weight is None or weights is None:
        return LayerWeight()
    cl = weights.layers[lp.unit]
    same_scales = (len(lp.weight.scales) == cl.scales.size and
                   np.array_equal(np.asarray(lp.weight.scales, np.float32), cl.scales))
    if lp.weight.bits != cl.bits or not same_scales:
        what = f"bits {cl.bits} -> {lp.weight.bits}" if lp.weight.bits != cl.bits else "scales"
        return LayerWeight(note=f"layer {lp.unit}: weight {what} edited after compensation: codes re-derived by nearest "
                                f"rounding; the stored compensated codes{' and bias correction' if cl.bias is not None else ''} "
                                f"are not used")
    return LayerWeight(cl.codes, cl.bias)


# ---------------------------------------------------------------------------------------------
# schema version 1


def _close(a: float, b: float) -> bool:
    return bool(np.isclose(np.float32(a), np.float32(b), rtol=1e-6, atol=0.0))


def _upgrade_act(aq: Any, where: str) -> None:
    """A version 1 activation record, in place: clip bounds (and a twin's uniform fields) checked
    against what they duplicate, then dropped."""
    if not isinstance(aq, dict):
        return
    layer, where = where, f"{where}: activation {aq.get('tensor')}"
    clip = (aq.pop("clip_min", None), aq.pop("clip_max", None))
    try:
        if aq.get("scheme", "uniform") == Scheme.TWIN.value:
            scale, zp, sym = aq.pop("scale", None), aq.pop("zero_point", 0), aq.pop("symmetric", None)
            p = TwinParams(aq.get("twin_kind"), aq["bits"], aq["delta1"], aq["m"], aq.get("split"))
            if scale is not None and not _close(scale, p.delta1):
                raise PlanError(f"{where}: field scale {scale!r} is not the twin quantizer's delta1 {p.delta1!r} "
                                f"(a twin quantizer has no other step); fix it or remove it")
            if zp not in (0, None):
                raise PlanError(f"{where}: field zero_point {zp!r}: a twin quantizer has none; remove it")
            if sym not in (None, p.kind == "gelu"):
                raise PlanError(f"{where}: field symmetric {sym!r} contradicts twin_kind {p.kind}; remove it")
            n = p.levels
            bounds = ((-n * p.delta1 if p.kind == "gelu" else 0.0), n * p.delta2)
        else:
            up = ActQuant(tensor=str(aq.get("tensor")), bits=aq["bits"], symmetric=bool(aq.get("symmetric", False)),
                          scale=aq.get("scale", 1.0), zero_point=aq.get("zero_point", 0)).params()
            lo, hi = dequantized_bounds(up)  # type: ignore[arg-type]
            bounds = (float(lo), float(hi))
    except PlanError as e:  # from the record: names the tensor
        raise PlanError(f"{layer}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{where}: {e}") from None
    if clip == (0.0, 0.0) or clip == (None, None):  # never set (the version 1 defaults)
        return
    for field, got, want in zip(("clip_min", "clip_max"), clip, bounds):
        if got is None or not _close(got, want):
            raise PlanError(f"{where}: field {field} {got!r} does not match bits, scale and zero point (their grid "
                            f"ends at {want:.9g}); fix it or remove the clip bounds")


def _upgrade_v1(data: dict) -> dict:
    """A version 1 quant_plan document as version 2 (module docstring)."""
    d = copy.deepcopy(data)
    d["schema_version"] = QuantPlan.SCHEMA_VERSION
    for i, lp in enumerate(d.get("layers") or []):
        if isinstance(lp, dict):
            for aq in lp.get("inputs") or []:
                _upgrade_act(aq, f"layer {lp.get('unit', i)}")
    _upgrade_act(d.get("input_quant"), "input_quant")
    return d
