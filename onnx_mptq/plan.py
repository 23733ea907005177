"""Plans: every decision that reaches the emitted model, as editable, versioned JSON.

A :class:`SmoothingPlan` holds the SQ-b shift and scale of every smoothed LayerNorm; a
:class:`QuantPlan` holds, for every quantizable unit, its weight and activation bits, steps, zero
points, clip ranges and (for OPT-m) twin-region ratios, plus the achieved average bits. Both are
bound to the model they were made for by graph digests: ``source_digest`` is the user's FP32
model, ``model_digest`` the (smoothed) float graph the quantizers apply to. Emission from a plan
needs no calibration data.
"""

from __future__ import annotations

import dataclasses
import enum

from .config import WeightStorage
from .errors import PlanError
from .records import Record


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


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """Quantizer of one activation operand of a unit (the tensor feeding it)."""

    tensor: str
    bits: int
    scheme: Scheme = Scheme.UNIFORM
    symmetric: bool = False
    scale: float = 1.0  # uniform step
    zero_point: int = 0
    clip_min: float = 0.0  # dequantized bounds of the b-bit grid
    clip_max: float = 0.0
    # twin-region (scheme == twin): k bits, k-1 per region, delta2 = 2^m * delta1
    twin_kind: TwinKind | None = None
    delta1: float | None = None
    m: int | None = None
    split: float | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise PlanError(f"activation {self.tensor}: bits must be 2..8, got {self.bits}")
        if self.scheme is Scheme.UNIFORM and not self.scale > 0:
            raise PlanError(f"activation {self.tensor}: scale must be > 0, got {self.scale}")
        if self.scheme is Scheme.TWIN and (self.delta1 is None or self.m is None or self.twin_kind is None or not self.delta1 > 0):
            raise PlanError(f"activation {self.tensor}: a twin quantizer needs twin_kind, delta1 > 0 and m")


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """Symmetric per-output-channel weight quantizer."""

    bits: int
    scales: tuple[float, ...]  # one per output channel (N of the effective (K, N) weight)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise PlanError(f"weight bits must be 2..8, got {self.bits}")
        if not self.scales or not all(s > 0 for s in self.scales):
            raise PlanError("weight scales must be a non-empty list of positive numbers")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    unit: str  # node name in the (smoothed) graph
    role: str
    inputs: tuple[ActQuant, ...]  # one per quantized operand (2 for attention matmuls)
    weight: WeightQuant | None = None  # None for attention matmuls
    params: int = 0  # weight parameter count (for the weighted average)
    act_elems: int = 0  # activation elements per sample (for the weighted average)

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
    SCHEMA_VERSION = 1

    source_digest: str  # the user's FP32 model
    model_digest: str  # the float graph (after smoothing) that the layers refer to
    layers: tuple[LayerPlan, ...]
    smoothing: SmoothingPlan | None = None
    input_quant: ActQuant | None = None  # the image entering the patch embedding (8 bits)
    avg_weight_bits: float = 0.0
    avg_activation_bits: float = 0.0
    notes: tuple[str, ...] = ()
    # how the emitted file stores weight codes, as resolved when the model was emitted (int8, or
    # int4 with the opset-21 conversion it needs: passes/pack_int4.py); None: not recorded (the
    # configuration's quant.weight_storage decides at re-emission)
    weight_storage: WeightStorage | None = None

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


def average_bits(layers: tuple[LayerPlan, ...] | list[LayerPlan]) -> tuple[float, float]:
    """Parameter-weighted average weight bits and element-weighted average activation bits."""
    wp = sum(lp.params for lp in layers if lp.weight is not None)
    wb = sum(lp.params * lp.weight.bits for lp in layers if lp.weight is not None)
    ae = sum(lp.act_elems for lp in layers)
    ab = sum(lp.act_elems * lp.a_bits for lp in layers)
    return (wb / wp if wp else 0.0), (ab / ae if ae else 0.0)
