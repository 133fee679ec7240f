"""Stage functions: pretrain, finetune, evaluate, probe. Each takes a typed stage spec (harness.core.spec, built by
harness.plan.graph), a run directory and the paths of its inputs' model files, and leaves in the run directory:

    config.json          the spec (its dict form), inputs and runtime
    log.jsonl            one line per epoch (losses, lr, img/s, top-1/top-5 when fine-tuning)
    tb/                  TensorBoard event files of the training stages (harness.core.tblog; one per attempt, rank 0)
    checkpoint-last.pth  resumable state, rewritten atomically every epoch (checkpoint-prev.pth: the one before);
                         both deleted once the stage is done, unless run.keep_checkpoints=true
    model.pth            final weights, official MAE layout: {'model': state_dict, 'arch': ..., 'stage_id': ...}
    result.json          written last: its presence means the stage is done
    error.json           written when the stage fails: the error, for the report
    .stage.lock          flock'ed by the process running the stage (rank 0): a second runner is refused

Temporary files (.<name>.tmp-<pid>) left by a killed process are removed when the stage starts again.

Run one by hand:  python -m harness.core.stages results/table2/smoke/<stage-id>
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

from harness.core.build import finetune_objective, finetune_param_groups, pretrain_objective, pretrain_param_groups
from harness.core.checkpoints import (atomic_save, encoder_to_classifier, load_weights, safe_load, state_dict_of,
                                      DECODER_KEYS)
from harness.core.data import Aug, build_dataset
from harness.core.models import build_classifier, build_mae, get_arch
from harness.core.probe import block_features, knn_top1
from harness.core.ranks import export_rank_env
from harness.core.locks import StageLocked, stage_lock
from harness.core.rundir import (CONFIG_FILE, ERROR_FILE, MODEL_FILE, RESULT_FILE, git_commit, input_record, load_json,
                                 sha256_file, spec_hash, write_json, write_stage_config)
from harness.core.rank_status import NonFiniteLoss
from harness.core.resume import seed_all
from harness.core.runtime import Runtime, end_process_group, peak_memory_mb, reset_peak_memory, setup_runtime
from harness.core.spec import (AnySpec, EvaluateStage, FinetuneStage, ModelConfig, PretrainStage, ProbeStage,
                               StageRuntime, spec_dict, stage_runtime, stage_spec)
from harness.core.train import evaluate_classifier, fit


def _img(spec: AnySpec) -> dict:
    return dict(img_size=spec.data.img_size, patch_size=spec.model.patch_size)


def load_teacher_encoder(path: str, model_cfg: ModelConfig, img_size: int, with_decoder: bool):
    """A MAE encoder for feature targets from: a MAE checkpoint with decoder (official mae_visualize_*.pth or a
    harness pre-train), an encoder-only release (mae_pretrain_*.pth) or a fine-tuned classifier."""
    model = build_mae(get_arch(model_cfg.preset), img_size, model_cfg.patch_size, with_decoder=with_decoder)
    sd = state_dict_of(safe_load(path))
    finetuned = "head.weight" in sd or "fc_norm.weight" in sd
    ignore = ("fc_norm.", "head.", "distill_proj.") + (() if with_decoder else DECODER_KEYS)
    load_weights(model, sd, source=f"teacher checkpoint {path}", ignore_prefixes=ignore,
                 allow_missing=("norm.",) if finetuned else ())
    return model


def load_classifier(path: str, model_cfg: ModelConfig, img_size: int, num_classes: int):
    model = build_classifier(get_arch(model_cfg.preset), num_classes, img_size, model_cfg.patch_size)
    load_weights(model, state_dict_of(safe_load(path)), source=f"classifier checkpoint {path}")
    return model


def _save_model(model, spec: AnySpec, stage_id: str, run_dir: Path) -> None:
    atomic_save({"model": model.state_dict(), "arch": spec_dict(spec.model), "stage_id": stage_id},
                run_dir / MODEL_FILE)


def pretrain(spec: PretrainStage, run_dir: Path, inputs: Dict[str, str], rt: Runtime, stage_id: str) -> dict:
    p, d, data = spec.pretrain, spec.distill, spec.data
    seed_all(spec.seed)
    model = build_mae(get_arch(spec.model.preset), **_img(spec))
    teacher = None
    if spec.objective == "dmae":
        teacher = load_teacher_encoder(inputs["teacher"], spec.teacher_model, data.img_size,
                                       with_decoder=d.teacher_mode == "full")
        model.add_distill_heads([teacher.embed_dim] * len(d.pairs), d.projection)
    objective = pretrain_objective(spec.objective, p, d, teacher, d.pairs if teacher is not None else ())
    train_ds, _ = build_dataset(data, "train", Aug("pretrain", data.img_size, crop_min=p.crop_min))
    groups = pretrain_param_groups(model, p.weight_decay)
    res = fit(model=model, objective=objective, param_groups=groups, dataset=train_ds, schedule=p,
              run_dir=run_dir, spec_hash=spec_hash(spec_dict(spec)), seed=spec.seed, rt=rt, name=spec.name)
    if rt.is_main:
        _save_model(model, spec, stage_id, run_dir)
    last = res.history[-1] if res.history else {}
    return {"final_loss": last.get("loss"), "final_loss_pix": last.get("loss_pix"),
            "final_loss_feat": last.get("loss_feat"), "train_s": res.train_seconds,
            "images_per_s": res.images_per_s, "resumed_from_epoch": res.resumed_from_epoch,
            "earlier_attempts_s": res.earlier_seconds, "epochs": p.epochs, "train_images": len(train_ds),
            "step_s": res.step_s, "steps": res.steps, "batch_per_device": p.batch_size}


def finetune(spec: FinetuneStage, run_dir: Path, inputs: Dict[str, str], rt: Runtime, stage_id: str) -> dict:
    f, data = spec.finetune, spec.data
    seed_all(spec.seed)
    train_ds, num_classes = build_dataset(data, "train", Aug("finetune", data.img_size, crop_min=f.crop_min,
                                                             randaug=f.randaug, reprob=f.reprob))
    # per-epoch monitoring reads the validation split carved out of the training images, never the test split
    val_ds = build_dataset(data, "val", Aug("eval", data.img_size, crop_pct=data.eval_crop_pct))[0] \
        if data.holdout else None
    model = build_classifier(get_arch(spec.model.preset), num_classes, drop_path=f.drop_path, **_img(spec))
    if inputs.get("init"):
        sd = encoder_to_classifier(state_dict_of(safe_load(inputs["init"])))
        load_weights(model, sd, source=f"pre-trained checkpoint {inputs['init']}", allow_missing=("head.", "fc_norm."))
    teacher = None
    if spec.kd:
        teacher = load_classifier(inputs["kd_teacher"], spec.teacher_model, data.img_size, num_classes)
    objective = finetune_objective(num_classes, f, spec.kd, teacher)
    objective.prepare(spec, train_ds, rt)  # e.g. the KD baseline's teacher logits, once (baselines/kd.py)
    groups = finetune_param_groups(model, f.weight_decay, f.layer_decay)

    def eval_fn(m) -> dict:
        r = evaluate_classifier(m, val_ds, f.eval_batch_size, rt)
        return {"val_top1": r["top1"], "val_top5": r["top5"], "n_val": r["n_eval"]}
    res = fit(model=model, objective=objective, param_groups=groups, dataset=train_ds, schedule=f,
              run_dir=run_dir, spec_hash=spec_hash(spec_dict(spec)), seed=spec.seed, rt=rt, name=spec.name,
              eval_fn=eval_fn if val_ds is not None else None)
    if rt.is_main:
        _save_model(model, spec, stage_id, run_dir)
    last = res.history[-1]
    out = {"final_loss": last["loss"], "train_s": res.train_seconds, "images_per_s": res.images_per_s,
           "resumed_from_epoch": res.resumed_from_epoch, "earlier_attempts_s": res.earlier_seconds,
           "epochs": f.epochs, "num_classes": num_classes, "train_images": len(train_ds),
           "step_s": res.step_s, "steps": res.steps, "batch_per_device": f.batch_size}
    out.update(objective.result_fields())  # e.g. the KD baseline's kd_cache_hits / kd_cache_misses
    if val_ds is not None:  # validation split: monitoring only (the reported number is the evaluate stage's test top-1)
        best = max(res.history, key=lambda r: r["val_top1"])
        out.update(best_val_top1=best["val_top1"], best_epoch=best["epoch"], last_val_top1=last["val_top1"],
                   last_val_top5=last["val_top5"], n_val=last["n_val"])
    return out


def evaluate(spec: EvaluateStage, run_dir: Path, inputs: Dict[str, str], rt: Runtime, stage_id: str) -> dict:
    data = spec.data
    test_ds, num_classes = build_dataset(data, "test", Aug("eval", data.img_size, crop_pct=data.eval_crop_pct))
    model = load_classifier(inputs["model"], spec.model, data.img_size, num_classes).to(rt.device)
    t0 = time.perf_counter()
    metrics = evaluate_classifier(model, test_ds, spec.eval_batch_size, rt)
    metrics["split"] = "test"
    metrics["images_per_s"] = metrics["n_eval"] / (time.perf_counter() - t0)
    return metrics


def probe(spec: ProbeStage, run_dir: Path, inputs: Dict[str, str], rt: Runtime, stage_id: str) -> dict:
    """kNN top-1 of a frozen encoder's block (harness.core.probe): bank = the training images with their labels,
    queries =
    spec.split. No `encoder` input: the random initialisation of spec.seed, as a scratch fine-tune starts."""
    data = spec.data
    depth = get_arch(spec.model.preset).depth
    block = spec.block if spec.block >= 0 else depth + spec.block
    if not 0 <= block < depth:
        raise ValueError(f"probe block {spec.block} does not exist in a {depth}-block encoder")
    if inputs.get("encoder"):
        encoder = load_teacher_encoder(inputs["encoder"], spec.model, data.img_size, with_decoder=False)
    else:
        seed_all(spec.seed)
        encoder = build_mae(get_arch(spec.model.preset), with_decoder=False, **_img(spec))
    encoder.to(rt.device)
    t0 = time.perf_counter()
    aug = Aug("eval", data.img_size, crop_pct=data.eval_crop_pct)
    bank, num_classes = build_dataset(data, "train", aug)
    queries, _ = build_dataset(data, spec.split, aug)
    bank_f, bank_y = block_features(encoder, bank, block, spec.probe.batch_size, rt.device)
    query_f, query_y = block_features(encoder, queries, block, spec.probe.batch_size, rt.device)
    out = knn_top1(bank_f, bank_y, query_f, query_y, num_classes, spec.probe.k, spec.probe.temperature)
    out.update(split=spec.split, block=block, bank_images=len(bank), probe_s=time.perf_counter() - t0)
    rt.log(f"[{spec.name}] kNN probe of block {block}: top-1 {out['top1']:.2f} on {out['n_eval']} {spec.split} images "
           f"(bank {len(bank)}, k={out['k']})")
    return out


STAGES = {"pretrain": pretrain, "finetune": finetune, "evaluate": evaluate, "probe": probe}


def _remove_stale_tmp(run_dir: Path, log) -> None:
    """Temporary files of killed processes (config/log/model/result writes); checkpoint ones are left to fit(),
    which reports them when no complete checkpoint exists."""
    for p in sorted(run_dir.glob(".*.tmp-*")):
        if p.name.startswith(".checkpoint-") or p.name.endswith(f"-{os.getpid()}"):
            continue
        p.unlink(missing_ok=True)
        log(f"removed {p}, left by an interrupted run")


def run_stage(spec: AnySpec | dict, run_dir: str | Path, inputs: Dict[str, str], runtime: StageRuntime | dict,
              stage_id: str) -> dict:
    """Run (or resume) one stage; returns its result dict. A finished stage returns its stored result at once.

    spec, runtime: typed (harness.core.spec), or their dict form (config.json), which is type-checked here. Besides
    setup_runtime()'s settings, runtime holds nan_restarts: how many times a non-finite loss restarts the stage from
    its last checkpoint (logged) before it fails, and keep_checkpoints (false: checkpoint-* files are deleted once
    model.pth and result.json are written)."""
    spec, runtime = stage_spec(spec), stage_runtime(runtime)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / RESULT_FILE
    if done.exists():
        return load_json(done)
    rt = setup_runtime(device=runtime.device, amp=runtime.amp, threads=runtime.threads, log_every=runtime.log_every,
                       num_workers=runtime.num_workers, tensorboard=runtime.tensorboard, tb_every=runtime.tb_every)
    with ExitStack() as stack:
        locked = None
        if rt.is_main:
            try:
                stack.enter_context(stage_lock(run_dir, stage_id))
            except StageLocked as e:
                locked = e
        if rt.distributed:  # every rank stops when rank 0 could not take the lock
            flag = torch.tensor([0 if locked else 1], device=rt.device)
            dist.broadcast(flag, 0)
            if not flag.item() and locked is None:
                locked = StageLocked(f"stage {stage_id}: rank 0 found it already running elsewhere", stage_id,
                                     "another process")
        if locked is not None:
            raise locked
        if done.exists():  # finished by the runner that held the lock before us
            return load_json(done)
        return _run_locked(spec, run_dir, inputs, runtime, stage_id, rt)


def _run_locked(spec: AnySpec, run_dir: Path, inputs: Dict[str, str], runtime: StageRuntime, stage_id: str,
                rt: Runtime) -> dict:
    done = run_dir / RESULT_FILE
    if rt.is_main:
        _remove_stale_tmp(run_dir, rt.log)
        write_stage_config(run_dir, stage_id, spec_dict(spec), inputs, spec_dict(runtime))
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
    t0 = time.time()
    reset_peak_memory(rt)
    consumed = input_record(inputs) if rt.is_main else {}  # what this result is computed from (rundir.broken_input)
    nan_restarts = runtime.nan_restarts
    try:
        restarts = 0
        while True:
            try:
                out = STAGES[spec.kind](spec, run_dir, inputs, rt, stage_id)
                break
            except NonFiniteLoss as e:
                if restarts >= nan_restarts:
                    if restarts:
                        raise NonFiniteLoss(f"{e} (again after {restarts} restart(s) from the last checkpoint)") \
                            from None
                    raise
                restarts += 1
                rt.log(f"WARNING: [{spec.name or stage_id}] {e}; restarting from the last checkpoint "
                       f"(run.nan_restarts: {restarts}/{nan_restarts})")
    except BaseException as e:
        if rt.is_main and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            write_json({"stage_id": stage_id, "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                       run_dir / ERROR_FILE)
        raise
    out.update(peak_memory_mb(rt))
    # a resumed stage also counts the training time of its earlier attempts (up to their last checkpoint)
    wall = time.time() - t0 + out.pop("earlier_attempts_s", 0.0)
    result = {"stage_id": stage_id, "kind": spec.kind, "name": spec.name, "status": "done", **out,
              "wall_s": wall, "device": rt.device.type,
              "device_name": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor()
              or platform.machine(), "world_size": rt.world, "device_hours": wall * rt.world / 3600.0,
              "host": socket.gethostname(), "torch": torch.__version__, "python": sys.version.split()[0],
              "git_commit": git_commit(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "runtime": {k: getattr(runtime, k) for k in ("device", "amp", "threads", "num_workers")},
              "inputs": consumed}
    if rt.is_main and (run_dir / MODEL_FILE).exists():
        result["model_sha256"] = sha256_file(run_dir / MODEL_FILE)
    if rt.is_main:
        write_json(result, done)
        if not runtime.keep_checkpoints and done.exists() and (run_dir / MODEL_FILE).exists():
            remove_checkpoints(run_dir)
    return result


def remove_checkpoints(run_dir: Path) -> int:
    """Delete a finished stage's resume state (checkpoint-last/-prev); a checkpoint-*.corrupt set aside for inspection
    stays. Returns the bytes freed."""
    freed = 0
    for p in sorted(Path(run_dir).glob("checkpoint-*.pth")):
        if p.is_file():
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
    return freed


def _requeue_on_usr2() -> None:
    """sbatch scripts ask for USR2 before the time limit (#SBATCH --signal=USR2@N, as submitit does). Python's default
    for USR2 is to die, which would end the job as failed; here task 0 asks Slurm to requeue the job instead (the
    scripts carry --requeue) and the process is left to Slurm, which stops it: the requeued job resumes from
    checkpoint-last (written every epoch), losing at most the epoch it was in."""

    def handler(signum, frame):
        job = os.environ.get("SLURM_ARRAY_JOB_ID") and \
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" \
            or os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_PROCID", "0") == "0":
            print(f"[stages] USR2 (time limit near): requeueing Slurm job {job}", flush=True)
            subprocess.run(["scontrol", "requeue", job], check=False)

    if os.environ.get("SLURM_JOB_ID"):
        signal.signal(signal.SIGUSR2, handler)


def main(argv=None) -> None:
    """Re-run a stage from its run directory's config.json (debugging aid; what an sbatch script of
    launcher.write_sbatch runs)."""
    p = argparse.ArgumentParser(
        prog="python -m harness.core.stages", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run (or resume) one stage from its run directory's config.json: the spec, inputs and runtime "
                    "the planner wrote there. Prints the stage's result as JSON.",
        epilog="Example: python -m harness.core.stages results/table2/smoke/<stage-id>\n"
               "A finished stage (result.json) is not run again; an unfinished one resumes from checkpoint-last.pth. "
               "Under Slurm (srun of a multi-task job) the tasks join one torch.distributed group.")
    p.add_argument("run_dir", type=Path, help=f"a stage directory holding {CONFIG_FILE} (results/<table>/<profile>/"
                                              "<stage-id>)")
    args = p.parse_args(argv)
    run_dir = args.run_dir
    if not (run_dir / CONFIG_FILE).is_file():
        p.error(f"{run_dir / CONFIG_FILE} not found: give a stage directory the planner wrote (its {CONFIG_FILE} "
                "holds the spec); `python -m harness.reproduce <table> --dry-run` lists the stage ids")
    cfg = load_json(run_dir / CONFIG_FILE)
    _requeue_on_usr2()
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_PROCID") is not None:
        # srun of a multi-task sbatch job: the ranks from Slurm's variables, as a submitit job's (harness.core.ranks); a
        # RANK / MASTER_ADDR inherited from elsewhere that disagrees is refused by name, not joined (it would hang)
        export_rank_env()
    try:
        print(json.dumps(run_stage(cfg["spec"], run_dir, cfg["inputs"], cfg["runtime"], cfg["stage_id"]), indent=2))
    finally:  # every rank stopped together (train.fit), so no collective is in flight
        end_process_group()


if __name__ == "__main__":
    main()
