"""The fused PSP head: the 3x3 bottleneck never sees the (N, C + L*R, H, W) concatenation.

The reference head computes conv3x3(cat[x, U_1..U_L]) with U_l = upsample(P_l), P_l the level maps after the PPM's
1x1 conv, BatchNorm and ReLU. Splitting the conv weight by input channels, W = [W_X, W_1..W_L], and using that bilinear
upsampling is the same linear map on every channel:

    conv3x3(cat[x, U..]; W) = conv3x3(x; W_X) + context(q),   q_l[:, :, 3 dy + dx] = W_l[:, :, dy, dx] @ P_l

where context(q) upsamples every small q_l map and adds it shifted by (dy - 1, dx - 1) with zero padding (truth:
`pspnet_fast.reference.head_context`). So the head is: the platform's convolution over x only (half the bottleneck's
multiply-adds with C = L*R = 2048), a few small products for q, and ONE epilogue pass (`head_epilogue`) that adds the
context and applies the folded BatchNorm and ReLU. In training the epilogue adds the context and the head's own
BatchNorm (batch statistics, running-stat updates, SyncBatchNorm) and ReLU run on the result; the backward
(`head_context_backward` and a convolution backward over x) saves nothing of the concatenation's size.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._checks import check_feature_map, check_same_device
from .modules import PyramidPooling, _folded_bn
from .reference import PSPHead as _RefPSPHead

__all__ = ["PSPHead", "psp_head_forward"]


def _is_standard_cls(cls: nn.Module) -> bool:
    """The reference's cls: Conv2d(3x3, padding 1, no bias) -> BatchNorm2d -> ReLU -> Dropout2d -> Conv2d(1x1)."""
    if not isinstance(cls, nn.Sequential) or len(cls) != 5:
        return False
    conv = cls[0]
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
            and conv.padding_mode == "zeros" and isinstance(cls[1], nn.modules.batchnorm._BatchNorm)
            and isinstance(cls[2], nn.ReLU))


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference's convolution would run in: autocast's when autocast is on, else x's."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _split_weight(ppm: PyramidPooling, conv: nn.Conv2d, levels: torch.Tensor, conv_dtype: torch.dtype):
    """W_X (O, C, 3, 3) in conv_dtype and q (N, O, 9, S) in levels' dtype (float32 or float64) from levels (N, R, S).

    Differentiable (the training path builds its small graph with it). Without autograd the prepared weights (the
    contiguous W_X and the (L, O*9, R) stack of the level weights, 9 + 9 * 4 MB for a 4096-channel head) are cached
    on the conv until its weight changes."""
    weight = conv.weight
    C, R, L = ppm.in_channels, ppm.reduction_channels, len(ppm.bins)
    O = weight.shape[0]
    acc = levels.dtype
    cacheable = not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and weight.requires_grad)
    key = (conv_dtype, acc, weight.data_ptr(), weight._version, weight.device)
    cached = conv.__dict__.get("_pspnet_fast_head_cache") if cacheable else None
    if cached is not None and cached[0] == key:
        wx, wq = cached[1]
    else:
        wx = weight[:, :C].to(conv_dtype)
        # (O, L*R, 3, 3) -> (L, O * 9, R): row o * 9 + t of level l holds W_l[o, :, t // 3, t % 3].
        wq = weight[:, C:].reshape(O, L, R, 9).permute(1, 0, 3, 2).reshape(L, O * 9, R).to(acc)
        if cacheable:
            wx = wx.contiguous()
            conv.__dict__["_pspnet_fast_head_cache"] = (key, (wx, wq))
    n, S = levels.shape[0], levels.shape[2]
    parts, off = [], 0
    for l, b in enumerate(ppm.bins):
        parts.append(torch.matmul(wq[l], levels[:, :, off:off + b * b]))  # (N, O * 9, b * b)
        off += b * b
    q = torch.cat(parts, 2).view(n, O, 9, S)
    return wx, q


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()


def psp_head_forward(x: torch.Tensor, ppm: nn.Module, cls: nn.Sequential, backend: str = "auto") -> torch.Tensor:
    """cls(ppm(x)) of the reference head, computed without the concatenation where a fused backend runs x.

    ppm: a fused `pspnet_fast.PyramidPooling`; cls: the reference's Sequential (conv3x3, BatchNorm, ReLU, Dropout2d,
    conv1x1). Anything else (a reference ppm, a changed cls, a backend without head kernels) runs cls(ppm(x))."""
    if not isinstance(ppm, PyramidPooling) or not _is_standard_cls(cls):
        return cls(ppm(x))
    check_feature_map(x, ppm.in_channels)
    check_same_device(x, cls[0].weight)
    name = ops.choose_backend(x, backend)
    if name == "reference":
        return cls(ppm(x))
    ops.ensure_registered(name)
    kernels = ops.op_set(name)
    if kernels.head_epilogue is None:
        return cls(ppm(x))
    conv, bn, act, drop, classifier = cls
    params = [p for p in (*ppm.parameters(), conv.weight) if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or params) and not torch.compiler.is_compiling():
        v = _FusedHeadFunction.apply(x, ppm, conv, kernels, *params)
        y = act(bn(v))
    else:
        # Inference, and traced graphs (torch.compile differentiates the ops' registered autograd formulas).
        cdt = _conv_dtype(x)
        pooled = kernels.pyramid_pool(x, ppm.bins)
        with _no_autocast(x):
            wx, q = _split_weight(ppm, conv, ppm._levels(kernels, pooled), cdt)
            z = F.conv2d(x.to(cdt), wx, None, 1, 1)
            folded = _folded_bn(bn, q.dtype)
            if folded is not None:
                y = kernels.head_epilogue(z, q, ppm.bins, ppm.align_corners, folded[0], folded[1], True)
            else:
                y = act(bn(kernels.head_epilogue(z, q, ppm.bins, ppm.align_corners, None, None, False)))
    return classifier(drop(y))


class _FusedHeadFunction(torch.autograd.Function):
    """x -> conv3x3(x; W_X) + context(q) as one autograd node (the head's BatchNorm and ReLU follow as modules).

    Forward: pyramid_pool, the small levels graph (1x1 convs, BatchNorm, ReLU) and q = W_l @ P_l kept with autograd,
    the convolution over x, head_epilogue. Backward: head_context_backward gives grad_q, a convolution backward gives
    grad_x and grad_W_X, autograd through the small graph gives grad_pooled and the parameters' gradients, and
    pyramid_pool_backward writes grad_x = conv's grad_x + the spread of grad_pooled in one pass. Saved: x (in the
    convolution's dtype) and the small graph; deterministic wherever the platform's convolution backward is."""

    @staticmethod
    def forward(ctx, x, ppm, conv, kernels, *params):
        cdt = _conv_dtype(x)
        pooled = kernels.pyramid_pool(x, ppm.bins)
        with torch.enable_grad(), _no_autocast(x):
            p = pooled.detach().requires_grad_(x.requires_grad)
            wx, q = _split_weight(ppm, conv, ppm._levels(kernels, p), cdt)
        x_c = x.to(cdt)
        with torch.no_grad(), _no_autocast(x):
            z = F.conv2d(x_c, wx.detach(), None, 1, 1)
        v = kernels.head_epilogue(z, q.detach(), ppm.bins, ppm.align_corners, None, None, False)
        ctx.save_for_backward(x_c)
        ctx.ppm, ctx.kernels, ctx.p, ctx.wx, ctx.q, ctx.params = ppm, kernels, p, wx, q, params
        ctx.x_requires_grad, ctx.x_dtype = x.requires_grad, x.dtype
        return v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x_c,) = ctx.saved_tensors
        ppm, kernels, wx, q = ctx.ppm, ctx.kernels, ctx.wx, ctx.q
        grad_q = kernels.head_context_backward(grad, ppm.bins, ppm.align_corners)
        g = grad.to(x_c.dtype)
        gx_conv, gw_x, _ = torch.ops.aten.convolution_backward(
            g, x_c, wx.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [ctx.x_requires_grad, wx.requires_grad, False])
        outputs, grads = [], []
        if q.requires_grad:
            outputs.append(q)
            grads.append(grad_q.to(q.dtype))
        if wx.requires_grad:
            outputs.append(wx)
            grads.append(gw_x.to(wx.dtype))
        inputs = ([ctx.p] if ctx.x_requires_grad else []) + list(ctx.params)
        # retain_graph: the small graph lives as long as this node, so a retained outer graph can run backward again.
        got = list(torch.autograd.grad(outputs, inputs, grads, allow_unused=True, retain_graph=True)) if outputs \
            else [None] * len(inputs)
        grad_x = None
        if ctx.x_requires_grad:
            grad_pooled = got.pop(0)
            if grad_pooled is None:
                grad_pooled = torch.zeros_like(ctx.p)
            grad_x = kernels.pyramid_pool_backward(grad_pooled, gx_conv, ppm.bins).to(ctx.x_dtype)
        return (grad_x, None, None, None, *got)


class PSPHead(_RefPSPHead):
    """Fused PSP head, a drop-in for `pspnet_fast.reference.PSPHead`: same constructor, submodules (`ppm.*`, `cls.*`)
    and state_dict keys; the same random initialization for the same seed. Extra keyword `backend` as for
    `pspnet_fast.PyramidPooling` ("auto", "cpu", "cuda", "triton", "reference"; PSPNET_FAST_BACKEND overrides).

    x: (N, in_channels, H, W), float32/float64/float16/bfloat16, contiguous or channels_last -> (N, num_classes, H, W).
    """

    def __init__(self, in_channels: int, num_classes: int, bins=(1, 2, 3, 6), reduction_channels=None,
                 bottleneck_channels: int = 512, dropout: float = 0.1, align_corners: bool = True,
                 backend: str = "auto"):
        super().__init__(in_channels, num_classes, bins, reduction_channels, bottleneck_channels, dropout,
                         align_corners)
        self.backend = ops.check_backend_name(backend)
        # The fused PPM takes the reference PPM's freshly initialized weights without drawing random numbers, so a
        # seed gives the reference head's weights.
        with torch.random.fork_rng(devices=[]):
            self.ppm = PyramidPooling.from_reference(self.ppm, backend=backend)

    @classmethod
    def from_reference(cls, head: _RefPSPHead, backend: str = "auto") -> "PSPHead":
        """A fused head carrying `head`'s weights, buffers, device, dtype and train/eval mode."""
        if not isinstance(head, _RefPSPHead):
            raise TypeError(f"from_reference expects a pspnet_fast.reference.PSPHead, got {type(head).__name__}")
        ppm = head.ppm
        with torch.random.fork_rng(devices=[]):
            new = cls(ppm.in_channels, head.cls[4].out_channels, ppm.bins, ppm.reduction_channels,
                      head.cls[0].out_channels, head.cls[3].p, ppm.align_corners, backend=backend)
        param = next(head.parameters())
        new.to(device=param.device, dtype=param.dtype)
        new.load_state_dict(head.state_dict(), strict=True)
        new.train(head.training)
        return new

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return psp_head_forward(x, self.ppm, self.cls, self.backend)
