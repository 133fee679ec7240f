"""The cost of the TensorBoard curves (harness.core.tblog), and the per-step interval chosen from it (run.tb_every).

    python -m harness.bench --tensorboard                  # tiny shapes, 1 thread: a few minutes on 2 cores
    python -m harness.bench --tensorboard --quick          # smoke shapes, 3 repetitions (seconds)

Two measurements, on a profile's MAE, DMAE and fine-tuning steps (built as the benchmark builds them, from
harness.core.build):

- **in the loop**: train.train_one_epoch -- the stages' loop, the writer's calls where a stage makes them -- over
  the same batch `--tb-steps` times per repetition, without a writer and with one at each interval of
  `--tb-intervals`, and a second time without one (the A/A control, whose "overhead" is the noise), every variant
  once per repetition in a rotated order (interleaved, so machine noise hits them alike). Overhead = the median over
  repetitions of (seconds per step with the writer) / (without) - 1, of wall and of CPU time. On a busy machine
  this ratio is noisier than the effect (a tenth of a percent), so also:
- **by parts**: the writer's own time, measured in isolation many times over: per point written (every scalar of
  the step: the loss terms, lr, images/s; flushed to the file at the end, the writer thread's work included), per
  step that writes no point (adding the step's values to the running sums), and to open a writer (and, in a fresh
  interpreter, to import torch.utils.tensorboard). The modelled overhead of interval k is (per step + per point / k)
  / the step's median time without a writer; the smallest interval of 1, 2, 5, 10, 20, 50, 100 under 1% for every
  measured step is the recommendation.

Results: <out>/tensorboard-<device>-<date>.json and .md (results/bench/ by default; their schema is not the step
benchmark's, so harness.bench.estimate never reads them). The load average is recorded at the start and the end.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from harness.core.models import get_arch
from harness.core.rundir import git_commit
from harness.core.spec import FinetuneSpec, PretrainSpec, StageRuntime
from harness.core.tblog import TBLog
from harness.core.runtime import Runtime
from harness.core.train import train_one_epoch
from harness.bench.results import bench_dir, cpu_name, device_key
from harness.bench.spec import profile_steps
from harness.bench.steps import Pool, _classifier, _objective, _optimizer, _student_mae, _teacher_mae

SCHEMA = "tensorboard-1"
STEPS = ("mae_m75", "dmae_partial_m75", "finetune")
INTERVAL_LADDER = (1, 2, 5, 10, 20, 50, 100)
TARGET = 0.01  # the writer may cost at most this fraction of a step


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _build(pool: Pool, s):
    """Model, objective, optimizer and one batch of a training step (as harness.bench.steps.build_step makes them)."""
    teacher = None
    if s.kind in ("mae", "dmae"):
        dims = [get_arch(s.teacher).embed_dim] * len(s.pairs) if s.kind == "dmae" else []
        model = _student_mae(pool, s, dims)
        if s.kind == "dmae":
            teacher = _teacher_mae(pool, s)
        schedule = PretrainSpec(epochs=10 ** 6, warmup_epochs=0, batch_size=s.batch, accum_iter=1)
    else:
        model = _classifier(pool, s.model, s, s.patch_size, frozen=False, drop_path=s.drop_path)
        schedule = FinetuneSpec(epochs=10 ** 6, warmup_epochs=0, batch_size=s.batch, accum_iter=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, 3, s.img_size, s.img_size, generator=g).to(pool.device)
    y = torch.randint(0, s.num_classes, (s.batch,), generator=g).to(pool.device)
    return model, _objective(pool, s, teacher), _optimizer(pool, model, s), schedule, (x, y)


class _Loop:
    """train_one_epoch over `n` copies of one batch, with a TensorBoard writer at `every` steps (None: none)."""

    def __init__(self, parts, device: torch.device, amp: str, n: int, every: Optional[int], tb_dir: Path):
        self.model, self.objective, self.optimizer, self.schedule, batch = parts
        self.data = [batch] * n
        self.n = n
        self.rt = Runtime(device, amp, log_every=0, tensorboard=every is not None, tb_every=every or 0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.tb = TBLog(tb_dir, self.rt, n, 0, "bench") if every is not None else None
        self.epoch = 0

    def __call__(self) -> Tuple[float, float]:
        """Seconds per step of one epoch: wall, and this process's CPU time (every thread: the writer's too)."""
        t0, c0 = time.perf_counter(), time.process_time()
        train_one_epoch(self.model, self.model, self.objective, self.optimizer, self.scaler, self.data,
                        self.schedule, 1e-5, self.epoch, self.n, self.rt, "bench", self.tb)
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        self.epoch += 1
        return (time.perf_counter() - t0) / self.n, (time.process_time() - c0) / self.n


def _writer_parts(values: Dict[str, float], optimizer, tmp: Path, n: int = 2000) -> dict:
    """The writer's own time, n calls in a row: per point (all its scalars, flushed to the file at the end) as this
    process's CPU time -- the calling thread's and the writer thread's (serialising, checksumming, writing) -- and as
    the calling thread's alone; per step that writes no point; to open a writer (wall)."""
    rt = Runtime(torch.device("cpu"), log_every=0, tensorboard=True, tb_every=1)
    t0 = time.perf_counter()
    tb = TBLog(tmp / "open", rt, n)
    open_s = time.perf_counter() - t0
    tb.close()
    tb = TBLog(tmp / "points", rt, n)
    w0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
    for i in range(n):
        tb.step(0, i, values, 1, 0.01, optimizer)
    main = time.thread_time() - m0
    tb.flush()
    point_cpu, point_wall = (time.process_time() - c0) / n, (time.perf_counter() - w0) / n
    tb.close()
    size = sum(p.stat().st_size for p in (tmp / "points" / "tb").iterdir())
    rt_sparse = Runtime(torch.device("cpu"), log_every=0, tensorboard=True, tb_every=10 ** 9)
    tb = TBLog(tmp / "sparse", rt_sparse, 10 ** 9)
    c0 = time.process_time()
    for i in range(n):
        tb.step(0, i, values, 1, 0.01, optimizer)
    no_point_s = (time.process_time() - c0) / n
    tb.close()
    return {"point_cpu_s": point_cpu, "point_main_thread_s": main / n, "point_wall_s": point_wall,
            "no_point_cpu_s": no_point_s, "open_s": open_s, "bytes_per_point": size / n,
            "scalars_per_point": len(values) + 2, "calls": n}


def _import_s() -> Optional[float]:
    """Seconds to import torch.utils.tensorboard (tensorboard, protobuf) in a fresh interpreter that has torch."""
    code = ("import time, torch; t = time.perf_counter(); import torch.utils.tensorboard; "
            "print(time.perf_counter() - t)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def _stats(xs: Sequence[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_shape(shape: str, device: torch.device, amp: str, reps: int, steps: int, intervals: Sequence[int],
                tmp: Path, only: Sequence[str] = STEPS, log=print) -> dict:
    pool = Pool(device)
    chosen = [(lab, s) for lab, s in profile_steps(shape, None, device.type) if lab in only]
    out = {"shape": shape, "threads": torch.get_num_threads(), "steps": []}
    for label, s in sorted(chosen, key=lambda ls: ls[1].kind != "dmae"):  # as run.py: DMAE's student first
        parts = _build(pool, s)
        # off_again: a second loop without a writer, the A/A control -- its "overhead" is the measurement's noise
        loops = {"off": _Loop(parts, device, amp, steps, None, tmp / shape / label / "off"),
                 "off_again": _Loop(parts, device, amp, steps, None, tmp / shape / label / "off_again")}
        for k in intervals:
            loops[f"every_{k}"] = _Loop(parts, device, amp, steps, k, tmp / shape / label / f"every_{k}")
        for lp in loops.values():  # warm-up: the optimizer's state, the writer's first file write
            lp()
        times: Dict[str, List[float]] = {v: [] for v in loops}
        cpu: Dict[str, List[float]] = {v: [] for v in loops}
        names = list(loops)
        for r in range(reps):
            k = r % len(names)
            for v in names[k:] + names[:k]:
                wall, c = loops[v]()
                times[v].append(wall)
                cpu[v].append(c)
        for lp in loops.values():
            if lp.tb is not None:
                lp.tb.close()
        model, objective, optimizer, schedule, (x, y) = parts
        with torch.no_grad():
            _, terms = objective(model, x, y)
        values = {"loss": 0.0, **{t: 0.0 for t in terms}}
        writer = _writer_parts(values, optimizer, tmp / shape / label / "parts")
        step_cpu = statistics.median(cpu["off"])
        entry = {"label": label, "kind": s.kind, "model": s.model, "batch": s.batch, "steps_per_rep": steps,
                 "reps": reps, "terms": sorted(values), "step_s": _stats(times["off"]),
                 "step_cpu_s": _stats(cpu["off"]), "times_s": times, "cpu_s": cpu, "in_loop": {}, "writer": writer,
                 "modelled": {}}
        for v in names[1:]:
            per = [a / b for a, b in zip(times[v], times["off"])]
            per_cpu = [a / b for a, b in zip(cpu[v], cpu["off"])]
            entry["in_loop"][v] = {"ratio": _stats(per), "overhead": statistics.median(per) - 1.0,
                                   "cpu_ratio": _stats(per_cpu), "cpu_overhead": statistics.median(per_cpu) - 1.0}
        for k in INTERVAL_LADDER:  # CPU time over CPU time: what a busy machine does to both cancels
            entry["modelled"][str(k)] = (writer["no_point_cpu_s"] + writer["point_cpu_s"] / k) / step_cpu
        log(f"[bench] {shape}/{label}: step {statistics.median(times['off']) * 1e3:.1f} ms wall, {step_cpu * 1e3:.1f} "
            f"ms CPU; writer {writer['point_cpu_s'] * 1e6:.0f} us CPU a point, {writer['no_point_cpu_s'] * 1e6:.1f} us "
            "a step without; in the loop " + ", ".join(f"{v} {e['overhead'] * 100:+.2f}% wall, "
                                                       f"{e['cpu_overhead'] * 100:+.2f}% CPU"
                                                       for v, e in entry["in_loop"].items()))
        out["steps"].append(entry)
    return out


def recommend(result: dict, target: float = TARGET) -> dict:
    """The smallest interval of INTERVAL_LADDER whose modelled overhead is under target for every measured step."""
    worst = {str(k): max(e["modelled"][str(k)] for sh in result["shapes"].values() for e in sh["steps"])
             for k in INTERVAL_LADDER}
    best = next((k for k in INTERVAL_LADDER if worst[str(k)] < target), INTERVAL_LADDER[-1])
    return {"target": target, "interval": best, "worst_modelled_overhead": worst,
            "default": StageRuntime.tb_every}


def run_tensorboard(shapes: Sequence[str] = ("tiny",), device: str = "cpu", reps: int = 9, steps: int = 8,
                    intervals: Sequence[int] = (1,), threads: int = 1, out_dir: Optional[str | Path] = None,
                    command: str = "", write: bool = True, only: Optional[Sequence[str]] = None,
                    log=print) -> Tuple[dict, Optional[Path]]:
    """Measure the writer's cost at `shapes`; returns (result, path of the JSON written)."""
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    amp = "bf16" if dev.type == "cuda" else "none"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    result = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command,
              "device": {"key": device_key(dev.type, name), "type": dev.type, "name": name,
                         "threads": torch.get_num_threads(), "amp": amp, "cpu_count": os.cpu_count()},
              "torch": torch.__version__, "python": sys.version.split()[0], "host": platform.node(),
              "git_commit": git_commit(), "load_avg_start": _loadavg(),
              "options": {"shapes": list(shapes), "reps": reps, "steps_per_rep": steps, "intervals": list(intervals),
                          "only": list(only or STEPS)},
              "import_s": _import_s(), "shapes": {}}
    log(f"[bench] TensorBoard writer cost: {name}, {torch.get_num_threads()} thread(s), load average "
        f"{result['load_avg_start']}; importing torch.utils.tensorboard took {result['import_s']} s")
    try:
        with tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp:
            for shape in shapes:
                result["shapes"][shape] = bench_shape(shape, dev, amp, reps, steps, intervals, Path(tmp),
                                                      only or STEPS, log)
    finally:
        torch.set_num_threads(threads_before)
    result["load_avg_end"] = _loadavg()
    result["recommendation"] = recommend(result)
    path = None
    if write:
        d = bench_dir(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"tensorboard-{result['device']['key']}-{result['created'].replace(':', '')}.json"
        tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp_path.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp_path, path)
        path.with_suffix(".md").write_text(markdown(result))
    return result, path


def markdown(r: dict) -> str:
    rec = r["recommendation"]
    lines = [f"# TensorBoard writer cost: {r['device']['name']} ({r['device']['key']}), {r['created']}", "",
             f"{r['device']['threads']} thread(s), torch {r['torch']}; load average {r['load_avg_start']} at the "
             f"start, {r['load_avg_end']} at the end. Command: `{r['command'] or 'harness.bench.tblog'}`", "",
             "In the loop: train.train_one_epoch over one batch repeated, without a writer and with one every k "
             "steps, interleaved; overhead = the median over repetitions of the paired ratio (with / without) - 1, "
             "of wall time and of this process's CPU time; off_again, a second loop without a writer, is the A/A "
             "control: its \"overhead\" is the measurement's noise (large on a busy machine). By parts: the "
             "writer's own time, many calls in isolation: CPU time of a point (every thread: the writer thread's "
             "serialising, checksumming and writing included), of the calling thread alone, and of a step that "
             "writes none; modelled overhead of interval k = (CPU a step without + CPU a point / k) / CPU time of "
             "a step.", "",
             f"Importing torch.utils.tensorboard in a fresh interpreter: {r['import_s']:.2f} s wall (once per "
             "process, before training starts)." if r.get("import_s") is not None else "", ""]
    for shape, sh in r["shapes"].items():
        lines += [f"## {shape}", "", "| step | batch | ms a step: wall (min-max) / CPU | reps x steps | in the loop: "
                  "overhead, wall (ratio min-max) / CPU | writer: us CPU a point / us calling thread / us CPU a step "
                  "without / ms to open | bytes a point | modelled overhead k=1 / 5 / 20 |",
                  "|---|---:|---|---|---|---|---:|---|"]
        for e in sh["steps"]:
            st, w = e["step_s"], e["writer"]
            loop = "; ".join(f"{v.replace('every_', 'k=')}: {x['overhead'] * 100:+.2f}% ({x['ratio']['min']:.3f}-"
                             f"{x['ratio']['max']:.3f}) / {x['cpu_overhead'] * 100:+.2f}%"
                             for v, x in e["in_loop"].items())
            mod = " / ".join(f"{e['modelled'][k] * 100:.3f}%" for k in ("1", "5", "20"))
            lines.append(f"| {e['label']} | {e['batch']} | {st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-"
                         f"{st['max'] * 1e3:.1f}) / {e['step_cpu_s']['median'] * 1e3:.1f} | {e['reps']} x "
                         f"{e['steps_per_rep']} | {loop} | {w['point_cpu_s'] * 1e6:.0f} / "
                         f"{w['point_main_thread_s'] * 1e6:.0f} / {w['no_point_cpu_s'] * 1e6:.1f} / "
                         f"{w['open_s'] * 1e3:.1f} | {w['bytes_per_point']:.0f} | {mod} |")
        lines.append("")
    worst = ", ".join(f"k={k}: {v * 100:.3f}%" for k, v in rec["worst_modelled_overhead"].items())
    lines += [f"Smallest run.tb_every under {rec['target'] * 100:.0f}% of every measured step (modelled): "
              f"**{rec['interval']}** (the worst step: {worst}). run.tb_every's default (harness/core/spec.py): "
              f"{rec['default']}.", ""]
    return "\n".join(lines)
