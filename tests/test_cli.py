"""The command line a researcher types on day one: `-m` sweeps anywhere on the line (each point its own results root,
one combined report), --dry-run checking what a real run checks, hydra.* and ignored-checkpoint overrides refused,
hydra's own reason for a bad value, a --help that needs no torch, recipes found from an installed wheel, and the
Slurm test cluster refusing a prefix it did not create."""
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.run.cli import main, parse_args
from harness.run.sweep import point_overrides, sweep_name, sweep_points
from user_recipe import USER_RECIPE

ROOT = Path(__file__).resolve().parents[1]
README_SWEEP = "python -m harness.reproduce table2 -m rows.dmae_95.pretrain.mask_ratio=0.9,0.95"
HELP_SWEEP = "python -m harness.reproduce table2 -m profile=smoke seed=0,1"


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture
def never_execute(monkeypatch):
    """A check that lets bad input through fails the test instead of running the table."""
    def execute(*a, **k):
        raise AssertionError("bad input reached harness.run.launch.execute")
    monkeypatch.setattr("harness.run.launch.execute", execute)


def run_main(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------------------------- 1. -m sweeps


@pytest.mark.parametrize("argv", [
    ["table2", "-m", "a.b=1,2", "seeds=1"],
    ["-m", "table2", "a.b=1,2", "seeds=1"],
    ["table2", "a.b=1,2", "seeds=1", "-m"],
    ["table2", "a.b=1,2", "--multirun", "seeds=1"],
], ids=["after table", "before table", "at the end", "long form in between"])
def test_multirun_flag_anywhere_on_the_line(argv):
    args = parse_args(argv)
    assert (args.table, args.overrides, args.multirun) == ("table2", ["a.b=1,2", "seeds=1"], True)


def test_documented_forms_parse():
    for line in (README_SWEEP, HELP_SWEEP):
        args = parse_args(line.split()[3:])
        assert args.table == "table2" and args.multirun and args.overrides
    args = parse_args(["-m", "seed=0,1", "--dry-run"])  # no table: the default one
    assert (args.table, args.overrides, args.dry_run) == ("table2", ["seed=0,1"], True)


def test_sweep_points_have_their_own_folders():
    keys, points = sweep_points(["profile=smoke", "seed=0,1", "rows.dmae_95.pretrain.mask_ratio=0.9,0.95"])
    assert keys == ["seed", "rows.dmae_95.pretrain.mask_ratio"]
    assert [p.name for p in points] == ["seed=0,rows.dmae_95.pretrain.mask_ratio=0.9",
                                        "seed=0,rows.dmae_95.pretrain.mask_ratio=0.95",
                                        "seed=1,rows.dmae_95.pretrain.mask_ratio=0.9",
                                        "seed=1,rows.dmae_95.pretrain.mask_ratio=0.95"]
    assert points[2].overrides == ["profile=smoke", "seed=1", "rows.dmae_95.pretrain.mask_ratio=0.9"]
    name = sweep_name("table2", keys, "smoke")
    assert name == "table2.smoke-seed+rows.dmae_95.pretrain.mask_ratio"
    over = point_overrides(points[0], name, "/r", "/rep")
    assert over[-2:] == [f"results_root='/r/sweeps/{name}/{points[0].name}'",
                         f"reports_dir='/rep/sweeps/{name}/{points[0].name}'"]
    # a given results_root is the sweep's base, not repeated
    _, (p, _) = sweep_points(["results_root=/x", "seed=3,4"])
    assert [o for o in point_overrides(p, "n", "/x", "/rep") if o.startswith("results_root")] == [
        "results_root='/x/sweeps/n/seed=3'"]


def test_sweeping_the_results_root_is_refused(capsys, tmp_path):
    code, _, err = run_main(capsys, "table2", "-m", "profile=smoke", f"results_root={tmp_path}/a,{tmp_path}/b")
    assert code == 2 and "results_root cannot be swept" in err and "Nothing was submitted" in err


def test_sweep_dry_run_checks_every_point_and_writes_nothing(capsys, tmp_path, never_execute):
    code, out, err = run_main(capsys, "table2", "-m", "rows.dmae_95.pretrain.mask_ratio=0.9,0.95", "profile=smoke",
                              f"results_root={tmp_path / 'results'}", "--dry-run")
    assert code == 0, err
    sweep = tmp_path / "results" / "sweeps" / "table2.smoke-rows.dmae_95.pretrain.mask_ratio"
    for v in ("0.9", "0.95"):
        assert f"=== table2 rows.dmae_95.pretrain.mask_ratio={v}" in out
        assert f"results: {sweep / f'rows.dmae_95.pretrain.mask_ratio={v}' / 'table2' / 'smoke'}" in out
    assert not (tmp_path / "results").exists()
    # a bad value at the last point stops the sweep before its first point runs
    code, _, err = run_main(capsys, "table2", "-m", "rows.dmae_95.pretrain.mask_ratio=0.9,1.5", "profile=smoke",
                            "launcher=debug", f"results_root={tmp_path / 'results'}")
    assert code == 2 and "mask_ratio=1.5 must be in [0, 1)" in err
    assert not (tmp_path / "results").exists()


def _sweep(tmp_path, line):
    cmd = [sys.executable, "-m", "harness.reproduce", *line.split()[3:], "profile=smoke", "launcher=debug", "seeds=1",
           f"results_root={tmp_path / 'results'}", f"reports_dir={tmp_path / 'reports'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _report_rows(path):
    return [line for line in path.read_text().splitlines() if line.startswith("| `") and " | row | " not in line]


@pytest.mark.slow
def test_readme_sweep_runs_each_point_in_its_own_root_with_one_combined_report(tmp_path):
    from harness.report.collect import collect
    out = _sweep(tmp_path, README_SWEEP)
    name = "table2.smoke-rows.dmae_95.pretrain.mask_ratio"
    roots = {v: tmp_path / "results" / "sweeps" / name / f"rows.dmae_95.pretrain.mask_ratio={v}" / "table2" / "smoke"
             for v in ("0.9", "0.95")}
    ratios = {}
    for v, root in roots.items():
        c = collect(root)
        assert (c.cells["status"] == "done").all(), c.cells[["row", "status", "reason"]]
        ratios[v] = c.manifest["config"]["rows"]["dmae_95"]["pretrain"]["mask_ratio"]
        assert (tmp_path / "reports" / "sweeps" / name / f"rows.dmae_95.pretrain.mask_ratio={v}" /
                "table2.smoke.md").exists()
    assert ratios == {"0.9": 0.9, "0.95": 0.95}  # two manifests, not one overwritten
    assert "reused from" in out  # the second point ran only what the swept key changes
    report = tmp_path / "reports" / "sweeps" / f"{name}.md"
    rows = _report_rows(report)
    assert len(rows) == 2 * 6  # a row per (sweep value, table row)
    assert sum(r.startswith("| `0.95` | `dmae_95`") for r in rows) == 1
    assert all(re.search(r"\| \d+\.\d\d \(one seed: no std\) \| 1 \| 1/1 done \|$", r) for r in rows), rows
    assert f"sweep report: {report}" in out and report.read_text().startswith(
        "# Sweep of table2 (smoke): rows.dmae_95.pretrain.mask_ratio\n")


@pytest.mark.slow
def test_help_sweep_example_runs(tmp_path):
    out = _sweep(tmp_path, HELP_SWEEP)
    rows = _report_rows(tmp_path / "reports" / "sweeps" / "table2.smoke-seed.md")  # profile=smoke: not swept
    assert len(rows) == 2 * 6 and {r.split(" | ")[0] for r in rows} == {"| `0`", "| `1`"}
    assert "=== table2 seed=1" in out
    point = tmp_path / "results" / "sweeps" / "table2.smoke-seed" / "seed=1"
    assert (point / "table2" / "smoke" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------- 4. --dry-run


@pytest.mark.parametrize("dry", [False, True], ids=["real run", "dry run"])
def test_dry_run_checks_the_data_like_a_real_run(capsys, tmp_path, never_execute, dry):
    args = ["table2", "profile=smoke", f"results_root={tmp_path}", f"data.root={tmp_path / 'nowhere'}"]
    code, out, err = run_main(capsys, *args, *(["--dry-run"] if dry else []))
    assert code == 2 and "Nothing was submitted" in err
    assert "apt-get install dataset-fashion-mnist" in err and "Plan for" not in out


def test_dry_run_and_real_run_refuse_a_missing_checkpoint_with_the_same_message(capsys, tmp_path, never_execute):
    args = ["table2", "profile=smoke", f"results_root={tmp_path}", "teacher.train=false",
            f"teacher.pretrained_ckpt={tmp_path / 'missing-pre.pth'}", f"teacher.finetuned_ckpt={tmp_path / 'ft.pth'}"]
    real = run_main(capsys, *args)
    dry = run_main(capsys, *args, "--dry-run")
    assert real[0] == dry[0] == 2
    assert "missing-pre.pth" in dry[2] and real[2] == dry[2]
    assert not list(tmp_path.glob("table2/smoke/*/"))


def test_dry_run_passes_when_inputs_are_good(capsys, tmp_path, never_execute):
    code, out, err = run_main(capsys, "table2", "profile=smoke", f"results_root={tmp_path}", "--dry-run")
    assert code == 0, err
    assert "Plan for table2 (smoke)" in out and "inputs checked" in out


# ------------------------------------------------------------------------------------- 5. silently ignored input


@pytest.mark.parametrize("override", ["hydra.run.dir=outputs/x", "hydra.sweep.dir=multirun/y",
                                      "hydra/launcher=basic", "+hydra.job.chdir=true"])
def test_hydra_overrides_are_refused_with_the_harness_keys(capsys, tmp_path, never_execute, override):
    code, _, err = run_main(capsys, "table2", "profile=smoke", f"results_root={tmp_path}", override)
    assert code == 2, err
    assert "not used by this harness" in err and "results_root=" in err and "reports_dir=" in err


@pytest.mark.parametrize("overrides, key", [
    (["teacher.pretrained_ckpt=/ckpt/mae_visualize_vit_large.pth"], "teacher.pretrained_ckpt"),
    (["teacher.finetuned_ckpt=/ckpt/ft.pth", "teacher.train=true"], "teacher.finetuned_ckpt"),
])
def test_teacher_checkpoint_ignored_by_a_trained_teacher_is_refused(capsys, tmp_path, never_execute, overrides,
                                                                     key):
    code, _, err = run_main(capsys, "table2", "profile=smoke", f"results_root={tmp_path}", *overrides)
    assert code == 2
    assert f"{key}=" in err and "teacher.train=true" in err and "teacher.train=false" in err


def test_row_teacher_checkpoint_ignored_by_a_trained_teacher_is_refused(capsys, tmp_path, never_execute):
    code, _, err = run_main(capsys, "student_size", "profile=smoke", f"results_root={tmp_path}",
                            "checkpoints.base_pretrained=/ckpt/mae_visualize_vit_base.pth")
    assert code == 2 and ".teacher.pretrained_ckpt='/ckpt/mae_visualize_vit_base.pth'" in err


def test_bad_value_shows_hydras_reason(capsys, tmp_path):
    code, _, err = run_main(capsys, "table2", "profile=smoke", f"results_root={tmp_path}", "seeds=three")
    assert code == 2
    assert "seeds=three: Value 'three' of type 'str' could not be converted to Integer" in err


# -------------------------------------------------------------------------------------------------- 6. --help


def test_help_needs_only_the_standard_library():
    code = ("import sys\n"
            "from harness.run.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = ('torch', 'timm', 'hydra', 'omegaconf', 'pandas', 'submitit', 'numpy', 'matplotlib')\n"
            "print('IMPORTED', sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    assert "table2" in out.stdout and "-m, --multirun" in out.stdout


# ---------------------------------------------------------------------------------------------- 3. packaging


def test_recipes_are_found_through_the_package():
    import recipes
    assert recipes.path().is_dir() and (recipes.path("paper-numbers.csv")).is_file()
    assert "table2" in recipes.tables()
    assert (recipes.path("profile", "smoke.yaml")).is_file()


def test_pyproject_ships_recipes_and_console_scripts():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(d.startswith("tabulate") for d in meta["project"]["dependencies"])
    assert meta["project"]["scripts"] == {"dmae-reproduce": "harness.reproduce:main",
                                          "dmae-report": "harness.report.cli:main"}
    assert "recipes" in meta["tool"]["setuptools"]["packages"]["find"]["include"]
    data = meta["tool"]["setuptools"]["package-data"]["recipes"]
    assert {"*.yaml", "*.csv", "launcher/*.yaml", "profile/*.yaml"} <= set(data)
    # the code needs both: PYTHONSAFEPATH (3.11) in Slurm jobs' snapshots, torch.amp.GradScaler(device) (2.3)
    assert meta["project"]["requires-python"] == ">=3.11" and "torch>=2.3" in meta["project"]["dependencies"]


def test_the_harness_finds_the_kd_baseline_in_its_registry_without_installation_metadata():
    """The KD baseline is an ordinary fine-tuning objective: harness.core.build's registry imports it (no entry point
    in pyproject.toml), and nothing else in the harness imports baselines/."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "entry-points" not in meta["project"]
    importers = [f.relative_to(ROOT).as_posix() for f in (ROOT / "harness").rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+baselines", f.read_text(), re.M)]
    assert importers == ["harness/core/build.py"]
    from baselines.kd import KDObjective
    from harness.core.build import FINETUNE_OBJECTIVES, registered_objective
    from harness.core.objectives import ClassifyObjective
    assert registered_objective("kd") is KDObjective and registered_objective("classify") is ClassifyObjective
    assert set(FINETUNE_OBJECTIVES) == {"classify", "kd"}
    with pytest.raises(ValueError, match="no fine-tuning objective 'nope'"):
        registered_objective("nope")


@pytest.mark.slow
def test_wheel_install_finds_its_recipes_from_another_directory(tmp_path):
    """Build the wheel from a copy of the sources, install it into a scratch venv that borrows the main venv's
    packages through a .pth file (no download), and run --dry-run from an unrelated directory."""
    import site
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("harness", "baselines", "recipes"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp_path / "dist")], cwd=src,
                   check=True, timeout=600)
    wheel, = (tmp_path / "dist").glob("dmae_harness-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    vpy = venv / "bin" / "python"
    purelib = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "borrow-main-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([*pip, "--python", str(vpy), "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clean = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    where = subprocess.run([vpy, "-c", "import harness, recipes; print(harness.__file__); print(recipes.path())"],
                           cwd=elsewhere, env=clean, capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and where.count(purelib) == 2, where
    out = subprocess.run([venv / "bin" / "dmae-reproduce", "table2", "profile=smoke", "--dry-run",
                          f"results_root={tmp_path / 'results'}"], cwd=elsewhere, env=clean, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Plan for table2 (smoke)" in out.stdout
    papers = subprocess.run([vpy, "-c", "from harness.report.collect import load_paper_numbers as p; print(len(p()))"],
                            cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=300)
    assert papers.returncode == 0 and int(papers.stdout) > 0, papers.stderr
    helped = subprocess.run([venv / "bin" / "dmae-report", "--help"], cwd=elsewhere, env=clean, capture_output=True,
                            text=True, timeout=300)
    assert helped.returncode == 0 and "usage:" in helped.stdout
    # a user's own recipe, in a folder of its own outside the package and the clone, with its own claim: run for
    # real by the installed command (the README's how-to), reported, the claim judged as the user's
    mine = elsewhere / "my-recipes"
    mine.mkdir()
    (mine / "mine.yaml").write_text(USER_RECIPE)
    run = subprocess.run([venv / "bin" / "dmae-reproduce", "mine", "--recipe-dir", "my-recipes", "seeds=2",
                          "launcher=debug", "probe.enabled=false", "results_root=results", "reports_dir=reports"],
                         cwd=elsewhere, env=clean, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (elsewhere / "reports" / "mine.md").read_text()
    assert "`d90` DMAE at 90% masking" in text and "| user |" in text
    line = next(x for x in text.splitlines() if "`d90_beats_mae`" in x and x[:1].isdigit())
    assert "The user's own hypothesis" in line and "Paired seeds: 0, 1" in line, line
    again = subprocess.run([venv / "bin" / "dmae-report", "mine", "--recipe-dir", "my-recipes"], cwd=elsewhere,
                           env=clean, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and (elsewhere / "reports" / "mine.md").read_text().split("- Report generated")[0] \
        == text.split("- Report generated")[0], again.stderr[-2000:]



# ---------------------------------------------------------------------------------------- 2. Slurm test cluster


def test_slurm_script_refuses_a_prefix_it_did_not_create(tmp_path):
    prefix = tmp_path / "someone-elses"
    prefix.mkdir()
    (prefix / "data").write_text("keep me")
    for cmd in ("start", "stop"):
        out = subprocess.run(["bash", str(ROOT / "tools" / "slurm_local.sh"), cmd], capture_output=True, text=True,
                             env=dict(os.environ, HARNESS_SLURM_PREFIX=str(prefix)), timeout=60)
        assert out.returncode != 0 and "was not created by this script" in out.stderr, out.stderr
    assert [p.name for p in prefix.iterdir()] == ["data"] and (prefix / "data").read_text() == "keep me"


def test_slurm_script_names_its_config():
    out = subprocess.run(["bash", str(ROOT / "tools" / "slurm_local.sh"), "conf"], capture_output=True, text=True,
                         env=dict(os.environ, HARNESS_SLURM_PREFIX="/var/tmp/some-prefix"), timeout=60)
    assert out.stdout.strip() == "/var/tmp/some-prefix/etc/slurm.conf"
