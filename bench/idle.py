"""An idle instrument host: `labmesh serve` of the shared-DAQ example (3 simulated devices, no
clients), its CPU (% of one core), RSS and threads over a window (issue 18's target: at most
0.5% of one core and 60 MB).

    python -m bench.idle [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO

TARGET_CPU_PCT = 0.5
TARGET_RSS_MB = 60.0


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports (all held open while choosing, so none repeats)."""
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _stat(pid: int) -> tuple[float, float, int]:
    """(CPU seconds, RSS MB, threads) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss, int(fields[17])


def run(env: dict[str, str], seconds: float = 20.0, settle_s: float = 3.0) -> dict[str, Any]:
    text = (REPO / "examples" / "hosts" / "shared-daq.yaml").read_text()
    ports = _free_ports(4)
    for old, new in zip((5556, 5557, 5558), ports, strict=False):
        text = text.replace(f"port: {old}", f"port: {new}")
    text = text.replace('bind: "*"', f"bind: 127.0.0.1\nmetrics_port: {ports[3]}")
    with tempfile.TemporaryDirectory(prefix="labmesh-idle-") as tmp:
        config = Path(tmp) / "host.yaml"
        config.write_text(text)
        env = {**env, "LABMESH_AUDIT": str(Path(tmp) / "audit.jsonl")}
        env.pop("LABMESH_DISCOVERY", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "labmesh.cli", "serve", str(config), "--sim"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 30
            seen = []
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                seen.append(line)
                if not line or "Ctrl+C stops" in line:
                    break
            time.sleep(settle_s)
            if proc.poll() is not None:
                raise RuntimeError(f"labmesh serve exited ({proc.returncode}): {''.join(seen)}")
            cpu0, _, _ = _stat(proc.pid)
            t0 = time.monotonic()
            time.sleep(seconds)
            cpu1, rss, threads = _stat(proc.pid)
            elapsed = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {
        "seconds": round(elapsed, 1),
        "cpu_pct": round(100 * (cpu1 - cpu0) / elapsed, 2),
        "rss_mb": round(rss, 1),
        "threads": threads,
    }


def report(result: dict[str, Any]) -> str:
    return (
        f"idle instrument host (`labmesh serve` of examples/hosts/shared-daq.yaml --sim: 3 "
        f"devices, metrics on, no discovery, no clients), over {result['seconds']} s: "
        f"{result['cpu_pct']}% of one core, {result['rss_mb']} MB RSS, {result['threads']} "
        f"threads (targets: <= {TARGET_CPU_PCT}%, <= {TARGET_RSS_MB:.0f} MB)"
    )


def idle_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "server": "labmesh serve, idle",
            "measured_by": "3 simulated devices, no clients",
            "target": f"CPU <= {TARGET_CPU_PCT}% of a core, RSS <= {TARGET_RSS_MB:.0f} MB",
            "measured": f"{result['cpu_pct']}%, {result['rss_mb']} MB",
            "met": result["cpu_pct"] <= TARGET_CPU_PCT and result["rss_mb"] <= TARGET_RSS_MB,
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(REPO)])}
    print(report(run(env, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
