#!/usr/bin/env python
"""onnx-mptq against ONNX Runtime's ``quantize_static`` on the real models (issue 4).

    python tools/bench_quant.py --markdown
    python tools/bench_quant.py --models mnist --limit-calib 200 --limit-eval 1000 --rows mptq-w8a8,ort-minmax-w8a8

For every model (``cifar10``: cifar10-vit, ``mnist``: mnist-vit, both with the standard splits of
``tools/shared_data.py``; or ``--custom NAME=MODEL.onnx:CALIB.npz:EVAL.npz``) and every row:

* ``fp32``: the model itself (accuracy and latency only);
* ``mptq-wWaA``: ``onnx_mptq.pipeline.quantize`` with the default config at W bits / A bits
  (SQ-b + output-error (mse) scale search + OPT-m twin-region quantizers, QDQ emission);
* ``ort-{minmax,entropy,percentile}-w8a8``: ``onnxruntime.quantization.quantize_static``,
  QuantFormat.QDQ, per_channel=True, activations QUInt8, weights QInt8, that calibration method
  (ORT's default options otherwise, e.g. percentile 99.999, ORT's default op scope);
* ``ort-{minmax,entropy,percentile}-w4a4``: the same with QUInt4 activations / QInt4 weights.

Both tools calibrate on the same calibration split (ORT through a ``CalibrationDataReader``
over the same .npz). Each quantization runs in a fresh ``multiprocessing`` (spawn) process: the
reported time is its wall time (model + data loading, calibration, search, writing the model),
the peak memory is that process's peak RSS (``VmHWM`` of /proc/self/status; ``ru_maxrss`` would
carry over the parent's RSS through exec). It includes the Python interpreter with numpy, onnx,
onnxruntime and onnx_mptq imported, printed as "base RSS". A quantization
that fails is reported in the table with its error text.

Every quantized model is then evaluated in this process with ``onnx_mptq.validate.evaluate`` on
the evaluation split against the FP32 model: top-1 (labels), top-1 agreement with FP32, SQNR of
the logits, and the integer / float matmul-like kernels ORT runs
(``tools/check_int_kernels.count_kernels``, ORT_ENABLE_EXTENDED). Latency: after all rows of a
model are built, their models (and FP32) are timed in turns, ``--latency-rounds`` rounds, at
batch 1 and batch 32 on evaluation samples; the table gives the medians (one interleaved run, so
machine load hits every row alike).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
for _p in (str(ROOT), str(TOOLS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

MODELS = ("cifar10", "mnist")
DEFAULT_ROWS = ("fp32", "mptq-w8a8", "mptq-w6a6", "mptq-w4a4", "ort-minmax-w8a8", "ort-entropy-w8a8",
                "ort-percentile-w8a8", "ort-minmax-w4a4", "ort-entropy-w4a4", "ort-percentile-w4a4")
ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_ROW_RE = re.compile(r"^(?:fp32|mptq-w([2-8])a([2-8])|ort-(minmax|entropy|percentile)-w(8a8|4a4))$")
LATENCY_BATCH = 32
EVAL_BATCH = 32


# ---------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass(frozen=True)
class BenchModel:
    name: str
    model: Path
    calib: Path  # .npz (input array + optional labels)
    eval: Path
    n_calib: int
    n_eval: int


def _write_split(arrays: dict[str, np.ndarray], limit: int | None, path: Path) -> int:
    n = len(next(iter(arrays.values())))
    k = n if limit is None else min(n, limit)
    np.savez(path, **{name: a[:k] for name, a in arrays.items()})
    return k


def prepare_models(names: list[str], custom: dict[str, tuple[Path, Path, Path]], out_dir: Path,
                   limit_calib: int | None, limit_eval: int | None) -> list[BenchModel]:
    """Write the (limited) calibration / evaluation splits of each model as .npz in ``out_dir``."""
    out = []
    for name in names:
        calib_p, eval_p = out_dir / f"{name}_calib.npz", out_dir / f"{name}_eval.npz"
        if name in custom:
            model, c, e = custom[name]
            calib, ev = dict(np.load(c)), dict(np.load(e))
        else:
            import shared_data

            if name not in MODELS:
                raise SystemExit(f"unknown model {name!r}: use {', '.join(MODELS)} or --custom NAME=MODEL:CALIB:EVAL")
            model = shared_data.CIFAR_MODEL if name == "cifar10" else shared_data.MNIST_MODEL
            calib, ev = shared_data.splits(name)
        nc = _write_split(calib, limit_calib, calib_p)
        ne = _write_split(ev, limit_eval, eval_p)
        out.append(BenchModel(name, Path(model), calib_p, eval_p, nc, ne))
    return out


def model_input_names(model_path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def input_arrays(npz: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The model inputs from an .npz: arrays named like the inputs, or the single non-label array."""
    data = dict(np.load(npz))
    data.pop("labels", None)
    if all(n in data for n in names):
        return {n: data[n] for n in names}
    if len(names) == 1 and len(data) == 1:
        return {names[0]: next(iter(data.values()))}
    raise ValueError(f"{npz}: cannot match arrays {sorted(data)} to model inputs {names}")


def equal_batch(n: int, cap: int = 32) -> int:
    """The largest batch size <= cap dividing n: ORT's Entropy / Percentile calibrators stack the
    per-batch outputs and fail on a shorter last batch."""
    return max(b for b in range(1, min(cap, n) + 1) if n % b == 0)


class NpzReader:
    """An ORT ``CalibrationDataReader`` over an .npz, in equal batches."""

    def __init__(self, npz: Path, model_path: Path, batch: int | None = None) -> None:
        self.arrays = input_arrays(npz, model_input_names(model_path))
        self.n = len(next(iter(self.arrays.values())))
        self.batch = batch or equal_batch(self.n)
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.n:
            return None
        feed = {k: v[self.i: self.i + self.batch] for k, v in self.arrays.items()}
        self.i += self.batch
        return feed

    def rewind(self) -> None:
        self.i = 0


# ---------------------------------------------------------------------------------------------
# quantization jobs (each in a fresh process)


def parse_row(row: str) -> dict[str, Any]:
    m = _ROW_RE.match(row)
    if not m:
        raise SystemExit(f"unknown row {row!r}: fp32, mptq-wWaA (W, A in 2..8), ort-{{minmax,entropy,percentile}}-w8a8|w4a4")
    if row == "fp32":
        return {"kind": "fp32"}
    if row.startswith("mptq"):
        return {"kind": "mptq", "w_bits": int(m.group(1)), "a_bits": int(m.group(2))}
    bits = 8 if m.group(4) == "8a8" else 4
    return {"kind": "ort", "method": ORT_METHODS[m.group(3)], "w_bits": bits, "a_bits": bits}


def _run_mptq(job: dict) -> dict:
    from onnx_mptq.config import Config, Providers, QuantConfig, RuntimeConfig
    from onnx_mptq.graph.io import save_model
    from onnx_mptq.pipeline import quantize

    cfg = Config(quant=QuantConfig(w_bits=job["w_bits"], a_bits=job["a_bits"]),
                 runtime=RuntimeConfig(providers=Providers.CPU))
    res = quantize(job["model"], job["calib"], cfg, progress=False)
    save_model(res.model, Path(job["out"]))
    twins = sum(1 for lp in res.plan.layers for q in lp.inputs if q.scheme.value == "twin")
    return {"timings": res.timings, "twin_quantizers": twins}


def _run_ort(job: dict) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if job["w_bits"] == 8:
        at, wt = QuantType.QUInt8, QuantType.QInt8
    else:
        at, wt = QuantType.QUInt4, QuantType.QInt4
    reader = NpzReader(Path(job["calib"]), Path(job["model"]))
    quantize_static(job["model"], job["out"], reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=at, weight_type=wt, calibrate_method=getattr(CalibrationMethod, job["method"]))
    return {"calib_batch": reader.batch}


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM (Linux), else ru_maxrss.

    ru_maxrss is not used on Linux because it survives exec: a process spawned by a parent holding
    N MB reports at least N MB. VmHWM belongs to the process image and starts afresh at exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def measure_job(job: dict, run_mptq: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one job (``run_mptq(job)`` or ORT's ``quantize_static``) in this process: its result
    with ``ok``/``error``, wall time and peak RSS (and the RSS before it, ``base_rss_mb``)."""
    base = peak_rss_mb()
    out = dict(out or {})
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # ORT's calibrators print progress to stdout
            out.update(run_mptq(job) if job["kind"] == "mptq" else _run_ort(job))
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported in the table
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        out["traceback"] = traceback.format_exc()
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    out["base_rss_mb"] = base
    return out


def _worker(job: dict, conn: Any) -> None:
    import logging

    import onnx  # noqa: F401  - imported before the baseline RSS so both tools start alike
    import onnxruntime  # noqa: F401
    import onnxruntime.quantization  # noqa: F401

    import onnx_mptq.pipeline  # noqa: F401

    logging.disable(logging.WARNING)  # ORT's "please pre-process" warnings
    out = measure_job(job, _run_mptq)
    conn.send(out)
    conn.close()


def run_isolated(job: dict, worker: Any = None) -> dict:
    """Run one quantization job in a fresh (spawned) process (``worker(job, conn)``, default
    this module's); its result dict."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=worker or _worker, args=(job, send))
    p.start()
    send.close()
    try:
        res = recv.recv()
    except EOFError:
        res = None
    p.join()
    if res is None:
        return {"ok": False, "error": f"worker process died (exit code {p.exitcode})"}
    return res


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate_model(path: Path, bm: BenchModel, reference: Path | None) -> dict:
    import onnx

    from onnx_mptq.config import Providers, RuntimeConfig
    from onnx_mptq.data import input_specs, open_data
    from onnx_mptq.validate import evaluate

    specs = input_specs(onnx.load(str(bm.model), load_external_data=False))
    ds = open_data(bm.eval, specs, batch_size=EVAL_BATCH)
    rep = evaluate(str(path), ds, RuntimeConfig(providers=Providers.CPU), reference=str(reference) if reference else None,
                   latency_batch_size=LATENCY_BATCH, progress=False)
    return rep.to_dict() | {"sqnr_db": rep.sqnr_db}


def kernel_counts(path: Path) -> dict:
    from check_int_kernels import count_kernels

    info = count_kernels(path, level="extended")  # the QDQ fusions; no layout transforms (no warning)
    return {"int": sum(info["integer"].values()), "float": sum(info["float_ops"].values()),
            "integer_ops": info["integer"], "float_ops": info["float_ops"]}


def interleaved_latency(paths: dict[str, Path], bm: BenchModel, rounds: int, runs: int = 20) -> dict[str, dict]:
    """Median latency (ms) at batch 1 and 32 of each model, timed in turns over ``rounds`` rounds."""
    import onnx

    from onnx_mptq.calibrate.session import make_session
    from onnx_mptq.config import Providers, RuntimeConfig
    from onnx_mptq.data import input_specs

    names = list(input_specs(onnx.load(str(bm.model), load_external_data=False)))
    x = input_arrays(bm.eval, names)
    n = len(next(iter(x.values())))
    feeds = {bs: {k: np.ascontiguousarray(v[np.arange(bs) % n]) for k, v in x.items()} for bs in (1, 32)}
    sessions = {k: make_session(str(p), RuntimeConfig(providers=Providers.CPU)) for k, p in paths.items()}
    times: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in paths}
    for _ in range(rounds):
        for k, s in sessions.items():
            for bs, f in feeds.items():
                for _ in range(2):
                    s.run(f)
                reps = runs if bs == 1 else max(3, runs // 4)
                for _ in range(reps):
                    t0 = time.perf_counter()
                    s.run(f)
                    times[k][bs].append(time.perf_counter() - t0)
    return {k: {"ms_b1": 1e3 * float(np.median(v[1])), "ms_b32": 1e3 * float(np.median(v[32]))} for k, v in times.items()}


def bench_model(bm: BenchModel, rows: list[str], work: Path, log: Any = None, latency_rounds: int = 3) -> list[dict]:
    results = []
    paths: dict[str, Path] = {}
    for row in rows:
        spec = parse_row(row)
        r: dict[str, Any] = {"model": bm.name, "row": row, **spec}
        if log:
            log(f"[{bm.name}] {row} ...")
        if spec["kind"] == "fp32":
            r["quant"] = {"ok": True}
            r["eval"] = evaluate_model(bm.model, bm, None)
            r["kernels"] = kernel_counts(bm.model)
            paths[row] = bm.model
        else:
            out = work / f"{bm.name}_{row}.onnx"
            job = {**spec, "model": str(bm.model), "calib": str(bm.calib), "out": str(out)}
            r["quant"] = run_isolated(job)
            if r["quant"].get("ok"):
                try:
                    r["eval"] = evaluate_model(out, bm, bm.model)
                    r["kernels"] = kernel_counts(out)
                    paths[row] = out
                except Exception as e:  # noqa: BLE001 - e.g. ORT cannot run the emitted model
                    r["eval_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        results.append(r)
    if latency_rounds > 0 and paths:
        if log:
            log(f"[{bm.name}] interleaved latency ...")
        lat = interleaved_latency(paths, bm, latency_rounds)
        for r in results:
            if r["row"] in lat:
                r["latency"] = lat[r["row"]]
    for row, p in paths.items():
        if p != bm.model:
            p.unlink(missing_ok=True)
    return results


# ---------------------------------------------------------------------------------------------
# report


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{nd}f}"
    return str(v)


HEADERS = ("model", "row", "W/A", "top-1 %", "agree %", "SQNR dB", "quant s", "peak RSS MB", "ms b1", "ms b32",
           "int/float mm")


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    out = []
    for r in results:
        wa = "32/32" if r["kind"] == "fp32" else f"{r['w_bits']}/{r['a_bits']}"
        q = r.get("quant", {})
        if not q.get("ok") or "eval_error" in r:
            err = q.get("error") or r.get("eval_error")
            where = "quantize" if not q.get("ok") else "evaluate"
            out.append((r["model"], r["row"], wa, f"FAILED ({where}): {err}", "", "", _f(q.get("wall_s"), 1),
                        _f(q.get("peak_rss_mb"), 0), "", "", ""))
            continue
        e = r["eval"]
        agree = "(ref)" if r["kind"] == "fp32" else _f(e.get("top1_agreement"))
        sqnr = "(ref)" if r["kind"] == "fp32" else _f(e.get("sqnr_db"), 1)
        k = r.get("kernels", {})
        lat = r.get("latency") or {"ms_b1": e.get("latency_ms_b1"), "ms_b32": e.get("latency_ms_batch")}
        out.append((r["model"], r["row"], wa, _f(e.get("top1")), agree, sqnr,
                    "-" if r["kind"] == "fp32" else _f(q.get("wall_s"), 1),
                    "-" if r["kind"] == "fp32" else _f(q.get("peak_rss_mb"), 0),
                    _f(lat.get("ms_b1"), 3), _f(lat.get("ms_b32"), 2),
                    f"{k.get('int', '-')}/{k.get('float', '-')}"))
    return out


def format_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    # failure text can be long: do not pad the whole column to it
    widths = [min(w, 40) for w in widths]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(headers), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def machine_line() -> str:
    import onnxruntime

    import onnx_mptq

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"machine: {cpu}, {os.cpu_count()} logical CPUs; python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, default threads), onnx-mptq {onnx_mptq.__version__}")


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Limit numpy's BLAS threads to ``n`` (None: leave alone): the environment variables for the
    quantization processes this script spawns, threadpoolctl (when installed) for this process."""
    if n is None:
        yield
        return
    names = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(n) for k in names})
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
        else:
            with threadpool_limits(limits=n, user_api="blas"):
                yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def blas_line() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"numpy BLAS threads: OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    info = [f"{i.get('internal_api')} {i.get('num_threads')} thread(s)" for i in threadpool_info() if i.get("user_api") == "blas"]
    return "numpy BLAS: " + (", ".join(info) or "unknown")


def parse_custom(items: list[str]) -> dict[str, tuple[Path, Path, Path]]:
    out = {}
    for item in items:
        name, sep, rest = item.partition("=")
        parts = rest.split(":")
        if not sep or len(parts) != 3:
            raise SystemExit(f"--custom expects NAME=MODEL.onnx:CALIB.npz:EVAL.npz, got {item!r}")
        out[name] = tuple(Path(p) for p in parts)  # type: ignore[assignment]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cifar10,mnist", help="comma-separated: cifar10, mnist, or --custom names")
    ap.add_argument("--custom", action="append", default=[], metavar="NAME=MODEL:CALIB:EVAL",
                    help="another model with its calibration / evaluation .npz")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--limit-calib", type=int, default=None, help="use the first N calibration samples")
    ap.add_argument("--limit-eval", type=int, default=None, help="use the first N evaluation samples")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--latency-rounds", type=int, default=3,
                    help="rounds of the interleaved latency run over a model's rows (0: evaluate's own timing)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="limit numpy's BLAS threads (default: numpy's own choice)")
    args = ap.parse_args(argv)
    with blas_threads(args.blas_threads):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    names = [n for n in args.models.split(",") if n]
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        parse_row(r)
    custom = parse_custom(args.custom)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        work = Path(tmp)
        models = prepare_models(names, custom, work, args.limit_calib, args.limit_eval)
        for bm in models:
            results += bench_model(bm, rows, work, log, args.latency_rounds)
    print(machine_line())
    print(blas_line())
    for bm in models:
        print(f"{bm.name}: {bm.model.name}, calibration {bm.n_calib} samples, evaluation {bm.n_eval} samples")
    base = [r["quant"]["base_rss_mb"] for r in results if "base_rss_mb" in r.get("quant", {})]
    if base:
        print(f"base RSS of a quantization process after importing numpy/onnx/onnxruntime/onnx_mptq: "
              f"{min(base):.0f}-{max(base):.0f} MB (included in peak RSS)")
    batches = sorted({r["quant"]["calib_batch"] for r in results if "calib_batch" in r.get("quant", {})})
    if batches:
        print(f"ORT calibration batch size(s): {', '.join(map(str, batches))} (equal batches; onnx-mptq uses 16)")
    if args.latency_rounds > 0:
        print(f"latency: every row's model timed in turns, {args.latency_rounds} rounds (median ms; batch 1: 20 runs, "
              f"batch 32: 5 runs per round)")
    print(format_table(HEADERS, table_rows(results), args.markdown))
    for r in results:
        tb = r.get("quant", {}).get("traceback")
        if tb:
            print(f"\n{r['model']} {r['row']} failed:\n{tb}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
