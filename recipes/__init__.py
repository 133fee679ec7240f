"""The harness's recipes: the hydra config tree (`<table>.yaml`, `profile/`, `launcher/`, `expected/`) and the
paper's numbers (`paper-numbers.csv`), shipped inside the package, and the recipe search path that puts a user's own
folders of recipes in front of them.

Found with importlib.resources, so a source checkout, an editable install and a wheel install all read the same
files:

    >>> import recipes
    >>> recipes.path("paper-numbers.csv")     # a pathlib.Path, in the package
    >>> recipes.tables()                      # ['aligned_layer', 'distance', ..., 'table2', ...] (+ the user's)

The search path: the folders in $HARNESS_RECIPE_PATH (separated by ':', the first wins; `--recipe-dir DIR` on the
command line puts DIR in front), then the package's folder. A user's folder holds tables (`my_table.yaml`) and may
hold its own `profile/`, `launcher/` and `expected/` entries; what it lacks comes from the package, so a user's
recipe can say `defaults: [{profile: tiny}, _self_]` and get the package's tiny profile.

Standard library only: `python -m harness.reproduce --help` lists the tables without importing hydra or torch.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import List, Optional

PATH_ENV = "HARNESS_RECIPE_PATH"


def path(*parts: str) -> Path:
    """The package's recipes folder, or a file inside it (`path("profile", "tiny.yaml")`)."""
    root = files(__name__)
    if not isinstance(root, Path):  # e.g. a zipped install: hydra needs a real folder
        raise RuntimeError(f"the recipes are not a folder on disk ({root!r}); install the wheel unzipped")
    return root.joinpath(*parts)


def user_dirs() -> List[Path]:
    """The user's recipe folders from $HARNESS_RECIPE_PATH, in order, each once; a name that is not a folder is an
    error (NotADirectoryError naming it), never skipped."""
    dirs: List[Path] = []
    for entry in os.environ.get(PATH_ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        d = Path(entry).expanduser().resolve()
        if not d.is_dir():
            raise NotADirectoryError(f"{PATH_ENV} names {entry!r}, which is not a folder (a folder of recipes: "
                                     "<table>.yaml files, optionally profile/ launcher/ expected/)")
        if d not in dirs and d != path().resolve():
            dirs.append(d)
    return dirs


def search_path() -> List[Path]:
    """Where recipes are looked for, first wins: the user's folders, then the package's."""
    return user_dirs() + [path()]


def add_dirs(dirs) -> None:
    """Put folders in front of the search path for this process and the jobs it starts (they inherit the
    environment): what `--recipe-dir` does. No folders: nothing changes."""
    if not dirs:
        return
    for d in dirs:
        if not Path(d).expanduser().is_dir():
            raise NotADirectoryError(f"{str(d)!r} is not a folder (a folder of recipes: <table>.yaml files, "
                                     "optionally profile/ launcher/ expected/)")
    given = [str(Path(d).expanduser().resolve()) for d in dirs]
    rest = [e for e in os.environ.get(PATH_ENV, "").split(os.pathsep) if e.strip()]
    os.environ[PATH_ENV] = os.pathsep.join(given + [e for e in rest if e not in given])
    user_dirs()  # a name that is not a folder: refused now, not at the first lookup


def find(*parts: str) -> Optional[Path]:
    """The first file (or folder) `parts` on the search path; None when no folder has it."""
    for d in search_path():
        p = d.joinpath(*parts)
        if p.exists():
            return p
    return None


def table_dir(table: str) -> Optional[Path]:
    """The folder that holds <table>.yaml (the first on the search path); None for an unknown table."""
    p = find(f"{table}.yaml")
    return p.parent if p is not None else None


def tables() -> List[str]:
    """The table recipes: every <name>.yaml at the top of a folder on the search path."""
    return sorted({p.stem for d in search_path() for p in d.glob("*.yaml")})


def options(group: str) -> List[str]:
    """The options of a config group (profile, launcher) over the whole search path."""
    return sorted({p.stem for d in search_path() for p in (d / group).glob("*.yaml")})


def is_packaged(p: Path) -> bool:
    """Whether `p` is inside the package's recipes folder (a file the repository names recipes/...)."""
    try:
        Path(p).resolve().relative_to(path().resolve())
        return True
    except ValueError:
        return False
