"""Fresh names for the tensors and nodes a pass adds."""

from __future__ import annotations

import onnx_graphsurgeon as gs


class UniqueNames:
    """``names(base)``: ``base``, else ``base_1``, ``base_2``, ... -- the first not yet used by a
    tensor or node of the graph (as it was when this was made) or by an earlier call."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used: set[str] = set(graph.tensors()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name
