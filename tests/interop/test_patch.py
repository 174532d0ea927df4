"""pspnet_fast.patch on look-alikes of the authors', mmsegmentation's and smp's PSPNets: same outputs (eval and
training), same gradients and BatchNorm statistics, same state_dict keys, skipped modules reported."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pspnet_fast
from pspnet_fast import ops
from pspnet_fast.interop.patching import PatchedPyramidPooling
from pspnet_fast.ops.backends import _why_not_machine

from . import lookalikes as la

BACKENDS = ["cpu", "reference"]


def _close(a, b, tol=None):
    """float32: 1e-5 of max|b| (+1e-6); float64: 1e-10 (gradients through training BatchNorm on 1x1 and 2x2 maps of
    a batch of 2 are ill-conditioned: float32 rounding of the conv output alone moves them by ~1e-4)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if tol is None:
        tol = 1e-10 if a.dtype == torch.float64 else 1e-5
    scale = b.abs().max().item() if b.numel() else 0.0
    assert (a - b).abs().max().item() <= tol * scale + tol / 10


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check_same(model, patched, x, train, grads=True):
    """Forward (seeded: dropout), backward of a fixed projection; outputs, input and parameter gradients and BatchNorm
    running statistics must agree. With gradients, in float64 (see _close)."""
    if grads:
        model, patched, x = model.double(), patched.double(), x.double()
    model.train(train)
    patched.train(train)
    results = []
    for m in (model, patched):
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
            _close(gp2[k], gp1[k])
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        if sd1[k].is_floating_point():
            _close(sd2[k], sd1[k])
        else:
            assert torch.equal(sd2[k], sd1[k]), k


def _patched(model, **kw):
    patched = copy.deepcopy(model)
    names = pspnet_fast.patch(patched, **kw)
    return patched, names


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_authors(backend, train):
    model = la.randomize_bn(la.AuthorsNet())
    patched, names = _patched(model, backend=backend)
    assert names == ["ppm"] and isinstance(patched.ppm, PatchedPyramidPooling)
    assert patched.ppm.bins == (1, 2, 3, 6) and patched.ppm.align_corners and not patched.ppm.x_last
    _check_same(model, patched, torch.randn(2, 3, 7, 9), train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_authors_channels_last_and_no_grad(train):
    model = la.randomize_bn(la.AuthorsNet())
    patched, _ = _patched(model)
    x = torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last)
    with torch.no_grad():
        _check_same(model, patched, x, train, grads=False)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_authors_per_level_reduction(train):
    model = la.randomize_bn(la.AuthorsNet(reductions=[2, 3, 4, 5]))
    patched, names = _patched(model)
    assert names == ["ppm"] and patched.ppm.reductions == (2, 3, 4, 5) and patched.ppm.reduction_channels is None
    _check_same(model, patched, torch.randn(2, 3, 7, 6), train)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("align_corners", [False, True], ids=["noac", "ac"])
def test_mmseg_head(backend, train, align_corners):
    model = la.randomize_bn(la.EncoderDecoder(align_corners=align_corners))
    patched, names = _patched(model, backend=backend)
    assert names == ["decode_head"]  # the FCN auxiliary head has no PPM
    head = patched.decode_head
    assert isinstance(head, la.PSPHead) and type(head) is not la.PSPHead
    assert isinstance(head.psp_modules, PatchedPyramidPooling) and head.psp_modules.align_corners == align_corners
    assert callable(head.loss_by_feat) and head.in_index == 1
    _check_same(model, patched, torch.randn(2, 3, 8, 7), train)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_smp(backend, train):
    model = la.randomize_bn(la.SmpNet())
    patched, names = _patched(model, backend=backend)
    assert names == ["decoder.psp"] and patched.decoder.psp.x_last
    # the bin-1 branch: conv with bias, no BatchNorm
    assert patched.decoder.psp._branches[0].norm is None
    assert "decoder.psp.blocks.0.pool.1.0.bias" in patched.state_dict()
    _check_same(model, patched, torch.randn(2, 3, 7, 8), train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_smp_channels_last_grads(train):
    model = la.randomize_bn(la.SmpNet())
    patched, _ = _patched(model)
    _check_same(model, patched, torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last), train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_smp_rotation_fallback(train, monkeypatch):
    """The paths of backends without native x-last support: forward rotated, adjoints through the levels-only and x
    views of grad_out (what the CUDA and Triton adjoints run); here with the CPU kernels."""
    from pspnet_fast.ops import order as _order

    monkeypatch.setattr(_order, "native_x_last", lambda kernels, x: False)
    monkeypatch.setattr(_order, "_cpu_ops", lambda kernels, t: False)
    model = la.randomize_bn(la.SmpNet())
    patched, _ = _patched(model)
    _check_same(model, patched, torch.randn(2, 3, 6, 7), train)
    _check_same(model, patched, torch.randn(2, 3, 6, 7).to(memory_format=torch.channels_last), train)


def test_smp_channels_last_eval():
    model = la.randomize_bn(la.SmpNet()).eval()
    patched, _ = _patched(model)
    x = torch.randn(1, 3, 5, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        _close(patched(x), model(x))


def test_reference_module_replaced():
    from pspnet_fast.reference import PyramidPooling as RefPPM

    model = nn.Sequential(nn.Conv2d(3, 8, 1), RefPPM(8, (1, 2)))
    patched, names = _patched(model)
    assert names == ["1"] and type(patched[1]) is pspnet_fast.PyramidPooling
    _check_same(model, patched, torch.randn(2, 3, 5, 5), True)
    again = pspnet_fast.patch(patched)
    assert again == [] and again.skipped == []  # already fused: nothing to do, nothing reported


def test_state_dict_round_trip():
    for model in (la.AuthorsNet(), la.EncoderDecoder(), la.SmpNet()):
        original_sd = copy.deepcopy(la.randomize_bn(model, seed=3).state_dict())
        patched = copy.deepcopy(model)
        for p in patched.parameters():
            p.data.zero_()
        pspnet_fast.patch(patched)
        assert list(patched.state_dict()) == list(original_sd)
        patched.load_state_dict(original_sd, strict=True)
        model.load_state_dict(patched.state_dict(), strict=True)
        x = torch.randn(1, 3, 6, 6)
        with torch.no_grad():
            for a, b in zip(_outputs(patched.eval()(x)), _outputs(model.eval()(x))):
                _close(a, b)


class _Stages(nn.Module):
    """A PPM under another attribute name, x last: which convention it follows cannot be read off."""

    def __init__(self, c=8):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(c, 2, 1, bias=False),
                                                  nn.BatchNorm2d(2), nn.ReLU()) for b in (1, 2, 4))

    def forward(self, x):
        return torch.cat([F.interpolate(s(x), x.shape[-2:], mode="bilinear", align_corners=True)
                          for s in self.stages] + [x], 1)


class _Leaky(la.AuthorsPPM):
    def __init__(self):
        super().__init__(8, 2, (1, 2))
        for f in self.features:
            f[3] = nn.LeakyReLU()


def test_skipped_reported_and_style_override(caplog):
    model = nn.ModuleDict({"a": _Stages(), "b": _Leaky()})
    with caplog.at_level(logging.INFO, logger="pspnet_fast.interop.patching"):
        names = pspnet_fast.patch(copy.deepcopy(model))
    assert names == []
    skipped = dict(names.skipped)
    assert list(skipped) == ["a", "b"]  # each once: not again as their branch lists a.stages, b.features
    assert "style=" in skipped["a"] and "LeakyReLU" in skipped["b"]
    assert "skipped a" in caplog.text and "skipped b" in caplog.text
    patched, names = _patched(la.randomize_bn(model), style="smp")
    assert names == ["a"] and patched["a"].x_last
    _check_same(model["a"], patched["a"], torch.randn(2, 8, 5, 7), True)
    _check_same(model["a"], patched["a"], torch.randn(2, 8, 5, 7), False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="style"):
        pspnet_fast.patch(la.AuthorsNet(), style="caffe")
    with pytest.raises(ValueError, match="backend"):
        pspnet_fast.patch(la.AuthorsNet(), backend="tpu")
    with pytest.raises(TypeError):
        pspnet_fast.patch("model")
    # a head that is mmseg's under an explicit other style is left alone, with the reason
    names = pspnet_fast.patch(la.EncoderDecoder(), style="authors")
    assert names == [] and "mmsegmentation PSPHead" in dict(names.skipped)["decode_head"]
    # a bare mmseg PPM (it returns a list) is left alone, with the reason; so is a root PPM
    names = pspnet_fast.patch(nn.Sequential(la.PPM((1, 2), 8, 2, False)))
    assert names == [] and "returns a list" in dict(names.skipped)["0"]
    names = pspnet_fast.patch(la.AuthorsPPM(8, 2, (1, 2)))
    assert names == [] and "root" in dict(names.skipped)[""]


@pytest.mark.skipif(_why_not_machine("cpu") is not None, reason="extension not built")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_x_last_ops(layout, dtype):
    """The CPU ops' x_last argument: the x-first layout rotated, forward and both adjoints."""
    from pspnet_fast.ops import order as _order

    if not _order._has_x_last(torch.ops.pspnet_fast.upsample_concat):
        pytest.skip("ops built without x_last")
    k = ops.op_set("cpu")
    bins, c, r = (1, 2, 3), 5, 3
    x = torch.randn(2, c, 6, 7, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    levels = torch.randn(2, r, 14, dtype=dtype)
    first = k.upsample_concat(x, levels, bins, True)
    last = k.upsample_concat(x, levels, bins, True, x_last=True)
    assert torch.equal(last, torch.cat([first[:, c:], first[:, :c]], 1))
    assert last.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    g_last = torch.randn_like(last)
    g_first = torch.cat([g_last[:, 9:], g_last[:, :9]], 1)
    assert torch.equal(k.upsample_concat_backward(g_last, c, bins, True, x_last=True),
                       k.upsample_concat_backward(g_first, c, bins, True))
    gp = torch.randn(2, c, 14, dtype=dtype)
    assert torch.equal(k.pyramid_pool_backward(gp, g_last, bins, x_offset=9),
                       k.pyramid_pool_backward(gp, g_first, bins))


@pytest.mark.skipif(_why_not_machine("cpu") is not None, reason="extension not built")
def test_x_last_op_autograd():
    """The op's registered autograd with x_last: gradients of x and levels are those of the rotated layout."""
    k = ops.op_set("cpu")
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    levels = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 10, 5, 6, dtype=torch.float64)
    gx, gl = torch.autograd.grad(k.upsample_concat(x, levels, (1, 2), False, x_last=True), (x, levels), g)
    first = k.upsample_concat(x, levels, (1, 2), False)
    ex, el = torch.autograd.grad(first, (x, levels), torch.cat([g[:, 6:], g[:, :6]], 1))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gl, el)


def test_real_smp_pspnet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.PSPNet("resnet18", encoder_weights=None, classes=3).eval()
    patched, names = _patched(model)
    assert names == ["decoder.psp"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _close(patched(x), model(x))
