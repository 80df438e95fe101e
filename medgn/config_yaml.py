"""Reading and writing medgn's YAML: run configs and ``--set`` values, safely and as YAML 1.2.

This module owns :func:`load_yaml` (a config file: size, nesting depth and alias expansion bounded,
duplicate keys and Python tags refused, a recursive alias named with its line) and
:func:`dump_yaml` (a resolved config, quoting every string that a YAML 1.1 or 1.2 reader would take
for something else), and the checks :mod:`medgn.configtools` applies to ``--set`` values. Scalars
follow the YAML 1.2 core schema: only ``true``/``false`` are booleans, ``010`` is ten, ``0o17`` and
``0x1F`` are octal and hex, and there are no base-60 numbers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from medgn.errors import UsageError

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_VALUES",
    "check_plain",
    "dump_yaml",
    "load_yaml",
    "read_yaml_text",
    "yaml_problem",
]


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


def yaml_problem(exc: yaml.YAMLError, lines: bool = True) -> str:
    """' at line 3: found duplicate key ...' from a YAML error (without the line for one-line text)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if lines and mark is not None else ""
    problem = getattr(exc, "problem", None)
    return where + (f": {problem}" if problem else "")


def read_yaml_text(text: str) -> Any:
    """One YAML document, read as :class:`_ConfigLoader` reads it."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_plain(where: str | Path, data: Any, prefix: str = "") -> None:
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
    """``train.patch[1]`` from a link of :func:`check_plain`."""
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
        data = read_yaml_text(text)
    except yaml.YAMLError as exc:
        raise UsageError(path, f"invalid YAML{yaml_problem(exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(path, "config must be a mapping of sections", got=type(data).__name__)
    check_plain(path, data)
    return data
