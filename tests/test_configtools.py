"""Config validation: unknown keys, wrong types and ranges name the key and the choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from medgn.configtools import apply_overrides, build, config_hash, load_yaml, to_dict
from medgn.errors import UsageError


@dataclass(frozen=True)
class Inner:
    lr: float = field(default=0.01, metadata={"min": 0.0})
    optimizer: Literal["sgd", "adamw"] = "sgd"


@dataclass(frozen=True)
class Outer:
    batch_size: int = field(default=2, metadata={"min": 1, "max": 64})
    patch: tuple[int, ...] = (64, 64, 64)
    name: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_values() -> None:
    cfg = build(Outer, {"batch_size": 1, "patch": [32, 32, 16], "inner": {"optimizer": "adamw", "lr": 1}})
    assert cfg.batch_size == 1 and cfg.patch == (32, 32, 16)
    assert cfg.inner == Inner(lr=1.0, optimizer="adamw")


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"batchsize": 2}, "batchsize", "one of batch_size, inner, name, patch"),
        ({"inner": {"optimiser": "sgd"}}, "inner.optimiser", "one of lr, optimizer"),
        ({"batch_size": "two"}, "batch_size", "an integer"),
        ({"batch_size": 0}, "batch_size", "1 <= value <= 64"),
        ({"inner": {"optimizer": "adam"}}, "inner.optimizer", "'sgd', 'adamw'"),
        ({"inner": {"lr": -1}}, "inner.lr", "0.0 <= value"),
        ({"patch": [32, "x"]}, "patch[1]", "an integer"),
        ({"batch_size": True}, "batch_size", "an integer"),
        ({"inner": {"lr": float("nan")}}, "inner.lr", "value is NaN"),
    ],
)
def test_errors_name_key_and_rule(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        build(Outer, data)
    assert info.value.where == key
    assert fragment in info.value.one_line()


def test_overrides_apply_yaml_values() -> None:
    data = apply_overrides({"inner": {"lr": 0.1}}, ["inner.lr=1e-3", "patch=[8,8,8]", "name=run1"])
    cfg = build(Outer, data)
    assert cfg.inner.lr == pytest.approx(1e-3) and cfg.patch == (8, 8, 8) and cfg.name == "run1"


def test_override_typo_is_reported_with_full_key() -> None:
    data = apply_overrides({}, ["inner.lrr=0.1"])
    with pytest.raises(UsageError) as info:
        build(Outer, data)
    assert info.value.where == "inner.lrr"


@pytest.mark.parametrize("text", ["novalue", "=3", "a..b=1"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(UsageError):
        apply_overrides({}, [text])


def test_yaml_errors_name_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UsageError) as info:
        load_yaml(bad)
    assert str(bad) in info.value.one_line()
    with pytest.raises(UsageError):
        load_yaml(tmp_path / "missing.yaml")


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train:\n  seed: 2020-01-01\n", "config value train.seed is a YAML date"),
        ("unknown: !!binary aGVsbG8=\n", "config value unknown is a YAML bytes"),
        ("x: !!set {a, b}\n", "config value x is a YAML set"),
        (LAUGHS, "too many values"),
    ],
)
def test_yaml_json_cannot_hold_is_a_usage_error(tmp_path: Path, text: str, words: str) -> None:
    """Dates, binary, sets and alias bombs: refused with the file named, never an internal error."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match="") as info:
        load_yaml(path)
    assert words in info.value.one_line() and str(path) in info.value.one_line()


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.5\n")
    with pytest.raises(UsageError) as info:
        load_yaml(path)
    assert "invalid YAML at line 4: duplicate key 'lr'" in info.value.one_line()
    path.write_text("train:\n  lr: 0.1\nmodel:\n  lr_like: 1\n")  # the same key in two sections is fine
    assert load_yaml(path) == {"train": {"lr": 0.1}, "model": {"lr_like": 1}}
    path.write_text("? [a, b]\n: 1\n")  # a list as a key: refused by YAML itself, not a TypeError here
    with pytest.raises(UsageError, match="found unhashable key"):
        load_yaml(path)


def test_a_config_that_is_huge_or_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_text("a: 1\n" + "#" * (1 << 20))
    with pytest.raises(UsageError, match="too large"):
        load_yaml(tmp_path / "big.yaml")
    with pytest.raises(UsageError, match="not a regular file"):
        load_yaml(tmp_path)


def test_hash_is_stable_and_sensitive() -> None:
    a = build(Outer, {})
    assert config_hash(a) == config_hash(to_dict(a))
    assert config_hash(a) != config_hash(build(Outer, {"batch_size": 1}))


@dataclass(frozen=True)
class Switch:
    amp: Literal["auto", "bf16", "off"] = "auto"


def test_yaml_off_maps_to_string_choice() -> None:
    assert build(Switch, apply_overrides({}, ["amp=off"])).amp == "off"
    with pytest.raises(UsageError):
        build(Switch, apply_overrides({}, ["amp=on"]))
