"""PSPNet with the authors' module layout (hszhao/semseg `model/pspnet.py`), so their checkpoints load strictly.

Keys: layer0.* (deep stem), layer1..layer4.* (torchvision Bottleneck names), ppm.features.{i}.*, cls.{0,1,4}.*,
aux.{0,1,4}.*. A ResNet-50 PSPNet has 370 state_dict keys.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_bins, check_positive_int
from ..nn.head import psp_head_forward
from ..nn.ppm import PyramidPooling as FusedPyramidPooling
from ..reference import PyramidPooling as RefPyramidPooling
from ..reference import _make_cls
from .resnet import ResNet

__all__ = ["PSPNet", "load_checkpoint", "load_backbone_weights", "pspnet_loss"]

IGNORE_INDEX = 255
AUX_WEIGHT = 0.4


def pspnet_loss(main_logits: torch.Tensor, aux_logits: torch.Tensor, target: torch.Tensor,
                aux_weight: float = AUX_WEIGHT, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """main + 0.4 * aux cross-entropy, pixels labelled 255 ignored. logits (N, K, H, W), target (N, H, W) int64."""
    return F.cross_entropy(main_logits, target, ignore_index=ignore_index) + aux_weight * F.cross_entropy(
        aux_logits, target, ignore_index=ignore_index)


class PSPNet(nn.Module):
    """PSPNet: dilated ResNet (output stride 8) + Pyramid Pooling Module + `cls` head; `aux` head on layer3.

    Args:
        layers: 50 or 101 (152 also builds). num_classes: K. bins: pyramid levels. dropout: Dropout2d before the
        classifiers. zoom_factor: 8 returns logits at the input size; 1 at the feature size; other values at
        (f - 1) * zoom_factor + 1 as the authors compute it. use_ppm: False drops the pyramid (cls then sees the
        2048-channel map). fused: True uses pspnet_fast.PyramidPooling (fused kernels, same keys), False the reference.
        align_corners: the PPM's upsampling (the logits are always upsampled with align_corners=True, as the authors).
        deep_base: the authors' three-conv stem (True) or torchvision's 7x7 stem. backend: the fused module's backend.

    forward(x) with x (N, 3, H, W), any H, W >= 1 (not only 8n+1):
        eval:  logits (N, K, H, W).
        train: (main_logits, aux_logits), both (N, K, H, W); loss = pspnet_loss(main, aux, target)
               = CE(main) + 0.4 * CE(aux), ignore_index=255.
        train with target y (N, H, W): (prediction (N, H, W), main_loss, aux_loss), as the authors' code returns.
    """

    def __init__(
        self,
        layers: int = 50,
        num_classes: int = 150,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        zoom_factor: int = 8,
        use_ppm: bool = True,
        fused: bool = True,
        align_corners: bool = True,
        deep_base: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        if zoom_factor not in (1, 2, 4, 8):
            raise ValueError(f"zoom_factor must be one of 1, 2, 4, 8, got {zoom_factor!r}")
        bins = check_bins(bins)
        self.zoom_factor = zoom_factor
        self.use_ppm = use_ppm
        self.num_classes = num_classes
        backbone = ResNet(layers, deep_base=deep_base)
        self.layer0 = backbone.stem()
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)
        fea_dim = 2048
        if use_ppm:
            if fused:
                self.ppm = FusedPyramidPooling(fea_dim, bins, fea_dim // len(bins), align_corners, backend=backend)
            else:
                self.ppm = RefPyramidPooling(fea_dim, bins, fea_dim // len(bins), align_corners)
            fea_dim = self.ppm.out_channels
        self.cls = _make_cls(fea_dim, 512, num_classes, dropout)
        self.aux = _make_cls(1024, 256, num_classes, dropout)

    def _out_size(self, in_hw, feat_hw):
        if self.zoom_factor == 8:
            return tuple(in_hw)
        return tuple((f - 1) * self.zoom_factor + 1 for f in feat_hw)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"PSPNet expects images of shape (N, 3, H, W), got {got}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"PSPNet expects floating-point images (normalized), got {x.dtype}")
        in_hw = x.shape[-2:]
        f = self.layer2(self.layer1(self.layer0(x)))
        f3 = self.layer3(f)
        f4 = self.layer4(f3)
        if self.use_ppm:
            # The fused head (pspnet_fast.nn.head) where the PPM is the fused one: cls(ppm(f4)) without the concatenation.
            out = psp_head_forward(f4, self.ppm, self.cls, getattr(self.ppm, "backend", "reference"))
        else:
            out = self.cls(f4)
        size = self._out_size(in_hw, out.shape[-2:])
        if self.zoom_factor != 1:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        if not self.training:
            return out
        aux = self.aux(f3)
        if self.zoom_factor != 1:
            aux = F.interpolate(aux, size=size, mode="bilinear", align_corners=True)
        if y is None:
            return out, aux
        main_loss = F.cross_entropy(out, y, ignore_index=IGNORE_INDEX)
        aux_loss = F.cross_entropy(aux, y, ignore_index=IGNORE_INDEX)
        return out.max(1)[1], main_loss, aux_loss


class CheckpointMismatchError(RuntimeError, ValueError):
    """A checkpoint whose keys or shapes do not match the model (a RuntimeError, as load_state_dict raises, and a
    ValueError: an expected error of the command line)."""


def read_checkpoint(path):
    """torch.load(path, weights_only=True) on CPU, with errors that name the file: OSError (missing, a folder,
    unreadable) or ValueError (empty, not a torch checkpoint of tensors)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!s} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!s} is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!s} is empty (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise OSError(f"checkpoint {path!s} cannot be read: {e}") from e
    except Exception as e:  # pickle, zip and weights-only errors all mean "not a checkpoint of tensors"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path!s} is not a torch checkpoint of tensors (torch.load with weights_only=True failed: "
                         f"{type(e).__name__}: {first})") from e
    return obj


def _read_state_dict(path) -> dict:
    """The state_dict in file `path` (a state_dict, or {'state_dict': ...} with other entries): a mapping of str keys to
    tensors. Raises OSError (missing, a folder, unreadable) or ValueError (empty, not a torch checkpoint, not a
    mapping of tensors), each naming the file and what it holds."""
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!s} holds a {type(obj).__name__}, neither a state_dict nor {{'state_dict': ...}}")
    if not all(isinstance(k, str) for k in obj):
        bad = next(k for k in obj if not isinstance(k, str))
        raise ValueError(f"{path!s} holds a dict with a {type(bad).__name__} key {bad!r}, not a state_dict (str keys)")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path!s} is not a state_dict of tensors: key {k!r} holds a {type(v).__name__}")
    return obj


def _strip_module(sd: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _load_strict(module: nn.Module, sd: dict, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or bad_shape:
        lines = [f"{what} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        for k in bad_shape[:20]:
            lines.append(f"  shape of {k}: checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)}")
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(sd, strict=True)


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """Loads a checkpoint saved by the authors' code (or this project) into `model`, strictly.

    The file may hold a state_dict or {'state_dict': ...} (with 'epoch', 'optimizer', ...); a `module.` prefix
    (DistributedDataParallel) is stripped. Missing, unexpected or mis-shaped keys raise RuntimeError naming them; a
    file that is missing or unreadable raises OSError, one that is empty, not a torch checkpoint or not a mapping of
    str keys to tensors ValueError, each naming the file and what it holds."""
    sd = _strip_module(_read_state_dict(path))
    _load_strict(model, sd, f"checkpoint {path!s}")
    return model


_STEM_MAP = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4", "conv3": "layer0.6",
             "bn3": "layer0.7"}


def load_backbone_weights(model: PSPNet, path) -> PSPNet:
    """Loads ImageNet ResNet weights (torchvision key names, from a local file) into a PSPNet's layer0..layer4.

    The deep-stem keys conv2/bn2/conv3/bn3 of the authors' ImageNet files are mapped too; `fc.*` is dropped.
    Torchvision's own resnet50 weights have the 7x7 stem: use PSPNet(deep_base=False) for them."""
    sd = _strip_module(_read_state_dict(path))
    mapped = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head == "fc":
            continue
        if head in _STEM_MAP:
            mapped[f"{_STEM_MAP[head]}.{rest}"] = v
        else:
            mapped[k] = v
    backbone = nn.ModuleDict({n: getattr(model, n) for n in ("layer0", "layer1", "layer2", "layer3", "layer4")})
    _load_strict(backbone, mapped, f"backbone weights {path!s}")
    return model
