"""Data for training and evaluation: the PSPNet authors' list format, their training augmentation, and the
embedded synthetic set.

List format (hszhao/semseg `util/dataset.py`): one "image_path label_path" pair per line, paths relative to a data
root; labels are single-channel PNGs (mode L or P) holding class indices, 255 = ignore. Image decoding uses Pillow
(`pip install .[data]`) and happens in the DataLoader workers (`__getitem__`).

Augmentation (`Augment`, the authors' `train.py` pipeline, in torch on (3, H, W) float images in 0..255 and (H, W)
int64 labels): random scale 0.5-2.0 (bilinear / nearest), rotation within +-10 degrees with probability 0.5
(bilinear / nearest; the image padded with the mean, the label with 255), Gaussian blur (5 taps, sigma 1.1, as
OpenCV's GaussianBlur((5, 5), 0)) with probability 0.5, horizontal flip with probability 0.5, a random crop padded
with the mean / 255 where the image is smaller than the crop, then (x - mean) / std with ImageNet's mean and std.

Randomness: every sample draws from its own torch.Generator seeded by (seed, epoch, index), so a sample's
augmentation does not depend on the number of workers or processes, and a resumed run sees what the uninterrupted
run would have seen.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["MEAN", "STD", "IGNORE_INDEX", "Augment", "ListSource", "SegDataset", "normalize", "read_list",
           "voc_palette", "read_colors", "read_names", "save_colorized", "save_rgb"]

IGNORE_INDEX = 255
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _pil():
    try:
        from PIL import Image  # optional dependency (the [data] extra): only reading and writing images needs it
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading and writing images needs Pillow: pip install 'pspnet_fast[data]' "
                          "(or pip install pillow)") from e
    return Image


# ---------------------------------------------------------------------------------------------------------------
# The list format


def read_list(list_path, data_root=None, need_labels: bool = True) -> list[tuple[str, str | None]]:
    """Parses an authors'-format list: "image label" per line (or "image" alone when need_labels is False).

    Paths are joined to data_root (default: the list file's folder) unless absolute. Every file must exist:
    FileNotFoundError names the missing file and the list line; a malformed line raises ValueError."""
    list_path = os.fspath(list_path)
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"list file {list_path} does not exist")
    root = os.path.dirname(os.path.abspath(list_path)) if data_root is None else os.fspath(data_root)
    pairs = []
    with open(list_path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2 or (need_labels and len(fields) != 2):
                want = '"image_path label_path"' if need_labels else '"image_path [label_path]"'
                raise ValueError(f"{list_path}:{n}: expected {want}, got {line.strip()!r}")
            paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in fields]
            for p in paths:
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{p} (line {n} of {list_path}) does not exist")
            pairs.append((paths[0], paths[1] if len(paths) == 2 else None))
    if not pairs:
        raise ValueError(f"{list_path} lists no images")
    return pairs


class ListSource:
    """Images and labels named by a list file. load(i) -> (image (H, W, 3) uint8, label (H, W) uint8 or None),
    after checking that the label is single-channel, has the image's size and holds only 0..num_classes-1 or 255."""

    def __init__(self, pairs, num_classes: int, data_root=None):
        self.pairs = list(pairs)
        self.num_classes = int(num_classes)
        self.root = data_root
        self.classes = tuple(str(i) for i in range(self.num_classes))
        self.palette = voc_palette(self.num_classes)

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        path = self.pairs[i][0]
        if self.root is not None:
            rel = os.path.relpath(path, self.root)
            if not rel.startswith(".."):
                path = rel
        return os.path.splitext(path if not os.path.isabs(path) else os.path.basename(path))[0]

    def load(self, i: int):
        Image = _pil()
        img_path, lbl_path = self.pairs[i]
        try:
            with Image.open(img_path) as im:
                img = np.array(im.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"image {img_path} does not exist") from None
        except OSError as e:
            raise ValueError(f"image {img_path} cannot be decoded: {e}") from None
        if lbl_path is None:
            return img, None
        try:
            with Image.open(lbl_path) as im:
                mode = im.mode
                if mode not in ("L", "P", "I", "I;16"):
                    raise ValueError(f"label {lbl_path}: expected a single-channel PNG (mode L or P) of class "
                                     f"indices, got mode {mode}")
                lbl = np.array(im)
        except FileNotFoundError:
            raise FileNotFoundError(f"label {lbl_path} does not exist") from None
        except OSError as e:
            raise ValueError(f"label {lbl_path} cannot be decoded: {e}") from None
        if lbl.shape != img.shape[:2]:
            raise ValueError(f"label {lbl_path} is {lbl.shape[1]}x{lbl.shape[0]} (WxH) but its image {img_path} is "
                             f"{img.shape[1]}x{img.shape[0]}")
        values = np.unique(lbl)
        bad = values[(values >= self.num_classes) & (values != IGNORE_INDEX)]
        if bad.size:
            raise ValueError(f"label {lbl_path} holds values {bad[:10].tolist()} outside 0..{self.num_classes - 1} "
                             f"and 255 (ignore): wrong --num-classes, or not a class-index PNG")
        return img, lbl.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation


def normalize(image: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """(3, H, W) float in 0..255 -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image - m) / s


def _uniform(g, lo, hi) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _gauss_kernel(taps: int = 5) -> torch.Tensor:
    sigma = 0.3 * ((taps - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for GaussianBlur(ksize, 0)
    x = torch.arange(taps, dtype=torch.float32) - (taps - 1) / 2
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


@dataclass
class Augment:
    """The authors' training augmentation. __call__(image (3, H, W) float 0..255, label (H, W) int64, generator)
    -> (normalized image (3, crop_h, crop_w) float32, label (crop_h, crop_w) int64)."""

    crop: tuple[int, int]
    scale: tuple[float, float] = (0.5, 2.0)
    rotate: tuple[float, float] = (-10.0, 10.0)
    rotate_p: float = 0.5
    blur_p: float = 0.5
    flip_p: float = 0.5
    mean: tuple = MEAN
    std: tuple = STD
    ignore_index: int = IGNORE_INDEX

    def __call__(self, image: torch.Tensor, label: torch.Tensor, g: torch.Generator):
        image, label = self.rand_scale(image, label, _uniform(g, *self.scale))
        if float(torch.rand((), generator=g)) < self.rotate_p:
            image, label = self.rotate_by(image, label, _uniform(g, *self.rotate))
        if float(torch.rand((), generator=g)) < self.blur_p:
            image = self.blur(image)
        if float(torch.rand((), generator=g)) < self.flip_p:
            image, label = image.flip(-1), label.flip(-1)
        image, label = self.pad_crop(image, label, g)
        return normalize(image, self.mean, self.std), label

    @staticmethod
    def rand_scale(image, label, s: float):
        h, w = label.shape
        size = (max(int(h * s + 0.5), 1), max(int(w * s + 0.5), 1))
        if size == (h, w):
            return image, label
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return image, label

    def rotate_by(self, image, label, degrees: float):
        # Rotation about the centre, same output size (as cv2.warpAffine). grid_sample works in coordinates
        # normalized per axis, so the off-diagonal terms carry the aspect ratio.
        h, w = label.shape
        a = math.radians(degrees)
        c, s = math.cos(a), math.sin(a)
        theta = torch.tensor([[[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]], dtype=torch.float32)
        grid = F.affine_grid(theta, (1, 1, h, w), align_corners=False)
        mean = torch.tensor(self.mean, dtype=image.dtype).view(3, 1, 1)
        # Zero padding of (image - mean) pads with the mean; labels shifted by +1 so that padding (0) -> ignore.
        image = F.grid_sample((image - mean)[None], grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)[0] + mean
        lab = F.grid_sample((label + 1).float()[None, None], grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)[0, 0].long()
        label = torch.where(lab == 0, torch.full_like(lab, self.ignore_index), lab - 1)
        return image, label

    @staticmethod
    def blur(image):
        k = _gauss_kernel(5)
        h, w = image.shape[-2:]
        mode = "reflect" if min(h, w) > 2 else "replicate"
        x = F.pad(image[:, None], (2, 2, 2, 2), mode=mode)  # (3, 1, H+4, W+4)
        x = F.conv2d(x, k.view(1, 1, 1, 5))
        x = F.conv2d(x, k.view(1, 1, 5, 1))
        return x[:, 0]

    def pad_crop(self, image, label, g):
        ch, cw = self.crop
        h, w = label.shape
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            top, left = ph // 2, pw // 2
            img = torch.empty(3, h + ph, w + pw, dtype=image.dtype)
            img[:] = torch.tensor(self.mean, dtype=image.dtype).view(3, 1, 1)
            img[:, top:top + h, left:left + w] = image
            lab = torch.full((h + ph, w + pw), self.ignore_index, dtype=label.dtype)
            lab[top:top + h, left:left + w] = label
            image, label = img, lab
            h, w = label.shape
        y0 = int(torch.randint(0, h - ch + 1, (), generator=g))
        x0 = int(torch.randint(0, w - cw + 1, (), generator=g))
        return image[:, y0:y0 + ch, x0:x0 + cw].contiguous(), label[y0:y0 + ch, x0:x0 + cw].contiguous()


class SegDataset(Dataset):
    """Wraps a source (ListSource or SyntheticScenes). With an Augment: (image (3, ch, cw) float32, label (ch, cw)
    int64) for training; without: (normalized image (3, H, W), label (H, W) int64 or an empty tensor, index) at
    full size for evaluation. set_epoch(e) changes the augmentation draws (seeded by seed, epoch, index)."""

    def __init__(self, source, augment: Augment | None = None, seed: int = 0):
        self.source, self.augment, self.seed, self.epoch = source, augment, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img, lbl = self.source.load(i)
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
        label = torch.from_numpy(lbl.astype(np.int64)) if lbl is not None else torch.empty(0, dtype=torch.long)
        if self.augment is None:
            return normalize(image), label, i
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        return self.augment(image, label, g)


# ---------------------------------------------------------------------------------------------------------------
# Palettes and writing predictions


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved class index), (n, 3) uint8."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def read_colors(path) -> np.ndarray:
    """The authors' `*_colors.txt`: one "R G B" per class, (K, 3) uint8."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                v = line.split()
                if len(v) != 3 or not all(t.isdigit() and int(t) < 256 for t in v):
                    raise ValueError(f"{path}:{n}: expected \"R G B\" with values 0..255, got {line.strip()!r}")
                rows.append([int(t) for t in v])
    return np.array(rows, np.uint8).reshape(-1, 3)


def read_names(path) -> tuple[str, ...]:
    """The authors' `*_names.txt`: one class name per line."""
    with open(path) as f:
        return tuple(line.strip() for line in f if line.strip())


def save_colorized(pred: np.ndarray, palette: np.ndarray, path) -> None:
    """pred (H, W) class indices -> a palette PNG at path (folders created); index 255 drawn black."""
    Image = _pil()
    pal = np.zeros((256, 3), np.uint8)
    pal[:min(len(palette), 255)] = palette[:255]
    im = Image.fromarray(np.ascontiguousarray(pred, dtype=np.uint8))  # mode L; putpalette makes it P, indices kept
    im.putpalette(pal.reshape(-1).tolist())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)


def save_rgb(img: np.ndarray, path) -> None:
    Image = _pil()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(img).save(path)
