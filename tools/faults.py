"""A seeded random preemption campaign: faults injected at random moments of a smoke table, every recovery compared
stage by stage with an uninterrupted run of the same launcher.

    python -m tools.faults --seed 0 --trials 12                 # local launcher and the local Slurm
    python -m tools.faults --seed 0 --trials 6 --launchers local

Per trial, in a fresh results root: start `python -m harness.reproduce table2 profile=smoke seeds=2 ...`, inject one
fault at a moment drawn uniformly from the reference run's wall time, let the driver finish or, when the fault
killed it, run the same command again (at most 3 times), then compare every stage with the reference run: the
sha256 of each training stage's model.pth and the top-1 of each evaluation. Faults:

    driver-sigkill   SIGKILL to the driver (its jobs go on: Slurm jobs, and local jobs whose controller survives)
    job-sigkill      SIGKILL to a running job: a local job's controller and its tasks; on Slurm `scancel -s KILL`
    slurm-requeue    `scontrol requeue` of a running Slurm job (preemption by the scheduler)
    slurm-usr2       `scancel --signal=USR2` of a running Slurm job (the time-limit / preemption warning)

Writes results/faults/campaign-<stamp>.md (the summary table) and .json (every trial).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from harness.core.rundir import DONE, JOB_FILE, load_json, read_job, stage_status

ROOT = Path(__file__).resolve().parents[1]
FAULTS = {"local": ["driver-sigkill", "job-sigkill"],
          "slurm": ["driver-sigkill", "job-sigkill", "slurm-requeue", "slurm-usr2"]}
LAUNCH = {"local": ["launcher=local"],
          "slurm": ["launcher=slurm", "launcher.partition=debug", "launcher.mem_gb=3", "launcher.poll_s=1",
                    "launcher.timeout_min=20", "launcher.max_requeues=6"]}
TABLE = ["table2", "profile=smoke", "seeds=2", "teacher.pretrain.epochs=25", "report=false"]


def command(launcher: str, root: Path) -> List[str]:
    return [sys.executable, "-m", "harness.reproduce", *TABLE, *LAUNCH[launcher], f"results_root={root}"]


def fingerprint(root: Path) -> Dict[str, object]:
    """Stage id -> model sha256 (training stages) or top-1 (evaluations), for every finished stage."""
    out: Dict[str, object] = {}
    for f in sorted((root / "table2" / "smoke").glob("*/result.json")):
        r = load_json(f)
        out[r["stage_id"]] = r.get("model_sha256") or r.get("top1")
    return out


def _children(pid: int) -> List[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _tree(pid: int) -> List[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def running_job(root: Path) -> Optional[dict]:
    """A job.json of a stage that is not finished (its job is queued or running), if any."""
    jobs = []
    for f in (root / "table2" / "smoke").glob(f"*/{JOB_FILE}"):
        if stage_status(f.parent) != DONE:
            job = read_job(f.parent)
            if job is not None:
                jobs.append(job)
    return jobs[0] if jobs else None


def inject(fault: str, driver: subprocess.Popen, root: Path) -> str:
    """Apply the fault now; returns what it hit."""
    if fault == "driver-sigkill":
        driver.send_signal(signal.SIGKILL)
        return f"driver pid {driver.pid}"
    job = running_job(root)
    if job is None:
        return "no job running: nothing hit"
    jid = str(job["job_id"])
    if fault == "job-sigkill":
        if "_" in jid or not jid.isdigit() or not Path(f"/proc/{jid}").exists():  # a Slurm job
            subprocess.run(["scancel", "--signal=KILL", jid], timeout=60, check=False)
            return f"Slurm job {jid} (scancel -s KILL)"
        for p in _tree(int(jid)):  # a local job: its controller and its tasks
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return f"local job {jid} and its tasks"
    if fault == "slurm-requeue":
        subprocess.run(["scontrol", "requeue", jid], timeout=60, check=False)
        return f"Slurm job {jid} (scontrol requeue)"
    if fault == "slurm-usr2":
        subprocess.run(["scancel", "--signal=USR2", jid], timeout=60, check=False)
        return f"Slurm job {jid} (USR2)"
    raise ValueError(fault)


def run_trial(launcher: str, fault: str, at_s: float, root: Path, log) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    cmd = command(launcher, root)
    t0 = time.time()
    with open(log, "a") as out:
        driver = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            driver.wait(timeout=at_s)
            hit, rc = "the run ended before the fault", driver.returncode
        except subprocess.TimeoutExpired:
            hit = inject(fault, driver, root)
            rc = driver.wait(timeout=1800)
        reruns = 0
        while rc != 0 and reruns < 3:
            reruns += 1
            rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=1800).returncode
    return {"launcher": launcher, "fault": fault, "at_s": round(at_s, 1), "hit": hit, "reruns": reruns, "rc": rc,
            "wall_s": round(time.time() - t0, 1)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.faults", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--launchers", default="local,slurm")
    p.add_argument("--faults", default="", help="draw only these faults (comma-separated; default: every fault the "
                                                  "launcher allows)")
    p.add_argument("--workdir", default="/tmp/harness-faults")
    p.add_argument("--out", default=str(ROOT / "results" / "faults"))
    args = p.parse_args(argv)
    launchers = args.launchers.split(",")
    rng = random.Random(args.seed)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "campaign.log"
    refs = {}
    for la in launchers:  # the uninterrupted runs
        root = work / f"reference-{la}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.time()
        rc = subprocess.run(command(la, root), cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT).returncode
        if rc != 0:
            print(f"the uninterrupted {la} run failed (rc {rc}); see {log}", file=sys.stderr)
            return 1
        refs[la] = {"wall_s": time.time() - t0, "stages": fingerprint(root)}
        print(f"reference {la}: {len(refs[la]['stages'])} stages in {refs[la]['wall_s']:.0f} s", flush=True)
    trials = []
    for i in range(args.trials):
        la = rng.choice(launchers)
        kinds = [f for f in FAULTS[la] if not args.faults or f in args.faults.split(",")]
        if not kinds:
            p.error(f"--faults {args.faults}: none applies to launcher {la}")
        fault = rng.choice(kinds)
        at = rng.uniform(2.0, 0.9 * refs[la]["wall_s"])
        t = run_trial(la, fault, at, work / f"trial-{i}", log)
        got, ref = fingerprint(work / f"trial-{i}"), refs[la]["stages"]
        t["trial"] = i
        t["stages"] = len(got)
        t["differ"] = sorted(s for s in set(ref) | set(got) if ref.get(s) != got.get(s))
        t["identical"] = t["rc"] == 0 and not t["differ"]
        trials.append(t)
        print(f"trial {i}: {la} {fault} at {at:.1f}s -> {t['hit']}; reruns {t['reruns']}, rc {t['rc']}, "
              f"{'identical' if t['identical'] else 'DIFFERENT: ' + ', '.join(t['differ'][:3])}", flush=True)
        if t["identical"] and not t["reruns"]:
            shutil.rmtree(work / f"trial-{i}", ignore_errors=True)  # kept otherwise: its job logs say what happened
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    (out / f"campaign-{stamp}.json").write_text(json.dumps({"seed": args.seed, "references": refs,
                                                            "trials": trials}, indent=2) + "\n")
    ok = sum(t["identical"] for t in trials)
    lines = [f"# Preemption campaign, seed {args.seed}: {ok} of {len(trials)} recoveries identical", "",
             f"`python -m tools.faults --seed {args.seed} --trials {args.trials} --launchers {args.launchers}"
             + (f" --faults {args.faults}" if args.faults else "") + "`; "
             f"table: `{' '.join(TABLE)}`. Each trial is compared stage by stage with the uninterrupted run of its "
             "launcher (model.pth sha256 of every training stage, top-1 of every evaluation).", "",
             "| launcher | reference stages | reference wall (s) |", "|---|---:|---:|"]
    lines += [f"| {la} | {len(r['stages'])} | {r['wall_s']:.0f} |" for la, r in refs.items()]
    lines += ["", "| trial | launcher | fault | at (s) | hit | reruns | rc | stages | identical |",
              "|---:|---|---|---:|---|---:|---:|---:|---|"]
    lines += [f"| {t['trial']} | {t['launcher']} | {t['fault']} | {t['at_s']} | {t['hit']} | {t['reruns']} | "
              f"{t['rc']} | {t['stages']} | {'yes' if t['identical'] else 'NO: ' + ', '.join(t['differ'][:3])} |"
              for t in trials]
    (out / f"campaign-{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"{ok}/{len(trials)} identical; {out / f'campaign-{stamp}.md'}")
    return 0 if ok == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
