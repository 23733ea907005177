"""Calibration and evaluation data: one streaming interface over files and in-memory sources.

``open_data(spec, model_inputs)`` returns a :class:`DataSource`; iterating it yields
:class:`Batch` objects (a dict of model-input arrays plus optional integer labels) of at most
``batch_size`` samples, in a deterministic order, checked against the model's inputs:

- a ``.npz`` file: one array per model input, named like the input (a single-input model also
  accepts any single array), plus an optional integer ``labels`` array. Uncompressed members are
  memory-mapped, compressed ones are decompressed as a stream, batch by batch.
- an image folder: class sub-folders (labels are their indices in sorted order, as torchvision's
  ``ImageFolder`` numbers them, or what a class map gives them) or a flat folder (no labels, or
  those of a labels file); ``.jpg .jpeg .png .bmp .webp`` in any case; hidden files are skipped.
  Images are decoded lazily, batch by batch, and preprocessed by :func:`preprocess_image` (needs
  a :class:`PreprocessSpec`). See :func:`read_labels_file` and :func:`read_class_map`.
- an object with ``get_next()`` returning a dict of arrays or None (ONNX Runtime's
  ``CalibrationDataReader`` protocol, duck-typed: this module does not import onnxruntime).
- any iterable of dicts of arrays (or of :class:`Batch`). A dict may hold a batch or one sample,
  with or without the batch dimension, and an optional ``labels`` entry.
- one dict of arrays holding every sample (an ``.npz`` in memory), re-batched like the above.

A slice of any source (:class:`Split`, ``offset``, ``limit``) selects samples by their position
``p = 0, 1, ...`` in that deterministic order: first the split (``fold:I/K`` keeps ``p % K == I``,
``rest:I/K`` the others), then ``offset`` skips that many of the kept samples and ``limit`` caps
the rest. So ``fold:0/10`` and ``rest:0/10`` of one folder are disjoint and together are all of
it: one folder serves calibration and held-out evaluation without copying.

Dimension 0 of every model input is the batch dimension. Where the model fixes it (e.g. an
export with batch 1) batches have exactly that size, whatever ``batch_size`` says.

Checks (each a :class:`DataError` naming the file and input): missing or unreadable file, input
names, static dims, dtypes (float inputs need float data; float64 is cast to float32, integers
are refused because they are usually unpreprocessed pixels), label count and type, undecodable
images, and -- lazily, on every batch as it streams -- NaN/inf and an empty source.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
LABELS = "labels"

Dim = int | str | None


class InputSpec(NamedTuple):
    """Shape (None or a symbol name for dynamic dims) and dtype of one model input."""

    shape: tuple[Dim, ...]
    dtype: np.dtype


def input_specs(model: onnx.ModelProto) -> dict[str, InputSpec]:
    """The graph inputs that are not initializers, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, InputSpec] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        out[vi.name] = InputSpec(tuple(dims), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


@dataclasses.dataclass(frozen=True)
class Batch:
    """Model inputs for ``size`` samples (dim 0 of every array) and their labels, if known."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None  # (size,) int64

    @property
    def size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


# --------------------------------------------------------------------------------------------
# Image preprocessing
# --------------------------------------------------------------------------------------------


class Interpolation(str, enum.Enum):
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    NEAREST = "nearest"


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """timm-style evaluation transform: resize, center crop, scale to [0, 1], normalize.

    The shorter side is resized to ``size / crop_pct`` (for a non-square ``size`` the image is
    scaled so that it covers ``size / crop_pct``), then the center ``size`` is cropped (zero
    padding where the image is smaller), then ``(x / 255 - mean) / std`` per channel, NCHW float32.
    ``channels`` None follows the model input (3 where its channel dim is dynamic); 1 means
    grayscale.
    """

    size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Interpolation = Interpolation.BILINEAR
    crop_pct: float = 1.0
    channels: int | None = None

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, (list, tuple)):
            size = tuple(size)
            ok = len(size) == 2 and all(_is_pos_int(s) for s in size)
        else:
            ok = _is_pos_int(size)
        if not ok:
            raise ConfigError(f"preprocess.size must be a positive integer or (height, width), got {self.size!r}")
        object.__setattr__(self, "size", size)
        for field in ("mean", "std"):
            v = getattr(self, field)
            try:
                vals = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else (v,)))
            except (TypeError, ValueError):
                raise ConfigError(f"preprocess.{field} must be a list of numbers, got {v!r}") from None
            if len(vals) not in (1, 3) or not all(math.isfinite(x) for x in vals):
                raise ConfigError(f"preprocess.{field} must have 1 or 3 finite values, got {v!r}")
            object.__setattr__(self, field, vals)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess.std must be > 0, got {self.std!r}")
        try:
            object.__setattr__(self, "interpolation", Interpolation(self.interpolation))
        except ValueError:
            allowed = ", ".join(m.value for m in Interpolation)
            raise ConfigError(f"preprocess.interpolation must be one of {allowed}, got {self.interpolation!r}") from None
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) or not 0.0 < self.crop_pct <= 2.0:
            raise ConfigError(f"preprocess.crop_pct must be in (0, 2], got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"preprocess.channels must be 1 or 3, got {self.channels!r}")

    @property
    def hw(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else self.size  # type: ignore[return-value]


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


_PIL_RESAMPLE = {Interpolation.BILINEAR: 2, Interpolation.BICUBIC: 3, Interpolation.NEAREST: 0}  # PIL.Image.Resampling


def preprocess_image(image: Any, spec: PreprocessSpec, channels: int = 3) -> np.ndarray:
    """A PIL image -> (channels, H, W) float32, following ``spec`` (see :class:`PreprocessSpec`)."""
    im = image.convert("L" if channels == 1 else "RGB")
    th, tw = spec.hw
    sh, sw = math.floor(th / spec.crop_pct), math.floor(tw / spec.crop_pct)
    w, h = im.size
    if sh == sw:  # torchvision Resize(int): shorter side -> sh, aspect kept
        if w <= h:
            new_w, new_h = sh, int(sh * h / w)
        else:
            new_w, new_h = int(sh * w / h), sh
    else:  # timm ResizeKeepRatio: cover (sh, sw) with the aspect kept
        ratio = min(h / sh, w / sw)
        new_w, new_h = round(w / ratio), round(h / ratio)
    if (new_w, new_h) != (w, h):
        im = im.resize((max(new_w, 1), max(new_h, 1)), resample=_PIL_RESAMPLE[spec.interpolation])
    arr = np.asarray(im, dtype=np.float32)  # (h, w) or (h, w, 3)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # (h, w, 1)
    h, w = arr.shape[:2]
    if th > h or tw > w:  # torchvision CenterCrop pads with zeros first
        top, left = max(th - h, 0) // 2, max(tw - w, 0) // 2
        arr = np.pad(arr, ((top, max(th - h, 0) - top), (left, max(tw - w, 0) - left), (0, 0)))
        h, w = arr.shape[:2]
    y0, x0 = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    arr = arr[y0 : y0 + th, x0 : x0 + tw]  # (th, tw, C)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    arr = (arr / np.float32(255.0) - mean) / std  # (th, tw, C), mean/std broadcast over C
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)  # (C, th, tw)


def preprocess_from_timm(name: str) -> PreprocessSpec:
    """The evaluation transform timm uses for the pretrained model ``name``."""
    try:
        import timm  # noqa: PLC0415 - optional dependency, imported only when asked for
        import timm.data  # noqa: PLC0415
        from timm.models import get_pretrained_cfg  # noqa: PLC0415
    except ImportError:
        raise DataError(
            f"preprocess timm:{name} needs timm; install the export extra: pip install 'onnx-mptq[export]'"
        ) from None
    pretrained = get_pretrained_cfg(name)
    if pretrained is not None:  # no need to build the model
        cfg = timm.data.resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    else:
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as e:
            raise DataError(f"timm does not know the model {name!r} ({e})") from None
        cfg = timm.data.resolve_data_config({}, model=model)
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode != "center":
        raise DataError(
            f"timm model {name!r} uses crop_mode {crop_mode!r}; only 'center' is implemented, pass "
            f"--size/--mean/--std/--crop-pct instead"
        )
    c, h, w = cfg["input_size"]
    interp = cfg.get("interpolation", "bilinear")
    if interp not in {m.value for m in Interpolation}:
        raise DataError(f"timm model {name!r} uses interpolation {interp!r}, which is not supported")
    return PreprocessSpec(
        size=h if h == w else (h, w),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=Interpolation(interp),
        crop_pct=float(cfg.get("crop_pct", 1.0)),
        channels=int(c) if c in (1, 3) else None,
    )


def _parse_numbers(value: Any, what: str, cast: type) -> tuple:
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace(" ", ",").split(",") if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        return tuple(cast(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number or a comma-separated list of numbers, got {value!r}") from None


def parse_preprocess_args(
    preprocess: str | None,
    size: Any = None,
    mean: Any = None,
    std: Any = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> PreprocessSpec | None:
    """CLI flags -> PreprocessSpec. ``preprocess`` is ``timm:NAME``; explicit flags override it.

    ``size`` is ``224`` or ``224,224`` (H, W); ``mean``/``std`` one or three comma-separated
    values in the [0, 1] pixel scale. Without ``timm:NAME``, size, mean and std are all required;
    interpolation defaults to bilinear and crop_pct to 1.0 (no crop). Nothing given -> None.
    """
    overrides: dict[str, Any] = {}
    if size is not None:
        s = _parse_numbers(size, "--size", int)
        overrides["size"] = s[0] if len(s) == 1 else s
    if mean is not None:
        overrides["mean"] = _parse_numbers(mean, "--mean", float)
    if std is not None:
        overrides["std"] = _parse_numbers(std, "--std", float)
    if interpolation is not None:
        overrides["interpolation"] = interpolation
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    if preprocess is not None:
        kind, sep, name = str(preprocess).partition(":")
        if kind != "timm" or not sep or not name.strip():
            raise ConfigError(f"--preprocess must look like timm:MODEL_NAME, got {preprocess!r}")
        base = preprocess_from_timm(name.strip())
        return dataclasses.replace(base, **overrides) if overrides else base
    if not overrides:
        return None
    missing = [f"--{k}" for k in ("size", "mean", "std") if k not in overrides]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} missing: give --size, --mean and --std together, or --preprocess timm:NAME"
        )
    return PreprocessSpec(**overrides)


# --------------------------------------------------------------------------------------------
# Checks shared by all sources
# --------------------------------------------------------------------------------------------


def _fmt_shape(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _normalise_specs(model_inputs: Mapping[str, Any]) -> dict[str, InputSpec]:
    if not model_inputs:
        raise DataError("the model has no inputs to feed")
    out = {}
    for name, spec in model_inputs.items():
        shape, dtype = spec
        dims = tuple(int(d) if _is_pos_int(d) else (d if isinstance(d, str) else None) for d in shape)
        out[str(name)] = InputSpec(dims, np.dtype(dtype))
    return out


def _match_names(where: str, available: Sequence[str], specs: Mapping[str, InputSpec]) -> dict[str, str]:
    """model input name -> data array name."""
    avail = [a for a in available if a != LABELS or a in specs]
    if set(avail) == set(specs):
        return {n: n for n in specs}
    if len(specs) == 1 and len(avail) == 1:
        return {next(iter(specs)): avail[0]}
    raise DataError(
        f"{where}: data has arrays {', '.join(sorted(avail)) or '(none)'}; model inputs are {', '.join(specs)}"
    )


def _target_dtype(where: str, name: str, model_name: str, want: np.dtype, got: np.dtype) -> np.dtype:
    if want.kind == "f":
        if got.kind != "f":
            raise DataError(
                f"{where}: {name!r} is {got} but model input {model_name!r} is {want}; integer/bool data is "
                f"not cast (is it unpreprocessed pixels?): convert it to float first"
            )
        return want
    if want.kind in "iu":
        if got.kind not in "iu":
            raise DataError(f"{where}: {name!r} is {got} but model input {model_name!r} is {want} (integers needed)")
        return want
    if got != want:
        raise DataError(f"{where}: {name!r} is {got} but model input {model_name!r} is {want}")
    return want


def _check_sample_dims(where: str, name: str, model_name: str, spec: InputSpec, got: tuple[int, ...]) -> None:
    """``got`` includes the batch dim; compare everything but dim 0 with the model."""
    bad = len(got) != len(spec.shape) or any(
        isinstance(e, int) and e != g for e, g in zip(spec.shape[1:], got[1:])
    )
    if bad:
        raise DataError(
            f"{where}: {name!r} has shape {_fmt_shape(got)} but model input {model_name!r} expects "
            f"{_fmt_shape(spec.shape)} (dim 0 is the batch)"
        )


def _check_labels(where: str, labels: Any, n: int | None) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be a 1-D integer array, got {lab.dtype} with shape {_fmt_shape(lab.shape)}")
    if n is not None and len(lab) != n:
        raise DataError(f"{where}: labels has {len(lab)} entries but the data has {n} samples")
    return lab.astype(np.int64, copy=False)


def _static_batch(specs: Mapping[str, InputSpec], where: str) -> int | None:
    fixed = {s.shape[0] for s in specs.values() if s.shape and isinstance(s.shape[0], int)}
    if not fixed:
        return None
    if len(fixed) > 1:
        raise DataError(f"{where}: model inputs fix different batch sizes {sorted(fixed)}")
    return fixed.pop()


def _check_finite(where: str, batch: Batch, first_sample: int, batch_index: int) -> None:
    for name in sorted(batch.inputs):
        a = batch.inputs[name]
        if a.dtype.kind != "f" or a.size == 0:
            continue
        finite = np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)  # (size,)
        if not finite.all():
            i = int(np.argmin(finite))
            raise DataError(
                f"{where}: input {name!r} has NaN or inf in sample {first_sample + i} (batch {batch_index})"
            )


def _check_same_shape(where: str, specs: Mapping[str, InputSpec], batch: Batch, first: dict[str, tuple[int, ...]], index: int) -> None:
    """Dynamic non-batch dims are fixed by the first batch: one model graph, one set of shapes."""
    for name in sorted(batch.inputs):
        spec = specs.get(name)
        if spec is None or all(isinstance(d, int) for d in spec.shape[1:]):
            continue
        got = tuple(batch.inputs[name].shape[1:])
        want = first.setdefault(name, got)
        if got != want:
            raise DataError(
                f"{where}: input {name!r} has per-sample shape {_fmt_shape(got)} in batch {index} but "
                f"{_fmt_shape(want)} in batch 0; the model's dynamic dims must be the same throughout the data"
            )


def check_shapes_fit(model: onnx.ModelProto, data: DataSource) -> None:
    """Check that ``model`` accepts the shapes ``data`` gives its dynamic (non-batch) input dims.

    The data resolves such dims, so the file checks of :func:`open_data` cannot; instead ONNX
    shape inference (strict, with data propagation) runs twice: with the declared symbolic dims,
    then with the first batch's. A model that infers cleanly the first time but not the second
    cannot run on this data: :class:`DataError` naming the node. Nothing to check for static
    inputs; skipped (with a debug note) for one-shot sources, which peeking would consume, for
    protos past 2 GB, and for models shape inference cannot follow even symbolically.
    """
    specs = input_specs(model)
    dynamic = sorted(n for n, sp in specs.items() if any(not isinstance(d, int) for d in sp.shape[1:]))
    if not dynamic:
        return
    if not data.reiterable:
        log.debug("%s: one-shot source; dynamic input dims are not checked before running", data.name)
        return
    try:
        if model.ByteSize() > 2**31 - 1:
            return
    except Exception:  # noqa: BLE001 - ByteSize can fail past 2 GB
        return
    batch = next(iter(data))  # an empty source raises DataError("no samples") here
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    try:
        onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001 - the model itself defeats strict inference: nothing to learn
        log.debug("%s: strict shape inference fails on the model itself (%s); dynamic dims not checked",
                  data.name, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return
    for vi in probe.graph.input:
        if vi.name not in dynamic or vi.name not in batch.inputs:
            continue
        got = batch.inputs[vi.name].shape
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if axis > 0 and not (d.HasField("dim_value") and d.dim_value > 0) and axis < len(got):
                d.Clear()
                d.dim_value = int(got[axis])
    try:
        onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        shapes = ", ".join(
            f"{n!r} {_fmt_shape(batch.inputs[n].shape[1:])} for {_fmt_shape(specs[n].shape[1:])}" for n in dynamic if n in batch.inputs
        )
        raise DataError(
            f"{data.name}: the model cannot take the data's sample shape ({shapes}): {_inference_failure(str(e))}"
        ) from None


def _inference_failure(text: str) -> str:
    """First failing node of an ONNX InferenceError, e.g. "node 'add_3' (Add): Incompatible dimensions"."""
    m = re.search(r"\(op_type:(\w+), node name: ([^)]*)\): (?:\[\w+\] )?([^\n(]*)", text)
    if m:
        return f"node {m.group(2)!r} ({m.group(1)}): {m.group(3).strip()}"
    first = text.strip().splitlines()[0] if text.strip() else "shape inference failed"
    return first[:200]


# --------------------------------------------------------------------------------------------
# Labels files, class maps, slices
# --------------------------------------------------------------------------------------------


class SplitPart(str, enum.Enum):
    FOLD = "fold"  # positions p with p % folds == index
    REST = "rest"  # every other position


@dataclasses.dataclass(frozen=True)
class Split:
    """A deterministic split by position: ``fold:I/K`` or ``rest:I/K`` (module docstring)."""

    part: SplitPart
    index: int
    folds: int

    def __post_init__(self) -> None:
        if not (isinstance(self.folds, int) and self.folds >= 2 and isinstance(self.index, int) and 0 <= self.index < self.folds):
            raise ConfigError(f"split {self.part.value}:{self.index}/{self.folds}: needs K >= 2 and 0 <= I < K")

    @classmethod
    def parse(cls, spec: "str | Split") -> "Split":
        if isinstance(spec, Split):
            return spec
        m = re.fullmatch(r"\s*(fold|rest):(\d+)/(\d+)\s*", str(spec))
        if not m:
            raise ConfigError(f"split {spec!r}: expected fold:I/K (every K-th sample from the I-th) or rest:I/K (the others)")
        return cls(SplitPart(m.group(1)), int(m.group(2)), int(m.group(3)))

    def keeps(self, positions: np.ndarray) -> np.ndarray:
        """Boolean mask over ``positions`` (int array)."""
        fold = positions % self.folds == self.index
        return fold if self.part is SplitPart.FOLD else ~fold

    def __str__(self) -> str:
        return f"{self.part.value}:{self.index}/{self.folds}"


def select_positions(n: int, split: Split | None, offset: int, limit: int | None) -> np.ndarray:
    """Positions (sorted, int64) of ``n`` samples kept by ``split``, then ``offset``, then ``limit``."""
    pos = np.arange(n, dtype=np.int64)  # (n,)
    if split is not None:
        pos = pos[split.keeps(pos)]
    pos = pos[offset:]
    return pos if limit is None else pos[:limit]


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the {what} ({type(e).__name__}: {str(e)[:120]})") from None


def _fields(line: str) -> list[str]:
    """``a,b`` / ``a b`` / ``a<TAB>b`` -> [a, b] (CSV first, else whitespace)."""
    if "," in line:
        return [f.strip().strip('"') for f in line.split(",")]
    return line.split()


def _is_int(s: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", s) is not None


@dataclasses.dataclass(frozen=True)
class LabelsFile:
    """A labels file: ``by_name`` (file name -> label token) or ``in_order`` (one per sorted file)."""

    path: Path
    by_name: dict[str, str] | None
    in_order: tuple[str, ...] | None


def read_labels_file(path: str | os.PathLike) -> LabelsFile:
    """Labels of a flat image folder, in one of three forms (blank lines and ``#`` lines skipped):

    * ``filename,label`` per line (CSV; a first line whose label is not an integer and names no
      file, e.g. ``filename,label``, is taken as a header), or ``filename label`` (whitespace);
    * one label per line, for the folder's image files in sorted name order (how ImageNet's
      validation ground truth is distributed, e.g. caffe's ``val.txt`` indices).

    A label is a class index (0-based integer) or a class name, which a class map turns into an
    index (:func:`read_class_map`). Names are file names within the folder."""
    p = Path(path)
    rows = [ln.strip() for ln in _read_text(p, "labels file").splitlines()]
    rows = [r for r in rows if r and not r.startswith("#")]
    if not rows:
        raise DataError(f"{p}: the labels file is empty")
    split_rows = [_fields(r) for r in rows]
    if all(len(f) == 1 for f in split_rows):
        return LabelsFile(p, None, tuple(f[0] for f in split_rows))
    by_name: dict[str, str] = {}
    for i, f in enumerate(split_rows):
        if len(f) < 2 or not f[0]:
            raise DataError(f"{p}: line {i + 1} {rows[i][:80]!r} is not 'filename,label'")
        if i == 0 and not _is_int(f[1]) and Path(f[0]).suffix.lower() not in IMAGE_EXTENSIONS:
            continue  # header
        name = Path(f[0]).name
        if name in by_name and by_name[name] != f[1]:
            raise DataError(f"{p}: {name} is listed twice with different labels ({by_name[name]}, {f[1]})")
        by_name[name] = f[1]
    return LabelsFile(p, by_name, None)


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """Class name -> index, from:

    * ``name,index`` or ``name index`` per line (e.g. ``n01440764 0``);
    * one name per line, index = line number (0-based), anything after the first field ignored:
      a classes list, or ImageNet's ``synset_words.txt`` (``n01440764 tench, Tinca tinca``);
    * JSON: ``{"n01440764": 0, ...}``, or ``{"0": ["n01440764", "tench"], ...}`` (Keras'
      ``imagenet_class_index.json``).
    """
    p = Path(path)
    text = _read_text(p, "class map")
    out: dict[str, int] = {}
    if text.lstrip().startswith("{"):
        import json

        try:
            doc = json.loads(text)
        except ValueError as e:
            raise DataError(f"{p}: not valid JSON ({str(e)[:120]})") from None
        for k, v in doc.items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[str(k)] = v
            elif isinstance(v, list) and v and _is_int(str(k)):
                out[str(v[0])] = int(k)
            else:
                raise DataError(f"{p}: entry {k!r}: expected name -> index or index -> [name, ...]")
    else:
        rows = [ln.strip() for ln in text.splitlines()]
        rows = [r for r in rows if r and not r.startswith("#")]
        pairs = [_fields(r) for r in rows]
        indexed = all(len(f) == 2 and _is_int(f[1]) for f in pairs) and bool(pairs)
        for i, f in enumerate(pairs):
            name = f[0] if indexed else re.split(r"[\s,]", rows[i], maxsplit=1)[0]
            idx = int(f[1]) if indexed else i
            if name in out and out[name] != idx:
                raise DataError(f"{p}: class {name!r} is mapped twice ({out[name]}, {idx})")
            out[name] = idx
    if not out:
        raise DataError(f"{p}: the class map is empty")
    bad = sorted(k for k, v in out.items() if v < 0)
    if bad:
        raise DataError(f"{p}: class {bad[0]!r} has a negative index")
    return out


def _label_index(token: str, class_map: dict[str, int] | None, where: str) -> int:
    if _is_int(token):
        v = int(token)
        if v < 0:
            raise DataError(f"{where}: negative label {v}")
        return v
    if class_map is None:
        raise DataError(f"{where}: label {token!r} is a class name; give --class-map FILE to turn names into indices")
    if token not in class_map:
        raise DataError(f"{where}: class {token!r} is not in the class map")
    return class_map[token]


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class DataSource:
    """Streams checked :class:`Batch` objects. Iterate it; file sources can be iterated again.

    Attributes: ``name`` (for messages), ``input_names``, ``batch_size`` (the size batches really
    have, at most; the model's fixed batch dim wins), ``num_samples`` and ``num_batches`` (None
    when unknown before streaming), ``reiterable``.
    """

    def __init__(self, name: str, specs: Mapping[str, InputSpec], batch_size: int, num_samples: int | None, reiterable: bool, limit: int | None) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"limit must be an integer >= 1, got {limit!r}")
        self.name = name
        self.specs = dict(specs)
        self.input_names = tuple(specs)
        self.static_batch = _static_batch(specs, name)
        if self.static_batch is not None and self.static_batch != batch_size:
            log.info("%s: the model fixes the batch size to %d; using it instead of %d", name, self.static_batch, batch_size)
        self.batch_size = self.static_batch or batch_size
        self.limit = limit
        self.num_samples = num_samples
        self.reiterable = reiterable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, num_samples={self.num_samples}, batch_size={self.batch_size})"

    @property
    def num_batches(self) -> int | None:
        """Batches one pass yields, where known (for progress bars); the source has no __len__."""
        return None if self.num_samples is None else math.ceil(self.num_samples / self.batch_size)

    def _batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        produced = 0
        first: dict[str, tuple[int, ...]] = {}  # per-sample shape of batch 0, for the dynamic dims
        for index, batch in enumerate(self._batches()):
            _check_finite(self.name, batch, produced, index)
            _check_same_shape(self.name, self.specs, batch, first, index)
            produced += batch.size
            yield batch
        if produced == 0:
            raise DataError(f"{self.name}: no samples")

    def _usable(self, n: int) -> int:
        """How many of ``n`` samples are fed: the limit, and whole batches for a fixed batch size."""
        n = min(n, self.limit) if self.limit is not None else n
        if self.static_batch is not None and self.static_batch > 1 and n % self.static_batch:
            kept = n - n % self.static_batch
            log.warning(
                "%s: the model fixes the batch size to %d; dropping the last %d sample(s)",
                self.name, self.static_batch, n - kept,
            )
            n = kept
        return n


@dataclasses.dataclass(frozen=True)
class _NpyMember:
    """One array of a .npz (zip member ``name + ".npy"``), streamed without loading the whole file."""

    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    def full(self) -> np.ndarray:
        with np.load(self.path, allow_pickle=False) as z:
            return z[self.name]

    def chunks(self, rows: int, total: int) -> Iterator[np.ndarray]:
        """Consecutive row blocks of ``rows`` along dim 0, ``total`` rows in all.

        Read from the member's stream (:mod:`zipfile` inflates deflated members as it goes,
        :mod:`numpy.lib.format` reads the header) one block at a time into a fresh array: memory
        holds one block whatever the size of the file, and no memory map keeps pages resident
        (tools/bench_memory.py)."""
        if self.fortran:  # rare (np.savez of a transposed array): read whole
            arr = self.full()
            for i in range(0, total, rows):
                yield np.ascontiguousarray(arr[i : min(i + rows, total)])
            return
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.name + ".npy") as f:
                _read_npy_header(f)
                for i in range(0, total, rows):
                    block = np.empty((min(rows, total - i), *self.shape[1:]), dtype=self.dtype)
                    if f.readinto(block.reshape(-1).view(np.uint8)) != block.nbytes:
                        raise DataError(f"{self.path}: array {self.name!r} is truncated")
                    yield block
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise DataError(f"{self.path}: array {self.name!r} is truncated or corrupt ({type(e).__name__}: "
                            f"{str(e)[:120]})") from None


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _npz_members(path: Path) -> dict[str, _NpyMember]:
    out: dict[str, _NpyMember] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            with zf.open(info) as f:
                shape, fortran, dtype = _read_npy_header(f)
            if dtype.hasobject:
                raise ValueError(f"array {name!r} holds Python objects")
            out[name] = _NpyMember(path, name, tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran))
    return out


class _NpzSource(DataSource):
    def __init__(self, path: Path, specs: Mapping[str, InputSpec], batch_size: int, limit: int | None) -> None:
        where = str(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            members = _npz_members(path)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {str(e)[:120]})") from None
        mapping = _match_names(where, sorted(members), specs)
        sizes: set[int] = set()
        self._cast: dict[str, np.dtype] = {}
        for model_name, data_name in mapping.items():
            m, spec = members[data_name], specs[model_name]
            self._cast[model_name] = _target_dtype(where, data_name, model_name, spec.dtype, m.dtype)
            _check_sample_dims(where, data_name, model_name, spec, m.shape)
            sizes.add(m.shape[0])
        if len(sizes) > 1:
            detail = ", ".join(f"{d} has {members[d].shape[0]}" for d in sorted(mapping.values()))
            raise DataError(f"{where}: arrays have different numbers of samples ({detail})")
        n = sizes.pop()
        self._labels = None
        if LABELS in members and LABELS not in specs:
            self._labels = _check_labels(where, members[LABELS].full(), n)
        self._members = {model: members[data] for model, data in mapping.items()}
        super().__init__(where, specs, batch_size, None, True, limit)
        self.num_samples = self._usable(n)

    def _batches(self) -> Iterator[Batch]:
        total = self.num_samples or 0
        streams = {name: m.chunks(self.batch_size, total) for name, m in self._members.items()}
        start = 0
        for parts in zip(*streams.values()):
            inputs = {name: np.ascontiguousarray(a, dtype=self._cast[name]) for name, a in zip(streams, parts)}
            n = len(parts[0])
            labels = self._labels[start : start + n] if self._labels is not None else None
            start += n
            yield Batch(inputs, labels)


def _list_images(root: Path, labels_file: LabelsFile | None = None,
                 class_map: dict[str, int] | None = None) -> tuple[list[Path], list[int] | None, tuple[str, ...]]:
    """Sorted image files, their labels (None for a flat folder without a labels file) and the
    class names. Class sub-folders are numbered by sorted position, or by ``class_map`` (every
    sub-folder must be in it); a flat folder takes its labels from ``labels_file``."""

    def is_image(p: Path) -> bool:
        return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS

    entries = sorted(root.iterdir(), key=lambda p: p.name)
    flat = [p for p in entries if is_image(p)]
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    per_class: list[list[Path]] = []
    for d in class_dirs:
        files = []
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            files.extend(Path(dirpath) / f for f in filenames)
        per_class.append(sorted((p for p in files if is_image(p)), key=lambda p: p.relative_to(d).as_posix()))
    if not any(per_class):
        if labels_file is None:
            return flat, None, ()
        return flat, _flat_labels(root, flat, labels_file, class_map), ()
    if labels_file is not None:
        raise DataError(
            f"{labels_file.path}: {root} has class sub-folders, which give the labels; a labels file is for a flat "
            f"folder (use --class-map FILE to number the sub-folders)"
        )
    if flat:
        raise DataError(
            f"{root}: mixes images ({flat[0].name}, ...) with class folders ({class_dirs[0].name}, ...); "
            f"use either class sub-folders or a flat folder"
        )
    if class_map is not None:
        missing = [d.name for d, files in zip(class_dirs, per_class) if files and d.name not in class_map]
        if missing:
            raise DataError(f"{root}: class folder {missing[0]!r} is not in the class map"
                            + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        index = [class_map.get(d.name, -1) for d in class_dirs]
    else:
        index = list(range(len(class_dirs)))
        for d, files in zip(class_dirs, per_class):
            if not files:
                log.warning("%s: class folder %s holds no images (its label index is still reserved)", root, d.name)
    paths = [p for files in per_class for p in files]
    labels = [index[i] for i, files in enumerate(per_class) for _ in files]
    return paths, labels, tuple(d.name for d in class_dirs)


def _flat_labels(root: Path, files: list[Path], lf: LabelsFile, class_map: dict[str, int] | None) -> list[int]:
    if lf.in_order is not None:
        if len(lf.in_order) != len(files):
            raise DataError(
                f"{lf.path}: {len(lf.in_order)} labels (one per line) but {root} holds {len(files)} images; a file "
                f"of bare labels must have one per image, in sorted file-name order (else give 'filename,label' lines)"
            )
        return [_label_index(t, class_map, f"{lf.path}, line {i + 1}") for i, t in enumerate(lf.in_order)]
    assert lf.by_name is not None
    missing = [p.name for p in files if p.name not in lf.by_name]
    if missing:
        raise DataError(f"{lf.path}: no label for {missing[0]} in {root}" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return [_label_index(lf.by_name[p.name], class_map, f"{lf.path}, {p.name}") for p in files]


class _ImageFolderSource(DataSource):
    def __init__(self, root: Path, specs: Mapping[str, InputSpec], preprocess: PreprocessSpec | None, batch_size: int, limit: int | None,
                 labels_file: LabelsFile | None = None, class_map: dict[str, int] | None = None,
                 split: Split | None = None, offset: int = 0) -> None:
        where = str(root)
        if len(specs) != 1:
            raise DataError(f"{where}: an image folder feeds a single-input model; model inputs are {', '.join(specs)}")
        (name, spec), = specs.items()
        if len(spec.shape) != 4:
            raise DataError(
                f"{where}: an image folder feeds an (N, C, H, W) input; model input {name!r} has shape {_fmt_shape(spec.shape)}"
            )
        if spec.dtype.kind != "f":
            raise DataError(f"{where}: model input {name!r} is {spec.dtype}; images give float32")
        if preprocess is None:
            raise DataError(f"{where}: image folder needs --preprocess timm:NAME or --size/--mean/--std")
        c = spec.shape[1]
        if isinstance(c, int):
            if c not in (1, 3):
                raise DataError(f"{where}: model input {name!r} has {c} channels; images give 1 or 3")
            if preprocess.channels is not None and preprocess.channels != c:
                raise DataError(f"{where}: preprocess asks for {preprocess.channels} channels but model input {name!r} has {c}")
        else:
            c = preprocess.channels or 3
        for field in ("mean", "std"):
            if len(getattr(preprocess, field)) not in (1, c):
                raise DataError(
                    f"{where}: preprocess {field} has {len(getattr(preprocess, field))} values but model input {name!r} has {c} channel(s)"
                )
        h, w = preprocess.hw
        for axis, got in ((2, h), (3, w)):
            want = spec.shape[axis]
            if isinstance(want, int) and want != got:
                raise DataError(
                    f"{where}: preprocessing gives {c}x{h}x{w} images but model input {name!r} expects "
                    f"{_fmt_shape(spec.shape)}; set the preprocess size to match"
                )
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        self._paths, self._labels, self.class_names = _list_images(root, labels_file, class_map)
        if split is not None or offset:
            keep = select_positions(len(self._paths), split, offset, None)
            self._paths = [self._paths[i] for i in keep]
            self._labels = None if self._labels is None else [self._labels[i] for i in keep]
            where = f"{where} [{', '.join(x for x in (str(split) if split else '', f'offset {offset}' if offset else '') if x)}]"
        self._input = name
        self._channels = c
        self._preprocess = preprocess
        super().__init__(where, specs, batch_size, None, True, limit)
        self.num_samples = self._usable(len(self._paths))

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image  # noqa: PLC0415 - only image folders need PIL

        try:
            with Image.open(path) as im:
                im.load()
                return preprocess_image(im, self._preprocess, self._channels)  # (C, H, W)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {str(e)[:120]})") from None

    def _batches(self) -> Iterator[Batch]:
        total = self.num_samples or 0
        for i in range(0, total, self.batch_size):
            paths = self._paths[i : min(i + self.batch_size, total)]
            x = np.stack([self._load(p) for p in paths])  # (B, C, H, W)
            labels = None
            if self._labels is not None:
                labels = np.asarray(self._labels[i : i + len(paths)], dtype=np.int64)
            yield Batch({self._input: x}, labels)


class _IterableSource(DataSource):
    """Readers (``get_next()``) and iterables of dicts/Batch, re-batched to ``batch_size``."""

    def __init__(self, obj: Any, specs: Mapping[str, InputSpec], batch_size: int, limit: int | None) -> None:
        self._obj = obj
        self._is_reader = callable(getattr(obj, "get_next", None))
        one_shot = self._is_reader or iter(obj) is obj
        known = None
        if isinstance(obj, Sequence) and all(isinstance(x, Batch) for x in obj):
            known = sum(x.size for x in obj)
        name = f"data reader {type(obj).__name__}" if self._is_reader else f"data ({type(obj).__name__})"
        super().__init__(name, specs, batch_size, known, not one_shot or callable(getattr(obj, "rewind", None)), limit)
        if known is not None:
            self.num_samples = self._usable(known)
        self._started = False

    def _items(self) -> Iterator[Any]:
        if self._started:
            if callable(getattr(self._obj, "rewind", None)):
                self._obj.rewind()
            elif not self.reiterable:
                raise DataError(f"{self.name} can be read only once (it has no rewind())")
        self._started = True
        if self._is_reader:
            while (item := self._obj.get_next()) is not None:
                yield item
        else:
            yield from self._obj

    def _check_item(self, item: Any, index: int) -> Batch:
        where = f"{self.name}, item {index}"
        if isinstance(item, Batch):
            arrays, labels = dict(item.inputs), item.labels
        elif isinstance(item, Mapping):
            arrays = {str(k): v for k, v in item.items()}
            labels = arrays.pop(LABELS) if LABELS in arrays and LABELS not in self.specs else None
        else:
            raise DataError(f"{where}: expected a dict of input arrays, got {type(item).__name__}")
        mapping = _match_names(where, list(arrays), self.specs)
        inputs: dict[str, np.ndarray] = {}
        for model_name, data_name in mapping.items():
            spec = self.specs[model_name]
            a = np.asarray(arrays[data_name])
            dtype = _target_dtype(where, data_name, model_name, spec.dtype, a.dtype)
            if a.ndim == len(spec.shape) - 1:  # one sample without its batch dim
                a = a[None]
            _check_sample_dims(where, data_name, model_name, spec, a.shape)
            inputs[model_name] = np.ascontiguousarray(a, dtype=dtype)
        sizes = {a.shape[0] for a in inputs.values()}
        if len(sizes) > 1:
            raise DataError(f"{where}: inputs have different batch sizes {sorted(sizes)}")
        if labels is not None:
            labels = np.atleast_1d(np.asarray(labels))
            labels = _check_labels(where, labels, sizes.pop())
        return Batch(inputs, labels)

    def _batches(self) -> Iterator[Batch]:
        bs, left = self.batch_size, self.limit
        pending: list[Batch] = []
        pending_n = 0

        def signature(b: Batch) -> tuple:
            return (tuple((k, v.shape[1:]) for k, v in b.inputs.items()), b.labels is not None)

        def merged() -> Batch:
            inputs = {k: np.concatenate([b.inputs[k] for b in pending]) for k in pending[0].inputs}
            labels = None if pending[0].labels is None else np.concatenate([b.labels for b in pending])  # type: ignore[misc]
            return Batch(inputs, labels)

        def cut(b: Batch, lo: int, hi: int) -> Batch:
            return Batch({k: v[lo:hi] for k, v in b.inputs.items()}, None if b.labels is None else b.labels[lo:hi])

        for index, item in enumerate(self._items()):
            b = self._check_item(item, index)
            if left is not None:
                if b.size > left:
                    b = cut(b, 0, left)
                left -= b.size
            if b.size == 0:
                if left == 0:
                    break
                continue
            if pending and signature(pending[0]) != signature(b):
                yield from self._flush(merged())
                pending, pending_n = [], 0
            pending.append(b)
            pending_n += b.size
            if pending_n >= bs:
                whole = merged()
                full = (pending_n // bs) * bs
                for lo in range(0, full, bs):
                    yield cut(whole, lo, lo + bs)
                rest = cut(whole, full, pending_n)
                pending, pending_n = ([rest] if rest.size else []), rest.size
            if left == 0:
                break
        if pending:
            yield from self._flush(merged())

    def _flush(self, b: Batch) -> Iterator[Batch]:
        """Emit a partial batch (smaller than batch_size); a fixed batch size cannot take it."""
        if self.static_batch is not None and b.size != self.static_batch:
            log.warning("%s: the model fixes the batch size to %d; dropping %d sample(s)", self.name, self.static_batch, b.size)
            return
        yield b


class _SlicedSource(DataSource):
    """The samples of ``inner`` at the positions a split / offset / limit keeps (module docstring),
    re-batched; for the sources whose samples are not listed up front (.npz, readers, iterables)."""

    def __init__(self, inner: DataSource, split: Split | None, offset: int, limit: int | None) -> None:
        label = ", ".join(x for x in (str(split) if split else "", f"offset {offset}" if offset else "") if x)
        super().__init__(f"{inner.name} [{label}]", inner.specs, inner.batch_size, None, inner.reiterable, limit)
        self._inner, self._split, self._offset = inner, split, offset
        if inner.num_samples is not None:
            self.num_samples = self._usable(len(select_positions(inner.num_samples, split, offset, None)))

    def _batches(self) -> Iterator[Batch]:
        bs, left, skip = self.batch_size, self.limit, self._offset
        pending: list[Batch] = []
        pending_n = 0
        start = 0
        for b in self._inner:
            pos = np.arange(start, start + b.size, dtype=np.int64)  # (size,)
            start += b.size
            keep = np.flatnonzero(self._split.keeps(pos)) if self._split is not None else np.arange(b.size)
            if skip:
                dropped = min(skip, len(keep))
                keep, skip = keep[dropped:], skip - dropped
            if left is not None:
                keep = keep[:left]
                left -= len(keep)
            if len(keep):
                pending.append(Batch({k: v[keep] for k, v in b.inputs.items()}, None if b.labels is None else b.labels[keep]))
                pending_n += len(keep)
            while pending_n >= bs:
                whole = Batch({k: np.concatenate([x.inputs[k] for x in pending]) for k in pending[0].inputs},
                              None if pending[0].labels is None else np.concatenate([x.labels for x in pending]))  # type: ignore[misc]
                yield Batch({k: v[:bs] for k, v in whole.inputs.items()}, None if whole.labels is None else whole.labels[:bs])
                rest = Batch({k: v[bs:] for k, v in whole.inputs.items()}, None if whole.labels is None else whole.labels[bs:])
                pending, pending_n = ([rest] if rest.size else []), rest.size
            if left == 0:
                break
        if pending_n:
            if self.static_batch is not None and pending_n != self.static_batch:
                log.warning("%s: the model fixes the batch size to %d; dropping %d sample(s)", self.name, self.static_batch, pending_n)
                return
            yield Batch({k: np.concatenate([x.inputs[k] for x in pending]) for k in pending[0].inputs},
                        None if pending[0].labels is None else np.concatenate([x.labels for x in pending]))  # type: ignore[misc]


def open_data(
    spec: Any,
    model_inputs: Mapping[str, Any],
    *,
    limit: int | None = None,
    batch_size: int = 32,
    preprocess: PreprocessSpec | None = None,
    offset: int = 0,
    split: Split | str | None = None,
    labels: str | os.PathLike | None = None,
    class_map: str | os.PathLike | Mapping[str, int] | None = None,
) -> DataSource:
    """Open calibration/evaluation data for a model whose inputs are ``model_inputs``.

    ``model_inputs`` maps each input name to ``(shape, dtype)`` (see :func:`input_specs`), with
    None or a symbol name for dynamic dims. ``spec`` is a ``.npz`` path, an image folder, a reader
    with ``get_next()``, or an iterable of dicts of arrays (see the module docstring). ``limit``
    caps the number of samples. File sources are checked here (names, dtypes, shapes, labels);
    NaN/inf and emptiness are checked as batches stream.

    ``split`` (``fold:I/K`` / ``rest:I/K`` or a :class:`Split`) and ``offset`` select a slice of any
    source before ``limit`` applies (module docstring). Image folders only: ``labels``, a labels
    file for a flat folder (:func:`read_labels_file`), and ``class_map``, a file
    (:func:`read_class_map`) or dict of class name -> index, which numbers class sub-folders (or
    turns the class names of a labels file into indices).
    """
    specs = _normalise_specs(model_inputs)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ConfigError(f"offset must be an integer >= 0, got {offset!r}")
    split = Split.parse(split) if split is not None else None
    folder = isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir()
    if (labels is not None or class_map is not None) and not folder and not (
            isinstance(spec, (str, os.PathLike)) and not Path(spec).exists()):
        what = "--labels" if labels is not None else "--class-map"
        raise DataError(f"{spec if isinstance(spec, (str, os.PathLike)) else 'data'}: {what} applies to image folders only "
                        f"(an .npz carries its own 'labels' array)")
    if folder:
        lf = read_labels_file(labels) if labels is not None else None
        cmap = dict(class_map) if isinstance(class_map, Mapping) else (read_class_map(class_map) if class_map is not None else None)
        return _ImageFolderSource(Path(spec), specs, preprocess, batch_size, limit, lf, cmap, split, offset)
    if split is not None or offset:
        return _SlicedSource(open_data(spec, model_inputs, batch_size=batch_size, preprocess=preprocess), split, offset, limit)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.suffix.lower() == ".npz":
            return _NpzSource(path, specs, batch_size, limit)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        raise DataError(f"{path}: unsupported data file; expected a .npz file or an image folder")
    if isinstance(spec, Mapping) and not callable(getattr(spec, "get_next", None)):
        # one dict of arrays holding every sample (an .npz in memory)
        return _IterableSource([dict(spec)], specs, batch_size, limit)
    if callable(getattr(spec, "get_next", None)) or isinstance(spec, Iterable):
        if isinstance(spec, bytes):
            raise DataError(f"data must be a path, a reader or an iterable of dicts, got a {type(spec).__name__}")
        return _IterableSource(spec, specs, batch_size, limit)
    raise DataError(f"data must be a .npz path, an image folder, a reader or an iterable of dicts, got {type(spec).__name__}")
