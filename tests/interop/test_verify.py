"""patch(model, verify=True) (the default): each replacement is checked once on a small random input in eval against the
module it replaces; a mismatch leaves that module in place with the reason in `.skipped` (issue 14 finding 11: an
authors-layout PPM whose forward hard-codes align_corners=False was patched assuming True, without a word)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import pspnet_fast
from pspnet_fast.interop.patching import PatchedPyramidPooling

from . import lookalikes as la


@pytest.fixture(autouse=True)
def _cpu_extension():
    if not pspnet_fast.available_backends()["cpu"]["available"]:
        pytest.skip("extension not built")


class HardCodedPPM(la.AuthorsPPM):
    """The authors' layout, but the forward hard-codes align_corners=False (no attribute says so)."""

    def forward(self, x):
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), x.shape[2:], mode="bilinear", align_corners=False))
        return torch.cat(out, 1)


class HardCodedNet(la.AuthorsNet):
    def __init__(self):
        super().__init__()
        self.ppm = HardCodedPPM(16, 4, (1, 2, 3, 6))


def test_hard_coded_align_corners_is_left_unpatched_with_the_reason():
    model = la.randomize_bn(HardCodedNet()).eval()
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        want = model(x)
    result = pspnet_fast.patch(model)
    assert list(result) == []
    (name, why), = result.skipped
    assert name == "ppm" and "differs from the original" in why and "align_corners" in why
    assert type(model.ppm) is HardCodedPPM
    with torch.no_grad():
        assert torch.equal(model(x), want)
    # Without verification the replacement goes in (and is wrong: what verify=True prevents).
    result = pspnet_fast.patch(model, verify=False)
    assert list(result) == ["ppm"]
    with torch.no_grad():
        assert (model(x) - want).abs().max() > 1e-3


def test_verified_patch_keeps_modes_rng_and_statistics():
    model = la.randomize_bn(la.AuthorsNet()).train()
    model.cls.eval()  # a mixed state that must survive
    stats = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
    modes = {n: m.training for n, m in model.named_modules()}
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    result = pspnet_fast.patch(model)
    assert list(result) == ["ppm"] and isinstance(model.ppm, PatchedPyramidPooling)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k
    now = {n: m.training for n, m in model.named_modules()}
    assert all(now[n] == mode for n, mode in modes.items() if n in now), (modes, now)


@pytest.mark.parametrize("make", [lambda: la.EncoderDecoder(), lambda: la.SmpNet(), lambda: la.AuthorsNet()],
                         ids=["mmseg", "smp", "authors"])
def test_recognized_layouts_pass_verification(make):
    model = la.randomize_bn(make()).eval()
    result = pspnet_fast.patch(model)
    # The look-alikes' heads are not the real packages' classes, so head fusion is refused (and says so); the PPM
    # replacement passed its verification.
    skipped = [(q, why) for q, why in result.skipped if not why.startswith("head not fused")]
    assert len(result) == 1 and not skipped, (list(result), result.skipped)


def test_verification_runs_in_the_module_dtype():
    model = la.randomize_bn(la.AuthorsNet()).double().eval()
    assert list(pspnet_fast.patch(model)) == ["ppm"]
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert model(x).dtype == torch.float64
