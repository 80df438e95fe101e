"""Compile every GroupNorm kernel launch of medgn for an NVIDIA Hopper GPU (sm_90), without a GPU.

Triton compiles to PTX and a cubin with its bundled ptxas for any target, so compile errors that
Triton's CPU interpreter does not see (loop-carried type changes, unsupported ops, register or
shared-memory overflows) show up here. The launchers run on CPU tensors with their GPU tile sizes
and split counts; each kernel is replaced by a recorder, and every distinct recorded launch
(signature + constexprs + warps) is compiled for sm_90. Prints one line per compiled variant and
exits non-zero on the first failure. Run without TRITON_INTERPRET (the test does that).
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET=1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import medgn.ops.group_norm_kernels as kernels  # noqa: E402
import medgn.ops.group_norm_kernels_bwd as kernels_bwd  # noqa: E402
import medgn.ops.group_norm_plan as plan  # noqa: E402
import medgn.ops.group_norm_triton as launch  # noqa: E402

H100_SMS = 132
plan._GPU_TILES_ON_CPU = True  # GPU tile sizes on CPU tensors
plan._CPU_PROGRAMS = H100_SMS  # and the split counts of an H100
plan._CPU_L2_BYTES = 50 * 2**20 // 3  # and its L2 chunking

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}
RECORDED: dict[tuple, tuple] = {}


class Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn: triton.runtime.JITFunction) -> None:
        self.fn = fn

    def __getitem__(self, grid: object):  # noqa: ANN204
        def record(*args: object, **kwargs: object) -> None:
            names = self.fn.arg_names
            constexpr_names = {p.name for p in self.fn.params if p.is_constexpr}
            values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            signature, constexprs = {}, {}
            for name in names:
                value = values[name]
                if name in constexpr_names:
                    signature[name] = "constexpr"
                    constexprs[name] = value
                elif isinstance(value, torch.Tensor):
                    signature[name] = "*" + _DTYPES[value.dtype]
                elif isinstance(value, bool):
                    signature[name] = "i1"
                elif isinstance(value, int):
                    signature[name] = "i64" if abs(value) >= 2**31 else "i32"
                elif isinstance(value, float):
                    signature[name] = "fp32"
                else:
                    raise TypeError(f"{self.fn.__name__}: cannot type argument {name}={value!r}")
            options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
            key = (
                self.fn.__name__,
                tuple(signature.items()),
                tuple(sorted(constexprs.items())),
                tuple(sorted(options.items())),
            )
            RECORDED[key] = (self.fn, signature, constexprs, options)

        return record


for name in ("_fused_kernel", "_stats_kernel", "_apply_kernel"):
    setattr(kernels, name, Recorder(getattr(kernels, name)))
for name in ("_bwd_reduce_kernel", "_bwd_dx_kernel", "_bwd_fused_kernel"):
    setattr(kernels_bwd, name, Recorder(getattr(kernels_bwd, name)))

# Shapes with the tile sizes of the U-Net levels (the spatial size only changes runtime integers):
# a 32^3 volume at 1 channel per group takes the split path like 128^3 does; 8^3 x 320 channels
# takes the fused path like the deepest level.
SHAPES = [
    ((2, 32, 32, 32, 32), 32),
    ((2, 64, 16, 16, 16), 16),
    ((2, 320, 8, 8, 8), 32),
    ((1, 16, 5, 7, 9), 8),
    ((2, 4, 1, 1, 1), 4),
]
CONFIGS = [  # (dtype, activation, residual, affine)
    (torch.float32, "leaky_relu", True, True),
    (torch.bfloat16, "leaky_relu", True, True),
    (torch.float16, "silu", False, True),
    (torch.bfloat16, "gelu", False, False),
    (torch.float32, "relu", False, True),
    (torch.float32, "none", True, False),
]
# The test suite compiles the model's bf16 config and one more per dtype (every kernel and path is
# still covered, in ~2/3 of the time); MEDGN_COMPILE_ALL=1 compiles every combination.
if os.environ.get("MEDGN_COMPILE_ALL") != "1":
    CONFIGS = CONFIGS[:4]

for shape, groups in SHAPES:
    for dtype, act, with_res, affine in CONFIGS:
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
            c = shape[1]
            w = torch.ones(c, dtype=dtype) if affine else None
            b = torch.zeros(c, dtype=dtype) if affine else None
            r = torch.randn(shape).to(dtype).contiguous(memory_format=layout) if with_res else None
            for path in ("auto", "split"):
                y, mean, rstd = launch.group_norm_forward(x, groups, w, b, 1e-5, act, r, 0.01, path=path)
            dy = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
            for path in ("auto", "split"):
                launch.group_norm_backward(
                    dy, x, w, b, r, mean.fill_(0), rstd.fill_(1), groups, act, 0.01, with_res, path=path
                )

# MEDGN_REGISTERS=1: also report registers per thread and spills (ptxas -v on the PTX), which
# bound how many programs are resident per SM (65536 registers / (32 x warps x programs)).
REGISTERS = os.environ.get("MEDGN_REGISTERS") == "1"


def _registers(ptx: str) -> str:
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia

    # Triton's bundled ptxas; the newer one (shipped for Blackwell) reads the newest PTX versions.
    bin_dir = os.path.join(os.path.dirname(nvidia.__file__), "bin")
    ptxas = next(p for p in (os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")) if os.path.exists(p))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        proc = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True)  # fmt: skip
    out = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f", {regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B spilled"


target = GPUTarget("cuda", 90, 32)
failures = 0
only = set(sys.argv[1:])  # optional kernel names: compile only those
for (name, *_), (fn, signature, constexprs, options) in sorted(RECORDED.items(), key=lambda kv: str(kv[0])):
    if only and name not in only:
        continue
    types = ",".join(v for v in signature.values() if v != "constexpr")
    label = f"{name} {types} {constexprs} {options}"
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target, options=options
        )
    except Exception as exc:  # noqa: BLE001 - report every failing variant
        failures += 1
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        continue
    regs = _registers(compiled.asm["ptx"]) if REGISTERS else ""
    print(f"ok   {label} shared={compiled.metadata.shared} B, cubin {len(compiled.asm['cubin'])} B{regs}")
total = sum(1 for key in RECORDED if not only or key[0] in only)
print(f"{total - failures} of {total} kernel variants compiled for sm_90")
sys.exit(1 if failures else 0)
