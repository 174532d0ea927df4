"""`pspnet_fast.patch(model)`: swap the pyramid pooling modules of an existing PSPNet for fused ones, in place.

Recognized layouts (PEERS.md sections 2-4), read off the module tree, never off class names alone:

    reference  pspnet_fast.reference.PyramidPooling (this project); output [x, levels].
    authors    module.features: ModuleList of Sequential(AdaptiveAvgPool2d(b), Conv2d 1x1, BatchNorm2d, ReLU);
               output [x, levels]; align_corners = the module's `align_corners`, else True.
    mmseg      a head (PSPHead) with psp_modules (PPM: a ModuleList of Sequential(AdaptiveAvgPool2d(b),
               ConvModule(conv, bn, activate))), bottleneck and conv_seg; the head computes
               cls_seg(bottleneck(cat([x] + PPM(x)))); align_corners = the head's, else False.
    smp        module.blocks: ModuleList of PSPBlock, block.pool = Sequential(AdaptiveAvgPool2d(b),
               Conv2dReLU(conv, bn | Identity, ReLU)); output [levels, x]; align_corners=True.

The replacement keeps the original submodules under their original names (so state_dict keys, and therefore
original checkpoints, load with strict=True) and computes the same function with the fused ops. mmsegmentation's PPM
returns a list that its PSPHead concatenates, so the whole head is replaced (by an instance of a subclass of the
head's own class: every other method, attribute and key stays). Branch list containers under other attribute names
are recognized only with an explicit `style`, which says which convention (order, align_corners default) to assume.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import decompositions
from ..ops import order as _order
from .._checks import check_feature_map, check_same_device
from ..models.light import LightPSPNet
from ..models.pspnet import PSPNet as ProjectPSPNet
from ..nn.head import PSPHead as FusedPSPHead
from ..nn.head import _is_standard_cls
from ..nn.ppm import PyramidPooling as FusedPyramidPooling
from ..nn.ppm import _FusedPPMFunction, _folded_bn, fallback_reason, warn_fallback
from ..reference import PSPHead as RefPSPHead
from ..reference import PyramidPooling as RefPyramidPooling
from . import heads as _heads

__all__ = ["patch", "PatchResult", "PatchedPyramidPooling", "STYLES"]

log = logging.getLogger(__name__)

STYLES = ("auto", "authors", "mmseg", "smp")
# style -> (x_last, align_corners when the module has no `align_corners` attribute)
_CONVENTIONS = {"authors": (False, True), "mmseg": (False, False), "smp": (True, True)}


class PatchResult(list):
    """The qualified names of the PPMs (or mmseg heads) replaced (a list), with `.heads`: the qualified names of the
    modules fused with their PPM (`cls`, `decode_head.bottleneck`, `decoder.conv`), and `.skipped`: [(qualified name,
    reason)] of the candidates left (PPMs, and heads whose PPM is fused alone)."""

    def __init__(self, names=(), skipped=(), heads=()):
        super().__init__(names)
        self.skipped = list(skipped)
        self.heads = list(heads)


# ------------------------------------------------------------------------------------------------------------------
# Reading one branch: AdaptiveAvgPool2d(b) -> Conv2d 1x1 -> [BatchNorm] -> [ReLU]
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class _Branch:
    bin: int
    conv: str  # qualified names inside the container
    norm: str | None
    act: str | None


def _convmodule_parts(m: nn.Module):
    """mmcv's ConvModule (conv, norm named by `norm_name`, `activate`), order conv -> norm -> act; else None."""
    if isinstance(m, nn.Sequential) or not isinstance(getattr(m, "conv", None), nn.Conv2d):
        return None
    if tuple(getattr(m, "order", ("conv", "norm", "act"))) != ("conv", "norm", "act"):
        return None
    parts = [("conv", m.conv)]
    if getattr(m, "with_norm", True):
        name = getattr(m, "norm_name", "bn")
        if getattr(m, name, None) is not None:
            parts.append((name, getattr(m, name)))
    if getattr(m, "with_activation", True) and getattr(m, "activate", None) is not None:
        parts.append(("activate", m.activate))
    known = {id(p) for _, p in parts}
    if any(id(c) not in known for c in m.children()):
        return None  # padding layers, spectral norm, ...: not the plain ConvModule
    return parts


def _leaves(m: nn.Module, prefix: str):
    """(qualified name, module) in forward order through Sequentials and ConvModules; Identity dropped."""
    if isinstance(m, nn.Sequential):
        for name, c in m.named_children():
            yield from _leaves(c, f"{prefix}{name}.")
        return
    parts = _convmodule_parts(m)
    if parts is not None:
        for name, c in parts:
            yield from _leaves(c, f"{prefix}{name}.")
        return
    if not isinstance(m, nn.Identity):
        yield prefix[:-1], m


def _parse_branch(m: nn.Module, prefix: str) -> tuple[_Branch | None, str]:
    leaves = list(_leaves(m, prefix))
    kinds = [type(c).__name__ for _, c in leaves]
    if len(leaves) < 2 or not isinstance(leaves[0][1], nn.AdaptiveAvgPool2d):
        return None, f"branch {prefix[:-1]!r} is {kinds}, not AdaptiveAvgPool2d -> Conv2d 1x1 -> [BatchNorm] -> [ReLU]"
    size = leaves[0][1].output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or size[0] != size[1] or not isinstance(size[0], int) or size[0] < 1:
        return None, f"branch {prefix[:-1]!r} pools to {leaves[0][1].output_size!r}, not a square b x b"
    conv_name, conv = leaves[1]
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1
            and type(conv).forward is nn.Conv2d.forward):
        return None, f"branch {prefix[:-1]!r}: {kinds[1]} after the pooling is not a plain 1x1 Conv2d"
    rest = leaves[2:]
    norm = act = None
    if rest and isinstance(rest[0][1], nn.modules.batchnorm._BatchNorm):
        norm = rest.pop(0)[0]
    if rest and type(rest[0][1]) is nn.ReLU:
        act = rest.pop(0)[0]
    if rest:
        return None, f"branch {prefix[:-1]!r} has {[type(c).__name__ for _, c in rest]} after the conv " \
                     "(only BatchNorm and ReLU are fused)"
    return _Branch(size[0], conv_name, norm, act), ""


def _parse_branches(container: nn.Module, prefix: str, via_pool: bool):
    """Every element of a ModuleList parsed as a branch (`via_pool`: smp's PSPBlock keeps it in `.pool`)."""
    out = []
    for name, el in container.named_children():
        target, p = (getattr(el, "pool", None), f"{prefix}{name}.pool.") if via_pool else (el, f"{prefix}{name}.")
        if not isinstance(target, nn.Module):
            return None, f"{prefix}{name} has no `pool` Sequential"
        br, why = _parse_branch(target, p)
        if br is None:
            return None, why
        out.append(br)
    if not out:
        return None, f"{prefix[:-1]!r} is empty"
    return out, ""


# ------------------------------------------------------------------------------------------------------------------
# The fused replacement of a branch-list PPM.
# ------------------------------------------------------------------------------------------------------------------
class PatchedPyramidPooling(nn.Module):
    """A recognized PPM, fused. Holds the original module's children, parameters and buffers under their original
    names (same state_dict keys); forward(x (N, C, H, W)) -> (N, C + sum R_l, H, W), [x, levels] or [levels, x].

    Equal reduction channels: the fused pool -> ppm_reduce -> upsample_concat (BatchNorm and conv bias folded in eval;
    in training each level's bias, BatchNorm and ReLU run as the module's own small graph on the b x b maps).
    Unequal reduction channels: the fused pooling, then per level the module's own conv/BN/ReLU and
    F.interpolate, concatenated (exact, slower). x-last order: upsample_concat(..., x_last=True) in every backend,
    the adjoints through views of grad_out (pspnet_fast/ops/order.py). The 1x1 weights are restacked on every call
    (pspnet_fast.PyramidPooling caches them for inference; this module does not yet)."""

    def __init__(self, original: nn.Module, branches: list[_Branch], align_corners: bool, x_last: bool,
                 backend: str = "auto", source: str = ""):
        super().__init__()
        for name, p in original._parameters.items():
            self._parameters[name] = p
        for name, b in original._buffers.items():
            self._buffers[name] = b
        for name, c in original._modules.items():
            self._modules[name] = c
        self._non_persistent_buffers_set = set(getattr(original, "_non_persistent_buffers_set", ()))
        self.train(original.training)
        self._branches = branches
        self.bins = tuple(br.bin for br in branches)
        convs = [self.get_submodule(br.conv) for br in branches]
        self.in_channels = convs[0].in_channels
        if any(c.in_channels != self.in_channels for c in convs):
            raise ValueError(f"branch convs take {[c.in_channels for c in convs]} channels, not one C")
        self.reductions = tuple(c.out_channels for c in convs)
        self.reduction_channels = self.reductions[0] if len(set(self.reductions)) == 1 else None
        self.align_corners = bool(align_corners)
        self.x_last = bool(x_last)
        self.backend = ops.check_backend_name(backend)
        self.source = source

    @property
    def out_channels(self) -> int:
        return self.in_channels + sum(self.reductions)

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, in_channels={self.in_channels}, bins={self.bins}, "
                f"reductions={self.reductions}, align_corners={self.align_corners}, x_last={self.x_last}, "
                f"backend={self.backend!r}")

    def _parts(self):
        get = self.get_submodule
        return [(get(br.conv), get(br.norm) if br.norm else None, get(br.act) if br.act else None)
                for br in self._branches]

    def _cat(self, x, levels):
        return torch.cat(levels + [x] if self.x_last else [x] + levels, 1)

    def _reference_forward(self, x):
        """The original modules, as the original forward runs them."""
        size = x.shape[-2:]
        ups = []
        for b, (conv, norm, act) in zip(self.bins, self._parts()):
            y = conv(F.adaptive_avg_pool2d(x, b))
            if norm is not None:
                y = norm(y)
            if act is not None:
                y = act(y)
            ups.append(F.interpolate(y, size, mode="bilinear", align_corners=self.align_corners))
        return self._cat(x, ups)

    def _levels(self, kernels: ops.OpSet, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (N, C, S) -> levels (N, R, S) after the 1x1 convs (+bias), BatchNorm and ReLU, pooled's dtype."""
        parts, C, R, dtype = self._parts(), self.in_channels, self.reduction_channels, pooled.dtype
        weight = torch.stack([conv.weight.reshape(R, C) for conv, _, _ in parts]).to(dtype)  # (L, R, C)
        acts = [act is not None for _, _, act in parts]
        folded = []
        for conv, norm, _ in parts:
            if norm is None:
                scale = torch.ones(R, dtype=dtype, device=pooled.device)
                shift = torch.zeros(R, dtype=dtype, device=pooled.device)
            else:
                fb = _folded_bn(norm, dtype)
                if fb is None:
                    folded = None
                    break
                scale, shift = fb
            if conv.bias is not None:
                shift = shift + conv.bias.to(dtype) * scale
            folded.append((scale, shift))
        if folded is not None and len(set(acts)) == 1:
            return kernels.ppm_reduce(pooled, weight, torch.stack([f[0] for f in folded]),
                                      torch.stack([f[1] for f in folded]), self.bins, acts[0])
        # Training (batch statistics), or ReLU on some levels only: each level's bias, BatchNorm and ReLU as the
        # module's own graph on the small (N, R, b, b) maps.
        y = kernels.ppm_reduce(pooled, weight, None, None, self.bins, False)
        out, off = [], 0
        for b, (conv, norm, act) in zip(self.bins, parts):
            yl = y[:, :, off:off + b * b].reshape(y.shape[0], R, b, b).to(conv.weight.dtype)
            if conv.bias is not None:
                yl = yl + conv.bias.view(1, -1, 1, 1)
            if norm is not None:
                yl = norm(yl)
            if act is not None:
                yl = act(yl)
            out.append(yl.flatten(2))
            off += b * b
        return torch.cat(out, 2).to(dtype)

    def _per_level_forward(self, kernels, x):
        """Unequal reduction channels: fused pooling, then the module's own per-level graph (exact fallback)."""
        pooled = kernels.pyramid_pool(x, self.bins)
        n, c, size = x.shape[0], x.shape[1], x.shape[-2:]
        ups, off = [], 0
        for b, (conv, norm, act) in zip(self.bins, self._parts()):
            y = conv(pooled[:, :, off:off + b * b].reshape(n, c, b, b).to(x.dtype))
            if norm is not None:
                y = norm(y)
            if act is not None:
                y = act(y)
            ups.append(F.interpolate(y, size, mode="bilinear", align_corners=self.align_corners))
            off += b * b
        return self._cat(x, ups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deferred = _heads.take_deferred(self, x)  # armed by the parent of a fused authors' head (interop/heads.py)
        if deferred is not None:
            return deferred
        check_feature_map(x, self.in_channels)
        check_same_device(x, self._parts()[0][0].weight)
        if decompositions.onnx_exporting():  # standard ONNX ops, exact at every size (ops/decompositions.py)
            return decompositions.ppm_module_forward(self, x)
        backend = ops.choose_backend(x, self.backend)
        if backend == "reference":
            return self._reference_forward(x)
        why = fallback_reason(self, x)  # hooks, pruning, parametrizations, forward AD, tracing: the reference
        if why is not None:
            warn_fallback(type(self).__name__, why)
            return self._reference_forward(x)
        ops.ensure_registered(backend)
        kernels = ops.op_set(backend)
        if self.reduction_channels is None:
            return self._per_level_forward(kernels, x)
        params = [p for p in self.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (x.requires_grad or params) and not torch.compiler.is_compiling():
            return _FusedPPMFunction.apply(x, self, kernels, *params)
        pooled = kernels.pyramid_pool(x, self.bins)
        return _order.upsample_concat(kernels, x, self._levels(kernels, pooled), self.bins, self.align_corners,
                                      self.x_last)


# ------------------------------------------------------------------------------------------------------------------
# mmsegmentation's PSPHead: replaced by an instance of a subclass of its own class.
# ------------------------------------------------------------------------------------------------------------------
def _fused_forward_feature(self, inputs):
    x = self._transform_inputs(inputs) if hasattr(self, "_transform_inputs") else inputs
    return self.bottleneck(self.psp_modules(x))  # psp_modules: the fused PPM, cat([x] + levels) in one pass


def _fused_head_forward(self, inputs):
    return self.cls_seg(self._forward_feature(inputs))


_PPM_ONLY = {"forward": _fused_head_forward, "_forward_feature": _fused_forward_feature}
_WITH_HEAD = {"forward": _fused_head_forward, "_forward_feature": _heads.mmseg_forward_feature}


def _patch_mmseg_head(head: nn.Module, backend: str, fuse_head: bool):
    """(new head, "", head note) or (None, reason, None); head note: None (head=False), ("fused", None) or ("skip",
    reason)."""
    if not callable(getattr(head, "cls_seg", None)):
        return None, "PSPHead-like module without cls_seg (dropout -> conv_seg)", None
    ppm = head.psp_modules
    branches, why = _parse_branches(ppm, "", via_pool=False)
    if branches is None:
        return None, why, None
    ac = getattr(head, "align_corners", getattr(ppm, "align_corners", _CONVENTIONS["mmseg"][1]))
    fused_ppm = PatchedPyramidPooling(ppm, branches, ac, x_last=False, backend=backend, source="mmseg PPM")
    note, methods = None, _PPM_ONLY
    if fuse_head:
        head_why = _heads.prove_mmseg(head, fused_ppm)
        note = ("skip", head_why) if head_why else ("fused", None)
        methods = _PPM_ONLY if head_why else _WITH_HEAD
    what = "its PPM and bottleneck" if methods is _WITH_HEAD else "its PPM"
    cls = _heads.fused_class(type(head), methods, what)
    new = cls.__new__(cls)
    new.__dict__ = dict(head.__dict__)
    for d in ("_modules", "_parameters", "_buffers"):
        new.__dict__[d] = dict(head.__dict__[d])
    new._modules["psp_modules"] = fused_ppm
    return new, "", note


# ------------------------------------------------------------------------------------------------------------------
# The walk.
# ------------------------------------------------------------------------------------------------------------------
def _has_pool_branches(m: nn.Module) -> bool:
    return isinstance(m, nn.ModuleList) and len(m) > 0 and all(
        any(isinstance(s, nn.AdaptiveAvgPool2d) for s in el.modules()) for el in m)


def _branch_lists(m: nn.Module) -> list[str]:
    """Names of m's children that are plain ModuleLists of pooling branches (a ModuleList subclass with a forward of
    its own, such as mmseg's PPM, is a module in its own right, not a list)."""
    return [n for n, c in m.named_children() if type(c) is nn.ModuleList and _has_pool_branches(c)]


def _try(m: nn.Module, style: str, backend: str, head: bool = False):
    """(replacement, "", head note) when m is recognized, (None, reason, None) for a candidate left alone, (None,
    None, None) otherwise. The head note (mmseg): ("fused", None), ("skip", reason) or None."""
    if isinstance(m, (FusedPyramidPooling, PatchedPyramidPooling)):
        return None, None, None
    if head and type(m) is RefPSPHead and m.ppm.reduction_channels is not None:
        return FusedPSPHead.from_reference(m, backend=backend), "", ("fused", None)
    if isinstance(m, RefPyramidPooling):
        return FusedPyramidPooling.from_reference(m, backend=backend), "", None
    kids = dict(m.named_children())
    if _has_pool_branches(kids.get("psp_modules")) and "bottleneck" in kids and "conv_seg" in kids:
        if style not in ("auto", "mmseg"):
            return None, f"an mmsegmentation PSPHead, but style={style!r}", None
        return _patch_mmseg_head(m, backend, head)
    return (*_try_branch_list(m, kids, style, backend), None)


def _try_branch_list(m: nn.Module, kids: dict, style: str, backend: str):
    if _has_pool_branches(m):
        if type(m) is nn.ModuleList:
            return None, None  # a plain list: its owner is the candidate
        return None, ("a ModuleList of pooling branches with its own forward returns a list (mmsegmentation's PPM); "
                      "patch the head that concatenates it (a module with psp_modules, bottleneck and conv_seg)")
    lists = _branch_lists(m)
    if not lists:
        return None, None
    if len(lists) != 1:
        return None, f"several branch lists {lists}: which one the forward uses cannot be read off"
    name = lists[0]
    via_pool = all(isinstance(getattr(el, "pool", None), nn.Module) for el in kids[name])
    if style == "auto":
        if name == "features" and not via_pool:
            style_used = "authors"
        elif name == "blocks" and via_pool:
            style_used = "smp"
        else:
            return None, (f"branch list {name!r}: the concatenation order and align_corners cannot be read off; pass "
                          "style='authors' (x first), 'smp' (x last) or 'mmseg'")
    else:
        style_used = style
    branches, why = _parse_branches(kids[name], f"{name}.", via_pool)
    if branches is None:
        return None, why
    x_last, ac_default = _CONVENTIONS[style_used]
    ac = getattr(m, "align_corners", ac_default)
    if not isinstance(ac, bool):
        return None, f"align_corners attribute is {ac!r}, not a bool"
    try:
        return PatchedPyramidPooling(m, branches, ac, x_last, backend=backend,
                                     source=f"{style_used} {type(m).__name__}"), ""
    except ValueError as e:
        return None, str(e)


_VERIFY_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _verify(original: nn.Module, replacement: nn.Module, size: int = 7, batch: int = 2) -> str | None:
    """None when `replacement` computes what `original` does on one small random input, else the reason (a mismatch,
    or an input the check could not build or run). The input: (batch, C, size, size) from the original's C, in its
    parameters' dtype and device (size 7: no bin of (1, 2, 3, 6) divides it); a list of it for a head with `in_index`.
    Both run in eval under no_grad (no BatchNorm statistics move); every module's train/eval mode and the RNG state
    are restored afterwards."""
    param = next(iter(original.parameters()), None)
    channels = getattr(replacement, "in_channels", None)
    if channels is None:  # a whole head (reference PSPHead -> pspnet_fast.PSPHead): its PPM's input channels
        channels = getattr(getattr(replacement, "ppm", None), "in_channels", None)
    if param is None or not isinstance(channels, int):
        return "verify: cannot build a test input (no parameters or no int in_channels)"
    modes = [(m, m.training) for m in (*original.modules(), *replacement.modules())]
    devices = [param.device] if param.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(0)
            x = torch.randn(batch, channels, size, size, dtype=param.dtype, device=param.device)
            inputs = x
            if hasattr(original, "_transform_inputs"):  # an mmsegmentation head: a list of feature maps
                idx = getattr(original, "in_index", -1)
                if not isinstance(idx, int):
                    return f"verify: cannot build a test input for in_index={idx!r}"
                inputs = [x] * (idx + 1 if idx >= 0 else 1)
            original.eval()
            replacement.eval()
            try:
                want = original(inputs)
            except Exception as e:
                return f"verify: the original module fails on a {tuple(x.shape)} {x.dtype} input ({type(e).__name__}: {e})"
            try:
                got = replacement(inputs)
            except Exception as e:
                return f"verify: the fused module fails on a {tuple(x.shape)} {x.dtype} input ({type(e).__name__}: {e})"
    finally:
        for m, mode in modes:
            m.training = mode
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    if len(want) != len(got):
        return f"verify: the fused module returns {len(got)} tensors, the original {len(want)}"
    for w, g in zip(want, got):
        if not isinstance(w, torch.Tensor) or not isinstance(g, torch.Tensor) or w.shape != g.shape:
            return (f"verify: the fused module's output {tuple(getattr(g, 'shape', ()))} differs from the original's "
                    f"{tuple(getattr(w, 'shape', ()))} in shape")
        tol = _VERIFY_TOL.get(w.dtype, 1e-4) * max(1.0, float(w.abs().max()) if w.numel() else 1.0)
        diff = float((w.double() - g.double()).abs().max()) if w.numel() else 0.0
        if not diff <= tol:  # NaN-safe
            return (f"verify: on a random {tuple(x.shape)} input in eval the fused module differs from the original "
                    f"by {diff:.3g} (tolerance {tol:.3g}); e.g. the original's forward may hard-code align_corners "
                    f"or another convention the module's attributes do not show")
    return None


_PROJECT_MODELS = (ProjectPSPNet, LightPSPNet)  # their forward runs psp_head_forward over a fused ppm


def _head_authors(parent: nn.Module, backend: str):
    """The authors' layout (`ppm` then `cls` in the parent's forward): (note, cls name) with note ("fused", None) or
    ("skip", reason); None when the parent is no candidate (no fused ppm + cls pair, or fused already)."""
    ppm, cls = parent._modules.get("ppm"), parent._modules.get("cls")
    if not isinstance(ppm, (FusedPyramidPooling, PatchedPyramidPooling)) or cls is None \
            or isinstance(cls, _heads.PatchedCls):
        return None
    kind, why = _heads.prove_authors(parent, ppm, cls, _PROJECT_MODELS)
    if kind == "project":
        ok = isinstance(ppm, FusedPyramidPooling) and _is_standard_cls(cls)
        return ("fused", None) if ok else ("skip", "pspnet_fast's model with a changed ppm or cls"), "cls"
    if why is None and isinstance(ppm, FusedPyramidPooling):
        # pspnet_fast.PyramidPooling under a parent of the user's: the same children, as the module the parent's
        # forward arms (PatchedPyramidPooling defers to the fused cls).
        branches, why = _parse_branches(ppm.features, "features.", via_pool=False)
        if branches is not None:
            parent._modules["ppm"] = PatchedPyramidPooling(ppm, branches, ppm.align_corners, False,
                                                           backend=ppm.backend, source="authors PyramidPooling")
    if why is not None:
        return ("skip", why), "cls"
    _heads.fuse_authors(parent)
    return ("fused", None), "cls"


def _head_smp(parent: nn.Module):
    """segmentation_models_pytorch's PSPDecoder (`psp` x last, then `conv`): as _head_authors."""
    psp, conv = parent._modules.get("psp"), parent._modules.get("conv")
    if not (isinstance(psp, PatchedPyramidPooling) and psp.x_last) or conv is None or _heads.is_fused_class(parent):
        return None
    why = _heads.prove_smp(parent)
    if why is not None:
        return ("skip", why), "conv"
    parent.__class__ = _heads.fused_class(type(parent), {"forward": _heads.smp_forward}, "its PPM and 1x1 conv")
    return ("fused", None), "conv"


def patch(model: nn.Module, style: str = "auto", backend: str = "auto", head: bool = True,
          verify: bool = True) -> PatchResult:
    """Replaces, in place, every pyramid pooling module (or mmsegmentation PSPHead) of `model` that it recognizes by
    a fused equivalent carrying the same parameters and buffers under the same state_dict keys; with `head` (the
    default), also the convolution that consumes the PPM's output, where the pattern is proven (interop/heads.py):
    the authors' `cls[0..2]` after `ppm` in the parent's forward, mmsegmentation's PSPHead `bottleneck`,
    segmentation_models_pytorch's PSPDecoder `conv`. head=False: the PPM alone.

    style: "auto" reads the convention off the module ("features" list: the authors', x first; "blocks" of PSPBlocks:
    segmentation_models_pytorch, x last; a head with psp_modules/bottleneck/conv_seg: mmsegmentation); "authors",
    "mmseg" or "smp" assume that convention for any module holding one list of pooling branches. backend: the fused
    modules' backend ("auto", "cpu", "cuda", "triton", "reference"). verify (default True): each replacement is run
    once on a small random input in eval, in the module's dtype and device, against the module it replaces (modes and
    RNG state restored, no BatchNorm statistics updated); a mismatch leaves that module in place, with the reason in
    `.skipped`.

    Returns a PatchResult: the list of qualified names replaced, `.heads` = the qualified names of the head modules
    fused with their PPM, `.skipped` = [(name, reason)] for the modules that looked like a PPM but were left alone and
    for the heads left as they are (also logged at INFO on the "pspnet_fast.interop.patching" logger). The root
    module itself is never replaced (it has no parent to be replaced in): use PatchedPyramidPooling or
    pspnet_fast.PyramidPooling.from_reference for a bare PPM."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    ops.check_backend_name(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects an nn.Module, got {type(model).__name__}")
    result = PatchResult()

    def skip(name, why):
        result.skipped.append((name, why))
        log.info("pspnet_fast.patch: skipped %s (%s): %s", name or "<root>", type_of.get(name, "?"), why)

    def note(q, got):
        if got is None:
            return
        (kind, why), name = got
        q = f"{q}.{name}" if q else name
        if kind == "fused":
            result.heads.append(q)
            log.info("pspnet_fast.patch: fused %s with its PPM", q)
        else:
            skip(q, f"head not fused with the PPM: {why}")

    type_of = {}

    def head_step(m: nn.Module, q: str):
        if head:
            note(q, _head_authors(m, backend))
            note(q, _head_smp(m))

    def walk(parent: nn.Module, prefix: str, parent_skipped: bool):
        for name, child in list(parent._modules.items()):
            if child is None or isinstance(child, (FusedPyramidPooling, PatchedPyramidPooling)):
                continue  # already fused
            q = f"{prefix}{name}"
            type_of[q] = type(child).__name__
            new, why, head_note = _try(child, style, backend, head)
            if new is not None and verify:
                why = _verify(child, new)
                new = None if why is not None else new
            if new is not None:
                parent._modules[name] = new
                result.append(q)
                log.info("pspnet_fast.patch: replaced %s (%s) by %s", q, type(child).__name__, type(new).__name__)
                if head_note is not None:
                    note(q, (head_note, "cls" if isinstance(new, FusedPSPHead) else "bottleneck"))
                continue
            # The branch list of a module already reported is not reported again.
            if why is not None and not (parent_skipped and _has_pool_branches(child)):
                skip(q, why)
            walk(child, q + ".", why is not None)
            head_step(child, q)

    type_of[""] = type(model).__name__
    new, why, _ = _try(model, style, backend)
    if new is not None:
        why = ("the root module itself is a PPM: it has no parent to be replaced in; use "
               "pspnet_fast.PyramidPooling.from_reference or PatchedPyramidPooling")
    if why is not None:
        skip("", why)
    if not isinstance(model, (FusedPyramidPooling, PatchedPyramidPooling)):
        walk(model, "", why is not None)
        head_step(model, "")
    return result
