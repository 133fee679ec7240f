"""The table config's schema: the typed dataclasses a table recipe (recipes/<table>.yaml) is validated against (table,
row, claim and their sections; hydra-core / OmegaConf structured configs), the rule each field's value must follow,
written on the field itself (`one_of`, `in_range`, `at_least`, `above`, `plain_name`; harness.plan.config checks them
all with one walk, check_fields), and the schema below a field (section_schema). ConfigError is the error of a config
that breaks it; its message names the key.

The sections extend the stage spec's (harness.core.spec) with the keys harness.plan.resolve resolves away, so a resolved
section is exactly what a stage receives. The schedules' rules sit on the spec's own fields (Schedule, PretrainSpec,
FinetuneSpec); a field of another spec with a rule is declared again here with the spec's own default
(`default=DistillSpec.alpha`), so the composed values stay the spec's.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, is_dataclass
from math import inf
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from harness.core.rules import above, at_least, in_range, one_of, plain_name
from harness.core.spec import (DataConfig, DistillSpec, FinetuneSpec, KDConfig, ModelConfig, PretrainSpec, ProbeSpec,
                               StageRuntime)


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


# ------------------------------------------------------------------------------------------------------ the sections
@dataclass
class PretrainConfig(PretrainSpec):
    # Optional: the total batch per optimizer update. When set, accum_iter is derived from it at plan time:
    # effective_batch / (batch_size x world_size(launcher)), which must be an integer (refused otherwise), so the
    # effective batch and the lr (blr x effective batch / 256) stay the same on any number of devices. The paper
    # profile sets the official 4096 (pre-training) and 1024 (fine-tuning).
    effective_batch: Optional[int] = None
    epoch_scale: float = 1.0  # schedule ablations: epochs and warmup scaled by this (>= 1 epoch)


@dataclass
class FinetuneConfig(FinetuneSpec):
    effective_batch: Optional[int] = None  # as PretrainConfig.effective_batch: derives accum_iter when set


@dataclass
class DistillConfig(DistillSpec):
    # NaN passes on purpose: a NaN weight is a run-time fault (NonFiniteLoss), tested
    alpha: float = at_least(0, default=DistillSpec.alpha, allow_nan=True)
    pixel_weight: float = at_least(0, default=DistillSpec.pixel_weight, allow_nan=True)
    projection: str = one_of("linear", "mlp", default=DistillSpec.projection)
    distance: str = one_of("l1", "l2", default=DistillSpec.distance)
    teacher_mode: str = one_of("partial", "full", default=DistillSpec.teacher_mode)
    # pairs empty: derived from `align`, fractions of depth: block ceil(f * depth) - 1 of each, so 0.75 gives the
    # official pair (8, 17) for ViT-B (12) <- ViT-L (24)
    align: List[float] = field(default_factory=lambda: [0.75])
    teacher_source: str = one_of("pretrained", "finetuned", default="pretrained")


@dataclass
class KDSection(KDConfig):
    kind: str = one_of("soft", "hard", default=KDConfig.kind)
    weight: float = in_range(0, 1, "[]", default=KDConfig.weight)
    temperature: float = in_range(0, inf, "()", default=KDConfig.temperature)


@dataclass
class DataSection(DataConfig):
    name: str = one_of("fashion_mnist", "imagefolder", default=DataConfig.name)
    img_size: int = at_least(1, default=DataConfig.img_size)
    train_subset: int = at_least(0, default=DataConfig.train_subset)
    test_subset: int = at_least(0, default=DataConfig.test_subset)
    holdout: int = at_least(0, default=DataConfig.holdout)
    eval_crop_pct: float = in_range(0, 1, "(]", default=DataConfig.eval_crop_pct)
    # fine-tuning (student and teacher) reads only the first finetune_subset of the training images, with their
    # labels; pre-training reads all of them, without (low-label fine-tuning: what the encoder learned matters more).
    # 0 = the same images as pre-training. Resolved away: a fine-tune stage's data.train_subset holds it.
    finetune_subset: int = at_least(0, default=0)


@dataclass
class ProbeConfig(ProbeSpec):
    k: int = at_least(1, default=ProbeSpec.k)
    temperature: float = above(0, default=ProbeSpec.temperature)
    batch_size: int = at_least(1, default=ProbeSpec.batch_size)
    # a kNN probe (harness.core.probe) of every student pre-train's last block, of the scratch rows' random
    # initialisation and of the teacher's aligned block, on the test split; false = no probe stages
    enabled: bool = True


@dataclass
class GateConfig:
    """Positive controls checked before any paper claim is judged (harness.report.stats gates): a paper claim judged
    on a profile whose gate failed reads "not testable at this profile"."""
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
class TeacherConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig("vit_large", 16))
    # train=True: the harness pre-trains (MAE) and fine-tunes the teacher itself. train=False: provided checkpoints
    # (paper profile: the official MAE releases) are checked before anything is submitted and used as they are.
    train: bool = True
    pretrained_ckpt: Optional[str] = None
    finetuned_ckpt: Optional[str] = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


CONTROL_METHOD = "scratch"  # the positive control: the same fine-tune from random initialisation, no pre-training
METHODS = ("mae", "dmae", "kd", CONTROL_METHOD)


@dataclass
class RowConfig:
    label: str = MISSING
    # mae | dmae | kd (MAE pre-training, then KD from the fine-tuned teacher) | scratch (no pre-training: the same
    # fine-tune from the random initialisation of the row's seed)
    method: str = one_of(*METHODS, default=MISSING)
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
    amp: str = one_of("auto", "none", "bf16", "fp16", default=StageRuntime.amp)
    threads: int = at_least(0, default=StageRuntime.threads)
    num_workers: int = at_least(0, default=StageRuntime.num_workers)
    nan_restarts: int = at_least(0, default=StageRuntime.nan_restarts)
    tb_every: int = at_least(0, default=StageRuntime.tb_every)
    quiet: bool = False  # driver console: only submissions, failures and the final results table (batch logs)


@dataclass
class LauncherConfig:
    name: str = one_of("local", "slurm", "debug", default="local")  # debug: in-process
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    timeout_min: int = at_least(1, default=60)
    nodes: int = at_least(1, default=1)
    gpus_per_node: int = at_least(0, default=0)  # one task per GPU; 0 = one CPU task
    # processes per node; 0 = one per GPU (one without GPUs). With run.device=cpu, 2+ CPU tasks train with gloo DDP
    # (the multi-GPU code path on a CPU machine, e.g. --rehearse); with GPUs it must equal gpus_per_node
    tasks_per_node: int = at_least(0, default=0)
    cpus_per_task: int = at_least(1, default=2)
    # memory per node (sbatch --mem, submitit's mem_gb); None: see mem_gb_per_gpu
    mem_gb: Optional[float] = above(0, default=None, note="or null: no memory request from this key")
    # when mem_gb is unset, a GPU job asks mem_gb_per_gpu x gpus_per_node per node (launcher=slurm: 40, as the
    # official submitit_pretrain.py asks 40 GB x GPUs per node); None, or a job without GPUs: Slurm's default
    mem_gb_per_gpu: Optional[float] = above(0, default=None, note="or null: no memory request from this key")
    # preemptions/timeouts a stage may survive (launcher=slurm: 30, as the official scripts)
    max_requeues: int = at_least(0, default=3)
    array_parallelism: int = at_least(1, default=64)  # Slurm: jobs of one array running at once
    # jobs in flight at once (0 = no limit); the local launcher runs them side by side
    max_parallel: int = at_least(0, default=1)
    # a job runs a stage and then the stages that consume it alone (pre-train -> fine-tune -> evaluate): one start-up
    # and one queue wait per chain; false = one job per stage
    chain: bool = True
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # extra sbatch parameters
    poll_s: float = above(0, default=2.0)
    # USR2 this many seconds before the time limit (None: submitit's default); below timeout_min x 60 (validate)
    signal_delay_s: Optional[int] = None
    # Slurm runs write sbatch scripts instead of submitting (sites without long-lived drivers)
    write_sbatch: bool = False
    # shell lines run before each Slurm job (submitit's slurm_setup; also written into sbatch scripts), e.g.
    # ["module load cuda", "source activate dmae"]
    setup: List[str] = field(default_factory=list)
    # queued Slurm jobs run a copy of the code taken at submission (submitit's RsyncSnapshot, a plain copy without
    # rsync), not whatever the working tree holds when they start; None = true for slurm, false otherwise
    snapshot: Optional[bool] = None


# claim sources: only `paper` claims are set against the paper's numbers and gated (harness.report.stats). A claim's
# test and source are checked by harness.plan.config.validate_claims, which names the claim by its place and id.
CLAIM_TESTS, CLAIM_SOURCES = ("greater", "within"), ("paper", "official-default", "user")


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
    table: str = plain_name()
    title: str = ""
    profile: str = plain_name()
    profile_note: str = ""  # shown in the report (e.g. "not ImageNet numbers")
    seeds: int = at_least(1, default=1)
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
    kd: KDSection = field(default_factory=KDSection)
    run: RunConfig = field(default_factory=RunConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    rows: Dict[str, RowConfig] = field(default_factory=dict)
    claims: List[ClaimConfig] = field(default_factory=list)  # checked by the report (harness/report/stats.py)


# a row's override sections are free dicts in RowConfig, checked against the table-level section's schema; each row
# resolves them (harness.plan.config.resolve_row), and their rules are checked on the resolved values
ROW_SECTIONS = {"pretrain": PretrainConfig, "distill": DistillConfig, "finetune": FinetuneConfig, "kd": KDSection,
                "student": ModelConfig, "teacher": TeacherConfig}
ROWS = "rows"  # section_schema's marker for TableConfig.rows: its keys are the recipe's rows


def section_schema(schema, name: str):
    """The schema below field `name` of dataclass `schema`: a dataclass, ROWS, or None (a value or a free mapping,
    whose keys the schema does not name)."""
    if schema is TableConfig and name == "rows":
        return ROWS
    if schema is RowConfig and name in ROW_SECTIONS:
        return ROW_SECTIONS[name]
    hint = typing.get_type_hints(schema).get(name)
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if isinstance(hint, type) and is_dataclass(hint) else None
