"""The `onnx-mptq` command line: a thin shell over the pipeline and the config tree.

Exit codes: 0 success, 2 user-facing error (one line; ``--debug`` for the traceback), 1 a bug.
Every output (the model, ``--plan-out``, ``--report``, ``--json``) is checked to be writable
before any work starts; outputs are written atomically once every stage succeeded, so a failed
run leaves no file behind; a folder the outputs need is created and the summary says so.

Flags map onto the config tree (:mod:`onnx_mptq.config`) by their ``dest``: a flag whose
``dest`` is a dotted config path (``quant.optm.enabled``) sets that field; everything else is
listed in :data:`NOT_CONFIG`. ``--config FILE`` reads the whole tree from JSON, and flags given
on the command line override it. Fields without a flag are in :data:`CONFIG_FILE_ONLY`
(tests/test_config.py checks that the three stay in step).

Progress bars: on when stderr is a terminal, off with ``--no-progress`` or ``-q``; the pipeline
receives the decision as ``progress=``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    CompensateInputs,
    Config,
    OptmSelect,
    Pin,
    Providers,
    ScaleMethod,
    ShiftMode,
    leaf_paths,
)
from .errors import ConfigError, DataError, MptqError, OutputError, PlanError, UnsupportedModelError
from .plan import CompensatedWeights, ConstantStorage, GraphForm, WeightContainer, WeightStorage, weights_path

log = logging.getLogger("onnx_mptq")

D = Config()  # the defaults the help texts quote

# config fields deliberately without a flag: set them in a --config JSON file or the Python API
CONFIG_FILE_ONLY = frozenset({
    "capture.tokens_per_layer",
    "smooth.alpha_grid",
    "smooth.fallback",
    "quant.input_bits",
    "quant.search.percentile",
    "quant.search.grid_size",
    "quant.search.grid_low",
    "quant.search.grid_high",
    "quant.optm.max_m",
    "quant.optm.subset",
    "quant.optm.z",
    "quant.emission.symmetric_container",
    "quant.emission.range_form",
    "quant.emission.twin_form",
    "quant.compensate.samples",
    "mixed.subset",
    "mixed.metric",
})

# argparse dests that are not config fields: inputs, outputs, data reading, and the shell itself
NOT_CONFIG = frozenset({
    "help", "version", "debug", "quiet", "no_progress", "command", "func",
    "model", "output", "name", "config", "plan", "plan_out", "report", "eval", "json", "reference", "out_dir",
    "calib", "data", "limit", "preprocess", "size", "mean", "std", "interpolation", "crop_pct",
    "checkpoint", "pretrained", "img_size", "num_classes", "opset", "dynamo",
    "offset", "split", "eval_split", "labels", "class_map",
})


_CONFIG_PATHS = frozenset(leaf_paths())


def _parse_candidates(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in str(text).split(","))
    except ValueError:
        raise ConfigError(f"mixed.candidates must be integers separated by commas, got {text!r}") from None


# flag values that need converting before they reach the config
_CONVERT: dict[str, Callable[[Any], Any]] = {
    "mixed.candidates": _parse_candidates,
    "mixed.keep": lambda v: tuple(Pin.parse(k) for k in v),
}


# ---------------------------------------------------------------------------------------------
# argument groups shared by commands


def _common(sub: bool) -> argparse.ArgumentParser:
    """--debug, -q and --no-progress: accepted before and after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    dflt: Any = argparse.SUPPRESS if sub else False  # a subcommand must not reset what came before it
    p.add_argument("--debug", action="store_true", default=dflt, help="show tracebacks and debug logs (default: off)")
    p.add_argument("-q", "--quiet", action="store_true", default=dflt,
                   help="warnings and errors only, no progress bars (default: off)")
    p.add_argument("--no-progress", action="store_true", default=dflt,
                   help="no progress bars (default: shown when stderr is a terminal)")
    return p


def _add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--providers", dest="runtime.providers", choices=[x.value for x in Providers], default=None,
                   help=f"ONNX Runtime execution provider: auto uses CUDA only where it really loads "
                        f"(default: {D.runtime.providers.value})")
    g.add_argument("--threads", dest="runtime.threads", type=int, default=None, metavar="N",
                   help=f"intra-op threads, 0 = ONNX Runtime's default (default: {D.runtime.threads})")
    g.add_argument("--batch-size", dest="runtime.batch_size", type=int, default=None, metavar="N",
                   help=f"batch size for evaluation and latency (default: {D.runtime.batch_size})")


def _add_data(p: argparse.ArgumentParser, flag: str, required: bool, limit_dest: str = "limit") -> None:
    g = p.add_argument_group("data")
    g.add_argument(flag, required=required, metavar="DATA",
                   help=".npz with one array per model input (+ optional int 'labels'), or an image folder"
                        + ("" if required else " (default: none)"))
    g.add_argument("--limit", dest=limit_dest, type=int, default=None, metavar="N", help="use at most N samples (default: all)")
    g.add_argument("--offset", type=int, default=0, metavar="N", help="skip the first N samples (after --split; default: 0)")
    g.add_argument("--split", default=None, metavar="fold:I/K|rest:I/K",
                   help="deterministic slice by position p: fold:I/K keeps p %% K == I, rest:I/K the others "
                        "(default: all samples)")
    g.add_argument("--labels", default=None, metavar="FILE",
                   help="flat image folder: labels file, 'filename,index' lines or one index per sorted file (default: none)")
    g.add_argument("--class-map", default=None, metavar="FILE",
                   help="image folders: class name -> index ('wnid index' lines, a names list such as "
                        "synset_words.txt, or JSON) (default: sub-folders numbered in sorted order)")
    g.add_argument("--preprocess", default=None, metavar="timm:NAME",
                   help="image preprocessing from timm's data config of NAME (image folders only; default: none)")
    g.add_argument("--size", type=int, metavar="N", default=None, help="image folders: input size, square (default: from --preprocess; else give --size, --mean and --std together)")
    g.add_argument("--mean", type=float, nargs="+", default=None, help="image folders: per-channel mean, pixels in [0, 1] (default: from --preprocess)")
    g.add_argument("--std", type=float, nargs="+", default=None, help="image folders: per-channel std (default: from --preprocess)")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], default=None,
                   help="image folders: resize interpolation (default: from --preprocess, else bilinear)")
    g.add_argument("--crop-pct", type=float, default=None, metavar="F", help="image folders: center-crop fraction (default: from --preprocess, else 1.0 = no crop)")


def _add_config_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help="JSON config file, the same tree as the Python API's Config; flags override it (default: none)")
    p.add_argument("--seed", dest="seed", type=int, default=None, metavar="N", help=f"random seed (default: {D.seed})")


def _add_smoothing(g: Any) -> None:
    g.add_argument("--alpha", dest="smooth.alpha", type=float, default=None, metavar="A",
                   help=f"smoothing strength in [0, 1] (default: {D.smooth.alpha})")
    g.add_argument("--alpha-search", dest="smooth.alpha_search", action="store_const", const=True, default=None,
                   help=f"search alpha per LayerNorm on {list(D.smooth.alpha_grid)} (default: off)")
    g.add_argument("--shift", dest="smooth.shift", choices=[x.value for x in ShiftMode], default=None,
                   help=f"shift: channel mean or range midpoint (default: {D.smooth.shift.value})")


def _open_data(args: argparse.Namespace, flag_value: str, model, batch_size: int, limit: int | None, *,
               evaluation: bool = False):
    """The data a flag names; ``--offset`` / ``--split`` slice it, held-out ``--eval`` data takes
    ``--eval-split`` instead; ``--labels`` / ``--class-map`` label image folders."""
    from .data import input_specs, open_data, parse_preprocess_args

    pre = parse_preprocess_args(args.preprocess, args.size, args.mean, args.std, args.interpolation, args.crop_pct)
    offset, split = (0, getattr(args, "eval_split", None)) if evaluation else (args.offset, args.split)
    return open_data(flag_value, input_specs(model), limit=limit, batch_size=batch_size, preprocess=pre,
                     offset=offset, split=split, labels=args.labels, class_map=args.class_map)


# ---------------------------------------------------------------------------------------------
# the config from flags


def _config_from(args: argparse.Namespace) -> Config:
    """``--config`` (or the defaults), then every config flag given on the command line."""
    cfg = Config()
    if getattr(args, "config", None):
        try:
            data = json.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{args.config}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{args.config}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except OSError as e:
            raise ConfigError(f"{args.config}: cannot read it ({e.strerror or e})") from None
        cfg = Config.from_dict(data)
    given = {k: v for k, v in vars(args).items() if k in _CONFIG_PATHS and v is not None}
    # a budget implies mixed precision (documented in --target-bits / --target-size)
    if "mixed.target_bits" in given or "mixed.target_size_mb" in given:
        given.setdefault("mixed.enabled", True)
    if given.get("mixed.enabled"):  # enable last, once the budget is in place
        given["mixed.enabled"] = given.pop("mixed.enabled")
    for path, value in given.items():
        cfg = cfg.with_value(path, _CONVERT.get(path, lambda v: v)(value))
    if not cfg.mixed.enabled:
        for path, flag in (("mixed.candidates", "--candidates"), ("mixed.keep", "--keep")):
            if path in given:
                raise ConfigError(f"{flag} applies to mixed precision only: add --mixed-precision with "
                                  f"--target-bits or --target-size")
    return cfg


def _progress(args: argparse.Namespace) -> bool:
    from .pipeline import resolve_progress

    return not (getattr(args, "quiet", False) or getattr(args, "no_progress", False)) and resolve_progress(None)


# ---------------------------------------------------------------------------------------------
# outputs: checked before any work, named in the summary when a folder had to be created


@dataclasses.dataclass(frozen=True)
class _Outputs:
    created: tuple[Path, ...]  # folders that do not exist yet and will be created on writing

    def lines(self) -> list[str]:
        return [f"created folder {d}" for d in self.created if d.is_dir()]


def _check_outputs(model_in: Path | None, files: Sequence[Path], folders: Sequence[Path] = ()) -> _Outputs:
    """Every output file and folder can be written: not over the input model, not a folder in the
    way of a file (or a file in the way of a folder), an existing writable folder above it."""
    created: list[Path] = []
    for out, is_folder in [*((f, False) for f in files), *((d, True) for d in folders)]:
        if model_in is not None and out.resolve() == model_in.resolve():
            raise ConfigError(f"{out}: the output would overwrite the input model; choose another path")
        if not is_folder and out.is_dir():
            raise OutputError(f"{out}: is a folder; give a file name for the output")
        if is_folder and out.exists() and not out.is_dir():
            raise OutputError(f"{out}: is a file; a folder is written there")
        parent = out.parent
        missing: list[Path] = []
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"{out}: cannot write it: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{out}: cannot write it: permission denied in {parent}")
        created.extend(m for m in reversed(missing) if m not in created)
    return _Outputs(tuple(created))


@contextlib.contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """Unsupported-model errors name the model file."""
    try:
        yield
    except UnsupportedModelError as e:
        if str(path) in str(e):
            raise
        raise UnsupportedModelError(f"{path}: {e}") from None


def _provider(config: Config) -> str:
    from .calibrate.session import planned_provider

    return planned_provider(config.runtime)


# ---------------------------------------------------------------------------------------------
# commands


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_timm

    out = Path(args.output)
    outputs = _check_outputs(None, [out])
    res = export_timm(
        args.name,
        out,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        pretrained=args.pretrained,
        img_size=args.img_size,
        num_classes=args.num_classes,
        opset=args.opset,
        dynamo=args.dynamo,
        runtime=_config_from(args).runtime,
    )
    for line in outputs.lines():
        print(line)
    print(f"exported {args.name} -> {res.path} (opset {res.opset}, input {list(res.input_shape)})")
    print(f"check against torch: max abs diff {res.max_abs_diff:.3g} [provider {res.provider}]")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import check_shapes_fit
    from .graph.io import load_model, write_text_atomic
    from .validate import evaluate

    outputs = _check_outputs(Path(args.model), [Path(args.json)] if args.json else [])
    runtime = _config_from(args).runtime
    model = load_model(args.model)
    reference = load_model(args.reference) if args.reference else None
    data = _open_data(args, args.data, model, runtime.batch_size, args.limit)
    check_shapes_fit(model, data)
    report = evaluate(model, data, runtime, reference=reference, latency_batch_size=runtime.batch_size,
                      progress=_progress(args), reference_name=f"reference model {args.reference}")
    doc = {k: v for k, v in report.to_dict().items() if k not in ("kind", "schema_version")}
    if args.json:
        write_text_atomic(args.json, json.dumps(doc, indent=2) + "\n")
        for line in outputs.lines():
            print(line)
    _print_eval(doc)
    return 0


# ---------------------------------------------------------------------------------------------
# inspect and evaluate output


def cmd_inspect(args: argparse.Namespace) -> int:
    from .graph.analysis import analyze
    from .graph.io import load_model

    with _naming(args.model):
        analysis = analyze(load_model(args.model))
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


def cmd_smooth(args: argparse.Namespace) -> int:
    from .graph.io import load_model, save_model, write_text_atomic
    from .pipeline import smooth

    inp, out = Path(args.model), Path(args.output)
    report_path = Path(args.report) if args.report else None
    outputs = _check_outputs(inp, [out] + ([report_path] if report_path else []))
    config = _config_from(args)
    with _naming(inp):
        source = load_model(inp)
        data = _open_data(args, args.calib, source, config.calib.batch_size, config.calib.limit)
        res = smooth(source, data, config, progress=_progress(args))
    save_model(res.model, out)
    if report_path is not None:
        write_text_atomic(report_path, res.report.to_json() + "\n")
    print("\n".join([*outputs.lines(), _smooth_summary(res, out), f"provider: {_provider(config)}"]))
    return 0


def _smooth_summary(res: Any, out: Path) -> str:
    norms = res.report.norms
    lines = [f"smoothed model written to {out}"]
    counts: dict[str, int] = {}
    for n in norms:
        counts[n.mode.value] = counts.get(n.mode.value, 0) + 1
    if counts:
        lines.append("layernorms: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for n in norms:
        if n.reason:
            lines.append(f"  {n.layernorm}: {n.mode.value} ({n.reason})")
    return "\n".join(lines)


def cmd_quantize(args: argparse.Namespace) -> int:
    from .graph.io import load_model, save_model, size_line, write_text_atomic
    from .passes.constants import constants_line
    from .pipeline import emit_from_plan, quantize, validate_against

    inp, out = Path(args.model), Path(args.output)
    files = [out] + ([Path(args.plan_out)] if args.plan_out else [])
    if args.plan_out and not args.plan and _config_from(args).quant.compensate.any:
        files.append(weights_path(args.plan_out))  # the compensated codes beside the plan
    outputs = _check_outputs(inp, files, [Path(args.report)] if args.report else [])
    config = _config_from(args)
    if not args.plan and not args.calib:
        raise DataError("quantize needs --calib DATA (or --plan PLAN.json to re-emit without calibrating)")
    progress = _progress(args)
    lines: list[str] = []
    with _naming(inp):
        source = load_model(inp)
        eval_ds = (_open_data(args, args.eval, source, config.runtime.batch_size, None, evaluation=True)
                   if args.eval else None)
        if args.plan:
            plan = _read_plan(Path(args.plan))
            try:
                plan = _plan_with_flags(plan, args)
                compensated = any(lp.compensation is not None for lp in plan.layers)
                weights = CompensatedWeights.load(weights_path(args.plan)) if compensated else None
                emitted = emit_from_plan(source, plan, weights)
                qmodel, storage = emitted.model, emitted.storage
                for note in emitted.rederived:
                    lines.append(f"note: {note}")
            except PlanError as e:  # name the plan file
                raise PlanError(f"{args.plan}: {str(e).removeprefix('plan: ')}") from None
            validation = (validate_against(qmodel, source, eval_ds, config.runtime, progress=progress)
                          if eval_ds is not None else None)
            result = None
        else:
            calib = _open_data(args, args.calib, source, config.calib.batch_size, config.calib.limit)
            result = quantize(source, calib, config, eval_data=eval_ds, measure=bool(args.report), progress=progress)
            plan, qmodel, validation, storage = result.plan, result.model, result.validation, result.storage
    # every stage succeeded: write the outputs
    if result is not None and args.report:
        from .report import write_report

        write_report(Path(args.report), result)
    if result is not None and args.plan_out:
        if result.weights is not None:
            result.weights.save(weights_path(args.plan_out))
        write_text_atomic(args.plan_out, plan.to_json() + "\n")
    save_model(qmodel, out)
    lines.extend(outputs.lines())
    if result is None:
        lines.append(f"re-emitted {out} from plan {args.plan} (weight storage {plan.emission.weight_storage.value} "
                     f"as the plan records it)")
    else:
        lines.append(f"quantized model written to {out} ({len(plan.layers)} layers, "
                     f"avg weight bits {plan.avg_weight_bits:.2f}, avg activation bits {plan.avg_activation_bits:.2f})")
        if args.plan_out:
            lines.append(f"plan written to {args.plan_out}" + (f" (compensated codes in {weights_path(args.plan_out)})"
                                                               if result.weights is not None else ""))
        if args.report:
            lines.append(f"report written to {args.report}")
    if storage is not None:
        lines.append(storage.summary())
    lines.append(constants_line(qmodel))
    lines.append(size_line(out, inp))
    if result is not None:
        lines.append("time (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in result.timings.items()))
    lines.append(f"provider: {_provider(config)}")
    if validation is not None:
        d = validation.to_dict()
        lines.append(
            "validation vs FP32: "
            + ", ".join(f"{k} {d[k]:.4g}" for k in ("top1", "top5", "top1_agreement", "sqnr_db", "cosine", "kl")
                        if d.get(k) is not None)
            + f" [{d.get('provider')}]"
        )
        if d.get("reference_top1") is not None:
            lines.append("FP32 reference on the same data: " + ", ".join(
                f"{k.removeprefix('reference_')} {d[k]:.4g}" for k in ("reference_top1", "reference_top5")
                if d.get(k) is not None))
    print("\n".join(lines))
    return 0


def _plan_with_flags(plan, args: argparse.Namespace):
    """The plan with the emission flags given on the command line (they override its record)."""
    changes = {}
    wanted = getattr(args, "quant.emission.constant_storage", None)
    if wanted is not None and ConstantStorage(wanted) is not plan.emission.constant_storage:
        raise PlanError(f"plan: it was made with {plan.emission.constant_storage.value} constants (rounded before "
                        f"calibration, so fixed by the plan); --constant-storage {wanted} needs a new plan (quantize "
                        f"without --plan)")
    for field, cls in (("weight_container", WeightContainer), ("weight_storage", WeightStorage),
                       ("graph_form", GraphForm)):
        value = getattr(args, f"quant.emission.{field}", None)
        if value is not None:
            changes[field] = cls(value)
    return dataclasses.replace(plan, emission=dataclasses.replace(plan.emission, **changes)) if changes else plan


def _read_plan(path: Path):
    from .plan import QuantPlan

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file") from None
    except OSError as e:
        raise PlanError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return QuantPlan.from_json(text)
    except PlanError as e:
        raise PlanError(f"{path}: {str(e).removeprefix('plan: ')}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    out_dir = Path(args.out_dir) if args.out_dir else None
    outputs = _check_outputs(None, [], [out_dir] if out_dir else [])
    cfg = _config_from(args)
    table = run_demo(cfg, out_dir=out_dir, progress=_progress(args))
    print("\n".join([*outputs.lines(), table]))
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    q, o, m = D.quant, D.quant.optm, D.mixed
    common = _common(sub=True)
    p = argparse.ArgumentParser(prog="onnx-mptq", description="Mixed-precision PTQ of vision transformers in ONNX (MPTQ-ViT).",
                                parents=[_common(sub=False)])
    p.add_argument("--version", action="version", version=f"onnx-mptq {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, model: str | None = None, output: str | None = None) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, parents=[common])
        if model:
            c.add_argument("model", help=model)
        if output:
            c.add_argument("-o", "--output", required=True, help=output)
        return c

    s = command("export", "export a timm ViT/DeiT/Swin to ONNX and check it against torch", output="the ONNX file to write")
    s.add_argument("name", help="timm model name, e.g. deit_small_patch16_224")
    s.add_argument("--checkpoint", default=None,
                   help="weights: .safetensors or a torch state dict, loaded with weights_only=True (default: random init)")
    s.add_argument("--pretrained", action="store_true", help="download pretrained weights through timm, needs network (default: off)")
    s.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    s.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset; 14 gives the decomposed LayerNorm (default: 17)")
    s.add_argument("--dynamo", action="store_true", help="use torch's dynamo-based exporter (default: off)")
    _add_runtime(s)
    s.set_defaults(func=cmd_export)

    s = command("inspect", "list the quantizable units, LayerNorms and activations of a ViT-family model", "the ONNX model")
    s.add_argument("--json", action="store_true", help="print one JSON document (default: a table)")
    s.set_defaults(func=cmd_inspect)

    s = command("evaluate", "accuracy, fidelity to a reference model, and latency in ONNX Runtime", "the ONNX model to evaluate")
    _add_data(s, "--data", required=True)
    s.add_argument("--reference", default=None, help="FP32 model to compare against (default: none)")
    s.add_argument("--json", default=None, metavar="OUT", help="also write the metrics as JSON here (default: not written)")
    _add_runtime(s)
    s.set_defaults(func=cmd_evaluate)

    s = command("smooth", "SQ-b: shift and smooth LayerNorm->Linear inputs, folded into the FP32 graph",
                "the FP32 ONNX model (never modified)", "the smoothed ONNX model to write")
    _add_data(s, "--calib", required=True, limit_dest="calib.limit")
    _add_smoothing(s.add_argument_group("SQ-b smoothing"))
    s.add_argument("--report", default=None, metavar="FILE.json", help="write the smoothing report as JSON (default: not written)")
    _add_config_file(s)
    _add_runtime(s)
    s.set_defaults(func=cmd_smooth)

    s = command("quantize", "quantize to a QDQ model (SQ-b, scale search, OPT-m, optional mixed precision)",
                "the FP32 ONNX model (never modified)", "the QDQ ONNX model to write")
    _add_data(s, "--calib", required=False, limit_dest="calib.limit")
    s.add_argument("--calib-batch-size", dest="calib.batch_size", type=int, default=None, metavar="N",
                   help=f"batch size for calibration (default: {D.calib.batch_size})")
    s.add_argument("--eval", default=None, metavar="DATA",
                   help="held-out data to validate against FP32 after quantizing (default: none)")
    s.add_argument("--plan", default=None, metavar="PLAN.json", help="re-emit from this plan, no calibration (default: calibrate)")
    s.add_argument("--plan-out", default=None, metavar="PLAN.json", help="write the quantization plan as JSON (default: not written)")
    s.add_argument("--report", default=None, metavar="DIR", help="write a report (Markdown + JSON + plots) here (default: none)")
    g = s.add_argument_group("quantizers")
    g.add_argument("--w-bits", dest="quant.w_bits", type=int, default=None, metavar="B", help=f"weight bits 2..8 (default: {q.w_bits})")
    g.add_argument("--a-bits", dest="quant.a_bits", type=int, default=None, metavar="B", help=f"activation bits 2..8 (default: {q.a_bits})")
    g.add_argument("--act-symmetric", dest="quant.act_symmetric", action="store_const", const=True, default=None,
                   help="symmetric activation quantizers (default: asymmetric)")
    g.add_argument("--scale-method", dest="quant.search.method", choices=[x.value for x in ScaleMethod], default=None,
                   help=f"how steps are chosen: mse = grid search on the layer's output error "
                        f"(default: {q.search.method.value})")
    g.add_argument("--no-optm", dest="quant.optm.enabled", action="store_const", const=False, default=None,
                   help="disable OPT-m twin-region quantizers (default: enabled)")
    g.add_argument("--optm-max-bits", dest="quant.optm.max_bits", type=int, default=None, metavar="B",
                   help=f"use OPT-m only on operands with at most this many bits (default: {o.max_bits})")
    g.add_argument("--optm-any-m", dest="quant.optm.lattice", action="store_const", const=False, default=None,
                   help="also search ratios 2^m too wide for one uint8 lattice, emitted as two integer matmuls "
                        "(default: only ratios that run as one integer matmul)")
    g.add_argument("--optm-select", dest="quant.optm.select", choices=[x.value for x in OptmSelect], default=None,
                   help=f"keep a twin quantizer where it measurably improves the network's logits on calibration "
                        f"data (network) or where it lowers its layer's output error (layer) (default: {o.select.value})")
    g.add_argument("--weight-container", dest="quant.emission.weight_container",
                   choices=[x.value for x in WeightContainer], default=None,
                   help=f"weight codes in the model: auto = int8 where every code is within +-64, else uint8 + 128, "
                        f"exact on every CPU; int8 = int8 everywhere (fastest on VNNI/ARM CPUs, saturates on x86 AVX2 "
                        f"without VNNI) (default: {q.emission.weight_container.value})")
    g.add_argument("--weight-storage", dest="quant.emission.weight_storage", choices=[x.value for x in WeightStorage],
                   default=None,
                   help=f"weight codes in the file: auto = int4, two codes a byte, for weights of <= 4 bits where the "
                        f"model is at opset >= 21, else int8; int4 = also convert an older model to opset 21 (recorded "
                        f"in the plan); int8 = one code a byte, any opset (default: {q.emission.weight_storage.value})")
    g.add_argument("--graph-form", dest="quant.emission.graph_form", choices=[x.value for x in GraphForm], default=None,
                   help=f"names of the added Q/DQ nodes and tensors: compact = short (a12/Q), shared scalar "
                        f"constants, no value_info (a smaller file); verbose = spelled out from the quantized tensor, "
                        f"typed; the same quantized values (default: {q.emission.graph_form.value})")
    g.add_argument("--constant-storage", dest="quant.emission.constant_storage",
                   choices=[x.value for x in ConstantStorage], default=None,
                   help=f"biases, embeddings, LayerNorm and smoothing vectors in the file: float16 = rounded to "
                        f"float16 values before calibration (the plan is made for them) and stored float16 + Cast, "
                        f"a smaller file; float32 = the model's own values; fixed by the plan "
                        f"(default: {q.emission.constant_storage.value})")
    c = q.compensate
    g = s.add_argument_group("error compensation (each part kept per layer only where it lowers the layer's output error)")
    on_off = lambda v: "on" if v else "off"  # noqa: E731
    for dest, flag, what in (("gptq", "gptq", "GPTQ-style weight rounding with the input Gram matrix"),
                             ("activation", "act-compensation", "ridge-fit each weight to map the quantized input to "
                                                                "the float output, then GPTQ-round it"),
                             ("bias", "bias-correction", "fold each layer's mean output error into its bias")):
        on = getattr(c, dest)  # the flag turns the part away from its default
        g.add_argument(f"--{'no-' if on else ''}{flag}", dest=f"quant.compensate.{dest}", action="store_const",
                       const=not on, default=None, help=f"{'disable' if on else 'enable'} {what} (default: {on_off(on)})")
    g.add_argument("--compensate-inputs", dest="quant.compensate.inputs", choices=[x.value for x in CompensateInputs],
                   default=None, help=f"the inputs activation compensation and bias correction fit on: float = each "
                                      f"layer's float input, quantized; network = the quantized network's, in one "
                                      f"capture; sequential = layer by layer from the network quantized and "
                                      f"compensated upstream; blocks = the same, block by block "
                                      f"(default: {c.inputs.value})")
    g.add_argument("--gptq-damp", dest="quant.compensate.damp", type=float, default=None, metavar="F",
                   help=f"GPTQ damping, relative to the mean diagonal of X^T X (default: {c.damp})")
    g.add_argument("--ridge", dest="quant.compensate.ridge", type=float, default=None, metavar="F",
                   help=f"activation compensation's ridge penalty, relative to the mean diagonal of Q(X)^T Q(X) "
                        f"(default: {c.ridge})")
    g = s.add_argument_group("SQ-b smoothing")
    g.add_argument("--no-sqb", dest="smooth.enabled", action="store_const", const=False, default=None,
                   help="disable SQ-b smoothing (default: enabled)")
    _add_smoothing(g)
    g = s.add_argument_group("mixed precision")
    g.add_argument("--mixed-precision", dest="mixed.enabled", action="store_const", const=True, default=None,
                   help="per-layer bit allocation under a budget, needs --target-bits or --target-size (default: off)")
    g.add_argument("--target-bits", dest="mixed.target_bits", type=float, default=None, metavar="B",
                   help="average weight and activation bits at most B; implies --mixed-precision (default: none)")
    g.add_argument("--target-size", dest="mixed.target_size_mb", type=float, default=None, metavar="MB",
                   help="packed model size at most MB (10^6 bytes); implies --mixed-precision (default: none)")
    g.add_argument("--candidates", dest="mixed.candidates", default=None, metavar="B,B,...",
                   help=f"candidate bit-widths (default: {','.join(str(c) for c in m.candidates)})")
    g.add_argument("--keep", dest="mixed.keep", action="append", default=None, metavar="BITS:GLOB",
                   help="pin the layers whose name or role matches GLOB to BITS bits, e.g. 8:*head*; repeatable (default: none)")
    s.add_argument("--eval-split", default=None, metavar="fold:I/K|rest:I/K",
                   help="slice of --eval, e.g. rest:0/10 beside --calib DIR --split fold:0/10 (default: all)")
    _add_config_file(s)
    _add_runtime(s)
    s.set_defaults(func=cmd_quantize)

    s = command("demo", "run the whole pipeline on the embedded digits ViT and print FP32 vs quantized")
    s.add_argument("--out-dir", default=None, help="keep the produced models here (default: a temporary folder)")
    s.add_argument("--seed", dest="seed", type=int, default=None, metavar="N", help=f"random seed (default: {D.seed})")
    _add_runtime(s)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
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
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError):
            pass
        return 0


def _entry() -> None:  # pragma: no cover - console script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
