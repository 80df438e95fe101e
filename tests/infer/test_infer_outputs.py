"""Inference bookkeeping: safe names, collisions, shards, output-folder checks, report exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgn.errors import UsageError
from medgn.infer.outputs import (
    CaseResult,
    InferenceReport,
    check_output_dir,
    output_names,
    parse_shard,
    safe_case_name,
    select_shard,
)


@pytest.mark.parametrize(
    "case_id,expected",
    [
        ("../../x", "_._.._x"),
        ("-rf", "_rf"),
        (".hidden", "_hidden"),
        ("a b é 東京", "a b é 東京"),
        ("semi;colon $(x) `y`", "semi;colon $(x) `y`"),
        ("tab\there\x00nul", "tab_here_nul"),
        ("..", "_."),
        ("", "case"),
    ],
)
def test_safe_case_name(case_id: str, expected: str, tmp_path: Path) -> None:
    name = safe_case_name(case_id)
    assert name == expected
    assert (tmp_path / (name + ".nii.gz")).resolve().parent == tmp_path.resolve()


def test_long_names_are_cut_below_the_file_name_limit() -> None:
    name = safe_case_name("é" * 300)
    assert len((name + "_probabilities.nii.gz").encode()) <= 255


@pytest.mark.parametrize("ids", [["a/b", "a_b"], ["Case", "case"], ["report"], ["x", "x_probabilities"]])
def test_colliding_output_names_are_refused(ids: list[str]) -> None:
    with pytest.raises(UsageError, match="collide"):
        output_names(ids, {})


def test_distinct_names_pass() -> None:
    assert output_names(["a", "b c", "-d"], {}) == {"a": "a", "b c": "b c", "-d": "_d"}


def test_shards_partition_the_sorted_cases() -> None:
    ids = [f"c{i:02d}" for i in range(10)][::-1]
    parts = [select_shard(ids, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert parts[0] == ["c00", "c03", "c06", "c09"] and parts[2] == ["c02", "c05", "c08"]
    assert select_shard(ids, None) == sorted(ids)


def test_parse_shard_text_env_and_errors() -> None:
    assert parse_shard("1/3", env={}) == (1, 3)
    assert parse_shard(None, env={}) is None
    torchrun = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert parse_shard(None, env={"RANK": "2", "WORLD_SIZE": "4", **torchrun}) == (2, 4)
    assert parse_shard(None, env={"RANK": "0", "WORLD_SIZE": "1"}) == (0, 1)  # one process: nothing to split
    # Left over in a shell: a plain run segmented half the cases, exit 0.
    with pytest.raises(UsageError, match="without torchrun's rendezvous address: this process would segment only"):
        parse_shard(None, env={"RANK": "1", "WORLD_SIZE": "2"})
    for bad in ("3/3", "x", "1/0", "-1/2", "1/2/3"):
        with pytest.raises(UsageError):
            parse_shard(bad, env={})


def test_output_inside_or_equal_to_the_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.nii.gz").write_bytes(b"")
    for out in (src, src / "sub", src / "sub" / "deeper"):
        with pytest.raises(UsageError, match="inside the input"):
            check_output_dir(out, src)
    with pytest.raises(UsageError, match="input file's folder"):
        check_output_dir(src, src / "a.nii.gz")
    assert not (src / "sub").exists()
    assert check_output_dir(tmp_path / "out", src) == (tmp_path / "out").resolve()


def test_unwritable_output_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="not writable|not a folder"):
        check_output_dir(blocker / "out", tmp_path / "in")
    with pytest.raises(UsageError, match="not a folder"):
        check_output_dir(blocker, tmp_path / "in")


def test_report_exit_code_is_the_worst_failure(tmp_path: Path) -> None:
    report = InferenceReport(tmp_path, [CaseResult("a", "a", "ok"), CaseResult("b", "b", "skipped")])
    assert report.exit_code == 0
    report.cases.append(CaseResult("c", "c", "failed", code=3))
    assert report.exit_code == 3
    report.cases.append(CaseResult("d", "d", "failed", code=4))
    assert report.exit_code == 4
    data = report.to_dict()
    assert data["counts"] == {"ok": 1, "skipped": 1, "failed": 2} and data["exit_code"] == 4
    assert report.write().name == "report.json"
