#!/usr/bin/env python
"""Ablations of onnx-mptq's two quantizer-side ideas: SQ-b (issue 3) and OPT-m (issue 5).

    python tools/bench_ablation.py --markdown
    python tools/bench_ablation.py --parts optm --optm-models mnist --bits 4 --limit-eval 1000

``sqb``: W4A4 and W6A6 (``--bits``) with SQ-b off (``smooth.enabled = False``), on with the
per-channel shift = the mean (the paper, our default) and on with the shift = the range midpoint;
everything else default (mse scale search, OPT-m). Each setting is one
``onnx_mptq.pipeline.quantize`` call; models ``--sqb-models`` (default cifar10, mnist).

``optm``: the same bits with three activation quantizers for the post-GELU (fc2 input) and
post-Softmax (P of ``P @ V``) operands, everything else default (SQ-b mean, mse search):

* ``uniform``: ``quant.optm = False`` (one uniform grid per tensor);
* ``hand-set twin``: PTQ4ViT style, every eligible operand gets the twin-region quantizer of
  :func:`onnx_mptq.numerics.twin.fixed_ratio_twin` (gelu: delta1 = 0.17 / n, m the smallest
  integer with 0.17 * 2^m >= the calibration max; softmax: delta2 = 1 / n, m = k - 1), no search.
  The package has no switch for it, so this script post-edits the uniform plan (the fc2 input /
  P quantizer replaced; V's step searched again with the twin P, keeping whichever of the old and
  new step gives the lower ``|| P V - Q(P) Q(V) ||^2``) and re-emits it with
  ``onnx_mptq.pipeline.emit_from_plan``;
* ``OPT-m per layer``: ``quant.optm.select = "layer"``: m searched jointly with the step per
  layer; the twin quantizer is kept where it lowers that layer's output error;
* ``OPT-m``: the default (``quant.optm.select = "network"``): the same searched quantizers, each
  operand's twin kept only where it lowers the network's logit error and KL on a calibration
  subset beyond the subset's noise (two standard errors per comparison, corrected for the number
  of comparisons; ``onnx_mptq.search.optm``);
* ``OPT-m, any m``: as ``OPT-m`` with ``quant.optm.lattice = False``: m searched up to
  ``quant.optm.max_m`` even where the twin's values do not fit one uint8 lattice (those operands
  are emitted as two integer matmuls).

The hand-set and per-layer plans are also emitted in the split form (``emission.twin_form = split``,
two integer matmuls per twin operand) for the latency run, against the default
lattice form (one integer matmul where the twin fits one uint8 lattice).

The plans come from one SQ-b + capture pass per model (the stages of
``onnx_mptq.pipeline.quantize``, run here one by one so the captured data can be reused and the
hand-set plan built from it). Models ``--optm-models`` (default cifar10, mnist, deit-s); ``deit-s``
is timm ``deit_small_patch16_224`` with **random weights** (seed 0; no pretrained weights on this
machine), exported at 224x224 with its 1000 classes, calibrated on the first 64 of the 250 real
ImageNet photos in ``../shared/data/imagenet-sample-calib-250`` (timm's preprocessing) and
evaluated on the other 186: fidelity to FP32 only, no accuracy.

Both parts apply OPT-m at every bit width they run, 8 included (``quant.optm.max_bits = 8``;
the package default, 7, leaves 8-bit operands uniform for int8 speed).

Every model is evaluated on the evaluation split against the FP32 model (top-1 where labels
exist, top-1 agreement, SQNR and KL of the logits). The twin emission's cost is measured in a
separate interleaved latency run (the models of one setting timed in
turns, ``--latency-rounds`` rounds, median at batch 1 and batch 32).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
for _p in (str(ROOT), str(TOOLS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_quant import (  # noqa: E402
    BenchModel,
    _f,
    blas_line,
    blas_threads,
    evaluate_model,
    format_table,
    interleaved_latency,
    machine_line,
    parse_custom,
    prepare_models,
)

DEIT = "deit_small_patch16_224"
DEIT_CALIB = 64
IMAGENET_DIR = ROOT.parent / "shared" / "data" / "imagenet-sample-calib-250" / "images"


# ---------------------------------------------------------------------------------------------
# data


def prepare_deit(out_dir: Path, images: Path, limit_calib: int | None, limit_eval: int | None) -> BenchModel:
    """Export random-weight DeiT-S and write its calibration (first 64) / evaluation (other 186) .npz."""
    import onnx

    from onnx_mptq.data import input_specs, open_data, preprocess_from_timm
    from onnx_mptq.export import export_timm

    model = out_dir / "deit_small_random.onnx"
    export_timm(DEIT, model, img_size=224, opset=17, seed=0)
    specs = input_specs(onnx.load(str(model), load_external_data=False))
    name = next(iter(specs))
    ds = open_data(images, specs, batch_size=25, preprocess=preprocess_from_timm(DEIT))
    x = np.concatenate([b.inputs[name] for b in ds])  # (250, 3, 224, 224), sorted file order
    calib, ev = x[:DEIT_CALIB], x[DEIT_CALIB:]
    if limit_calib is not None:
        calib = calib[:limit_calib]
    if limit_eval is not None:
        ev = ev[:limit_eval]
    cp, ep = out_dir / "deit-s_calib.npz", out_dir / "deit-s_eval.npz"
    np.savez(cp, **{name: calib})
    np.savez(ep, **{name: ev})
    return BenchModel("deit-s", model, cp, ep, len(calib), len(ev))


def get_models(names: list[str], custom: dict, work: Path, args: argparse.Namespace,
               cache: dict[str, BenchModel]) -> list[BenchModel]:
    out = []
    for n in names:
        if n not in cache:
            if n == "deit-s" and n not in custom:
                cache[n] = prepare_deit(work, args.imagenet, args.limit_calib, args.limit_eval)
            else:
                cache[n] = prepare_models([n], custom, work, args.limit_calib, args.limit_eval)[0]
        out.append(cache[n])
    return out


def base_config(bits: int, **optm: Any):
    from onnx_mptq.config import Config, OptmConfig, Providers, QuantConfig, RuntimeConfig

    optm = {"max_bits": 8, **optm}  # OPT-m at every bit width (the package default leaves 8 bits uniform)
    return Config(quant=QuantConfig(w_bits=bits, a_bits=bits, optm=OptmConfig(**optm)), runtime=RuntimeConfig(providers=Providers.CPU))


def eval_row(model: Any, bm: BenchModel, work: Path, tag: str) -> tuple[dict, Path]:
    from onnx_mptq.graph.io import save_model

    path = work / f"{bm.name}_{tag}.onnx"
    save_model(model, path)
    return evaluate_model(path, bm, bm.model), path


# ---------------------------------------------------------------------------------------------
# (a) SQ-b


SQB_VARIANTS = ("off", "mean", "midpoint")


def run_sqb(bm: BenchModel, bits: list[int], work: Path, log) -> list[dict]:
    from onnx_mptq.config import ShiftMode, SmoothConfig
    from onnx_mptq.pipeline import quantize

    rows = []
    for b in bits:
        for variant in SQB_VARIANTS:
            cfg = base_config(b)
            if variant == "off":
                cfg = dataclasses.replace(cfg, smooth=SmoothConfig(enabled=False))
            else:
                cfg = dataclasses.replace(cfg, smooth=SmoothConfig(enabled=True, shift=ShiftMode(variant)))
            log(f"[sqb] {bm.name} W{b}A{b} SQ-b {variant} ...")
            t0 = time.perf_counter()
            res = quantize(str(bm.model), str(bm.calib), cfg, progress=False)
            wall = time.perf_counter() - t0
            ev, path = eval_row(res.model, bm, work, f"sqb_{variant}_w{b}")
            path.unlink()
            rows.append({"model": bm.name, "bits": b, "variant": variant, "eval": ev, "quant_s": wall})
    return rows


def sqb_table(rows: list[dict]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    head = ("model", "W/A", "SQ-b", "top-1 %", "agree %", "SQNR dB", "KL", "quant s")
    out = []
    for r in rows:
        e = r["eval"]
        label = {"off": "off", "mean": "on, shift = mean", "midpoint": "on, shift = midpoint"}[r["variant"]]
        out.append((r["model"], f"{r['bits']}/{r['bits']}", label, _f(e.get("top1")), _f(e.get("top1_agreement")),
                    _f(e.get("sqnr_db"), 2), _f(e.get("kl"), 4), _f(r["quant_s"], 1)))
    return head, out


# ---------------------------------------------------------------------------------------------
# (b) OPT-m


@dataclasses.dataclass
class Staged:
    source: Any
    work: Any
    analysis: Any
    captured: Any
    splan: Any
    digest: str
    data: Any = None


def staged_capture(bm: BenchModel, cfg) -> Staged:
    """SQ-b + capture, exactly as ``onnx_mptq.pipeline.quantize`` runs them."""
    from onnx_mptq.calibrate.capture import capture_unit_inputs
    from onnx_mptq.data import input_specs, open_data
    from onnx_mptq.graph.analysis import analyze, prepare
    from onnx_mptq.graph.io import graph_digest, load_model
    from onnx_mptq.pipeline import smooth

    source = load_model(bm.model)
    prepared = prepare(source)
    analysis0 = analyze(prepared, prepared=True)
    data = open_data(str(bm.calib), input_specs(prepared), limit=cfg.calib.limit, batch_size=cfg.calib.batch_size)
    sres = smooth(source, data, cfg, analysis=analysis0, prepared=prepared, progress=False)
    work = prepare(sres.model)
    analysis = analyze(work, prepared=True)
    captured = capture_unit_inputs(work, analysis, data, cfg.runtime, tokens_per_layer=cfg.capture.tokens_per_layer,
                                   seed=cfg.seed, progress=False)
    return Staged(source, work, analysis, captured, sres.plan, graph_digest(source), data)


def search_plan(st: Staged, cfg, options: dict | None = None):
    from onnx_mptq.search.scales import search_scales

    res = search_scales(st.work, st.analysis, st.captured, cfg, source_digest=st.digest, smoothing=st.splan,
                        progress=False)
    if options is not None:
        options.update(res.twin_options)
    return res.plan


def network_plan(st: Staged, cfg, plan, options: dict):
    """OPT-m's network-level choice, as ``onnx_mptq.pipeline.quantize`` runs it."""
    from onnx_mptq.search.optm import make_evaluator, select_twins

    if not options:
        return plan
    ev = make_evaluator(st.work, st.analysis, st.captured, st.data, cfg)
    return select_twins(plan, options, ev, z=cfg.quant.optm.z, progress=False).plan


def _twin_act(tensor: str, tp) -> Any:
    """The plan record of a twin quantizer (as ``onnx_mptq.search.scales`` writes it)."""
    from onnx_mptq.plan import ActQuant

    return ActQuant.from_params(tensor, tp)


def _uniform_act(tensor: str, p) -> Any:
    from onnx_mptq.plan import ActQuant

    return ActQuant.from_params(tensor, p)


def eligible(unit) -> str | None:
    """'gelu' / 'softmax' where OPT-m may place a twin quantizer (the rule of search/scales.py)."""
    from onnx_mptq.graph.analysis import GELU_KINDS, Activation, Role

    if unit.role is Role.FC2 and unit.activation in GELU_KINDS:
        return "gelu"
    if unit.role is Role.ATTN_AV and unit.activation is Activation.SOFTMAX:
        return "softmax"
    return None


def handset_plan(uniform_plan, st: Staged, cfg):
    """PTQ4ViT-style fixed-ratio twin quantizers on every eligible operand of the uniform plan."""
    from onnx_mptq.numerics.search import OperandObjective, search_matmul_operand_scale
    from onnx_mptq.numerics.twin import fixed_ratio_twin, twin_fake_quant
    from onnx_mptq.plan import average_bits

    q = cfg.quant
    units = {u.name: u for u in st.analysis.units}
    layers, notes = [], []
    for lp in uniform_plan.layers:
        unit = units[lp.unit]
        kind = eligible(unit)
        ab = lp.inputs[0].bits
        if kind is None or ab < 3:
            layers.append(lp)
            continue
        if kind == "gelu":
            top = st.captured.stats[unit.inputs[0]].max  # over every calibration value
            tp = fixed_ratio_twin(np.array([top], np.float32), ab, "gelu")
            layers.append(dataclasses.replace(lp, inputs=(_twin_act(unit.inputs[0], tp),)))
        else:
            tp = fixed_ratio_twin(np.zeros(1, np.float32), ab, "softmax")
            a, b = st.captured[unit.name].pairs
            a_fq = twin_fake_quant(a, tp)
            obj = OperandObjective(a, b, 1, other_fq=a_fq)
            old_b = lp.inputs[1]
            pb = search_matmul_operand_scale(a, b, 1, old_b.bits, q.act_symmetric, other_fq=a_fq, grid_size=q.search.grid_size,
                                             low=q.search.grid_low, high=q.search.grid_high, method="mse", pct=q.search.percentile)
            new_b = _uniform_act(unit.inputs[1], pb)
            qb = new_b if obj(new_b.fake_quant) < obj(old_b.fake_quant) else old_b
            layers.append(dataclasses.replace(lp, inputs=(_twin_act(unit.inputs[0], tp), qb)))
        notes.append(f"hand-set {unit.name}: twin {kind} m={tp.m} delta1={tp.delta1:.6g}")
    avg_w, avg_a = average_bits(layers)
    return dataclasses.replace(uniform_plan, layers=tuple(layers), avg_weight_bits=avg_w, avg_activation_bits=avg_a,
                               notes=tuple(uniform_plan.notes) + tuple(notes))


def count_twins(plan) -> int:
    return sum(1 for lp in plan.layers for a in lp.inputs if a.scheme.value == "twin")


OPTM_VARIANTS = ("uniform", "hand-set twin", "OPT-m per layer", "OPT-m", "OPT-m, any m")


def run_optm(bm: BenchModel, bits: list[int], work: Path, log, latency_rounds: int) -> tuple[list[dict], list[dict]]:
    from onnx_mptq.graph.io import save_model
    from onnx_mptq.pipeline import emit_from_plan

    log(f"[optm] {bm.name}: SQ-b + capture ...")
    t0 = time.perf_counter()
    st = staged_capture(bm, base_config(8))  # smoothing and capture do not depend on the bits
    capture_s = time.perf_counter() - t0
    n_eligible = sum(1 for u in st.analysis.units if eligible(u))
    rows, lat_rows = [], []
    for b in bits:
        cfg_u = base_config(b, enabled=False)
        cfg_o = base_config(b, enabled=True)
        log(f"[optm] {bm.name} W{b}A{b}: searches ...")
        t = time.perf_counter()
        p_uni = search_plan(st, cfg_u)
        t_uni = time.perf_counter() - t
        t = time.perf_counter()
        options: dict = {}
        p_layer = search_plan(st, cfg_o, options)
        t_layer = time.perf_counter() - t
        t = time.perf_counter()
        p_opt = network_plan(st, cfg_o, p_layer, options)
        t_opt = t_layer + time.perf_counter() - t
        t = time.perf_counter()
        p_hand = handset_plan(p_uni, st, cfg_u)
        t_hand = t_uni + time.perf_counter() - t
        t = time.perf_counter()
        cfg_any = base_config(b, enabled=True, lattice=False)
        options_any: dict = {}
        p_any = network_plan(st, cfg_any, search_plan(st, cfg_any, options_any), options_any)
        t_any = time.perf_counter() - t
        plans = {"uniform": p_uni, "hand-set twin": p_hand, "OPT-m per layer": p_layer, "OPT-m": p_opt,
                 "OPT-m, any m": p_any}
        paths = {}
        for variant, plan, ts in (("uniform", p_uni, t_uni), ("hand-set twin", p_hand, t_hand),
                                  ("OPT-m per layer", p_layer, t_layer), ("OPT-m", p_opt, t_opt),
                                  ("OPT-m, any m", p_any, t_any)):
            log(f"[optm] {bm.name} W{b}A{b} {variant}: emit + evaluate ...")
            model = emit_from_plan(st.source, plan).model
            ev, path = eval_row(model, bm, work, f"optm_{variant.replace(' ', '_')}_w{b}")
            paths[variant] = path
            rows.append({"model": bm.name, "bits": b, "variant": variant, "eval": ev, "twins": count_twins(plan),
                         "eligible": n_eligible, "search_s": ts, "capture_s": capture_s})
        if latency_rounds > 0:
            # the same twin plans emitted in the split form (two integer matmuls per twin operand)
            from onnx_mptq.plan import TwinForm

            for variant in ("hand-set twin", "OPT-m per layer"):
                split = dataclasses.replace(plans[variant], emission=dataclasses.replace(plans[variant].emission,
                                                                                         twin_form=TwinForm.SPLIT))
                model = emit_from_plan(st.source, split).model
                path = work / f"{bm.name}_optm_{variant.replace(' ', '_')}_split_w{b}.onnx"
                save_model(model, path)
                paths[f"{variant} (split form)"] = path
                plans[f"{variant} (split form)"] = plans[variant]
            log(f"[optm] {bm.name} W{b}A{b}: interleaved latency ...")
            lat = interleaved_latency(paths, bm, latency_rounds)
            for variant in paths:
                lat_rows.append({"model": bm.name, "bits": b, "variant": variant, **lat[variant],
                                 "twins": count_twins(plans[variant])})
        for p in paths.values():
            p.unlink()
    return rows, lat_rows


def optm_table(rows: list[dict]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    head = ("model", "W/A", "fc2-in / P quantizer", "twin / eligible", "top-1 %", "agree %", "SQNR dB", "KL")
    out = []
    for r in rows:
        e = r["eval"]
        out.append((r["model"], f"{r['bits']}/{r['bits']}", r["variant"], f"{r['twins']}/{r['eligible']}",
                    _f(e.get("top1")), _f(e.get("top1_agreement")), _f(e.get("sqnr_db"), 2), _f(e.get("kl"), 4)))
    return head, out


def latency_table(rows: list[dict]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    head = ("model", "W/A", "variant", "twin quantizers", "ms b1", "ms b32", "b1 / uniform", "b32 / uniform")
    base = {(r["model"], r["bits"]): r for r in rows if r["variant"] == "uniform"}
    out = []
    for r in rows:
        u = base[(r["model"], r["bits"])]
        out.append((r["model"], f"{r['bits']}/{r['bits']}", r["variant"], str(r["twins"]), _f(r["ms_b1"], 3),
                    _f(r["ms_b32"], 2), _f(r["ms_b1"] / u["ms_b1"], 2), _f(r["ms_b32"] / u["ms_b32"], 2)))
    return head, out


def optm_regressions(rows: list[dict], tol_agree: float = 0.0) -> list[str]:
    """Settings where OPT-m is worse than uniform (agreement lower or SQNR lower)."""
    out = []
    by = {(r["model"], r["bits"], r["variant"]): r["eval"] for r in rows}
    for (m, b, v), e in by.items():
        if v != "OPT-m":
            continue
        u = by[(m, b, "uniform")]
        worse = []
        if (e.get("top1_agreement") or 0) < (u.get("top1_agreement") or 0) - tol_agree:
            worse.append(f"agreement {e['top1_agreement']:.2f} < {u['top1_agreement']:.2f}")
        if e.get("sqnr_db") is not None and u.get("sqnr_db") is not None and e["sqnr_db"] < u["sqnr_db"]:
            worse.append(f"SQNR {e['sqnr_db']:.2f} < {u['sqnr_db']:.2f} dB")
        if e.get("top1") is not None and u.get("top1") is not None and e["top1"] < u["top1"]:
            worse.append(f"top-1 {e['top1']:.2f} < {u['top1']:.2f}")
        if worse:
            out.append(f"{m} W{b}A{b}: OPT-m below uniform: " + ", ".join(worse))
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="sqb,optm", help="comma-separated: sqb, optm")
    ap.add_argument("--sqb-models", default="cifar10,mnist")
    ap.add_argument("--optm-models", default="cifar10,mnist,deit-s")
    ap.add_argument("--custom", action="append", default=[], metavar="NAME=MODEL:CALIB:EVAL",
                    help="another model with its calibration / evaluation .npz")
    ap.add_argument("--bits", default="4,6", help="comma-separated W=A bits")
    ap.add_argument("--limit-calib", type=int, default=None)
    ap.add_argument("--limit-eval", type=int, default=None)
    ap.add_argument("--latency-rounds", type=int, default=3, help="0 skips the interleaved latency run")
    ap.add_argument("--imagenet", type=Path, default=IMAGENET_DIR, help="image folder for deit-s (250 images)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="limit numpy's BLAS threads (default: numpy's own choice)")
    args = ap.parse_args(argv)
    with blas_threads(args.blas_threads):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in ("sqb", "optm"):
            raise SystemExit(f"unknown part {p!r}: sqb, optm")
    bits = [int(b) for b in args.bits.split(",") if b]
    custom = parse_custom(args.custom)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    sqb_rows: list[dict] = []
    optm_rows: list[dict] = []
    lat_rows: list[dict] = []
    cache: dict[str, BenchModel] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ablation_") as tmp:
        work = Path(tmp)
        if "sqb" in parts:
            for bm in get_models([m for m in args.sqb_models.split(",") if m], custom, work, args, cache):
                sqb_rows += run_sqb(bm, bits, work, log)
        if "optm" in parts:
            for bm in get_models([m for m in args.optm_models.split(",") if m], custom, work, args, cache):
                r, lr = run_optm(bm, bits, work, log, args.latency_rounds)
                optm_rows += r
                lat_rows += lr
    print(machine_line())
    print(blas_line())
    for bm in cache.values():
        extra = " (random weights, no labels)" if bm.name == "deit-s" else ""
        print(f"{bm.name}: {bm.model.name}{extra}, calibration {bm.n_calib} samples, evaluation {bm.n_eval} samples")
    if sqb_rows:
        print("\n(a) SQ-b ablation (mse search + OPT-m otherwise)")
        print(format_table(*sqb_table(sqb_rows), args.markdown))
    if optm_rows:
        print("\n(b) OPT-m ablation (SQ-b mean + mse search otherwise)")
        print(format_table(*optm_table(optm_rows), args.markdown))
        regs = optm_regressions(optm_rows)
        print("OPT-m vs uniform: " + ("; ".join(regs) if regs else "OPT-m is not below uniform on any model / setting"))
    if lat_rows:
        print(f"\n(c) latency of the twin emission (interleaved, {args.latency_rounds} rounds, median)")
        print(format_table(*latency_table(lat_rows), args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
