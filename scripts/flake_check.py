"""Run a test tier again and again beside CPU burners, to find flaky tests before CI does.

    .venv/bin/python scripts/flake_check.py     # 10 runs of tests/integration, 1 burner
    .venv/bin/python scripts/flake_check.py --runs 3 --burners 2 tests/unit tests/integration

Each burner is a separate process spinning on one core, so the tests run
on a machine that is busier than CI's. Everything is bounded: every pytest run by
`--run-timeout`, every burner by the whole budget (runs x run timeout) and ended by its PID at
the end. Prints one line per run and a summary; exits 1 if any run failed, naming the tests
that failed in which run.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A burner spins one core until its deadline (argv[1], seconds), so it ends by itself even if
#: this script is killed.
BURN = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end: pass"
)
#: (faulthandler: a test that runs 5 minutes prints every thread's stack)
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
PYTEST += ["-o", "faulthandler_timeout=300"]
FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def pytest_run(paths: list[str], timeout: float) -> tuple[str, int | str]:
    """One pytest run in its own process group (so a run that hangs is ended with every
    server it started): its output and exit code ("timeout" if it ran out of time)."""
    proc = subprocess.Popen(
        PYTEST + paths,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return output, proc.returncode
    except subprocess.TimeoutExpired:
        # Ctrl+C first: pytest then prints where it hung and the failures so far
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we started: pytest and children
            output, _ = proc.communicate()
        if _group_alive(proc.pid):  # servers a test started and left behind
            os.killpg(proc.pid, signal.SIGKILL)
        return output, "timeout"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["tests/integration"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--burners", type=int, default=1, help="CPU-burning processes (0: none)")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--log-dir", type=Path, help="keep each run's pytest output here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.burners < 0:
        parser.error("--runs must be >= 1 and --burners >= 0")

    budget = args.runs * args.run_timeout + 60
    burners = [
        subprocess.Popen([sys.executable, "-c", BURN, str(budget)]) for _ in range(args.burners)
    ]
    failures: dict[int, list[str]] = {}
    durations: list[float] = []
    try:
        for run in range(1, args.runs + 1):
            started = time.monotonic()
            output, code = pytest_run(args.paths, args.run_timeout)
            took = time.monotonic() - started
            durations.append(took)
            if args.log_dir is not None:
                args.log_dir.mkdir(parents=True, exist_ok=True)
                (args.log_dir / f"run{run}.log").write_text(output)
            tail = output.strip().splitlines()[-1] if output.strip() else "(no output)"
            print(f"run {run:>2}/{args.runs}: exit {code}, {took:.0f} s: {tail}", flush=True)
            if code != 0:
                failures[run] = FAILED.findall(output) or [f"exit {code}"]
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()

    print(
        f"{args.runs - len(failures)} of {args.runs} runs passed beside {args.burners} "
        f"burner(s); {min(durations):.0f}-{max(durations):.0f} s per run"
    )
    for run, tests in failures.items():
        print(f"  run {run}: " + ", ".join(tests))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
