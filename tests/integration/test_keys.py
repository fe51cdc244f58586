"""`labmesh keys`: CurveZMQ key pairs as ZeroMQ certificate files (pyzmq's zmq.auth)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
import zmq.auth

pytestmark = pytest.mark.integration


def keys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "labmesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_new_writes_a_pair_that_zmq_auth_reads_and_show_prints_its_public_key(tmp_path):
    made = keys("--json", "keys", "new", "lab-core", "--dir", str(tmp_path / "k"))
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    public, secret = zmq.auth.load_certificate(info["secret"])
    assert public.decode() == info["public_key"] and len(info["public_key"]) == 40
    assert secret is not None and len(secret) == 40
    assert stat.S_IMODE((tmp_path / "k" / "lab-core.key_secret").stat().st_mode) == 0o600
    shown = keys("keys", "show", "lab-core", "--dir", str(tmp_path / "k"))
    assert shown.returncode == 0 and shown.stdout.strip() == info["public_key"]
    by_path = keys("keys", "show", info["public"])
    assert by_path.stdout.strip() == info["public_key"]


def test_an_existing_pair_is_never_replaced_and_mistakes_are_clear(tmp_path):
    assert keys("keys", "new", "a", "--dir", str(tmp_path)).returncode == 0
    again = keys("keys", "new", "a", "--dir", str(tmp_path))
    assert again.returncode == 2 and "exists already; keys are not replaced" in again.stderr
    bad = keys("keys", "new", "../x", "--dir", str(tmp_path))
    assert bad.returncode == 2 and "is not a name" in bad.stderr
    missing = keys("keys", "show", "nobody", "--dir", str(tmp_path))
    assert missing.returncode == 2 and "labmesh keys new nobody" in missing.stderr
