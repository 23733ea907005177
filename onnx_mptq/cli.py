"""The `onnx-mptq` command line: a thin shell over the pipeline and the config tree.

Exit codes: 0 success, 2 user-facing error (one line; ``--debug`` for the traceback), 1 a bug.
Outputs are written atomically; a failed run leaves no file behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    CalibConfig,
    Config,
    MixedConfig,
    OptmSelect,
    Providers,
    QuantConfig,
    RuntimeConfig,
    ScaleMethod,
    ShiftMode,
    SmoothConfig,
    WeightStorage,
)
from .errors import ConfigError, MptqError

log = logging.getLogger("onnx_mptq")


# ---------------------------------------------------------------------------------------------
# argument groups shared by commands


def _add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--providers", choices=[x.value for x in Providers], default="auto",
                   help="ONNX Runtime execution provider: auto uses CUDA only where it really loads (default auto)")
    g.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ONNX Runtime's default)")
    g.add_argument("--batch-size", type=int, default=32, help="batch size for evaluation and latency (default 32)")


def _add_data(p: argparse.ArgumentParser, flag: str, required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument(flag, required=required, metavar="DATA",
                   help=".npz with one array per model input (+ optional int 'labels'), or an image folder")
    g.add_argument("--limit", type=int, default=None, help="use at most N samples (after --split and --offset; default all)")
    g.add_argument("--offset", type=int, default=0, help="skip the first N samples (after --split; default 0)")
    g.add_argument("--split", default=None, metavar="fold:I/K|rest:I/K",
                   help="deterministic slice by position p: fold:I/K keeps p %% K == I, rest:I/K the others "
                        "(default: all samples)")
    g.add_argument("--labels", default=None, metavar="FILE",
                   help="flat image folder: labels file, 'filename,index' lines or one index per sorted file (default none)")
    g.add_argument("--class-map", default=None, metavar="FILE",
                   help="image folders: class name -> index ('wnid index' lines, a names list such as "
                        "synset_words.txt, or JSON); default: sub-folders numbered in sorted order")
    g.add_argument("--preprocess", default=None, metavar="timm:NAME",
                   help="image preprocessing from timm's data config of NAME (image folders only)")
    g.add_argument("--size", type=int, default=None, help="image folders: input size (square)")
    g.add_argument("--mean", type=float, nargs="+", default=None, help="image folders: per-channel mean")
    g.add_argument("--std", type=float, nargs="+", default=None, help="image folders: per-channel std")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], default=None)
    g.add_argument("--crop-pct", type=float, default=None, help="image folders: center-crop fraction")


def _runtime_from(args: argparse.Namespace) -> RuntimeConfig:
    return RuntimeConfig(providers=Providers(args.providers), threads=args.threads, batch_size=args.batch_size)


def _open_data(args: argparse.Namespace, flag_value: str, model, batch_size: int):
    from .data import input_specs, open_data, parse_preprocess_args

    pre = parse_preprocess_args(args.preprocess, args.size, args.mean, args.std, args.interpolation, args.crop_pct)
    return open_data(flag_value, input_specs(model), limit=args.limit, batch_size=batch_size, preprocess=pre,
                     offset=args.offset, split=args.split, labels=args.labels, class_map=args.class_map)


# ---------------------------------------------------------------------------------------------
# commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from .graph.analysis import analyze
    from .graph.io import load_model

    model = load_model(args.model)
    analysis = analyze(model)
    if args.json:
        print(analysis.to_json(indent=2))
        return 0
    print(f"model: {args.model}  opset {analysis.opset}  digest {analysis.model_digest}")
    counts = ", ".join(f"{k} {v}" for k, v in analysis.summary().items())
    print(f"quantizable units: {len(analysis.units)} ({counts})")
    print(f"{'unit':<52} {'op':<7} {'role':<12} {'block':>5} {'in':>6} {'out':>6}  layernorm / activation")
    for u in analysis.units:
        extra = " / ".join(x for x in (u.layernorm or "", u.activation.value if u.activation else "") if x)
        print(f"{_short(u.name, 52):<52} {u.op_type:<7} {u.role.value:<12} {'' if u.block is None else u.block:>5} "
              f"{u.in_features or '':>6} {u.out_features or '':>6}  {extra}")
    print(f"layernorms: {len(analysis.layernorms)}")
    for ln in analysis.layernorms:
        state = "SQ-b foldable" if ln.foldable else f"not foldable: {ln.reason}"
        print(f"  {_short(ln.name, 60):<60} {ln.form:<10} C={ln.channels}  {state}")
    for n in analysis.notes:
        print(f"note: {n}")
    return 0


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3):]


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_timm

    res = export_timm(
        args.name,
        Path(args.output),
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        pretrained=args.pretrained,
        img_size=args.img_size,
        num_classes=args.num_classes,
        opset=args.opset,
        dynamo=args.dynamo,
        runtime=_runtime_from(args),
    )
    print(f"exported {args.name} -> {res.path} (opset {res.opset}, input {list(res.input_shape)})")
    print(f"check against torch: max abs diff {res.max_abs_diff:.3g} [provider {res.provider}]")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import check_shapes_fit
    from .graph.io import load_model, write_text_atomic
    from .validate import evaluate

    runtime = _runtime_from(args)
    model = load_model(args.model)
    reference = load_model(args.reference) if args.reference else None
    data = _open_data(args, args.data, model, runtime.batch_size)
    check_shapes_fit(model, data)
    report = evaluate(model, data, runtime, reference=reference, latency_batch_size=runtime.batch_size,
                      reference_name=f"reference model {args.reference}")
    doc = {k: v for k, v in report.to_dict().items() if k not in ("kind", "schema_version")}
    if args.json:
        write_text_atomic(args.json, json.dumps(doc, indent=2) + "\n")
    _print_eval(doc)
    return 0


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}{unit}" if abs(v) < 1e4 else f"{v:.3e}{unit}"
    return f"{v}{unit}"


def _print_eval(doc: dict) -> None:
    for k in ("num_samples", "top1", "top5", "reference_top1", "reference_top5", "top1_agreement", "cosine", "sqnr_db", "kl",
              "latency_ms_b1", "latency_ms_batch"):
        if k.startswith("reference_") and doc.get(k) is None:
            continue
        print(f"{k:>16}: {_fmt(doc.get(k))}")
    print(f"{'provider':>16}: {doc.get('provider')}")


def _config_from(args: argparse.Namespace) -> Config:
    base = Config()
    if getattr(args, "config", None):
        try:
            data = json.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{args.config}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{args.config}: not valid JSON ({e.msg} at line {e.lineno})") from None
        base = Config.from_dict(data)
    smooth = base.smooth
    quant = base.quant
    mixed = base.mixed
    calib = base.calib
    if hasattr(args, "alpha") and args.alpha is not None:
        smooth = SmoothConfig(**{**_fields(smooth), "alpha": args.alpha})
    if hasattr(args, "shift") and args.shift is not None:
        smooth = SmoothConfig(**{**_fields(smooth), "shift": ShiftMode(args.shift)})
    if getattr(args, "alpha_search", False):
        smooth = SmoothConfig(**{**_fields(smooth), "alpha_search": True})
    if getattr(args, "no_sqb", False):
        smooth = SmoothConfig(**{**_fields(smooth), "enabled": False})
    qkw = {}
    for flag, key in (("w_bits", "w_bits"), ("a_bits", "a_bits")):
        if getattr(args, flag, None) is not None:
            qkw[key] = getattr(args, flag)
    if getattr(args, "scale_method", None):
        qkw["scale_method"] = ScaleMethod(args.scale_method)
    if getattr(args, "act_symmetric", False):
        qkw["act_symmetric"] = True
    if getattr(args, "optm_max_bits", None) is not None:
        qkw["optm_max_bits"] = args.optm_max_bits
    if getattr(args, "no_optm", False):
        qkw["optm"] = False
    if getattr(args, "optm_any_m", False):
        qkw["optm_lattice"] = False
    if getattr(args, "optm_select", None):
        qkw["optm_select"] = OptmSelect(args.optm_select)
    if getattr(args, "weight_container", None):
        qkw["weight_container"] = args.weight_container
    if getattr(args, "weight_storage", None):
        qkw["weight_storage"] = WeightStorage(args.weight_storage)
    if qkw:
        quant = QuantConfig(**{**_fields(quant), **qkw})
    if getattr(args, "mixed_precision", False) or getattr(args, "target_bits", None) is not None or getattr(args, "target_size", None) is not None:
        mkw: dict[str, Any] = {"enabled": True}
        if args.target_bits is not None:
            mkw["target_bits"] = args.target_bits
        if args.target_size is not None:
            mkw["target_size_mb"] = args.target_size
        if args.candidates:
            try:
                mkw["candidates"] = tuple(int(c) for c in args.candidates.split(","))
            except ValueError:
                raise ConfigError(f"mixed.candidates must be integers separated by commas, got {args.candidates!r}") from None
        if args.keep:
            mkw["keep"] = tuple(args.keep)
        mixed = MixedConfig(**{**_fields(mixed), **mkw})
    if getattr(args, "limit", None) is not None:
        calib = CalibConfig(**{**_fields(calib), "limit": args.limit})
    if getattr(args, "calib_batch_size", None) is not None:
        calib = CalibConfig(**{**_fields(calib), "batch_size": args.calib_batch_size})
    seed = args.seed if getattr(args, "seed", None) is not None else base.seed
    return Config(runtime=_runtime_from(args), calib=calib, smooth=smooth, quant=quant, mixed=mixed, seed=seed)


def _fields(obj: Any) -> dict:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def cmd_smooth(args: argparse.Namespace) -> int:
    from .pipeline import smooth_file

    cfg = _config_from(args)
    result = smooth_file(Path(args.model), Path(args.output), args, cfg, report_path=Path(args.report) if args.report else None)
    print(result)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .pipeline import quantize_file

    cfg = _config_from(args)
    summary = quantize_file(Path(args.model), Path(args.output), args, cfg)
    print(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import run_demo

    cfg = _config_from(args)
    print(run_demo(cfg, out_dir=Path(args.out_dir) if args.out_dir else None))
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnx-mptq", description="Mixed-precision PTQ of vision transformers in ONNX (MPTQ-ViT).")
    p.add_argument("--version", action="version", version=f"onnx-mptq {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("export", help="export a timm ViT/DeiT/Swin to ONNX and check it against torch")
    s.add_argument("name", help="timm model name, e.g. deit_small_patch16_224")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--checkpoint", default=None, help="weights: .safetensors or a torch state dict (loaded with weights_only=True)")
    s.add_argument("--pretrained", action="store_true", help="download pretrained weights through timm (needs network)")
    s.add_argument("--img-size", type=int, default=None)
    s.add_argument("--num-classes", type=int, default=None)
    s.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; 14 gives the decomposed LayerNorm)")
    s.add_argument("--dynamo", action="store_true", help="use torch's dynamo-based exporter")
    _add_runtime(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("inspect", help="list the quantizable units, LayerNorms and activations of a ViT-family model")
    s.add_argument("model")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("evaluate", help="accuracy, fidelity to a reference model, and latency in ONNX Runtime")
    s.add_argument("model")
    _add_data(s, "--data", required=True)
    s.add_argument("--reference", default=None, help="FP32 model to compare against")
    s.add_argument("--json", default=None, metavar="OUT", help="write the metrics as JSON")
    _add_runtime(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("smooth", help="SQ-b: shift and smooth LayerNorm->Linear inputs, folded into the FP32 graph")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True)
    _add_data(s, "--calib", required=True)
    s.add_argument("--alpha", type=float, default=None, help="smoothing strength in [0, 1] (default 0.5)")
    s.add_argument("--alpha-search", action="store_true", help="search alpha per LayerNorm on a small grid")
    s.add_argument("--shift", choices=[x.value for x in ShiftMode], default=None, help="shift: channel mean or range midpoint")
    s.add_argument("--report", default=None, metavar="FILE.json")
    s.add_argument("--config", default=None, help="JSON config file (the same tree as the Python API's Config)")
    s.add_argument("--seed", type=int, default=None)
    _add_runtime(s)
    s.set_defaults(func=cmd_smooth)

    s = sub.add_parser("quantize", help="quantize to a QDQ model (SQ-b, scale search, OPT-m, optional mixed precision)")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True)
    _add_data(s, "--calib", required=False)
    s.add_argument("--plan", default=None, help="re-emit from this plan (no calibration)")
    s.add_argument("--plan-out", default=None, help="write the quantization plan as JSON")
    s.add_argument("--report", default=None, metavar="DIR", help="write a report (Markdown + JSON + plots) here")
    s.add_argument("--w-bits", type=int, default=None, help="weight bits 2..8 (default 8)")
    s.add_argument("--a-bits", type=int, default=None, help="activation bits 2..8 (default 8)")
    s.add_argument("--no-sqb", action="store_true", help="disable SQ-b smoothing")
    s.add_argument("--no-optm", action="store_true", help="disable OPT-m twin-region quantizers")
    s.add_argument("--optm-max-bits", type=int, default=None,
                   help="use OPT-m only on operands with at most this many bits (default 7: not at 8 bits)")
    s.add_argument("--optm-any-m", action="store_true",
                   help="also search ratios 2^m too wide for one uint8 lattice (emitted as two integer matmuls; "
                        "default: only ratios that run as one integer matmul)")
    s.add_argument("--weight-container", choices=["auto", "int8", "uint8"], default=None,
                   help="weight codes in the model: auto (default) = int8 where every code is within +-64, else "
                        "uint8 + 128, exact on every CPU; int8 = int8 everywhere (fastest on VNNI/ARM CPUs, "
                        "saturates on x86 AVX2 without VNNI)")
    s.add_argument("--weight-storage", choices=[x.value for x in WeightStorage], default=None,
                   help="weight codes in the file: auto (default) = int4, two codes a byte, for weights of <= 4 bits "
                        "where the model is at opset >= 21, else int8; int4 = also convert an older model to "
                        "opset 21 (recorded in the plan); int8 = one code a byte, any opset")
    s.add_argument("--optm-select", choices=[x.value for x in OptmSelect], default=None,
                   help="keep a twin quantizer where it measurably improves the network's logits on calibration "
                        "data (network, default) or where it lowers its layer's output error (layer)")
    s.add_argument("--alpha", type=float, default=None)
    s.add_argument("--shift", choices=[x.value for x in ShiftMode], default=None)
    s.add_argument("--alpha-search", action="store_true")
    s.add_argument("--scale-method", choices=[x.value for x in ScaleMethod], default=None)
    s.add_argument("--act-symmetric", action="store_true", help="symmetric activation quantizers (default asymmetric)")
    s.add_argument("--mixed-precision", action="store_true", help="per-layer bit allocation under a budget")
    s.add_argument("--target-bits", type=float, default=None)
    s.add_argument("--target-size", type=float, default=None, metavar="MB")
    s.add_argument("--candidates", default=None, help="candidate bit-widths, e.g. 4,5,6,8")
    s.add_argument("--keep", action="append", default=None, metavar="BITS:PATTERN", help="pin layers matching a glob")
    s.add_argument("--eval", default=None, metavar="DATA", help="held-out data to validate against FP32 after quantizing")
    s.add_argument("--eval-split", default=None, metavar="fold:I/K|rest:I/K",
                   help="slice of --eval, e.g. rest:0/10 beside --calib DIR --split fold:0/10 (default all)")
    s.add_argument("--config", default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--calib-batch-size", type=int, default=None)
    _add_runtime(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("demo", help="run the whole pipeline on the embedded digits ViT and print FP32 vs quantized")
    s.add_argument("--out-dir", default=None, help="keep the produced models here (default: a temporary folder)")
    s.add_argument("--seed", type=int, default=None)
    _add_runtime(s)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if args.quiet:
        import os

        os.environ["ONNX_MPTQ_NO_PROGRESS"] = "1"
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MptqError as e:
        if args.debug:
            raise
        print(f"onnx-mptq: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnx-mptq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`onnx-mptq inspect m.onnx | head`): not an error
        try:
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError):
            pass
        return 0


def _entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
