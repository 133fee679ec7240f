"""The Markdown report of a table: a summary block, the gates, results against the paper, the recipe's claims checked
on paired seeds, expected values, plots, cost (with the rows' model sizes and FLOPs), provenance.

write_report(results/<table>/<profile>, reports_dir) writes <reports-dir>/<name>.md, its figures and data in
<reports-dir>/<name>/ (linked relatively), and the dashboard <reports-dir>/README.md (harness.report.dashboard). name
is <table> for the profile the recipe's defaults list names, <table>.<profile> for any other (report_name).
`reproduce` calls it when a run ends; `python -m harness.report` (harness.report.cli) is its command line.

The data kept beside a report: cells.csv, stages.csv, epochs.csv (what the figures draw of each stage's log.jsonl)
and run.json (the run's manifest, the warnings, the rows' resolved stage specs, their model sizes and FLOPs), written
by harness.report.export.export, from which the report is then drawn (render_report); rows.csv, claims.csv and
summary.json (the report's numbers for machines: rows, claims, gates, provenance) are drawn with it. So a clone, which
has no results/, gets the same report back from the committed data (`--from-reports`, or by default when
<results-root>/<table> has no results): the same inputs give the same bytes, except the "Report generated" line
(SOURCE_DATE_EPOCH fixes it) and, in the provenance, the versions and git state of the code writing the report.

The sections are drawn by harness.report.summary (the summary block), .sections (banner, gates, results, teacher,
convergence), .claims, .expected and .provenance (cost, stages, provenance); the figures by harness.report.figures.
The report knows no recipe: the claims come from the run's manifest (the recipe's `claims:` section, resolved), and
are judged by harness.report.stats; the setting a table's rows vary (drawn as top-1 against it) is found from their
resolved specs (harness.report.ablation). Nothing under results/ is linked (results/ is not committed): stage ids and
the config/manifest paths are written as plain text, from results/<table>/<profile> on, never as this machine's path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

import recipes

from harness.core.rundir import read_json
from harness.report.artefacts import model_costs, write_json, writer_state
from harness.report.claims import check_claims, claims_frame, claims_of, claims_section, report_noise
from harness.report.collect import collect, load_paper_numbers, summarize, teacher_results
from harness.report.dashboard import write_index
from harness.report.expected import EXPECTED_DIR, expected_results, expected_section
from harness.report.export import RUN_FILE, export, load_export
from harness.report.figures import make_figures
from harness.report.formatting import missing
from harness.report.gates import check_gates, not_passed
from harness.report.provenance import cost_section, provenance_section, stages_section
from harness.report.sections import gates_of, gates_section, profile_banner, results_section
from harness.report.stats import gate_verdict
from harness.report.summary import overview, overview_lines, summary_json


def _data_files(fig_dir: Path) -> List[Path]:
    """The data kept beside a report, in a fixed order, those that exist."""
    names = [f"{base}.{ext}" for base in ("cells", "stages", "rows", "epochs") for ext in ("csv", "parquet")]
    names += [RUN_FILE, "claims.csv", "summary.json"]
    return [fig_dir / n for n in names if (fig_dir / n).is_file()]


def write_report(root: Path, reports_dir: str | Path, figures: bool = True,
                 expected_dir: Optional[Path] = EXPECTED_DIR, costs: bool = True) -> Path:
    """results/<table>/<profile> -> <reports_dir>/<name>.md (+ figures and data, in <reports_dir>/<name>/), where
    name = report_name(table, profile); then the dashboard <reports_dir>/README.md. The tree is first exported
    (harness.report.export.export: cells, stages, epochs, run.json; with costs, the rows' parameters and FLOPs) and the
    report is drawn from that export (render_report), so a clone's committed data gives the same report back.
    figures=False skips drawing (the slow part), for tests of the text."""
    c = collect(Path(root))
    name = report_name(c.table, c.profile)
    export(c, Path(reports_dir) / name, rows=False, models=model_costs(c.specs) if costs else {})
    return render_report(reports_dir, name, figures=figures, expected_dir=expected_dir)


def render_report(reports_dir: str | Path, name: str, figures: bool = True,
                  expected_dir: Optional[Path] = EXPECTED_DIR) -> Path:
    """<reports_dir>/<name>.md, its figures, rows.csv, claims.csv and summary.json from the data kept in
    <reports_dir>/<name>/ (harness.report.export.load_export: run.json, cells.csv, stages.csv, epochs.csv); then the
    dashboard. No results tree is read."""
    reports_dir = Path(reports_dir)
    fig_dir = reports_dir / name
    c = load_export(fig_dir)
    papers = load_paper_numbers()
    summary = summarize(c, papers)
    claims = claims_of(c)
    noise, left = report_noise(c.cells)
    res = check_claims(claims, c.cells, summary, noise) if claims is not None else None
    gates = check_gates(c.cells, summary, gates_of(c)) if gates_of(c)["enabled"] else None
    if res is not None and gates:  # a paper claim on a profile whose positive controls did not pass is not testable
        res = [gate_verdict(r, not_passed(gates)) for r in res]
    exp_path, exp_res = expected_results(c, summary, expected_dir)
    teacher = next((t["top1"] for t in teacher_results(c) if t["role"] == "teacher-evaluate"
                    and not missing(t["top1"])), None)
    expected = {r["row"]: r["mean"] for r in exp_res or [] if not missing(r["mean"])}
    drawn = make_figures(c, summary, fig_dir, res, expected=expected, teacher=teacher) if figures else []
    summary.drop(columns=["seeds_top1"]).to_csv(fig_dir / "rows.csv", index=False)
    claims_frame(res, c, name).to_csv(fig_dir / "claims.csv", index=False)
    writer = writer_state(exclude=[reports_dir])
    ov = overview(c, res, gates, exp_path, exp_res)
    write_json(summary_json(c, name, summary, res, gates, exp_res, ov, writer), fig_dir / "summary.json")
    data = _data_files(fig_dir)
    over = [f"`{r['row']}` ({r['overridden']})" for r in summary.to_dict("records") if r.get("overridden")]
    warn = [f"- {w}" for w in c.warnings] + ([
        f"- Rows the command line changed against the recipe ({'; '.join(over)}): each is labelled with the change; "
        "its paper number and every claim on it read \"not applicable (overridden: …)\". Neutral overrides (seeds, "
        "paths, launcher, run.*, provided checkpoints) do not count."] if over else []) or ["None."]
    parts = [[f"# {c.table}: {c.manifest.get('title', '')}", "", "## Summary", ""], overview_lines(ov), [""],
             profile_banner(c), ["", "## Gates", ""], gates_section(gates, res),
             ["", "Statuses: done · failed (reason from error.json) · partial (running or interrupted) · unreadable "
              "(result file could not be read; skipped) · stale (computed from an input that has since failed or "
              "changed; the reason names it; the next run moves it aside and recomputes it) · not started.", "",
              "## Warnings", ""], warn,
             ["", "## Results", ""], results_section(summary, c), ["", "## Claims", ""],
             claims_section(res, noise, left),
             ["", "## Expected values", ""], expected_section(c, exp_path, exp_res),
             ["", "## Figures", ""],
             [f"![{cap}]({name}/{png})" for cap, png in drawn]
             or ["Nothing to plot." if figures else "Figures not drawn (write_report(figures=False))."],
             ["", "Data: " + ", ".join(f"[{p.name}]({name}/{p.name})" for p in data) + f". The report comes back "
              f"from these without the results tree: `python -m harness.report {c.table} --profile {c.profile} "
              "--from-reports`.", "", "## Cost", ""],
             cost_section(c, summary, papers), ["", "## Stages", ""], stages_section(c), ["", "## Provenance", ""],
             provenance_section(c, writer)]
    out = reports_dir / f"{name}.md"
    out.write_text("\n".join(line for part in parts for line in part) + "\n")
    write_index(reports_dir)
    return out


def default_profile(table: str, recipes_dir: Optional[Path] = None) -> Optional[str]:
    """The profile named in the defaults list of <table>.yaml (on the recipe search path, or in recipes_dir) (None
    without a recipe or a profile default)."""
    path = Path(recipes_dir) / f"{table}.yaml" if recipes_dir is not None else recipes.find(f"{table}.yaml")
    if path is None or not path.is_file():
        return None
    for d in OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []:
        if isinstance(d, dict) and "profile" in d:
            return str(d["profile"])
    return None


def report_name(table: str, profile: str) -> str:
    """<table> for the recipe's default profile (the report `make reproduce` writes), <table>.<profile> otherwise."""
    return table if profile == default_profile(table) else f"{table}.{profile}"


def kept_reports(reports_dir: Path, table: str) -> Dict[str, str]:
    """{profile: report name} of the reports of `table` whose data is kept in <reports_dir>/<name>/ (run.json)."""
    out: Dict[str, str] = {}
    reports_dir = Path(reports_dir)
    if not reports_dir.is_dir():
        return out
    for d in sorted(reports_dir.iterdir()):
        if not (d.name == table or d.name.startswith(f"{table}.")) or not (d / RUN_FILE).is_file():
            continue
        m = (read_json(d / RUN_FILE) or {}).get("manifest")
        if isinstance(m, dict) and m.get("table") == table and m.get("profile"):
            out[str(m["profile"])] = d.name
    return out
