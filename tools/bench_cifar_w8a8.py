"""cifar10-vit at W8A8: agreement/SQNR of a few pipeline settings on the 9,000-image eval split.

    python tools/bench_cifar_w8a8.py default sym nosqb midpoint midpoint_nooptm alpha0.3 alpha0.7
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_mptq  # noqa: E402
from onnx_mptq.config import Config, OptmConfig, QuantConfig, ShiftMode, SmoothConfig  # noqa: E402
from onnx_mptq.data import input_specs, open_data  # noqa: E402
from onnx_mptq.graph.io import load_model  # noqa: E402
from shared_data import CIFAR_MODEL, splits  # noqa: E402

OPTM8 = QuantConfig(optm=OptmConfig(max_bits=8))  # OPT-m at 8 bits, as these runs were made
CONFIGS = {
    "default": Config(quant=OPTM8),
    "sym": Config(quant=QuantConfig(optm=OptmConfig(max_bits=8), act_symmetric=True)),
    "nosqb": Config(quant=OPTM8, smooth=SmoothConfig(enabled=False)),
    "midpoint": Config(quant=OPTM8, smooth=SmoothConfig(shift=ShiftMode.MIDPOINT)),
    "midpoint_nooptm": Config(quant=QuantConfig(optm=OptmConfig(enabled=False)), smooth=SmoothConfig(shift=ShiftMode.MIDPOINT)),
    "alpha0.3": Config(quant=OPTM8, smooth=SmoothConfig(shift=ShiftMode.MIDPOINT, alpha=0.3)),
    "alpha0.7": Config(quant=OPTM8, smooth=SmoothConfig(shift=ShiftMode.MIDPOINT, alpha=0.7)),
}


def main(names: list[str]) -> None:
    model = load_model(CIFAR_MODEL)
    calib, ev = splits("cifar10")
    with tempfile.TemporaryDirectory() as d:
        cpath, epath = Path(d) / "calib.npz", Path(d) / "eval.npz"
        np.savez(cpath, **calib)
        np.savez(epath, **ev)
        eval_ds = open_data(epath, input_specs(model), batch_size=64)
        for name in names or list(CONFIGS):
            t = time.time()
            r = onnx_mptq.quantize(model, cpath, CONFIGS[name], eval_data=eval_ds, progress=False)
            v = r.validation
            print(f"{name:<18} agree {v.top1_agreement:6.2f} %  top1 {v.top1:6.2f} %  SQNR {v.sqnr_db:5.1f} dB  ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
