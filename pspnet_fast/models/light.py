"""A light PSPNet for small machines: a BasicBlock ResNet-18/34 (dilated, output stride 8) with a width option.

Same structure and key names as `PSPNet` (layer0 deep stem, layer1..layer4, ppm.features.{i}, cls.{0,1,4},
aux.{0,1,4}) and the same forward (it is a PSPNet subclass); only the backbone's block and widths differ. At
width=64 the channel counts are torchvision's ResNet-18/34 (layer4: 512 channels, layer3: 256); the stem is
conv3x3(3, w, s2)-conv3x3(w, w)-conv3x3(w, 2w) and the head widths scale with the backbone (see `LightPSPNet`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._checks import check_bins, check_positive_int
from ..nn.ppm import PyramidPooling as FusedPyramidPooling
from ..reference import PyramidPooling as RefPyramidPooling
from ..reference import _make_cls
from .pspnet import PSPNet
from .resnet import conv3x3

__all__ = ["BasicBlock", "LightPSPNet", "build_pspnet"]

_BASIC_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (keys conv1, bn1, conv2, bn2, downsample.{0,1}), both 3x3 convs dilated."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _make_stage(inplanes: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, dilation, downsample)]
    layers += [BasicBlock(planes, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class LightPSPNet(PSPNet):
    """PSPNet on a dilated BasicBlock ResNet-18/34 of base width `width` (64 = torchvision's widths).

    Channels: layer1..layer4 = w, 2w, 4w, 8w (layer3 stride 1 dilation 2, layer4 dilation 4: output stride 8).
    PPM: 8w -> len(bins) levels of 8w/len(bins) channels (x first, as the authors). cls hidden 8w (the authors'
    512 at w=64), aux on layer3 (4w channels) with 4w hidden (the authors' 256 at w=64). forward: as PSPNet.
    """

    def __init__(self, layers: int = 18, num_classes: int = 150, width: int = 64, bins: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1, zoom_factor: int = 8, use_ppm: bool = True, fused: bool = True,
                 align_corners: bool = True, backend: str = "auto"):
        nn.Module.__init__(self)
        check_positive_int("num_classes", num_classes)
        check_positive_int("width", width)
        if layers not in _BASIC_LAYERS:
            raise ValueError(f"LightPSPNet layers must be one of {sorted(_BASIC_LAYERS)}, got {layers!r}")
        if zoom_factor not in (1, 2, 4, 8):
            raise ValueError(f"zoom_factor must be one of 1, 2, 4, 8, got {zoom_factor!r}")
        bins = check_bins(bins)
        self.zoom_factor, self.use_ppm, self.num_classes = zoom_factor, use_ppm, num_classes
        w = width
        self.layer0 = nn.Sequential(conv3x3(3, w, stride=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                                    conv3x3(w, w), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                                    conv3x3(w, 2 * w), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
                                    nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        blocks = _BASIC_LAYERS[layers]
        self.layer1 = _make_stage(2 * w, w, blocks[0], 1, 1)
        self.layer2 = _make_stage(w, 2 * w, blocks[1], 2, 1)
        self.layer3 = _make_stage(2 * w, 4 * w, blocks[2], 1, 2)
        self.layer4 = _make_stage(4 * w, 8 * w, blocks[3], 1, 4)
        fea_dim = 8 * w
        if use_ppm:
            reduction = max(fea_dim // len(bins), 1)
            if fused:
                self.ppm = FusedPyramidPooling(fea_dim, bins, reduction, align_corners, backend=backend)
            else:
                self.ppm = RefPyramidPooling(fea_dim, bins, reduction, align_corners)
            fea_dim = self.ppm.out_channels
        self.cls = _make_cls(fea_dim, 8 * w, num_classes, dropout)
        self.aux = _make_cls(4 * w, 4 * w, num_classes, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.out_channels != num_classes:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_pspnet(layers: int = 50, num_classes: int = 150, width: int = 64, **kw) -> PSPNet:
    """PSPNet(layers=50/101/152, Bottleneck, the authors' model; width must be 64) or LightPSPNet(layers=18/34)."""
    if layers in _BASIC_LAYERS:
        return LightPSPNet(layers, num_classes, width, **kw)
    if width != 64:
        raise ValueError(f"width={width} is only available for layers 18 and 34 (Bottleneck ResNet-{layers} is the "
                         "authors' model at width 64)")
    return PSPNet(layers, num_classes, **kw)
