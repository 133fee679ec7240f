"""Untrusted checkpoints, config values and names.

- every checkpoint load is torch.load(weights_only=True): a crafted file whose unpickling would run code is refused
  at preflight (as a provided teacher) and at resume (as a planted checkpoint-last), and its payload never runs
  (the unit test of safe_load/load_teacher_encoder/load_classifier is tests/test_checkpoints.py);
- the code base has no unsafe loader, no eval/exec, no shell (checked on the source, by AST);
- config values are data, never evaluated;
- results are never written outside results_root: table, profile and row keys are plain names, and every stage
  directory must be a direct child of <results_root>/<table>/<profile> (checked when planning and again before
  executing).
"""
import ast
import os
from pathlib import Path

import pytest
import torch

from harness.core.checkpoints import CheckpointError
from harness.plan.config import ConfigError, load_config
from harness.run.launch import execute as real_execute  # before the autouse fixture replaces it
from harness.core.models import PRESETS, build_classifier, build_mae
from harness.plan.graph import build_plan
from harness.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def evil_checkpoint(path: Path, marker: Path, like: dict) -> Path:
    sd = dict(like)
    sd[next(iter(sd))] = RunsCode(marker)  # one tensor replaced by the payload; otherwise a plausible checkpoint
    torch.save({"model": sd}, path)
    return path


@pytest.fixture(autouse=True)
def _never_execute(monkeypatch):
    def execute(*a, **k):
        raise AssertionError("an untrusted input reached harness.run.launch.execute")
    monkeypatch.setattr("harness.run.launch.execute", execute)


@pytest.mark.parametrize("role", ["pretrained", "finetuned"])
def test_crafted_teacher_checkpoint_is_refused_at_preflight_and_never_runs(tmp_path, capsys, role):
    marker = tmp_path / "PWNED"
    good = {"pretrained": build_mae(PRESETS["vit_w48d3_dec48d1"], 28, 4).state_dict(),
            "finetuned": build_classifier(PRESETS["vit_w48d3_dec48d1"], 10, 28, 4).state_dict()}
    paths = {}
    for k, sd in good.items():
        paths[k] = tmp_path / f"{k}.pth"
        torch.save({"model": sd}, paths[k])
    paths[role] = evil_checkpoint(tmp_path / "evil.pth", marker, good[role])
    results = tmp_path / "results"
    code = main(["table2", "profile=smoke", f"results_root={results}", "teacher.train=false",
                 f"teacher.pretrained_ckpt={paths['pretrained']}", f"teacher.finetuned_ckpt={paths['finetuned']}"])
    err = capsys.readouterr().err
    assert code == 2 and "Nothing was submitted" in err
    assert f"refused to load {tmp_path / 'evil.pth'}: it is not a plain tensor checkpoint" in err
    assert not marker.exists(), "the payload ran"
    assert not results.exists()
    # the payload is live: an unsafe load would have run it (guards against a dud)
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_planted_checkpoint_last_is_refused_at_resume_and_never_runs(tmp_path):
    from harness.core.stages import run_stage
    marker = tmp_path / "PWNED"
    d = tmp_path / "stage"
    d.mkdir()
    evil_checkpoint(d / "checkpoint-last.pth", marker, {"w": torch.zeros(1)})
    spec = dict(kind="pretrain", name="pt", seed=0, objective="mae",
                model=dict(preset="vit_w32d2_dec32d1", patch_size=4),
                data=dict(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist", img_size=16, train_subset=32,
                          test_subset=16, eval_crop_pct=1.0),
                pretrain=dict(epochs=1, warmup_epochs=0, batch_size=16, accum_iter=1, blr=1e-3, min_lr=0.0,
                              weight_decay=0.05, betas=[0.9, 0.95], clip_grad=None, mask_ratio=0.75,
                              visible_rounding="paper", norm_pix_loss=False))
    with pytest.raises(CheckpointError, match="no readable checkpoint.*refused to load"):
        run_stage(spec, d, {}, dict(device="cpu", amp="none", threads=1, log_every=0), "pt")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ the source, by AST

SOURCES = sorted(p for d in ("harness", "baselines") for p in (ROOT / d).rglob("*.py"))
FORBIDDEN_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "loads"), ("marshal", "load"),
    ("dill", "load"), ("dill", "loads"), ("shelve", "open"), ("yaml", "load"), ("yaml", "unsafe_load"),
    ("yaml", "full_load"), ("os", "system"), ("os", "popen"), ("jit", "load"), ("OmegaConf", "register_new_resolver"),
    ("hub", "load"),
}
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _name(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def unsafe_calls(path: Path):
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        f, where = node.func, f"{path.relative_to(ROOT)}:{node.lineno}"
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and f.id in FORBIDDEN_BUILTINS:
            found.append(f"{where}: {f.id}()")
        if isinstance(f, ast.Attribute):
            owner = _name(f.value)
            if (owner, f.attr) in FORBIDDEN_CALLS:
                found.append(f"{where}: {owner}.{f.attr}()")
            if owner == "torch" and f.attr == "load":
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            if f.attr == "load" and owner in ("np", "numpy"):
                a = kw.get("allow_pickle")
                if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                    found.append(f"{where}: numpy.load(allow_pickle=...)")
            if owner == "subprocess":
                s = kw.get("shell")
                if s is not None and not (isinstance(s, ast.Constant) and s.value is False):
                    found.append(f"{where}: subprocess with shell=")
    return found


def test_no_unsafe_loading_eval_or_shell_in_the_code():
    assert len(SOURCES) > 10
    loads = [p for p in SOURCES if "torch.load(" in p.read_text()]
    assert loads == [ROOT / "harness" / "core" / "checkpoints.py"]  # the one place that loads checkpoints: safe_load
    found = [f for p in SOURCES for f in unsafe_calls(p)]
    assert not found, "\n".join(found)


def test_the_scanner_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, pickle, yaml, os, subprocess\n"
                   "torch.load('x')\ntorch.load('x', weights_only=False)\npickle.loads(b'')\neval('1')\n"
                   "yaml.load('a')\nos.system('true')\nsubprocess.run('true', shell=True)\n"
                   "torch.load('x', weights_only=True)\nyaml.safe_load('a')\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        found = unsafe_calls(bad)
    finally:
        ROOT = old
    assert len(found) == 7, found


# ------------------------------------------------------------------------------------------------ config values


def test_config_values_are_data_never_code(tmp_path):
    marker = tmp_path / "PWNED"
    payload = f"__import__('os').system('touch {marker}')"
    cfg = load_config("table2", ["profile=smoke", f"results_root={tmp_path}", f"title=\"{payload}\"",
                                 f"rows.dmae_95.label=\"{payload}\"", f"profile_note=\"{payload}\""])
    plan = build_plan(cfg)
    from harness.plan.graph import describe, write_manifest
    describe(plan)
    write_manifest(plan, cfg, "test", [])
    assert cfg.title == payload and cfg.rows.dmae_95.label == payload
    assert not marker.exists()


# --------------------------------------------------------------------------------- nothing outside results_root


@pytest.mark.parametrize("override, message", [
    ("table=../../escape", r"table='../../escape': must be a plain name"),
    ("table=/etc", r"table='/etc': must be a plain name"),
    ("table=..", r"table='..': must be a plain name"),
    ("+rows={../../escape: {label: x, method: mae}}", r"row key='../../escape': must be a plain name"),
    ("+rows={a/b: {label: x, method: mae}}", r"row key='a/b': must be a plain name"),
    ("+rows={.hidden: {label: x, method: mae}}", r"row key='.hidden': must be a plain name"),
])
def test_names_that_would_escape_the_results_root_are_refused(tmp_path, capsys, override, message):
    import re
    results = tmp_path / "a" / "b" / "results"
    assert main(["table2", "profile=smoke", f"results_root={results}", override]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing created anywhere under tmp_path


def test_profile_name_from_a_recipe_is_checked(tmp_path, monkeypatch):
    """`profile` is a config group; its string is set by the profile's yaml. A recipe (not the command line) is where
    a bad one could come from: a copy of the recipes with a profile that names '../../x'."""
    import recipes as package
    recipes = tmp_path / "recipes"  # a user's folder on the recipe search path, with a profile of its own
    (recipes / "profile").mkdir(parents=True)
    text = package.path("profile", "smoke.yaml").read_text().replace("profile: smoke", "profile: ../../x")
    assert "profile: ../../x" in text
    (recipes / "profile" / "evil.yaml").write_text(text)
    monkeypatch.setenv(package.PATH_ENV, str(recipes))
    with pytest.raises(ConfigError, match=r"profile='../../x': must be a plain name"):
        load_config("table2", ["profile=evil", f"results_root={tmp_path / 'results'}"])
    # a profile group that is not a file of recipes/profile/ is refused by hydra itself
    with pytest.raises(ConfigError, match="Could not find 'profile/../../x'"):
        load_config("table2", ["profile=../../x"])


def test_plan_and_execute_refuse_paths_outside_the_root(tmp_path):
    """Defence in depth: a config changed after validation, or a tampered plan, is refused before anything is
    written."""
    from omegaconf import OmegaConf
    cfg = load_config("table2", ["profile=smoke", "launcher=debug", f"results_root={tmp_path / 'results'}"])
    bad = OmegaConf.merge(cfg, {"profile": "../../x"})
    with pytest.raises(ConfigError, match="profile='../../x'"):
        build_plan(bad)
    plan = build_plan(cfg)
    sid = next(iter(plan.stages))
    plan.stages["../../evil"] = plan.stages.pop(sid)
    with pytest.raises(ConfigError, match=r"stage id '../../evil'.*is not inside"):
        real_execute(plan, cfg)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "results").exists()
