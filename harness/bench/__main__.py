"""`python -m harness.bench`: see harness.bench.cli."""
import sys

from harness.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
