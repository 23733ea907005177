"""Smoke test of the benchmark scripts (tools/bench_quant.py, tools/bench_ablation.py) on the
embedded demo model, with tiny limits: every script runs end to end and prints its table rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT / "tools"))

pytest.importorskip("onnxruntime.quantization")

DIGITS = f"digits={MODELS / 'digits_vit.onnx'}:{MODELS / 'digits_calib.npz'}:{MODELS / 'digits_eval.npz'}"


def _table_lines(out: str, model: str) -> list[list[str]]:
    """Markdown table rows of ``model``, split into cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {model} ")]


@pytest.mark.slow
def test_bench_quant_smoke(capsys):
    import bench_quant

    rc = bench_quant.main(["--custom", DIGITS, "--models", "digits", "--limit-calib", "16", "--limit-eval", "48",
                           "--rows", "fp32,mptq-w4a4,ort-minmax-w8a8", "--markdown", "--blas-threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = _table_lines(out, "digits")
    assert [r[1] for r in rows] == ["fp32", "mptq-w4a4", "ort-minmax-w8a8"], out
    for r in rows:
        assert not r[3].startswith("FAILED"), out
        assert 0.0 <= float(r[3]) <= 100.0  # top-1
    assert float(rows[1][4]) > 50.0  # W4A4 agreement with FP32 on the demo model
    assert float(rows[1][7]) > 0  # peak RSS of the quantization process
    assert "calibration 16 samples, evaluation 48 samples" in out


@pytest.mark.slow
def test_bench_ablation_smoke(capsys):
    import bench_ablation

    rc = bench_ablation.main(["--custom", DIGITS, "--sqb-models", "digits", "--optm-models", "digits", "--bits", "4",
                              "--limit-calib", "16", "--limit-eval", "48", "--latency-rounds", "1", "--markdown", "--blas-threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = _table_lines(out, "digits")
    sqb = [r[2] for r in rows if r[2].startswith(("off", "on,"))]
    assert sqb == ["off", "on, shift = mean", "on, shift = midpoint"], out
    variants = ["uniform", "hand-set twin", "OPT-m per layer", "OPT-m", "OPT-m, any m"]
    optm = [r for r in rows if len(r) == 8 and r[2] in variants and "/" in r[3]]
    assert [r[2] for r in optm] == variants, out
    assert optm[0][3].startswith("0/") and int(optm[1][3].split("/")[0]) > 0  # twin counts
    timed = variants + ["hand-set twin (split form)", "OPT-m per layer (split form)"]
    lat = [r for r in rows if len(r) == 8 and r[2] in timed and "/" not in r[3]]
    assert [r[2] for r in lat] == timed, out
    assert "OPT-m vs uniform:" in out
