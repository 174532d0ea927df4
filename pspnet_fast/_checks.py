"""Argument checks shared by the reference and the fused modules: bad input raises before any kernel runs."""
from __future__ import annotations

import argparse
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


# ----------------------------------------------------------------------------------------------------------------
# Per-op argument checks: one checker per op, the same rules and the same message text as csrc/op_checks.h (the
# C++ kernels of the CPU and CUDA backends). Called by the fake (meta) kernels (pspnet_fast/ops/fake.py) and at the
# top of every Triton op (kernels/*.py), so every backend raises the same exception with the same text for the same
# input. (They live in this bottom layer because kernels/ sits below pspnet_fast.ops.)
#
# Bounds, far above any real pyramid: at most MAX_LEVELS levels, each bin count b in [1, MAX_BIN] and
# S = sum of b * b <= MAX_TOTAL_BINS, so b * b, S, b * H and the int32 column indices of the CUDA and Triton
# kernels never overflow. Channel ranges are compared without forming x_offset + C (which can wrap in int64).
# ----------------------------------------------------------------------------------------------------------------
MAX_LEVELS = 16
MAX_BIN = 1 << 12
MAX_TOTAL_BINS = 1 << 24
_MAP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ACC_DTYPES = (torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return str([int(s) for s in t.shape])


def check_op_bins(op: str, bins) -> int:
    """S = sum of b * b for valid bins; raises ValueError otherwise (rules and text as op_checks.h)."""
    bins = [int(b) for b in bins]
    if not bins:
        raise ValueError(f"pspnet_fast.{op}: bins must hold at least one level, got an empty list")
    if len(bins) > MAX_LEVELS:
        raise ValueError(f"pspnet_fast.{op}: at most {MAX_LEVELS} pyramid levels are supported, got {len(bins)}")
    for b in bins:
        if b < 1 or b > MAX_BIN:
            raise ValueError(f"pspnet_fast.{op}: bins must be positive ints of at most {MAX_BIN}, got {bins}")
    s = sum(b * b for b in bins)
    if s > MAX_TOTAL_BINS:
        raise ValueError(f"pspnet_fast.{op}: the sum of b*b over bins must be at most {MAX_TOTAL_BINS}, got {s} "
                         f"for bins {bins}")
    return s


def _check_op_map(op: str, t, name: str, channels: str) -> None:
    """A 4-d map (N, channels, H, W) of a floating dtype with channels, H, W >= 1 (N may be 0)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pspnet_fast.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"pspnet_fast.{op}: {name} must be of shape (N, {channels}, H, W), got {t.dim()} dims "
                         f"{_shape(t)}")
    if t.dtype not in _MAP_DTYPES:
        raise TypeError(f"pspnet_fast.{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.shape[1] < 1 or t.shape[2] < 1 or t.shape[3] < 1:
        raise ValueError(f"pspnet_fast.{op}: {name} must have {channels}, H, W >= 1, got shape {_shape(t)}")


def _check_op_device(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"pspnet_fast.{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_op_affine(op: str, scale, shift, shape: list, dtype: torch.dtype, ref: torch.Tensor,
                     ref_name: str) -> None:
    """scale and shift: both None, or both of `shape`, `dtype` and ref's device."""
    if (scale is None) != (shift is None):
        raise ValueError(f"pspnet_fast.{op}: scale and shift come together (both or neither)")
    if scale is None:
        return
    want = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    for name, t in (("scale", scale), ("shift", shift)):
        if list(t.shape) != list(shape):  # no int(): a symbolic (exported) size must not be specialized
            raise ValueError(f"pspnet_fast.{op}: {name} must be of shape {want}, got {_shape(t)}")
        if t.dtype != dtype:
            raise TypeError(f"pspnet_fast.{op}: {name} must be {dtype}, got {t.dtype}")
        _check_op_device(op, t, name, ref, ref_name)


def _check_op_reduce_weight(op: str, weight, n_levels: int, c: int, dtype: torch.dtype, ref: torch.Tensor,
                            ref_name: str) -> None:
    if weight.dim() != 3 or weight.shape[0] != n_levels or weight.shape[2] != c:
        raise ValueError(f"pspnet_fast.{op}: weight must be of shape (L, R, C) = ({n_levels}, R, {c}), got "
                         f"{_shape(weight)}")
    if weight.dtype != dtype:
        raise TypeError(f"pspnet_fast.{op}: weight must be {dtype}, got {weight.dtype}")
    _check_op_device(op, weight, "weight", ref, ref_name)


def check_pyramid_pool(x, bins) -> None:
    op = "pyramid_pool"
    check_op_bins(op, bins)
    _check_op_map(op, x, "x", "C")


def check_ppm_reduce(pooled, weight, scale, shift, bins, relu=True) -> None:
    op = "ppm_reduce"
    s = check_op_bins(op, bins)
    if pooled.dim() != 3 or pooled.shape[2] != s:
        raise ValueError(f"pspnet_fast.{op}: pooled must be of shape (N, C, {s}) for bins {[int(b) for b in bins]}, "
                         f"got {_shape(pooled)}")
    if pooled.dtype not in _ACC_DTYPES:
        raise TypeError(f"pspnet_fast.{op}: pooled must be float32 or float64, got {pooled.dtype}")
    _check_op_reduce_weight(op, weight, len(bins), pooled.shape[1], pooled.dtype, pooled, "pooled")
    _check_op_affine(op, scale, shift, [len(bins), weight.shape[1]], pooled.dtype, pooled, "pooled")


def _check_op_levels(op: str, x: torch.Tensor, levels, s: int) -> None:
    if levels.dim() != 3 or levels.shape[0] != x.shape[0] or levels.shape[2] != s:
        raise ValueError(f"pspnet_fast.{op}: levels must be of shape (N, R, S) = ({x.shape[0]}, R, {s}), got "
                         f"{_shape(levels)}")
    if levels.dtype not in _ACC_DTYPES:
        raise TypeError(f"pspnet_fast.{op}: levels must be float32 or float64, got {levels.dtype}")
    _check_op_device(op, levels, "levels", x, "x")


def check_upsample_concat(x, levels, bins, align_corners=True, x_last=False) -> None:
    op = "upsample_concat"
    s = check_op_bins(op, bins)
    _check_op_map(op, x, "x", "C")
    _check_op_levels(op, x, levels, s)


def check_ppm_forward(x, weight, scale, shift, bins, relu=True, align_corners=True, x_last=False) -> None:
    op = "ppm_forward"
    check_op_bins(op, bins)
    _check_op_map(op, x, "x", "C")
    acc = _acc_dtype(x.dtype)
    _check_op_reduce_weight(op, weight, len(bins), x.shape[1], acc, x, "x")
    _check_op_affine(op, scale, shift, [len(bins), weight.shape[1]], acc, x, "x")


def check_upsample_concat_backward(grad_out, in_channels, bins, align_corners=True, x_last=False) -> None:
    op = "upsample_concat_backward"
    check_op_bins(op, bins)
    _check_op_map(op, grad_out, "grad_out", "C + L*R")
    co, c, n_levels = grad_out.shape[1], int(in_channels), len(bins)
    if c < 0 or c >= co or (co - c) % n_levels != 0:
        raise ValueError(f"pspnet_fast.{op}: grad_out has {co} channels, not in_channels = {c} plus a positive "
                         f"multiple of the {n_levels} levels of bins {[int(b) for b in bins]}")


def check_pyramid_pool_backward(grad_pooled, grad_out, bins, x_offset=0) -> None:
    op = "pyramid_pool_backward"
    s = check_op_bins(op, bins)
    _check_op_map(op, grad_out, "grad_out", "C'")
    n, co = grad_out.shape[0], grad_out.shape[1]
    if grad_pooled.dim() != 3 or grad_pooled.shape[0] != n or grad_pooled.shape[2] != s or grad_pooled.shape[1] > co:
        raise ValueError(f"pspnet_fast.{op}: grad_pooled must be of shape (N, C, S) = ({n}, C <= {co}, {s}), got "
                         f"{_shape(grad_pooled)}")
    if grad_pooled.dtype not in _ACC_DTYPES:
        raise TypeError(f"pspnet_fast.{op}: grad_pooled must be float32 or float64, got {grad_pooled.dtype}")
    _check_op_device(op, grad_pooled, "grad_pooled", grad_out, "grad_out")
    room = co - grad_pooled.shape[1]  # >= 0: compared without forming x_offset + C
    if int(x_offset) < 0 or int(x_offset) > room:
        raise ValueError(f"pspnet_fast.{op}: x_offset must be in [0, {room}] (grad_out's {co} channels minus "
                         f"grad_pooled's {grad_pooled.shape[1]}), got {int(x_offset)}")


def check_head_epilogue(z, q, bins, align_corners, scale, shift, relu=True) -> None:
    op = "head_epilogue"
    s = check_op_bins(op, bins)
    _check_op_map(op, z, "z", "O")
    n, o = z.shape[0], z.shape[1]
    if q.dim() != 4 or list(q.shape) != [n, o, 9, s]:  # no int(): symbolic sizes (torch.export) stay symbolic
        raise ValueError(f"pspnet_fast.{op}: q must be of shape (N, O, 9, S) = ({n}, {o}, 9, {s}), got {_shape(q)}")
    acc = _acc_dtype(z.dtype)
    if q.dtype != acc:
        raise TypeError(f"pspnet_fast.{op}: q must be {acc} for {z.dtype} z, got {q.dtype}")
    _check_op_device(op, q, "q", z, "z")
    _check_op_affine(op, scale, shift, [o], acc, z, "z")


def check_head_context_backward(grad, bins, align_corners=True) -> None:
    op = "head_context_backward"
    check_op_bins(op, bins)
    _check_op_map(op, grad, "grad", "O")


# ----------------------------------------------------------------------------------------------------------------
# Command-line argument types: out-of-range values are refused by argparse ("error: argument --batch-size: ...",
# exit status 2) instead of failing later inside the run.
# ----------------------------------------------------------------------------------------------------------------
def positive_int_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {v}")
    return v


def nonnegative_int_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {v}")
    return v


def positive_float_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return v


def nonnegative_float_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def probability_arg(text: str) -> float:
    v = nonnegative_float_arg(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text}")
    return v
