"""Execute a plan's stages as submitit jobs.

- debug: in this process, in graph order.
- local: submitit's local executor; launcher.max_parallel jobs side by side on this machine, the next ones chosen
  by harness.run.dispatch when there are fewer free slots than ready jobs.
- slurm: submitit's Slurm executor. The driver submits every stage whose inputs are done (ready stages together as
  one job array), polls, and submits the next wave. Each job is a submitit Checkpointable: on preemption or timeout
  it is requeued (at most launcher.max_requeues times) and the stage resumes from its checkpoint-last. Multi-GPU
  jobs start torch.distributed from the job's environment (harness.core.ranks: Slurm's variables, as for an sbatch
  script's srun; submitit's for local jobs).

The driver can be stopped and restarted at any time: finished stages are found by their result.json, and a stage
whose Slurm job is still queued or running (its id is kept in <stage dir>/job.json) is re-attached, not resubmitted.
A failed stage is reported with its log paths; stages that do not depend on it go on.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import submitit
from omegaconf import DictConfig, OmegaConf

from harness.run import dispatch
from harness.plan.config import mem_gb_of, runtime_of, tasks_per_node, world_size
from harness.bench.estimate import estimate_plan
from harness.plan.graph import Plan, Stage
from harness.core.ranks import export_rank_env
from harness.core.locks import StageLocked, lock_holder
from harness.core.rundir import ERROR_FILE, JOB_FILE, RESULT_FILE, RunTree, epochs_logged, read_log, write_json
from harness.core.spec import AnySpec, Schedule, StageRuntime
from harness.core.stages import run_stage
from harness.core.train import end_process_group

LOCKED = "locked"  # a job's result when a stage of it was found running in another process
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


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
    from submitit.slurm.slurm import SlurmJobEnvironment
    SlurmJobEnvironment._requeue = requeue_immune_to_sigterm


class StageJob(submitit.helpers.Checkpointable):
    """The callable a job runs: one stage, or a chain of stages run one after the other in the same process (a
    row's pre-train -> fine-tune -> evaluate: one Python start-up and one queue wait instead of three, and no
    evaluation queued as its own multi-GPU job). checkpoint() (inherited) resubmits the same callable; a finished
    stage returns its stored result at once and an unfinished one resumes from its checkpoint-last, so a requeued job
    loses at most the epoch it was in."""
    def __init__(self, stage_id: str, spec: AnySpec, run_dir: str, inputs: Dict[str, str], runtime: StageRuntime,
                 distributed: bool = False, then: Optional[List[tuple]] = None):
        self.stage_id, self.spec, self.run_dir = stage_id, spec, run_dir
        self.inputs, self.runtime, self.distributed = inputs, runtime, distributed
        self.then = list(then or [])  # (stage_id, spec, run_dir, inputs) of the stages chained after this one

    def __call__(self) -> dict:
        _install_requeue_immune_to_sigterm()  # in the job's process, before any signal can ask for a requeue
        if self.distributed:  # the same function as an sbatch script's `srun python -m harness.core.stages` (ranks.py)
            export_rank_env()
        try:
            result = run_stage(self.spec, self.run_dir, self.inputs, self.runtime, self.stage_id)
            for sid, spec, run_dir, inputs in self.then:
                run_stage(spec, run_dir, inputs, self.runtime, sid)
        except StageLocked as e:  # another job runs it (e.g. one submitted by a driver killed before it wrote
            # job.json): not a failure; the driver waits for that run instead
            return {"status": LOCKED, "stage_id": e.stage_id, "holder": e.holder}
        finally:  # the job's stages shared one process group; every rank stopped together (train.fit)
            if self.distributed:
                end_process_group()
        return result


def _job(plan: Plan, stage: Stage, cfg: DictConfig, distributed: bool, then: Sequence[Stage] = ()) -> StageJob:
    return StageJob(stage.id, stage.spec, str(plan.dir(stage.id)), plan.input_paths(stage), runtime_of(cfg),
                    distributed, [(t.id, t.spec, str(plan.dir(t.id)), plan.input_paths(t)) for t in then])


def chain_from(plan: Plan, first: Stage, state: Dict[str, str], busy: set) -> List[Stage]:
    """The stages one job runs, starting with `first` (ready): then, repeatedly, the first stage in graph order that
    consumes the chain's last stage, is still to do and not in flight (`busy`), and needs nothing outside the chain
    that is not done. An evaluation follows its fine-tune; a pre-train with two consumers (the MAE baseline feeds
    the MAE and the KD rows) takes one along and leaves the other to a job of its own, which starts as soon as the
    pre-train's result appears. A probe (seconds of work) of a stage in the chain, or of a random initialisation
    for a cell the chain serves (a scratch row), joins it at the end rather than start a job of its own."""
    chain, ids = [first], {first.id}

    def ready(st: Stage, after) -> bool:
        deps = plan.deps(st)
        follows = any(a in deps for a in after) if deps else \
            st.kind == "probe" and any(set(map(tuple, st.cells)) & set(map(tuple, c.cells)) for c in chain)
        return st.id not in ids and st.id not in busy and state.get(st.id) == "todo" and follows \
            and all(d in ids or state.get(d) == "done" for d in deps)
    while True:
        nxt = next((st for st in plan.stages.values() if st.kind != "probe" and ready(st, [chain[-1].id])), None) \
            or next((st for st in plan.stages.values() if st.kind == "probe" and ready(st, ids)), None)
        if nxt is None:
            return chain
        chain.append(nxt)
        ids.add(nxt.id)


def _joins_a_chain(plan: Plan, stage: Stage, state: Dict[str, str], busy: set) -> bool:
    """A probe of a random initialisation (no input) waits to join the job of a stage of its cell still to start
    (chain_from), rather than take a job of its own."""
    if stage.kind != "probe" or plan.deps(stage):
        return False
    cells = set(map(tuple, stage.cells))
    return any(st.kind != "probe" and st.id not in busy and state.get(st.id) == "todo"
               and cells & set(map(tuple, st.cells)) for st in plan.stages.values())


class Progress:
    """The driver's console: one line per state change; while jobs run, one line per new epoch of a running stage
    ("epoch k/N" from its log.jsonl) with an ETA for the whole run (harness.bench.estimate's figures, else the epoch
    times
    seen so far). quiet (run.quiet): only submissions, failures and the final table."""
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

    def submitted(self, job) -> None:
        """Hook: where the job's console output goes (submitit's stdout log)."""
        paths = getattr(job, "paths", None)
        if paths is not None:
            print(f"    log: {paths.stdout}", flush=True)

    def poll(self, running: Dict[str, object], members: Dict[str, List[str]]) -> None:
        """Hook, once per poll: "epoch k/N" of each running job's current stage when it changed, with the ETA."""
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
                self._print(f"{sid}: epoch {k}/{n}" + (f", run ETA ~{_human(eta)}" if eta is not None else ""))

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
        if set(self.estimates) < {s for s, v in self.state.items() if v not in ("done", "failed", "blocked")}:
            for sid, st in self.plan.stages.items():  # observed epoch times, per stage kind
                seen.setdefault(st.kind, []).extend(epoch_times(self.plan.dir(sid)))
        total = 0.0
        for sid, v in self.state.items():
            if v in ("done", "failed", "blocked"):
                continue
            r = self._remaining_s(sid, seen)
            if r is None:
                return None
            total += r
        return total / max(1, parallel)

    def jobs_left(self, running: Dict[str, object], members: Dict[str, List[str]]) -> List[List[tuple]]:
        """Each running job's unfinished stages with the seconds each has left (estimates, scaled by the epochs
        already logged), for harness.run.dispatch; a stage without an estimate counts as 0 s."""
        return [[(sid, self._remaining_s(sid, {}) or 0.0) for sid in members.get(first, [first])
                 if self.state.get(sid) != "done" and sid in self.plan.stages] for first in running]

    def blocked_by_failure(self, stage: Stage) -> Optional[str]:
        for dep in self.plan.deps(stage):
            if self.state.get(dep) in ("failed", "blocked"):
                return dep
        return None


def _human(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def epoch_times(run_dir: Path) -> List[float]:
    return [float(r["epoch_s"]) for r in read_log(run_dir) if isinstance(r.get("epoch_s"), (int, float))]


def stage_epochs(spec: AnySpec) -> Optional[int]:
    """The configured epochs of a training stage (None for an evaluation)."""
    section = getattr(spec, spec.kind, None)
    return section.epochs if isinstance(section, Schedule) else None


def _top1(plan: Plan, sid: Optional[str]) -> str:
    if not sid or sid not in plan.stages:
        return "-"
    try:
        return f"{float(json.loads((plan.dir(sid) / RESULT_FILE).read_text())['top1']):.2f}"
    except (OSError, ValueError, KeyError, TypeError):
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


def _failure_detail(plan: Plan, sid: str, job=None) -> str:
    err = plan.dir(sid) / ERROR_FILE
    parts = []
    if err.exists():
        try:
            parts.append(json.loads(err.read_text())["error"])
        except (OSError, ValueError, KeyError):
            parts.append(f"see {err}")
    if job is not None and getattr(job, "paths", None) is not None:
        parts.append(f"logs: {job.paths.stdout} / {job.paths.stderr}")
    return "; ".join(parts)


class Elsewhere:
    """A stage that another process is running (it holds <stage dir>/.stage.lock: e.g. a job left behind by a driver
    that was killed): waited for, never started a second time. When that job is a chain (its job.json lists the
    stages it runs after this one) and its process is alive, the rest of the chain is waited for too: between two
    stages of a chain no lock is held, and a second runner must not step in there."""
    paths = None

    def __init__(self, run_dir: Path, holder: str, rest: Sequence[Path] = (), pid: Optional[int] = None):
        self.run_dir, self.job_id = Path(run_dir), holder
        self.rest, self.pid = [Path(d) for d in rest], pid

    def done(self) -> bool:
        if self.pid is not None and _alive(self.pid):
            return False
        return all(lock_holder(d) is None for d in [self.run_dir, *self.rest])

    def result(self):
        raise RuntimeError(f"the run by {self.job_id} ended without a result")

    def cancel(self, check: bool = False) -> None:
        """Not ours to stop."""

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_submitit(pid: int) -> bool:
    """Whether process `pid` is a submitit local job controller (a recycled pid is not our job); True where /proc
    cannot tell."""
    try:
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc/self").exists()


def _orphan_chain(plan: Plan, sid: str, state: Dict[str, str]) -> tuple:
    """(the stages after `sid` in the chain of the local job that holds its lock, that job's pid: a local job's id is
    its process id), from job.json;
    ([], None) when the job is not a local chain of this plan or is gone."""
    try:
        info = json.loads((plan.dir(sid) / JOB_FILE).read_text())
        chain, pid = list(info.get("chain") or []), int(info["job_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return [], None
    if sid not in chain or not _alive(pid) or not _is_submitit(pid):
        return [], None
    rest = [m for m in chain[chain.index(sid) + 1:] if m in plan.stages and state.get(m) != "done"]
    return rest, pid


def execute(plan: Plan, cfg: DictConfig) -> Dict[str, str]:
    """Run every stage that is not done; the caller holds rundir.driver_lock(plan.root). Returns {stage id: done |
    failed | blocked}."""
    plan.check_paths()
    tree = RunTree.of(plan)
    tree.reuse_finished()  # stages another table of this results root has finished: the same computation
    tree.set_aside_stale()  # damaged or computed from inputs that changed: moved aside with their consumers
    name = cfg.launcher.name
    if name == "debug":
        states = _run_in_process(plan, cfg)
    else:
        ex = slurm_executor(plan, cfg) if name == "slurm" else local_executor(plan, cfg)
        states = _run_jobs(plan, cfg, ex, slurm=name == "slurm")
    print(results_table(plan), flush=True)
    return states


def _quiet(cfg: DictConfig) -> bool:
    return bool(cfg.run.get("quiet", False))


def _estimates(plan: Plan, cfg: DictConfig) -> Dict[str, float]:
    """--dry-run's per-stage estimates, for the ETA and harness.run.dispatch ({} when none: the ETA then comes from
    observed epoch times, the dispatch keeps the plain order)."""
    try:
        return estimate_plan(plan, cfg, verbose=False)
    except Exception:
        return {}


def _run_in_process(plan: Plan, cfg: DictConfig) -> Dict[str, str]:
    prog = Progress(plan, quiet=_quiet(cfg))
    for sid, stage in plan.stages.items():
        if prog.state[sid] == "done":
            continue
        dep = prog.blocked_by_failure(stage)
        if dep:
            prog.set(sid, "blocked", f"(input {dep} failed)")
            continue
        prog.set(sid, "running")
        try:
            run_stage(stage.spec, plan.dir(sid), plan.input_paths(stage), runtime_of(cfg), sid)
            prog.set(sid, "done")
        except Exception as e:  # reported; independent stages go on
            prog.set(sid, "failed", f"{type(e).__name__}: {e}")
    return dict(prog.state)


def local_executor(plan: Plan, cfg: DictConfig) -> submitit.LocalExecutor:
    """Jobs on this machine. On launcher.timeout_min a job gets USR2 (signal_delay_s before the limit, submitit's
    default 30 s), checkpoints and is restarted, at most launcher.max_requeues times, as on Slurm."""
    la = cfg.launcher
    ex = submitit.LocalExecutor(folder=plan.root / ".submitit" / "%j", max_num_timeout=la.max_requeues)
    params = dict(timeout_min=la.timeout_min, gpus_per_node=la.gpus_per_node, tasks_per_node=tasks_per_node(la))
    if la.get("signal_delay_s") is not None:
        params["signal_delay_s"] = la.signal_delay_s
    ex.update_parameters(**params)
    return ex


@contextmanager
def controller_stderr(ex, path: Path):
    """Start submitit's local job controllers with their stderr in `path`, not the driver's. A controller is a child
    of the driver in its process group: a Ctrl-C at the terminal reaches it too and, as when the driver cancels its
    job (SIGINT), it stops its tasks and prints a KeyboardInterrupt traceback. The driver's one-line note should be
    the last thing the user sees. The jobs' own output goes to their .submitit logs either way."""
    if not isinstance(ex, submitit.LocalExecutor):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)  # inherited by the controller processes started inside the block
        os.close(fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def snapshot_wanted(cfg: DictConfig) -> bool:
    snap = cfg.launcher.get("snapshot")
    return cfg.launcher.name == "slurm" if snap is None else bool(snap)


def code_snapshot(parent: Path) -> Path:
    """A copy of this repository's code in parent/<time>, for jobs that start later: submitit's RsyncSnapshot (the
    tracked files as they are in the working tree, plus untracked files git does not ignore), or, without rsync or
    git, a plain copy of the Python packages. Jobs import it first via PYTHONSAFEPATH=1 and PYTHONPATH=<copy> (the
    job's working directory, the submission one, is then not put before it)."""
    repo = Path(__file__).resolve().parents[2]  # harness/run/launch.py -> the repository
    dest = Path(parent) / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():
        n += 1
        dest = Path(parent) / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    try:
        if not submitit.helpers.RsyncSnapshot.available():
            raise RuntimeError("rsync not found")
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=repo, check=True,
                                   capture_output=True, text=True).stdout.split()
        snap = submitit.helpers.RsyncSnapshot(dest, root_dir=repo, include=untracked)
        with snap:  # copies, and chdir's into the copy: back out at once (the driver keeps its own paths)
            pass
    except Exception:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for pkg in ("harness", "baselines"):
            if (repo / pkg).is_dir():
                shutil.copytree(repo / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def slurm_executor(plan: Plan, cfg: DictConfig) -> submitit.AutoExecutor:
    la = cfg.launcher
    ex = submitit.AutoExecutor(folder=plan.root / ".submitit" / "%j", cluster="slurm",
                               slurm_max_num_timeout=la.max_requeues)
    params = dict(timeout_min=la.timeout_min, nodes=la.nodes, tasks_per_node=tasks_per_node(la),
                  cpus_per_task=la.cpus_per_task,
                  slurm_array_parallelism=la.array_parallelism,
                  slurm_additional_parameters=OmegaConf.to_container(la.additional_parameters, resolve=True),
                  # srun of Slurm 22.05 to 23.02 does not inherit --cpus-per-task: data workers would share one CPU
                  slurm_srun_args=[f"--cpus-per-task={int(la.cpus_per_task)}"])
    if la.gpus_per_node:
        params["gpus_per_node"] = la.gpus_per_node
    mem = mem_gb_of(la)
    if mem:
        params["mem_gb"] = mem
    if la.get("signal_delay_s") is not None:
        params["slurm_signal_delay_s"] = la.signal_delay_s
    for key in ("partition", "account", "qos"):
        if la[key]:
            params[f"slurm_{key}"] = la[key]
    setup = [str(x) for x in (la.get("setup") or [])]
    if snapshot_wanted(cfg):
        snap = code_snapshot(plan.root / ".submitit" / "code")
        setup.append(f"export PYTHONSAFEPATH=1 PYTHONPATH={shlex.quote(str(snap))}${{PYTHONPATH:+:$PYTHONPATH}}")
        print(f"[reproduce] queued jobs run the code snapshot {snap}", flush=True)
    if setup:
        params["slurm_setup"] = setup
    ex.update_parameters(**params)
    return ex


ENDED = {"CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "DEADLINE", "BOOT_FAIL",
         "COMPLETED"}


def ended_unseen(job) -> bool:
    """A Slurm array task cancelled (or failed) while still pending never gets a sacct record of its own: submitit
    then reports it UNKNOWN, i.e. not done, forever, and a driver waiting for it hangs (found by tools.faults: a
    `scancel -s KILL` of a pending array). The array's own record, `<id>` or `<id>_[...]`, says that it ended."""
    jid = str(job.job_id)
    if "_" not in jid or job.state.split()[0] != "UNKNOWN":
        return False
    parent = jid.split("_")[0]
    try:
        out = subprocess.run(["sacct", "-j", parent, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    for line in out.splitlines():
        ident, _, state = line.partition("|")
        if ident == jid:
            return False  # the task has its own record: submitit will see it
        if (ident == parent or ident.startswith(parent + "_[")) and state.split()[0] in ENDED:
            return True
    return False


def _attach(plan: Plan, sid: str):
    """The still-active Slurm job of a stage submitted by an earlier driver, if any."""
    f = plan.dir(sid) / JOB_FILE
    if not f.exists():
        return None
    try:
        info = json.loads(f.read_text())
        job = submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"])
        return job if job.state.split()[0] in ACTIVE and not ended_unseen(job) else None
    except Exception:
        return None


def _run_jobs(plan: Plan, cfg: DictConfig, ex: submitit.AutoExecutor, slurm: bool) -> Dict[str, str]:
    """Submit every stage whose inputs are done, each with the stages chained after it (launcher.chain), at most
    launcher.max_parallel jobs at once (0 = no limit; on Slurm a wave goes out as one job array), poll, repeat."""
    prog = Progress(plan, quiet=_quiet(cfg), estimates=_estimates(plan, cfg))
    limit = cfg.launcher.max_parallel
    distributed = world_size(cfg.launcher) > 1
    running: Dict[str, object] = {}  # first stage of a job -> the job
    members: Dict[str, List[str]] = {}  # first stage of a job -> every stage the job runs, in order
    for sid in plan.stages:
        if prog.state[sid] != "done" and not any(sid in m for m in members.values()):
            job = _attach(plan, sid) if slurm else None
            if job is not None:  # a chain's stages share the job: attach them together
                group = [o for o in plan.stages if prog.state[o] != "done" and _job_id(plan, o) == str(job.job_id)]
                running[sid], members[sid] = job, group or [sid]
                for o in members[sid]:
                    prog.set(o, "re-attached", f"(job {job.job_id})")
    try:
        _drive(plan, cfg, ex, prog, running, members, limit, distributed)
    except BaseException:
        if not slurm:  # local jobs die with their driver; Slurm jobs go on and are re-attached by the next one
            for job in running.values():
                job.cancel(check=False)
        raise
    return dict(prog.state)


def _job_id(plan: Plan, sid: str) -> Optional[str]:
    try:
        return str(json.loads((plan.dir(sid) / JOB_FILE).read_text())["job_id"])
    except (OSError, ValueError, KeyError):
        return None


def _drive(plan: Plan, cfg: DictConfig, ex, prog: Progress, running: Dict[str, object],
           members: Dict[str, List[str]], limit: int, distributed: bool) -> None:
    chain = bool(cfg.launcher.get("chain", True))

    def jobs_of(stage: Stage, state: Dict[str, str], busy: set) -> List[Stage]:
        return chain_from(plan, stage, state, busy) if chain else [stage]

    while True:
        busy = {m for ms in members.values() for m in ms}
        ready: List[Stage] = []
        for sid, stage in plan.stages.items():
            if prog.state[sid] in ("done", "failed", "blocked") or sid in busy:
                continue
            dep = prog.blocked_by_failure(stage)
            holder = lock_holder(plan.dir(sid))
            if dep:
                prog.set(sid, "blocked", f"(input {dep} failed)")
            elif holder or (cfg.launcher.name != "slurm" and _orphan_chain(plan, sid, prog.state)[1]):
                # e.g. the job of a killed driver, still running (it holds the stage lock) or started and about to
                # take it (its controller is alive): wait for it, do not start it twice
                rest, pid = _orphan_chain(plan, sid, prog.state) if cfg.launcher.name != "slurm" else ([], None)
                rest = [m for m in rest if m not in busy]
                holder = holder or f"local job {pid}"
                running[sid] = Elsewhere(plan.dir(sid), holder, [plan.dir(m) for m in rest], pid)
                members[sid] = [sid, *rest]
                busy.update(members[sid])
                prog.set(sid, "re-attached", f"(running elsewhere: {holder})" + (
                    f", then {', '.join(rest)} in the same job" if rest else ""))
            elif all(prog.state.get(d) == "done" for d in plan.deps(stage)) and not (
                    chain and _joins_a_chain(plan, stage, prog.state, busy)):
                ready.append(stage)
        if limit:  # fewer slots than ready jobs: the order decides how the run ends (harness.run.dispatch)
            free = max(0, limit - len(running))
            ready = dispatch.order(plan, ready, free, prog.state, prog.jobs_left(running, members), limit,
                                   prog.estimates or None, jobs_of)[:free]
        else:
            ready.sort(key=dispatch.plain_key(plan))
        if ready:
            chains = []
            for stage in ready:
                c = jobs_of(stage, prog.state, busy)
                busy.update(st.id for st in c)
                chains.append(c)
            with controller_stderr(ex, plan.root / ".submitit" / "controllers.err"), ex.batch():
                # on Slurm, one job array for the whole wave
                pending = [(c, ex.submit(_job(plan, c[0], cfg, distributed, c[1:]))) for c in chains]
            for c, job in pending:
                info = {"job_id": job.job_id, "folder": str(plan.root / ".submitit" / "%j"),
                        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "chain": [st.id for st in c]}
                for st in c:
                    plan.dir(st.id).mkdir(parents=True, exist_ok=True)
                    write_json(info, plan.dir(st.id) / JOB_FILE)
                running[c[0].id], members[c[0].id] = job, [st.id for st in c]
                prog.set(c[0].id, "submitted", f"(job {job.job_id})" + (
                    f", then {', '.join(st.id for st in c[1:])} in the same job" if len(c) > 1 else ""))
                prog.submitted(job)
        if not running:
            break
        time.sleep(cfg.launcher.poll_s)
        prog.poll(running, members)
        for first, job in list(running.items()):
            for sid in members[first]:  # stages of a chain finish one by one: their consumers may start now
                if prog.state[sid] != "done" and RunTree.of(plan).status(sid) == "done":
                    prog.set(sid, "done")
            if not job.done() and not (isinstance(job, submitit.SlurmJob) and ended_unseen(job)):
                continue
            del running[first]
            chain_ids = members.pop(first)
            failed = None
            for sid in chain_ids:
                if prog.state[sid] == "done" or RunTree.of(plan).status(sid) == "done":
                    if prog.state[sid] != "done":
                        prog.set(sid, "done")
                    continue
                if failed is not None:  # each chained stage consumes the one before it
                    prog.set(sid, "blocked", f"(input {failed} failed)")
                    continue
                if isinstance(job, Elsewhere) and RunTree.of(plan).status(sid) != "failed":
                    prog.set(sid, "todo", f"(the run by {job.job_id} stopped without a result; resubmitting)")
                    continue
                try:
                    res = job.result()
                    if isinstance(res, dict) and res.get("status") == LOCKED:
                        # a stage of this chain was held by another run: wait for it (next round re-attaches it)
                        prog.set(sid, "todo", f"(found running elsewhere: {res.get('holder')}; waiting for it)")
                        continue
                    detail = "the job ended without a result"
                except Exception as e:
                    detail = _failure_detail(plan, sid, job) or str(e).splitlines()[0]
                prog.set(sid, "failed", detail)
                failed = sid
