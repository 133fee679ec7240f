"""Corrupt, truncated or missing files: checkpoints fall back to the previous good one with a warning (and keep two
good ones through repeated corruption); a stage never starts from epoch 0 without saying so; collection and the report
name bad result/log/error files and go on.

Covered elsewhere, not repeated here: a truncated checkpoint-last falls back to checkpoint-prev with identical final
weights (tests/test_resume.py::test_corrupt_last_falls_back_to_prev), load_last on garbage/empty files
(tests/test_checkpoints.py), a half-written log line, an unreadable result.json and a stray stage directory in the
report (tests/test_report.py::test_corrupt_result_is_named_and_skipped), kills during every write
(tests/test_faults_kill.py).
"""
import json
import warnings

import pytest
import torch

import harness.core.train as train_mod
from harness.core.checkpoints import LAST, PREV, CheckpointError, load_last, safe_load, save_last, state_dict_of
from harness.core.stages import run_stage
from harness.core.rundir import ATTEMPT_FIELDS

DATA = dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=64,
            test_subset=32, eval_crop_pct=1.0)
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)
TIMING = ATTEMPT_FIELDS  # the fields in which an interrupted run may differ from a clean one


def spec(epochs=3):
    pt = dict(epochs=epochs, warmup_epochs=1, batch_size=16, accum_iter=1, blr=1.5e-3, min_lr=0.0, weight_decay=0.05,
              betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75, visible_rounding="paper", norm_pix_loss=False)
    return dict(kind="pretrain", name="pt", seed=1, data=DATA, model=dict(preset="vit_w32d2_dec32d1", patch_size=4),
                objective="mae", pretrain=pt)


class Interrupted(Exception):
    pass


def run_until(monkeypatch, run_dir, epoch, s=None):
    """Run the stage and stop it right after the checkpoint of `epoch` (as a pre-emption would)."""
    real = train_mod.save_last

    def save_then_die(state, d):
        real(state, d)
        if state["epoch"] == epoch:
            raise Interrupted(epoch)

    monkeypatch.setattr(train_mod, "save_last", save_then_die)
    with pytest.raises(Interrupted):
        run_stage(s or spec(), run_dir, {}, RUNTIME, "pt")
    monkeypatch.undo()


def weights(d):
    return state_dict_of(safe_load(d / "model.pth"))


def same(a, b):
    wa, wb = weights(a), weights(b)
    logs = [[{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in (d / "log.jsonl").read_text()
             .splitlines()] for d in (a, b)]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and logs[0] == logs[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run_stage(spec(), d, {}, RUNTIME, "pt")
    return d


# ------------------------------------------------------------------------------------------------- checkpoints


def test_fresh_start_says_so(tmp_path, capsys):
    run_stage(spec(epochs=1), tmp_path, {}, RUNTIME, "pt")
    assert f"[pt] starting from scratch (no checkpoint in {tmp_path})" in capsys.readouterr().out


def test_log_without_checkpoint_warns_loudly_before_starting_over(tmp_path, capsys, reference):
    (tmp_path / "log.jsonl").write_text((reference / "log.jsonl").read_text())  # 3 epochs, no checkpoint
    (tmp_path / ".checkpoint-last.pth.tmp-999999").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.warns(UserWarning, match=r"log.jsonl records 3 epoch\(s\) and an interrupted checkpoint write left "
                                         r"\.checkpoint-last\.pth\.tmp-999999.*starting from scratch at epoch 0"):
        res = run_stage(spec(), tmp_path, {}, RUNTIME, "pt")
    out = capsys.readouterr().out
    assert "WARNING: [pt]" in out and "starting from scratch at epoch 0" in out
    assert "removed .checkpoint-last.pth.tmp-999999" in out
    assert res["resumed_from_epoch"] == 0 and same(reference, tmp_path)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_stale_temp_files_of_other_writes_are_removed_and_named(tmp_path, capsys, reference):
    for name in (".model.pth.tmp-4242", ".result.json.tmp-4242", ".log.jsonl.tmp-4242", ".config.json.tmp-4242"):
        (tmp_path / name).write_text("partial")
    run_stage(spec(), tmp_path, {}, RUNTIME, "pt")
    out = capsys.readouterr().out
    assert out.count("left by an interrupted run") == 4 and ".model.pth.tmp-4242" in out
    assert not list(tmp_path.glob(".*.tmp-*")) and same(reference, tmp_path)


@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_unreadable_last_falls_back_to_prev_and_is_moved_aside(tmp_path, monkeypatch, reference, damage, capsys):
    run_until(monkeypatch, tmp_path, 2)
    (tmp_path / LAST).write_bytes(b"" if damage == "empty" else bytes(range(256)) * 40)
    with pytest.warns(UserWarning, match="resuming from .*checkpoint-prev.pth instead"):
        res = run_stage(spec(), tmp_path, {}, RUNTIME, "pt")
    assert res["resumed_from_epoch"] == 1 and same(reference, tmp_path)
    assert (tmp_path / (LAST + ".corrupt")).exists()  # kept for inspection, never rotated over the good one
    assert "moved aside to checkpoint-last.pth.corrupt" in capsys.readouterr().out


def test_repeated_corruption_still_leaves_a_good_checkpoint(tmp_path, monkeypatch, reference):
    """Corrupt checkpoint-last, resume (from prev) and stop again right after the next checkpoint, then corrupt that
    one too: without moving the bad file aside the rotation would have put it into checkpoint-prev, leaving nothing
    readable. Keeping the last two *good* checkpoints means the second fallback still works."""
    run_until(monkeypatch, tmp_path, 2)
    (tmp_path / LAST).write_bytes(b"\x00torn")
    with pytest.warns(UserWarning):
        run_until(monkeypatch, tmp_path, 2)  # resumed from epoch 1, wrote epoch 2 again
    assert safe_load(tmp_path / PREV)["epoch"] == 1 and safe_load(tmp_path / LAST)["epoch"] == 2
    (tmp_path / LAST).write_bytes(b"\x00torn again")
    with pytest.warns(UserWarning, match="checkpoint-prev.pth instead"):
        res = run_stage(spec(), tmp_path, {}, RUNTIME, "pt")
    assert res["resumed_from_epoch"] == 1 and same(reference, tmp_path)


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tmp_path, monkeypatch):
    run_until(monkeypatch, tmp_path, 2)
    (tmp_path / LAST).write_bytes(b"torn")
    (tmp_path / PREV).write_bytes(b"")
    log_before = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(CheckpointError, match="no readable checkpoint to resume from"):
        run_stage(spec(), tmp_path, {}, RUNTIME, "pt")
    assert (tmp_path / "log.jsonl").read_text() == log_before  # nothing restarted, nothing overwritten
    assert "no readable checkpoint" in json.loads((tmp_path / "error.json").read_text())["error"]
    assert not (tmp_path / "result.json").exists()


def test_missing_last_with_prev_resumes_from_prev_with_a_warning(tmp_path):
    """Killed between save_last's two renames: only checkpoint-prev is there."""
    save_last({"epoch": 1}, tmp_path)
    save_last({"epoch": 2}, tmp_path)
    (tmp_path / LAST).unlink()
    logged = []
    with pytest.warns(UserWarning, match="checkpoint-last.pth is missing.*resuming from .*checkpoint-prev.pth"):
        assert load_last(tmp_path, log=logged.append)["epoch"] == 1
    assert logged and "WARNING" in logged[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_last({"epoch": 2}, tmp_path)  # no checkpoint-last to rotate: prev (epoch 1) stays
        assert load_last(tmp_path, log=lambda m: None)["epoch"] == 2
    assert safe_load(tmp_path / PREV)["epoch"] == 1


# ------------------------------------------------------------------------------------ collection and the report


@pytest.fixture
def tree(tmp_path):
    """A results tree of the smoke plan with made-up results (no training): every stage done."""
    from harness.plan.config import load_config
    from harness.plan.graph import build_plan, write_manifest
    from harness.core.rundir import write_json
    cfg = load_config("table2", ["profile=smoke", f"results_root={tmp_path / 'results'}"])
    plan = build_plan(cfg)
    write_manifest(plan, cfg, "test", [])
    for i, (sid, st) in enumerate(plan.stages.items()):
        d = plan.dir(sid)
        d.mkdir(parents=True)
        res = {"stage_id": sid, "kind": st.kind, "name": st.spec.name, "status": "done", "wall_s": 1.0,
               "device_hours": 1 / 3600, "images_per_s": 100.0, "device": "cpu", "device_name": "x86_64",
               "world_size": 1, "host": "test"}
        if st.kind == "evaluate":
            res.update(top1=50.0 + i, top5=90.0, n_eval=256)
        elif st.kind == "finetune":
            res.update(best_top1=50.0, best_epoch=1, last_top1=50.0, last_top5=90.0, final_loss=1.0)
            (d / "log.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0, "top1": 50.0}) + "\n")
        else:
            res.update(final_loss=1.0)
            (d / "log.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0}) + "\n")
        write_json(res, d / "result.json")
        write_json({"stage_id": sid, "spec": st.spec}, d / "config.json")
    return plan


def _report(plan, tmp_path):
    from harness.report.markdown import write_report
    return write_report(plan.root, tmp_path / "reports", figures=False).read_text()


def test_corrupt_log_config_and_error_files_are_named_and_the_report_goes_on(tree, tmp_path):
    from harness.report.collect import collect
    cells = {c.row: c for c in tree.cells}
    pre = tree.dir(cells["dmae_75"].pretrain)
    (pre / "log.jsonl").write_bytes(b'{"epoch": 1, "loss": 1.0}\n{"epoch": 2, "lo\x00\xff')  # truncated mid-write
    ft = tree.dir(cells["mae"].finetune)
    (ft / "config.json").write_text("{not json at all")  # read by nothing the report needs: linked, not parsed
    ev = tree.dir(cells["dmae_95"].evaluate)
    (ev / "result.json").unlink()
    (ev / "error.json").write_text("")  # an empty error.json: the stage still shows as failed
    ev98 = tree.dir(cells["dmae_98"].evaluate)
    (ev98 / "result.json").write_text("[1, 2, 3]\n")  # JSON, but not an object

    c = collect(tree.root)
    warn = "\n".join(c.warnings)
    assert f"{pre / 'log.jsonl'}: line 2 is not a JSON record; skipped" in warn
    assert f"{ev / 'error.json'}: unreadable error file" in warn
    assert f"{ev98 / 'result.json'}: unreadable result file" in warn
    st = c.cells.set_index("row")["status"]
    assert st["dmae_95"] == "failed" and st["dmae_98"] == "unreadable" and st["mae"] == "done"
    assert c.stages.set_index("stage_id").at[pre.name, "epochs_logged"] == 1

    text = _report(tree, tmp_path)
    warnings_section = text.split("## Warnings", 1)[1].split("## Results", 1)[0]
    shown = lambda p: f"results/{p.relative_to(tree.root.parent.parent).as_posix()}"  # noqa: E731 (report's paths)
    for needle in (f"{shown(pre / 'log.jsonl')}: line 2", f"{shown(ev / 'error.json')}: unreadable error file",
                   f"{shown(ev98 / 'result.json')}: unreadable result file"):
        assert needle in warnings_section
    assert "unreadable error.json" in text  # the failed stage's reason
    assert "| `mae` " in text and "1/1 done" in text


def test_report_of_a_tree_with_every_result_missing_still_renders(tree, tmp_path):
    for sid in tree.stages:
        (tree.dir(sid) / "result.json").unlink()
        (tree.dir(sid) / "log.jsonl").unlink(missing_ok=True)
    text = _report(tree, tmp_path)
    assert "not started" in text and "## Results" in text


def test_result_without_world_size_does_not_crash_the_report(tree, tmp_path):
    ev = tree.dir(tree.cells[0].evaluate) / "result.json"
    res = json.loads(ev.read_text())
    del res["world_size"]
    ev.write_text(json.dumps(res))
    assert "## Results" in _report(tree, tmp_path)
