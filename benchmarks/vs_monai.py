"""medgn's CPU recipe against a plain MONAI pipeline: same cases, same budget, same threads.

Both train on the training cases of one cross-validation fold of an MSD dataset (LA2018: 64 cases)
for the same wall-clock budget with the same number of CPU threads, one after the other, then
predict the fold's held-out cases (16) at their original resolution; both predictions are scored by
``medgn evaluate`` against the same references. The MONAI pipeline is the short script a user would
write: SegResNet (16 base filters, GroupNorm with 8 groups), 1.25 mm spacing, per-image z-score,
64x64x40 crops with positive/negative sampling, flips along two axes, AdamW 1e-3, Dice+CE, as many
steps as the budget allows, Gaussian sliding-window inference. medgn runs exactly what a user runs:
``medgn train --config CONFIG --fold all --time-budget B`` and ``medgn infer`` with defaults.

Writes ``benchmarks/results/vs_monai.json`` (or ``--out``): budget, threads, machine, and per method
``dice_mean``, ``dice_median``, ``dice_min``, ``hd95_mean``, ``steps``, ``infer_seconds_per_scan``.

Usage: ``python benchmarks/vs_monai.py --data ../shared/data/LA2018 --budget 20 --threads 2``
(``--budget 0.5 --out /tmp/x.json`` checks the script in a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUTF8="1", MPLBACKEND="Agg")
    return env


def _run(cmd: list[str], threads: int, log: Path) -> float:
    """Run ``cmd`` with ``threads`` CPU threads, output to ``log``; return its wall time in seconds."""
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.run(cmd, env=_env(threads), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"vs_monai: {' '.join(cmd[:4])} ... failed with exit {proc.returncode}; see {log}")
    return time.monotonic() - start


def split_dataset(data: Path, work: Path, fold: int, n_folds: int, seed: int) -> tuple[Path, Path, Path, list[str]]:
    """An MSD dataset of the fold's training cases, and folders of its held-out images and labels (symlinks)."""
    from medgn.data.datasets import load_dataset
    from medgn.planning.splits import make_splits

    index = load_dataset(data)
    by_id = {c.case_id: c for c in index.cases}
    split = make_splits(sorted(by_id), n_folds, seed)[fold]
    train_root, val_img, val_lab = work / "train_ds", work / "val_images", work / "val_labels"
    for folder in (train_root / "imagesTr", train_root / "labelsTr", val_img, val_lab):
        folder.mkdir(parents=True, exist_ok=True)
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    training = []
    for cid in split["train"]:
        case = by_id[cid]
        image, label = Path(case.images[0]), Path(case.label)
        for src, dst in ((image, train_root / "imagesTr" / image.name), (label, train_root / "labelsTr" / label.name)):
            if not dst.exists():
                dst.symlink_to(src.resolve())
        training.append({"image": f"./imagesTr/{image.name}", "label": f"./labelsTr/{label.name}"})
    meta.update(training=training, numTraining=len(training), test=[], numTest=0)
    (train_root / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    for cid in split["val"]:
        case = by_id[cid]
        for src, folder in ((Path(case.images[0]), val_img), (Path(case.label), val_lab)):
            dst = folder / f"{cid}.nii.gz"
            if not dst.exists():
                dst.symlink_to(src.resolve())
    return train_root, val_img, val_lab, list(split["val"])


def _scores(eval_dir: Path) -> dict[str, float]:
    import csv
    import math
    import statistics

    rows = list(csv.DictReader((eval_dir / "metrics.csv").open(encoding="utf-8")))
    dice = [float(r["dice"]) for r in rows if r["label"] == "1"]
    hd95 = [float(r["hd95"]) for r in rows if r["label"] == "1" and math.isfinite(float(r["hd95"]))]
    return {
        "dice_mean": statistics.fmean(dice),
        "dice_median": statistics.median(dice),
        "dice_min": min(dice),
        "hd95_mean": statistics.fmean(hd95) if hd95 else float("nan"),
        "cases": len(dice),
    }


def run_medgn(args: argparse.Namespace, train_root: Path, val_img: Path, val_lab: Path, work: Path) -> dict[str, Any]:
    run = work / "medgn_run"
    medgn = [sys.executable, "-m", "medgn"]
    train_s = _run(
        [
            *medgn,
            "train",
            "--config",
            args.config,
            "--data",
            str(train_root),
            "--out",
            str(run),
            "--fold",
            "all",
            "--time-budget",
            f"{args.budget}m",
            "--device",
            "cpu",
            "--no-progress",
        ],
        args.threads,
        work / "medgn_train.log",
    )
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    pred = work / "medgn_pred"
    infer_s = _run(
        [*medgn, "infer", "--model", str(run), "--input", str(val_img), "--output", str(pred)],
        args.threads,
        work / "medgn_infer.log",
    )
    n = len(list(val_img.iterdir()))
    return {
        **_evaluate("medgn", pred, val_img, val_lab, work, args.threads),
        "steps": summary["iteration"],
        "train_seconds": round(train_s, 1),
        "infer_seconds_per_scan": round(infer_s / n, 2),
    }


def _evaluate(side: str, pred: Path, val_img: Path, val_lab: Path, work: Path, threads: int) -> dict[str, Any]:
    """Score one side's predictions with ``medgn evaluate`` (worst cases drawn over the held-out scans)."""
    out = work / f"{side}_eval"
    cmd = [sys.executable, "-m", "medgn", "evaluate", "--pred", str(pred), "--ref", str(val_lab), "--out", str(out)]
    _run([*cmd, "--images", str(val_img)], threads, work / f"{side}_eval.log")
    return _scores(out)


def run_monai(args: argparse.Namespace, train_root: Path, val_img: Path, val_lab: Path, work: Path) -> dict[str, Any]:
    script = [sys.executable, str(Path(__file__).resolve())]
    model = work / "monai_model.pt"
    train_s = _run(
        [*script, "--monai-train", str(train_root), "--model-out", str(model), "--budget", str(args.budget)],
        args.threads,
        work / "monai_train.log",
    )
    info = json.loads(model.with_suffix(".json").read_text(encoding="utf-8"))
    pred = work / "monai_pred"
    infer_s = _run(
        [*script, "--monai-infer", str(val_img), "--model-out", str(model), "--pred-out", str(pred)],
        args.threads,
        work / "monai_infer.log",
    )
    n = len(list(val_img.iterdir()))
    return {
        **_evaluate("monai", pred, val_img, val_lab, work, args.threads),
        "steps": info["steps"],
        "train_seconds": round(train_s, 1),
        "infer_seconds_per_scan": round(infer_s / n, 2),
    }


# ---- the plain MONAI pipeline (runs in its own process) ---------------------------------------
SPACING = (1.25, 1.25, 1.25)
ROI = (64, 64, 40)


def _monai_pre() -> list[Any]:
    from monai import transforms as T

    return [
        T.LoadImaged(["image", "label"], image_only=False),
        T.EnsureChannelFirstd(["image", "label"]),
        T.Orientationd(["image", "label"], axcodes="RAS"),
        T.Spacingd(["image", "label"], pixdim=SPACING, mode=("bilinear", "nearest")),
        T.NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    ]


def _segresnet() -> Any:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=2, norm=("GROUP", {"num_groups": 8}))


def monai_train(root: Path, model_out: Path, budget_min: float) -> None:
    import torch
    from monai import transforms as T
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss

    start = time.monotonic()
    torch.manual_seed(0)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    items = [{"image": str(root / t["image"]), "label": str(root / t["label"])} for t in meta["training"]]
    train_tf = T.Compose(
        [
            *_monai_pre(),
            T.RandCropByPosNegLabeld(
                ["image", "label"], label_key="label", spatial_size=ROI, pos=1, neg=1, num_samples=2
            ),
            T.RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
            T.RandFlipd(["image", "label"], prob=0.5, spatial_axis=1),
        ]
    )
    ds = CacheDataset(items, train_tf, cache_rate=1.0, num_workers=1, progress=False)
    loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=0)  # 2 crops per volume: batch 2
    net = _segresnet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    steps = 0
    budget_s = budget_min * 60.0
    while time.monotonic() - start < budget_s:
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            steps += 1
            if time.monotonic() - start >= budget_s:
                break
    torch.save(net.state_dict(), model_out)
    model_out.with_suffix(".json").write_text(json.dumps({"steps": steps}), encoding="utf-8")


def monai_infer(images: Path, model_out: Path, pred_out: Path) -> None:
    import nibabel as nib
    import numpy as np
    import torch
    from monai import transforms as T
    from monai.inferers import sliding_window_inference

    net = _segresnet()
    net.load_state_dict(torch.load(model_out, weights_only=True))
    net.eval()
    pre = T.Compose(
        [
            T.LoadImaged("image"),
            T.EnsureChannelFirstd("image"),
            T.Orientationd("image", axcodes="RAS"),
            T.Spacingd("image", pixdim=SPACING, mode="bilinear"),
            T.NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        ]
    )
    post = T.Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)
    pred_out.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.iterdir()):
        data = pre({"image": str(path)})
        with torch.inference_mode():
            logits = sliding_window_inference(data["image"][None], ROI, 2, net, overlap=0.5, mode="gaussian")
        data["pred"] = logits[0].argmax(0, keepdim=True).float()
        data["pred"].applied_operations = data["image"].applied_operations
        data["pred"].meta = data["image"].meta
        mask = post(data)["pred"][0].numpy().astype(np.uint8)
        ref = nib.load(str(path))
        nib.save(nib.Nifti1Image(mask, ref.affine, ref.header), str(pred_out / path.name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "LA2018"))
    parser.add_argument("--config", default="configs/la2018_cpu.yaml")
    parser.add_argument("--budget", type=float, default=20.0, help="training minutes per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--work", default="runs/vs_monai")
    parser.add_argument("--out", default=str(RESULTS / "vs_monai.json"))
    parser.add_argument(
        "--only", choices=("medgn", "monai"), default=None, help="run one side (the other is kept from --out)"
    )
    parser.add_argument("--monai-train", help=argparse.SUPPRESS)
    parser.add_argument("--monai-infer", help=argparse.SUPPRESS)
    parser.add_argument("--model-out", help=argparse.SUPPRESS)
    parser.add_argument("--pred-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monai_train:
        monai_train(Path(args.monai_train), Path(args.model_out), args.budget)
        return 0
    if args.monai_infer:
        monai_infer(Path(args.monai_infer), Path(args.model_out), Path(args.pred_out))
        return 0
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_root, val_img, val_lab, val_ids = split_dataset(Path(args.data), work, args.fold, 5, 0)
    out = Path(args.out)
    previous = json.loads(out.read_text(encoding="utf-8")) if args.only and out.exists() else {}
    result: dict[str, Any] = {
        "budget_minutes": args.budget,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "dataset": f"{Path(args.data).name}: fold {args.fold} of 5 ({len(val_ids)} held-out cases)",
        "medgn_config": args.config,
        "held_out": val_ids,
    }
    for name, fn in (("medgn", run_medgn), ("monai", run_monai)):
        if args.only and args.only != name:
            result[name] = previous.get(name)
            continue
        (work / name).mkdir(parents=True, exist_ok=True)
        print(f"vs_monai: {name}: training for {args.budget:g} min with {args.threads} threads", flush=True)
        result[name] = fn(args, train_root, val_img, val_lab, work / name)
        print(f"vs_monai: {name}: {result[name]}", flush=True)
    if result.get("medgn") and result.get("monai"):
        result["dice_gain"] = round(result["medgn"]["dice_mean"] - result["monai"]["dice_mean"], 4)
        result["infer_speedup"] = round(
            result["monai"]["infer_seconds_per_scan"] / result["medgn"]["infer_seconds_per_scan"], 2
        )
    from medgn.files import atomic_write_json

    atomic_write_json(out, result)
    print(json.dumps({k: result.get(k) for k in ("medgn", "monai", "dice_gain", "infer_speedup")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
