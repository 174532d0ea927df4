"""Old import paths (before the package was laid out by layer, 0.1) kept as aliases of their new modules, so that
`import pspnet_fast.modules` or `from pspnet_fast.train import train` still work. Each alias is the new module
itself (one module object, not a copy), imported when first asked for. To be removed in 0.3 (README, Changelog)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

ALIASES = {
    "pspnet_fast._ext": "pspnet_fast.ops._ext",
    "pspnet_fast._order": "pspnet_fast.ops.order",
    "pspnet_fast.modules": "pspnet_fast.nn.ppm",
    "pspnet_fast.head": "pspnet_fast.nn.head",
    "pspnet_fast.patching": "pspnet_fast.interop.patching",
    "pspnet_fast.convert": "pspnet_fast.interop.convert",
    "pspnet_fast.data": "pspnet_fast.training.data",
    "pspnet_fast.synthetic": "pspnet_fast.training.synthetic",
    "pspnet_fast.train": "pspnet_fast.training.train",
    "pspnet_fast.evaluate": "pspnet_fast.training.evaluate",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target
        self.spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has just set the alias's spec on the module: give the module its own back.
        module.__spec__ = self.spec
        module.__loader__ = self.spec.loader


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(ALIASES[fullname]))


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
