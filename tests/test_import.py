"""Importing medgn touches neither triton nor CUDA."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import medgn, medgn.ops, medgn.layers, medgn.models
import torch
assert 'triton' not in sys.modules, 'triton imported'
assert not torch.cuda.is_initialized(), 'CUDA initialised'
print('ok')
"""


def test_import_does_not_load_triton_or_cuda() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


PARSER_CHECK = """
import sys
from medgn.cli import build_parser
build_parser()
print(sorted(m for m in ('torch', 'monai') if m in sys.modules))
"""


def test_command_line_parser_loads_neither_torch_nor_monai() -> None:
    # `medgn --help` and usage errors must not wait for torch and MONAI (about 3 s): every subcommand
    # imports its workflow when it runs, not when its parser is registered.
    proc = subprocess.run([sys.executable, "-c", PARSER_CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
