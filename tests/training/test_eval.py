"""Evaluation: metrics on hand-made predictions, sliding windows, colourized output."""
import numpy as np
import pytest
import torch
from torch import nn

from pspnet_fast.training.evaluate import Metrics, format_table, intersection_union, predict_image, sliding_window


def test_metrics_on_hand_made_predictions():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    inter, union, tgt = intersection_union(pred, target, 3)
    # ignore pixels (255) count nowhere, whatever is predicted there
    assert inter.tolist() == [1, 2, 1] and tgt.tolist() == [2, 2, 2] and union.tolist() == [3, 3, 2]
    m = Metrics(3)
    m.update(pred, target)
    m.update(torch.tensor([[2]]), torch.tensor([[2]]))
    s = m.summary()
    np.testing.assert_allclose(s["iou"], [1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(s["acc"], [1 / 2, 2 / 2, 2 / 3])
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert s["macc"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert s["allacc"] == pytest.approx(5 / 7)
    table = format_table(s, ["a", "b", "c"])
    assert "mIoU 55.56" in table and table.splitlines()[1].split() == ["a", "33.33", "50.00"]


def test_metrics_absent_class_counts_zero_as_the_authors():
    s = Metrics(3)
    s.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert s.summary()["miou"] == pytest.approx(1 / 3)


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="label values must be 0..2 or 255, got 0..5"):
        intersection_union(torch.zeros(3, dtype=torch.long), torch.tensor([0, 5, 255]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        intersection_union(torch.zeros(3), torch.zeros(4), 3)


class _Pointwise(nn.Module):
    """A per-pixel model whose output does not depend on the window: sliding windows must reproduce it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("hw", [(50, 70), (20, 30), (32, 32)])
def test_sliding_window_matches_whole_image_for_pointwise_model(hw):
    m = _Pointwise().eval()
    x = torch.randn(3, *hw)
    with torch.no_grad():
        want = m(x[None]).softmax(1)[0]
        got = sliding_window(m, x, 4, (32, 32), flip=False)
        # padding (smaller images) is cropped away again; overlapping windows are averaged
        torch.testing.assert_close(got, want)
        flip = sliding_window(m, x, 4, (32, 32), flip=True)
        torch.testing.assert_close(flip, want)  # a pointwise model is flip-equivariant
        pred = predict_image(m, x, 4, (32, 32), scales=(0.5, 1.0, 1.5))
    assert pred.shape == hw and pred.dtype == torch.int64


def test_save_colorized(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from pspnet_fast.training.data import save_colorized

    pal = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    save_colorized(np.array([[0, 1], [1, 0]]), pal, tmp_path / "sub" / "p.png")
    im = Image.open(tmp_path / "sub" / "p.png")
    assert im.mode == "P" and im.convert("RGB").getpixel((1, 0)) == (40, 50, 60)
