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

from pspnet_fast.nn import PyramidPooling as FusedPPM
from pspnet_fast.reference import PyramidPooling as RefPPM

from .common import SIZES, Case, Workload, build_case, feature_shape, randomize_bn
from .runner import run


def build(shape, dtype, device, channels_last=False, compile_ref=True, train=False) -> Case:
    """x (N, C, H, W) -> (N, 2C, H, W): bins (1, 2, 3, 6), C/4 channels per level, align_corners=True (the authors').
    Random weights (seed 0) with non-trivial BatchNorm statistics, x ~ N(0, 1)."""
    n, c, h, w = shape
    torch.manual_seed(0)
    ref = RefPPM(c)
    randomize_bn(ref)
    x = torch.randn(n, c, h, w)
    return build_case("ppm-train" if train else "ppm", shape, dtype, device, channels_last, ref,
                      lambda backend, r: FusedPPM.from_reference(r, backend=backend), x,
                      (n, ref.out_channels, h, w), train, compile_ref,
                      # Training: gradients through BatchNorm's batch statistics, the gradient tests' tolerance.
                      deep=train)


def build_train(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    return build(shape, dtype, device, channels_last, compile_ref, train=True)


WORKLOADS = [
    Workload("ppm", build, train=False, rounds=15, warmup=3, quick_shape=(1, 256, 13, 13),
             about="PPM forward, eval, no_grad", default_shapes=tuple(feature_shape(False, hw) for hw in SIZES.values()),
             cost_s=(20, 22)),
    Workload("ppm-train", build_train, train=True, rounds=7, warmup=1, quick_shape=(2, 256, 13, 13),
             about="PPM forward + backward, training mode, out.backward(g), g fixed",
             default_shapes=(feature_shape(True, SIZES["473x473"]),), cost_s=(33, 56)),
]


def main(argv=None) -> int:
    return run(argv, {w.name: w for w in WORKLOADS}, "python -m pspnet_fast.benchmarks.bench_ppm", __doc__)


if __name__ == "__main__":
    sys.exit(main())
