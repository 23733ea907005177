"""The one configuration tree.

::

    Config
      runtime   providers, threads, batch_size             ONNX Runtime sessions
      calib     limit, batch_size                          reading the calibration data
      capture   tokens_per_layer                           layer inputs kept for the scale search
      smooth    enabled, alpha, shift, alpha_search, alpha_grid, fallback          SQ-b
      quant     w_bits, a_bits, input_bits, act_symmetric
        search    method, percentile, grid_size, grid_low, grid_high             step search
        optm      enabled, max_m, max_bits, lattice, select, subset, z           OPT-m
        emission  weight_container, weight_storage, graph_form, constant_storage the QDQ model
      mixed     enabled, target_bits, target_size_mb, candidates, keep (Pin), subset, metric
      seed

Frozen dataclasses validated on construction; messages name the dotted path of the bad value
(``smooth.alpha must be in [0, 1], got 1.5``). The CLI maps its flags onto this tree
(``onnx_mptq.cli``), and ``Config.from_dict`` reads the same tree from JSON, refusing unknown keys.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import math
import typing
from typing import Any

from .errors import ConfigError, quote
from .plan import Emission


class Providers(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class ShiftMode(str, enum.Enum):
    MEAN = "mean"
    MIDPOINT = "midpoint"


class FoldFallback(str, enum.Enum):
    """What SQ-b does where folding into the LayerNorm is not exact."""

    EXPLICIT = "explicit"  # insert shift/scale ops on the Linear branch only
    SKIP = "skip"


class OptmSelect(str, enum.Enum):
    """How OPT-m decides between an operand's uniform and twin-region quantizer."""

    NETWORK = "network"  # on the whole network's logits, kept only beyond the subset's noise (default)
    LAYER = "layer"  # where the twin lowers that layer's output error


class SensitivityMetric(str, enum.Enum):
    """Distance of the quantized network's logits from the reference's (search/mixed.py)."""

    NMSE = "nmse"  # logit noise / signal
    KL = "kl"  # mean KL divergence of the softmaxes


class ScaleMethod(str, enum.Enum):
    """How a quantizer's step is chosen."""

    OUTPUT_MSE = "mse"  # grid search minimising the consuming layer's output error
    MINMAX = "minmax"
    PERCENTILE = "percentile"


def _check(cond: bool, path: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{path} {msg}, got {quote(value)}")


def _sections(obj: Any, prefix: str) -> None:
    """Sub-sections must be their section type (``quant.optm`` is an OptmConfig, not a bool)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(tp) and not isinstance(v, tp):
            fields = ", ".join(g.name for g in dataclasses.fields(tp))
            raise ConfigError(f"{prefix}{f.name} must be a {tp.__name__} ({prefix}{f.name}.{{{fields}}}), got {quote(v)}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _enum(obj: Any, name: str, cls: type[enum.Enum], path: str) -> None:
    """Accept the enum's value (a string) for an enum field, and store the member."""
    v = getattr(obj, name)
    if isinstance(v, cls):
        return
    try:
        object.__setattr__(obj, name, cls(v))
    except ValueError:
        raise ConfigError(f"{path} must be one of {', '.join(m.value for m in cls)}, got {quote(v)}") from None


def _bits_ok(b: Any) -> bool:
    return _int(b) and 2 <= b <= 8


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    providers: Providers = Providers.AUTO
    threads: int = 0  # 0 = ONNX Runtime's default
    batch_size: int = 32

    def __post_init__(self) -> None:
        _enum(self, "providers", Providers, "runtime.providers")
        _check(isinstance(self.threads, int) and self.threads >= 0, "runtime.threads", "must be an integer >= 0", self.threads)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "runtime.batch_size", "must be an integer >= 1", self.batch_size)


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """The calibration data: how much of it is read, in batches of what size."""

    limit: int | None = None  # use at most this many calibration samples
    batch_size: int = 16

    def __post_init__(self) -> None:
        _check(self.limit is None or (_int(self.limit) and self.limit >= 1), "calib.limit", "must be an integer >= 1", self.limit)
        _check(_int(self.batch_size) and self.batch_size >= 1, "calib.batch_size", "must be an integer >= 1", self.batch_size)


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """What the capture stage keeps of every layer input for the scale search (calibrate/capture.py)."""

    tokens_per_layer: int = 4096  # token rows of each layer input

    def __post_init__(self) -> None:
        _check(_int(self.tokens_per_layer) and self.tokens_per_layer >= 16, "capture.tokens_per_layer", "must be an integer >= 16", self.tokens_per_layer)


@dataclasses.dataclass(frozen=True)
class SmoothConfig:
    enabled: bool = True
    alpha: float = 0.5
    shift: ShiftMode = ShiftMode.MEAN
    alpha_search: bool = False
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    fallback: FoldFallback = FoldFallback.EXPLICIT

    def __post_init__(self) -> None:
        _enum(self, "shift", ShiftMode, "smooth.shift")
        _enum(self, "fallback", FoldFallback, "smooth.fallback")
        _check(isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0, "smooth.alpha", "must be in [0, 1]", self.alpha)
        _check(len(self.alpha_grid) > 0 and all(0.0 <= a <= 1.0 for a in self.alpha_grid), "smooth.alpha_grid", "must be a non-empty list of values in [0, 1]", self.alpha_grid)


@dataclasses.dataclass(frozen=True)
class ScaleSearchConfig:
    """How every quantizer's step is chosen (search/scales.py)."""

    method: ScaleMethod = ScaleMethod.OUTPUT_MSE
    percentile: float = 99.99
    grid_size: int = 100  # candidate steps in [grid_low, grid_high] x max-based step
    grid_low: float = 0.01
    grid_high: float = 1.2

    def __post_init__(self) -> None:
        _enum(self, "method", ScaleMethod, "quant.search.method")
        _check(50.0 < self.percentile <= 100.0, "quant.search.percentile", "must be in (50, 100]", self.percentile)
        _check(_int(self.grid_size) and self.grid_size >= 2, "quant.search.grid_size", "must be an integer >= 2", self.grid_size)
        _check(0.0 < self.grid_low < self.grid_high, "quant.search.grid_low", "must be > 0 and below quant.search.grid_high", self.grid_low)


@dataclasses.dataclass(frozen=True)
class OptmConfig:
    """OPT-m twin-region quantizers (search/scales.py, search/optm.py)."""

    enabled: bool = True
    max_m: int = 12
    # OPT-m only where an operand has at most this many bits: at 8 bits a uniform grid is
    # nearly as accurate, and the twin form's extra elementwise nodes would cost int8 speed
    max_bits: int = 7
    # search only the ratios 2^m whose twin values fit one uint8 lattice at step delta1, so every
    # twin operand reaches its matmul as one integer tensor (passes/emit_qdq.py, "lattice form");
    # False also searches larger m (up to max_m), emitted as two integer matmuls
    lattice: bool = True
    # network-level choice of the twin quantizers (search/optm.py): calibration samples used,
    # and how many standard errors of the subset's noise a kept change must clear
    select: OptmSelect = OptmSelect.NETWORK
    subset: int | None = None  # None: sized by compute (search/mixed.py subset_size)
    z: float = 2.0

    def __post_init__(self) -> None:
        _enum(self, "select", OptmSelect, "quant.optm.select")
        _check(isinstance(self.enabled, bool), "quant.optm.enabled", "must be true or false", self.enabled)
        _check(_int(self.max_m) and 0 <= self.max_m <= 16, "quant.optm.max_m", "must be an integer from 0 to 16", self.max_m)
        _check(_bits_ok(self.max_bits), "quant.optm.max_bits", "must be an integer from 2 to 8", self.max_bits)
        _check(isinstance(self.lattice, bool), "quant.optm.lattice", "must be true or false", self.lattice)
        _check(self.subset is None or (_int(self.subset) and self.subset >= 2),
               "quant.optm.subset", "must be an integer >= 2 (or null: sized by compute)", self.subset)
        _check(isinstance(self.z, (int, float)) and math.isfinite(self.z) and self.z >= 0,
               "quant.optm.z", "must be a finite number >= 0", self.z)


@dataclasses.dataclass(frozen=True)
class EmissionConfig(Emission):
    """How the chosen quantizers are written into the QDQ model: the fields of the plan's
    :class:`~onnx_mptq.plan.Emission` record (which documents each; the defaults are what ORT
    fuses best), requested here and recorded there by the scale search. ``weight_storage``:
    auto = int4 (two codes a byte) for weights of <= 4 bits where the model is at opset >= 21,
    else int8; int4 = also convert an older model to opset 21 (stated and recorded); int8 = never
    pack (passes/pack_int4.py). ``graph_form``: compact (short names, shared constants, no
    value_info) or verbose names for what emission adds (passes/emit_qdq.py, "Graph form").
    ``constant_storage``: float16 = round the non-weight float constants to float16 values before
    calibration and store them float16 + Cast (passes/constants.py); float32 = the model's own."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(Emission)
        for f in dataclasses.fields(self):
            _enum(self, f.name, hints[f.name], f"quant.emission.{f.name}")

    def record(self) -> Emission:
        """The plan's record of these choices (what emission reads)."""
        return Emission(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


class CompensateInputs(str, enum.Enum):
    """The layer inputs ``X~`` whose quantization ``Qa(X~)`` error compensation fits on (search/compensate.py)."""

    FLOAT = "float"  # the float network's inputs to the layer, quantized by the layer's own quantizer
    NETWORK = "network"  # one capture of the whole quantized network (nearest rounding, nothing compensated)
    SEQUENTIAL = "sequential"  # layer input by layer input, from the network quantized and compensated upstream
    BLOCKS = "blocks"  # as sequential, one capture per transformer block (its own earlier layers left in float)


@dataclasses.dataclass(frozen=True)
class CompensateConfig:
    """Closed-form error compensation between the scale search and emission (search/compensate.py):
    each part is kept per layer only where it lowers the layer's output error on its calibration rows."""

    # off by default for now: BENCHMARKS.md "Error compensation (issue 15)" measures GPTQ and
    # activation compensation (float inputs) better in SQNR on both real models, but turning them
    # on changes what every caller of emit_from_plan must pass (the plan's CompensatedWeights)
    gptq: bool = False  # GPTQ-style rounding with H = X^T X + damp mean(diag) I
    activation: bool = False  # ridge W' on the quantized input (penalty ridge mean(diag Xq^T Xq)), GPTQ-rounded
    bias: bool = False  # fold the mean output error into the bias
    damp: float = 0.01  # GPTQ damping, relative to the mean diagonal of H
    ridge: float = 0.1  # ridge penalty, relative to the mean diagonal of Xq^T Xq
    # which inputs Xq the activation compensation and bias correction fit on (CompensateInputs)
    inputs: CompensateInputs = CompensateInputs.FLOAT
    samples: int = 64  # calibration samples the sequential captures run (the first ones)

    def __post_init__(self) -> None:
        _enum(self, "inputs", CompensateInputs, "quant.compensate.inputs")
        _check(_int(self.samples) and self.samples >= 1, "quant.compensate.samples", "must be an integer >= 1", self.samples)
        for f in ("gptq", "activation", "bias"):
            _check(isinstance(getattr(self, f), bool), f"quant.compensate.{f}", "must be true or false", getattr(self, f))
        for f in ("damp", "ridge"):
            v = getattr(self, f)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                   f"quant.compensate.{f}", "must be a finite number > 0", v)

    @property
    def any(self) -> bool:
        return self.gptq or self.activation or self.bias


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 8
    a_bits: int = 8
    input_bits: int = 8  # the image entering the patch embedding
    act_symmetric: bool = False
    search: ScaleSearchConfig = dataclasses.field(default_factory=ScaleSearchConfig)
    optm: OptmConfig = dataclasses.field(default_factory=OptmConfig)
    emission: EmissionConfig = dataclasses.field(default_factory=EmissionConfig)
    compensate: CompensateConfig = dataclasses.field(default_factory=CompensateConfig)

    def __post_init__(self) -> None:
        _sections(self, "quant.")
        for name in ("w_bits", "a_bits", "input_bits"):
            v = getattr(self, name)
            _check(_bits_ok(v), f"quant.{name}", "must be an integer from 2 to 8", v)
        _check(isinstance(self.act_symmetric, bool), "quant.act_symmetric", "must be true or false", self.act_symmetric)


@dataclasses.dataclass(frozen=True)
class Pin:
    """A mixed-precision pin: layers whose node name or role matches the glob ``pattern`` keep
    ``bits`` bits (weights and activations). Written ``BITS:GLOB`` (``8:*head*``) in JSON and on
    the command line; :meth:`parse` is the one parser."""

    bits: int
    pattern: str

    def __post_init__(self) -> None:
        _check(_bits_ok(self.bits) and isinstance(self.pattern, str) and bool(self.pattern), "mixed.keep",
               "entries must look like BITS:GLOB with BITS from 2 to 8", str(self))

    @classmethod
    def parse(cls, text: Any, path: str = "mixed.keep") -> "Pin":
        bits, sep, pattern = str(text).partition(":")
        _check(bool(sep) and bits.isdigit() and _bits_ok(int(bits)) and bool(pattern), path,
               "entries must look like BITS:GLOB with BITS from 2 to 8", text)
        return cls(int(bits), pattern)

    def matches(self, *names: str) -> bool:
        return any(fnmatch.fnmatchcase(n, self.pattern) for n in names)

    def __str__(self) -> str:
        return f"{self.bits}:{self.pattern}"


@dataclasses.dataclass(frozen=True)
class MixedConfig:
    enabled: bool = False
    target_bits: float | None = None
    target_size_mb: float | None = None
    candidates: tuple[int, ...] = (4, 5, 6, 8)
    keep: tuple[Pin, ...] = ()  # pins, e.g. Pin(8, "*head*") ("8:*head*"; strings are parsed)
    subset: int | None = None  # calibration samples measuring sensitivity (None: sized by compute)
    metric: SensitivityMetric = SensitivityMetric.NMSE  # (search/mixed.py)

    def __post_init__(self) -> None:
        _enum(self, "metric", SensitivityMetric, "mixed.metric")
        object.__setattr__(self, "keep", tuple(k if isinstance(k, Pin) else Pin.parse(k) for k in self.keep))
        _check(len(self.candidates) > 0 and all(_bits_ok(b) for b in self.candidates), "mixed.candidates", "must be integers from 2 to 8", self.candidates)
        _check(len(set(self.candidates)) == len(self.candidates), "mixed.candidates", "must not repeat", self.candidates)
        if self.target_bits is not None:
            _check(isinstance(self.target_bits, (int, float)) and 2.0 <= self.target_bits <= 8.0, "mixed.target_bits", "must be in [2, 8]", self.target_bits)
        if self.target_size_mb is not None:
            _check(isinstance(self.target_size_mb, (int, float)) and self.target_size_mb > 0, "mixed.target_size_mb", "must be > 0", self.target_size_mb)
        if self.enabled:
            _check(self.target_bits is not None or self.target_size_mb is not None, "mixed.target_bits", "(or mixed.target_size_mb) is required with mixed precision", None)
        _check(self.subset is None or (_int(self.subset) and self.subset >= 1),
               "mixed.subset", "must be an integer >= 1 (or null: sized by compute)", self.subset)


@dataclasses.dataclass(frozen=True)
class Config:
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    capture: CaptureConfig = dataclasses.field(default_factory=CaptureConfig)
    smooth: SmoothConfig = dataclasses.field(default_factory=SmoothConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    mixed: MixedConfig = dataclasses.field(default_factory=MixedConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _sections(self, "")
        _check(_int(self.seed) and self.seed >= 0, "seed", "must be an integer >= 0", self.seed)

    def to_dict(self) -> dict:
        def plain(v: Any) -> Any:
            if isinstance(v, Pin):
                return str(v)
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return v

        return plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        return _build(cls, data, "")

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)

    def with_value(self, path: str, value: Any) -> "Config":
        """A copy with the field at the dotted ``path`` (``quant.optm.enabled``) set to ``value``;
        every section on the way is rebuilt, so validation runs again."""
        return _with_value(self, path.split("."), value, "")


def leaf_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf field of the config tree as a dotted path, in declaration order."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and tp is not Pin:
            out.extend(leaf_paths(tp, f"{prefix}{f.name}."))
        else:
            out.append(prefix + f.name)
    return out


def _with_value(obj: Any, parts: list[str], value: Any, prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    if parts[0] not in names:
        raise ConfigError(f"unknown config key {prefix}{parts[0]} (known: {', '.join(sorted(names))})")
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    child = _with_value(getattr(obj, parts[0]), parts[1:], value, f"{prefix}{parts[0]}.")
    return dataclasses.replace(obj, **{parts[0]: child})


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.removesuffix('.') or 'config'} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(data):
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key!s} (known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        path = f"{prefix}{key}"
        if dataclasses.is_dataclass(tp) and tp is not Pin:
            kwargs[key] = _build(tp, value, path + ".")
            continue
        kwargs[key] = _coerce(tp, value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if tp is Pin:
        return value if isinstance(value, Pin) else Pin.parse(value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(m.value for m in tp)
            raise ConfigError(f"{path} must be one of {allowed}, got {quote(value)}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {quote(value)}")
        return tuple(_coerce(args[0], v, path) for v in value)
    if origin in (typing.Union, __import__("types").UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, path)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false, got {quote(value)}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path} must be an integer, got {quote(value)}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {quote(value)}")
        return float(value)
    return value
