"""PSP head benchmarks: `head` (forward, eval, no_grad) and `head-train` (forward + backward, training, dropout 0).

The reference is pspnet_fast.reference.PSPHead (PPM, then conv3x3 4096->512, BatchNorm, ReLU, Dropout2d, conv1x1 ->
150 classes); the fused provider is pspnet_fast.PSPHead.from_reference(ref, backend=...): the fused PPM's pool and
1x1 reductions, conv3x3 over x only (2048 of the 4096 input channels) and one epilogue adding the levels' context with
BatchNorm and ReLU. The 3x3 convolution dominates the time; the bound is half the reference's multiply-adds.

    python -m pspnet_fast.benchmarks.bench_head --shape 1,2048,60,60
"""
from __future__ import annotations

import sys

import torch

from pspnet_fast.nn import PSPHead as FusedHead
from pspnet_fast.reference import PSPHead

from .common import C, SIZES, Case, Workload, build_case, feature_shape, randomize_bn
from .runner import run

NUM_CLASSES = 150  # ADE20K, the 473x473 setting


def build(shape, dtype, device, channels_last=False, compile_ref=True, train=False) -> Case:
    """x (N, C, H, W) -> logits (N, 150, H, W). Dropout 0, so training outputs compare exactly in kind."""
    n, c, h, w = shape
    torch.manual_seed(0)
    ref = PSPHead(c, NUM_CLASSES, dropout=0.0)
    randomize_bn(ref.ppm)
    x = torch.randn(n, c, h, w)

    return build_case("head-train" if train else "head", shape, dtype, device, channels_last, ref,
                      lambda backend, r: FusedHead.from_reference(r, backend=backend), x,
                      (n, NUM_CLASSES, h, w), train, compile_ref, deep=True)


def build_train(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    return build(shape, dtype, device, channels_last, compile_ref, train=True)


WORKLOADS = [
    Workload("head", build, train=False, rounds=5, warmup=0, quick_shape=(1, 256, 13, 13),
             about="PSP head forward, eval, no_grad", default_shapes=(feature_shape(False, SIZES["473x473"]),),
             cost_s=(16, 71)),
    Workload("head-train", build_train, train=True, rounds=3, warmup=0, quick_shape=(2, 256, 13, 13),
             about="PSP head forward + backward, training mode, dropout 0",
             # Its peak memory is the point; the 473 size is ~6 min on the 2-core CPU, 2x2048x30x30 ~1.5 min.
             default_shapes=((2, C, 30, 30),), cost_s=(40, 320)),
]


def main(argv=None) -> int:
    return run(argv, {w.name: w for w in WORKLOADS}, "python -m pspnet_fast.benchmarks.bench_head", __doc__)


if __name__ == "__main__":
    sys.exit(main())
