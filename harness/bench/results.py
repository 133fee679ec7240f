"""The benchmark's files: where they live, their schema, the device key they are filed under, reading them back
(harness.bench.estimate), the issue's targets judged on them and their Markdown summary. Standard library only (torch
just to name a GPU), so that --dry-run reads the files without importing torch."""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import List, Optional

from harness.core.lazy import lazy

torch = lazy("torch")  # only to name the GPU: reading results for a CPU plan stays free of torch

SCHEMA = 1
DEFAULT_DIR = "results/bench"
# the paired ratios a shape's result holds: (name, numerator step, denominator step)
RATIOS = (("dmae_over_mae", "dmae_partial_m75", "mae_m75"),
          ("partial_over_full_teacher", "dmae_partial_m75", "dmae_full_m75"),
          ("kd_over_finetune", "finetune_kd", "finetune"),
          ("m95_over_m75", "dmae_partial_m95", "dmae_partial_m75"),
          ("m98_over_m75", "dmae_partial_m98", "dmae_partial_m75"),
          ("mae_over_eval", "mae_m75", "eval"))


def bench_dir(path: Optional[str | Path] = None) -> Path:
    """Where benchmark files live: the argument, else $DMAE_BENCH_DIR, else results/bench."""
    return Path(path or os.environ.get("DMAE_BENCH_DIR") or DEFAULT_DIR)


# ---------------------------------------------------------------------------------------------------------------
# the device a file was measured on


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def device_key(device_type: str, name: str) -> str:
    """The key benchmarks of a device are filed under: cuda-<GPU name>, or cpu-<CPU name>-<cores>c."""
    return "cuda-" + _slug(name) if device_type == "cuda" else f"cpu-{_slug(name)}-{os.cpu_count()}c"


def current_device_key(device_type: str) -> Optional[str]:
    """The key this machine's benchmarks are filed under (None for cuda without a GPU)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return None
        return device_key("cuda", torch.cuda.get_device_name(0))
    return device_key("cpu", cpu_name())


# ---------------------------------------------------------------------------------------------------------------
# reading results back (harness.bench.estimate)


def load_results(directory: Optional[str | Path] = None) -> List[dict]:
    """Every benchmark JSON in the directory, oldest first (by their `created` stamp)."""
    d = bench_dir(directory)
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and r.get("schema") == SCHEMA and "device" in r:
            r["_path"] = str(p)
            out.append(r)
    return sorted(out, key=lambda r: r.get("created", ""))


# ---------------------------------------------------------------------------------------------------------------
# the targets and the Markdown summary


def _g(x: float) -> str:
    return f"{x / 1e9:.3g}"


def _of_best(entry: dict, shape: dict) -> float:
    return entry.get("peak_fraction_of_best") or entry["achieved_flops_per_s"] / shape["peak"]["flops_per_s"]["max"]


def targets(result: dict) -> List[dict]:
    """The issue's targets, judged on the paper shapes of this run (when they were measured)."""
    sh = result["shapes"].get("paper")
    if not sh:
        return []
    out = []
    r = sh["ratios"]
    if "dmae_over_mae" in r:
        d = r["dmae_over_mae"]
        dev = d["time_over_flops"] - 1.0
        out.append({"target": "DMAE/MAE step-time ratio within 5% of the FLOP ratio", "measured":
                    f"time {d['time']:.3f} vs FLOPs {d['flops']:.3f} ({dev * 100:+.1f}%)", "met": abs(dev) <= 0.05})
    if "partial_over_full_teacher" in r:
        d = r["partial_over_full_teacher"]
        faster = 1.0 - d["time"]
        out.append({"target": "partial teacher >= 15% faster than the full teacher (75% masking)", "measured":
                    f"{faster * 100:.1f}% less time per step (full/partial = {1 / d['time']:.3f}x; "
                    f"FLOPs {(1 - d['flops']) * 100:.1f}% fewer)", "met": faster >= 0.15})
    train = [e for e in sh["steps"] if e["trains"] and not e["options"]]
    if train:
        worst = min(train, key=lambda e: e["peak_fraction"])
        best = max(train, key=lambda e: e["peak_fraction"])
        lo, hi = min(_of_best(e, sh) for e in train), max(_of_best(e, sh) for e in train)
        out.append({"target": "training steps >= 50% of the same-run matmul peak", "measured":
                    f"{worst['peak_fraction'] * 100:.0f}% ({worst['label']}) to {best['peak_fraction'] * 100:.0f}% "
                    f"({best['label']}) of the median peak; {lo * 100:.0f}-{hi * 100:.0f}% of the best peak "
                    "repetition", "met": worst["peak_fraction"] >= 0.5})
    return out


def markdown(result: dict) -> str:
    dev = result["device"]
    lines = [f"# Benchmark: {dev['name']} ({dev['key']}), {result['created']}", "",
             f"{dev['threads']} threads, {dev['dtype']}, torch {result['torch']}, timm {result['timm']} "
             f"(fused attention {'on' if result['timm_fused_attn'] else 'off'}); load average "
             f"{result['load_avg_start']} at the start, {result.get('load_avg_end')} at the end.",
             f"Command: `{result['command'] or 'python -m harness.bench'}`", "",
             "Images/s: median of the timed repetitions (min-max). FLOPs: one step, forward + backward, counted by "
             "FlopCounterMode (matmuls, convolutions, attention). Peak: a square matmul timed in the same "
             "interleaved loop; % of peak against its median and its best repetition. Ratios: per image, the median "
             "of the per-repetition ratios (each repetition runs every step once), and the ratio of the fastest "
             "repetitions.", ""]
    for shape, sh in result["shapes"].items():
        pk = sh["peak"]
        lines += [f"## {shape}", "", f"{sh.get('threads', dev['threads'])} thread(s).",
                  f"Matmul peak ({pk['n']}^2 {pk['dtype']}): {_g(pk['flops_per_s']['median'])} GFLOP/s "
                  f"({_g(pk['flops_per_s']['min'])}-{_g(pk['flops_per_s']['max'])})", "",
                  "| step | batch | visible | images/s (min-max) | ms/image | GFLOP/image | GFLOP/s "
                  "| % of peak (median / best) |", "|---|---:|---:|---|---:|---:|---:|---:|"]
        for e in sh["steps"]:
            ips = e["images_per_s"]
            vis = e["visible"] if e["spec"]["kind"] in ("mae", "dmae") else "-"
            lines.append(f"| {e['label']} | {e['batch']} | {vis}"
                         f" | {ips['median']:.3g} ({ips['min']:.3g}-{ips['max']:.3g}) | {e['s_per_image'] * 1e3:.3g} "
                         f"| {_g(e['flops_per_image'])} | {_g(e['achieved_flops_per_s'])} "
                         f"| {e['peak_fraction'] * 100:.0f}% / {_of_best(e, sh) * 100:.0f}% |")
        if sh["ratios"]:
            lines += ["", "| ratio (per image) | time: median of paired repetitions (min-max) | time: fastest / "
                      "fastest | FLOPs | time / FLOPs |", "|---|---|---:|---:|---:|"]
            for name, r in sh["ratios"].items():
                lines.append(f"| {name} ({r['numerator']} / {r['denominator']}) | {r['time']:.3f} "
                             f"({r['time_min']:.3f}-{r['time_max']:.3f}) | {r['time_of_fastest']:.3f} "
                             f"| {r['flops']:.3f} | {r['time_over_flops']:.3f} |")
        bd = [e for e in sh["steps"] if e.get("op_time_share")]
        if bd:
            lines += ["", "Where the time goes (one step timed by phase, one forward + backward profiled for the "
                      "op shares: single samples, as noisy as the machine):", "",
                      "| step | forward / backward / optimizer (s) | op self-time shares (forward + backward) |",
                      "|---|---|---|"]
            for e in bd:
                ph = e.get("phases_s", {})
                shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in e["op_time_share"].items())
                fbo = " / ".join(f"{ph[k]:.3g}" for k in ("forward", "backward", "optimizer") if k in ph)
                lines.append(f"| {e['label']} | {fbo} | {shares} |")
        lines.append("")
    if result.get("data"):
        lines += ["## Input pipeline (one process; the profile's stages divide this cost by run.num_workers)", "",
                  "| profile | transform | size | RandAug | pipeline | threads | images/s | ms/image | per-image PIL "
                  "images/s (same images, same run) | speed-up | note |",
                  "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
        for d in result["data"]:
            pil = d.get("pil_images_per_s")
            pil_s, speedup = (f"{pil:.0f}", f"{d['speedup_vs_pil']:.0f}x") if pil else ("—", "—")
            lines.append(f"| {d['profile']} | {d['transform']} | {d['img_size']} | {d['randaug'] or '-'} "
                         f"| {d.get('pipeline', 'per-image PIL')} | {d.get('threads', '')} | {d['images_per_s']:.0f} "
                         f"| {d['s_per_image'] * 1e3:.3g} | {pil_s} | {speedup} | {d['note']} |")
        lines.append("")
    if result.get("targets"):
        lines += ["## Targets (paper shapes)", "", "| target | measured | met |", "|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)
