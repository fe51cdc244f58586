"""`labmesh demo --secure` end to end, as a newcomer runs it: the exports it prints, a write
as the operator, a refusal as the observer, the PLESTY-style plaintext listener, the trail."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from support import running_demo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secure_demo():
    with running_demo("--secure") as lab:
        env = dict(os.environ)
        env.pop("LABMESH_KEY", None)
        for line in lab["banner"]:
            found = re.match(r"\s*export (\w+)=(.*)$", line)
            if found:
                env[found[1]] = found[2].strip("'")
        trail = next(w for line in lab["banner"] for w in line.split() if w.endswith(".jsonl"))
        yield {**lab, "env": env, "trail": trail}


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "labmesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_the_secured_demo_does_what_its_banner_says(secure_demo):
    env = secure_demo["env"]
    assert {"LABMESH_DISCOVERY", "LABMESH_DISCOVERY_KEY", "LABMESH_KEY"} <= set(env)
    listed = run(env, "--json", "ls")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"pm100-a", "daq-1", "stage"} and all(r["up"] for r in rows.values())
    assert run(env, "set", "pm100-a", "WAVELENGTH", "1064").stdout.strip() == "ok"
    observer = {**env, "LABMESH_KEY": env["LABMESH_KEY"].replace("operator", "observer")}
    refused = run(observer, "set", "pm100-a", "WAVELENGTH", "800")
    assert refused.returncode == 1
    assert "PermissionError" in refused.stderr and "needs role operator" in refused.stderr
    assert json.loads(run(observer, "--json", "get", "pm100-a", "WAVELENGTH").stdout) == 1064.0
    # without a key: told what to set, nothing reached
    keyless = {k: v for k, v in env.items() if k != "LABMESH_KEY"}
    nokey = run(keyless, "get", "pm100-a", "WAVELENGTH")
    assert nokey.returncode != 0 and "set LABMESH_KEY" in nokey.stderr
    # the plaintext listener for PLESTY clients: read only
    plain = f"tcp://127.0.0.1:{secure_demo['base'] + 8}"
    assert json.loads(run(keyless, "--json", "get", plain, "WAVELENGTH").stdout) == 1064.0
    assert "needs role operator" in run(keyless, "set", plain, "WAVELENGTH", "900").stderr
    deadline = time.monotonic() + 5  # the host's trail thread writes within milliseconds
    while True:
        trail = run(env, "--json", "audit", secure_demo["trail"])
        rows = [json.loads(line) for line in trail.stdout.splitlines()]
        outcomes = [(r["client"], r["target"], r["value"], r["outcome"]) for r in rows]
        if ("plaintext", "WAVELENGTH", 900, "denied") in outcomes or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ("operator", "WAVELENGTH", 1064, "ok") in outcomes
    assert ("observer", "WAVELENGTH", 800, "denied") in outcomes
    assert ("plaintext", "WAVELENGTH", 900, "denied") in outcomes
    human = run(env, "audit", secure_demo["trail"]).stdout
    assert "write WAVELENGTH = 1064  by operator@127.0.0.1  -> ok" in human
