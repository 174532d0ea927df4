"""PSP head benchmarks: `head` (forward, eval, no_grad) and `head-train` (forward + backward, training, dropout 0).

The reference is pspnet_fast.reference.PSPHead (PPM, then conv3x3 4096->512, BatchNorm, ReLU, Dropout2d, conv1x1 ->
150 classes). A fused head proper does not exist yet: the fused provider is the same head with its `ppm` replaced by
pspnet_fast.PyramidPooling.from_reference(head.ppm, backend=...), hence "fused-<backend> (fused PPM)". The 3x3
convolution dominates the time, so these rows show what the fused PPM buys inside the head, not a fused head.

    python -m pspnet_fast.benchmarks.bench_head --shape 1,2048,60,60
"""
from __future__ import annotations

import copy
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

    def make_fused(backend, r):
        head = copy.deepcopy(r)
        head.ppm = pspnet_fast.PyramidPooling.from_reference(r.ppm, backend=backend)
        return head

    return build_case("head-train" if train else "head", shape, dtype, device, channels_last, ref, make_fused, x,
                      (n, NUM_CLASSES, h, w), train, compile_ref, deep=True, fused_label=" (fused PPM)")


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
