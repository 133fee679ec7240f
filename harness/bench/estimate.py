"""Cost estimates for `reproduce --dry-run` and the report, from measured step times (harness.bench), not guesses.

    cost of a stage = per-image step time x images per device x epochs  (+ per-epoch evaluation, + input pipeline)

- The step times come from the benchmark files in <results_root>/bench/ and the repository's results/bench/ (or
  only $DMAE_BENCH_DIR, or only `bench_dir=`) measured on the plan's device type (run.device; auto = cuda when
  this machine has one). Files from this very machine are preferred; for each step the newest measurement wins,
  with the stage's CPU threads (run.threads) preferred.
- A stage maps to a measured step of the same kind (mae | dmae | finetune | finetune_kd | eval), model, patch,
  image size, visible-patch count, teacher depth run and (DMAE) projection heads: StepSpec.match_key of the step
  built from the stage's spec as the benchmark builds its own (bench.spec.step_spec), so a DMAE stage with MLP
  heads never takes a linear-head measurement. The benchmark's batch may differ (the paper shapes run at batch 8
  on a CPU): the per-image cost is used as measured, and the stage's source says so. A shape that was not
  benchmarked is FLOP-scaled: its FLOPs per image (counted on the meta device) divided by the achieved FLOP/s of the
  nearest measured step (same kind first, then nearest FLOPs).
- The input pipeline (measured separately) adds to the step time with num_workers=0 (the CPU profiles) and overlaps
  it with workers: per-image cost = max(step, data / workers).
- A stage whose twin (same spec but for seed/inputs, same world size) already finished under the plan's results
  folder is estimated by that twin's measured wall time instead. A partly done stage counts its remaining epochs
  (lines of its log.jsonl).
- Data parallel: `world` devices each process 1/world of the images; the returned seconds are wall seconds of the
  stage (device-seconds / world), ignoring communication.

No benchmark for the device: estimate_plan returns {} (the dry-run shows "cost unknown").
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from harness.bench.results import current_device_key, load_results
from harness.bench.spec import StepSpec, step_spec
from harness.plan.resolve import world_size
from harness.core.rundir import CONFIG_FILE, RESULT_FILE, epochs_logged, load_json, stage_status
from harness.core.spec import AnySpec, ModelConfig, spec_dict
from harness.core.lazy import lazy

# torch (~1 s) only where a plan needs it: run.device=auto, a shape never benchmarked, a KD fine-tune
torch = lazy("torch")
flops_of = lazy("harness.bench.flops")
build = lazy("harness.core.build")

REPO_BENCH = Path(__file__).resolve().parent.parent / "results" / "bench"
# Sizes of the datasets the profiles use, when no subset is set.
FASHION_MNIST_SIZES = {"train": 60000, "val": 10000}
IMAGENET_SIZES = {"train": 1281167, "val": 50000}


def estimate_plan(plan, cfg, bench_dir: Optional[str | Path] = None, verbose: bool = True) -> Dict[str, float]:
    """{stage id: estimated wall seconds} for every stage of the plan ({} when nothing was benchmarked for the
    plan's device). Notes on where each figure comes from go to stderr when verbose."""
    details = estimate_details(plan, cfg, bench_dir)
    if verbose:
        for note in details["notes"]:
            print(f"[estimate] {note}", file=sys.stderr)
    return {sid: d["seconds"] for sid, d in details["stages"].items()}


def _device_type(cfg) -> str:
    dev = str(cfg.run.device)
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if dev.startswith("cuda") else dev


def dataset_sizes(data: dict) -> Tuple[int, int, int, str]:
    note = ""
    if data["name"] == "fashion_mnist":
        full = FASHION_MNIST_SIZES
    else:
        full, note = IMAGENET_SIZES, "image counts assumed to be ImageNet-1k's (1,281,167 train / 50,000 val)"
        root = Path(str(data.get("root", "")))
        try:
            classes = [c for c in (root / "train").iterdir() if c.is_dir()]
            if classes and len(classes) != 1000:  # not ImageNet-1k: count (small folders only)
                full = {split: sum(1 for c in (root / split).iterdir() if c.is_dir() for f in c.iterdir())
                        for split in ("train", "val")}
                note = f"image counts read from {root}"
        except OSError:
            pass
    holdout = int(data.get("holdout") or 0)
    train = min(full["train"] - holdout, data.get("train_subset") or full["train"])
    test = min(full["val"], data.get("test_subset") or full["val"])
    return train, holdout, test, note


class _Index:
    """The newest measured entry per (step key, batch) and per data pipeline, on one device type."""

    def __init__(self, results: List[dict]):
        self.steps: Dict[tuple, Dict[Tuple[int, int], dict]] = {}
        self.all: List[dict] = []
        self.data: Dict[tuple, dict] = {}
        self.files: List[str] = []
        for r in results:  # oldest first: newer entries overwrite
            used = False
            for sh in r.get("shapes", {}).values():
                for e in sh.get("steps", []):
                    if e.get("options") or not e.get("s_per_image"):
                        continue
                    e = dict(e, _file=r["_path"], _device=r["device"]["key"], _order=len(self.all))
                    spec = StepSpec.from_dict(e["spec"])
                    e["_spec"] = spec
                    self.steps.setdefault(spec.match_key(), {})[(spec.batch, int(e.get("threads", 0)))] = e
                    self.all.append(e)
                    used = True
            for d in r.get("data", []):
                self.data[(d["transform"], d["img_size"], d.get("randaug") or "", float(d.get("reprob", 0.0)))] = \
                    dict(d, _file=r["_path"])
                used = True
            if used:
                self.files.append(r["_path"])

    def step(self, spec, threads: int = 0) -> Tuple[Optional[float], str]:
        """(seconds per image, where it comes from); threads: the stage's CPU threads (0: any)."""
        found = self.steps.get(spec.match_key())
        if found:
            b, t = min(found, key=lambda bt: (bool(threads) and bt[1] != threads, abs(math.log(bt[0] / spec.batch)),
                                              -bt[0], -found[bt]["_order"]))  # ties: the newest
            e = found[(b, t)]
            src = f"measured {e['id']}"
            if b != spec.batch:
                src += f" at batch {b} (stage batch {spec.batch})"
            if threads and t and t != threads:
                src += f" with {t} thread(s) (stage: {threads})"
            return e["s_per_image"], src
        # the newest measurement of each step (as above), not an older one of the same shape
        cands = [e for found in self.steps.values() for e in found.values()
                 if e["trains"] == spec.trains and e.get("achieved_flops_per_s")]
        if not cands:
            return None, "no measured step to scale from"
        flops = flops_of.meta_flops_per_image(spec)  # torch: only for shapes never benchmarked
        e = min(cands, key=lambda e: (e["_spec"].kind != spec.kind, abs(math.log(flops / e["flops_per_image"])),
                                      bool(threads) and int(e.get("threads", 0)) != threads, -e["_order"]))
        return flops / e["achieved_flops_per_s"], (f"FLOP-scaled from {e['id']} ({flops / 1e9:.3g} vs "
                                                   f"{e['flops_per_image'] / 1e9:.3g} GFLOP/image)")

    def pipeline(self, transform: str, img_size: int, randaug: str = "", reprob: float = 0.0
                 ) -> Tuple[float, str]:
        key = (transform, img_size, randaug or "", float(reprob))
        d = self.data.get(key)
        if d is None:  # same transform and size, other augmentation settings
            d = next((v for k, v in reversed(list(self.data.items())) if k[:2] == key[:2]), None)
        if d is None:
            return 0.0, f"input pipeline ({transform}, {img_size}px) not measured"
        return d["s_per_image"], ""


def _combine(step_spi: float, data_spi: float, workers: int) -> float:
    return step_spi + data_spi if workers <= 0 else max(step_spi, data_spi / workers)


def _step_spec(stage_spec: AnySpec, kind: str, batch: int, num_classes: int,
               model: Optional[ModelConfig] = None) -> StepSpec:
    """The step a stage runs (of `model`, default the stage's), with every setting of its spec the step depends on
    (distillation, KD, pixel loss, optimizer), built as the benchmark builds its steps (bench.spec.step_spec)."""
    return step_spec(kind, model or stage_spec.model, stage_spec.data.img_size, batch, num_classes,
                     pretrain=getattr(stage_spec, "pretrain", None), finetune=getattr(stage_spec, "finetune", None),
                     distill=getattr(stage_spec, "distill", None), kd=getattr(stage_spec, "kd", None),
                     teacher=getattr(stage_spec, "teacher_model", None))


def _teacher_logits_cached(spec: AnySpec, dev_type: str) -> bool:
    """Whether a KD fine-tune computes its teacher's logits once per view before training instead of running the
    teacher every step: the KD objective's own rule (KDObjective.teacher_logits_cached, found in harness.core.build's
    registry), asked only of a stage with a kd section, so a plan without KD is costed without importing torch."""
    if not spec.kd:
        return False
    return build.registered_objective("kd").teacher_logits_cached(spec, dev_type)


def _twin_key(spec: dict) -> str:
    """A stage's spec (dict form) but for its seed, name and inputs."""
    s = {k: v for k, v in spec.items() if k not in ("seed", "name", "inputs")}
    return json.dumps(s, sort_keys=True, default=str)


def _finished(root: Path) -> Dict[str, dict]:
    """Finished stages under the plan's results folder: twin key -> {wall_s, world_size, stage_id}."""
    out: Dict[str, dict] = {}
    if not root.is_dir():
        return out
    for d in root.iterdir():
        try:
            res = load_json(d / RESULT_FILE)
            spec = load_json(d / CONFIG_FILE)["spec"]
        except (OSError, ValueError, KeyError):
            continue
        if res.get("wall_s") and not res.get("resumed_from_epoch"):
            out[_twin_key(spec)] = {"wall_s": float(res["wall_s"]), "world_size": int(res.get("world_size", 1)),
                                    "stage_id": res.get("stage_id", d.name)}
    return out


def estimate_details(plan, cfg, bench_dir: Optional[str | Path] = None) -> dict:
    """Per stage: seconds, the measured step it maps to, images, epochs; plus notes. The report's cost section
    reads this."""
    dev_type = _device_type(cfg)
    world = world_size(cfg.launcher)
    out = {"device_type": dev_type, "world": world, "files": [], "stages": {}, "notes": []}
    if bench_dir is not None or os.environ.get("DMAE_BENCH_DIR"):
        dirs = [Path(bench_dir or os.environ["DMAE_BENCH_DIR"])]
    else:  # the plan's results root, and the repository's results/bench (where `python -m harness.bench` writes)
        dirs = list(dict.fromkeys(p.resolve() for p in (Path(str(cfg.results_root)) / "bench", REPO_BENCH)))
    where = " or ".join(str(d) for d in dirs)
    results = sorted((r for d in dirs for r in load_results(d) if r["device"].get("type") == dev_type),
                     key=lambda r: r.get("created", ""))
    if not results:
        out["notes"].append(f"no benchmark for device type {dev_type} in {where}: run `python -m harness.bench"
                            f"{' --device cuda' if dev_type == 'cuda' else ''}` on the target machine for estimates")
        return out
    here = current_device_key(dev_type)
    mine = [r for r in results if r["device"].get("key") == here]
    if mine:
        results = mine
    else:
        out["notes"].append(f"no benchmark from this machine{f' ({here})' if here else ''}; using the "
                            f"measurements of {', '.join(sorted({r['device']['key'] for r in results}))}")
    idx = _Index(results)
    out["files"] = idx.files
    n_train_all, n_holdout, n_test, size_note = dataset_sizes(spec_dict(plan.stages[next(iter(plan.stages))].spec.data)
                                                           if plan.stages else {"name": "fashion_mnist"})
    if size_note:
        out["notes"].append(size_note)
    workers = int(cfg.run.num_workers or 0)
    threads = int(cfg.run.threads or 0) if dev_type == "cpu" else 0
    twins = _finished(Path(plan.root))
    per_device_val = math.ceil(n_holdout / world)  # per-epoch monitoring of a fine-tune (validation split)
    per_device_test = math.ceil(n_test / world)  # the evaluation stage
    counts = {"measured": 0, "scaled": 0, "twin": 0, "batch": 0, "none": 0}
    for sid, stage in plan.stages.items():
        spec = stage.spec
        twin = twins.get(_twin_key(spec_dict(spec)))
        if twin and twin["world_size"] == world:
            out["stages"][sid] = {"seconds": twin["wall_s"], "source": f"finished twin {twin['stage_id']}"}
            counts["twin"] += 1
            continue
        n_cls = 10 if spec.data.name == "fashion_mnist" else 1000
        img = spec.data.img_size
        n_train = dataset_sizes(spec_dict(spec.data))[0] if spec.data.train_subset else n_train_all
        parts, sources = [], []
        if stage.kind == "pretrain":
            sec = spec.pretrain
            st = _step_spec(spec, spec.objective, sec.batch_size, n_cls)
            data_spi, dn = idx.pipeline("pretrain", img)
            epochs = sec.epochs
            per_epoch = (n_train // (sec.batch_size * world)) * sec.batch_size
            parts.append((st, per_epoch * epochs, data_spi))
        elif stage.kind == "finetune":
            sec = spec.finetune
            cached = _teacher_logits_cached(spec, dev_type)
            kind = "finetune_kd" if spec.kd and not cached else "finetune"
            st = _step_spec(spec, kind, sec.batch_size, n_cls)
            data_spi, dn = idx.pipeline("finetune", img, sec.randaug or "", sec.reprob)
            epochs = sec.epochs
            per_epoch = (n_train // (sec.batch_size * world)) * sec.batch_size
            parts.append((st, per_epoch * epochs, data_spi))
            if cached:  # the teacher's logits once, for each training image and its mirror
                parts.append((_step_spec(spec, "eval", sec.eval_batch_size, n_cls, model=spec.teacher_model),
                              2 * n_train, 0.0))
            ev_spi, _ = idx.pipeline("eval", img)
            parts.append((_step_spec(spec, "eval", sec.eval_batch_size, n_cls), per_device_val * epochs, ev_spi))
        elif stage.kind == "probe":  # forward passes (costed as the whole encoder's) of the bank and the queries
            epochs = 1
            data_spi, dn = idx.pipeline("eval", img)
            queries = per_device_val if spec.split == "val" else per_device_test
            parts.append((_step_spec(spec, "eval", spec.probe.batch_size, n_cls), n_train + queries, data_spi))
        else:
            epochs = 1
            data_spi, dn = idx.pipeline("eval", img)
            parts.append((_step_spec(spec, "eval", spec.eval_batch_size, n_cls), per_device_test, data_spi))
        total, known = 0.0, True
        detail = []
        for st, images, d_spi in parts:
            spi, src = idx.step(st, threads)
            if spi is None:
                known = False
                sources.append(src)
                break
            total += images * _combine(spi, d_spi, workers)
            sources.append(src)
            detail.append({"step": st.kind, "images_per_device": images, "s_per_image": spi,
                           "data_s_per_image": d_spi})
        if dn:
            sources.append(dn)
        if not known:
            counts["none"] += 1
            continue
        if stage.kind in ("pretrain", "finetune") and stage_status(plan.dir(sid)) == "partial":
            done = epochs_logged(plan.dir(sid))  # resumes after its last finished epoch
            if 0 < done < epochs:
                total *= (epochs - done) / epochs
                sources.append(f"{done}/{epochs} epochs already done")
        kind = "scaled" if any("FLOP-scaled" in s for s in sources) else "measured"
        counts[kind] += 1
        counts["batch"] += any("at batch" in s for s in sources)
        out["stages"][sid] = {"seconds": total, "source": "; ".join(sources), "epochs": epochs, "parts": detail}
    batch_note = f" ({counts['batch']} at another batch size)" if counts["batch"] else ""
    none_note = f", {counts['none']} unknown" if counts["none"] else ""
    out["notes"].append(
        f"cost estimates from {len(idx.files)} benchmark file(s) ({', '.join(Path(f).name for f in idx.files)}), "
        f"{world} device(s) per stage: {counts['measured']} stage(s) from measured steps{batch_note}, "
        f"{counts['scaled']} FLOP-scaled, {counts['twin']} from finished twins{none_note}")
    return out
