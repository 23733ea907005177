#!/usr/bin/env python
"""Model coverage matrix (issue 17): about twenty ViT-family architectures, random weights.

    nice -n 10 python tools/bench_coverage.py --markdown > coverage.md
    python tools/bench_coverage.py --only deit_tiny,cait_xxs24 --analysis-only
    python tools/bench_coverage.py --ablate levit_128s     # where a row's W8A8 error comes from

For every architecture (the smallest variant of each family; timm names unless marked ``hf:`` for
Hugging Face ``transformers`` models built from their config classes, or ``tv:`` for
torchvision), with random weights (seeded):

1. export to ONNX (``onnx_mptq.export.export_model``: TorchScript exporter, opset 17, or the
   dynamo exporter at opset 18 for the rows marked so; checked against torch in ONNX Runtime),
   cached in ``--work``;
2. ``onnx_mptq.graph.analysis.analyze``: units found by role, the analysis notes (what is left in
   float and why);
3. ``onnx_mptq.pipeline.quantize`` with the default config at W8A8 and at W4A4, calibrated on
   the first ``--calib`` (32) photos of ``../shared/data/imagenet-sample-calib-250`` (sorted
   file names) and evaluated on the next ``--eval`` (32) against the FP32 model: SQNR of the
   logits in dB, ``10 log10(sum y^2 / sum (y - y_q)^2)`` over all logits; the time is the wall
   time of the quantization (analysis, SQ-b, capture, search, emission, validation).

Photos are preprocessed at the model's input size: shorter side to size / 0.875 (bicubic),
center crop, ImageNet mean/std. Random-weight models have no meaningful labels, so only
fidelity to FP32 is measured. A row that fails prints its error (one line) and the script exits
1 at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHOTOS = Path(os.environ.get("ONNX_MPTQ_SHARED", ROOT.parent / "shared")) / "data" / "imagenet-sample-calib-250"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Arch:
    key: str  # row label
    source: str  # "timm" | "hf" | "tv"
    name: str  # timm / torchvision name or HF config kind
    img: int = 224
    kwargs: tuple[tuple[str, Any], ...] = ()
    pass_img_size: bool = False  # timm: give img_size to create_model (models whose default differs)
    dynamo: bool = False  # torch's dynamo exporter (opset 18) instead of TorchScript (opset 17)


ARCHS = (  # the rows first, the largest (86M parameters) last
    Arch("levit_128s", "timm", "levit_128s"),
    Arch("cait_xxs24", "timm", "cait_xxs24_224"),
    Arch("xcit_nano", "timm", "xcit_nano_12_p16_224"),
    Arch("eva02_tiny", "timm", "eva02_tiny_patch14_224"),
    Arch("pvt_v2_b0", "timm", "pvt_v2_b0"),
    Arch("deit3_small", "timm", "deit3_small_patch16_224"),
    Arch("vit_tiny", "timm", "vit_tiny_patch16_224"),
    Arch("deit_tiny", "timm", "deit_tiny_patch16_224"),
    Arch("deit_tiny_distilled", "timm", "deit_tiny_distilled_patch16_224"),
    Arch("swin_tiny", "timm", "swin_tiny_patch4_window7_224"),
    Arch("swinv2_tiny", "timm", "swinv2_tiny_window8_256", img=256),
    Arch("tiny_vit_5m", "timm", "tiny_vit_5m_224"),
    Arch("dinov2_small", "timm", "vit_small_patch14_dinov2", pass_img_size=True),
    Arch("vit_hybrid_tiny_r", "timm", "vit_tiny_r_s16_p8_224"),
    Arch("mobilevit_xxs", "timm", "mobilevit_xxs", img=256),
    Arch("hf_vit", "hf", "vit"),
    Arch("hf_deit", "hf", "deit"),
    Arch("hf_swin", "hf", "swin"),
    Arch("hf_dinov2", "hf", "dinov2"),
    Arch("beit_base", "timm", "beit_base_patch16_224"),
    Arch("tv_vit_b_16", "tv", "vit_b_16"),
    Arch("hf_vit_dynamo", "hf", "vit", dynamo=True),
    Arch("hf_swin_dynamo", "hf", "swin", dynamo=True),
)


# ---------------------------------------------------------------------------------------------
# models


def _hf_model(kind: str) -> Any:
    """A randomly initialised transformers image classifier built from its config class (no
    hub access): ViT / DeiT at the tiny size (width 192, 12 blocks, 3 heads), DINOv2 at the small
    size (384, 6 heads, patch 14), Swin at the config's default (tiny); 1000 labels."""
    import transformers as tr

    small = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                 image_size=224, patch_size=16, num_labels=1000)
    if kind == "vit":
        return tr.ViTForImageClassification(tr.ViTConfig(**small))
    if kind == "deit":
        return tr.DeiTForImageClassification(tr.DeiTConfig(**small))
    if kind == "dinov2":
        cfg = tr.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224,
                              patch_size=14, num_labels=1000)
        return tr.Dinov2ForImageClassification(cfg)
    if kind == "swin":
        return tr.SwinForImageClassification(tr.SwinConfig(image_size=224, num_labels=1000))
    raise ValueError(kind)


class _LogitsOnly:
    """Wrap an HF model so it returns the logits tensor (torch.onnx needs tensors out)."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self, m: Any) -> None:
                super().__init__()
                self.m = m

            def forward(self, x: Any) -> Any:
                return self.m(pixel_values=x).logits

        return Wrapped(model)


def export_arch(arch: Arch, out: Path) -> str:
    """Export ``arch`` to ``out`` (random weights, seed 0); returns a note on the export."""
    from onnx_mptq.export import export_model, export_timm

    if arch.source == "timm":
        res = export_timm(arch.name, out, img_size=arch.img if arch.pass_img_size else None,
                          model_kwargs=dict(arch.kwargs), check_samples=1, tol=1e-2)
        return f"timm, max |ORT - torch| {res.max_abs_diff:.2g}"
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch.source == "hf":
            model = _LogitsOnly(_hf_model(arch.name))
        else:
            import torchvision

            model = getattr(torchvision.models, arch.name)(weights=None)
    res = export_model(model.eval(), out, name=arch.key, input_shape=(3, arch.img, arch.img), check_samples=1, tol=1e-2,
                       dynamo=arch.dynamo, opset=18 if arch.dynamo else 17)
    return f"{arch.source} ({res.exporter}), max |ORT - torch| {res.max_abs_diff:.2g}"


# ---------------------------------------------------------------------------------------------
# data


def photo_arrays(size: int, n: int, start: int = 0) -> np.ndarray:
    from PIL import Image

    from onnx_mptq.data import PreprocessSpec, preprocess_image

    spec = PreprocessSpec(size=size, mean=MEAN, std=STD, interpolation="bicubic", crop_pct=0.875)
    files = sorted((PHOTOS / "images").iterdir())[start:start + n]
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(preprocess_image(im, spec))
    return np.stack(out)  # (n, 3, size, size)


# ---------------------------------------------------------------------------------------------
# one row


def analysis_summary(model_path: Path) -> dict[str, Any]:
    import onnx

    from onnx_mptq.graph.analysis import analyze

    a = analyze(onnx.load(str(model_path)))
    roles = Counter(u.role.value for u in a.units)
    left = Counter(_note_kind(n) for n in a.notes if "left in float" in n or "declined" in n)
    return {"roles": dict(sorted(roles.items())), "units": len(a.units), "float": dict(left),
            "notes": list(a.notes), "layernorms": len(a.layernorms),
            "foldable": sum(1 for ln in a.layernorms if ln.foldable)}


def _note_kind(note: str) -> str:
    """The reason part of a note ("conv X: reason; left in float" -> "conv: reason")."""
    head, _, rest = note.partition(": ")
    kind = head.split(" ", 1)[0]
    return f"{kind}: {rest.split('; left in float')[0]}"


def quantize_row(model_path: Path, calib: dict, evald: dict, bits: int) -> dict[str, Any]:
    import onnx

    from onnx_mptq.config import Config, QuantConfig
    from onnx_mptq.pipeline import quantize

    t = time.perf_counter()
    cfg = Config(quant=QuantConfig(w_bits=bits, a_bits=bits))
    res = quantize(onnx.load(str(model_path)), calib, cfg, eval_data=evald)
    return {"sqnr_db": res.validation.sqnr_db, "seconds": time.perf_counter() - t, "quantized": len(res.plan.layers),
            "smoothed": res.plan.smoothing is not None, "cosine": res.validation.cosine}


def run(arch: Arch, work: Path, n_calib: int, n_eval: int, analysis_only: bool, data_cache: dict) -> dict[str, Any]:
    row: dict[str, Any] = {"key": arch.key, "name": f"{arch.source}:{arch.name}" + (" (dynamo)" if arch.dynamo else "")}
    path = work / f"{arch.key}.onnx"
    t0 = time.perf_counter()
    try:
        if not path.exists():
            row["export"] = export_arch(arch, path)
        row["export_s"] = time.perf_counter() - t0
        row.update(analysis_summary(path))
        if not analysis_only:
            if arch.img not in data_cache:
                data_cache[arch.img] = (photo_arrays(arch.img, n_calib, 0), photo_arrays(arch.img, n_eval, n_calib))
            calib, evald = data_cache[arch.img]
            for bits in (8, 4):
                r = quantize_row(path, {"input": calib}, {"input": evald}, bits)
                row[f"w{bits}a{bits}"] = r
    except Exception as e:  # a row's failure is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logging.getLogger("bench_coverage").debug("%s", traceback.format_exc())
    row["total_s"] = time.perf_counter() - t0
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | units by role | quantized | left in float (reason: count) | W8A8 SQNR dB | W4A4 SQNR dB | time W8A8 / W4A4 s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "roles" not in r:
            lines.append(f"| {r['name']} | error: {r.get('error')} | | | | | |")
            continue
        roles = ", ".join(f"{k} {v}" for k, v in r["roles"].items())
        fl = "; ".join(f"{k}: {v}" for k, v in r["float"].items()) or "none"
        if "error" in r:
            fl += f"; error: {r['error']}"
        q8, q4 = r.get("w8a8"), r.get("w4a4")
        quant = f"{q8['quantized']} of {r['units']}" if q8 else f"- of {r['units']}"
        if q8 and not q8.get("smoothed"):
            quant += " (no SQ-b)"

        def s(q: dict | None) -> str:
            return "-" if q is None else f"{q['sqnr_db']:.1f}"

        def t(q: dict | None) -> str:
            return "-" if q is None else f"{q['seconds']:.0f}"
        lines.append(f"| {r['name']} | {roles} | {quant} | {fl} | {s(q8)} | {s(q4)} | {t(q8)} / {t(q4)} |")
    return "\n".join(lines)


def role_ablation(arch: Arch, work: Path, n_calib: int, n_eval: int) -> list[str]:
    """Where a row's W8A8 error comes from: one W8A8 plan, then the SQNR with each role's units
    left in float (the rest quantized) and with only that role quantized (re-emitted from the
    plan, no new search)."""
    import dataclasses as dc

    import onnx

    from onnx_mptq.config import Config, QuantConfig, RuntimeConfig
    from onnx_mptq.pipeline import emit_from_plan, quantize, validate_against

    model = onnx.load(str(work / f"{arch.key}.onnx"))
    calib = {"input": photo_arrays(arch.img, n_calib, 0)}
    evald = {"input": photo_arrays(arch.img, n_eval, n_calib)}
    res = quantize(model, calib, Config(quant=QuantConfig(w_bits=8, a_bits=8)), eval_data=evald)
    out = [f"{arch.key} W8A8: {res.validation.sqnr_db:.2f} dB"]

    def sqnr(layers: tuple, input_quant: Any) -> float:
        q = emit_from_plan(model, dc.replace(res.plan, layers=layers, input_quant=input_quant)).model
        return validate_against(q, model, evald, RuntimeConfig()).sqnr_db

    for role in sorted({lp.role for lp in res.plan.layers}):
        rest = tuple(lp for lp in res.plan.layers if lp.role != role)
        only = tuple(lp for lp in res.plan.layers if lp.role == role)
        out.append(f"  {role} ({len(only)}): float -> {sqnr(rest, res.plan.input_quant if role != 'patch_embed' else None):.2f} dB,"
                   f" only it quantized -> {sqnr(only, res.plan.input_quant if role == 'patch_embed' else None):.2f} dB")
    return out


def _worker(job: tuple) -> dict[str, Any]:
    arch, work, n_calib, n_eval, analysis_only = job
    logging.basicConfig(level=logging.WARNING)
    return run(arch, work, n_calib, n_eval, analysis_only, {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/onnx-mptq-coverage"), help="exported models (cached)")
    p.add_argument("--only", default=None, help="comma-separated row keys")
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--jobs", type=int, default=1, help="rows run in parallel (separate processes)")
    p.add_argument("--analysis-only", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per row here")
    p.add_argument("--from-json", type=Path, default=None, help="only print the markdown table of these rows")
    p.add_argument("--ablate", default=None, metavar="KEY", help="W8A8 SQNR with each role left in float (one row)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.ablate is not None:
        arch = next(a for a in ARCHS if a.key == args.ablate)
        print("\n".join(role_ablation(arch, args.work, args.calib, args.eval)))
        return 0
    if args.from_json is not None:
        rows = [json.loads(line) for line in args.from_json.read_text().splitlines() if line.strip()]
        order = {a.key: i for i, a in enumerate(ARCHS)}
        print(markdown(sorted(rows, key=lambda r: order.get(r["key"], len(order)))))
        return 1 if any("error" in r for r in rows) else 0
    args.work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    jobs = [(a, args.work, args.calib, args.eval, args.analysis_only) for a in ARCHS if only is None or a.key in only]
    rows = []

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        line = json.dumps(row, default=str)
        print(line if not args.markdown else f"<!-- {line} -->", flush=True)
        if args.json is not None:
            with args.json.open("a") as f:
                f.write(line + "\n")

    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
            for fut in as_completed([ex.submit(_worker, j) for j in jobs]):  # submitted in row order
                done(fut.result())
    else:
        cache: dict = {}
        for arch, work, n_calib, n_eval, analysis_only in jobs:
            done(run(arch, work, n_calib, n_eval, analysis_only, cache))
    if args.markdown:
        order = {a.key: i for i, a in enumerate(ARCHS)}
        print(markdown(sorted(rows, key=lambda r: order[r["key"]])))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
