"""Drop-in modules: the reference's constructor, submodules and state_dict keys, the fused kernels underneath."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.modules import module as _nn_module
from torch.nn.utils import parametrize, prune

from .. import ops
from ..ops import decompositions
from ..ops import order as _order
from .._checks import check_feature_map, check_same_device
from ..reference import PyramidPooling as _RefPyramidPooling

__all__ = ["PyramidPooling", "fallback_reason"]

_warned: set[tuple[str, str]] = set()  # (module class, reason kind) already warned about


def _name_in(root: nn.Module, m: nn.Module, prefix: str) -> str:
    name = next((n for n, s in root.named_modules() if s is m), "")
    return prefix + name if name else (prefix.rstrip(".") or type(root).__name__)


def fallback_reason(module: nn.Module, x: torch.Tensor, include_self: bool = False,
                    prefix: str = "") -> str | None:
    """Why the fused path cannot honour this call of `module` (whose forward would skip its submodules' forward),
    or None: forward hooks on its submodules (or global module hooks), pruning, parametrizations, forward-mode AD,
    torch.func transforms, torch.jit.trace. include_self: `module`'s own hooks count too (its forward is skipped); prefix: its name in the
    reason's text.
    The caller then runs the reference computation (see README, "What the fused path honours")."""
    if (_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks):
        return "global module hooks (torch.nn.modules.module.register_module_forward_hook and the like)"
    # A plain walk over _modules (named_modules and parametrize.is_parametrized cost ~10x more per call); names are
    # looked up only for the reason's text.
    stack = [module]
    while stack:
        m = stack.pop()
        stack.extend(c for c in m._modules.values() if c is not None)
        if m is module and not include_self:
            continue
        if m._forward_pre_hooks and any(isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values()):
            return f"pruning (torch.nn.utils.prune) of submodule {_name_in(module, m, prefix)!r}"
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return f"hooks on submodule {_name_in(module, m, prefix)!r}"
        if "parametrizations" in m._modules and parametrize.is_parametrized(m):
            return f"parametrizations (torch.nn.utils.parametrize) of submodule {_name_in(module, m, prefix)!r}"
    if torch.compiler.is_compiling():
        return None  # torch.compile traces the ops (fake kernels, registered autograd)
    if torch.jit.is_tracing():
        return "torch.jit.trace (the fused path's cached, folded weights would become constants of the trace)"
    if torch._C._functorch.maybe_current_level() is not None:
        return "a torch.func transform (vmap, grad, jvp, jacrev, ...)"
    if forward_ad._current_level >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in (x, *module.parameters(), *module.buffers())):
        return "forward-mode AD (torch.autograd.forward_ad dual tensors)"
    return None


def warn_fallback(owner: str, reason: str, stacklevel: int = 5) -> None:
    """One RuntimeWarning per (module class, reason kind) and process. stacklevel 5: the caller of the module (warn,
    the module's forward, Module._call_impl, Module.__call__)."""
    kind = (owner, reason.split(" of submodule")[0].split(" on submodule")[0])
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"pspnet_fast.{owner}: {reason}: the fused path cannot honour this, so this call runs the "
                      f"reference computation (same result, slower; build with backend=\"reference\" to say so and "
                      f"silence this warning)", RuntimeWarning, stacklevel=stacklevel)


def double_backward_error(owner: str) -> RuntimeError:
    return RuntimeError(f"pspnet_fast.{owner}: double backward (a backward with create_graph=True through the fused "
                        f"module) is not supported by the fused path; build the module with backend=\"reference\" "
                        f"for higher-order gradients")


def _folded_bn(bn: nn.Module, dtype: torch.dtype):
    """(scale, shift) of an eval-mode BatchNorm with running statistics, as ATen's batch_norm computes them
    (alpha = weight / sqrt(var + eps), beta = bias - mean * alpha); None when batch statistics are in use."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None:
        return None
    var = bn.running_var.to(dtype)
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


class PyramidPooling(_RefPyramidPooling):
    """Fused Pyramid Pooling Module, a drop-in for `pspnet_fast.reference.PyramidPooling`.

    Same constructor, submodules (`features.{i}.{0,1,2,3}`) and state_dict keys, so state_dicts load both ways with
    strict=True. Extra keyword `backend`: "auto" (default; the fastest backend that runs the input), "cpu", "cuda",
    "triton" or "reference"; the environment variable PSPNET_FAST_BACKEND overrides it.

    x: (N, in_channels, H, W), float32/float64/float16/bfloat16, contiguous, channels_last or any strided view, on the
    weights' device. Returns (N, in_channels + len(bins) * reduction_channels, H, W) in x's dtype and memory format:
    one pass over x pools every level, one product reduces every level (BatchNorm folded in eval, batch statistics in
    training through the module's own BatchNorm), one pass writes x and every upsampled level.
    """

    def __init__(
        self,
        in_channels: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        reduction_channels: int | None = None,
        align_corners: bool = True,
        backend: str = "auto",
    ):
        super().__init__(in_channels, bins, reduction_channels, align_corners)
        self.backend = ops.check_backend_name(backend)

    @classmethod
    def from_reference(cls, module: _RefPyramidPooling, backend: str = "auto") -> "PyramidPooling":
        """A fused module carrying `module`'s weights, buffers, device, dtype and train/eval mode."""
        if not isinstance(module, _RefPyramidPooling):
            raise TypeError(f"from_reference expects a pspnet_fast.reference.PyramidPooling, got {type(module).__name__}")
        new = cls(module.in_channels, module.bins, module.reduction_channels, module.align_corners, backend=backend)
        param = next(module.parameters())
        new.to(device=param.device, dtype=param.dtype)
        new.load_state_dict(module.state_dict(), strict=True)
        new.train(module.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def __getstate__(self):
        # The inference cache is derived data: never pickled, deep-copied or saved with torch.save(module).
        state = super().__getstate__()
        state = dict(state)
        state.pop("_reduce_cache", None)
        return state

    def clear_cache(self) -> None:
        """Forget the cached inference weights (needed only after edits through `.data`, which autograd's version
        counters do not see)."""
        self.__dict__.pop("_reduce_cache", None)

    def _reduce_params(self, dtype: torch.dtype):
        """weight (L, R, C) and, when every BatchNorm can be folded, (scale, shift) each (L, R), in `dtype`.

        Without autograd (inference) they are cached until a parameter or buffer changes (tensor versions), so the
        16 MB of 1x1 weights of a 2048-channel PPM are not restacked on every call. Edits through `.data` (e.g.
        `p.data.mul_(2)`) do not bump a version: call `clear_cache()` after them. Tensors made under
        torch.inference_mode are cached apart (they cannot enter a later training graph)."""
        # Straight from each level's _modules / _parameters / _buffers dicts (Sequential indexing and the
        # parameters() generators cost ~60 us a call on a 2-core machine; this runs on every inference call).
        # Under torch.compile nothing is cached (the traced graph holds the stacking).
        cacheable = not torch.compiler.is_compiling()
        if cacheable:
            parts = [tuple(f._modules.values())[1:3] for f in self.features]  # (conv, BatchNorm) per level
            tensors = [t for conv, bn in parts
                       for t in (conv.weight, *bn._parameters.values(), *bn._buffers.values()) if t is not None]
            cacheable = not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        if cacheable:
            # Everything the folded weights depend on: the tensors (identity, storage, version, dtype, device), each
            # BatchNorm's kind, eps, affine parameters and running statistics (present or not) and mode.
            key = (dtype, torch.is_inference_mode_enabled(),
                   tuple((type(bn), bn.training, getattr(bn, "eps", None), getattr(bn, "weight", None) is None,
                          getattr(bn, "running_mean", None) is None) for _, bn in parts),
                   tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
            cached = self.__dict__.get("_reduce_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        C, R = self.in_channels, self.reduction_channels
        weight = torch.stack([f[1].weight.reshape(R, C) for f in self.features]).to(dtype)  # (L, R, C)
        folded = [_folded_bn(f[2], dtype) for f in self.features]
        if all(fb is not None for fb in folded):
            folded = (torch.stack([fb[0] for fb in folded]), torch.stack([fb[1] for fb in folded]))
        else:
            folded = None
        if cacheable:
            self.__dict__["_reduce_cache"] = (key, (weight, folded))
        return weight, folded

    def _levels(self, kernels: ops.OpSet, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (N, C, S) -> levels (N, R, S) after the 1x1 convs, BatchNorm and ReLU, in pooled's dtype."""
        weight, folded = self._reduce_params(pooled.dtype)
        if folded is not None:
            return kernels.ppm_reduce(pooled, weight, folded[0], folded[1], self.bins, True)
        # Training (or BatchNorm without running statistics): the module's own BatchNorm and ReLU on the small
        # (N, R, b, b) maps, so batch statistics and running-stat updates are exactly the reference's (SyncBatchNorm
        # after convert_sync_batchnorm included).
        y = kernels.ppm_reduce(pooled, weight, None, None, self.bins, False)
        parts, off, R = [], 0, self.reduction_channels
        for b, f in zip(self.bins, self.features):
            # In the module's own dtype, as the reference's BatchNorm sees the conv output (a bfloat16 module's
            # BatchNorm refuses float32 input on CPU); under autocast the parameters stay float32.
            yl = y[:, :, off:off + b * b].reshape(y.shape[0], R, b, b).to(f[1].weight.dtype)
            parts.append(f[3](f[2](yl)).flatten(2))
            off += b * b
        return torch.cat(parts, 2).to(pooled.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.in_channels)
        check_same_device(x, self.features[0][1].weight)
        if decompositions.onnx_exporting():  # standard ONNX ops, exact at every size (ops/decompositions.py)
            return decompositions.ppm_module_forward(self, x)
        backend = ops.choose_backend(x, self.backend)
        if backend == "reference":
            return super().forward(x)
        why = fallback_reason(self, x)
        if why is not None:
            warn_fallback(type(self).__name__, why)
            return super().forward(x)
        ops.ensure_registered(backend)
        kernels = ops.op_set(backend)
        params = [p for p in self.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        if torch.is_grad_enabled() and (x.requires_grad or params) and not torch.compiler.is_compiling():
            return _FusedPPMFunction.apply(x, self, kernels, *params)
        # Inference, and traced graphs (torch.compile differentiates the ops' registered autograd formulas).
        if not (torch.is_grad_enabled() and (x.requires_grad or params)):
            # Nothing to differentiate: with every BatchNorm folded, one op that reads x once (ppm_forward).
            weight, folded = self._reduce_params(torch.float64 if x.dtype == torch.float64 else torch.float32)
            if folded is not None:
                return ops.ppm_forward(kernels, x, weight, folded[0], folded[1], self.bins, True, self.align_corners)
        pooled = kernels.pyramid_pool(x, self.bins)  # (N, C, S), float32 (float64 for float64 x)
        return kernels.upsample_concat(x, self._levels(kernels, pooled), self.bins, self.align_corners)


class _FusedPPMFunction(torch.autograd.Function):
    """The whole fused PPM as one autograd node: forward pool -> levels -> upsample_concat, backward
    upsample_concat_backward (one pass over the level channels of grad_out) -> the small levels graph (1x1 convs,
    BatchNorm, ReLU) by autograd -> pyramid_pool_backward (one pass writing grad_x = grad_out[:, :C] + the spread of
    the pooled gradient). Nothing full-resolution is saved: pooling and upsampling are linear, their adjoints need only
    the small pooled tensors. Deterministic: every backward kernel reduces each value in one program, no atomics."""

    @staticmethod
    def forward(ctx, x, module, kernels, *params):
        pooled = kernels.pyramid_pool(x, module.bins)
        with torch.enable_grad():
            p = pooled.detach().requires_grad_(x.requires_grad)
            levels = module._levels(kernels, p)
        ctx.module, ctx.kernels, ctx.pooled, ctx.levels = module, kernels, p, levels
        ctx.x_requires_grad = x.requires_grad
        ctx.params = params
        return _order.upsample_concat(kernels, x, levels.detach(), module.bins, module.align_corners,
                                      getattr(module, "x_last", False))

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' adjoints are not differentiable
            raise double_backward_error(type(ctx.module).__name__)
        m, kernels, params = ctx.module, ctx.kernels, list(ctx.params)
        x_last = getattr(m, "x_last", False)  # [levels..., x] (pspnet_fast.patch, segmentation_models_pytorch)
        grad_levels = _order.upsample_concat_backward(kernels, grad_out, m.in_channels, m.bins, m.align_corners,
                                                      x_last)
        inputs = ([ctx.pooled] if ctx.x_requires_grad else []) + params
        # retain_graph: the small levels graph (pooled maps, BatchNorm statistics) lives as long as this node, so a
        # retained outer graph can run backward again.
        grads = torch.autograd.grad(ctx.levels, inputs, grad_levels.to(ctx.levels.dtype), allow_unused=True,
                                    retain_graph=True) if inputs and ctx.levels.requires_grad else [None] * len(inputs)
        grad_x = None
        if ctx.x_requires_grad:
            grad_pooled = grads[0] if grads[0] is not None else torch.zeros_like(ctx.pooled)
            grad_x = _order.pyramid_pool_backward(kernels, grad_pooled, grad_out, m.bins, x_last)
            grads = grads[1:]
        return (grad_x, None, None, *grads)
