"""`python -m harness.reproduce <table> [hydra overrides] [--dry-run]` -- plan, check, run, report.

    python -m harness.reproduce table2                      # embedded default: tiny profile, local launcher, CPU
    python -m harness.reproduce table2 profile=smoke seeds=2
    python -m harness.reproduce table2 --dry-run            # the plan, what is done, estimated cost; runs nothing
    python -m harness.reproduce table2 profile=paper launcher=slurm launcher.partition=gpu \\
        data.root=/datasets/imagenet teacher.pretrained_ckpt=/ckpt/mae_visualize_vit_large.pth \\
        teacher.finetuned_ckpt=/ckpt/mae_finetuned_vit_large.pth seeds=3
    python -m harness.reproduce table2 -m profile=smoke seed=0,1     # hydra-style multirun sweep
    python -m harness.reproduce all                         # every recipe

Every input is checked before a job is submitted: config keys and values, the dataset, provided teacher
checkpoints (loaded with weights_only=True and fitted to the recipe's teacher), and, for launcher=slurm, that the
cluster answers and the partition exists. A rerun skips finished stages and resumes unfinished ones.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import shutil
import signal
import subprocess
import sys
from typing import List

from omegaconf import DictConfig

from .config import ConfigError, load_config, tables
from .launch import DriverLocked
from .plan import Plan, build_plan, describe, write_manifest


class PreflightError(RuntimeError):
    """Bad input found before anything was submitted."""


def check_inputs(plan: Plan, cfg: DictConfig) -> None:
    from .checkpoints import CheckpointError
    from .data import DataError, DataSpec, check_data
    from .stages import load_classifier, load_teacher_encoder

    try:
        check_data(DataSpec(**cfg.data))
        if cfg.data.name == "imagefolder":
            check_imagefolder_classes(cfg.data.root)
    except DataError as e:
        raise PreflightError(str(e)) from None
    checked, problems = set(), []
    for stage in plan.stages.values():
        for role, ref in stage.inputs.items():
            if not ref.startswith("file:") or (ref, role) in checked:
                continue
            checked.add((ref, role))
            path = ref[len("file:"):]
            try:
                if role == "kd_teacher":
                    from .data import num_classes_of
                    load_classifier(path, stage.spec["teacher_model"], cfg.data.img_size,
                                    num_classes_of(DataSpec(**cfg.data)))
                else:
                    load_teacher_encoder(path, stage.spec["teacher_model"], cfg.data.img_size,
                                         with_decoder=stage.spec.get("distill", {}).get("teacher_mode") == "full")
            except CheckpointError as e:
                problems.append(f"{role} checkpoint for {stage.id}: {e}")
    if problems:
        raise PreflightError("\n".join(problems))
    if cfg.launcher.name == "slurm":
        check_slurm(cfg.launcher.partition)


def check_imagefolder_classes(root: str) -> None:
    """Every class folder of both splits holds at least one image (torchvision's ImageFolder would otherwise fail
    inside the job, after submission). Stops at each folder's first image, so it stays cheap on ImageNet."""
    from pathlib import Path
    from torchvision.datasets.folder import IMG_EXTENSIONS
    from .data import DataError
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


def run_table(table: str, overrides: List[str], dry_run: bool = False, command: str = "") -> int:
    cfg = load_config(table, overrides)
    dry_run = dry_run or cfg.dry_run
    plan = build_plan(cfg)
    if dry_run:
        from .estimate import estimate_plan
        print(describe(plan, estimate_plan(plan, cfg)))
        return 0
    check_inputs(plan, cfg)
    from .launch import _runtime, driver_lock, execute
    with driver_lock(plan.root):  # before the manifest: a second driver on this root changes nothing
        write_manifest(plan, cfg, command, overrides)
        print(f"{table} ({cfg.profile}): {len(plan.stages)} stages, launcher={cfg.launcher.name}, results in "
              f"{plan.root}", flush=True)
        if cfg.launcher.write_sbatch:
            from .sbatch import write_sbatch
            path = write_sbatch(plan, cfg, _runtime(cfg))
            print(f"wrote sbatch scripts; submit them with: bash {path}\n"
                  f"then, when the jobs are done: python -m harness.report {table} --profile {cfg.profile}")
            return 0
        states = execute(plan, cfg)
    failed = [sid for sid, st in states.items() if st != "done"]
    if cfg.report:
        from .report import write_report
        path = write_report(plan.root, cfg.reports_dir)
        print(f"report: {path}")
    if failed:
        print(f"{len(failed)} stage(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def expand_sweep(overrides: List[str]) -> List[List[str]]:
    """Hydra's override grammar: `key=a,b` and `key=range(0,3)` sweeps become the cartesian product of runs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def main(argv: List[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m harness.reproduce", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("table", nargs="?", default="table2", help=f"one of: {', '.join(tables())}, or all")
    p.add_argument("overrides", nargs="*", help="hydra overrides, e.g. profile=smoke seeds=3 launcher=slurm")
    p.add_argument("--dry-run", action="store_true", help="print the plan and estimated cost; run nothing")
    p.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated override values")
    args = p.parse_args(argv)
    # SIGTERM (kill, a scheduler ending the driver) unwinds like Ctrl-C, so local jobs are cancelled with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python -m harness.reproduce " + " ".join(shlex.quote(a) for a in argv)
    names = tables() if args.table == "all" else [args.table]
    runs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    code = 0
    for table in names:
        for overrides in runs:
            if len(runs) > 1:
                print(f"=== {table} {' '.join(overrides)}", flush=True)
            try:
                code = max(code, run_table(table, overrides, args.dry_run, command))
            except (ConfigError, PreflightError) as e:
                print(f"error: {e}\nNothing was submitted.", file=sys.stderr)
                return 2
            except DriverLocked as e:
                print(f"error: {e}\nNothing was submitted by this invocation.", file=sys.stderr)
                return 3
            except (KeyboardInterrupt, SystemExit) as e:
                print("interrupted: running local jobs were cancelled (Slurm jobs go on); finished stages are kept. "
                      "Run the same command again to resume.", file=sys.stderr)
                return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    return code


if __name__ == "__main__":
    sys.exit(main())
