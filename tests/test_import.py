"""Importing medgn touches neither triton nor CUDA."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import medgn, medgn.ops, medgn.layers, medgn.models
from medgn.models import UNet3D, build_model, summary  # the lazily loaded names load the network code
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


CONFIG_CHECK = """
import sys
import medgn.models.config, medgn.infer.config
import medgn.models as m
assert m.UNet3DConfig is medgn.models.config.UNet3DConfig
print(sorted(x for x in ('torch', 'monai') if x in sys.modules))
from medgn.models import UNet3D
from medgn.models.unet import UNet3D as home
assert UNet3D is home and 'UNet3D' in dir(m)
try:
    m.nothing_here
except AttributeError as exc:
    print('AttributeError', exc)
"""


def test_model_and_inference_configs_load_without_torch() -> None:
    # The inference config names the model's memory layouts from medgn.models.config: that module
    # must stay torch-free, and medgn.models loads the network code only when a name asks for it.
    proc = subprocess.run([sys.executable, "-c", CONFIG_CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "[]"
    assert lines[1].startswith("AttributeError") and "nothing_here" in lines[1]
