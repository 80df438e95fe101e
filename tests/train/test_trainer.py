"""The trainer in-process: learning, outputs, non-finite steps, validation EMA, stopping rules."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _train_driver import NUM_CASES, SyntheticCases, TinyNet, validate

from medgn.checkpoint import load_checkpoint, read_pointer
from medgn.configtools import build
from medgn.errors import UsageError
from medgn.train.config import TrainConfig
from medgn.train.hooks import CheckpointHook, EarlyStoppingHook, TimeBudgetHook, ValidationHook
from medgn.train.logging_hooks import default_hooks
from medgn.train.optim import lr_factor, resolve_amp
from medgn.train.rng import seed_everything
from medgn.train.sampler import ResumableLoader, ResumableSampler
from medgn.train.state import NonFiniteLossError
from medgn.train.trainer import HookBase, Trainer


def _cfg(**over: object) -> TrainConfig:
    base = {
        "epochs": 2,
        "iters_per_epoch": 3,
        "batch_size": 2,
        "lr": 0.05,
        "amp": "off",
        "seed": 3,
        "checkpoint_every_minutes": 0.0,
        "log_every": 1,
    }
    return build(TrainConfig, {**base, **over}, "train")


def _trainer(cfg: TrainConfig, out: Path | None, hooks: list, nan_cases: tuple[int, ...] = ()) -> Trainer:
    seed_everything(cfg.seed)
    sampler = ResumableSampler(NUM_CASES, cfg.micro_batches_per_epoch * cfg.batch_size, seed=cfg.seed, with_seeds=True)
    loader = ResumableLoader(SyntheticCases(nan_cases), sampler, cfg.batch_size)
    return Trainer(TinyNet(), cfg, loader, out_dir=out, hooks=hooks)


def test_loss_decreases_and_every_output_is_written(tmp_path: Path) -> None:
    cfg = _cfg(epochs=4, iters_per_epoch=5)
    trainer = _trainer(cfg, tmp_path, default_hooks(cfg, tmp_path, validate=validate, console=False))
    state = trainer.train()
    losses = [r["train_loss"] for r in trainer.epoch_records]
    assert state.stop_reason == "finished" and state.iteration == 20 and state.samples_seen == 40
    assert losses[-1] < 0.7 * losses[0], losses
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "step"] == list(range(1, 21))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3, 4]
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    files = list((tmp_path / "checkpoints").glob("*.pt"))
    assert files
    for path in files:
        ckpt = torch.load(path, weights_only=True)
        assert set(ckpt) >= {
            "model",
            "optimizer",
            "scheduler",
            "scaler",
            "counters",
            "rng",
            "sampler",
            "hooks",
            "config",
            "plan",
            "versions",
        }
    final = load_checkpoint(tmp_path / "checkpoints" / "final.json")
    assert final["config"]["train"]["epochs"] == 4 and final["counters"]["iteration"] == 20
    assert final["hooks"]["validation"]["ema"] is not None


def test_gradient_accumulation_equals_the_larger_batch() -> None:
    batch = next(iter(torch.utils.data.DataLoader(SyntheticCases(), batch_size=2, sampler=[(0, 11), (3, 12)])))
    halves = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    results = []
    for micro, accum in (([batch], 1), (halves, 2)):
        trainer = _trainer(_cfg(grad_accum=accum, clip_grad=0.0, batch_size=2 // accum), None, [])
        trainer.module.drop.p = 0.0  # no dropout: both runs see the same function
        trainer.train_step(micro)
        results.append([p.detach().clone() for p in trainer.module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 summation order differs


def test_nonfinite_step_is_skipped_without_touching_weights() -> None:
    trainer = _trainer(_cfg(max_nonfinite_in_row=2), None, [])
    before = [p.detach().clone() for p in trainer.module.parameters()]
    bad = {
        "image": torch.full((2, 1, 8, 8, 8), float("nan")),
        "label": torch.zeros(2, 1, 8, 8, 8, dtype=torch.int64),
        "case_id": ["a", "b"],
    }
    result = trainer.train_step([bad])
    assert result.skipped and result.loss is None and trainer.state.nonfinite_total == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.module.parameters()))
    assert trainer.optimizer.state_dict()["state"] == {}  # no momentum was created
    good = dict(bad, image=torch.zeros(2, 1, 8, 8, 8))
    assert not trainer.train_step([good]).skipped and trainer.state.nonfinite_in_row == 0
    with pytest.raises(NonFiniteLossError):
        trainer.train_step([bad])
        trainer.train_step([bad])


def test_nonfinite_run_stops_with_case_ids_and_no_nonfinite_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg(max_nonfinite_in_row=3, checkpoint_every_steps=1)
    trainer = _trainer(cfg, tmp_path, [CheckpointHook(0.0, 1)], nan_cases=tuple(range(NUM_CASES)))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    assert info.value.code == 5 and "case_00" in str(info.value) and "3 steps in a row" in str(info.value)
    for path in (tmp_path / "checkpoints").glob("*.pt"):
        model = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in model.values())


def test_validation_ema_best_checkpoint_and_early_stopping(tmp_path: Path) -> None:
    scores = iter([0.2, 0.6, 0.1, 0.1, 0.9, 0.9])
    cfg = _cfg(epochs=6, iters_per_epoch=1, ema_alpha=0.5)
    hooks = [
        ValidationHook(lambda model: [next(scores)], every=1, ema_alpha=0.5),
        EarlyStoppingHook(2),
        CheckpointHook(0.0),
    ]
    trainer = _trainer(cfg, tmp_path, hooks)
    state = trainer.train()
    # EMA with alpha 0.5: 0.2, 0.4, 0.25, 0.175 -> best at epoch 2, two worse validations stop at epoch 4.
    assert [r["val_ema"] for r in trainer.epoch_records] == pytest.approx([0.2, 0.4, 0.25, 0.175])
    assert state.epoch == 4 and state.stop_reason.startswith("early stopping")
    assert read_pointer(tmp_path / "checkpoints", "best")["epoch"] == 2
    assert load_checkpoint(tmp_path / "checkpoints" / "best.json")["hooks"]["validation"]["best"] == pytest.approx(0.4)


def test_time_budget_stops_cleanly_with_final_validation_and_checkpoint(tmp_path: Path) -> None:
    calls = []
    cfg = _cfg(epochs=50)
    hooks = [
        TimeBudgetHook(_cfg(epochs=50, time_budget_minutes=1e-9)),
        ValidationHook(lambda m: calls.append(1) or [0.5], every=1),
        CheckpointHook(0.0),
    ]
    state = _trainer(cfg, tmp_path, hooks).train()
    assert state.iteration == 1 and state.stop_reason.startswith("time budget")
    assert calls == [1]  # the final validation ran
    assert read_pointer(tmp_path / "checkpoints", "final")["iteration"] == 1


def test_lr_schedules_follow_their_formulas() -> None:
    cfg = _cfg(epochs=10, iters_per_epoch=10, warmup_iters=4)
    assert [lr_factor(s, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4 + 48, cfg) == pytest.approx(0.5**0.9)
    cos = _cfg(epochs=10, iters_per_epoch=10, schedule="cosine")
    assert lr_factor(50, cos) == pytest.approx(0.5) and lr_factor(100, cos) == pytest.approx(0.0, abs=1e-12)


def test_config_and_amp_validation() -> None:
    with pytest.raises(UsageError, match="train.optimiser"):
        build(TrainConfig, {"optimiser": "sgd"}, "train")
    with pytest.raises(UsageError, match="warmup_iters"):
        _cfg(epochs=1, iters_per_epoch=2, warmup_iters=2)
    assert resolve_amp("bf16", torch.device("cpu")) == (torch.bfloat16, False)
    with pytest.raises(UsageError, match="train.amp"):
        resolve_amp("fp16", torch.device("cpu"))


def test_sampler_order_is_a_pure_function_and_shards_cover_it() -> None:
    full = ResumableSampler(5, 8, seed=4, world_size=1)
    full.set_epoch(3)
    order = list(full)
    again = ResumableSampler(5, 8, seed=4)
    again.set_epoch(3, start=5)
    assert list(again) == order[5:] and len(order) == 8
    shards = [ResumableSampler(5, 4, seed=4, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    assert sorted(list(shards[0]) + list(shards[1])) == sorted(order)
    seeded = ResumableSampler(5, 8, seed=4, with_seeds=True)
    seeds = [s for _, s in seeded]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True), (False, False)])
def test_amp_auto_on_cpu_is_bf16_only_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool
) -> None:
    monkeypatch.delenv("MEDGN_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    expected = (torch.bfloat16, False) if (avx512_bf16 or amx) else (None, False)
    assert resolve_amp("auto", torch.device("cpu")) == expected
    assert resolve_amp("off", torch.device("cpu")) == (None, False)
    monkeypatch.setenv("MEDGN_CPU_BF16", "0")  # the override wins over detection
    assert resolve_amp("auto", torch.device("cpu")) == (None, False)


class _Clock:
    """A fake monotonic clock: each training step takes ``step_s`` seconds."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 1000.0, step_s

    def __call__(self) -> float:
        return self.now


class _Tick(HookBase):
    name = "tick"

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def after_step(self, trainer: Trainer) -> None:
        self.clock.now += self.clock.step_s


class _StopAt(HookBase):
    name = "stop_at"

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self, trainer: Trainer) -> None:
        if trainer.state.iteration == self.iteration:
            trainer.request_stop("test stop")
            trainer.request_checkpoint("latest")


def _budget_run(out: Path, clock: _Clock, extra: list, resume: bool = False) -> Trainer:
    # 1 minute budget, 1 s per step: the schedule must end, annealed, exactly inside the budget.
    cfg = _cfg(
        epochs=1000,
        iters_per_epoch=10,
        time_budget_minutes=1.0,
        schedule="cosine",
        warmup_iters=5,
        budget_probe_steps=20,
    )
    budget = TimeBudgetHook(cfg, started_at=clock(), clock=clock)
    trainer = _trainer(cfg, out, [_Tick(clock), budget, *extra, CheckpointHook(0.0)])
    if resume:
        trainer.resume(out / "checkpoints")
    trainer.train()
    return trainer


def test_budget_schedule_ends_at_the_budget_and_resumes_bit_exact(tmp_path: Path) -> None:
    full = _budget_run(tmp_path / "full", _Clock(1.0), [])
    # Planned after steps 3..23 (1 s each): 23 + (60 * 0.98 - 23) s left at 1 s/step = 58 steps.
    assert full.state.planned_iters == 58 and full.state.iteration == 58
    assert full.state.stop_reason == "finished"  # the schedule ended before the hard stop at 60 s
    assert full.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # fully annealed
    # Stop after the plan, resume in a new process whose steps are 5x slower: the stored plan holds.
    _budget_run(tmp_path / "part", _Clock(1.0), [_StopAt(30)])
    resumed = _budget_run(tmp_path / "part", _Clock(0.2), [], resume=True)
    assert resumed.state.planned_iters == 58 and resumed.state.iteration == 58
    for name, tensor in full.module.state_dict().items():
        assert torch.equal(tensor, resumed.module.state_dict()[name]), name


def test_a_budget_of_a_few_slow_steps_still_anneals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 1 minute at 5 s per step: a 20-step probe (100 s) would outlast the budget, leaving the
    # learning rate where it started. Two timed steps shorten it to 2 (PROBE_FRACTION: 6 s of
    # budget affords 1): planned after steps 3..5 (t = 25 s): 5 + int((58.8 - 25) / 5) = 11 steps.
    trainer = _budget_run(tmp_path / "slow", _Clock(5.0), [])
    assert trainer.state.planned_iters == 11 and trainer.state.iteration == 11
    assert trainer.state.stop_reason == "finished"
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # Slower still (40 s a step: the budget ends after step 2, before any rate): said, not silent.
    with caplog.at_level("WARNING", logger="medgn"):
        stuck = _budget_run(tmp_path / "stuck", _Clock(40.0), [])
    assert stuck.state.planned_iters == 0 and "did not anneal" in caplog.text


class _SlowStart(HookBase):
    """Steps take 2 s up to step 30, then 1 s: a start-up slower than the steady state."""

    name = "slow_start"

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def after_step(self, trainer: Trainer) -> None:
        self.clock.now += 2.0 if trainer.state.iteration <= 30 else 1.0


def test_budget_schedule_is_refined_from_the_steady_step_rate(tmp_path: Path) -> None:
    clock = _Clock(0.0)
    cfg = _cfg(epochs=1000, iters_per_epoch=10, time_budget_minutes=2.0, schedule="cosine", budget_probe_steps=20)
    budget = TimeBudgetHook(cfg, started_at=clock(), clock=clock)
    budget.PROBE_FRACTION = 1.0  # the whole 20-step probe (its 40 s fit the budget): the refine is tested here
    trainer = _trainer(cfg, tmp_path, [_SlowStart(clock), budget])
    trainer.train()
    # Probe (steps 3..23, 2 s each): 23 + int((117.6 - 46) / 2) = 58 steps, which would end at 88 s.
    # Refined at step 23 + max(20, int(35 * 0.25)) = 43 (t = 73 s) from (73 - 6) / 40 = 1.675 s/step:
    # 43 + int((117.6 - 73) / 1.675) = 69 steps, ending at 99 s.
    assert budget.phase == 2 and budget.step_s == pytest.approx(1.675)
    assert trainer.state.planned_iters == 69 and trainer.state.iteration == 69
    assert trainer.state.stop_reason == "finished" and clock.now - 1000.0 == pytest.approx(99.0)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


class _Drift(HookBase):
    """Steps take 1 s up to step 60, then ``after`` s: a machine that gets slower or faster."""

    name = "drift"

    def __init__(self, clock: _Clock, after: float) -> None:
        self.clock, self.after = clock, after

    def after_step(self, trainer: Trainer) -> None:
        self.clock.now += 1.0 if trainer.state.iteration <= 60 else self.after


class _LrLog(HookBase):
    name = "lr_log"

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def after_step(self, trainer: Trainer) -> None:
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the next step's rate


@pytest.mark.parametrize("after", [1.5, 0.5])
def test_budget_schedule_follows_a_drifting_step_rate_to_the_end(tmp_path: Path, after: float) -> None:
    """One refit from the average rate either overruns the budget (slower: the hard stop cuts the
    schedule before it anneals) or ends minutes early (faster); refits from the recent rate end
    the schedule, annealed, within a few steps of the budget."""
    clock = _Clock(0.0)
    cfg = _cfg(epochs=1000, iters_per_epoch=10, time_budget_minutes=5.0, schedule="cosine", budget_probe_steps=10)
    budget, lr_log = TimeBudgetHook(cfg, started_at=clock(), clock=clock), _LrLog()
    trainer = _trainer(cfg, tmp_path, [_Drift(clock, after), budget, lr_log])
    trainer.train()
    elapsed = clock.now - 1000.0
    assert budget.refits >= 2 and budget.step_s == pytest.approx(after)
    # Every refit continues the decay from where it was: the learning rate never rises, and no
    # step changes it by more than a few times the mean decrement.
    drops = [a - b for a, b in zip(lr_log.lrs, lr_log.lrs[1:])]
    assert min(drops) >= -1e-12 and max(drops) <= 5 * cfg.lr / len(drops)
    assert trainer.state.stop_reason == "finished" and trainer.state.iteration == trainer.state.planned_iters
    assert 300 * 0.98 - 3 * after <= elapsed <= 300 * 0.98  # within 3 steps of the usable budget
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_budget_schedule_counts_the_validation_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock(1.0)
    monkeypatch.setattr(time, "monotonic", clock)  # the validation hook times itself with it too
    cfg = _cfg(
        epochs=1000, iters_per_epoch=10, time_budget_minutes=2.0, schedule="cosine", budget_probe_steps=20, val_every=3
    )

    def slow_validate(model: torch.nn.Module) -> list[float]:
        clock.now += 6.0  # one validation costs 6 steps' time
        return [0.5]

    budget = TimeBudgetHook(cfg, started_at=clock(), validates=True, clock=clock)
    budget.PROBE_FRACTION = 1.0  # the whole 20-step probe: the validation's share is tested here
    hooks = [_Tick(clock), ValidationHook(slow_validate, every=3), budget]
    trainer = _trainer(cfg, tmp_path, hooks)
    trainer.train()
    # First plan at step 23 ignores validation: 23 + int(120 * 0.98 - 23) = 117 steps. After the first
    # validation (epoch 3, t = 36 s): left = 117.6 - 36 - 6 = 75.6 s at 1 + 6/30 s per step -> 63.
    assert trainer.state.planned_iters == 30 + 63
    assert trainer.state.iteration == 93 and trainer.state.stop_reason == "finished"
    assert clock.now - 1000.0 <= 120.0  # steps + validations + the final validation fit the budget


def test_progress_plot_is_drawn_first_then_at_most_every_interval_and_at_the_end(tmp_path: Path) -> None:
    from medgn.train.logging_hooks import ProgressPlotHook

    times = iter([0.0, 10.0, 20.0, 31.0, 40.0])  # the clock at the end of each of 5 epochs
    hook = ProgressPlotHook(tmp_path / "progress.png", min_interval_s=30.0, clock=lambda: next(times))
    drawn: list[list[int]] = []
    hook.draw = lambda records: drawn.append([r["epoch"] for r in records])  # type: ignore[method-assign]
    trainer = SimpleNamespace(epoch_records=[], epoch_record={})
    for epoch in range(1, 6):
        trainer.epoch_record = {"epoch": epoch}
        hook.after_epoch(trainer)  # type: ignore[arg-type]
        trainer.epoch_records.append(trainer.epoch_record)
    assert drawn == [[1], [1, 2, 3, 4]]
    hook.after_train(trainer)  # type: ignore[arg-type]
    assert drawn[-1] == [1, 2, 3, 4, 5]
    hook.after_train(trainer)  # type: ignore[arg-type]
    assert len(drawn) == 3  # nothing new: no redraw


def test_budgets_and_folds_read_as_people_write_them() -> None:
    from medgn.train.hooks import _duration
    from medgn.workflows.run_folder import fold_name

    assert [_duration(s) for s in (10.0, 59.5, 60.0, 90.0, 1200.0)] == ["10 s", "59.5 s", "1 min", "1.5 min", "20 min"]
    assert [fold_name(f) for f in (-1, 0, 3)] == ["all", "0", "3"]


def test_resume_reads_the_checkpoint_onto_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded onto a GPU, the saved RNG states became CUDA tensors that restore_rng refuses ("the
    checkpoint does not fit this run's network"); load_state_dict moves the weights and state itself."""
    import medgn.train.trainer as trainer_module

    cfg = _cfg(epochs=1)
    first = _trainer(cfg, tmp_path, [CheckpointHook(0.0)])
    first.train()
    asked: list[object] = []
    load = trainer_module.load_checkpoint

    def spy(path: object, **kwargs: object) -> object:
        asked.append(kwargs.get("map_location"))
        return load(path, **kwargs)

    monkeypatch.setattr(trainer_module, "load_checkpoint", spy)
    again = _trainer(cfg, None, [])
    again.device = torch.device("meta")  # what a GPU run would have asked for: not where the file goes
    again.resume(tmp_path / "checkpoints")
    assert asked == ["cpu"] and again.state.iteration == first.state.iteration


def test_the_grad_scaler_step_unscales_before_clipping_and_updates(tmp_path: Path) -> None:
    """The fp16 branch of a step (a GPU without bf16) otherwise runs only on such a GPU: here with the
    CPU's GradScaler. The reported gradient norm is the unscaled one, clipping sees it, and the step
    updates the weights exactly as the same step without a scaler (the scale is a power of two)."""
    cfg = _cfg(clip_grad=0.5)
    plain, scaled = _trainer(cfg, None, []), _trainer(cfg, None, [])
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = [next(iter(plain.source(0, 0)))]
    seed_everything(cfg.seed)  # the same dropout masks in both steps
    a = plain.train_step(batches)
    seed_everything(cfg.seed)
    b = scaled.train_step(batches)
    assert not a.skipped and not b.skipped
    assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5) and a.grad_norm > cfg.clip_grad  # clipped
    for p, q in zip(plain.module.parameters(), scaled.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert scaled.scaler.get_scale() == 2.0**10  # a finite step keeps the scale until the growth interval


def test_resuming_with_another_process_count_is_said_on_the_console(capsys: pytest.CaptureFixture[str]) -> None:
    """The warning went to medgn.log only: a 2-process run resumed alone silently changed its data order."""
    cfg = _cfg(epochs=1)
    state = _trainer(cfg, None, []).state_dict()
    state["sampler"]["world_size"] = 2
    _trainer(cfg, None, []).load_state_dict(state)
    assert "resuming a 2-process run with 1 processes: data order and RNG streams change" in capsys.readouterr().err
