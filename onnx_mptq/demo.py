"""The embedded demo: the whole pipeline on a small ViT trained on scikit-learn's 8x8 digits.

``run_demo`` quantizes ``models/digits_vit.onnx`` at W8A8, W6A6, W4A4 and mixed precision at an
average of 5 bits, evaluates each against the FP32 model on the held-out split and returns the
table ``onnx-mptq demo`` prints. It only calls the public pipeline (:mod:`onnx_mptq.pipeline`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError, DataError
from .graph.io import load_model, save_model
from .pipeline import quantize, resolve_progress


@dataclasses.dataclass(frozen=True)
class DemoSetting:
    label: str  # the row's name; its first word is what ``only`` selects
    w_bits: int
    a_bits: int
    mixed: bool  # mixed precision at an average of 5 bits

    @property
    def key(self) -> str:
        return self.label.split()[0]


SETTINGS = (DemoSetting("W8A8", 8, 8, False), DemoSetting("W6A6", 6, 6, False), DemoSetting("W4A4", 4, 4, False),
            DemoSetting("MP5 (W/A)", 8, 8, True))
MP_TARGET_BITS = 5.0


def demo_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models"


def run_demo(config: Config, out_dir: Path | None = None, only: Iterable[str] | None = None, *,
             progress: bool | None = None) -> str:
    """Whole pipeline on the embedded digits ViT: FP32 against quantized settings, as a table.

    ``only`` keeps the named rows (``W8A8``, ``W6A6``, ``W4A4``, ``MP5``); default all."""
    from .data import input_specs, open_data
    from .validate import evaluate

    show = resolve_progress(progress)
    root = demo_dir()
    model_path = root / "digits_vit.onnx"
    if not model_path.exists():
        raise DataError(f"{model_path}: the embedded demo model is missing (run tools/train_demo_model.py)")
    source = load_model(model_path)
    specs = input_specs(source)
    calib = open_data(root / "digits_calib.npz", specs, batch_size=config.calib.batch_size)
    evald = open_data(root / "digits_eval.npz", specs, batch_size=config.runtime.batch_size)
    settings = [s for s in SETTINGS if not s.mixed or _mixed_available()]
    if only is not None:
        wanted = set(only)
        unknown = sorted(wanted - {s.key for s in settings})
        if unknown:
            raise ConfigError(f"demo: unknown setting(s) {', '.join(unknown)} (known: {', '.join(s.key for s in settings)})")
        settings = [s for s in settings if s.key in wanted]
    rows = []
    fp = evaluate(source, evald, config.runtime, reference=None, latency_batch_size=config.runtime.batch_size, progress=False)
    rows.append(("FP32", fp.to_dict(), "-", "-"))
    tmp = None
    keep_dir = out_dir
    if keep_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="onnx-mptq-demo-")
        keep_dir = Path(tmp.name)
    try:
        for s in settings:
            qcfg = dataclasses.replace(config.quant, w_bits=s.w_bits, a_bits=s.a_bits)
            mcfg = dataclasses.replace(config.mixed, enabled=True, target_bits=MP_TARGET_BITS) if s.mixed else config.mixed
            res = quantize(source, calib, dataclasses.replace(config, quant=qcfg, mixed=mcfg), progress=show)
            save_model(res.model, keep_dir / f"digits_vit_{s.key.lower()}.onnx")
            rep = evaluate(res.model, evald, config.runtime, reference=source, latency_batch_size=config.runtime.batch_size,
                           progress=False)
            rows.append((s.label, rep.to_dict(), f"{res.plan.avg_weight_bits:.2f}", f"{res.plan.avg_activation_bits:.2f}"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return demo_table(rows, fp.to_dict().get("provider"), out_dir)


def _mixed_available() -> bool:
    try:
        from .search import mixed  # noqa: F401
    except ImportError:
        return False
    return True


def demo_table(rows: list, provider: str | None, out_dir: Path | None) -> str:
    def f(v: Any, nd: int = 2) -> str:
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    head = f"{'model':<10} {'w bits':>6} {'a bits':>6} {'top-1 %':>8} {'agree %':>8} {'SQNR dB':>8} {'KL':>8} {'ms/img b1':>9} {'ms b32':>8}"
    lines = ["onnx-mptq demo: a small ViT trained on scikit-learn's 8x8 digits (models/), evaluated on its held-out split", head, "-" * len(head)]
    for label, d, wb, ab in rows:
        lines.append(
            f"{label:<10} {wb:>6} {ab:>6} {f(d.get('top1')):>8} {f(d.get('top1_agreement')):>8} {f(d.get('sqnr_db'), 1):>8} "
            f"{f(d.get('kl'), 4):>8} {f(d.get('latency_ms_b1'), 3):>9} {f(d.get('latency_ms_batch'), 2):>8}"
        )
    lines.append(f"provider: {provider}" + (f"; models kept in {out_dir}" if out_dir else ""))
    return "\n".join(lines)
