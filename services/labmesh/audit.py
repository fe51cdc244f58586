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

import collections
import contextlib
import datetime as _dt
import json
import logging
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


#: How long the writer thread gathers lines before it writes them (s): a trail line is on disk
#: within about this long, and a busy server costs one write per interval, not one per request.
BATCH_INTERVAL_S = 0.05
#: Lines waiting for the writer thread, at most; beyond it (a disk that stalls) lines are
#: dropped and the trail says how many, so a server thread never waits for a disk.
MAX_PENDING_LINES = 10_000


class AuditLog:
    """Writes audit lines from a thread of its own; thread-safe (every server of a host
    shares one). `write` only queues: the thread that answers requests never waits for a disk
    or a pipe; lines are written and flushed in batches, within BATCH_INTERVAL_S.

    Parameters:
        path: the rotating file (None: no file).
        stdout: also write each line to standard output.
        max_bytes, backups: the file rotates at `max_bytes`, keeping `backups` old files.
        stream: write to this text stream instead of stdout (tests).
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
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: TextIO | None = None
        self._size = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        self._stream = stream or (sys.stdout if stdout else None)
        self._pending: collections.deque[tuple[str, Any, float]] = collections.deque()
        self._dropped = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="labmesh-audit", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._file is not None or self._stream is not None

    def write(self, device: str, event: Any, wall_time: float | None = None) -> None:
        """Queue one core `Audit` action of `device` (its `at` is on the server's monotonic
        clock: `wall_time` is the matching wall-clock time, now by default)."""
        if self._thread is None:
            return
        with self._cond:
            if len(self._pending) >= MAX_PENDING_LINES:
                self._dropped += 1
                return
            self._pending.append((device, event, time.time() if wall_time is None else wall_time))
            if len(self._pending) == 1:
                self._cond.notify()  # at most once per batch: the writer then gathers

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued line is written (True), or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            try:
                while self._pending or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.05))
            finally:
                self._flushing = False
        return True

    def close(self) -> None:
        """Write what is queued, then close the file."""
        if self._thread is not None:
            self.flush()
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(5)
            self._thread = None
        if self._file is not None:
            self._file.close()
            self._file = None

    _busy = False
    _flushing = False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending and self._closed:
                    return
                if not self._closed and not self._flushing:
                    # gather: one wake-up and one write per interval, however busy the server
                    self._cond.wait(BATCH_INTERVAL_S)
                batch = list(self._pending)
                self._pending.clear()
                dropped, self._dropped = self._dropped, 0
                self._busy = True
            try:
                lines = [encode_line(*item) for item in batch]
                if dropped:
                    lines.append(_dropped_line(dropped))
                self._emit("\n".join(lines) + "\n")
            except Exception:  # a full disk must not kill the trail's thread
                logging.getLogger("labmesh.audit").exception("audit lines not written")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _emit(self, text: str) -> None:
        if self.path is not None:
            if self._file is None or self._file.closed:
                self._open()  # a rotation that failed before: try the file again
            assert self._file is not None
            if self._size + len(text) > self.max_bytes and self._size > 0:
                try:
                    self._rotate()
                finally:
                    if self._file is None or self._file.closed:
                        self._open()
            self._file.write(text)
            self._file.flush()
            self._size += len(text.encode("utf-8"))
        if self._stream is not None:
            self._stream.write(text)
            self._stream.flush()

    def _open(self) -> None:
        assert self.path is not None
        self._file = self.path.open("a", encoding="utf-8")
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o640)
        self._size = self._file.tell()

    def _rotate(self) -> None:
        """audit.jsonl -> audit.jsonl.1 -> ... -> audit.jsonl.<backups> (the oldest goes)."""
        assert self.path is not None and self._file is not None
        self._file.close()
        for n in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            newer = self.path.with_name(f"{self.path.name}.{n - 1}") if n > 1 else self.path
            if newer.exists():
                if n == self.backups:
                    older.unlink(missing_ok=True)
                os.replace(newer, older)
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        self._open()


def _dropped_line(count: int) -> str:
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps(
        {"time": stamp, "event": "audit_dropped", "value": count, "outcome": "dropped"},
        separators=(",", ":"),
    )


_encode = json.JSONEncoder(separators=(",", ":"), default=repr).encode


def encode_line(device: str, event: Any, wall_time: float) -> str:
    """One trail line: UTC time to the millisecond, then the event's fields."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall_time))
    millis = int(wall_time * 1000) % 1000
    return _encode(
        {
            "time": f"{stamp}.{millis:03d}Z",
            "device": device,
            "event": event.event,
            "client": event.client,
            "peer": event.peer,
            "target": event.target,
            "value": event.value,
            "outcome": event.outcome,
        }
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
                # rotated: what was written to the old file before it moved comes first
                for rest in handle.readlines():
                    partial += rest
                    if partial.endswith("\n"):
                        yield partial.rstrip("\n")
                        partial = ""
                if partial:
                    yield partial.rstrip("\n")  # a line cut by the rotation, as it is
                    partial = ""
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
