"""harness.collect / harness.report: the results frame, the report, its claims, figures and warnings.

One session fixture runs the smoke table for real (2 seeds, ~1 min on 2 CPU cores); each test copies that tree and
mutates the copy (edits result.json, deletes it, writes error.json, corrupts a file). Set DMAE_SMOKE_TREE to an
existing results/table2/smoke tree to copy it instead of running (a development shortcut).
"""
import json
import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.collect import NOT_AVAILABLE, NOT_IMAGENET, collect, delta_text, export, load_paper_numbers, \
    paper_number, summarize
from harness.report import CLAIMS, check_claims, main, write_report

ROWS = ["mae", "kd_finetuned_teacher", "dmae_75", "dmae_95", "dmae_98"]
GEN = re.compile(r"^- Report generated: .*$", re.M)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    """A real results/table2/smoke tree made by the main command, with two seeds."""
    given = os.environ.get("DMAE_SMOKE_TREE")
    if given:
        return Path(given)
    from harness.reproduce import run_table
    results = tmp_path_factory.mktemp("smoke") / "results"
    code = run_table("table2", ["profile=smoke", "launcher=debug", "report=false", f"results_root={results}",
                                "seeds=2"])
    assert code == 0
    return results / "table2" / "smoke"


def _copy_stub(src, dst):
    """Checkpoints are copied as empty files: only their presence matters to the report."""
    if src.endswith(".pth"):
        Path(dst).touch()
    else:
        shutil.copy2(src, dst)


@pytest.fixture
def tree(smoke, tmp_path) -> Path:
    root = tmp_path / "results" / "table2" / "smoke"
    shutil.copytree(smoke, root, copy_function=_copy_stub, ignore=shutil.ignore_patterns(".*"))
    return root


def cells_of(root: Path, row: str):
    return [c for c in json.loads((root / "manifest.json").read_text())["cells"] if c["row"] == row]


def set_top1(root: Path, row: str, values):
    for cell, v in zip(cells_of(root, row), values):
        path = root / cell["evaluate"] / "result.json"
        res = json.loads(path.read_text())
        res["top1"] = v
        path.write_text(json.dumps(res))


def report(root: Path, tmp_path: Path, figures: bool = False) -> str:
    """The report's text; figures (the slow part) only where a test looks at them."""
    return write_report(root, tmp_path / "reports", figures=figures).read_text()


def claim_lines(text: str):
    found = {c.text: re.search(rf"^\d\. \*\*{re.escape(c.text)}: ([a-z ]+)\*\*", text, re.M) for c in CLAIMS}
    return {t: m.group(1) for t, m in found.items() if m}


# ------------------------------------------------------------------------------------------ fast, no results tree
def test_paper_numbers_resolve_and_na_is_not_available():
    papers = load_paper_numbers()
    assert paper_number("headline/DMAE ViT-L->ViT-B", papers)["value"] == 84.0
    assert paper_number("masking_ratio/DMAE 98% masking (4 visible patches per paper; code int() gives 3)",
                        papers)["value"] == 82.4
    assert paper_number("Tab.10/DINO with/without DMAE", papers) is None  # NA in the CSV
    assert paper_number(None, papers) is None and paper_number("nope/none", papers) is None
    assert delta_text(80.0, None, "paper") == NOT_AVAILABLE
    assert delta_text(80.0, {"value": 84.0}, "tiny") == NOT_IMAGENET
    assert delta_text(80.0, {"value": 84.0}, "paper") == "-4.00"


def test_every_recipe_paper_key_is_in_the_csv():
    from omegaconf import OmegaConf
    papers = load_paper_numbers()
    for recipe in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"):
        for key, row in (OmegaConf.load(recipe).get("rows") or {}).items():
            assert row.get("paper") is None or row["paper"] in papers, f"{recipe.name}: rows.{key}.paper"


def _summary(**means):
    return pd.DataFrame([{"row": r, "n": 0 if m is None else 3, "mean": m, "std": 0.1 if m is not None else None,
                          "paper_value": None, "paper_text": NOT_AVAILABLE} for r, m in means.items()])


def test_claim_rules_on_synthetic_means():
    res = {r["claim"].a + "-" + r["claim"].b: r["verdict"] for r in check_claims(
        _summary(mae=70.0, kd_finetuned_teacher=70.0, dmae_75=70.0, dmae_95=69.0, dmae_98=None))}
    assert res == {"dmae_75-mae": "does not hold",  # "beats" is strict
                   "dmae_75-kd_finetuned_teacher": "does not hold",
                   "dmae_95-dmae_75": "holds",  # exactly at the 1.0 pp margin
                   "dmae_98-dmae_75": "not enough data"}
    # a claim whose subject row is not in the table is about another table: left out; a missing other row is
    # "not applicable"
    assert check_claims(_summary(other=1.0)) == []
    assert {r["verdict"] for r in check_claims(_summary(dmae_75=1.0))} == {"not applicable"}
    res = {r["claim"].b: r["verdict"] for r in check_claims(
        _summary(dmae_pretrained_teacher=60.0, dmae_finetuned_teacher=58.0, kd_finetuned_teacher=61.0))}
    assert res == {"dmae_finetuned_teacher": "holds", "kd_finetuned_teacher": "does not hold"}


# ------------------------------------------------------------------------------------------ on real smoke runs
@pytest.mark.slow
def test_collect_reads_every_stage_and_cell(smoke):
    c = collect(smoke)
    assert len(c.cells) == 10 and set(c.cells["status"]) == {"done"} and not c.warnings
    assert len(c.stages) == len(c.manifest["stages"]) and set(c.stages["status"]) == {"done"}
    assert list(c.stages["role"][:2]) == ["teacher-pretrain", "teacher-finetune"]
    for cell in c.manifest["cells"]:
        res = json.loads((smoke / cell["evaluate"] / "result.json").read_text())
        got = c.cells[(c.cells["row"] == cell["row"]) & (c.cells["seed"] == cell["seed"])].iloc[0]
        assert got["top1"] == res["top1"] and got["git_commit"] == res["git_commit"]
        assert got["wall_s"] > 0 and got["device_hours"] > 0 and Path(got["config_path"]).exists()
    s = summarize(c).set_index("row")
    assert list(s.index) == ROWS and (s["n"] == 2).all()
    vals = c.cells[c.cells["row"] == "dmae_75"]["top1"]
    assert math.isclose(s.at["dmae_75", "mean"], vals.mean()) and math.isclose(s.at["dmae_75", "std"], vals.std())
    assert s.at["dmae_75", "paper_text"] == "84.0" and s.at["kd_finetuned_teacher", "paper_text"] == "82.8"
    assert s.at["dmae_95", "paper_text"] == "83.6" and s.at["dmae_98", "paper_text"] == "82.4"
    assert s.at["mae", "paper_text"] == NOT_AVAILABLE and s.at["mae", "delta_text"] == NOT_AVAILABLE
    assert s.at["dmae_75", "delta_text"] == NOT_IMAGENET  # smoke numbers are not ImageNet numbers


@pytest.mark.slow
def test_report_table_banner_and_every_link_exists(tree, tmp_path):
    text = report(tree, tmp_path, figures=True)
    assert "**Profile: `smoke`.**" in text and "These are not ImageNet numbers" in text
    assert "| row | paper | reproduced (mean ± std, n) | Δ | status |" in text
    for row in ROWS:
        assert re.search(rf"^\| `{row}` .* \(n=2\) \| .* \| 2/2 done \|$", text, re.M), row
    assert "| `dmae_75` DMAE, 75% masking | 84.0 [" in text and NOT_IMAGENET in text
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    figures = [l for l in links if l.endswith(".png")]
    assert len(figures) == 2 + 1 + len(ROWS)  # mask plot, bars, teacher curves, one per row
    base = tmp_path / "reports"
    for link in links:
        assert (base / link).is_file(), link
    for fig in figures:
        assert (base / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for part in ("## Claims", "## Cost", "## Provenance", "OpenReview 7QTldIMkkqX abstract", "- Command:",
                 "Git commit at launch", "torch 2", "hydra-core", "config.yaml](", "Hardware (finished stages): cpu"):
        assert part in text


@pytest.mark.slow
def test_report_is_deterministic_apart_from_its_date(tree, tmp_path):
    first = report(tree, tmp_path, figures=True)
    pngs = {p.name: p.read_bytes() for p in (tmp_path / "reports" / "table2.smoke").glob("*.png")}
    assert len(pngs) == 8
    second = report(tree, tmp_path, figures=True)
    assert GEN.sub("", first) == GEN.sub("", second) and len(GEN.findall(first)) == 1
    assert pngs == {p.name: p.read_bytes() for p in (tmp_path / "reports" / "table2.smoke").glob("*.png")}


@pytest.mark.slow
def test_claims_hold_then_fail_when_top1_is_edited(tree, tmp_path):
    for row, vals in {"mae": [10.0, 10.2], "kd_finetuned_teacher": [11.0, 11.2], "dmae_75": [12.0, 12.4],
                      "dmae_95": [11.8, 12.0], "dmae_98": [10.0, 10.4]}.items():
        set_top1(tree, row, vals)
    text = report(tree, tmp_path)
    assert set(claim_lines(text).values()) == {"holds"}
    assert "12.20 (n=2) − 11.10 (n=2) = +1.10 pp" in text and "84.0 − 82.8 = +1.2" in text
    assert "clear of seed noise" in text
    set_top1(tree, "dmae_75", [9.0, 9.2])
    set_top1(tree, "dmae_98", [5.0, 5.2])
    verdicts = list(claim_lines(report(tree, tmp_path)).values())
    assert verdicts == ["does not hold", "does not hold", "holds", "does not hold"]


@pytest.mark.slow
def test_missing_failed_and_partial_stages_are_shown_not_dropped(tree, tmp_path):
    for cell in cells_of(tree, "dmae_95"):  # never evaluated -> not enough data for the 95% claim
        (tree / cell["evaluate"] / "result.json").unlink()
    ev98 = tree / cells_of(tree, "dmae_98")[0]["evaluate"]
    (ev98 / "result.json").unlink()
    (ev98 / "error.json").write_text(json.dumps({"error": "RuntimeError: CUDA out of memory", "traceback": "",
                                                 "at": "2026-01-01T00:00:00"}))
    kd1 = cells_of(tree, "kd_finetuned_teacher")[1]  # fine-tune interrupted: checkpoint-last, no result
    (tree / kd1["finetune"] / "result.json").unlink()
    (tree / kd1["evaluate"] / "result.json").unlink()
    c = collect(tree)
    st = c.cells.set_index(["row", "seed"])["status"]
    assert st["dmae_95", 0] == "not started" and st["dmae_98", 0] == "failed" and st["kd_finetuned_teacher", 1] == \
        "partial"
    text = report(tree, tmp_path)
    assert re.search(r"^\| `dmae_95` .* \| no finished cell \(n=0\) \| .* \| 2/2 not started \|$", text, re.M)
    assert re.search(r"^\| `dmae_98` .* \| \d+\.\d\d \(n=1\) \| .* \| 1/2 done; 1/2 failed \|$", text, re.M)
    assert "1/2 done; 1/2 partial" in text and "RuntimeError: CUDA out of memory" in text
    assert "checkpoint-last exists" in text
    verdicts = claim_lines(text)
    assert verdicts[CLAIMS[2].text] == "not enough data" and "no finished cell in dmae_95" in text
    assert verdicts[CLAIMS[3].text] in ("holds", "does not hold") and "no estimate of seed noise" in text


@pytest.mark.slow
def test_failed_teacher_blocks_every_row_and_report_still_renders(tree, tmp_path):
    for d in tree.iterdir():
        if (d / "result.json").exists():
            (d / "result.json").unlink()
    teacher = next(d for d in tree.iterdir() if d.name.startswith("teacher-pretrain"))
    (teacher / "error.json").write_text(json.dumps({"error": "ValueError: bad teacher"}))
    c = collect(tree)
    dm = c.cells[c.cells["method"] == "dmae"]
    assert set(dm["status"]) == {"failed"} and dm["reason"].str.contains("ValueError: bad teacher").all()
    text = report(tree, tmp_path, figures=True)
    assert set(claim_lines(text).values()) == {"not enough data"}
    assert "No finished cell to plot" not in text  # the logs still give training curves
    assert "top1_by_row.png" not in text and "curves-dmae_75.png" in text
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        assert (tmp_path / "reports" / link).is_file(), link


@pytest.mark.slow
def test_corrupt_result_is_named_and_skipped(tree, tmp_path):
    bad = tree / cells_of(tree, "dmae_75")[0]["evaluate"] / "result.json"
    bad.write_text('{"status": "done", "top1": 9')
    (tree / "student-pretrain-stale-0000000000").mkdir()
    set_top1(tree, "mae", [12.5, "n/a"])  # readable, but no number
    log = tree / cells_of(tree, "dmae_75")[1]["pretrain"] / "log.jsonl"
    with log.open("a") as f:  # a second epoch, then a half-written line
        f.write(json.dumps({"epoch": 2, "loss": 1.0, "loss_pix": 0.9, "loss_feat": 0.1}) + '\n{"epoch": 3, "lo')
    text = report(tree, tmp_path, figures=True)
    warnings = text.split("## Warnings", 1)[1].split("## Results", 1)[0]
    assert f"- {bad}: unreadable result file" in warnings and "stage skipped" in warnings
    assert "student-pretrain-stale-0000000000: stage directory not in the manifest" in warnings
    assert f"{log}: line 3 is not a JSON record; skipped" in warnings and "no numeric top1; cell skipped" in warnings
    assert re.search(r"^\| `dmae_75` .* \(n=1\) \| .* \| 1/2 done; 1/2 unreadable \|$", text, re.M)
    assert re.search(r"^\| `mae` .* \| 12.50 \(n=1\) \| .* \| 1/2 done; 1/2 unreadable \|$", text, re.M)
    assert (tmp_path / "reports" / "table2.smoke" / "curves-dmae_75.png").is_file()


@pytest.mark.slow
def test_paper_profile_shows_delta_against_the_paper(tree, tmp_path):
    m = json.loads((tree / "manifest.json").read_text())
    m["profile"] = "paper"
    (tree / "manifest.json").write_text(json.dumps(m))
    s = summarize(collect(tree)).set_index("row")
    assert math.isclose(s.at["dmae_75", "delta"], s.at["dmae_75", "mean"] - 84.0)
    assert s.at["dmae_75", "delta_text"] == f"{s.at['dmae_75', 'mean'] - 84.0:+.2f}"
    assert s.at["mae", "delta_text"] == NOT_AVAILABLE
    assert "Δ = ours − paper" in report(tree, tmp_path)


@pytest.mark.slow
def test_cli_picks_the_single_profile_and_lists_several(tree, tmp_path, capsys):
    results, out = tree.parent.parent, tmp_path / "cli-reports"
    assert main(["table2", "--results-root", str(results), "--reports-dir", str(out)]) == 0
    assert (out / "table2.smoke.md").exists() and (out / "table2.smoke" / "top1_by_row.png").exists()
    shutil.copytree(tree, tree.parent / "tiny", ignore=shutil.ignore_patterns("*-s1-*"))
    with pytest.raises(SystemExit):
        main(["table2", "--results-root", str(results), "--reports-dir", str(out)])
    assert "smoke, tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["table2", "--profile", "paper", "--results-root", str(results), "--reports-dir", str(out)])


@pytest.mark.slow
def test_csv_export(tree, tmp_path):
    c = collect(tree)
    paths = export(c, tmp_path / "csv")
    assert {p.name for p in paths} >= {"cells.csv", "stages.csv", "rows.csv"}
    cells = pd.read_csv(tmp_path / "csv" / "cells.csv")
    assert len(cells) == 10 and {"row", "seed", "top1", "top1_best", "top1_last", "top5", "wall_s", "device_hours",
                                 "status", "evaluate_id", "config_path", "git_commit"} <= set(cells.columns)
