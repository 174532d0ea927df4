"""patch(head=True): the convolution that consumes a fused PPM's output, fused with it (pspnet_fast.nn.head's math).

Per layout, the pattern is proven before anything is changed; what cannot be proven leaves the head as it is (the PPM
is still fused) and says why:

    authors  a parent with children `ppm` and `cls` (Sequential: Conv2d k x k, [BatchNorm], [ReLU], ...) whose own
             forward passes self.ppm's output straight to self.cls, read off its source (`x = self.ppm(x)` [inside an
             `if`], then `x = self.cls(x)` with nothing reading x in between, or `self.cls(self.ppm(...))`).
             `cls` becomes a Sequential subclass with the same children; a forward pre-hook on the parent arms the
             PPM for one call, which then returns a token (`_Deferred`, not a tensor: misuse fails loudly) that
             the new cls turns into the fused head. Outside the parent's forward both run as before.
             pspnet_fast.models.PSPNet / LightPSPNet: their forward already fuses the head (psp_head_forward).
    mmseg    mmsegmentation's own PSPHead class (exact type, imported module), bottleneck = mmcv's own ConvModule
             (conv, norm, act; 3x3 Conv2d; BatchNorm/SyncBatchNorm or none; ReLU or none): `_forward_feature`
             computes conv_head_forward(x, psp_modules, bottleneck.conv, .bn, .activate).
    smp      segmentation_models_pytorch's own PSPDecoder (exact type), psp = PSPModule, conv = Conv2dReLU (1x1
             Conv2d, BatchNorm or Identity, ReLU): forward = dropout(conv_head_forward(x, psp, conv...)).
A module in the bypassed chain with forward hooks is not fused (hooks would not run); nor is one with a forward
attribute of its own. Classes are changed in place (`__class__`) to a subclass of their own class that adds only a
forward: every attribute, method and state_dict key stays.
"""
from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import threading

import torch
from torch import nn
from torch.nn.modules import module as _torch_module  # its global hook registries, read only

from ..nn.head import conv_head_forward, conv_kernel_size

__all__ = ["take_deferred", "prove_authors", "fuse_authors", "prove_mmseg", "prove_smp", "fused_class",
           "is_fused_class", "PatchedCls"]

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _known(module: str, name: str):
    """The class `name` of an imported module (None when the module was never imported: then no instance of it
    exists either)."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _bn_type_ok(m: nn.Module) -> bool:
    return type(m) in _BN_TYPES or type(m) is _known("mmengine.utils.dl_utils.parrots_wrapper", "SyncBatchNorm")


def _hooked(*mods: nn.Module) -> str | None:
    for m in mods:
        if m is None:
            continue
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return f"{type(m).__name__} has forward hooks or an instance forward (the fused head would skip them)"
    return None


def _global_hooks() -> bool:
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


def _head_parts(conv, norm, act, in_channels: int, kernel: tuple = (1, 3)) -> str | None:
    """Why conv -> norm -> act is not a head conv_head_forward fuses over a PPM of `in_channels` outputs, or None."""
    k = conv_kernel_size(conv)
    if k is None or k not in kernel:
        return f"{type(conv).__name__} is not a plain Conv2d of kernel {' or '.join(map(str, kernel))} ('same' padding)"
    if conv.in_channels != in_channels:
        return f"the conv takes {conv.in_channels} channels, the PPM gives {in_channels}"
    if norm is not None and not _bn_type_ok(norm):
        return f"{type(norm).__name__} after the conv (only BatchNorm2d / SyncBatchNorm are fused)"
    if act is not None and type(act) is not nn.ReLU:
        return f"{type(act).__name__} after the conv (only ReLU is fused)"
    return _hooked(conv, norm, act)


# ------------------------------------------------------------------------------------------------------------------
# The authors' layout: a token from the armed PPM to the patched cls, inside the parent's forward only.
# ------------------------------------------------------------------------------------------------------------------
_ARMED = threading.local()  # .ids: ids of PPMs whose next call (this thread) returns a _Deferred


class _Deferred:
    """What an armed PPM returns in place of its (N, C + L * R, H, W) concatenation: x and the PPM."""

    __slots__ = ("x", "ppm")

    def __init__(self, x, ppm):
        self.x, self.ppm = x, ppm


def take_deferred(ppm: nn.Module, x: torch.Tensor):
    """Called first in PatchedPyramidPooling.forward: a _Deferred when the parent armed this PPM for this call
    (one-shot), else None."""
    ids = getattr(_ARMED, "ids", None)
    if not ids or id(ppm) not in ids:
        return None
    ids.discard(id(ppm))
    return _Deferred(x, ppm)


class _Arm:
    """Forward pre-hook (arm) and always-called forward hook (disarm) on the parent of an authors' head."""

    def __init__(self, ppm_name: str, cls_name: str, arm: bool):
        self.ppm_name, self.cls_name, self.arm = ppm_name, cls_name, arm

    def __call__(self, module, args, *rest):
        ppm, cls = module._modules.get(self.ppm_name), module._modules.get(self.cls_name)
        if ppm is None or not isinstance(cls, PatchedCls):
            return None
        if not hasattr(_ARMED, "ids"):
            _ARMED.ids = set()
        if not self.arm:
            _ARMED.ids.discard(id(ppm))
        elif not (_hooked(ppm, cls, *cls.head_modules()) or _global_hooks()):
            _ARMED.ids.add(id(ppm))
        return None


class PatchedCls(nn.Sequential):
    """The authors' `cls` (same children and keys); given the armed PPM's token, its first `len(_head)` modules (conv,
    [BatchNorm], [ReLU]) run as conv_head_forward over x, the rest as they are; given a tensor, a plain Sequential."""

    head_len: int = 0

    def head_modules(self) -> list:
        return list(self)[:self.head_len]

    def forward(self, input):
        if not isinstance(input, _Deferred):
            return super().forward(input)
        conv, *rest = self.head_modules()
        norm = next((m for m in rest if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
        act = next((m for m in rest if isinstance(m, nn.ReLU)), None)
        y = conv_head_forward(input.x, input.ppm, conv, norm, act, input.ppm.backend)
        for m in list(self)[self.head_len:]:
            y = m(y)
        return y


def _cls_head(cls: nn.Module) -> tuple:
    """cls's leading (conv, [BatchNorm], [ReLU]) modules."""
    mods = list(cls)
    head = mods[:1]
    if len(mods) > len(head) and isinstance(mods[len(head)], nn.modules.batchnorm._BatchNorm):
        head.append(mods[len(head)])
    if len(mods) > len(head) and isinstance(mods[len(head)], nn.ReLU):
        head.append(mods[len(head)])
    return tuple(head)


def _forward_source_proof(cls_type: type, ppm_name: str, cls_name: str) -> str | None:
    """Why the class's forward cannot be shown to pass self.<ppm>'s output straight to self.<cls>, or None."""
    fn = cls_type.forward
    if fn is nn.Module.forward or not inspect.isfunction(fn):
        return f"{cls_type.__name__}.forward is not a plain function"
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return f"the source of {cls_type.__name__}.forward cannot be read"
    f = tree.body[0] if tree.body else None
    if not isinstance(f, ast.FunctionDef) or f.decorator_list or not f.args.args:
        return f"{cls_type.__name__}.forward is decorated or not a method"
    me = f.args.args[0].arg
    parents = {c: p for p in ast.walk(f) for c in ast.iter_child_nodes(p)}
    uses = {ppm_name: [], cls_name: []}
    for node in ast.walk(f):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == me \
                and node.attr in uses:
            uses[node.attr].append(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr"):
            return f"{cls_type.__name__}.forward uses {node.func.id}(): its use of the PPM cannot be read off"
    calls = {}
    for name, nodes in uses.items():
        call = parents.get(nodes[0]) if len(nodes) == 1 else None
        if not (isinstance(call, ast.Call) and call.func is nodes[0] and len(call.args) == 1 and not call.keywords
                and not isinstance(call.args[0], ast.Starred)):
            return f"{cls_type.__name__}.forward uses self.{name} {len(nodes)} times, not in one call of one argument"
        calls[name] = call
    ppm_call, cls_call = calls[ppm_name], calls[cls_name]
    if cls_call.args[0] is ppm_call:
        return None  # self.cls(self.ppm(...))
    s1 = parents.get(ppm_call)
    if not (isinstance(s1, ast.Assign) and len(s1.targets) == 1 and isinstance(s1.targets[0], ast.Name)):
        return f"{cls_type.__name__}.forward does not assign self.{ppm_name}(...) to a name"
    v = s1.targets[0].id
    block_owner = parents.get(s1)
    if isinstance(block_owner, ast.If) and block_owner.body == [s1] and not block_owner.orelse:
        s1, block_owner = block_owner, parents.get(block_owner)  # `if self.use_ppm: x = self.ppm(x)`
    block = next((b for b in (getattr(block_owner, "body", None), getattr(block_owner, "orelse", None))
                  if isinstance(b, list) and s1 in b), None)
    s2 = parents.get(cls_call)
    ok2 = (isinstance(cls_call.args[0], ast.Name) and cls_call.args[0].id == v and block is not None and s2 in block
           and (isinstance(s2, ast.Return) or (isinstance(s2, ast.Assign) and len(s2.targets) == 1
                                                 and isinstance(s2.targets[0], ast.Name) and s2.targets[0].id == v)))
    if not ok2 or block.index(s2) <= block.index(s1):
        return (f"{cls_type.__name__}.forward does not pass self.{ppm_name}'s output straight to self.{cls_name} "
                f"(`{v} = self.{cls_name}({v})` or `return self.{cls_name}({v})` after it, in the same block)")
    for stmt in block[block.index(s1) + 1:block.index(s2)]:
        if any(isinstance(n, ast.Name) and n.id == v for n in ast.walk(stmt)):
            return f"{cls_type.__name__}.forward reads or writes {v!r} between self.{ppm_name} and self.{cls_name}"
    return None


def prove_authors(parent: nn.Module, ppm: nn.Module, cls: nn.Module, project_types: tuple) -> tuple[str, str | None]:
    """("project", None): the parent is pspnet_fast's own model (its forward fuses the head already); ("authors",
    None): proven, fuse_authors applies; (_, reason) otherwise."""
    if type(parent) in project_types:
        return "project", None
    if type(cls) is not nn.Sequential or len(cls) == 0:
        return "", f"cls is a {type(cls).__name__}, not a Sequential starting with the conv"
    if getattr(ppm, "reduction_channels", None) is None:
        return "", "per-level reduction channels: only equal ones are fused with the conv"
    head = _cls_head(cls)
    norm = next((m for m in head[1:] if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    act = next((m for m in head[1:] if isinstance(m, nn.ReLU)), None)
    why = _head_parts(head[0], norm, act, ppm.out_channels) or _hooked(cls)
    if why is None and "forward" in parent.__dict__:
        why = f"{type(parent).__name__} has an instance forward"
    if why is None and (type(parent).__call__ is not nn.Module.__call__ or type(parent)._call_impl
                        is not nn.Module._call_impl):
        why = f"{type(parent).__name__} overrides __call__"
    if why is None:
        why = _forward_source_proof(type(parent), "ppm", "cls") or _other_methods_use(type(parent), "ppm")
    return "authors", why


def _other_methods_use(cls_type: type, attr: str) -> str | None:
    """A method of the user's classes (other than forward and __init__) that reads self.<attr>: it could call the
    PPM inside the armed forward and receive the token."""
    for klass in cls_type.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return f"the source of {klass.__name__} cannot be read"
        for f in ast.walk(tree):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name not in ("forward", "__init__"):
                if any(isinstance(n, ast.Attribute) and n.attr == attr and isinstance(n.ctx, ast.Load)
                       for n in ast.walk(f)):
                    return f"{klass.__name__}.{f.name} uses .{attr} too"
    return None


def fuse_authors(parent: nn.Module) -> None:
    """In place: parent.cls -> PatchedCls (same children), arm/disarm hooks on the parent (once)."""
    cls = parent._modules["cls"]
    if not isinstance(cls, PatchedCls):
        n = len(_cls_head(cls))
        cls.__class__ = PatchedCls
        cls.head_len = n
    if not any(isinstance(h, _Arm) for h in parent._forward_pre_hooks.values()):
        parent.register_forward_pre_hook(_Arm("ppm", "cls", True))
        parent.register_forward_hook(_Arm("ppm", "cls", False), always_call=True)


# ------------------------------------------------------------------------------------------------------------------
# mmsegmentation PSPHead and segmentation_models_pytorch PSPDecoder: known classes.
# ------------------------------------------------------------------------------------------------------------------
def prove_mmseg(head: nn.Module, ppm: nn.Module) -> str | None:
    """Why the head's bottleneck cannot be fused with its (fused) psp_modules, or None."""
    known = _known("mmseg.models.decode_heads.psp_head", "PSPHead")
    if known is None or type(head) is not known:
        return f"{type(head).__qualname__} is not mmsegmentation's PSPHead (mmseg.models.decode_heads.psp_head)"
    if "forward" in head.__dict__ or "_forward_feature" in head.__dict__:
        return "the head has an instance forward"
    b = head.bottleneck
    if type(b) is not _known("mmcv.cnn.bricks.conv_module", "ConvModule"):
        return f"bottleneck is a {type(b).__qualname__}, not mmcv's ConvModule"
    if tuple(b.order) != ("conv", "norm", "act") or b.with_explicit_padding:
        return f"bottleneck order {b.order} / explicit padding: not conv -> norm -> act"
    if getattr(ppm, "reduction_channels", None) is None:
        return "per-level reduction channels: only equal ones are fused with the conv"
    return _head_parts(b.conv, b.norm if b.with_norm else None, b.activate if b.with_activation else None,
                       ppm.out_channels, (3,)) or _hooked(b)


def mmseg_forward_feature(self, inputs):
    """mmsegmentation PSPHead._forward_feature with the bottleneck fused: bottleneck(cat([x] + PPM(x)))."""
    x = self._transform_inputs(inputs)
    b = self.bottleneck
    if _hooked(b, b.conv, b.norm if b.with_norm else None, b.activate if b.with_activation else None) \
            or _global_hooks():
        return b(self.psp_modules(x))
    return conv_head_forward(x, self.psp_modules, b.conv, b.norm if b.with_norm else None,
                             b.activate if b.with_activation else None, self.psp_modules.backend)


def prove_smp(decoder: nn.Module) -> str | None:
    """Why an smp PSPDecoder's conv cannot be fused with its (already fused) psp, or None."""
    known = _known("segmentation_models_pytorch.decoders.pspnet.decoder", "PSPDecoder")
    if known is None or type(decoder) is not known:
        return (f"{type(decoder).__qualname__} is not segmentation_models_pytorch's PSPDecoder "
                "(segmentation_models_pytorch.decoders.pspnet.decoder)")
    if "forward" in decoder.__dict__:
        return "the decoder has an instance forward"
    conv, psp = decoder.conv, decoder.psp
    if type(conv) is not _known("segmentation_models_pytorch.base.modules", "Conv2dReLU") or len(conv) != 3:
        return f"decoder.conv is a {type(conv).__qualname__}, not smp's Conv2dReLU"
    if getattr(psp, "reduction_channels", None) is None or not getattr(psp, "x_last", False):
        return "decoder.psp is not a fused x-last PPM with equal reduction channels"
    norm = None if type(conv[1]) is nn.Identity else conv[1]
    return _head_parts(conv[0], norm, conv[2], psp.out_channels, (1,)) or _hooked(conv, decoder.dropout)


def smp_forward(self, *args, **kwargs):
    """smp PSPDecoder.forward (features: a list, 0.6; or *features, older) with psp -> conv fused."""
    feats = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    c = self.conv
    if kwargs or not feats or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or _hooked(c, *c) \
            or _global_hooks():
        return super(type(self), self).forward(*args, **kwargs)
    y = conv_head_forward(feats[-1], self.psp, c[0], None if type(c[1]) is nn.Identity else c[1], c[2],
                          self.psp.backend)
    return self.dropout(y)


_CLASSES: dict[tuple, type] = {}


def is_fused_class(m: nn.Module) -> bool:
    return type(m) in _CLASSES.values()


def fused_class(cls: type, methods: dict, what: str) -> type:
    """A subclass of `cls` adding `methods` (one per (cls, methods) pair, so that patched instances share it)."""
    key = (cls, tuple(sorted((k, id(v)) for k, v in methods.items())))
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Fused{cls.__name__}", (cls,), {
            **methods, "__doc__": f"{cls.__qualname__} with {what} fused by pspnet_fast.patch (same keys, same outputs)."})
    return _CLASSES[key]
