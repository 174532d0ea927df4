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

__all__ = ["PyramidPooling", "PSPHead", "pyramid_pooling", "head_context", "head_epilogue", "head_context_backward"]


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


# --------------------------------------------------------------------------------------------------------------------
# The fused head's two ops, in plain PyTorch (their truth; schemas in csrc/ops.cpp).
#
# The head's 3x3 conv over cat[x, U_1..U_L] (U_l = upsample(P_l)) splits by input channels into conv3x3(x; W_X) plus,
# per level and tap t = 3 * dy + dx, the upsample of Q_l[t] = W_l[:, :, dy, dx] @ P_l shifted by (dy - 1, dx - 1) with
# zero padding: bilinear upsampling is the same linear map on every channel, so it commutes with the 1x1 product.
# --------------------------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_context(q: torch.Tensor, bins: Sequence[int], size, align_corners: bool) -> torch.Tensor:
    """context(q) (N, O, H, W) in q's dtype, from q (N, O, 9, S): for every level l (columns [off_l, off_l + b_l^2))
    and tap t = (dy, dx), the b_l x b_l map q[:, :, t, level l] upsampled bilinearly to H x W and read at
    (y + dy - 1, x + dx - 1), zero outside the image."""
    bins = check_bins(bins)
    n, o, taps, s = q.shape
    if taps != 9 or s != sum(b * b for b in bins):
        raise ValueError(f"q must be (N, O, 9, {sum(b * b for b in bins)}) for bins {bins}, got {tuple(q.shape)}")
    h, w = int(size[0]), int(size[1])
    ctx = q.new_zeros((n, o, h, w))
    off = 0
    for b in bins:
        ql = q[:, :, :, off:off + b * b].reshape(n, o * 9, b, b)
        up = F.interpolate(ql, (h, w), mode="bilinear", align_corners=align_corners).reshape(n, o, 9, h, w)
        up = F.pad(up, (1, 1, 1, 1))
        for t in range(9):
            dy, dx = divmod(t, 3)
            ctx = ctx + up[:, :, t, dy:dy + h, dx:dx + w]
        off += b * b
    return ctx


def head_epilogue(z, q, bins, align_corners, scale=None, shift=None, relu=False) -> torch.Tensor:
    """act((z + context(q)) * scale + shift), computed in float32 (float64 for float64 z), returned in z's dtype and
    memory format (channels_last stays channels_last, other layouts come back contiguous)."""
    acc = _acc_dtype(z.dtype)
    v = z.to(acc) + head_context(q.to(acc), bins, z.shape[-2:], align_corners)
    if (scale is None) != (shift is None):
        raise ValueError("head_epilogue takes scale and shift together or neither")
    if scale is not None:
        v = v * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)
    if relu:
        v = torch.relu(v)
    channels_last = not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last)
    return v.to(z.dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def head_context_backward(grad: torch.Tensor, bins: Sequence[int], align_corners: bool) -> torch.Tensor:
    """The adjoint of head_context: grad (N, O, H, W) -> grad_q (N, O, 9, S), float32 (float64 for float64 grad)."""
    bins = check_bins(bins)
    acc = _acc_dtype(grad.dtype)
    n, o, h, w = grad.shape
    q = torch.zeros((n, o, 9, sum(b * b for b in bins)), dtype=acc, device=grad.device, requires_grad=True)
    with torch.enable_grad():
        ctx = head_context(q, bins, (h, w), align_corners)
        (gq,) = torch.autograd.grad(ctx, q, grad.to(acc))
    return gq
