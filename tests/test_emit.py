"""QDQ emission: structure, agreement with the numpy fake-quant reference, ORT integer kernels.

Reference agreement. For every planned unit, ORT's output of the emitted model at that unit
(the unit's output and its float operands added as graph outputs) is compared with
``simulate_unit`` applied to the same operands. Both quantize the same float32 operands to the
same integers and compute the same sum of integer products, so they differ only by float32
rounding. Tolerance, per unit: ``max |ort - ref| <= 0.25 * out_step``, where ``out_step`` is the
output's quantization-step equivalent (product of the operands' steps: activation step x
smallest weight step, or the two operand steps of an attention matmul; delta1 for a twin operand),
i.e. a quarter of the spacing of the integer products. Measured on mnist: <= 0.09 steps
(<= 5e-7 of the output range) with ORT optimizations off, <= 0.05 with them on.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import random_images, tiny_vit
from tiny_models import tiny_onnx  # noqa: F401  (the fixture)
from onnx_mptq.calibrate.session import make_session
from onnx_mptq.config import Providers, RuntimeConfig
from onnx_mptq.errors import PlanError, UnsupportedModelError
from onnx_mptq.graph.analysis import GraphView, ModelAnalysis, Role, analyze
from onnx_mptq.graph.io import assign_node_names, save_model
from onnx_mptq.numerics.quant import params_from_range, qrange, weight_params
from onnx_mptq.numerics.twin import fixed_ratio_twin, lattice_fits
from onnx_mptq.passes.emit_qdq import MARKER_KEY, U8S8_SAFE_CODE, EmitReport, emit_qdq, weight_codes
from onnx_mptq.passes.simulate import ConvGeometry, simulate_unit
from onnx_mptq.plan import (ActQuant, Emission, LayerPlan, QuantPlan, Scheme, TwinForm, TwinKind, WeightContainer,
                            WeightQuant)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = SHARED / "mnist-vit"
MNIST = MNIST_DIR / "vit_mnist_fp32.onnx"
TOOLS = Path(__file__).resolve().parents[1] / "tools"
CPU1 = RuntimeConfig(providers=Providers.CPU, threads=1)
TOL_STEPS = 0.25


def _load_tool():
    spec = importlib.util.spec_from_file_location("check_int_kernels", TOOLS / "check_int_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# helpers: run with extra outputs, min/max plans


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return m


def run(model: onnx.ModelProto, feeds: dict, names, optimize: bool = True) -> dict[str, np.ndarray]:
    names = list(dict.fromkeys(names))
    sess = make_session(with_outputs(model, names), CPU1, optimize=optimize)
    return dict(zip(names, sess.run(feeds, names)))


class Weights:
    """Effective (K, N) weight / Conv kernel, bias and attributes of each unit, read from the float model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        assign_node_names(m)
        self.view = GraphView(gs.import_onnx(m))
        self.nodes = {n.name: n for n in self.view.nodes}

    def __call__(self, unit):
        node = self.nodes[unit.name]
        w = unit.weight_as_read(self.view)
        if unit.op_type != "Conv":
            w = unit.effective(w)  # (K, N)
        b = None if unit.bias is None else np.asarray(self.view.const(self.view.tensors[unit.bias]), np.float32)
        return w, b, dict(node.attrs)


def act_quant(tensor: str, lo: float, hi: float, bits: int, symmetric: bool) -> ActQuant:
    return ActQuant.from_params(tensor, params_from_range(lo, hi, bits, symmetric))


def twin_quant(tensor: str, x: np.ndarray, bits: int, kind: str) -> ActQuant:
    tp = fixed_ratio_twin(x, bits, kind)
    return ActQuant(tensor=tensor, bits=bits, scheme=Scheme.TWIN, twin_kind=TwinKind(kind),
                    delta1=tp.delta1, m=tp.m, split=tp.split)


def minmax_plan(model: onnx.ModelProto, analysis: ModelAnalysis, feeds_list: list[dict], w_bits: int, a_bits: int,
                *, symmetric: bool = False, twin_roles: tuple[str, ...] = ()) -> QuantPlan:
    """Min/max statistics of every unit operand on a few batches -> a plan (image at 8 bits).

    ``twin_roles``: units of these roles (fc2, attn_av) get a twin-region quantizer (PTQ4ViT's
    fixed ratio) on their first operand."""
    names = sorted({t for u in analysis.units for t in u.inputs})
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in feeds_list:
        for n, a in run(model, feeds, names, optimize=False).items():
            lo[n], hi[n] = min(lo[n], float(a.min())), max(hi[n], float(a.max()))
            seen[n].append(a.ravel())
    image = np.concatenate([f[analysis.inputs[0]].ravel() for f in feeds_list])
    input_quant = act_quant(analysis.inputs[0], float(image.min()), float(image.max()), 8, symmetric)
    if not analysis.by_role(Role.PATCH_EMBED):
        input_quant = None
    weights = Weights(model)
    layers = []
    for u in analysis.units:
        ins = []
        for i, t in enumerate(u.inputs):
            if u.role is Role.PATCH_EMBED:
                ins.append(dataclasses.replace(input_quant, tensor=t))
            elif i == 0 and u.role.value in twin_roles:
                kind = "softmax" if u.role is Role.ATTN_AV else "gelu"
                ins.append(twin_quant(t, np.concatenate(seen[t]), a_bits, kind))
            else:
                ins.append(act_quant(t, lo[t], hi[t], a_bits, symmetric))
        wq, params = None, 0
        if u.weight_input is not None:
            w, _, _ = weights(u)
            axis = 0 if u.op_type == "Conv" else 1
            wq = WeightQuant(bits=w_bits, scales=tuple(float(s) for s in weight_params(w, w_bits, axis).scale))
            params = int(w.size)
        layers.append(LayerPlan(unit=u.name, role=u.role.value, inputs=tuple(ins), weight=wq, params=params))
    return QuantPlan(source_digest=analysis.model_digest, model_digest=analysis.model_digest, layers=tuple(layers),
                     input_quant=input_quant)


def emit(model: onnx.ModelProto, plan: QuantPlan, analysis: ModelAnalysis, emission: Emission | None = None):
    """(model, report) of ``emit_qdq``, with the plan's emission section replaced when given."""
    res = emit_qdq(model, plan if emission is None else dataclasses.replace(plan, emission=emission), analysis)
    return res.model, res.report


def operand_step(aq: ActQuant) -> float:
    return aq.params().delta1 if aq.scheme is Scheme.TWIN else aq.scale


def check_units_against_reference(model, quantized, plan, analysis, feeds, optimize: bool) -> dict[str, float]:
    """Per-unit |ORT - simulate_unit| in output steps; asserts the tolerance. Returns the ratios."""
    weights = Weights(model)
    names = [t for u in analysis.units for t in u.inputs] + [u.output for u in analysis.units]
    out = run(quantized, feeds, names, optimize=optimize)
    ratios = {}
    for u in analysis.units:
        lp = plan.layer(u.name)
        w = b = None
        kw = {}
        step = float(np.prod([operand_step(a) for a in lp.inputs]))
        if u.weight_input is not None:
            w, b, attrs = weights(u)
            step *= min(lp.weight.scales)
            if u.op_type == "Conv":
                kw["conv"] = ConvGeometry.from_attrs(attrs)
            if u.op_type == "Gemm":
                kw["alpha"] = float(attrs.get("alpha", 1.0))
        ref = simulate_unit(u, lp, [out[t] for t in u.inputs], w, b, **kw)
        got = out[u.output]
        assert got.shape == ref.shape, u.name
        ratios[u.name] = float(np.abs(got - ref).max() / step)
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= TOL_STEPS, f"{worst}: {ratios[worst]:.3g} output steps off the reference"
    return ratios


def expected_counts(plan: QuantPlan, analysis: ModelAnalysis, options: Emission = Emission()) -> dict[str, int]:
    """Q/DQ/Clip nodes the plan calls for, counted independently of the emitter."""
    groups: dict[tuple, ActQuant] = {}
    for lp in plan.layers:
        u = analysis.unit(lp.unit)
        for t, aq in zip(u.inputs, lp.inputs):
            if u.role is Role.PATCH_EMBED and plan.input_quant is not None:
                aq = dataclasses.replace(plan.input_quant, tensor=t)
            groups[(t, aq)] = aq
    q = clip = where = 0
    for aq in groups.values():
        if aq.scheme is Scheme.TWIN and options.twin_form is not TwinForm.SPLIT and lattice_fits(aq.params()):
            tp = aq.params()
            if tp.kind == "gelu":  # LeakyRelu, Q, Clip, DQ (region codes), LeakyRelu, Q (lattice), DQ
                q += 1 if tp.m == 0 else 2  # one DQ per Q
                clip += 1
            else:  # Less, Q + DQ per region (region 2 clipped), Where, Q (lattice), DQ
                q += 3
                clip += 1 + (np.float32(tp.split) > np.float32((tp.levels + 0.5) * tp.delta1))
                where += 1
        elif aq.scheme is Scheme.TWIN:
            q += 2
            clip += 2  # each region holds k-1 bits of codes
            where += 2 if aq.twin_kind is TwinKind.SOFTMAX else 0
        else:
            q += 1
            full = (0, 255) if not aq.symmetric else None
            clip += 0 if qrange(aq.bits, aq.symmetric) == full else 1
    weights = {(analysis.unit(lp.unit).weight_input, lp.weight) for lp in plan.layers if lp.weight is not None}
    return {"QuantizeLinear": q, "DequantizeLinear": q + len(weights), "Clip": clip, "Where": where,
            "weights": len(weights)}


def split_twins(plan: QuantPlan, options: Emission = Emission()) -> int:
    """Twin operands emitted in the split form (a second matmul each)."""
    return sum(1 for lp in plan.layers for a in lp.inputs if a.scheme is Scheme.TWIN
               and (options.twin_form is TwinForm.SPLIT or not lattice_fits(a.params())))


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)))


# ---------------------------------------------------------------------------------------------
# mnist (real model)


def mnist_images(start: int, n: int) -> np.ndarray:
    raw = gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz").read()
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)[start:start + n]
    return ((x / 255.0 - 0.1307) / 0.3081).astype(np.float32)


@pytest.fixture(scope="module")
def mnist():
    if not MNIST.is_file():
        pytest.skip(f"{MNIST} is missing")
    model = onnx.load(str(MNIST))
    analysis = analyze(model)
    calib = [{"input": mnist_images(0, 32)}, {"input": mnist_images(32, 32)}]
    test = {"input": mnist_images(1000, 16)}
    return model, analysis, calib, test


CASES = {
    "w8a8": dict(w_bits=8, a_bits=8),
    "w6a6": dict(w_bits=6, a_bits=6),
    "w4a4": dict(w_bits=4, a_bits=4),
    "w4a8": dict(w_bits=4, a_bits=8),
    "w8a8_sym": dict(w_bits=8, a_bits=8, symmetric=True),
    "w4a4_twin": dict(w_bits=4, a_bits=4, twin_roles=("fc2", "attn_av")),
    "w4a4_twin_split": dict(w_bits=4, a_bits=4, twin_roles=("fc2", "attn_av")),
    "w5a5_twin": dict(w_bits=5, a_bits=5, twin_roles=("fc2", "attn_av")),
}
OPTIONS = {"w4a4_twin_split": Emission(twin_form="split")}


@pytest.mark.shared
@pytest.mark.parametrize("case", list(CASES))
def test_mnist_units_match_reference(mnist, case: str) -> None:
    model, analysis, calib, test = mnist
    plan = minmax_plan(model, analysis, calib, **CASES[case])
    opts = OPTIONS.get(case, Emission())
    before = model.SerializeToString()
    q, report = emit(model, plan, analysis, opts)
    assert model.SerializeToString() == before, "emit_qdq mutated its input"

    # structure: node counts follow the plan
    ops = Counter(n.op_type for n in q.graph.node)
    want = expected_counts(plan, analysis, opts)
    assert ops["QuantizeLinear"] == want["QuantizeLinear"] == report.quantize_nodes
    assert ops["DequantizeLinear"] == want["DequantizeLinear"] == report.dequantize_nodes + report.weight_dequantize_nodes
    assert report.weight_dequantize_nodes == want["weights"] == len(analysis.units) - 12  # 12 attention matmuls
    assert ops["Clip"] == want["Clip"] == report.clip_nodes
    assert ops["Where"] - Counter(n.op_type for n in model.graph.node)["Where"] == want["Where"]
    assert len(report.units) == len(analysis.units) and not report.skipped
    assert sum(eu.matmuls for eu in report.units) == len(analysis.units) + split_twins(plan, opts)
    if "twin" in case:  # 12 twins; the hand-set softmax ratio (m = k - 1) fits a uint8 lattice at 4 / 5 bits
        assert split_twins(plan, opts) == 12 if opts.twin_form is TwinForm.SPLIT else split_twins(plan, opts) <= 6
    # graph interface and metadata kept
    assert [o.name for o in q.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in q.graph.input] == [i.name for i in model.graph.input]
    assert q.opset_import == model.opset_import
    assert json.loads({p.key: p.value for p in q.metadata_props}[MARKER_KEY])["plan"] == report.plan_digest
    # stored weights are integers of the planned width, per-axis DQ on the output channel
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].ndim >= 2:
            codes = inits[n.input[0]]
            zp = inits[n.input[2]]
            if codes.dtype == np.uint8:  # wide 8-bit codes: uint8 + 128 (exact on CPUs without VNNI)
                assert CASES[case]["w_bits"] == 8 and np.all(zp == 128)
                codes = codes.astype(np.int16) - 128
                assert np.abs(codes).max() > 64
            else:
                assert codes.dtype == np.int8 and np.all(zp == 0)
                assert np.abs(codes).max() <= 64 or opts.weight_container is WeightContainer.INT8
            lo, hi = qrange(CASES[case]["w_bits"], True)
            assert codes.min() >= lo and codes.max() <= hi
            axis = {a.name: a.i for a in n.attribute}["axis"]
            assert inits[n.input[1]].shape == (codes.shape[axis],)
    # numerics: unit by unit, ORT with optimizations off and on
    check_units_against_reference(model, q, plan, analysis, test, optimize=False)
    check_units_against_reference(model, q, plan, analysis, test, optimize=True)
    assert EmitReport.from_json(report.to_json()) == report


@pytest.mark.shared
def test_mnist_float_range_form_matches_reference(mnist) -> None:
    model, analysis, calib, test = mnist
    plan = minmax_plan(model, analysis, calib, w_bits=6, a_bits=6, twin_roles=("fc2", "attn_av"))
    opts = Emission(range_form="float", symmetric_container="int8")
    q, report = emit(model, plan, analysis, opts)
    assert Counter(n.op_type for n in q.graph.node)["Clip"] == expected_counts(plan, analysis)["Clip"]
    check_units_against_reference(model, q, plan, analysis, test, optimize=False)


@pytest.mark.shared
def test_mnist_w8a8_close_to_fp32(mnist) -> None:
    model, analysis, calib, _ = mnist
    plan = minmax_plan(model, analysis, calib, w_bits=8, a_bits=8)
    q, _ = emit(model, plan, analysis)
    feeds = {"input": mnist_images(2000, 64)}
    fp = run(model, feeds, ["logits"])["logits"]
    fused = run(q, feeds, ["logits"], optimize=True)["logits"]
    plain = run(q, feeds, ["logits"], optimize=False)["logits"]
    assert sqnr(fp, fused) > 20.0
    # ORT's fused integer kernels (QLinearMatMul requantizes where a Q follows) agree with the QDQ graph
    assert sqnr(plain, fused) > 40.0
    assert np.mean(fp.argmax(1) == fused.argmax(1)) >= 0.95


@pytest.mark.shared
@pytest.mark.parametrize("level", ["all", "extended"])
def test_mnist_w8a8_runs_integer_kernels(mnist, tmp_path: Path, level: str) -> None:
    model, analysis, calib, _ = mnist
    plan = minmax_plan(model, analysis, calib, w_bits=8, a_bits=8)
    q, _ = emit(model, plan, analysis)
    path = save_model(q, tmp_path / "w8a8.onnx")
    info = _load_tool().count_kernels(path, level=level)
    assert info["float"] == [], f"float matmuls left: {info['float']}"
    integer = info["integer"]
    # 25 Linears (MatMul) + 12 attention matmuls; the 2 head Gemms -> QGemm
    assert integer.get("MatMulIntegerToFloat", 0) + integer.get("QLinearMatMul", 0) == 37
    assert integer.get("QGemm", 0) == 2


@pytest.mark.shared
def test_mnist_twin_lattice_runs_integer_kernels(mnist, tmp_path: Path) -> None:
    """Twin operands in the lattice form: one integer matmul each, the twin's elementwise ops
    fused by ORT (QLinearLeakyRelu for GELU, QLinearWhere for Softmax)."""
    model, analysis, calib, _ = mnist
    plan = minmax_plan(model, analysis, calib, w_bits=4, a_bits=4, twin_roles=("fc2", "attn_av"))
    tool = _load_tool()
    q, report = emit(model, plan, analysis)
    lattice = [eu.unit for eu in report.units if "twin" in eu.schemes and eu.matmuls == 1]
    assert len(lattice) >= 6  # every softmax twin (m = k - 1 fits); gelu twins whose hand-set m fits
    info = tool.count_kernels(save_model(q, tmp_path / "twin.onnx"))
    assert info["float"] == []
    split = split_twins(plan)
    assert info["integer"].get("MatMulIntegerToFloat", 0) + info["integer"].get("QLinearMatMul", 0) == 37 + split
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "twin.onnx"), so, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert fused["QLinearWhere"] == 6  # the six softmax twins
    assert fused["QLinearLeakyRelu"] == sum(1 for lp in plan.layers for a in lp.inputs
                                            if a.scheme is Scheme.TWIN and a.twin_kind is TwinKind.GELU and a.m > 0
                                            and lattice_fits(a.params()))


@pytest.mark.shared
@pytest.mark.slow
def test_mnist_latency_vs_quantize_static(tmp_path: Path) -> None:
    if not MNIST.is_file():
        pytest.skip(f"{MNIST} is missing")
    pytest.importorskip("onnxruntime.quantization")
    data = tmp_path / "calib.npz"
    np.savez(data, input=mnist_images(0, 128))
    res = _load_tool().compare_ort(MNIST, data, batch=32, runs=20, threads=1)
    lat = res["latency_ms"]
    assert lat["onnx_mptq"] <= 1.10 * lat["quantize_static"], lat


# ---------------------------------------------------------------------------------------------
# tiny timm models (torch)


@pytest.mark.torch
@pytest.mark.parametrize("kind,opset", [("vit", 17), pytest.param("swin", 17, marks=pytest.mark.slow),
                                         pytest.param("swin", 14, marks=pytest.mark.slow)])
def test_tiny_timm_units_match_reference(tiny_onnx, tmp_path: Path, kind: str, opset: int) -> None:  # noqa: F811
    path = tiny_onnx(kind, opset)
    model = onnx.load(str(path))
    analysis = analyze(model)
    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    rng = np.random.default_rng(0)
    calib = [{inp.name: rng.standard_normal([4, *shape]).astype(np.float32)} for _ in range(2)]
    test = {inp.name: rng.standard_normal([2, *shape]).astype(np.float32)}
    for case in ("w8a8", "w4a4", "w4a8", "w6a6", "w4a4_twin", "w4a4_twin_split"):
        plan = minmax_plan(model, analysis, calib, **CASES[case])
        opts = OPTIONS.get(case, Emission())
        q, report = emit(model, plan, analysis, opts)
        assert report.quantize_nodes == expected_counts(plan, analysis, opts)["QuantizeLinear"], case
        check_units_against_reference(model, q, plan, analysis, test, optimize=True)
        if case == "w8a8":
            fp = run(model, test, analysis.outputs[:1])[analysis.outputs[0]]
            out = run(q, test, analysis.outputs[:1])[analysis.outputs[0]]
            assert sqnr(fp, out) > 20.0
            info = _load_tool().count_kernels(save_model(q, tmp_path / f"{kind}.onnx"))
            # every Linear and attention matmul is integer; the patch-embedding Conv stays float
            assert all(n.startswith("/patch_embed") for n in info["float"]), info["float"]
            n_int = sum(info["integer"].values())
            assert n_int == sum(1 for u in analysis.units if u.op_type != "Conv")


# ---------------------------------------------------------------------------------------------
# in-code graphs: structure, declines and errors


def separate_qkv_vit(seed: int = 0) -> onnx.ModelProto:
    """One attention block with separate q, k, v Linears reading one LayerNorm output."""
    rng = np.random.default_rng(seed)
    d, t = 8, 5

    def w(*s):
        return numpy_helper.from_array((0.3 * rng.standard_normal(s)).astype(np.float32), f"W{len(inits)}")

    inits: list = []
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1)]
    inits += [numpy_helper.from_array(np.ones(d, np.float32), "g"), numpy_helper.from_array(np.zeros(d, np.float32), "b")]
    for name in ("q", "k", "v"):
        inits.append(w(d, d))
        nodes.append(helper.make_node("MatMul", ["y", inits[-1].name], [name], name=f"mm_{name}"))
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="av"),
    ]
    inits.append(w(d, d))
    nodes.append(helper.make_node("MatMul", ["o", inits[-1].name], ["out"], name="proj"))
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", t, d])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", t, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_case(bits: int = 8, **kw):
    model = tiny_vit(**kw)
    analysis = analyze(model)
    calib = [{"input": random_images(4, seed=1)}]
    return model, analysis, minmax_plan(model, analysis, calib, bits, bits)


def test_shared_tensor_gets_one_qdq_group() -> None:
    model = separate_qkv_vit()
    analysis = analyze(model)
    assert {u.role for u in analysis.units} >= {Role.Q, Role.K, Role.V}
    feeds = [{"x": np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)}]
    plan = minmax_plan(model, analysis, feeds, 8, 8)
    q, report = emit(model, plan, analysis)
    # y (read by q, k, v with one quantizer) + q, kt, p, v, o
    assert report.quantize_nodes == 6 == expected_counts(plan, analysis)["QuantizeLinear"]
    producer = {o: n for n in q.graph.node for o in n.output}

    def quantized_source(t: str) -> str | None:  # the tensor a DQ (-> Clip) <- Q chain quantizes
        n = producer.get(t)
        while n is not None and n.op_type in ("DequantizeLinear", "Clip"):
            n = producer.get(n.input[0])
        return n.input[0] if n is not None and n.op_type == "QuantizeLinear" else None

    readers = [n.name for n in q.graph.node if n.op_type == "MatMul" and quantized_source(n.input[0]) == "y"]
    assert sorted(readers) == ["mm_k", "mm_q", "mm_v"]
    assert len({n.input[0] for n in q.graph.node if n.name in readers}) == 1  # one group, shared
    check_units_against_reference(model, q, plan, analysis, feeds[0], optimize=True)


def test_gemm_bias_moves_to_an_add_and_names_survive() -> None:
    model, analysis, plan = tiny_case()
    q, report = emit(model, plan, analysis)
    head = analysis.by_role(Role.HEAD)[0]
    assert head.op_type == "Gemm"
    gemm = next(n for n in q.graph.node if n.name == head.name)
    assert len(gemm.input) == 2  # no float C: ORT fuses it into QGemm
    add = next(n for n in q.graph.node if n.op_type == "Add" and gemm.output[0] in n.input)
    assert add.output[0] == head.output
    assert {n.name for n in model.graph.node} <= {n.name for n in q.graph.node}
    check_units_against_reference(model, q, plan, analysis, {"input": random_images(2, seed=3)}, optimize=True)


def test_emitting_twice_is_a_noop_and_another_plan_is_refused() -> None:
    model, analysis, plan = tiny_case()
    q, _ = emit(model, plan, analysis)
    assert emit_qdq(model, plan, analysis).model.SerializeToString() == q.SerializeToString()  # deterministic
    again, report = emit(q, plan, analysis)
    assert report.already_quantized and again.SerializeToString() == q.SerializeToString()
    other = dataclasses.replace(plan, notes=("edited",))
    with pytest.raises(PlanError, match="already quantized"):
        emit_qdq(q, other, analysis)


def test_stale_plan_and_bad_layers_are_refused() -> None:
    model, analysis, plan = tiny_case()
    with pytest.raises(PlanError, match="plan was made for another graph"):
        emit_qdq(model, dataclasses.replace(plan, model_digest="0" * 16), analysis)
    other_model, other_analysis, _ = tiny_case(seed=5)
    with pytest.raises(PlanError, match="analysis was made for another graph"):
        emit_qdq(other_model, plan, analysis)
    ghost = dataclasses.replace(plan.layers[1], unit="nope")
    with pytest.raises(PlanError, match="does not have: nope"):
        emit_qdq(model, dataclasses.replace(plan, layers=plan.layers + (ghost,)), analysis)
    lin = next(i for i, lp in enumerate(plan.layers) if lp.role == "qkv")
    bad = dataclasses.replace(plan.layers[lin], weight=WeightQuant(8, (0.1, 0.2)))
    layers = plan.layers[:lin] + (bad,) + plan.layers[lin + 1:]
    with pytest.raises(PlanError, match="2 weight scales"):
        emit_qdq(model, dataclasses.replace(plan, layers=layers), analysis)
    wrong = dataclasses.replace(plan.layers[lin], inputs=(dataclasses.replace(plan.layers[lin].inputs[0], tensor="zz"),))
    with pytest.raises(PlanError, match="quantizes tensor 'zz'"):
        emit_qdq(model, dataclasses.replace(plan, layers=plan.layers[:lin] + (wrong,) + plan.layers[lin + 1:]), analysis)
    pe = next(i for i, lp in enumerate(plan.layers) if lp.role == "patch_embed")
    coarse = dataclasses.replace(plan.layers[pe], inputs=(dataclasses.replace(plan.layers[pe].inputs[0], bits=6),))
    with pytest.raises(PlanError, match="differs from plan.input_quant"):
        emit_qdq(model, dataclasses.replace(plan, layers=plan.layers[:pe] + (coarse,) + plan.layers[pe + 1:]), analysis)


def test_unplanned_units_stay_float_with_a_reason() -> None:
    model, analysis, plan = tiny_case()
    keep = tuple(lp for lp in plan.layers if lp.role != "fc2")
    q, report = emit(model, dataclasses.replace(plan, layers=keep), analysis)
    fc2 = {u.name for u in analysis.by_role(Role.FC2)}
    assert {s.unit for s in report.skipped} == fc2
    assert all("not in the plan" in s.reason for s in report.skipped)
    for n in q.graph.node:
        if n.name in fc2:
            assert not any("mptq" in i for i in n.input)


@pytest.mark.parametrize("opset", [13, 17])
def test_tiny_vit_twin_at_opset(opset: int) -> None:
    """Integer Clip, Where and per-axis DQ at the oldest supported opset; decomposed LayerNorm."""
    model = tiny_vit(ln="decomposed", opset=opset)
    analysis = analyze(model)
    plan = minmax_plan(model, analysis, [{"input": random_images(4, seed=1)}], 4, 4, twin_roles=("fc2", "attn_av"))
    q, _ = emit(model, plan, analysis)
    assert q.opset_import[0].version == opset
    for optimize in (False, True):
        check_units_against_reference(model, q, plan, analysis, {"input": random_images(2, seed=2)}, optimize)


def test_float_weight_shared_outside_the_unit_is_kept() -> None:
    model = separate_qkv_vit()
    w_q = next(n for n in model.graph.node if n.name == "mm_q").input[1]
    model.graph.node.append(helper.make_node("ReduceSum", [w_q], ["w_sum"], name="w_user", keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("w_sum", TensorProto.FLOAT, []))
    analysis = analyze(model)
    feeds = [{"x": np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)}]
    plan = minmax_plan(model, analysis, feeds, 8, 8)
    q, _ = emit(model, plan, analysis)
    inits = {t.name for t in q.graph.initializer}
    assert w_q in inits  # still read by w_user
    assert all(n.input[1] not in inits for n in q.graph.node if n.name.startswith("mm_"))  # units read DQ outputs
    others = {n.input[1] for n in model.graph.node if n.name in ("mm_k", "mm_v", "proj")}
    assert not others & inits  # unshared float weights are gone
    out = run(q, feeds[0], ["w_sum"])["w_sum"]
    assert np.isclose(out, numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w_q)).sum())


def test_old_opset_is_refused() -> None:
    model, analysis, plan = tiny_case()
    old = onnx.ModelProto()
    old.CopyFrom(model)
    old.opset_import[0].version = 12
    with pytest.raises(UnsupportedModelError, match="opset 12"):
        emit_qdq(old, plan, analysis)


def saturating_linear(d: int = 64) -> tuple[onnx.ModelProto, ModelAnalysis, QuantPlan, dict]:
    """An attention block plus a Linear ``mm_wide`` (output ``wide``, no Q after it) that hits the
    u8 x s8 worst case: every weight code +-127 (equal-magnitude weights, one sign per column)
    and LayerNorm output codes 255 in adjacent pairs."""
    model = separate_qkv_vit()
    g = model.graph
    rng = np.random.default_rng(0)
    for t in g.initializer:
        if t.name in ("g", "b"):
            new = np.full(d, 1.0 if t.name == "g" else 0.0, np.float32)
        else:
            new = (0.1 * rng.standard_normal((d, d))).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(new, t.name))
    for v in list(g.input) + list(g.output):
        v.type.tensor_type.shape.dim[2].dim_value = d
    wide = np.tile(np.sign(rng.standard_normal((1, d))), (d, 1)).astype(np.float32) * 0.05
    g.initializer.append(numpy_helper.from_array(wide, "W_wide"))
    g.node.append(helper.make_node("MatMul", ["y", "W_wide"], ["wide"], name="mm_wide"))
    g.output.append(helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["N", 5, d]))
    analysis = analyze(model)
    assert "mm_wide" in {u.name for u in analysis.units}
    x = np.where(np.arange(d) < d // 2, 1.0, -1.0).astype(np.float32)[None, None, :] * np.ones((2, 5, 1), np.float32)
    feeds = {"x": x}
    plan = minmax_plan(model, analysis, [feeds], 8, 8)
    return model, analysis, plan, feeds


@pytest.mark.parametrize("container", ["auto", "uint8"])
def test_wide_weight_codes_are_exact_on_every_cpu(container: str) -> None:
    model, analysis, plan, feeds = saturating_linear()
    q, report = emit(model, plan, analysis, Emission(weight_container=container))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    wdq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
           and inits[n.input[0]].ndim == 2]
    assert len(wdq) == 5 == report.uint8_weights and report.weight_container == container
    for n in wdq:
        assert inits[n.input[0]].dtype == np.uint8 and np.all(inits[n.input[2]] == 128)
    mm_wide = next(n for n in q.graph.node if n.name == "mm_wide")
    wide = next(inits[n.input[0]] for n in wdq if n.output[0] == mm_wide.input[1])
    assert set(np.unique(wide)) == {1, 255}  # codes -127 / +127
    # exact against the numpy reference with ORT's fused integer kernels, whatever this CPU is
    check_units_against_reference(model, q, plan, analysis, feeds, optimize=True)


def test_int8_weight_container_is_exact_only_where_the_cpu_does_not_saturate() -> None:
    from onnx_mptq.calibrate.session import cpu_u8s8_exact

    model, analysis, plan, feeds = saturating_linear()
    q, report = emit(model, plan, analysis, Emission(weight_container="int8"))
    assert report.uint8_weights == 0
    auto, _ = emit(model, plan, analysis)
    got = run(q, feeds, ["wide"])["wide"]
    want = run(auto, feeds, ["wide"])["wide"]
    if cpu_u8s8_exact():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # the documented hazard: int8 codes beyond +-64 saturate here
        assert np.abs(got - want).max() > 0.1 * np.abs(want).max()


def test_weight_codes_container_rule() -> None:
    small = np.array([[-64, 64], [3, -7]], np.int8)
    wide = np.array([[-65, 2]], np.int8)
    assert weight_codes(small, "auto")[0].dtype == np.int8 and weight_codes(small, "auto")[1] == 0
    codes, zp = weight_codes(wide, "auto")
    assert codes.dtype == np.uint8 and zp == 128 and codes.tolist() == [[63, 130]]
    assert weight_codes(wide, "int8")[0].dtype == np.int8
    assert weight_codes(small, "uint8")[0].tolist() == [[64, 192], [131, 121]]
    assert U8S8_SAFE_CODE * 255 * 2 < 2 ** 15
    with pytest.raises(PlanError, match="emission.weight_container: 'int4' is not one of auto, int8, uint8"):
        Emission(weight_container="int4")


# ---------------------------------------------------------------------------------------------
# graph form: compact (default) vs verbose names and annotations


@pytest.mark.parametrize("twin_form", [TwinForm.AUTO, TwinForm.SPLIT])
def test_compact_graph_form_is_the_verbose_model_with_fewer_bytes(tmp_path: Path, twin_form: TwinForm) -> None:
    """The compact form (the default) and the verbose form are one model: same op types, same
    constant values per node, bit-identical ORT outputs (optimized and not), the same integer
    kernels; compact keeps every node name of the input, has no value_info, shares each scalar /
    zero-point value once, and is smaller. Each form re-emits to the same bytes."""
    from onnx_mptq.plan import GraphForm
    from onnx_mptq.validate import compare_outputs

    model = tiny_vit(dim=64, mlp=128)
    analysis = analyze(model)
    calib = [{"input": random_images(4, seed=1)}]
    plan = minmax_plan(model, analysis, calib, 4, 4, twin_roles=("fc2", "attn_av"))
    forms = {}
    for form in GraphForm:
        opts = dataclasses.replace(plan.emission, graph_form=form, twin_form=twin_form)
        q, _ = emit(model, plan, analysis, opts)
        again, _ = emit(model, plan, analysis, opts)
        assert again.SerializeToString() == q.SerializeToString(), form
        forms[form] = q
    c, v = forms[GraphForm.COMPACT], forms[GraphForm.VERBOSE]
    assert Counter(n.op_type for n in c.graph.node) == Counter(n.op_type for n in v.graph.node)
    assert len(v.graph.value_info) > 0 and len(c.graph.value_info) == 0
    assert {n.name for n in model.graph.node if n.name} <= {n.name for n in c.graph.node}

    def values(m: onnx.ModelProto) -> list[tuple[str, list]]:  # (op, constant inputs as arrays) in node order
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        return [(n.op_type, [inits[i].tobytes() + str(inits[i].dtype).encode() for i in n.input if i in inits])
                for n in gs_sorted(m)]

    assert values(c) == values(v)
    own = {t.name for t in model.graph.initializer}
    scalars = [t for t in c.graph.initializer if not t.dims and t.name not in own]
    keys = [(t.data_type, numpy_helper.to_array(t).tobytes()) for t in scalars]
    assert len(keys) == len(set(keys))  # one constant per scalar value emission adds
    assert sum(1 for t in v.graph.initializer if not t.dims and t.name not in own) > len(scalars)
    feeds = [{"input": random_images(3, seed=s)} for s in (5, 6)]
    for optimize in (True, False):
        assert compare_outputs(v, c, feeds, CPU1, optimize=optimize).max_abs == 0.0
    tool = _load_tool()
    kc = tool.count_kernels(save_model(c, tmp_path / "c.onnx"))
    kv = tool.count_kernels(save_model(v, tmp_path / "v.onnx"))
    assert kc["integer"] == kv["integer"] and kc["float_ops"] == kv["float_ops"] and sum(kc["integer"].values()) > 0
    assert (tmp_path / "c.onnx").stat().st_size < (tmp_path / "v.onnx").stat().st_size
    check_units_against_reference(model, c, plan, analysis, feeds[0], optimize=True)
    # the plan records the form and a JSON round trip keeps it
    rt = QuantPlan.from_json(dataclasses.replace(plan, emission=dataclasses.replace(
        plan.emission, graph_form=GraphForm.VERBOSE)).to_json())
    assert rt.emission.graph_form is GraphForm.VERBOSE


def gs_sorted(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes in a name-independent order: by op type, then by the op types feeding them."""
    prod = {o: n.op_type for n in m.graph.node for o in n.output}
    return sorted(m.graph.node, key=lambda n: (n.op_type, tuple(prod.get(i, "") for i in n.input),
                                                tuple(a.SerializeToString() for a in n.attribute)))
