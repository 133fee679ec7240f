"""The driver's console: one line per state change of a stage, "epoch k/N" lines with a run ETA while jobs run, why a
stage failed, and the results table at the end of a run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig

from harness.bench.estimate import estimate_plan
from harness.core.rundir import ERROR_FILE, RunTree, epochs_logged, read_error, read_log, read_result
from harness.core.spec import AnySpec, Schedule
from harness.plan.graph import Plan, Stage

FINAL = ("done", "failed", "blocked")  # states a stage ends a run in


class Progress:
    """The stages' states and their console: one line per state change; while jobs run, one line per new epoch of a
    running stage ("epoch k/N" from its log.jsonl) with an ETA for the whole run (`estimates`: --dry-run's figures,
    else the epoch times seen so far). quiet (run.quiet): only submissions, failures and the final table."""
    LOUD = ("submitted", "re-attached", "failed", "blocked")  # what quiet mode still prints

    def __init__(self, plan: Plan, quiet: bool = False, estimates: Optional[Dict[str, float]] = None):
        self.plan, self.quiet = plan, quiet
        # a stage that failed in an earlier run is tried again
        tree = RunTree.of(plan)
        self.state: Dict[str, str] = {sid: "done" if tree.status(sid) == "done" else "todo" for sid in plan.stages}
        self.t0 = time.time()
        self.estimates = dict(estimates or {})  # stage id -> wall seconds still to run when the driver started
        self.start_epochs = {sid: epochs_logged(plan.dir(sid)) for sid in plan.stages}
        self.shown: Dict[str, int] = {}  # stage id -> the epoch count last printed

    def _print(self, msg: str) -> None:
        n_done = sum(1 for v in self.state.values() if v == "done")
        print(f"[reproduce {time.time() - self.t0:6.0f}s] {n_done}/{len(self.state)} done | {msg}", flush=True)

    def set(self, sid: str, state: str, extra: str = "") -> None:
        self.state[sid] = state
        if not self.quiet or state in self.LOUD:
            self._print(f"{sid}: {state}{' ' + extra if extra else ''}")

    def resubmit(self, sid: str, why: str) -> None:
        """Stage `sid` is to do again, for the reason `why` (quiet mode prints it too)."""
        self.state[sid] = "todo"
        self._print(f"{sid}: {why}")

    def submitted(self, job) -> None:
        """Where the job's console output goes (submitit's stdout log)."""
        paths = getattr(job, "paths", None)
        if paths is not None:
            print(f"    log: {paths.stdout}", flush=True)

    def poll(self, running: Dict[str, object], members: Dict[str, List[str]]) -> None:
        """Once per poll: "epoch k/N" of each running job's current stage when it changed, with the ETA."""
        for first in running:
            sid = next((m for m in members.get(first, [first]) if self.state.get(m) != "done"), None)
            if sid is None or sid not in self.plan.stages:
                continue
            n = stage_epochs(self.plan.stages[sid].spec)
            k = epochs_logged(self.plan.dir(sid))
            if n is None or k == self.shown.get(sid, 0):
                continue
            self.shown[sid] = k
            if not self.quiet:
                eta = self.eta_s(max(1, len(running)))
                self._print(f"{sid}: epoch {k}/{n}" + (f", run ETA ~{human(eta)}" if eta is not None else ""))

    def _remaining_s(self, sid: str, seen: Dict[str, List[float]]) -> Optional[float]:
        spec = self.plan.stages[sid].spec
        n, k = stage_epochs(spec), epochs_logged(self.plan.dir(sid))
        est = self.estimates.get(sid)
        if est is not None:
            if n is None:
                return est
            left0 = max(1, n - self.start_epochs.get(sid, 0))
            return est * max(0, n - k) / left0
        if n is None:  # an evaluation: short next to training
            return 0.0
        times = seen.get(spec.kind)
        return None if not times else sum(times) / len(times) * max(0, n - k)

    def eta_s(self, parallel: int = 1) -> Optional[float]:
        """Seconds left for every stage not done, divided over the jobs running side by side; None when unknown."""
        seen: Dict[str, List[float]] = {}
        if set(self.estimates) < {s for s, v in self.state.items() if v not in FINAL}:
            for sid, st in self.plan.stages.items():  # observed epoch times, per stage kind
                seen.setdefault(st.kind, []).extend(epoch_times(self.plan.dir(sid)))
        total = 0.0
        for sid, v in self.state.items():
            if v in FINAL:
                continue
            r = self._remaining_s(sid, seen)
            if r is None:
                return None
            total += r
        return total / max(1, parallel)

    def blocked_by_failure(self, stage: Stage) -> Optional[str]:
        for dep in self.plan.deps(stage):
            if self.state.get(dep) in ("failed", "blocked"):
                return dep
        return None


def run_estimates(plan: Plan, cfg: DictConfig) -> Dict[str, float]:
    """--dry-run's per-stage estimates, the ETA's figures until epochs are seen ({} when there are none: the ETA then
    comes from observed epoch times)."""
    try:
        return estimate_plan(plan, cfg, verbose=False)
    except Exception:
        return {}


def human(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def epoch_times(run_dir: Path) -> List[float]:
    return [float(r["epoch_s"]) for r in read_log(run_dir) if isinstance(r.get("epoch_s"), (int, float))]


def stage_epochs(spec: AnySpec) -> Optional[int]:
    """The configured epochs of a training stage (None for an evaluation)."""
    section = getattr(spec, spec.kind, None)
    return section.epochs if isinstance(section, Schedule) else None


def failure_detail(plan: Plan, sid: str, job=None) -> str:
    """Why a stage failed: its error.json's error (or where to look), then the job's logs."""
    err = plan.dir(sid) / ERROR_FILE
    parts = []
    if err.exists():
        error = (read_error(plan.dir(sid)) or {}).get("error")
        parts.append(error if isinstance(error, str) else f"see {err}")
    if job is not None and getattr(job, "paths", None) is not None:
        parts.append(f"logs: {job.paths.stdout} / {job.paths.stderr}")
    return "; ".join(parts)


def _top1(plan: Plan, sid: Optional[str]) -> str:
    if not sid or sid not in plan.stages:
        return "-"
    try:
        return f"{float((read_result(plan.dir(sid)) or {})['top1']):.2f}"
    except (ValueError, KeyError, TypeError):
        return "failed" if (plan.dir(sid) / ERROR_FILE).exists() else "-"


def results_table(plan: Plan) -> str:
    """The run's numbers: row, seed, test top-1 of its evaluate stage and of its teacher (the 'teacher-evaluate'
    stage serving the same cell); '-' when not there, 'failed' when the stage failed."""
    teachers = {}
    for st in plan.stages.values():
        if st.role == "teacher-evaluate":
            for cell in st.cells:
                teachers[tuple(cell)] = st.id
    rows = [(c.row, str(c.seed), _top1(plan, c.evaluate), _top1(plan, teachers.get((c.row, c.seed))))
            for c in plan.cells]
    head = ("row", "seed", "top-1", "teacher top-1")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]

    def fmt(r):
        return "  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r))
    return "\n".join([f"results: {plan.table} ({plan.profile}), test top-1 %", fmt(head), *map(fmt, rows)])
