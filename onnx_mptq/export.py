"""Export timm vision transformers (ViT, DeiT, Swin) to ONNX and check the export against torch.

The flow of :func:`export_timm` is::

    timm.create_model -> load checkpoint (optional) -> torch.onnx.export into a temp dir
      -> load_model (preflight) -> un-share deduplicated initializers
      -> ORT vs torch on seeded random inputs -> save_model (atomic, one self-contained file)

Conventions of the exported graph
---------------------------------
* one input ``input`` of shape ``[N, C, H, W]`` and one output ``logits`` of shape ``[N, classes]``
  (``logits_0``, ``logits_1``, ... if a model returns several tensors); the batch axis is dynamic
  and named ``N`` on the input and every output;
* opset 17 (default) keeps ``LayerNormalization`` as one op; opset 14 gives the decomposed form
  (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) that older exporters produce;
* attention is exported in its explicit form ``Softmax((q * scale) @ k^T) @ v``: timm's fused
  ``scaled_dot_product_attention`` is switched off on the model's own attention modules (their
  ``fused_attn`` attribute) because its export computes the scale from runtime shapes;
* both torch exporters deduplicate initializers holding equal values (e.g. every LayerNorm bias
  of a freshly initialised model is zero), which would make unrelated layers *share* one tensor.
  The export un-shares them: every consumer of a float initializer gets its own copy (named after
  the parameter where the TorchScript exporter kept the name in an ``Identity``). This is exact
  and lets later passes treat every layer's weights as its own.

Numerical check: ``check_samples`` batches of 2 standard-normal images (from
``np.random.default_rng(seed)``) go through torch and through ONNX Runtime (the session made by
:func:`onnx_mptq.calibrate.session.make_session`). ``max_abs_diff`` is the largest absolute
difference over all outputs and samples; the export fails when
``max_abs_diff > tol * max(1, max |torch output|)``, i.e. ``tol`` is absolute for outputs of
magnitude up to 1 and relative to the largest output magnitude above that.

torch, timm and safetensors are imported lazily (the ``export`` extra), so importing this module
does not need them.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnx

from .calibrate.session import make_session
from .config import RuntimeConfig
from .errors import ExportError, MptqError
from .graph.io import load_model, opset_of, save_model

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

INPUT_NAME = "input"
BATCH_AXIS = "N"
_EXAMPLE_BATCH = 3  # trace with a batch different from the check batch to prove the axis is dynamic
_CHECK_BATCH = 2
_FIRST_FEW = 5


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_timm` / :func:`export_model` wrote and how well it matched torch."""

    path: Path
    name: str
    opset: int
    input_name: str
    output_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample; the batch axis "N" is dynamic
    max_abs_diff: float | None  # None when check_samples == 0
    provider: str | None  # ORT provider used by the check; None when check_samples == 0
    exporter: str  # "torchscript" or "dynamo"


# --------------------------------------------------------------------------------------------
# tiny random-weight models for tests


TINY_KINDS = ("vit", "deit", "deit_distilled", "swin")


class TinyModelSpec(NamedTuple):
    """A tiny timm configuration: ``export_timm(spec.name, out, img_size=spec.img_size,
    model_kwargs=spec.kwargs)`` exports it."""

    name: str
    kwargs: dict[str, Any]
    img_size: int


def tiny_model_kwargs(kind: str) -> TinyModelSpec:
    """timm name, constructor kwargs and image size of a tiny model of ``kind`` (see TINY_KINDS).

    ViT/DeiT: 32x32 images, patch 8 (16 tokens + class/distillation tokens), 2 blocks of width 64.
    Swin: 64x64 images, patch 4 -> 16x16 tokens, window 4 (shifted windows in both stages),
    depths (2, 2), heads (2, 4), width 32 -> 64. All have 10 classes.
    """
    vit_like = {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 10}
    if kind == "vit":
        return TinyModelSpec("vit_tiny_patch16_224", dict(vit_like), 32)
    if kind == "deit":
        return TinyModelSpec("deit_tiny_patch16_224", dict(vit_like), 32)
    if kind == "deit_distilled":
        return TinyModelSpec("deit_tiny_distilled_patch16_224", dict(vit_like), 32)
    if kind == "swin":
        kwargs = {"patch_size": 4, "window_size": 4, "depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32, "num_classes": 10}
        return TinyModelSpec("swin_tiny_patch4_window7_224", kwargs, 64)
    raise ExportError(f"unknown tiny model kind {kind!r} (known: {', '.join(TINY_KINDS)})")


def build_tiny_timm(kind: str, *, seed: int = 0, perturb: bool = True) -> "torch.nn.Module":
    """A tiny random-weight timm model of ``kind`` in eval mode, the same for the same ``seed``.

    With ``perturb`` (default) the parameters timm initialises to constants are drawn at random so
    tests see realistic structure: LayerNorm ``gamma = exp(0.5 z)`` (per-channel spread of a few x),
    ``beta = 0.1 z``, Linear biases ``0.05 z``, class/distillation tokens ``0.5 z``
    (z ~ N(0, 1) from a generator seeded with ``seed``). torch's global RNG is left untouched.
    """
    torch, timm = _import_torch_timm()
    spec = tiny_model_kwargs(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(spec.name, pretrained=False, img_size=spec.img_size, **spec.kwargs)
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, mod in sorted(model.named_modules(), key=lambda kv: kv[0]):
                if isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
                    mod.weight.copy_(torch.exp(0.5 * torch.randn(mod.weight.shape, generator=gen)))
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
                elif isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                    mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=gen))
            for p_name in ("cls_token", "dist_token"):
                p = getattr(model, p_name, None)
                if isinstance(p, torch.nn.Parameter):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


# --------------------------------------------------------------------------------------------
# public entry points


def export_timm(
    name: str,
    out: Path,
    *,
    checkpoint: Path | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    num_classes: int | None = None,
    opset: int = 17,
    dynamo: bool = False,
    runtime: RuntimeConfig = RuntimeConfig(),
    check_samples: int = 3,
    tol: float = 1e-3,
    model_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> ExportResult:
    """Create the timm model ``name``, load weights, export it to ``out`` and check it in ORT.

    Weights: ``checkpoint`` (a ``.safetensors`` file, or anything ``torch.load`` reads with
    ``weights_only=True``, optionally wrapping the state dict in a ``state_dict``/``model`` key),
    or ``pretrained`` (timm's download; fails with ExportError without network), or neither
    (random init, seeded with ``seed``: the same weights in every process; torch's global RNG is
    left as it was). ``img_size``, ``num_classes`` and ``model_kwargs`` go to ``timm.create_model``.
    """
    if checkpoint is not None and pretrained:
        raise ExportError("pass either a checkpoint or pretrained, not both")
    torch, timm = _import_torch_timm()
    _check_model_name(timm, name)
    kwargs = dict(model_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    # random init (and whatever a checkpoint leaves unset) from torch's RNG seeded with ``seed``,
    # so the same call gives the same weights in every process; the caller's RNG state is restored
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(timm, name, pretrained=pretrained, kwargs=kwargs)
    if checkpoint is not None:
        _load_checkpoint(torch, model, Path(checkpoint), name)
    model.eval()
    return export_model(
        model,
        out,
        name=name,
        input_shape=_input_shape(model, img_size),
        opset=opset,
        dynamo=dynamo,
        runtime=runtime,
        check_samples=check_samples,
        tol=tol,
        seed=seed,
    )


def export_model(
    model: "torch.nn.Module",
    out: Path,
    *,
    name: str,
    input_shape: tuple[int, int, int],
    opset: int = 17,
    dynamo: bool = False,
    runtime: RuntimeConfig = RuntimeConfig(),
    check_samples: int = 3,
    tol: float = 1e-3,
    seed: int = 0,
) -> ExportResult:
    """Export an image classifier (``[N, C, H, W] -> logits``) already built in torch; see the
    module docstring for the graph conventions and the check. ``model`` is put in eval mode and
    its timm attention modules are switched to the explicit (non-fused) form."""
    torch, _ = _import_torch_timm()
    if not (isinstance(opset, int) and 13 <= opset <= 20):
        raise ExportError(f"opset must be an integer from 13 to 20, got {opset!r}")
    if not (isinstance(check_samples, int) and check_samples >= 0):
        raise ExportError(f"check_samples must be an integer >= 0, got {check_samples!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ExportError(f"tol must be > 0, got {tol!r}")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ExportError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    model.eval()
    _use_explicit_attention(model)

    rng = np.random.default_rng(seed)
    example = rng.standard_normal((_EXAMPLE_BATCH, *shape), dtype=np.float32)
    with torch.no_grad():
        probe = model(torch.from_numpy(example))
    n_out = 1 if isinstance(probe, torch.Tensor) else len(probe)
    output_names = ("logits",) if n_out == 1 else tuple(f"logits_{i}" for i in range(n_out))

    with tempfile.TemporaryDirectory(prefix="onnx-mptq-export-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        _torch_export(torch, model, example, tmp_path, opset=opset, dynamo=dynamo, output_names=output_names)
        try:
            proto = load_model(tmp_path)
        except MptqError as e:
            raise ExportError(f"{name}: the exported graph does not load: {e}") from None
    got = opset_of(proto)
    if got != opset:
        raise ExportError(
            f"{name}: the {'dynamo' if dynamo else 'TorchScript'} exporter produced opset {got}, not the "
            f"requested {opset}" + (" (its version converter failed); use dynamo=False or opset 18" if dynamo else "")
        )
    _name_batch_axis(proto, name)
    unshared = _unshare_initializers(proto)
    if unshared:
        log.debug("%s: un-shared %d deduplicated initializer uses", name, unshared)

    max_diff: float | None = None
    provider: str | None = None
    if check_samples:
        max_diff, provider = _check_against_torch(torch, model, proto, shape, name, runtime, check_samples, tol, rng)
    path = save_model(proto, Path(out))
    result = ExportResult(
        path=path,
        name=name,
        opset=opset,
        input_name=INPUT_NAME,
        output_names=output_names,
        input_shape=shape,  # type: ignore[arg-type]
        max_abs_diff=max_diff,
        provider=provider,
        exporter="dynamo" if dynamo else "torchscript",
    )
    log.debug("exported %s to %s (opset %d, max |ORT - torch| = %s)", name, path, opset, max_diff)  # the CLI prints it
    return result


# --------------------------------------------------------------------------------------------
# helpers


def _import_torch_timm() -> tuple[Any, Any]:
    try:
        import timm
        import torch
    except ImportError as e:
        raise ExportError(f"export needs torch and timm ({e}): pip install 'onnx-mptq[export]'") from None
    return torch, timm


def _check_model_name(timm: Any, name: str) -> None:
    if timm.is_model(name):
        return
    base = name.split(".", 1)[0]
    all_names = timm.list_models()
    close = list(timm.list_models(f"*{base}*"))[:_FIRST_FEW]
    close += [n for n in difflib.get_close_matches(base, all_names, n=_FIRST_FEW, cutoff=0.6) if n not in close]
    hint = f"; close matches: {', '.join(close[:_FIRST_FEW])}" if close else "; see timm.list_models()"
    raise ExportError(f"unknown timm model {name!r}{hint}")


_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "urllib", "huggingface_hub", "socket", "ssl")


def _is_network_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return isinstance(e, OSError) or mod.split(".", 1)[0] in _NETWORK_MODULES


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__


def _create(timm: Any, name: str, *, pretrained: bool, kwargs: dict[str, Any]) -> Any:
    if pretrained:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise ExportError(f"timm has no pretrained weights for {name}: pass --checkpoint FILE")
    try:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:  # a model without an img_size argument (e.g. PVT v2) takes any size
            if "img_size" not in kwargs or "img_size" not in str(e):
                raise
            log.info("%s takes no img_size argument; exporting it at %s x %s", name, kwargs["img_size"], kwargs["img_size"])
            rest = {k: v for k, v in kwargs.items() if k != "img_size"}
            return timm.create_model(name, pretrained=pretrained, **rest)
    except Exception as e:  # timm raises many types; network and hub errors more
        if pretrained and _is_network_error(e):
            log.debug("pretrained download of %s failed: %s", name, _first_line(e, 500))
            raise ExportError(
                f"cannot download pretrained weights for {name} (no network?): pass --checkpoint FILE ({type(e).__name__})"
            ) from None
        extra = f" with {kwargs}" if kwargs else ""
        raise ExportError(f"cannot create {name}{extra}{' (pretrained)' if pretrained else ''}: {_first_line(e, 200)}") from None


def _read_state_dict(torch: Any, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and format errors
        raise ExportError(f"checkpoint {path}: cannot read it ({_first_line(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"checkpoint {path}: expected a state dict of tensors (optionally under 'state_dict' or 'model')")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _mismatch(model: Any, sd: Mapping[str, Any]) -> str | None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({', '.join(missing[:_FIRST_FEW])}{', ...' if len(missing) > _FIRST_FEW else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:_FIRST_FEW])}{', ...' if len(unexpected) > _FIRST_FEW else ''})")
    if bad_shape:
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in bad_shape[:_FIRST_FEW]]
        parts.append(f"{len(bad_shape)} shape mismatches (checkpoint vs model: {', '.join(shapes)})")
    return "; ".join(parts) or None


def _load_checkpoint(torch: Any, model: Any, path: Path, name: str) -> None:
    """Load ``path`` strictly; checkpoints in a model's original layout go through timm's own
    ``checkpoint_filter_fn`` for that architecture when the plain load does not fit."""
    sd = _read_state_dict(torch, path)
    problem = _mismatch(model, sd)
    if problem is not None:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                filtered = filter_fn(dict(sd), model)
            except Exception:  # the filter does not understand this layout either
                filtered = None
            if filtered is not None and _mismatch(model, filtered) is None:
                log.info("checkpoint %s: converted from the original layout by timm's filter", path)
                sd, problem = filtered, None
    if problem is not None:
        raise ExportError(f"checkpoint {path} does not fit {name}: {problem}")
    model.load_state_dict(sd, strict=True)


def _input_shape(model: Any, img_size: int | None) -> tuple[int, int, int]:
    """(C, H, W): C from the first convolution (the patch embedding, or a hybrid's stem), the size
    from ``img_size``, the patch embedding, or the pretrained config."""
    torch, _ = _import_torch_timm()
    pe = getattr(model, "patch_embed", None)
    cfg_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    chans = int(getattr(first_conv, "in_channels", cfg_size[0]))
    if img_size is not None:
        return chans, int(img_size), int(img_size)
    hw = getattr(pe, "img_size", None)
    if hw is not None:
        hw = (hw, hw) if isinstance(hw, int) else tuple(hw)
        return chans, int(hw[0]), int(hw[1])
    return chans, int(cfg_size[1]), int(cfg_size[2])


def _use_explicit_attention(model: Any) -> None:
    for mod in model.modules():
        if isinstance(getattr(mod, "fused_attn", None), bool):
            mod.fused_attn = False


def _torch_export(torch: Any, model: Any, example: np.ndarray, path: Path, *, opset: int, dynamo: bool, output_names: tuple[str, ...]) -> None:
    x = torch.from_numpy(example)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            common = dict(input_names=[INPUT_NAME], output_names=list(output_names), opset_version=opset, dynamo=dynamo)
            if dynamo:
                batch = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
                torch.onnx.export(model, (x,), str(path), dynamic_shapes=({0: batch},), verbose=False, **common)
            else:
                axes = {n: {0: BATCH_AXIS} for n in (INPUT_NAME, *output_names)}
                torch.onnx.export(model, (x,), str(path), dynamic_axes=axes, do_constant_folding=True, **common)
        except Exception as e:
            raise ExportError(f"torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'}) failed: {_first_line(e, 300)}") from None
    for w in caught:
        log.debug("exporter warning: %s", str(w.message).splitlines()[0] if str(w.message) else w.category.__name__)


def _name_batch_axis(model: onnx.ModelProto, name: str) -> None:
    """Make the batch axis of the graph input and outputs symbolic and called N."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            continue
        if dims[0].HasField("dim_value") and not dims[0].dim_param:
            raise ExportError(f"{name}: the exporter fixed the batch axis of {vi.name!r} to {dims[0].dim_value}")
        dims[0].dim_param = BATCH_AXIS


def _unshare_initializers(model: onnx.ModelProto) -> int:
    """Undo the exporters' deduplication of equal-valued initializers (see the module docstring).

    1. ``Identity(initializer)`` nodes become initializers named after their output;
    2. a float initializer with more than one element used by several node inputs gets a copy per
       further use (``NAME__1``, ``NAME__2``, ...; the first use, in node order, keeps the name).
    Returns how many uses were un-shared. Mutates ``model`` (the freshly exported proto)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    changed = 0
    kept_nodes = []
    new_inits: list[onnx.TensorProto] = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in graph_outputs:
            new_inits.append(_renamed_copy(inits[node.input[0]], node.output[0]))
            changed += 1
        else:
            kept_nodes.append(node)
    if new_inits:
        del g.node[:]
        g.node.extend(kept_nodes)
        g.initializer.extend(new_inits)
        inits.update({t.name: t for t in new_inits})

    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    taken = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    uses: dict[str, int] = {}
    for node in g.node:
        for i, inp in enumerate(node.input):
            t = inits.get(inp)
            if t is None or t.data_type not in float_types or math.prod(t.dims) <= 1:
                continue
            k = uses.get(inp, 0)
            uses[inp] = k + 1
            if k == 0:
                continue
            new_name = f"{inp}__{k}"
            while new_name in taken:
                new_name += "_"
            g.initializer.append(_renamed_copy(t, new_name))
            taken.add(new_name)
            node.input[i] = new_name
            changed += 1
    return changed


def _renamed_copy(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(t)
    copy.name = name
    return copy


def _check_against_torch(
    torch: Any,
    model: Any,
    proto: onnx.ModelProto,
    shape: tuple[int, ...],
    name: str,
    runtime: RuntimeConfig,
    samples: int,
    tol: float,
    rng: np.random.Generator,
) -> tuple[float, str]:
    session = make_session(proto, runtime, optimize=True)
    worst = 0.0
    for k in range(samples):
        x = rng.standard_normal((_CHECK_BATCH, *shape), dtype=np.float32)  # (2, C, H, W)
        with torch.no_grad():
            ref = model(torch.from_numpy(x))
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = session.run({INPUT_NAME: x})
        if len(got) != len(refs):
            raise ExportError(f"{name}: ORT returned {len(got)} outputs, torch {len(refs)}")
        for r, o in zip(refs, got):
            r_np = r.detach().numpy()
            if r_np.shape != o.shape:
                raise ExportError(f"{name}: ORT output shape {o.shape} differs from torch {r_np.shape}")
            if not np.all(np.isfinite(o)):
                raise ExportError(f"{name}: ORT produced non-finite outputs on check sample {k}")
            diff = float(np.max(np.abs(o.astype(np.float64) - r_np.astype(np.float64))))
            scale = max(1.0, float(np.max(np.abs(r_np))))
            worst = max(worst, diff)
            if diff > tol * scale:
                raise ExportError(
                    f"{name}: ONNX Runtime ({session.provider}) differs from torch by {diff:.3g} on check sample {k} "
                    f"(allowed {tol:g} x max(1, |output|) = {tol * scale:.3g})"
                )
    return worst, session.provider
