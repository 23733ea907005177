"""Ablation of the closed-form error compensation (issue 15): nearest / +GPTQ / +activation
compensation / +bias correction, per model and bit-width.

    python tools/bench_compensate.py --models cifar10,mnist --bits 4,8,3,6 --markdown

The models and splits are tools/shared_data.py's (1,000 calibration images, 9,000 evaluation
images). Per (model, bits) the pipeline runs once up to the plan (SQ-b, capture, scale search,
OPT-m choice: the stages of ``onnx_mptq.pipeline.quantize``, in its order and with its config);
then each row applies the compensation parts cumulatively to that same plan, emits and evaluates
against the FP32 model (its logits computed once per model: top-1, top-1 agreement and SQNR over
all logits as onnx_mptq.validate defines them). Rows (``--rows`` keys): nearest, +gptq,
+act-float (activation compensation on each layer's float input, quantized), +act-blocks (on the
inputs of the network quantized and compensated upstream, captured block by block:
``quant.compensate.inputs = blocks``), +activation (on the
inputs of the network quantized and compensated upstream: ``quant.compensate.inputs =
sequential``), +bias (bias correction on top of +activation), +bias-float (on top of +act-float). ``conv s`` is the conversion without compensation (analysis to emission),
``comp s`` the compensation stage; ``+%`` their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = (("nearest", dict()),
        ("+gptq", dict(gptq=True)),
        ("+activation (float inputs)", dict(gptq=True, activation=True, inputs="float")),
        ("+activation (block inputs)", dict(gptq=True, activation=True, inputs="blocks")),
        ("+activation", dict(gptq=True, activation=True, inputs="sequential")),
        ("+bias", dict(gptq=True, activation=True, bias=True, inputs="sequential")),
        ("+bias (float inputs)", dict(gptq=True, activation=True, bias=True, inputs="float")))
ROW_KEYS = {"nearest": "nearest", "+gptq": "+gptq", "+activation (float inputs)": "+act-float",
            "+activation (block inputs)": "+act-blocks",
            "+activation": "+activation", "+bias": "+bias", "+bias (float inputs)": "+bias-float"}


def _data(out: Path, name: str, limit_eval: int | None) -> tuple[Path, Path, Path]:
    import shared_data

    model = shared_data.CIFAR_MODEL if name == "cifar10" else shared_data.MNIST_MODEL
    calib_p, eval_p = out / f"{name}_calib.npz", out / f"{name}_eval.npz"
    if not calib_p.exists() or not eval_p.exists():
        calib, ev = shared_data.splits(name)
        np.savez(calib_p, **calib)
        np.savez(eval_p, **ev)
    if limit_eval is not None:
        ev = dict(np.load(eval_p))
        eval_p = out / f"{name}_eval_{limit_eval}.npz"
        np.savez(eval_p, **{k: v[:limit_eval] for k, v in ev.items()})
    return Path(model), calib_p, eval_p


class Eval:
    """The evaluation split with the FP32 model's logits, computed once."""

    def __init__(self, model_path: Path, eval_p: Path) -> None:
        from onnx_mptq.graph.io import load_model

        d = dict(np.load(eval_p))
        self.labels = d.pop("labels", None)
        self.x = next(iter(d.values()))
        self.ref = self.logits(load_model(model_path))

    def logits(self, model) -> np.ndarray:
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: self.x[i:i + 100]})[0] for i in range(0, len(self.x), 100)])

    def metrics(self, model) -> dict:
        from onnx_mptq.numerics.metrics import sqnr_db

        out = self.logits(model)
        top1 = None if self.labels is None else float(100 * np.mean(out.argmax(1) == self.labels))
        return {"top1": top1, "agree": float(100 * np.mean(out.argmax(1) == self.ref.argmax(1))),
                "sqnr_db": float(sqnr_db(self.ref, out))}


def run(model_path: Path, calib_p: Path, ev: Eval, bits: int, rows: list[str], base_cfg: dict, json_path=None,
        extra: dict | None = None) -> list[dict]:
    from onnx_mptq.calibrate.capture import capture_unit_inputs
    from onnx_mptq.config import CompensateConfig, Config, OptmSelect, Providers, QuantConfig, RuntimeConfig
    from onnx_mptq.data import input_specs, open_data
    from onnx_mptq.graph.analysis import analyze, prepare
    from onnx_mptq.graph.io import graph_digest, load_model
    from onnx_mptq.passes.emit_qdq import emit_qdq
    from onnx_mptq.pipeline import compensation_stage, smooth
    from onnx_mptq.search.scales import search_scales

    cfg = Config(quant=QuantConfig(w_bits=bits, a_bits=bits), runtime=RuntimeConfig(providers=Providers.CPU))
    t0 = time.perf_counter()
    source = load_model(model_path)
    specs = input_specs(source)
    data = open_data(str(calib_p), specs, batch_size=cfg.calib.batch_size)
    prepared = prepare(source)
    analysis0 = analyze(prepared, prepared=True)
    sres = smooth(source, data, cfg, analysis=analysis0, prepared=prepared, progress=False)
    work = prepare(sres.model)
    analysis = analyze(work, prepared=True)
    captured = capture_unit_inputs(work, analysis, data, cfg.runtime, tokens_per_layer=cfg.capture.tokens_per_layer,
                                   seed=cfg.seed, progress=False)
    plan = search_scales(work, analysis, captured, cfg, source_digest=graph_digest(source), smoothing=sres.plan,
                         progress=False)
    base, options = plan.plan, plan.twin_options
    if options and cfg.quant.optm.select is OptmSelect.NETWORK:
        from onnx_mptq.search.optm import make_evaluator, select_twins

        base = select_twins(base, options, make_evaluator(work, analysis, captured, data, cfg), z=cfg.quant.optm.z,
                            progress=False).plan
    t_plan = time.perf_counter() - t0
    out = []
    for name, parts in ROWS:
        if ROW_KEYS[name] not in rows:
            continue
        ccfg = CompensateConfig(**(parts | base_cfg))  # type: ignore[arg-type]
        t = time.perf_counter()
        ccfg_all = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, compensate=ccfg))
        res = compensation_stage(work, analysis, captured, base, data, ccfg_all) if ccfg.any else None
        t_comp = time.perf_counter() - t
        t = time.perf_counter()
        emitted = emit_qdq(work, res.plan if res else base, analysis, res.weights if res else None)
        t_emit = time.perf_counter() - t
        d = ev.metrics(emitted.model)
        kept: dict[str, int] = {}
        for lc in (res.layers if res else ()):
            for p in lc.kept:
                kept[p.value] = kept.get(p.value, 0) + 1
        out.append((extra or {}) | {"bits": bits, "row": name, "top1": d["top1"], "agree": d["agree"],
                                    "sqnr_db": d["sqnr_db"], "conv_s": t_plan + t_emit, "comp_s": t_comp,
                                    "layers": len(res.layers) if res else 0, "kept": kept})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(out[-1]) + "\n")
    return out


def _pct(v) -> str:
    return "" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cifar10,mnist")
    ap.add_argument("--bits", default="4,8,3,6", help="comma-separated WbAb bit-widths, run in this order")
    ap.add_argument("--rows", default=",".join(ROW_KEYS.values()), help="comma-separated row keys (default: all)")
    ap.add_argument("--data-dir", type=Path, default=Path("bench_data"))
    ap.add_argument("--limit-eval", type=int, default=None)
    ap.add_argument("--damp", type=float, default=None)
    ap.add_argument("--ridge", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None, help="append the results here, one JSON line each")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--table", type=Path, default=None, help="only render the table of a --json file")
    args = ap.parse_args(argv)
    if args.table:
        _print_table([json.loads(ln) for ln in args.table.read_text().splitlines() if ln.strip()], args.markdown)
        return 0
    args.data_dir.mkdir(parents=True, exist_ok=True)
    base_cfg = {k: v for k, v in (("damp", args.damp), ("ridge", args.ridge)) if v is not None}
    rows = args.rows.split(",")
    table = []
    for name in args.models.split(","):
        model, calib_p, eval_p = _data(args.data_dir, name, args.limit_eval)
        ev = Eval(model, eval_p)
        fp = None if ev.labels is None else float(100 * np.mean(ev.ref.argmax(1) == ev.labels))
        print(json.dumps({"model": name, "fp32_top1": fp}), file=sys.stderr, flush=True)
        for b in (int(x) for x in args.bits.split(",")):
            table.extend(run(model, calib_p, ev, b, rows, base_cfg, args.json, {"model": name, "fp32_top1": fp}))
    _print_table(table, args.markdown)
    return 0


def _print_table(table: list[dict], markdown: bool) -> None:
    head = ("model", "WbAb", "row", "top-1 %", "FP32 top-1 %", "agree %", "SQNR dB", "conv s", "comp s", "+%", "layers kept")
    lines = []
    for r in table:
        kept = ", ".join(f"{k} {v}/{r['layers']}" for k, v in sorted(r["kept"].items()))
        lines.append((r["model"], f"W{r['bits']}A{r['bits']}", r["row"], _pct(r["top1"]), _pct(r["fp32_top1"]),
                      _pct(r["agree"]), f"{r['sqnr_db']:.1f}" if r["sqnr_db"] is not None else "",
                      f"{r['conv_s']:.1f}", f"{r['comp_s']:.1f}", f"{100 * r['comp_s'] / r['conv_s']:.0f}", kept))
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        for ln in [head] + lines:
            print("  ".join(str(c) for c in ln))


if __name__ == "__main__":
    raise SystemExit(main())
