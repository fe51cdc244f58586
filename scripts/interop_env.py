"""Create (once, then reuse) the virtualenv holding the real interop peers from PyPI.

The interop test tier runs the published PLESTY (`plesty_lib`) and LAPLACE (`laplace-server`)
packages against labmesh. They live in their own virtualenv, `<repo>/.cache/interop-venv`, so
that nothing of theirs can leak into labmesh's environment or hide a missing dependency of ours.

`plesty_lib` 0.6.0 declares Python >= 3.12 but imports and runs on 3.11, so it is installed in
two steps: first its dependencies normally, then the peers with `--no-deps
--ignore-requires-python`. A marker file written after a successful install (and import check)
makes later calls instant; a half-built environment has no marker and is rebuilt from scratch.

As a module:

    from interop_env import ensure_interop_env
    env = ensure_interop_env()
    env.python        # Path of the venv's python, or None when the install failed
    env.reason        # why it failed (None on success)
    env.unreachable   # True when the failure was the package index not answering

As a script: `python scripts/interop_env.py` prints the venv's python path on stdout and exits
0; on failure it prints the reason on stderr and exits 1 (2 when the index was unreachable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: The repository root, found from this file (never an absolute machine path).
REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_DIR = REPO_ROOT / ".cache" / "interop-venv"
MARKER_NAME = ".labmesh-interop-ready.json"

#: Step 1: the peers' dependencies, installed normally.
PEER_DEPENDENCIES = ("numpy<2.3", "pyserial", "pyusb", "pyvisa", "pyyaml", "pyzmq")
#: Step 2: the peers themselves, pinned, without their (Python >= 3.12) metadata checks.
PEERS = ("plesty_lib==0.6.0", "laplace-server==0.2.0")
#: Imported after installation; a peer that installs but cannot import is a failure.
IMPORT_CHECK = "import plesty.lib.service, plesty.lib.device.device_utils, laplace_server"

#: pip's own network bounds (seconds per socket operation, retries per download).
PIP_NETWORK_OPTIONS = ("--timeout", "60", "--retries", "3")
#: Upper bound for any one step (venv creation, one pip install).
STEP_TIMEOUT_S = 900.0
#: How long to wait for another process that is building the same environment.
LOCK_TIMEOUT_S = 1200.0

#: pip output that means the package index could not be reached at all.
_UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
    r"resolution|Name or service not known|No address associated with hostname|Network is "
    r"unreachable|Connection refused|ConnectTimeoutError|Connection to \S+ timed out|"
    r"ProxyError|Could not fetch URL|Max retries exceeded",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class InteropEnv:
    """The outcome of `ensure_interop_env`.

    Attributes:
        python: the interop venv's python executable, or None when it could not be built.
        reason: why it could not be built (None on success).
        unreachable: the failure was the package index (PyPI or its mirror) not answering.
        cached: the environment already existed (nothing was installed this time).
    """

    python: Path | None
    reason: str | None = None
    unreachable: bool = False
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.python is not None


class _StepFailed(Exception):
    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def venv_python(venv_dir: Path = VENV_DIR) -> Path:
    """Where a venv keeps its python executable on this platform."""
    if os.name == "nt":
        return venv_dir / "Scripts" / "python.exe"
    return venv_dir / "bin" / "python"


@dataclass(frozen=True)
class Recipe:
    """What one virtualenv holds: pip steps, an import check, and what its marker records.

    Attributes:
        name: a short name for messages ("interop", "peers").
        marker_name: the file written in the venv once it is complete.
        steps: (pip install arguments, what the step does), run in order with network bounds.
        import_check: Python code run by the venv's python after the steps.
        spec: what the marker records besides the Python version; a change forces a rebuild.
    """

    name: str
    marker_name: str
    steps: tuple[tuple[tuple[str, ...], str], ...]
    import_check: str
    spec: dict[str, object]

    def full_spec(self) -> dict[str, object]:
        return {**self.spec, "python": list(sys.version_info[:2])}


INTEROP = Recipe(
    name="interop",
    marker_name=MARKER_NAME,
    steps=(
        (PEER_DEPENDENCIES, "installing the peers' dependencies"),
        (
            ("--no-deps", "--ignore-requires-python", *PEERS),
            "installing plesty_lib and laplace-server",
        ),
    ),
    import_check=IMPORT_CHECK,
    spec={"dependencies": list(PEER_DEPENDENCIES), "peers": list(PEERS)},
)


def _marker_ok(venv_dir: Path, recipe: Recipe = INTEROP) -> bool:
    marker = venv_dir / recipe.marker_name
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(recorded, dict)
        and recorded.get("spec") == recipe.full_spec()
        and venv_python(venv_dir).exists()
    )


@contextlib.contextmanager
def _exclusive(lock_path: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (other test processes building the same venv)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no concurrent builders to guard against here
        yield
        return
    with open(lock_path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _StepFailed(
                        f"another process has held {lock_path} for over {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, log: list[str], *, network: bool = False) -> None:
    """Run one step, bounded in time; raise _StepFailed with the tail of its output."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=STEP_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output if isinstance(exc.output, str) else ""
        log.append(output)
        raise _StepFailed(
            f"{what} did not finish within {STEP_TIMEOUT_S:.0f} s",
            unreachable=network and bool(_UNREACHABLE.search(output)),
        ) from None
    except OSError as exc:
        raise _StepFailed(f"{what} could not start: {exc}") from None
    log.append(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise _StepFailed(
            f"{what} failed (exit {proc.returncode}):\n{tail}",
            unreachable=network and bool(_UNREACHABLE.search(proc.stdout)),
        )


def _build(recipe: Recipe, venv_dir: Path, base_python: str, log: list[str]) -> Path:
    if venv_dir.exists():
        shutil.rmtree(venv_dir)  # no marker: a partial or outdated build; start clean
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    _run([base_python, "-m", "venv", str(venv_dir)], "creating the virtualenv", log)
    python = venv_python(venv_dir)
    pip = [str(python), "-m", "pip", "install", "--no-input", *PIP_NETWORK_OPTIONS]
    for arguments, what in recipe.steps:
        _run([*pip, *arguments], what, log, network=True)
    _run([str(python), "-c", recipe.import_check], "importing the installed peers", log)
    marker = {"spec": recipe.full_spec(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (venv_dir / recipe.marker_name).write_text(
        json.dumps(marker, indent=2) + "\n", encoding="utf-8"
    )
    return python


def ensure_venv(
    recipe: Recipe, venv_dir: Path, *, force: bool = False, base_python: str | None = None
) -> InteropEnv:
    """Build the venv of `recipe` unless a complete one exists; never raises for a failed
    install (the InteropEnv says why)."""
    venv_dir = Path(venv_dir)
    if not force and _marker_ok(venv_dir, recipe):
        return InteropEnv(venv_python(venv_dir), cached=True)
    log: list[str] = []
    try:
        with _exclusive(venv_dir.parent / f"{venv_dir.name}.lock", LOCK_TIMEOUT_S):
            if not force and _marker_ok(venv_dir, recipe):  # built meanwhile by another process
                return InteropEnv(venv_python(venv_dir), cached=True)
            python = _build(recipe, venv_dir, base_python or sys.executable, log)
    except _StepFailed as exc:
        return InteropEnv(None, str(exc), unreachable=exc.unreachable)
    except OSError as exc:
        return InteropEnv(None, f"cannot build {venv_dir}: {exc}")
    return InteropEnv(python)


def ensure_interop_env(
    venv_dir: Path = VENV_DIR,
    *,
    force: bool = False,
    base_python: str | None = None,
) -> InteropEnv:
    """Build the interop venv unless a complete one exists; never raises for a failed install.

    Parameters:
        venv_dir: where the venv lives (default `<repo>/.cache/interop-venv`).
        force: rebuild even when the marker says the venv is complete.
        base_python: the interpreter to create the venv with (default: this one).
    """
    return ensure_venv(INTEROP, venv_dir, force=force, base_python=base_python)


def interop_python(venv_dir: Path = VENV_DIR) -> Path | None:
    """The interop venv's python (building it if needed), or None if it cannot be built."""
    return ensure_interop_env(venv_dir).python


def script_main(
    ensure: Callable[..., InteropEnv], label: str, doc: str, argv: list[str] | None
) -> int:
    """The command line of a venv script: build (or --force rebuild), print the python."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    env = ensure(force=args.force)
    if env.python is None:
        kind = "package index unreachable" if env.unreachable else "install failed"
        print(f"{label}: {kind}: {env.reason}", file=sys.stderr)
        return 2 if env.unreachable else 1
    print(env.python)
    return 0


def main(argv: list[str] | None = None) -> int:
    return script_main(ensure_interop_env, "interop_env", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
