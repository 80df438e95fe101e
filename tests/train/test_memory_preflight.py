"""The training memory preflight and the out-of-memory exit code.

The available memory is always patched to a small value: nothing here allocates more than a tiny
training run does. A patch of 1000^3 is estimated on the meta device (no memory) and refused.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medgn.train.memory as memory
import medgn.workflows.train as train_workflow
from medgn.cli import main
from medgn.config import build_run_config
from medgn.data.datasets import load_dataset
from medgn.errors import ResourceError, UsageError, out_of_memory
from medgn.planning.plan import NetworkPlan, Plan

GB = 10**9
SIZE = 20  # case edge (voxels) at the plan's spacing, which is the files' own
TINY = [
    *("--set", "model.features=[4,8]"),
    *("--set", "plan.n_folds=2"),
    *("--set", "data.num_workers=0"),
    *("--set", "train.amp=off"),
    *("--set", "train.epochs=1"),
    *("--set", "train.iters_per_epoch=1"),
    *("--set", "train.checkpoint_every_minutes=0"),
    *("--no-progress", "--device", "cpu", "--fold", "all"),
]


def make_dataset(root: Path, n: int = 3) -> Path:
    """An MSD dataset of ``n`` cases of SIZE^3: a bright cube (label 1) in noise."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    training = []
    for i in range(n):
        label = np.zeros((SIZE,) * 3, np.uint8)
        label[4:12, 5:13, 4:11] = 1
        image = (label * 100 + np.random.default_rng(i).normal(50, 10, label.shape)).astype(np.float32)
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            img = nib.Nifti1Image(array, affine)
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            nib.save(img, str(root / folder / f"c{i}.nii.gz"))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    description = {
        "name": "tiny",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "cube"},
        "numTraining": n,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(description))
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


@pytest.fixture
def small_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 2 GB of free host memory and no GPU memory probe."""
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: 2 * GB)


def _plan(patch: tuple[int, int, int]) -> Plan:
    return Plan(
        in_channels=1,
        num_classes=2,
        label_values=(0, 1),
        target_spacing=(1.5, 1.5, 2.0),
        normalization=({"scheme": "zscore"},),
        patch_size=patch,
        network=NetworkPlan(((1, 1, 1), (2, 2, 2)), ((3, 3, 3), (3, 3, 3)), (4, 8)),
    )


def _cfg(*overrides: str):
    return build_run_config({}, ["model.features=[4,8]", "train.amp=off", "data.num_workers=0", *overrides])


@pytest.mark.usefixtures("small_machine")
def test_a_tiny_run_passes_the_check_and_trains(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--out", str(out), *TINY, "--set", "plan.patch_size=[16,16,16]"]) == 0
    log = (out / "medgn.log").read_text()
    assert "memory estimate: step" in log and "host 2.00 GB" in log


@pytest.mark.usefixtures("small_machine")
def test_a_huge_patch_is_refused_with_exit_5_before_the_run_folder_is_written(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    seen: list[set[str]] = []
    real = train_workflow.check_training_memory

    def spy(*args, **kwargs):
        seen.append({p.name for p in out.iterdir()})
        return real(*args, **kwargs)

    monkeypatch.setattr(train_workflow, "check_training_memory", spy)
    code = main(
        ["train", "--data", str(dataset), "--out", str(out), *TINY, "--set", "plan.patch_size=[1000,1000,1000]"]
    )
    err = capsys.readouterr().err
    assert code == 5
    errors = [line for line in err.splitlines() if line.startswith("medgn: error:")]
    assert len(errors) == 1 and errors[0].startswith("medgn: error: plan.patch_size: training would need about")
    assert "GB available" in errors[0] and "train.batch_size" in errors[0] and "train.memory_check=false" in errors[0]
    assert "Traceback" not in err
    # The padding warning comes first: the patch is 50x the largest case.
    assert "medgn: warning: plan.patch_size [1000, 1000, 1000] is more than 2x the largest training case" in err
    assert seen and not seen[0] & {"config.yaml", "plan.json"}  # checked before the run's config and plan
    assert not out.exists()  # and the refused new run left no folder


def test_the_check_compares_the_step_with_free_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: 100 * GB)
    monkeypatch.setattr(memory, "available_device_bytes", lambda device: GB // 10)
    cfg = _cfg()
    with pytest.raises(ResourceError, match=r"GPU memory, 0\.1 GB free on cuda:0") as info:
        memory.check_training_memory(cfg, _plan((128, 128, 128)), [], torch.device("cuda:0"))
    assert info.value.where == "plan.patch_size"
    monkeypatch.setattr(memory, "available_device_bytes", lambda device: 100 * GB)
    estimate = memory.check_training_memory(cfg, _plan((128, 128, 128)), [], torch.device("cuda:0"))
    assert estimate is not None and 0 < estimate.step_bytes < 100 * GB


def test_memory_check_false_trains_anyway_but_a_patch_no_plan_can_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: 1000)  # 1 kB: every run "cannot fit"
    with pytest.raises(ResourceError):
        memory.check_training_memory(_cfg(), _plan((32, 32, 32)), [], torch.device("cpu"))
    off = _cfg("train.memory_check=false")
    assert memory.check_training_memory(off, _plan((32, 32, 32)), [], torch.device("cpu")) is None
    with pytest.raises(UsageError, match="more voxels than a plan may hold"):  # plan.json could not be read back
        memory.check_training_memory(off, _plan((512, 512, 512)), [], torch.device("cpu"))


def test_the_estimate_grows_with_patch_batch_and_cached_cases(dataset: Path) -> None:
    cases = load_dataset(dataset).cases
    grids = memory.case_grids(cases, (1.5, 1.5, 2.0), _cfg().data.limits)
    assert grids == [(SIZE, SIZE, SIZE)] * len(cases)
    cpu = torch.device("cpu")
    small = memory.estimate_training_memory(_cfg(), _plan((32, 32, 32)), grids, cpu)
    large = memory.estimate_training_memory(_cfg(), _plan((64, 64, 64)), grids, cpu)
    batch = memory.estimate_training_memory(_cfg("train.batch_size=4"), _plan((32, 32, 32)), grids, cpu)
    no_cache = memory.estimate_training_memory(_cfg("data.cache_rate=0"), _plan((32, 32, 32)), grids, cpu)
    assert large.step_bytes > 6 * small.step_bytes  # 8x the voxels, weights aside
    assert batch.step_bytes > 1.5 * small.step_bytes
    # Each case is cached padded to 32^3: image and label float32.
    assert small.data_bytes - no_cache.data_bytes == len(cases) * 32**3 * 2 * 4


def test_a_patch_near_the_cases_gets_no_warning(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = load_dataset(dataset).cases
    memory.check_training_memory(_cfg("train.memory_check=false"), _plan((32, 32, 32)), cases, torch.device("cpu"))
    assert "warning" not in capsys.readouterr().err
    memory.check_training_memory(_cfg("train.memory_check=false"), _plan((48, 48, 48)), cases, torch.device("cpu"))
    assert "more than 2x the largest training case in every axis ([20, 20, 20] voxels" in capsys.readouterr().err


def test_available_memory_is_read_from_the_machine() -> None:
    free = memory.available_cpu_bytes()
    assert free is not None and free > 0
    assert memory.available_device_bytes(torch.device("cpu")) is None


def _cuda_oom() -> BaseException:
    return RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize(
    "make",
    [
        lambda: MemoryError(),
        # MONAI wraps what a transform raised; PyTorch's CPU allocator says it in a RuntimeError.
        lambda: RuntimeError("applying transform <monai.transforms.SpatialPadd>"),
        lambda: OSError(errno.ENOMEM, "Cannot allocate memory"),
        _cuda_oom,
    ],
)
def test_out_of_memory_anywhere_is_exit_5_on_one_line(
    make, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*args, **kwargs):
        exc = make()
        if isinstance(exc, RuntimeError) and "applying transform" in str(exc):
            raise exc from RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                "allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)"
            )
        raise exc

    monkeypatch.setattr(train_workflow, "load_dataset", fail)
    code = main(["train", "--data", str(dataset), "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 5, err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("medgn: error: out of memory (got ") and "plan.patch_size" in err and "traceback in" in err


def test_other_errors_stay_internal_errors(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("applying transform <monai.transforms.SpatialPadd>") from ValueError("bad shape")

    monkeypatch.setattr(train_workflow, "load_dataset", fail)
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "run"), *TINY]) == 1
    assert capsys.readouterr().err.startswith("medgn: internal error: RuntimeError")


def test_out_of_memory_follows_the_chain() -> None:
    try:
        try:
            raise MemoryError
        except MemoryError as inner:
            raise KeyError("while handling") from inner
    except KeyError as outer:
        assert isinstance(out_of_memory(outer), MemoryError)
    assert out_of_memory(OSError(errno.ENOENT, "No such file")) is None
    assert out_of_memory(RuntimeError("shape mismatch")) is None
    assert out_of_memory(None) is None


def _cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, membership: str, files: dict[str, str]) -> None:
    """A fake ``/proc/self/cgroup`` (``membership``) and ``/sys/fs/cgroup`` tree (``files``: path -> text)."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self_cgroup").write_text(membership)
    monkeypatch.setattr(memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(memory, "PROC_SELF_CGROUP", tmp_path / "self_cgroup")


V2_STAT = "anon 400000000\nfile 7500000000\nactive_file 500000000\ninactive_file 7000000000\n"


def test_cgroup_v2_page_cache_is_not_counted_as_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docker --memory=8g after reading a dataset: 7.9 GB charged, 7 GB of it inactive file cache.
    group = "kubepods/pod1/"
    files = {
        group + "memory.max": "8000000000\n",
        group + "memory.current": "7900000000\n",
        group + "memory.stat": V2_STAT,
        "kubepods/memory.max": "max\n",
    }
    _cgroups(tmp_path, monkeypatch, "0::/kubepods/pod1\n", files)
    assert memory.cgroup_available_bytes() == 8_000_000_000 - (7_900_000_000 - 7_000_000_000)


def test_cgroup_v2_the_tightest_parent_limit_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {
        "a/b/memory.max": "max\n",  # the process's own group has no limit: its parent's applies
        "a/b/memory.current": "100\n",
        "a/memory.max": "3000000000\n",
        "a/memory.current": "2500000000\n",
        "a/memory.stat": "inactive_file 1000000000\n",
        "memory.max": "9000000000\n",
        "memory.current": "1000000000\n",
    }
    _cgroups(tmp_path, monkeypatch, "0::/a/b\n", files)
    assert memory.cgroup_available_bytes() == 3_000_000_000 - 1_500_000_000


def test_cgroup_v1_limit_minus_usage_less_inactive_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {
        "memory/docker/abc/memory.limit_in_bytes": "2000000000\n",
        "memory/docker/abc/memory.usage_in_bytes": "1900000000\n",
        "memory/docker/abc/memory.stat": "inactive_file 5\ntotal_inactive_file 1500000000\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
        "memory/memory.usage_in_bytes": "50000000000\n",
    }
    membership = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n"
    _cgroups(tmp_path, monkeypatch, membership, files)
    assert memory.cgroup_available_bytes() == 2_000_000_000 - 400_000_000
    # Without a cgroup namespace the host's path is listed but the container's group is the mount root.
    _cgroups(
        tmp_path / "nons",
        monkeypatch,
        "4:memory:/docker/abc\n",
        {
            "memory/memory.limit_in_bytes": "1000000000\n",
            "memory/memory.usage_in_bytes": "900000000\n",
            "memory/memory.stat": "total_inactive_file 600000000\n",
        },
    )
    assert memory.cgroup_available_bytes() == 700_000_000


@pytest.mark.parametrize(
    ("membership", "files"),
    [
        (None, {}),  # no /proc/self/cgroup
        ("0::/\n", {}),  # no memory controller files
        ("0::/\n", {"memory.max": "max\n", "memory.current": "5\n"}),  # no limit
        ("0::/\n", {"memory.max": "1000\n"}),  # no memory.current
        ("0::/\n", {"memory.max": "lots\n", "memory.current": "5\n"}),  # unparsable
        ("0::/\n", {"memory.max": "1000\n", "memory.current": "\xff\n"}),  # not ASCII
        ("4:memory:/x\n", {"memory/memory.limit_in_bytes": "1000\n", "memory/memory.usage_in_bytes": ""}),
    ],
)
def test_missing_or_unreadable_cgroup_files_mean_no_cgroup_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, membership: str | None, files: dict[str, str]
) -> None:
    _cgroups(tmp_path, monkeypatch, membership or "", files)
    if membership is None:
        (tmp_path / "self_cgroup").unlink()
    assert memory.cgroup_available_bytes() is None
    assert memory.available_cpu_bytes() is not None  # MemAvailable still counts


def test_a_missing_memory_stat_counts_the_whole_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cgroups(tmp_path, monkeypatch, "0::/\n", {"memory.max": "1000000\n", "memory.current": "400000\n"})
    assert memory.cgroup_available_bytes() == 600_000
    assert memory.available_cpu_bytes() == 600_000  # the cgroup is tighter than the machine


@pytest.mark.parametrize(("inactive", "refused"), [(0, True), (1_800_000_000, False)])
def test_a_run_near_the_container_limit_by_page_cache_alone_is_not_refused(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inactive: int, refused: bool
) -> None:
    # 10 kB below the limit: refused when that is memory in use, trained when it is cache to drop.
    files = {
        "memory.max": "2000000000\n",
        "memory.current": "1999990000\n",
        "memory.stat": f"active_file 100000\ninactive_file {inactive}\n",
    }
    _cgroups(tmp_path, monkeypatch, "0::/\n", files)
    cases = load_dataset(dataset).cases
    if refused:
        with pytest.raises(ResourceError, match="GB available"):
            memory.check_training_memory(_cfg(), _plan((16, 16, 16)), cases, torch.device("cpu"))
    else:
        assert memory.check_training_memory(_cfg(), _plan((16, 16, 16)), cases, torch.device("cpu")) is not None
