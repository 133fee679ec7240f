"""Expected values: recipes/expected/<table>.<profile>.csv (beside the table's recipe), written from a run's finished
seeds (write_expected, `python -m harness.report <table> --write-expected`) and checked against later runs
(check_expected, harness.report.stats.expected_check), and the report's Expected values section."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional, Tuple

import pandas as pd

import recipes

from harness.plan.config import RECIPES_DIR
from harness.report.collect import Collected, collect, summarize
from harness.report.formatting import fmt, md_table, missing, shown_path, signed
from harness.report.stats import TOLERANCE_FLOOR, TOLERANCE_SE, expected_check

EXPECTED_DIR = None  # the expected/ folder beside the table's recipe (recipes.table_dir): a user's table keeps its own
EXPECTED_COLUMNS = ["row", "mean", "std", "n", "tolerance", "commit", "note"]
TOLERANCE_RULE = (f"|Δ| ≤ max(tolerance, {TOLERANCE_SE:g}·std/√n_ours), Δ = ours − expected, std the expected "
                  f"row's seed std (tolerance alone when it has n < 2), n_ours our finished seeds")


def expected_path(table: str, profile: str, expected_dir: Optional[Path] = EXPECTED_DIR) -> Path:
    """<expected_dir>/<table>.<profile>.csv; by default in the expected/ folder beside the table's recipe."""
    if expected_dir is None:
        expected_dir = (recipes.table_dir(table) or RECIPES_DIR) / "expected"
    return Path(expected_dir) / f"{table}.{profile}.csv"


def read_expected(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"row": str, "commit": str, "note": str}, keep_default_na=False,
                     na_values={"mean": [""], "std": [""], "n": [""], "tolerance": [""]})
    for col in ("mean", "std", "n", "tolerance"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def _commit(c: Collected) -> str:
    commits = c.stages.loc[c.stages["status"] == "done", "git_commit"].dropna()
    return str(commits.mode().iloc[0]) if len(commits) else str(c.manifest.get("git_commit") or "")


def write_expected(root: Path | Collected, expected_dir: Optional[Path] = EXPECTED_DIR,
                   tolerance: float = TOLERANCE_FLOOR) -> Path:
    """recipes/expected/<table>.<profile>.csv from the finished seeds of results/<table>/<profile> (or of a
    Collected: a report's kept data) (rows with no finished seed are left out). The committed file is the reference
    later runs are checked against."""
    c = root if isinstance(root, Collected) else collect(Path(root))
    summary = summarize(c)
    commit = _commit(c)
    note = f"written by python -m harness.report --write-expected; rule: {TOLERANCE_RULE}"
    recs = [{"row": r["row"], "mean": round(r["mean"], 4), "std": "" if missing(r["std"]) else round(r["std"], 4),
             "n": r["n"], "tolerance": tolerance, "commit": commit, "note": note}
            for r in summary.to_dict("records") if r["n"]]
    path = expected_path(c.table, c.profile, expected_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(recs, columns=EXPECTED_COLUMNS).to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    return path


def check_expected(summary: pd.DataFrame, expected: pd.DataFrame) -> List[dict]:
    ours = {r["row"]: r for r in summary.to_dict("records")}
    out = []
    for e in expected.to_dict("records"):
        o = ours.get(e["row"])
        n = int(o["n"]) if o else 0
        chk = expected_check(e["mean"], None if missing(e["std"]) else e["std"], e["tolerance"],
                             o["mean"] if o else None, n)
        out.append({**e, "ours_mean": o["mean"] if o else None, "ours_std": o["std"] if o else None, "ours_n": n,
                    "in_table": o is not None, **chk})
    return out


def expected_results(c: Collected, summary: pd.DataFrame, expected_dir: Path) -> Tuple[Path, Optional[List[dict]]]:
    """(the expected-values file, check_expected's results or None when the file does not exist)."""
    path = expected_path(c.table, c.profile, expected_dir)
    return path, (check_expected(summary, read_expected(path)) if path.is_file() else None)


def expected_section(c: Collected, path: Path, res: Optional[List[dict]]) -> List[str]:
    """The Expected values section: each expected row against ours, or how to write the file when there is none."""
    if res is None:
        return [f"No expected values for `{c.table}` / `{c.profile}`: {shown_path(path)} does not exist. Write it "
                f"from these results with `python -m harness.report {c.table} --profile {c.profile} "
                "--write-expected` and commit it; later reports are then checked against it."]
    rows = []
    for r in res:
        exp = f"{fmt(r['mean'])} ± {fmt(r['std'])} (n={int(r['n']) if not missing(r['n']) else '?'})"
        if not r["in_table"]:
            ours, delta, ok = "row not in this run", "—", "—"
        elif r["within"] is None:
            ours, delta, ok = "no finished cell (n=0)", "—", "—"
        else:
            ours = f"{fmt(r['ours_mean'])}" + (f" ± {fmt(r['ours_std'])}" if r["ours_n"] >= 2 else "") + \
                f" (n={r['ours_n']})"
            delta, ok = signed(r["delta"]), ("yes" if r["within"] else "**no**") + f" (±{r['tolerance']:.2f})"
        rows.append([f"`{r['row']}`", exp, ours, delta, ok])
    commits = sorted({str(r["commit"]) for r in res if r["commit"]})
    return [f"Expected values: {shown_path(path)} (commit {', '.join(commits) or 'not recorded'}). Tolerance rule: "
            f"{TOLERANCE_RULE}.", "",
            md_table(["row", "expected (mean ± std, n)", "ours", "Δ", "within tolerance?"], rows)]
