"""Evaluate a model on data: accuracy, agreement with a reference model, latency.

``evaluate`` streams the data once through one session per model (built once). The **first graph
output is taken as the logits**, shape (batch, classes) (a (batch, 1, ..., classes) output is
flattened to that). Metrics are accumulated batch by batch with
:class:`onnx_mptq.numerics.metrics.MetricAccumulator`; no outputs are stored.

Units of :class:`EvaluationReport`: top1 / top5 / top1_agreement in percent (0..100), cosine as
a fraction in [-1, 1] (mean per-sample cosine of the logits), sqnr_db in dB over all logits, kl
in nats (mean KL(softmax(ref) || softmax(model))), latencies in milliseconds. top1/top5 need
labels, the agreement metrics need a reference; they are None otherwise. ``reference_top1`` /
``reference_top5`` are the reference model's own accuracy on the same samples (labels and a
reference needed), so a quantized model's drop reads off one report. ``sqnr_db`` is +inf when
the outputs are identical; JSON cannot hold inf, so the JSON form has null there (null sqnr_db
with a non-null top1_agreement therefore means "identical").

Latency: the median of several timed runs (after a warm-up) of the evaluated model alone, at
batch 1 and at ``latency_batch_size``, on real samples from the data (repeated where the data
has fewer). A model with a fixed batch dim is timed only at that size (the other field is None).

``compare_outputs`` runs two models on the same inputs and reports how far their
outputs differ: the numerical-invariance check of every equivalence-preserving graph pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from .calibrate.session import ModelLike, Session, make_session
from .config import RuntimeConfig
from .data import Batch, DataSource
from .errors import DataError, UnsupportedModelError
from .numerics.metrics import MetricAccumulator
from .records import Record

log = logging.getLogger(__name__)

_WARMUP = 2
_MIN_RUNS = 5
_MAX_RUNS = 100
_BUDGET_S = 0.5  # keep timing a measurement after _MIN_RUNS until this much time has passed


@dataclasses.dataclass(frozen=True)
class EvaluationReport(Record):
    """What ``evaluate`` measured; None where a metric does not apply (see the module doc)."""

    KIND: ClassVar[str] = "evaluation"
    SCHEMA_VERSION: ClassVar[int] = 1

    num_samples: int
    top1: float | None = None  # percent, needs labels
    top5: float | None = None  # percent, needs labels and >= 5 classes
    top1_agreement: float | None = None  # percent of samples whose argmax equals the reference's
    cosine: float | None = None  # mean per-sample cosine with the reference logits, in [-1, 1]
    sqnr_db: float | None = None  # dB; +inf (null in JSON) when identical to the reference
    kl: float | None = None  # nats, KL(softmax(reference) || softmax(model))
    latency_ms_b1: float | None = None
    latency_ms_batch: float | None = None
    provider: str | None = None  # the ORT provider that ran the model
    reference_top1: float | None = None  # percent: the reference's own top-1 on the same samples
    reference_top5: float | None = None


def _logits(out: np.ndarray, batch: int, where: str) -> np.ndarray:
    """The first output as (batch, classes)."""
    if out.ndim >= 2 and out.shape[0] == batch and math.prod(out.shape[1:-1]) == 1:
        return out.reshape(batch, out.shape[-1])  # (B, classes)
    raise UnsupportedModelError(
        f"{where}: the first graph output has shape {tuple(out.shape)}; evaluate needs (batch, classes) logits"
    )


def _check_inputs(session: Session, data: DataSource, what: str) -> None:
    if set(session.input_names) != set(data.input_names):
        raise DataError(
            f"{data.name}: data has inputs {', '.join(data.input_names)}; {what} inputs are {', '.join(session.input_names)}"
        )


def _check_reference_shapes(session: Session, batch: Batch, name: str) -> None:
    """The reference must take the data as the evaluated model does: name it and both shapes."""
    for inp, shape in zip(session.input_names, session.input_shapes):
        got = batch.inputs[inp].shape
        if len(shape) != len(got) or any(isinstance(d, int) and d != g for d, g in zip(shape[1:], got[1:])):
            want = "x".join(str(d) if isinstance(d, int) else "?" for d in shape)
            raise DataError(
                f"{name}: input {inp!r} expects {want} but the data gives {'x'.join(map(str, got))} "
                f"(dim 0 is the batch); the reference must take the same inputs as the evaluated model"
            )


def _fixed_batch(session: Session) -> int | None:
    fixed = {s[0] for s in session.input_shapes if s and isinstance(s[0], int)}
    return fixed.pop() if len(fixed) == 1 else None


def _median_ms(session: Session, feeds: Mapping[str, np.ndarray]) -> float:
    for _ in range(_WARMUP):
        session.run(feeds)
    times: list[float] = []
    deadline = time.perf_counter() + _BUDGET_S
    while len(times) < _MAX_RUNS and (len(times) < _MIN_RUNS or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def _repeat(samples: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``n`` samples taken cyclically from ``samples`` (each (k, ...))."""
    k = next(iter(samples.values())).shape[0]
    idx = np.arange(n) % k  # (n,)
    return {name: np.ascontiguousarray(a[idx]) for name, a in samples.items()}


def evaluate(
    model: ModelLike,
    data: DataSource,
    runtime: RuntimeConfig,
    *,
    reference: ModelLike | None = None,
    latency_batch_size: int | None = None,
    progress: bool = True,
    reference_name: str = "reference model",
) -> EvaluationReport:
    """Run ``model`` (and ``reference``, on the same batches) over ``data``; see the module doc.

    ``reference_name`` names the reference in messages (e.g. ``reference model fp32.onnx``)."""
    lat_bs = runtime.batch_size if latency_batch_size is None else latency_batch_size
    if isinstance(lat_bs, bool) or not isinstance(lat_bs, int) or lat_bs < 1:
        raise DataError(f"latency_batch_size must be an integer >= 1, got {latency_batch_size!r}")
    session = make_session(model, runtime)
    _check_inputs(session, data, "model")
    ref_session = None
    if reference is not None:
        ref_session = make_session(reference, runtime)
        _check_inputs(ref_session, data, reference_name)

    fixed = _fixed_batch(session)
    keep = fixed if fixed is not None else max(1, lat_bs)  # samples kept for timing
    kept: list[dict[str, np.ndarray]] = []
    kept_n = 0
    acc = MetricAccumulator(ks=(1, 5))
    labelled: bool | None = None
    classes = 0
    total = getattr(data, "num_batches", None)
    with tqdm(total=total, desc="evaluate", unit="batch", disable=None if progress else True, leave=False) as bar:
        for batch in data:
            has = batch.labels is not None
            if labelled is not None and has != labelled:
                raise DataError(f"{data.name}: some batches have labels and some do not")
            labelled = has
            out = session.run(batch.inputs, session.output_names[:1])[0]
            if ref_session is not None:
                _check_reference_shapes(ref_session, batch, reference_name)
                try:
                    ref_out = ref_session.run(batch.inputs, ref_session.output_names[:1])[0]
                except DataError as e:
                    raise DataError(f"{reference_name} cannot run on the data that {data.name} gives the evaluated model: {e}") from None
                ref = _logits(ref_out, batch.size, reference_name)
                out = _logits(out, batch.size, "model")
            else:
                out = _logits(out, batch.size, "model")
                ref = out  # accuracy only: the accumulator's reference metrics are ignored
            classes = out.shape[1]
            if ref.shape != out.shape:
                raise UnsupportedModelError(
                    f"the model's logits have shape {out.shape[1:]} per batch but {reference_name}'s have {ref.shape[1:]}"
                )
            acc.update(ref, out, batch.labels)
            if kept_n < keep:
                kept.append({k: v[: keep - kept_n] for k, v in batch.inputs.items()})
                kept_n += min(batch.size, keep - (kept_n))
            bar.update(1)
    summary = acc.summary()

    samples = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
    if fixed is None:
        lat_b1 = _median_ms(session, _repeat(samples, 1))
        lat_batch = _median_ms(session, _repeat(samples, lat_bs))
    elif fixed == 1:
        lat_b1, lat_batch = _median_ms(session, _repeat(samples, 1)), None
    else:
        lat_b1, lat_batch = None, _median_ms(session, _repeat(samples, fixed))

    def pct(v: float | None) -> float | None:
        return None if v is None else 100.0 * v

    with_ref = ref_session is not None
    return EvaluationReport(
        num_samples=summary.samples,
        top1=pct(summary.topk[1]) if summary.topk else None,
        top5=pct(summary.topk[5]) if summary.topk and classes >= 5 else None,
        top1_agreement=pct(summary.top1_agreement) if with_ref else None,
        cosine=summary.cosine if with_ref else None,
        sqnr_db=summary.sqnr_db if with_ref else None,
        kl=summary.kl if with_ref else None,
        latency_ms_b1=lat_b1,
        latency_ms_batch=lat_batch,
        provider=session.provider,
        reference_top1=pct(summary.ref_topk[1]) if with_ref and summary.ref_topk else None,
        reference_top5=pct(summary.ref_topk[5]) if with_ref and summary.ref_topk and classes >= 5 else None,
    )


@dataclasses.dataclass(frozen=True)
class OutputDiff:
    """How far two models' outputs are apart over some inputs (all outputs, matched by position)."""

    max_abs: float  # max |a - b|
    rel_max_abs: float  # max |a - b| / max |a|  (0 when both are 0, inf when only a is all zero)
    per_output: dict[str, float]  # output name of model_a -> its max |a - b|


def compare_outputs(
    model_a: ModelLike,
    model_b: ModelLike,
    feeds: Iterable[Mapping[str, np.ndarray] | Batch],
    runtime: RuntimeConfig,
    *,
    optimize: bool = True,
) -> OutputDiff:
    """Run both models on every feed (dicts of inputs, Batch objects or a DataSource)."""
    sa = make_session(model_a, runtime, optimize=optimize)
    sb = make_session(model_b, runtime, optimize=optimize)
    if len(sa.output_names) != len(sb.output_names):
        raise ValueError(f"the models have {len(sa.output_names)} and {len(sb.output_names)} outputs")
    per = dict.fromkeys(sa.output_names, 0.0)
    max_a = 0.0
    n = 0
    for feed in feeds:
        inputs = feed.inputs if isinstance(feed, Batch) else feed
        for name, a, b in zip(sa.output_names, sa.run(inputs), sb.run(inputs)):
            if a.shape != b.shape:
                raise ValueError(f"output {name!r} has shape {a.shape} in model_a but {b.shape} in model_b")
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            diff = float(np.max(np.abs(a64 - b64), initial=0.0))
            per[name] = max(per[name], diff if not math.isnan(diff) else math.inf)
            max_a = max(max_a, float(np.max(np.abs(a64), initial=0.0)))
        n += 1
    if n == 0:
        raise ValueError("compare_outputs needs at least one feed")
    max_abs = max(per.values())
    rel = max_abs / max_a if max_a > 0 else (0.0 if max_abs == 0 else math.inf)
    return OutputDiff(max_abs=max_abs, rel_max_abs=rel, per_output=per)
