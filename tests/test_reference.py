"""The reference PPM and head against a direct F.adaptive_avg_pool2d / F.interpolate computation, and its layout."""
import pytest
import torch
import torch.nn.functional as F

from pspnet_fast.reference import PSPHead, PyramidPooling, pyramid_pooling

from .utils import make_ref


def _direct(ref, x):
    """The PPM written out op by op from PEERS.md section 2."""
    outs = [x]
    for b, f in zip(ref.bins, ref.features):
        conv, bn = f[1], f[2]
        p = F.adaptive_avg_pool2d(x, b)
        y = F.conv2d(p, conv.weight)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        outs.append(F.interpolate(torch.relu(y), x.shape[-2:], mode="bilinear", align_corners=ref.align_corners))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("hw", [(1, 1), (2, 5), (13, 13), (64, 97)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bins", [(1, 2, 3, 6), (1, 3, 6, 8), (2,)], ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("align_corners", [True, False])
def test_reference_ppm_is_the_direct_computation(hw, bins, align_corners):
    ref = make_ref(8, bins, align_corners).eval()
    x = torch.randn(2, 8, *hw)
    out = ref(x)
    assert out.shape == (2, 8 + len(bins) * (8 // len(bins)), *hw)
    torch.testing.assert_close(out, _direct(ref, x), rtol=0, atol=0)
    torch.testing.assert_close(out[:, :8], x, rtol=0, atol=0)  # x first


def test_reference_ppm_layout_is_the_authors():
    ppm = PyramidPooling(2048)
    assert ppm.reduction_channels == 512 and ppm.out_channels == 4096
    keys = list(ppm.state_dict())
    expected = []
    for i in range(4):
        expected.append(f"features.{i}.1.weight")
        expected += [f"features.{i}.2.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                     "num_batches_tracked")]
    assert keys == expected
    assert ppm.state_dict()["features.0.1.weight"].shape == (512, 2048, 1, 1)
    assert [type(m).__name__ for m in ppm.features[0]] == ["AdaptiveAvgPool2d", "Conv2d", "BatchNorm2d", "ReLU"]
    assert ppm.features[0][1].bias is None
    assert [f[0].output_size for f in ppm.features] == [1, 2, 3, 6]


def test_pyramid_pooling_function():
    x = torch.randn(2, 3, 7, 5)
    parts = pyramid_pooling(x, (1, 2, 6))
    assert [tuple(p.shape) for p in parts] == [(2, 3, 1), (2, 3, 4), (2, 3, 36)]
    torch.testing.assert_close(parts[2], F.adaptive_avg_pool2d(x, 6).flatten(2))


def test_reference_head_layout_and_forward():
    head = PSPHead(64, num_classes=5, bottleneck_channels=16, dropout=0.1)
    keys = list(head.state_dict())
    assert keys[0].startswith("ppm.features.0.")
    assert {k.split(".")[1] for k in keys if k.startswith("cls.")} == {"0", "1", "4"}
    assert head.state_dict()["cls.0.weight"].shape == (16, 128, 3, 3)
    assert head.cls[4].bias is not None and head.cls[0].bias is None
    head.eval()
    out = head(torch.randn(2, 64, 9, 7))
    assert out.shape == (2, 5, 9, 7)

