"""`reproduce -m`: a sweep over hydra-style override values, each point run as its own results root, and one combined
report per sweep.

    python -m harness.reproduce table2 -m rows.dmae_95.pretrain.mask_ratio=0.9,0.95

`key=a,b` and `key=range(0,3)` (hydra's override grammar) are the sweep's axes; the points are their cartesian
product. With <sweep> = `<table>.<profile>-<swept keys joined by +>` (no `.<profile>` when the profile is swept) and
<point> = `<key>=<value>[,<key>=<value>...]`:

    <results_root>/sweeps/<sweep>/<point>/<table>/<profile>/   each point's complete results tree (manifest, stages)
    <reports_dir>/sweeps/<sweep>/<point>/<table>[.<profile>].md each point's own report
    <reports_dir>/sweeps/<sweep>.md                             the combined report: a row per (point, table row)

Stages several points share (the teacher, the rows the swept key does not touch) run once: before a point runs,
finished stages with the same id are linked in from the other points of its sweep and from the plain runs under
<results_root> (the same computation: a stage id hashes its whole resolved spec and inputs).
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from harness.report.collect import collect, load_paper_numbers, summarize
from harness.plan.config import ConfigError
from harness.report.figures import sweep_figures

SWEEP_DIR = "sweeps"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.,=+-]")
_ROOT_KEYS = ("results_root", "reports_dir")  # rewritten per point; cannot be swept


@dataclass
class Point:
    name: str  # a folder name: "<key>=<value>[,<key>=<value>...]"
    values: Dict[str, str]  # swept key -> value, as typed
    overrides: List[str]  # the point's overrides, as they would be typed for a plain run


def _parse(overrides: Sequence[str]):
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(str(e)) from None


def _key(o) -> str:
    return o.get_key_element().lstrip("+~")


def expand_sweep(overrides: Sequence[str]) -> List[List[str]]:
    """Hydra's override grammar: `key=a,b` and `key=range(0,3)` sweeps become the cartesian product of runs."""
    return [p.overrides for p in sweep_points(overrides)[1]]


def sweep_points(overrides: Sequence[str]) -> Tuple[List[str], List[Point]]:
    """(the swept keys, the points). No swept key: one point named '' with the overrides as given."""
    axes, keys = [], []
    for o in _parse(overrides):
        if o.is_sweep_override():
            if _key(o) in _ROOT_KEYS:
                raise ConfigError(f"{o.input_line}: {_key(o)} cannot be swept; with -m every point gets its own "
                                  f"folder under <{_key(o)}>/{SWEEP_DIR}/")
            keys.append(_key(o))
            axes.append([(f"{o.get_key_element()}={v}", (_key(o), v)) for v in o.sweep_string_iterator()])
        else:
            axes.append([(o.input_line, None)])
    points, seen = [], set()
    for combo in itertools.product(*axes):
        values = dict(kv for _, kv in combo if kv is not None)
        name = ",".join(f"{k}={_UNSAFE.sub('_', v)}" for k, v in values.items())
        base, i = name, 1
        while name in seen:  # two values that differ only in characters a folder name cannot hold
            i += 1
            name = f"{base}~{i}"
        seen.add(name)
        points.append(Point(name, values, [line for line, _ in combo]))
    return keys, points


def sweep_name(table: str, keys: Sequence[str], profile: str) -> str:
    head = table if "profile" in keys else f"{table}.{profile}"
    return _UNSAFE.sub("_", f"{head}-{'+'.join(keys)}")


def _quote(path: str) -> str:
    """A path as a quoted hydra override value (point names hold ',' and '=')."""
    if "'" in path or "\\" in path or "${" in path:
        raise ConfigError(f"-m: cannot place a sweep under {path!r} (quote, backslash or '${{' in the path)")
    return f"'{path}'"


def point_overrides(point: Point, sweep: str, results_root: str, reports_dir: str) -> List[str]:
    """The point's overrides with its own results_root and reports_dir (any given ones are the sweep's bases)."""
    keep = [o for o, p in zip(point.overrides, _parse(point.overrides)) if _key(p) not in _ROOT_KEYS]
    return keep + [f"results_root={_quote(str(Path(results_root) / SWEEP_DIR / sweep / point.name))}",
                   f"reports_dir={_quote(str(Path(reports_dir) / SWEEP_DIR / sweep / point.name))}"]


def _fmt(mean, std, n) -> str:
    if not n:
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if n >= 2 and std == std else f"{mean:.2f} (one seed: no std)"


def write_sweep_report(path: Path, table: str, keys: Sequence[str], points: Sequence[Tuple[Point, Path, Path]],
                       command: str) -> Path:
    """One Markdown table: a row per (point, table row) with top-1 mean ± std over seeds and n, read from each
    point's results tree with harness.report.collect. points: (point, its results tree <...>/<table>/<profile>, its
    report
    or None)."""
    papers = load_paper_numbers()
    path = Path(path)
    notes, lines, profiles, collected = [], [], [], []
    header = [f"`{k}`" for k in keys] + ["row", "top-1 (mean ± std)", "n", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point, root, report in points:
        vals = [f"`{point.values[k]}`" for k in keys]
        try:
            c = collect(root)
        except FileNotFoundError as e:
            lines.append("| " + " | ".join(vals + ["—", "—", "0", f"no results ({e})"]) + " |")
            continue
        collected.append((point.name, c))
        profiles += [c.profile] if c.profile not in profiles else []
        note = c.manifest.get("profile_note")
        if note and note not in notes:
            notes.append(note)
        for r in summarize(c, papers).to_dict("records"):
            lines.append("| " + " | ".join(vals + [f"`{r['row']}` {r['label']}", _fmt(r["mean"], r["std"], r["n"]),
                                                   str(r["n"]), r["status"]]) + " |")
    drawn = sweep_figures(collected, path.parent / path.stem) if collected else []
    figures = ["## Figures", "", *[f"![{cap}]({path.stem}/{name})" for cap, name in drawn], ""] if drawn else []
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), path.parent.resolve())).as_posix()  # noqa: E731
    out = [f"# Sweep of {table} ({', '.join(profiles) or 'no results'}): {', '.join(keys)}", "",
           f"Command: `{command}`" if command else "", "",
           *[f"> {n}" for n in notes], "" if notes else None,
           "Top-1 (%) of the final evaluation, mean ± std (ddof=1) over the finished seeds, n = finished seeds. Each "
           "point ran as its own results root; its own report has the paper's numbers, claims, costs and provenance.",
           "", *lines, "", "Points:", "",
           *[f"- `{p.name}`: results `{root}`" + (f", [report]({rel(rep)})" if rep else "") for p, root, rep in points],
           "", *figures]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x for x in out if x is not None) + "\n")
    return path
