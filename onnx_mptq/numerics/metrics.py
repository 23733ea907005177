"""Agreement metrics between a reference (FP32) output and a quantized output (numpy only).

Rows are samples: an array of shape (B, ...) is compared sample by sample after flattening the
trailing dims; class dims of logits are the last axis. Sums are accumulated in float64.

* ``sqnr_db = 10 log10(sum ref^2 / sum (ref - out)^2)``; +inf when out == ref, -inf when
  ref is all zero and out is not.
* ``cosine``: mean over samples of ``<r, o> / (|r| |o|)``; a sample whose two vectors are both
  zero counts 1, one zero vector counts 0.
* ``kl_softmax``: mean over samples of ``KL(softmax(ref) || softmax(out))`` along the last axis
  (leading axes flattened into samples), from stable log-softmaxes.
* ``topk_accuracy``: fraction of samples whose label is among the k largest logits (ties broken
  by lower class index, as argmax does); ``top1_agreement``: fraction with equal argmax.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics

import numpy as np

logger = logging.getLogger(__name__)


def _pair(ref: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref)
    out = np.asarray(out)
    if ref.shape != out.shape:
        raise ValueError(f"ref and out shapes differ: {ref.shape} vs {out.shape}")
    return ref.astype(np.float64), out.astype(np.float64)


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """``10 log10(sum ref^2 / sum (ref - out)^2)`` in dB."""
    r, o = _pair(ref, out)
    return _sqnr(float(np.sum(r * r)), float(np.sum((r - o) ** 2)))


def _cosines(r: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Per-sample cosine (B,) of float64 arrays (B, ...)."""
    if r.ndim == 0:
        raise ValueError("need at least one (sample) axis")
    r = r.reshape(r.shape[0], -1)  # (B, D)
    o = o.reshape(o.shape[0], -1)  # (B, D)
    nr = np.linalg.norm(r, axis=1)
    no = np.linalg.norm(o, axis=1)
    dot = np.sum(r * o, axis=1)
    both_zero = (nr == 0) & (no == 0)
    denom = nr * no
    cos = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean per-sample cosine similarity (rows = samples, the rest flattened)."""
    r, o = _pair(ref, out)
    return float(np.mean(_cosines(r, o)))


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax (float64)."""
    x = np.asarray(x, dtype=np.float64)
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable softmax; float32 for float32 input, else float64."""
    x = np.asarray(x)
    y = np.exp(log_softmax(x, axis=axis))
    return y.astype(np.float32) if x.dtype == np.float32 else y


def _kls(ref_logits: np.ndarray, out_logits: np.ndarray) -> np.ndarray:
    """Per-sample KL(softmax(ref) || softmax(out)) along the last axis, leading axes flattened."""
    lp = log_softmax(ref_logits)
    lq = log_softmax(out_logits)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return np.maximum(kl, 0.0).reshape(-1)


def kl_per_sample(ref_logits: np.ndarray, out_logits: np.ndarray) -> np.ndarray:
    """``KL(softmax(ref) || softmax(out))`` of every sample (last axis = classes), float64."""
    r, o = _pair(ref_logits, out_logits)
    return _kls(r, o)


def paired_improvement(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Mean per-sample decrease ``before - after`` and its standard error (paired samples)."""
    d = np.asarray(before, dtype=np.float64).reshape(-1) - np.asarray(after, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("no samples to compare")
    se = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("inf")
    return float(np.mean(d)), se


def family_z(z: float, comparisons: int) -> float:
    """The one-sided threshold (in standard errors) that keeps the chance of ANY false positive
    among ``comparisons`` tests at that of one test at ``z`` (Bonferroni):
    ``Phi^-1(1 - Phi(-z) / comparisons)``; e.g. z = 2 over 25 comparisons -> 3.12."""
    if comparisons <= 1 or not math.isfinite(z):
        return float(z)
    nd = statistics.NormalDist()
    q = 1.0 - nd.cdf(-z) / comparisons
    if not 0.0 < q < 1.0:  # z beyond double precision's tail: already as strict as it gets
        return float(z)
    return float(max(z, nd.inv_cdf(q)))


def kl_softmax(ref_logits: np.ndarray, out_logits: np.ndarray) -> float:
    """Mean ``KL(softmax(ref) || softmax(out))`` over samples (last axis = classes)."""
    r, o = _pair(ref_logits, out_logits)
    return float(np.mean(_kls(r, o)))


def _topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"need logits (B, classes) and labels (B,), got {logits.shape} and {labels.shape}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # (B, k)
    return np.any(top == labels[:, None], axis=1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose label is among the k largest logits."""
    return float(np.mean(_topk_hits(logits, labels, k)))


def _agree(ref_logits: np.ndarray, out_logits: np.ndarray) -> np.ndarray:
    r = np.asarray(ref_logits)
    o = np.asarray(out_logits)
    return (np.argmax(r, axis=-1) == np.argmax(o, axis=-1)).reshape(-1)


def top1_agreement(ref_logits: np.ndarray, out_logits: np.ndarray) -> float:
    """Fraction of samples whose argmax equals the reference argmax."""
    _pair(ref_logits, out_logits)
    return float(np.mean(_agree(ref_logits, out_logits)))


@dataclasses.dataclass(frozen=True)
class MetricSummary:
    """What :class:`MetricAccumulator` reports; accuracies (of out and of ref) are None without
    labels."""

    samples: int
    sqnr_db: float
    cosine: float
    kl: float
    top1_agreement: float
    topk: dict[int, float] | None  # k -> accuracy of out, e.g. {1: 0.81, 5: 0.95}
    ref_topk: dict[int, float] | None  # k -> accuracy of ref

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class MetricAccumulator:
    """Streaming version of the metrics above: feed batches, read :meth:`summary` at the end.

    Keeps only sums: ``sum ref^2``, ``sum (ref - out)^2``, the sums of per-sample cosines and
    KLs, the count of argmax agreements and of top-k hits. The summary equals the functions
    above applied to the concatenated batches. Labels must be given for every batch or none.
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {ks!r}")
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        self._signal = 0.0
        self._noise = 0.0
        self._cos = 0.0
        self._kl = 0.0
        self._kl_rows = 0
        self._agree = 0
        self._agree_rows = 0
        self._hits = {k: 0 for k in self.ks}
        self._ref_hits = {k: 0 for k in self.ks}
        self._samples = 0
        self._labelled: bool | None = None

    def update(self, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add a batch: ref, out (B, ..., classes); labels (B,) or None."""
        r, o = _pair(ref, out)
        if r.ndim == 0:
            raise ValueError("need at least one (sample) axis")
        has = labels is not None
        if self._labelled is not None and has != self._labelled:
            raise ValueError("labels must be given for every batch or for none")
        self._labelled = has
        self._signal += float(np.sum(r * r))
        self._noise += float(np.sum((r - o) ** 2))
        self._cos += float(np.sum(_cosines(r, o)))
        kls = _kls(r, o)
        self._kl += float(np.sum(kls))
        self._kl_rows += kls.size
        agree = _agree(r, o)
        self._agree += int(np.sum(agree))
        self._agree_rows += agree.size
        if has:
            for k in self.ks:  # k above the class count counts every sample
                kk = min(k, o.shape[-1])
                self._hits[k] += int(np.sum(_topk_hits(o, labels, kk)))
                self._ref_hits[k] += int(np.sum(_topk_hits(r, labels, kk)))
        self._samples += r.shape[0]

    def summary(self) -> MetricSummary:
        if self._samples == 0:
            raise ValueError("no batches were added")
        topk = {k: self._hits[k] / self._samples for k in self.ks} if self._labelled else None
        ref_topk = {k: self._ref_hits[k] / self._samples for k in self.ks} if self._labelled else None
        return MetricSummary(
            samples=self._samples,
            sqnr_db=_sqnr(self._signal, self._noise),
            cosine=self._cos / self._samples,
            kl=self._kl / self._kl_rows,
            top1_agreement=self._agree / self._agree_rows,
            topk=topk,
            ref_topk=ref_topk,
        )
