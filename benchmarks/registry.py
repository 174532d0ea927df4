"""The one place the benchmark workloads are registered: every bench_*.py script's WORKLOADS, by name. The suite
(`pspnet-fast bench`) reads this; no script imports the suite."""
from __future__ import annotations

from . import bench_export, bench_head, bench_patched, bench_ppm, bench_pspnet
from .common import Workload

WORKLOADS: dict[str, Workload] = {w.name: w for w in (bench_ppm.WORKLOADS + bench_head.WORKLOADS + bench_pspnet.WORKLOADS
                                                     + bench_export.WORKLOADS + bench_patched.WORKLOADS)}
