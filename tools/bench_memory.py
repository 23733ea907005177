#!/usr/bin/env python
"""Peak memory (RSS) of calibration against the number of calibration images.

    python tools/bench_memory.py [--workdir DIR] [--images 64 256] [--batch-size 16] [--threads 2]

Exports a random-weight timm ``deit_base_patch16_224`` to ONNX (once, cached in ``--workdir``),
writes one uncompressed ``.npz`` of N(0, 1) images (the largest count asked for), and then, for
each count, runs calibration in a fresh subprocess over the first ``count`` images (``--limit``):
load + preflight, analysis, the SQ-b statistics pass and the capture of every unit's inputs
(:func:`onnx_mptq.pipeline.smooth` then
:func:`onnx_mptq.calibrate.capture.capture_unit_inputs`) -- the stages that stream the data.
Scale search and emission work on the bounded captures, so they do not see the image count.

Each child reports ``ru_maxrss`` (the peak RSS, VmHWM) and the RSS after loading the model.
Streaming is bounded when the peak does not grow with the number of images beyond one batch's
worth; the table prints the growth next to the size of one batch of input images and the output
bytes one capture batch fetches (the largest per-batch allocation calibration makes).
Needs the ``export`` extra (torch, timm). CPU only; a run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "deit_base_patch16_224"
MB = 2**20


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(model: Path, data: Path, limit: int, batch_size: int, threads: int) -> dict:
    """One calibration run; everything this process allocates counts."""
    from onnx_mptq.calibrate.capture import capture_unit_inputs
    from onnx_mptq.config import CalibConfig, Config, Providers, RuntimeConfig
    from onnx_mptq.data import input_specs, open_data
    from onnx_mptq.graph.analysis import analyze, prepare
    from onnx_mptq.graph.io import load_model
    from onnx_mptq.pipeline import smooth

    cfg = Config(runtime=RuntimeConfig(providers=Providers.CPU, threads=threads), calib=CalibConfig(batch_size=batch_size, limit=limit))
    t0 = time.perf_counter()
    source = load_model(model)
    prepared = prepare(source)
    analysis = analyze(prepared, prepared=True)
    rss_loaded = _rss_mb()
    ds = open_data(data, input_specs(prepared), limit=limit, batch_size=batch_size)
    sres = smooth(source, ds, cfg, analysis=analysis, prepared=prepared)
    t_stats = time.perf_counter() - t0
    peak_stats = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    work = prepare(sres.model)
    wa = analyze(work, prepared=True)
    captured = capture_unit_inputs(work, wa, ds, cfg.runtime, tokens_per_layer=cfg.capture.tokens_per_layer, seed=cfg.seed,
                                   progress=False)
    return {
        "images": limit,
        "batch_size": batch_size,
        "rss_after_load_mb": round(rss_loaded, 1),
        "peak_rss_after_stats_mb": round(peak_stats, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "units_captured": len(list(wa.units)),
        "seconds": round(time.perf_counter() - t0, 1),
        "stats_seconds": round(t_stats, 1),
        "_keep": bool(captured),
    }


def _capture_bytes_per_batch(model: Path, batch_size: int) -> int:
    """Bytes of the unit inputs one capture batch fetches from ONNX Runtime (float32).

    Shapes come from ONNX shape inference on a copy with the batch dim pinned to 1."""
    import onnx

    from onnx_mptq.graph.analysis import analyze, prepare
    from onnx_mptq.graph.io import load_model

    m = load_model(model)
    a = analyze(prepare(m), prepared=True)
    for vi in m.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    elems = {}
    for vi in m.graph.value_info:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(x > 0 for x in dims):
            elems[vi.name] = int(np.prod(dims))
    names = {t for u in a.units for t in u.inputs} - {i.name for i in m.graph.input}  # the image comes from the feeds
    missing = sorted(t for t in names if t not in elems)
    if missing:
        print(f"note: no inferred shape for {len(missing)} captured tensor(s), e.g. {missing[0]}", file=sys.stderr)
    return batch_size * 4 * sum(elems.get(t, 0) for t in names)


def prepare_files(workdir: Path, images: int) -> tuple[Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / f"{NAME}.onnx"
    if not model.exists():
        from onnx_mptq.config import Providers, RuntimeConfig
        from onnx_mptq.export import export_timm

        print(f"exporting random-weight {NAME} -> {model}", flush=True)
        export_timm(NAME, model, runtime=RuntimeConfig(providers=Providers.CPU), check_samples=1)
    data = workdir / f"calib_{images}.npz"
    if not data.exists():
        x = np.random.default_rng(0).standard_normal((images, 3, 224, 224), dtype=np.float32)
        np.savez(data, input=x)  # uncompressed: the source reads it batch by batch
        del x
    return model, data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/onnx_mptq_bench_memory"))
    p.add_argument("--images", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        res = child(Path(args.child[0]), Path(args.child[1]), args.limit, args.batch_size, args.threads)
        res.pop("_keep")
        print(json.dumps(res))
        return 0

    model, data = prepare_files(args.workdir, max(args.images))
    rows = []
    for n in args.images:
        cmd = [sys.executable, __file__, "--child", str(model), str(data), "--limit", str(n), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]
        env = dict(os.environ)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)

    batch_in = args.batch_size * 3 * 224 * 224 * 4 / MB
    fetched = _capture_bytes_per_batch(model, args.batch_size) / MB
    base = rows[0]["peak_rss_mb"]
    print()
    print(f"calibration of random-weight {NAME} (SQ-b statistics + unit-input capture), batch {args.batch_size}, "
          f"{args.threads} threads, CPU")
    print(f"{'images':>7} {'RSS after load MB':>18} {'peak after stats MB':>20} {'peak RSS MB':>12} {'growth vs first MB':>19} {'time s':>7}")
    for r in rows:
        print(f"{r['images']:>7} {r['rss_after_load_mb']:>18.0f} {r['peak_rss_after_stats_mb']:>20.0f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_rss_mb'] - base:>19.0f} {r['seconds']:>7.0f}")
    growth = rows[-1]["peak_rss_mb"] - base
    print(f"one batch of input images: {batch_in:.1f} MB; unit inputs fetched per capture batch: {fetched:.0f} MB")
    ok = growth <= max(batch_in, 0.0) + 0.02 * base  # one batch of images, plus 2% allocator noise
    print(f"peak growth {rows[0]['images']} -> {rows[-1]['images']} images: {growth:+.0f} MB "
          f"({'bounded' if ok else 'GROWS with the number of images'})")
    if args.json:
        args.json.write_text(json.dumps({"model": NAME, "batch_size": args.batch_size, "rows": rows,
                                         "batch_input_mb": batch_in, "capture_batch_mb": fetched, "growth_mb": growth}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
