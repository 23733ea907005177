"""Where the bytes of an ONNX file go: initializers by role, and the graph's own proto overhead.

    python tools/file_size.py A.onnx [B.onnx ...] [--json OUT.json]

Each initializer is put in one category by what reads it (following Cast / Identity chains to the
real consumer): ``weight codes`` (input 0 of a weight DequantizeLinear, int8 / uint8 / int4),
``weight scales`` / ``weight zero points`` (inputs 1 / 2 of a DequantizeLinear with more than one
element), ``activation q params`` (the scalars of activation Q / DQ / Clip nodes), ``layernorm``
(LayerNormalization scale / bias), ``bias`` (1-D float read by an Add, Conv B or Gemm C),
``embeddings`` (float constants of two or more dimensions that are not weights: position
embeddings, cls / distillation tokens), ``float weights`` (a float MatMul / Gemm / Conv weight left
unquantized) and ``other``. A category's bytes are the serialized TensorProtos (data, name, dims,
tags). Then the graph's own fields: nodes split into their names, their tensor references
(input / output strings), attributes and protobuf framing; ``Constant`` nodes' values; value_info;
doc strings; metadata. The sum of all rows is the file size (``ModelProto.ByteSize()``), up to the
few bytes of the top-level framing, which is the ``rest`` row.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

PASS_THROUGH = {"Cast", "Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = collections.defaultdict(list)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name:
                out[name].append((n, i))
    return out


def _final_consumers(name: str, cons) -> list[tuple[onnx.NodeProto, int]]:
    """Consumers of ``name``, looking through pass-through ops (Cast int4 -> int8 and the like)."""
    res, todo, seen = [], [name], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for n, i in cons.get(t, []):
            if n.op_type in PASS_THROUGH and i == 0:
                todo.extend(n.output)
            else:
                res.append((n, i))
    return res


def categorize(t: onnx.TensorProto, cons) -> str:
    users = _final_consumers(t.name, cons)
    dims = list(t.dims)
    size = int(np.prod(dims)) if dims else 1
    is_float = t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    for n, i in users:
        if n.op_type == "DequantizeLinear" and i == 0 and len(dims) >= 2:
            return "weight codes"
        if n.op_type == "DequantizeLinear" and i in (1, 2) and size > 1:
            return "weight scales" if i == 1 else "weight zero points"
    if users and all(n.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip") for n, _ in users) and size == 1:
        return "activation q params"
    if any(n.op_type == "LayerNormalization" and i in (1, 2) for n, i in users):
        return "layernorm"
    if is_float and len(dims) >= 2 and size > 1:
        if any(n.op_type in ("MatMul", "Gemm", "Conv") and i == 1 for n, i in users):
            return "float weights"
        return "embeddings"
    if is_float and size > 1 and any((n.op_type == "Add") or (n.op_type in ("Conv", "Gemm") and i == 2)
                                     for n, i in users):
        return "bias"
    return "other"


def breakdown(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    cons = _consumers(g)
    rows: dict[str, int] = collections.Counter()
    for t in g.initializer:
        rows["init: " + categorize(t, cons)] += t.ByteSize()
    for n in g.node:
        if n.op_type == "Constant":
            rows["graph: Constant node values"] += n.ByteSize()
            continue
        name = len(n.name.encode())
        refs = sum(len(s.encode()) for s in list(n.input) + list(n.output))
        attrs = sum(a.ByteSize() for a in n.attribute)
        doc = len(n.doc_string.encode())
        rows["graph: node names"] += name
        rows["graph: node tensor references"] += refs
        rows["graph: node attributes"] += attrs
        rows["graph: doc strings"] += doc
        rows["graph: node op types and framing"] += n.ByteSize() - name - refs - attrs - doc
    rows["graph: value_info"] += sum(v.ByteSize() for v in g.value_info)
    rows["graph: inputs / outputs"] += sum(v.ByteSize() for v in list(g.input) + list(g.output))
    rows["graph: doc strings"] += len(g.doc_string.encode()) + len(model.doc_string.encode())
    rows["model: metadata"] += sum(p.ByteSize() for p in model.metadata_props)
    total = model.ByteSize()
    rows["rest (framing, opsets, producer)"] = total - sum(rows.values())
    rows["total"] = total
    return dict(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    tables = {str(p): breakdown(onnx.load(str(p))) for p in args.models}
    keys = sorted({k for t in tables.values() for k in t if k != "total"}) + ["total"]
    names = [p.name for p in args.models]
    if len(set(names)) < len(names):  # the same file name in two folders: show the paths
        names = [str(p) for p in args.models]
    w = max(len(k) for k in keys)
    sys.stdout.write(f"{'bytes':<{w}}  " + "  ".join(f"{n:>22} " for n in names) + "\n")
    for k in keys:
        cells = []
        for p in args.models:
            t = tables[str(p)]
            v = t.get(k, 0)
            cells.append(f"{v:>12,} {100 * v / t['total']:>5.1f} %  ")
        sys.stdout.write(f"{k:<{w}}  " + "".join(cells) + "\n")
    if args.json:
        args.json.write_text(json.dumps(tables, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
