"""pspnet_fast: a fused Pyramid Pooling Module and PSPNet head, drop-in for the PSPNet code people already run.

    from pspnet_fast import PyramidPooling          # fused, same state_dict keys as the authors' PPM
    from pspnet_fast import PSPHead                 # fused head: the 3x3 bottleneck never sees the concatenation
    from pspnet_fast.reference import PyramidPooling as RefPPM, PSPHead
    from pspnet_fast.models import PSPNet, load_checkpoint
    pspnet_fast.patch(model)                        # fuse the PPMs of an existing (authors', mmseg, smp) model

Layers, each using only those below it: reference (the pure-PyTorch truth) -> ops (functional API, backends, fake
kernels, autograd) -> nn (drop-in modules) -> models (ResNet, PSPNet) -> interop (patch, convert) and training
(data, train, evaluate) -> cli.
"""
from . import _compat, interop, models, nn, ops, reference, training
from .interop import patch
from .nn import PSPHead, PyramidPooling
from .ops import available_backends, choose_backend

_compat.install()

__version__ = "0.1.0"
__all__ = ["PSPHead", "PyramidPooling", "available_backends", "choose_backend", "interop", "models", "nn", "ops",
           "patch", "reference", "training", "__version__"]
