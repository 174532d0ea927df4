"""Pyramid Pooling Module benchmarks: `ppm` (forward, eval, no_grad) and `ppm-train` (forward + backward, training).

Providers on the same input in one run: the reference eager (pspnet_fast.reference.PyramidPooling), torch.compile of
it, pspnet_fast.PyramidPooling on every fused backend that runs here, and a plain copy (the bandwidth probe). The
fused module trains through the autograd registered for its ops; ppm-train compares the output and x.grad.

    python -m pspnet_fast.benchmarks.bench_ppm --shape 1,2048,60,60
    python -m pspnet_fast.benchmarks.bench_ppm --workload ppm-train --shape 2,2048,60,60
"""
from __future__ import annotations

import sys

import torch

from .common import Case, Workload, build_case, randomize_bn


def build(shape, dtype, device, channels_last=False, compile_ref=True, train=False) -> Case:
    """x (N, C, H, W) -> (N, 2C, H, W): bins (1, 2, 3, 6), C/4 channels per level, align_corners=True (the authors').
    Random weights (seed 0) with non-trivial BatchNorm statistics, x ~ N(0, 1)."""
    import pspnet_fast
    from pspnet_fast.reference import PyramidPooling as RefPPM

    n, c, h, w = shape
    torch.manual_seed(0)
    ref = RefPPM(c)
    randomize_bn(ref)
    x = torch.randn(n, c, h, w)
    return build_case("ppm-train" if train else "ppm", shape, dtype, device, channels_last, ref,
                      lambda backend, r: pspnet_fast.PyramidPooling.from_reference(r, backend=backend), x,
                      (n, ref.out_channels, h, w), train, compile_ref,
                      # Training: gradients through BatchNorm's batch statistics, the gradient tests' tolerance.
                      deep=train)


def build_train(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    return build(shape, dtype, device, channels_last, compile_ref, train=True)


WORKLOADS = [
    Workload("ppm", build, train=False, rounds=15, warmup=3, quick_shape=(1, 256, 13, 13),
             about="PPM forward, eval, no_grad"),
    Workload("ppm-train", build_train, train=True, rounds=7, warmup=1, quick_shape=(2, 256, 13, 13),
             about="PPM forward + backward, training mode, out.backward(g), g fixed"),
]


def main(argv=None) -> int:
    from .suite import main as suite_main

    return suite_main(argv, only=[w.name for w in WORKLOADS], prog="python -m pspnet_fast.benchmarks.bench_ppm")


if __name__ == "__main__":
    sys.exit(main())
