"""`pspnet-fast eval`: the PSPNet authors' test protocol (hszhao/semseg `tool/test.py`).

Per image: for each scale s (default 1.0), resize so that the long side is round(s * base_size) (base_size defaults
to the image's own long side), pad to at least the crop with the mean (0 after normalization), slide a crop window
with stride ceil(2/3 * crop), average softmax(logits) of each window and of its horizontal flip, divide by the
number of windows covering each pixel, resize the probabilities back to the image (bilinear), average over scales,
take the argmax. Metrics are accumulated over the whole set (pixels labelled 255 ignored): per class
IoU = I / U and Acc = I / T; mIoU and mAcc are the plain means over all classes (a class absent from both the
labels and the predictions counts 0, as the authors' code counts it); allAcc = sum(I) / sum(T).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .._checks import positive_float_arg, positive_int_arg
from ..models import load_checkpoint
from ..models.pspnet import read_checkpoint
from .builders import build_model, make_source
from .data import IGNORE_INDEX, SegDataset, read_colors, read_names
from .data import save_colorized as _save_colorized
from .data import save_rgb as _save_rgb
from .metrics import Metrics, format_table, intersection_union

__all__ = ["intersection_union", "Metrics", "predict_probs", "sliding_window", "evaluate", "format_table", "main"]


def predict_probs(model, x: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """x (N, 3, h, w) normalized -> softmax probabilities (N, K, h, w), averaged with the flipped input's."""
    out = model(x)
    if out.shape[-2:] != x.shape[-2:]:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=True)
    prob = out.float().softmax(1)
    if flip:
        prob = (prob + model(x.flip(-1)).float().softmax(1).flip(-1)) / 2
    return prob


def sliding_window(model, image: torch.Tensor, num_classes: int, crop: tuple[int, int], stride_rate: float = 2 / 3,
                   flip: bool = True) -> torch.Tensor:
    """image (3, H, W) normalized, on the model's device -> probabilities (K, H, W), float32: windows of `crop`
    with stride ceil(stride_rate * crop), the image padded with zeros (the mean) to at least the crop."""
    ch, cw = crop
    _, h, w = image.shape
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    top, left = ph // 2, pw // 2
    if ph or pw:
        image = F.pad(image, (left, pw - left, top, ph - top))
    _, nh, nw = image.shape
    sh, sw = int(math.ceil(ch * stride_rate)), int(math.ceil(cw * stride_rate))
    gh, gw = int(math.ceil((nh - ch) / sh)) + 1, int(math.ceil((nw - cw) / sw)) + 1
    prob = torch.zeros(num_classes, nh, nw, device=image.device)
    count = torch.zeros(1, nh, nw, device=image.device)
    for iy in range(gh):
        y1 = min(iy * sh + ch, nh)
        y0 = y1 - ch
        for ix in range(gw):
            x1 = min(ix * sw + cw, nw)
            x0 = x1 - cw
            prob[:, y0:y1, x0:x1] += predict_probs(model, image[None, :, y0:y1, x0:x1], flip)[0]
            count[:, y0:y1, x0:x1] += 1
    return (prob / count)[:, top:top + h, left:left + w]


def predict_image(model, image: torch.Tensor, num_classes: int, crop, scales=(1.0,), base_size: int | None = None,
                  flip: bool = True) -> torch.Tensor:
    """image (3, H, W) normalized -> prediction (H, W) int64: sliding windows at every scale, probabilities averaged."""
    _, h, w = image.shape
    base = base_size or max(h, w)
    total = torch.zeros(num_classes, h, w, device=image.device)
    for s in scales:
        long = max(int(round(s * base)), 1)
        nh, nw = (long, max(int(long * w / h + 0.5), 1)) if h > w else (max(int(long * h / w + 0.5), 1), long)
        x = image if (nh, nw) == (h, w) else F.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                                           align_corners=False)[0]
        p = sliding_window(model, x, num_classes, crop, flip=flip)
        if (nh, nw) != (h, w):
            p = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        total += p
    return total.argmax(0)


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, crop, scales=(1.0,), base_size=None, flip: bool = True,
             device="cpu", save_dir=None, palette=None, rank: int = 0, world: int = 1, log=None) -> dict:
    """Runs the protocol over dataset (a SegDataset without augmentation: (image, label, index) items); images
    rank, rank + world, ... on this process; metrics all-reduced when world > 1. -> Metrics.summary()."""
    was_training = model.training
    model.eval()
    metrics = Metrics(num_classes)
    n = len(dataset)
    t0 = time.time()
    try:
        for j, i in enumerate(range(rank, n, world)):
            image, label, _ = dataset[i]
            pred = predict_image(model, image.to(device), num_classes, crop, scales, base_size, flip).cpu()
            if label.numel():
                metrics.update(pred, label)
            if save_dir is not None:
                name = dataset.source.name(i)
                save_colorized(pred.numpy(), palette, os.path.join(save_dir, name + ".png"))
                if label.numel():
                    lab = label.numpy().copy()
                    save_colorized(lab, palette, os.path.join(save_dir, name + "_gt.png"))
                img, _ = dataset.source.load(i)
                save_rgb(img, os.path.join(save_dir, name + "_image.png"))
            if log is not None and (j + 1) % 50 == 0:
                log(f"eval {j + 1}/{len(range(rank, n, world))} images, {time.time() - t0:.1f}s")
    finally:
        model.train(was_training)
    if world > 1:
        areas = metrics.areas().to(device)
        dist.all_reduce(areas)
        metrics.merge(areas.cpu())
    return metrics.summary()


def save_colorized(pred, palette, path):
    pal = palette.copy()
    if len(pal) < 256:
        pal = np.concatenate([pal, np.zeros((256 - len(pal), 3), np.uint8)])
    _save_colorized(pred, pal, path)


def save_rgb(img, path):
    _save_rgb(img, path)


def build_parser(prog="pspnet-fast eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint (this project's or the authors': {'state_dict': ...})")
    p.add_argument("--data", default="synthetic", help="'synthetic' or an authors'-format list file "
                                                       "(\"image label\" per line)")
    p.add_argument("--data-root", default=None, help="root the list's paths are relative to (default: its folder)")
    p.add_argument("--num-classes", type=positive_int_arg, default=None, help="classes (default: the checkpoint's, else "
                                                                 "required for list data)")
    p.add_argument("--layers", type=positive_int_arg, default=None, help="backbone depth (default: the checkpoint's)")
    p.add_argument("--width", type=positive_int_arg, default=None,
                   help="backbone width for layers 18/34 (default: the checkpoint's)")
    p.add_argument("--no-ppm", dest="use_ppm", action="store_false", default=None,
                   help="the model has no pyramid (default: the checkpoint's)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="fused PPM kernels (default) or the pure-PyTorch reference")
    p.add_argument("--crop", type=positive_int_arg, nargs="+", default=None, help="sliding-window crop H [W] (default: the "
                                                                     "training crop, else 473)")
    p.add_argument("--scales", type=positive_float_arg, nargs="+", default=[1.0],
                   help="multi-scale: e.g. 0.5 0.75 1.0 1.25 1.5 1.75 (default 1.0)")
    p.add_argument("--base-size", type=positive_int_arg, default=None, help="long side at scale 1 (default: each image's own)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal-flip averaging")
    p.add_argument("--names", default=None, help="class names file, one per line (the authors' *_names.txt)")
    p.add_argument("--colors", default=None, help="palette file, 'R G B' per line (the authors' *_colors.txt); "
                                                  "default: the synthetic set's or the VOC colour map")
    p.add_argument("--save-dir", default=None, help="write colourized predictions (and image, ground truth) as PNG")
    p.add_argument("--limit", type=positive_int_arg, default=None, help="evaluate the first N images only")
    p.add_argument("--synthetic-size", type=positive_int_arg, default=None, help="synthetic image size (default: the checkpoint's)")
    p.add_argument("--synthetic-val", type=positive_int_arg, default=None, help="synthetic validation images (default: the "
                                                                   "checkpoint's)")
    p.add_argument("--seed", type=int, default=None, help="synthetic seed (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def main(argv=None, prog="pspnet-fast eval") -> int:
    args = build_parser(prog).parse_args(argv)
    ckpt = read_checkpoint(args.checkpoint)  # OSError / ValueError naming the file
    cfg = dict(ckpt.get("config", {})) if isinstance(ckpt, dict) else {}
    for key in ("layers", "width", "num_classes", "use_ppm", "seed"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.synthetic_size is not None:
        cfg["synthetic_size"] = args.synthetic_size
    if args.synthetic_val is not None:
        cfg["synthetic_val"] = args.synthetic_val
    cfg.setdefault("layers", 50)
    cfg.setdefault("width", 64)
    cfg.setdefault("use_ppm", True)
    cfg.setdefault("seed", 0)
    cfg.setdefault("synthetic_size", 128)
    cfg.setdefault("synthetic_val", 100)
    source = make_source(args.data, "val", cfg, args.data_root, need_labels=False)
    if args.limit is not None:
        source = _Limited(source, args.limit)
    if cfg.get("num_classes") is None:
        raise ValueError("--num-classes is required: the checkpoint does not record it")
    k = cfg["num_classes"]
    if hasattr(source, "num_classes") and source.num_classes != k:
        raise ValueError(f"the checkpoint has {k} classes, the data {source.num_classes}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(cfg["layers"], k, cfg["width"], cfg["use_ppm"], args.fused)
    load_checkpoint(model, args.checkpoint)
    model.to(device)
    crop = tuple(args.crop or cfg.get("crop") or (473, 473))
    crop = (crop[0], crop[-1])
    classes = read_names_opt(args.names) or getattr(source, "classes", None)
    palette = getattr(source, "palette", None)
    if args.colors:
        palette = read_colors(args.colors)
    ds = SegDataset(source)
    t0 = time.time()
    summary = evaluate(model, ds, k, crop, tuple(args.scales), args.base_size, args.flip, device, args.save_dir,
                       palette, log=print)
    print(format_table(summary, list(classes) if classes and len(classes) == k else None))
    print(f"{len(ds)} images in {time.time() - t0:.1f}s (crop {crop[0]}x{crop[1]}, scales "
          f"{' '.join(str(s) for s in args.scales)}, flip {'on' if args.flip else 'off'})")
    if args.save_dir:
        print(f"colourized predictions in {args.save_dir}")
    return 0


def read_names_opt(path):
    if not path:
        return None
    return read_names(path)


class _Limited:
    def __init__(self, source, n):
        self._s, self._n = source, min(n, len(source))

    def __len__(self):
        return self._n

    def __getattr__(self, k):
        return getattr(self._s, k)


if __name__ == "__main__":
    sys.exit(main())
