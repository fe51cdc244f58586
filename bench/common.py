"""What every bench scenario shares: paths, counts, server specs, and facts about the run."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers.py"
#: The name every discovery lookup asks for (registered among `lookup_records` others).
LOOKUP_NAME = "bench-dev-00042"


DEFAULT_INTEROP_PYTHON = REPO / ".cache" / "interop-venv" / "bin" / "python"
PARAM = "X"
EXPECTED_VALUE = 1.5
CONCURRENCY = (1, 4, 16)

#: Targets printed next to the results (see docs/performance.md).
TARGET_P50_VS_FLOOR = 1.5
TARGET_TPUT16_VS_FLOOR = 0.5
TARGET_TPUT16_VS_PLESTY = 4.0


@dataclass(frozen=True)
class Counts:
    """How many calls each run makes, and how long any one run may take."""

    latency_calls: int
    latency_warmup: int
    calls_per_client: dict[int, int]
    throughput_warmup: int
    run_limit_s: float
    rounds: int
    capacity_requests: int  # per load generator
    capacity_warmup: int
    capacity_limit_s: float


DEFAULT_COUNTS = Counts(
    latency_calls=3000,
    latency_warmup=300,
    calls_per_client={1: 4000, 4: 1000, 16: 250},
    throughput_warmup=50,
    run_limit_s=30.0,
    rounds=3,
    capacity_requests=1500,
    capacity_warmup=50,
    capacity_limit_s=8.0,
)
QUICK_COUNTS = Counts(
    latency_calls=200,
    latency_warmup=20,
    calls_per_client={1: 200, 4: 50, 16: 15},
    throughput_warmup=5,
    run_limit_s=10.0,
    rounds=1,
    capacity_requests=100,
    capacity_warmup=5,
    capacity_limit_s=3.0,
)


@dataclass(frozen=True)
class ServerSpec:
    """One server to measure: how to start it and how to drive it."""

    key: str
    label: str
    argv: list[str]
    client: str  # "raw" (DEALER with a JSON body) or "labmesh" (build_client().query)
    cwd: str | None = None
    #: How a load generator (server capacity run) checks a reply: "id" (the reply carries the
    #: request's id: the floor's echo), "id+ok" (the id and status ok: labmesh) or "ok" (status
    #: ok only: PLESTY echoes no ids).
    load_check: str = "id+ok"
    #: The session a load generator puts in its queries: "connect" (whatever the server's
    #: connect reply grants, as labmesh's client does: labmesh gives one, PLESTY none) or
    #: "random" (a made-up token of the same size, for the echo floor).
    load_session: str = "connect"


def bench_command(*args: str) -> list[str]:
    """The command that runs this bench package's `args` in a child process (the repository
    root is on the children's PYTHONPATH, see `child_env`)."""
    return [sys.executable, "-m", "bench", *args]


def child_env(labmesh_copy: Path) -> dict[str, str]:
    """The environment of every process the bench starts: the copy of labmesh taken at the
    start first, then the repository root (for `bench` itself)."""
    path = os.pathsep.join([str(labmesh_copy), str(REPO)])
    return {**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": "0"}


def _load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _git_state() -> str:
    """The commit measured, marked dirty when services/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "services"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{head or '?'}{' + uncommitted changes in services/' if dirty else ''}"


def stop_child(proc: subprocess.Popen | None, wait_s: float = 15.0) -> None:
    """End a child of the bench: close its stdin (its signal to finish), wait, kill if it
    overruns (by its PID: only processes the bench started)."""
    if proc is None:
        return
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
