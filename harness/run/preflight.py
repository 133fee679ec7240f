"""Preflight: every input of a planned run checked before anything is submitted (and by --dry-run): the dataset,
provided teacher checkpoints (loaded with weights_only=True and fitted to the recipe's teacher) and, for
launcher=slurm, that the cluster answers and the partition exists. Standard library at import time (the command
line's --help loads nothing else); torch is imported by the checks that load data or checkpoints."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from ..plan import Plan


class PreflightError(RuntimeError):
    """Bad input found before anything was submitted."""


def check_inputs(plan: Plan, cfg: DictConfig) -> None:
    # local: torch (data, checkpoints); --help stays standard-library only
    from ..checkpoints import CheckpointError
    from ..config import data_spec
    from ..data import DataError, check_data, num_classes_of
    from ..stages import load_classifier, load_teacher_encoder

    try:
        check_data(data_spec(cfg))
        if cfg.data.name == "imagefolder":
            check_imagefolder_classes(cfg.data.root)
    except DataError as e:
        raise PreflightError(str(e)) from None
    checked, problems = set(), []
    # a probe reads a provided checkpoint as an encoder, as the DMAE stages do: checked once, under their name
    for stage in sorted(plan.stages.values(), key=lambda s: s.kind == "probe"):
        for role, ref in stage.inputs.items():
            if not ref.startswith("file:") or (ref, role) in checked or \
                    (stage.kind == "probe" and any(ref == r for r, _ in checked)):
                continue
            checked.add((ref, role))
            path = ref[len("file:"):]
            try:
                if stage.kind == "probe":
                    load_teacher_encoder(path, stage.spec.model, cfg.data.img_size, with_decoder=False)
                elif role == "kd_teacher":
                    load_classifier(path, stage.spec.teacher_model, cfg.data.img_size,
                                    num_classes_of(data_spec(cfg)))
                else:
                    distill = getattr(stage.spec, "distill", None)
                    load_teacher_encoder(path, stage.spec.teacher_model, cfg.data.img_size,
                                         with_decoder=distill is not None and distill.teacher_mode == "full")
            except CheckpointError as e:
                problems.append(f"{role} checkpoint for {stage.id}: {e}")
    if problems:
        raise PreflightError("\n".join(problems))
    if cfg.launcher.name == "slurm":
        check_slurm(cfg.launcher.partition)


def check_imagefolder_classes(root: str) -> None:
    """Every class folder of both splits holds at least one image (torchvision's ImageFolder would otherwise fail
    inside the job, after submission). Stops at each folder's first image, so it stays cheap on ImageNet."""
    # local: torchvision, torch; --help stays standard-library only
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from ..data import DataError
    for split in ("train", "val"):
        d = Path(root) / split
        empty = [c.name for c in sorted(d.iterdir()) if c.is_dir()
                 and not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in c.iterdir())]
        if empty:
            raise DataError(f"{d}: {len(empty)} class folder(s) hold no image ({', '.join(empty[:5])}"
                            f"{' ...' if len(empty) > 5 else ''}); expected {d}/<class>/<image> "
                            f"({', '.join(IMG_EXTENSIONS[:4])}, ...)")


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
