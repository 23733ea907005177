"""Emit a quantization plan as a QDQ ONNX model that ONNX Runtime runs with integer kernels.

``emit_qdq(model, plan, analysis)`` returns an :class:`EmitResult`: a new model (the input proto is
never mutated) and an :class:`EmitReport`. The plan alone decides the model: its quantizers and
its ``emission`` section (:class:`onnx_mptq.plan.Emission`: the symmetric container, the range
form, the twin form, the weight container) -- the same plan gives the same bytes. A quantizer
whose bits were edited without new steps (``bits != step_bits``) gets its steps re-derived for
its bits first (:func:`onnx_mptq.plan.rederive_steps`), logged as a warning and listed in the
result's ``rederived``.

The steps, in order: check the model is not already quantized (:func:`_already_emitted`), open a
named copy bound to the plan's and the analysis's digests (:func:`_open`), check every planned
unit against its node before touching the graph (:func:`_accepted_units`), write each unit's
operands, weight and matmul(s) (:func:`_emit_unit`), the image quantizer where no planned unit
reads it (:func:`_emit_input_quant`), then export, mark and check the model (:func:`_export`).
What it writes, per planned unit (``plan.layers``):

Weights (Linear / patch-embedding Conv), per output channel, symmetric, b bits::

    q_w = clamp(rint(W / s_w[c]), -(2^(b-1) - 1), 2^(b-1) - 1)      stored as int8 (or uint8 q_w + 128)
    W_hat = DequantizeLinear(q_w, s_w, 0, axis)                     (zero point 128 in uint8)

The stored integers are the weight *as the node reads it*: MatMul ``(K, N)``, axis 1 (a
Transpose / Identity / Reshape chain in front of a constant weight is folded into the stored
integers, so the DQ feeds the MatMul directly, which ORT's fusion needs); Gemm ``B`` in its own
layout, axis 0 with ``transB=1`` else 1; Conv ``(O, I, kh, kw)``, axis 0. Zero points are int8
zeros, or uint8 128 for weights whose codes exceed +-64 ("Weights on CPUs without VNNI"). The float initializer disappears unless another node still reads it.

Compensated layers (``LayerPlan.compensation``, :mod:`onnx_mptq.search.compensate`): the integer
codes are the plan's stored ones (:class:`onnx_mptq.plan.CompensatedWeights`, given to
:func:`emit_qdq` and checked against ``plan.weights_digest``), laid out as the node reads them, in
the same int8 / uint8 + 128 containers; a stored bias correction ``delta`` is added to the
layer's constant bias (Conv ``B``, Gemm ``C`` as ``delta / beta``, the Add after a MatMul) or, where
it has none, becomes one (Conv ``B``, Gemm ``C``, ``Add(MatMul, delta)``). A compensated layer whose
weight bits or scales were edited is emitted by nearest rounding without its correction, with a
note (:func:`onnx_mptq.plan.layer_weight`).

Activations, per tensor (one Q/DQ group per (tensor, quantizer), shared by every unit that reads
the tensor with the same quantizer)::

    q = clamp(rint(x / s) + z, qmin, qmax)          x_hat = (q - z) * s

in an 8-bit container: asymmetric -> uint8 with the plan's zero point; symmetric -> by default
uint8 with zero point 128 (codes ``q + 128``: the same grid, see "Why uint8" below) or, with
``emission.symmetric_container = int8``, int8 with zero point 0. QuantizeLinear saturates to
the *container* range, so where ``qrange(b)`` is narrower (b < 8, and symmetric 8-bit, whose code
-128 is excluded) the codes are held to the b-bit range by one more node:

* ``RangeForm.INTEGER`` (default): ``Q -> Clip(int codes, lo, hi) -> DQ``. The Clip runs on the
  1-byte codes; ``clamp(clamp(c, 0, 255), lo, hi) == clamp(c, lo, hi)``, so this is exactly
  :func:`onnx_mptq.numerics.quant.quantize`.
* ``RangeForm.FLOAT``: ``Clip(x, (lo - z) s, (hi - z) s) -> Q -> DQ`` at the dequantized bounds
  (exact as well: a bound divided by s rounds back to its code).

Both keep ORT's DQ -> MatMul fusion (measured: the Clip sits before the DQ). The integer form
touches 1 byte per element instead of 4 (see ``tools/check_int_kernels.py`` for timings).

Twin-region operands (OPT-m, :mod:`onnx_mptq.numerics.twin`), k bits, ``n = 2^(k-1) - 1``,
``delta2 = 2^m delta1``. Every twin value is an integer multiple of delta1 (the power-of-two
ratio), so where the multiples a quantizer can produce span at most 256 codes
(:func:`~onnx_mptq.numerics.twin.lattice_fits`: gelu ``n (2^m + 1) <= 255``, softmax
``n 2^m <= 255``; e.g. every m <= 5 at 4 bits, m <= 2 / 3 at 6 bits) the operand reaches its
matmul as ONE uint8 tensor of codes on the delta1 lattice, ``DQ(e; delta1) @ W_hat``, an ordinary
``MatMulIntegerToFloat`` (``TwinForm.LATTICE``, what ``TwinForm.AUTO``, the default, takes):

* GELU: ``a = LeakyRelu(x, alpha = 2^m)`` (``2^m x`` below 0, exact), so ``rint(a / delta2)`` is
  ``rint(x / delta1)`` below 0 and ``rint(x / delta2)`` above, bit for bit;
  ``c = DQ(Clip(Q(a; delta2, n), 0, 2n); 1, n)`` are the region codes in ``[-n, n]``;
  ``e = Q(LeakyRelu(c, alpha = 2^-m); 2^-m, n)`` maps a positive region code to ``2^m c``: the
  lattice codes (plus n). ORT fuses ``DQ -> LeakyRelu -> Q`` into ``QLinearLeakyRelu`` (a
  256-entry table, exact).
* Softmax (split s): ``v = Where(x < s, DQ(Q(x; delta1)), DQ(Clip(Q(x; delta2), 0, n)))`` (region
  1's codes clipped to n too where ``s > (n + 1/2) delta1``), then ``e = Q(v; delta1)``: the
  values are multiples of delta1, so this requantization is exact. ORT fuses it into
  ``QLinearWhere``.

Where the codes do not fit (or with ``TwinForm.SPLIT``), the matmul is split instead, being
linear: the operand becomes two integer operands whose dequantized values sum to
``twin_fake_quant(x)``::

    y = DQ1(x) @ W_hat + DQ2(x) @ W_hat        (two integer matmuls and an Add)

* GELU (split 0): ``rint(min(x, 0) / d1) == min(rint(x / d1), 0)``, so region 1 is
  ``Q(x; delta1)`` with its codes clipped to ``[-n, 0]`` and region 2 is ``Q(x; delta2)`` clipped
  to ``[0, n]``: no float elementwise op at all (region 1 is stored as uint8 with zero point n,
  region 2 with zero point 0, so QuantizeLinear's saturation gives one bound of each for free).
* Softmax (split s): ``mask = x < s``; ``x1 = Where(mask, x, 0)``, ``x2 = Where(mask, 0, x)``;
  each quantized with zero point 0 and codes clipped to ``[0, n]`` (steps delta1, delta2).

Attention matmuls quantize both operands; a split twin operand there doubles the matmul the same
way (``P @ V -> DQ1(P) @ DQ(V) + DQ2(P) @ DQ(V)``). Measured (random-weight DeiT-S, W4A4, all 24
eligible operands twin, ORT profile at batch 4, 1 thread): the split form spends 1.3x the uniform
model's time in integer matmuls and adds float ``Where``s; the lattice form runs the uniform
model's matmuls and adds about 10 % in elementwise ops (``BENCHMARKS.md`` has the latencies). A
``PRelu`` in place of ``LeakyRelu`` is not fused and was 30x slower there.

Gemm: a float bias ``C`` is moved to an ``Add`` after the Gemm (``alpha A B + beta C ==
Add(Gemm(A, B, alpha), beta C)``), because ORT fuses DQ -> Gemm into ``QGemm`` only when the
bias is absent or itself an int32 DQ; the Add keeps the float bias exact.

The patch embedding: when ``plan.input_quant`` is set it is the quantizer of the image entering
the patch embedding (8 bits); it is emitted in front of the patch-embedding unit's operand, and
that layer's own input quantizer must describe the same grid (else :class:`PlanError`).

Which ORT kernels run (ONNX Runtime 1.31, CPU, ``ORT_ENABLE_EXTENDED`` and ``ORT_ENABLE_ALL``;
measured with ``tools/check_int_kernels.py``):

* ``DQ(uint8 act) + DQ(int8 or uint8 per-channel W) -> MatMul`` (no Q after it) -> ``MatMulIntegerToFloat``
  (the output stays float: the method does not quantize Linear outputs, so no requantization is
  added; ``DQ -> MatMul -> Q`` would become ``QLinearMatMul`` but would round every Linear output
  to 8 bits, which the reference does not do);
* ``DQ(uint8) + DQ(uint8/int8) -> MatMul`` with both operands dynamic (``Q @ K^T``, ``P @ V``)
  -> ``MatMulIntegerToFloat`` as well;
* ``DQ -> Gemm`` without a float bias -> ``QGemm`` (float output);
* int8 (signed) activations: ORT converts them to uint8 for Linears (extra nodes) and does *not*
  fuse a matmul whose two dynamic operands are int8: hence uint8 with zero point 128 for
  symmetric activations by default;
* ``DQ -> Conv`` without an output Q stays a float Conv (QLinearConv needs a quantized output):
  the patch-embedding Conv computes in float on the dequantized integers (exact, not faster).
* where the next unit's Q follows a matmul through Transpose/Reshape only (``P @ V`` -> proj),
  ORT moves that Q up and fuses ``QLinearMatMul``: the same Q, applied inside the kernel.

Weights on CPUs without VNNI. ORT's x86 U8S8 kernel for AVX2 / AVX-512 without VNNI sums pairs
of adjacent ``uint8 x int8`` products in int16 with saturation (``vpmaddubsw``): with 8-bit
weight codes up to 127 and activation codes up to 255 a pair reaches 64,770 and the result is
silently wrong (measured on an AVX2 CPU, ORT 1.31: a 64-deep dot product off by 1e6 of 2e6;
the mnist ViT at W8A8 fell to 22 dB SQNR between ORT's fused and unfused graphs). Codes within
+-64 cannot saturate (``2 * 255 * 64 < 32767``). ``emission.weight_container``: ``auto`` (the
default) stores a weight as int8 when all its codes are within +-64 (every weight of 7 bits or
fewer) and otherwise as uint8 codes + 128 with zero point 128, the same grid, which ORT runs with
its U8U8 kernel (16-bit widening, exact on every CPU; measured on AVX2 one 3152x384x1536
MatMulIntegerToFloat takes 32.8 ms vs. 26.4 ms for the saturating int8 form and 74.8 ms in FP32);
``int8`` keeps int8 for every weight (fastest on VNNI and ARM CPUs, wrong on AVX2 without VNNI);
``uint8`` stores every weight as uint8.

Measured before the lattice form and the uint8 weight container existed, on a VNNI-capable
machine (mnist ViT, batch 32, 1 thread, median of 3 x 20 runs; ``tools/check_int_kernels.py``):
W8A8 2.4 ms (all 37 matmuls integer + 2 QGemm) vs. ``quantize_static`` QDQ 3.6 ms vs. FP32
3.1-3.2 ms. Symmetric activations: uint8+128 with the integer Clip 2.4 ms, float Clip 3.1 ms,
int8 container 3.9 ms (no matmul fused). W4A4 with twin fc2 / attn_av inputs (split form): 3.2 ms
(integer Clip) vs. 4.0 ms (float Clip). Current figures: BENCHMARKS.md sections 1 and 3.

Graph form (``emission.graph_form``). The quantized values and the nodes are the same in both
forms; only names and annotations differ. ``compact`` (the default): an activation's Q/DQ group is
named ``a<n>`` (the n-th group emitted, so names are deterministic) with abbreviated segments
(``a3/Q``, ``a3/c`` the clipped codes, ``a3/dq``; table :data:`_SHORT`), the n-th weight
``mptq_w<bits>/<n>`` (``mptq_w4/7/int`` its codes, ``/s``, ``/DQ``; the node reading it keeps its
name), every scalar constant and every per-channel zero-point vector is one initializer per value,
shared (``u8_128``, ``i8_0x384``, ``f12``), and the model carries no ``value_info`` (shape
annotations; ORT infers them at load).
``verbose``: each group named from the tensor it quantizes (``<tensor>/mptq/QuantizeLinear``), one
constant per use, and every added tensor typed in ``value_info``. Measured on the real cifar10-vit
and a timm DeiT-T (BENCHMARKS.md, "Weight storage and file size"): the compact file is smaller, runs
the same integer kernels and gives bit-identical outputs. The model's own node and tensor names are
never changed.

Float constants (``emission.constant_storage``): with ``float16`` the non-weight float constants
of the graph emitted from (already rounded to float16 values before calibration, see
:mod:`onnx_mptq.passes.constants`) are written as float16 initializers + ``Cast(to=float)``, exactly
(a constant that is not all float16 values, e.g. a compensated bias, stays float32).

Opset >= 13 is required (per-axis DequantizeLinear); the model keeps its opset, graph inputs,
outputs, node names and metadata, and gains ``metadata_props["onnx_mptq.quantized"]`` (the plan
digest and versions). A model that already carries it is returned unchanged (emitting is
idempotent); another plan on it is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import PlanError, UnsupportedModelError
from ..graph.analysis import GraphView, ModelAnalysis, Role, Unit
from ..graph.io import MIN_OPSET, assign_node_names, graph_digest, opset_of
from ..numerics.quant import UniformParams, qrange
from ..numerics.twin import TwinParams, lattice_fits, twin_lattice_range
from ..plan import (ActQuant, CompensatedWeights, Emission, GraphForm, LayerPlan, LayerWeight, QuantPlan, RangeForm,
                    Scheme, SymmetricContainer, TwinForm, WeightContainer, WeightQuant, check_weights, layer_weight,
                    rederive_steps)
from ..plan import ConstantStorage
from ..records import Record
from .naming import UniqueNames

if TYPE_CHECKING:
    from .pack_int4 import PackResult

log = logging.getLogger(__name__)

MARKER_KEY = "onnx_mptq.quantized"
EMITTER_VERSION = 1


#: The largest |weight code| whose U8S8 product pairs fit int16 on every CPU: ``2 * 255 * 64 = 32640``
#: (x86 AVX2 / AVX-512 without VNNI sums two adjacent u8 x s8 products with int16 saturation).
U8S8_SAFE_CODE = 64

#: A weight grid clipping more than this fraction of the weight is refused (steps made for other bits).
MAX_CLIPPED = 0.5


@dataclasses.dataclass(frozen=True)
class EmittedUnit:
    unit: str
    role: str
    op_type: str
    weight_bits: int | None
    act_bits: tuple[int, ...]
    schemes: tuple[str, ...]  # per operand: uniform | twin
    matmuls: int  # integer matmul nodes computing the unit (2 with a twin operand)
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Skip:
    unit: str
    reason: str


@dataclasses.dataclass(frozen=True)
class EmitReport(Record):
    KIND = "emit_report"
    SCHEMA_VERSION = 1

    model_digest: str  # the float graph emitted from
    plan_digest: str
    marker: str  # the value written to metadata_props[MARKER_KEY]
    symmetric_container: str
    range_form: str
    quantize_nodes: int = 0  # activation QuantizeLinear
    dequantize_nodes: int = 0  # activation DequantizeLinear
    weight_dequantize_nodes: int = 0
    uint8_weights: int = 0  # weights stored as uint8 + 128 (WeightContainer)
    weight_container: str = "auto"
    clip_nodes: int = 0
    other_nodes: tuple[tuple[str, int], ...] = ()  # (op_type, count): Add, Where, Less, MatMul, ...
    units: tuple[EmittedUnit, ...] = ()
    skipped: tuple[Skip, ...] = ()
    notes: tuple[str, ...] = ()
    already_quantized: bool = False


def weight_codes(codes: np.ndarray, container: WeightContainer | str) -> tuple[np.ndarray, int]:
    """Symmetric int8 weight codes in the container ``container`` chooses, and its zero point:
    ``(codes, 0)`` in int8 or ``(codes + 128, 128)`` in uint8 (the same grid)."""
    container = WeightContainer(container)
    wide = codes.size and int(np.abs(codes.astype(np.int16)).max()) > U8S8_SAFE_CODE
    if container is WeightContainer.UINT8 or (container is WeightContainer.AUTO and wide):
        return (codes.astype(np.int16) + 128).astype(np.uint8), 128
    return codes.astype(np.int8), 0


def plan_digest(plan: QuantPlan) -> str:
    """A digest of the plan's JSON (what was emitted)."""
    return hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()[:16]


def marker_value(plan: QuantPlan) -> str:
    return json.dumps(
        {"plan": plan_digest(plan), "plan_schema": QuantPlan.SCHEMA_VERSION, "model": plan.model_digest,
         "emitter": EMITTER_VERSION},
        sort_keys=True, separators=(",", ":"),
    )


# ---------------------------------------------------------------------------------------------
# quantizer -> integer parts


@dataclasses.dataclass(frozen=True)
class _Part:
    """One QuantizeLinear -> [Clip] -> DequantizeLinear group on ``source``."""

    scale: float  # float32 value
    zero_point: int  # in the container
    dtype: str  # "uint8" | "int8"
    lo: int  # allowed container codes
    hi: int
    region: str  # "" for a uniform operand; "softmax_low" / "softmax_high" select a Where output


#: the compact form's abbreviation of each name segment the emitter writes (GraphForm.COMPACT)
_SHORT = {
    "QuantizeLinear": "Q", "DequantizeLinear": "DQ", "scale": "s", "zero_point": "z", "q_clipped": "c",
    "code_min": "lo", "code_max": "hi", "clip_min": "lo", "clip_max": "hi", "clipped": "x", "lattice": "L",
    "region": "R", "scaled": "a", "unscaled": "u", "region_mask": "m", "split": "t", "zero": "0",
    "Where_low": "W1", "Where_high": "W2", "low": "x1", "high": "x2", "twin": "v",
}
_DTYPE_TAG = {"uint8": "u8", "int8": "i8", "float32": "f", "bool": "b"}


def _container_range(dtype: str) -> tuple[int, int]:
    return (0, 255) if dtype == "uint8" else (-128, 127)


def _parts(aq: ActQuant, options: Emission) -> list[_Part]:
    p = aq.params()
    if isinstance(p, UniformParams):
        qmin, qmax = qrange(p.bits, p.symmetric)
        if not p.symmetric:
            return [_Part(float(p.scale), int(p.zero_point), "uint8", qmin, qmax, "")]
        if options.symmetric_container is SymmetricContainer.UINT8:
            return [_Part(float(p.scale), 128, "uint8", qmin + 128, qmax + 128, "")]
        return [_Part(float(p.scale), 0, "int8", qmin, qmax, "")]
    tp = p
    n = tp.levels
    d1, d2 = float(np.float32(tp.delta1)), float(np.float32(tp.delta2))
    uint8 = options.symmetric_container is SymmetricContainer.UINT8
    if tp.kind == "gelu":
        if uint8:
            return [_Part(d1, n, "uint8", 0, n, ""), _Part(d2, 0, "uint8", 0, n, "")]
        return [_Part(d1, 0, "int8", -n, 0, ""), _Part(d2, 0, "int8", 0, n, "")]
    dtype = "uint8" if uint8 else "int8"
    return [_Part(d1, 0, dtype, 0, n, "softmax_low"), _Part(d2, 0, dtype, 0, n, "softmax_high")]


def _same_grid(a: ActQuant, b: ActQuant) -> bool:
    return dataclasses.replace(a, tensor="") == dataclasses.replace(b, tensor="")


# ---------------------------------------------------------------------------------------------
# the pass


class _Emitter:
    def __init__(self, graph: gs.Graph, options: Emission) -> None:
        self.graph = graph
        self.options = options
        self.view = GraphView(graph)
        self.tensors = graph.tensors()
        self.nodes = {n.name: n for n in graph.nodes}
        self.name = UniqueNames(graph)  # name(base): a fresh tensor / node name
        self.added: Counter[str] = Counter()
        self.act_q: dict[tuple[str, ActQuant], list[gs.Tensor]] = {}
        self.weight_dq: dict[tuple, gs.Tensor] = {}
        # the added nodes, built with Graph.layer in a graph of their own (layer() walks its graph's
        # tensors on every call: on the model's graph that is quadratic in the model size); they join
        # the model's graph in _export, in the order they were made
        self.built = gs.Graph(opset=graph.opset)
        self.compact = options.graph_form is GraphForm.COMPACT
        self.shared: dict[tuple[str, tuple[int, ...], bytes], gs.Constant] = {}

    # tensors and nodes ----------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        """A fresh name from ``base``; the compact form abbreviates its segments (:data:`_SHORT`)."""
        if self.compact:
            base = "/".join(_SHORT.get(seg, seg) for seg in base.split("/"))
        return self.name(base)

    def const(self, base: str, value: np.ndarray) -> gs.Constant:
        """A constant; in the compact form a scalar is one constant per (dtype, value), shared."""
        value = np.asarray(value)
        if self.compact and value.ndim == 0:
            return self.shared_const(value)
        return gs.Constant(self.fresh(base), value)

    def shared_const(self, value: np.ndarray) -> gs.Constant:
        """The graph's one constant holding ``value`` (dtype, shape and bytes), named from its value
        where that is short: ``u8_128``, ``i8_0``, ``u8_128x384`` (384 equal entries), else ``f3``."""
        value = np.ascontiguousarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        c = self.shared.get(key)
        if c is None:
            tag = _DTYPE_TAG.get(value.dtype.name, value.dtype.name)
            flat = value.reshape(-1)
            if value.dtype.kind in "iu" and flat.size and np.all(flat == flat[0]):
                base = f"{tag}_{int(flat[0])}" + (f"x{flat.size}" if value.ndim else "")
            else:
                base = f"{tag}{len(self.shared)}"
            c = self.shared[key] = gs.Constant(self.name(base), value)
        return c

    def var(self, base: str, dtype) -> gs.Variable:
        """A new tensor; typed (hence a value_info entry in the file) in the verbose form only."""
        return gs.Variable(self.fresh(base), dtype=None if self.compact else dtype)

    def node(self, op: str, base: str, inputs, outputs, kind: str, **attrs) -> None:
        """Append a node (``Graph.layer``) named uniquely from ``base``; counted as ``kind``."""
        self.built.layer(op=op, name=self.fresh(base), attrs=attrs, inputs=list(inputs), outputs=list(outputs))
        self.added[kind] += 1

    # activations ----------------------------------------------------------------------------
    def activation(self, tensor: gs.Tensor, aq: ActQuant) -> list[gs.Tensor]:
        """DQ outputs (1, or 2 for a twin quantizer) of ``tensor`` quantized by ``aq``; shared."""
        key = (tensor.name, aq)
        if key in self.act_q:
            return self.act_q[key]
        k = sum(1 for t, _ in self.act_q if t == tensor.name)
        base = f"a{len(self.act_q)}" if self.compact else f"{tensor.name}/mptq{k if k else ''}"
        if aq.scheme is Scheme.TWIN and self.options.twin_form is not TwinForm.SPLIT:
            tp = aq.params()
            if lattice_fits(tp):
                out = self._lattice(tensor, tp, base)
                self.act_q[key] = [out]
                return self.act_q[key]
        parts = _parts(aq, self.options)
        sources: dict[str, gs.Tensor] = {"": tensor}
        if any(p.region for p in parts):
            tp = aq.params()
            mask = self.var(f"{base}/region_mask", np.bool_)
            self.node("Less", f"{base}/Less", [tensor, self.const(f"{base}/split", np.float32(tp.split))], [mask], "Less")
            zero = self.const(f"{base}/zero", np.float32(0.0))
            low, high = self.var(f"{base}/low", np.float32), self.var(f"{base}/high", np.float32)
            self.node("Where", f"{base}/Where_low", [mask, tensor, zero], [low], "Where")
            self.node("Where", f"{base}/Where_high", [mask, zero, tensor], [high], "Where")
            sources.update(softmax_low=low, softmax_high=high)
        outs = []
        for i, part in enumerate(parts):
            pb = f"{base}/r{i + 1}" if len(parts) > 1 else base
            outs.append(self._qdq(sources[part.region], part, pb))
        self.act_q[key] = outs
        return outs

    def _q(self, src: gs.Tensor, scale: float, zp: int, base: str, clip_hi: int | None = None) -> gs.Tensor:
        """uint8 codes ``clamp(rint(src / scale) + zp, 0, clip_hi or 255)``."""
        q = self.var(f"{base}/q", np.uint8)
        self.node("QuantizeLinear", f"{base}/QuantizeLinear",
                  [src, self.const(f"{base}/scale", np.float32(scale)), self.const(f"{base}/zero_point", np.uint8(zp))],
                  [q], "QuantizeLinear")
        if clip_hi is not None and clip_hi < 255:
            qc = self.var(f"{base}/q_clipped", np.uint8)
            self.node("Clip", f"{base}/Clip", [q, self.const(f"{base}/code_min", np.uint8(0)),
                                                self.const(f"{base}/code_max", np.uint8(clip_hi))], [qc], "Clip")
            q = qc
        return q

    def _dq(self, q: gs.Tensor, scale: float, zp: int, base: str) -> gs.Tensor:
        out = self.var(f"{base}/dq", np.float32)
        self.node("DequantizeLinear", f"{base}/DequantizeLinear",
                  [q, self.const(f"{base}/scale", np.float32(scale)), self.const(f"{base}/zero_point", np.uint8(zp))],
                  [out], "DequantizeLinear")
        return out

    def _lattice(self, x: gs.Tensor, tp: TwinParams, base: str) -> gs.Tensor:
        """The twin-region operand as ONE uint8 tensor of codes on the delta1 lattice (module
        docstring, "lattice form"); returns its DequantizeLinear output."""
        n, m = tp.levels, tp.m
        d1, d2 = float(np.float32(tp.delta1)), float(np.float32(tp.delta2))
        lo, _ = twin_lattice_range(tp)
        zp = -lo  # gelu: n, softmax: 0
        if tp.kind == "gelu":
            if m == 0:  # one symmetric grid: uniform
                return self._dq(self._q(x, d1, n, f"{base}/lattice", 2 * n), d1, n, f"{base}/lattice")
            a = self.var(f"{base}/scaled", np.float32)  # x < 0: 2^m x, so a / d2 == x / d1 bit for bit
            self.node("LeakyRelu", f"{base}/LeakyRelu", [x], [a], "LeakyRelu", alpha=float(2.0 ** m))
            q = self._q(a, d2, n, f"{base}/region", 2 * n)  # region codes c + n, c in [-n, n]
            c = self._dq(q, 1.0, n, f"{base}/region")  # c as float
            y = self.var(f"{base}/unscaled", np.float32)  # c < 0: c 2^-m (exact)
            self.node("LeakyRelu", f"{base}/LeakyRelu_1", [c], [y], "LeakyRelu", alpha=float(2.0 ** -m))
            e = self._q(y, 2.0 ** -m, zp, f"{base}/lattice")  # c (c < 0) or 2^m c, plus n
            return self._dq(e, d1, zp, f"{base}/lattice")
        # softmax: pick the region's dequantized value, then requantize on the delta1 lattice
        mask = self.var(f"{base}/region_mask", np.bool_)
        self.node("Less", f"{base}/Less", [x, self.const(f"{base}/split", np.float32(tp.split))], [mask], "Less")
        # below split, rint(x / d1) <= n unless split > (n + 1/2) d1
        clip1 = n if np.float32(tp.split) > np.float32((n + 0.5) * d1) else None
        v1 = self._dq(self._q(x, d1, 0, f"{base}/r1", clip1), d1, 0, f"{base}/r1")
        v2 = self._dq(self._q(x, d2, 0, f"{base}/r2", n), d2, 0, f"{base}/r2")
        v = self.var(f"{base}/twin", np.float32)
        self.node("Where", f"{base}/Where", [mask, v1, v2], [v], "Where")
        e = self._q(v, d1, 0, f"{base}/lattice")
        return self._dq(e, d1, 0, f"{base}/lattice")

    def _qdq(self, src: gs.Tensor, part: _Part, base: str) -> gs.Tensor:
        np_dtype = np.uint8 if part.dtype == "uint8" else np.int8
        scale = self.const(f"{base}/scale", np.float32(part.scale))
        zp = self.const(f"{base}/zero_point", np.array(part.zero_point, dtype=np_dtype))
        clip = (part.lo, part.hi) != _container_range(part.dtype)
        x = src
        if clip and self.options.range_form is RangeForm.FLOAT:
            lo = np.float32(part.lo - part.zero_point) * np.float32(part.scale)
            hi = np.float32(part.hi - part.zero_point) * np.float32(part.scale)
            x = self.var(f"{base}/clipped", np.float32)
            self.node("Clip", f"{base}/Clip", [src, self.const(f"{base}/clip_min", lo), self.const(f"{base}/clip_max", hi)],
                      [x], "Clip")
        q = self.var(f"{base}/q", np_dtype)
        self.node("QuantizeLinear", f"{base}/QuantizeLinear", [x, scale, zp], [q], "QuantizeLinear")
        if clip and self.options.range_form is RangeForm.INTEGER:
            qc = self.var(f"{base}/q_clipped", np_dtype)
            self.node("Clip", f"{base}/Clip", [q, self.const(f"{base}/code_min", np.array(part.lo, np_dtype)),
                                                self.const(f"{base}/code_max", np.array(part.hi, np_dtype))], [qc], "Clip")
            q = qc
        out = self.var(f"{base}/dq", np.float32)
        self.node("DequantizeLinear", f"{base}/DequantizeLinear", [q, scale, zp], [out], "DequantizeLinear")
        return out

    # weights --------------------------------------------------------------------------------
    def weight(self, unit: Unit, node: gs.Node, wq: WeightQuant, stored: LayerWeight = LayerWeight()) -> gs.Tensor:
        """The DequantizeLinear output of the unit's weight: nearest-rounded codes of the float
        weight, or the plan's stored (compensated) codes, in the layout the node reads."""
        w_in = node.inputs[1]
        w = self.view.const(w_in)
        if w is None:
            raise PlanError(f"unit {unit.name}: its weight {w_in.name} is not a constant")
        w = np.asarray(w, dtype=np.float32)
        axis = unit.weight_axis
        if axis is None:
            raise PlanError(f"unit {unit.name}: the analysis gives no weight axis (an analysis of an older version?)")
        if len(wq.scales) != w.shape[axis]:
            raise PlanError(
                f"unit {unit.name}: the plan has {len(wq.scales)} weight scales, the weight has "
                f"{w.shape[axis]} output channels"
            )
        key = (w_in.name, node.op, axis, wq, unit.name if stored.codes is not None else None)
        if key in self.weight_dq:
            return self.weight_dq[key]
        scales = np.asarray(wq.scales, dtype=np.float32)
        clipped = wq.clipped_fraction(w, axis) if stored.codes is None else 0.0
        if clipped > MAX_CLIPPED:
            raise PlanError(
                f"layer {unit.name}: field weight.scales: the {wq.bits}-bit grid clips {clipped:.0%} of the weight "
                f"(scales made for other bits?); give scales for {wq.bits} bits, or set weight.step_bits to the bits "
                f"they were made for and they are re-derived"
            )
        if stored.codes is None:
            codes = wq.codes(w, axis)  # int8, within qrange(bits, True)
        else:
            codes = _read_layout(unit, stored.codes, w.shape)
        codes, zero_point = weight_codes(codes, self.options.weight_container)
        if codes.dtype == np.uint8:
            self.added["uint8 weights"] += 1
        base = f"mptq_w{wq.bits}/{len(self.weight_dq)}" if self.compact else f"{unit.weight or w_in.name}/mptq_w{wq.bits}"
        dq = self.var(f"{base}/dq", np.float32)
        self.node(
            "DequantizeLinear", f"{base}/DequantizeLinear",
            [self.const(f"{base}/int", codes), self.const(f"{base}/scale", scales),
             self.zero_points(f"{base}/zero_point", np.full(scales.shape, zero_point, codes.dtype))],
            [dq], "WeightDequantizeLinear", axis=axis,
        )
        self.weight_dq[key] = dq
        return dq

    def zero_points(self, base: str, value: np.ndarray) -> gs.Constant:
        """A weight's per-channel zero points (all 0 or all 128): shared in the compact form."""
        return self.shared_const(value) if self.compact else self.const(base, value)

    def add_bias(self, unit: Unit, node: gs.Node, delta: np.ndarray) -> None:
        """Add the (N,) bias correction ``delta`` to the unit's output: folded into its constant
        bias (Conv B, Gemm C / beta, the Add after a MatMul), or a new bias (Conv B, Gemm C, an
        Add after a MatMul) where it has none."""
        delta = np.asarray(delta, dtype=np.float32)
        base = f"{unit.weight or node.name}/mptq_bias_corrected"
        if node.op in ("Conv", "Gemm"):
            div = np.float32(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else np.float32(1.0)
            if len(node.inputs) > 2 and node.inputs[2].name:
                b = self.view.const(node.inputs[2])
                if b is None:
                    raise PlanError(f"layer {unit.name}: its bias {node.inputs[2].name} is not a constant; a bias "
                                    f"correction needs one")
                node.inputs[2] = self.const(base, (np.asarray(b, np.float32) + delta / div).astype(np.float32))
            else:
                node.inputs[2:] = [self.const(base, (delta / div).astype(np.float32))]
            return
        out = node.outputs[0]
        add = self.nodes.get(unit.bias_node or "")
        if add is not None and out in add.inputs:
            i = 1 if add.inputs[0] is out else 0
            b = self.view.const(add.inputs[i])
            if b is not None:
                add.inputs[i] = self.const(base, (np.asarray(b, np.float32) + delta).astype(np.float32))
                return
        mid = self.var(f"{node.name}/mptq_uncorrected", np.float32)
        node.outputs[0] = mid
        self.node("Add", f"{node.name}/mptq_bias_correction", [mid, self.const(base, delta)], [out], "Add")

    # structure ------------------------------------------------------------------------------
    def split_gemm_bias(self, node: gs.Node) -> None:
        """``Gemm(A, B, C)`` -> ``Add(Gemm(A, B), beta C)`` (ORT fuses DQ -> Gemm only without a float C)."""
        if len(node.inputs) < 3 or not node.inputs[2].name:
            return
        c = node.inputs[2]
        beta = float(node.attrs.get("beta", 1.0))
        if beta != 1.0:
            cv = self.view.const(c)
            if cv is None:
                raise UnsupportedModelError(f"Gemm {node.name}: beta != 1 with a non-constant C")
            c = self.const(f"{node.name}/mptq_bias", (np.float32(beta) * np.asarray(cv, np.float32)))
        out = node.outputs[0]
        mid = self.var(f"{node.name}/mptq_matmul", np.float32)
        node.inputs.pop(2)
        node.attrs.pop("beta", None)
        node.outputs[0] = mid
        self.node("Add", f"{node.name}/mptq_bias_add", [mid, c], [out], "Add")

    def distribute(self, node: gs.Node, operands: list[list[gs.Tensor]], slots: list[int]) -> int:
        """Point ``node``'s input ``slots`` at the operand parts; one node per combination of
        parts, summed into the node's output. Returns the number of matmul nodes."""
        combos = list(itertools.product(*operands))
        for slot, t in zip(slots, combos[0]):
            node.inputs[slot] = t
        if len(combos) == 1:
            return 1
        out = node.outputs[0]
        partial = [self.var(f"{node.name}/mptq_part1", np.float32)]
        node.outputs[0] = partial[0]
        for i, combo in enumerate(combos[1:], start=2):
            ins = list(node.inputs)
            for slot, t in zip(slots, combo):
                ins[slot] = t
            o = self.var(f"{node.name}/mptq_part{i}", np.float32)
            self.node(node.op, f"{node.name}/mptq_twin{i}", ins, [o], node.op, **dict(node.attrs))
            partial.append(o)
        acc = partial[0]
        for i, p in enumerate(partial[1:], start=1):
            dst = out if i == len(partial) - 1 else self.var(f"{node.name}/mptq_sum{i}", np.float32)
            self.node("Add", f"{node.name}/mptq_sum{i}", [acc, p], [dst], "Add")
            acc = dst
        return len(combos)

    def drop_dead_chain(self, tensor: gs.Tensor) -> None:
        """Remove the constant-weight chain (Identity/Transpose/Reshape) that fed a replaced weight."""
        cur = tensor
        while not isinstance(cur, gs.Constant) and not cur.outputs and cur.name not in self.view.output_names:
            prod = cur.inputs[0] if cur.inputs else None
            if prod is None or prod.op not in ("Identity", "Transpose", "Reshape", "Constant") or len(prod.outputs) != 1:
                return
            nxt = prod.inputs[0] if prod.inputs else None
            prod.inputs.clear()
            prod.outputs.clear()
            self.graph.nodes.remove(prod)
            if nxt is None:
                return
            cur = nxt


def _read_layout(unit: Unit, codes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Effective-layout (K, N) codes in the layout the node reads (the inverse of
    :meth:`Unit.effective`): Conv ``(O, C, kh, kw)``, Gemm ``B`` with transB ``(N, K)``."""
    codes = np.asarray(codes, dtype=np.int8)
    if unit.op_type == "Conv":
        out = codes.T.reshape(shape) if codes.size == int(np.prod(shape)) else None
    else:
        out = codes if unit.weight_axis == 1 else codes.T
    if out is None or out.shape != tuple(shape):
        raise PlanError(f"layer {unit.name}: the stored codes have shape {codes.shape}, the weight {tuple(shape)}")
    return np.ascontiguousarray(out)


def _check_layer(unit: Unit, lp: LayerPlan, plan: QuantPlan) -> None:
    if len(lp.inputs) != len(unit.inputs):
        raise PlanError(
            f"layer {unit.name}: the plan quantizes {len(lp.inputs)} operand(s), the unit has {len(unit.inputs)}"
        )
    for i, (aq, t) in enumerate(zip(lp.inputs, unit.inputs)):
        if unit.role is Role.PATCH_EMBED and plan.input_quant is not None:
            if not _same_grid(aq, plan.input_quant):
                raise PlanError(
                    f"layer {unit.name}: its input quantizer differs from plan.input_quant (the image "
                    f"entering the patch embedding); make them equal"
                )
        elif aq.tensor != t:
            raise PlanError(f"layer {unit.name}: operand {i} quantizes tensor {aq.tensor!r}, the unit reads {t!r}")
        if aq.scheme is Scheme.TWIN and unit.op_type == "Conv":
            raise PlanError(f"layer {unit.name}: a twin-region quantizer on a Conv input is not supported")
    if unit.role in (Role.ATTN_QK, Role.ATTN_AV):
        if lp.weight is not None:
            raise PlanError(f"layer {unit.name}: an attention matmul has no weight to quantize")
    elif lp.weight is None:
        raise PlanError(f"layer {unit.name}: a {unit.op_type} unit needs a weight quantizer")


@dataclasses.dataclass(frozen=True)
class EmitResult:
    """What :func:`emit_qdq` returns: the QDQ model, its report, and one note per quantizer whose
    steps were re-derived because its bits were edited (:func:`onnx_mptq.plan.rederive_steps`)."""

    model: onnx.ModelProto
    report: EmitReport
    rederived: tuple[str, ...] = ()
    # how the weight codes were stored when the pipeline packed them (passes/pack_int4.py)
    storage: "PackResult | None" = None


def _already_emitted(model: onnx.ModelProto, plan: QuantPlan, analysis: ModelAnalysis) -> EmitResult | None:
    """The model unchanged when it already carries this plan's marker; PlanError for another plan."""
    existing = {p.key: p.value for p in model.metadata_props}
    if MARKER_KEY not in existing:
        return None
    digest = plan_digest(plan)
    try:
        prior = json.loads(existing[MARKER_KEY]).get("plan")
    except (ValueError, AttributeError):
        prior = None
    if prior != digest:
        raise PlanError(
            f"the model is already quantized (metadata {MARKER_KEY} = {existing[MARKER_KEY]}); emit from "
            f"the float model instead"
        )
    same = onnx.ModelProto()
    same.CopyFrom(model)
    e = plan.emission
    return EmitResult(same, EmitReport(
        model_digest=analysis.model_digest, plan_digest=digest, marker=marker_value(plan),
        symmetric_container=e.symmetric_container.value, range_form=e.range_form.value,
        weight_container=e.weight_container.value,
        notes=("already quantized with this plan: nothing emitted",), already_quantized=True,
    ))


def _open(model: onnx.ModelProto, plan: QuantPlan, analysis: ModelAnalysis) -> tuple[onnx.ModelProto, gs.Graph]:
    """A named copy of ``model`` and its graph, after checking the opset and that the model, the
    analysis and the plan describe one graph."""
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"opset {opset} is too old for per-channel QDQ (need >= {MIN_OPSET}); re-export the model with a newer opset"
        )
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assign_node_names(m)
    if graph_digest(m) != analysis.model_digest:
        raise PlanError(
            f"the analysis was made for another graph (analysis digest {analysis.model_digest}, model "
            f"digest {graph_digest(m)})"
        )
    if plan.model_digest != analysis.model_digest:
        raise PlanError(
            f"the plan was made for another graph (plan model digest {plan.model_digest}, model digest "
            f"{analysis.model_digest})"
        )
    units = {u.name for u in analysis.units}
    unknown = sorted(lp.unit for lp in plan.layers if lp.unit not in units)
    if unknown:
        raise PlanError(f"the plan names unit(s) the model does not have: {', '.join(unknown)}")
    return m, gs.import_onnx(m)


def _accepted_units(em: _Emitter, plan: QuantPlan, analysis: ModelAnalysis,
                    skipped: list[Skip]) -> list[tuple[Unit, LayerPlan, gs.Node]]:
    """Every planned unit with its plan layer and node, checked before any mutation; units the
    plan leaves out go to ``skipped``."""
    layers = {lp.unit: lp for lp in plan.layers}
    accepted: list[tuple[Unit, LayerPlan, gs.Node]] = []
    for unit in analysis.units:
        lp = layers.get(unit.name)
        if lp is None:
            skipped.append(Skip(unit.name, "not in the plan: left in float"))
            continue
        node = em.nodes.get(unit.name)
        if node is None or node.op != unit.op_type:
            raise PlanError(f"unit {unit.name}: no {unit.op_type} node of that name in the model")
        _check_layer(unit, lp, plan)
        for i, t in enumerate(unit.inputs):
            if node.inputs[i].name != t:
                raise PlanError(f"unit {unit.name}: input {i} is {node.inputs[i].name!r}, the analysis says {t!r}")
        accepted.append((unit, lp, node))
    return accepted


def _emit_unit(em: _Emitter, unit: Unit, lp: LayerPlan, node: gs.Node, input_quant: ActQuant | None,
               replaced_weights: list[gs.Tensor], stored: LayerWeight = LayerWeight()) -> EmittedUnit:
    """Quantize the unit's operands (the patch embedding's by ``input_quant`` when given) and
    weight, and point its node (or one node per combination of twin parts, summed) at them."""
    notes: list[str] = []
    operands: list[list[gs.Tensor]] = []
    for i, aq in enumerate(lp.inputs):
        if unit.role is Role.PATCH_EMBED and input_quant is not None:
            aq = dataclasses.replace(input_quant, tensor=unit.inputs[i])
            notes.append("input quantized by plan.input_quant")
        operands.append(em.activation(node.inputs[i], aq))
    if lp.weight is not None:
        old_w = node.inputs[1]
        wdq = em.weight(unit, node, lp.weight, stored)
        node.inputs[1] = wdq
        replaced_weights.append(old_w)
        if stored.codes is not None:
            notes.append("compensated codes (" + ", ".join(p.value for p in lp.compensation.parts) + ")")  # type: ignore[union-attr]
        if stored.bias is not None:
            em.add_bias(unit, node, stored.bias)
        if node.op == "Gemm":
            em.split_gemm_bias(node)
        operands.append([wdq])
    n_mm = em.distribute(node, operands, [0, 1])
    if node.op == "Conv":
        notes.append("ORT CPU runs DQ -> Conv without an output Q as a float Conv")
    return EmittedUnit(
        unit=unit.name, role=unit.role.value, op_type=unit.op_type,
        weight_bits=lp.w_bits, act_bits=tuple(a.bits for a in lp.inputs),
        schemes=tuple(a.scheme.value for a in lp.inputs), matmuls=n_mm, notes=tuple(notes),
    )


def _emit_input_quant(em: _Emitter, graph: gs.Graph, input_quant: ActQuant) -> str:
    """``plan.input_quant`` on the graph input it names (no planned patch embedding reads it)."""
    t = em.tensors.get(input_quant.tensor)
    if t is None or t.name not in {i.name for i in graph.inputs}:
        raise PlanError(
            f"plan.input_quant quantizes {input_quant.tensor!r}, which is neither a graph input nor "
            f"read by a planned patch embedding"
        )
    consumers = list(t.outputs)
    dq = em.activation(t, input_quant)
    if len(dq) != 1:
        raise PlanError("plan.input_quant must be a uniform quantizer")
    for c in consumers:
        for i, inp in enumerate(c.inputs):
            if inp is t:
                c.inputs[i] = dq[0]
    return f"plan.input_quant emitted on graph input {t.name} (no planned patch embedding reads it)"


def _export(em: _Emitter, graph: gs.Graph, named: onnx.ModelProto, replaced_weights: list[gs.Tensor],
            marker: str) -> onnx.ModelProto:
    """Add the built nodes, drop the float weights nothing reads any more, sort, export into a copy
    of ``named`` with the marker, and check the result."""
    graph.nodes.extend(em.built.nodes)
    for w in replaced_weights:
        em.drop_dead_chain(w)
    graph.toposort()
    exported = gs.export_onnx(graph, do_type_check=False)
    out = onnx.ModelProto()
    out.CopyFrom(named)
    out.graph.CopyFrom(exported.graph)
    if em.compact:  # shape annotations only (the analysis's and ours): ORT infers them at load
        del out.graph.value_info[:]
    prop = out.metadata_props.add()
    prop.key, prop.value = MARKER_KEY, marker
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:  # a bug in this pass, not the user's fault
        raise RuntimeError(f"emit_qdq produced an invalid model: {str(e).splitlines()[0]}") from e
    return out


def emit_qdq(model: onnx.ModelProto, plan: QuantPlan, analysis: ModelAnalysis,
             weights: CompensatedWeights | None = None) -> EmitResult:
    """Write ``plan`` into a copy of ``model`` as QDQ (see the module docstring); ``weights``: the
    stored codes and bias corrections of the plan's compensated layers (:class:`onnx_mptq.plan.CompensatedWeights`;
    required when it has any, checked against ``plan.weights_digest``)."""
    done = _already_emitted(model, plan, analysis)
    if done is not None:
        return done
    named, graph = _open(model, plan, analysis)
    resolved = rederive_steps(plan)
    for note in resolved.notes:
        log.warning("%s", note)
    work = resolved.plan
    check_weights(work, weights)
    em = _Emitter(graph, work.emission)
    skipped: list[Skip] = []
    accepted = _accepted_units(em, work, analysis, skipped)
    replaced_weights: list[gs.Tensor] = []
    stored = {lp.unit: layer_weight(lp, weights) for _, lp, _ in accepted}
    rederived = list(resolved.notes)
    for lw in stored.values():
        if lw.note:
            log.warning("%s", lw.note)
            rederived.append(lw.note)
    emitted = [_emit_unit(em, unit, lp, node, work.input_quant, replaced_weights, stored[lp.unit])
               for unit, lp, node in accepted]
    notes = list(rederived)
    pe_done = work.input_quant is not None and any(u.role is Role.PATCH_EMBED for u, _, _ in accepted)
    if work.input_quant is not None and not pe_done:
        notes.append(_emit_input_quant(em, graph, work.input_quant))
    marker = marker_value(plan)
    out = _export(em, graph, named, replaced_weights, marker)
    if work.emission.constant_storage is ConstantStorage.FLOAT16:  # passes/constants.py: exact for the plan
        from .constants import store_float16

        stored_f16 = store_float16(out)
        out = stored_f16.model
        notes.append(stored_f16.summary())

    counts = em.added
    other = tuple(sorted((k, v) for k, v in counts.items()
                         if k not in ("QuantizeLinear", "DequantizeLinear", "WeightDequantizeLinear", "Clip",
                                      "uint8 weights")))
    e = work.emission
    report = EmitReport(
        model_digest=analysis.model_digest, plan_digest=plan_digest(plan), marker=marker,
        symmetric_container=e.symmetric_container.value, range_form=e.range_form.value,
        quantize_nodes=counts["QuantizeLinear"], dequantize_nodes=counts["DequantizeLinear"],
        weight_dequantize_nodes=counts["WeightDequantizeLinear"], clip_nodes=counts["Clip"],
        uint8_weights=counts["uint8 weights"], weight_container=e.weight_container.value,
        other_nodes=other, units=tuple(emitted), skipped=tuple(skipped), notes=tuple(notes),
    )
    log.info("emitted %d units (%d Q, %d DQ, %d weight DQ, %d Clip); %d skipped", len(emitted),
             report.quantize_nodes, report.dequantize_nodes, report.weight_dequantize_nodes, report.clip_nodes,
             len(skipped))
    return EmitResult(out, report, tuple(rederived))
