"""Dependency direction and package hygiene, checked mechanically on the source."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "onnx_mptq"

# layer -> packages of onnx_mptq it must not import
# (evaluate/ sits below search and above passes, graph and calibrate's session: the searches'
# evaluation graph and evaluator, not the emitted model)
FORBIDDEN = {
    "numerics": {"graph", "passes", "calibrate", "evaluate", "search", "pipeline", "cli", "validate", "export", "data",
                 "report"},
    "graph": {"passes", "calibrate", "evaluate", "search", "pipeline", "cli", "validate", "export", "report"},
    "passes": {"calibrate", "evaluate", "search", "pipeline", "cli", "validate", "export", "report"},
    "calibrate": {"evaluate", "search", "pipeline", "cli", "report"},
    "evaluate": {"search", "pipeline", "cli", "validate", "export", "report"},
    "search": {"pipeline", "cli", "report"},
    "pipeline": {"cli", "report", "demo"},  # the stage order only: no shell, no rendering
    "report": {"calibrate", "search", "passes", "validate", "cli", "demo"},  # renders records, runs nothing
}
ORT_ALLOWED = {"calibrate", "evaluate", "validate"}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        yield rel, ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.AST, rel: Path) -> set[tuple[str, str]]:
    """(absolute-ish module, top-level onnx_mptq subpackage or '') for every import."""
    out: set[tuple[str, str]] = set()
    pkg_parts = list(rel.parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.add((a.name, a.name.split(".")[1] if a.name.startswith("onnx_mptq.") else ""))
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                full = ".".join(["onnx_mptq", *base, *([mod] if mod else [])])
                if not mod:
                    for a in node.names:
                        out.add((f"{full}.{a.name}", (base + [a.name])[0] if (base or [a.name]) else ""))
                    continue
                parts = full.split(".")
                out.add((full, parts[1] if len(parts) > 1 else ""))
            else:
                out.add((mod, mod.split(".")[1] if mod.startswith("onnx_mptq.") and len(mod.split(".")) > 1 else ""))
    return out


@pytest.mark.parametrize("rel,tree", list(_modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_dependency_direction(rel: Path, tree: ast.AST) -> None:
    layer = rel.parts[0].removesuffix(".py")
    for mod, sub in _imports(tree, rel):
        if mod.split(".")[0] == "onnxruntime":
            assert layer in ORT_ALLOWED, f"{rel} imports onnxruntime; only calibrate/, evaluate/ and validate.py may"
        if layer in FORBIDDEN and sub:
            assert sub.removesuffix(".py") not in FORBIDDEN[layer], f"{rel} ({layer}) imports onnx_mptq.{sub}"


def test_search_modules_do_not_import_onnxruntime_at_import_time() -> None:
    """The searches reach ONNX Runtime only when they evaluate (lazily, through evaluate/)."""
    mods = sorted(f"onnx_mptq.search.{p.stem}" for p in (PKG / "search").glob("*.py")) + ["onnx_mptq.evaluate.factory",
                                                                                         "onnx_mptq.evaluate.fakequant"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + \
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'onnxruntime'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PKG.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    assert out.stdout.strip() == "[]", f"importing {', '.join(mods)} imports {out.stdout.strip()}"


def test_numerics_is_numpy_only() -> None:
    for path in sorted((PKG / "numerics").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] not in {"onnx", "onnxruntime", "onnx_graphsurgeon", "torch"}, f"{path.name} imports {n}"


def test_no_print_and_no_logging_config_outside_the_cli() -> None:
    for rel, tree in _modules():
        if rel.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                pytest.fail(f"{rel}:{node.lineno} calls print")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "basicConfig":
                pytest.fail(f"{rel}:{node.lineno} configures logging")
