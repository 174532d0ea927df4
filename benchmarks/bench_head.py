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

from .common import Case, Workload, build_case, randomize_bn

NUM_CLASSES = 150  # ADE20K, the 473x473 setting


def build(shape, dtype, device, channels_last=False, compile_ref=True, train=False) -> Case:
    """x (N, C, H, W) -> logits (N, 150, H, W). Dropout 0, so training outputs compare exactly in kind."""
    import pspnet_fast
    from pspnet_fast.reference import PSPHead

    n, c, h, w = shape
    torch.manual_seed(0)
    ref = PSPHead(c, NUM_CLASSES, dropout=0.0)
    randomize_bn(ref.ppm)
    x = torch.randn(n, c, h, w)

    return build_case("head-train" if train else "head", shape, dtype, device, channels_last, ref,
                      lambda backend, r: pspnet_fast.PSPHead.from_reference(r, backend=backend), x,
                      (n, NUM_CLASSES, h, w), train, compile_ref, deep=True)


def build_train(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    return build(shape, dtype, device, channels_last, compile_ref, train=True)


WORKLOADS = [
    Workload("head", build, train=False, rounds=5, warmup=0, quick_shape=(1, 256, 13, 13),
             about="PSP head forward, eval, no_grad"),
    Workload("head-train", build_train, train=True, rounds=3, warmup=0, quick_shape=(2, 256, 13, 13),
             about="PSP head forward + backward, training mode, dropout 0"),
]


def main(argv=None) -> int:
    from .suite import main as suite_main

    return suite_main(argv, only=[w.name for w in WORKLOADS], prog="python -m pspnet_fast.benchmarks.bench_head")


if __name__ == "__main__":
    sys.exit(main())
