"""The searches' evaluation graph and evaluator, built in one place.

Mixed precision and OPT-m's network-level choice measure candidate assignments on the same
kind of evaluator: a :class:`~onnx_mptq.evaluate.evaluator.ParamEvaluator` of the parametric
graph of :func:`evaluation_graph`, on a seeded calibration subset whose size is either given or
set by compute (:func:`subset_size`), run in chunks small enough that the widest captured
operand of a chunk stays under ``EVAL_CHUNK_ELEMS`` elements::

    chunk = min(runtime.batch_size, max(1, EVAL_CHUNK_ELEMS // widest operand elements per sample))

This module imports neither ONNX Runtime nor the evaluator at import time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import onnx

from ..config import Config
from ..graph.analysis import ModelAnalysis
from .fakequant import ParamGraph, build_param_graph

if TYPE_CHECKING:
    from ..calibrate.capture import CapturedInputs
    from .evaluator import ParamEvaluator

SUBSET_MACS = 1.5e11  # multiply-accumulates of one evaluation of the default subset (35 DeiT-S images)
SUBSET_RANGE = (32, 1024)  # the default subset's bounds (samples)
EVAL_CHUNK_ELEMS = 1 << 21  # samples per evaluation run: the widest captured operand stays under this


def integer_evaluation(cfg: Config) -> bool:
    """Whether every quantizer this configuration can plan fits the integer evaluation graph
    (:func:`onnx_mptq.evaluate.fakequant.build_param_graph`): all but twin quantizers outside the
    uint8 lattice, which only ``quant.optm.lattice = False`` searches."""
    return not cfg.quant.optm.enabled or cfg.quant.optm.lattice


def evaluation_graph(model: onnx.ModelProto, analysis: ModelAnalysis, cfg: Config) -> ParamGraph:
    """The parametric graph the network-level searches evaluate candidates in (mixed precision,
    OPT-m selection): integer where :func:`integer_evaluation` allows, with uint8 weight codes on
    CPUs whose ``uint8 x int8`` kernel saturates."""
    from ..calibrate.session import cpu_u8s8_exact

    return build_param_graph(model, analysis, integer=integer_evaluation(cfg),
                             weight_dtype="int8" if cpu_u8s8_exact() else "uint8")


def macs_per_sample(analysis: ModelAnalysis, captured: "CapturedInputs") -> float:
    """Multiply-accumulates of the Linear and Conv units per sample: input elements times output
    channels (exact for Linears and for a Conv whose stride equals its kernel, as patch
    embeddings have; attention matmuls are left out, a small share in ViTs)."""
    total = 0.0
    for u in analysis.units:
        if u.out_features and u.name in captured:
            total += float(captured[u.name].elems_per_sample[0]) * float(u.out_features)
    return total


def subset_size(requested: int | None, analysis: ModelAnalysis, captured: "CapturedInputs") -> int:
    """Samples of a network-level evaluation subset: ``requested``, or (None) as many as
    ``SUBSET_MACS`` of compute per evaluation allows, within ``SUBSET_RANGE``. More samples make
    the measured differences less noisy: on mnist-vit at a 5-bit budget, 32 samples allocated bits
    that tied uniform W5A5 on agreement, the whole 1,000-sample calibration set beat it on top-1,
    agreement, SQNR and KL (BENCHMARKS.md section 5); DeiT-S (4.24 GMAC) gets 35, for search time."""
    if requested is not None:
        return int(requested)
    macs = max(macs_per_sample(analysis, captured), 1.0)
    lo, hi = SUBSET_RANGE
    return int(min(hi, max(lo, SUBSET_MACS // macs)))


def eval_chunk(analysis: ModelAnalysis, captured: "CapturedInputs", batch_size: int) -> int:
    """Samples per evaluation run (module docstring)."""
    widest = max((e for u in analysis.units for e in captured[u.name].elems_per_sample), default=1)
    return int(min(batch_size, max(1, EVAL_CHUNK_ELEMS // max(widest, 1))))


def make_evaluator(model: onnx.ModelProto, analysis: ModelAnalysis, captured: "CapturedInputs", data: Iterable,
                   config: Config, *, samples: int | None, metric: str,
                   graph: ParamGraph | None = None) -> "ParamEvaluator":
    """The searches' evaluator: a :class:`~onnx_mptq.evaluate.evaluator.ParamEvaluator` of
    ``graph`` (default :func:`evaluation_graph` of ``model``) against ``model`` on
    :func:`subset_size` (``samples``) calibration samples of ``data`` drawn with
    ``config.seed``, measuring ``metric``."""
    from .evaluator import ParamEvaluator

    if graph is None:
        graph = evaluation_graph(model, analysis, config)
    return ParamEvaluator(graph, model, data, config.runtime, samples=subset_size(samples, analysis, captured),
                          seed=config.seed, batch_size=eval_chunk(analysis, captured, config.runtime.batch_size),
                          metric=metric)


__all__ = ["EVAL_CHUNK_ELEMS", "SUBSET_MACS", "SUBSET_RANGE", "eval_chunk", "evaluation_graph", "integer_evaluation",
           "macs_per_sample", "make_evaluator", "subset_size"]
