"""Small per-user state files (the address book, hosts' registration ids): written whole and
atomically (a temporary file renamed over the old one), readable by their owner only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (state is a convenience)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_private_json(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON, owner-only (its folder too, when made). OSError
    when it cannot be written (a read-only home): callers go on without it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
