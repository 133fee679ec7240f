"""A user's own recipes: the recipe search path (--recipe-dir, $HARNESS_RECIPE_PATH, a table given as a file) in
front of the package's recipes, and rows the command line changes against their recipe (labelled; their paper number
and claims not applicable) while neutral overrides (seeds, paths, launcher, run.*) leave the recipe's rows as they
are."""
from pathlib import Path

import pytest
import yaml

import recipes
from harness.plan.config import ConfigError, load_config
from recipes import tables
from harness.plan.graph import build_plan, mark_overridden
from harness.report.expected import expected_path
from harness.report.markdown import default_profile
from harness.run.cli import main
from user_recipe import USER_RECIPE



@pytest.fixture
def mine(tmp_path, monkeypatch) -> Path:
    """A folder of the user's own, outside the package, with one table; the search path as a fresh process has it."""
    # set, then deleted: monkeypatch then removes what --recipe-dir puts into os.environ (else later tests see it)
    monkeypatch.setenv(recipes.PATH_ENV, "")
    monkeypatch.delenv(recipes.PATH_ENV)
    d = tmp_path / "my-recipes"
    d.mkdir()
    (d / "mine.yaml").write_text(USER_RECIPE)
    return d


def test_a_table_in_a_folder_on_the_search_path_composes_with_the_package_profiles(mine, monkeypatch):
    assert "mine" not in tables()
    monkeypatch.setenv(recipes.PATH_ENV, str(mine))
    assert "mine" in tables() and "table2" in tables()
    cfg = load_config("mine", ["seeds=2"])
    assert cfg.profile == "smoke" and list(cfg.rows) == ["mae", "d90", "scratch"] and cfg.claims[0].source == "user"
    assert default_profile("mine") == "smoke"
    assert expected_path("mine", "smoke") == mine / "expected" / "mine.smoke.csv"  # beside the user's table
    assert expected_path("table2", "tiny") == recipes.path("expected", "table2.tiny.csv")


def test_a_profile_of_the_users_folder_is_found_and_unknown_ones_list_every_folder(mine, monkeypatch):
    (mine / "profile").mkdir()
    smoke = recipes.path("profile", "smoke.yaml").read_text()
    (mine / "profile" / "mini.yaml").write_text(smoke.replace("\nprofile: smoke\n", "\nprofile: mini\n"))
    monkeypatch.setenv(recipes.PATH_ENV, str(mine))
    assert load_config("mine", ["profile=mini"]).profile == "mini"
    assert load_config("table2", ["profile=mini"]).profile == "mini"  # a package table with the user's profile
    with pytest.raises(ConfigError, match=r"profile=mni: .*did you mean profile=mini\?.*paper.*smoke"):
        load_config("mine", ["profile=mni"])


def test_a_folder_that_is_not_there_is_an_error_not_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(recipes.PATH_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(NotADirectoryError, match="HARNESS_RECIPE_PATH names .*nowhere.*which is not a folder"):
        tables()
    with pytest.raises(ConfigError, match="HARNESS_RECIPE_PATH names .*nowhere.*which is not a folder"):
        load_config("table2", ["profile=smoke"])
    monkeypatch.delenv(recipes.PATH_ENV)
    assert main(["table2", "--recipe-dir", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert "--recipe-dir: " in capsys.readouterr().err


def test_recipe_dir_flag_and_a_table_given_as_a_file_print_the_users_config(mine, capsys, monkeypatch):
    assert main(["mine", "--recipe-dir", str(mine), "--cfg", "job", "seeds=2"]) == 0
    out = capsys.readouterr().out
    cfg = yaml.safe_load(out)
    assert cfg["table"] == "mine" and cfg["seeds"] == 2 and cfg["claims"][0]["source"] == "user"
    monkeypatch.delenv(recipes.PATH_ENV)
    assert main([str(mine / "mine.yaml"), "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["title"] == "Does 90% masking beat the MAE baseline?"
    with pytest.raises(SystemExit):
        main([str(mine / "absent.yaml"), "--cfg", "job"])
    assert "no such recipe file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ overridden rows
def changed(table, overrides):
    cfg = load_config(table, overrides)
    plan = build_plan(cfg)
    out = mark_overridden(plan, cfg, overrides)
    return out, {c.row: c.label for c in plan.cells}


def test_a_row_override_labels_that_row_only():
    out, labels = changed("table2", ["profile=smoke", "rows.dmae_95.pretrain.mask_ratio=0.9"])
    assert out == {"dmae_95": ["pretrain.mask_ratio=0.9"]}
    assert labels["dmae_95"] == "DMAE, 95% masking [pretrain.mask_ratio=0.9]"
    assert labels["dmae_75"] == "DMAE, 75% masking"


def test_a_sweep_point_at_the_recipes_value_and_neutral_overrides_change_nothing(tmp_path):
    out, _ = changed("table2", ["profile=smoke", "rows.dmae_95.pretrain.mask_ratio=0.95", "seeds=3", "seed=1",
                                "launcher=slurm", "launcher.partition=gpu", "run.threads=1",
                                f"results_root={tmp_path}", "report=false"])
    assert out == {}


def test_table_level_and_teacher_overrides_label_every_row_they_reach():
    out, _ = changed("table2", ["profile=smoke", "distill.alpha=2"])
    assert sorted(out) == ["dmae_75", "dmae_95", "dmae_98"]  # the MAE, KD and scratch rows do not distill
    assert set(map(tuple, out.values())) == {("distill.alpha=2.0",)}
    out, _ = changed("table2", ["profile=smoke", "teacher.pretrain.epochs=5"])
    assert sorted(out) == ["dmae_75", "dmae_95", "dmae_98", "kd_finetuned_teacher"]
    assert all(v == ["teacher.pretrain.epochs=5"] for v in out.values())
    out, labels = changed("table2", ["profile=smoke", "student.preset=vit_w32d3_dec32d1"])
    assert "scratch" in out and labels["scratch"].endswith("[student.preset=vit_w32d3_dec32d1]")


def test_the_readme_example_is_the_recipe_the_tests_run():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Your own recipe", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load(USER_RECIPE)
