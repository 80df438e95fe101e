"""Whole-scan inference on the CPU: medgn ``infer`` against MONAI SegResNet sliding windows.

For a whole LA2018 volume and the CT sample, with and without mirroring TTA, each configuration runs
in a fresh subprocess with 2 torch threads and reports wall seconds for the case and the peak
resident set (``ru_maxrss``) of that process. medgn runs its full path (read with preflight,
MONAI preprocessing to the plan spacing, Gaussian sliding windows, inversion to the input grid,
argmax, geometry-checked atomic write, sidecar) with an untrained UNet3D; the baseline runs
MONAI's ``sliding_window_inference`` (Gaussian blend, same window, overlap and windows per forward)
with a MONAI SegResNet whose parameter count is the closest to ours, on the image as loaded (load,
channel first, z-score, softmax, argmax, NIfTI write). Untrained weights: speed and memory only.
Results: a table on stdout and ``benchmarks/results/infer_cpu.{json,csv}``.

Usage: ``python benchmarks/bench_infer.py [--quick]`` (``--quick``: CT sample only, no TTA).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Two threads: the CPU budget of the machines this is compared on (and of CI runners).
THREADS = 2
# A 4-stage UNet3D (16..128 channels) and a 64^3 window: a size a 2-core CPU finishes in minutes
# with 8x TTA; the window is divisible by the total stride 8.
FEATURES = [16, 32, 64, 128]
WINDOW = [64, 64, 64]
# 0.25 (MONAI's default; `medgn infer` defaults to 0.5): 8x TTA of a whole LA2018 volume with both
# methods then fits in minutes on 2 shared cores; both methods use the same value.
OVERLAP = 0.25
SW_BATCH = 2  # the default of `medgn infer`
# SegResNet init_filters candidates (multiples of its 8 GroupNorm groups): the one with the
# closest parameter count is used.
SEGRESNET_FILTERS = (8, 16, 24, 32)


def _cases() -> dict[str, Path]:
    la = sorted((DATA / "LA2018" / "imagesTr").glob("*.nii.gz"))[0]
    return {"la2018": la, "ct_sample": DATA / "samples" / "ct_abdomen_small.nii.gz"}


def _plan(spacing: list[float]) -> dict[str, Any]:
    return {
        "version": 1,
        "in_channels": 1,
        "num_classes": 2,
        "label_values": [0, 1],
        "target_spacing": spacing,
        "normalization": [{"scheme": "zscore"}],
        "patch_size": WINDOW,
        "batch_size": 2,
        "network": {
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (len(FEATURES) - 1),
            "kernel_sizes": [[3, 3, 3]] * len(FEATURES),
        },
    }


def _medgn_model(plan: dict[str, Any]) -> Any:
    import torch

    from medgn.configtools import build
    from medgn.models.config import UNet3DConfig
    from medgn.models.registry import build_model

    torch.manual_seed(0)
    cfg = build(UNet3DConfig, {"features": FEATURES, "deep_supervision": False}, "model")
    return build_model(cfg, 1, 2, plan["network"]["strides"], plan["network"]["kernel_sizes"])


def _segresnet(target_params: int) -> Any:
    from monai.networks.nets import SegResNet

    def count(f: int) -> int:
        return sum(
            p.numel() for p in SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=f).parameters()
        )

    best = min(SEGRESNET_FILTERS, key=lambda f: abs(count(f) - target_params))
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=best).eval(), best


def _run_medgn(path: Path, tta: bool, work: Path) -> dict[str, Any]:
    import nibabel as nib

    from medgn.infer.predictor import Predictor
    from medgn.infer.run import infer

    spacing = [float(s) for s in nib.load(path).header.get_zooms()[:3]]
    plan = _plan(spacing)
    model = _medgn_model(plan)
    predictor = Predictor.from_modules([model], plan)
    (work / "in").mkdir()
    (work / "in" / path.name).symlink_to(path)
    t0 = time.perf_counter()
    report = infer(
        predictor, work / "in", work / "out", tta=tta, overlap=OVERLAP, sw_batch_size=SW_BATCH, threads=THREADS
    )
    seconds = time.perf_counter() - t0
    if report.exit_code:
        raise RuntimeError(report.to_dict())
    sidecar = json.loads((work / "out" / (path.name.split(".")[0] + ".json")).read_text())
    return {
        "seconds": seconds,
        "predict_seconds": sidecar["seconds"]["predict"],
        "params": sum(p.numel() for p in model.parameters()),
        "model": f"UNet3D{FEATURES}",
    }


def _run_monai(path: Path, tta: bool, work: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, NormalizeIntensity

    target = sum(p.numel() for p in _medgn_model(_plan([1.0, 1.0, 1.0])).parameters())
    net, filters = _segresnet(target)
    t0 = time.perf_counter()
    image = Compose([LoadImage(image_only=True), EnsureChannelFirst(), NormalizeIntensity(nonzero=True)])(str(path))
    batch = torch.as_tensor(image).float()[None]
    flips = [()] if not tta else [d for r in range(4) for d in __import__("itertools").combinations((2, 3, 4), r)]
    t1 = time.perf_counter()
    total = None
    with torch.inference_mode():
        for dims in flips:
            x = torch.flip(batch, dims) if dims else batch
            logits = sliding_window_inference(x, WINDOW, SW_BATCH, net, overlap=OVERLAP, mode="gaussian")
            p = torch.softmax(logits, 1)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
    predict = time.perf_counter() - t1
    mask = total[0].argmax(0).numpy().astype(np.uint8)
    ref = nib.load(path)
    nib.save(nib.Nifti1Image(mask, ref.affine, ref.header), str(work / "mask.nii.gz"))
    return {
        "seconds": time.perf_counter() - t0,
        "predict_seconds": predict,
        "params": sum(p.numel() for p in net.parameters()),
        "model": f"SegResNet(init_filters={filters})",
    }


def _one(method: str, case: str, tta: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    path = _cases()[case]
    with tempfile.TemporaryDirectory() as tmp:
        fn = _run_medgn if method == "medgn" else _run_monai
        row = fn(path, tta, Path(tmp))
    row.update(
        {
            "method": method,
            "case": case,
            "tta": tta,
            "shape": list(__import__("nibabel").load(path).shape),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CT sample only, no TTA")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "CASE", "TTA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], args.one[2] == "1")))
        return
    from medgn.environment import versions
    from medgn.files import atomic_write_json, atomic_write_text

    cases = ["ct_sample"] if args.quick else ["la2018", "ct_sample"]
    ttas = [False] if args.quick else [False, True]
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    for case in cases:
        for tta in ttas:
            for method in ("medgn", "monai"):
                out = subprocess.run(
                    [sys.executable, __file__, "--one", method, case, "1" if tta else "0"],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=False,
                )
                if out.returncode:
                    raise SystemExit(f"{method} {case} tta={tta} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{row['case']:<10} tta={str(row['tta']):<5} {row['method']:<6} {row['model']:<28} "
                    f"params={row['params']:>9,} total={row['seconds']:7.2f} s "
                    f"predict={row['predict_seconds']:7.2f} s peak RSS={row['peak_rss_mib']:7.0f} MiB",
                    flush=True,
                )
    meta = {
        "device": "cpu",
        "threads": THREADS,
        "window": WINDOW,
        "overlap": OVERLAP,
        "sw_batch_size": SW_BATCH,
        "versions": versions(),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "infer_cpu.json", {"meta": meta, "rows": rows})
    buf = io.StringIO()
    fields = ["case", "shape", "tta", "method", "model", "params", "seconds", "predict_seconds", "peak_rss_mib"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(RESULTS / "infer_cpu.csv", buf.getvalue())
    print(f"wrote {RESULTS / 'infer_cpu.json'} and .csv")


if __name__ == "__main__":
    main()
