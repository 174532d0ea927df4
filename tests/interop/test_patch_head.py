"""patch(head=True) on look-alikes and this project's modules: the conv after the PPM fused with it where the parent's
forward proves the pattern (the authors' layout), left as it is with the reason otherwise; conv_head_forward (kernel 1
and 3, x first and last, conv bias, BatchNorm or none, ReLU or none) against the modules it replaces. The real
mmsegmentation and segmentation_models_pytorch are in test_peers.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pspnet_fast
from pspnet_fast.interop.heads import PatchedCls
from pspnet_fast.interop.patching import PatchedPyramidPooling
from pspnet_fast.nn.head import conv_head_forward
from pspnet_fast.ops.backends import _why_not_machine

from . import lookalikes as la
from .test_patch import _close, _outputs

needs_cpu_ext = pytest.mark.skipif(_why_not_machine("cpu") is not None, reason="extension not built")


def _graph(t):
    """Names of the autograd nodes behind t."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo += [g for g, _ in f.next_functions]
    return {type(f).__name__ for f in seen}


def _check_same(model, patched, x, train, grads=True):
    """test_patch._check_same, where a parameter unused in this mode (the aux head in eval) has no gradient in
    either model."""
    if grads:
        model, patched, x = model.double(), patched.double(), x.double()
    results = []
    for m in (model, patched):
        m.train(train)
        xi = x.clone().requires_grad_(grads)
        torch.manual_seed(1)
        outs = _outputs(m(xi))
        if grads:
            g = torch.Generator().manual_seed(2)
            sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs).backward()
        results.append((outs, xi.grad, {k: v.grad for k, v in m.named_parameters()}, m.state_dict()))
    (o1, gx1, gp1, sd1), (o2, gx2, gp2, sd2) = results
    for a, b in zip(o2, o1):
        _close(a, b)
    if grads:
        _close(gx2, gx1)
        assert gp1.keys() == gp2.keys()
        for k in gp1:
            assert (gp1[k] is None) == (gp2[k] is None), k
            if gp1[k] is not None:
                _close(gp2[k], gp1[k])
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        if sd1[k].is_floating_point():
            _close(sd2[k], sd1[k])
        else:
            assert torch.equal(sd2[k], sd1[k]), k


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor every ATen or pspnet_fast op returns (torch.cat, upsample_concat, ...)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [(str(func), tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def concatenations(fn, n, channels, hw):
    """The ops of fn() that return an (n, channels, *hw) tensor: the PPM's concatenation."""
    with Shapes() as spy, torch.no_grad():
        fn()
    return [f for f, s in spy.shapes if s == (n, channels, *hw)]


class AuthorsPSPNet(nn.Module):
    """The control flow of hszhao/semseg model/pspnet.py PSPNet.forward (use_ppm, zoom, aux in training), on a small
    stand-in backbone."""

    def __init__(self, c=16, classes=5, use_ppm=True, zoom_factor=8):
        super().__init__()
        self.zoom_factor, self.use_ppm = zoom_factor, use_ppm
        self.layer0 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        fea_dim = c
        if use_ppm:
            self.ppm = la.AuthorsPPM(c, c // 4, (1, 2, 3, 6))
            fea_dim *= 2
        self.cls = nn.Sequential(nn.Conv2d(fea_dim, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                 nn.ReLU(inplace=True), nn.Dropout2d(p=0.1), nn.Conv2d(8, classes, kernel_size=1))
        self.aux = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                 nn.Dropout2d(p=0.1), nn.Conv2d(4, classes, kernel_size=1))

    def forward(self, x, y=None):
        x_size = x.size()
        h, w = x_size[2], x_size[3]
        x = self.layer0(x)
        x_tmp = self.layer3(x)
        x = self.layer4(x_tmp)
        if self.use_ppm:
            x = self.ppm(x)
        x = self.cls(x)
        if self.zoom_factor != 1:
            x = F.interpolate(x, size=(h, w), mode='bilinear', align_corners=True)
        if self.training:
            aux = self.aux(x_tmp)
            return x, aux
        return x


class ReadsBetween(AuthorsPSPNet):
    def forward(self, x, y=None):
        x = self.layer4(self.layer3(self.layer0(x)))
        x = self.ppm(x)
        s = x.mean()
        x = self.cls(x)
        return x + s


class TwoUses(AuthorsPSPNet):
    def forward(self, x, y=None):
        x = self.ppm(self.layer4(self.layer3(self.layer0(x))))
        return self.cls(x), x


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_authors_forward_fused(backend, train):
    if backend == "cpu" and _why_not_machine("cpu") is not None:
        pytest.skip("extension not built")
    model = la.randomize_bn(AuthorsPSPNet())
    patched = copy.deepcopy(model)
    names = pspnet_fast.patch(patched, backend=backend)
    assert names == ["ppm"] and names.heads == ["cls"] and names.skipped == []
    assert isinstance(patched.ppm, PatchedPyramidPooling) and isinstance(patched.cls, PatchedCls)
    assert list(patched.state_dict()) == list(model.state_dict())
    _check_same(model, patched, torch.randn(2, 3, 9, 7), train)


@needs_cpu_ext
def test_authors_no_concatenation_in_eval():
    model = la.randomize_bn(AuthorsPSPNet()).eval()
    patched = copy.deepcopy(model)
    pspnet_fast.patch(patched)
    x = torch.randn(1, 3, 9, 7)
    assert concatenations(lambda: model(x), 1, 32, (9, 7))  # the spy sees the original's concatenation
    assert concatenations(lambda: patched(x), 1, 32, (9, 7)) == []
    assert concatenations(lambda: pspnet_fast.patch(copy.deepcopy(model), head=False) and None, 1, 32, (9, 7)) == []
    ppm_only = copy.deepcopy(model)
    pspnet_fast.patch(ppm_only, head=False)
    assert concatenations(lambda: ppm_only(x), 1, 32, (9, 7))
    # outside the parent's forward the PPM and cls are what they were
    with torch.no_grad():
        _close(patched.ppm(model.layer4(model.layer3(model.layer0(x)))),
               model.ppm(model.layer4(model.layer3(model.layer0(x)))))
        f = torch.randn(1, 32, 5, 4)
        _close(patched.cls(f), model.cls(f))


def test_head_false_and_idempotent():
    model = la.randomize_bn(AuthorsPSPNet())
    patched = copy.deepcopy(model)
    names = pspnet_fast.patch(patched, head=False)
    assert names == ["ppm"] and names.heads == [] and type(patched.cls) is nn.Sequential
    assert not patched._forward_pre_hooks
    names = pspnet_fast.patch(patched)  # the head now
    assert names == [] and names.heads == ["cls"] and len(patched._forward_pre_hooks) == 1
    again = pspnet_fast.patch(patched)
    assert again == [] and again.heads == [] and again.skipped == [] and len(patched._forward_pre_hooks) == 1
    _check_same(model, patched, torch.randn(2, 3, 6, 6), False)


class HelperUsesPPM(AuthorsPSPNet):
    def levels(self, x):
        return self.ppm(x)


@pytest.mark.parametrize("cls_", [ReadsBetween, TwoUses, HelperUsesPPM])
def test_unproven_forward_keeps_head(cls_):
    model = la.randomize_bn(cls_())
    patched = copy.deepcopy(model)
    names = pspnet_fast.patch(patched)
    assert names == ["ppm"] and names.heads == [] and type(patched.cls) is nn.Sequential
    (name, why), = names.skipped
    assert name == "cls" and "head not fused" in why
    _check_same(model, patched, torch.randn(2, 3, 6, 7), True)
    _check_same(model, patched, torch.randn(2, 3, 6, 7), False)


def test_unprovable_cls_reasons():
    m = AuthorsPSPNet()
    m.cls[1] = nn.GroupNorm(2, 8)  # not BatchNorm: the conv alone would be the head
    m.cls[0] = nn.Conv2d(32, 8, 5, padding=2, bias=False)
    names = pspnet_fast.patch(m)
    assert names.heads == [] and "kernel" in dict(names.skipped)["cls"]
    m = AuthorsPSPNet()
    m.cls[0].register_forward_hook(lambda *a: None)
    assert "hooks" in dict(pspnet_fast.patch(m).skipped)["cls"]
    m = AuthorsPSPNet()
    m.ppm = la.AuthorsPPM(16, 4, (1, 2, 3, 6), reductions=[4, 4, 4, 4])
    m.ppm.features[0][1] = nn.Conv2d(16, 4, 1, bias=False)
    names = pspnet_fast.patch(copy.deepcopy(m))
    assert names.heads == ["cls"]


def test_hooks_added_after_patching_run():
    model = la.randomize_bn(AuthorsPSPNet()).eval()
    patched = copy.deepcopy(model)
    pspnet_fast.patch(patched)
    seen = []
    patched.cls[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    x = torch.randn(1, 3, 5, 6)
    with torch.no_grad():
        _close(patched(x), model(x))
    assert seen == [(1, 32, 5, 6)]  # the fused path stood aside: the hook saw the concatenation


def test_exception_in_forward_disarms():
    model = AuthorsPSPNet().eval()
    pspnet_fast.patch(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 4, 5, 5))  # layer0 refuses 4 channels, after the PPM was armed
    f = torch.randn(1, 16, 5, 5)
    assert isinstance(model.ppm(f), torch.Tensor)


def test_project_models_and_reference_head():
    from pspnet_fast.models.light import LightPSPNet
    from pspnet_fast.reference import PSPHead as RefHead

    model = LightPSPNet(18, num_classes=3, width=8, fused=False)
    names = pspnet_fast.patch(model)
    assert names == ["ppm"] and names.heads == ["cls"] and type(model.ppm) is pspnet_fast.PyramidPooling
    ref = la.randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 1), RefHead(16, 3, dropout=0.0)))
    patched = copy.deepcopy(ref)
    names = pspnet_fast.patch(patched)
    assert names == ["1"] and names.heads == ["1.cls"] and type(patched[1]) is pspnet_fast.PSPHead
    _check_same(ref, patched, torch.randn(2, 3, 7, 5), True)


def _ppm_pair(x_last, c=8):
    """(original PPM, its PatchedPyramidPooling): the smp look-alike (x last; bin-1 conv with bias, no BatchNorm) or
    the authors' (x first)."""
    ppm = la.PSPModule(c) if x_last else la.AuthorsPPM(c, c // 4, (1, 2, 3, 6))
    la.randomize_bn(ppm)
    holder = nn.ModuleDict({"p": copy.deepcopy(ppm)})
    pspnet_fast.patch(holder, style="smp" if x_last else "authors")
    assert isinstance(holder["p"], PatchedPyramidPooling)
    return ppm, holder["p"]


@needs_cpu_ext
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("x_last", [False, True], ids=["xfirst", "xlast"])
@pytest.mark.parametrize("parts", ["bn-relu", "bias-relu", "bias", "bn"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (2, 9)], ids=str)
def test_conv_head_forward(k, x_last, parts, train, hw):
    torch.manual_seed(0)
    ppm, fused = _ppm_pair(x_last)
    conv = nn.Conv2d(16, 6, k, padding=k // 2, bias="bias" in parts)
    norm = la.randomize_bn(nn.BatchNorm2d(6)) if "bn" in parts else None
    act = nn.ReLU(inplace=True) if "relu" in parts else None
    mods = nn.ModuleList([ppm, conv] + [m for m in (norm, act) if m is not None]).double().train(train)
    fmods = nn.ModuleList([fused, conv, norm, act]).double().train(train)
    fmods_copy = copy.deepcopy(nn.ModuleList([fused, conv, norm, act]))
    del fmods
    fused, conv2, norm2, act2 = fmods_copy.double().train(train)
    x = torch.randn(2, 8, *hw, dtype=torch.float64)
    outs = []
    for run in ("original", "fused"):
        xi = x.clone().requires_grad_(True)
        if run == "original":
            y = xi
            for m in mods:
                y = m(y)
            params = list(mods.parameters())
        else:
            y = conv_head_forward(xi, fused, conv2, norm2, act2)
            params = list(fmods_copy.parameters())
            assert "_FusedHeadFunctionBackward" in _graph(y)  # the fused node, not the modules' fallback
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
        grads = torch.autograd.grad((y * g).sum(), [xi] + params, allow_unused=True)
        outs.append((y.detach(), grads))
    (y1, g1), (y2, g2) = outs
    _close(y2, y1)
    assert len(g1) == len(g2)
    for a, b in zip(g2, g1):
        if b is None:
            assert a is None or not a.abs().max()
        else:
            _close(a, b)
    if norm is not None:
        _close(norm2.running_mean, norm.running_mean)
        _close(norm2.running_var, norm.running_var)


@needs_cpu_ext
@pytest.mark.parametrize("k", [1, 3])
def test_conv_head_forward_eval_float32_no_concatenation(k):
    ppm, fused = _ppm_pair(True, c=12)
    conv = nn.Conv2d(24, 5, k, padding=k // 2, bias=False)
    norm = la.randomize_bn(nn.BatchNorm2d(5)).eval()
    act = nn.ReLU()
    ppm.eval(), fused.eval()
    x = torch.randn(1, 12, 6, 5).to(memory_format=torch.channels_last)
    with torch.no_grad():
        _close(conv_head_forward(x, fused, conv, norm, act), act(norm(conv(ppm(x)))))
    assert concatenations(lambda: act(norm(conv(ppm(x)))), 1, 24, (6, 5))
    assert concatenations(lambda: conv_head_forward(x, fused, conv, norm, act), 1, 24, (6, 5)) == []
