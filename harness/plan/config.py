"""Structured configs (hydra-core / OmegaConf). A table recipe (recipes/<table>.yaml) is validated against
`TableConfig`: unknown or mistyped keys and wrong types are errors that name the key, before anything runs. Its
sections extend the stage spec's (harness.core.spec) with the keys `resolve_row` resolves away, so a resolved section is
exactly what a stage receives.

Compose a table's config exactly as the command line does:

    >>> cfg = load_config("table2", ["profile=smoke", "seeds=2"])
"""
from __future__ import annotations

import difflib
import math
import re
import typing
from pathlib import Path
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

import recipes

from harness.core.arch import PRESETS
from harness.core.spec import (DataConfig, DistillSpec, FinetuneSpec, KDConfig, ModelConfig, PretrainSpec, ProbeSpec,
                               StageRuntime)

RECIPES_DIR = recipes.path()


@dataclass
class PretrainConfig(PretrainSpec):
    # Optional: the total batch per optimizer update. When set, accum_iter is derived from it at plan time:
    # effective_batch / (batch_size x world_size(launcher)), which must be an integer (refused otherwise), so the
    # effective batch and the lr (blr x effective batch / 256) stay the same on any number of devices. The paper
    # profile sets the official 4096 (pre-training) and 1024 (fine-tuning).
    effective_batch: Optional[int] = None
    epoch_scale: float = 1.0  # schedule ablations: epochs and warmup scaled by this (>= 1 epoch)


@dataclass
class DistillConfig(DistillSpec):
    # pairs empty: derived from `align`, fractions of depth: block ceil(f * depth) - 1 of each, so 0.75 gives the
    # official pair (8, 17) for ViT-B (12) <- ViT-L (24)
    align: List[float] = field(default_factory=lambda: [0.75])
    teacher_source: str = "pretrained"  # pretrained | finetuned


@dataclass
class DataSection(DataConfig):
    # fine-tuning (student and teacher) reads only the first finetune_subset of the training images, with their
    # labels; pre-training reads all of them, without (low-label fine-tuning: what the encoder learned matters more).
    # 0 = the same images as pre-training. Resolved away: a fine-tune stage's data.train_subset holds it.
    finetune_subset: int = 0


@dataclass
class ProbeConfig(ProbeSpec):
    # a kNN probe (harness.core.probe) of every student pre-train's last block, of the scratch rows' random
    # initialisation
    # and of the teacher's aligned block, on the test split; false = no probe stages
    enabled: bool = True


@dataclass
class GateConfig:
    """Positive controls checked before any paper claim is judged (harness.report.stats gates): a paper claim judged
    on a
    profile whose gate failed reads "not testable at this profile"."""
    # false: no positive controls for this run (a pipeline check, a user's table without a scratch row): the report
    # says the gates are off and judges paper claims without them
    enabled: bool = True
    mae_row: str = "mae"  # the MAE baseline
    scratch_row: str = "scratch"  # the same student fine-tuned from random initialisation
    # (i) MAE pre-training is worth at least this much top-1 over scratch (paired interval's lower bound above it)
    min_pretraining_gain: float = 2.0
    # (ii) the teacher's aligned block probes at least this much above the MAE student's last block (kNN top-1)
    min_teacher_probe_gap: float = 5.0


@dataclass
class FinetuneConfig(FinetuneSpec):
    effective_batch: Optional[int] = None  # as PretrainConfig.effective_batch: derives accum_iter when set


@dataclass
class TeacherConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig("vit_large", 16))
    # train=True: the harness pre-trains (MAE) and fine-tunes the teacher itself. train=False: provided checkpoints
    # (paper profile: the official MAE releases) are checked before anything is submitted and used as they are.
    train: bool = True
    pretrained_ckpt: Optional[str] = None
    finetuned_ckpt: Optional[str] = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class RowConfig:
    label: str = MISSING
    # mae | dmae | kd (MAE pre-training, then KD from the fine-tuned teacher) | scratch (no pre-training: the same
    # fine-tune from the random initialisation of the row's seed)
    method: str = MISSING
    paper: Optional[str] = None  # "<table>/<row_label>" in recipes/paper-numbers.csv; None = not available
    # Overrides of the table-level sections for this row (checked against their schemas).
    pretrain: Dict[str, Any] = field(default_factory=dict)
    distill: Dict[str, Any] = field(default_factory=dict)
    finetune: Dict[str, Any] = field(default_factory=dict)
    kd: Dict[str, Any] = field(default_factory=dict)
    student: Dict[str, Any] = field(default_factory=dict)
    teacher: Dict[str, Any] = field(default_factory=dict)  # model / pretrained_ckpt / ...: another teacher


@dataclass
class RunConfig(StageRuntime):
    quiet: bool = False  # driver console: only submissions, failures and the final results table (batch logs)


@dataclass
class LauncherConfig:
    name: str = "local"  # local | slurm | debug (in-process)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    timeout_min: int = 60
    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU; 0 = one CPU task
    # processes per node; 0 = one per GPU (one without GPUs). With run.device=cpu, 2+ CPU tasks train with gloo DDP
    # (the multi-GPU code path on a CPU machine, e.g. --rehearse); with GPUs it must equal gpus_per_node
    tasks_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: Optional[float] = None  # memory per node (sbatch --mem, submitit's mem_gb); None: see mem_gb_per_gpu
    # when mem_gb is unset, a GPU job asks mem_gb_per_gpu x gpus_per_node per node (launcher=slurm: 40, as the
    # official submitit_pretrain.py asks 40 GB x GPUs per node); None, or a job without GPUs: Slurm's default
    mem_gb_per_gpu: Optional[float] = None
    max_requeues: int = 3  # preemptions/timeouts a stage may survive (launcher=slurm: 30, as the official scripts)
    array_parallelism: int = 64  # Slurm: jobs of one array running at once
    max_parallel: int = 1  # jobs in flight at once (0 = no limit); the local launcher runs them side by side
    # a job runs a stage and then the stages that consume it alone (pre-train -> fine-tune -> evaluate): one start-up
    # and one queue wait per chain; false = one job per stage
    chain: bool = True
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # extra sbatch parameters
    poll_s: float = 2.0
    signal_delay_s: Optional[int] = None  # USR2 this many seconds before the time limit (None: submitit's default)
    # Slurm runs write sbatch scripts instead of submitting (sites without long-lived drivers)
    write_sbatch: bool = False
    # shell lines run before each Slurm job (submitit's slurm_setup; also written into sbatch scripts), e.g.
    # ["module load cuda", "source activate dmae"]
    setup: List[str] = field(default_factory=list)
    # queued Slurm jobs run a copy of the code taken at submission (submitit's RsyncSnapshot, a plain copy without
    # rsync), not whatever the working tree holds when they start; None = true for slurm, false otherwise
    snapshot: Optional[bool] = None


@dataclass
class ClaimConfig:
    """A claim the report checks on this table's rows: mean over paired seeds of (group a - group b), top-1 points of
    the profile's dataset. A group's value at a seed is the mean of its rows at that seed."""
    id: str = ""  # plain name, unique in the table
    text: str = ""  # the claim in words
    a: List[str] = field(default_factory=list)  # row keys (one row or a group)
    b: List[str] = field(default_factory=list)
    test: str = ""  # greater: a - b > margin | within: |a - b| < margin
    margin: Optional[float] = None  # required
    # greater only, optional: the smallest effect of interest (top-1 points, >= 0); the claim also ends as "does not
    # hold (effect < bound)" when the interval's upper limit is below margin + bound (harness/report/stats.py)
    bound: Optional[float] = None
    # paper: the paper says it | official-default: the official code's default is at least as good | user: a user's
    # own hypothesis (judged like the others, reported as the user's, never set against a paper number)
    source: str = "paper"
    note: str = ""  # where the paper says it, or why this margin


@dataclass
class TableConfig:
    table: str = MISSING
    title: str = ""
    profile: str = MISSING
    profile_note: str = ""  # shown in the report (e.g. "not ImageNet numbers")
    seeds: int = 1
    seed: int = 0
    results_root: str = "results"
    reports_dir: str = "reports"
    dry_run: bool = False
    report: bool = True
    # The paper's model sizes at this profile's scale (recipes refer to ${models.base} etc.), and provided
    # checkpoints of other teachers (paper profile: the official MAE releases; required when a row uses them).
    models: Dict[str, str] = field(default_factory=lambda: {"large": "vit_large", "base": "vit_base",
                                                            "small": "vit_small", "tiny": "vit_tiny"})
    checkpoints: Dict[str, Optional[str]] = field(default_factory=lambda: {"base_pretrained": None,
                                                                           "base_finetuned": None})
    data: DataSection = field(default_factory=DataSection)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rows: Dict[str, RowConfig] = field(default_factory=dict)
    claims: List[ClaimConfig] = field(default_factory=list)  # checked by the report (harness/report/stats.py)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="table_schema", node=TableConfig)
    cs.store(group="launcher", name="local_schema", node=LauncherConfig, package="launcher")


register()


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


def tables() -> List[str]:
    """The tables on the recipe search path (recipes.search_path: $HARNESS_RECIPE_PATH / --recipe-dir, then the
    package's)."""
    try:
        return recipes.tables()
    except NotADirectoryError as e:
        raise ConfigError(str(e)) from None


def _searchpath_override(table_dir) -> List[str]:
    """hydra.searchpath for the compose of a table found in `table_dir`: the other folders of the recipe search path,
    in order (hydra looks in the table's folder first, then in these: a user's table gets the package's profiles)."""
    others = [d for d in recipes.search_path() if d.resolve() != Path(table_dir).resolve()]
    if not others:
        return []
    quoted = ",".join("'file://" + str(d).replace("\\", "\\\\").replace("'", "\\'") + "'" for d in others)
    return [f"hydra.searchpath=[{quoted}]"]


def load_config(table: str, overrides: Optional[List[str]] = None, check: bool = True) -> DictConfig:
    """Compose recipes/<table>.yaml with command-line style overrides (hydra's compose API); check=False skips the
    semantic checks (validate, and launcher keys the chosen launcher would ignore), for a caller that completes the
    config first (--rehearse)."""
    if table not in tables():
        raise ConfigError(f"unknown table {table!r}{did_you_mean(table, tables())} (recipes: {', '.join(tables())})")
    overrides = list(overrides or [])
    parsed = []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        for o in parsed:
            # compose() accepts hydra.* and hydra/<group> and drops them: this harness has no hydra app to use them
            if o.key_or_group.replace("/", ".").split(".")[0] == "hydra":
                raise ConfigError(
                    f"{o.input_line}: hydra's own settings (hydra.*) are not used by this harness, which composes "
                    "the recipe with hydra but runs it itself. Use its keys: results_root=<dir> (run folders, "
                    "default results), reports_dir=<dir> (reports, default reports), launcher=local|slurm|debug "
                    "and launcher.* (where stages run), -m key=a,b (sweeps)")
        where = recipes.table_dir(table)
        with initialize_config_dir(config_dir=str(where), version_base="1.3"):
            cfg = compose(config_name=table, overrides=_searchpath_override(where) + overrides)
    except (HydraException, OmegaConfBaseException, YAMLError) as e:
        msg = str(e)
        hint = _override_error(table, parsed, msg)
        if hint:
            raise ConfigError(hint) from None
        cause = e.__cause__ or e.__context__  # hydra's "Error merging override x=y" hides the reason here
        reason = str(cause).strip().split("\n")[0] if cause is not None else ""
        if reason and reason not in msg:
            first, _, rest = msg.partition("\n")
            msg = f"{first}: {reason}" + (f"\n{rest}" if rest else "")
        raise ConfigError(msg) from None
    if check:
        validate(cfg)
        check_launcher_overrides(cfg, parsed)
        check_accum_overrides(cfg, parsed)
    return cfg


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


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """'; did you mean <prefix><closest>?' (or 'a or b'), '' when nothing is close."""
    close = closest(word, choices)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


# a row's override sections are free dicts in RowConfig, checked against the table-level section's schema
ROW_SECTIONS = {"pretrain": PretrainConfig, "distill": DistillConfig, "finetune": FinetuneConfig, "kd": KDConfig,
                "student": ModelConfig, "teacher": TeacherConfig}
_ROWS = "rows"  # the walk's marker for TableConfig.rows: its keys are the recipe's rows


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


def _child(node, name: str):
    """The schema below field `name` of dataclass `node`: a dataclass, _ROWS, or None (a value or a free mapping,
    whose keys are not checked here)."""
    if node is TableConfig and name == "rows":
        return _ROWS
    if node is RowConfig and name in ROW_SECTIONS:
        return ROW_SECTIONS[name]
    hint = typing.get_type_hints(node).get(name)
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if isinstance(hint, type) and is_dataclass(hint) else None


def unknown_key(key: str, rows, schema=TableConfig, section: str = "") -> Optional[UnknownKey]:
    """Walk the dotted `key` (below `section`, whose schema is `schema`; TableConfig and the top level by default)
    down the schema, `rows` being the table's row keys: the first component with no place in it, or None when every
    checkable component exists. Below a free mapping or a value nothing is checked (launcher.additional_parameters.*,
    models.*, checkpoints.*)."""
    parts, head = key.split("."), [section] if section else []
    node = schema
    for i, part in enumerate(parts):
        if node is _ROWS:
            choices, row = sorted(rows), True
            nxt = RowConfig
        elif node is not None:
            choices, row = [f.name for f in fields(node)], False
            nxt = _child(node, part) if part in choices else None
        else:
            return None
        if part not in choices:
            return UnknownKey(".".join(head + parts), ".".join(head + parts[:i]), part, choices, row)
        node = nxt
    return None


def _override_error(table: str, parsed, msg: str) -> Optional[str]:
    """One clear message for hydra's refusal of an override, when it comes from an unknown key, row or group option:
    the key, what is wrong and the closest known name; None for any other error (hydra's own message is kept).
    Replaces hydra's hint 'To append to your config use +key=value' where appending would fail too."""
    m = re.search(r"Could not find '([^'/]+)/([^']*)'", msg)
    if m:
        group, name = m.groups()
        options = recipes.options(group)
        return (f"{group}={name}: Could not find '{group}/{name}'{did_you_mean(name, options, f'{group}=')}"
                + (f" ({group} options: {', '.join(options)})" if options else ""))
    rows = _recipe_rows(table)
    for o in parsed:
        key = o.key_or_group
        if f"'{key}'" not in msg and o.input_line not in msg:
            continue
        u = unknown_key(key, rows)
        if u is None:
            return None
        verb = "delete" if o.is_delete() else "add" if o.is_add() or o.is_force_add() else "override"
        return f"Could not {verb} '{key}': {u.describe(table)}"
    return None


# Launcher keys only the Slurm launcher (or a launcher.write_sbatch script) reads: local and debug ignore them
# (harness.run.launch.local_executor passes timeout_min, max_requeues, gpus_per_node, tasks_per_node and
# signal_delay_s; launch.execute reads max_parallel, chain and poll_s).
SLURM_ONLY = ("partition", "account", "qos", "nodes", "cpus_per_task", "mem_gb", "mem_gb_per_gpu", "array_parallelism",
              "additional_parameters", "setup", "snapshot")


def check_launcher_overrides(cfg: DictConfig, parsed) -> None:
    """A Slurm-only launcher key set on the command line under launcher=local|debug would be ignored: refused. (A
    profile may set them for every launcher; only what the user asked for is checked.)"""
    name = cfg.launcher.name
    if name == "slurm" or cfg.launcher.write_sbatch:
        return
    given = []
    for o in parsed:
        parts = o.key_or_group.split(".")
        if len(parts) >= 2 and parts[0] == "launcher" and parts[1] in SLURM_ONLY and not o.is_delete():
            given.append(o.input_line)
    if given:
        raise ConfigError(f"{', '.join(given)}: would be ignored by launcher={name}, which runs "
                          f"{'the stages in this process' if name == 'debug' else 'jobs on this machine'} "
                          f"(Slurm-only launcher keys: {', '.join(SLURM_ONLY)}). Drop "
                          f"{'it' if len(given) == 1 else 'them'}, or add launcher=slurm")


def check_accum_overrides(cfg: DictConfig, parsed) -> None:
    """An accum_iter set on the command line for a section whose effective_batch is set (the paper profile's) would
    be replaced by the one derived from effective_batch: refused, naming both keys."""
    for o in parsed:
        parts = o.key_or_group.split(".")
        if len(parts) < 2 or parts[-1] != "accum_iter" or parts[-2] not in ("pretrain", "finetune") or o.is_delete():
            continue
        section = parts[:-1]  # [rows, <row>,] [teacher,] pretrain|finetune
        candidates = [section] + ([section[2:]] if section[0] == "rows" and len(section) > 2 else [])
        for path in candidates:
            node = cfg
            for p in path:
                node = node.get(p) if node is not None and hasattr(node, "get") else None
            if node is None or not hasattr(node, "get") or "effective_batch" not in node:
                continue  # a row without its own effective_batch: the table's applies
            eff = node.get("effective_batch")
            if eff is None:
                break
            key = ".".join(path)
            raise ConfigError(f"{o.input_line}: would be ignored, because {key}.effective_batch={eff} is set (profile "
                              f"{cfg.profile}) and accum_iter is derived from it: effective_batch / (batch_size x "
                              f"devices). Set {key}.effective_batch instead, or {key}.effective_batch=null to give "
                              "accum_iter yourself")


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


CHOICES = {
    "data.name": ("fashion_mnist", "imagefolder"),
    "pretrain.visible_rounding": ("paper", "official"),
    "distill.projection": ("linear", "mlp"),
    "distill.distance": ("l1", "l2"),
    "distill.teacher_mode": ("partial", "full"),
    "distill.teacher_source": ("pretrained", "finetuned"),
    "kd.kind": ("soft", "hard"),
    "run.amp": ("auto", "none", "bf16", "fp16"),
    "launcher.name": ("local", "slurm", "debug"),
}


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


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(what: str, value) -> None:
    """table, profile and row keys become path components (results/<table>/<profile>/, report figures): plain names
    only, no '/', no '..'."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise ConfigError(f"{what}={value!r}: must be a plain name ([A-Za-z0-9_.-], not starting with '.' or '-', "
                          "no '..', no '/')")


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
               merged(cfg.kd, row.kd, KDConfig, f"{where}.kd"))


# Overrides that do not change what a row computes, only where, how fast or how many times (issue: honest
# overrides): a row they alone touch keeps its label, paper number and claims. Everything else that changes a row's
# stages marks the row as overridden (harness.plan.graph.mark_overridden). Keys below rows.<row>. count by their
# section.
NEUTRAL_OVERRIDES = ("profile", "launcher", "seed", "seeds", "results_root", "reports_dir", "dry_run", "report",
                     "run", "checkpoints", "data.root", "teacher.pretrained_ckpt", "teacher.finetuned_ckpt", "title",
                     "gates", "probe")


def is_neutral(key: str) -> bool:
    """Whether an override of `key` (a dotted key or a group, e.g. launcher) is declared neutral."""
    k = key.replace("/", ".")
    if k.startswith("rows."):
        k = ".".join(k.split(".")[2:])
    return any(k == n or k.startswith(n + ".") for n in NEUTRAL_OVERRIDES)


def neutral_overrides(overrides: List[str]) -> List[str]:
    """The neutral ones of command-line overrides, as given (the recipe as run, less what changes a row)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.input_line for o in parsed if is_neutral(o.key_or_group)]


def _check_range(where: str, sec: dict, key: str, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    v = sec.get(key)
    if v is None:
        return
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad or v != v:  # NaN is never in range
        lo_s = "" if lo is None else f"{'(' if lo_open else '['}{lo}"
        hi_s = "inf)" if hi is None else f"{hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{where}.{key}={v} must be in {lo_s or '(-inf'}, {hi_s}")


def _check_section(where: str, sec: dict, kind: str) -> None:
    for key, allowed in CHOICES.items():
        group, name = key.split(".")
        if group == kind and name in sec and sec[name] not in allowed:
            raise ConfigError(f"{where}.{name}={sec[name]!r}: must be one of {', '.join(allowed)}")
    if kind in ("pretrain", "finetune"):
        if sec["epochs"] < 1 or sec["batch_size"] < 1 or sec["accum_iter"] < 1:
            raise ConfigError(f"{where}: epochs, batch_size and accum_iter must be >= 1")
        if not 0 <= sec["warmup_epochs"] <= sec["epochs"]:
            raise ConfigError(f"{where}.warmup_epochs={sec['warmup_epochs']} must be within [0, epochs]")
    if kind in ("pretrain", "finetune"):
        _check_range(where, sec, "crop_min", 0, 1, lo_open=True)
        _check_range(where, sec, "blr", 0, lo_open=True)
        _check_range(where, sec, "min_lr", 0)
        _check_range(where, sec, "weight_decay", 0)
        _check_range(where, sec, "clip_grad", 0, lo_open=True)
    if kind == "finetune":
        for key, hi, hi_open in (("drop_path", 1, True), ("smoothing", 1, True), ("reprob", 1, False)):
            _check_range(where, sec, key, 0, hi, hi_open=hi_open)
        for key in ("mixup", "cutmix"):
            _check_range(where, sec, key, 0)
        _check_range(where, sec, "layer_decay", 0, 1, lo_open=True)
        if sec["eval_batch_size"] < 1:
            raise ConfigError(f"{where}.eval_batch_size={sec['eval_batch_size']} must be >= 1")
    if kind == "kd":
        _check_range(where, sec, "weight", 0, 1)
        _check_range(where, sec, "temperature", 0, lo_open=True)
    if kind == "distill":  # NaN passes here on purpose: a NaN weight is a run-time fault (NonFiniteLoss), tested
        for key in ("alpha", "pixel_weight"):
            if sec[key] < 0:
                raise ConfigError(f"{where}.{key}={sec[key]} must be >= 0")
    if kind == "pretrain" and not 0.0 <= sec["mask_ratio"] < 1.0:
        raise ConfigError(f"{where}.mask_ratio={sec['mask_ratio']} must be in [0, 1)")
    if kind == "finetune" and sec["mixup"] + sec["cutmix"] > 0 and sec["batch_size"] % 2:
        raise ConfigError(f"{where}.batch_size={sec['batch_size']} must be even with mixup/cutmix")


def validate(cfg: DictConfig) -> None:
    """Semantic checks the schema cannot express (impossible values, unknown presets, block indices)."""
    try:  # hydra lets `+section.key=...` add keys to a structured config: re-check the whole tree against the schema
        OmegaConf.merge(OmegaConf.structured(TableConfig), OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        u = unknown_key(key, set(cfg.rows.keys()) | _recipe_rows(cfg.table)) if key != "?" else None
        better = f"; did you mean {u.suggestion}?" if u is not None and u.suggestion else ""
        raise ConfigError(f"{key}: {str(e).splitlines()[0]} (unknown key or wrong type){better}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing mandatory value(s): {', '.join(missing)} (set them on the command line, "
                          f"e.g. {missing[0]}=...)")
    for key, allowed in CHOICES.items():
        group, name = key.split(".")
        if group in ("data", "run", "launcher") and cfg[group][name] not in allowed:
            raise ConfigError(f"{key}={cfg[group][name]!r}: must be one of {', '.join(allowed)}")
    check_name("table", cfg.table)
    check_name("profile", cfg.profile)
    if cfg.seeds < 1:
        raise ConfigError(f"seeds={cfg.seeds} must be >= 1")
    la, d = cfg.launcher, cfg.data
    for key, lo in (("nodes", 1), ("gpus_per_node", 0), ("tasks_per_node", 0), ("cpus_per_task", 1), ("timeout_min", 1),
                    ("max_requeues", 0), ("array_parallelism", 1), ("max_parallel", 0)):
        if la[key] < lo:
            raise ConfigError(f"launcher.{key}={la[key]} must be >= {lo}")
    if not la.poll_s > 0:
        raise ConfigError(f"launcher.poll_s={la.poll_s} must be > 0")
    for key in ("mem_gb", "mem_gb_per_gpu"):
        if la.get(key) is not None and not la[key] > 0:
            raise ConfigError(f"launcher.{key}={la[key]} must be > 0 (or null: no memory request from this key)")
    if la.signal_delay_s is not None and not 0 <= la.signal_delay_s < 60 * la.timeout_min:
        raise ConfigError(f"launcher.signal_delay_s={la.signal_delay_s} must be in [0, timeout_min x 60 = "
                          f"{60 * la.timeout_min})")
    for key in ("threads", "num_workers", "nan_restarts", "tb_every"):
        if cfg.run[key] < 0:
            raise ConfigError(f"run.{key}={cfg.run[key]} must be >= 0")
    if d.img_size < 1 or d.train_subset < 0 or d.test_subset < 0 or d.holdout < 0 or d.finetune_subset < 0:
        raise ConfigError(f"data: img_size={d.img_size} must be >= 1, train_subset={d.train_subset}, "
                          f"test_subset={d.test_subset}, holdout={d.holdout} and finetune_subset={d.finetune_subset} "
                          ">= 0")
    if d.finetune_subset and d.train_subset and d.finetune_subset > d.train_subset:
        raise ConfigError(f"data.finetune_subset={d.finetune_subset} exceeds data.train_subset={d.train_subset}: "
                          "fine-tuning reads a subset of the pre-training images")
    if cfg.probe.k < 1 or not cfg.probe.temperature > 0 or cfg.probe.batch_size < 1:
        raise ConfigError(f"probe: k={cfg.probe.k} and batch_size={cfg.probe.batch_size} must be >= 1, "
                          f"temperature={cfg.probe.temperature} > 0")
    _check_range("data", d, "eval_crop_pct", 0, 1, lo_open=True)
    for n in ("pretrained_ckpt", "finetuned_ckpt"):
        if cfg.teacher.train and cfg.teacher[n]:
            raise ConfigError(f"teacher.{n}={cfg.teacher[n]!r} is given but teacher.train=true (profile "
                              f"{cfg.profile}): the harness trains its own teacher and would ignore that file. Add "
                              f"teacher.train=false to use provided checkpoints, or drop teacher.{n}")
    if not cfg.rows:
        raise ConfigError(f"table {cfg.table!r} has no rows")
    for rkey, row in cfg.rows.items():
        where = f"rows.{rkey}"
        check_name("row key", rkey)
        if row.method not in METHODS:
            raise ConfigError(f"{where}.method={row.method!r}: must be one of {', '.join(METHODS)}")
        if row.method == "scratch":
            ignored = [f"{where}.{k}" for k in ("pretrain", "distill", "kd", "teacher") if row[k]]
            if ignored:
                raise ConfigError(f"{', '.join(ignored)}: a scratch row has no pre-training and no teacher, so this "
                                  "would be ignored; remove it")
        r = resolve_row(cfg, rkey)
        student, teacher, dis = r.student, r.teacher, r.distill
        for name, sec, kind in ((f"{where}.pretrain", r.pretrain, "pretrain"), (f"{where}.distill", dis, "distill"),
                                (f"{where}.finetune", r.finetune, "finetune"), (f"{where}.kd", r.kd, "kd"),
                                (f"{where}.teacher.pretrain", teacher["pretrain"], "pretrain"),
                                (f"{where}.teacher.finetune", teacher["finetune"], "finetune")):
            _check_section(name, sec, kind)
        for who, m in (("student", student), ("teacher", teacher["model"])):
            if cfg.data.img_size % m["patch_size"]:
                raise ConfigError(f"{where}.{who}: data.img_size={cfg.data.img_size} is not a multiple of "
                                  f"patch_size={m['patch_size']}")
        for n in ("pretrained_ckpt", "finetuned_ckpt"):
            if teacher["train"] and teacher[n]:
                raise ConfigError(f"{where}.teacher.{n}={teacher[n]!r} (from the recipe or checkpoints.*) is given "
                                  "but this row's teacher is trained by the harness (teacher.train=true), which "
                                  "would ignore that file; set teacher.train=false or leave the checkpoint unset")
        if not teacher["train"]:
            needs = ["pretrained_ckpt"] if row.method == "dmae" and dis["teacher_source"] == "pretrained" else []
            if row.method == "kd" or (row.method == "dmae" and dis["teacher_source"] == "finetuned"):
                needs.append("finetuned_ckpt")
            for n in needs:
                if not teacher[n]:
                    raise ConfigError(f"{where}: teacher.{n} is required when teacher.train=false (profile "
                                      f"{cfg.profile}); give the official MAE checkpoint's path")
        if row.method == "dmae":
            s_depth, t_depth = PRESETS[student["preset"]].depth, PRESETS[teacher["model"]["preset"]].depth
            for pair in dis["pairs"]:
                if len(pair) != 2:
                    raise ConfigError(f"{where}.distill.pairs: {pair} is not a (student block, teacher block) pair")
                s, t = pair
                if not 0 <= s < s_depth:
                    raise ConfigError(f"{where}.distill.pairs: student block {s} is beyond the student's depth "
                                      f"{s_depth} (0-based)")
                if not 0 <= t < t_depth:
                    raise ConfigError(f"{where}.distill.pairs: teacher block {t} is beyond the teacher's depth "
                                      f"{t_depth} (0-based)")
    if cfg.launcher.gpus_per_node and cfg.run.device == "cpu":
        raise ConfigError("launcher.gpus_per_node > 0 with run.device=cpu")
    if cfg.launcher.name == "local" and cfg.run.device == "cuda" and not cfg.launcher.gpus_per_node:
        raise ConfigError("run.device=cuda with launcher=local and launcher.gpus_per_node=0: submitit's local executor "
                          "shows a job only the GPUs it asks for (CUDA_VISIBLE_DEVICES), so every stage would find no "
                          "GPU. Set launcher.gpus_per_node=1 (or the GPUs a stage should use)")
    if cfg.launcher.gpus_per_node and cfg.launcher.tasks_per_node \
            and cfg.launcher.tasks_per_node != cfg.launcher.gpus_per_node:
        raise ConfigError(f"launcher.tasks_per_node={cfg.launcher.tasks_per_node} with gpus_per_node="
                          f"{cfg.launcher.gpus_per_node}: a GPU job runs one task per GPU (leave tasks_per_node at 0)")
    validate_claims(cfg)


# claim sources: only `paper` claims are set against the paper's numbers and gated (harness.report.stats)
CLAIM_TESTS, CLAIM_SOURCES = ("greater", "within"), ("paper", "official-default", "user")
CONTROL_METHOD = "scratch"  # the positive control: the same fine-tune from random initialisation, no pre-training
METHODS = ("mae", "dmae", "kd", CONTROL_METHOD)


def _recipe_rows(table: str) -> set:
    """Row keys written in the table's recipe file (empty when there is no such file)."""
    path = recipes.find(f"{table}.yaml")
    if path is None or not path.is_file():
        return set()
    return set((OmegaConf.load(path).get("rows") or {}).keys())


def validate_claims(cfg: DictConfig) -> None:
    """Each claim names rows of the table, a known test and source, a margin, and for `greater` optionally a bound
    (finite, >= 0; a `within` claim has none: its margin already is the equivalence bound). A row removed on the
    command line (~rows.<key>) leaves its claims in place; the report shows them as not applicable."""
    known = set(cfg.rows.keys()) | _recipe_rows(cfg.table)
    seen = set()
    for i, cl in enumerate(cfg.get("claims") or []):
        where = f"table {cfg.table!r} claims[{i}] (id {cl.id!r})"
        if not cl.id or not NAME.fullmatch(cl.id) or ".." in cl.id:
            raise ConfigError(f"table {cfg.table!r} claims[{i}]: id={cl.id!r} must be a plain name ([A-Za-z0-9_.-])")
        if cl.id in seen:
            raise ConfigError(f"{where}: id used twice")
        seen.add(cl.id)
        if not cl.text:
            raise ConfigError(f"{where}: text is empty; say what the claim is")
        for side in ("a", "b"):
            if not cl[side]:
                raise ConfigError(f"{where}: {side} is empty; give one row or a group of rows")
            unknown = [r for r in cl[side] if r not in known]
            if unknown:
                raise ConfigError(f"{where}: {side} names unknown row(s) {', '.join(map(repr, unknown))}"
                                  f"{did_you_mean(unknown[0], known)}; rows of {cfg.table!r}: "
                                  f"{', '.join(sorted(known))}")
        both = sorted(set(cl.a) & set(cl.b))
        if both:
            raise ConfigError(f"{where}: row(s) {', '.join(both)} on both sides")
        if cl.test not in CLAIM_TESTS:
            raise ConfigError(f"{where}: test={cl.test!r} must be one of {', '.join(CLAIM_TESTS)}")
        if cl.margin is None or not math.isfinite(cl.margin):
            raise ConfigError(f"{where}: margin is missing; give it in top-1 points (e.g. margin: 0.0)")
        if cl.test == "within" and cl.margin <= 0:
            raise ConfigError(f"{where}: margin={cl.margin} must be > 0 for test within")
        if cl.get("bound") is not None:
            if cl.test == "within":
                raise ConfigError(f"{where}: bound={cl.bound} is for test greater only (a within claim's margin is "
                                  "its equivalence bound)")
            if not math.isfinite(cl.bound) or cl.bound < 0:
                raise ConfigError(f"{where}: bound={cl.bound} must be a finite number >= 0 (top-1 points)")
        if cl.source not in CLAIM_SOURCES:
            raise ConfigError(f"{where}: source={cl.source!r} must be one of {', '.join(CLAIM_SOURCES)} (user: "
                              "your own hypothesis, judged like the others and never set against a paper number)"
                              f"{did_you_mean(cl.source, CLAIM_SOURCES)}")
