"""The command line end to end, through ``onnx_mptq.cli.main([...])``: every command on tiny models.

Bad input through the CLI (exit 2, one line, nothing written) is in ``test_reliability.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import random_images, tiny_vit
from onnx import numpy_helper

from onnx_mptq import __version__, demo
from onnx_mptq.calibrate.session import make_session
from onnx_mptq.cli import build_parser, main
from onnx_mptq.config import Config, EmissionConfig, OptmConfig, Providers, QuantConfig, RuntimeConfig, ScaleSearchConfig
from onnx_mptq.errors import ConfigError
from onnx_mptq.graph.io import load_model

CPU = ["--providers", "cpu"]
CPU_RT = RuntimeConfig(providers=Providers.CPU)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A tiny ViT, labelled calibration/evaluation data, and an output folder."""
    model = tmp_path / "m.onnx"
    onnx.save(tiny_vit(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=random_images(16), labels=np.arange(16) % 5)
    evald = tmp_path / "eval.npz"
    np.savez(evald, input=random_images(24, seed=1), labels=np.arange(24) % 5)
    out = tmp_path / "out"
    out.mkdir()
    return {"model": model, "calib": calib, "eval": evald, "out": out}


def cli(capsys: pytest.CaptureFixture, *argv: str) -> str:
    rc = main(list(argv))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err
    return cap.out


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(path, CPU_RT).run({"input": x})[0]


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_text_and_json(files, capsys):
    out = cli(capsys, "inspect", str(files["model"]))
    assert "opset 17" in out and "quantizable units: 14" in out
    assert "fc1 2" in out and "head 1" in out and "SQ-b foldable" in out
    doc = json.loads(cli(capsys, "inspect", str(files["model"]), "--json"))
    roles = sorted(u["role"] for u in doc["units"])
    assert roles.count("qkv") == 2 and roles.count("attn_qk") == 2 and len(doc["layernorms"]) == 5


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_with_reference_and_json(files, capsys):
    report = files["out"] / "eval.json"
    out = cli(capsys, "evaluate", str(files["model"]), "--data", str(files["eval"]), "--reference", str(files["model"]),
              "--json", str(report), "--batch-size", "8", *CPU)
    assert "CPUExecutionProvider" in out
    doc = json.loads(report.read_text())
    assert doc["num_samples"] == 24 and 0.0 <= doc["top1"] <= 100.0
    assert doc["top1_agreement"] == 100.0 and doc["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert doc["provider"] == "CPUExecutionProvider"


def _labelled_folder(root: Path, n: int) -> Path:
    """A flat folder of n 8x8 RGB PNGs and a labels file ('filename,index')."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    (root.parent / "labels.csv").write_text("filename,label\n" + "".join(f"img{i:02d}.png,{i % 5}\n" for i in range(n)))
    return root.parent / "labels.csv"


def test_evaluate_labelled_folder_prints_the_reference_accuracy(files, capsys):
    labels = _labelled_folder(files["out"] / "imgs", 12)
    pre = ["--size", "8", "--mean", "0.5", "--std", "0.25"]
    report = files["out"] / "eval.json"
    out = cli(capsys, "-q", "evaluate", str(files["model"]), "--data", str(files["out"] / "imgs"), "--labels", str(labels),
              "--reference", str(files["model"]), "--split", "rest:0/3", "--json", str(report), *pre, *CPU)
    doc = json.loads(report.read_text())
    assert doc["num_samples"] == 8 and doc["top1"] is not None  # rest:0/3 of 12
    assert doc["reference_top1"] == doc["top1"]  # the reference is the model itself
    assert f"  reference_top1: {doc['reference_top1']:.4g}" in out
    # one folder, two disjoint slices: calibration and held-out evaluation
    q = files["out"] / "q.onnx"
    out = cli(capsys, "quantize", str(files["model"]), "-o", str(q), "--calib", str(files["out"] / "imgs"), "--split", "fold:0/3",
              "--eval", str(files["out"] / "imgs"), "--eval-split", "rest:0/3", "--labels", str(labels), *pre, *CPU)
    assert "validation vs FP32: top1 " in out and "FP32 reference on the same data: top1 " in out


def test_evaluate_reference_with_another_input_shape_names_it(files, capsys):
    from graphs import tiny_vit

    other = files["out"] / "ref16.onnx"
    onnx.save(tiny_vit(img=16), other)
    rc = main(["evaluate", str(files["model"]), "--data", str(files["eval"]), "--reference", str(other), *CPU])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"onnx-mptq: error: reference model {other}: input 'input' expects ?x3x16x16 but the data gives ")


def test_evaluate_limit(files, capsys):
    report = files["out"] / "eval.json"
    cli(capsys, "-q", "evaluate", str(files["model"]), "--data", str(files["eval"]), "--limit", "10", "--json", str(report), *CPU)
    assert json.loads(report.read_text())["num_samples"] == 10


# ---------------------------------------------------------------------------------------------
# smooth


def test_smooth_keeps_fp32_outputs(files, capsys):
    out_model = files["out"] / "s.onnx"
    report = files["out"] / "smooth.json"
    out = cli(capsys, "smooth", str(files["model"]), "-o", str(out_model), "--calib", str(files["calib"]), "--alpha", "0.6",
              "--report", str(report), *CPU)
    assert f"smoothed model written to {out_model}" in out and "5 folded" in out
    x = random_images(6, seed=9)
    np.testing.assert_allclose(_outputs(out_model, x), _outputs(files["model"], x), rtol=1e-4, atol=1e-4)
    doc = json.loads(report.read_text())
    assert doc["kind"] == "smooth_report" and len(doc["norms"]) == 5
    assert sorted(p.name for p in files["out"].iterdir()) == ["s.onnx", "smooth.json"]


# ---------------------------------------------------------------------------------------------
# quantize, plans, re-emission


def _quantize(files, capsys, *extra: str) -> tuple[Path, Path, str]:
    q, plan = files["out"] / "q.onnx", files["out"] / "plan.json"
    out = cli(capsys, "quantize", str(files["model"]), "-o", str(q), "--calib", str(files["calib"]), "--plan-out", str(plan),
              *extra, *CPU)
    return q, plan, out


def test_quantize_writes_model_and_plan(files, capsys):
    q, plan, out = _quantize(files, capsys, "--w-bits", "6", "--a-bits", "8", "--eval", str(files["eval"]))
    assert f"quantized model written to {q} (14 layers, avg weight bits 6.00" in out
    assert "validation vs FP32:" in out and "CPUExecutionProvider" in out
    doc = json.loads(plan.read_text())
    assert doc["kind"] == "quant_plan" and len(doc["layers"]) == 14
    assert {lp["weight"]["bits"] for lp in doc["layers"] if lp["weight"]} == {6}
    model = load_model(q)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
    x = random_images(8, seed=4)
    ref, got = _outputs(files["model"], x), _outputs(q, x)
    assert got.shape == ref.shape and np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95


def test_quantize_options_map_onto_the_plan(files, capsys):
    cfg = files["out"].parent / "cfg.json"
    cfg.write_text(json.dumps({"quant": {"w_bits": 5}, "smooth": {"enabled": False}}))
    _, plan, _ = _quantize(files, capsys, "--config", str(cfg), "--a-bits", "6", "--act-symmetric", "--no-optm",
                           "--scale-method", "minmax", "--limit", "8", "--calib-batch-size", "4", "--seed", "2")
    doc = json.loads(plan.read_text())
    assert doc["smoothing"] is None
    assert {lp["weight"]["bits"] for lp in doc["layers"] if lp["weight"]} == {5}  # from the file
    acts = [a for lp in doc["layers"] if lp["role"] != "patch_embed" for a in lp["inputs"]]  # the image stays 8-bit
    assert {a["bits"] for a in acts} == {6} and all(a["symmetric"] for a in acts)
    assert all(a["scheme"] == "uniform" for a in acts)


def test_plan_reemission_is_byte_identical(files, capsys):
    q, plan, _ = _quantize(files, capsys, "--w-bits", "4", "--a-bits", "4")
    again = files["out"] / "again.onnx"
    out = cli(capsys, "quantize", str(files["model"]), "-o", str(again), "--plan", str(plan), *CPU)
    assert f"re-emitted {again} from plan {plan}" in out
    assert again.read_bytes() == q.read_bytes()


def _weight_codes(model: onnx.ModelProto, unit: str) -> np.ndarray:
    """The signed weight codes of ``unit`` as the emitted DequantizeLinear reads them (int16;
    uint8 storage, zero point 128, is shifted back)."""
    node = next(n for n in model.graph.node if n.name == unit)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    for name in node.input:
        dq = producers.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int16)
            zero_point = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int16)
            assert np.all(zero_point == (128 if inits[dq.input[0]].data_type == onnx.TensorProto.UINT8 else 0))
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            return codes - np.expand_dims(zero_point, tuple(i for i in range(codes.ndim) if i != axis))
    raise AssertionError(f"no weight DequantizeLinear feeds {unit}")


def _weight_dtype(model: onnx.ModelProto, unit: str) -> type:
    node = next(n for n in model.graph.node if n.name == unit)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return next(inits[producers[x].input[0]].dtype.type for x in node.input
                if x in producers and producers[x].op_type == "DequantizeLinear" and producers[x].input[0] in inits)


def test_hand_edited_plan_changes_one_layer(files, capsys):
    q, plan, _ = _quantize(files, capsys)
    doc = json.loads(plan.read_text())
    target = next(lp for lp in doc["layers"] if lp["role"] == "fc1")
    target["weight"]["bits"] = 4
    target["weight"]["scales"] = [s * 127 / 7 for s in target["weight"]["scales"]]  # same range, 4-bit grid
    target["weight"]["step_bits"] = 4  # the scales are now made for 4 bits (else they are re-derived)
    edited = files["out"].parent / "edited.json"
    edited.write_text(json.dumps(doc, indent=1))
    q4 = files["out"] / "q4.onnx"
    cli(capsys, "quantize", str(files["model"]), "-o", str(q4), "--plan", str(edited), *CPU)

    before, after = load_model(q), load_model(q4)
    w8, w4 = _weight_codes(before, target["unit"]), _weight_codes(after, target["unit"])
    # 8-bit codes beyond +-64 are stored as uint8 + 128, 4-bit ones as int8 (emit_qdq weight_container)
    assert _weight_dtype(before, target["unit"]) == np.uint8 and _weight_dtype(after, target["unit"]) == np.int8
    assert np.abs(w8.astype(int)).max() > 7 and np.abs(w4.astype(int)).max() <= 7
    assert np.abs(w4.astype(int)).max() >= 6  # the rescaled range still uses the 4-bit grid
    for lp in doc["layers"]:  # every other layer is emitted exactly as before
        if lp["weight"] and lp["unit"] != target["unit"]:
            np.testing.assert_array_equal(_weight_codes(after, lp["unit"]), _weight_codes(before, lp["unit"]))
    x = random_images(4, seed=2)
    assert not np.array_equal(_outputs(q, x), _outputs(q4, x))


def test_weight_container_flag(files, capsys):
    q, plan, _ = _quantize(files, capsys)
    units = [lp["unit"] for lp in json.loads(plan.read_text())["layers"] if lp["weight"]]
    auto = load_model(q)
    assert {_weight_dtype(auto, u) for u in units} == {np.uint8}  # 8-bit codes reach +-127
    for container, want in (("int8", np.int8), ("uint8", np.uint8)):
        out = files["out"] / f"{container}.onnx"
        cli(capsys, "quantize", str(files["model"]), "-o", str(out), "--plan", str(plan), "--weight-container", container, *CPU)
        m = load_model(out)
        assert {_weight_dtype(m, u) for u in units} == {want}
        for u in units:  # the same grid in either container
            np.testing.assert_array_equal(_weight_codes(m, u), _weight_codes(auto, u))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m.onnx", "-o", "q.onnx", "--weight-container", "int4"])
    with pytest.raises(ConfigError, match="quant.emission.weight_container"):
        EmissionConfig(weight_container="int4")


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.slow
@pytest.mark.torch
def test_export_then_inspect_and_quantize(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    path = tmp_path / "test_vit.onnx"
    out = cli(capsys, "export", "test_vit", "-o", str(path), "--img-size", "32", "--num-classes", "10", *CPU)
    assert f"exported test_vit -> {path} (opset 17, input [3, 32, 32])" in out and "max abs diff" in out
    assert "patch_embed 1" in cli(capsys, "inspect", str(path))
    np.savez(tmp_path / "c.npz", x=random_images(8, img=32))
    q = tmp_path / "q.onnx"
    assert "quantized model written" in cli(capsys, "-q", "quantize", str(path), "-o", str(q), "--calib", str(tmp_path / "c.npz"), *CPU)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "q.onnx", "test_vit.onnx"]


# ---------------------------------------------------------------------------------------------
# demo


@pytest.mark.slow
def test_run_demo_single_setting():
    fast = QuantConfig(search=ScaleSearchConfig(grid_size=10), optm=OptmConfig(enabled=False))  # the plumbing, not the search, is under test here
    table = demo.run_demo(Config(runtime=CPU_RT, quant=fast), only=["W8A8"])
    lines = table.splitlines()
    fp32 = next(ln for ln in lines if ln.startswith("FP32"))
    w8 = next(ln for ln in lines if ln.startswith("W8A8"))
    assert not any(ln.startswith(("W4A4", "W6A6", "MP5")) for ln in lines)
    assert float(fp32.split()[3]) > 90.0 and float(w8.split()[3]) > 90.0  # top-1 % on held-out digits
    assert "provider: CPUExecutionProvider" in table
    with pytest.raises(ConfigError, match="unknown setting"):
        demo.run_demo(Config(runtime=CPU_RT), only=["W3A3"])


@pytest.mark.slow
def test_demo_command(tmp_path, capsys):
    out = cli(capsys, "demo", "--out-dir", str(tmp_path), *CPU)
    for label in ("FP32", "W8A8", "W6A6", "W4A4"):
        assert any(ln.startswith(label) for ln in out.splitlines()), label
    assert (tmp_path / "digits_vit_w8a8.onnx").is_file()


# ---------------------------------------------------------------------------------------------
# the parser itself


def test_version_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor
    assert set(sub) == {"export", "inspect", "evaluate", "smooth", "quantize", "demo"}


@pytest.mark.slow  # torch + a tiny timm export
def test_export_prints_its_result_once(tmp_path, capsys, caplog, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    import logging

    from onnx_mptq import export
    from onnx_mptq.export import tiny_model_kwargs

    spec = tiny_model_kwargs("vit")
    real = export.export_timm

    def tiny(name, out, **kw):  # the CLI's call, on a tiny random-init model
        return real(spec.name, out, img_size=spec.img_size, model_kwargs=spec.kwargs, runtime=kw["runtime"], check_samples=1)

    monkeypatch.setattr(export, "export_timm", tiny)
    caplog.set_level(logging.INFO, logger="onnx_mptq")
    out = cli(capsys, "export", spec.name, "-o", str(tmp_path / "new" / "v.onnx"), *CPU)
    assert out.count("exported") == 1 and f"created folder {tmp_path / 'new'}" in out
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "exported" in r.getMessage()]
    load_model(tmp_path / "new" / "v.onnx")
