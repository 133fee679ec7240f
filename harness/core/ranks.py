"""torch.distributed's env:// variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) of
a job's task, from the job's own environment: one function for every way a multi-process stage starts.

- a Slurm task, submitit's (launcher=slurm) or a plain `srun python -m harness.core.stages <dir>` of an sbatch script
  (launcher.write_sbatch=true): from Slurm's variables, computed exactly as submitit's
  TorchDistributedEnvironment computes them, so both paths give a task the same rank, world and rendez-vous
      RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS,
      LOCAL_WORLD_SIZE = SLURM_NTASKS / SLURM_JOB_NUM_NODES,
      MASTER_ADDR = the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`),
      MASTER_PORT = $MASTER_PORT when set, else a port in [20000, 60000] drawn from the job id (an array task's
                    "<array job>_<task>") -- every task of the job draws the same one, a requeued job too;
- a job of submitit's local executor (launcher=local): from submitit (its SUBMITIT_LOCAL_* variables);
- torchrun: its variables are already there and are left as they are (callers check RANK first).

Standard library at import time; submitit only for its local executor (and its node-list parser where scontrol is
missing).
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
from typing import Dict, List, Mapping, MutableMapping, Optional

from harness.core.lazy import lazy

submitit = lazy("submitit")  # standard library only at import time: submitit where a job asks it
submitit_slurm = lazy("submitit.slurm.slurm")  # its node-list parser, only where scontrol cannot answer

MIN_PORT, MAX_PORT = 20000, 60000  # submitit's range (TorchDistributedEnvironment._get_master_port)
KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankEnvError(RuntimeError):
    """The task's rank and world cannot be told from its environment."""


def port_of_job(job_id: str) -> int:
    """The rendez-vous port of a job: the same for every task of the job and for its requeued runs."""
    return random.Random(job_id).randint(MIN_PORT, MAX_PORT)


def slurm_hostnames(nodelist: str) -> List[str]:
    """The hosts of a Slurm node list ("node[01-03],gpu7"), in order: `scontrol show hostnames` (Slurm's own
    expansion); where scontrol is missing or fails, submitit's parser of the same syntax."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts
    except (OSError, subprocess.SubprocessError):
        pass
    return submitit_slurm._parse_node_list(nodelist)


def _slurm_job_id(env: Mapping[str, str]) -> str:
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def slurm_ranks(env: Mapping[str, str]) -> Dict[str, str]:
    """The env:// variables of a Slurm task (srun), from its SLURM_* variables."""
    need = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")
    missing = [k for k in need if not env.get(k)]
    if missing:
        raise RankEnvError(f"not inside a Slurm task: {', '.join(missing)} unset (a multi-task stage runs under "
                           "`srun`, which sets them; the sbatch scripts of launcher.write_sbatch do)")
    world, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = slurm_hostnames(nodelist) if nodelist else []
    if not hosts:
        hosts = [socket.gethostname()]
    port = env.get("MASTER_PORT") or str(port_of_job(_slurm_job_id(env)))
    return {"RANK": str(int(env["SLURM_PROCID"])), "LOCAL_RANK": str(int(env.get("SLURM_LOCALID") or 0)),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(max(1, world // max(1, nodes))),
            "MASTER_ADDR": hosts[0], "MASTER_PORT": str(port)}


def rank_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The env:// variables of this task (see the module's docstring); RankEnvError when it is neither a Slurm task
    nor a submitit job."""
    env = os.environ if env is None else env
    executor = env.get("SUBMITIT_EXECUTOR", "")
    if executor and executor != "slurm":  # submitit's local executor (or another of its plugins): ask submitit
        if env is not os.environ:
            raise RankEnvError(f"SUBMITIT_EXECUTOR={executor}: submitit reads its job's variables from os.environ")
        t = submitit.helpers.TorchDistributedEnvironment()
        return {"RANK": str(t.rank), "LOCAL_RANK": str(t.local_rank), "WORLD_SIZE": str(t.world_size),
                "LOCAL_WORLD_SIZE": str(t.local_world_size), "MASTER_ADDR": str(t.master_addr),
                "MASTER_PORT": str(t.master_port)}
    if env.get("SLURM_PROCID") is not None or executor == "slurm":
        return slurm_ranks(env)
    raise RankEnvError("cannot tell this process's rank: it is neither a Slurm task (no SLURM_PROCID: run it with "
                       "srun) nor a submitit job (no SUBMITIT_EXECUTOR), and torchrun's RANK/WORLD_SIZE are unset")


def export_rank_env(env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Put this task's env:// variables into the environment (os.environ by default) for
    torch.distributed.init_process_group(init_method="env://") (harness.core.runtime.setup_runtime); returns them. A
    variable already set to another value (e.g. by a launcher of the site) is refused, naming it, rather than
    overwritten: ranks that disagree would hang in the rendez-vous."""
    env = os.environ if env is None else env
    values = rank_env(env)
    clash = [f"{k}={env[k]} (this task: {v})" for k, v in values.items() if k in env and env[k] != v]
    if clash:
        raise RankEnvError(f"already set to other values: {', '.join(clash)}; unset them, or start the stage with "
                           "the launcher that set them")
    env.update(values)
    return values
