"""The training application: data (the authors' list format, augmentation), the embedded synthetic set, `train`
(`pspnet-fast train`), `evaluate` (`pspnet-fast eval`), and what both use (`builders`, `metrics`)."""
from . import builders, data, evaluate, metrics, synthetic, train

__all__ = ["builders", "data", "evaluate", "metrics", "synthetic", "train"]
