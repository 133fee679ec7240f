"""Preflight: every input of a planned run checked before anything is submitted (and by --dry-run): the dataset,
that every training stage's images hold at least one optimizer update per epoch (batch size x accumulation x
devices), provided teacher checkpoints (loaded with weights_only=True and fitted to the recipe's teacher; an error
names the config key that gave the file) and, for launcher=slurm, that the cluster answers and the partition exists.
Standard library at import time (the command line's --help loads nothing else); torch is imported by the checks
that load data or checkpoints."""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

from harness.core.lazy import lazy

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from harness.plan.graph import Plan


# standard library at import time (the command's --help): torch, hydra and torchvision on first use
omegaconf = lazy("omegaconf")
resolve = lazy("harness.plan.resolve")  # hydra
checkpoints = lazy("harness.core.checkpoints")  # torch
core_data = lazy("harness.core.data")  # torch, timm
stages = lazy("harness.core.stages")  # torch


class PreflightError(RuntimeError):
    """Bad input found before anything was submitted."""


def check_inputs(plan: Plan, cfg: DictConfig) -> None:
    try:
        core_data.check_data(resolve.data_spec(cfg), every_class=True)
    except core_data.DataError as e:
        raise PreflightError(str(e)) from None
    problems = check_batches(plan, cfg)
    if problems:
        raise PreflightError("\n".join(problems))
    checked = set()
    # a probe reads a provided checkpoint as an encoder, as the DMAE stages do: checked once, under their name; a
    # teacher evaluation reads the fine-tuned teacher as a classifier, as the KD fine-tunes do: checked once too
    classifier_roles = ("kd_teacher", "model")
    for stage in sorted(plan.stages.values(), key=lambda s: {"evaluate": 1, "probe": 2}.get(s.kind, 0)):
        for role, ref in stage.inputs.items():
            if not ref.startswith("file:") or (ref, role) in checked or \
                    (stage.kind == "probe" and any(ref == r for r, _ in checked)) or \
                    (role in classifier_roles and any((ref, r) in checked for r in classifier_roles)):
                continue
            checked.add((ref, role))
            path = ref[len("file:"):]
            try:
                if stage.kind == "probe":
                    stages.load_teacher_encoder(path, stage.spec.model, cfg.data.img_size, with_decoder=False)
                elif role in classifier_roles:
                    stages.load_classifier(path, stage.spec.teacher_model if role == "kd_teacher" else stage.spec.model,
                                    cfg.data.img_size, core_data.num_classes_of(resolve.data_spec(cfg)))
                else:
                    distill = getattr(stage.spec, "distill", None)
                    stages.load_teacher_encoder(path, stage.spec.teacher_model, cfg.data.img_size,
                                         with_decoder=distill is not None and distill.teacher_mode == "full")
            except checkpoints.CheckpointError as e:
                keys = list(dict.fromkeys(k for other in plan.stages.values() if other.inputs.get(role) == ref
                                          for k in checkpoint_keys(cfg, other, role, path)))
                given = f"{' / '.join(keys)}={path}: " if keys else ""
                problems.append(f"{given}{role} checkpoint for {stage.id}: {e}")
    if problems:
        raise PreflightError("\n".join(problems))
    if cfg.launcher.name == "slurm":
        check_slurm(cfg.launcher.partition)


# ----------------------------------------------------------------------------------------- batches vs images
def _train_images(data, at_most: int) -> Tuple[int, bool]:
    """(images of the training set before the holdout, exact or at least `at_most` when counting stopped there,
    whether the count is exact) for a DataConfig-like `data`. Fashion-MNIST: the labels file's IDX header; an
    ImageFolder: its train/<class>/ files with an image extension (as torchvision's ImageFolder finds them), counted
    only until `at_most` (cheap on ImageNet)."""
    if data.name == "fashion_mnist":
        with gzip.open(Path(data.root) / core_data.FASHION_FILES["train"][1], "rb") as f:
            head = f.read(8)
        return int.from_bytes(head[4:8], "big"), True
    n = 0
    train = Path(data.root) / "train"
    for c in sorted(d for d in train.iterdir() if d.is_dir()):
        for _, _, files in os.walk(c, followlinks=True):
            n += sum(1 for f in files if f.lower().endswith(core_data.IMG_EXTENSIONS))
            if n >= at_most:
                return n, False
    return n, True


def _row_key(cfg: "DictConfig", stage, section: str, names: Tuple[str, ...]) -> Tuple[str, str]:
    """(config key, its field) that sets the first of `names` for this stage's section: a row's override
    (rows.<row>.[teacher.]<section>.<name>) when a row the stage serves has one, else the table-level key."""
    teacher = stage.role.startswith("teacher")
    path = (["teacher"] if teacher else []) + [section]
    for row in dict.fromkeys(r for r, _ in stage.cells):
        node = cfg.rows[row] if row in cfg.rows else None
        for p in path:
            node = node.get(p) if node is not None and hasattr(node, "get") else None
        for name in names:
            if node is not None and node.get(name) is not None:
                return f"rows.{row}.{'.'.join(path)}.{name}", name
    sec = cfg
    for p in path:
        sec = sec[p]
    for name in names:
        if sec.get(name) is not None:
            return f"{'.'.join(path)}.{name}", name
    return f"{'.'.join(path)}.{names[-1]}", names[-1]


def check_batches(plan: "Plan", cfg: "DictConfig") -> List[str]:
    """Every training stage (pre-training, fine-tuning; teacher and student) sees at least one optimizer update per
    epoch: a device reads len(images) // world images, the last partial batch of an epoch is dropped (train.fit,
    data.loader), so an epoch has (images // world) // batch_size steps and steps // accum_iter updates. Fewer
    images than world x batch_size: no step at all (the stage fails at run time); fewer than world x batch_size x
    accum_iter: steps but no optimizer update. Returns one problem per config key, naming it and the image count."""
    world = resolve.world_size(cfg.launcher)
    training = [s for s in plan.stages.values() if s.kind in ("pretrain", "finetune")]
    if not training:
        return []
    need = {s.id: getattr(s.spec, s.kind).batch_size * getattr(s.spec, s.kind).accum_iter * world for s in training}
    counts: Dict[tuple, Tuple[int, bool]] = {}
    problems: Dict[str, str] = {}
    for stage in training:
        sched, data = getattr(stage.spec, stage.kind), stage.spec.data
        source = (data.name, str(data.root))
        if source not in counts:
            counts[source] = _train_images(data, int(data.holdout or 0) + max(need.values()))
        total, exact = counts[source]
        if exact and total <= (data.holdout or 0):
            problems.setdefault("data.holdout", f"data.holdout={data.holdout} leaves no training image of the "
                                                f"{total} in {data.root}; lower data.holdout")
            continue
        n = total - int(data.holdout or 0)
        subset = ""
        if data.train_subset and data.train_subset < n:
            n = int(data.train_subset)
            subset = f"data.finetune_subset={n}" if stage.kind == "finetune" and cfg.data.finetune_subset \
                else f"data.train_subset={n}"
        if n >= need[stage.id]:
            continue
        images = f"the {n} training images {stage.id} ({_serves(stage)}) reads" + \
            (f" ({subset})" if subset else f" ({total} in {data.root} less data.holdout={data.holdout})")
        per_device = n // world
        devices = f"{world} device(s)"
        if per_device < sched.batch_size:
            key, _ = _row_key(cfg, stage, stage.kind, ("batch_size",))
            fix = f"Set {key} to at most {per_device}, or give the stage more images" if per_device else \
                "Give the stage more images, or run it on fewer devices"
            size = f"{key}={sched.batch_size} is" if world == 1 else \
                f"{key}={sched.batch_size} per device x {devices} = {sched.batch_size * world} images is"
            problems.setdefault(key, (
                f"{size} larger than {images}: with {devices} a device gets {per_device} "
                f"image(s) per epoch and the last partial batch is dropped, so an epoch would have no step and the "
                f"stage would fail at run time. {fix}"))
        else:
            key, name = _row_key(cfg, stage, stage.kind, ("effective_batch", "accum_iter"))
            steps = per_device // sched.batch_size
            value = need[stage.id] if name == "effective_batch" else sched.accum_iter
            problems.setdefault(key, (
                f"{key}={value}: one optimizer update takes {sched.batch_size} per device x {sched.accum_iter} "
                f"accumulation step(s) x {devices} = {need[stage.id]} images, more than {images}: an epoch would have "
                f"{steps} step(s) and the optimizer would never step. Lower {key} (or the batch size) so that "
                f"batch_size x accum_iter x devices <= {n}"))
    return list(problems.values())


def _serves(stage) -> str:
    rows = list(dict.fromkeys(r for r, _ in stage.cells))
    return f"row{'s' if len(rows) > 1 else ''} {', '.join(rows)}" if rows else "no row"


# --------------------------------------------------------------------------------------- provided checkpoints
def checkpoint_keys(cfg: "DictConfig", stage, role: str, path: str) -> List[str]:
    """The config keys that gave `path` (a provided checkpoint) to this stage as input `role`: teacher.pretrained_ckpt
    or teacher.finetuned_ckpt (kd_teacher, a teacher evaluation's model: the fine-tuned one; teacher / encoder: the
    one distill.teacher_source names), a row's rows.<row>.teacher.<name>, or the key that one interpolates (e.g.
    checkpoints.base_pretrained)."""
    keys: List[str] = []
    for row in dict.fromkeys(r for r, _ in stage.cells):
        if row not in cfg.rows:
            continue
        r = resolve.resolve_row(cfg, row)
        names = ["finetuned_ckpt"] if role in ("kd_teacher", "model") else [f"{r.distill['teacher_source']}_ckpt"]
        override = omegaconf.OmegaConf.to_container(cfg.rows[row].teacher, resolve=False)
        for name in names:
            if not r.teacher.get(name) or os.path.abspath(r.teacher[name]) != path:
                continue
            if name in override:
                raw, key = override[name], f"rows.{row}.teacher.{name}"
            else:
                raw, key = omegaconf.OmegaConf.to_container(cfg.teacher, resolve=False)[name], f"teacher.{name}"
            m = re.fullmatch(r"\$\{([A-Za-z0-9_.]+)\}", str(raw))
            key = m.group(1) if m else key
            if key not in keys:
                keys.append(key)
    return keys


def check_slurm(partition) -> None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise PreflightError("launcher=slurm but the Slurm commands (sinfo, sbatch) are not on PATH")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise PreflightError("launcher=slurm: `sinfo` did not answer within 30 s; is slurmctld reachable?") from None
    if out.returncode != 0:
        raise PreflightError(f"launcher=slurm: the cluster does not answer (`sinfo`: {out.stderr.strip()})")
    parts = {line.split()[0].rstrip("*"): line.split()[1] for line in out.stdout.splitlines() if line.strip()}
    if partition and partition not in parts:
        raise PreflightError(f"launcher.partition={partition!r} does not exist; partitions: {', '.join(parts)}")
