"""What runs inside a job: a chain of stages in one process, and the hooks of a requeue.

StageJob is the callable submitit pickles into a job. It is a Checkpointable: on preemption or timeout (USR2)
submitit calls checkpoint(), which resubmits the same callable; a finished stage then returns its stored result at
once and an unfinished one resumes from its checkpoint-last, so a requeued job loses at most the epoch it was in.
On Slurm the requeue itself (`scontrol requeue`) runs immune to the SIGTERM of a preemption.
"""
from __future__ import annotations

import signal
import subprocess
from typing import Dict, List, Optional, Sequence

import submitit
from omegaconf import DictConfig
from submitit.slurm.slurm import SlurmJobEnvironment

from harness.core.locks import StageLocked
from harness.core.ranks import export_rank_env
from harness.core.spec import AnySpec, StageRuntime
from harness.core.stages import run_stage
from harness.core.runtime import end_process_group
from harness.plan.resolve import runtime_of
from harness.plan.graph import Plan, Stage
from harness.run.elsewhere import RunningElsewhere


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # kept across exec: scontrol itself ignores SIGTERM


def requeue_immune_to_sigterm(env, countdown: int) -> None:
    """submitit's SlurmJobEnvironment._requeue, with `scontrol requeue` run immune to SIGTERM. A preempted job gets
    SIGTERM as well as USR2, and Slurm answers the requeue itself by signalling every process of the job: when a
    SIGTERM reached scontrol before its request did, the requeue never happened and the job ended as FAILED (twice
    in the Slurm tests). scontrol is a short RPC (60 s timeout); an error exit (e.g. requeue refused) still raises,
    and one still killed by a signal (SIGKILL after Slurm's KillWait) is reported, not raised: the job is ending."""
    jid = env.job_id
    try:
        subprocess.check_call(["scontrol", "requeue", jid], timeout=60, preexec_fn=_ignore_sigterm)
    except subprocess.CalledProcessError as e:
        if e.returncode >= 0:
            raise
        print(f"[launch] scontrol requeue {jid} was killed by signal {-e.returncode}", flush=True)
        return
    print(f"[launch] requeued Slurm job {jid} ({countdown} remaining timeouts)", flush=True)


def _install_requeue_immune_to_sigterm() -> None:
    SlurmJobEnvironment._requeue = requeue_immune_to_sigterm


class StageJob(submitit.helpers.Checkpointable):
    """One stage, or a chain of stages run one after the other in the same process (a row's pre-train -> fine-tune
    -> evaluate: one Python start-up and one queue wait instead of three, and no evaluation queued as its own
    multi-GPU job). Returns the first stage's result, or a RunningElsewhere when a stage of the chain is found
    locked by another run (e.g. the job of a driver killed before it wrote job.json): not a failure, the driver
    waits for that run instead."""
    def __init__(self, stage_id: str, spec: AnySpec, run_dir: str, inputs: Dict[str, str], runtime: StageRuntime,
                 distributed: bool = False, then: Optional[List[tuple]] = None):
        self.stage_id, self.spec, self.run_dir = stage_id, spec, run_dir
        self.inputs, self.runtime, self.distributed = inputs, runtime, distributed
        self.then = list(then or [])  # (stage_id, spec, run_dir, inputs) of the stages chained after this one

    def __call__(self):
        _install_requeue_immune_to_sigterm()  # in the job's process, before any signal can ask for a requeue
        if self.distributed:  # the same function as an sbatch script's `srun python -m harness.core.stages` (ranks.py)
            export_rank_env()
        try:
            result = run_stage(self.spec, self.run_dir, self.inputs, self.runtime, self.stage_id)
            for sid, spec, run_dir, inputs in self.then:
                run_stage(spec, run_dir, inputs, self.runtime, sid)
        except StageLocked as e:
            return RunningElsewhere(e.stage_id, e.holder)
        finally:  # the job's stages shared one process group; every rank stopped together (train.fit)
            if self.distributed:
                end_process_group()
        return result


def stage_job(plan: Plan, stage: Stage, cfg: DictConfig, distributed: bool, then: Sequence[Stage] = ()) -> StageJob:
    """The job that runs `stage`, then the stages of `then` (its chain, harness.run.chains.chain_from)."""
    return StageJob(stage.id, stage.spec, str(plan.dir(stage.id)), plan.input_paths(stage), runtime_of(cfg),
                    distributed, [(t.id, t.spec, str(plan.dir(t.id)), plan.input_paths(t)) for t in then])
