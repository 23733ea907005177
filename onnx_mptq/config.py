"""The one configuration tree.

Frozen dataclasses validated on construction; messages name the dotted path of the bad value
(``smooth.alpha must be in [0, 1], got 1.5``). The CLI maps its flags onto this tree
(``onnx_mptq.cli``), and ``Config.from_dict`` reads the same tree from JSON, refusing unknown keys.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from typing import Any

from .errors import ConfigError


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


class ScaleMethod(str, enum.Enum):
    """How a quantizer's step is chosen."""

    OUTPUT_MSE = "mse"  # grid search minimising the consuming layer's output error
    MINMAX = "minmax"
    PERCENTILE = "percentile"


class WeightStorage(str, enum.Enum):
    """How weight codes are stored in the emitted file (passes/pack_int4.py)."""

    AUTO = "auto"  # int4 where the model's opset is >= 21 already, else int8 (no opset change)
    INT8 = "int8"  # one code a byte (today's form, every opset >= 13)
    INT4 = "int4"  # codes of 4 bits or fewer packed two a byte; converts the model to opset 21 if older


def _check(cond: bool, path: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{path} {msg}, got {value!r}")


def _bits_ok(b: Any) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    providers: Providers = Providers.AUTO
    threads: int = 0  # 0 = ONNX Runtime's default
    batch_size: int = 32

    def __post_init__(self) -> None:
        _check(isinstance(self.threads, int) and self.threads >= 0, "runtime.threads", "must be an integer >= 0", self.threads)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "runtime.batch_size", "must be an integer >= 1", self.batch_size)


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    limit: int | None = None  # use at most this many calibration samples
    batch_size: int = 16
    tokens_per_layer: int = 4096  # rows of each layer input kept for the scale search

    def __post_init__(self) -> None:
        _check(self.limit is None or (isinstance(self.limit, int) and self.limit >= 1), "calib.limit", "must be an integer >= 1", self.limit)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "calib.batch_size", "must be an integer >= 1", self.batch_size)
        _check(isinstance(self.tokens_per_layer, int) and self.tokens_per_layer >= 16, "calib.tokens_per_layer", "must be an integer >= 16", self.tokens_per_layer)


@dataclasses.dataclass(frozen=True)
class SmoothConfig:
    enabled: bool = True
    alpha: float = 0.5
    shift: ShiftMode = ShiftMode.MEAN
    alpha_search: bool = False
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    fallback: FoldFallback = FoldFallback.EXPLICIT

    def __post_init__(self) -> None:
        _check(isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0, "smooth.alpha", "must be in [0, 1]", self.alpha)
        _check(len(self.alpha_grid) > 0 and all(0.0 <= a <= 1.0 for a in self.alpha_grid), "smooth.alpha_grid", "must be a non-empty list of values in [0, 1]", self.alpha_grid)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 8
    a_bits: int = 8
    input_bits: int = 8  # the image entering the patch embedding
    act_symmetric: bool = False
    scale_method: ScaleMethod = ScaleMethod.OUTPUT_MSE
    percentile: float = 99.99
    grid_size: int = 100  # candidate steps in [grid_low, grid_high] x max-based step
    grid_low: float = 0.01
    grid_high: float = 1.2
    optm: bool = True
    optm_max_m: int = 12
    # OPT-m only where an operand has at most this many bits: at 8 bits a uniform grid is
    # nearly as accurate, and the twin form's extra elementwise nodes would cost int8 speed
    optm_max_bits: int = 7
    # search only the ratios 2^m whose twin values fit one uint8 lattice at step delta1, so every
    # twin operand reaches its matmul as one integer tensor (passes/emit_qdq.py, "lattice form");
    # False also searches larger m (up to optm_max_m), emitted as two integer matmuls
    optm_lattice: bool = True
    # network-level choice of the twin quantizers (search/optm.py): calibration samples used,
    # and how many standard errors of the subset's noise a kept change must clear
    optm_select: OptmSelect = OptmSelect.NETWORK
    optm_subset: int | None = None  # None: sized by compute (search/mixed.py subset_size)
    optm_z: float = 2.0
    # storage of weight codes in the emitted model (passes/emit_qdq.py, "Weights on CPUs without
    # VNNI"): auto = int8 where every code is within +-64, else uint8 + 128 (exact on every CPU);
    # int8 = int8 everywhere (fastest on VNNI / ARM CPUs, wrong on AVX2 CPUs without VNNI)
    weight_container: str = "auto"
    # file storage of the weight codes (passes/pack_int4.py): auto = int4 (two codes a byte) for
    # weights of <= 4 bits where the model is at opset >= 21, else int8; int4 = also convert an older
    # model to opset 21 (a stated, recorded choice: the plan's weight_storage); int8 = never pack
    weight_storage: WeightStorage = WeightStorage.AUTO

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "input_bits"):
            v = getattr(self, name)
            _check(_bits_ok(v), f"quant.{name}", "must be an integer from 2 to 8", v)
        _check(50.0 < self.percentile <= 100.0, "quant.percentile", "must be in (50, 100]", self.percentile)
        _check(isinstance(self.grid_size, int) and self.grid_size >= 2, "quant.grid_size", "must be an integer >= 2", self.grid_size)
        _check(0.0 < self.grid_low < self.grid_high, "quant.grid_low", "must be > 0 and below quant.grid_high", self.grid_low)
        _check(isinstance(self.optm_max_m, int) and 0 <= self.optm_max_m <= 16, "quant.optm_max_m", "must be an integer from 0 to 16", self.optm_max_m)
        _check(_bits_ok(self.optm_max_bits), "quant.optm_max_bits", "must be an integer from 2 to 8", self.optm_max_bits)
        _check(self.weight_container in ("auto", "int8", "uint8"), "quant.weight_container",
               "must be one of auto, int8, uint8", self.weight_container)
        _check(isinstance(self.weight_storage, WeightStorage), "quant.weight_storage", "must be one of auto, int8, int4",
               self.weight_storage)
        _check(isinstance(self.optm_lattice, bool), "quant.optm_lattice", "must be true or false", self.optm_lattice)
        _check(isinstance(self.optm_select, OptmSelect), "quant.optm_select", "must be one of network, layer", self.optm_select)
        _check(self.optm_subset is None or (isinstance(self.optm_subset, int) and not isinstance(self.optm_subset, bool)
                                            and self.optm_subset >= 2),
               "quant.optm_subset", "must be an integer >= 2 (or null: sized by compute)", self.optm_subset)
        _check(isinstance(self.optm_z, (int, float)) and math.isfinite(self.optm_z) and self.optm_z >= 0,
               "quant.optm_z", "must be a finite number >= 0", self.optm_z)


@dataclasses.dataclass(frozen=True)
class MixedConfig:
    enabled: bool = False
    target_bits: float | None = None
    target_size_mb: float | None = None
    candidates: tuple[int, ...] = (4, 5, 6, 8)
    keep: tuple[str, ...] = ()  # "BITS:GLOB" pins, e.g. "8:*head*"
    subset: int | None = None  # calibration samples measuring sensitivity (None: sized by compute)
    metric: str = "nmse"  # sensitivity: "nmse" (logit noise / signal) or "kl" (search/mixed.py)

    def __post_init__(self) -> None:
        _check(len(self.candidates) > 0 and all(_bits_ok(b) for b in self.candidates), "mixed.candidates", "must be integers from 2 to 8", self.candidates)
        _check(len(set(self.candidates)) == len(self.candidates), "mixed.candidates", "must not repeat", self.candidates)
        if self.target_bits is not None:
            _check(isinstance(self.target_bits, (int, float)) and 2.0 <= self.target_bits <= 8.0, "mixed.target_bits", "must be in [2, 8]", self.target_bits)
        if self.target_size_mb is not None:
            _check(isinstance(self.target_size_mb, (int, float)) and self.target_size_mb > 0, "mixed.target_size_mb", "must be > 0", self.target_size_mb)
        if self.enabled:
            _check(self.target_bits is not None or self.target_size_mb is not None, "mixed.target_bits", "(or mixed.target_size_mb) is required with mixed precision", None)
        for k in self.keep:
            bits, sep, pattern = str(k).partition(":")
            _check(bool(sep) and bits.isdigit() and _bits_ok(int(bits)) and bool(pattern), "mixed.keep", "entries must look like BITS:GLOB with BITS from 2 to 8", k)
        _check(self.subset is None or (isinstance(self.subset, int) and not isinstance(self.subset, bool) and self.subset >= 1),
               "mixed.subset", "must be an integer >= 1 (or null: sized by compute)", self.subset)
        _check(self.metric in ("nmse", "kl"), "mixed.metric", "must be nmse or kl", self.metric)


@dataclasses.dataclass(frozen=True)
class Config:
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    smooth: SmoothConfig = dataclasses.field(default_factory=SmoothConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    mixed: MixedConfig = dataclasses.field(default_factory=MixedConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an integer >= 0", self.seed)

    def to_dict(self) -> dict:
        def plain(v: Any) -> Any:
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, tuple):
                return list(v)
            return v

        return plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        return _build(cls, data, "")

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(data):
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key!s} (known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        path = f"{prefix}{key}"
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path + ".")
            continue
        kwargs[key] = _coerce(tp, value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(m.value for m in tp)
            raise ConfigError(f"{path} must be one of {allowed}, got {value!r}") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, path) for v in value)
    if origin in (typing.Union, __import__("types").UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, path)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    return value
