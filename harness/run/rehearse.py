"""`python -m harness.reproduce <table> ... --rehearse`: the same run with its real models, shapes, dtypes, data
path and launcher, but a handful of steps per stage on a few images, ending in a report marked REHEARSAL.

What changes, as overrides appended to the user's (everything else is the run as asked):

    results_root   <results_root>/rehearsal (its own stages; the real run's are never touched), seeds=1
    epochs         1 for every stage; per-device batch --rehearse-batch (default: the profile's); a section with
                   effective_batch keeps the accumulation its run derives, at most MAX_ACCUM (4)
    images         train: steps x batch x world per stage (at least two optimizer updates), test/validation: a few
    data           the user's data.root when given (its real layout and decoding); else, for an ImageFolder profile,
                   a small ImageFolder at the profile's image size written from Fashion-MNIST
    teachers       provided checkpoints when given; else official-format files with random weights (MAE's
                   {'model': state_dict}: the full MAE for a pre-trained teacher, the classifier for a fine-tuned one)

The report (<reports_dir>/rehearsal/<table>.<profile>.md) gives, per stage, the median step time and the peak memory
(CUDA max allocated, or the CPU process's peak resident set, on the busiest rank), and an estimate of the full run's
device-hours: each real stage's steps x the step time its rehearsal measured, scaled per image when the batch differs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from harness.core.arch import get_arch
from harness.plan.config import load_config
from harness.plan.resolve import world_size
from harness.bench.estimate import dataset_sizes
from harness.plan.graph import Plan, build_plan
from harness.core.rundir import read_result, write_text_atomic
from harness.core.spec import DataConfig, ModelConfig
from harness.core.lazy import lazy

# composing and reporting a rehearsal stay torch-free: torch where it writes data and checkpoints
torch = lazy("torch")
core_data = lazy("harness.core.data")
checkpoints = lazy("harness.core.checkpoints")
models = lazy("harness.core.models")

REHEARSAL = "rehearsal"
TEST_IMAGES = 8  # per rank: the evaluation stages and the per-epoch validation read this many images each
# a section with effective_batch rehearses the accumulation its run derives, up to this (the paper profile on 8 GPUs
# accumulates 4 in pre-training; on 1 GPU it would be 32, on 2 CPU ranks 16: 64 or 32 steps of ViT-L per stage)
MAX_ACCUM = 4


def compose(table: str, user: List[str], steps: int, batch: int):
    """(full_cfg, full_plan, cfg, plan, todo): the run as asked (with the rehearsal's data and checkpoints, for the
    device-hour estimate) and its rehearsal, both planned; todo: what prepare_inputs must write."""
    first = load_config(table, user, check=False)  # may lack data.root and teacher checkpoints: the rehearsal's
    generated_root = first.data.name == "imagefolder" and OmegaConf.is_missing(first.data, "root")
    inputs, sizes, todo = overrides(first, steps, batch, generated_root)
    full_cfg = load_config(table, user + inputs)
    cfg = load_config(table, user + inputs + sizes)
    return full_cfg, build_plan(full_cfg), cfg, build_plan(cfg), todo


def overrides(cfg: "DictConfig", steps: int, batch: int, write_data: bool) -> Tuple[List[str], List[str], dict]:
    """(input overrides: data root and teacher checkpoints the rehearsal provides; size overrides: epochs, batch,
    image counts, results root; todo) for the composed run `cfg`."""
    world = world_size(cfg.launcher)
    root = Path(str(cfg.results_root)).absolute() / REHEARSAL
    b = int(batch or 0)
    sizes = [f"results_root={root}", "seeds=1", "report=false"]
    batches = {}
    accum = 1
    sections = [("", cfg)] + ([("teacher.", cfg.teacher)] if cfg.teacher.train else [])
    for prefix, node in sections:
        for sec in ("pretrain", "finetune"):
            bs = b or int(node[sec].batch_size)
            batches[prefix + sec] = bs
            warm = float(node[sec].warmup_epochs) / max(1, int(node[sec].epochs))  # the same share of the one epoch
            sizes += [f"{prefix}{sec}.epochs=1", f"{prefix}{sec}.warmup_epochs={warm:g}",
                      f"{prefix}{sec}.batch_size={bs}"]
            real = int(node[sec].accum_iter)
            eff = node[sec].get("effective_batch")
            if eff:  # the real run's accumulation (derived from effective_batch at its batch size and world size),
                # at most MAX_ACCUM: accumulation is exercised, two updates of it stay a handful of steps
                per_step = int(node[sec].batch_size) * world
                real = eff // per_step if eff % per_step == 0 else real  # else the full run's config is refused
                real = min(real, MAX_ACCUM)
                sizes.append(f"{prefix}{sec}.effective_batch={bs * world * real}")
            accum = max(accum, real)
        sizes.append(f"{prefix}finetune.eval_batch_size={b or int(node.finetune.eval_batch_size)}")
    n_steps = max(int(steps), 2 * accum)  # at least two optimizer updates in every stage
    n_train = n_steps * max(batches.values()) * world
    n_test = TEST_IMAGES * world
    sizes += [f"data.train_subset={n_train}", f"data.test_subset={n_test}", "data.finetune_subset=0"]
    if cfg.data.holdout:
        sizes.append(f"data.holdout={n_test}")
    inputs: List[str] = []
    todo: dict = {"root": root, "world": world, "steps": n_steps}
    if write_data:
        folder = root / "data" / f"fashion-mnist-imagefolder-{int(cfg.data.img_size)}px"
        todo["imagefolder"] = (folder, n_train + (n_test if cfg.data.holdout else 0), n_test, int(cfg.data.img_size))
        inputs.append(f"data.root={folder}")
    if not cfg.teacher.train:
        for need in ("pretrained", "finetuned"):
            if not cfg.teacher.get(f"{need}_ckpt"):
                inputs.append(f"teacher.{need}_ckpt={root / 'checkpoints' / f'random-teacher-{need}.pth'}")
    for key, value in cfg.checkpoints.items():
        if not value:
            inputs.append(f"checkpoints.{key}={root / 'checkpoints' / f'random-{key}.pth'}")
    return inputs, sizes, todo


def prepare_inputs(todo: dict, plan: "Plan") -> List[str]:
    """Write what the rehearsal's stages read and the user did not give: the small ImageFolder, and random-weight
    official-format teacher checkpoints for the file inputs under the rehearsal's checkpoints folder. Returns notes."""
    notes = []
    if "imagefolder" in todo:
        folder, n_train, n_test, size = todo["imagefolder"]
        notes.append(write_imagefolder(folder, n_train, n_test, size))
    ckpt_dir = Path(todo["root"]) / "checkpoints"
    for stage in sorted(plan.stages.values(), key=lambda s: s.kind == "probe"):  # a probe reads what DMAE reads
        for role, ref in stage.inputs.items():
            path = Path(ref[len("file:"):]) if ref.startswith("file:") else None
            if path is None or path.parent != ckpt_dir or path.exists():
                continue
            # a probe's encoder and a teacher evaluation's classifier are the stage's own model
            model = stage.spec.model if stage.kind in ("probe", "evaluate") else stage.spec.teacher_model
            notes.append(write_random_checkpoint(path, model, stage.spec.data, finetuned="finetuned" in path.name))
    return notes


def write_imagefolder(folder: Path, n_train: int, n_test: int, size: int) -> str:
    """root/{train,val}/<class>/<i>.png: Fashion-MNIST images (train from its training set, val from its test set),
    resized to size x size RGB. Written once (a finished folder has a .complete marker)."""
    marker = folder / ".complete"
    if marker.exists():
        return f"ImageFolder {folder} (written by an earlier rehearsal)"
    for split, n, source in (("train", n_train, "train"), ("val", n_test, "val")):
        ds = core_data.FashionMNIST(core_data.FASHION_MNIST_DIR, source)
        per_class = max(1, math.ceil(n / len(ds.classes)))
        counts: Dict[int, int] = {}
        for i in range(len(ds)):
            c = int(ds.targets[i])
            if counts.get(c, 0) >= per_class:
                if len(counts) == len(ds.classes) and all(v >= per_class for v in counts.values()):
                    break
                continue
            d = folder / split / f"{c:02d}_{ds.classes[c].replace('/', '-').replace(' ', '_')}"
            d.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(ds.images[i].numpy(), mode="L").convert("RGB").resize((size, size), Image.BICUBIC)
            img.save(d / f"{i}.png")
            counts[c] = counts.get(c, 0) + 1
    marker.write_text("")
    return f"ImageFolder {folder}: Fashion-MNIST at {size} px, {n_train}+ train / {n_test}+ val images, 10 classes"


def write_random_checkpoint(path: Path, arch_cfg: ModelConfig, data: DataConfig, finetuned: bool) -> str:
    """An official-format checkpoint of the architecture with random weights (timm's initialisation)."""
    arch = get_arch(arch_cfg.preset)
    torch.manual_seed(0)
    if finetuned:
        model = models.build_classifier(arch, core_data.num_classes_of(data), data.img_size, arch_cfg.patch_size)
    else:
        model = models.build_mae(arch, data.img_size, arch_cfg.patch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_save({"model": model.state_dict()}, path)
    kind = "fine-tuned classifier" if finetuned else "MAE with decoder (mae_visualize layout)"
    return f"random-weight {arch_cfg.preset}/{arch_cfg.patch_size} {kind}: {path}"


def _match(full: "Plan", rehearsal: "Plan") -> Dict[str, str]:
    """Real stage id -> the rehearsal stage of the same role that serves the same row (seed 0)."""
    by_cell = {}
    for sid, st in rehearsal.stages.items():
        for row, _ in st.cells:
            by_cell.setdefault((st.role, row), sid)
    return {sid: by_cell.get((st.role, st.cells[0][0])) for sid, st in full.stages.items()}


def write_report(path: Path, full_cfg: "DictConfig", full: "Plan", rehearsal: "Plan", notes: List[str],
                 command: str, generated_data: bool = False) -> Path:
    """The REHEARSAL report: per rehearsed stage its step time and peak memory; the full run's device-hours."""
    results = {}
    for sid in rehearsal.stages:
        results[sid] = read_result(rehearsal.dir(sid))
    world = world_size(full_cfg.launcher)
    lines = [f"# REHEARSAL of {full_cfg.table} ({full_cfg.profile} profile): not results", "",
             "Every stage ran with the real models, shapes, dtypes, data path and launcher, for a handful of steps "
             "on a few images. Its top-1 numbers mean nothing; it shows that the run works end to end, what a step "
             "costs and how much memory a stage needs.", "",
             f"- command: `{command}`", f"- results: `{rehearsal.root}`",
             f"- launcher: {full_cfg.launcher.name}, {world} process(es) per stage, device {full_cfg.run.device}, "
             f"amp {full_cfg.run.amp}, data workers {full_cfg.run.num_workers}"]
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Stages", "",
              "| stage | status | steps | batch / device | median step (s) | images/s | peak memory (MiB) | wall (s) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    failed = 0
    for sid, r in results.items():
        if r is None:
            failed += 1
            lines.append(f"| {sid} | **not done** | | | | | | |")
            continue
        step = f"{r['step_s']:.3f}" if r.get("step_s") else "-"
        lines.append(f"| {sid} | done | {r.get('steps', '-')} | {r.get('batch_per_device', '-')} | {step} | "
                     f"{r.get('images_per_s', 0):.1f} | {r.get('peak_mem_mb', 0):,.0f} | {r['wall_s']:.1f} |")
    kinds = {r.get("peak_mem_kind") for r in results.values() if r}
    lines += ["", f"Peak memory: {', '.join(sorted(k for k in kinds if k)) or '-'}, the busiest rank."]
    # the full run's device-hours from the rehearsal's step times
    data = dict(full_cfg.data)
    if generated_data:  # the full run reads the user's ImageNet, not the rehearsal's small folder
        data["root"] = ""
    n_train, n_holdout, n_test, size_note = dataset_sizes(data)
    match = _match(full, rehearsal)
    total, rows = 0.0, []
    for sid, st in full.stages.items():
        r = results.get(match.get(sid) or "")
        if not r:
            rows.append(f"| {sid} | - | no rehearsal measurement |")
            continue
        if st.kind == "probe":
            rate = (r.get("n_eval", 0) + r.get("bank_images", 0)) / max(r.get("probe_s") or 0.0, 1e-9)
            seconds = (n_train + n_test) / max(rate, 1e-9)
            how = f"{n_train:,} bank + {n_test:,} test images at {rate:.1f} images/s (forward to the probed block)"
        elif st.kind == "evaluate":
            seconds = n_test / max(r.get("images_per_s") or 0.0, 1e-9)
            how = f"{n_test:,} test images at {r.get('images_per_s', 0):.1f} images/s"
        else:
            sec = st.spec.pretrain if st.kind == "pretrain" else st.spec.finetune
            bs, epochs = sec.batch_size, sec.epochs
            steps = n_train // (bs * world) * epochs
            per_image = r["step_s"] / max(1, int(r.get("batch_per_device") or bs))
            seconds = steps * bs * per_image
            how = (f"{steps:,} steps of {bs}/device x {per_image:.4f} s/image"
                   + (f" (measured at batch {r['batch_per_device']})" if r.get("batch_per_device") != bs else ""))
            if st.kind == "finetune" and n_holdout:
                seconds += epochs * n_holdout / world / max(r.get("images_per_s") or 1e-9, 1e-9)
        hours = seconds * world / 3600
        total += hours
        rows.append(f"| {sid} | {hours:,.2f} | {how} |")
    lines += ["", "## The full run, estimated from these step times", "",
              f"{len(full.stages)} stages, {world} device(s) each; {size_note or 'image counts of the data given'}."
              " Per-image cost is taken as constant across batch sizes, and data loading as the rehearsal paid it.",
              "", "| stage | device-hours | from |", "|---|---:|---|"] + rows
    lines += ["", f"**Estimated total: {total:,.2f} device-hours** on {full_cfg.run.device}, {world} device(s) per "
              "stage (the rehearsal's device: a CPU rehearsal estimates CPU hours).", ""]
    if failed:
        lines.insert(2, f"**{failed} stage(s) did not finish: the rehearsal failed.**\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines))
    return path
