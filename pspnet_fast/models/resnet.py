"""Dilated ResNet-50/101 backbones with the PSPNet authors' deep stem, torchvision-style keys.

The backbone's own state_dict keys are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ... `downsample.0`), plus
`conv2/bn2/conv3/bn3` for the deep stem (as in the authors' ImageNet checkpoints), so ImageNet weights load from a
local file. Nothing is ever downloaded.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "ResNet", "resnet"]

_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with output stride 8: layer3 stride 1 dilation 2, layer4 stride 1 dilation 4 (every 3x3 conv of the
    stage, as the authors' code sets). deep_base=True: the authors' stem conv3x3(3,64,s2)-conv3x3(64,64)-
    conv3x3(64,128); False: torchvision's 7x7 stem. x: (N, 3, H, W) -> layer4 (N, 2048, ~H/8, ~W/8)."""

    def __init__(self, layers: int = 50, deep_base: bool = True, num_classes: int | None = None):
        super().__init__()
        if layers not in _LAYERS:
            raise ValueError(f"layers must be one of {sorted(_LAYERS)}, got {layers!r}")
        blocks = _LAYERS[layers]
        self.deep_base = deep_base
        if deep_base:
            self.conv1 = conv3x3(3, 64, stride=2)
            self.bn1 = nn.BatchNorm2d(64)
            self.conv2 = conv3x3(64, 64)
            self.bn2 = nn.BatchNorm2d(64)
            self.conv3 = conv3x3(64, 128)
            self.bn3 = nn.BatchNorm2d(128)
            self.inplanes = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.inplanes = 64
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], dilation=2)
        self.layer4 = self._make_layer(512, blocks[3], dilation=4)
        # An ImageNet classifier only when asked for: PSPNet drops it.
        self.fc = nn.Linear(2048, num_classes) if num_classes else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self) -> nn.Sequential:
        """The stem as the authors' `layer0` Sequential: keys layer0.{0,3,6} convs, layer0.{1,4,7} BNs."""
        if self.deep_base:
            return nn.Sequential(self.conv1, self.bn1, self.relu, self.conv2, self.bn2, self.relu, self.conv3,
                                 self.bn3, self.relu, self.maxpool)
        return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem()(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.fc is not None:
            x = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return x


def resnet(layers: int = 50, deep_base: bool = True) -> ResNet:
    return ResNet(layers, deep_base)
