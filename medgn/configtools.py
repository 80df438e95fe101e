"""Building frozen configuration dataclasses from YAML with strict validation.

Each subpackage keeps its configuration as a frozen dataclass next to the code it configures;
:mod:`medgn.config` composes them. This module turns nested mappings (from YAML and
``--set section.key=value`` overrides) into those dataclasses, failing with a
:class:`~medgn.errors.UsageError` that names the full key, the value given and the valid choices
for unknown keys, wrong types and out-of-range values. Ranges and choices are declared on the field:
``field(default=1, metadata={"min": 1, "max": 2})`` or a ``Literal[...]`` type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from medgn.errors import UsageError

T = TypeVar("T")

_NONE = type(None)
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


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
            raise UsageError(key, "wrong type", got=value, expected="an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-3" as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(key, "wrong type", got=value, expected="a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(key, "wrong type", got=value, expected="a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UsageError(key, "wrong type", got=value, expected=_type_name(tp))
    return value


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if item != item:  # NaN: every comparison below would be false
            raise UsageError(key, "value is NaN", got=value, expected="a number")
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and item < lo) or (hi is not None and item > hi):
            rule = f"{lo if lo is not None else '-inf'} <= value <= {hi if hi is not None else 'inf'}"
            raise UsageError(key, "value out of range", got=value, expected=rule)


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
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UsageError(key, "override value is not valid YAML", got=raw) from exc
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


# A config is a few KiB; these bound what a hostile file (or /dev/zero) costs to read and expand.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000  # values after YAML aliases are expanded ("billion laughs")


def _check_plain(path: Path, data: Any) -> None:
    """Every value is JSON's kind (mapping, list, text, number, bool, null), and not too many.

    YAML also reads dates, binary and sets, and aliases can expand a small file to billions of
    values; the config is stored and hashed as JSON, so such a file is refused here.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    seen = 0
    while stack:
        where, value = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise UsageError(
                path, "config holds too many values (YAML aliases nested?)", expected=f"<= {MAX_CONFIG_VALUES}"
            )
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise UsageError(
                path,
                f"config value {where or '(top)'} is a YAML {type(value).__name__}",
                got=str(value)[:60],
                expected="text, a number, true/false, a list or a mapping (quote a date to make it text)",
            )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a list or mapping as a key: YAML's own loader refuses it as unhashable
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (YAML would silently keep the last)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise UsageError(path, "config is not a regular file", expected="a YAML file")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UsageError(path, "config file is too large", expected=f"<= {MAX_CONFIG_BYTES} bytes")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(path, "config file not found", expected="an existing YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(path, f"cannot read config file ({exc})") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise UsageError(path, f"invalid YAML{where}" + (f": {problem}" if problem else "")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(path, "config must be a mapping of sections", got=type(data).__name__)
    _check_plain(path, data)
    return data


def config_hash(data: Any) -> str:
    """sha256 of the canonical JSON form of a config (dataclass or mapping)."""
    canonical = json.dumps(to_dict(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


__all__ = [
    "apply_overrides",
    "build",
    "config_hash",
    "load_yaml",
    "parse_override",
    "to_dict",
]

_ = typing  # keep typing imported for get_type_hints on string annotations
