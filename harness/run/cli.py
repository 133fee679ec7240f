"""`python -m harness.reproduce <table> [hydra overrides] [--dry-run]` -- plan, check, run, report (the command's
code; harness/reproduce.py is its entry point).

    python -m harness.reproduce table2                      # embedded default: tiny profile, local launcher, CPU
    python -m harness.reproduce table2 profile=smoke seeds=2
    python -m harness.reproduce table2 --dry-run            # the plan, what is done, estimated cost; runs nothing
    python -m harness.reproduce table2 profile=paper launcher=slurm launcher.partition=gpu \\
        data.root=/datasets/imagenet teacher.pretrained_ckpt=/ckpt/mae_visualize_vit_large.pth \\
        teacher.finetuned_ckpt=/ckpt/mae_finetuned_vit_large.pth seeds=3
    python -m harness.reproduce table2 -m profile=smoke seed=0,1     # sweep: a results root per point
    python -m harness.reproduce table2 -m rows.dmae_95.pretrain.mask_ratio=0.9,0.95
    python -m harness.reproduce all                         # every recipe
    python -m harness.reproduce table2 profile=paper launcher=slurm --rehearse   # a few steps per stage first
    python -m harness.reproduce table2 profile=smoke seeds=3 --cfg job   # the composed config as YAML; runs nothing

Every input is checked before a job is submitted, and by --dry-run: config keys and values (an unknown key or row
gets the closest known one; a Slurm-only launcher key under launcher=local|debug is refused), the dataset and that
each training stage's images hold one optimizer update (batch size x accumulation x devices), provided teacher
checkpoints (loaded with weights_only=True and fitted to the recipe's teacher; an error names the key that gave the
file), and, for launcher=slurm, that the cluster answers and the partition exists. A rerun skips finished stages
and resumes unfinished ones.

-m (anywhere on the line) sweeps comma-separated values and range(a,b): each point is run as its own results root,
<results_root>/sweeps/<table>.<profile>-<keys>/<key>=<value>/, stages the points share run once, and one combined
report, <reports_dir>/sweeps/<table>.<profile>-<keys>.md, gives top-1 mean +- std and n per (point, row).
--cfg job (hydra's flag) prints the composed, validated and resolved config of each run as YAML (one document per
table or sweep point) and exits: no plan, no input check, nothing written or submitted.
Exit codes: 0 done, 1 a stage failed, 2 bad input (nothing submitted), 3 another driver holds the results root.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import recipes  # standard library only

from harness.core.lazy import lazy
from harness.core.locks import DriverLocked, driver_lock  # standard library only
from harness.core.rundir import RunTree  # standard library only
from harness.run.preflight import PreflightError, check_inputs  # standard library at import time

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from harness.plan.graph import Plan

# Standard library only at import time: `--help` must answer without loading hydra, torch or timm
# (tests/test_cli.py), and a bad config is reported before torch is loaded. The rest is imported on first use.
omegaconf = lazy("omegaconf")
config = lazy("harness.plan.config")  # hydra
graph = lazy("harness.plan.graph")
estimate = lazy("harness.bench.estimate")  # a dry run's costs
launch = lazy("harness.run.launch")  # submitit, torch; looked up per call (tests replace launch.execute)
sbatch = lazy("harness.run.sbatch")
sweeps = lazy("harness.run.sweep")  # pandas
rehearsals = lazy("harness.run.rehearse")
report_md = lazy("harness.report.markdown")  # pandas, matplotlib: only when a run reports

DEFAULT_TABLE = "table2"  # `python -m harness.reproduce` with no table; first in `all`


def prepare(table: str, overrides: Sequence[str]) -> Tuple["DictConfig", "Plan"]:
    """Compose, plan and check every input: what a real run and --dry-run both do before anything else."""
    cfg = config.load_config(table, list(overrides))
    plan = graph.build_plan(cfg)
    graph.mark_overridden(plan, cfg, list(overrides))  # a row the command line changed: labelled, not set against
    # the paper
    check_inputs(plan, cfg)
    return cfg, plan


def run_table(table: str, overrides: List[str], dry_run: bool = False, command: str = "") -> int:
    cfg, plan = prepare(table, overrides)
    return run_plan(cfg, plan, overrides, dry_run, command)


def run_plan(cfg: "DictConfig", plan: "Plan", overrides: Sequence[str], dry_run: bool = False, command: str = "",
             reuse_from: Sequence[Path] = (), earlier: Optional[Dict[str, str]] = None) -> int:
    """Run a prepared (checked) plan; reuse_from: results roots whose finished stages of the same id are linked in
    first (a sweep's other points); earlier: {stage id: table} planned by tables this command runs before (a dry run
    of `all` counts their shared stages once)."""
    table = cfg.table
    if dry_run or cfg.dry_run:
        print(graph.describe(plan, estimate.estimate_plan(plan, cfg), earlier))
        print("inputs checked: a real run would start now")
        return 0
    with driver_lock(plan.root):  # before the manifest: a second driver on this root changes nothing
        graph.write_manifest(plan, cfg, command, list(overrides))
        print(f"{table} ({cfg.profile}): {len(plan.stages)} stages, launcher={cfg.launcher.name}, results in "
              f"{plan.root}", flush=True)
        if cfg.launcher.write_sbatch:
            path = sbatch.write_sbatch(plan, cfg)
            print(f"wrote sbatch scripts; submit them with: bash {path}\n"
                  f"then, when the jobs are done: python -m harness.report {table} --profile {cfg.profile}")
            return 0
        if reuse_from:  # a sweep's other points
            RunTree.of(plan).reuse_finished(reuse_from)
        states = launch.execute(plan, cfg)
    failed = [sid for sid, st in states.items() if st != "done"]
    if cfg.report:
        path = report_md.write_report(plan.root, cfg.reports_dir)
        print(f"report: {path}")
    if failed:
        print(f"{len(failed)} stage(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def expand_sweep(overrides: List[str]) -> List[List[str]]:
    """Hydra's override grammar: `key=a,b` and `key=range(0,3)` sweeps become the cartesian product of runs."""
    return sweeps.expand_sweep(overrides)


class _Job:
    """One run of the invocation: a table, or one point of a table's sweep."""

    def __init__(self, table: str, overrides: List[str], point=None, sweep: Optional[dict] = None):
        self.table, self.overrides, self.point, self.sweep = table, overrides, point, sweep
        self.cfg = self.plan = None
        self.rehearsal: Optional[dict] = None  # --rehearse: the full run's config and plan, and notes


def prepare_rehearsal(job: _Job, steps: int, batch: int) -> None:
    """Compose the run and its rehearsal, write the inputs the rehearsal provides, check every input."""
    full_cfg, full_plan, job.cfg, job.plan, todo = rehearsals.compose(job.table, job.overrides, steps, batch)
    notes = rehearsals.prepare_inputs(todo, job.plan)
    check_inputs(job.plan, job.cfg)
    job.rehearsal = {"cfg": full_cfg, "plan": full_plan, "notes": notes, "generated_data": "imagefolder" in todo}


def plan_jobs(names: Sequence[str], overrides: List[str], multirun: bool, rehearse: Optional[Tuple[int, int]] = None,
              compose_only: bool = False) -> List[_Job]:
    """Every run of the invocation, composed, planned and checked (preflight) before any of them runs.
    rehearse: (steps, batch per device) for --rehearse; compose_only: each run's config composed and validated, not
    planned or checked (--cfg job)."""
    jobs: List[_Job] = []
    for table in names:
        if rehearse is not None:
            if multirun:
                raise config.ConfigError("--rehearse rehearses one run; drop -m (rehearse one point of the sweep)")
            jobs.append(_Job(table, list(overrides)))
            continue
        if not multirun:
            jobs.append(_Job(table, list(overrides)))
            continue
        keys, points = sweeps.sweep_points(overrides)
        if not keys:
            print("-m: no swept key (key=a,b or key=range(a,b)); one plain run", file=sys.stderr)
            jobs.append(_Job(table, list(overrides)))
            continue
        first = config.load_config(table, points[0].overrides)  # the sweep's bases: results_root, reports_dir, profile
        name = sweeps.sweep_name(table, keys, first.profile)
        sweep = {"name": name, "keys": keys, "results_root": str(first.results_root),
                 "dir": Path(first.results_root) / "sweeps" / name,
                 "report": Path(first.reports_dir) / "sweeps" / f"{name}.md", "jobs": []}
        for p in points:
            job = _Job(table, sweeps.point_overrides(p, name, first.results_root, first.reports_dir), p, sweep)
            sweep["jobs"].append(job)
            jobs.append(job)
    for job in jobs:
        if compose_only:
            job.cfg = config.load_config(job.table, job.overrides)
        elif rehearse is not None:
            prepare_rehearsal(job, *rehearse)
        else:
            job.cfg, job.plan = prepare(job.table, job.overrides)
    return jobs


def run_jobs(jobs: List[_Job], dry_run: bool, command: str) -> int:
    code = 0
    planned: Dict[Tuple[Path, str], str] = {}  # (results root, stage id) -> the first table of this command planning it
    for job in jobs:
        reuse: List[Path] = []
        if job.point is not None:
            print(f"=== {job.table} {job.point.name}", flush=True)
            reuse = [job.sweep["dir"] / p.name for p in (j.point for j in job.sweep["jobs"]) if p is not job.point]
            reuse.append(Path(job.sweep["results_root"]))
        code = max(code, run_plan(job.cfg, job.plan, job.overrides, dry_run, command, reuse,
                                  {sid: t for (root, sid), t in planned.items() if root == job.plan.siblings()}))
        for sid in job.plan.stages:
            planned.setdefault((job.plan.siblings(), sid), job.table)
        if job.rehearsal is not None and not (dry_run or job.cfg.dry_run):
            r = job.rehearsal
            out = Path(r["cfg"].reports_dir) / rehearsals.REHEARSAL / f"{job.table}.{r['cfg'].profile}.md"
            path = rehearsals.write_report(out, r["cfg"], r["plan"], job.plan, r["notes"], command, r["generated_data"])
            print(f"rehearsal report: {path}", flush=True)
        sweep = job.sweep
        if sweep is not None and job is sweep["jobs"][-1] and not (dry_run or job.cfg.dry_run):
            points = []
            for j in sweep["jobs"]:
                rep = Path(j.cfg.reports_dir) / f"{report_md.report_name(j.table, j.cfg.profile)}.md"
                points.append((j.point, j.plan.root, rep if rep.exists() else None))
            path = sweeps.write_sweep_report(sweep["report"], job.table, sweep["keys"], points, command)
            print(f"sweep report: {path}", flush=True)
    return code


def show_config(jobs: List[_Job]) -> int:
    """--cfg job: each run's composed, validated and resolved config as YAML (a comment naming the run and `---`
    between documents when there are several); nothing is planned, checked, written or submitted."""
    docs = []
    for job in jobs:
        text = omegaconf.OmegaConf.to_yaml(job.cfg, resolve=True)
        if len(jobs) > 1:
            text = f"# {job.table}" + (f" {job.point.name}" if job.point is not None else "") + "\n" + text
        docs.append(text)
    sys.stdout.write("---\n".join(docs))
    sys.stdout.flush()
    return 0


def _table_names() -> str:
    try:
        return ", ".join(recipes.tables())
    except NotADirectoryError as e:  # --help still answers
        return f"the package's tables ({e})"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    prog = "dmae-reproduce" if Path(sys.argv[0]).name == "dmae-reproduce" else "python -m harness.reproduce"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("table", nargs="?", default=DEFAULT_TABLE,
                   help=f"one of: {_table_names()}, or all, or a recipe file")
    p.add_argument("overrides", nargs="*", help="hydra overrides, e.g. profile=smoke seeds=3 launcher=slurm")
    p.add_argument("--dry-run", action="store_true",
                   help="check every input, print the plan and estimated cost; run nothing")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep comma-separated override values (key=a,b): a results root per point + one report")
    p.add_argument("--rehearse", action="store_true",
                   help="run every stage for a few steps on a few images (real models, data path, launcher; random "
                        "official-format teachers and a small ImageFolder when none are given) and write a "
                        "rehearsals.REHEARSAL report: step times, peak memory, the full run's device-hours")
    p.add_argument("--rehearse-steps", type=int, default=None, metavar="N",
                   help="training steps per rehearsed stage (at least two optimizer updates; default 4)")
    p.add_argument("--rehearse-batch", type=int, default=0, metavar="B",
                   help="per-device batch of the rehearsal (default: the profile's; e.g. 2 on a CPU)")
    p.add_argument("--recipe-dir", action="append", default=[], metavar="DIR",
                   help="a folder of your own recipes (<table>.yaml, optionally profile/ launcher/ expected/), "
                        f"searched before the package's; repeatable; also ${recipes.PATH_ENV} (':'-separated). "
                        "A table given as a path (my/recipes/x.yaml) adds its folder")
    p.add_argument("-c", "--cfg", metavar="job",
                   help="`job`: print the composed, validated and resolved config as YAML and exit (hydra's flag); "
                        "nothing is planned, checked or submitted")
    p.add_argument("--resolve", action="store_true",
                   help="accepted as hydra accepts it with --cfg; the config --cfg job prints is always resolved")
    args = p.parse_intermixed_args(list(argv))  # options anywhere: `table2 -m key=a,b` as in hydra
    if "=" in args.table or args.table[:1] in "+~":  # `-m key=a,b` without a table: the default table
        args.overrides.insert(0, args.table)
        args.table = DEFAULT_TABLE
    if args.table.endswith((".yaml", ".yml")):  # a recipe file: its folder goes on the search path, its stem the table
        recipe = Path(args.table).expanduser()
        if not recipe.is_file():
            p.error(f"{args.table}: no such recipe file")
        if recipe.suffix != ".yaml":
            p.error(f"{args.table}: a recipe file is <table>.yaml (hydra reads .yaml)")
        args.recipe_dir.append(str(recipe.resolve().parent))
        args.table = recipe.stem
    return args


def main(argv: List[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        recipes.add_dirs(args.recipe_dir)  # the jobs this command starts inherit it
    except NotADirectoryError as e:
        print(f"error: --recipe-dir: {e}\nNothing was submitted.", file=sys.stderr)
        return 2
    # SIGTERM (kill, a scheduler ending the driver) unwinds like Ctrl-C, so local jobs are cancelled with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python -m harness.reproduce " + " ".join(shlex.quote(a) for a in argv)
    # `all`: the default table first (its teacher and rows feed most other tables), then the rest by name
    names = [DEFAULT_TABLE] + [t for t in recipes.tables() if t != DEFAULT_TABLE] if args.table == "all" \
        else [args.table]
    try:
        if (args.rehearse_steps is not None or args.rehearse_batch) and not args.rehearse:
            raise config.ConfigError("--rehearse-steps / --rehearse-batch only apply with --rehearse")
        if args.resolve and args.cfg is None:
            raise config.ConfigError("--resolve only applies with --cfg job")
        if args.cfg is not None:
            if args.cfg != "job":
                raise config.ConfigError(f"--cfg {args.cfg}: only --cfg job is supported (the composed config of the "
                                         "table run); hydra's own settings (--cfg hydra / all) are not used by this "
                                         "harness")
            if args.rehearse:
                raise config.ConfigError("--cfg job prints the run's config; drop --rehearse (or drop --cfg job)")
            return show_config(plan_jobs(names, args.overrides, args.multirun, compose_only=True))
        jobs = plan_jobs(names, args.overrides, args.multirun,
                         (args.rehearse_steps or 4, args.rehearse_batch) if args.rehearse else None)
        return run_jobs(jobs, args.dry_run, command)
    except (config.ConfigError, PreflightError) as e:
        print(f"error: {e}\nNothing was submitted.", file=sys.stderr)
        return 2
    except DriverLocked as e:
        print(f"error: {e}\nNothing was submitted by this invocation.", file=sys.stderr)
        return 3
    except (KeyboardInterrupt, SystemExit) as e:
        print("interrupted: running local jobs were cancelled (Slurm jobs go on); finished stages are kept. "
              "Run the same command again to resume.", file=sys.stderr)
        return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130


if __name__ == "__main__":
    sys.exit(main())
