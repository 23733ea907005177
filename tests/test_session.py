"""ORT session creation: providers, options, errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_mptq.calibrate.session import CPU, CUDA, cuda_unavailable_reason, make_session
from onnx_mptq.config import RuntimeConfig
from onnx_mptq.errors import DataError, ModelLoadError, ProviderError


def classifier(seed: int = 0, features: int = 4, classes: int = 3) -> onnx.ModelProto:
    """x (N, features) -> MatMul W -> Softmax."""
    w = np.random.default_rng(seed).standard_normal((features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm"),
            helper.make_node("Softmax", ["logits"], ["probs"], name="sm", axis=-1),
        ],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_cpu_session_runs_and_reports_provider():
    model = classifier()
    s = make_session(model, RuntimeConfig(providers="cpu"))
    assert s.provider == CPU
    assert s.input_names == ("x",)
    assert s.input_shapes == (("N", 4),)
    assert s.output_names == ("probs",)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    (y,) = s.run({"x": x})
    w = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(y, softmax(x @ w), rtol=1e-5, atol=1e-6)


def test_accepts_bytes_and_path(tmp_path):
    model = classifier()
    p = tmp_path / "m.onnx"
    onnx.save(model, p)
    for src in (model.SerializeToString(), p, str(p)):
        assert make_session(src, RuntimeConfig(providers="cpu")).output_names == ("probs",)


def test_auto_picks_what_really_loads():
    s = make_session(classifier(), RuntimeConfig(providers="auto"))
    assert s.provider == (CPU if cuda_unavailable_reason() is not None else CUDA)


def test_auto_is_quiet_on_cpu_only_machine(capfd):
    cuda_unavailable_reason.cache_clear()
    make_session(classifier(), RuntimeConfig(providers="auto"))
    err = capfd.readouterr().err
    assert "onnxruntime" not in err.lower() and "cuda" not in err.lower()


def test_cuda_raises_provider_error_without_gpu():
    if cuda_unavailable_reason() is None:
        pytest.skip("a usable GPU is present")
    with pytest.raises(ProviderError) as e:
        make_session(classifier(), RuntimeConfig(providers="cuda"))
    assert str(e.value).startswith("CUDAExecutionProvider cannot be loaded on this machine: ")


def test_threads_and_optimization_options(tmp_path):
    opt_path = tmp_path / "opt.onnx"
    s = make_session(classifier(), RuntimeConfig(providers="cpu", threads=1), optimized_model_path=str(opt_path))
    so = s.ort_session.get_session_options()
    assert so.intra_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opt_path.is_file()
    s = make_session(classifier(), RuntimeConfig(providers="cpu"), optimize=False)
    assert s.ort_session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_bad_model_bytes_is_a_one_line_model_load_error():
    with pytest.raises(ModelLoadError) as e:
        make_session(b"this is not a model", RuntimeConfig(providers="cpu"))
    assert str(e.value) == "model: onnxruntime cannot load the model (Failed to load model because protobuf parsing failed.)"
    with pytest.raises(ModelLoadError, match="empty model bytes"):
        make_session(b"", RuntimeConfig(providers="cpu"))


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope\.onnx: no such file$"):
        make_session(tmp_path / "nope.onnx", RuntimeConfig(providers="cpu"))


def test_unsupported_ir_version_names_it():
    model = classifier()
    model.ir_version = 99
    with pytest.raises(ModelLoadError, match="IR version") as e:
        make_session(model, RuntimeConfig(providers="cpu"))
    assert "\n" not in str(e.value)


def test_run_with_wrong_shape_is_a_data_error():
    s = make_session(classifier(), RuntimeConfig(providers="cpu"))
    with pytest.raises(DataError, match="onnxruntime rejected the inputs: .*Got invalid dimensions"):
        s.run({"x": np.zeros((2, 5), np.float32)})
