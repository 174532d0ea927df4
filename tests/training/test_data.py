"""Data pipeline: the authors' list format, label checks naming the file, augmentation alignment and ignore padding,
the synthetic set."""
import numpy as np
import pytest
import torch

from pspnet_fast.training.data import MEAN, STD, Augment, ListSource, SegDataset, read_list
from pspnet_fast.training.synthetic import SyntheticScenes

Image = pytest.importorskip("PIL.Image")

COLORS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], np.float32)


def _write_pair(root, stem, h=20, w=24, k=3, label=None, label_size=None, mode="L"):
    img = (np.random.default_rng(0).integers(0, 255, (h, w, 3))).astype(np.uint8)
    Image.fromarray(img).save(root / f"{stem}.jpg")
    lh, lw = label_size or (h, w)
    lbl = label if label is not None else (np.arange(lh * lw).reshape(lh, lw) % k).astype(np.uint8)
    im = Image.fromarray(lbl)
    if mode == "RGB":
        im = im.convert("RGB")
    im.save(root / f"{stem}.png")
    return f"{stem}.jpg {stem}.png"


def test_read_list_and_load(tmp_path):
    lines = [_write_pair(tmp_path, "a"), "", _write_pair(tmp_path, "b")]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    pairs = read_list(tmp_path / "train.txt")
    assert [p[0] for p in pairs] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    src = ListSource(pairs, 3, tmp_path)
    img, lbl = src.load(1)
    assert img.shape == (20, 24, 3) and img.dtype == np.uint8 and lbl.shape == (20, 24) and lbl.max() == 2
    assert src.name(0) == "a"
    # data_root given explicitly; list lines relative to it
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "l.txt").write_text("a.jpg a.png\n")
    assert read_list(sub / "l.txt", tmp_path)[0][1] == str(tmp_path / "a.png")


def test_list_errors_name_the_file(tmp_path):
    _write_pair(tmp_path, "a")
    (tmp_path / "missing.txt").write_text("a.jpg a.png\nb.jpg b.png\n")
    with pytest.raises(FileNotFoundError, match=r"b\.jpg \(line 2 of .*missing\.txt\)"):
        read_list(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("a.jpg a.png extra\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected"):
        read_list(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="nolist"):
        read_list(tmp_path / "nolist.txt")


@pytest.mark.parametrize("case", ["range", "size", "rgb"])
def test_bad_labels_raise_naming_the_file(tmp_path, case):
    if case == "range":
        lbl = np.full((20, 24), 1, np.uint8)
        lbl[3, 4] = 7
        lbl[5, 5] = 255  # ignore is fine
        line = _write_pair(tmp_path, "x", label=lbl)
        msg = r"x\.png holds values \[7\] outside 0\.\.2 and 255"
    elif case == "size":
        line = _write_pair(tmp_path, "x", label_size=(20, 23))
        msg = r"x\.png is 23x20.*x\.jpg is 24x20"
    else:
        line = _write_pair(tmp_path, "x", mode="RGB")
        msg = r"x\.png: expected a single-channel PNG .* got mode RGB"
    (tmp_path / "l.txt").write_text(line + "\n")
    src = ListSource(read_list(tmp_path / "l.txt"), 3)
    with pytest.raises(ValueError, match=msg):
        src.load(0)


def _color_coded(h=48, w=40, seed=0):
    """label: 4 large blocks of classes 0..3 (plus a 255 stripe); image: each class's colour."""
    lbl = np.zeros((h, w), np.int64)
    lbl[: h // 2, w // 2:] = 1
    lbl[h // 2:, : w // 2] = 2
    lbl[h // 2:, w // 2:] = 3
    lbl[:, 5] = 255
    img = np.zeros((h, w, 3), np.float32)
    for c in range(4):
        img[lbl == c] = COLORS[c]
    img[lbl == 255] = 128
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(lbl)


def _denorm(x):
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_labels_aligned(seed):
    image, label = _color_coded()
    aug = Augment((40, 40), blur_p=0.5, rotate_p=1.0)
    g = torch.Generator().manual_seed(seed)
    out, lab = aug(image, label, g)
    assert out.shape == (3, 40, 40) and lab.shape == (40, 40) and lab.dtype == torch.int64
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 255}
    rgb = _denorm(out).permute(1, 2, 0).reshape(-1, 1, 3)
    nearest = ((rgb - torch.from_numpy(COLORS)) ** 2).sum(-1).argmin(1)
    keep = (lab.reshape(-1) != 255)
    # Pixels next to a block edge mix colours (bilinear scale/rotation, blur); the rest must match their label.
    agree = (nearest[keep] == lab.reshape(-1)[keep]).float().mean()
    assert agree > 0.9, float(agree)


def test_flip_is_applied_to_both():
    image, label = _color_coded()
    aug = Augment((48, 40), scale=(1.0, 1.0), rotate_p=0.0, blur_p=0.0, flip_p=1.0)
    out, lab = aug(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(lab, label.flip(-1))
    assert torch.allclose(_denorm(out), image.flip(-1), atol=1e-3)


def test_crop_pads_with_ignore_and_mean():
    image, label = _color_coded(16, 12)
    aug = Augment((30, 20), scale=(1.0, 1.0), rotate_p=0.0, blur_p=0.0, flip_p=0.0)
    out, lab = aug(image, label, torch.Generator().manual_seed(0))
    top, left = (30 - 16) // 2, (20 - 12) // 2
    assert torch.equal(lab[top:top + 16, left:left + 12], label)
    pad = torch.ones(30, 20, dtype=torch.bool)
    pad[top:top + 16, left:left + 12] = False
    assert (lab[pad] == 255).all()
    assert out[:, pad].abs().max() < 1e-5  # the mean, normalized


def test_rotation_pads_label_with_ignore():
    image, label = _color_coded()
    label = torch.where(label == 255, torch.zeros_like(label), label)
    _, lab = Augment((48, 40)).rotate_by(image, label, 10.0)
    assert lab[0, 0] == 255 and lab[-1, -1] == 255 and (lab[20:28, 15:25] != 255).all()


def test_dataset_seeding_is_per_sample_and_epoch():
    src = SyntheticScenes(4, 32, seed=3)
    ds = SegDataset(src, Augment((32, 32)), seed=1)
    a, b = ds[2], ds[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], a[0])


def test_synthetic_set_is_deterministic_and_context_dependent():
    s = SyntheticScenes(40, 48, seed=5)
    img, lbl = s.load(7)
    img2, lbl2 = SyntheticScenes(40, 48, seed=5).load(7)
    assert np.array_equal(img, img2) and np.array_equal(lbl, lbl2)
    assert not np.array_equal(SyntheticScenes(40, 48, seed=6).load(7)[0], img)
    assert not np.array_equal(SyntheticScenes(40, 48, seed=5, split="val").load(7)[0], img)
    kinds = set()
    for i in range(len(s)):
        img, lbl = s.load(i)
        vals = set(np.unique(lbl).tolist())
        assert vals <= {0, 1, 2, 3, 4, 255} and 1 in vals
        assert not ({2, 3} <= vals), "boats (day) and cars (night) never share a scene"
        day = img[: 48 // 4].mean() > 120  # the sky decides
        kinds.add(day)
        assert (2 in vals) == day and (3 in vals) == (not day)
    assert kinds == {True, False}
