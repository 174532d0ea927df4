"""patch() on the real segmentation_models_pytorch 0.6.0 and mmsegmentation 1.2.2 models (skipped where they are not
installed: `pip install .[peers]`, which `make test` does): PPM and head fused, outputs in eval (1e-5 relative, float32)
and training gradients and BatchNorm statistics (float64) as the originals', state_dict keys unchanged and original
checkpoints loading strictly, no concatenation built in eval. mmseg's decode heads import mmcv.ops, whose compiled
part mmcv-lite lacks: tests/interop/mmcv_stub stands in for it (PSPNet calls none of those ops)."""
import copy

import pytest
import torch
from torch import nn

import pspnet_fast
from pspnet_fast.interop.patching import PatchedPyramidPooling
from pspnet_fast.ops.backends import _why_not_machine

from . import lookalikes as la
from . import mmcv_stub
from .test_patch import _close
from .test_patch_head import _check_same, concatenations

pytestmark = pytest.mark.skipif(_why_not_machine("cpu") is not None, reason="extension not built")


def _smp():
    return pytest.importorskip("segmentation_models_pytorch", reason="segmentation_models_pytorch not installed")


def _mmseg():
    pytest.importorskip("mmcv", reason="mmcv-lite not installed")
    mmcv_stub.install()
    pytest.importorskip("mmseg.models.decode_heads.psp_head", reason="mmsegmentation not installed")
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    from mmseg.registry import MODELS

    return MODELS


def _strict_round_trip(model, patched):
    assert list(patched.state_dict()) == list(model.state_dict())
    patched.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)


# --- segmentation_models_pytorch --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["batchnorm", False], ids=["bn", "nonorm"])
def smp_model(request):
    smp = _smp()
    torch.manual_seed(0)
    model = smp.PSPNet("resnet18", encoder_weights=None, classes=3, decoder_use_norm=request.param)
    return la.randomize_bn(model)


def test_smp_patched_eval(smp_model):
    model = copy.deepcopy(smp_model).eval()
    patched = copy.deepcopy(model)
    names = pspnet_fast.patch(patched)
    assert names == ["decoder.psp"] and names.heads == ["decoder.conv"] and names.skipped == []
    assert isinstance(patched.decoder.psp, PatchedPyramidPooling) and patched.decoder.psp.x_last
    assert isinstance(patched.decoder, type(model.decoder)) and type(patched.decoder) is not type(model.decoder)
    _strict_round_trip(model, patched)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        _close(patched(x), model(x))
    c = model.encoder.out_channels[-1]  # 128: depth-3 resnet18, features 8 x 12
    assert concatenations(lambda: model(x), 1, 2 * c, (8, 12))
    assert concatenations(lambda: patched(x), 1, 2 * c, (8, 12)) == []


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_smp_patched_grads(smp_model, train):
    model = copy.deepcopy(smp_model)
    patched = copy.deepcopy(model)
    pspnet_fast.patch(patched)
    _check_same(model, patched, torch.randn(2, 3, 40, 56), train)


def test_smp_head_false_and_subclass():
    smp = _smp()
    from segmentation_models_pytorch.decoders.pspnet.decoder import PSPDecoder

    model = la.randomize_bn(smp.PSPNet("resnet18", encoder_weights=None, classes=3)).eval()
    patched = copy.deepcopy(model)
    names = pspnet_fast.patch(patched, head=False)
    assert names == ["decoder.psp"] and names.heads == [] and type(patched.decoder) is PSPDecoder

    class MyDecoder(PSPDecoder):
        def forward(self, features):
            return super().forward(features) * 2

    sub = copy.deepcopy(model)
    sub.decoder.__class__ = MyDecoder
    patched = copy.deepcopy(sub)
    names = pspnet_fast.patch(patched)
    assert names == ["decoder.psp"] and names.heads == []
    assert "not segmentation_models_pytorch's PSPDecoder" in dict(names.skipped)["decoder.conv"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _close(patched(x), sub(x))


# --- mmsegmentation -----------------------------------------------------------------------------------------------
def _head(norm, align_corners, c=32, ch=8):
    _mmseg()
    from mmseg.models.decode_heads.psp_head import PSPHead

    torch.manual_seed(0)
    kw = {"norm_cfg": dict(type="BN")} if norm else {}
    head = PSPHead(in_channels=c, channels=ch, num_classes=3, align_corners=align_corners, dropout_ratio=0.0, **kw)
    return la.randomize_bn(head)


class _Wrap(nn.Module):
    """An owner for the head (patch() never replaces the root); feeds it the [feature] list mmseg heads take."""

    def __init__(self, head):
        super().__init__()
        self.decode_head = head

    def forward(self, x):
        return self.decode_head([x])


@pytest.mark.parametrize("norm", [True, False], ids=["bn", "nonorm"])
@pytest.mark.parametrize("align_corners", [False, True], ids=["noac", "ac"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_mmseg_head(norm, align_corners, train):
    model = _Wrap(_head(norm, align_corners))
    patched = copy.deepcopy(model)
    names = pspnet_fast.patch(patched)
    assert names == ["decode_head"] and names.heads == ["decode_head.bottleneck"] and names.skipped == []
    assert isinstance(patched.decode_head, type(model.decode_head))
    _strict_round_trip(model, patched)
    _check_same(model, patched, torch.randn(2, 32, 7, 9), train)
    if not train:
        x = torch.randn(1, 32, 7, 9)
        patched.float().eval(), model.float().eval()
        with torch.no_grad():
            _close(patched(x), model(x))
        assert concatenations(lambda: model(x), 1, 64, (7, 9))
        assert concatenations(lambda: patched(x), 1, 64, (7, 9)) == []


def test_mmseg_head_false_and_subclass():
    _mmseg()
    from mmseg.models.decode_heads.psp_head import PSPHead

    model = _Wrap(_head(True, False)).eval()
    names = pspnet_fast.patch(copy.deepcopy(model), head=False)
    assert names == ["decode_head"] and names.heads == [] and names.skipped == []

    class MyHead(PSPHead):
        pass

    sub = copy.deepcopy(model)
    sub.decode_head.__class__ = MyHead
    patched = copy.deepcopy(sub)
    names = pspnet_fast.patch(patched)
    assert names == ["decode_head"] and names.heads == []
    assert "not mmsegmentation's PSPHead" in dict(names.skipped)["decode_head.bottleneck"]
    x = torch.randn(1, 32, 6, 6)
    with torch.no_grad():
        _close(patched(x), sub(x))


def _encoder_decoder(depth=18, c=512, ch=128):
    """mmseg's configs/_base_/models/pspnet_r50-d8.py with BN for SyncBN (one process), ResNetV1c-`depth`."""
    MODELS = _mmseg()
    norm_cfg = dict(type="BN", requires_grad=True)
    cfg = dict(
        type="EncoderDecoder",
        backbone=dict(type="ResNetV1c", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                      strides=(1, 2, 1, 1), norm_cfg=norm_cfg, norm_eval=False, style="pytorch",
                      contract_dilation=True),
        decode_head=dict(type="PSPHead", in_channels=c, in_index=3, channels=ch, pool_scales=(1, 2, 3, 6),
                         dropout_ratio=0.1, num_classes=19, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=c // 2, in_index=2, channels=ch // 2, num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=19, norm_cfg=norm_cfg,
                            align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))
    torch.manual_seed(0)
    return MODELS.build(cfg)


class _Tensor(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, mode="tensor")


def test_mmseg_encoder_decoder_r18():
    model = _encoder_decoder()
    la.randomize_bn(model.decode_head)
    model = _Tensor(model)
    patched = copy.deepcopy(model)
    names = pspnet_fast.patch(patched)
    assert names == ["model.decode_head"] and names.heads == ["model.decode_head.bottleneck"]
    _strict_round_trip(model, patched)
    x = torch.randn(1, 3, 65, 65)  # features 9 x 9
    model.eval(), patched.eval()
    with torch.no_grad():
        _close(patched(x), model(x))
    assert concatenations(lambda: model(x), 1, 1024, (9, 9))
    assert concatenations(lambda: patched(x), 1, 1024, (9, 9)) == []
    _check_same(model, patched, torch.randn(2, 3, 33, 33), True)
