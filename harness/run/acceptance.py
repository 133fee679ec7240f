"""`python -m harness.run.acceptance` -- the acceptance check for the day a GPU machine is at hand: one command, about
ten minutes on one GPU, that runs what the paper-scale run will run, on CUDA with bf16 autocast, and writes a short
summary.

    python -m harness.run.acceptance                  # one GPU: CUDA, bf16 (run.device=cuda run.amp=bf16)
    python -m harness.run.acceptance --cpu            # the same three parts on CPU in fp32, smallest settings (CI)
    python -m harness.run.acceptance --out DIR        # default results/acceptance/<device>-<time>

Three parts, each a command of the harness run as it would be run by hand (a subprocess; its output in
<out>/logs/<part>.log):

  1. smoke      the smoke graph, every stage of table2 (teacher, MAE / KD / DMAE / scratch rows, evaluations, probes)
                and its report, through the local launcher (submitit jobs):
                  python -m harness.reproduce table2 profile=smoke launcher.gpus_per_node=1 run.device=cuda
                      run.amp=bf16
  2. rehearsal  the paper run's rehearsal: ViT-L/16 -> ViT-B/16 at 224 px, random official-format teachers, a small
                ImageFolder written from Fashion-MNIST, a few steps per stage (harness.run.rehearse; --cpu: the smoke
                profile's rehearsal, as the paper shapes take too long on a CPU):
                  python -m harness.reproduce table2 profile=paper launcher.gpus_per_node=1 run.device=cuda
                      run.amp=bf16 --rehearse --rehearse-batch 32 --rehearse-steps 4
  3. bench      the benchmark's DMAE pre-training step (harness.bench: dmae_partial_m75, paper shapes, batch 128
                per GPU; --cpu: smoke shapes), its images/s, achieved FLOP/s and MFU (model FLOPs utilisation: of the
                bf16 matmul peak the benchmark measures on this device, and of the datasheet's dense bf16 peak when the
                device is a known one)

Checks: each command exits 0; every planned stage finished, on the asked device and precision (each result.json's
device and runtime.amp); the reports were written and the rehearsal report has no unfinished stage; the benchmark
measured the step. Within the time budget (--budget-min, default 10): a part that would run past it is stopped and
fails. Writes <out>/acceptance.md and <out>/acceptance.json; prints the summary; exit code 0 when every check
passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from harness.core.lazy import lazy
from harness.core.rundir import read_manifest, read_result  # standard library only

torch = lazy("torch")  # --help and --cpu's driver need no torch

ROOT = Path(__file__).resolve().parents[2]  # harness/run/acceptance.py -> the repository
TABLE = "table2"
# Datasheet dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins (the H100 PCIe and NVL before the SXM). MFU against these is the usual figure; against the
# measured matmul peak it is what this device can reach at all.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("GH200", 989e12), ("A100", 312e12))


def datasheet_peak(name: str) -> Optional[float]:
    return next((peak for key, peak in DATASHEET_BF16 if key in name), None)


class Part:
    """One part's command, outcome and the facts its checks found."""

    def __init__(self, name: str, cmd: List[str]):
        self.name, self.cmd = name, cmd
        self.rc: Optional[int] = None
        self.wall_s = 0.0
        self.problems: List[str] = []
        self.facts: Dict[str, object] = {}

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.problems

    def as_dict(self) -> dict:
        return {"part": self.name, "ok": self.ok, "command": " ".join(self.cmd), "rc": self.rc,
                "wall_s": round(self.wall_s, 1), "problems": self.problems, **self.facts}


def run_part(part: Part, log: Path, timeout_s: float) -> None:
    """Run the part's command (cwd: the repository), its output to `log`; stopped after timeout_s."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[acceptance] {part.name}: {' '.join(part.cmd)}  (log: {log}, at most {timeout_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(part.cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            part.rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)  # the command and the jobs it started (same session)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            part.rc = -1
            part.problems.append(f"stopped after {timeout_s:.0f} s: past the time budget")
    part.wall_s = time.perf_counter() - t0
    if part.rc not in (0, -1):
        part.problems.append(f"exit code {part.rc}; last lines of {log}:\n" + _tail(log))
    print(f"[acceptance] {part.name}: exit {part.rc} after {part.wall_s:.0f} s", flush=True)


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def check_stages(part: Part, stage_dirs: List[Path], device: str, amp: str) -> List[dict]:
    """Every stage finished (result.json), on `device` with run.amp `amp`; returns the results."""
    results, unfinished, elsewhere = [], [], []
    for d in stage_dirs:
        r = read_result(d)
        if r is None:
            unfinished.append(d.name)
            continue
        got = (r.get("device"), (r.get("runtime") or {}).get("amp"))
        if got != (device, amp):
            elsewhere.append(f"{d.name} ({got[0]}, amp {got[1]})")
        results.append(r)
    if not stage_dirs:
        part.problems.append("no stage was planned (no manifest.json)")
    if unfinished:
        part.problems.append(f"{len(unfinished)} of {len(stage_dirs)} stages did not finish (no result.json): "
                             f"{', '.join(unfinished[:3])}{' ...' if len(unfinished) > 3 else ''}")
    if elsewhere:
        part.problems.append(f"{len(elsewhere)} stage(s) ran elsewhere than on {device} with amp {amp}: "
                             f"{', '.join(elsewhere[:3])}{' ...' if len(elsewhere) > 3 else ''}")
    part.facts["planned"] = len(stage_dirs)
    return results


def planned(root: Path) -> List[Path]:
    """The stage directories a run's manifest lists (results/<table>/<profile>/manifest.json)."""
    manifest = read_manifest(root)
    return [root / sid for sid in manifest["stages"]] if manifest else []


def smoke_checks(part: Part, results: Path, reports: Path, device: str, amp: str) -> None:
    rs = check_stages(part, planned(results / TABLE / "smoke"), device, amp)
    report = reports / f"{TABLE}.smoke.md"
    if not report.is_file():
        part.problems.append(f"report {report} not written")
    part.facts.update(stages=len(rs), report=str(report),
                      device_name=next((r.get("device_name") for r in rs), None))


def rehearsal_checks(part: Part, results: Path, reports: Path, profile: str, device: str, amp: str) -> None:
    root = results / "rehearsal" / TABLE / profile
    rs = check_stages(part, planned(root), device, amp)
    report = reports / "rehearsal" / f"{TABLE}.{profile}.md"
    estimate = None
    if not report.is_file():
        part.problems.append(f"rehearsal report {report} not written")
    else:
        text = report.read_text()
        if "not done" in text:
            part.problems.append(f"the rehearsal report {report} lists stages that did not finish")
        estimate = next((line.replace("**", "").strip() for line in text.splitlines()
                         if line.startswith("**Estimated total")), None)
    steps = [r for r in rs if r.get("step_s")]
    part.facts.update(profile=profile, stages=len(rs), report=str(report), full_run_estimate=estimate,
                      peak_mem_mb=max((r.get("peak_mem_mb") or 0 for r in rs), default=None),
                      slowest_step=max(((r["step_s"], r["stage_id"]) for r in steps), default=None))


def bench_checks(part: Part, out: Path, shape: str, label: str) -> None:
    files = sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        part.problems.append(f"the benchmark wrote no result under {out}")
        return
    res = json.loads(files[-1].read_text())
    sh = res["shapes"].get(shape) or {}
    e = next((x for x in sh.get("steps", []) if x["label"] == label), None)
    if e is None:
        part.problems.append(f"the benchmark has no {shape}/{label} step ({files[-1]})")
        return
    name = res["device"]["name"]
    sheet = datasheet_peak(name) if res["device"]["type"] == "cuda" else None
    part.facts.update(result=str(files[-1]), device_name=name, dtype=res["device"]["dtype"], batch=e["batch"],
                      images_per_s=e["images_per_s"]["median"], achieved_tflops=e["achieved_flops_per_s"] / 1e12,
                      measured_peak_tflops=sh["peak"]["flops_per_s"]["median"] / 1e12,
                      mfu_of_measured_peak=e["peak_fraction"],
                      datasheet_peak_tflops=sheet / 1e12 if sheet else None,
                      mfu_of_datasheet_peak=e["achieved_flops_per_s"] / sheet if sheet else None)


def _flops(tflops: float) -> str:
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary(parts: List[Part], args, device: str, amp: str, total_s: float) -> str:
    ok = all(p.ok for p in parts)
    lines = [f"# Acceptance: {'PASS' if ok else 'FAIL'}", "",
             f"- device {device}, amp {amp}{' (--cpu: smallest settings)' if args.cpu else ''}; "
             f"{total_s:.0f} s of the {args.budget_min:g} min budget", f"- output: `{args.out}`", "",
             "| part | result | wall (s) | command |", "|---|---|---:|---|"]
    for p in parts:
        lines.append(f"| {p.name} | {'pass' if p.ok else '**FAIL**'} | {p.wall_s:.0f} | `{' '.join(p.cmd)}` |")
    lines.append("")
    for p in parts:
        f = p.facts
        if p.name == "smoke":
            lines.append(f"- smoke: {f.get('stages', 0)} of {f.get('planned', 0)} stages done on "
                         f"{f.get('device_name') or device}; report `{f.get('report')}`")
        elif p.name == "rehearsal":
            slow = f.get("slowest_step")
            lines.append(f"- rehearsal ({f.get('profile')} profile): {f.get('stages', 0)} of {f.get('planned', 0)} "
                         f"stages done; peak memory "
                         f"{_fmt(f.get('peak_mem_mb'), ',.0f')} MiB; slowest step "
                         f"{_fmt(slow[0] if slow else None, '.3f')} s ({slow[1] if slow else '-'}); "
                         f"{f.get('full_run_estimate') or 'no estimate'}; report `{f.get('report')}`")
        elif p.name == "bench" and "images_per_s" in f:
            sheet = (f"; MFU {f['mfu_of_datasheet_peak'] * 100:.1f}% of the datasheet's dense bf16 peak "
                     f"({_flops(f['datasheet_peak_tflops'])})") if f.get("mfu_of_datasheet_peak") else ""
            lines.append(f"- bench, DMAE step ({f['device_name']}, {f['dtype']}, batch {f['batch']}): "
                         f"{f['images_per_s']:.1f} images/s, {_flops(f['achieved_tflops'])} achieved; **MFU "
                         f"{f['mfu_of_measured_peak'] * 100:.1f}%** of the measured matmul peak "
                         f"({_flops(f['measured_peak_tflops'])}){sheet}")
        for prob in p.problems:
            lines.append(f"- **{p.name}: {prob.splitlines()[0]}**")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.run.acceptance", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cpu", action="store_true", help="CPU, fp32, smallest settings (what CI runs)")
    p.add_argument("--out", type=Path, help="output directory (default results/acceptance/<device>-<time>)")
    p.add_argument("--budget-min", type=float, default=10.0, help="time budget for all three parts (default 10)")
    args = p.parse_args(argv)
    device, amp = ("cpu", "none") if args.cpu else ("cuda", "bf16")
    if not args.cpu:
        if not torch.cuda.is_available():
            p.error("no CUDA device here: run it on the GPU machine, or use --cpu")
    args.out = (args.out or ROOT / "results" / "acceptance" / f"{device}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    results, reports, logs = args.out / "results", args.out / "reports", args.out / "logs"
    py = [sys.executable, "-m"]
    common = [f"results_root={results}", f"reports_dir={reports}", f"run.device={device}", f"run.amp={amp}"]
    gpu = [] if args.cpu else ["launcher.gpus_per_node=1"]  # the local launcher shows a job only the GPUs it asks
    if args.cpu:
        rehearsal_profile, rehearse = "smoke", ["--rehearse-steps", "2", "--rehearse-batch", "16"]
        bench_shape, bench = "smoke", ["--steps", "2", "--warmup", "1", "--threads", "1"]
    else:
        rehearsal_profile, rehearse = "paper", ["--rehearse-steps", "4", "--rehearse-batch", "32"]
        bench_shape, bench = "paper", ["--steps", "5"]
    label = "dmae_partial_m75"
    plan: List[tuple] = [
        (Part("smoke", py + ["harness.reproduce", TABLE, "profile=smoke", "run.quiet=true", *gpu, *common]),
         lambda part: smoke_checks(part, results, reports, device, amp), 0.35),
        (Part("rehearsal", py + ["harness.reproduce", TABLE, f"profile={rehearsal_profile}", "run.quiet=true", *gpu,
                                 *common, "--rehearse", *rehearse]),
         lambda part: rehearsal_checks(part, results, reports, rehearsal_profile, device, amp), 0.5),
        (Part("bench", py + ["harness.bench", "--shapes", bench_shape, "--only", label, "--device", device,
                             "--no-data", "--out", str(args.out / "bench"), *bench]),
         lambda part: bench_checks(part, args.out / "bench", bench_shape, label), 0.15),
    ]
    budget = 60.0 * args.budget_min
    t0 = time.perf_counter()
    parts = []
    for i, (part, check, share) in enumerate(plan):
        left = budget - (time.perf_counter() - t0)
        later = sum(s for _, _, s in plan[i + 1:]) * budget  # what the later parts are owed
        run_part(part, logs / f"{part.name}.log", max(30.0, left - later if i + 1 < len(plan) else left))
        check_part: Callable[[Part], None] = check
        check_part(part)
        parts.append(part)
    total = time.perf_counter() - t0
    text = summary(parts, args, device, amp, total)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acceptance.md").write_text(text)
    (args.out / "acceptance.json").write_text(json.dumps(
        {"ok": all(x.ok for x in parts), "device": device, "amp": amp, "cpu": args.cpu, "wall_s": round(total, 1),
         "budget_s": budget, "parts": [x.as_dict() for x in parts]}, indent=2) + "\n")
    print(text, flush=True)
    for part in parts:
        for prob in part.problems:
            print(f"[acceptance] {part.name}: {prob}", flush=True)
    print(f"[acceptance] wrote {args.out / 'acceptance.md'} and acceptance.json", flush=True)
    return 0 if all(x.ok for x in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
