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

from .. import ops
from ..ops import decompositions
from .._checks import check_feature_map, check_same_device
from .ppm import PyramidPooling, _folded_bn, double_backward_error, fallback_reason, warn_fallback
from ..reference import PSPHead as _RefPSPHead

__all__ = ["PSPHead", "conv_head_forward", "conv_kernel_size", "psp_head_forward"]


def _is_standard_cls(cls: nn.Module) -> bool:
    """The reference's cls: Conv2d(3x3, padding 1, no bias) -> BatchNorm2d -> ReLU -> Dropout2d -> Conv2d(1x1).

    Exact types for the conv and the BatchNorm (SyncBatchNorm allowed): a subclass may change what forward computes
    (a weight-standardized conv, say), which the fused path would skip."""
    if not isinstance(cls, nn.Sequential) or len(cls) != 5:
        return False
    return (conv_kernel_size(cls[0]) == 3 and cls[0].bias is None and type(cls[1]) in (nn.BatchNorm2d, nn.SyncBatchNorm)
            and isinstance(cls[2], nn.ReLU))


def conv_kernel_size(conv: nn.Module) -> int | None:
    """k when `conv` is a plain nn.Conv2d (exact type: a subclass may compute something else) of kernel k x k with
    k in (1, 3), 'same' zero padding (k // 2), stride 1, dilation 1, one group; else None. Bias or not."""
    if type(conv) is not nn.Conv2d or conv.kernel_size not in ((1, 1), (3, 3)):
        return None
    k = conv.kernel_size[0]
    same = ((k // 2, k // 2), "same") + (("valid",) if k == 1 else ())
    if (conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
            or conv.padding not in same):
        return None
    return k


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference's convolution would run in: autocast's when autocast is on (autocast leaves float64
    alone), else x's."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _Layout:
    """Where x and the levels sit among the conv's input channels: [x, level_0..level_{L-1}] (x first, the authors',
    mmsegmentation) or [level_0..level_{L-1}, x] (x last, segmentation_models_pytorch); R channels a level; kernel
    k = 1 or 3."""

    def __init__(self, C: int, R: int, L: int, x_last: bool, k: int):
        self.C, self.R, self.L, self.x_last, self.k = C, R, L, bool(x_last), k
        self.x0 = L * R if x_last else 0
        self.pad = k // 2

    def level0(self, l: int) -> int:
        return l * self.R if self.x_last else self.C + l * self.R

    def level_slice(self, l: int) -> slice:
        return slice(self.level0(l), self.level0(l) + self.R)

    def x_slice(self) -> slice:
        return slice(self.x0, self.x0 + self.C)


def _level_weight(weight: torch.Tensor, lay: _Layout, l: int, dtype: torch.dtype) -> torch.Tensor:
    """(O * T, R) in dtype, T = 9 taps of a 3x3 conv (row o * 9 + t holds W_l[o, :, t // 3, t % 3]) or T = 1 for a
    1x1 conv (the centre tap alone); W_l the conv weight's input channels of level l."""
    O, R = weight.shape[0], lay.R
    w = weight[:, lay.level_slice(l)]
    if lay.k == 1:
        return w.reshape(O, R).to(dtype)
    return w.reshape(O, R, 9).transpose(1, 2).reshape(O * 9, R).to(dtype)


def _split_weight(weight: torch.Tensor, lay: _Layout, conv_dtype: torch.dtype, acc: torch.dtype):
    """W_X (the weight's x channels) in conv_dtype, and level_weight(l) -> (O * T, R) in acc for level l, made when
    called (one level's T * O * R copy at a time). Differentiable if `weight` is; nothing is cached (a cache keyed on
    the weight's version would miss edits through `.data`)."""
    return weight[:, lay.x_slice()].to(conv_dtype), lambda l: _level_weight(weight, lay, l, acc)


def _context_q(bins, lay: _Layout, level_weight, levels: torch.Tensor) -> torch.Tensor:
    """q (N, O, 9, S): per level, level_weight(l) (O * T, R) @ levels[:, :, level l] (N, R, b * b). A 1x1 conv fills
    the centre tap (t = 4) and leaves the other eight zero: head_epilogue then adds exactly upsample(W_l @ P_l), at
    the price of an epilogue that still walks nine taps (its per-pixel work is ~3x a centre-only pass; next to the
    convolution over x it is small, see README) and a q nine times the needed size (O * S values: a few KB)."""
    n, S = levels.shape[0], levels.shape[2]
    parts, off = [], 0
    for l, b in enumerate(bins):
        parts.append(torch.matmul(level_weight(l), levels[:, :, off:off + b * b]))  # (N, O * T, b * b)
        off += b * b
    cat = torch.cat(parts, 2)
    if lay.k == 3:
        return cat.view(n, cat.shape[1] // 9, 9, S)
    q = cat.new_zeros(n, cat.shape[1], 9, S)
    q[:, :, 4] = cat
    return q


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()


def psp_head_forward(x: torch.Tensor, ppm: nn.Module, cls: nn.Sequential, backend: str = "auto") -> torch.Tensor:
    """cls(ppm(x)) of the reference head, computed without the concatenation where a fused backend runs x.

    ppm: a fused `pspnet_fast.PyramidPooling`; cls: the reference's Sequential (conv3x3, BatchNorm, ReLU, Dropout2d,
    conv1x1). Anything else (a reference ppm, a changed cls, a backend without head kernels) runs cls(ppm(x))."""
    exporting = decompositions.onnx_exporting()  # torch.onnx: conv_head_forward takes the export formulation
    if exporting:
        decompositions.check_exportable(cls, "the PSP head's cls")
    if not isinstance(ppm, PyramidPooling) or not _is_standard_cls(cls):
        return cls(ppm(x))
    why = None if exporting else fallback_reason(cls, x, True, "cls.")  # hooks on cls, its dropout/classifier
    if why is not None and ops.choose_backend(x, backend) != "reference":
        warn_fallback("PSPHead", why, stacklevel=6)  # via PSPHead.forward or PSPNet.forward
        return cls(ppm(x))
    conv, bn, act, drop, classifier = cls
    y = conv_head_forward(x, ppm, conv, bn, act, backend)
    return classifier(drop(y))


def conv_head_forward(x: torch.Tensor, ppm: nn.Module, conv: nn.Conv2d, norm: nn.Module | None,
                      act: nn.Module | None, backend: str = "auto") -> torch.Tensor:
    """act(norm(conv(ppm(x)))) computed without ppm's concatenation where a fused backend runs x.

    x: (N, C, H, W), float32/float64/float16/bfloat16, any layout. ppm: a fused PPM with equal reduction channels R
    (`pspnet_fast.PyramidPooling`, or pspnet_fast.patch's PatchedPyramidPooling with `x_last` for [levels, x]);
    conv: nn.Conv2d over ppm's C + L * R output channels, kernel 1 (padding 0) or 3 (padding 1), with or without
    bias; norm: a BatchNorm (folded in eval; in training the module itself runs on conv's output, batch statistics
    and running-stat updates as the original's) or None; act: the head's own activation module (nn.ReLU is applied in
    the epilogue in eval; any other module, or training, runs the module itself) or None. Returns (N, O, H, W). The
    caller proves the pattern; anything this cannot run (a reference backend, no head kernels) runs the modules."""
    seq = [m for m in (conv, norm, act) if m is not None]

    def modules(t):
        for m in seq:
            t = m(t)
        return t

    k = conv_kernel_size(conv)
    R = getattr(ppm, "reduction_channels", None)
    if k is None or R is None or not hasattr(ppm, "_levels"):
        return modules(ppm(x))
    check_feature_map(x, ppm.in_channels)
    check_same_device(x, conv.weight)
    exporting = decompositions.onnx_exporting()
    if exporting:
        # torch.onnx.export: the same math in plain torch ops, exact at every size (ops/decompositions.py); eval only.
        for what, m in (("ppm", ppm), *((type(m).__name__, m) for m in seq)):
            decompositions.check_exportable(m, f"the head's {what}")
        kernels = decompositions.KERNELS
    else:
        name = ops.choose_backend(x, backend)
        if name == "reference":
            return modules(ppm(x))
        why = fallback_reason(ppm, x, True, "ppm.")
        for m in seq:
            why = why or fallback_reason(m, x, True, "")
        if why is not None:
            warn_fallback("PSPHead", why, stacklevel=7)  # via PSPHead.forward or PSPNet.forward
            return modules(ppm(x))
        ops.ensure_registered(name)
        kernels = ops.op_set(name)
        if kernels.head_epilogue is None:
            return modules(ppm(x))
    lay = _Layout(ppm.in_channels, R, len(ppm.bins), getattr(ppm, "x_last", False), k)
    params = [p for p in (*ppm.parameters(), conv.weight, conv.bias) if p is not None and p.requires_grad]
    if (not exporting and torch.is_grad_enabled() and (x.requires_grad or params)
            and not torch.compiler.is_compiling()):
        # conv.weight and conv.bias last: see backward
        v = _FusedHeadFunction.apply(x, ppm, conv, lay, kernels, *params)
    else:
        # Inference, and traced graphs (torch.compile differentiates the ops' registered autograd formulas).
        cdt = _conv_dtype(x)
        pooled = kernels.pyramid_pool(x, ppm.bins)
        with nullcontext() if exporting else _no_autocast(x):  # no autocast region in an exported graph
            levels = ppm._levels(kernels, pooled)
            # Differentiable in a traced training graph (torch.compile); detached otherwise.
            grad = torch.is_grad_enabled()
            weight = conv.weight if grad and conv.weight.requires_grad else conv.weight.detach()
            bias = conv.bias if conv.bias is None or (grad and conv.bias.requires_grad) else conv.bias.detach()
            wx, level_weight = _split_weight(weight, lay, cdt, levels.dtype)
            q = _context_q(ppm.bins, lay, level_weight, levels)
            z = F.conv2d(x.to(cdt), wx, None if bias is None else bias.to(cdt), 1, lay.pad)
            relu = type(act) is nn.ReLU
            if norm is None:
                y = kernels.head_epilogue(z, q, ppm.bins, ppm.align_corners, None, None, relu)
                return y if relu or act is None else act(y)
            folded = _folded_bn(norm, q.dtype)
            if folded is not None:
                y = kernels.head_epilogue(z, q, ppm.bins, ppm.align_corners, folded[0], folded[1], relu)
                return y if relu or act is None else act(y)
            v = kernels.head_epilogue(z, q, ppm.bins, ppm.align_corners, None, None, False)
    if norm is not None:
        v = norm(v)
    return act(v) if act is not None else v


class _FusedHeadFunction(torch.autograd.Function):
    """x -> conv(x; W_X) (+ bias) + context(q) as one autograd node (the head's BatchNorm and activation follow as
    modules).

    Forward: pyramid_pool; the small levels graph (1x1 convs, BatchNorm, ReLU) kept with autograd; q = W_l @ P_l and
    the convolution over x without autograd; head_epilogue. Backward: head_context_backward gives grad_q (only its
    centre tap is read for a 1x1 conv); a convolution backward gives grad_x, grad_W_X and the bias's gradient; two
    small products per level give grad_W_l and grad_P_l, and autograd through the small levels graph grad_pooled and
    the PPM's parameter gradients; pyramid_pool_backward writes grad_x = conv's grad_x + the spread of grad_pooled in
    one pass; the conv weight's gradient is assembled in one tensor. Saved: x (in the convolution's dtype) and the
    small graph; deterministic wherever the platform's convolution backward is."""

    @staticmethod
    def forward(ctx, x, ppm, conv, lay, kernels, *params):
        cdt = _conv_dtype(x)
        pooled = kernels.pyramid_pool(x, ppm.bins)
        with torch.enable_grad(), _no_autocast(x):
            p = pooled.detach().requires_grad_(x.requires_grad)
            levels = ppm._levels(kernels, p)
        x_c = x.to(cdt)
        bias = None if conv.bias is None else conv.bias.detach().to(cdt)
        with torch.no_grad(), _no_autocast(x):
            wx, level_weight = _split_weight(conv.weight.detach(), lay, cdt, levels.dtype)
            q = _context_q(ppm.bins, lay, level_weight, levels.detach())
            z = F.conv2d(x_c, wx, bias, 1, lay.pad)
        v = kernels.head_epilogue(z, q, ppm.bins, ppm.align_corners, None, None, False)
        # The weight is saved (no copy) so that an in-place change before backward raises, as for the reference.
        ctx.save_for_backward(x_c, conv.weight)
        ctx.ppm, ctx.kernels, ctx.p, ctx.levels, ctx.lay = ppm, kernels, p, levels, lay
        # What needs a gradient is fixed here: toggling requires_grad before backward changes nothing.
        ctx.ppm_params = [t for t in params if t is not conv.weight and t is not conv.bias]
        ctx.weight_grad = any(t is conv.weight for t in params)
        ctx.bias_grad = conv.bias is not None and any(t is conv.bias for t in params)
        ctx.bias_dtype = None if conv.bias is None else conv.bias.dtype
        ctx.x_requires_grad, ctx.x_dtype, ctx.conv_dtype = x.requires_grad, x.dtype, cdt
        return v

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' adjoints are not differentiable
            raise double_backward_error("PSPHead")
        x_c, weight = ctx.saved_tensors
        ppm, kernels, levels, lay = ctx.ppm, ctx.kernels, ctx.levels, ctx.lay
        R, T = lay.R, 9 if lay.k == 3 else 1
        n, O = grad.shape[0], weight.shape[0]
        grad_q = kernels.head_context_backward(grad, ppm.bins, ppm.align_corners)  # (N, O, 9, S), levels' dtype
        if T == 1:
            grad_q = grad_q[:, :, 4:5]  # a 1x1 conv's context is its centre tap alone
        wx, level_weight = _split_weight(weight.detach(), lay, ctx.conv_dtype, grad_q.dtype)
        gx_conv, gw_x, gb = torch.ops.aten.convolution_backward(
            grad.to(x_c.dtype), x_c, wx, [O] if ctx.bias_grad else None, [1, 1], [lay.pad, lay.pad], [1, 1], False,
            [0, 0], 1, [ctx.x_requires_grad, ctx.weight_grad, ctx.bias_grad])
        grad_w = None
        if ctx.weight_grad:
            # The conv weight's gradient assembled in one tensor, level by level (no weight-sized temporaries beyond
            # one level's T * O * R values).
            grad_w = torch.empty_like(weight)
            grad_w[:, lay.x_slice()].copy_(gw_x)
        del gw_x
        # Per level: grad_P_l = W_l^T grad_q_l (per image); grad_W_l = sum over images of grad_q_l P_l^T.
        lv = levels.detach()
        grad_levels, off = [], 0
        for l, b in enumerate(ppm.bins):
            s = b * b
            gq = grad_q[:, :, :, off:off + s].reshape(n, O * T, s)
            grad_levels.append(torch.matmul(level_weight(l).t(), gq))  # (N, R, s)
            if grad_w is not None:
                g_l = torch.matmul(gq.transpose(0, 1).reshape(O * T, n * s),
                                   lv[:, :, off:off + s].transpose(0, 1).reshape(R, n * s).t())  # (O * T, R)
                grad_w[:, lay.level_slice(l)].view(O, R, T).copy_(g_l.view(O, T, R).permute(0, 2, 1))
            off += s
        inputs = ([ctx.p] if ctx.x_requires_grad else []) + ctx.ppm_params
        got = list(torch.autograd.grad(levels, inputs, torch.cat(grad_levels, 2), allow_unused=True,
                                       retain_graph=True)) if inputs and levels.requires_grad else [None] * len(inputs)
        grad_x = None
        if ctx.x_requires_grad:
            grad_pooled = got.pop(0)
            if grad_pooled is None:
                grad_pooled = torch.zeros_like(ctx.p)
            # gx_conv is x's own gradient (C channels, either layout): the spread of grad_pooled is added to it.
            grad_x = kernels.pyramid_pool_backward(grad_pooled, gx_conv, ppm.bins).to(ctx.x_dtype)
        if grad_w is not None:
            got.append(grad_w)  # conv.weight and conv.bias are the last of params
        if ctx.bias_grad:
            got.append(gb.to(ctx.bias_dtype))
        return (grad_x, None, None, None, None, *got)


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
