"""Building frozen configuration dataclasses from YAML with strict validation.

Each subpackage keeps its configuration as a frozen dataclass next to the code it configures;
:mod:`medgn.config` composes them. This module turns nested mappings (from YAML and
``--set section.key=value`` overrides) into those dataclasses, failing with a
:class:`~medgn.errors.UsageError` that names the full key, the value given and the valid choices
for unknown keys, wrong types and out-of-range values. Ranges and choices are declared on the field:
``field(default=1, metadata={"min": 1, "max": 2})`` or a ``Literal[...]`` type; a ``"hint"`` entry
(``"0 = no budget"``) is added to the range error. Every float must be finite and every integer fit
64 bits. YAML files and override values are read by :mod:`medgn.config_yaml` (YAML 1.2 core-schema
scalars: only ``true``/``false`` are booleans, ``010`` is ten, no base-60; bounded in size, nesting
and alias expansion); ``load_yaml`` and ``dump_yaml`` are re-exported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from medgn.config_yaml import (  # noqa: F401 - MAX_CONFIG_DEPTH, load_yaml and dump_yaml are re-exported
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    check_plain,
    dump_yaml,
    load_yaml,
    read_yaml_text,
    yaml_problem,
)
from medgn.errors import UsageError

T = TypeVar("T")

_NONE = type(None)
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Integers a config may hold without a declared range: what a C long (torch, numpy) holds.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _shown(value: Any) -> Any:
    """``value`` for an error message: a huge integer abbreviated to its first digits and length."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        if value.bit_length() > 14_000:  # str() refuses beyond 4300 digits
            return f"an integer of {value.bit_length()} bits"
        digits = str(abs(value))
        return f"{'-' if value < 0 else ''}{digits[:6]}... ({len(digits)} digits)"
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "value"
        return f"a list of {inner}"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    if tp is _NONE:
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and return it in canonical form (tuples for lists)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads off/on/no/yes as booleans; map back onto a string choice.
            spelled = ("off", "no", "false") if value is False else ("on", "yes", "true")
            value = next((c for c in choices if isinstance(c, str) and c.lower() in spelled), value)
        if value not in choices:
            raise UsageError(key, "invalid value", got=value, expected="one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if _NONE in args:
                return None
            raise UsageError(key, "value must not be null", expected=_type_name(tp))
        errors = []
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return _coerce(value, arg, key)
            except UsageError as exc:
                errors.append(exc)
        raise UsageError(key, "wrong type", got=value, expected=_type_name(tp))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise UsageError(key, "wrong type", got=value, expected=_type_name(tp))
        return build(tp, value, prefix=key)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise UsageError(key, "wrong type", got=value, expected=_type_name(tp))
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UsageError(key, "wrong length", got=list(value), expected=f"{len(args)} items")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise UsageError(key, "wrong type", got=value, expected="a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(key, "wrong type", got=value, expected="true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(key, "wrong type", got=_shown(value), expected="an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = value.strip()  # a quoted number ("1e-3")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(key, "wrong type", got=value, expected="a number")
        try:
            return float(value)
        except OverflowError:  # an integer beyond 1.8e308
            raise UsageError(key, "number too large", got=_shown(value), expected="a finite number") from None
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(key, "wrong type", got=value, expected="a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UsageError(key, "wrong type", got=value, expected=_type_name(tp))
    return value


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    """Every number of ``value`` (a number or a tuple of them) is finite and inside the field's range."""
    if value is None:
        return
    items = value if isinstance(value, tuple) else (value,)
    hint = f"; {meta['hint']}" if meta.get("hint") else ""
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(item, int):  # beyond 64 bits no tensor, array or C call can take it
            lo = _INT_MIN if lo is None else lo
            hi = _INT_MAX if hi is None else hi
        rule = f"{lo if lo is not None else '-inf'} <= value <= {hi if hi is not None else 'inf'}"
        if item != item:  # NaN: every comparison below would be false
            raise UsageError(key, "value is NaN", got=value, expected=f"a finite number, {rule}{hint}")
        if isinstance(item, float) and not math.isfinite(item):
            # No field gives infinity a meaning: "never" or "no limit" is spelled as the hint says.
            raise UsageError(key, "value is infinite", got=value, expected=f"a finite number, {rule}{hint}")
        if (lo is not None and item < lo) or (hi is not None and item > hi):
            raise UsageError(key, "value out of range", got=_shown(value), expected=rule + hint)


def build(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating every key.

    Args:
        cls: a (frozen) dataclass type.
        data: mapping of field names to values; missing fields take their defaults.
        prefix: dotted key of this section, used in error messages.

    Raises:
        UsageError: unknown key, wrong type, value out of range, or a required key missing.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise UsageError(prefix or "config", "wrong type", got=data, expected=_type_name(cls))
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise UsageError(full, "unknown key", expected="one of " + ", ".join(sorted(fields)))
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _coerce(data[name], hints[name], full)
            _check_range(value, field.metadata, full)
            kwargs[name] = value
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UsageError(full, "required key missing", expected=_type_name(hints[name]))
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ cross-field checks
        raise UsageError(prefix or cls.__name__, str(exc)) from exc


def to_dict(obj: Any) -> Any:
    """Plain JSON/YAML-able form of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (``3``, ``1e-3``, ``[1,2]``, ``true``)."""
    if "=" not in text:
        raise UsageError(text, "override must look like section.key=value", got=text, expected="KEY=VALUE")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UsageError(text, "override key is empty or malformed", got=key, expected="section.key")
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(key, "override value is too long", expected=f"<= {MAX_CONFIG_BYTES} bytes")
    try:
        value = read_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        shown = raw if len(raw) <= 80 else raw[:60] + f"... ({len(raw)} characters)"
        raise UsageError(key, f"override value is not valid YAML{yaml_problem(exc, lines=False)}", got=shown) from exc
    check_plain(key, value, prefix=key)
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with every ``a.b=value`` override applied."""
    result = json.loads(json.dumps(data)) if data else {}
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UsageError(".".join(parts[: i + 1]), "is a value, not a section", got=child)
            node = child
        node[parts[-1]] = value
    return result


def config_hash(data: Any) -> str:
    """sha256 of the canonical JSON form of a config (dataclass or mapping)."""
    canonical = json.dumps(to_dict(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


__all__ = [
    "apply_overrides",
    "build",
    "config_hash",
    "dump_yaml",
    "load_yaml",
    "parse_override",
    "to_dict",
]

_ = typing  # keep typing imported for get_type_hints on string annotations
