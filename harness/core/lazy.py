"""The one lazy-import seam: a module imported on first use instead of at import time.

The command line, the planner, the estimator and the report answer `--help`, a bad config or a dry run without
loading torch (~1 s) or timm; the few things they do with torch (resolving run.device=auto, building a model on the
meta device for its FLOPs, starting the jobs) import it when they happen. A module says so once, at its top:

    torch = lazy("torch")                       # loaded by the first torch.<name>
    launch = lazy("harness.run.launch")         # the layer rule (tests/test_layers.py) reads these names too

Nothing is put in sys.modules before the first attribute access, so `'torch' not in sys.modules` still tells
whether torch was loaded.
"""
from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """A stand-in for the module `name`, imported by the first attribute read."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r} ({'loaded' if self._module is not None else 'not loaded yet'})>"


def lazy(name: str) -> LazyModule:
    return LazyModule(name)
