"""Capture the inputs of every quantizable unit, streamed over calibration data.

``capture_unit_inputs(model, analysis, data, runtime)`` exposes every unit's input tensors as
extra graph outputs of a *copy* of the model (the caller's proto is untouched), builds ONE ONNX
Runtime session and runs it batch by batch. What is kept is bounded independently of the number
of batches:

* **Linear inputs** (MatMul / Gemm, including a MatMul patch embedding): a uniform random sample
  of at most ``tokens_per_layer`` token rows ``(tokens, K)`` (``x.reshape(-1, K)``) over *all*
  tokens seen. Reservoir sampling by chunks: when a batch of ``n`` rows arrives after ``N`` rows
  were seen, the number of new rows in a uniform ``R``-subset of the ``N + n`` rows is
  hypergeometric, ``k ~ H(n good, N bad, R drawn)``; keep a uniform ``k``-subset of the new rows
  and a uniform ``(R - k)``-subset of the current reservoir (itself a uniform subset of the old
  rows). By induction the reservoir is a uniform ``R``-subset of every row seen so far.
* **Attention matmuls** (``Q @ K^T``, ``P @ V``): up to ``attn_samples`` full operand pairs,
  slices along dim 0 (a sample, or a window of a sample for Swin): ``a (S, ..., M, K)``,
  ``b (S, ..., K, N)``, chosen by the same reservoir scheme over all slices seen, jointly for both
  operands.
* **Conv patch embedding**: up to ``image_samples`` (<= 8) input images ``(S, C, H, W)``, same
  scheme. The search rebuilds the conv's im2col patches from them in numpy (exact for a conv with
  ``group == 1``; a ViT patch embedding, stride = kernel and no padding, is the usual case), which
  is cheaper than capturing patches.
* **Per-tensor statistics** of every captured tensor over all its elements: count, min, max,
  absmax, the ``tail`` largest and smallest values and largest ``|x|`` (exact; once ``tail``
  values are held only the values beyond the smallest held one are partitioned, which gives the
  same values as partitioning every batch), and a uniform sample of ``value_samples`` values
  (:class:`ValueSample`, updated in place). :meth:`TensorStats.percentile` is exact (numpy's linear
  interpolation) whenever the requested rank falls inside the kept tails -- e.g. the 99.99th
  percentile of up to ``tail / 1e-4`` elements -- and otherwise estimated from the reservoir.

Determinism: every tensor (and every attention pair) draws from its own
``np.random.Generator`` seeded by ``(seed, crc32(name))``, so the result depends only on the seed,
the data and its order, not on which other tensors are captured.

Graph inputs (the image) are taken from the feeds, not added as outputs.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import zlib
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from tqdm import tqdm

from ..config import RuntimeConfig
from ..errors import CalibrationError, DataError
from ..graph.analysis import ModelAnalysis, Role, Unit
from .stats import _with_outputs  # one helper adds extra graph outputs for calibration

log = logging.getLogger(__name__)

DEFAULT_TAIL = 8192  # exact tail values kept per tensor (each of: top, bottom, top |x|)
DEFAULT_VALUE_SAMPLES = 1 << 16  # reservoir of values per tensor (percentile estimate)
MAX_IMAGE_SAMPLES = 8


class CaptureKind(str, enum.Enum):
    LINEAR = "linear"  # token rows (tokens, K)
    ATTENTION = "attention"  # operand pairs of a batched matmul
    CONV = "conv"  # input images of the patch-embedding conv


# ---------------------------------------------------------------------------------------------
# records


@dataclasses.dataclass(frozen=True, eq=False)
class TensorStats:
    """Streaming statistics of one tensor over every element seen."""

    tensor: str
    count: int  # elements seen
    min: float
    max: float
    absmax: float
    top: np.ndarray  # (<= tail,) float32 ascending: the largest values
    bottom: np.ndarray  # (<= tail,) float32 ascending: the smallest values
    abs_top: np.ndarray  # (<= tail,) float32 ascending: the largest |x|
    sample: np.ndarray  # (<= value_samples,) float32: uniform sample of the values

    def percentile(self, q: float, absolute: bool = False) -> float:
        """``np.percentile`` (linear interpolation) of all values seen (of ``|x|`` if
        ``absolute``): exact when the rank is inside the kept tails, else from the sample."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"q must be in [0, 100], got {q!r}")
        n = self.count
        pos = q / 100.0 * (n - 1)  # fractional index in the sorted values
        lo_i, hi_i = int(np.floor(pos)), int(np.ceil(pos))
        frac = pos - lo_i
        upper = self.abs_top if absolute else self.top
        first_upper = n - upper.size  # sorted index of upper[0]
        if lo_i >= first_upper:
            a, b = float(upper[lo_i - first_upper]), float(upper[hi_i - first_upper])
            return a + (b - a) * frac
        if not absolute and hi_i < self.bottom.size:
            a, b = float(self.bottom[lo_i]), float(self.bottom[hi_i])
            return a + (b - a) * frac
        if self.sample.size == 0:
            raise CalibrationError(f"tensor {self.tensor!r}: no values sampled")
        vals = np.abs(self.sample) if absolute else self.sample
        return float(np.percentile(vals.astype(np.float64), q))


@dataclasses.dataclass(frozen=True, eq=False)
class UnitCapture:
    """What was kept for one unit (see the module docstring)."""

    unit: str
    kind: CaptureKind
    tensors: tuple[str, ...]  # the quantized operands, in the unit's input order
    rows: np.ndarray | None = None  # LINEAR: (tokens, K) float32
    pairs: tuple[np.ndarray, np.ndarray] | None = None  # ATTENTION: a (S, ..., M, K), b (S, ..., K, N)
    images: np.ndarray | None = None  # CONV: (S, C, H, W) float32
    seen: int = 0  # rows (LINEAR) or dim-0 slices (ATTENTION, CONV) seen in all
    elems_per_sample: tuple[int, ...] = ()  # per operand: elements per calibration sample

    @property
    def kept(self) -> int:
        if self.rows is not None:
            return int(self.rows.shape[0])
        if self.pairs is not None:
            return int(self.pairs[0].shape[0])
        return int(self.images.shape[0]) if self.images is not None else 0


@dataclasses.dataclass(frozen=True, eq=False)
class CapturedInputs:
    """Captured unit inputs and per-tensor statistics, keyed by unit / tensor name."""

    model_digest: str  # the analysed graph (``ModelAnalysis.model_digest``)
    units: Mapping[str, UnitCapture]
    stats: Mapping[str, TensorStats]
    samples: int  # calibration samples seen
    batches: int
    seed: int
    tokens_per_layer: int
    attn_samples: int

    def __getitem__(self, unit: str) -> UnitCapture:
        try:
            return self.units[unit]
        except KeyError:
            raise CalibrationError(f"no captured inputs for unit {unit!r}") from None

    def __contains__(self, unit: object) -> bool:
        return unit in self.units

    def operand_stats(self, unit: str) -> tuple[TensorStats, ...]:
        return tuple(self.stats[t] for t in self[unit].tensors)


# ---------------------------------------------------------------------------------------------
# streaming accumulators


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


class _StreamSample:
    """What both stream samplers hold: at most ``capacity`` items, the seeded generator drawing
    which are kept, and how many items the stream has shown so far."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.rng = rng
        self.seen = 0


class Reservoir(_StreamSample):
    """Uniform sample without replacement of at most ``capacity`` slices along dim 0 of a stream
    of array chunks; several arrays sharing dim 0 are sampled jointly (same slices).

    ``data`` is the sample in its logical order: the kept old slices in their order, then the
    new ones in theirs. The slices live in fixed buffers of ``capacity`` slots with a slot map
    (logical position -> slot): a chunk writes only its kept slices into freed slots, instead of
    copying the whole sample, and ``data`` gathers the slots in logical order when read (the
    same arrays, drawn with the same random numbers, as concatenating at every chunk)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        _StreamSample.__init__(self, capacity, rng)
        self._buf: tuple[np.ndarray, ...] | None = None  # (capacity, ...) per array
        self._order = np.zeros(0, np.int64)  # slot of each logical position
        self._data: tuple[np.ndarray, ...] | None = None  # cached gather

    @property
    def data(self) -> tuple[np.ndarray, ...] | None:
        if self._buf is None:
            return None
        if self._data is None:
            o = self._order
            if not np.array_equal(o, np.arange(o.size)):
                # gather once into logical order; the gathered arrays become the buffers (no second copy)
                self._buf = tuple(b[o] for b in self._buf)
                self._order = np.arange(o.size)
            elif o.size < self._buf[0].shape[0]:  # never filled: keep only the held slices
                self._buf = tuple(b[:o.size].copy() for b in self._buf)
            self._data = tuple(b[:o.size] for b in self._buf)
        return self._data

    def add(self, *arrays: np.ndarray) -> None:
        n = int(arrays[0].shape[0])
        if any(int(a.shape[0]) != n for a in arrays):
            raise ValueError("jointly sampled arrays must share dim 0")
        if n == 0:
            return
        cap = self.capacity
        if self._buf is None:
            self._buf = tuple(np.empty((cap,) + tuple(a.shape[1:]), np.float32) for a in arrays)
        elif any(b.shape[1:] != a.shape[1:] for b, a in zip(self._buf, arrays)):
            raise ValueError(f"slice shape changed from {[b.shape[1:] for b in self._buf]} to "
                             f"{[a.shape[1:] for a in arrays]}")
        held = int(self._order.size)
        total = self.seen + n
        self._data = None
        if self._buf[0].shape[0] < min(cap, total):  # gathered by ``data`` while not full: room again
            self._buf = tuple(np.concatenate([b[:held], np.empty((cap - held,) + b.shape[1:], np.float32)])
                              for b in self._buf)
        if total <= cap:
            for b, a in zip(self._buf, arrays):
                b[held:held + n] = a
            self._order = np.arange(held + n)
        else:
            # k new slices in a uniform cap-subset of all `total` slices seen
            k_new = int(self.rng.hypergeometric(n, self.seen, cap)) if self.seen > 0 else cap
            k_old = cap - k_new
            # the chosen slices in ascending order (a boolean mask: the same as sorting the indices)
            new_idx = _ascending(self.rng.choice(n, size=k_new, replace=False), n) if k_new else np.zeros(0, np.int64)
            old_idx = _ascending(self.rng.choice(held, size=k_old, replace=False), held) if k_old else np.zeros(0, np.int64)
            kept = self._order[old_idx]  # slots of the kept old slices, in logical order
            used = np.zeros(cap, dtype=bool)
            used[kept] = True
            free = np.flatnonzero(~used)[:k_new]  # slots for the new slices
            for b, a in zip(self._buf, arrays):
                b[free] = np.asarray(a)[new_idx]
            self._order = np.concatenate([kept, free])
        self.seen = total


def _ascending(idx: np.ndarray, n: int) -> np.ndarray:
    """``np.sort(idx)`` of distinct indices in ``[0, n)``, as a boolean mask when that is cheaper."""
    if idx.size * 8 < n:
        return np.sort(idx)
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return mask


class ValueSample(_StreamSample):
    """Uniform sample without replacement of at most ``capacity`` values of a stream of 1-d
    chunks (the percentile fallback of :class:`TensorStats`); the same hypergeometric scheme as
    :class:`Reservoir`, but once full the ``k`` new values overwrite a uniform ``k``-subset of
    the held ones in place, so a chunk costs O(k) plus the draw over the chunk, not a copy of
    the whole sample. The sample's order is not meaningful."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        _StreamSample.__init__(self, capacity, rng)
        self.data = np.zeros(0, np.float32)

    def add(self, v: np.ndarray) -> None:
        v = np.asarray(v, dtype=np.float32).ravel()
        n, cap, held = int(v.size), self.capacity, int(self.data.size)
        if n == 0:
            return
        if self.seen + n <= cap:
            self.data = np.concatenate([self.data, v])
        else:
            k_new = int(self.rng.hypergeometric(n, self.seen, cap)) if self.seen > 0 else cap
            new = v[self.rng.choice(n, size=k_new, replace=False)] if k_new else v[:0]
            if held == cap:  # k_new uniform old values make room
                if k_new:
                    self.data[self.rng.choice(held, size=k_new, replace=False)] = new
            elif held:  # first overflow: keep a uniform (cap - k_new)-subset of the held values
                keep = self.rng.choice(held, size=cap - k_new, replace=False)
                self.data = np.concatenate([self.data[keep], new])
            else:
                self.data = new.copy()
        self.seen += n


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest values of a 1-d array, ascending."""
    if x.size > k:
        x = np.partition(x, x.size - k)[x.size - k:]
    return np.sort(x)


def _merge_top(kept: np.ndarray, v: np.ndarray, k: int) -> np.ndarray:
    """The k largest values of ``kept`` (ascending, the k largest seen so far) and ``v``: equal
    to ``_top(concatenate([kept, _top(v, k)]), k)``. Once ``kept`` holds k values, only the
    values of v above its smallest one can enter, so only those are partitioned (one comparison
    pass over v instead of a partition of it)."""
    if kept.size >= k:
        v = v[v > kept[0]]
        if v.size == 0:
            return kept
        # two ascending runs: a stable (merging) sort is linear here
        return np.sort(np.concatenate([kept, _top(v, k)]), kind="stable")[-k:]
    return _top(np.concatenate([kept, _top(v, k)]), k)


class _StatsAcc:
    def __init__(self, name: str, rng: np.random.Generator, tail: int, value_samples: int) -> None:
        self.name = name
        self.tail = tail
        self.count = 0
        self.lo = np.inf
        self.hi = -np.inf
        self.top = np.zeros(0, np.float32)
        self.bottom = np.zeros(0, np.float32)  # stored negated: the largest of -x
        self.abs_top = np.zeros(0, np.float32)
        self.values = ValueSample(value_samples, rng)

    def update(self, x: np.ndarray) -> None:
        v = np.asarray(x, dtype=np.float32).ravel()
        if v.size == 0:
            return
        lo, hi = float(v.min()), float(v.max())  # NaN propagates through min/max, inf shows in them
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise CalibrationError(f"tensor {self.name!r}: non-finite values (NaN or inf) during calibration")
        self.count += int(v.size)
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        t = self.tail
        self.top = _merge_top(self.top, v, t)
        if self.bottom.size >= t:  # the largest of -x: only x below -bottom[0] can enter
            low = v[v < -self.bottom[0]]
            self.bottom = _merge_top(self.bottom, -low, t) if low.size else self.bottom
        else:
            self.bottom = _merge_top(self.bottom, -v, t)
        self.abs_top = _merge_top(self.abs_top, np.abs(v), t)
        self.values.add(v)

    def result(self) -> TensorStats:
        if self.count == 0:
            raise CalibrationError(f"tensor {self.name!r}: no values seen during calibration (empty tensor)")
        sample = self.values.data
        return TensorStats(
            tensor=self.name, count=self.count, min=float(self.lo), max=float(self.hi),
            absmax=float(max(abs(self.lo), abs(self.hi))),
            top=self.top, bottom=np.sort(-self.bottom), abs_top=self.abs_top, sample=sample,
        )


# ---------------------------------------------------------------------------------------------
# capture


def _kind_of(unit: Unit) -> CaptureKind:
    if unit.role in (Role.ATTN_QK, Role.ATTN_AV):
        return CaptureKind.ATTENTION
    if unit.op_type == "Conv":
        return CaptureKind.CONV
    return CaptureKind.LINEAR


def _batch_count(data: Iterable) -> int | None:
    """Number of batches for the progress bar, when the source knows it."""
    if hasattr(data, "__len__"):
        return len(data)  # type: ignore[arg-type]
    n, size = getattr(data, "num_samples", None), getattr(data, "batch_size", None)
    if isinstance(n, int) and isinstance(size, int) and size > 0:
        limit = getattr(data, "limit", None)
        n = min(n, limit) if isinstance(limit, int) else n
        return -(-n // size)
    return None


def _batch_inputs(batch) -> dict[str, np.ndarray]:
    inputs = getattr(batch, "inputs", batch)
    if not isinstance(inputs, Mapping):
        raise DataError(f"calibration data must yield Batch objects or dicts of arrays, got {type(batch).__name__}")
    return dict(inputs)


def _leading_pair(a: np.ndarray, b: np.ndarray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Broadcast the leading (batch) dims of a batched-matmul operand pair to one shape."""
    if a.ndim < 2 or b.ndim < 2:
        raise CalibrationError(f"unit {unit}: attention operands must be at least 2-d, got {a.shape} and {b.shape}")
    if a.ndim == b.ndim and a.shape[:-2] == b.shape[:-2]:
        return a, b
    try:
        lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise CalibrationError(f"unit {unit}: attention operands {a.shape} and {b.shape} do not broadcast") from None
    return np.broadcast_to(a, lead + a.shape[-2:]), np.broadcast_to(b, lead + b.shape[-2:])


def capture_unit_inputs(
    model: onnx.ModelProto,
    analysis: ModelAnalysis,
    data: Iterable,
    runtime: RuntimeConfig,
    *,
    tokens_per_layer: int = 4096,
    attn_samples: int = 8,
    image_samples: int = MAX_IMAGE_SAMPLES,
    tail: int = DEFAULT_TAIL,
    value_samples: int = DEFAULT_VALUE_SAMPLES,
    seed: int = 0,
    progress: bool = True,
    fetch_bytes: int = 256 * 2**20,
) -> CapturedInputs:
    """Stream ``data`` (an iterable of :class:`onnx_mptq.data.Batch` or of dicts of model inputs)
    through ``model`` once and keep, for every unit of ``analysis``, a bounded sample of its
    inputs plus streaming statistics of every captured tensor (module docstring).

    Raises :class:`CalibrationError` when no sample was seen, a tensor is missing or non-finite.
    """
    for name, v, low in (("tokens_per_layer", tokens_per_layer, 1), ("attn_samples", attn_samples, 1),
                         ("image_samples", image_samples, 1), ("tail", tail, 1), ("value_samples", value_samples, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise CalibrationError(f"{name} must be an integer >= {low}, got {v!r}")
    image_samples = min(image_samples, MAX_IMAGE_SAMPLES)
    graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    units = list(analysis.units)
    if not units:
        raise CalibrationError("the analysis has no quantizable units to capture inputs for")

    tensors = sorted({t for u in units for t in u.inputs})
    fetched = [t for t in tensors if t not in graph_inputs]
    from .session import make_session  # ORT loads when a capture runs, not when search/ is imported

    session = make_session(_with_outputs(model, fetched), runtime, optimize=True)

    stats = {t: _StatsAcc(t, _rng(seed, "stats:" + t), tail, value_samples) for t in tensors}
    rows: dict[str, Reservoir] = {}  # per tensor (Linear inputs shared by several units)
    pairs: dict[str, Reservoir] = {}  # per attention unit
    images: dict[str, Reservoir] = {}  # per conv input tensor
    for u in units:
        kind = _kind_of(u)
        if kind is CaptureKind.LINEAR:
            rows.setdefault(u.inputs[0], Reservoir(tokens_per_layer, _rng(seed, "rows:" + u.inputs[0])))
        elif kind is CaptureKind.ATTENTION:
            pairs[u.name] = Reservoir(attn_samples, _rng(seed, "pairs:" + u.name))
        else:
            images.setdefault(u.inputs[0], Reservoir(image_samples, _rng(seed, "images:" + u.inputs[0])))
    width: dict[str, int] = {}

    def _absorb(values: dict[str, np.ndarray]) -> None:
        """Fold one run's tensors into the statistics and reservoirs (nothing else is kept)."""
        for t in tensors:
            stats[t].update(values[t])
        for t, res in rows.items():
            x = values[t]
            k = int(x.shape[-1]) if x.ndim else 1
            if width.setdefault(t, k) != k:
                raise CalibrationError(f"tensor {t!r}: last dimension changed from {width[t]} to {k} between batches")
            res.add(x.reshape(-1, k))
        for u in units:
            if u.name in pairs:
                a, b = _leading_pair(values[u.inputs[0]], values[u.inputs[1]], u.name)
                pairs[u.name].add(a, b)
        for t, res in images.items():
            res.add(values[t])

    chunk: int | None = None
    samples = batches = 0
    total = _batch_count(data)
    quiet = not progress
    for batch in tqdm(data, total=total, desc="capture unit inputs", unit="batch", disable=quiet, leave=False):
        feeds = _batch_inputs(batch)
        missing = [n for n in session.input_names if n not in feeds]
        if missing:
            raise DataError(f"calibration batch lacks model input(s) {', '.join(missing)}")
        n_samples = int(next(iter(feeds[n] for n in session.input_names)).shape[0])
        for start in range(0, n_samples, chunk or n_samples):
            stop = min(n_samples, start + (chunk or n_samples))
            part = {n: feeds[n][start:stop] for n in session.input_names}
            outs = session.run(part, fetched) if fetched else []
            if chunk is None:  # bound what one run fetches: ~fetch_bytes per run, whatever the batch
                per_sample = sum(o.nbytes for o in outs) / max(stop - start, 1)
                chunk = max(1, int(fetch_bytes // max(per_sample, 1.0)))
            values = dict(zip(fetched, outs))
            for t in tensors:
                if t not in values:
                    values[t] = np.asarray(part[t] if t in part else feeds[t][start:stop], dtype=np.float32)
            _absorb(values)
            del outs, values
        samples += n_samples
        batches += 1
    if samples == 0:
        raise CalibrationError("calibration data yielded no samples")

    stats_out = {t: stats[t].result() for t in tensors}
    captured: dict[str, UnitCapture] = {}
    for u in units:
        kind = _kind_of(u)
        elems = tuple(int(round(stats_out[t].count / samples)) for t in u.inputs)
        if kind is CaptureKind.LINEAR:
            res = rows[u.inputs[0]]
            captured[u.name] = UnitCapture(u.name, kind, tuple(u.inputs), rows=res.data[0], seen=res.seen,
                                           elems_per_sample=elems)
        elif kind is CaptureKind.ATTENTION:
            res = pairs[u.name]
            captured[u.name] = UnitCapture(u.name, kind, tuple(u.inputs), pairs=(res.data[0], res.data[1]),
                                           seen=res.seen, elems_per_sample=elems)
        else:
            res = images[u.inputs[0]]
            captured[u.name] = UnitCapture(u.name, kind, tuple(u.inputs), images=res.data[0], seen=res.seen,
                                           elems_per_sample=elems)
    log.debug("captured inputs of %d units over %d samples (%d batches)", len(captured), samples, batches)
    return CapturedInputs(
        model_digest=analysis.model_digest, units=captured, stats=stats_out, samples=samples, batches=batches,
        seed=seed, tokens_per_layer=tokens_per_layer, attn_samples=attn_samples,
    )
