"""UNet3D: shapes, deep supervision, every norm trains, checkpointing, state dicts, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medgn.errors import ModelError, UsageError
from medgn.layers import GroupNorm, ResidualBlock3d, num_groups_for
from medgn.models import UNet3D

TINY = (4, 8, 16)


def _net(**kwargs) -> UNet3D:
    torch.manual_seed(0)
    kwargs.setdefault("features", TINY)
    return UNet3D(kwargs.pop("in_channels", 1), kwargs.pop("out_channels", 3), **kwargs)


@pytest.mark.parametrize(
    ("strides", "kernels", "size"),
    [
        (None, None, (16, 16, 16)),
        (None, None, (20, 12, 28)),  # not cubic, multiples of 4
        ([1, (1, 2, 2), (1, 2, 2)], [(1, 3, 3), (1, 3, 3), 3], (5, 16, 24)),  # anisotropic, odd depth
        ([1, (2, 2, 1), 2], [3, 3, (3, 3, 1)], (16, 12, 18)),
    ],
)
@pytest.mark.parametrize("residual", [False, True])
def test_shapes_training_and_eval(strides, kernels, size, residual: bool) -> None:
    net = _net(strides=strides, kernel_sizes=kernels, residual=residual)
    x = torch.randn(1, 1, *size)
    outs = net.train()(x)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0].shape == (1, 3, *size)
    down = net.strides[1]
    assert outs[1].shape == (1, 3, *(s // d for s, d in zip(size, down)))
    out = net.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, *size)
    torch.testing.assert_close(out, net.eval()(x))  # eval forward is deterministic


def test_no_deep_supervision_returns_one_tensor_in_training() -> None:
    out = _net(deep_supervision=False).train()(torch.randn(2, 1, 16, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 16, 16)


def test_residual_encoder_uses_residual_blocks() -> None:
    net = _net(residual=True)
    assert sum(isinstance(m, ResidualBlock3d) for m in net.modules()) == 2  # stages 1 and 2


@pytest.mark.parametrize("norm", ["group", "group_torch", "batch", "instance", "layer", "none"])
@pytest.mark.parametrize("activation", ["leaky_relu", "gelu"])
def test_every_norm_trains_one_step(norm: str, activation: str) -> None:
    net = _net(norm=norm, activation=activation).train()
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    target = (x > 0.3).long().squeeze(1)

    def loss_fn() -> torch.Tensor:
        full, half = net(x)
        return F.cross_entropy(full, target) + 0.5 * F.cross_entropy(half, target[:, ::2, ::2, ::2])

    loss = loss_fn()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for p in net.parameters():
            p -= 1e-3 * p.grad  # a small gradient step must lower the loss on the same batch
    assert loss_fn().item() < loss.item()


def test_group_rule_at_narrow_layers() -> None:
    net = UNet3D(1, 2, features=(16, 32, 64, 512), group_channels=4)
    norms = [m for m in net.modules() if isinstance(m, GroupNorm)]
    assert {(m.num_channels, m.num_groups) for m in norms} == {(16, 4), (32, 8), (64, 16), (512, 32)}
    default = [m for m in UNet3D(1, 2, features=(16, 32, 64, 512)).modules() if isinstance(m, GroupNorm)]
    assert all(m.num_groups == num_groups_for(m.num_channels) for m in default)
    assert all(m.activation == "leaky_relu" for m in norms)  # activation fused everywhere


@pytest.mark.parametrize("residual", [False, True])
def test_checkpointing_gives_the_same_gradients(residual: bool) -> None:
    plain = _net(residual=residual).double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    x = torch.randn(1, 1, 16, 12, 16, dtype=torch.float64)
    for net in (plain, ckpt):
        outs = net(x)
        sum((o**2).mean() for o in outs).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_checkpointing_keeps_fewer_tensors_for_backward() -> None:
    counts = []
    for flag in (False, True):
        net = _net(checkpoint=flag).train()
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randn(1, 1, 16, 16, 16))
        counts.append(sum(saved))
    # only the segment boundaries (and the heads) stay alive outside the checkpointed stages
    assert counts[1] < counts[0] / 3


def test_group_torch_state_dict_loads_into_group_model() -> None:
    torch.manual_seed(5)
    torch_net = _net(norm="group_torch", features=(16, 32, 48)).double()
    with torch.no_grad():
        for m in torch_net.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ours = _net(norm="group", features=(16, 32, 48)).double()
    result = ours.load_state_dict(torch_net.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 1, 8, 12, 8, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(x), torch_net.eval()(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.train()(x)[1], torch_net.train()(x)[1], rtol=1e-9, atol=1e-9)


def test_channels_last_matches_contiguous() -> None:
    a = _net().eval()
    b = _net(memory_format="channels_last_3d").eval()
    b.load_state_dict(a.state_dict())
    assert b.encoder[0][0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, 12, 16, 8)
    torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)


def test_weight_standardization_builds_and_runs() -> None:
    out = _net(weight_std=True).eval()(torch.randn(1, 1, 8, 8, 8))
    assert out.shape == (1, 3, 8, 8, 8) and torch.isfinite(out).all()


def test_pad_input_crops_back_to_the_input_size() -> None:
    net = _net(pad_input=True)
    x = torch.randn(1, 1, 13, 17, 9)
    full, half = net.train()(x)
    assert full.shape == (1, 3, 13, 17, 9) and half.shape == (1, 3, 7, 9, 5)
    padded = F.pad(x, (0, 3, 0, 3, 0, 3))
    torch.testing.assert_close(net.eval()(x), net.eval()(padded)[:, :, :13, :17, :9])


def test_size_not_divisible_names_the_nearest_valid_sizes() -> None:
    net = _net(strides=[1, (1, 2, 2), 2])  # total stride (2, 4, 4)
    with pytest.raises(ModelError, match=r"\(13, 18, 16\).*\(2, 4, 4\).*\(12, 16, 16\) or \(14, 20, 16\)") as info:
        net(torch.randn(1, 1, 13, 18, 16))
    assert info.value.code == 4


@pytest.mark.parametrize(
    ("x", "match"),
    [(torch.randn(1, 2, 8, 8, 8), "input channels"), (torch.randn(1, 8, 8, 8), "5D tensor")],
)
def test_bad_input_tensors(x: torch.Tensor, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        _net()(x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "bn"}, "'batch'"),
        ({"activation": "tanh"}, "'leaky_relu'"),
        ({"strides": [1, 2]}, "strides"),
        ({"strides": [2, 2, 2]}, r"strides\[0\]"),
        ({"kernel_sizes": [3, 2, 3]}, "odd"),
        ({"features": (8,)}, "features"),
        ({"memory_format": "nhwc"}, "channels_last_3d"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        _net(**kwargs)
