"""The README's quick start as a newcomer runs it: clone the repository into a temporary folder,
run the set-up command as written (a fresh virtualenv, packages from PyPI), start `labmesh demo`,
run `labmesh ls` with no variable set, then the test command restricted to the unit tier."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


def quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_the_readme_quick_start_works_in_a_fresh_clone(tmp_path):
    setup, demo, tests = quick_start_commands()
    assert setup.startswith("python3 -m venv .venv") and demo == ".venv/bin/labmesh demo"
    assert tests == ".venv/bin/python -m pytest"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", 5550))
        except OSError:
            pytest.fail("port 5550 is taken: the quick start's demo needs it (stop the other demo)")
    clone = tmp_path / "labmesh"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABMESH_", "VIRTUAL_ENV"))}
    env["LABMESH_ADDRESS_CACHE"] = str(tmp_path / "addresses.json")
    env["LABMESH_AUDIT"] = str(tmp_path / "audit.jsonl")
    made = subprocess.run(
        ["bash", "-e", "-c", setup],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    lab = subprocess.Popen(
        ["bash", "-c", f"exec {demo}"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        banner = []
        while time.monotonic() < deadline:
            line = lab.stdout.readline()
            if not line:
                break
            banner.append(line)
            if line.startswith("(ready in"):
                break
        assert banner and banner[-1].startswith("(ready in"), "".join(banner)
        listed = subprocess.run(
            ["bash", "-c", ".venv/bin/labmesh ls"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        names = {line.split()[0] for line in listed.stdout.splitlines()[1:]}
        assert names == {"pm100-a", "daq-1", "stage"}
        assert "this machine; LABMESH_DISCOVERY is not set" in listed.stderr
    finally:
        lab.send_signal(signal.SIGINT)  # the demo we started, by its PID
        try:
            lab.wait(15)
        except subprocess.TimeoutExpired:
            lab.kill()
    unit = subprocess.run(
        ["bash", "-c", f"{tests} tests/unit -q -p no:cacheprovider"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert unit.returncode == 0, unit.stdout[-3000:]
    assert re.search(r"\d+ passed", unit.stdout)
