"""Typed JSON for dataclasses: ``load(cls, data, where)`` checks every field against its annotation and names the
first bad one in a one-line error; ``dump(obj)`` gives plain JSON values (non-finite floats become null).

Supported annotations: int, float, str, bool, dict / list (free-form JSON), list[X], dict[str, X], X | None, unions of
scalars (``int | str``) and nested dataclasses. Keys a dataclass does not know are kept in its ``extra`` field when it
has one (so a newer writer's additions survive a rewrite), and refused otherwise. A field whose metadata says
``TRANSIENT`` lives in memory only: ``dump`` leaves it out (readers of the same schema version never see it).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import ClipadError


class SchemaError(ClipadError):
    """A JSON document does not match the dataclass it should describe."""


_HINTS: dict[type, dict] = {}
TRANSIENT = {"transient": True}   # dataclasses.field(metadata=TRANSIENT): never written


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise SchemaError(f"{where}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except SchemaError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else SchemaError(
            f"{where}: expected {' or '.join(_name(o) for o in options)}, got {type(value).__name__}")
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return load(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{where}: expected a string, got {value!r}")
        return value
    if tp in (dict, list):
        if not isinstance(value, tp):
            raise SchemaError(f"{where}: expected {'an object' if tp is dict else 'a list'}, got "
                              f"{type(value).__name__}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def load(cls, data, where: str):
    """``cls`` built from the JSON object ``data``; ``where`` names the document position for error messages."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known, unknown = {}, {}
    for key, value in data.items():
        if key in fields and key != "extra":
            known[key] = _convert(hints[key], value, f"{where}.{key}")
        else:
            unknown[key] = value
    missing = [name for name, f in fields.items() if name not in known and name != "extra"
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SchemaError(f"{where}: missing {', '.join(missing)}")
    if unknown:
        if "extra" not in fields:
            raise SchemaError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        known["extra"] = unknown
    obj = cls(**known)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def dump(obj):
    """Plain JSON values; a dataclass's ``extra`` keys are merged back in; NaN/inf become null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if f.name != "extra" and not f.metadata.get("transient"):
                out[f.name] = dump(getattr(obj, f.name))
        out.update({k: v for k, v in (getattr(obj, "extra", None) or {}).items() if k not in out})
        return out
    if isinstance(obj, dict):
        return {str(k): dump(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [dump(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalars
        return dump(obj.item())
    return obj
