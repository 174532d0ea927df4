"""Backbones and PSPNet with the authors' layout."""
from .pspnet import PSPNet, load_backbone_weights, load_checkpoint, pspnet_loss
from .resnet import ResNet

__all__ = ["PSPNet", "ResNet", "load_backbone_weights", "load_checkpoint", "pspnet_loss"]
