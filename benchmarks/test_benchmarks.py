"""The suite's workloads through pytest-benchmark: one test per workload x provider, on the same inputs per workload.

    pytest benchmarks/ --benchmark-only                        # small shapes (each workload's --quick shape), CPU
    PSPNET_FAST_BENCH_SHAPE=1,2048,60,60 pytest benchmarks/ --benchmark-only -k "ppm and not train"
    PSPNET_FAST_BENCH_DEVICE=cuda PSPNET_FAST_BENCH_DTYPE=bfloat16 pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only -k "not compile"       # without torch.compile's minutes of compiling

Not collected by `pytest tests` (nor by a bare `pytest`: testpaths is tests/). Each test first checks its provider
against the reference eager in the same process (the float64 oracle for half types), as the suite does, and fails
on a wrong result before timing it. Providers that cannot run here are skipped with the backend's reason.
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from pspnet_fast.benchmarks import common, suite  # noqa: E402

PROVIDERS = ["reference", "torch.compile", "fused-cpu", "fused-cuda", "fused-triton"]
DEVICE = os.environ.get("PSPNET_FAST_BENCH_DEVICE", "cpu")
DTYPE = os.environ.get("PSPNET_FAST_BENCH_DTYPE", "float32")
SHAPE = os.environ.get("PSPNET_FAST_BENCH_SHAPE")

_current: dict = {}


def _case(workload: str):
    """(case, expected outputs, float64 oracle outputs or None), built once per workload; one case alive at a time
    (a PSPNet-50 and its fused copy are hundreds of MB)."""
    if workload not in _current:
        _current.clear()
        torch._dynamo.reset()
        wl = suite.WORKLOADS[workload]
        shape = common.parse_shape(SHAPE) if SHAPE else wl.quick_shape
        if wl.train and shape[0] < 2:
            shape = (2, *shape[1:])  # BatchNorm in training needs two values per channel on the 1x1 level
        case = wl.build(shape, DTYPE, DEVICE, False, True)
        expect = [t.detach().clone() for t in case.providers["reference"]()]
        oracle = [t.detach().double() for t in case.oracle()] if case.oracle else None
        _current[workload] = (case, expect, oracle)
    return _current[workload]


def _provider(case, short: str):
    """The case's provider named `short` ("fused-cpu" matches "fused-cpu (fused PPM)"), or None and why not."""
    for name in case.providers:
        if name == short or name.startswith(short + " "):
            return name, None
    why = next((why for name, why in case.skipped.items() if name == short or name.startswith(short + " ")),
               "not requested")
    return None, why


# workload-major order, so that each workload's case is built once
PARAMS = [pytest.param(w, p, id=f"{w}-{p}") for w in suite.WORKLOADS for p in PROVIDERS]


@pytest.mark.parametrize("workload,provider", PARAMS)
def test_workload(benchmark, workload, provider):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("PSPNET_FAST_BENCH_DEVICE=cuda but no CUDA device is available")
    case, expect, oracle = _case(workload)
    name, why = _provider(case, provider)
    if name is None:
        pytest.skip(f"{provider}: {why}")
    fn = case.providers[name]
    got = [t.detach().clone() for t in fn()]  # also torch.compile's compile, outside the timing
    err, errs, wrong, detail = common.check_outputs(case, got, expect, oracle)
    assert not wrong, f"{name} disagrees with the reference: {detail}"
    benchmark.group = f"{workload} {common.fmt_shape(case.shape)} {case.dtype} {case.device}"
    benchmark.extra_info.update(workload=workload, shape=list(case.shape), dtype=case.dtype, device=case.device,
                                provider=name, max_abs_err=err, **common.machine_info(case.device))

    def call():
        fn()
        common.sync(case.device)

    benchmark.pedantic(call, rounds=suite.WORKLOADS[workload].rounds, iterations=1, warmup_rounds=1)
