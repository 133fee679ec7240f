"""The harness's recipes, shipped inside the package: the hydra config tree (`<table>.yaml`, `profile/`,
`launcher/`) and the paper's numbers (`paper-numbers.csv`).

Found with importlib.resources, so a source checkout, an editable install and a wheel install all read the same
files:

    >>> import recipes
    >>> recipes.path("paper-numbers.csv")     # a pathlib.Path
    >>> recipes.tables()                      # ['aligned_layer', 'distance', ..., 'table2', ...]

Standard library only: `python -m harness.reproduce --help` lists the tables without importing hydra or torch.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import List


def path(*parts: str) -> Path:
    """The recipes folder, or a file inside it (`path("profile", "tiny.yaml")`)."""
    root = files(__name__)
    if not isinstance(root, Path):  # e.g. a zipped install: hydra needs a real folder
        raise RuntimeError(f"the recipes are not a folder on disk ({root!r}); install the wheel unzipped")
    return root.joinpath(*parts)


def tables() -> List[str]:
    """The table recipes: every <name>.yaml at the top of the folder."""
    return sorted(p.stem for p in path().glob("*.yaml"))
