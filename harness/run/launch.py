"""The driver: run every stage of a plan that is not done, and wait for them.

- debug: in this process, in graph order (harness.run.executors.run_in_process).
- local, slurm: the Driver submits every stage whose inputs are done as a job (with the stages chained after it,
  harness.run.chains), at most launcher.max_parallel at once (the longest chain of stages still to do first), polls,
  and submits the next wave. On Slurm a wave goes out as one job array. What runs inside a job, and its requeue on
  preemption or timeout, is harness.run.stage_job; where the jobs run, harness.run.executors; the console,
  harness.run.progress.

The driver can be stopped and restarted at any time: finished stages are found by their result.json, and a stage
whose Slurm job is still queued or running (its id is kept in <stage dir>/job.json) is re-attached, not resubmitted;
a stage another process runs (harness.run.elsewhere) is waited for. A job that ends before its stage wrote a result
or an error (killed by a signal before submitit could checkpoint it, ...) is submitted again, at most
launcher.max_requeues times per stage. A failed stage is reported with its log paths; stages that do not depend on
it go on.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from harness.core.rundir import DONE, FAILED, JOB_FILE, RunTree, read_job, stage_status, write_json
from harness.plan.resolve import world_size
from harness.plan.graph import Plan, Stage
from harness.run.chains import chain_from, joins_a_chain, longest_chain_first
from harness.run.elsewhere import RunningElsewhere, running_elsewhere
from harness.run.executors import (attach_slurm_job, controller_stderr, ended_unseen, how_it_ended, local_executor,
                                   run_in_process, slurm_executor)
from harness.run.progress import FINAL, Progress, failure_detail, results_table, run_estimates
from harness.run.stage_job import stage_job


def execute(plan: Plan, cfg: DictConfig) -> Dict[str, str]:
    """Run every stage that is not done; the caller holds harness.core.locks.driver_lock(plan.root). Returns
    {stage id: done | failed | blocked}."""
    plan.check_paths()
    tree = RunTree.of(plan)
    tree.reuse_finished()  # stages another table of this results root has finished: the same computation
    tree.set_aside_stale()  # damaged or computed from inputs that changed: moved aside with their consumers
    name = cfg.launcher.name
    if name == "debug":
        states = run_in_process(plan, cfg)
    else:
        ex = slurm_executor(plan, cfg) if name == "slurm" else local_executor(plan, cfg)
        states = Driver(plan, cfg, ex, slurm=name == "slurm").run()
    print(results_table(plan), flush=True)
    return states


class Driver:
    """The jobs of one run: `running` maps the first stage of each job in flight (or of a run elsewhere waited
    for) to the job, `members` to every stage that job runs, in order."""

    def __init__(self, plan: Plan, cfg: DictConfig, ex, slurm: bool):
        self.plan, self.cfg, self.ex, self.slurm = plan, cfg, ex, slurm
        la = cfg.launcher
        self.prog = Progress(plan, quiet=bool(cfg.run.get("quiet", False)), estimates=run_estimates(plan, cfg))
        self.limit, self.chain = la.max_parallel, bool(la.get("chain", True))
        self.distributed = world_size(la) > 1
        self.budget = int(la.get("max_requeues") or 0)  # resubmissions of a stage whose job ended without a word
        self.running: Dict[str, object] = {}
        self.members: Dict[str, List[str]] = {}
        self.resubmitted: Dict[str, int] = {}  # stage id -> times submitted again (settle)

    def run(self) -> Dict[str, str]:
        """Submit every ready stage, wait a poll, take in the jobs that ended; until no job is left."""
        if self.slurm:
            self.reattach_slurm_jobs()
        try:
            while True:
                self.submit(self.next_wave())
                if not self.running:
                    return dict(self.prog.state)
                time.sleep(self.cfg.launcher.poll_s)
                self.prog.poll(self.running, self.members)
                self.collect()
        except BaseException:
            if not self.slurm:  # local jobs die with their driver; Slurm jobs go on and are re-attached by the next one
                for job in self.running.values():
                    job.cancel(check=False)
            raise

    def busy(self) -> set:
        return {m for ms in self.members.values() for m in ms}

    def reattach_slurm_jobs(self) -> None:
        """The still-active Slurm jobs of an earlier driver: a chain's stages share the job, attached together."""
        for sid in self.plan.stages:
            if self.prog.state[sid] == "done" or sid in self.busy():
                continue
            job = attach_slurm_job(self.plan, sid)
            if job is None:
                continue
            group = [o for o in self.plan.stages if self.prog.state[o] != "done"
                     and str((read_job(self.plan.dir(o)) or {}).get("job_id")) == str(job.job_id)]
            self.running[sid], self.members[sid] = job, group or [sid]
            for o in self.members[sid]:
                self.prog.set(o, "re-attached", f"(job {job.job_id})")

    def next_wave(self) -> List[List[Stage]]:
        """The chains to submit now: the ready stages (inputs done, run neither here nor elsewhere), the longest
        chain still to do below them first, as many as launcher.max_parallel leaves room for (0: all)."""
        busy, ready = self.busy(), []
        for sid, stage in self.plan.stages.items():
            if self.prog.state[sid] in FINAL or sid in busy:
                continue
            dep = self.prog.blocked_by_failure(stage)
            elsewhere = None if dep else running_elsewhere(self.plan, sid, self.prog.state, busy, not self.slurm)
            if dep:
                self.prog.set(sid, "blocked", f"(input {dep} failed)")
            elif elsewhere is not None:  # e.g. the job of a killed driver: wait for it, do not start it twice
                self.wait_for(elsewhere)
                busy.update(self.members[sid])
            elif all(self.prog.state.get(d) == "done" for d in self.plan.deps(stage)) and not (
                    self.chain and joins_a_chain(self.plan, stage, self.prog.state, busy)):
                ready.append(stage)
        ready = longest_chain_first(self.plan, ready, self.prog.state)
        if self.limit:
            ready = ready[:max(0, self.limit - len(self.running))]
        chains = []
        for stage in ready:
            chains.append(chain_from(self.plan, stage, self.prog.state, busy) if self.chain else [stage])
            busy.update(st.id for st in chains[-1])
        return chains

    def wait_for(self, elsewhere: RunningElsewhere) -> None:
        sid = elsewhere.stage_id
        self.running[sid], self.members[sid] = elsewhere, [sid, *elsewhere.then]
        self.prog.set(sid, "re-attached", f"(running elsewhere: {elsewhere.holder})" + (
            f", then {', '.join(elsewhere.then)} in the same job" if elsewhere.then else ""))

    def submit(self, chains: Sequence[List[Stage]]) -> None:
        """One job per chain; on Slurm, one job array for the whole wave. Each stage's job.json names its job."""
        if not chains:
            return
        with controller_stderr(self.ex, self.plan.root / ".submitit" / "controllers.err"), self.ex.batch():
            pending = [(c, self.ex.submit(stage_job(self.plan, c[0], self.cfg, self.distributed, c[1:])))
                       for c in chains]
        for c, job in pending:
            info = {"job_id": job.job_id, "folder": str(self.plan.root / ".submitit" / "%j"),
                    "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "chain": [st.id for st in c]}
            for st in c:
                self.plan.dir(st.id).mkdir(parents=True, exist_ok=True)
                write_json(info, self.plan.dir(st.id) / JOB_FILE)
            self.running[c[0].id], self.members[c[0].id] = job, [st.id for st in c]
            self.prog.set(c[0].id, "submitted", f"(job {job.job_id})" + (
                f", then {', '.join(st.id for st in c[1:])} in the same job" if len(c) > 1 else ""))
            self.prog.submitted(job)

    def collect(self) -> None:
        """Stages of a chain finish one by one (their consumers may start now); a job that ended is settled."""
        for first, job in list(self.running.items()):
            for sid in self.members[first]:
                if self.prog.state[sid] != "done" and stage_status(self.plan.dir(sid)) == DONE:
                    self.prog.set(sid, "done")
            if job.done() or ended_unseen(job):
                del self.running[first]
                settle(self.prog, job, self.members.pop(first), self.resubmitted, self.budget)


def _outcome(job) -> Tuple[object, Optional[Exception]]:
    try:
        return job.result(), None
    except Exception as e:
        return None, e


def settle(prog: Progress, job, chain: Sequence[str], resubmitted: Dict[str, int], budget: int) -> None:
    """A job ended: each stage of its chain is done; or failed (error.json), the rest of the chain then blocked; or
    to do again: run by another process, or its job ended before it wrote a result or an error (e.g. killed by a
    signal before submitit's handler was in place), then submitted again at most `budget` times (`resubmitted`
    counts them per stage; the stages after it in the chain go along) -- unless it was CANCELLED (scancel: the
    user stopped it)."""
    plan, failed, again, outcome = prog.plan, None, False, None
    for sid in chain:
        status = stage_status(plan.dir(sid))
        if status == DONE:
            if prog.state[sid] != "done":
                prog.set(sid, "done")
        elif failed is not None:  # each chained stage consumes the one before it
            prog.set(sid, "blocked", f"(input {failed} failed)")
        elif again:
            continue
        elif isinstance(job, RunningElsewhere) and status != FAILED:
            prog.set(sid, "todo", f"(the run by {job.holder} stopped without a result; resubmitting)")
        else:
            result, error = outcome = outcome or _outcome(job)
            if isinstance(result, RunningElsewhere):  # a stage of this chain was held by another run: wait for it
                prog.set(sid, "todo", f"(found running elsewhere: {result.holder}; waiting for it)")
            elif status != FAILED and resubmitted.get(sid, 0) < budget and not \
                    (how := how_it_ended(job)).startswith("CANCELLED"):  # scancel: the user stopped it, not a fault
                resubmitted[sid] = n = resubmitted.get(sid, 0) + 1
                prog.resubmit(sid, f"job {job.job_id} ended ({how}) before its stage wrote a result or an error: "
                                   f"resubmitting, {n} of {budget}")
                again = True
            else:
                detail = "the job ended without a result" if error is None else \
                    failure_detail(plan, sid, job) or (str(error).splitlines() or [repr(error)])[0]
                if resubmitted.get(sid):
                    detail += f" (submitted {resubmitted[sid] + 1} times)"
                prog.set(sid, "failed", detail)
                failed = sid
