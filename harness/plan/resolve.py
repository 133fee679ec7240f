"""Resolving against the table config's schema (harness.plan.schema): a dotted key walked down the schema
(unknown_key: the first component with no place in it, and the closest known one), and a row merged with the table's
sections into exactly what its stages receive (resolve_row: row overrides type-checked, epoch_scale applied,
effective_batch turned into accum_iter over the launcher's world size, aligned block pairs derived). Also the data and
runtime sections a stage receives (data_spec, runtime_of) and the processes a launcher starts (world_size).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.core.arch import PRESETS
from harness.core.spec import DataConfig, ModelConfig, StageRuntime
from harness.plan.schema import (ROWS, ConfigError, DistillConfig, FinetuneConfig, KDSection, PretrainConfig, RowConfig,
                                 TableConfig, TeacherConfig, section_schema)


# ------------------------------------------------------------------------------------ unknown keys: did you mean
def closest(word: str, choices) -> List[str]:
    """The known names closest to `word` (difflib, cutoff 0.6): every one tied with the best, at most three, in the
    order given; [] when nothing is close."""
    choices = [str(c) for c in choices]
    best = difflib.get_close_matches(str(word), choices, n=1)
    if not best:
        return []
    score = lambda c: difflib.SequenceMatcher(None, str(word), c).ratio()  # noqa: E731
    top = score(best[0])
    return [c for c in choices if score(c) == top][:3]


@dataclass
class UnknownKey:
    """The first component of a dotted key that the table's schema has no place for."""
    key: str  # the dotted key as given
    section: str  # the dotted path above the unknown component ('' = the top level)
    part: str  # the unknown component
    choices: List[str]  # what the section has
    row: bool  # the component names a row of the table

    @property
    def suggestion(self) -> Optional[str]:
        """The key with the unknown component replaced by the closest known one(s), 'a or b' on a tie (None when
        nothing is close)."""
        parts = self.key.split(".")
        i = len(self.section.split(".")) if self.section else 0
        close = [".".join(parts[:i] + [c] + parts[i + 1:]) for c in closest(self.part, self.choices)]
        return " or ".join(close) or None

    def describe(self, table: str) -> str:
        better = self.suggestion
        if self.row:
            return (f"table {table!r} has no row {self.part!r}" + (f"; did you mean {better}?" if better else "")
                    + f" (rows: {', '.join(self.choices)}; a new row is added in recipes/{table}.yaml, not on the "
                    "command line)")
        where = self.section or "the top level of the config"
        return (f"no key {self.part!r} in {where}" + (f"; did you mean {better}?" if better else
                                                     f" (its keys: {', '.join(self.choices)})"))



def unknown_key(key: str, rows, schema=TableConfig, section: str = "") -> Optional[UnknownKey]:
    """Walk the dotted `key` (below `section`, whose schema is `schema`; TableConfig and the top level by default)
    down the schema, `rows` being the table's row keys: the first component with no place in it, or None when every
    checkable component exists. Below a free mapping or a value nothing is checked (launcher.additional_parameters.*,
    models.*, checkpoints.*)."""
    parts, head = key.split("."), [section] if section else []
    node = schema
    for i, part in enumerate(parts):
        if node is ROWS:
            choices, row = sorted(rows), True
            nxt = RowConfig
        elif node is not None:
            choices, row = [f.name for f in fields(node)], False
            nxt = section_schema(node, part) if part in choices else None
        else:
            return None
        if part not in choices:
            return UnknownKey(".".join(head + parts), ".".join(head + parts[:i]), part, choices, row)
        node = nxt
    return None


# ------------------------------------------------------------------------------------------------------ a row
def merged(section: DictConfig, overrides: Dict[str, Any], schema, where: str) -> dict:
    """Apply a row's overrides to a table-level section, type-checked against its dataclass."""
    base = OmegaConf.merge(OmegaConf.structured(schema), section)
    try:
        if isinstance(overrides, DictConfig):  # resolve ${models.base} etc. against the whole config first
            overrides = OmegaConf.to_container(overrides, resolve=True)
        out = OmegaConf.merge(base, OmegaConf.create(dict(overrides)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        u = unknown_key(str(key), (), schema, where) if key else None
        better = f"; did you mean {u.suggestion}?" if u is not None and u.suggestion else ""
        raise ConfigError(f"{where}{'.' + key if key else ''}: {str(e).splitlines()[0]}{better}") from None
    return OmegaConf.to_container(out, resolve=True)


def resolve_pairs(distill: dict, student_depth: int, teacher_depth: int) -> List[List[int]]:
    """Explicit pairs, or pairs derived from the `align` depth fractions."""
    if distill["pairs"]:
        return [list(p) for p in distill["pairs"]]
    pairs = []
    for f in distill["align"]:
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"distill.align: {f} is not a fraction of depth in (0, 1]")
        pairs.append([math.ceil(f * student_depth) - 1, math.ceil(f * teacher_depth) - 1])
    if not pairs:
        raise ConfigError("distill: give pairs or align")
    return pairs


def resolve_schedule(pretrain: dict) -> dict:
    """Apply epoch_scale (schedule ablations); the stage spec holds the resulting epochs only."""
    out = dict(pretrain)
    scale = out.pop("epoch_scale", 1.0)
    if scale <= 0:
        raise ConfigError(f"pretrain.epoch_scale={scale} must be > 0")
    if scale != 1.0:
        out["epochs"] = max(1, int(round(out["epochs"] * scale)))
        out["warmup_epochs"] = min(out["warmup_epochs"] * scale, out["epochs"])
    return out


def resolve_accum(sec: dict, world: int, where: str, devices: str = "", batch_key: str = "") -> dict:
    """Derive accum_iter from the optional effective_batch (then dropped: the stage spec holds accum_iter only, so
    a section without effective_batch gives the same stage as before, and one with it a stage whose id follows the
    derived accum_iter). where: the key of the section that sets effective_batch; batch_key: the one that sets its
    batch_size (default: <where>.batch_size); devices: how the world size comes about (world_text)."""
    out = dict(sec)
    eff = out.pop("effective_batch", None)
    if eff is None:
        return out
    per_step = out["batch_size"] * world
    if eff < 1 or eff % per_step:
        batch_key = batch_key or f"{where}.batch_size"
        fits = [b for b in range(out["batch_size"], 0, -1) if eff >= 1 and eff % (b * world) == 0]
        hint = f" ({batch_key}={fits[0]} gives accum_iter {eff // (fits[0] * world)})" if fits else \
            f" (no batch_size can: {eff} is not a multiple of {world})" if eff >= 1 else ""
        raise ConfigError(f"{where}.effective_batch={eff} is not a positive multiple of batch_size {out['batch_size']} "
                          f"x {world} device(s) = {per_step} per step (accum_iter would be {eff / per_step:g})"
                          f"{'; devices: ' + devices if devices else ''}. Change {where}.effective_batch, {batch_key}"
                          f"{hint} or the device count so that effective_batch / (batch_size x devices) is a whole "
                          "number")
    out["accum_iter"] = eff // per_step
    return out


@dataclass
class Row:
    """One table row merged with the table's sections and resolved: epoch_scale applied, effective_batch turned into
    accum_iter, the aligned block pairs derived (distill.pairs; `align` dropped). The one place a row's settings are
    computed: validate() checks them, the planner turns them into stages."""
    key: str
    method: str
    label: str
    paper: Optional[str]
    student: dict
    teacher: dict  # TeacherConfig, its pretrain and finetune sections resolved
    pretrain: dict
    distill: dict
    finetune: dict
    kd: dict


def resolve_row(cfg: DictConfig, key: str) -> Row:
    """Merge and resolve row `key` (ConfigError on a bad override, preset, schedule, batch or align fraction)."""
    row, where, world = cfg.rows[key], f"rows.{key}", world_size(cfg.launcher)
    devices = f"{world} = {world_text(cfg.launcher)}"

    def origin(section: str, override, name: str) -> str:
        """The config key that sets `name` of this row's `section`: the row's override, else the table's."""
        return f"{where}.{section}" if name in (override or {}) else section

    def accum(sec: dict, section: str, override) -> dict:
        return resolve_accum(sec, world, origin(section, override, "effective_batch"), devices,
                             f"{origin(section, override, 'batch_size')}.batch_size")
    student = merged(cfg.student, row.student, ModelConfig, f"{where}.student")
    teacher = merged(cfg.teacher, row.teacher, TeacherConfig, f"{where}.teacher")
    for sec in ("pretrain", "finetune"):
        t_over = (row.teacher or {}).get(sec)
        teacher[sec] = accum(resolve_schedule(teacher[sec]) if sec == "pretrain" else teacher[sec], f"teacher.{sec}",
                             t_over)
    pre = accum(resolve_schedule(merged(cfg.pretrain, row.pretrain, PretrainConfig, f"{where}.pretrain")), "pretrain",
                row.pretrain)
    fin = accum(merged(cfg.finetune, row.finetune, FinetuneConfig, f"{where}.finetune"), "finetune", row.finetune)
    dis = merged(cfg.distill, row.distill, DistillConfig, f"{where}.distill")
    for who, m in (("student", student), ("teacher", teacher["model"])):
        if m["preset"] not in PRESETS:
            raise ConfigError(f"{where}.{who}.preset={m['preset']!r}: unknown; known: {', '.join(sorted(PRESETS))}")
    dis["pairs"] = resolve_pairs(dis, PRESETS[student["preset"]].depth, PRESETS[teacher["model"]["preset"]].depth)
    dis.pop("align")
    return Row(key, row.method, row.label, row.paper, student, teacher, pre, dis, fin,
               merged(cfg.kd, row.kd, KDSection, f"{where}.kd"))


# ------------------------------------------------------------------------------------------- what stages receive
def tasks_per_node(launcher) -> int:
    """Processes a job starts per node: launcher.tasks_per_node, else one per GPU, else one."""
    return int(launcher.get("tasks_per_node") or 0) or max(1, int(launcher["gpus_per_node"] or 0))


def world_size(launcher) -> int:
    """Processes one stage runs on: debug runs it in this process; local starts tasks_per_node tasks on this machine
    (launcher.nodes does not apply); slurm runs nodes x tasks per node. The planner (effective batch -> accum_iter),
    the launchers and the estimator all use this."""
    if launcher["name"] == "debug":
        return 1
    return tasks_per_node(launcher) * (int(launcher["nodes"] or 1) if launcher["name"] == "slurm" else 1)


def world_text(launcher) -> str:
    """How world_size(launcher) comes about, in config keys, for messages: e.g. "launcher.nodes=2 x
    launcher.gpus_per_node=8"."""
    if launcher["name"] == "debug":
        return "launcher=debug runs a stage in one process"
    if launcher.get("tasks_per_node"):
        per = f"launcher.tasks_per_node={launcher['tasks_per_node']}"
    elif launcher["gpus_per_node"]:
        per = f"launcher.gpus_per_node={launcher['gpus_per_node']}"
    else:
        per = "one CPU task per node (launcher.gpus_per_node=0)"
    return f"launcher.nodes={launcher['nodes']} x {per}" if launcher["name"] == "slurm" else \
        f"{per} on this machine (launcher={launcher['name']})"


def mem_gb_of(launcher) -> Optional[float]:
    """The memory a job asks per node: launcher.mem_gb when set, else launcher.mem_gb_per_gpu x gpus_per_node for a
    GPU job; None: the cluster's default (no --mem)."""
    if launcher.get("mem_gb"):
        return float(launcher["mem_gb"])
    per_gpu, gpus = launcher.get("mem_gb_per_gpu"), int(launcher.get("gpus_per_node") or 0)
    return float(per_gpu) * gpus if per_gpu and gpus else None


def data_spec(cfg: DictConfig, finetune: bool = False) -> DataConfig:
    """The data section a stage receives: a fine-tune's reads the first data.finetune_subset training images (when
    set), every other stage's all of them; finetune_subset itself is resolved away."""
    d = {f.name: cfg.data[f.name] for f in fields(DataConfig)}
    if finetune and cfg.data.finetune_subset:
        d["train_subset"] = int(cfg.data.finetune_subset)
    return DataConfig(**d)


def runtime_of(cfg: DictConfig) -> StageRuntime:
    """How the table's stages run (run.*, less the driver's own settings): what each stage job receives."""
    return StageRuntime(**{f.name: cfg.run[f.name] for f in fields(StageRuntime)})
