"""summary / estimate_training_memory_bytes against hand-counted MACs and autograd's saved tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgn.models import UNet3D, UNet3DConfig, build_model
from medgn.models.summary import estimate_training_memory_bytes, summary


def _autograd_saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the distinct non-parameter storages autograd saves in one forward (the reference)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # > 64 elements: skips per-(sample, group) statistics, which the estimate leaves out
        if storage.data_ptr() not in params and t.numel() > 64:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(seen.values()), out if isinstance(out, list) else [out]


def test_macs_and_parameters_of_a_tiny_unet_by_hand() -> None:
    net = UNet3D(1, 2, features=(4, 8), strides=[1, 2], deep_supervision=False)
    info = summary(net, (1, 8, 8, 8), batch_size=1)
    k = 27  # 3x3x3 kernels
    expected = (
        8**3 * 4 * 1 * k + 8**3 * 4 * 4 * k  # encoder stage 0
        + 4**3 * 8 * 4 * k + 4**3 * 8 * 8 * k  # encoder stage 1 (first conv strided)
        + 4**3 * 8 * 4 * 8  # transposed conv 2x2x2: every input voxel to 4 channels x 8 positions
        + 8**3 * 4 * 8 * k + 8**3 * 4 * 4 * k  # decoder convs (concat: 8 input channels)
        + 8**3 * 2 * 4  # 1x1x1 head
    )  # fmt: skip
    assert info["macs"] == expected
    assert info["parameters"] == sum(p.numel() for p in net.parameters())
    assert info["output_shapes"] == [(1, 2, 8, 8, 8)]
    assert summary(net, (1, 8, 8, 8), batch_size=2)["macs"] == 2 * expected


@pytest.mark.parametrize("norm", ["group_torch", "batch", "instance", "none"])
@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "gelu"])
@pytest.mark.parametrize("residual", [False, True])
def test_kept_activations_equal_what_autograd_saves(norm: str, activation: str, residual: bool) -> None:
    torch.manual_seed(0)
    net = UNet3D(1, 3, features=(4, 8, 16), norm=norm, activation=activation, residual=residual).train()
    saved, outs = _autograd_saved_bytes(net, torch.randn(2, 1, 16, 8, 16))
    info = summary(net, (1, 16, 8, 16), batch_size=2)
    loss_copy = sum(o.numel() for o in outs) * 4
    assert info["activation_bytes"] - loss_copy == saved


def test_fused_group_norm_keeps_fewer_tensors_than_norm_plus_activation() -> None:
    torch_gn = summary(UNet3D(1, 2, features=(16, 32), norm="group_torch"), (1, 8, 8, 8))
    fused_gn = summary(UNet3D(1, 2, features=(16, 32), norm="group"), (1, 8, 8, 8))
    # per ConvNormAct: conv output + activation output kept, not also the norm output
    assert fused_gn["activation_bytes"] < torch_gn["activation_bytes"]
    assert fused_gn["macs"] == torch_gn["macs"] and fused_gn["parameters"] == torch_gn["parameters"]


def test_checkpointing_and_bf16_lower_the_estimate() -> None:
    plain = summary(UNet3D(1, 2, features=(4, 8, 16)), (1, 16, 16, 16))
    ckpt = summary(UNet3D(1, 2, features=(4, 8, 16), checkpoint=True), (1, 16, 16, 16))
    half = summary(UNet3D(1, 2, features=(4, 8, 16)), (1, 16, 16, 16), dtype=torch.bfloat16)
    assert ckpt["activation_bytes"] < plain["activation_bytes"]
    assert half["activation_bytes"] * 2 == plain["activation_bytes"]
    assert half["parameter_bytes"] == plain["parameter_bytes"]  # fp32 master weights either way
    inference = summary(UNet3D(1, 2, features=(4, 8, 16)), (1, 16, 16, 16), training=False)
    assert inference["gradient_bytes"] == 0 and inference["total_bytes"] < plain["total_bytes"]


@pytest.mark.parametrize("norm", ["torch", "medgn"])
def test_bf16_counts_what_cuda_autocast_keeps_in_float32(norm: str) -> None:
    """Under CUDA autocast nn.GroupNorm runs in float32: it keeps a float32 copy of its input and
    returns float32, so the activation after it keeps float32 too, and the next convolution its own
    bf16 copy. medgn's GroupNorm keeps the input's dtype. (On an H200, a 128^3 U-Net step with
    nn.GroupNorm peaked at 10995 MiB, which the all-bf16 count put at 6186.)"""
    from medgn.layers.group_norm import GroupNorm

    gn = nn.GroupNorm(4, 8) if norm == "torch" else GroupNorm(4, 8)
    model = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), gn, nn.LeakyReLU(0.01), nn.Conv3d(8, 8, 3, padding=1))
    info = summary(model, (4, 8, 8, 8), batch_size=2, dtype=torch.bfloat16)
    n = 2 * 8 * 8**3  # elements of each 8-channel activation; the input has half as many
    if norm == "torch":  # conv1 input, GN's float32 copy, LeakyReLU's float32 input, conv2's bf16 copy
        kept = n // 2 * 2 + n * 4 + n * 4 + n * 2
    else:  # conv1 input, GN input, LeakyReLU input (GN output), conv2 input (LeakyReLU output)
        kept = n // 2 * 2 + n * 2 + n * 2 + n * 2
    assert info["activation_bytes"] == kept + n * 2  # + the loss's copy of the bf16 output
    assert info["transient_bytes"] == 2 * n * (4 if norm == "torch" else 2)
    fp32 = summary(model, (4, 8, 8, 8), batch_size=2)  # float32: no autocast, every tensor 4 bytes
    assert fp32["activation_bytes"] == (n // 2 + 3 * n + n) * 4  # the same four tensors and the loss's


def test_summary_leaves_the_model_untouched() -> None:
    net = UNet3D(1, 2, features=(4, 8)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    summary(net, (8, 8, 8))  # (D, H, W): channels from net.in_channels
    assert not net.training
    assert all(torch.equal(v, before[k]) and v.device.type == "cpu" for k, v in net.state_dict().items())


def test_estimate_matches_summary_and_grows_with_the_patch() -> None:
    cfg = UNet3DConfig(features=(8, 16, 32))
    strides = [1, (1, 2, 2), 2]
    small = estimate_training_memory_bytes(cfg, 2, 3, strides, None, (8, 16, 16), 2, torch.float32)
    net = build_model(cfg, 2, 3, strides, None)
    assert small == summary(net, (2, 8, 16, 16), 2, torch.float32)["total_bytes"]
    assert estimate_training_memory_bytes(cfg, 2, 3, strides, None, (16, 32, 32), 2, torch.float32) > 4 * small


def test_estimate_at_a_full_size_patch_allocates_nothing() -> None:
    # nnU-Net's default network at 128^3, batch 2, bf16: runs on the meta device only
    total = estimate_training_memory_bytes(UNet3DConfig(), 1, 3, None, None, (128, 128, 128), 2, torch.bfloat16)
    assert 2 * 2**30 < total < 16 * 2**30
