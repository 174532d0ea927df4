"""The pure-PyTorch truth: the PSPNet authors' Pyramid Pooling Module and PSP head, key for key.

Every fused kernel, test and benchmark in this project is checked against these modules. They use only public
PyTorch ops and run without the compiled extension. Layout (PEERS.md section 2):

    PyramidPooling.features[i] = Sequential(AdaptiveAvgPool2d(bins[i]), Conv2d(C, R, 1, bias=False), BatchNorm2d(R),
                                            ReLU(inplace=True))
    output = cat([x] + [upsample(features[i](x)) for i], dim=1)      # (N, C + len(bins) * R, H, W)

    PSPHead.ppm = PyramidPooling(...)
    PSPHead.cls = Sequential(Conv2d(C + L*R, 512, 3, padding=1, bias=False), BatchNorm2d(512), ReLU(inplace=True),
                             Dropout2d(dropout), Conv2d(512, num_classes, 1))
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bins, check_feature_map, check_positive_int

__all__ = ["PyramidPooling", "PSPHead", "pyramid_pooling"]


def _default_reduction(in_channels: int, bins: tuple[int, ...], reduction_channels) -> int:
    if reduction_channels is None:
        reduction_channels = in_channels // len(bins)
        if reduction_channels <= 0:
            raise ValueError(
                f"in_channels // len(bins) = {in_channels} // {len(bins)} is 0: pass reduction_channels explicitly"
            )
    return check_positive_int("reduction_channels", reduction_channels)


class PyramidPooling(nn.Module):
    """The authors' PPM. x: (N, in_channels, H, W), any floating dtype, any H, W >= 1.

    Returns (N, in_channels + len(bins) * reduction_channels, H, W): x first, then each level upsampled bilinearly
    (align_corners as given, True in the authors' code) in bin order.
    """

    def __init__(
        self,
        in_channels: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        reduction_channels: int | None = None,
        align_corners: bool = True,
    ):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.bins = check_bins(bins)
        self.reduction_channels = _default_reduction(in_channels, self.bins, reduction_channels)
        self.align_corners = bool(align_corners)
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_channels, self.reduction_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(self.reduction_channels),
                nn.ReLU(inplace=True),
            )
            for b in self.bins
        )

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self.bins) * self.reduction_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.in_channels)
        size = x.shape[-2:]
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), size, mode="bilinear", align_corners=self.align_corners))
        return torch.cat(out, 1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, bins={self.bins}, reduction_channels={self.reduction_channels}, " \
               f"align_corners={self.align_corners}"


def pyramid_pooling(x: torch.Tensor, bins: Sequence[int], align_corners: bool = True) -> list[torch.Tensor]:
    """Each level's adaptive average pooling of x, flattened: the fused pyramid_pool op's truth.

    Returns one (N, C, b*b) tensor per level (concatenate along dim 2 for the op's (N, C, S) layout).
    """
    return [F.adaptive_avg_pool2d(x, b).flatten(2) for b in check_bins(bins)]


class PSPHead(nn.Module):
    """The authors' PSP head: ``ppm`` then ``cls``. x: (N, in_channels, H, W) -> (N, num_classes, H, W) logits."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        reduction_channels: int | None = None,
        bottleneck_channels: int = 512,
        dropout: float = 0.1,
        align_corners: bool = True,
    ):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("bottleneck_channels", bottleneck_channels)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.ppm = PyramidPooling(in_channels, bins, reduction_channels, align_corners)
        self.cls = _make_cls(self.ppm.out_channels, bottleneck_channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.ppm(x))


def _make_cls(in_channels: int, mid_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Conv3x3 -> BN -> ReLU -> Dropout2d -> Conv1x1 (bias on the last only): the authors' `cls` and `aux`."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
        nn.Conv2d(mid_channels, num_classes, kernel_size=1),
    )
