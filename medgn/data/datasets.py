"""Dataset discovery: Medical Segmentation Decathlon, nnU-Net v2 raw, and plain folder pairs.

This module owns :class:`Case`, :class:`DatasetIndex` and :func:`load_dataset` (a training dataset
with labels); what inference reads is :func:`medgn.data.inputs.find_inputs`. Problems with a
``dataset.json`` or the file layout are collected and reported together in one error, so a user fixes
everything in one pass. Case ids that are empty, hidden (``.nii`` from a file named ``.nii.gz``), a
path, or given by two entries, and paths that would leave the dataset folder are refused. Region-based
labels load (``medgn evaluate`` scores them) but :func:`refuse_unsupported_labels` keeps them, and
nnU-Net's ``ignore`` label, from training.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medgn.data.preflight import ITK_SUFFIXES, NIFTI_SUFFIXES
from medgn.errors import InputDataError, UsageError
from medgn.files import path_problem, split_suffix
from medgn.logs import get_logger, warn_user

log = get_logger(__name__)

IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES)
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_MR_WORDS = ("MR", "T1", "T2", "FLAIR", "DWI", "ADC", "PD", "BOLD")


@dataclass(frozen=True)
class Case:
    """One case: its id, one image per channel (channel order) and an optional label."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass
class DatasetIndex:
    """A dataset's description and its cases.

    Attributes:
        root: the dataset folder.
        format: "msd", "nnunet" or "folders".
        name: dataset name (the folder name when none is declared).
        channel_names: one name per input channel.
        modalities: "CT", "MR" or the declared name, per channel.
        labels: label name -> value; background is 0. Empty for folder pairs until measured.
        cases: training cases (with labels).
        test_cases: cases without labels (MSD ``test`` list, nnU-Net ``imagesTs``).
        regions: hierarchical label regions (nnU-Net ``labels`` with lists), else empty.
    """

    root: Path
    format: Literal["msd", "nnunet", "folders"]
    name: str
    channel_names: tuple[str, ...]
    modalities: tuple[str, ...]
    labels: dict[str, int]
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    regions: dict[str, Any] = field(default_factory=dict)


def modality_of(channel_name: str) -> str:
    """ "CT" for CT channels, "MR" for MR sequences, else the name as given."""
    upper = channel_name.strip().upper()
    if upper == "CT" or upper.startswith("CT_") or upper.startswith("CT "):
        return "CT"
    if any(upper.startswith(w) or upper == w for w in _MR_WORDS) or "MRI" in upper:
        return "MR"
    return channel_name


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is named as an image file medgn reads (by suffix), and is not a folder.

    A symbolic link that leads nowhere, a FIFO or a device with such a name counts: it becomes a case
    that fails with the reason when it is read, rather than a scan silently left out of a folder.
    """
    return path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".") and not path.is_dir()


def _not_a_file(path: Path) -> str:
    """Why ``path``, which should be a regular file, is not: "missing", "is a folder", "is a FIFO..."."""
    problem = "a folder" if path.is_dir() else path_problem(path) or "not found"
    return "missing" if problem == "not found" else f"is {problem}"


def strip_image_suffix(name: str) -> str:
    """``case_0000.nii.gz`` -> ``case_0000``."""
    return split_suffix(name)[0]


def case_id_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot name a case's outputs (empty, hidden, a path), or None when it can."""
    if not case_id:
        return "case id is empty"
    if "/" in case_id or "\\" in case_id or "\0" in case_id:
        return "case id is not a plain file name"
    if case_id.startswith("."):  # "..", "." and hidden names (a file named ".nii.gz" gives ".nii")
        return "case id is not a plain file name"
    return None


# The rule a case id must follow, in words for an error message.
CASE_ID_RULE = "a non-empty name with no path separators that does not start with '.'"


def check_case_id(case_id: str, where: str | os.PathLike[str]) -> str:
    """Refuse case ids that could escape an output folder, are empty or hidden (start with '.')."""
    problem = case_id_problem(case_id)
    if problem is not None:
        raise InputDataError(where, problem, got=repr(case_id), expected=CASE_ID_RULE)
    return case_id


def _inside(root: Path, rel: str, where: Path, problems: list[str]) -> Path | None:
    """``root / rel`` when it stays inside ``root`` (lexically; symlinked data is allowed)."""
    if not isinstance(rel, str) or not rel:
        problems.append(f"path entry is not a string: {rel!r}")
        return None
    full = Path(os.path.normpath(root / rel))
    if os.path.isabs(rel) or (full != root and root not in full.parents):
        problems.append(f"path leaves the dataset folder: {rel!r}")
        return None
    return full


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(path, f"cannot read dataset description ({exc})") from None
    except ValueError as exc:
        raise InputDataError(path, f"dataset.json is not valid JSON ({exc})") from None
    except RecursionError:
        raise InputDataError(path, "dataset.json is nested too deeply", expected="a flat dataset description") from None
    if not isinstance(data, dict):
        raise InputDataError(path, "dataset.json must be a JSON object", got=type(data).__name__)
    return data


def _is_index(key: Any) -> bool:
    """A channel key such as "0": ASCII digits only ("²".isdigit() is true, int("²") fails)."""
    return isinstance(key, str) and key.isascii() and key.isdigit()


def _labels(raw: Any, msd: bool, problems: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
    labels: dict[str, int] = {}
    regions: dict[str, Any] = {}
    if not isinstance(raw, dict) or not raw:
        problems.append("'labels' must be a non-empty mapping")
        return labels, regions
    for key, value in raw.items():
        if msd:
            try:
                labels[str(value)] = int(key)
            except ValueError:
                problems.append(f"label key {key!r} is not an integer")
        elif isinstance(value, list):
            regions[str(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            labels[str(key)] = value
        elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            labels[str(key)] = int(value)  # "1": nnU-Net reads it with int() too
        else:
            problems.append(f"label {key!r} has a non-integer value {value!r}")
    values = sorted(labels.values())
    if values and values != list(range(len(values))) and not regions:
        problems.append(f"label values must be consecutive from 0 (0 = background), got {values}")
    return labels, regions


def _check_num_training(desc: dict[str, Any], found: int, holds: str, problems: list[str]) -> None:
    """Compare a declared ``numTraining`` (an integer) with the ``found`` cases; add a problem if they differ."""
    if "numTraining" not in desc:
        return
    declared = desc["numTraining"]
    if not isinstance(declared, int) or isinstance(declared, bool):  # "4" or 4.0: not compared as a count
        problems.append(f"numTraining must be an integer, got {declared!r}")
    elif declared != found:
        problems.append(f"numTraining is {declared} but {holds} {found} cases")


class _CaseIds:
    """The case ids of one list of a dataset.json ("training" or "test"), each checked and unique."""

    def __init__(self, key: str, problems: list[str]) -> None:
        self.key, self.problems = key, problems
        self.first: dict[str, tuple[int, str]] = {}  # case id -> (entry index, image as written)

    def take(self, i: int, rel: str, case_id: str) -> str | None:
        """``case_id`` of entry ``i`` (image ``rel``), or None after adding why it cannot be used."""
        problem = case_id_problem(case_id)
        if problem is not None:
            self.problems.append(f"{self.key}[{i}] image {rel!r}: {problem}: {case_id!r} (expected {CASE_ID_RULE})")
            return None
        if case_id in self.first:
            j, other = self.first[case_id]
            self.problems.append(
                f"{self.key}[{j}] ({other!r}) and {self.key}[{i}] ({rel!r}) have the same case id {case_id!r} "
                "(the image's file name without its ending): list each case once, and rename one of two images "
                "of the same name"
            )
            return None
        self.first[case_id] = (i, rel)
        return case_id


def _load_msd(root: Path, desc: dict[str, Any], json_path: Path) -> DatasetIndex:
    problems = [f"missing key {key!r}" for key in ("labels", "training", "modality") if key not in desc]
    labels, _ = _labels(desc.get("labels"), True, problems) if "labels" in desc else ({}, {})
    modality = desc.get("modality", {})
    channels = (
        tuple(str(modality[k]) for k in sorted(modality, key=lambda k: int(k)))
        if isinstance(modality, dict) and all(_is_index(k) for k in modality)
        else ()
    )
    if "modality" in desc and not channels:
        problems.append('\'modality\' must map channel numbers to names, e.g. {"0": "CT"}')
    training = desc.get("training", [])
    if not isinstance(training, list):
        problems.append("'training' must be a list")
        training = []
    mismatch: list[str] = []  # MSD readers (MONAI, nnU-Net's converter) go by the list itself
    _check_num_training(desc, len(training), "'training' lists", mismatch)
    for message in mismatch:
        warn_user(f"{json_path}: {message}; the {len(training)} cases 'training' lists are used", log)
    cases = []
    ids = _CaseIds("training", problems)
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.append(f"training[{i}] needs 'image' and 'label'")
            continue
        image = _inside(root, entry["image"], json_path, problems)
        label = _inside(root, entry["label"], json_path, problems)
        if image is None or label is None:
            continue
        for kind, path in (("image", image), ("label", label)):
            if not path.is_file():
                problems.append(f"training[{i}] {kind} file {_not_a_file(path)}: {path}")
        case_id = ids.take(i, entry["image"], strip_image_suffix(image.name))
        if case_id is not None:
            cases.append(Case(case_id, (image,), label))
    tests = []
    test_list = desc.get("test") or []
    if not isinstance(test_list, list):
        problems.append("'test' must be a list of image paths")
        test_list = []
    test_ids = _CaseIds("test", problems)
    for i, rel in enumerate(test_list):
        if isinstance(rel, dict) and "image" in rel:  # MONAI's style: {"image": "./imagesTs/x.nii.gz"}
            rel = rel["image"]
        if not isinstance(rel, str):
            problems.append(f"test[{i}] is not a path or an object with an 'image' path: {rel!r}"[:200])
            continue
        path = _inside(root, rel, json_path, problems)
        if path is not None:
            case_id = test_ids.take(i, rel, strip_image_suffix(path.name))
            if case_id is not None:
                tests.append(Case(case_id, (path,), None))
    _raise_all(json_path, problems)
    names = channels or ("image",)
    return DatasetIndex(
        root, "msd", str(desc.get("name", root.name)), names, tuple(modality_of(c) for c in names), labels, cases, tests
    )


def group_channels(folder: Path, ending: str | None) -> tuple[dict[str, dict[int, Path]], list[Path]]:
    grouped: dict[str, dict[int, Path]] = {}
    plain: list[Path] = []
    for path in sorted(folder.iterdir()):
        if not is_image_file(path) or (ending and not path.name.endswith(ending)):
            continue
        stem = path.name[: -len(ending)] if ending else strip_image_suffix(path.name)
        match = CHANNEL_RE.match(stem)
        if match:
            channel = grouped.setdefault(match["case"], {})
            if int(match["channel"]) in channel:
                raise InputDataError(
                    folder,
                    f"two files for one channel: {channel[int(match['channel'])].name}, {path.name}",
                    expected="one file per case and channel (remove or move the other)",
                )
            channel[int(match["channel"])] = path
        else:
            twin = next((p for p in plain if strip_image_suffix(p.name) == stem), None)
            if twin is not None:
                raise InputDataError(
                    folder,
                    f"two files for case {stem!r}: {twin.name}, {path.name}",
                    expected="one file per case (remove or move the other)",
                )
            plain.append(path)
    return grouped, plain


# Appended to the path of a channel file a case lacks: the case is listed and fails alone when read.
MISSING_MARK = " (missing)"


def missing_file(path: Path) -> Path:
    """The place kept in a case for channel file ``path``, which does not exist."""
    return path.with_name(path.name + MISSING_MARK)


def missing_original(path: Path) -> Path | None:
    """The channel file a place made by :func:`missing_file` stands for; None for a real file."""
    return path.with_name(path.name[: -len(MISSING_MARK)]) if path.name.endswith(MISSING_MARK) else None


def _load_nnunet(root: Path, desc: dict[str, Any], json_path: Path, training: bool = True) -> DatasetIndex:
    problems = [
        f"missing key {key!r}" for key in ("channel_names", "labels", "numTraining", "file_ending") if key not in desc
    ]
    if "dataset" in desc:  # nnU-Net v2's explicit file lists instead of imagesTr/labelsTr
        problems.append(
            "the 'dataset' key (explicit file lists) is not supported: medgn reads the cases from imagesTr and "
            "labelsTr; move the files there and remove the key"
        )
    labels, regions = _labels(desc.get("labels"), False, problems) if "labels" in desc else ({}, {})
    if regions and "regions_class_order" not in desc:
        problems.append("labels with regions need 'regions_class_order'")
    if regions:
        regions = {"regions": regions, "order": desc.get("regions_class_order")}
    names_raw = desc.get("channel_names", {})
    channels = (
        tuple(str(names_raw[k]) for k in sorted(names_raw, key=int))
        if isinstance(names_raw, dict) and all(_is_index(k) for k in names_raw)
        else ()
    )
    if "channel_names" in desc and (not channels or sorted(int(k) for k in names_raw) != list(range(len(channels)))):
        problems.append("'channel_names' must map 0..C-1 to names")
    ending = desc.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.lower().endswith(IMAGE_SUFFIXES):
        problems.append(f"'file_ending' must be an image file ending such as \".nii.gz\", got {ending!r}")
        ending = None
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    test_only = not training and not images_dir.exists() and not labels_dir.exists()
    for folder in (images_dir, labels_dir):
        if not folder.is_dir() and not test_only:  # a folder of test cases for inference needs neither
            problems.append(f"folder missing: {folder}")
    cases: list[Case] = []
    if images_dir.is_dir() and channels and ending:
        grouped, plain = group_channels(images_dir, ending)
        for path in plain:
            problems.append(f"image without a _XXXX channel suffix: {path.name}")
        before = len(problems)
        for case_id, found in sorted(grouped.items()):
            missing = [f"{case_id}_{c:04d}{ending}" for c in range(len(channels)) if c not in found]
            extra = [found[c].name for c in found if c >= len(channels)]
            problems += [f"channel file missing: {images_dir / m}" for m in missing]
            problems += [f"unexpected channel file (only {len(channels)} channels declared): {e}" for e in extra]
            label = labels_dir / f"{case_id}{ending}"
            if not label.is_file():
                problems.append(f"label {_not_a_file(label)} for case {case_id}: {label}")
            if not missing:
                cases.append(
                    Case(check_case_id(case_id, images_dir), tuple(found[c] for c in range(len(channels))), label)
                )
        if labels_dir.is_dir():
            stems = set(grouped) | {strip_image_suffix(p.name) for p in plain}
            for path in sorted(labels_dir.iterdir()):
                stem = path.name[: -len(ending)]
                if is_image_file(path) and path.name.endswith(ending) and stem not in stems:
                    problems.append(f"label without an image: {path} (no {images_dir / f'{stem}_0000{ending}'})")
        _check_num_training(desc, len(grouped), "imagesTr holds", problems)
        ignored = [p.name for p in sorted(images_dir.iterdir()) if is_image_file(p) and not p.name.endswith(ending)]
        if ignored and len(problems) > before:  # what the user may have meant to be a case
            shown = ", ".join(ignored[:10]) + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else "")
            problems.append(f"files in imagesTr not ending in file_ending {ending!r} are ignored: {shown}")
    _raise_all(json_path, problems)
    tests: list[Case] = []
    if (root / "imagesTs").is_dir():
        grouped, _ = group_channels(root / "imagesTs", ending)
        tests = [
            Case(
                check_case_id(cid, root / "imagesTs"),
                # a channel the case lacks keeps its place: the case fails alone, naming the file
                tuple(
                    found.get(c, missing_file(root / "imagesTs" / f"{cid}_{c:04d}{ending}"))
                    for c in range(max(len(channels), max(found) + 1))
                ),
            )
            for cid, found in sorted(grouped.items())
        ]
    return DatasetIndex(
        root,
        "nnunet",
        str(desc.get("name", root.name)),
        channels,
        tuple(modality_of(c) for c in channels),
        labels,
        cases,
        tests,
        regions,
    )


def _load_folders(root: Path) -> DatasetIndex:
    problems: list[str] = []
    grouped, plain = group_channels(root / "images", None)
    label_files = {strip_image_suffix(p.name): p for p in sorted((root / "labels").iterdir()) if is_image_file(p)}
    for case_id in list(grouped):  # files are matched by name: a label names its case
        files = list(grouped[case_id].values())
        if case_id not in label_files and all(strip_image_suffix(p.name) in label_files for p in files):
            del grouped[case_id]  # images/patient_0001 with labels/patient_0001: a case, not channel 1
            plain.extend(files)
    for path in plain:
        found = grouped.setdefault(strip_image_suffix(path.name), {})
        if found:  # images/c0.nii.gz beside images/c0_0000.nii.gz: which one is the case?
            names = ", ".join(p.name for p in found.values())
            problems.append(f"two sets of image files for case {strip_image_suffix(path.name)!r}: {names}; {path.name}")
        else:
            found[0] = path
    counts = {len(v) for v in grouped.values()}
    if len(counts) > 1:
        problems.append(f"cases have different channel counts: {sorted(counts)}")
    cases = []
    for case_id, found in sorted(grouped.items()):
        if case_id not in label_files:
            problems.append(f"label missing for case {case_id} in {root / 'labels'}")
            continue
        cases.append(
            Case(check_case_id(case_id, root / "images"), tuple(found[c] for c in sorted(found)), label_files[case_id])
        )
    for orphan in sorted(set(label_files) - set(grouped)):
        problems.append(f"label without an image: {label_files[orphan].name}")
    if not grouped:
        problems.append(f"no image files in {root / 'images'}")
    _raise_all(root, problems)
    n = max(counts) if counts else 1
    names = tuple(f"channel{i}" for i in range(n))
    return DatasetIndex(root, "folders", root.name, names, names, {}, cases)


def _raise_all(where: Path, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:30]) + (f"; and {len(problems) - 30} more" if len(problems) > 30 else "")
        raise InputDataError(where, f"{len(problems)} problem(s) in the dataset description: {shown}")


def load_dataset(root: str | os.PathLike[str], *, training: bool = True) -> DatasetIndex:
    """Index a training dataset (MSD, nnU-Net v2 raw, or ``images/`` + ``labels/`` folders).

    Args:
        root: the dataset folder.
        training: False for inference and evaluation, which read only the description and the test
            cases: an nnU-Net folder without imagesTr and labelsTr (test cases as distributed) is
            then no problem.

    Returns:
        The dataset's description and cases (files are checked to exist, not read).

    Raises:
        UsageError: ``root`` is not a folder or has no recognised layout.
        InputDataError: dataset.json problems or missing files, all listed in one message.
    """
    root = Path(os.path.normpath(Path(root).absolute()))
    if not root.is_dir():
        raise UsageError(
            root, "dataset folder not found", expected="a folder with dataset.json, or images/ and labels/"
        )
    json_path = root / "dataset.json"
    if json_path.is_file():
        desc = _load_json(json_path)
        if "channel_names" in desc or "file_ending" in desc:
            return _load_nnunet(root, desc, json_path, training)
        if "training" in desc or "modality" in desc:
            return _load_msd(root, desc, json_path)
        labels = desc.get("labels")
        if isinstance(labels, dict) and labels and all(isinstance(v, (int, list)) for v in labels.values()):
            return _load_nnunet(root, desc, json_path, training)  # nnU-Net style labels: report its missing keys
        raise InputDataError(
            json_path,
            "unrecognised dataset.json",
            got=f"keys {sorted(desc)}",
            expected="MSD keys (training, labels, modality) or nnU-Net v2 keys (channel_names, labels, "
            "numTraining, file_ending)",
        )
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return _load_folders(root)
    raise UsageError(
        root, "no dataset found", expected="dataset.json (MSD or nnU-Net v2), or images/ and labels/ folders"
    )


def refuse_unsupported_labels(index: DatasetIndex) -> None:
    """Refuse labels medgn cannot train (verify, plan, train): nnU-Net regions and the ``ignore`` label.

    Training learns one class per integer label value. Overlapping regions (``"whole tumor": [1, 2,
    3]`` with ``regions_class_order``) would need sigmoid outputs per region; nnU-Net's ``ignore``
    label marks unannotated voxels that must stay out of the loss, which medgn's loss does not do
    (trained as a class, the network would predict "ignore"). ``medgn evaluate --dataset`` still
    scores regions.

    Raises:
        InputDataError: ``dataset.json`` declares regions or an ``ignore`` label (exit 3), naming them.
    """
    where = index.root / "dataset.json"
    declared = index.regions.get("regions") if index.regions else None
    if declared:
        shown = ", ".join(f"{name!r}: {members}" for name, members in declared.items())
        raise InputDataError(
            where,
            f"region-based labels ({shown}) are not supported for training",
            expected='one integer value per label in \'labels\', e.g. {"background": 0, "edema": 1, ...}; '
            "regions can still be scored with 'medgn evaluate --region NAME=1,2,...'",
        )
    if "ignore" in index.labels:
        raise InputDataError(
            where,
            f"the 'ignore' label (value {index.labels['ignore']}: voxels left unannotated) is not supported for "
            "training: medgn's loss cannot leave them out, and it would learn them as a class",
            expected="labels without 'ignore' (annotate or relabel those voxels)",
        )
