"""pspnet_fast: a fused Pyramid Pooling Module and PSPNet head, drop-in for the PSPNet code people already run.

    from pspnet_fast import PyramidPooling          # fused, same state_dict keys as the authors' PPM
    from pspnet_fast import PSPHead                 # fused head: the 3x3 bottleneck never sees the concatenation
    from pspnet_fast.reference import PyramidPooling as RefPPM, PSPHead
    from pspnet_fast.models import PSPNet, load_checkpoint
    pspnet_fast.patch(model)                        # fuse the PPMs of an existing (authors', mmseg, smp) model
"""
from . import reference
from .head import PSPHead
from .modules import PyramidPooling
from .ops import available_backends, choose_backend
from .patching import patch

__version__ = "0.1.0"
__all__ = ["PSPHead", "PyramidPooling", "available_backends", "choose_backend", "patch", "reference", "__version__"]
