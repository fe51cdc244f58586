"""What every bench scenario shares: paths, counts, server specs, and facts about the run."""

from __future__ import annotations

import contextlib
import json
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
#: The peers' virtualenv (PyTango, caproto, pyepics from PyPI; built by scripts/peers_env.py or
#: `python -m bench --build-peers`), and the older Channel-Access-only one, used when only it
#: exists.
DEFAULT_PEERS_PYTHON = REPO / ".cache" / "peers-venv" / "bin" / "python"
LEGACY_EPICS_PYTHON = REPO / ".cache" / "epics-venv" / "bin" / "python"
PEERS_ENV_SCRIPT = REPO / "scripts" / "peers_env.py"
BUILD_PEERS_HINT = "build it with `python -m bench --build-peers` (or scripts/peers_env.py)"
PARAM = "X"
EXPECTED_VALUE = 1.5
CONCURRENCY = (1, 4, 16)

#: Targets printed next to the results (issue 18; see docs/performance.md): query p50 in both
#: threading modes, and, in the server capacity run (16 load generators), throughput against
#: the floor and PLESTY and the server's CPU per request against the floor's.
TARGET_P50_VS_FLOOR = 1.1
TARGET_CAPACITY_VS_FLOOR = 0.7
TARGET_CAPACITY_VS_PLESTY = 5.0
TARGET_SERVER_CPU_VS_FLOOR = 1.5
#: The client-library table's (16 client processes sharing the 2 CPUs with the server): issue
#: 13's targets, kept for comparison with earlier runs.
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


@dataclass(frozen=True)
class PeerStacks:
    """What the peers' virtualenv offers: its Python and the version of each stack (None when
    it cannot import it), and a line saying what is measured or why not."""

    python: str | None
    tango: str | None = None
    caproto: str | None = None
    pyepics: str | None = None
    note: str = ""

    def as_dict(self) -> dict[str, str | None]:
        return {
            "python": self.python,
            "pytango": self.tango,
            "caproto": self.caproto,
            "pyepics": self.pyepics,
            "note": self.note,
        }


_PROBE = """
import importlib, importlib.metadata as m, json
out = {}
for module, dist in (("tango", "pytango"), ("caproto", "caproto"), ("epics", "pyepics")):
    try:
        importlib.import_module(module)
        out[module] = m.version(dist)
    except Exception:
        out[module] = None
print(json.dumps(out))
"""


def find_peer_stacks(python: str | Path | None = None) -> PeerStacks:
    """The peers' virtualenv (default `.cache/peers-venv`, else the older `.cache/epics-venv`
    for Channel Access alone) and which stacks it can import; never raises."""
    candidates = [Path(python)] if python else [DEFAULT_PEERS_PYTHON, LEGACY_EPICS_PYTHON]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        return PeerStacks(
            None,
            note=f"PyTango/caproto/pyepics peers skipped: no peers virtualenv "
            f"({candidates[0]} is missing); {BUILD_PEERS_HINT}",
        )
    try:
        out = subprocess.run([str(found), "-c", _PROBE], capture_output=True, text=True, timeout=60)
        versions = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        versions = {}
    tango, caproto, pyepics = (versions.get(k) for k in ("tango", "caproto", "epics"))
    have = [
        f"{name} {v}"
        for name, v in (("PyTango", tango), ("caproto", caproto), ("pyepics", pyepics))
        if v
    ]
    missing = [
        name
        for name, v in (("PyTango", tango), ("caproto", caproto), ("pyepics", pyepics))
        if not v
    ]
    note = f"peers from {found}: {', '.join(have) or 'none importable'}"
    if missing:
        note += f" ({', '.join(missing)} skipped: not importable there; {BUILD_PEERS_HINT})"
    return PeerStacks(str(found), tango, caproto, pyepics, note)


def tcp_listeners(pid: int) -> list[tuple[str, bool]]:
    """The TCP sockets process `pid` (any thread) listens on: (address:port, is loopback)."""
    import ipaddress

    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) < 10 or cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                host, port = cols[1].split(":")
                raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(raw)
                mapped = getattr(ip, "ipv4_mapped", None)
                found.append((f"{ip}:{int(port, 16)}", (mapped or ip).is_loopback))
    return found


def check_loopback_only(pid: int, what: str) -> list[str]:
    """The addresses `pid` listens on; RuntimeError when any is not a loopback address."""
    listeners = tcp_listeners(pid)
    wrong = [address for address, loopback in listeners if not loopback]
    if wrong:
        raise RuntimeError(f"{what} listens on {', '.join(wrong)}, not only on 127.0.0.1")
    return [address for address, _ in listeners]


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
