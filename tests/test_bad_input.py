"""Bad input is refused with a clear error before any job is submitted, and the results root holds no stage
directory afterwards (it is not even created). Each case goes through the command line entry point (exit code 2,
"Nothing was submitted.").

Already covered elsewhere (not repeated): config key typos, mask_ratio >= 1, aligned blocks beyond depth, unknown
preset, wrong types for epochs, unknown launcher, bad choices, odd batch with mixup, img_size vs patch, seeds=0,
row-override typos, the paper profile's required paths, unknown table (tests/test_plan.py); a missing Fashion-MNIST
folder, a teacher checkpoint of the wrong shape or missing (tests/test_reproduce.py); an unknown partition on a real
Slurm (tests/test_slurm.py); an unsafe pickle as teacher (tests/test_security.py).
"""
import os
import re
import stat

import pytest
import torch
from PIL import Image

from harness.plan.config import load_config
from harness.core.models import PRESETS, build_classifier, build_mae
from harness.plan.graph import build_plan
from harness.core.spec import spec_dict
from harness.run.cli import main
from harness.run.preflight import check_inputs, check_slurm

BAD_CONFIG = [
    # effective batch (new): accum_iter = effective_batch / (batch_size x nodes x max(1, gpus_per_node))
    (["pretrain.effective_batch=100"], r"pretrain.effective_batch=100 is not a positive multiple of batch_size 64 x 1 "
                                       r"device\(s\) = 64 per step \(accum_iter would be 1.5625\)"),
    (["run.device=cuda", "launcher.gpus_per_node=8", "pretrain.batch_size=100", "pretrain.effective_batch=4096"],
     r"effective_batch=4096 is not a positive multiple of batch_size 100 x 8 device\(s\) = 800 per step"),
    # the local launcher starts one task per GPU of this machine: 3 processes (launcher.nodes is Slurm's)
    (["run.device=cuda", "launcher.gpus_per_node=3", "finetune.effective_batch=1024"],
     r"finetune.effective_batch=1024 is not a positive multiple of batch_size 64 x 3 device\(s\) = 192"),
    (["teacher.pretrain.effective_batch=32"], r"teacher.pretrain.effective_batch=32 .* \(accum_iter would be 0.5\)"),
    (["+rows.dmae_95.finetune.effective_batch=96"], r"rows.dmae_95.finetune.effective_batch=96"),
    # unknown keys, wrong types
    (["foo=1"], r"Could not override 'foo'"),
    (["+pretrain.mask_ration=0.5"], r"pretrain.mask_ration: Key 'mask_ration' not in 'PretrainConfig'"),
    (["+launcher.partitions=gpu"], r"launcher.partitions: Key 'partitions' not in 'LauncherConfig'"),
    (["+rows.mae.seeds=3"], r"rows.mae.seeds: Key 'seeds' not in 'RowConfig'"),
    (["pretrain.norm_pix_loss=maybe"], r"norm_pix_loss"),
    (["seeds=two"], r"seeds=two: Value 'two' of type 'str' could not be converted to Integer"),  # hydra's reason
    (["pretrain.effective_batch=lots"], r"effective_batch"),
    (["rows.dmae_95.pretrain.mask_ratio=high"], r"rows.dmae_95.pretrain.mask_ratio: Value 'high' of type 'str' "
                                                 r"could not be converted to Float"),
    # accepted and then ignored, once
    (["hydra.run.dir=outputs/x"], r"hydra.run.dir=outputs/x: hydra's own settings \(hydra.\*\) are not used by this "
                                  r"harness.* results_root=<dir> .* reports_dir=<dir>"),
    (["teacher.pretrained_ckpt=/ckpt/mae.pth"], r"teacher.pretrained_ckpt='/ckpt/mae.pth' is given but "
                                                r"teacher.train=true .* would ignore that file"),
    # impossible values
    (["pretrain.mask_ratio=-0.1"], r"mask_ratio=-0.1 must be in \[0, 1\)"),
    (["pretrain.warmup_epochs=5"], r"warmup_epochs=5.0 must be within \[0, epochs\]"),
    (["pretrain.blr=-0.001"], r"pretrain.blr=-0.001 must be in \(0"),
    (["finetune.blr=nan"], r"finetune.blr=nan must be in"),
    (["finetune.drop_path=1.0"], r"drop_path=1.0 must be in \[0, 1\)"),
    (["finetune.reprob=1.5"], r"reprob=1.5 must be in \[0, 1\]"),
    (["kd.temperature=0"], r"kd.temperature=0.0 must be in \(0"),
    (["distill.alpha=-1"], r"distill.alpha=-1.0 must be >= 0"),
    (["distill.pairs=[[1]]"], r"\[1\] is not a \(student block, teacher block\) pair"),
    (["rows.dmae_95.method=distill"], r"rows.dmae_95.method='distill': must be one of mae, dmae, kd, scratch"),
    (["launcher.nodes=0"], r"launcher.nodes=0 must be >= 1"),
    (["launcher.timeout_min=5", "launcher.signal_delay_s=600"], r"signal_delay_s=600 must be in \[0, timeout_min"),
    (["run.nan_restarts=-1"], r"run.nan_restarts=-1 must be >= 0"),
    (["data.eval_crop_pct=1.5"], r"data.eval_crop_pct=1.5 must be in \(0, 1\]"),
    (["data.train_subset=-5"], r"train_subset=-5"),
    (["run.device=cpu", "launcher.gpus_per_node=2"], r"gpus_per_node > 0 with run.device=cpu"),
    (["run.device=cuda", "launcher.gpus_per_node=4", "launcher.tasks_per_node=2"],
     r"launcher.tasks_per_node=2 with gpus_per_node=4: a GPU job runs one task per GPU"),
    (["launcher.tasks_per_node=-1"], r"launcher.tasks_per_node=-1 must be >= 0"),
]

TRIED = []  # (overrides, first line of the error): printed after the module (list_of_bad_inputs_tried)


@pytest.fixture(autouse=True)
def _never_execute(monkeypatch):
    """Should a check let a bad input through, fail at once instead of running the table."""
    def execute(*a, **k):
        raise AssertionError("a bad input reached harness.run.launch.execute")
    monkeypatch.setattr("harness.run.launch.execute", execute)


@pytest.fixture
def results(tmp_path):
    return tmp_path / "results"


def refused(capsys, results, overrides, message, label=None):
    """The main command exits 2 with `message`, and nothing exists under the results root."""
    capsys.readouterr()
    code = main(["table2", "profile=smoke", f"results_root={results}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Nothing was submitted" in err
    assert re.search(message, err), f"{message!r} not in:\n{err}"
    assert not results.exists() or not any(results.rglob("*")), list(results.rglob("*"))
    shown = " ".join(o for o in overrides if str(results.parent) not in o) or "(defaults)"
    TRIED.append((f"{label}: {shown}" if label else shown,
                  err.splitlines()[0][len("error: "):][:170]))
    return err


@pytest.mark.parametrize("overrides, message", BAD_CONFIG, ids=[" ".join(o) for o, _ in BAD_CONFIG])
def test_bad_config_is_refused(capsys, results, overrides, message):
    refused(capsys, results, overrides, message)


def test_effective_batch_derives_accum_iter_and_keeps_stage_ids_when_unset(tmp_path):
    base = ["profile=smoke", f"results_root={tmp_path}"]
    plain = build_plan(load_config("table2", base))
    cfg = load_config("table2", base + ["run.device=cuda", "launcher.gpus_per_node=2", "pretrain.effective_batch=512",
                                        "teacher.finetune.effective_batch=128"])
    plan = build_plan(cfg)
    for s in plan.stages.values():
        sec = spec_dict(s.spec).get(s.kind) or {}
        assert "effective_batch" not in sec  # only the derived accum_iter enters the spec
        if s.role == "student-pretrain":
            assert sec["accum_iter"] == 4  # 512 / (64 x 2 GPUs)
        if s.role == "teacher-finetune":
            assert sec["accum_iter"] == 1  # 128 / (64 x 2)
    # a config without effective_batch plans exactly the stages (ids) it did before the option existed
    explicit = build_plan(load_config("table2", base + ["pretrain.accum_iter=1"]))
    assert list(plain.stages) == list(explicit.stages)
    same = build_plan(load_config("table2", base + ["pretrain.effective_batch=64"]))  # = 64 x 1 x 1
    assert list(same.stages) == list(plain.stages)


# ----------------------------------------------------------------------------------------------- datasets


def png(path, size=8, color=(128, 64, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def imagefolder(root, classes=("a", "b"), per_class=2, splits=("train", "val")):
    for split in splits:
        for c in classes:
            for i in range(per_class):
                png(root / split / c / f"{i}.png")
    return root


def tree_no_class_folders(root):
    imagefolder(root)
    for f in (root / "train").rglob("*.png"):
        f.rename(root / "train" / f"{f.parent.name}-{f.name}")
    for d in list((root / "train").iterdir()):
        if d.is_dir():
            d.rmdir()


def tree_empty_split(root):
    imagefolder(root, splits=("train",))
    for c in ("a", "b"):
        (root / "val" / c).mkdir(parents=True)


def tree_one_empty_class_late(root):  # the first five class folders have images, the sixth not
    imagefolder(root, classes=tuple("abcdef"))
    for f in (root / "train" / "f").iterdir():
        f.unlink()


def tree_class_mismatch(root):
    imagefolder(root, classes=("a", "b"), splits=("train",))
    imagefolder(root, classes=("a", "c"), splits=("val",))


def tree_no_val(root):
    imagefolder(root, splits=("train",))


def tree_not_images(root):
    imagefolder(root)
    for f in (root / "val" / "b").iterdir():
        f.rename(f.with_suffix(".txt"))


BAD_DATA = [
    ("missing folder", None, r"expected the folder .*/train"),
    ("images directly in train/, no class folders", tree_no_class_folders, r"/train has no class folders"),
    ("empty val split", tree_empty_split, r"/val: the first class folders hold no images"),
    ("a 6th class folder without images", tree_one_empty_class_late,
     r"/train: 1 class folder\(s\) hold no image \(f\)"),
    ("train/val class mismatch", tree_class_mismatch, r"train/ has 2 classes and val/ has 2; they must match"),
    ("no val split", tree_no_val, r"expected the folder .*/val"),
    ("a class folder of non-images", tree_not_images, r"/val: 1 class folder\(s\) hold no image \(b\)"),
]


@pytest.mark.parametrize("name, make, message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_imagefolder_is_refused(capsys, tmp_path, results, name, make, message):
    root = tmp_path / "imagenet"
    if make:
        make(root)
    refused(capsys, results, ["data.name=imagefolder", f"data.root={root}"], message, label=name)


def test_good_imagefolder_passes_the_checks(tmp_path):
    # 6 x 54 = 324 training images: the smoke profile's holdout (256) and one batch of 64 (harness.run.preflight
    # refuses fewer: the stages would fail at run time)
    root = imagefolder(tmp_path / "imagenet", classes=tuple("abcdef"), per_class=54)
    cfg = load_config("table2", ["profile=smoke", "data.name=imagefolder", f"data.root={root}",
                                 f"results_root={tmp_path / 'results'}"])
    check_inputs(build_plan(cfg), cfg)


def test_fashion_mnist_root_without_the_package_files_is_refused(capsys, tmp_path, results):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(capsys, results, [f"data.root={empty}"],
            r"Fashion-MNIST not found: .*train-images-idx3-ubyte.gz.* "
            r"Install Debian's package: `apt-get install dataset-fashion-mnist`",
            label="Fashion-MNIST root without the package files")


# ------------------------------------------------------------------------------------------- teacher checkpoints


def _save(path, obj):
    torch.save(obj, path)
    return path


TEACHER_ARGS = ["teacher.train=false"]


@pytest.mark.parametrize("name, make, message", [
    ("garbage bytes", lambda p: p.write_bytes(b"\x00garbage" * 512) and p,
     r"cannot read checkpoint .*garbage bytes: not a torch checkpoint"),
    ("empty file", lambda p: p.write_bytes(b"") or p,
     r"cannot read checkpoint .*empty file: not a torch checkpoint .*empty file\)"),
    ("a directory", lambda p: p.mkdir() or p, r"checkpoint not found: .*a directory"),
    ("no weights inside", lambda p: _save(p, {"epoch": 3, "args": {"lr": 1.0}}), r"no model weights in checkpoint"),
    ("a plain list", lambda p: _save(p, [torch.zeros(2)]), r"expected a dict checkpoint, got list"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unloadable_teacher_checkpoint_is_refused(capsys, tmp_path, results, name, make, message):
    good_ft = _save(tmp_path / "ft.pth",
                    {"model": build_classifier(PRESETS["vit_w48d3_dec48d1"], 10, 28, 4).state_dict()})
    bad = make(tmp_path / name)
    refused(capsys, results, TEACHER_ARGS + [f"teacher.pretrained_ckpt={bad}", f"teacher.finetuned_ckpt={good_ft}"],
            message, label=f"pretrained teacher checkpoint: {name}")


def test_kd_teacher_with_a_head_for_another_label_set_is_refused(capsys, tmp_path, results):
    pre = _save(tmp_path / "pre.pth", {"model": build_mae(PRESETS["vit_w48d3_dec48d1"], 28, 4).state_dict()})
    ft5 = _save(tmp_path / "ft5.pth", {"model": build_classifier(PRESETS["vit_w48d3_dec48d1"], 5, 28, 4).state_dict()})
    refused(capsys, results, TEACHER_ARGS + [f"teacher.pretrained_ckpt={pre}", f"teacher.finetuned_ckpt={ft5}"],
            r"kd_teacher checkpoint for student-finetune-kdsoft.*head.weight: checkpoint \(5, 48\) vs model \(10, 48\)",
            label="fine-tuned teacher with a 5-class head")


def test_full_mode_teacher_without_decoder_is_refused(capsys, tmp_path, results):
    enc = build_mae(PRESETS["vit_w48d3_dec48d1"], 28, 4, with_decoder=False).state_dict()
    pre = _save(tmp_path / "mae_pretrain.pth", {"model": enc})
    ft = _save(tmp_path / "ft.pth", {"model": build_classifier(PRESETS["vit_w48d3_dec48d1"], 10, 28, 4).state_dict()})
    refused(capsys, results, TEACHER_ARGS + [f"teacher.pretrained_ckpt={pre}", f"teacher.finetuned_ckpt={ft}",
                                             "distill.teacher_mode=full"], r"missing keys .*decoder",
            label="encoder-only teacher for teacher_mode=full")


# ------------------------------------------------------------------------------------------------------ Slurm


def fake_bin(d, name, script):
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + script + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def test_slurm_commands_not_on_path_are_refused(capsys, tmp_path, results, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    refused(capsys, results, ["launcher=slurm"], r"launcher=slurm but the Slurm commands \(sinfo, sbatch\) are not "
                                                 r"on PATH")


def test_slurm_that_does_not_answer_is_refused(capsys, tmp_path, results, monkeypatch):
    fake_bin(tmp_path / "bin", "sinfo", "echo 'slurm_load_partitions: Unable to contact slurm controller' >&2; exit 1")
    fake_bin(tmp_path / "bin", "sbatch", "exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    refused(capsys, results, ["launcher=slurm"], r"the cluster does not answer \(`sinfo`: slurm_load_partitions: "
                                                 r"Unable to contact slurm controller\)")


def test_unknown_partition_is_refused_without_a_cluster(capsys, tmp_path, results, monkeypatch):
    fake_bin(tmp_path / "bin", "sinfo", "echo 'debug* up'; echo 'long up'")
    fake_bin(tmp_path / "bin", "sbatch", "exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    refused(capsys, results, ["launcher=slurm", "launcher.partition=gpu"],
            r"launcher.partition='gpu' does not exist; partitions: debug, long")
    check_slurm("long")  # an existing partition passes
    check_slurm(None)


@pytest.fixture(scope="module", autouse=True)
def list_of_bad_inputs_tried():
    """After the module's tests: prints every bad input tried and the error it produced
    (`pytest -s tests/test_bad_input.py`), whatever order the tests ran in."""
    yield
    print(f"\n{len(TRIED)} bad inputs refused before submission:")
    for overrides, error in TRIED:
        print(f"- {overrides}\n    -> {error}")
