"""Reliability and safety (issue 7): bad input, large models, atomic outputs, determinism.

Every bad input goes through the CLI (``onnx_mptq.cli.main``) and must give exit code 2, one
line on stderr that names the problem, no traceback, and nothing written to the output folder
(no model, no plan, no temporary file). Library-level checks (external data, atomic writes,
determinism) call the package directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import mlp_only, random_images, tiny_vit
from onnx import TensorProto, helper, numpy_helper

from onnx_mptq import pipeline
from onnx_mptq.cli import main
from onnx_mptq.config import CalibConfig, CaptureConfig, Config, Providers, QuantConfig, RuntimeConfig
from onnx_mptq.errors import DataError, ModelLoadError, MptqError, OutputError
from onnx_mptq.graph import io as mio
from onnx_mptq.graph.io import load_model, save_model, write_text_atomic

CPU = ["--providers", "cpu"]
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers


class Env:
    """A tiny ViT, its calibration data and an empty output folder, all under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = root / "m.onnx"
        onnx.save(tiny_vit(), self.model)
        self.calib = root / "calib.npz"
        np.savez(self.calib, input=random_images(16))
        self.out = root / "out"
        self.out.mkdir()

    def npz(self, name: str, **arrays: np.ndarray) -> Path:
        p = self.root / name
        np.savez(p, **arrays)
        return p

    def onnx(self, name: str, model: onnx.ModelProto) -> Path:
        p = self.root / name
        onnx.save(model, p)
        return p

    def quantize(self, model: Path | str, calib: Path | str | None = None, *extra: str) -> list[str]:
        """argv of a quantize run writing a model and a plan into the output folder."""
        argv = ["-q", "quantize", str(model), "-o", str(self.out / "q.onnx"), "--plan-out", str(self.out / "plan.json"), *CPU]
        if calib is not None:
            argv += ["--calib", str(calib)]
        return argv + list(extra)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def run_cli(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_user_error(capsys: pytest.CaptureFixture, argv: list[str], *words: str, out_dir: Path | None = None,
                      keep: dict[str, bytes] | None = None) -> str:
    """Exit 2, one stderr line naming the problem, no traceback, and ``out_dir`` holds only ``keep``."""
    rc, _, err = run_cli(capsys, argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("onnx-mptq: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    if out_dir is not None:
        found = {p.name: p.read_bytes() for p in out_dir.iterdir()} if out_dir.exists() else {}
        assert found == (keep or {}), f"left in the output folder: {sorted(found)}"
    return lines[0]


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# bad model files


def _truncate(env: Env, frac: float) -> Path:
    data = env.model.read_bytes()
    p = env.root / f"trunc_{frac}.onnx"
    p.write_bytes(data[: int(len(data) * frac)])
    return p


@pytest.mark.parametrize("frac", [0.0, 0.05, 0.5, 0.97])
def test_truncated_model(env, capsys, frac):
    path = _truncate(env, frac)
    assert_user_error(capsys, env.quantize(path, env.calib), path.name, "not a readable ONNX model", out_dir=env.out)


def test_corrupt_and_missing_model(env, capsys):
    junk = env.root / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_user_error(capsys, env.quantize(junk, env.calib), "junk.onnx", "not a readable ONNX model", out_dir=env.out)
    assert_user_error(capsys, ["inspect", str(junk)], "not a readable ONNX model")
    assert_user_error(capsys, env.quantize(env.root / "nope.onnx", env.calib), "nope.onnx", "no such file", out_dir=env.out)
    assert_user_error(capsys, env.quantize(env.root, env.calib), "not a file", out_dir=env.out)


def test_model_failing_the_checker(env, capsys):
    m = tiny_vit()
    m.graph.node[3].input[0] = "no_such_tensor"
    path = env.onnx("broken.onnx", m)
    assert_user_error(capsys, env.quantize(path, env.calib), "broken.onnx", "fails the ONNX checker", out_dir=env.out)


def _with_dtype(where: str, dtype: int) -> onnx.ModelProto:
    m = tiny_vit()
    if where == "input":
        m.graph.input[0].type.tensor_type.elem_type = dtype
    else:
        init = next(i for i in m.graph.initializer if i.name == "patch_w")
        arr = numpy_helper.to_array(init).astype(helper.tensor_dtype_to_np_dtype(dtype))
        init.CopyFrom(numpy_helper.from_array(arr, "patch_w"))
    return m


@pytest.mark.parametrize("where,dtype,name", [
    ("input", TensorProto.FLOAT16, "FLOAT16"),
    ("input", TensorProto.DOUBLE, "DOUBLE"),
    ("init", TensorProto.FLOAT16, "FLOAT16"),
])
def test_model_not_float32(env, capsys, where, dtype, name):
    path = env.onnx("half.onnx", _with_dtype(where, dtype))
    line = assert_user_error(capsys, env.quantize(path, env.calib), "half.onnx", name, "only float32", out_dir=env.out)
    assert ("'input'" if where == "input" else "'patch_w'") in line


def test_opset_too_old_says_how_to_reexport(env, capsys):
    m = tiny_vit(ln="decomposed", opset=13)
    m.opset_import[0].version = 11
    path = env.onnx("old.onnx", m)
    for bits in ("8", "4"):
        line = assert_user_error(capsys, env.quantize(path, env.calib, "--w-bits", bits, "--a-bits", bits),
                                 "old.onnx", "opset 11", ">= 13", "re-export", "--opset 17", "opset_version", out_dir=env.out)
        assert "int8" in line  # says why no newer opset is needed for low bit widths
    assert_user_error(capsys, ["inspect", str(path)], "opset 11 is too old")


def test_opset_13_is_enough_for_4_bits(env, capsys):
    """Every bit width is emitted in 8-bit containers: opset 13 (per-axis QDQ) suffices, and is kept."""
    path = env.onnx("op13.onnx", tiny_vit(ln="decomposed", opset=13))
    rc, _, err = run_cli(capsys, env.quantize(path, env.calib, "--w-bits", "4", "--a-bits", "4"))
    assert rc == 0, err
    q = onnx.load(env.out / "q.onnx")
    assert mio.opset_of(q) == 13
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    kinds = set()
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            kinds.add(inits[n.input[2]].dtype)
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype == np.int8:
            assert np.abs(inits[n.input[0]].astype(np.int32)).max() <= 7  # 4-bit weights in int8
    assert kinds and kinds <= {np.dtype(np.int8), np.dtype(np.uint8)}


def test_not_a_transformer(env, capsys):
    path = env.onnx("mlp.onnx", mlp_only())
    data = env.npz("vec.npz", input=np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
    assert_user_error(capsys, env.quantize(path, data), "mlp.onnx", "not a transformer", "softmax", out_dir=env.out)
    assert_user_error(capsys, ["-q", "smooth", str(path), "-o", str(env.out / "s.onnx"), "--calib", str(data), *CPU],
                      "mlp.onnx", "not a transformer", out_dir=env.out)
    assert_user_error(capsys, ["inspect", str(path)], "mlp.onnx", "not a transformer")
    assert_user_error(capsys, ["inspect", str(path)], "not a transformer")


# ---------------------------------------------------------------------------------------------
# bad calibration data


def _bad_data(env: Env, kind: str) -> tuple[Path, tuple[str, ...]]:
    x = random_images(8)
    if kind == "nan":
        x[3, 1, 2, 2] = np.nan
        return env.npz("nan.npz", input=x), ("nan.npz", "NaN or inf", "sample 3")
    if kind == "inf":
        x[6, 0, 0, 0] = -np.inf
        return env.npz("inf.npz", input=x), ("inf.npz", "NaN or inf", "sample 6")
    if kind == "dtype":
        return env.npz("u8.npz", input=(x * 40 + 128).clip(0, 255).astype(np.uint8)), ("u8.npz", "uint8", "float32")
    if kind == "shape":
        return env.npz("big.npz", input=random_images(8, img=16)), ("big.npz", "(8, 3, 16, 16)", "(N, 3, 8, 8)")
    if kind == "name":
        return env.npz("names.npz", pixels=x, extra=x), ("names.npz", "pixels", "model inputs are input")
    if kind == "empty":
        return env.npz("empty.npz", input=random_images(0)), ("empty.npz", "no samples")
    if kind == "missing":
        return env.root / "nope.npz", ("nope.npz", "no such file")
    if kind == "corrupt":
        p = env.root / "bad.npz"
        p.write_bytes(b"PK\x03\x04 not really a zip")
        return p, ("bad.npz", "not a readable .npz")
    if kind == "pickle":  # object arrays need unpickling: refused, never loaded
        return env.npz("obj.npz", input=np.array([{"a": 1}], dtype=object)), ("obj.npz", "python objects")
    if kind == "labels":
        return env.npz("lab.npz", input=x, labels=np.arange(5)), ("lab.npz", "labels", "5 entries", "8 samples")
    raise AssertionError(kind)


DATA_KINDS = ["nan", "inf", "dtype", "shape", "name", "empty", "missing", "corrupt", "pickle", "labels"]


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_bad_calibration_data(env, capsys, kind):
    data, words = _bad_data(env, kind)
    assert_user_error(capsys, env.quantize(env.model, data), *words, out_dir=env.out)


@pytest.mark.parametrize("kind", ["nan", "shape", "empty"])
def test_bad_data_in_smooth_and_evaluate(env, capsys, kind):
    data, words = _bad_data(env, kind)
    assert_user_error(capsys, ["-q", "smooth", str(env.model), "-o", str(env.out / "s.onnx"), "--calib", str(data), *CPU],
                      *words, out_dir=env.out)
    assert_user_error(capsys, ["-q", "evaluate", str(env.model), "--data", str(data), "--json", str(env.out / "e.json"), *CPU],
                      *words, out_dir=env.out)


def test_quantize_without_data_or_plan(env, capsys):
    assert_user_error(capsys, env.quantize(env.model), "--calib", "--plan", out_dir=env.out)
    with pytest.raises(DataError, match="no calibration data"):
        pipeline.quantize(tiny_vit(), None)


def test_nan_in_a_later_batch_writes_nothing(env, capsys):
    """NaN is found while streaming (batch 2 of 3): the run still writes nothing."""
    x = random_images(40)
    x[37, 0, 0, 0] = np.nan
    data = env.npz("late.npz", input=x)
    assert_user_error(capsys, env.quantize(env.model, data, "--calib-batch-size", "16"),
                      "NaN or inf", "sample 37", "batch 2", out_dir=env.out)


# dynamic input dims: the data resolves them


def _dynamic_hw() -> onnx.ModelProto:
    m = tiny_vit()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    return m


def test_dynamic_dims_resolved_by_fitting_data(env, capsys):
    path = env.onnx("dyn.onnx", _dynamic_hw())
    rc, _, err = run_cli(capsys, env.quantize(path, env.calib))
    assert rc == 0, err
    assert (env.out / "q.onnx").is_file()


def test_dynamic_dims_with_data_the_model_cannot_take(env, capsys):
    """(3, H, W) accepts any image size on paper; 16x16 breaks the position embedding (5 vs 17 tokens)."""
    path = env.onnx("dyn.onnx", _dynamic_hw())
    data = env.npz("big.npz", input=random_images(8, img=16))
    words = ("big.npz", "cannot take", "(3, 16, 16)", "(3, H, W)", "Add", "Incompatible dimensions")
    assert_user_error(capsys, env.quantize(path, data), *words, out_dir=env.out)
    assert_user_error(capsys, ["-q", "evaluate", str(path), "--data", str(data), *CPU], *words)


def test_dynamic_dims_must_not_change_between_batches():
    m = _dynamic_hw()
    items = [{"input": random_images(4)}, {"input": random_images(4, img=12)}]
    cfg = Config(runtime=RuntimeConfig(providers=Providers.CPU), calib=CalibConfig(batch_size=4))
    with pytest.raises(DataError, match=r"\(3, 12, 12\) in batch 1 but \(3, 8, 8\) in batch 0"):
        pipeline.quantize(m, items, cfg)


# ---------------------------------------------------------------------------------------------
# plans and configuration


def _plan(env: Env, capsys) -> Path:
    rc, _, err = run_cli(capsys, ["-q", "quantize", str(env.model), "-o", str(env.root / "ref.onnx"), "--calib", str(env.calib),
                                  "--plan-out", str(env.root / "plan.json"), *CPU])
    assert rc == 0, err
    return env.root / "plan.json"


def test_plan_for_another_model(env, capsys):
    plan = _plan(env, capsys)
    other = env.onnx("other.onnx", tiny_vit(seed=1))
    argv = ["-q", "quantize", str(other), "-o", str(env.out / "q.onnx"), "--plan", str(plan), *CPU]
    assert_user_error(capsys, argv, "plan.json", "made for another model", out_dir=env.out)


@pytest.mark.parametrize("edit,words", [
    ("junk", ("not valid JSON",)),
    ("bits", ("bits must be 2..8", "got 9")),
    ("field", ("unknown field", "colour")),
    ("version", ("schema_version 99",)),
    ("kind", ("kind",)),
])
def test_malformed_plan(env, capsys, edit, words):
    plan = _plan(env, capsys)
    doc = json.loads(plan.read_text())
    if edit == "junk":
        plan.write_text(plan.read_text()[:200])
    else:
        if edit == "bits":
            doc["layers"][1]["weight"]["bits"] = 9
        elif edit == "field":
            doc["layers"][0]["colour"] = "red"
        elif edit == "version":
            doc["schema_version"] = 99
        elif edit == "kind":
            doc["kind"] = "smoothing_plan"
        plan.write_text(json.dumps(doc))
    argv = ["-q", "quantize", str(env.model), "-o", str(env.out / "q.onnx"), "--plan", str(plan), *CPU]
    assert_user_error(capsys, argv, "plan.json", *words, out_dir=env.out)
    argv[-3] = str(env.root / "missing.json")
    assert_user_error(capsys, argv, "missing.json", "no such plan file", out_dir=env.out)


@pytest.mark.parametrize("doc,words", [
    ({"quant": {"w_bitz": 4}}, ("unknown config key quant.w_bitz",)),
    ({"colour": 1}, ("unknown config key colour",)),
    ({"smooth": {"alpha": 1.5}}, ("smooth.alpha must be in [0, 1], got 1.5",)),
    ({"quant": {"a_bits": 1}}, ("quant.a_bits", "from 2 to 8", "got 1")),
    ({"calib": {"batch_size": 0}}, ("calib.batch_size", ">= 1")),
    ({"quant": {"search": {"method": "best"}}}, ("quant.search.method must be one of",)),
    ({"seed": -3}, ("seed must be an integer >= 0",)),
    ([1, 2], ("config must be an object",)),
])
def test_bad_config_file(env, capsys, doc, words):
    cfg = env.root / "cfg.json"
    cfg.write_text(json.dumps(doc))
    assert_user_error(capsys, env.quantize(env.model, env.calib, "--config", str(cfg)), *words, out_dir=env.out)


@pytest.mark.parametrize("flags,words", [
    (["--w-bits", "9"], ("quant.w_bits", "from 2 to 8", "got 9")),
    (["--a-bits", "1"], ("quant.a_bits",)),
    (["--alpha", "1.5"], ("smooth.alpha",)),
    (["--batch-size", "0"], ("runtime.batch_size",)),
    (["--threads", "-1"], ("runtime.threads",)),
    (["--limit", "0"], ("calib.limit",)),
    (["--seed", "-1"], ("seed",)),
    (["--target-bits", "9"], ("mixed.target_bits",)),
    (["--target-bits", "5", "--candidates", "4,x"], ("mixed.candidates",)),
    (["--target-bits", "5", "--keep", "head"], ("mixed.keep",)),
    (["--config", "missing.json"], ("missing.json", "no such config file")),
])
def test_bad_flags(env, capsys, flags, words):
    assert_user_error(capsys, env.quantize(env.model, env.calib, *flags), *words, out_dir=env.out)


def test_config_file_that_is_not_json(env, capsys):
    cfg = env.root / "cfg.json"
    cfg.write_text("{quant: 4}")
    assert_user_error(capsys, env.quantize(env.model, env.calib, "--config", str(cfg)), "cfg.json", "not valid JSON", out_dir=env.out)


def test_debug_shows_the_traceback_and_bugs_are_not_hidden(env, capsys, monkeypatch):
    data, _ = _bad_data(env, "nan")
    with pytest.raises(DataError, match="NaN"):
        main(["--debug", *env.quantize(env.model, data)[1:]])

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "quantize", boom)
    with pytest.raises(RuntimeError):  # a bug is not a user error: Python exits 1 with the traceback
        main(env.quantize(env.model, env.calib))


# ---------------------------------------------------------------------------------------------
# outputs: atomic, never over the input, existing files replaced only on success


def test_output_over_the_input_or_into_a_folder(env, capsys):
    before = digest(env.model)
    assert_user_error(capsys, ["-q", "quantize", str(env.model), "-o", str(env.model), "--calib", str(env.calib), *CPU],
                      "would overwrite the input model")
    assert digest(env.model) == before
    assert_user_error(capsys, ["-q", "quantize", str(env.model), "-o", str(env.out), "--calib", str(env.calib), *CPU],
                      "is a folder", out_dir=env.out)
    folder = env.root / "plan_dir"
    folder.mkdir()
    argv = ["-q", "quantize", str(env.model), "-o", str(env.out / "q.onnx"), "--calib", str(env.calib), "--plan-out", str(folder), *CPU]
    assert_user_error(capsys, argv, "plan_dir", "is a folder", out_dir=env.out)
    assert list(folder.iterdir()) == []


def test_failed_run_keeps_the_existing_outputs(env, capsys):
    old = {"q.onnx": b"previous model", "plan.json": b"previous plan"}
    for k, v in old.items():
        (env.out / k).write_bytes(v)
    data, _ = _bad_data(env, "nan")
    assert_user_error(capsys, env.quantize(env.model, data), "NaN", out_dir=env.out, keep=old)
    rc, _, err = run_cli(capsys, env.quantize(env.model, env.calib))
    assert rc == 0, err
    assert sorted(p.name for p in env.out.iterdir()) == ["plan.json", "q.onnx"]
    load_model(env.out / "q.onnx")
    json.loads((env.out / "plan.json").read_text())


@pytest.mark.parametrize("failure", ["interrupt", "disk_full"])
def test_interrupted_write_leaves_no_partial_file(env, capsys, monkeypatch, failure):
    (env.out / "q.onnx").write_bytes(b"previous model")
    real_save = onnx.save_model

    def dying_save(model, f, *args, **kwargs):
        Path(f).write_bytes(model.SerializeToString()[:100])  # a partial file, then the failure
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", dying_save)
    argv = ["-q", "quantize", str(env.model), "-o", str(env.out / "q.onnx"), "--calib", str(env.calib), *CPU]
    rc, _, err = run_cli(capsys, argv)
    if failure == "interrupt":
        assert rc == 130 and "interrupted" in err
    else:
        assert rc == 2 and "cannot write the model" in err and "No space left" in err
    assert {p.name: p.read_bytes() for p in env.out.iterdir()} == {"q.onnx": b"previous model"}
    monkeypatch.setattr(onnx, "save_model", real_save)


def test_write_text_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    dest = tmp_path / "report.json"
    dest.write_text("old")

    def fail(*a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match="report.json: cannot write it"):
        write_text_atomic(dest, "new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"] and dest.read_text() == "old"


def test_outputs_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        m = save_model(tiny_vit(), tmp_path / "a.onnx")
        t = write_text_atomic(tmp_path / "a.json", "{}")
        d = save_model(tiny_vit(), tmp_path / "b.onnx", external_data=True)
    finally:
        os.umask(mask)
    for p in (m, t, d, tmp_path / "b.onnx.data"):
        assert oct(p.stat().st_mode & 0o777) == oct(0o644), p


def test_input_model_is_never_modified(env, capsys):
    m = env.root / "src" / "m.onnx"
    m.parent.mkdir()
    onnx.save_model(tiny_vit(), m, save_as_external_data=True, location="m.weights", size_threshold=0)
    files = sorted(m.parent.iterdir())
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    for argv in (
        ["-q", "quantize", str(m), "-o", str(env.out / "q.onnx"), "--calib", str(env.calib), "--w-bits", "4", *CPU],
        ["-q", "smooth", str(m), "-o", str(env.out / "s.onnx"), "--calib", str(env.calib), *CPU],
        ["-q", "evaluate", str(m), "--data", str(env.calib), *CPU],
        ["inspect", str(m)],
    ):
        rc, _, err = run_cli(capsys, argv)
        assert rc == 0, err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(m.parent.iterdir())} == before

    proto = tiny_vit()
    raw = proto.SerializeToString()
    pipeline.quantize(proto, env.calib, Config(runtime=RuntimeConfig(providers=Providers.CPU)))
    assert proto.SerializeToString() == raw  # the in-memory model is not touched either


# ---------------------------------------------------------------------------------------------
# external data: loading, saving, and refusing locations outside the model's folder


def _external(tmp_path: Path, location: str = "weights.bin") -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    path = d / "m.onnx"
    onnx.save_model(tiny_vit(), path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return path


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_external_data_model_loads_and_quantizes(env, capsys):
    path = _external(env.root)
    loaded = load_model(path)
    ref = _arrays(tiny_vit())
    got = _arrays(loaded)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    assert all(i.data_location == TensorProto.DEFAULT for i in loaded.graph.initializer)
    rc, _, err = run_cli(capsys, env.quantize(path, env.calib))
    assert rc == 0, err
    q = load_model(env.out / "q.onnx")
    assert q.graph.node and sorted(p.name for p in env.out.iterdir()) == ["plan.json", "q.onnx"]  # small: inline


def test_save_with_external_data_round_trips(tmp_path):
    model = tiny_vit()
    dest = save_model(model, tmp_path / "x.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx", "x.onnx.data"]
    header = onnx.load(dest, load_external_data=False)
    assert any(i.data_location == TensorProto.EXTERNAL for i in header.graph.initializer)
    back = load_model(dest)
    ref = _arrays(model)
    assert all(np.array_equal(_arrays(back)[k], ref[k]) for k in ref)
    assert [n.SerializeToString() for n in back.graph.node] == [n.SerializeToString() for n in model.graph.node]


def test_save_switches_to_external_data_past_the_limit(tmp_path, monkeypatch):
    """The 2 GB switch, exercised by lowering the limit (the real size is in the slow test)."""
    monkeypatch.setattr(mio, "_PROTOBUF_LIMIT", 10_000)
    save_model(tiny_vit(), tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    monkeypatch.undo()
    save_model(tiny_vit(), tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    assert np.array_equal(_arrays(load_model(tmp_path / "big.onnx"))["pos"], _arrays(tiny_vit())["pos"])


def _relocate(path: Path, location: str) -> None:
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, path)


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "missing"])
def test_external_data_outside_the_model_folder_is_refused(env, capsys, how):
    path = _external(env.root)
    data = path.parent / "weights.bin"
    secret = env.root / "secret.bin"
    secret.write_bytes(data.read_bytes())  # a perfectly valid file, in the wrong place
    if how == "absolute":
        _relocate(path, str(secret))
        words = ("outside the model's directory", "refusing")
    elif how == "dotdot":
        _relocate(path, "../secret.bin")
        words = ("outside the model's directory", "../secret.bin")
    elif how == "symlink":
        data.unlink()
        data.symlink_to(secret)
        words = ("leaves the model's directory",)
    else:
        data.unlink()
        words = ("external data file", "missing")
    with pytest.raises(ModelLoadError):
        load_model(path)
    assert_user_error(capsys, env.quantize(path, env.calib), "m.onnx", *words, out_dir=env.out)
    assert_user_error(capsys, ["inspect", str(path)], *words)


@pytest.mark.slow
def test_model_past_2gb_is_saved_with_external_data(tmp_path):
    """~2.1 GB of float32 weights: save_model must switch to external data, load_model read it back.

    Peak memory is a few copies of the weights (~7 GB): the tensor is written straight into the
    model (``helper.make_graph`` would copy it through a serialization, which fails past 2 GB)."""
    n = (2**31 + 64 * 2**20) // 4  # float32 elements: 2 GiB + 64 MiB
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "big"], ["y"], name="add")], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    big = model.graph.initializer.add()
    big.name, big.data_type = "big", TensorProto.FLOAT
    big.dims.append(n)
    big.raw_data = np.float32(1.5).tobytes() + bytes(n * 4 - 8) + np.float32(-2.5).tobytes()  # markers at both ends
    del big
    with pytest.raises(Exception):  # noqa: B017 - protobuf cannot even size it (EncodeError)
        model.ByteSize()
    dest = save_model(model, tmp_path / "big.onnx")
    del model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert dest.stat().st_size < 1 << 20 and (tmp_path / "big.onnx.data").stat().st_size == n * 4
    back = load_model(dest)  # checker by path, preflight skips the in-memory checker past 2 GB
    init = back.graph.initializer[0]
    assert init.name == "big" and list(init.dims) == [n] and init.data_location == TensorProto.DEFAULT
    raw = init.raw_data
    assert len(raw) == n * 4 and raw[:4] == np.float32(1.5).tobytes() and raw[-4:] == np.float32(-2.5).tobytes()
    assert raw.count(0, 4, n * 4 - 4) == n * 4 - 8
    del raw, init
    mio.preflight(back)  # an in-memory model past 2 GB passes preflight too


# ---------------------------------------------------------------------------------------------
# safety: nothing unpickles untrusted data


def test_no_unsafe_deserialisation_in_the_package():
    """Mechanical: no pickle, no torch.load without weights_only=True, no allow_pickle=True."""
    import ast

    for path in sorted((REPO / "onnx_mptq").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), path
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if fn.endswith("torch.load"):
                    assert kw.get("weights_only") == "True", f"{path}: {ast.unparse(node)}"
                if fn.endswith(("np.load", "numpy.load")):
                    assert kw.get("allow_pickle", "False") == "False", f"{path}: {ast.unparse(node)}"


class _Payload:
    """Unpickling this runs code: writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.torch
def test_malicious_checkpoint_is_not_unpickled(env, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    marker = env.root / "pwned.txt"
    evil = env.root / "evil.pth"
    torch.save({"state_dict": _Payload(str(marker))}, evil)
    argv = ["-q", "export", "vit_tiny_patch16_224", "-o", str(env.out / "m.onnx"), "--checkpoint", str(evil),
            "--img-size", "32", *CPU]
    assert_user_error(capsys, argv, "evil.pth", "cannot read it", out_dir=env.out)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# determinism


def test_same_input_data_and_seed_give_identical_bytes(env):
    # a reservoir smaller than the 80 tokens seen, so the seeded subsampling really draws
    cfg = Config(runtime=RuntimeConfig(providers=Providers.CPU), calib=CalibConfig(batch_size=4), capture=CaptureConfig(tokens_per_layer=32),
                 quant=QuantConfig(w_bits=4, a_bits=4), seed=3)
    a = pipeline.quantize(env.model, env.calib, cfg)
    b = pipeline.quantize(env.model, env.calib, cfg)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.plan.to_json() == b.plan.to_json()


def test_cli_is_deterministic_across_processes(env):
    """Two fresh interpreters with different hash seeds write byte-identical models and plans."""
    outs = []
    for hs in ("1", "2"):
        d = env.root / f"run{hs}"
        cmd = [sys.executable, "-m", "onnx_mptq", "-q", "quantize", str(env.model), "-o", str(d / "q.onnx"), "--calib",
               str(env.calib), "--plan-out", str(d / "plan.json"), "--w-bits", "6", "--a-bits", "6", "--seed", "5", *CPU]
        envv = dict(os.environ, PYTHONHASHSEED=hs)
        r = subprocess.run(cmd, capture_output=True, text=True, env=envv, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(((d / "q.onnx").read_bytes(), (d / "plan.json").read_bytes()))
    assert outs[0] == outs[1]


def test_one_line_error_without_progress_noise(env):
    """The real console: a bad input gives exactly one stderr line, also without -q."""
    data, _ = _bad_data(env, "nan")
    cmd = [sys.executable, "-m", "onnx_mptq", "quantize", str(env.model), "-o", str(env.out / "q.onnx"), "--calib", str(data), *CPU]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ))
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("onnx-mptq: error:")]
    assert len(errors) == 1 and "NaN or inf" in errors[0] and "Traceback" not in r.stderr
    assert list(env.out.iterdir()) == []


def test_mptq_errors_are_one_line():
    e = MptqError("first\nsecond   third")
    assert str(e) == "first second third"


# ---------------------------------------------------------------------------------------------
# outputs checked before any work; folders created are named; report folder mode


def _no_work(monkeypatch):
    def work(*a, **k):
        raise AssertionError("the pipeline ran before the outputs were checked")

    monkeypatch.setattr(pipeline, "quantize", work)
    monkeypatch.setattr(pipeline, "smooth", work)


@pytest.mark.parametrize("which", ["output", "plan-out", "report", "smooth"])
def test_an_unwritable_output_is_found_before_any_work(env, capsys, monkeypatch, which):
    _no_work(monkeypatch)
    blocker = env.root / "afile"
    blocker.write_text("x")
    target = blocker / "sub" / "x.onnx"
    argv = {"output": ["-q", "quantize", str(env.model), "-o", str(target), "--calib", str(env.calib), *CPU],
            "plan-out": env.quantize(env.model, env.calib, "--plan-out", str(target)),
            "report": env.quantize(env.model, env.calib, "--report", str(blocker / "rep")),
            "smooth": ["-q", "smooth", str(env.model), "-o", str(target), "--calib", str(env.calib), *CPU]}[which]
    assert_user_error(capsys, argv, "afile", "is not a folder", out_dir=env.out)
    assert_user_error(capsys, env.quantize(env.model, env.calib, "--report", str(blocker)), "afile", "is a file",
                      out_dir=env.out)


def test_missing_output_folders_are_created_and_named(env, capsys):
    q = env.root / "new" / "deeper" / "q.onnx"
    rep = env.root / "reports" / "run1"
    rc, out, err = run_cli(capsys, ["-q", "quantize", str(env.model), "-o", str(q), "--calib", str(env.calib),
                                    "--report", str(rep), "--no-optm", *CPU])
    assert rc == 0, err
    assert q.exists() and (rep / "report.md").exists()
    for folder in (env.root / "new", env.root / "new" / "deeper", env.root / "reports"):
        assert f"created folder {folder}" in out.splitlines()
    assert f"report written to {rep}" in out
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(rep.stat().st_mode) == 0o777 & ~mask  # the usual mode, not mkdtemp's 0o700
    # the report shows what the pipeline measured (measure=True), nothing is re-run to render it
    doc = json.loads((rep / "report.json").read_text())
    assert all(r["sqnr_db"] is not None for r in doc["layers"]) and doc["size_mb"]["fp32_onnx"] > 0


def test_debug_works_after_the_subcommand(env, capsys):
    data, _ = _bad_data(env, "nan")
    with pytest.raises(DataError, match="NaN"):
        main([*env.quantize(env.model, data), "--debug"])
    with pytest.raises(DataError, match="NaN"):
        main(["--debug", *env.quantize(env.model, data)])


def test_a_plan_error_quotes_a_bounded_line(env, capsys):
    rc, _, err = run_cli(capsys, env.quantize(env.model, env.calib, "--no-optm"))
    assert rc == 0, err
    plan = json.loads((env.out / "plan.json").read_text())
    layer = next(lp for lp in plan["layers"] if lp.get("weight"))
    layer["weight"]["bits"] = 12
    layer["weight"]["scales"] = layer["weight"]["scales"] * 40  # a long list in the offending value
    bad = env.root / "bad_plan.json"
    bad.write_text(json.dumps(plan))
    line = assert_user_error(capsys, ["-q", "quantize", str(env.model), "-o", str(env.root / "r.onnx"), "--plan", str(bad), *CPU],
                             "bad_plan.json")
    assert len(line) < 700, len(line)


@pytest.mark.parametrize("flags,tty,expected", [([], False, False), ([], True, True), (["--no-progress"], True, False),
                                                (["-q"], True, False), (["x", "--no-progress"], True, False)])
def test_the_cli_decides_progress_and_the_pipeline_receives_a_bool(env, capsys, monkeypatch, flags, tty, expected):
    seen = {}

    class Stop(MptqError):
        pass

    def fake(*a, progress=None, **k):
        seen["progress"] = progress
        raise Stop("stop here")

    monkeypatch.setattr(pipeline, "quantize", fake)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    argv = ["quantize", str(env.model), "-o", str(env.out / "q.onnx"), "--calib", str(env.calib), *CPU]
    if flags[:1] == ["x"]:
        argv += flags[1:]  # after the subcommand
    else:
        argv = flags + argv
    assert main(argv) == 2
    assert seen["progress"] is expected
    assert pipeline.resolve_progress(None) is tty and pipeline.resolve_progress(False) is False
