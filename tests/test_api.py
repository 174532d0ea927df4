"""The public API after a plain `import pspnet_fast`, and the old module paths (0.1) that still resolve as aliases."""
import importlib
import subprocess
import sys

import pytest

import pspnet_fast
from pspnet_fast import _compat


def test_public_names():
    import pspnet_fast.models as models

    for name in ("PyramidPooling", "PSPHead", "patch", "available_backends", "reference", "models", "nn", "ops",
                 "interop", "training"):
        assert hasattr(pspnet_fast, name), name
    assert pspnet_fast.models is models
    assert pspnet_fast.models.PSPNet and pspnet_fast.models.load_checkpoint and pspnet_fast.models.pspnet_loss
    assert pspnet_fast.PyramidPooling is pspnet_fast.nn.ppm.PyramidPooling
    assert pspnet_fast.patch is pspnet_fast.interop.patching.patch


@pytest.mark.parametrize("old,new", sorted(_compat.ALIASES.items()))
def test_old_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    assert importlib.import_module(new).__spec__.name == new  # the alias leaves the module's own spec alone


def test_old_paths_in_a_fresh_process():
    code = ("from pspnet_fast.modules import PyramidPooling; from pspnet_fast.train import train; "
            "import pspnet_fast.patching as p, pspnet_fast.interop.patching as q; assert p is q; "
            "from pspnet_fast import _order; print(PyramidPooling.__module__, train.__module__, _order.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["pspnet_fast.nn.ppm", "pspnet_fast.training.train", "pspnet_fast.ops.order"]
