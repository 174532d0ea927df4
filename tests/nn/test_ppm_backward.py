"""Training with the fused PPM: the backward ops against PyTorch's autograd, determinism, memory, DDP and autocast."""
import os

import pytest
import torch
import torch.nn.functional as F

import pspnet_fast
from pspnet_fast import ops

from ..utils import _backends, _device, _layout, _skip_unavailable
from ..utils import make_ref

BINS = [(1, 2, 3, 6), (1, 3, 6, 8), (6,), (2,)]
SIZES = [(1, 1), (2, 5), (5, 2), (13, 13), (60, 64), (97, 13)]


def _ref_upsample_backward(g, c, bins, align_corners):
    """grad_levels (N, R, S) by autograd through F.interpolate, in float64."""
    g = g.double()
    n, co, h, w = g.shape
    r = (co - c) // len(bins)
    parts = []
    for l, b in enumerate(bins):
        lv = torch.zeros(n, r, b, b, dtype=torch.float64, requires_grad=True)
        up = F.interpolate(lv, (h, w), mode="bilinear", align_corners=align_corners)
        (gl,) = torch.autograd.grad(up, lv, g[:, c + l * r:c + (l + 1) * r])
        parts.append(gl.flatten(2))
    return torch.cat(parts, 2)


def _ref_pool_backward(gp, g, bins):
    """grad_out[:, :C] + the adjoint of F.adaptive_avg_pool2d per level, in float64."""
    n, c = gp.shape[:2]
    h, w = g.shape[2:]
    x = torch.zeros(n, c, h, w, dtype=torch.float64, requires_grad=True)
    pooled = torch.cat([F.adaptive_avg_pool2d(x, b).flatten(2) for b in bins], 2)
    (gx,) = torch.autograd.grad(pooled, x, gp.double())
    return g[:, :c].double() + gx


def _kernels(backend):
    _skip_unavailable(backend)
    ops.ensure_registered(backend)
    return ops.op_set(backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bins", BINS, ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("hw", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_ops_against_autograd(backend, bins, hw, align_corners, layout):
    k = _kernels(backend)
    dev = _device(backend)
    c, r = 5, 3
    g = _layout(torch.randn(2, c + len(bins) * r, *hw, device=dev), layout)
    gl = k.upsample_concat_backward(g, c, bins, align_corners)
    assert gl.shape == (2, r, sum(b * b for b in bins)) and gl.dtype == torch.float32
    expect = _ref_upsample_backward(g.cpu(), c, bins, align_corners)
    assert (gl.cpu().double() - expect).abs().max().item() <= 1e-5 * expect.abs().max().item() + 1e-6
    gp = torch.randn(2, c, sum(b * b for b in bins), device=dev)
    gx = k.pyramid_pool_backward(gp, g, bins)
    assert gx.shape == (2, c, *hw) and gx.dtype == g.dtype
    if layout == "channels_last" and hw != (1, 1):
        assert gx.is_contiguous(memory_format=torch.channels_last)
    expect = _ref_pool_backward(gp.cpu(), g.cpu(), bins)
    assert (gx.cpu().double() - expect).abs().max().item() <= 1e-5 * expect.abs().max().item() + 1e-6


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_backward_ops_dtypes(backend, dtype):
    k = _kernels(backend)
    dev = _device(backend)
    bins, c, r = (1, 2, 3, 6), 4, 2
    g = torch.randn(3, c + 4 * r, 13, 11, device=dev).to(dtype)
    gl = k.upsample_concat_backward(g, c, bins, True)
    assert gl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expect = _ref_upsample_backward(g.cpu(), c, bins, True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (gl.cpu().double() - expect).abs().max().item() <= tol * expect.abs().max().item()
    gp = torch.randn(3, c, 50, device=dev, dtype=gl.dtype)
    gx = k.pyramid_pool_backward(gp, g, bins)
    assert gx.dtype == dtype
    expect = _ref_pool_backward(gp.cpu(), g.cpu(), bins)
    # half types: one rounding of the result in that dtype
    tol = 1e-12 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps
    assert (gx.cpu().double() - expect).abs().max().item() <= tol * expect.abs().max().item()


@pytest.mark.parametrize("backend", _backends())
def test_backward_ops_empty_batch(backend):
    k = _kernels(backend)
    dev = _device(backend)
    g = torch.randn(0, 6, 5, 5, device=dev)
    assert k.upsample_concat_backward(g, 4, (1, 2), False).shape == (0, 1, 5)
    assert k.pyramid_pool_backward(torch.randn(0, 4, 5, device=dev), g, (1, 2)).shape == (0, 4, 5, 5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bins", BINS, ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("hw", [(2, 5), (13, 13), (60, 64), (97, 13)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("align_corners", [True, False], ids=["ac", "noac"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_module_gradients_match_reference(backend, bins, hw, align_corners, train):
    _skip_unavailable(backend)
    dev = _device(backend)
    c = 8 if len(bins) < 4 else 16
    ref = make_ref(c, bins, align_corners, device=dev).train(train)
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=backend)
    x = torch.randn(3, c, *hw, device=dev)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r = ref(xr)
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (fused(xf) * g).sum().backward()
    assert (xr.grad - xf.grad).abs().max().item() <= 1e-4 * xr.grad.abs().max().item()
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        assert (pr.grad - pf.grad).abs().max().item() <= 1e-4 * pr.grad.abs().max().item() + 1e-7, name
    for (name, a), (_, b) in zip(ref.state_dict().items(), fused.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_is_deterministic(backend, layout):
    _skip_unavailable(backend)
    dev = _device(backend)
    ref = make_ref(16, (1, 2, 3, 6), device=dev).train()
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend=backend)
    x = _layout(torch.randn(3, 16, 29, 31, device=dev), layout)
    g = torch.randn(3, 32, 29, 31, device=dev)
    grads = []
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            xi = x.clone().requires_grad_()
            fused.zero_grad(set_to_none=True)
            (fused(xi) * g).sum().backward()
            grads.append([xi.grad] + [p.grad for p in fused.parameters()])
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_nothing_full_resolution_is_saved_for_backward():
    _skip_unavailable("cpu")
    ref = make_ref(64, (1, 2, 3, 6)).train()
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend="cpu")
    x = torch.randn(2, 64, 40, 40, requires_grad=True)

    def saved_bytes(module):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(x)
        return total[0], out

    fused_saved, out = saved_bytes(fused)
    ref_saved, _ = saved_bytes(ref)
    out.sum().backward()
    assert fused_saved < x.numel() * x.element_size() // 4, fused_saved
    assert ref_saved > x.numel() * x.element_size(), ref_saved


def test_eval_backward_with_frozen_batchnorm():
    _skip_unavailable("cpu")
    ref = make_ref(8, (1, 2, 3, 6)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend="cpu")
    for p in fused.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 8, 13, 17)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 16, 13, 17)
    (ref(xr) * g).sum().backward()
    (fused(xf) * g).sum().backward()
    assert (xr.grad - xf.grad).abs().max().item() <= 1e-4 * xr.grad.abs().max().item()


def test_sync_batchnorm_conversion():
    _skip_unavailable("cpu")
    model = torch.nn.Sequential(pspnet_fast.PyramidPooling(8, backend="cpu"))
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0].features[0][2], torch.nn.SyncBatchNorm)
    assert isinstance(converted[0], pspnet_fast.PyramidPooling)
    converted.train()
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    converted(x).sum().backward()  # not distributed: SyncBatchNorm acts as BatchNorm
    assert x.grad is not None and converted[0].features[2][2].weight.grad is not None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_autocast_cpu_bfloat16(layout):
    _skip_unavailable("cpu")
    ref = make_ref(16, (1, 2, 3, 6)).train()
    fused = pspnet_fast.PyramidPooling.from_reference(ref, backend="cpu")
    x = _layout(torch.randn(2, 16, 13, 11), layout)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r = ref(xr)
        out_f = fused(xf)
    g = torch.randn(out_r.shape)
    (out_r.float() * g).sum().backward()
    (out_f.float() * g).sum().backward()
    scale = out_r.float().abs().max().item()
    assert (out_f.float() - out_r.float()).abs().max().item() <= 3e-2 * scale
    assert (xf.grad - xr.grad).abs().max().item() <= 3e-2 * xr.grad.abs().max().item()
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        assert (pr.grad - pf.grad).abs().max().item() <= 5e-2 * pr.grad.abs().max().item() + 1e-6, name


def _ddp_worker(rank, world, path, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = pspnet_fast.PyramidPooling(8, backend="cpu")
        model.train()
        for f in model.features:  # frozen BatchNorm: samples independent, so DDP must equal the whole batch
            f[2].eval()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(1)
        x = torch.randn(4, 8, 13, 11)
        g = torch.randn(4, 16, 13, 11)
        half = slice(rank * 2, rank * 2 + 2)
        (ddp(x[half]) * g[half]).mean().backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    _skip_unavailable("cpu")
    import torch.multiprocessing as mp

    results = str(tmp_path / "grads")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
    torch.manual_seed(0)
    model = pspnet_fast.PyramidPooling(8, backend="cpu")
    model.train()
    for f in model.features:
        f[2].eval()
    torch.manual_seed(1)
    x = torch.randn(4, 8, 13, 11)
    g = torch.randn(4, 16, 13, 11)
    (model(x) * g).mean().backward()
    for rank in range(2):
        got = torch.load(f"{results}.{rank}")
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert os.path.exists(f"{results}.1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_module_trains(dtype):
    """A module converted to a half type trains (its BatchNorm runs in that dtype, as the reference's)."""
    _skip_unavailable("cpu")
    from ..utils import assert_close_to_ref

    ref64 = make_ref(16, (1, 2, 3, 6), dtype=torch.float64).train()
    ref_h = make_ref(16, (1, 2, 3, 6), dtype=dtype).train()
    fused = pspnet_fast.PyramidPooling.from_reference(ref_h, backend="cpu")
    x = torch.randn(2, 16, 13, 11).to(dtype)
    xf = x.clone().requires_grad_()
    out = fused(xf)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref_h(x), dtype, ref64=ref64(x.double()), ref_dtype_out=ref_h(x))
    out.float().sum().backward()
    assert xf.grad.dtype == dtype and torch.isfinite(xf.grad).all()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in fused.parameters())
