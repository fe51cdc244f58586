"""Create (once, then reuse) the virtualenv holding the bench's peer stacks from PyPI.

The bench (`python -m bench`) measures the best-known Python control-system stacks next to
labmesh in the same run: PyTango (`read_attribute`, change events) and Channel Access (caproto's
server and client, pyepics' libca). They live in their own virtualenv, `<repo>/.cache/peers-venv`,
so that nothing of theirs leaks into labmesh's environment; the bench skips them, saying so,
when it is missing. Built the way scripts/interop_env.py builds the interop venv (its helpers are
reused): pinned versions, one bounded pip step, an import check, then a marker file that makes
later calls instant; a half-built environment has no marker and is rebuilt from scratch.

As a module:

    from peers_env import ensure_peers_env
    env = ensure_peers_env()
    env.python        # Path of the venv's python, or None when the install failed

As a script: `python scripts/peers_env.py` (or `python -m bench --build-peers`) prints the venv's
python path on stdout and exits 0; on failure it prints the reason on stderr and exits 1 (2 when
the package index was unreachable).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from interop_env import (  # the sibling script, found through the path above
    REPO_ROOT,
    InteropEnv,
    Recipe,
    ensure_venv,
    script_main,
)

VENV_DIR = REPO_ROOT / ".cache" / "peers-venv"
#: The peers, pinned (PyTango has manylinux wheels for CPython 3.9-3.13; no compiler needed).
PEERS = ("pytango==10.3.1", "caproto==1.3.0", "pyepics==3.5.10", "numpy<2.5")
#: Imported after installation; a peer that installs but cannot import is a failure.
IMPORT_CHECK = "import tango, tango.server, caproto.server, caproto.threading.client, epics"
RECIPE = Recipe(
    name="peers",
    marker_name=".labmesh-peers-ready.json",
    steps=((("--only-binary", "pytango", *PEERS), "installing the peers"),),
    import_check=IMPORT_CHECK,
    spec={"peers": list(PEERS)},
)


def ensure_peers_env(
    venv_dir: Path = VENV_DIR, *, force: bool = False, base_python: str | None = None
) -> InteropEnv:
    """Build the peers venv unless a complete one exists; never raises for a failed install."""
    return ensure_venv(RECIPE, venv_dir, force=force, base_python=base_python)


def main(argv: list[str] | None = None) -> int:
    return script_main(ensure_peers_env, "peers_env", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
