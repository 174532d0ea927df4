"""Argument checks shared by the reference and the fused modules: bad input raises before any kernel runs."""
from __future__ import annotations

from typing import Sequence

import torch


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_bins(bins) -> tuple[int, ...]:
    """bins: a non-empty sequence of positive ints (the pyramid levels' output sizes)."""
    if isinstance(bins, (str, bytes)) or not isinstance(bins, Sequence):
        raise TypeError(f"bins must be a sequence of positive ints such as (1, 2, 3, 6), got {bins!r}")
    if len(bins) == 0:
        raise ValueError("bins must hold at least one pyramid level, got an empty sequence")
    for b in bins:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"bins must hold ints, got {bins!r} (element {b!r} is {type(b).__name__})")
        if b <= 0:
            raise ValueError(f"bins must hold positive ints, got {tuple(bins)!r}")
    return tuple(int(b) for b in bins)


def check_feature_map(x, in_channels: int, what: str = "x") -> None:
    """x: a floating-point tensor of shape (N, in_channels, H, W) with H, W >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must have shape (N, {in_channels}, H, W), got {x.dim()} dims {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{what} must have {in_channels} channels (dim 1), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{what} must be float32, float64, float16 or bfloat16, got {x.dtype}"
        )
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{what} must have H, W >= 1, got shape {tuple(x.shape)}")


def check_same_device(x: torch.Tensor, param: torch.Tensor, what: str = "x") -> None:
    if x.device != param.device:
        raise ValueError(f"{what} is on {x.device} but the module's weights are on {param.device}")
