"""Segmentation metrics as the PSPNet authors compute them (per-class IoU and accuracy over a whole set; mIoU, mAcc,
allAcc) and their table: used by both training (validation) and evaluation."""
from __future__ import annotations

import numpy as np
import torch

from .data import IGNORE_INDEX

__all__ = ["intersection_union", "Metrics", "format_table"]


def intersection_union(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """pred, target: int tensors of one shape. -> (intersection, union, target) areas per class, int64 (K,).
    Pixels whose target is ignore_index count nowhere."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"label values must be 0..{num_classes - 1} or {ignore_index}, got {int(t.min())}.."
                         f"{int(t.max())}")
    inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes]
    area_p = torch.bincount(p.clamp(0, num_classes - 1), minlength=num_classes)[:num_classes]
    area_t = torch.bincount(t, minlength=num_classes)[:num_classes]
    return inter, area_p + area_t - inter, area_t


class Metrics:
    """Accumulates intersection/union/target areas over a set; .summary() -> dict(iou, acc (K,) float arrays,
    miou, macc, allacc)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.inter = torch.zeros(num_classes, dtype=torch.int64)
        self.union = torch.zeros(num_classes, dtype=torch.int64)
        self.target = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, pred, target) -> None:
        i, u, t = intersection_union(torch.as_tensor(pred).cpu(), torch.as_tensor(target).cpu(), self.num_classes)
        self.inter += i
        self.union += u
        self.target += t

    def merge(self, areas: torch.Tensor) -> None:
        """areas: (3, K) = stacked (inter, union, target), e.g. all-reduced over processes."""
        self.inter, self.union, self.target = (a.clone() for a in areas.to(torch.int64))

    def areas(self) -> torch.Tensor:
        return torch.stack([self.inter, self.union, self.target])

    def summary(self) -> dict:
        eps = 1e-10
        inter, union, target = (a.double().numpy() for a in (self.inter, self.union, self.target))
        iou, acc = inter / (union + eps), inter / (target + eps)
        return {"iou": iou, "acc": acc, "miou": float(iou.mean()), "macc": float(acc.mean()),
                "allacc": float(inter.sum() / (target.sum() + eps))}


def format_table(summary: dict, classes=None) -> str:
    k = len(summary["iou"])
    classes = classes or [str(i) for i in range(k)]
    width = max(12, max(len(c) for c in classes))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}"]
    for c, iou, acc in zip(classes, summary["iou"], summary["acc"]):
        lines.append(f"{c:<{width}}  {100 * iou:7.2f}  {100 * acc:7.2f}")
    lines.append(f"mIoU {100 * summary['miou']:.2f}  mAcc {100 * summary['macc']:.2f}  "
                 f"allAcc {100 * summary['allacc']:.2f}")
    return "\n".join(lines)
