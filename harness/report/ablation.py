"""Which numeric setting a table's rows vary: the axis to draw top-1 against (harness.report.figures), found from the
rows'
resolved stage specs (each row's pre-train and fine-tune `config.json` spec, harness.report.collect), never from recipe
names.

A row's settings are its stage specs flattened to `<stage>:<section>.<key>` (stage = pretrain | finetune; a scratch
row has no pretrain keys), less what differs between any two stages of one computation (name, seed, inputs: stage
ids) and the kind. Two rows are *neighbours along K* when every setting they differ in is in K, they differ in all of
K, and every key of K is a number (bool excluded) in both. A *series* is a largest group of rows that are pairwise
neighbours along the same K (in a table of ablation rows, e.g. DMAE at mask ratios 0.75 / 0.9 / 0.95, one series
along pretrain.mask_ratio). An axis is kept when

- K is one setting (any series of two or more rows), or
- K is several settings that move together (the warm-up scaled with the epochs): a series of three or more rows whose
  keys all order the rows alike (or one in reverse); a two-row series along the same K then joins that axis as a
  second series.

A row that differs from the others in two settings that do not move together (or in a non-numeric one: the method,
the distance, the model) belongs to no series: MAE, KD and scratch rows of a masking table are left out of its
mask-ratio axis. Pure Python.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

IGNORED = ("name", "seed", "inputs", "kind")  # top-level spec keys that never make two rows different conditions
STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class Series:
    name: str  # what its rows share: their row name (a sweep's points), else their method, else the rows joined
    points: Tuple[Tuple[str, float], ...]  # (row, x) sorted by x


@dataclass(frozen=True)
class Axis:
    keys: Tuple[str, ...]  # the settings that vary, "<stage>:<section>.<key>"; the first is x
    series: Tuple[Series, ...]

    @property
    def key(self) -> str:
        return self.keys[0]

    @property
    def label(self) -> str:
        """'pretrain.mask_ratio'; a key of another section: 'distill.alpha (pretrain stage)'; keys that move with
        it in brackets."""
        out = setting_label(self.keys[0])
        if len(self.keys) > 1:
            out += " (with " + ", ".join(setting_label(k) for k in self.keys[1:]) + ")"
        return out

    @property
    def slug(self) -> str:
        """A file-name part: the key's path ('pretrain.mask_ratio')."""
        return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in self.keys[0].split(":", 1)[-1])

    @property
    def rows(self) -> List[str]:
        return [r for s in self.series for r, _ in s.points]


def setting_label(key: str) -> str:
    stage, _, path = key.partition(":")
    return path if path.split(".", 1)[0] == stage else f"{path} ({stage} stage)"


def _flat(d: Mapping, prefix: str, out: Dict[str, object]) -> None:
    for k, v in d.items():
        if isinstance(v, Mapping):
            _flat(v, f"{prefix}{k}.", out)
        else:
            out[f"{prefix}{k}"] = v


def row_settings(specs: Mapping[str, Mapping]) -> Dict[str, Dict[str, object]]:
    """{row: {"<stage>:<path>": value}} from {row: {"pretrain": spec dict | None, "finetune": spec dict | None}}
    (harness.report.collect's Collected.specs); a row with no spec at all is left out."""
    out: Dict[str, Dict[str, object]] = {}
    for row, by_stage in specs.items():
        flat: Dict[str, object] = {}
        for stage in STAGES:
            spec = (by_stage or {}).get(stage)
            if isinstance(spec, Mapping):
                part: Dict[str, object] = {}
                _flat({k: v for k, v in spec.items() if k not in IGNORED}, "", part)
                flat.update({f"{stage}:{k}": v for k, v in part.items()})
        if flat:
            out[row] = flat
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _diff(a: Mapping, b: Mapping) -> Optional[Tuple[str, ...]]:
    """The settings two rows differ in, sorted, when all are numbers in both; None when one is not (or is missing
    on one side) or when they differ in nothing."""
    keys = sorted(k for k in set(a) | set(b) if k not in a or k not in b or not _same(a[k], b[k]))
    if not keys or not all(k in a and k in b and _number(a[k]) and _number(b[k]) for k in keys):
        return None
    return tuple(keys)


def _moves_together(rows: Sequence[str], keys: Sequence[str], settings: Mapping[str, Mapping]) -> bool:
    """Every key orders the rows as the first does, or in reverse (within a series two rows never tie in a key)."""
    first = sorted(rows, key=lambda r: settings[r][keys[0]])
    return all(sorted(rows, key=lambda r: settings[r][k]) in (first, first[::-1]) for k in keys[1:])


def _name(rows: Sequence[str], names: Mapping[str, str], methods: Mapping[str, str]) -> str:
    for by in (names, methods):
        vals = {by.get(r) for r in rows}
        if len(vals) == 1 and None not in vals:
            return str(vals.pop())
    return ", ".join(rows)


def ablation_axes(settings: Mapping[str, Mapping], methods: Optional[Mapping[str, str]] = None,
                  names: Optional[Mapping[str, str]] = None) -> List[Axis]:
    """The axes of a table (see the module doc). settings: {row: flat settings} (row_settings), in table order;
    methods / names: {row: method} / {row: the row's name} (a sweep's rows are `<row> @ <point>`, named by their
    row), used to name the series. Rows with identical settings (the same computation) count once, the first."""
    methods, names = methods or {}, names or {}
    rows: List[str] = []
    for r in settings:
        if not any(_same(settings[r], settings[o]) for o in rows):
            rows.append(r)
    labels = {(a, b): _diff(settings[a], settings[b]) for i, a in enumerate(rows) for b in rows[i + 1:]}
    lab = lambda a, b: labels.get((a, b), labels.get((b, a)))  # noqa: E731
    by_keys: Dict[Tuple[str, ...], List[List[str]]] = {}
    for keys in dict.fromkeys(k for k in labels.values() if k):
        left = [r for r in rows if any(lab(r, o) == keys for o in rows if o != r)]
        groups: List[List[str]] = []
        for r in left:  # greedy cliques in table order: a row joins the first group it neighbours entirely
            home = next((g for g in groups if all(lab(r, o) == keys for o in g)), None)
            if home is None:
                groups.append([r])
            else:
                home.append(r)
        by_keys[keys] = [g for g in groups if len(g) >= 2]
    out = []
    for keys, groups in by_keys.items():
        if len(keys) > 1:
            if not any(len(g) >= 3 and _moves_together(g, keys, settings) for g in groups):
                continue
            groups = [g for g in groups if _moves_together(g, keys, settings)]
        if not groups:
            continue
        series = tuple(Series(_name(g, names, methods), tuple(sorted(((r, float(settings[r][keys[0]])) for r in g),
                                                                     key=lambda p: p[1])))
                       for g in groups)
        out.append(Axis(tuple(keys), series))
    return out
