"""Where and how a process computes: the `Runtime` (device, precision, rank and world size, logging), set up from
the environment and owning the torch.distributed process group it starts; run.device / run.amp "auto" resolved
(`resolve_device`, `resolve_amp`); the autocast context of a forward pass (`autocast`); a stage's peak memory.
The training loop (harness.core.train) and the benchmark's steps (harness.bench) share these."""
from __future__ import annotations

import atexit
import os
import resource
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

from harness.core.spec import StageRuntime

AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class Runtime:
    device: torch.device
    amp: str = "none"  # none | bf16 | fp16
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    log_every: int = 20
    num_workers: int = 0
    owns_process_group: bool = False  # setup_runtime started torch.distributed: close() ends it
    tensorboard: bool = False  # rank 0 writes <run_dir>/tb/ (harness.core.tblog); a bare Runtime writes none
    tb_every: int = 0  # steps between per-step TensorBoard points (0: per-epoch points only)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def close(self) -> None:
        """End torch.distributed when setup_runtime started it (a group the caller started is left to the caller).
        Every rank must be done with collectives: destroying a group with one in flight can hang (NCCL). A later
        setup_runtime starts a new group from the same env:// variables."""
        if self.owns_process_group:
            end_process_group()
            self.owns_process_group = False

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def end_process_group() -> None:
    """End torch.distributed if it is running (once a job's last stage is done: its stages share one group)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(device: str) -> str:
    """run.device as torch names it: "auto" is cuda when a GPU is visible, else cpu; any other value as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """run.amp on `device`: "auto" is bf16 on a GPU and none on CPU; none | bf16 | fp16 as given, anything else
    refused."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp not in AMP_MODES:
        raise ValueError(f"run.amp must be auto|none|bf16|fp16, got {amp!r}")
    return amp


def autocast(device: torch.device, amp: str):
    """The autocast context of a forward pass at precision `amp` (none | bf16 | fp16) on `device`: none disables
    autocast (also inside an enclosing autocast region); the meta device (the benchmark's FLOP counts) has no
    autocast to disable."""
    if amp == "none":
        if device.type == "meta":
            return nullcontext()
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


_bf16_warned = False


def _warn_without_native_bf16(dev: torch.device, rank: int) -> None:
    """bf16 autocast on a GPU without native bf16 (compute capability below 8.0: V100, T4, ...) is emulated, many
    times slower, or fails in some kernels: say so once per process (rank 0), with what to use instead."""
    global _bf16_warned
    if _bf16_warned or rank != 0:
        return
    cap = torch.cuda.get_device_capability(dev)
    if torch.cuda.is_bf16_supported() and tuple(cap) >= (8, 0):
        return
    _bf16_warned = True
    msg = (f"WARNING: run.amp=bf16 on {torch.cuda.get_device_name(dev)} (compute capability {cap[0]}.{cap[1]}), "
           "which has no native bf16 (needs 8.0+, e.g. A100, H100): autocast emulates it, slowly, or fails; "
           "use run.amp=fp16 (loss scaling) or run.amp=none on this GPU")
    warnings.warn(msg)
    print(msg, flush=True)


def setup_runtime(device: str = "auto", amp: str = "auto", threads: int = 0, log_every: int = 20,
                  num_workers: int = 0, tensorboard: bool = StageRuntime.tensorboard,
                  tb_every: int = StageRuntime.tb_every) -> Runtime:
    """Device, precision and torch.distributed from the environment (torchrun's env:// variables, or those that
    submitit.helpers.TorchDistributedEnvironment().export() sets inside a Slurm job)."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda":
        # modulo: sites that bind one GPU per task (CUDA_VISIBLE_DEVICES of one device) still give LOCAL_RANK 0..n-1
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
        owns = True
        # a process that ends without Runtime.close() (an exception, the last stage of a job) still ends the group
        # cleanly; every rank stopped together (harness.core.train.fit), so no collective is left in flight
        atexit.register(end_process_group)
    amp = resolve_amp(amp, dev)
    if amp == "bf16" and dev.type == "cuda":
        _warn_without_native_bf16(dev, rank)
    return Runtime(dev, amp, rank, world, local_rank, log_every, num_workers, owns_process_group=owns,
                   tensorboard=tensorboard, tb_every=tb_every)


def reset_peak_memory(rt: Runtime) -> None:
    """Start a stage's peak-memory count: CUDA's allocator peak, or on CPU the process's peak resident set
    (VmHWM, reset by writing 5 to /proc/self/clear_refs, Linux)."""
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak since the process started


def peak_memory_mb(rt: Runtime) -> Dict[str, object]:
    """The stage's peak memory on its busiest rank (MiB): CUDA max allocated, or the CPU process's peak resident set."""
    if rt.device.type == "cuda":
        value, kind = torch.cuda.max_memory_allocated(rt.device) / 2 ** 20, "cuda max allocated"
    else:
        value, kind = 0.0, "cpu peak resident set"
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    value = int(line.split()[1]) / 1024
        except OSError:
            value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rt.distributed:
        t = torch.tensor([value], dtype=torch.float64, device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        value = t.item()
    return {"peak_mem_mb": round(value, 1), "peak_mem_kind": kind}
