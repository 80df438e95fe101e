"""A one-case ``benchmarks/vs_monai.py`` work folder (trained run, held-out image and label) for the
fold benchmarks' tests, and the loader of a benchmark script as a module.

Not collected by pytest (leading underscore).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def load(name: str, path: Path) -> ModuleType:
    """Import a script that is not in a package (``benchmarks/*.py``, the inference fixtures)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def work_folder(root: Path) -> Path:
    """``root`` with ``medgn/medgn_run`` (a tiny trained model), ``val_images/a.nii.gz`` and its label."""
    fixtures = load("_infer_fixtures", REPO / "tests" / "infer" / "_infer_fixtures.py")
    fixtures.save_run(root / "medgn" / "medgn_run")
    for name in ("val_images", "val_labels"):
        (root / name).mkdir()
    affine = fixtures.axis_affines()[0]
    fixtures.write_image(root / "val_images" / "a.nii.gz", fixtures.image(), affine)
    fixtures.write_image(root / "val_labels" / "a.nii.gz", fixtures.blob().astype(np.uint8), affine)
    return root
