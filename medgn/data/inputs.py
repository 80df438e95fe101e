"""What inference reads: one scan, a folder of scans, a dataset's test cases or a DICOM series.

This module owns :func:`find_inputs`, which turns ``medgn infer --input`` (and ``--channels``) into
sorted :class:`~medgn.data.datasets.Case` records without labels: a single file; a folder whose
files are cases, or channels of cases by their ``_0000``/``_0001`` suffixes or by channel names; a
dataset folder (its test list, found by :func:`~medgn.data.datasets.load_dataset`); or a folder
holding one DICOM series. Entries named as scans that are not regular files become cases that fail
with the reason when they are read, rather than scans silently left out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from medgn.data.datasets import (
    Case,
    check_case_id,
    group_channels,
    is_image_file,
    load_dataset,
    missing_file,
    strip_image_suffix,
)
from medgn.data.preflight import gdcm_series_ids
from medgn.errors import InputDataError, UsageError
from medgn.files import path_problem

__all__ = ["declared_channel_names", "find_inputs", "missing_input"]


def _is_dicom_folder(path: Path) -> bool:
    return bool(gdcm_series_ids(path))


def _named_channels(input_path: Path, channels: Sequence[str]) -> list[Case]:
    """Cases of a folder whose files are ``<case>_<channel>.<ext>``, channels in the given order."""
    if not input_path.is_dir():
        raise UsageError(
            "--channels",
            "channel names need a folder input",
            got=str(input_path),
            expected="a folder of <case>_<channel> files",
        )
    grouped: dict[str, dict[str, Path]] = {}
    for path in sorted(p for p in input_path.iterdir() if is_image_file(p)):
        stem = strip_image_suffix(path.name)
        for ch in channels:
            if stem.endswith("_" + ch) and len(stem) > len(ch) + 1:
                found = grouped.setdefault(stem[: -len(ch) - 1], {})
                if ch in found:
                    raise InputDataError(
                        input_path,
                        f"two files for one channel: {found[ch].name}, {path.name}",
                        expected="one file per case and channel (remove or move the other)",
                    )
                found[ch] = path
    if not grouped:
        raise UsageError(
            input_path,
            "no files named <case>_<channel> for the given channels",
            got=",".join(channels),
            expected="e.g. case1_" + channels[0] + ".nii.gz",
        )
    cases = []
    for case_id, found in sorted(grouped.items()):
        missing = [ch for ch in channels if ch not in found]
        images = tuple(found[ch] for ch in channels if ch in found)
        cases.append(
            Case(
                case_id,
                images
                if not missing
                else images + tuple(missing_file(input_path / f"{case_id}_{ch}") for ch in missing),
            )
        )
    return cases


def declared_channel_names(path: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The channel names a dataset folder's dataset.json declares; None for any other input."""
    path = Path(path)
    if not (path.is_dir() and (path / "dataset.json").is_file()):
        return None
    return tuple(load_dataset(path, training=False).channel_names)


def missing_input(path: Path) -> UsageError:
    """The error for an --input that is neither a regular file nor a folder, saying which it is."""
    problem = path_problem(path) or "not found"
    words = "input not found" if problem == "not found" else f"input is {problem}"
    return UsageError(path, words, expected="an image file or a folder")


def find_inputs(
    path: str | os.PathLike[str], channels: int | None = None, *, names: Sequence[str] | None = None
) -> list[Case]:
    """The cases inference should read from ``path``.

    Args:
        path: an image file, a folder of image files (``<case>_0000``, ``_0001``... grouped as
            channels), a dataset folder (its test cases), or a DICOM series folder.
        channels: expected channels per case; cases with another count are refused.
        names: channel names: a folder's ``<case>_<name>`` files form the channels in this order
            (``medgn infer --channels``); a missing channel is kept as a missing path so the case
            fails alone.

    Returns:
        Cases without labels, sorted by id.

    Raises:
        UsageError: nothing to read at ``path``.
        InputDataError: a case with missing or extra channels.
    """
    path = Path(path)
    if names:
        cases = _named_channels(path, names)
    elif path.is_file():
        cases = [Case(check_case_id(strip_image_suffix(path.name), path), (path,))]
    elif not path.is_dir():
        raise missing_input(path)
    elif (path / "dataset.json").is_file():
        index = load_dataset(path, training=False)
        cases = index.test_cases
        if not cases:
            raise UsageError(path, "dataset has no test cases", expected="a 'test' list or an imagesTs folder")
    elif any(is_image_file(p) for p in path.iterdir()):
        grouped, plain = group_channels(path, None)
        if plain and grouped:
            raise InputDataError(
                path,
                "folder mixes files with and without _XXXX channel suffixes",
                got=[p.name for p in plain[:5]],
                expected="one naming scheme",
            )
        cases = [Case(check_case_id(strip_image_suffix(p.name), path), (p,)) for p in plain]
        numbered = [(cid, found) for cid, found in sorted(grouped.items()) if 0 not in found]
        if numbered and len(numbered) == len(grouped):  # no case starts at _0000: numbered scans, not channels
            case_id, found = numbered[0]
            raise InputDataError(
                path,
                f"case {case_id} has channels {sorted(found)}",
                expected="consecutive channels from _0000 (a name ending in _ and 4 digits is read as a channel "
                "of a case: rename single-channel scans such as patient_0001, or give them one file at a time)",
            )
        for case_id, found in sorted(grouped.items()):
            # A channel missing before the last one found: the case fails alone, naming the file.
            images = tuple(found.get(c, missing_file(path / f"{case_id}_{c:04d}")) for c in range(max(found) + 1))
            cases.append(Case(check_case_id(case_id, path), images))
    elif _is_dicom_folder(path):
        cases = [Case(check_case_id(path.name, path), (path,))]
    else:
        raise UsageError(path, "no images found", expected="image files (.nii.gz, .nrrd, .mha...) or a DICOM series")
    if channels is not None:
        wrong = [f"{c.case_id} ({len(c.images)})" for c in cases if len(c.images) != channels]
        if wrong:
            raise InputDataError(
                path,
                f"cases with the wrong number of channels: {', '.join(wrong[:10])}",
                expected=f"{channels} channel(s) per case",
            )
    return sorted(cases, key=lambda c: c.case_id)
