"""Test-only stand-in for `mmcv._ext`, the compiled part of mmcv that mmcv-lite lacks.

mmsegmentation 1.2.2's `mmseg.models` imports `mmcv.ops` (for heads PSPNet never builds), and every `mmcv.ops`
module asks `mmcv._ext` for its kernels at import. `install()` puts a module there whose every kernel raises
NotImplementedError when called, so the imports succeed and a model that calls one fails loudly. PSPHead, ConvModule,
ResNetV1c and EncoderDecoder call none. Nothing is installed when a real `mmcv._ext` imports."""
import importlib
import sys
import types


def _missing(name):
    def kernel(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{name} is the test stand-in (tests/interop/mmcv_stub): mmcv-lite has "
                                  "no compiled ops")

    kernel.__name__ = name
    return kernel


def install() -> bool:
    """True when the stand-in is (now or already) `mmcv._ext`; False when the real one imports."""
    if "mmcv._ext" in sys.modules:
        return getattr(sys.modules["mmcv._ext"], "IS_STUB", False)
    try:
        importlib.import_module("mmcv._ext")
        return False
    except ImportError:
        pass
    mod = types.ModuleType("mmcv._ext", __doc__)
    mod.IS_STUB = True

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)

    mod.__getattr__ = __getattr__
    sys.modules["mmcv._ext"] = mod
    return True
