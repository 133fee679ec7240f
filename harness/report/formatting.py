"""How a report writes its values: numbers (fmt, signed, si), a missing value as "—", Markdown tables, and paths (a
results tree's from results/<table>/<profile> on, never this machine's; a recipe file as the repository names it)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List

import recipes

from harness.plan.config import RECIPES_DIR


def missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x, nd: int = 2) -> str:
    return "—" if missing(x) else f"{x:.{nd}f}"


def signed(x: float, nd: int = 2) -> str:
    """+1.23 / -1.23, and +0.00 rather than -0.00."""
    x = round(x, nd)
    return f"{x + 0.0:+.{nd}f}"


def md_table(headers: List[str], rows: List[list]) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                     + ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows])


def shown_path(p: Path) -> str:
    """A path of a results tree as plain text, never the computing machine's absolute path: from the results root on
    (results/<table>/<profile>/..., the tree a run leaves, wherever its root was)."""
    parts = Path(p).resolve().parts
    for i in range(len(parts) - 1, -1, -1):
        if (Path(*parts[:i + 1]) / "manifest.json").is_file():  # <root>/<table>/<profile>
            return Path("results", *parts[i - 1:]).as_posix()
    return Path(p).name


def recipe_path(p: Path) -> str:
    """A file of the package's recipes as the repository names it (recipes/expected/...); a user's recipe file by
    its full path; elsewhere, its name."""
    if not recipes.is_packaged(p) and any(Path(p).resolve().is_relative_to(d) for d in recipes.user_dirs()):
        return Path(p).resolve().as_posix()
    try:
        return "recipes/" + Path(p).resolve().relative_to(Path(RECIPES_DIR).resolve()).as_posix()
    except ValueError:
        return Path(p).name



def si(x, unit: str = "") -> str:
    """1234567 -> '1.23 M'; '—' when missing."""
    if missing(x):
        return "—"
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()
