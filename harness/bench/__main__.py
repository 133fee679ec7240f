"""`python -m harness.bench`: see harness.bench.cli."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
