"""medgn.ops: GPU kernels and their pure-PyTorch references (plain tensors in, tensors out).

Importing this package does not import triton or initialise CUDA; the kernels load on first use.
"""

from medgn.ops.group_norm import group_norm
from medgn.ops.group_norm_ref import ACTIVATIONS, group_norm_ref

__all__ = ["ACTIVATIONS", "group_norm", "group_norm_ref"]
