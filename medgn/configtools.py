"""Building frozen configuration dataclasses from YAML with strict validation.

Each subpackage keeps its configuration as a frozen dataclass next to the code it configures;
:mod:`medgn.config` composes them. This module turns nested mappings (from YAML and
``--set section.key=value`` overrides) into those dataclasses, failing with a
:class:`~medgn.errors.UsageError` that names the full key, the value given and the valid choices
for unknown keys, wrong types and out-of-range values. Ranges and choices are declared on the field:
``field(default=1, metadata={"min": 1, "max": 2})`` or a ``Literal[...]`` type; a ``"hint"`` entry
(``"0 = no budget"``) is added to the range error. Every float must be finite and every integer fit
64 bits. YAML files and override values are read with YAML 1.2 core-schema scalars (only
``true``/``false`` are booleans, ``010`` is ten, no base-60), bounded in size, nesting and
alias expansion.
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
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

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
        value = _read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        shown = raw if len(raw) <= 80 else raw[:60] + f"... ({len(raw)} characters)"
        raise UsageError(key, f"override value is not valid YAML{_yaml_problem(exc, lines=False)}", got=shown) from exc
    _check_plain(key, value, prefix=key)
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
# A run config nests 3 levels (data.limits.max_voxels); 32 leaves room for any list of lists while
# keeping PyYAML's recursive composer (3 Python frames a level) far from the recursion limit.
MAX_CONFIG_DEPTH = 32
# No setting needs 20 digits, but up to 1000 a number too large for a float is still named by its
# key in validation; Python refuses to read integers of more than 4300 digits at all.
MAX_INT_DIGITS = 1000

# YAML 1.2 core schema (yaml.org/spec/1.2.2, 10.3.2): PyYAML implements YAML 1.1, where yes/no/on/off
# are booleans, 010 is octal and 1:30 is base-60 (90).
_CORE_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")
_CORE_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_CORE_FLOAT = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)
_TAG = "tag:yaml.org,2002:"


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2 core-schema scalars and bounds on a hostile document.

    A key given twice in one mapping is refused (YAML would keep the last); nesting deeper than
    :data:`MAX_CONFIG_DEPTH` and an alias inside its own anchor (a recursive structure, which
    would expand without end) are refused while composing, before anything is built.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"recursive alias *{event.anchor} (inside the node it names)", event.start_mark
                )
            return super().compose_node(parent, index)
        nests = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if nests and self._depth >= MAX_CONFIG_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nesting deeper than {MAX_CONFIG_DEPTH} levels", event.start_mark
            )
        anchor = getattr(event, "anchor", None)
        self._depth += nests
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= nests
            self._open_anchors.discard(anchor)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _TAG + "merge":  # <<: *defaults, merged by SafeLoader's mapping below
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a list or mapping as a key: YAML's own loader refuses it as unhashable
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (YAML would silently keep the last)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def _core_scalar(self, node: Any, pattern: re.Pattern[str], kind: str) -> str:
        text = str(self.construct_scalar(node))
        if pattern.fullmatch(text) is None:  # only with an explicit tag: !!int 1_000, !!bool yes
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 {kind}", node.start_mark)
        return text

    def construct_core_bool(self, node: Any) -> bool:
        return self._core_scalar(node, _CORE_BOOL, "boolean (true or false)").lower() == "true"

    def construct_core_int(self, node: Any) -> int:
        text = self._core_scalar(node, _CORE_INT, "integer")
        if len(text) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(text)} digits (at most {MAX_INT_DIGITS})", node.start_mark
            )
        if text[:2] in ("0o", "0x"):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)  # 010 is ten, as on the command line

    def construct_core_float(self, node: Any) -> float:
        text = self._core_scalar(node, _CORE_FLOAT, "number").lower()
        if text.endswith((".inf", ".nan")):  # refused by validation, which names the key
            return float(text.replace(".", ""))
        return float(text)  # 1e999 is inf: refused by validation likewise


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in {_TAG + "bool", _TAG + "int", _TAG + "float"}]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
    ("bool", _CORE_BOOL, "tTfF"),
    ("int", _CORE_INT, "-+0123456789"),  # before float: "10" is an integer
    ("float", _CORE_FLOAT, "-+0123456789."),
):
    _ConfigLoader.add_implicit_resolver(_TAG + _tag, re.compile(f"(?:{_pattern.pattern})$"), list(_first))
_ConfigLoader.add_constructor(_TAG + "bool", _ConfigLoader.construct_core_bool)
_ConfigLoader.add_constructor(_TAG + "int", _ConfigLoader.construct_core_int)
_ConfigLoader.add_constructor(_TAG + "float", _ConfigLoader.construct_core_float)


class _ConfigDumper(yaml.SafeDumper):
    """YAML's safe dumper quoting every string that YAML 1.1 or 1.2 would read as something else.

    PyYAML quotes ``off`` (a YAML 1.1 boolean) but writes ``1e3`` and ``0o7`` bare, which the 1.2
    loader reads as numbers; with both sets of resolvers, either loader reads the text back.
    """


for _first, _resolvers in _ConfigLoader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        _ConfigDumper.add_implicit_resolver(_tag, _regexp, [_first] if _first else [None])


def dump_yaml(data: Any) -> str:
    """YAML text of a plain config mapping that :func:`load_yaml` (and ``yaml.safe_load``) read back equal."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=None)


def _yaml_problem(exc: yaml.YAMLError, lines: bool = True) -> str:
    """' at line 3: found duplicate key ...' from a YAML error (without the line for one-line text)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if lines and mark is not None else ""
    problem = getattr(exc, "problem", None)
    return where + (f": {problem}" if problem else "")


def _read_yaml(text: str) -> Any:
    """One YAML document, read as :class:`_ConfigLoader` reads it."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _check_plain(where: str | Path, data: Any, prefix: str = "") -> None:
    """Every value is JSON's kind (mapping, list, text, number, bool, null), and not too many.

    YAML also reads dates, binary and sets, and aliases can expand a small file to billions of
    values; the config is stored and hashed as JSON, so such a file is refused here. The key of a
    value is spelled only for an error: built for every value, long keys under a few aliases would
    cost gigabytes.
    """
    # (value, nesting depth, link): a link is (key or index, parent link), shared by siblings.
    stack: list[tuple[Any, int, Any]] = [(data, 0, None)]
    seen = 0
    while stack:
        value, depth, link = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise UsageError(
                where, "config holds too many values (YAML aliases nested?)", expected=f"<= {MAX_CONFIG_VALUES}"
            )
        if isinstance(value, (dict, list)) and depth >= MAX_CONFIG_DEPTH:  # a self-containing mapping from Python
            raise UsageError(where, f"config nests deeper than {MAX_CONFIG_DEPTH} levels (a recursive alias?)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1, (str(k), link)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, depth + 1, (i, link)) for i, v in enumerate(value))
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise UsageError(
                where,
                f"config value {_spell(link, prefix) or '(top)'} is a YAML {type(value).__name__}",
                got=str(value)[:60],
                expected="text, a number, true/false, a list or a mapping (quote a date to make it text)",
            )


def _spell(link: Any, prefix: str) -> str:
    """``train.patch[1]`` from a link of :func:`_check_plain`."""
    parts: list[str | int] = []
    while link is not None:
        part, link = link
        parts.append(part)
    text = prefix
    for part in reversed(parts):
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


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
        data = _read_yaml(text)
    except yaml.YAMLError as exc:
        raise UsageError(path, f"invalid YAML{_yaml_problem(exc)}") from exc
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
    "dump_yaml",
    "load_yaml",
    "parse_override",
    "to_dict",
]

_ = typing  # keep typing imported for get_type_hints on string annotations
