"""Per-channel statistics of intermediate tensors, streamed over calibration data.

``collect_channel_stats(model, tensors, data, runtime)`` exposes the requested tensors as extra
graph outputs on a *copy* of the model (the caller's proto is untouched), builds one ONNX Runtime
session and runs it batch by batch. Each batch is reduced at once over every axis but the last
(the channel axis) into float64 accumulators::

    count   += rows                       # rows = prod(shape[:-1])
    sum_c   += sum_rows x[..., c]
    min_c    = min(min_c, min_rows x[..., c])
    max_c    = max(max_c, max_rows x[..., c])

so memory does not grow with the number of batches. The result is a :class:`CalibrationStats`
record bound to the model by its graph digest: per tensor the channel count, the number of rows
reduced, and per channel the mean, min, max and absmax (``max(|min|, |max|)``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from tqdm import tqdm

from ..config import RuntimeConfig
from ..data import Batch
from ..errors import CalibrationError
from ..graph.edit import produced_tensors, with_outputs
from ..graph.io import graph_digest
from ..records import Record

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChannelStats:
    """Statistics of one tensor over its last axis (C channels)."""

    tensor: str
    channels: int
    count: int  # rows reduced: prod(shape[:-1]) summed over batches
    mean: tuple[float, ...]  # (C,)
    min: tuple[float, ...]  # (C,)
    max: tuple[float, ...]  # (C,)
    absmax: tuple[float, ...]  # (C,) max(|min|, |max|)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, min, max) as float64 arrays of shape (C,)."""
        return (np.asarray(self.mean, dtype=np.float64), np.asarray(self.min, dtype=np.float64),
                np.asarray(self.max, dtype=np.float64))


@dataclasses.dataclass(frozen=True)
class CalibrationStats(Record):
    KIND = "calibration_stats"
    SCHEMA_VERSION = 1

    model_digest: str
    samples: int  # calibration samples (dim 0 of the inputs) seen
    tensors: tuple[ChannelStats, ...]

    def get(self, tensor: str) -> ChannelStats:
        for s in self.tensors:
            if s.tensor == tensor:
                return s
        raise KeyError(f"calibration statistics have no tensor {tensor!r}")

    def __contains__(self, tensor: object) -> bool:
        return any(s.tensor == tensor for s in self.tensors)


@dataclasses.dataclass
class _Acc:
    """float64 running reductions of one tensor."""

    count: int = 0
    total: np.ndarray | None = None  # (C,)
    lo: np.ndarray | None = None  # (C,)
    hi: np.ndarray | None = None  # (C,)

    def update(self, name: str, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0:
            x = x.reshape(1, 1)
        rows = x.reshape(-1, x.shape[-1])  # (rows, C)
        if self.total is not None and rows.shape[1] != self.total.shape[0]:
            raise CalibrationError(
                f"tensor {name!r} changed its channel count between batches ({self.total.shape[0]} -> {rows.shape[1]})"
            )
        if rows.shape[0] == 0:
            return
        s = rows.sum(axis=0, dtype=np.float64)  # (C,)
        lo = rows.min(axis=0).astype(np.float64)  # (C,)
        hi = rows.max(axis=0).astype(np.float64)  # (C,)
        if self.total is None:
            self.total, self.lo, self.hi = s, lo, hi
        else:
            self.total += s
            np.minimum(self.lo, lo, out=self.lo)
            np.maximum(self.hi, hi, out=self.hi)
        self.count += int(rows.shape[0])


def _with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors``, each of which must exist."""
    produced = produced_tensors(model)
    for t in tensors:
        if t not in produced:
            raise CalibrationError(f"tensor {t!r} is not produced by any node or graph input of the model")
    return with_outputs(model, tensors)


def collect_channel_stats(
    model: onnx.ModelProto,
    tensors: list[str],
    data: Iterable[Batch],
    runtime: RuntimeConfig,
    progress: bool = True,
) -> CalibrationStats:
    """Per-channel mean/min/max/absmax of ``tensors`` over ``data`` (Batch objects or plain dicts
    of input arrays). A progress bar shows when ``progress`` is True.

    One session; each batch is reduced immediately (memory independent of the number of
    batches). Raises :class:`CalibrationError` when no sample was seen or a statistic is
    non-finite (naming the tensor).
    """
    names = sorted(dict.fromkeys(tensors))
    if not names:
        raise CalibrationError("no tensors requested for calibration statistics")
    from .session import make_session  # onnxruntime is imported when a session is made

    digest = graph_digest(model)
    from .session import make_session  # ORT loads when statistics are collected, not at import

    session = make_session(_with_outputs(model, names), runtime, optimize=True)
    accs = {n: _Acc() for n in names}
    samples = 0
    total = getattr(data, "num_batches", None) or (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]
    quiet = not progress
    for batch in tqdm(data, total=total, desc="calibration statistics", unit="batch", disable=quiet, leave=False):
        inputs = batch.inputs if hasattr(batch, "inputs") else batch  # a Batch, or a plain dict of arrays
        feeds = {k: v for k, v in inputs.items() if k in session.input_names}
        outs = session.run(feeds, names)
        for name, x in zip(names, outs):
            accs[name].update(name, x)
        first = next(iter(feeds.values()), None)
        samples += int(first.shape[0]) if first is not None and np.ndim(first) > 0 else 0
    if samples == 0:
        raise CalibrationError("calibration data yielded no samples")

    records = []
    for name in names:
        a = accs[name]
        if a.count == 0 or a.total is None or a.lo is None or a.hi is None:
            raise CalibrationError(f"tensor {name!r}: no values seen during calibration (empty tensor)")
        mean = a.total / a.count  # (C,)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(a.lo)) and np.all(np.isfinite(a.hi))):
            bad = int(np.flatnonzero(~(np.isfinite(mean) & np.isfinite(a.lo) & np.isfinite(a.hi)))[0])
            raise CalibrationError(f"tensor {name!r}: non-finite statistics (NaN or inf) in channel {bad}")
        absmax = np.maximum(np.abs(a.lo), np.abs(a.hi))  # (C,)
        records.append(
            ChannelStats(
                tensor=name,
                channels=int(mean.shape[0]),
                count=a.count,
                mean=tuple(float(v) for v in mean),
                min=tuple(float(v) for v in a.lo),
                max=tuple(float(v) for v in a.hi),
                absmax=tuple(float(v) for v in absmax),
            )
        )
    log.debug("calibration statistics of %d tensors over %d samples", len(records), samples)
    return CalibrationStats(model_digest=digest, samples=samples, tensors=tuple(records))
