"""``medgn infer`` reads each input once (hash and image from the same bytes) and each checkpoint once."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import _infer_fixtures as F
import pytest
import torch

import medgn.checkpoint
import medgn.data.io
from medgn.cli import main


@pytest.fixture
def read_counts(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts the pixel reads of every volume, by path (the one function every volume read goes through)."""
    counts: Counter = Counter()
    original = medgn.data.io._read_pixels

    def counting(info, raw=None):  # type: ignore[no-untyped-def]
        counts[Path(info.path).name] += 1
        return original(info, raw)

    monkeypatch.setattr(medgn.data.io, "_read_pixels", counting)
    return counts


def test_infer_reads_each_input_and_checkpoint_once(
    tmp_path: Path, read_counts: Counter, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_bytes, opened = Path.read_bytes, Counter()

    def counting_read_bytes(self: Path) -> bytes:
        opened[self.name] += 1
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting_read_bytes)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        F.write_image(src / f"case{i}.nii.gz", F.image(i), F.axis_affines()[0])
    run = F.save_run(tmp_path / "run")
    loads, hashes = Counter(), Counter()
    torch_load = torch.load

    def counting_load(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        loads["torch.load"] += 1
        return torch_load(f, *args, **kwargs)

    monkeypatch.setattr(medgn.checkpoint.torch, "load", counting_load)
    monkeypatch.setattr(medgn.checkpoint, "file_sha256", lambda p: hashes.update([str(p)]) or "")
    assert (
        main(["infer", "--model", str(run), "--input", str(src), "--output", str(tmp_path / "out"), "--no-progress"])
        == 0
    )
    assert read_counts == Counter({"case0.nii.gz": 1, "case1.nii.gz": 1})
    # The file bytes are read once per input (hashed, then decoded from memory) and per checkpoint.
    assert opened["case0.nii.gz"] == opened["case1.nii.gz"] == 1
    assert sum(n for name, n in opened.items() if name.endswith(".pt")) == 1
    assert loads["torch.load"] == 1 and not hashes  # hashed from the bytes torch.load read
    for i in range(2):
        sidecar = json.loads((tmp_path / "out" / f"case{i}.json").read_text())
        expected = hashlib.sha256((src / f"case{i}.nii.gz").read_bytes()).hexdigest()
        assert sidecar["inputs"][0]["sha256"] == expected
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert sidecar["models"][0]["sha256"] == best["sha256"]
    # A second run skips both cases from their hashes: nothing is decoded.
    read_counts.clear()
    assert (
        main(["infer", "--model", str(run), "--input", str(src), "--output", str(tmp_path / "out"), "--no-progress"])
        == 0
    )
    assert read_counts == Counter()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["skipped", "skipped"]


def test_infer_settings_are_one_object_recorded_as_is(tmp_path: Path) -> None:
    from medgn.errors import UsageError
    from medgn.infer.predictor import Predictor
    from medgn.infer.run import InferSettings, infer

    src = tmp_path / "in"
    src.mkdir()
    F.write_image(src / "case0.nii.gz", F.image(0), F.axis_affines()[0])
    settings = InferSettings(overlap=0.25, mirror_axes=(0, 2))
    report = infer(Predictor.from_modules([F.ThresholdNet()], F.plan()), src, tmp_path / "out", settings)
    assert report.exit_code == 0
    sidecar = json.loads((tmp_path / "out" / "case0.json").read_text())
    assert sidecar["infer_settings"] == settings.to_dict() and sidecar["infer_settings"]["mirror_axes"] == [0, 2]
    assert sidecar["settings"]["overlap"] == 0.25  # the window settings the fingerprint covers
    with pytest.raises(UsageError, match="unknown setting"):
        InferSettings.of(settings, overlapp=0.5)
