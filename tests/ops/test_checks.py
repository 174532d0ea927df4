"""One argument checker per op (pspnet_fast/_checks.py, csrc/op_checks.h): the same bad input raises the same exception
with the same text on the CPU kernels, the fake (meta) kernels and the Triton ops (run in a subprocess under
TRITON_INTERPRET=1, which must be set before triton is imported); CUDA under the needs_cuda mark.

Run as a script (`python tests/ops/test_checks.py --triton`), this file prints the Triton ops' messages as JSON."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _x(*shape, dtype=torch.float32):
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape).to(dtype) / 7


X, G = (1, 2, 3, 3), (1, 7, 3, 3)
# (id, op, args, kwargs, runs on triton): every case is invalid input. Triton's pyramid_pool_backward has no x_offset
# and its upsample_concat_backward no x_last.
CASES = [
    ("pool-bins-2^32", "pyramid_pool", lambda: (_x(*X), [2 ** 32]), {}, True),
    ("pool-bins-2^63-1", "pyramid_pool", lambda: (_x(*X)[:0], [2 ** 63 - 1]), {}, True),
    ("pool-bins-symint", "pyramid_pool", lambda: (_x(*X), [3037000500]), {}, True),
    ("pool-bins-negative", "pyramid_pool", lambda: (_x(*X), [-1]), {}, True),
    ("pool-bins-zero", "pyramid_pool", lambda: (_x(*X), [0, 2]), {}, True),
    ("pool-bins-empty", "pyramid_pool", lambda: (_x(*X), []), {}, True),
    ("pool-17-levels", "pyramid_pool", lambda: (_x(*X), [1] * 17), {}, True),
    ("pool-sum-b2", "pyramid_pool", lambda: (_x(*X), [4096, 4096]), {}, True),
    ("pool-3d", "pyramid_pool", lambda: (_x(1, 2, 3), [1]), {}, True),
    ("pool-int32", "pyramid_pool", lambda: (_x(*X).int(), [1]), {}, True),
    ("pool-C0", "pyramid_pool", lambda: (_x(1, 0, 3, 3), [1]), {}, True),
    ("pool-H0", "pyramid_pool", lambda: (_x(1, 2, 0, 3), [1]), {}, True),
    ("reduce-weight-shape", "ppm_reduce", lambda: (_x(1, 2, 5), _x(2, 3, 4), None, None, [1, 2], True), {}, True),
    ("reduce-weight-dtype", "ppm_reduce",
     lambda: (_x(1, 2, 5), _x(2, 3, 2, dtype=torch.float64), None, None, [1, 2], True), {}, True),
    ("reduce-pooled-half", "ppm_reduce",
     lambda: (_x(1, 2, 5).half(), _x(2, 3, 2).half(), None, None, [1, 2], True), {}, True),
    ("reduce-pooled-S", "ppm_reduce", lambda: (_x(1, 2, 4), _x(2, 3, 2), None, None, [1, 2], True), {}, True),
    ("reduce-scale-alone", "ppm_reduce", lambda: (_x(1, 2, 5), _x(2, 3, 2), _x(2, 3), None, [1, 2], True), {}, True),
    ("reduce-scale-shape", "ppm_reduce",
     lambda: (_x(1, 2, 5), _x(2, 3, 2), _x(2, 2), _x(2, 3), [1, 2], True), {}, True),
    ("reduce-shift-dtype", "ppm_reduce",
     lambda: (_x(1, 2, 5), _x(2, 3, 2), _x(2, 3), _x(2, 3, dtype=torch.float64), [1, 2], True), {}, True),
    ("up-bins-2^32-cl", "upsample_concat",
     lambda: (_x(*X).contiguous(memory_format=torch.channels_last), _x(1, 2, 0), [2 ** 32], True), {}, True),
    ("up-levels-shape", "upsample_concat", lambda: (_x(*X), _x(1, 3, 4), [1, 2], True), {}, True),
    ("up-levels-int", "upsample_concat", lambda: (_x(*X), _x(1, 3, 5).int(), [1, 2], True), {}, True),
    ("up-levels-half", "upsample_concat", lambda: (_x(*X), _x(1, 3, 5).half(), [1, 2], True), {}, True),
    ("up-C0", "upsample_concat", lambda: (_x(1, 0, 3, 3), _x(1, 3, 5), [1, 2], True), {}, True),
    ("up-bins-empty", "upsample_concat", lambda: (_x(*X), _x(1, 4, 0), [], True), {}, True),
    ("upb-not-multiple", "upsample_concat_backward", lambda: (_x(*G), 2, [1, 2], True), {}, True),
    ("upb-R0", "upsample_concat_backward", lambda: (_x(*G), 7, [1, 2], True), {}, True),
    ("upb-negative-C", "upsample_concat_backward", lambda: (_x(*G), -1, [1, 2], True), {}, True),
    ("upb-bins-empty", "upsample_concat_backward", lambda: (_x(*G), 1, [], True), {}, True),
    ("upb-3d", "upsample_concat_backward", lambda: (_x(1, 7, 3), 1, [1, 2], True), {}, True),
    ("upb-int", "upsample_concat_backward", lambda: (_x(*G).int(), 1, [1, 2], True), {}, True),
    ("ppb-C-too-big", "pyramid_pool_backward", lambda: (_x(1, 8, 5), _x(*G), [1, 2]), {}, True),
    ("ppb-half", "pyramid_pool_backward", lambda: (_x(1, 2, 5).half(), _x(*G), [1, 2]), {}, True),
    ("ppb-S", "pyramid_pool_backward", lambda: (_x(1, 2, 4), _x(*G), [1, 2]), {}, True),
    ("ppb-3d", "pyramid_pool_backward", lambda: (_x(1, 2, 5), _x(1, 7, 3), [1, 2]), {}, True),
    ("ppb-offset-wraps", "pyramid_pool_backward",
     lambda: (torch.zeros(2, 8, 50), torch.arange(10000.)[5000:6400].view(2, 20, 5, 7), [1, 2, 3, 6], 2 ** 63 - 8),
     {}, False),
    ("ppb-offset-negative", "pyramid_pool_backward", lambda: (_x(1, 2, 5), _x(*G), [1, 2], -1), {}, False),
    ("ppb-offset-past-end", "pyramid_pool_backward", lambda: (_x(1, 2, 5), _x(*G), [1, 2], 6), {}, False),
    ("epi-q-shape", "head_epilogue", lambda: (_x(1, 3, 3, 3), _x(1, 3, 9, 4), [1, 2], True, None, None, False), {},
     True),
    ("epi-q-double", "head_epilogue",
     lambda: (_x(1, 3, 3, 3), _x(1, 3, 9, 5, dtype=torch.float64), [1, 2], True, None, None, False), {}, True),
    ("epi-q-for-double-z", "head_epilogue",
     lambda: (_x(1, 3, 3, 3, dtype=torch.float64), _x(1, 3, 9, 5), [1, 2], True, None, None, False), {}, True),
    ("epi-scale-alone", "head_epilogue",
     lambda: (_x(1, 3, 3, 3), _x(1, 3, 9, 5), [1, 2], True, _x(3), None, False), {}, True),
    ("epi-scale-shape", "head_epilogue",
     lambda: (_x(1, 3, 3, 3), _x(1, 3, 9, 5), [1, 2], True, _x(2), _x(3), False), {}, True),
    ("epi-shift-dtype", "head_epilogue",
     lambda: (_x(1, 3, 3, 3), _x(1, 3, 9, 5), [1, 2], True, _x(3), _x(3, dtype=torch.float64), False), {}, True),
    ("epi-z-int", "head_epilogue", lambda: (_x(1, 3, 3, 3).int(), _x(1, 3, 9, 5), [1, 2], True, None, None, False),
     {}, True),
    ("ctx-3d", "head_context_backward", lambda: (_x(1, 3, 3), [1, 2], True), {}, True),
    ("ctx-bins-empty", "head_context_backward", lambda: (_x(1, 3, 3, 3), [], True), {}, True),
    ("ctx-bins-zero", "head_context_backward", lambda: (_x(1, 3, 3, 3), [0, 2], True), {}, True),
]


def _outcome(fn, args, kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # the exception type and the first line of its text
        return [type(e).__name__, str(e).splitlines()[0]]
    return ["no error", ""]


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _ext_ops():
    import pspnet_fast  # noqa: F401  (loads the extension and registers the fake kernels)
    if not pspnet_fast.available_backends()["cpu"]["available"]:
        pytest.skip("extension not built")
    return torch.ops.pspnet_fast


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cpu_and_meta_raise_the_same_error(case):
    ops = _ext_ops()
    _, op, make, kwargs, _ = case
    cpu = _outcome(getattr(ops, op), make(), kwargs)
    meta = _outcome(getattr(ops, op), _to(make(), "meta"), kwargs)
    assert cpu[0] in ("ValueError", "TypeError"), cpu
    assert cpu[1].startswith(f"pspnet_fast.{op}: "), cpu
    assert cpu == meta


@pytest.mark.needs_cuda
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_raises_the_cpu_error(case):
    ops = _ext_ops()
    _, op, make, kwargs, _ = case
    # The shared check runs first, so even the x_offset cases (the CUDA kernel takes x_offset = 0 only) match.
    assert _outcome(getattr(ops, op), _to(make(), "cuda"), kwargs) == _outcome(getattr(ops, op), make(), kwargs)


def _triton_outcomes() -> dict:
    """Runs in a fresh interpreter with TRITON_INTERPRET=1: {case id: outcome} of the Triton ops."""
    from pspnet_fast.kernels import head_triton, ppm_triton  # noqa: F401  (register the triton_* ops)
    ops = torch.ops.pspnet_fast
    return {cid: _outcome(getattr(ops, "triton_" + op), make(), kwargs)
            for cid, op, make, kwargs, on_triton in CASES if on_triton}


@pytest.fixture(scope="module")
def triton_outcomes():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PSPNET_FAST_QUIET="1")
    r = subprocess.run([sys.executable, __file__, "--triton"], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]])
def test_triton_raises_the_cpu_error(case, triton_outcomes):
    ops = _ext_ops()
    cid, op, make, kwargs, _ = case
    assert triton_outcomes[cid] == _outcome(getattr(ops, op), make(), kwargs)


def test_mixed_devices_are_refused_both_ways():
    """Issue 14 finding 3: a CPU op given a meta tensor read garbage; every tensor must be on x's device."""
    ops = _ext_ops()
    x, levels = _x(2, 3, 4, 4), _x(2, 3, 50)
    with pytest.raises(ValueError, match="levels must be on x's device cpu, got meta"):
        ops.upsample_concat(x, levels.to("meta"), [1, 2, 3, 6], True)
    with pytest.raises(ValueError, match="levels must be on x's device meta, got cpu"):
        ops.upsample_concat(x.to("meta"), levels, [1, 2, 3, 6], True)
    with pytest.raises(ValueError, match="weight must be on pooled's device cpu, got meta"):
        ops.ppm_reduce(_x(2, 3, 5), _x(2, 4, 3).to("meta"), None, None, [1, 2], True)
    with pytest.raises(ValueError, match="grad_pooled must be on grad_out's device cpu, got meta"):
        ops.pyramid_pool_backward(_x(2, 3, 5).to("meta"), _x(2, 9, 4, 4), [1, 2])
    with pytest.raises(ValueError, match="q must be on z's device cpu, got meta"):
        ops.head_epilogue(_x(1, 3, 3, 3), _x(1, 3, 9, 5).to("meta"), [1, 2], True, None, None, False)
    with pytest.raises(ValueError, match="scale must be on z's device cpu, got meta"):
        ops.head_epilogue(_x(1, 3, 3, 3), _x(1, 3, 9, 5), [1, 2], True, _x(3).to("meta"), _x(3), False)


def test_ppm_forward_fake_checks():
    """ppm_forward (no CPU kernel yet in this tree): its fake kernel applies the same rules."""
    ops = _ext_ops()
    x = _x(1, 2, 3, 3).to("meta")
    with pytest.raises(ValueError, match=r"pspnet_fast.ppm_forward: weight must be of shape \(L, R, C\) = \(2, R, 2\)"):
        ops.ppm_forward(x, _x(2, 3, 3).to("meta"), None, None, [1, 2], True, True)
    with pytest.raises(TypeError, match="ppm_forward: weight must be torch.float32, got torch.float16"):
        ops.ppm_forward(x, _x(2, 3, 2).half().to("meta"), None, None, [1, 2], True, True)
    with pytest.raises(ValueError, match="ppm_forward: bins must be positive ints of at most 4096"):
        ops.ppm_forward(x, _x(1, 3, 2).to("meta"), None, None, [2 ** 40], True, True)
    assert ops.ppm_forward(x, _x(2, 3, 2).to("meta"), None, None, [1, 2], True, True).shape == (1, 8, 3, 3)


def test_bounds_are_inclusive():
    """The largest allowed bins (b = 4096: S = 2^24) pass the checks (meta: nothing is allocated)."""
    ops = _ext_ops()
    out = ops.pyramid_pool(torch.empty(0, 1, 3, 3, device="meta"), [4096])
    assert out.shape == (0, 1, 4096 * 4096)
    assert ops.pyramid_pool(torch.empty(0, 1, 3, 3), [4096]).shape == (0, 1, 4096 * 4096)


if __name__ == "__main__" and "--triton" in sys.argv:
    print(json.dumps(_triton_outcomes()))
