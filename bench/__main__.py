"""`python -m bench` (from the repository root): run the bench (see the package docstring)."""

import sys

from bench.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench interrupted; every process it started was stopped", file=sys.stderr)
        sys.exit(130)
