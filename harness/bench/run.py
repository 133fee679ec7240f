"""A benchmark run: every shape's steps built, FLOP-counted and timed against the same-run matmul peak, the input
pipelines timed, and the result written as <out>/<device>-<date>.json and .md."""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import timm
import torch
from timm.layers import use_fused_attn

from harness.core.data import FASHION_MNIST_DIR
from harness.core.runtime import resolve_amp, resolve_device
from harness.core.rundir import git_commit
from harness.bench.data import bench_data
from harness.bench.measure import Variant, measure, peak_step, ratio, stats
from harness.bench.results import RATIOS, SCHEMA, bench_dir, cpu_name, device_key, markdown, targets
from harness.bench.spec import profile_cfg, profile_steps
from harness.bench.steps import ABLATIONS, Pool, build_step


def device_info(device: torch.device, amp: str) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"key": device_key(device.type, name), "type": device.type, "name": name,
            "threads": torch.get_num_threads(), "dtype": "bf16" if amp == "bf16" else "fp32", "amp": amp,
            "cpu_count": os.cpu_count()}


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_shape(shape: str, device: torch.device, amp: str, reps: int, warmup: int, batch: Optional[int],
              batch_cap: Optional[int], only: Optional[Sequence[str]], ablate: Sequence[str],
              ablate_on: Sequence[str], breakdown: bool,
              target_rep_s: float, peak_n: int, log=print) -> dict:
    steps = profile_steps(shape, batch, device.type, batch_cap)
    if only:
        steps = [(lab, s) for lab, s in steps if lab in only]
    pool = Pool(device)
    # DMAE steps first: the MAE step then shares their student (with its unused distillation head)
    order = sorted(steps, key=lambda ls: ls[1].kind != "dmae")
    built = {lab: build_step(pool, s, amp) for lab, s in order}
    variants = [Variant(lab, s, built[lab]) for lab, s in steps]
    for lab, s in steps:
        if lab not in ablate_on:
            continue
        for a in ablate:
            opts = dict(ABLATIONS[a])
            if "optimizer" in opts and not s.trains:
                continue
            variants.append(Variant(f"{lab}+{a}", s, build_step(pool, s, amp, opts), options=opts))
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    # a single short matmul is hit harder by a busy machine than a long step: give it >= 1 s per repetition
    peak = Variant("matmul_peak", None, peak_step(device, dtype, peak_n), target_s=max(target_rep_s, 1.0))
    peak.flops = 2.0 * peak_n ** 3
    variants.append(peak)
    log(f"[bench] shape {shape}: {len(variants) - 1} steps + a {peak_n}^2 {str(dtype).replace('torch.', '')} "
        f"matmul, {reps} repetitions")
    t0 = time.perf_counter()
    measure(variants, device, reps, warmup, target_rep_s, breakdown, log)
    peak_med = peak.flops / statistics.median(peak.times)
    entries = []
    for v in variants:
        if v.spec is None:
            continue
        s = v.spec
        step_s = stats(v.times)
        fpi = v.flops / v.step.images
        ach = fpi * v.step.images / step_s["median"]
        e = {"id": f"{shape}/{v.label}", "shape": shape, "label": v.label, "options": v.options,
             "spec": asdict(s), "trains": s.trains, "batch": s.batch, "visible": s.visible(),
             "teacher_blocks_run": s.teacher_blocks_run(),
             "flops_per_image": fpi, "flops_by_op_per_image": {k: f / v.step.images for k, f in v.flops_by_op.items()},
             "step_s": step_s, "s_per_image": step_s["median"] / v.step.images,
             "images_per_s": {"median": v.step.images / step_s["median"], "min": v.step.images / step_s["max"],
                              "max": v.step.images / step_s["min"]},
             "achieved_flops_per_s": ach, "peak_fraction": ach / peak_med,
             "peak_fraction_of_best": ach / (peak.flops / min(peak.times)),
             "threads": torch.get_num_threads(), "reps": len(v.times), "calls_per_rep": v.inner,
             "times_s": v.times, "warmup_s": v.warmup_s}
        if v.phases:
            e["phases_s"] = v.phases
        if v.breakdown:
            tot = sum(v.breakdown.values())
            e["op_time_share"] = {k: t / tot for k, t in sorted(v.breakdown.items(), key=lambda kv: -kv[1])}
        entries.append(e)
    by = {v.label: v for v in variants}
    ratios = {name: ratio(by[a], by[b]) for name, a, b in RATIOS if a in by and b in by}
    for v in variants:
        if v.options and v.label.split("+")[0] in by:
            ratios[f"{v.label}_over_default"] = ratio(v, by[v.label.split("+")[0]])
    out = {"shape": shape, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
           "load_avg_end": _loadavg(),
           "peak": {"n": peak_n, "dtype": str(dtype).replace("torch.", ""), "flops": peak.flops,
                    "flops_per_s": {"median": peak_med, "min": peak.flops / max(peak.times),
                                    "max": peak.flops / min(peak.times)},
                    "times_s": peak.times, "calls_per_rep": peak.inner},
           "steps": entries, "ratios": ratios}
    del variants, built, pool, by
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run(shapes: Sequence[str], device: str = "auto", steps: Optional[int] = None, warmup: Optional[int] = None,
        batch: Optional[int] = None, batch_cap: Optional[int] = None, out_dir: Optional[str | Path] = None,
        data: bool = True,
        data_images: int = 512, only: Optional[Sequence[str]] = None, ablate: Sequence[str] = (),
        ablate_on: Sequence[str] = ("mae_m75", "finetune"), breakdown: bool = False, threads: int = 0,
        target_rep_s: Optional[float] = None, peak_n: Optional[int] = None, command: str = "",
        write: bool = True, log=print) -> Tuple[dict, Optional[Path]]:
    """Benchmark `shapes`; returns (result dict, path of the JSON written)."""
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(shapes, device, steps, warmup, batch, batch_cap, out_dir, data, data_images, only, ablate,
                    ablate_on, breakdown, target_rep_s, peak_n, command, write, log, threads, threads_before)
    finally:
        torch.set_num_threads(threads_before)


def _run(shapes, device, steps, warmup, batch, batch_cap, out_dir, data, data_images, only, ablate, ablate_on,
         breakdown, target_rep_s, peak_n, command, write, log, threads, default_threads
         ) -> Tuple[dict, Optional[Path]]:
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = resolve_amp("auto", dev)
    info = device_info(dev, amp)
    result = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": info,
              "command": command, "torch": torch.__version__, "timm": timm.__version__,
              "python": sys.version.split()[0], "host": platform.node(), "git_commit": git_commit(),
              "timm_fused_attn": use_fused_attn(), "load_avg_start": _loadavg(),
              "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                 "MKL_NUM_THREADS", "TIMM_FUSED_ATTN") if k in os.environ},
              "options": {"shapes": list(shapes), "steps": steps, "warmup": warmup, "batch": batch,
                          "batch_cap": batch_cap,
                          "only": list(only or []), "ablate": list(ablate), "ablate_on": list(ablate_on)},
              "shapes": {}, "data": []}
    log(f"[bench] {info['name']} ({info['key']}, {info['threads']} threads, {info['dtype']}), torch {torch.__version__}"
        f", timm fused attention {'on' if use_fused_attn() else 'off'}; load average {result['load_avg_start']}")
    for shape in shapes:
        big = shape == "paper"
        reps = steps or (3 if big and dev.type == "cpu" else 10)
        wu = warmup if warmup is not None else (5 if dev.type == "cuda" else 1 if big else 2)
        trs = target_rep_s if target_rep_s is not None else (0.05 if dev.type == "cpu" else 0.2)
        n = peak_n or (2048 if dev.type == "cpu" else 8192)
        # CPU: the threads the profile's stages run with (run.threads; 0 = torch's default), unless --threads
        shape_threads = threads or (int(profile_cfg(shape)["run"].get("threads") or 0) if dev.type == "cpu" else 0)
        torch.set_num_threads(shape_threads or default_threads)
        result["shapes"][shape] = run_shape(shape, dev, amp, reps, wu, batch, batch_cap, only, ablate, ablate_on,
                                            breakdown, trs, n, log)
    torch.set_num_threads(threads or default_threads)
    if data:
        result["data"] = bench_data(shapes, data_images, FASHION_MNIST_DIR, threads, log)
    result["load_avg_end"] = _loadavg()
    result["targets"] = targets(result)
    path = None
    if write:
        d = bench_dir(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        stamp = result["created"].replace(":", "")
        path = d / f"{info['key']}-{stamp}.json"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
        path.with_suffix(".md").write_text(markdown(result))
    return result, path
