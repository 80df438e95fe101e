"""medgn.layers: the nn.Modules the networks are built from.

GroupNorm (a drop-in ``nn.GroupNorm`` with a fused activation and residual add) and its group-count
rule, the norm/activation factories, the conv-norm-activation and residual blocks, the
weight-standardized convolution and the BatchNorm/InstanceNorm -> GroupNorm conversion.
"""

from medgn.layers.conv_norm_act import ConvNormAct3d, ResidualBlock3d
from medgn.layers.convert import Replacement, convert_norm
from medgn.layers.factories import ACTIVATIONS, NORMS, fuses_activation, make_activation, make_norm
from medgn.layers.group_norm import GroupNorm
from medgn.layers.group_rule import num_groups_for
from medgn.layers.weight_std import WSConv3d, standardize_weight

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "ConvNormAct3d",
    "GroupNorm",
    "Replacement",
    "ResidualBlock3d",
    "WSConv3d",
    "convert_norm",
    "fuses_activation",
    "make_activation",
    "make_norm",
    "num_groups_for",
    "standardize_weight",
]
