"""Messages for bad input (issue 24): each is one clear error, before anything is submitted (already under --dry-run),
naming the config key to fix. Batches larger than the images a stage reads, Slurm-only launcher keys under a launcher
that ignores them, "did you mean" for key and row typos, checkpoint errors naming their key, `harness.core.stages
--help`,
`--cfg job`, and `source: user` claims."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.plan.config import ConfigError, load_config, validate_claims
from harness.plan.graph import build_plan
from harness.run.cli import main
from harness.run.preflight import check_batches
from harness.report.stats import PAPER_EXCLUDED, UNSURE, gate_verdict, judge

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _never_execute(monkeypatch):
    """Should a check let a bad input through (or --cfg job go on to run), fail at once instead of running it."""
    def execute(*a, **k):
        raise AssertionError("harness.run.launch.execute was reached")
    monkeypatch.setattr("harness.run.launch.execute", execute)


def refused(capsys, tmp_path, overrides, table="table2"):
    """The command (with --dry-run) exits 2 with one error, and nothing exists under the results root. Returns the
    error text."""
    results = tmp_path / "results"
    capsys.readouterr()
    code = main([table, "profile=smoke", f"results_root={results}", *overrides, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("error:") == 1 and "Nothing was submitted" in err, err
    assert "Traceback" not in err
    assert not results.exists(), list(results.rglob("*"))
    return err


# ------------------------------------------------------------------------------------------ batches vs images
def test_batch_larger_than_the_images_a_stage_reads_is_refused(capsys, tmp_path):
    # smoke: 512 pre-training images (data.train_subset), one device under launcher=local without GPUs
    err = refused(capsys, tmp_path, ["pretrain.batch_size=1024"])
    assert "pretrain.batch_size=1024 is larger than the 512 training images" in err
    assert "data.train_subset=512" in err and "fail at run time" in err
    assert "Set pretrain.batch_size to at most 512" in err
    # a fine-tune reads data.finetune_subset images
    err = refused(capsys, tmp_path, ["data.finetune_subset=100", "finetune.batch_size=128"])
    assert "finetune.batch_size=128 is larger than the 100 training images" in err
    assert "data.finetune_subset=100" in err
    # the teacher's sections and a row's override are named as such
    err = refused(capsys, tmp_path, ["teacher.pretrain.batch_size=600"])
    assert "teacher.pretrain.batch_size=600 is larger than the 512 training images" in err
    err = refused(capsys, tmp_path, ["+rows.dmae_95.pretrain.batch_size=600"])
    assert "rows.dmae_95.pretrain.batch_size=600" in err and "(row dmae_95)" in err
    # world size: 4 local CPU tasks each read 512 // 4 = 128 images, so a per-device batch of 256 has no full batch
    err = refused(capsys, tmp_path, ["launcher.tasks_per_node=4", "pretrain.batch_size=256"])
    assert "pretrain.batch_size=256 per device x 4 device(s) = 1024 images is larger than the 512" in err
    assert "at most 128" in err
    # accumulation: 8 steps of 64 per epoch but 16 steps per update -> the optimizer would never step
    err = refused(capsys, tmp_path, ["pretrain.effective_batch=1024"])
    assert "pretrain.effective_batch=1024" in err and "64 per device x 16 accumulation step(s)" in err
    assert "512 training images" in err and "would never step" in err
    err = refused(capsys, tmp_path, ["pretrain.accum_iter=9"])
    assert "pretrain.accum_iter=9" in err and "an epoch would have 8 step(s)" in err
    # a holdout that leaves no training image (data.split would fail in the job)
    err = refused(capsys, tmp_path, ["data.holdout=60000", "data.train_subset=0"])
    assert "data.holdout=60000 leaves no training image of the 60000" in err
    # the limits themselves pass: 512 images hold one batch of 512, and 8 steps of 64 one update of 8
    for ok in (["pretrain.batch_size=512"], ["pretrain.accum_iter=8"], ["data.finetune_subset=100",
                                                                         "finetune.batch_size=100"]):
        cfg = load_config("table2", ["profile=smoke", f"results_root={tmp_path / 'r'}", *ok])
        assert check_batches(build_plan(cfg), cfg) == [], ok


# ------------------------------------------------------------------------------------------- launcher keys
def test_slurm_only_launcher_keys_under_local_are_refused(capsys, tmp_path):
    err = refused(capsys, tmp_path, ["launcher.partition=gpu"])
    assert "launcher.partition=gpu: would be ignored by launcher=local" in err and "launcher=slurm" in err
    err = refused(capsys, tmp_path, ["launcher.mem_gb=16", "launcher.account=proj",
                                     "+launcher.additional_parameters.time=60"])
    assert "launcher.mem_gb=16, launcher.account=proj, +launcher.additional_parameters.time=60: would be ignored " \
           "by launcher=local" in err
    err = refused(capsys, tmp_path, ["launcher=debug", "launcher.nodes=2"])
    assert "launcher.nodes=2: would be ignored by launcher=debug" in err
    # what the local launcher does use is accepted, and so are the Slurm keys under launcher=slurm or the profile's
    # own (smoke sets launcher.mem_gb for every launcher)
    load_config("table2", ["profile=smoke", "launcher.timeout_min=30", "launcher.tasks_per_node=2",
                           "launcher.max_parallel=1"])
    cfg = load_config("table2", ["profile=smoke", "launcher=slurm", "launcher.partition=gpu", "launcher.mem_gb=16"])
    assert cfg.launcher.partition == "gpu"
    assert load_config("table2", ["profile=smoke"]).launcher.mem_gb == 3


# ------------------------------------------------------------------------------------------- did you mean
def test_key_and_row_typos_say_did_you_mean_in_one_message(capsys, tmp_path):
    err = refused(capsys, tmp_path, ["pretrain.mask_ration=0.5"])
    assert "Could not override 'pretrain.mask_ration': no key 'mask_ration' in pretrain; did you mean " \
           "pretrain.mask_ratio?" in err
    assert "To append" not in err and "+pretrain" not in err  # appending would only fail again
    err = refused(capsys, tmp_path, ["+pretrain.mask_ration=0.5"])
    assert "did you mean pretrain.mask_ratio?" in err
    err = refused(capsys, tmp_path, ["teacher.modle.preset=vit_base"])
    assert "did you mean teacher.model.preset?" in err
    # a row typo: the row is named, with the closest row and the table's rows, and nothing leads to a second error
    for override in ("rows.dmae_7.pretrain.mask_ratio=0.9", "+rows.dmae_7.pretrain.mask_ratio=0.9"):
        err = refused(capsys, tmp_path, [override])
        assert "table 'table2' has no row 'dmae_7'; did you mean rows.dmae_75.pretrain.mask_ratio?" in err, err
        assert "rows: dmae_75, dmae_95, dmae_98, kd_finetuned_teacher, mae, scratch" in err
        assert "To append" not in err and "RowConfig" not in err
    err = refused(capsys, tmp_path, ["~rows.maee"])
    assert "Could not delete 'rows.maee': table 'table2' has no row 'maee'; did you mean rows.mae?" in err
    # inside a row's override section, and for a profile name
    err = refused(capsys, tmp_path, ["+rows.mae.pretrain.mask_ration=0.5"])
    assert "rows.mae.pretrain.mask_ration" in err and "did you mean rows.mae.pretrain.mask_ratio?" in err
    err = refused(capsys, tmp_path, ["profile=smok"])
    assert "did you mean profile=smoke?" in err
    # an unknown table
    capsys.readouterr()
    assert main(["tabel2", "--dry-run"]) == 2
    assert "unknown table 'tabel2'; did you mean table2?" in capsys.readouterr().err
    # a key with a valid name but missing from a row's dict keeps hydra's hint, which is right there
    with pytest.raises(ConfigError, match=r"\+rows.mae.pretrain.mask_ratio=0.5"):
        load_config("table2", ["profile=smoke", "rows.mae.pretrain.mask_ratio=0.5"])


# ------------------------------------------------------------------------------------------- checkpoint keys
def test_checkpoint_errors_name_the_config_key(capsys, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    err = refused(capsys, tmp_path, ["teacher.train=false", f"teacher.pretrained_ckpt={tmp_path / 'missing.pth'}",
                                     f"teacher.finetuned_ckpt={bad}"])
    assert f"teacher.pretrained_ckpt={tmp_path / 'missing.pth'}: teacher checkpoint for student-pretrain-dmae" in err
    assert "checkpoint not found" in err
    assert f"teacher.finetuned_ckpt={bad}: kd_teacher checkpoint for student-finetune-kdsoft" in err
    # a row's teacher given through an interpolated key: that key is named
    err = refused(capsys, tmp_path, ["teacher.train=false", f"checkpoints.base_pretrained={bad}"], table="student_size")
    assert f"checkpoints.base_pretrained={bad}: teacher checkpoint for student-pretrain-dmae" in err


# ------------------------------------------------------------------------------------------- harness.core.stages
def test_stages_help_exits_0():
    out = subprocess.run([sys.executable, "-m", "harness.core.stages", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m harness.core.stages") and "run_dir" in out.stdout
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------- --cfg job
def test_cfg_job_prints_the_composed_config_and_submits_nothing(capsys, tmp_path, monkeypatch):
    def no_preflight(*a, **k):
        raise AssertionError("--cfg job planned or checked the run")
    monkeypatch.setattr("harness.run.cli.check_inputs", no_preflight)
    results = tmp_path / "results"
    capsys.readouterr()
    code = main(["table2", "profile=smoke", "seeds=3", "rows.dmae_95.pretrain.mask_ratio=0.9",
                 f"results_root={results}", "--cfg", "job"])
    out = capsys.readouterr().out
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["table"] == "table2" and cfg["profile"] == "smoke" and cfg["seeds"] == 3
    assert cfg["rows"]["dmae_95"]["pretrain"]["mask_ratio"] == 0.9 and cfg["results_root"] == str(results)
    assert cfg["student"]["preset"] == cfg["models"]["base"] == "vit_w32d2_dec32d1"  # resolved, not ${models.base}
    assert not results.exists()
    # a sweep: one YAML document per point
    assert main(["table2", "profile=smoke", f"results_root={results}", "-m", "seed=0,1", "--cfg", "job"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["seed"] for d in docs] == [0, 1] and not results.exists()
    # a bad override is still an error; hydra's own --cfg hydra is refused plainly
    assert main(["table2", "pretrain.mask_ration=0.5", "--cfg", "job"]) == 2
    assert main(["table2", "--cfg", "hydra"]) == 2
    assert "only --cfg job is supported" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- source: user
def test_user_claims_are_accepted_and_never_set_against_the_paper():
    cfg = load_config("table2", ["profile=smoke", "claims.0.source=user"])
    assert cfg.claims[0].source == "user"
    validate_claims(cfg)
    with pytest.raises(ConfigError, match=r"source='usr' must be one of paper, official-default, user .*did you "
                                          r"mean user\?"):
        load_config("table2", ["profile=smoke", "claims.0.source=usr"])
    cfg.claims[0].source = "bogus"
    with pytest.raises(ConfigError, match="source='bogus' must be one of"):
        validate_claims(cfg)
    # judged like a paper claim, but the paper's a - b is not used and a failed gate does not replace its verdict
    cells = pd.DataFrame([{"row": r, "seed": s, "status": "done", "top1": 50.0 + s + (d if r == "a" else 0.0)}
                          for s, d in enumerate([0.1, 0.2, 0.0]) for r in ("a", "b")])
    claim = {"id": "mine", "text": "a beats b", "a": ["a"], "b": ["b"], "test": "greater", "margin": 0.0}
    assert judge(claim | {"source": "paper"}, cells, paper=1.2)["verdict"] == PAPER_EXCLUDED
    r = judge(claim | {"source": "user"}, cells, paper=1.2)
    assert r["verdict"] == UNSURE and r["paper_value"] is None and r["seeds_paper"] == "" and r["source"] == "user"
    assert gate_verdict(r, ["mae_vs_scratch"]) == r
