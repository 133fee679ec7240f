"""`python -m harness.bench` -- the measured cost of every step the harness runs, against the FLOP model, the official
full-teacher step and the hardware's matmul peak.

    python -m harness.bench --quick                 # tiny + smoke shapes, a few steps (CI, well under a minute)
    python -m harness.bench                         # + paper shapes (ViT-B/16 student, ViT-L/16 teacher, 224x224;
                                                    #   batch 4 on a CPU): minutes
    python -m harness.bench --shapes paper --steps 5 --batch 8 --threads 1
    python -m harness.bench --device cuda           # bf16 autocast, the profiles' batch sizes (paper: 128)
    python -m harness.bench --shapes paper --only mae_m75,dmae_partial_m75 --ablate fused_off,compile,adamw_fused
    python -m harness.bench --tensorboard           # the TensorBoard writer's cost per step (harness.bench.tblog)

Steps (real objectives, forward + backward + AdamW step where they train; evaluation is forward only):

    mae_m75            MAE pre-training of the student (75% masking)
    dmae_partial_m75   DMAE pre-training, teacher run up to its deepest aligned block on the visible patches
    dmae_full_m75      DMAE with the official code's teacher cost: every block + its decoder (output unused)
    dmae_partial_m95/98  DMAE at 95% / 98% masking
    finetune           fine-tuning (Mixup/CutMix, drop path as in the profile)
    finetune_kd        fine-tuning with KD from the fine-tuned teacher (teacher forward on the full image)
    eval               evaluation forward
    teacher_*          the teacher's own MAE pre-training / fine-tuning / evaluation (profiles that train it)

For each: images/s (median of the timed repetitions after warm-up, with min-max), FLOPs per image (one step,
forward + backward, counted by torch.utils.flop_counter.FlopCounterMode), the achieved FLOP/s and its fraction of a
square-matmul peak timed in the same loop (fp32 on CPU, bf16 on GPU). All steps of a shape (and the matmul) are
timed interleaved -- repetition r runs every variant once, in a rotated order -- so machine noise hits them alike,
and ratios are medians of per-repetition ratios. The input pipeline (pretrain / finetune / eval transforms on
Fashion-MNIST) is timed separately. On a CPU each profile's steps run with its run.threads (--threads overrides).
Results: <out>/<device>-<date>.json and .md (default results/bench/, or $DMAE_BENCH_DIR); harness.bench.estimate turns
the latest of them into --dry-run cost estimates. Timings are only as quiet as the machine: the files record the
load average; on a shared 2-core machine, 2 OpenMP threads per process collapse (use --threads 1 there).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from harness.bench.results import DEFAULT_DIR, markdown, targets
from harness.bench.run import run
from harness.bench.spec import ALL_SHAPES, QUICK_SHAPES
from harness.bench.steps import ABLATIONS
from harness.core.lazy import lazy

bench_tblog = lazy("harness.bench.tblog")  # --tensorboard only: it imports the training loop


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny + smoke shapes, 3 repetitions, 1 warm-up, batch at "
                                                        "most 32 (CI)")
    p.add_argument("--shapes", help=f"comma-separated, of {', '.join(ALL_SHAPES)} (default: all; --quick: tiny,smoke)")
    p.add_argument("--steps", type=int, help="timed repetitions per step (default 10; paper on CPU 3; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (>= 1): the first FLOP-counted, the last "
                                              "sizing the repetitions (default 2; paper on CPU 1; GPU 5; --quick 1)")
    p.add_argument("--batch", type=int, help="one batch size for every step (default: the profiles'; paper on CPU 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (cuda: bf16 autocast)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: each profile's run.threads, "
                                                         "else torch's default)")
    p.add_argument("--out", help=f"output directory (default ${{DMAE_BENCH_DIR}} or {DEFAULT_DIR})")
    p.add_argument("--only", help="comma-separated step labels to measure (e.g. mae_m75,dmae_partial_m75)")
    p.add_argument("--ablate", default="", help=f"extra variants of the --ablate-on steps: {', '.join(ABLATIONS)}")
    p.add_argument("--ablate-on", default="mae_m75,finetune", help="steps the ablations apply to")
    p.add_argument("--breakdown", action="store_true", help="profile one step of each: forward/backward/optimizer "
                                                            "times and op-category shares")
    p.add_argument("--no-data", action="store_true", help="skip the input-pipeline measurement")
    p.add_argument("--data-images", type=int, help="images per input-pipeline measurement (default 512; quick 256)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--render", metavar="JSON", help="rewrite the Markdown summary of a benchmark JSON and exit")
    p.add_argument("--tensorboard", action="store_true",
                   help="instead: the TensorBoard writer's cost in the training loop and by parts, and the per-step "
                        "interval under 1%% of a step (harness.bench.tblog; default tiny shapes, 9 repetitions, "
                        "1 thread; --quick: smoke, 3)")
    p.add_argument("--tb-steps", type=int, default=8, help="--tensorboard: training steps per repetition")
    p.add_argument("--tb-intervals", default="1", help="--tensorboard: the writer's intervals timed in the loop")
    args = p.parse_args(argv)
    command = "python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.tensorboard:
        result, path = bench_tblog.run_tensorboard(
            args.shapes.split(",") if args.shapes else ["smoke" if args.quick else "tiny"],
            device="cpu" if args.device == "auto" else args.device, reps=args.steps or (3 if args.quick else 9),
            steps=args.tb_steps, intervals=[int(k) for k in args.tb_intervals.split(",") if k],
            threads=args.threads or 1, out_dir=args.out, command=command, write=not args.no_write,
            only=args.only.split(",") if args.only else None)
        print()
        print(bench_tblog.markdown(result))
        if path:
            print(f"wrote {path} and {path.with_suffix('.md')}")
        return 0
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        result["targets"] = targets(result)
        path.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return 0
    shapes = args.shapes.split(",") if args.shapes else list(QUICK_SHAPES if args.quick else ALL_SHAPES)
    bad = [s for s in shapes if s not in ALL_SHAPES]
    ablate = [a for a in args.ablate.split(",") if a]
    bad += [a for a in ablate if a not in ABLATIONS]
    if bad:
        p.error(f"unknown shape or ablation: {', '.join(bad)}")
    steps = args.steps or (3 if args.quick else None)
    batch_cap = 32 if args.quick and not args.batch else None  # quick: tiny's 128-image batches take too long
    result, path = run(shapes, device=args.device, steps=steps, warmup=args.warmup if args.warmup is not None
                       else (1 if args.quick else None), batch=args.batch, batch_cap=batch_cap, out_dir=args.out,
                       data=not args.no_data, data_images=args.data_images or (256 if args.quick else 512),
                       only=args.only.split(",") if args.only else None, ablate=ablate,
                       ablate_on=args.ablate_on.split(","), breakdown=args.breakdown, threads=args.threads,
                       command=command,
                       write=not args.no_write)
    print()
    print(markdown(result))
    if path:
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0

