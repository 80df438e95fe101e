"""Every run config shipped in configs/ loads and validates, and its usage line names itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgn.config import load_run_config
from medgn.errors import UsageError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_is_found() -> None:
    assert len(CONFIGS) >= 5, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_run_config(path)
    # A misspelt key or an out-of-range value raises above; the resolved config round-trips.
    assert cfg.hash == load_run_config(path).hash
    text = path.read_text(encoding="utf-8")
    if "--config" in text:
        assert f"configs/{path.name}" in text, f"{path.name}: its usage comment names another config"


def test_cpu_recipe_uses_light_augmentation_and_small_patches() -> None:
    """The screen in benchmarks/results/la2018_cpu_screen.md chose these; the docs quote them."""
    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / "la2018_cpu.yaml")
    assert tuple(cfg.plan.patch_size) == (64, 64, 32)
    assert tuple(cfg.plan.target_spacing) == (1.5, 1.5, 1.5)
    assert (cfg.data.prob_noise, cfg.data.prob_blur) == (0, 0)  # mild spatial augmentation only (fifth screen)
    assert cfg.data.rotate_deg == 15 and tuple(cfg.data.scale_range) == (0.85, 1.25)
    assert cfg.data.prob_rotate == cfg.data.prob_scale == 0.2
    assert cfg.data.prob_flip > 0 and cfg.data.prob_gamma > 0
    assert cfg.train.amp == "auto" and cfg.train.batch_size == 2


def test_unknown_key_in_a_config_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = CONFIGS[0].read_text(encoding="utf-8")
    assert "\ndata:\n" in text
    bad.write_text(text.replace("\ndata:\n", "\ndata:\n  prob_rotat: 0.1\n", 1), encoding="utf-8")
    with pytest.raises(UsageError, match="prob_rotat"):
        load_run_config(bad)
