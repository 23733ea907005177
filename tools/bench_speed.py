#!/usr/bin/env python
"""Conversion speed (issue 14): onnx-mptq and ONNX Runtime's ``quantize_static`` MinMax side by
side, in one run, on the same model and calibration set.

    python tools/bench_speed.py --markdown
    python tools/bench_speed.py --models mnist,deit_s --rows ort,w8a8,w4a4 --baseline-root /tmp/base
    python tools/bench_speed.py --models deit_t,deit_s,deit_b --rows ort,w8a8,w4a4,mp5

Models: ``cifar10`` (cifar10-vit) and ``mnist`` (mnist-vit), 1,000 calibration images each (the
standard splits of ``tools/shared_data.py``); ``deit_t`` / ``deit_s`` / ``deit_b``: timm
``deit_{tiny,small,base}_patch16_224`` exported with random weights (``onnx-mptq export``, cached
in ``--work``) calibrated on the first ``--photos`` (64) of the shared ImageNet photos
(``../shared/data/imagenet-sample-calib-250``, timm preprocessing of that model).

Rows: ``ort`` is ``quantize_static`` MinMax W8A8 (QDQ, per-channel, QUInt8 activations, QInt8
weights, as ``tools/bench_quant.py``); ``wWaA`` is ``onnx_mptq.pipeline.quantize`` at the default
config with those bits (SQ-b + output-error search + OPT-m with its network-level choice);
``mp5`` is mixed precision ``--target-bits 5``. Every quantization runs in a fresh spawned
process; its wall time (loading, calibration, search, writing) and peak RSS (VmHWM) are
reported, with our per-stage times (``QuantizeResult.timings``).

``--baseline-root DIR``: also run every ``wWaA`` / ``mp5`` row with the package found in DIR
(e.g. an export of main: ``git archive main onnx_mptq | tar -x -C DIR``) as ``base-...`` rows,
interleaved with ours so machine load hits both alike, and compare the two plans layer by layer
(``plan =``: identical JSON apart from nothing; else the number of layers that differ).

``--profile DIR``: profile every stage of every ``wWaA`` / ``mp5`` row (cProfile, one profiler
per stage) and write the top entries by own time per stage to DIR/<model>-<row>.md.

Times are wall-clock on whatever machine runs this; on a shared machine only ratios within one
run mean anything.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import bench_quant  # noqa: E402  (tools/ on the path; imports no onnx_mptq at module level)

PHOTOS = ROOT.parent / "shared" / "data" / "imagenet-sample-calib-250" / "images"
TIMM = {"deit_t": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}
MODELS = ("cifar10", "mnist", *TIMM)
STAGES = ("analyse_s", "smooth_s", "capture_s", "allocate_s", "search_s", "optm_select_s")
DEFAULT_ROWS = ("ort", "w8a8", "w6a6", "w4a4")


# ---------------------------------------------------------------------------------------------
# models and data


def prepare(name: str, work: Path, photos: int) -> tuple[Path, Path, int]:
    """(model, calibration .npz, samples) for one benchmark model, written into ``work``."""
    calib = work / f"{name}_calib.npz"
    if name in ("cifar10", "mnist"):
        import shared_data

        model = shared_data.CIFAR_MODEL if name == "cifar10" else shared_data.MNIST_MODEL
        if not calib.exists():
            np.savez(calib, **shared_data.splits(name)[0])
        return Path(model), calib, int(len(np.load(calib)["input"]))
    timm_name = TIMM[name]
    model = work / f"{name}_random.onnx"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "onnx_mptq.cli", "export", timm_name, "-o", str(model), "--no-progress"],
                       check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    calib = work / f"{name}_photos{photos}.npz"
    if not calib.exists():
        import onnx

        from onnx_mptq.data import input_specs, open_data, preprocess_from_timm

        m = onnx.load(str(model), load_external_data=False)
        ds = open_data(str(PHOTOS), input_specs(m), limit=photos, batch_size=16, preprocess=preprocess_from_timm(timm_name))
        key = m.graph.input[0].name
        np.savez(calib, **{key: np.concatenate([b.inputs[key] for b in ds])})
    return model, calib, photos


def macs(model: Path) -> float:
    """Multiply-accumulates of one forward pass of a ViT: sum over MatMul / Gemm / Conv of the
    output elements times the reduced length (static shapes from shape inference)."""
    import onnx
    from onnx import shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(model)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in
              list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    shapes.update({t.name: list(t.dims) for t in m.graph.initializer})
    total = 0.0
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.input[0] in shapes and n.output[0] in shapes:
            a, out = shapes[n.input[0]], shapes[n.output[0]]
            k = a[-1] if n.op_type == "MatMul" or not any(at.name == "transA" and at.i for at in n.attribute) else a[0]
            total += float(np.prod([d or 1 for d in out])) * (k or 1)
        elif n.op_type == "Conv" and n.input[1] in shapes and n.output[0] in shapes:
            w, out = shapes[n.input[1]], shapes[n.output[0]]
            total += float(np.prod([d or 1 for d in out])) * float(np.prod(w[1:]))
    return total


# ---------------------------------------------------------------------------------------------
# jobs (each in a fresh process)


def parse_row(row: str) -> dict[str, Any]:
    if row == "ort":
        return {"kind": "ort", "method": "MinMax", "w_bits": 8, "a_bits": 8}
    if row == "mp5":
        return {"kind": "mptq", "w_bits": 8, "a_bits": 8, "target_bits": 5.0}
    if len(row) == 4 and row[0] == "w" and row[2] == "a" and row[1].isdigit() and row[3].isdigit():
        return {"kind": "mptq", "w_bits": int(row[1]), "a_bits": int(row[3])}
    raise SystemExit(f"unknown row {row!r}: ort, wWaA (e.g. w8a8) or mp5")


class _StageProfiles:
    """One cProfile per pipeline stage: wraps the stage functions where the pipeline looks them
    up (module attributes read at call time)."""

    TARGETS = (("onnx_mptq.pipeline", "smooth", "smooth"),
               ("onnx_mptq.calibrate.capture", "capture_unit_inputs", "capture"),
               ("onnx_mptq.search.mixed", "allocate_bits", "allocate"),
               ("onnx_mptq.search.scales", "search_scales", "search"),
               ("onnx_mptq.search.optm", "make_evaluator", "optm_select"),
               ("onnx_mptq.search.optm", "select_twins", "optm_select"))

    def __init__(self) -> None:
        import cProfile
        import importlib

        self.profiles: dict[str, Any] = {}
        self.active = False
        for mod_name, attr, stage in self.TARGETS:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, attr)
            prof = self.profiles.setdefault(stage, cProfile.Profile())
            setattr(mod, attr, self._wrap(fn, prof))

    def _wrap(self, fn, prof):
        def wrapped(*args, **kwargs):
            if self.active:  # a stage inside a stage (capture inside smooth): the outer one counts it
                return fn(*args, **kwargs)
            self.active = True
            prof.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.disable()
                self.active = False
        return wrapped

    def top(self, n: int = 8) -> dict[str, list[tuple[str, int, float, float]]]:
        """Per stage: (function, calls, own s, cumulative s), the n largest own times."""
        import pstats

        out = {}
        for stage, prof in self.profiles.items():
            try:
                st = pstats.Stats(prof)
            except TypeError:  # never ran
                continue
            rows = []
            for (file, line, func), (_, calls, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
                where = f"{Path(file).name}:{line}({func})" if file != "~" else func
                rows.append((where, calls, tt, ct))
            rows.sort(key=lambda r: -r[2])
            out[stage] = rows[:n]
        return out


def _run_mptq(job: dict) -> dict:
    from onnx_mptq.config import Config, Providers
    from onnx_mptq.graph.io import save_model
    from onnx_mptq.pipeline import quantize

    cfg = (Config().with_value("quant.w_bits", job["w_bits"]).with_value("quant.a_bits", job["a_bits"])
           .with_value("runtime.providers", Providers.CPU))
    if job.get("target_bits") is not None:
        cfg = cfg.with_value("mixed.target_bits", job["target_bits"]).with_value("mixed.enabled", True)
    profiles = _StageProfiles() if job.get("profile") else None
    res = quantize(job["model"], job["calib"], cfg, progress=False)
    save_model(res.model, Path(job["out"]))
    Path(job["plan"]).write_text(res.plan.to_json())
    out: dict[str, Any] = {"timings": res.timings, "avg_w": res.plan.avg_weight_bits, "avg_a": res.plan.avg_activation_bits}
    if profiles is not None:
        out["profile"] = profiles.top()
    return out


def _worker(job: dict, conn: Any) -> None:
    import logging

    if job.get("root"):
        sys.path.insert(0, job["root"])
    sys.path.insert(1 if job.get("root") else 0, str(ROOT))
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxruntime.quantization  # noqa: F401

    import onnx_mptq.pipeline

    logging.disable(logging.WARNING)
    out = bench_quant.measure_job(job, _run_mptq, {"package": str(Path(onnx_mptq.pipeline.__file__).parent)})
    conn.send(out)
    conn.close()


def run_isolated(job: dict) -> dict:
    return bench_quant.run_isolated(job, worker=_worker)


def compare_plans(a: Path, b: Path) -> str:
    """'identical', or how many layers (and which other fields) differ."""
    pa, pb = json.loads(a.read_text()), json.loads(b.read_text())
    if pa == pb:
        return "identical"
    la = {lp["unit"]: lp for lp in pa.get("layers", [])}
    lb = {lp["unit"]: lp for lp in pb.get("layers", [])}
    diff = sum(1 for u in set(la) | set(lb) if la.get(u) != lb.get(u))
    other = sorted(k for k in set(pa) | set(pb) if k != "layers" and pa.get(k) != pb.get(k))
    return f"{diff} layer(s) differ" + (f"; also {', '.join(other)}" if other else "")


# ---------------------------------------------------------------------------------------------
# the run


def _f(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def run(models: list[str], rows: list[str], work: Path, photos: int, baseline: str | None,
        profile_dir: Path | None, log=sys.stderr) -> list[dict]:
    results = []
    for name in models:
        model, calib, n = prepare(name, work, photos)
        mac = macs(model)
        for row in rows:
            spec = parse_row(row)
            variants = [("", None)] if spec["kind"] == "ort" else ([("base-", baseline)] if baseline else []) + [("", None)]
            for prefix, root in variants:
                label = prefix + row
                job = {**spec, "model": str(model), "calib": str(calib), "root": root,
                       "out": str(work / f"{name}-{label}.onnx"), "plan": str(work / f"{name}-{label}.plan.json"),
                       "profile": profile_dir is not None and spec["kind"] == "mptq"}
                print(f"[{time.strftime('%H:%M:%S')}] {name} {label} ...", file=log, flush=True)
                with bench_quant.blas_threads(None):
                    res = run_isolated(job)
                res.update(model=name, row=label, samples=n, macs=mac, plan_path=job["plan"] if spec["kind"] == "mptq" else None)
                if not res.get("ok"):
                    print(res.get("traceback", res.get("error")), file=log)
                results.append(res)
                if profile_dir is not None and res.get("profile"):
                    write_profile(profile_dir / f"{name}-{label}.md", name, label, res)
    _relate(results)
    return results


def _relate(results: list[dict]) -> None:
    """Ratios to ORT MinMax and to our own W8A8 of the same model (same prefix), plan identity."""
    by = {(r["model"], r["row"]): r for r in results}
    for r in results:
        ort = by.get((r["model"], "ort"))
        prefix = "base-" if r["row"].startswith("base-") else ""
        w8 = by.get((r["model"], prefix + "w8a8"))
        ok = lambda x: x is not None and x.get("ok")  # noqa: E731
        r["vs_ort"] = r["wall_s"] / ort["wall_s"] if ok(r) and ok(ort) else None
        r["vs_w8a8"] = r["wall_s"] / w8["wall_s"] if ok(r) and ok(w8) and r is not w8 and r["row"] != "ort" else None
        base = by.get((r["model"], "base-" + r["row"])) if not prefix else None
        if ok(r) and base is not None and ok(base):
            r["vs_base"] = r["wall_s"] / base["wall_s"]
            r["plan_vs_base"] = compare_plans(Path(base["plan_path"]), Path(r["plan_path"]))


def write_profile(path: Path, name: str, label: str, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {name} {label}: top entries by own time per stage", ""]
    for stage, rows in res["profile"].items():
        t = res.get("timings", {}).get(stage + "_s")
        lines += [f"## {stage} ({_f(t)} s)", "", "| function | calls | own s | cum s |", "|---|---|---|---|"]
        lines += [f"| `{w}` | {c} | {tt:.2f} | {ct:.2f} |" for w, c, tt, ct in rows]
        lines.append("")
    path.write_text("\n".join(lines))


HEADERS = ("model", "row", "calib", "total s", "x ORT", "x our W8A8", "analyse", "smooth", "capture", "allocate",
           "search", "optm_select", "peak RSS MB", "x base", "plan vs base")


def table(results: list[dict]) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        t = r.get("timings", {})
        if not r.get("ok"):
            out.append((r["model"], r["row"], str(r["samples"]), "failed: " + r.get("error", "?")) + ("",) * (len(HEADERS) - 4))
            continue
        out.append((r["model"], r["row"], str(r["samples"]), _f(r["wall_s"]), _f(r.get("vs_ort"), 2), _f(r.get("vs_w8a8"), 2),
                    *(_f(t.get(s)) for s in STAGES), _f(r.get("peak_rss_mb"), 0), _f(r.get("vs_base"), 2),
                    r.get("plan_vs_base", "-")))
    return out


def scaling(results: list[dict]) -> list[str]:
    """Fitted exponent b of total time ~ MACs^b per row over the timm models (least squares in logs)."""
    lines = []
    for row in sorted({r["row"] for r in results}):
        pts = [(r["macs"], r["wall_s"]) for r in results if r["row"] == row and r["model"] in TIMM and r.get("ok")]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            b = float(np.polyfit(x, y, 1)[0])
            lines.append(f"scaling {row}: total time ~ MACs^{b:.2f} over {len(pts)} timm models")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cifar10,mnist,deit_s", help=f"comma list of {', '.join(MODELS)} (default: %(default)s)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma list: ort, wWaA, mp5 (default: %(default)s)")
    ap.add_argument("--photos", type=int, default=64, help="ImageNet photos calibrating the timm models (default: 64)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnx_mptq_bench_speed"), help="exports, data, outputs (default: %(default)s)")
    ap.add_argument("--baseline-root", default=None, help="also run the package found in this directory (base-... rows)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR", help="per-stage profiles of our rows into DIR")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}: use {', '.join(MODELS)}")
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        parse_row(r)
    args.work.mkdir(parents=True, exist_ok=True)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.time()
    results = run(models, rows, args.work, args.photos, args.baseline_root, args.profile)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(bench_quant.machine_line())
    print(f"load average (1 min) {load:.1f} at the start, {load_end:.1f} at the end; run took {time.time() - t0:.0f} s; "
          "times are wall-clock on this machine, only ratios within one run compare")
    print(bench_quant.format_table(HEADERS, table(results), args.markdown))
    for line in scaling(results):
        print(line)
    if args.json:
        slim = [{k: v for k, v in r.items() if k not in ("traceback",)} for r in results]
        args.json.write_text(json.dumps(slim, indent=1, default=str))
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
