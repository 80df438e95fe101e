"""The package's import graph, read from the source with ``ast`` (nothing is imported).

STYLE.md's layer order: ``commands -> workflows -> config -> train -> {infer, planning} ->
{data, models, checkpoint} -> layers -> ops``; ``evaluate`` stands beside ``infer`` and imports
neither torch, monai nor train; errors/files/logs/configtools/environment are leaf utilities
usable by every layer. A module may import its own layer, a lower layer or a leaf utility; an
import cycle between modules fails even within a layer. Function-level imports count too: a lazy
import against the order is still a dependency against the order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medgn"
# Higher rank = higher layer. A module may import modules of rank <= its own.
RANKS = {
    "cli": 9, "__main__": 9, "commands": 9, "demo": 9,
    "workflows": 8, "export": 8,
    "config": 7,
    "train": 6,
    "infer": 5, "planning": 5, "evaluate": 5,
    "data": 4, "models": 4, "checkpoint": 4,
    "layers": 3,
    "ops": 2,
}  # fmt: skip
LEAVES = {"errors", "files", "logs", "configtools", "config_yaml", "environment"}
# Peers of one layer that must still not depend on each other.
FORBIDDEN = {"evaluate": {"infer", "train", "planning"}}
HEAVY = ("torch", "monai", "triton")


def module_name(path: Path) -> str:
    parts = ("medgn", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts).removesuffix(".__init__")


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Absolute names of everything ``path`` imports (any depth), with line numbers."""
    name = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return found


def graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for m, path in modules.items():
        for target, line in imports_of(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != m and not m.startswith(target + "."):  # a package's own __init__
                edges[m].setdefault(target, line)
    return modules, edges


def top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(edges[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_every_subpackage_has_a_layer() -> None:
    modules, _ = graph()
    unknown = sorted({top(m) for m in modules if m != "medgn"} - set(RANKS) - LEAVES)
    assert not unknown, f"place these in RANKS or LEAVES: {unknown}"


def test_no_import_cycles() -> None:
    _, edges = graph()
    assert cycles(edges) == []


def test_cycle_detection_finds_a_cycle() -> None:
    # The checker itself: a -> b -> c -> a is one component, d is outside it.
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_imports_follow_the_layer_order() -> None:
    modules, edges = graph()
    bad = []
    for m, targets in edges.items():
        if m == "medgn":
            continue
        src = top(m)
        for t, line in targets.items():
            dst = top(t)
            if t == "medgn" or dst in LEAVES or src == dst:
                continue
            if src in LEAVES:
                bad.append(f"{modules[m]}:{line}: leaf utility {m} imports {t}")
            elif RANKS[dst] > RANKS[src] or dst in FORBIDDEN.get(src, ()):
                bad.append(f"{modules[m]}:{line}: {m} ({src}) imports {t} ({dst}) against the layer order")
    assert not bad, "\n".join(bad)


def test_evaluate_imports_no_torch_or_monai() -> None:
    bad = [
        f"{p}:{line}: {name}"
        for p in (PACKAGE / "evaluate").rglob("*.py")
        for name, line in imports_of(p)
        if name.split(".")[0] in HEAVY
    ]
    assert not bad, "\n".join(bad)


LIGHT_IMPORTS = """
import sys
import medgn, medgn.cli, medgn.evaluate.run
assert 'triton' not in sys.modules, 'triton imported'
if 'torch' in sys.modules:
    import torch
    assert not torch.cuda.is_initialized(), 'CUDA initialised'
print('ok')
"""

EVALUATE_WITHOUT_TORCH = """
import sys
from pathlib import Path
import numpy as np
import nibabel as nib
from medgn.evaluate.run import evaluate
root = Path(sys.argv[1])
(root / "pred").mkdir(); (root / "ref").mkdir()
ref = np.zeros((6, 5, 4), np.uint8); ref[1:4, 1:4, 1:3] = 1
pred = ref.copy(); pred[1, 1, 1] = 0
for folder, arr in (("ref", ref), ("pred", pred)):
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(root / folder / "case1.nii.gz"))
result = evaluate(root / "pred", root / "ref")
heavy = sorted(m for m in ("torch", "monai", "triton") if m in sys.modules)
print(repr(heavy), result.value("case1", 1, "dice"))
"""


def _run(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PACKAGE.parent,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_light_imports_touch_neither_triton_nor_cuda() -> None:
    assert _run(LIGHT_IMPORTS) == "ok"


def test_evaluate_runs_without_torch(tmp_path: Path) -> None:
    heavy, dice = _run(EVALUATE_WITHOUT_TORCH, str(tmp_path)).rsplit(" ", 1)
    assert heavy == "[]"
    # 18 reference voxels, 17 predicted, all inside: Dice = 2*17 / 35.
    assert float(dice) == pytest.approx(2 * 17 / 35, abs=1e-6)
