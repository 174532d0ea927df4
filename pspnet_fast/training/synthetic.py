"""`--data synthetic`: a small scene-parsing set, generated deterministically from a seed, in which an object's
class depends on context elsewhere in the image.

How an image (size x size, RGB uint8) and its label (size x size, uint8) are built, from
`numpy.random.default_rng([seed, split, index])` only, so every process and DataLoader worker builds the same sample:

- The scene kind k is "day" (0) or "night" (1), equally likely.
- Sky, class 1: the top quarter of the image; light blue by day, dark blue by night (plus pixel noise). The sky is
  the only thing that tells the kinds apart.
- Ground, class 0: everything else; grey with a random tint and pixel noise, the same distribution in both kinds.
- 1 to 3 "vehicles": rectangles (side size/8 .. size/4) with the same orange/white checker texture in both kinds,
  in the lower half of the image (at least size/4 rows below the sky). A vehicle is a boat, class 2, in a day scene
  and a car, class 3, in a night scene: the same local pattern is one class or the other depending on the sky, 32
  to 96 pixels away at the default size 128 (4 to 12 cells of the stride-8 feature map). This is the situation the
  pyramid pooling module exists for: its 1x1 level averages the whole map, so the sky's colour reaches every
  vehicle directly; without it, the information has to travel through a chain of convolutions.
- 0 to 2 "bushes", class 4: green rectangles, the same in both kinds (a class that local appearance decides).
- A one-pixel outline around every object is labelled 255 (ignore), as VOC's boundaries are.

Objects may overlap; later ones are drawn on top. Class names and palette: `CLASSES`, `PALETTE`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["CLASSES", "PALETTE", "SyntheticScenes"]

CLASSES = ("ground", "sky", "boat", "car", "bush")
PALETTE = np.array([[128, 128, 128], [70, 130, 180], [0, 0, 230], [220, 20, 60], [107, 142, 35]], np.uint8)
_SPLITS = {"train": 0, "val": 1}


class SyntheticScenes:
    """n images of size x size from `seed`; split "train" or "val" (disjoint streams). load(i) -> (image (H, W, 3)
    uint8, label (H, W) uint8 with values 0..4 and 255), name(i) -> a file stem."""

    num_classes = len(CLASSES)
    classes = CLASSES
    palette = PALETTE

    def __init__(self, n: int, size: int = 128, seed: int = 0, split: str = "train"):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if size < 32:
            raise ValueError(f"synthetic images need size >= 32, got {size}")
        if n < 1:
            raise ValueError(f"synthetic set size must be >= 1, got {n}")
        self.n, self.size, self.seed, self.split = int(n), int(size), int(seed), split

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return f"synthetic_{self.split}_{i:05d}"

    def load(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} synthetic images")
        s = self.size
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], i])
        kind = int(rng.integers(2))
        img = np.empty((s, s, 3), np.float32)
        lbl = np.zeros((s, s), np.uint8)
        sky_h = s // 4
        img[:] = 120 + rng.uniform(-25, 25, 3)
        img[:sky_h] = (150, 200, 240) if kind == 0 else (20, 30, 80)
        lbl[:sky_h] = 1
        top = s // 2
        checker = ((np.arange(s)[:, None] // 3 + np.arange(s)[None, :] // 3) % 2).astype(bool)
        objects = [("vehicle", 2 + kind)] * int(rng.integers(1, 4)) + [("bush", 4)] * int(rng.integers(0, 3))
        for j in rng.permutation(len(objects)):
            what, cls = objects[j]
            h, w = (int(v) for v in rng.integers(s // 8, s // 4 + 1, 2))
            y0 = int(rng.integers(top, s - h + 1))
            x0 = int(rng.integers(0, s - w + 1))
            region = (slice(y0, y0 + h), slice(x0, x0 + w))
            if what == "vehicle":
                img[region] = np.where(checker[:h, :w, None], (240, 140, 30), (235, 235, 235))
            else:
                img[region] = (40, 150, 50)
            lbl[max(y0 - 1, 0):y0 + h + 1, max(x0 - 1, 0):x0 + w + 1] = 255
            lbl[region] = cls
        img += rng.normal(0, 12, img.shape)
        return np.clip(img, 0, 255).round().astype(np.uint8), lbl
