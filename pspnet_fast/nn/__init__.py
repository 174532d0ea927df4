"""Drop-in nn.Modules with the reference's constructors and state_dict keys, the fused ops underneath: the PPM
(`ppm.py`) and the PSP head that never builds the concatenation (`head.py`)."""
from .head import PSPHead, psp_head_forward
from .ppm import PyramidPooling

__all__ = ["PSPHead", "PyramidPooling", "psp_head_forward"]
