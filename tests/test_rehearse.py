"""--rehearse: every stage of a run for a few steps, with the run's real models, data path and launcher, ending in a
REHEARSAL report (step time, peak memory, the full run's device-hours). The paper profile's rehearsal (ViT-L ->
ViT-B at 224 px, random official-format teachers, a small ImageFolder, 2-rank gloo DDP under the local Slurm) is
the slow test at the end."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.plan.config import load_config
from harness.run.rehearse import overrides
from harness.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_paper_overrides_keep_the_run_and_shrink_only_its_size(tmp_path):
    cfg = load_config("table2", ["profile=paper", f"results_root={tmp_path}", "launcher.nodes=1"], check=False)
    inputs, sizes, todo = overrides(cfg, steps=4, batch=2, write_data=True)
    assert todo["steps"] == 8  # pre-training accumulates 4 batches: two optimizer updates at least
    world = todo["world"]  # the paper profile's 8 GPUs per node
    assert world == 8
    assert f"data.train_subset={8 * 2 * world}" in sizes
    assert "pretrain.warmup_epochs=0.2" in sizes and "finetune.warmup_epochs=0.2" in sizes  # 20 of 100 epochs
    assert "pretrain.batch_size=2" in sizes and "finetune.eval_batch_size=2" in sizes
    assert f"results_root={tmp_path / 'rehearsal'}" in sizes
    assert any(o.startswith("data.root=") and o.endswith("fashion-mnist-imagefolder-224px") for o in inputs)
    assert any(o.startswith("teacher.pretrained_ckpt=") for o in inputs)
    assert not any(k.startswith(("pretrain.mask", "distill", "run.", "launcher.", "student")) for k in sizes + inputs)


@pytest.mark.parametrize("launcher, world, accum", [
    ([], 8, {"pretrain": 4, "finetune": 1}),  # the official 8-GPU run: its own accumulation
    # 2 CPU ranks: the run derives 16 and 4 from the effective batches; the rehearsal accumulates at most 4
    (["launcher.gpus_per_node=0", "launcher.tasks_per_node=2", "run.device=cpu", "run.amp=none"], 2,
     {"pretrain": 4, "finetune": 4}),
    (["launcher.gpus_per_node=1"], 1, {"pretrain": 4, "finetune": 4}),  # one GPU: 32 and 8, capped
])
def test_paper_rehearsal_keeps_the_effective_batch_form_with_a_few_accumulation_steps(tmp_path, launcher, world,
                                                                                      accum):
    cfg = load_config("table2", ["profile=paper", f"results_root={tmp_path}", *launcher], check=False)
    _, sizes, todo = overrides(cfg, steps=2, batch=2, write_data=True)
    assert todo["world"] == world and todo["steps"] == 2 * max(accum.values())
    for sec, a in accum.items():
        assert f"{sec}.effective_batch={2 * world * a}" in sizes


def test_given_data_and_checkpoints_are_used_as_given(tmp_path):
    cfg = load_config("table2", ["profile=paper", "data.root=/datasets/imagenet", "teacher.pretrained_ckpt=/c/p.pth",
                                 "teacher.finetuned_ckpt=/c/f.pth"], check=False)
    inputs, _, todo = overrides(cfg, steps=4, batch=0, write_data=False)
    assert not any(o.startswith(("data.root=", "teacher.")) for o in inputs) and "imagefolder" not in todo


def test_smoke_rehearsal_writes_the_report_and_leaves_the_real_run_alone(tmp_path, capsys):
    args = ["table2", "profile=smoke", "launcher=debug", f"results_root={tmp_path / 'results'}",
            f"reports_dir={tmp_path / 'reports'}", "--rehearse", "--rehearse-steps", "3"]
    assert main(args) == 0
    assert not (tmp_path / "results" / "table2").exists()  # only results/rehearsal/
    report = (tmp_path / "reports" / "rehearsal" / "table2.smoke.md").read_text()
    assert report.startswith("# REHEARSAL of table2")
    assert "not done" not in report and "Estimated total:" in report
    results = [json.loads(p.read_text()) for p in (tmp_path / "results" / "rehearsal").rglob("result.json")]
    assert len(results) == 25  # 17 trained or evaluated + 8 probes
    for r in results:
        assert r["peak_mem_mb"] > 0
        if r["kind"] not in ("evaluate", "probe"):
            assert r["steps"] == 3 and r["step_s"] > 0 and r["epochs"] == 1
            assert f"| {r['stage_id']} | done | 3 |" in report


@pytest.mark.parametrize("extra, message", [(["--rehearse-steps", "3"], "only apply with --rehearse"),
                                            (["--rehearse", "-m", "seed=0,1"], "drop -m")])
def test_rehearsal_options_that_would_be_ignored_are_errors(extra, message, tmp_path, capsys):
    assert main(["table2", "profile=smoke", f"results_root={tmp_path}", *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.slurm
def test_paper_rehearsal_under_slurm_with_two_rank_ddp_on_cpu(slurm_cluster, tmp_path):
    """ViT-L -> ViT-B at 224 px through one stage of every kind table2 has (the provided fine-tuned teacher's
    evaluation, MAE and DMAE pre-training, plain and KD fine-tuning, evaluation), 2 CPU ranks (gloo) per job under the
    local Slurm. The rows that only repeat these kinds at other settings (DMAE 95 / 98 %, scratch) and the probes are
    left out: the whole graph at these shapes takes 12 minutes of a 2-core CI machine (the smoke rehearsal of the
    acceptance test runs all of it)."""
    cmd = [sys.executable, "-m", "harness.reproduce", "table2", "profile=paper", "launcher=slurm",
           "~rows.dmae_95", "~rows.dmae_98", "~rows.scratch", "probe.enabled=false", "gates.enabled=false",
           "launcher.partition=debug", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2",
           "launcher.cpus_per_task=1", "launcher.mem_gb=12", "launcher.timeout_min=30", "launcher.poll_s=2",
           "run.device=cpu", "run.amp=none", "run.threads=1", "run.num_workers=1",
           f"results_root={tmp_path / 'results'}", f"reports_dir={tmp_path / 'reports'}",
           "--rehearse", "--rehearse-batch", "2", "--rehearse-steps", "2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (tmp_path / "reports" / "rehearsal" / "table2.paper.md").read_text()
    assert "not done" not in report
    assert re.search(r"\*\*Estimated total: [\d,.]+ device-hours\*\*", report)
    results = [json.loads(p.read_text()) for p in (tmp_path / "results" / "rehearsal").rglob("result.json")]
    # the provided teacher's evaluation; MAE pre-train, fine-tune, evaluation; KD fine-tune, evaluation; DMAE
    # pre-train, fine-tune, evaluation
    assert len(results) == 9 and all(r["world_size"] == 2 for r in results)
    assert {r["kind"] for r in results} == {"pretrain", "finetune", "evaluate"}
    assert {r["device"] for r in results} == {"cpu"}
