"""Benchmarks of the greedy mixed-precision search (issue 6).

    python tools/bench_mixed.py deit [--calib N] [--subset N] [--target B]
        Time allocate_bits on a random-weight timm DeiT-S (deit_small_patch16_224, exported to a
        temporary folder) with N calibration images (the ImageNet photos of
        ../shared/data/imagenet-sample-calib-250, timm preprocessing). Prints the seconds of
        every stage and of the search itself (the 10-minute target is for the search).

    python tools/bench_mixed.py real [--models cifar10 mnist] [--targets 4.5 5 6] [--eval-limit N]
        On the real models of ../shared/data (standard splits, tools/shared_data.py): uniform
        W5A5 (and W4A4, W6A6) against mixed precision at each target, top-1 and top-1 agreement
        with FP32 on the evaluation split.

Runs on whatever CPU is there; progress bars show when stderr is a terminal.

Measured (2-core AMD EPYC VM shared with other jobs, onnxruntime 1.31 CPU, default config:
candidates 4/5/6/8, subset 32, metric nmse):

* DeiT-S, 64 calibration images, target 5: search 294 s (347 evaluations, 227 steps; load
  average 2.4); 751 s when other jobs kept the load average at 4-5 (CPU time 674 s).
* held-out splits (9,000 images each), top-1 / agreement with FP32 (%):

  ========  =============  =============  =============  =============  ======
  model     W5A5           MP 4.5         MP 5           MP 6           FP32
  ========  =============  =============  =============  =============  ======
  cifar10   71.69 / 95.50  71.54 / 94.46  71.83 / 95.86  72.02 / 97.79  72.02
  mnist     97.83 / 99.37  97.78 / 99.14  97.96 / 99.36  97.94 / 99.70  98.01
  ========  =============  =============  =============  =============  ======
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from onnx_mptq.config import Config, MixedConfig, QuantConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def bench_deit(args: argparse.Namespace) -> dict:
    from onnx_mptq.calibrate.capture import capture_unit_inputs
    from onnx_mptq.data import input_specs, open_data, preprocess_from_timm
    from onnx_mptq.export import export_timm
    from onnx_mptq.graph.analysis import analyze, prepare
    from onnx_mptq.graph.io import load_model
    from onnx_mptq.pipeline import resolve_progress, smooth
    from onnx_mptq.search.mixed import allocate_bits

    name = "deit_small_patch16_224"
    cfg = Config(mixed=MixedConfig(enabled=True, target_bits=args.target, subset=args.subset))
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as tmp:
        t = time.perf_counter()
        export_timm(name, Path(tmp) / "deit_s.onnx", check_samples=1)
        times["export_s"] = time.perf_counter() - t
        source = load_model(Path(tmp) / "deit_s.onnx")
    images = SHARED / "imagenet-sample-calib-250" / "images"
    data = open_data(images, input_specs(source), limit=args.calib, batch_size=cfg.calib.batch_size,
                     preprocess=preprocess_from_timm(name))
    t = time.perf_counter()
    prepared = prepare(source)
    sres = smooth(source, data, cfg, analysis=analyze(prepared, prepared=True), prepared=prepared)
    work = prepare(sres.model)
    analysis = analyze(work, prepared=True)
    times["smooth_s"] = time.perf_counter() - t
    t = time.perf_counter()
    captured = capture_unit_inputs(work, analysis, data, cfg.runtime, tokens_per_layer=cfg.capture.tokens_per_layer,
                                   seed=cfg.seed, progress=resolve_progress(None))
    times["capture_s"] = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    res = allocate_bits(work, analysis, captured, data, cfg, progress=resolve_progress(None))
    times["allocate_s"] = time.perf_counter() - t
    cpu = time.process_time() - c
    load = os.getloadavg()
    out = {
        "model": name, "calibration_images": args.calib, "subset": res.sensitivity.samples,
        "target_bits": args.target, "times_s": times, "search_s": res.seconds, "evaluations": res.evaluations,
        "eval_s": res.eval_seconds, "steps": len(res.history), "avg_weight_bits": res.avg_weight_bits,
        "avg_activation_bits": res.avg_activation_bits, "search_cpu_s": cpu, "loadavg": load,
    }
    print(f"DeiT-S greedy MP search: {res.seconds:.1f} s for {args.calib} calibration images "
          f"(subset {res.sensitivity.samples}, {res.evaluations} evaluations taking {res.eval_seconds:.1f} s, "
          f"{len(res.history)} steps); averages W {res.avg_weight_bits:.3f} A {res.avg_activation_bits:.3f}")
    print(f"search CPU time {cpu:.1f} s (all threads; / {os.cpu_count()} cores = {cpu / (os.cpu_count() or 1):.1f} s); "
          f"load average during the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("other stages: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return out


def bench_real(args: argparse.Namespace) -> dict:
    from shared_data import CIFAR_MODEL, MNIST_MODEL, splits

    from onnx_mptq.data import input_specs, open_data
    from onnx_mptq.graph.io import load_model
    from onnx_mptq.pipeline import quantize

    results: dict = {}
    for name in args.models:
        path = {"cifar10": CIFAR_MODEL, "mnist": MNIST_MODEL}[name]
        source = load_model(path)
        calib, ev = splits(name)
        if args.eval_limit:
            ev = {k: v[: args.eval_limit] for k, v in ev.items()}
        specs = input_specs(source)
        calib_ds = open_data([{"input": calib["input"][i:i + 64]} for i in range(0, len(calib["input"]), 64)], specs,
                             batch_size=64)
        ev_ds = open_data([{"input": ev["input"][i:i + 256], "labels": ev["labels"][i:i + 256]}
                           for i in range(0, len(ev["input"]), 256)], specs, batch_size=256)
        rows = {}
        settings: list[tuple[str, Config]] = []
        for b in args.uniform:
            settings.append((f"W{b}A{b}", Config(quant=QuantConfig(w_bits=b, a_bits=b))))
        for tb in args.targets:
            settings.append((f"MP{tb:g}", Config(mixed=MixedConfig(enabled=True, target_bits=tb, subset=args.subset,
                                                                   keep=tuple(args.keep)))))
        for label, cfg in settings:
            t = time.perf_counter()
            res = quantize(source, calib_ds, cfg, eval_data=ev_ds)
            v = res.validation.to_dict()
            rows[label] = {
                "top1": v.get("top1"), "agreement": v.get("top1_agreement"), "sqnr_db": v.get("sqnr_db"),
                "kl": v.get("kl"), "avg_w": res.plan.avg_weight_bits, "avg_a": res.plan.avg_activation_bits,
                "seconds": time.perf_counter() - t,
                "allocate_s": res.timings.get("allocate_s"),
            }
            r = rows[label]
            print(f"{name:8s} {label:7s} W {r['avg_w']:.3f} A {r['avg_a']:.3f}  top-1 {r['top1']:.2f}  agreement "
                  f"{r['agreement']:.2f}  SQNR {r['sqnr_db']:.2f} dB  KL {r['kl']:.4f}  ({r['seconds']:.0f} s"
                  + (f", search {r['allocate_s']:.0f} s" if r["allocate_s"] else "") + ")", flush=True)
        fp = _fp32(source, ev_ds)
        print(f"{name:8s} FP32    top-1 {fp:.2f}", flush=True)
        results[name] = {"fp32_top1": fp, **rows}
    return results


def _fp32(source, ev_ds) -> float:
    from onnx_mptq.config import RuntimeConfig
    from onnx_mptq.validate import evaluate

    return float(evaluate(source, ev_ds, RuntimeConfig(), progress=False).top1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("deit")
    d.add_argument("--calib", type=int, default=64)
    d.add_argument("--subset", type=int, default=MixedConfig().subset)
    d.add_argument("--target", type=float, default=5.0)
    r = sub.add_parser("real")
    r.add_argument("--models", nargs="+", default=["cifar10", "mnist"])
    r.add_argument("--targets", nargs="+", type=float, default=[4.5, 5.0, 6.0])
    r.add_argument("--uniform", nargs="+", type=int, default=[5])
    r.add_argument("--subset", type=int, default=MixedConfig().subset)
    r.add_argument("--keep", nargs="*", default=[])
    r.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    out = bench_deit(args) if args.what == "deit" else bench_real(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
