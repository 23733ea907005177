"""evaluate() and compare_outputs() on tiny graphs and on the real MNIST ViT."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_mptq.config import RuntimeConfig
from onnx_mptq.data import input_specs, open_data
from onnx_mptq.errors import DataError, UnsupportedModelError
from onnx_mptq.numerics.metrics import cosine, kl_softmax, sqnr_db, top1_agreement
from onnx_mptq.validate import EvaluationReport, compare_outputs, evaluate

CPU = RuntimeConfig(providers="cpu", threads=1, batch_size=8)
MNIST = Path(__file__).parents[1].parent / "shared" / "data" / "mnist-vit"


def linear(seed: int = 0, features: int = 6, classes: int = 7, batch: int | str = "N", out_shape=None) -> onnx.ModelProto:
    """x (batch, features) @ W + b -> logits (a bare linear classifier)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((features, classes)).astype(np.float32)
    b = rng.standard_normal(classes).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    out = "logits"
    if out_shape is not None:
        inits.append(numpy_helper.from_array(np.array([-1, *out_shape], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["logits", "shape"], ["reshaped"]))
        out = "reshaped"
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def forward(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    w, b = (numpy_helper.to_array(t) for t in model.graph.initializer[:2])
    return x @ w + b


def dataset(n: int = 20, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = rng.integers(0, 7, n)
    return x, y


def test_accuracy_without_reference():
    model = linear()
    x, y = dataset()
    data = open_data([{"x": x, "labels": y}], input_specs(model), batch_size=8)
    r = evaluate(model, data, CPU, progress=False)
    logits = forward(model, x)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert r.num_samples == 20
    assert r.top1 == pytest.approx(100 * np.mean(logits.argmax(1) == y))
    assert r.top5 == pytest.approx(100 * np.mean((top5 == y[:, None]).any(1)))
    assert r.top1_agreement is r.cosine is r.sqnr_db is r.kl is None
    assert r.provider == "CPUExecutionProvider"
    assert r.latency_ms_b1 > 0 and r.latency_ms_batch > 0


def test_against_itself_is_identical_and_json_stays_valid():
    model = linear()
    x, _ = dataset()
    data = open_data([{"x": x}], input_specs(model), batch_size=8)
    r = evaluate(model, data, CPU, reference=model, latency_batch_size=4, progress=False)
    assert r.top1 is None and r.top5 is None  # no labels
    assert r.top1_agreement == 100.0 and r.cosine == pytest.approx(1.0) and r.kl == pytest.approx(0.0, abs=1e-9)
    assert r.sqnr_db == math.inf
    doc = json.loads(r.to_json())  # strict JSON: inf became null
    assert doc["kind"] == "evaluation" and doc["sqnr_db"] is None
    back = EvaluationReport.from_json(r.to_json())
    assert back.sqnr_db is None and back.top1_agreement == 100.0


def test_reference_metrics_match_numpy():
    model, ref = linear(seed=0), linear(seed=0)
    w = numpy_helper.to_array(model.graph.initializer[0]) + np.random.default_rng(5).normal(0, 0.5, (6, 7)).astype(np.float32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    x, y = dataset(30)
    data = open_data([{"x": x, "labels": y}], input_specs(model), batch_size=8)
    r = evaluate(model, data, CPU, reference=ref, progress=False)
    lo, lr = forward(model, x), forward(ref, x)
    assert r.top1_agreement == pytest.approx(100 * top1_agreement(lr, lo))
    assert r.top1_agreement < 100
    assert r.cosine == pytest.approx(cosine(lr, lo), rel=1e-5)
    assert r.sqnr_db == pytest.approx(sqnr_db(lr, lo), rel=1e-4)
    assert r.kl == pytest.approx(kl_softmax(lr, lo), rel=1e-4)
    # the reference's own accuracy on the same samples, beside the model's
    top5 = np.argsort(-lr, axis=1)[:, :5]
    assert r.reference_top1 == pytest.approx(100 * np.mean(lr.argmax(1) == y))
    assert r.reference_top5 == pytest.approx(100 * np.mean((top5 == y[:, None]).any(1)))
    assert r.top1 == pytest.approx(100 * np.mean(lo.argmax(1) == y))
    assert r.reference_top1 != r.top1  # the perturbed model does differ here: the two are not one figure


def test_reference_top1_needs_labels_and_a_reference():
    model = linear()
    x, y = dataset()
    r = evaluate(model, open_data([{"x": x, "labels": y}], input_specs(model)), CPU, progress=False)
    assert r.top1 is not None and r.reference_top1 is None and r.reference_top5 is None
    r = evaluate(model, open_data([{"x": x}], input_specs(model)), CPU, reference=model, progress=False)
    assert r.reference_top1 is None


def test_reference_with_another_input_shape_is_named():
    model, ref = linear(features=6), linear(features=5)
    x, y = dataset()
    data = open_data([{"x": x, "labels": y}], input_specs(model))
    with pytest.raises(DataError) as e:
        evaluate(model, data, CPU, reference=ref, progress=False, reference_name="reference model fp32.onnx")
    assert str(e.value) == (
        "reference model fp32.onnx: input 'x' expects ?x5 but the data gives 20x6 (dim 0 is the batch); the reference "
        "must take the same inputs as the evaluated model"
    )


def test_report_fields():
    assert [f.name for f in dataclasses.fields(EvaluationReport)] == [
        "num_samples", "top1", "top5", "top1_agreement", "cosine", "sqnr_db", "kl",
        "latency_ms_b1", "latency_ms_batch", "provider", "reference_top1", "reference_top5",
    ]


def test_fixed_batch_model_is_timed_at_its_batch_only():
    model = linear(batch=1)
    x, y = dataset(3)
    data = open_data([{"x": x, "labels": y}], input_specs(model), batch_size=8)
    r = evaluate(model, data, CPU, progress=False)
    assert r.num_samples == 3 and r.latency_ms_b1 > 0 and r.latency_ms_batch is None


def test_fewer_samples_than_latency_batch_are_repeated():
    model = linear()
    x, _ = dataset(2)
    r = evaluate(model, open_data([{"x": x}], input_specs(model)), CPU, latency_batch_size=16, progress=False)
    assert r.latency_ms_batch > 0


def test_data_for_another_model_is_refused():
    model = linear()
    other = {"y": (("N", 6), np.float32)}
    data = open_data([{"y": np.zeros((2, 6), np.float32)}], other)
    with pytest.raises(DataError, match=r"data has inputs y; model inputs are x"):
        evaluate(model, data, CPU, progress=False)


def test_first_output_must_be_logits():
    model = linear(out_shape=(7, 1, 1))  # (N, 7, 1, 1) is not (batch, classes)
    x, y = dataset(4)
    data = open_data([{"x": x, "labels": y}], input_specs(model))
    with pytest.raises(UnsupportedModelError, match=r"first graph output has shape \(4, 7, 1, 1\)"):
        evaluate(model, data, CPU, progress=False)


@pytest.mark.parametrize("optimize", [True, False])
def test_compare_outputs(optimize):
    a, b = linear(seed=0), linear(seed=0)
    bias = numpy_helper.to_array(b.graph.initializer[1]).copy()
    bias[3] += 0.25
    b.graph.initializer[1].CopyFrom(numpy_helper.from_array(bias, "b"))
    x, _ = dataset(10)
    feeds = [{"x": x[:5]}, {"x": x[5:]}]
    d = compare_outputs(a, b, feeds, CPU, optimize=optimize)
    assert d.max_abs == pytest.approx(0.25, rel=1e-5)
    assert d.rel_max_abs == pytest.approx(0.25 / np.abs(forward(a, x)).max(), rel=1e-5)
    assert d.per_output == {"logits": pytest.approx(0.25, rel=1e-5)}
    assert compare_outputs(a, a, feeds, CPU, optimize=optimize).max_abs == 0.0


def load_mnist(first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The README's loader and normalisation: (x / 255 - 0.1307) / 0.3081, NCHW float32."""
    images = np.frombuffer(gzip.open(MNIST / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    labels = np.frombuffer(gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    x = ((images[first : first + count] / 255.0 - 0.1307) / 0.3081).astype(np.float32)
    return x, labels[first : first + count].astype(np.int64)


@pytest.mark.shared
def test_mnist_vit_accuracy_and_self_agreement(tmp_path):
    path = MNIST / "vit_mnist_fp32.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    from onnx_mptq.graph.io import load_model

    model = load_model(path)
    x, y = load_mnist(1000, 500)
    np.savez(tmp_path / "mnist.npz", input=x, labels=y)
    data = open_data(tmp_path / "mnist.npz", input_specs(model), batch_size=64)
    r = evaluate(model, data, RuntimeConfig(providers="cpu", batch_size=32), reference=model, progress=False)
    assert r.num_samples == 500
    assert r.top1 > 90.0 and r.top5 >= r.top1
    assert r.top1_agreement == 100.0 and r.sqnr_db == math.inf and r.cosine == pytest.approx(1.0)
    assert json.loads(r.to_json())["sqnr_db"] is None


@pytest.mark.shared
def test_mnist_png_folder_matches_readme_normalisation(tmp_path):
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("MNIST test set is missing")
    from PIL import Image

    from onnx_mptq.data import parse_preprocess_args

    x, y = load_mnist(1000, 40)
    pixels = np.frombuffer(gzip.open(MNIST / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
    for i in range(40):
        folder = tmp_path / f"class{y[i]}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels[1000 + i], mode="L").save(folder / f"{i:03d}.png")
    spec = parse_preprocess_args(None, size=28, mean=[0.1307], std=[0.3081])
    data = open_data(tmp_path, {"input": (("N", 1, 28, 28), np.float32)}, batch_size=16, preprocess=spec)
    batches = list(data)
    got = np.concatenate([b.inputs["input"] for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    order = sorted(range(40), key=lambda i: (int(y[i]), i))  # class folder by class folder, then file name
    classes = sorted(set(y.tolist()))
    np.testing.assert_allclose(got, x[order], atol=1e-5)
    np.testing.assert_array_equal(labels, [classes.index(int(y[i])) for i in order])
