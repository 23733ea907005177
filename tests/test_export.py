"""Export of timm ViT / DeiT / Swin to ONNX, checkpoints, failures, and the demo model in models/."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_models import tiny_onnx  # noqa: F401  (fixture)

from onnx_mptq.calibrate.session import make_session
from onnx_mptq.config import Providers, RuntimeConfig, ScaleSearchConfig
from onnx_mptq.errors import ExportError
from onnx_mptq.graph.io import load_model

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
CPU = RuntimeConfig(providers=Providers.CPU)
KINDS = ("vit", "deit", "deit_distilled", "swin")


@pytest.fixture(scope="module")
def torch():
    mod = pytest.importorskip("torch")
    pytest.importorskip("timm")
    return mod


def _float_init_uses(model: onnx.ModelProto) -> collections.Counter:
    """How many node inputs read each float initializer with more than one element."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: collections.Counter = collections.Counter()
    for node in model.graph.node:
        for name in node.input:
            t = inits.get(name)
            if t is not None and t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) > 1:
                uses[name] += 1
    return uses


def _io_dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _export_tiny(kind: str, out: Path, *, seed: int = 0, perturb: bool = True, **kw):
    from onnx_mptq.export import build_tiny_timm, export_model, tiny_model_kwargs

    spec = tiny_model_kwargs(kind)
    model = build_tiny_timm(kind, seed=seed, perturb=perturb)
    res = export_model(model, out, name=spec.name, input_shape=(3, spec.img_size, spec.img_size), runtime=CPU, **kw)
    return model, spec, res


# ---------------------------------------------------------------------------------------------
# tiny models at opset 17 and 14 (TorchScript exporter)


@pytest.mark.torch
@pytest.mark.parametrize("kind,opset", [
    pytest.param(k, o, marks=() if (k, o) == ("vit", 17) else pytest.mark.slow)  # the fixture exports the others
    for o in (17, 14) for k in KINDS])
def test_tiny_export_matches_torch(torch, tmp_path, kind, opset):
    model, spec, res = _export_tiny(kind, tmp_path / "m.onnx", seed=1, opset=opset)
    assert res.path == tmp_path / "m.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # one self-contained file, no leftovers
    assert (res.name, res.opset, res.input_name, res.output_names) == (spec.name, opset, "input", ("logits",))
    assert res.input_shape == (3, spec.img_size, spec.img_size)
    assert res.exporter == "torchscript" and res.provider == "CPUExecutionProvider"
    assert res.max_abs_diff is not None and res.max_abs_diff < 1e-4

    m = load_model(res.path)
    assert [i.version for i in m.opset_import if i.domain in ("", "ai.onnx")] == [opset]
    assert _io_dims(m.graph.input[0]) == ["N", 3, spec.img_size, spec.img_size]
    assert [o.name for o in m.graph.output] == ["logits"] and _io_dims(m.graph.output[0]) == ["N", 10]

    ops = collections.Counter(n.op_type for n in m.graph.node)
    n_ln = sum(isinstance(mod, torch.nn.LayerNorm) for mod in model.modules())
    if opset == 17:
        assert ops["LayerNormalization"] == n_ln
    else:
        assert "LayerNormalization" not in ops
        assert ops["ReduceMean"] >= 2 * n_ln and ops["Sqrt"] >= n_ln and ops["Pow"] >= n_ln
    assert "Identity" not in ops
    assert max(_float_init_uses(m).values()) == 1  # no weight shared between layers

    # dynamic batch: other batch sizes, with ORT graph optimizations on and off
    rng = np.random.default_rng(5)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 3, spec.img_size, spec.img_size), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        for optimize in (True, False):
            got = make_session(res.path, CPU, optimize=optimize).run({"input": x})[0]
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.torch
def test_default_init_weights_are_unshared(torch, tmp_path):
    # timm's init makes every LayerNorm bias zero and gamma one; the exporter deduplicates them.
    _, _, res = _export_tiny("vit", tmp_path / "m.onnx", perturb=False)
    m = onnx.load(res.path)
    assert "Identity" not in {n.op_type for n in m.graph.node}
    assert max(_float_init_uses(m).values()) == 1
    names = {t.name for t in m.graph.initializer}
    assert {"blocks.1.norm2.weight", "blocks.1.norm2.bias", "blocks.1.attn.proj.bias"} <= names


@pytest.mark.torch
def test_dynamo_export(torch, tmp_path):
    _, spec, res = _export_tiny("vit", tmp_path / "m.onnx", perturb=False, opset=17, dynamo=True, check_samples=2)
    assert res.exporter == "dynamo" and res.opset == 17 and res.max_abs_diff < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # weights inlined, no .data file
    m = load_model(res.path)
    assert _io_dims(m.graph.input[0]) == ["N", 3, spec.img_size, spec.img_size]
    assert _io_dims(m.graph.output[0]) == ["N", 10]
    assert "LayerNormalization" in {n.op_type for n in m.graph.node}
    assert max(_float_init_uses(m).values()) == 1


@pytest.mark.torch
def test_dynamo_refuses_an_opset_it_cannot_reach(torch, tmp_path):
    with pytest.raises(ExportError, match=r"produced opset 18, not the requested 14.*dynamo=False"):
        _export_tiny("vit", tmp_path / "m.onnx", opset=14, dynamo=True)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.torch
def test_tiny_onnx_fixture(torch, tiny_onnx):  # noqa: F811
    p = tiny_onnx("swin", 14)
    assert p is tiny_onnx("swin", opset=14)  # cached for the session
    m = load_model(p)
    assert "LayerNormalization" not in {n.op_type for n in m.graph.node}
    assert tiny_onnx("swin", 14, dynamo=True) is None  # the dynamo exporter cannot reach opset 14


@pytest.mark.torch
def test_tiny_spec_exports_through_export_timm(torch, tmp_path):
    from onnx_mptq.export import export_timm, tiny_model_kwargs

    spec = tiny_model_kwargs("deit_distilled")
    res = export_timm(spec.name, tmp_path / "d.onnx", img_size=spec.img_size, model_kwargs=spec.kwargs, runtime=CPU, check_samples=1)
    assert res.output_names == ("logits",) and res.max_abs_diff < 1e-4  # the two heads are averaged in eval


@pytest.mark.torch
def test_random_init_is_seeded_and_leaves_the_global_rng(torch, tmp_path):
    from onnx_mptq.export import export_timm, tiny_model_kwargs

    spec = tiny_model_kwargs("vit")

    def weights(path, seed, caller_seed):
        torch.manual_seed(caller_seed)  # whatever state the caller's RNG is in
        before = torch.random.get_rng_state()
        export_timm(spec.name, path, img_size=spec.img_size, model_kwargs=spec.kwargs, runtime=CPU, check_samples=0,
                    seed=seed)
        assert torch.equal(torch.random.get_rng_state(), before)  # left as it was
        return b"".join(t.raw_data for t in onnx.load(str(path)).graph.initializer)

    a = weights(tmp_path / "a.onnx", 0, 1234)
    assert weights(tmp_path / "b.onnx", 0, 99) == a  # the caller's RNG state does not matter
    assert weights(tmp_path / "c.onnx", 1, 1234) != a


# ---------------------------------------------------------------------------------------------
# checkpoints


def _save_checkpoint(torch, sd: dict, path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "wrapped":
        torch.save({"model": sd, "epoch": 3}, path)
    else:
        torch.save(sd, path)


@pytest.mark.torch
@pytest.mark.parametrize("fmt", ["pth", "wrapped", "safetensors"])
def test_checkpoint_round_trip(torch, tmp_path, fmt):
    from onnx_mptq.export import build_tiny_timm, export_timm, tiny_model_kwargs

    spec = tiny_model_kwargs("vit")
    src = build_tiny_timm("vit", seed=7)
    ckpt = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    _save_checkpoint(torch, src.state_dict(), ckpt, fmt)
    res = export_timm(
        spec.name, tmp_path / "m.onnx", checkpoint=ckpt, img_size=spec.img_size, model_kwargs=spec.kwargs, runtime=CPU, check_samples=1
    )
    x = np.random.default_rng(0).standard_normal((4, 3, spec.img_size, spec.img_size), dtype=np.float32)
    with torch.no_grad():
        ref = src(torch.from_numpy(x)).numpy()
    got = make_session(res.path, CPU).run({"input": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.torch
def test_checkpoint_with_wrong_keys(torch, tmp_path):
    from onnx_mptq.export import build_tiny_timm, export_timm, tiny_model_kwargs

    spec = tiny_model_kwargs("vit")
    sd = build_tiny_timm("vit").state_dict()
    sd["blocks.0.attn.qkv_w"] = sd.pop("blocks.0.attn.qkv.weight")
    ckpt = tmp_path / "bad.pth"
    torch.save(sd, ckpt)
    with pytest.raises(ExportError) as e:
        export_timm(spec.name, tmp_path / "m.onnx", checkpoint=ckpt, img_size=spec.img_size, model_kwargs=spec.kwargs, runtime=CPU)
    msg = str(e.value)
    assert "does not fit vit_tiny_patch16_224" in msg
    assert "1 missing keys (blocks.0.attn.qkv.weight)" in msg and "1 unexpected keys (blocks.0.attn.qkv_w)" in msg
    assert not (tmp_path / "m.onnx").exists()

    good = tmp_path / "good.pth"
    torch.save(build_tiny_timm("vit").state_dict(), good)
    kwargs = dict(spec.kwargs, num_classes=5)  # same keys, another head shape
    with pytest.raises(ExportError, match=r"shape mismatches .*head\.weight \(10, 64\) vs \(5, 64\)"):
        export_timm(spec.name, tmp_path / "m.onnx", checkpoint=good, img_size=spec.img_size, model_kwargs=kwargs, runtime=CPU)


@pytest.mark.torch
def test_unreadable_checkpoints(torch, tmp_path):
    from onnx_mptq.export import export_timm, tiny_model_kwargs

    spec = tiny_model_kwargs("vit")
    kw = dict(img_size=spec.img_size, model_kwargs=spec.kwargs, runtime=CPU)
    with pytest.raises(ExportError, match="no such file"):
        export_timm(spec.name, tmp_path / "m.onnx", checkpoint=tmp_path / "missing.pth", **kw)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot read it"):
        export_timm(spec.name, tmp_path / "m.onnx", checkpoint=junk, **kw)
    with pytest.raises(ExportError, match="either a checkpoint or pretrained"):
        export_timm(spec.name, tmp_path / "m.onnx", checkpoint=junk, pretrained=True, **kw)


# ---------------------------------------------------------------------------------------------
# names and pretrained weights


@pytest.mark.torch
def test_unknown_model_name(torch, tmp_path):
    from onnx_mptq.export import export_timm

    with pytest.raises(ExportError, match=r"unknown timm model 'vit_tiny_patch16_22'; close matches: .*vit_tiny_patch16_224"):
        export_timm("vit_tiny_patch16_22", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"unknown timm model 'no_such_net_xyz'"):
        export_timm("no_such_net_xyz", tmp_path / "m.onnx")


@pytest.mark.slow  # a fresh interpreter importing torch and timm
@pytest.mark.torch
def test_pretrained_without_network_fails_quickly(torch, tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so the check runs in a fresh interpreter.
    code = textwrap.dedent(
        """
        from onnx_mptq.errors import ExportError
        from onnx_mptq.export import export_timm
        try:
            export_timm("vit_tiny_patch16_224", r"OUT", pretrained=True)
        except ExportError as e:
            print("EXPORT-ERROR:", e)
        """
    ).replace("OUT", str(tmp_path / "m.onnx"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "th"))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("EXPORT-ERROR:")]
    assert len(lines) == 1, proc.stdout + proc.stderr[-2000:]
    assert "cannot download pretrained weights for vit_tiny_patch16_224 (no network?): pass --checkpoint FILE" in lines[0]
    assert time.monotonic() - t0 < 45
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------------------------
# the demo model in models/ (no torch needed)


def test_demo_files_exist_and_load():
    files = {name: MODELS / name for name in ("digits_vit.onnx", "digits_calib.npz", "digits_eval.npz", "README.md")}
    for p in files.values():
        assert p.is_file(), p
    assert sum(p.stat().st_size for p in files.values()) < 1_000_000
    m = load_model(files["digits_vit.onnx"])
    assert [i.version for i in m.opset_import if i.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in m.graph.input] == ["input"] and _io_dims(m.graph.input[0]) == ["N", 1, 8, 8]
    assert [o.name for o in m.graph.output] == ["logits"] and _io_dims(m.graph.output[0]) == ["N", 10]
    for name, n in (("digits_calib.npz", 200), ("digits_eval.npz", 400)):
        with np.load(files[name]) as d:
            assert sorted(d.files) == ["input", "labels"]
            assert d["input"].dtype == np.float32 and d["input"].shape == (n, 1, 8, 8)
            assert d["labels"].dtype == np.int64 and d["labels"].shape == (n,)
            assert set(np.unique(d["labels"]).tolist()) == set(range(10))


def test_demo_model_accuracy():
    with np.load(MODELS / "digits_eval.npz") as d:
        x, y = d["input"], d["labels"]
    session = make_session(MODELS / "digits_vit.onnx", CPU)
    logits = np.concatenate([session.run({"input": x[i : i + 128]})[0] for i in range(0, len(y), 128)])  # (400, 10)
    acc = float(np.mean(logits.argmax(axis=1) == y))
    assert acc >= 0.95, f"demo model FP32 accuracy {acc:.4f} < 0.95"


# ---------------------------------------------------------------------------------------------
# the ViT family beyond ViT/DeiT/Swin (issue 17): shrunken random-weight timm models, exported,
# analysed and quantized end to end (W8A8 on a few random images)

FAMILY = {  # name: (create_model kwargs that shrink it, img_size, roles that must appear)
    "cait_xxs24_224": ({"depth": 2, "depth_token_only": 1}, 64, {"talking_heads", "attn_qk", "attn_av", "q", "k", "v"}),
    "xcit_nano_12_p16_224": ({"depth": 2, "cls_attn_layers": 1}, 64, {"conv", "qkv", "attn_qk", "attn_av"}),
    "levit_128s": ({}, 224, {"conv", "qkv", "attn_qk", "attn_av", "fc1", "fc2"}),
    "eva02_tiny_patch14_224": ({"depth": 2}, 56, {"fc1_glu", "fc2", "qkv", "attn_qk"}),
    "pvt_v2_b0": ({"depths": (1, 1, 1, 1)}, 64, {"conv", "fc1", "fc2", "q", "qkv"}),
    "vit_tiny_r_s16_p8_224": ({"depth": 2}, 64, {"conv", "patch_embed", "qkv"}),
}


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_exports_analyse_and_quantize(torch, tmp_path, name):
    from onnx_mptq.config import Config, QuantConfig
    from onnx_mptq.export import export_timm
    from onnx_mptq.graph.analysis import analyze
    from onnx_mptq.pipeline import quantize

    kwargs, img, must = FAMILY[name]
    # img_size goes only to models that take it (pvt_v2 does not: it used to raise TypeError)
    res = export_timm(name, tmp_path / "m.onnx", img_size=img, model_kwargs=kwargs, runtime=CPU, check_samples=1)
    assert res.input_shape == (3, img, img)
    m = onnx.load(str(res.path))
    a = analyze(m)
    assert must <= set(a.summary()), a.summary()
    assert not [n for n in a.notes if "not a softmax attention" in n or "not fed by a graph input" in n]
    x = np.random.default_rng(0).standard_normal((4, 3, img, img)).astype(np.float32)
    q = quantize(m, {"input": x}, Config(runtime=CPU, quant=QuantConfig(w_bits=8, a_bits=8, search=ScaleSearchConfig(grid_size=10))),
                 eval_data={"input": x})
    assert len(q.plan.layers) == len(a.units)
    assert q.validation.sqnr_db > 10.0
