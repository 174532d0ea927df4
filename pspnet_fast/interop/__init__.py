"""Other code bases' models and files: `patch()` fuses the PPMs of the authors', mmsegmentation's and
segmentation_models_pytorch's models in place (`patching.py`); checkpoint conversion to PSPNet's keys (`convert.py`)."""
from .convert import ConversionError, convert_state_dict
from .patching import PatchResult, patch

__all__ = ["ConversionError", "PatchResult", "convert_state_dict", "patch"]
