"""`python -m harness.reproduce` and the `dmae-reproduce` script: the command line of the orchestration layer,
harness/run/cli.py (its docstring lists the options)."""
import sys

from harness.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
