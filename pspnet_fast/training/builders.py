"""What training and evaluation both build: the model (a PSPNet of the given depth and width) and a data source
(the synthetic set or a list file)."""
from __future__ import annotations

from torch import nn

from ..models.light import build_pspnet
from .data import ListSource, read_list
from .synthetic import SyntheticScenes

__all__ = ["build_model", "make_source"]


def build_model(layers: int, num_classes: int, width: int = 64, use_ppm: bool = True, fused: bool = True,
                dropout: float = 0.1) -> nn.Module:
    return build_pspnet(layers, num_classes, width, use_ppm=use_ppm, fused=fused, dropout=dropout)


def make_source(data: str, split: str, cfg: dict, data_root=None, need_labels: bool = True):
    """'synthetic' -> SyntheticScenes (cfg: seed, synthetic_size, synthetic_train / synthetic_val); else a list
    file -> ListSource (cfg['num_classes'] required)."""
    if data == "synthetic":
        n = cfg["synthetic_train"] if split == "train" else cfg["synthetic_val"]
        return SyntheticScenes(n, cfg["synthetic_size"], cfg["seed"], split)
    if cfg.get("num_classes") is None:
        raise ValueError("--num-classes is required with a list file")
    return ListSource(read_list(data, data_root, need_labels), cfg["num_classes"], data_root)
