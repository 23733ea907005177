"""Load/save edge: preflight on load, atomic writes, external data, graph digests.

This is the only module (with tests) that handles protobuf files. Loading never modifies the
file on disk; saving writes to a temporary file in the destination directory and renames it
into place, so a failed run leaves no partial output and an existing file is replaced only on
success. Models whose protobuf would pass 2 GB are written with external data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelLoadError, OutputError, UnsupportedModelError

log = logging.getLogger(__name__)

#: Minimum default-domain opset the tool accepts (QuantizeLinear per-axis needs 13).
MIN_OPSET = 13
_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_THRESHOLD = 1024  # bytes: tensors at least this big go to the external file


def _check_external_locations(model: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    base = base_dir.resolve()
    tensors = list(onnx.external_data_helper._get_all_tensors(model))  # noqa: SLF001 - onnx offers no public iterator
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        p = Path(loc)
        if p.is_absolute() or ".." in p.parts:
            raise ModelLoadError(
                f"{path}: initializer {t.name!r} points its external data outside the model's "
                f"directory ({loc!r}); refusing to read it"
            )
        target = (base / p).resolve()
        if base not in target.parents and target != base:
            raise ModelLoadError(f"{path}: external data {loc!r} of {t.name!r} leaves the model's directory")
        if not target.is_file():
            raise ModelLoadError(f"{path}: external data file {loc!r} of initializer {t.name!r} is missing")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (with its external data), refusing unsafe or corrupt input.

    Order matters: the opset is checked before the ONNX checker (an old export should hear
    "re-export", not a schema complaint), external-data locations before anything reads them, and
    the checker runs on the file (so it also works for models whose weights pass 2 GB)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if not p.is_file():
        raise ModelLoadError(f"{p}: not a file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{p}: not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    if len(model.graph.node) == 0 and len(model.graph.initializer) == 0:
        raise ModelLoadError(f"{p}: not a readable ONNX model (empty or corrupt graph)")
    _check_opset(model, str(p))
    _check_external_locations(model, p.parent, p)
    _run_checker(str(p), str(p))
    _check_float32(model, str(p))
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as e:
        raise ModelLoadError(f"{p}: cannot read external data ({e})") from None
    return model


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def preflight(model: onnx.ModelProto, where: str = "model") -> None:
    """Checks every stage relies on: opset, well-formed graph, float32 inputs/outputs/weights."""
    _check_opset(model, where)
    try:
        too_big = model.ByteSize() > _PROTOBUF_LIMIT
    except Exception:  # noqa: BLE001 - ByteSize itself can fail past 2 GB
        too_big = True
    if too_big:  # the checker serializes the proto; load_model checks such models by path
        log.debug("%s: passes 2 GB in memory; skipping the ONNX checker", where)
    else:
        _run_checker(model, where)
    _check_float32(model, where)


def _check_opset(model: onnx.ModelProto, where: str) -> None:
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {opset} is too old: QDQ with per-channel weight scales needs opset >= {MIN_OPSET} "
            f"(every bit width, 2 to 8, is stored in int8/uint8, so no newer opset is needed); re-export with a "
            f"newer opset, e.g. `onnx-mptq export NAME --opset 17` or torch.onnx.export(..., opset_version=17)"
        )


def _run_checker(target: onnx.ModelProto | str, where: str) -> None:
    try:
        onnx.checker.check_model(target, full_check=False)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise ModelLoadError(f"{where}: fails the ONNX checker: {first[:200]}") from None


def _check_float32(model: onnx.ModelProto, where: str) -> None:
    inits = {i.name for i in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT:
            name = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "unknown"
            raise UnsupportedModelError(
                f"{where}: graph {'input' if vi in model.graph.input else 'output'} {vi.name!r} is {name}; "
                f"only float32 models can be quantized (convert the model to float32 first)"
            )
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE):
            raise UnsupportedModelError(
                f"{where}: initializer {init.name!r} is {onnx.TensorProto.DataType.Name(init.data_type)}; "
                f"only float32 models can be quantized"
            )


def graph_digest(model: onnx.ModelProto) -> str:
    """A digest of the graph's structure and weights: binds plans and records to one model."""
    h = hashlib.sha256()
    g = model.graph
    for vi in g.input:
        h.update(b"in:" + vi.name.encode())
    for vi in g.output:
        h.update(b"out:" + vi.name.encode())
    for n in g.node:
        h.update(f"n:{n.name}:{n.op_type}:{','.join(n.input)}:{','.join(n.output)}".encode())
    for init in sorted(g.initializer, key=lambda t: t.name):
        arr = numpy_helper.to_array(init)
        h.update(f"i:{init.name}:{arr.dtype}:{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def _byte_size(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def _check_destination(dest: Path) -> None:
    if dest.is_dir():
        raise OutputError(f"{dest}: is a folder; give a file name for the output")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{dest}: cannot create its folder ({e.strerror or e})") from None


def _file_mode(dest: Path) -> int:
    """The mode a new file gets (0o666 minus the umask), or the replaced file's own mode."""
    try:
        return stat.S_IMODE(dest.stat().st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` atomically. External data is used when asked or when the model passes 2 GB.

    Everything is written into a temporary folder next to ``path`` and renamed into place (the
    external data file, ``<name>.data``, first), so an interrupted or failed write leaves no
    partial file and an existing output is replaced only once the new one is complete."""
    dest = Path(path)
    _check_destination(dest)
    if external_data is None:
        try:
            external_data = _byte_size(model) >= _PROTOBUF_LIMIT
        except Exception:  # ByteSize itself can fail past 2 GB
            external_data = True
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise OutputError(f"{dest}: cannot write there ({e.strerror or e})") from None
    try:
        tmp_model = tmp_dir / dest.name
        data_name = dest.name + ".data"
        if external_data:
            m = onnx.ModelProto()
            m.CopyFrom(model)
            onnx.save_model(
                m,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=_EXTERNAL_THRESHOLD,
            )
            del m
            os.chmod(tmp_dir / data_name, _file_mode(dest.parent / data_name))
            os.chmod(tmp_model, _file_mode(dest))
            os.replace(tmp_dir / data_name, dest.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
            os.chmod(tmp_model, _file_mode(dest))
        os.replace(tmp_model, dest)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write the model ({e.strerror or e})") from None
    finally:
        for f in tmp_dir.iterdir() if tmp_dir.exists() else []:
            f.unlink()
        if tmp_dir.exists():
            tmp_dir.rmdir()
    return dest


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file next to ``path`` and rename it into place."""
    dest = Path(path)
    _check_destination(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write there ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _file_mode(dest))
        os.replace(tmp, dest)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def model_file_bytes(model: onnx.ModelProto) -> int:
    """Bytes :func:`save_model` writes for ``model`` below 2 GB (the serialized proto): the real
    file size, known before the file exists (e.g. for a report written before the model)."""
    return int(model.ByteSize())


def file_size(path: str | os.PathLike) -> int:
    """Bytes a saved model takes on disk: the .onnx file plus its external data file, if any."""
    p = Path(path)
    size = p.stat().st_size
    data = p.parent / (p.name + ".data")
    return size + (data.stat().st_size if data.is_file() else 0)


def size_line(path: str | os.PathLike, reference: str | os.PathLike) -> str:
    """``file size: 3.145 MB (FP32 12.6 MB: 24.9 %)``, from the files on disk (MB = 10^6 bytes)."""
    q, f = file_size(path), file_size(reference)
    return f"file size: {q / 1e6:.3f} MB (FP32 {f / 1e6:.3f} MB: {100.0 * q / f:.1f} %)"


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def assign_node_names(model: onnx.ModelProto) -> int:
    """Give every unnamed or duplicate-named node a unique name; returns how many changed.

    Mutates the given proto (callers pass their own copy, never the user's file)."""
    seen: set[str] = set()
    changed = 0
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            base = n.name or f"{n.op_type}"
            cand = f"{base}_{i}"
            while cand in seen:
                cand += "_"
            n.name = cand
            changed += 1
        seen.add(n.name)
    return changed
