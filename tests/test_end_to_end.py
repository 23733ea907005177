"""The one end-to-end CLI test on a real model in the default run: ../shared/data/mnist-vit (a
trained ViT) on real MNIST test images, through ``quantize`` (SQ-b and OPT-m on by default), plan
re-emission and ``evaluate --reference`` on held-out images. The slower real-model and demo-model
tests (tests marked ``slow``) cover more settings."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from onnx_mptq.cli import main
from onnx_mptq.plan import QuantPlan

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-vit"
MODEL = MNIST / "vit_mnist_fp32.onnx"


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """(10000, 1, 28, 28) float32 with the README's normalisation, (10000,) int64."""
    x = np.frombuffer(gzip.open(MNIST / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    y = np.frombuffer(gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8).astype(np.int64)
    return ((x / 255.0 - 0.1307) / 0.3081).astype(np.float32), y


@pytest.mark.shared
def test_cli_quantizes_the_real_mnist_vit(tmp_path, capsys):
    if not (MODEL.is_file() and (MNIST / "t10k-images-idx3-ubyte.gz").is_file()):
        pytest.skip("../shared/data/mnist-vit is missing")
    x, y = _mnist()
    calib, held = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, input=x[:32])  # calibration: test images 0..31; held out: 1000..1999
    np.savez(held, input=x[1000:2000], labels=y[1000:2000])
    q, plan = tmp_path / "q.onnx", tmp_path / "plan.json"
    cpu = ["--providers", "cpu"]
    assert main(["quantize", str(MODEL), "-o", str(q), "--calib", str(calib), "--w-bits", "4", "--a-bits", "4",
                 "--plan-out", str(plan), *cpu]) == 0
    assert f"quantized model written to {q}" in capsys.readouterr().out
    p = QuantPlan.from_json(plan.read_text())
    assert p.smoothing is not None and any(n.mode.value == "folded" for n in p.smoothing.norms)  # SQ-b by default
    assert any(n.startswith("optm-net:") for n in p.notes)  # OPT-m chose on the network by default
    assert p.avg_weight_bits == 4 and p.avg_activation_bits == 4

    again = tmp_path / "again.onnx"
    assert main(["quantize", str(MODEL), "-o", str(again), "--plan", str(plan), *cpu]) == 0
    assert again.read_bytes() == q.read_bytes()  # the plan alone gives the same model

    metrics = tmp_path / "m.json"
    assert main(["evaluate", str(q), "--data", str(held), "--reference", str(MODEL), "--json", str(metrics), *cpu]) == 0
    m = json.loads(metrics.read_text())
    # FP32 gets 97.0 % of these 1,000 images; W4A4 measured 96.0 % top-1, 98.2 % agreement
    assert m["num_samples"] == 1000 and m["top1"] >= 94.5 and m["top1_agreement"] >= 97.0, m
