"""Validity follows the graph: a finished stage counts only while every input it consumed is done and holds the bytes
it read (result.json records their sha256, and its own model's). A stale chain is never reported as done (the
reason names the stage that broke it); the next run moves it aside and recomputes it, ending where a clean run
ends."""
import hashlib
import json
import shutil

import pytest
import torch

from harness.report.collect import collect
from harness.plan.config import load_config
from harness.plan.graph import build_plan, describe
from harness.run.cli import run_table
from harness.core.rundir import STALE_DIR, RunTree, sha256_file

pytestmark = pytest.mark.slow

ARGS = ["profile=smoke", "launcher=debug", "report=false", "teacher.train=false", "~rows.kd_finetuned_teacher",
        "~rows.dmae_75", "~rows.dmae_95", "~rows.dmae_98", "data.test_subset=128", "~rows.scratch",
        "probe.enabled=false"]


def finished(tmp_path, name):
    args = ARGS + [f"results_root={tmp_path / name}"]
    assert run_table("table2", args) == 0
    plan = build_plan(load_config("table2", args))
    return args, plan, plan.cells[0]


def fingerprint(plan):
    out = {}
    for sid in plan.stages:
        d = plan.dir(sid)
        res = json.loads((d / "result.json").read_text())
        model = d / "model.pth"
        out[sid] = (hashlib.sha256(model.read_bytes()).hexdigest() if model.exists() else None, res.get("top1"))
    return out


def test_result_records_what_it_consumed_and_produced(tmp_path):
    _, plan, cell = finished(tmp_path, "a")
    pt = json.loads((plan.dir(cell.pretrain) / "result.json").read_text())
    ft = json.loads((plan.dir(cell.finetune) / "result.json").read_text())
    ev = json.loads((plan.dir(cell.evaluate) / "result.json").read_text())
    assert pt["model_sha256"] == sha256_file(plan.dir(cell.pretrain) / "model.pth") and pt["inputs"] == {}
    (role, used), = ft["inputs"].items()
    assert used == {"path": str(plan.dir(cell.pretrain) / "model.pth"), "sha256": pt["model_sha256"]}
    assert ev["inputs"][next(iter(ev["inputs"]))]["sha256"] == ft["model_sha256"]
    assert ft["runtime"]["threads"] is not None and ft["git_commit"]
    assert RunTree.of(plan).stale() == {}


def test_failed_upstream_makes_the_chain_stale_named_in_the_report_and_the_rerun_recomputes_it(tmp_path, capsys):
    """The issue's case: a finished row whose pre-training lost result.json and model.pth and got an unreadable
    checkpoint-last."""
    args, plan, cell = finished(tmp_path, "broken")
    clean = fingerprint(plan)
    old_top1 = json.loads((plan.dir(cell.evaluate) / "result.json").read_text())["top1"]
    pre = plan.dir(cell.pretrain)
    (pre / "result.json").unlink()
    (pre / "model.pth").unlink()
    (pre / "checkpoint-last.pth").write_bytes(b"not a checkpoint")

    stale = RunTree.of(plan).stale()
    assert set(stale) == {cell.finetune, cell.evaluate}
    assert "its input" in stale[cell.finetune] and cell.pretrain in stale[cell.finetune]
    c = collect(plan.root)
    row = c.cells.iloc[0]
    assert row["status"] != "done" and row["top1"] != row["top1"]  # NaN: no number from a stale chain
    assert cell.pretrain in row["reason"], row["reason"]
    assert (c.stages.set_index("stage_id").at[cell.evaluate, "status"]) == "stale"

    capsys.readouterr()
    assert run_table("table2", args) == 1  # the pre-training refuses its unreadable checkpoint-last (error.json)
    out = capsys.readouterr().out
    assert f"{cell.finetune}: stale" in out and f"{cell.evaluate}: stale" in out
    assert "no readable checkpoint to resume from" in json.loads((pre / "error.json").read_text())["error"]
    moved = sorted((plan.root / STALE_DIR).iterdir())
    assert [p.name.split(".")[0] for p in moved] == sorted([cell.evaluate, cell.finetune])
    assert json.loads((moved[0] / "result.json").read_text())  # moved aside, not deleted
    assert "why" in json.loads((moved[0] / "stale.json").read_text())
    row = collect(plan.root).cells.iloc[0]  # the row is not shown as done, and the reason names the pre-training
    assert row["status"] == "failed" and row["top1"] != row["top1"] and cell.pretrain in row["reason"]

    (pre / "checkpoint-last.pth").unlink()  # what the error message says to do
    with pytest.warns(UserWarning, match="no complete checkpoint to resume from; starting from scratch"):
        assert run_table("table2", args) == 0
    assert collect(plan.root).cells.iloc[0]["status"] == "done"
    assert fingerprint(plan) == clean  # recomputed downstream = a clean run
    assert json.loads((plan.dir(cell.evaluate) / "result.json").read_text())["top1"] == old_top1


def test_upstream_recomputed_with_other_weights_invalidates_its_consumers(tmp_path, capsys):
    args, plan, cell = finished(tmp_path, "changed")
    pre = plan.dir(cell.pretrain)
    ckpt = torch.load(pre / "model.pth", weights_only=True)  # official format: {"model": state dict, ...}
    key = next(k for k, v in ckpt["model"].items() if torch.is_floating_point(v))
    ckpt["model"][key] = ckpt["model"][key] + 0.01  # as if the pre-training had been rerun and ended elsewhere
    torch.save(ckpt, pre / "model.pth")
    res = json.loads((pre / "result.json").read_text())
    res["model_sha256"] = sha256_file(pre / "model.pth")
    (pre / "result.json").write_text(json.dumps(res))

    stale = RunTree.of(plan).stale()
    assert set(stale) == {cell.finetune, cell.evaluate}
    assert "recomputed with other weights" in stale[cell.finetune]
    listing = describe(plan)  # --dry-run
    assert f"[  stale] {cell.finetune}" in listing and "would be moved aside and recomputed" in listing
    assert collect(plan.root).cells.iloc[0]["status"] == "stale"
    assert run_table("table2", args) == 0
    ft = json.loads((plan.dir(cell.finetune) / "result.json").read_text())
    assert next(iter(ft["inputs"].values()))["sha256"] == res["model_sha256"]
    assert RunTree.of(plan).stale() == {} and collect(plan.root).cells.iloc[0]["status"] == "done"


def test_a_changed_user_checkpoint_makes_its_consumers_stale(tmp_path):
    from harness.core.rundir import broken_input
    ckpt = tmp_path / "teacher.pth"
    ckpt.write_bytes(b"weights v1")
    res = {"inputs": {"teacher": {"path": str(ckpt), "sha256": sha256_file(ckpt)}}}
    ok = broken_input(res, {"teacher": f"file:{ckpt}"}, lambda s: "done", lambda s: {}, sha256_file)
    assert ok is None
    ckpt.write_bytes(b"weights v2")
    why = broken_input(res, {"teacher": f"file:{ckpt}"}, lambda s: "done", lambda s: {}, sha256_file)
    assert "changed since it was read" in why
    ckpt.unlink()
    assert "missing" in broken_input(res, {"teacher": f"file:{ckpt}"}, lambda s: "done", lambda s: {},
                                     lambda p: None)
    # a result written before inputs were recorded is trusted as far as its inputs are done
    assert broken_input({}, {"model": "up"}, lambda s: "done", lambda s: {"model_sha256": "x"}, sha256_file) is None
    assert "is failed" in broken_input({}, {"model": "up"}, lambda s: "failed", lambda s: None, sha256_file)


@pytest.mark.parametrize("consumers", ["kept", "removed"])
def test_a_damaged_model_under_an_intact_result_is_recomputed_by_one_plain_rerun(tmp_path, capsys, consumers):
    """A finished pre-training's model.pth truncated while its result.json stays intact: the stage is not done (its
    model no longer has the sha256 its result records), the message names the damaged file, and one plain rerun moves
    it and its consumers aside and ends where a clean run ends. With its consumers removed first, the fine-tune no
    longer fails on the damaged upstream file (its error recorded against the fine-tune, on every rerun)."""
    args, plan, cell = finished(tmp_path, consumers)
    clean = fingerprint(plan)
    model = plan.dir(cell.pretrain) / "model.pth"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    if consumers == "removed":
        for sid in (cell.finetune, cell.evaluate):
            shutil.rmtree(plan.dir(sid))

    tree = RunTree.of(plan)
    stale = tree.stale()
    assert "damaged" in stale[cell.pretrain] and str(model) in stale[cell.pretrain]
    assert set(stale) == ({cell.pretrain, cell.finetune, cell.evaluate} if consumers == "kept" else {cell.pretrain})
    assert f"[  stale] {cell.pretrain}" in describe(plan)  # --dry-run no longer lists it done
    assert collect(plan.root).cells.iloc[0]["status"] != "done"

    capsys.readouterr()
    assert run_table("table2", args) == 0  # one plain rerun
    out = capsys.readouterr().out
    assert f"{cell.pretrain}: stale, its model file {model} is damaged" in out
    assert fingerprint(plan) == clean  # bit-identical to the clean run
    assert RunTree.of(plan).stale() == {} and collect(plan.root).cells.iloc[0]["status"] == "done"
    moved = [p for p in (plan.root / STALE_DIR).iterdir() if p.name.startswith(cell.pretrain)]
    assert len(moved) == 1 and (moved[0] / "model.pth").stat().st_size == len(data) // 2  # kept, not deleted
