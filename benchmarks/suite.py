"""The benchmark suite (`pspnet-fast bench`): every workload, every provider, on the same inputs in one run.

Workloads (--workload, repeatable or comma-separated; default all):
    ppm         PPM forward, eval, no_grad                                   (bench_ppm.py)
    ppm-train   PPM forward + backward in training mode                      (bench_ppm.py)
    head        PSP head forward, eval; head-train: forward + backward       (bench_head.py)
    pspnet      PSPNet-50 inference at the image size of the feature shape   (bench_pspnet.py)
Providers: reference eager, torch.compile(reference), every fused backend that runs here, a plain copy.

Sizes are backbone feature maps N,C,H,W, from the published settings: 473x473 crops -> 60x60 features, 713x713 ->
90x90, Cityscapes 512x1024 -> 64x128 (C = 2048). Training workloads use N = 2 (BatchNorm in training refuses the
single value per channel of the 1x1 pyramid level at N = 1). The default run is sized to finish in under ~10
minutes on a 2-core CPU (what `make bench` runs on); what it leaves out is listed at the end with a time estimate
and `--all` includes it.

    pspnet-fast bench                                   # default set
    pspnet-fast bench --quick --no-compile              # small shapes, seconds
    pspnet-fast bench --device cuda --dtype bfloat16 --shape 8,2048,90,90 --workload ppm,ppm-train --json out.json
"""
from __future__ import annotations

import sys

from .registry import WORKLOADS
from .runner import run

__all__ = ["WORKLOADS", "main"]


def main(argv=None, prog: str = "pspnet-fast bench") -> int:
    """Runs the suite; returns the exit status: 0, or 1 when any row is WRONG or FAILED (2: bad arguments)."""
    return run(argv, WORKLOADS, prog, __doc__)


if __name__ == "__main__":
    sys.exit(main())
