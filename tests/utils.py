"""Shared test helpers: reference modules with non-trivial BatchNorm, tolerances per dtype."""
import pytest
import torch

from pspnet_fast.ops.backends import _why_not_machine
from pspnet_fast.reference import PyramidPooling as RefPPM


def make_ref(c, bins, align_corners=True, dtype=torch.float32, device="cpu", seed=0, reduction=None):
    torch.manual_seed(seed)
    ref = RefPPM(c, bins, reduction, align_corners)
    randomize_bn(ref)
    return ref.to(device=device, dtype=dtype)


def randomize_bn(module):
    """Non-trivial running statistics and affine parameters in every BatchNorm2d (a fresh one is the identity in
    eval, which would hide a wrong BatchNorm fold)."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def assert_close_to_ref(out, ref_out, dtype, ref64=None, ref_dtype_out=None):
    """float32: max|d| <= 1e-5 max|ref| + 1e-6; float64: 1e-12 relative; half types: error against the float64
    reference at most 2x the reference's own error in that dtype, plus 1e-3 max|ref|."""
    assert out.shape == ref_out.shape, (out.shape, ref_out.shape)
    assert out.dtype == ref_out.dtype, (out.dtype, ref_out.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        assert ref64 is not None and ref_dtype_out is not None
        scale = ref64.abs().max().item()
        err = (out.double() - ref64).abs().max().item()
        ref_err = (ref_dtype_out.double() - ref64).abs().max().item()
        assert err <= 2 * ref_err + 1e-3 * scale, (err, ref_err, scale)
        return
    d = (out.double() - ref_out.double()).abs().max().item() if out.numel() else 0.0
    scale = ref_out.double().abs().max().item() if out.numel() else 0.0
    tol = 1e-12 * scale if dtype == torch.float64 else 1e-5 * scale + 1e-6
    assert d <= tol, (d, tol)


# Backend parametrization shared by the fused-module tests (CUDA and Triton on a GPU only).
def _backends():
    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.needs_cuda))
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.needs_cuda))
    return out


def _device(backend):
    return "cpu" if backend == "cpu" else "cuda"


def _skip_unavailable(backend):
    why = _why_not_machine(backend)
    if why is not None:
        pytest.skip(f"backend {backend} unavailable: {why}")


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "view":
        # a non-contiguous view: every other channel of a wider tensor, spatially transposed storage
        wide = torch.cat([x, x], 1)[:, ::2]
        assert not wide.is_contiguous()
        return wide
    return x
