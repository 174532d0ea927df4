"""Whole-model benchmark `pspnet`: PSPNet-50 inference (eval, no_grad), 150 classes.

Reference: pspnet_fast.models.PSPNet(50, num_classes=150, fused=False); fused: the same weights in
PSPNet(..., fused=True, backend=...): the fused PPM and the fused head (pspnet_fast.nn.head); the backbone and the aux
branch (not run in eval) are the same modules. The image size
comes from the feature size: the dilated ResNet has output stride 8, features H x W <- image (8(H-1)+1) x (8(W-1)+1)
(60x60 <- 473x473, 90x90 <- 713x713, 64x128 <- 505x1017). The rows' shape is the image (N, 3, Hi, Wi); C of --shape
is the backbone's 2048 whatever is given.

    python -m pspnet_fast.benchmarks.bench_pspnet --shape 1,2048,25,25
"""
from __future__ import annotations

import sys

import torch

from pspnet_fast.models import PSPNet

from .common import C, Case, Workload, build_case, randomize_bn
from .runner import run

NUM_CLASSES = 150
FEATURE_CHANNELS = 2048  # ResNet-50 layer4


def image_size(h: int, w: int) -> tuple[int, int]:
    """Image size whose output-stride-8 features are h x w."""
    return 8 * (h - 1) + 1, 8 * (w - 1) + 1


def label(shape) -> str:
    """'pspnet 1x3x473x473 (features 60x60)': the image it runs on."""
    hi, wi = image_size(shape[2], shape[3])
    return f"pspnet {shape[0]}x3x{hi}x{wi} (features {shape[2]}x{shape[3]})"


def build(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    """Feature shape (N, C, H, W) -> image x (N, 3, 8(H-1)+1, 8(W-1)+1) -> logits (N, 150, same size)."""
    n, c, h, w = shape
    hi, wi = image_size(h, w)
    torch.manual_seed(0)
    ref = PSPNet(50, num_classes=NUM_CLASSES, fused=False)
    randomize_bn(ref.ppm)
    x = torch.randn(n, 3, hi, wi)

    def make_fused(backend, r):
        fused = PSPNet(50, num_classes=NUM_CLASSES, fused=True, backend=backend)
        fused.load_state_dict(r.state_dict(), strict=True)
        return fused

    return build_case("pspnet", (n, 3, hi, wi), dtype, device, channels_last, ref, make_fused, x,
                      (n, NUM_CLASSES, hi, wi), False, compile_ref, deep=True,
                      extra={"feature_shape": [n, FEATURE_CHANNELS, h, w]})


WORKLOADS = [
    Workload("pspnet", build, train=False, rounds=3, warmup=0, quick_shape=(1, 2048, 9, 9),
             about="PSPNet-50 inference, eval, no_grad, at the image size of the feature shape",
             # A 193x193 image (~2 min on the 2-core CPU, half of it compiling); a 473x473 image is ~6x the work.
             default_shapes=((1, C, 25, 25),), cost_s=(63, 360), label=label, fixed_channels=C),
]


def main(argv=None) -> int:
    return run(argv, {w.name: w for w in WORKLOADS}, "python -m pspnet_fast.benchmarks.bench_pspnet", __doc__)


if __name__ == "__main__":
    sys.exit(main())
