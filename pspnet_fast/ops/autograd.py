"""Autograd formulas of the ops (torch.library.register_autograd), the backward itself an op; and the one-time
registration of fake kernels and autograd for a backend's ops."""
from __future__ import annotations

import torch

from . import _ext
from .backends import op_set
from .fake import (_fake_head_context_backward, _fake_head_epilogue, _fake_ppm_forward, _fake_ppm_reduce,
                   _fake_pyramid_pool, _fake_pyramid_pool_backward, _fake_upsample_concat,
                   _fake_upsample_concat_backward, _offsets, _out_memory_format)


def _pool_setup(ctx, inputs, output):
    x, bins = inputs
    ctx.bins = tuple(bins)
    ctx.x_shape = tuple(x.shape)
    ctx.x_dtype = x.dtype
    ctx.x_format = _out_memory_format(x)


def _pool_backward_for(prefix: str):
    def backward(ctx, grad):
        # The op alone has no grad_out to add: a zero expanded to x's shape stands in (the kernels may materialize
        # it). This path serves direct op use and traced graphs; the module's own autograd node passes the real
        # grad_out and writes grad_x in one pass.
        zero = grad.new_zeros((), dtype=ctx.x_dtype).expand(ctx.x_shape)
        gx = getattr(torch.ops.pspnet_fast, prefix + "pyramid_pool_backward")(grad, zero, ctx.bins)
        return gx.contiguous(memory_format=ctx.x_format), None
    return backward


def _reduce_setup(ctx, inputs, output):
    pooled, weight, scale, shift, bins, relu = inputs
    ctx.bins = tuple(bins)
    ctx.relu = relu
    ctx.has_scale = scale is not None
    ctx.save_for_backward(pooled, weight, scale if scale is not None else pooled.new_empty(0),
                          shift if shift is not None else pooled.new_empty(0), output)


def _reduce_backward(ctx, grad):
    """Per level, with the images folded into the columns: g (R, N*s), p (C, N*s); dW = g p^T, dp = W^T g (one GEMM
    each, nothing zero-filled)."""
    pooled, weight, scale, shift, out = ctx.saved_tensors
    n, c = pooled.shape[:2]
    grad = grad.to(pooled.dtype)
    if ctx.relu:
        # torch.relu's backward: gradient where the result is positive.
        grad = grad * (out > 0).to(grad.dtype)
    g_pooled, g_weight, g_scale, g_shift = [], [], [], []
    for l, (b, off) in enumerate(zip(ctx.bins, _offsets(ctx.bins))):
        s = b * b
        p = pooled[:, :, off:off + s].permute(1, 0, 2).reshape(c, n * s)  # (C, N*s)
        g = grad[:, :, off:off + s].permute(1, 0, 2).reshape(grad.shape[1], n * s)  # (R, N*s); N may be 0
        if ctx.has_scale:
            y = torch.matmul(weight[l], p)  # (R, N*s), before the affine epilogue
            g_scale.append((g * y).sum(1))
            g_shift.append(g.sum(1))
            g = g * scale[l].view(-1, 1)
        g_weight.append(torch.matmul(g, p.t()))  # (R, C)
        g_pooled.append(torch.matmul(weight[l].t(), g).reshape(c, n, s).permute(1, 0, 2))  # (N, C, s)
    return (torch.cat(g_pooled, 2), torch.stack(g_weight), torch.stack(g_scale) if ctx.has_scale else None,
            torch.stack(g_shift) if ctx.has_scale else None, None, None)


def _upsample_setup(ctx, inputs, output):
    x, levels, bins, align_corners = inputs[:4]
    # x_last: the dispatcher op's fifth argument ([levels..., x]); the Triton op has four.
    ctx.x_last = bool(inputs[4]) if len(inputs) > 4 else False
    ctx.n_inputs = len(inputs)
    ctx.bins = tuple(bins)
    ctx.align_corners = align_corners
    ctx.c = x.shape[1]
    ctx.x_dtype = x.dtype
    ctx.x_format = _out_memory_format(x)
    ctx.levels_dtype = levels.dtype


def _upsample_backward_for(prefix: str):
    def backward(ctx, grad):
        """grad_x = grad_out's x channels (a view); grad_levels by the upsample_concat_backward op."""
        op = getattr(torch.ops.pspnet_fast, prefix + "upsample_concat_backward")
        if ctx.x_last:
            lr = grad.shape[1] - ctx.c
            gx = grad[:, lr:].to(ctx.x_dtype)
            # The CPU kernel reads the x-last layout itself; CUDA and Triton read the levels-only view (in_channels 0).
            gl = (op(grad, ctx.c, ctx.bins, ctx.align_corners, x_last=True) if not prefix and grad.device.type == "cpu"
                  else op(grad[:, :lr], 0, ctx.bins, ctx.align_corners))
        else:
            gx = grad[:, :ctx.c].to(ctx.x_dtype)
            gl = op(grad, ctx.c, ctx.bins, ctx.align_corners)
        return (gx, gl.to(ctx.levels_dtype)) + (None,) * (ctx.n_inputs - 2)
    return backward


def _epilogue_setup(ctx, inputs, output):
    z, q, bins, align_corners, scale, shift, relu = inputs
    ctx.bins, ctx.align_corners, ctx.relu = tuple(bins), align_corners, relu
    ctx.z_dtype, ctx.q_dtype = z.dtype, q.dtype
    ctx.has_scale = scale is not None
    empty = q.new_empty(0)
    ctx.save_for_backward(z if ctx.has_scale else empty, q if ctx.has_scale else empty,
                          scale if ctx.has_scale else empty, output if relu else empty)


def _epilogue_backward_for(prefix: str):
    def backward(ctx, grad):
        """out = act((z + context(q)) * scale + shift): the ReLU mask and the scale apply to the gradient, then
        grad_z is that gradient and grad_q its context adjoint (head_context_backward)."""
        z, q, scale, out = ctx.saved_tensors
        ops_ns = torch.ops.pspnet_fast
        g = grad.to(ctx.q_dtype)
        if ctx.relu:
            g = g * (out > 0).to(g.dtype)  # torch.relu's backward: where the result is positive
        g_scale = g_shift = None
        if ctx.has_scale:
            g_shift = g.sum((0, 2, 3))
            v = getattr(ops_ns, prefix + "head_epilogue")(z, q, ctx.bins, ctx.align_corners, None, None, False)
            g_scale = (g * v.to(g.dtype)).sum((0, 2, 3))
            g = g * scale.view(1, -1, 1, 1)
        g_q = getattr(ops_ns, prefix + "head_context_backward")(g, ctx.bins, ctx.align_corners)
        return g.to(ctx.z_dtype), g_q, None, None, g_scale, g_shift, None
    return backward


def _register(prefix: str, with_fake: bool) -> None:
    ns = "pspnet_fast::" + prefix
    if with_fake:
        torch.library.register_fake(ns + "pyramid_pool")(_fake_pyramid_pool)
        torch.library.register_fake(ns + "ppm_reduce")(_fake_ppm_reduce)
        torch.library.register_fake(ns + "upsample_concat")(_fake_upsample_concat)
        torch.library.register_fake(ns + "upsample_concat_backward")(_fake_upsample_concat_backward)
        torch.library.register_fake(ns + "pyramid_pool_backward")(_fake_pyramid_pool_backward)
        torch.library.register_fake(ns + "ppm_forward")(_fake_ppm_forward)
        torch.library.register_fake(ns + "head_epilogue")(_fake_head_epilogue)
        torch.library.register_fake(ns + "head_context_backward")(_fake_head_context_backward)
    torch.library.register_autograd(ns + "pyramid_pool", _pool_backward_for(prefix), setup_context=_pool_setup)
    torch.library.register_autograd(ns + "ppm_reduce", _reduce_backward, setup_context=_reduce_setup)
    torch.library.register_autograd(ns + "upsample_concat", _upsample_backward_for(prefix),
                                    setup_context=_upsample_setup)
    if hasattr(torch.ops.pspnet_fast, prefix + "head_epilogue"):
        torch.library.register_autograd(ns + "head_epilogue", _epilogue_backward_for(prefix),
                                        setup_context=_epilogue_setup)


_registered: set[str] = set()


def ensure_registered(backend: str) -> None:
    """Registers fake kernels and autograd for a backend's ops, once (the Triton ops derive their fake kernels)."""
    key = "triton" if backend == "triton" else "ext"
    if key in _registered:
        return
    if key == "ext":
        if _ext.load():
            _register("", with_fake=True)
    else:
        op_set("triton")
        _register("triton_", with_fake=False)
    _registered.add(key)


