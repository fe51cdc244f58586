"""Fixtures of the interop tier: the peers' virtualenv, peer processes, the PLESTY client.

The real PLESTY (`plesty_lib`) and LAPLACE (`laplace-server`) packages are installed from PyPI
into `<repo>/.cache/interop-venv` by `scripts/interop_env.py`. Without the package index the
tier is skipped, except on CI (any non-empty `CI`), where a failed install fails the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support import free_port, on_ci

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PEER_PLESTY_SERVER = HERE / "peer_plesty_server.py"
PEER_PLESTY_CLIENT = HERE / "peer_plesty_client.py"
#: Bound for a peer process to print its READY line.
READY_TIMEOUT_S = 20.0
#: Bound for one run of the PLESTY client script (its own ZeroMQ timeouts are 3 s).
CLIENT_RUN_TIMEOUT_S = 60.0


def _load_interop_env() -> Any:
    path = REPO_ROOT / "scripts" / "interop_env.py"
    spec = importlib.util.spec_from_file_location("labmesh_interop_env", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def interop_python() -> Path:
    """The interop venv's python (built once, then cached by scripts/interop_env.py)."""
    env = _load_interop_env().ensure_interop_env()
    if env.python is not None:
        return env.python
    if on_ci():
        pytest.fail(f"CI: the interop virtualenv could not be built: {env.reason}", pytrace=False)
    if env.unreachable:
        pytest.skip(f"interop peers not installed: PyPI (or its mirror) unreachable: {env.reason}")
    pytest.fail(f"the interop virtualenv could not be built: {env.reason}", pytrace=False)


def peer_env() -> dict[str, str]:
    """Environment for a peer process: nothing of labmesh's on its import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture
def free_tcp_port() -> int:
    return free_port()


def _default_sigint() -> None:
    # A runner started in the background by a non-interactive shell ignores SIGINT, and an
    # ignored signal stays ignored across exec: give the child Python's normal Ctrl+C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PeerProcess:
    """A subprocess whose stdout/stderr lines are collected by threads (so waits are bounded)."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.address = ""  # set by fixtures that parse a READY line
        self.port = 0
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )
        self.pid = self.proc.pid
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._stdout_q: queue.Queue[str | None] = queue.Queue()
        self._threads = [
            threading.Thread(
                target=self._pump,
                args=(self.proc.stdout, self.stdout_lines, self._stdout_q),
                daemon=True,
            ),
            threading.Thread(
                target=self._pump, args=(self.proc.stderr, self.stderr_lines, None), daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: Any, lines: list[str], q: queue.Queue[str | None] | None) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if q is not None:
                q.put(line.rstrip("\n"))
        if q is not None:
            q.put(None)

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def wait_for_line(self, prefix: str, timeout: float = READY_TIMEOUT_S) -> str:
        """The first stdout line starting with `prefix`; fails the test after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(
                    f"{self.argv[1]} printed no {prefix!r} line within {timeout} s\n"
                    f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
                )
            try:
                line = self._stdout_q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.wait(5)
                pytest.fail(
                    f"{self.argv[1]} exited ({self.proc.returncode}) before printing {prefix!r}"
                    f"\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"
                )
            if line.startswith(prefix):
                return line

    def wait(self, timeout: float) -> int | None:
        """Wait up to `timeout` s for the exit; the exit code, or None if still running."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for thread in self._threads:
            thread.join(2.0)
        return code

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """End the process by its PID (SIGKILL) if it is still running, and reap it."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.wait(5.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., PeerProcess]]:
    """Start subprocesses (cwd = the test's tmp dir); every one is killed by PID at teardown."""
    started: list[PeerProcess] = []

    def start(argv: list[str | Path], pythonpath: list[Path] | None = None) -> PeerProcess:
        env = peer_env()
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
        process = PeerProcess([str(a) for a in argv], cwd=tmp_path, env=env)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


@pytest.fixture
def plesty_client(interop_python: Path, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Run tests/interop/peer_plesty_client.py (the real PLESTY client) and return its JSON."""

    def run(address: str, *args: str) -> dict[str, Any]:
        argv = [str(interop_python), str(PEER_PLESTY_CLIENT), address, *args]
        proc = subprocess.run(  # kills the client by PID if it overruns
            argv,
            cwd=tmp_path,
            env=peer_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLIENT_RUN_TIMEOUT_S,
            check=False,
        )
        assert proc.returncode == 0, (
            f"PLESTY client script failed ({proc.returncode})\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1, f"expected one JSON line, got:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(lines[0])

    return run


@pytest.fixture
def plesty_server(interop_python: Path, spawn: Callable[..., PeerProcess]) -> Iterator[Any]:
    """The real PLESTY server (tests/interop/peer_plesty_server.py) on a free 127.0.0.1 port."""
    port = free_port()
    process = spawn([interop_python, PEER_PLESTY_SERVER, str(port), "--max-lifetime", "120"])
    ready = process.wait_for_line("READY ")
    process.address = ready.split(" ", 1)[1].strip()
    process.port = port
    try:
        yield process
    finally:
        process.kill()
