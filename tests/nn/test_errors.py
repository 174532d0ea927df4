"""Bad input to every public entry point: ValueError or TypeError naming what was expected and what came."""
import pytest
import torch

import pspnet_fast
from pspnet_fast.models import PSPNet
from pspnet_fast.reference import PSPHead
from pspnet_fast.reference import PyramidPooling as RefPPM

PPMS = [pytest.param(RefPPM, id="reference"), pytest.param(pspnet_fast.PyramidPooling, id="fused")]


@pytest.mark.parametrize("cls", PPMS)
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(in_channels=0), ValueError, "in_channels must be a positive int, got 0"),
    (dict(in_channels=-8), ValueError, "in_channels must be a positive int, got -8"),
    (dict(in_channels=8.0), TypeError, "in_channels must be an int, got float"),
    (dict(in_channels=8, bins=()), ValueError, "at least one pyramid level"),
    (dict(in_channels=8, bins=(1, 0)), ValueError, r"positive ints, got \(1, 0\)"),
    (dict(in_channels=8, bins=(1, -2)), ValueError, "positive ints"),
    (dict(in_channels=8, bins=(1, 2.5)), TypeError, "bins must hold ints"),
    (dict(in_channels=8, bins=3), TypeError, "sequence of positive ints"),
    (dict(in_channels=8, bins="123"), TypeError, "sequence of positive ints"),
    (dict(in_channels=2, bins=(1, 2, 3)), ValueError, "pass reduction_channels"),
    (dict(in_channels=8, reduction_channels=0), ValueError, "reduction_channels must be a positive int"),
])
def test_constructor_errors(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", PPMS)
@pytest.mark.parametrize("make_x,exc,match", [
    (lambda: torch.randn(8, 5, 5), ValueError, r"shape \(N, 8, H, W\), got 3 dims"),
    (lambda: torch.randn(1, 1, 8, 5, 5), ValueError, "got 5 dims"),
    (lambda: torch.randn(1, 4, 5, 5), ValueError, r"8 channels \(dim 1\), got shape \(1, 4, 5, 5\)"),
    (lambda: torch.ones(1, 8, 5, 5, dtype=torch.int64), TypeError, "got torch.int64"),
    (lambda: torch.ones(1, 8, 5, 5, dtype=torch.bool), TypeError, "got torch.bool"),
    (lambda: torch.randn(1, 8, 0, 5), ValueError, "H, W >= 1"),
    (lambda: [[1.0]], TypeError, "must be a torch.Tensor, got list"),
])
def test_forward_errors(cls, make_x, exc, match):
    m = cls(8).eval()
    with pytest.raises(exc, match=match):
        m(make_x())


def test_fused_device_mismatch_is_named():
    m = pspnet_fast.PyramidPooling(8).eval()
    x = torch.randn(1, 8, 5, 5, device="meta")
    with pytest.raises(ValueError, match="x is on meta but the module's weights are on cpu"):
        m(x)


def test_fused_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        pspnet_fast.PyramidPooling(8, backend="gpu")
    m = pspnet_fast.PyramidPooling(8, backend="cuda").eval()
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this input"):
        m(torch.randn(1, 8, 5, 5))


def test_head_errors():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        PSPHead(8, 0)
    with pytest.raises(ValueError, match="dropout must be in"):
        PSPHead(8, 3, dropout=1.5)
    with pytest.raises(ValueError, match="8 channels"):
        PSPHead(8, 3).eval()(torch.randn(1, 3, 4, 4))


def test_model_errors():
    with pytest.raises(ValueError, match="layers must be one of"):
        PSPNet(34, num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        PSPNet(50, num_classes=0)
    with pytest.raises(ValueError, match="zoom_factor"):
        PSPNet(50, num_classes=3, zoom_factor=3)
    with pytest.raises(ValueError, match="bins"):
        PSPNet(50, num_classes=3, bins=())
    m = PSPNet(50, num_classes=3).eval()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(1, 1, 33, 33\)"):
        m(torch.randn(1, 1, 33, 33))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(1, 3, 33, 33, dtype=torch.uint8))


def test_ops_reject_bad_shapes_cleanly():
    if not pspnet_fast.available_backends()["cpu"]["available"]:
        pytest.skip("extension not built")
    ops = torch.ops.pspnet_fast
    with pytest.raises(ValueError, match="x must be of shape"):
        ops.pyramid_pool(torch.randn(3, 4, 5), [1])
    with pytest.raises(ValueError, match="positive"):
        ops.pyramid_pool(torch.randn(1, 3, 4, 5), [1, 0])
    with pytest.raises(ValueError, match="levels must be of shape"):
        ops.upsample_concat(torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4), [1, 2], True)
    with pytest.raises(ValueError, match="weight must be of shape"):
        ops.ppm_reduce(torch.randn(1, 3, 5), torch.randn(2, 2, 4), None, None, [1, 2], True)
