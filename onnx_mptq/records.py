"""Typed, serialisable records handed from stage to stage.

Every record is a frozen dataclass with a ``kind`` and a schema version; ``to_json`` /
``from_json`` round-trip it. Records that describe a graph carry the graph's digest
(:func:`onnx_mptq.graph.io.graph_digest`) so a stale record cannot be applied to another model.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from typing import Any, ClassVar, TypeVar

import numpy as np

from .errors import PlanError, quote

T = TypeVar("T", bound="Record")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.ndarray):
        return [_to_plain(v) for v in value.tolist()]
    if isinstance(value, (np.floating,)):
        return _to_plain(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return value
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    return value


def _from_plain(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        last_err: Exception | None = None
        for a in non_none:
            try:
                return _from_plain(a, value, where)
            except (PlanError, TypeError, ValueError, KeyError) as e:  # try the next member
                last_err = e
        raise PlanError(f"{where}: cannot read {quote(value)} ({last_err})")
    if origin is tuple:
        if not isinstance(value, list):
            raise PlanError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_plain(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_from_plain(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        return [_from_plain(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _from_plain(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise PlanError(f"{where}: {value!r} is not one of {allowed}") from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PlanError(f"{where}: expected an object, got {type(value).__name__}")
        return _dataclass_from_plain(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise PlanError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise PlanError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise PlanError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _dataclass_from_plain(cls: Any, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields) - {"kind", "schema_version"})
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _from_plain(hints[name], data[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise PlanError(f"{where}: missing field {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of stage records: JSON round trip with a kind and a schema version."""

    KIND: ClassVar[str] = "record"
    SCHEMA_VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict:
        body = _to_plain(self)
        return {"kind": self.KIND, "schema_version": self.SCHEMA_VERSION, **body}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        if not isinstance(data, dict):
            raise PlanError(f"{cls.KIND}: expected a JSON object")
        kind = data.get("kind")
        if kind != cls.KIND:
            raise PlanError(f"expected a {cls.KIND!r} document, got kind {kind!r}")
        version = data.get("schema_version")
        if version != cls.SCHEMA_VERSION:
            raise PlanError(
                f"{cls.KIND}: schema_version {version!r} is not supported (this version reads "
                f"{cls.SCHEMA_VERSION})"
            )
        return _dataclass_from_plain(cls, data, cls.KIND)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{cls.KIND}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data)
