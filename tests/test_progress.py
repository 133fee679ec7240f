"""The driver's console (harness.run.progress.Progress): "epoch k/N" lines read from a stage's log.jsonl, the run ETA,
quiet mode, the end-of-run results table; and run.keep_checkpoints (checkpoint-* deleted once a stage is done)."""
import json
from types import SimpleNamespace

import torch

from harness.run.progress import Progress, results_table, stage_epochs
from harness.core.rundir import epochs_logged
from harness.plan.graph import Cell, Plan, Stage
from harness.core.spec import STAGE_SPECS, EvaluateStage, FinetuneSpec, FinetuneStage, PretrainSpec, PretrainStage
from harness.core.stages import run_stage


def _stage(sid, kind, role, epochs=None, cells=()):
    section = {"pretrain": PretrainSpec, "finetune": FinetuneSpec}
    spec = STAGE_SPECS[kind](name=sid, **({kind: section[kind](epochs=epochs)} if epochs is not None else {}))
    return Stage(sid, kind, role, spec, {}, list(cells))


def _cell(row, seed, ev):
    return Cell(row=row, seed=seed, label=row, method="dmae", paper=None, pretrain="", finetune="", evaluate=ev,
                teacher={}, info={})


def _plan(tmp_path):
    cells = [("dmae", 0), ("dmae", 1)]
    stages = [_stage("pt", "pretrain", "student-pretrain", 4, cells), _stage("ft", "finetune", "student-finetune", 3),
              _stage("t-ev", "evaluate", "teacher-evaluate", None, cells),
              _stage("ev0", "evaluate", "evaluate", None, [cells[0]]),
              _stage("ev1", "evaluate", "evaluate", None, [cells[1]])]
    return Plan("table2", "smoke", tmp_path, {s.id: s for s in stages},
                [_cell("dmae", 0, "ev0"), _cell("dmae", 1, "ev1")])


def _log(d, n, epoch_s=10.0):
    d.mkdir(parents=True, exist_ok=True)
    (d / "log.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "epoch_s": epoch_s}) + "\n" for i in range(n)))


def test_epoch_count_from_log(tmp_path):
    assert epochs_logged(tmp_path) == 0
    _log(tmp_path, 3)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 4, "lo')  # a line being written: not an epoch yet
    assert epochs_logged(tmp_path) == 3
    assert stage_epochs(FinetuneStage(finetune=FinetuneSpec(epochs=7))) == 7
    assert stage_epochs(PretrainStage(pretrain=PretrainSpec(epochs=3))) == 3
    assert stage_epochs(EvaluateStage()) is None


def test_poll_prints_epoch_lines_on_change_with_eta(tmp_path, capsys):
    plan = _plan(tmp_path)
    prog = Progress(plan, estimates={"pt": 40.0, "ft": 30.0, "t-ev": 1.0, "ev0": 1.0, "ev1": 1.0})
    running, members = {"pt": object()}, {"pt": ["pt", "ft"]}
    prog.poll(running, members)
    assert capsys.readouterr().out == ""  # nothing logged yet
    _log(plan.dir("pt"), 1)
    prog.poll(running, members)
    prog.poll(running, members)  # unchanged: no second line
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "pt: epoch 1/4" in out[0]
    assert "ETA ~1m03s" in out[0]  # 3/4 of pt (30 s) + ft 30 + three evaluations 3
    _log(plan.dir("pt"), 4)
    prog.set("pt", "done")
    _log(plan.dir("ft"), 2)
    prog.poll(running, members)  # the chain moved on to ft
    assert "ft: epoch 2/3" in capsys.readouterr().out


def test_eta_from_observed_epoch_times_without_estimates(tmp_path, capsys):
    plan = _plan(tmp_path)
    prog = Progress(plan)
    _log(plan.dir("pt"), 2, epoch_s=5.0)
    prog.poll({"pt": object()}, {"pt": ["pt"]})
    line = capsys.readouterr().out
    # pt: 2 epochs left at 5 s; ft: no finetune epoch seen yet -> unknown: no ETA rather than a wrong one
    assert "pt: epoch 2/4" in line and "ETA" not in line
    _log(plan.dir("ft"), 1, epoch_s=20.0)
    assert prog.eta_s() == 2 * 5.0 + 2 * 20.0


def test_quiet_prints_submissions_and_failures_only(tmp_path, capsys):
    plan = _plan(tmp_path)
    prog = Progress(plan, quiet=True, estimates={"pt": 40.0})
    job = SimpleNamespace(job_id="7", paths=SimpleNamespace(stdout=tmp_path / "7_0_log.out"))
    prog.set("pt", "submitted", "(job 7)")
    prog.submitted(job)
    _log(plan.dir("pt"), 2)
    prog.poll({"pt": job}, {"pt": ["pt"]})
    prog.set("pt", "done")
    prog.set("ft", "running")
    prog.set("ft", "failed", "RuntimeError: boom")
    prog.set("ev0", "blocked", "(input ft failed)")
    out = capsys.readouterr().out
    assert "pt: submitted (job 7)" in out and f"log: {tmp_path / '7_0_log.out'}" in out
    assert "ft: failed RuntimeError: boom" in out and "ev0: blocked" in out
    assert "epoch" not in out and "done |" in out and ": done" not in out and "running" not in out


def test_results_table_from_a_results_tree(tmp_path):
    plan = _plan(tmp_path)
    for sid, top1 in (("ev0", 71.234), ("t-ev", 80.5)):
        plan.dir(sid).mkdir(parents=True)
        (plan.dir(sid) / "result.json").write_text(json.dumps({"top1": top1}))
    plan.dir("ev1").mkdir()
    (plan.dir("ev1") / "error.json").write_text("{}")
    lines = results_table(plan).splitlines()
    assert lines[0].startswith("results: table2 (smoke)")
    assert lines[1].split() == ["row", "seed", "top-1", "teacher", "top-1"]
    assert lines[2].split() == ["dmae", "0", "71.23", "80.50"]
    assert lines[3].split() == ["dmae", "1", "failed", "80.50"]


# keep_checkpoints on a real (tiny) stage
DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=64,
            test_subset=32, eval_crop_pct=1.0)
PT = dict(epochs=1, warmup_epochs=0, batch_size=32, accum_iter=1, blr=1.5e-3, min_lr=0.0, weight_decay=0.05,
          betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper", norm_pix_loss=False)
SPEC = dict(kind="pretrain", objective="mae", model=dict(preset="vit_w48d3_dec48d1", patch_size=4), pretrain=PT, seed=0,
            data=DATA, name="pt")
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)


def test_checkpoints_deleted_when_done_unless_kept(tmp_path):
    n = torch.get_num_threads()
    try:
        run_stage(SPEC, tmp_path / "a", {}, RUNTIME, "pt")
        run_stage(SPEC, tmp_path / "b", {}, dict(RUNTIME, keep_checkpoints=True), "pt")
    finally:
        torch.set_num_threads(n)
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "model.pth").exists() and (a / "result.json").exists() and not list(a.glob("checkpoint-*"))
    assert (b / "checkpoint-last.pth").exists() and (b / "model.pth").exists()
    assert "keep_checkpoints" in json.loads((b / "config.json").read_text())["runtime"]
