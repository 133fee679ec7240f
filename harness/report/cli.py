"""Write a table's Markdown report (harness.report.markdown) from its results tree, or redraw it from its kept data.

    python -m harness.report table2 [--profile tiny] [--results-root results] [--reports-dir reports]
    python -m harness.report table2 --write-expected     # + recipes/expected/<table>.<profile>.csv from these results
    python -m harness.report table2 --from-reports       # from the data kept in reports/<name>/, no results tree

The console script `dmae-report` is this command. Without a results tree for the table (a clone), the report is
redrawn from the data kept in <reports-dir>/<name>/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import recipes

from harness.core.rundir import MANIFEST_FILE
from harness.report.expected import EXPECTED_DIR, write_expected
from harness.report.export import RUN_FILE, load_export
from harness.report.markdown import default_profile, kept_reports, render_report, write_report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n")[0])
    p.add_argument("table")
    p.add_argument("--profile", default=None, help="default: the single profile with results (without a results "
                   "tree: the single kept report, else the recipe's default profile's)")
    p.add_argument("--results-root", default="results")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--from-reports", action="store_true",
                   help="redraw the report from the data kept beside it (<reports-dir>/<name>/: run.json, cells.csv, "
                        "stages.csv, epochs.csv), not from a results tree; the default when <results-root>/<table> "
                        "has no results (a clone)")
    p.add_argument("--write-expected", action="store_true",
                   help="also write recipes/expected/<table>.<profile>.csv from these results (then commit it)")
    p.add_argument("--expected-dir", type=Path, default=EXPECTED_DIR, help=argparse.SUPPRESS)
    p.add_argument("--recipe-dir", action="append", default=[], metavar="DIR",
                   help="a folder of your own recipes, searched before the package's (repeatable; also "
                        f"${recipes.PATH_ENV}): its expected/ holds its tables' expected values")
    args = p.parse_args(argv)
    try:
        recipes.add_dirs(args.recipe_dir)
    except NotADirectoryError as e:
        p.error(str(e))
    base = Path(args.results_root) / args.table
    found = sorted(d.name for d in base.iterdir() if (d / MANIFEST_FILE).exists()) if base.is_dir() else []
    profile = args.profile
    if args.from_reports or not found:
        kept = kept_reports(Path(args.reports_dir), args.table)
        if profile is None:
            default = default_profile(args.table)
            profile = next(iter(kept)) if len(kept) == 1 else default if default in kept else None
            if profile is None:
                p.error(f"{base}: no results, and {args.reports_dir} keeps "
                        + (f"several reports of {args.table} ({', '.join(kept)}); choose one with --profile"
                           if kept else f"no report data of {args.table} ({args.reports_dir}/<name>/{RUN_FILE})"))
        if profile not in kept:
            p.error(f"{args.reports_dir}: no kept data for {args.table} / {profile} ({RUN_FILE}); kept: "
                    f"{', '.join(kept) or 'none'}")
        if args.write_expected:
            print(write_expected(load_export(Path(args.reports_dir) / kept[profile]), args.expected_dir))
        print(render_report(args.reports_dir, kept[profile], expected_dir=args.expected_dir))
        return 0
    if profile is None and len(found) != 1:
        p.error(f"{base}: several profiles ({', '.join(found)}); choose one with --profile")
    if profile is not None and profile not in found:
        p.error(f"{base / profile}: no manifest.json; profiles with results: {', '.join(found) or 'none'}")
    root = base / (profile or found[0])
    if args.write_expected:
        print(write_expected(root, args.expected_dir))
    print(write_report(root, args.reports_dir, expected_dir=args.expected_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
