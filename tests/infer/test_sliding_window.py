"""The sliding window without MONAI: held to MONAI's ``sliding_window_inference`` (Gaussian blend)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgn.infer.sliding_window import WindowSettings, _window_logits, gaussian_weights, window_starts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class _Net(nn.Module):
    """Position-dependent logits: a window's border and centre differ, so the blend shows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _monai(net: nn.Module, x: torch.Tensor, roi: tuple[int, int, int], overlap: float, batch: int) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(
        x, roi, batch, net, overlap=overlap, mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=0.0
    )


@pytest.mark.parametrize(
    ("shape", "overlap", "batch"),
    [
        ((20, 9, 13), 0.5, 2),  # several windows, one axis barely longer than the window
        ((8, 8, 8), 0.5, 1),  # exactly one window
        ((5, 8, 30), 0.25, 3),  # shorter than the window along one axis: padded, then cropped back
        ((17, 11, 10), 0.0, 4),  # no overlap
        ((23, 12, 9), 0.8, 5),  # a step of one voxel along the short axes
        ((3, 4, 2), 0.5, 2),  # smaller than the window everywhere
    ],
)
def test_window_logits_equal_monai(shape: tuple[int, int, int], overlap: float, batch: int) -> None:
    net = _Net().eval()
    x = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(1))
    settings = WindowSettings(roi_size=(8, 8, 8), overlap=overlap, sw_batch_size=batch, precision="fp32")
    cpu = torch.device("cpu")
    with torch.inference_mode():
        ours = _window_logits(net, x, settings, cpu, cpu, batch)
        theirs = _monai(net, x, (8, 8, 8), overlap, batch)
    assert tuple(ours.shape) == (1, 3, *shape)
    torch.testing.assert_close(ours, theirs.as_tensor() if hasattr(theirs, "as_tensor") else theirs)


def test_window_starts_step_and_end_flush() -> None:
    assert window_starts(20, 8, 0.5) == [0, 4, 8, 12]
    assert window_starts(9, 8, 0.5) == [0, 1]  # the last window ends at the far side
    assert window_starts(8, 8, 0.5) == [0]
    assert window_starts(5, 8, 0.5) == [0]  # padded to one window
    assert window_starts(10, 4, 0.9) == [0, 1, 2, 3, 4, 5, 6]  # a step of at least one voxel
    assert window_starts(17, 8, 0.0) == [0, 8, 9]


def test_gaussian_weights_peak_in_the_centre_and_stay_positive() -> None:
    w = gaussian_weights((9, 8, 8), 0.125)
    assert tuple(w.shape) == (9, 8, 8)
    assert float(w[4, 3, 3]) == pytest.approx(float(w.max()))
    assert float(w.min()) == pytest.approx(1e-3)  # the corners' Gaussian is below 1e-3: floored
    torch.testing.assert_close(w, w.flip(0).flip(1).flip(2))
