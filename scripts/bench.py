"""Run the bench (the `bench` package at the repository root) from anywhere:

    .venv/bin/python scripts/bench.py [--quick] [--json out.json] ...

Same as `python -m bench` from the repository root; see `bench/__init__.py` for what is measured.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
runpy.run_module("bench", run_name="__main__", alter_sys=True)
