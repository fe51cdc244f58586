"""The audit trail: one JSON line per write, call, lock event and refused permission.

EPICS caPutLog is the model: who changed what, from where, to which value, and how it ended.
A line looks like

    {"time": "2026-12-06T10:15:02.114Z", "device": "psu-1", "event": "write",
     "client": "alice", "peer": "10.0.0.7", "target": "VOLTAGE", "value": 12.5, "outcome": "ok"}

`client` is the CurveZMQ key's name on a secured server (proven by the handshake), else the
client id the peer chose (claimed, not proven); `value` is cut to 200 characters. Lines go to
a rotating file (bounded: `max_bytes` times `backups + 1`) and/or stdout (container logs);
`labmesh audit` reads and follows the file. Every event is also counted in the Prometheus
counter `labmesh_audit_events_total{device, event, outcome}`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

#: $LABMESH_AUDIT: where `labmesh serve` writes the trail and `labmesh audit` reads it (a file
#: path, `stdout`, or `off`).
ENV_VAR = "LABMESH_AUDIT"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5


def default_path() -> Path:
    """$LABMESH_AUDIT if it is a path, else ~/.local/state/labmesh/audit.jsonl."""
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured and configured not in ("stdout", "off"):
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "labmesh" / "audit.jsonl"


class AuditLog:
    """Writes audit lines; thread-safe (every server thread of a host shares one).

    Parameters:
        path: the rotating file (None: no file).
        stdout: also write each line to standard output.
        max_bytes, backups: the file rotates at `max_bytes`, keeping `backups` old files.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        stdout: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        stream: TextIO | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._handlers: list[logging.Handler] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            self._handlers.append(handler)
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o640)
        if stdout or stream is not None:
            self._handlers.append(logging.StreamHandler(stream or sys.stdout))
        for handler in self._handlers:
            handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._handlers)

    def write(self, device: str, event: Any, wall_time: float | None = None) -> None:
        """Write one core `Audit` action of `device` (its `at` is on the server's monotonic
        clock: `wall_time` is the matching wall-clock time, now by default)."""
        if not self._handlers:
            return
        line = encode_line(device, event, time.time() if wall_time is None else wall_time)
        record = logging.LogRecord("labmesh.audit", logging.INFO, "", 0, line, None, None)
        with self._lock:
            for handler in self._handlers:
                handler.handle(record)

    def close(self) -> None:
        with self._lock:
            for handler in self._handlers:
                handler.close()
            self._handlers = []


def encode_line(device: str, event: Any, wall_time: float) -> str:
    stamp = _dt.datetime.fromtimestamp(wall_time, _dt.UTC)
    return json.dumps(
        {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "device": device,
            "event": event.event,
            "client": event.client,
            "peer": event.peer,
            "target": event.target,
            "value": event.value,
            "outcome": event.outcome,
        },
        separators=(",", ":"),
        default=repr,
    )


def from_settings(setting: Any, where: str) -> AuditLog:
    """An AuditLog from a host file's `audit:` value or $LABMESH_AUDIT: `off`, `stdout`, a
    file path, or `{file: PATH, stdout: BOOL, max_bytes: N, backups: N}`; None: the default
    (the file of default_path(); stdout as well when $LABMESH_AUDIT says `stdout`)."""
    if setting is None:
        setting = os.environ.get(ENV_VAR, "").strip() or None
    if setting is None:
        path = default_path()
        try:
            return AuditLog(path)
        except OSError as exc:  # a read-only home (a hardened container): the log stream
            logging.getLogger("labmesh.audit").warning(
                "cannot write the audit trail to %s (%s); writing it to stdout instead (set "
                "%s or the host file's audit: to choose)",
                path,
                exc,
                ENV_VAR,
            )
            return AuditLog(stdout=True)
    if setting in ("off", False):
        return AuditLog()
    if setting == "stdout":
        return AuditLog(stdout=True)
    if isinstance(setting, str):
        return AuditLog(setting)
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - {"file", "stdout", "max_bytes", "backups"})
        if unknown:
            raise ValueError(
                f"{where}: unknown audit option(s) {unknown}; use file, stdout, max_bytes, backups"
            )
        return AuditLog(
            setting.get("file"),
            stdout=bool(setting.get("stdout", False)),
            max_bytes=int(setting.get("max_bytes", DEFAULT_MAX_BYTES)),
            backups=int(setting.get("backups", DEFAULT_BACKUPS)),
        )
    raise ValueError(
        f"{where}: audit must be off, stdout, a file path or {{file, stdout, max_bytes, "
        f"backups}}; got {setting!r}"
    )


def follow(
    path: Path, *, lines: int = 20, forever: bool = True, poll_s: float = 0.25
) -> Iterator[str]:
    """The last `lines` lines of the trail, then (if `forever`) each new one as it is written;
    survives rotation (the file is reopened when it is replaced or shrinks)."""
    while not path.exists():
        if not forever:
            return
        time.sleep(poll_s)
    handle = path.open("r", encoding="utf-8", errors="replace")
    try:
        tail = handle.readlines()[-lines:] if lines > 0 else []
        if lines <= 0:
            handle.seek(0, os.SEEK_END)
        yield from (line.rstrip("\n") for line in tail)
        inode = os.fstat(handle.fileno()).st_ino
        partial = ""
        while forever:
            chunk = handle.readline()
            if chunk:
                partial += chunk
                if partial.endswith("\n"):
                    yield partial.rstrip("\n")
                    partial = ""
                continue
            time.sleep(poll_s)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_ino != inode or st.st_size < handle.tell():
                handle.close()
                handle = path.open("r", encoding="utf-8", errors="replace")
                inode = os.fstat(handle.fileno()).st_ino
    finally:
        handle.close()


def describe_line(line: str) -> str:
    """One trail line for people: `time device event target=value client@peer outcome`."""
    try:
        row = json.loads(line)
        value = row.get("value")
        shown = "" if value is None else f" = {json.dumps(value)}"
        peer = f"@{row['peer']}" if row.get("peer") else ""
        return (
            f"{row.get('time', '?')}  {row.get('device', '?')}  {row.get('event', '?')} "
            f"{row.get('target', '')}{shown}  by {row.get('client', '?')}{peer}  "
            f"-> {row.get('outcome', '?')}"
        )
    except (ValueError, TypeError, AttributeError):
        return line
