"""Small edits of ONNX protos that several layers need (copies; the caller's model is untouched)."""

from __future__ import annotations

from collections.abc import Sequence

import onnx


def produced_tensors(model: onnx.ModelProto, *, inputs: bool = True) -> set[str]:
    """Names of every tensor a node of ``model`` produces, and (``inputs``) its graph inputs."""
    out = {o for n in model.graph.node for o in n.output if o}
    if inputs:
        out.update(i.name for i in model.graph.input)
    return out


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors`` (float32, shape left to the
    runtime), in order after the existing outputs; a tensor already an output is not repeated.
    Callers check beforehand that the tensors exist (:func:`produced_tensors`)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
            existing.add(t)
    return m


__all__ = ["produced_tensors", "with_outputs"]
