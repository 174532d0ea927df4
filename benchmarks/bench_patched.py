"""pspnet_fast.patch() on the models people run: unpatched vs patched, eval, no_grad, float32 by default.

    patched-head   mmsegmentation 1.2.2 PSPHead(in_channels=C, channels=C/4) alone, on features (N, C, H, W)
    patched-mmseg  mmsegmentation's EncoderDecoder PSPNet R50-D8 (configs/_base_/models/pspnet_r50-d8.py, BN for
                   SyncBN), whole forward (mode="tensor") on an 8H x 8W image (64x128 features <- 512x1024)
    patched-smp    segmentation_models_pytorch 0.6.0 PSPNet("resnet34"), whole forward on an 8H x 8W image (its
                   encoder_depth=3 gives stride-8 features of 128 channels)
Providers: "reference" is the model as built, "fused-<backend>" a deep copy after pspnet_fast.patch(model,
backend=...) (PPM and head fused). Random weights (seed 0), non-trivial BatchNorm statistics in the head.
Where mmsegmentation (with mmcv-lite) or segmentation_models_pytorch is missing (`pip install .[peers]`), the row
runs a stand-in with the authors' layout (pspnet_fast.reference modules under a parent whose forward is
`x = self.ppm(x); x = self.cls(x)`, which patch() fuses the same way; its `model` field says so). torch.compile of
a whole model is not timed (minutes of compiling on a CPU).

    python -m pspnet_fast.benchmarks.bench_patched --workload patched-head --shape 1,2048,64,64
"""
from __future__ import annotations

import copy
import importlib
import sys
import types

import torch
from torch import nn

from pspnet_fast.interop.patching import patch
from pspnet_fast.reference import PyramidPooling as RefPPM
from pspnet_fast.reference import _make_cls

from .common import C, Case, Workload, build_case, randomize_bn
from .runner import run

NUM_CLASSES = 19  # Cityscapes
SMP_CHANNELS = 128  # resnet34 layer2 (encoder_depth=3)


def _install_mmcv_ext_stand_in() -> None:
    """mmcv-lite has no compiled `mmcv._ext`, which mmseg's imports of mmcv.ops ask for; PSPNet calls none of its
    kernels. A stand-in whose every kernel raises (tests/interop/mmcv_stub does the same for the tests)."""
    if "mmcv._ext" in sys.modules:
        return
    try:
        importlib.import_module("mmcv._ext")
        return
    except ImportError:
        pass
    mod = types.ModuleType("mmcv._ext", "stand-in installed by pspnet_fast.benchmarks.bench_patched")

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def kernel(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name}: stand-in (mmcv-lite has no compiled ops)")
        return kernel

    mod.__getattr__ = __getattr__
    sys.modules["mmcv._ext"] = mod


def _mmseg_models():
    """mmseg's MODELS registry, or None when mmsegmentation / mmcv are not installed."""
    try:
        importlib.import_module("mmcv")
        _install_mmcv_ext_stand_in()
        registry = importlib.import_module("mmseg.registry")
        importlib.import_module("mmseg.utils").register_all_modules(init_default_scope=False)
    except Exception:
        return None
    return registry.MODELS


class _AuthorsHead(nn.Module):
    """The stand-in: the authors' layout (ppm, then cls[0..2] = 3x3 conv, BN, ReLU) with `bottleneck` channels."""

    def __init__(self, c, bottleneck, classes):
        super().__init__()
        self.ppm = RefPPM(c, (1, 2, 3, 6), c // 4, align_corners=False)
        self.cls = _make_cls(2 * c, bottleneck, classes, 0.1)

    def forward(self, x):
        x = self.ppm(x)
        x = self.cls(x)
        return x


class _AuthorsModel(nn.Module):
    def __init__(self, c, classes):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, c, 8, stride=8), nn.ReLU())
        self.head = _AuthorsHead(c, c // 4, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


class _ListInput(nn.Module):
    """mmseg heads take the list of backbone levels; the benchmark gives the one feature map."""

    def __init__(self, head):
        super().__init__()
        self.decode_head = head

    def forward(self, x):
        return self.decode_head([x])


class _TensorMode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, mode="tensor")


def _patched(backend, ref):
    model = copy.deepcopy(ref)
    result = patch(model, backend=backend)
    if not result.heads:
        raise RuntimeError(f"patch() fused no head: skipped {result.skipped}")
    return model


def _case(name, shape, dtype, device, channels_last, compile_ref, ref, x, out_shape, model_name, image=None):
    case = build_case(name, tuple(image or shape), dtype, device, channels_last, ref, _patched, x, out_shape, False,
                      compile_ref, deep=True, extra={"model": model_name, "feature_shape": list(shape)})
    if not compile_ref:
        case.skipped.setdefault("torch.compile", "a whole model's compile is not timed (minutes on a CPU)")
    return case


def build_head(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    """x (N, C, H, W) -> logits (N, 19, H, W): mmseg PSPHead(in_channels=C, channels=C/4), BN, align_corners=False."""
    n, c, h, w = shape
    torch.manual_seed(0)
    models = _mmseg_models()
    if models is not None:
        head = models.build(dict(type="PSPHead", in_channels=c, channels=c // 4, pool_scales=(1, 2, 3, 6),
                                 dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=dict(type="BN"),
                                 align_corners=False))
        ref, model_name = _ListInput(head), "mmseg 1.2.2 PSPHead"
    else:
        ref, model_name = _AuthorsHead(c, c // 4, NUM_CLASSES), "authors-layout stand-in (mmseg not installed)"
    randomize_bn(ref)
    return _case("patched-head", shape, dtype, device, channels_last, compile_ref, ref, torch.randn(n, c, h, w),
                 (n, NUM_CLASSES, h, w), model_name)


def _image_shape(shape):
    return (shape[0], 3, 8 * shape[2], 8 * shape[3])


def build_mmseg(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    """Image (N, 3, 8H, 8W) -> logits (N, 19, H, W) (mode="tensor": the decode head's output, not resized)."""
    n, _, h, w = shape
    torch.manual_seed(0)
    models = _mmseg_models()
    if models is not None:
        norm = dict(type="BN", requires_grad=True)
        ref = models.build(dict(
            type="EncoderDecoder",
            backbone=dict(type="ResNetV1c", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                          strides=(1, 2, 1, 1), norm_cfg=norm, norm_eval=False, style="pytorch",
                          contract_dilation=True),
            decode_head=dict(type="PSPHead", in_channels=2048, in_index=3, channels=512, pool_scales=(1, 2, 3, 6),
                             dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=norm, align_corners=False,
                             loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
            auxiliary_head=dict(type="FCNHead", in_channels=1024, in_index=2, channels=256, num_convs=1,
                                concat_input=False, dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=norm,
                                align_corners=False,
                                loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
            train_cfg=dict(), test_cfg=dict(mode="whole")))
        randomize_bn(ref.decode_head)
        ref, model_name = _TensorMode(ref), "mmseg 1.2.2 EncoderDecoder PSPNet R50-D8"
    else:
        ref, model_name = _AuthorsModel(C, NUM_CLASSES), "authors-layout stand-in (mmseg not installed)"
        randomize_bn(ref.head)
    image = _image_shape(shape)
    return _case("patched-mmseg", shape, dtype, device, channels_last, False, ref, torch.randn(image),
                 (n, NUM_CLASSES, h, w), model_name, image)


def build_smp(shape, dtype, device, channels_last=False, compile_ref=True) -> Case:
    """Image (N, 3, 8H, 8W) -> logits (N, 19, 8H, 8W)."""
    n, _, h, w = shape
    torch.manual_seed(0)
    try:
        smp = importlib.import_module("segmentation_models_pytorch")
        ref, model_name = smp.PSPNet("resnet34", encoder_weights=None, classes=NUM_CLASSES), "smp 0.6.0 PSPNet resnet34"
        randomize_bn(ref.decoder)
        out = _image_shape(shape)
        out = (n, NUM_CLASSES, out[2], out[3])
    except ImportError:
        ref, model_name = _AuthorsModel(SMP_CHANNELS, NUM_CLASSES), "authors-layout stand-in (smp not installed)"
        randomize_bn(ref.head)
        out = (n, NUM_CLASSES, h, w)
    image = _image_shape(shape)
    return _case("patched-smp", shape, dtype, device, channels_last, False, ref, torch.randn(image), out, model_name,
                 image)


def _label(name):
    return lambda s: f"{name} {s[0]}x3x{8 * s[2]}x{8 * s[3]} (features {s[2]}x{s[3]})"


WORKLOADS = [
    Workload("patched-head", build_head, train=False, rounds=5, warmup=0, quick_shape=(1, 256, 9, 9),
             about="mmseg PSPHead alone, unpatched vs pspnet_fast.patch()ed, eval, no_grad",
             cost_s=(60, 60)),
    Workload("patched-mmseg", build_mmseg, train=False, rounds=3, warmup=0, quick_shape=(1, C, 5, 5),
             about="mmseg PSPNet R50-D8 whole forward, unpatched vs patched, eval, no_grad",
             cost_s=(0, 300), label=_label("patched-mmseg"), fixed_channels=C),
    Workload("patched-smp", build_smp, train=False, rounds=3, warmup=0, quick_shape=(1, SMP_CHANNELS, 5, 5),
             about="smp PSPNet resnet34 whole forward, unpatched vs patched, eval, no_grad",
             cost_s=(0, 60), label=_label("patched-smp"), fixed_channels=SMP_CHANNELS),
]


def main(argv=None) -> int:
    return run(argv, {w.name: w for w in WORKLOADS}, "python -m pspnet_fast.benchmarks.bench_patched", __doc__)


if __name__ == "__main__":
    sys.exit(main())
