#!/usr/bin/env python
"""Which kernels does ONNX Runtime really run for a (QDQ) model?

    python tools/check_int_kernels.py MODEL.onnx
    python tools/check_int_kernels.py FP32.onnx --compare-ort --data calib.npz [--batch 32 --runs 20]
    python tools/check_int_kernels.py A.onnx B.onnx [...] --latency [--data x.npz] [--batch 32 --runs 20]

The first form builds a CPU session with graph optimizations on (``ORT_ENABLE_ALL``) and
``optimized_model_filepath`` set, loads the graph ORT saved and prints its op-type counts,
flagging every MatMul / Gemm / Conv still computed in float next to the integer kernels
(QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearConv, DynamicQuantizeMatMul, MatMulInteger,
ConvInteger). Exit status 1 when a float matmul-like node remains and ``--strict`` is given.

``--compare-ort`` takes the FP32 model and calibration inputs (an .npz with one array per model
input), then builds side by side: onnx-mptq's W8A8 emission of a min/max plan, and
``onnxruntime.quantization.quantize_static`` (QDQ, per_channel=True, MinMax, uint8 activations,
int8 weights) on the same data; it prints both kernel summaries and the median latency (several
runs, batch ``--batch``) of FP32, quantize_static and onnx-mptq.

``--latency`` with several models (e.g. the int8 and the int4 storage of one quantized model,
``--weight-storage int8|int4``) prints each one's kernel summary and times them side by side in
one run: interleaved rounds, the same inputs (``--data`` or seeded normal noise shaped like the
first model's inputs, dynamic dims = ``--batch``), median of ``--runs`` per round, median of rounds;
it also reports the file sizes and the largest output difference from the first model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_mptq.calibrate.session import make_session  # noqa: E402
from onnx_mptq.config import Providers, RuntimeConfig  # noqa: E402
from onnx_mptq.graph.edit import with_outputs  # noqa: E402

INTEGER_KERNELS = frozenset({
    "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearConv", "DynamicQuantizeMatMul",
    "MatMulInteger", "ConvInteger", "QAttention", "MatMulNBits",
})
FLOAT_KERNELS = frozenset({"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "NchwcConv"})


def count_kernels(model_path: str | Path, threads: int = 1, level: str = "all") -> dict:
    """Op-type counts of the graph ORT optimizes ``model_path`` into (CPU).

    level: "all" (``ORT_ENABLE_ALL``, through :func:`onnx_mptq.calibrate.session.make_session`) or
    "extended" (``ORT_ENABLE_EXTENDED``: no layout transforms, the graph ORT saves is portable).
    Returns ``{"ops": {op: count}, "integer": {op: count}, "float": [node names of float
    MatMul/Gemm/Conv-like nodes], "float_ops": {op: count}}``.
    """
    with tempfile.TemporaryDirectory(prefix="mptq_kernels_") as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        if level == "all":
            make_session(str(model_path), RuntimeConfig(providers=Providers.CPU, threads=threads),
                         optimize=True, optimized_model_path=str(opt_path))
        elif level == "extended":
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = str(opt_path)
            so.intra_op_num_threads = threads
            ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        else:
            raise ValueError(f"level must be 'all' or 'extended', got {level!r}")
        g = onnx.load(str(opt_path), load_external_data=False).graph
    ops = Counter(n.op_type for n in g.node)
    return {
        "ops": dict(sorted(ops.items())),
        "integer": {k: v for k, v in sorted(ops.items()) if k in INTEGER_KERNELS},
        "float_ops": {k: v for k, v in sorted(ops.items()) if k in FLOAT_KERNELS},
        "float": [n.name or n.op_type for n in g.node if n.op_type in FLOAT_KERNELS],
    }


def format_kernels(info: dict, title: str) -> str:
    lines = [f"== {title}"]
    lines.append("  integer kernels: " + (", ".join(f"{k} x{v}" for k, v in info["integer"].items()) or "none"))
    lines.append("  float matmul-like: " + (", ".join(f"{k} x{v}" for k, v in info["float_ops"].items()) or "none"))
    for name in info["float"]:
        lines.append(f"    float: {name}")
    lines.append("  all ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --compare-ort


def minmax_plan(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], w_bits: int = 8, a_bits: int = 8):
    """A min/max W{w_bits}A{a_bits} plan (asymmetric activations, image at 8 bits). Returns (plan, analysis)."""
    import dataclasses

    import onnx_graphsurgeon as gs

    from onnx_mptq.graph.analysis import GraphView, Role, analyze
    from onnx_mptq.graph.io import assign_node_names
    from onnx_mptq.numerics.quant import params_from_range, weight_params
    from onnx_mptq.plan import ActQuant, LayerPlan, QuantPlan, WeightQuant

    analysis = analyze(model)
    names = sorted({t for u in analysis.units for t in u.inputs} | set(analysis.inputs))
    sess = make_session(with_outputs(model, names), RuntimeConfig(providers=Providers.CPU))
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for f in feeds:
        for n, a in zip(names, sess.run(f, names)):
            lo[n], hi[n] = min(lo[n], float(a.min())), max(hi[n], float(a.max()))

    def aq(t: str, src: str, bits: int) -> ActQuant:
        return ActQuant.from_params(t, params_from_range(lo[src], hi[src], bits, False))

    m = onnx.ModelProto()
    m.CopyFrom(model)
    assign_node_names(m)
    g = gs.import_onnx(m)
    view = GraphView(g)
    input_quant = aq(analysis.inputs[0], analysis.inputs[0], 8)
    layers = []
    for u in analysis.units:
        ins = tuple(dataclasses.replace(input_quant, tensor=t) if u.role is Role.PATCH_EMBED else aq(t, t, a_bits)
                    for t in u.inputs)
        wq, params = None, 0
        if u.weight_input is not None:
            w = u.weight_as_read(view)
            wq = WeightQuant.from_params(weight_params(w, w_bits, u.weight_axis))
            params = int(w.size)
        layers.append(LayerPlan(unit=u.name, role=u.role.value, inputs=ins, weight=wq, params=params))
    plan = QuantPlan(source_digest=analysis.model_digest, model_digest=analysis.model_digest,
                     layers=tuple(layers), input_quant=input_quant)
    return plan, analysis


def quantize_static_qdq(fp32_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def median_latency(model_path: Path, feeds: dict[str, np.ndarray], runs: int, threads: int) -> float:
    sess = make_session(str(model_path), RuntimeConfig(providers=Providers.CPU, threads=threads))
    for _ in range(3):
        sess.run(feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def compare_ort(fp32_path: Path, data: Path, batch: int, runs: int, threads: int, rounds: int = 3) -> dict:
    from onnx_mptq.graph.io import save_model
    from onnx_mptq.passes.emit_qdq import emit_qdq

    arrays = dict(np.load(data))
    arrays.pop("labels", None)
    n = min(len(a) for a in arrays.values())
    calib = [{k: a[i:i + batch] for k, a in arrays.items()} for i in range(0, min(n, 4 * batch), batch)]
    bench = {k: a[:batch] if len(a) >= batch else np.resize(a, (batch,) + a.shape[1:]) for k, a in arrays.items()}
    model = onnx.load(str(fp32_path))
    plan, analysis = minmax_plan(model, calib)
    emitted = emit_qdq(model, plan, analysis).model
    with tempfile.TemporaryDirectory(prefix="mptq_compare_") as tmp:
        ours = save_model(emitted, Path(tmp) / "mptq_w8a8.onnx")
        ort_q = Path(tmp) / "ort_qdq.onnx"
        quantize_static_qdq(fp32_path, ort_q, calib)
        result = {"kernels_mptq": count_kernels(ours), "kernels_ort": count_kernels(ort_q)}
        lat: dict[str, list[float]] = {"fp32": [], "quantize_static": [], "onnx_mptq": []}
        for _ in range(rounds):  # interleaved rounds: machine load hits every model alike
            lat["fp32"].append(median_latency(fp32_path, bench, runs, threads))
            lat["quantize_static"].append(median_latency(ort_q, bench, runs, threads))
            lat["onnx_mptq"].append(median_latency(ours, bench, runs, threads))
    result["latency_ms"] = {k: 1e3 * float(np.median(v)) for k, v in lat.items()}
    return result


def _bench_feeds(model_path: Path, data: Path | None, batch: int) -> dict[str, np.ndarray]:
    from onnx_mptq.data import input_specs

    specs = input_specs(onnx.load(str(model_path), load_external_data=False))
    if data is not None:
        arrays = {k: v for k, v in np.load(data).items() if k != "labels"}
        if len(specs) == 1 and len(arrays) == 1:
            arrays = {next(iter(specs)): next(iter(arrays.values()))}
        return {k: a[:batch] if len(a) >= batch else np.resize(a, (batch,) + a.shape[1:]) for k, a in arrays.items()}
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(tuple(d if isinstance(d, int) else batch for d in sp.shape)).astype(sp.dtype)
            for k, sp in specs.items()}


def side_by_side(models: list[Path], data: Path | None, batch: int, runs: int, threads: int, rounds: int = 3) -> dict:
    """Kernels, file size, output difference from models[0] and interleaved median latency of each model."""
    feeds = _bench_feeds(models[0], data, batch)
    outs = [make_session(str(m), RuntimeConfig(providers=Providers.CPU, threads=threads)).run(feeds)[0] for m in models]
    lat: dict[str, list[float]] = {str(m): [] for m in models}
    for _ in range(rounds):  # interleaved rounds: machine load hits every model alike
        for m in models:
            lat[str(m)].append(median_latency(m, feeds, runs, threads))
    return {str(m): {"kernels": count_kernels(m, threads), "bytes": m.stat().st_size,
                     "max_abs_diff": float(np.max(np.abs(o.astype(np.float64) - outs[0]))),
                     "latency_ms": 1e3 * float(np.median(lat[str(m)]))}
            for m, o in zip(models, outs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("more", type=Path, nargs="*", help="more models, for --latency")
    ap.add_argument("--latency", action="store_true", help="time MODEL and the other models side by side")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a float MatMul/Gemm/Conv remains")
    ap.add_argument("--compare-ort", action="store_true",
                    help="MODEL is FP32: compare onnx-mptq W8A8 with quantize_static (needs --data)")
    ap.add_argument("--data", type=Path, help=".npz with one array per model input (calibration + benchmark)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for m in [args.model, *args.more]:
        if not m.is_file():
            print(f"{m}: no such file", file=sys.stderr)
            return 2
    if args.latency:
        res = side_by_side([args.model, *args.more], args.data, args.batch, args.runs, args.threads)
        for name, r in res.items():
            print(format_kernels(r["kernels"], name))
        print(f"== latency, batch {args.batch}, {args.threads} thread(s), median of {args.runs} runs x 3 rounds (interleaved)")
        first = next(iter(res.values()))
        for name, r in res.items():
            print(f"  {r['latency_ms']:8.2f} ms  x{r['latency_ms'] / first['latency_ms']:.3f}  {r['bytes'] / 1e6:8.3f} MB  "
                  f"max|diff| {r['max_abs_diff']:.3g}  {name}")
        return 1 if args.strict and any(r["kernels"]["float"] for r in res.values()) else 0
    if args.compare_ort:
        if args.data is None or not args.data.is_file():
            print("--compare-ort needs --data FILE.npz (one array per model input)", file=sys.stderr)
            return 2
        res = compare_ort(args.model, args.data, args.batch, args.runs, args.threads)
        print(format_kernels(res["kernels_ort"], "quantize_static (QDQ, per-channel, MinMax)"))
        print(format_kernels(res["kernels_mptq"], "onnx-mptq W8A8 (min/max plan)"))
        lat = res["latency_ms"]
        print(f"== latency, batch {args.batch}, {args.threads} thread(s), median of {args.runs} runs x 3 rounds")
        for k, v in lat.items():
            print(f"  {k:16s} {v:8.2f} ms")
        print(f"  onnx-mptq / quantize_static = {lat['onnx_mptq'] / lat['quantize_static']:.3f}")
        return 0
    info = count_kernels(args.model, args.threads)
    print(format_kernels(info, str(args.model)))
    return 1 if args.strict and info["float"] else 0


if __name__ == "__main__":
    sys.exit(main())
