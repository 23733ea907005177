"""The one place that creates ONNX Runtime sessions.

``make_session`` turns a model (proto, serialized bytes or a path) and a :class:`RuntimeConfig`
into a :class:`Session`: the ``InferenceSession`` plus the provider that *really* runs it, the
input/output names and a ``run`` that returns a list of arrays.

Provider choice:

- ``cpu``: ``CPUExecutionProvider``.
- ``cuda``: ``CUDAExecutionProvider`` or :class:`ProviderError` saying why it cannot load.
- ``auto``: CUDA only where it really loads, else CPU. ORT wheels list ``CUDAExecutionProvider``
  as available even on machines without a GPU, and trying it there prints error lines, so cheap
  checks come first (the provider is compiled in, the NVIDIA driver library loads with ctypes,
  ``cuInit`` succeeds and sees a device), then one probe session on a tiny model with ORT's
  logging silenced, whose ``get_providers()[0]`` must be CUDA. The verdict is cached per process;
  every real session is verified again.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from ..config import Providers, RuntimeConfig
from ..errors import DataError, ModelLoadError, ProviderError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_QUIET = 4  # ORT severity FATAL: silences the error lines of a failed provider load
_ORT_DEFAULT_SEVERITY = 2  # ORT's own default (WARNING), restored after a quiet attempt

ModelLike = onnx.ModelProto | bytes | str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Session:
    """An ORT session and what callers need to know about it."""

    ort_session: ort.InferenceSession
    provider: str  # the provider that really runs the graph: CPUExecutionProvider or CUDAExecutionProvider
    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int | str | None, ...], ...]  # None or a symbol name for dynamic dims
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run the graph; returns the requested outputs (all graph outputs by default) in order."""
        try:
            return self.ort_session.run(list(output_names) if output_names is not None else None, dict(feeds))
        except ort_state.InvalidArgument as e:
            raise DataError(f"onnxruntime rejected the inputs: {_ort_message(e)}") from None
        except ort_state.Fail as e:
            # a run-time failure that shape inference could not foresee: almost always data whose
            # shape the graph cannot take (e.g. a spatial size its reshapes do not allow)
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
            raise DataError(f"onnxruntime failed running the model on inputs {shapes}: {_ort_message(e)}") from None


def _ort_message(e: BaseException) -> str:
    """ORT's message without the '[ONNXRuntimeError] : N : CODE :' prefix and source locations."""
    text = " ".join(str(e).split())
    if "[ONNXRuntimeError]" in text:
        parts = text.split(" : ", 3)
        text = parts[-1] if len(parts) == 4 else text
    return text[:300]


def _tiny_model_bytes() -> bytes:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=7)
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def cpu_u8s8_exact() -> bool:
    """Whether ORT's CPU ``uint8 x int8`` integer matmul is exact here for full 8-bit weight codes.

    x86 CPUs with AVX2 or AVX-512 but without VNNI sum adjacent ``u8 x s8`` products in int16
    with saturation, so weight codes beyond +-64 give wrong results there (see
    :mod:`onnx_mptq.passes.emit_qdq`, "Weights on CPUs without VNNI"). Probed once per process
    with the worst case (activation codes 255, weight codes 127 and -127)."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = 64, 2
    w = np.full((k, n), 127, np.int8)
    w[:, 1] = -127
    x = np.full((2, k), 255, np.uint8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"]),
         helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "u8s8_probe", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [numpy_helper.from_array(np.float32(1.0), "xs"), numpy_helper.from_array(np.uint8(0), "xz"),
         numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.ones(n, np.float32), "ws"),
         numpy_helper.from_array(np.zeros(n, np.int8), "wz")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = _quiet_session(model.SerializeToString(), options, [CPU])
    got = sess.run(None, {"xq": x})[0]
    exact = bool(np.array_equal(got, x.astype(np.float32) @ w.astype(np.float32)))
    if not exact:
        log.info("this CPU's uint8 x int8 kernel saturates (no VNNI): 8-bit weights are evaluated as uint8 + 128")
    return exact


def _driver_unavailable_reason() -> str | None:
    """Cheap checks, no ORT involved: the driver library loads and sees a CUDA device."""
    libname = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        lib = ctypes.CDLL(libname)
    except OSError:
        return f"the NVIDIA driver library {libname} cannot be loaded (no NVIDIA driver or GPU)"
    try:
        rc = lib.cuInit(0)
        if rc != 0:
            return f"cuInit failed with CUDA error {rc} (no usable GPU visible)"
        count = ctypes.c_int(0)
        rc = lib.cuDeviceGetCount(ctypes.byref(count))
        if rc != 0:
            return f"cuDeviceGetCount failed with CUDA error {rc}"
        if count.value < 1:
            return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES)"
    except AttributeError:  # an unusual driver library: let the probe session decide
        return None
    return None


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """Why CUDAExecutionProvider cannot run here, or None when it can. Cached per process."""
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    reason = _driver_unavailable_reason()
    if reason is not None:
        return reason
    try:
        sess = _quiet_session(_tiny_model_bytes(), ort.SessionOptions(), [CUDA, CPU])
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        return f"a probe session failed ({_ort_message(e)})"
    if sess.get_providers()[0] != CUDA:
        return (
            "onnxruntime could not create the CUDA provider (missing CUDA/cuDNN libraries of the "
            "version this onnxruntime-gpu needs?)"
        )
    return None


def planned_provider(runtime: RuntimeConfig) -> str:
    """The provider sessions for ``runtime`` run on (CUDA only where it really loads)."""
    choice = Providers(runtime.providers)
    if choice is Providers.CPU:
        return CPU
    reason = cuda_unavailable_reason()
    if reason is None:
        return CUDA
    if choice is Providers.CUDA:
        raise ProviderError(f"CUDAExecutionProvider cannot be loaded on this machine: {reason}")
    return CPU


def _quiet_session(model: bytes | str, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """Create a session with ORT's logging silenced, for attempts that may fail noisily."""
    options.log_severity_level = _QUIET
    ort.set_default_logger_severity(_QUIET)
    try:
        return ort.InferenceSession(model, options, providers=providers)
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _model_source(model: ModelLike) -> tuple[bytes | str, str]:
    """What ORT loads (bytes, or a path so external data resolves) and a name for messages."""
    if isinstance(model, onnx.ModelProto):
        try:
            return model.SerializeToString(), "model"
        except Exception as e:  # noqa: BLE001 - protobuf refuses > 2 GB
            raise ModelLoadError(
                f"model: cannot serialize the model for onnxruntime ({type(e).__name__}); "
                f"pass the path of a model saved with external data instead"
            ) from None
    if isinstance(model, (bytes, bytearray)):
        if not model:
            raise ModelLoadError("model: empty model bytes")
        return bytes(model), "model"
    p = Path(model)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such file")
    return str(p), str(p)


def _options(runtime: RuntimeConfig, optimize: bool, optimized_model_path: str | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if runtime.threads > 0:
        so.intra_op_num_threads = runtime.threads
        so.inter_op_num_threads = 1
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def _wrap(sess: ort.InferenceSession) -> Session:
    inputs = sess.get_inputs()
    shapes = tuple(tuple(d if isinstance(d, (int, str)) else None for d in i.shape) for i in inputs)
    return Session(
        ort_session=sess,
        provider=sess.get_providers()[0],
        input_names=tuple(i.name for i in inputs),
        input_shapes=shapes,
        output_names=tuple(o.name for o in sess.get_outputs()),
    )


def make_session(
    model: ModelLike,
    runtime: RuntimeConfig,
    *,
    optimize: bool = True,
    optimized_model_path: str | None = None,
) -> Session:
    """Create an ORT session for ``model`` on the provider ``runtime.providers`` selects.

    ``optimize=False`` disables ORT's graph optimizations (numerical invariance tests run both).
    ``optimized_model_path`` makes ORT write the optimized graph there (a debugging aid).
    """
    source, where = _model_source(model)
    choice = Providers(runtime.providers)
    if choice is Providers.CUDA:
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ProviderError(f"CUDAExecutionProvider cannot be loaded on this machine: {reason}")
    use_cuda = choice is Providers.CUDA or (choice is Providers.AUTO and cuda_unavailable_reason() is None)

    if use_cuda:
        try:
            sess = _quiet_session(source, _options(runtime, optimize, optimized_model_path), [CUDA, CPU])
        except Exception as e:  # noqa: BLE001 - retried on CPU below, which reports model errors
            log.debug("CUDA session failed: %s", _ort_message(e))
            sess = None
        if sess is not None and sess.get_providers()[0] == CUDA:
            log.debug("session on %s", CUDA)
            return _wrap(sess)
        if choice is Providers.CUDA:
            # Tell a model error apart from a provider error: a model CPU cannot load is the model's fault.
            _create_cpu(source, where, runtime, optimize, optimized_model_path)
            raise ProviderError(
                "CUDAExecutionProvider cannot be loaded on this machine: onnxruntime fell back to the "
                "CPU for this model"
            )
        log.warning("CUDAExecutionProvider did not load for this model; running on the CPU")
    return _wrap(_create_cpu(source, where, runtime, optimize, optimized_model_path))


def _create_cpu(
    source: bytes | str, where: str, runtime: RuntimeConfig, optimize: bool, optimized_model_path: str | None
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, _options(runtime, optimize, optimized_model_path), providers=[CPU])
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind exception types
        raise ModelLoadError(f"{where}: onnxruntime cannot load the model ({_ort_message(e)})") from None
