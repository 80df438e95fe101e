"""Config values that used to pass validation and fail (or hang) later, and hostile YAML.

Every config float is finite, every count has an upper bound, YAML is read with YAML 1.2 core
scalars, and a recursive or deeply nested document is a usage error naming the file.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import tracemalloc
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from medgn import cli, logs
from medgn.config import RunConfig, build_run_config, load_run_config, write_resolved_config
from medgn.configtools import MAX_CONFIG_DEPTH, dump_yaml, load_yaml, parse_override
from medgn.data.header import Limits
from medgn.errors import EXIT_USAGE, UsageError
from medgn.train.config import MAX_SAMPLES_PER_EPOCH


def _fields(cls: type, prefix: str) -> Iterator[tuple[str, dataclasses.Field, object]]:
    """(dotted key, field, type) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}.{f.name}" if prefix else f.name)
        else:
            yield (f"{prefix}.{f.name}" if prefix else f.name), f, tp


def _has(tp: object, kind: type) -> bool:
    """``tp`` is ``kind`` or ``kind | None``."""
    return tp is kind or (typing.get_origin(tp) in (typing.Union, types.UnionType) and kind in typing.get_args(tp))


def _tuple_of(tp: object, kind: type) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and bool(args) and args[0] is kind


LEAVES = list(_fields(RunConfig, ""))
FLOAT_KEYS = [key for key, _, tp in LEAVES if _has(tp, float)]
FLOAT_TUPLE_KEYS = [(key, len(typing.get_args(tp))) for key, _, tp in LEAVES if _tuple_of(tp, float)]
INT_KEYS = [key for key, _, tp in LEAVES if _has(tp, int) and not _has(tp, bool)]


def _refused(overrides: list[str]) -> UsageError:
    with pytest.raises(UsageError) as info:
        build_run_config({}, overrides)
    assert info.value.code == EXIT_USAGE
    return info.value


def test_every_float_and_int_field_is_found() -> None:
    assert {"train.lr", "train.time_budget_minutes", "plan.gpu_memory_gb", "data.cache_rate"} <= set(FLOAT_KEYS)
    assert {"train.batch_size", "data.limits.max_voxels", "model.num_groups"} <= set(INT_KEYS)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_naming_the_key(key: str, value: str) -> None:
    err = _refused([f"{key}={value}"])
    assert err.where == key and ("infinite" in err.what or "NaN" in err.what), err.one_line()
    assert "a finite number" in err.one_line()


@pytest.mark.parametrize(("key", "size"), FLOAT_TUPLE_KEYS)
def test_non_finite_floats_in_lists_are_refused(key: str, size: int) -> None:
    err = _refused([f"{key}=[{', '.join(['1.0'] * (size - 1) + ['.inf'])}]"])
    assert err.where == key and "infinite" in err.what


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("train.time_budget_minutes", "0 = no budget"),
        ("train.checkpoint_every_minutes", "0 = only at epoch ends"),
        ("train.clip_grad", "0 = no clipping"),
    ],
)
def test_an_infinite_never_says_how_to_spell_never(key: str, words: str) -> None:
    assert words in _refused([f"{key}=.inf"]).one_line()


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_integer_is_bounded(key: str) -> None:
    err = _refused([f"{key}={2**63}"])
    assert err.where == key and "out of range" in err.what, err.one_line()


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("train.lr=1" + "0" * 400, "train.lr", "number too large (got 100000... (401 digits)"),
        ("train.batch_size=100000000000000000000", "train.batch_size", "1 <= value <= 1024"),
        ("train.iters_per_epoch=1000000000", "train.iters_per_epoch", "1 <= value <= 100000"),
        ("train.grad_accum=1000000", "train.grad_accum", "1 <= value <= 1024"),
        ("train.epochs=10000000", "train.epochs", "1 <= value <= 100000"),
        ("train.warmup_iters=100000000", "train.warmup_iters", "0 <= value <= 10000000"),
        ("train.val_every=1000000", "train.val_every", "0 = only at the end"),
        ("data.num_workers=1000", "data.num_workers", "0 <= value <= 64"),
        ("plan.n_folds=1000", "plan.n_folds", "2 <= value <= 20"),
        ("plan.split_seed=4294967296", "plan.split_seed", "0 <= value <= 2147483647"),
        ("model.features=[4, 100000]", "model.features", "1 <= value <= 4096"),
        ("plan.patch_size=[16, 16, 100000]", "plan.patch_size", "8 <= value <= 1024"),
        ("data.limits.max_voxels=" + "9" * 31, "data.limits.max_voxels", "(31 digits)"),
    ],
)
def test_huge_numbers_are_usage_errors(override: str, key: str, words: str) -> None:
    err = _refused([override])
    assert err.where == key and words in err.one_line(), err.one_line()


def test_an_epoch_of_more_samples_than_the_sampler_lists_is_refused() -> None:
    err = _refused(["train.iters_per_epoch=100000", "train.grad_accum=10", "train.batch_size=2"])
    assert err.where == "train" and f"{MAX_SAMPLES_PER_EPOCH:,}" in err.one_line()
    # dataclasses.replace (the norm study's arms) is refused the same way, not with a ValueError
    cfg = build_run_config({})
    with pytest.raises(UsageError, match="samples per epoch"):
        dataclasses.replace(cfg.train, iters_per_epoch=100_000, batch_size=64)
    assert build_run_config({}, ["train.iters_per_epoch=100000", "train.batch_size=10"]).train.batch_size == 10


def test_a_loss_of_no_terms_and_too_many_stages_are_refused() -> None:
    assert "both 0" in _refused(["train.dice_weight=0", "train.ce_weight=0"]).one_line()
    assert "2 to 10 stages" in _refused(["model.features=[4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]"]).one_line()


def test_limits_keep_accepting_large_values() -> None:
    """data.limits has no upper bound of its own: anything a 64-bit integer holds is allowed."""
    cfg = build_run_config({}, [f"data.limits.max_voxels={2**63 - 1}"])
    assert cfg.data.limits.max_voxels == 2**63 - 1 and isinstance(cfg.data.limits, Limits)


# YAML 1.1 (PyYAML) read 1:30 as 90, 010 as 8 and off as False.
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed=010", 10),
        ("train.seed=0o17", 15),
        ("train.seed=0x1F", 31),
        ("train.seed=+7", 7),
        ("train.deterministic=True", True),
        ("train.deterministic=false", False),
        ("train.amp=off", "off"),
        ("train.amp=false", "off"),
        ("train.lr=1e-3", 0.001),
        ("train.lr=.5", 0.5),
    ],
)
def test_yaml_1_2_scalars(override: str, expected: object, tmp_path: Path) -> None:
    key, _, raw = override.partition("=")
    section, name = key.split(".")
    assert getattr(getattr(build_run_config({}, [override]), section), name) == expected
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: {raw}\n")
    assert getattr(getattr(load_run_config(path), section), name) == expected


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.epochs=1:30", "got 1:30"),
        ("train.seed=1_000", "got 1_000"),
        ("model.norm=off", "got off"),
        ("train.deterministic=yes", "got yes"),
        ("train.deterministic=on", "got on"),
        ("train.deterministic=!!bool yes", "'yes' is not a YAML 1.2 boolean"),
        ("train.seed=" + "9" * 2000, "integer of 2000 digits"),
    ],
)
def test_yaml_1_1_spellings_are_not_numbers_or_booleans(override: str, words: str) -> None:
    assert words in _refused([override]).one_line()


def test_the_resolved_config_reads_back_with_either_yaml_version(tmp_path: Path) -> None:
    """Strings YAML 1.2 reads as numbers (1e3, 0o7) are quoted in config.yaml."""
    import yaml

    for name in ("1e3", "0o7", "off", "010", "1:30"):
        cfg = build_run_config({"data": {"cache_dir": name}})
        path = write_resolved_config(cfg, tmp_path / f"{name.replace(':', '_')}.yaml")
        assert load_run_config(path) == cfg
        assert yaml.safe_load(path.read_text())["data"]["cache_dir"] == name
    assert load_yaml(tmp_path / "off.yaml")["data"]["cache_dir"] == "off"
    assert dump_yaml({"a": [True, None, 1.5e-5, 7]}) == "a: [true, null, 1.5e-05, 7]\n"


def test_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 3}\ntrain:\n  <<: *b\n  epochs: 5\n")
    assert load_yaml(path)["train"] == {"lr": 0.1, "epochs": 5}


DEEP_LIST = "a: " + "[" * 5000 + "]" * 5000 + "\n"
DEEP_MAP = "a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n"
DEEP_BLOCK = "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model: &x\n  features: [4, 8]\n  self: *x\n", "line 3: recursive alias *x"),
        ("a: &x [1, *x]\n", "line 1: recursive alias *x"),
        (DEEP_LIST, f"nesting deeper than {MAX_CONFIG_DEPTH} levels"),
        (DEEP_MAP, f"nesting deeper than {MAX_CONFIG_DEPTH} levels"),
        (DEEP_BLOCK, f"nesting deeper than {MAX_CONFIG_DEPTH} levels"),
    ],
    ids=["self-alias", "list-alias", "deep-list", "deep-flow-map", "deep-block-map"],
)
def test_recursive_and_deep_yaml_is_a_usage_error_naming_the_file(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_yaml(path)
    assert str(path) in info.value.one_line() and words in info.value.one_line(), info.value.one_line()


@pytest.mark.parametrize("raw", ["&x [*x]", "&x {a: *x}", "[" * 100 + "]" * 100])
def test_recursive_and_deep_override_values_are_usage_errors(raw: str) -> None:
    with pytest.raises(UsageError, match="recursive alias|nesting deeper") as info:
        parse_override(f"model.features={raw}")
    assert info.value.where == "model.features"


def test_nesting_at_the_limit_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: " + "[" * (MAX_CONFIG_DEPTH - 1) + "]" * (MAX_CONFIG_DEPTH - 1) + "\n")
    assert isinstance(load_yaml(path)["a"], list)


def test_a_long_key_costs_no_memory_per_value(tmp_path: Path) -> None:
    """Each value's key used to be spelled out: 50,000 values under a 4,000-character key took 200 MB."""
    path = tmp_path / "c.yaml"
    path.write_text(f"? {'k' * 4000}\n: [{', '.join(['0'] * 50_000)}]\n")
    tracemalloc.start()
    try:
        assert len(next(iter(load_yaml(path).values()))) == 50_000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, peak


@pytest.fixture
def fallback_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The temporary directory (and so the fallback log) inside tmp_path; no log attached."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(logs, "_fallback", None)
    logs.detach_file_logs()
    yield tmp_path
    logs.detach_file_logs()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--config", "{cfg}"], "recursive alias"),
        (["--set", "train.checkpoint_every_minutes=.inf"], "train.checkpoint_every_minutes: value is infinite"),
        (["--set", "train.time_budget_minutes=.inf"], "0 = no budget"),
        (["--set", "train.lr=1" + "0" * 400], "train.lr: number too large"),
        (["--set", "train.epochs=1:30"], "train.epochs: wrong type"),
    ],
)
def test_the_cli_refuses_before_writing_anything(
    fallback_in: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    cfg = fallback_in / "selfref.yaml"
    cfg.write_text("model: &x\n  features: [4, 8]\n  self: *x\n")
    out = fallback_in / "out"
    argv = [a.format(cfg=cfg) for a in argv]
    code = cli.main(["train", "--data", str(fallback_in / "data"), "--out", str(out), "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_the_fallback_log_belongs_to_one_process(fallback_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = logs.fallback_log_path()
    assert first == logs.fallback_log_path() and first.parent == fallback_in
    assert first.name.startswith(f"medgn-{logs.os.getuid()}-") and first.name.endswith(f"-{logs.os.getpid()}.log")
    monkeypatch.setattr(logs.os, "getpid", lambda: 4242424)  # a forked or later process
    assert logs.fallback_log_path() != first and logs.fallback_log_path().name.endswith("-4242424.log")


def test_old_fallback_logs_are_removed_but_recent_and_foreign_ones_kept(fallback_in: Path) -> None:
    uid = logs.os.getuid()
    now = time.time()
    old = []
    for i in range(logs.KEEP_FALLBACK_LOGS + 5):
        path = fallback_in / f"medgn-{uid}-20200101-0000{i:02d}-{100 + i}.log"
        path.write_text("x")
        age = 86400 * (i + 1)  # the first is the newest
        logs.os.utime(path, (now - age, now - age))
        old.append(path)
    busy = fallback_in / f"medgn-{uid}-20200101-000000-99.log"  # written to a minute ago: a run still going
    busy.write_text("x")
    logs.os.utime(busy, (now - 60, now - 60))
    legacy, other = fallback_in / f"medgn-{uid}.log", fallback_in / f"medgn-{uid}1-20200101-000000-1.log"
    legacy.write_text("x")
    other.write_text("x")
    logs.fallback_log_path()
    kept = {p for p in old if p.exists()}
    assert kept == set(old[: logs.KEEP_FALLBACK_LOGS - 1]), sorted(p.name for p in kept)
    assert busy.exists() and legacy.exists() and other.exists()
