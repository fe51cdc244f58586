"""The bench is a package run two ways with the same options (`python -m bench`, scripts/bench.py);
the figures themselves come from running it, not from tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_both_entry_points_load_every_scenario_and_offer_the_same_options(tmp_path):
    as_module = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    as_script = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--help"],
        cwd=tmp_path,  # from anywhere
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_module.returncode == 0, as_module.stderr
    assert as_script.returncode == 0, as_script.stderr
    for option in ("--quick", "--json", "--no-discovery", "--no-laplace", "--capacity-windows"):
        assert option in as_module.stdout
    assert as_module.stdout.split("options:")[1] == as_script.stdout.split("options:")[1]
