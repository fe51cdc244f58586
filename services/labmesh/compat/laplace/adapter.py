"""The LAPLACE-LHC envelope served on a device server's socket: `LaplaceAdapter`.

`LaplaceAdapter` answers the LAPLACE envelope on a `DeviceServer`'s own socket, next to the
native protocol: `DeviceServer(stage, laplace=LaplaceAdapter())`. INFO comes from the device's
description, GET reads its parameters (or serves the data an application sets: `ApplicationData`),
SET moves its axes, and the other commands go to callbacks. The server sees it as an
`EnvelopeHandler` (labmesh.server.core); the adapter uses only the server's public interface
(`name`, `device`, `description`, `touches`, `check_unlocked`, `stop`).

Everything that runs device code or user callbacks is queued on the device server like a native
call, so it never overlaps another call on that device. PING and INFO never wait for the device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from labmesh import access
from labmesh.device.base import task_function
from labmesh.device.executor import Job
from labmesh.protocol import laplace as envelope
from labmesh.protocol.errors import LabmeshError, ProtocolError
from labmesh.server.core import EnvelopeAnswer as LaplaceAnswer

if TYPE_CHECKING:
    from labmesh.server import DeviceServer

log = logging.getLogger("labmesh.laplace")

#: The callbacks, by laplace-server's attribute names (each also has a `set_<name>` setter),
#: with the signal of laplace-server's Qt `ServerController` that each one feeds.
CALLBACKS: dict[str, str] = {
    "on_get": "get_received",
    "on_position_changed": "position_changed",
    "on_saving_path_changed": "saving_path_changed",
    "on_opt": "opt_received",
    "on_scan": "scan_received",
    "on_set_actuators": "set_actuators_dict_received",
    "on_set_diagnostics": "set_diagnostics_dict_received",
    "on_update_actuator_positions": "actuators_pos_update_received",
}
#: After answering a remote STOP, wait this long before closing the socket (it closes with
#: linger 0, which would drop a reply still queued).
_STOP_REPLY_GRACE_S = 0.1


class ApplicationData:
    """The data an application sets and GET serves (ServerLHC's `set_data`), thread-safe.

    Every change makes a snapshot (later changes to the caller's dict do not leak in) with a
    new sequence number, which GET replies carry as `payload.seq`: a client tells new data
    from old by it, so nothing is emptied after a GET and no update is lost.
    """

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._latest: tuple[int, dict[str, Any]] = (0, {})
        self.set(data if data is not None else {})

    def set(self, data: Mapping[str, Any]) -> int:
        """Replace the data with a snapshot of `data`; returns its sequence number."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        snapshot = envelope.plain(data)
        with self._lock:
            self._latest = (self._latest[0] + 1, snapshot)
            return self._latest[0]

    def update(self, changes: Mapping[str, Any]) -> int:
        """Merge `changes` into the current data in one step; returns the sequence number."""
        if not isinstance(changes, Mapping):
            raise TypeError(f"changes must be a dict, got {type(changes).__name__}")
        snapshot = envelope.plain(changes)
        with self._lock:
            seq, data = self._latest
            self._latest = (seq + 1, {**data, **snapshot})
            return seq + 1

    @property
    def latest(self) -> tuple[int, dict[str, Any]]:
        """(sequence number, data); the data is never changed in place."""
        return self._latest


@dataclass(frozen=True, slots=True)
class _Layout:
    """What the adapter serves, derived from the device's description."""

    kind: str
    freedom: int
    axes: tuple[str, ...]
    drives: bool
    readings: tuple[str, ...]
    plottables: tuple[str, ...]
    name_list: tuple[str, ...]


class LaplaceAdapter:
    """Serves a `DeviceServer`'s device to LAPLACE-LHC clients on the same socket.

    Pass it to the server: `DeviceServer(stage, laplace=LaplaceAdapter())`. Then:
    INFO: kind, freedom (number of axes), name, capabilities, name_list (axis names) and
    plottables_list (the readings). PING: `{"PING": "PONG"}`, never waiting for the device.
    GET: the readings in `payload.data` (every readable declared parameter; a stage adds
    `positions`, axis 0 first, and `unit`) and their sequence number in `payload.seq`; while the
    device is busy with another call, the last readings at once (a LAPLACE master gives up after
    2 s). SET: positions (a list, or `{index: position}`; axis names also work) are checked
    against freedom, soft limits and locks, answered at once, then moved one axis after another
    with the device's `move_abs`; a failed move is logged and kept in `last_error`. SAVE keeps
    `save_path`. STOP stops the whole server only when `allow_stop`.

    Callbacks (attributes or `set_on_*` setters, laplace-server's names): `on_get()`,
    `on_position_changed(positions)` (as sent), `on_saving_path_changed(path)`, `on_opt(data)`,
    `on_scan(message)` (the whole request, as laplace-server passes it),
    `on_set_actuators(actuators)` (for UPDATE ACT POS, as ServerLHC: the whole message),
    `on_set_diagnostics(diagnostics)`, `on_update_actuator_positions(actuators)` (labmesh's
    addition, after `on_set_actuators` for UPDATE ACT POS). They run one at a time with the
    device's calls; one that raises turns its reply into a LAPLACE error carrying the
    exception's message.

    Parameters:
        kind: LAPLACE device kind (default: from the labmesh kind; see `envelope.device_kind`).
        freedom: number of axes (default: the device's `axes` when it has `move_abs`, else 0).
        name_list: names of the devices behind this server (default: the axis names).
        plottables_list: names of the plottable values (default: the readings).
        readings: parameters GET reads (default: every declared parameter that can be read).
        versions: accepted protocol versions; error replies carry the first.
        allow_stop: honour a remote STOP (it stops the whole server); otherwise it is refused.
        data: serve this application data on GET instead of reading the device.
        save_root: absolute SAVE paths are accepted only under this directory (None: only
            relative paths); a path with `..` is always refused. The default "/" accepts the
            absolute paths deployed LAPLACE masters send (`/data/laplace/run-001`); give the
            data directory to confine them.
    """

    metric_type = "laplace"

    def __init__(
        self,
        *,
        kind: str | None = None,
        freedom: int | None = None,
        name_list: Sequence[str] | None = None,
        plottables_list: Sequence[str] | None = None,
        readings: Sequence[str] | None = None,
        versions: Sequence[str] = envelope.DEFAULT_VERSIONS,
        allow_stop: bool = False,
        data: ApplicationData | None = None,
        save_root: str | None = "/",
    ) -> None:
        if kind is not None and kind not in envelope.DEVICE_KINDS:
            raise ValueError(
                f"LAPLACE device kind {kind!r} is not one of {list(envelope.DEVICE_KINDS)}"
            )
        if freedom is not None:
            _check_freedom(freedom)
        self.versions = envelope.check_versions(versions)
        self.allow_stop = allow_stop
        self.save_root = PurePath(save_root) if save_root else None
        self._kind = kind
        self._freedom = freedom
        self._name_list = tuple(name_list) if name_list is not None else None
        self._plottables = tuple(plottables_list) if plottables_list is not None else None
        self._readings = tuple(readings) if readings is not None else None
        self.save_path: str | None = None
        self.last_error: str | None = None
        for name in CALLBACKS:
            setattr(self, name, None)
        self._data = data
        self._server: DeviceServer | None = None
        self._described: Any = None
        self._layout_cache: _Layout | None = None
        self._seq = 0
        self._seq_lock = threading.Lock()
        #: (sequence number, data) of the latest readings; replaced, never changed in place
        self._latest: tuple[int, Any] | None = None
        self._commands: dict[str, Callable[[envelope.Message, bool], LaplaceAnswer]] = {
            envelope.CMD_INFO: self._on_info,
            envelope.CMD_PING: self._on_ping,
            envelope.CMD_GET: self._on_get,
            envelope.CMD_SET: self._on_set,
            envelope.CMD_SAVE: self._on_save,
            envelope.CMD_STOP: self._on_stop,
            envelope.CMD_OPT: lambda m, _: self._callback(m, "on_opt", m.value),
            envelope.CMD_SCAN: lambda m, _: self._callback(m, "on_scan", m.fields),
            envelope.CMD_SET_ACT: lambda m, _: self._callback(m, "on_set_actuators", m.value),
            envelope.CMD_SET_DIAG: lambda m, _: self._callback(m, "on_set_diagnostics", m.value),
            envelope.CMD_UPDATE_ACT_POS: self._on_update_actuator_positions,
        }

    # ---- laplace-server's setters (set_on_get, ...: made from CALLBACKS below) ------------
    def set_name_list(self, names: Sequence[str]) -> None:
        """Replace the INFO `name_list`."""
        self._name_list = tuple(names)
        self._layout_cache = None

    # ---- serving --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._server.name if self._server is not None else ""

    def attach(self, server: DeviceServer) -> None:
        """Called by the DeviceServer this adapter serves on (once, at its construction)."""
        if self._server is not None and self._server is not server:
            raise ValueError(
                f"this LaplaceAdapter already serves {self._server.name}; make one per server"
            )
        self._server = server
        self._layout()  # a configuration error shows now, not at the first request

    def claims(self, obj: Any) -> bool:
        """Whether a decoded message is a LAPLACE envelope (it has a `cmd`)."""
        return envelope.is_envelope(obj)

    def needed(self, obj: Any) -> int:
        """The role a LAPLACE message needs on a secured device: INFO, PING and GET observe,
        STOP needs admin, every other command (SET, SAVE, OPT, SCAN, ...) operator."""
        cmd = obj.get("cmd") if isinstance(obj, dict) else None
        if cmd in (envelope.CMD_INFO, envelope.CMD_PING, envelope.CMD_GET):
            return access.OBSERVER
        return access.ADMIN if cmd == envelope.CMD_STOP else access.OPERATOR

    def error_type(self, reply: dict[str, Any]) -> str | None:
        """A LAPLACE reply has no status: it failed when it carries an `error_msg`."""
        return "LaplaceError" if reply.get("error_msg") is not None else None

    def refuse(self, obj: Any, text: str) -> dict[str, Any]:
        """A LAPLACE error reply refusing `obj` (the server reached a bound)."""
        return self._error(obj, text)

    def handle(self, obj: Any, busy: bool) -> LaplaceAnswer:
        """Answer one decoded LAPLACE message (never raises). `busy`: the device is in a call or
        has calls queued."""
        try:
            message = envelope.parse_message(obj, self.versions)
            return self._commands[message.cmd](message, busy)
        except LabmeshError as exc:
            log.debug("%s: LAPLACE request refused: %s", self.name, exc)
            return LaplaceAnswer(_label(obj), now=self._error(obj, str(exc)))
        except Exception as exc:  # a bug of ours must cost one request, never the server
            log.exception("%s: failed to handle a LAPLACE request", self.name)
            return LaplaceAnswer(
                _label(obj), now=self._error(obj, f"internal server error: {exc!r}")
            )

    def undecodable(self, error_msg: str) -> dict[str, Any]:
        """The LAPLACE error fields for a body that is not a JSON object at all (the server
        adds them to its native error reply, so either kind of client can read it)."""
        return self._error(None, error_msg)

    def _error(self, obj: Any, text: str) -> dict[str, Any]:
        return envelope.error_reply(self.name, obj, text, self.versions[0])

    def _layout(self) -> _Layout:
        """The served layout, recomputed when the server re-describes its device (after
        connect, a driver may have learned its axes or parameters)."""
        server = self._server
        assert server is not None, "LaplaceAdapter used before a DeviceServer attached it"
        if self._layout_cache is not None and self._described is server.description:
            return self._layout_cache
        description = server.description
        device = server.device
        axes = getattr(device, "axes", None) or ()
        axes = tuple(axes) if all(isinstance(a, str) for a in axes) else ()
        drives = bool(axes) and callable(getattr(device, "move_abs", None))
        freedom = self._freedom if self._freedom is not None else (len(axes) if drives else 0)
        if drives and freedom != len(axes):
            raise ValueError(
                f"{server.name}: freedom={freedom} but the device has {len(axes)} axes "
                f"{list(axes)}; leave freedom out to serve them all"
            )
        params = description["doc"]["parameters"]["default"]
        readable = tuple(p["name"] for p in params if not p["write_only"])
        readings = self._readings if self._readings is not None else readable
        unknown = [r for r in readings if r not in readable]
        if unknown:
            raise ValueError(
                f"{server.name}: readings {unknown} are not readable parameters of this device; "
                f"readable: {list(readable)}"
            )
        layout = _Layout(
            kind=self._kind or envelope.device_kind(description["kind"]),
            freedom=freedom,
            axes=axes if drives else (),
            drives=drives,
            readings=readings,
            plottables=self._plottables if self._plottables is not None else readings,
            name_list=self._name_list if self._name_list is not None else axes,
        )
        self._layout_cache, self._described = layout, description
        return layout

    # ---- commands -------------------------------------------------------------------------
    def _on_ping(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        reply = envelope.ok_reply(self.name, message, {"PING": "PONG"})
        return LaplaceAnswer(message.cmd, now=reply)

    def _on_info(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        layout = self._layout()
        capabilities = [c for c in envelope.COMMANDS if c != envelope.CMD_STOP or self.allow_stop]
        payload = envelope.info_payload(
            device=layout.kind,
            freedom=layout.freedom,
            name=self.name,
            capabilities=capabilities,
            name_list=layout.name_list,
            plottables_list=layout.plottables,
        )
        return LaplaceAnswer(message.cmd, now=envelope.ok_reply(self.name, message, payload))

    def _on_get(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        latest = self._data.latest if self._data is not None else self._latest
        live = self._data is None
        if latest is not None and (busy or not (live or self.on_get is not None)):
            return LaplaceAnswer(message.cmd, now=self._data_reply(message, latest))

        def done(job: Job) -> dict[str, Any]:
            if job.ok:
                return self._data_reply(message, job.value)
            return self._job_error(message, job)

        return self._queued(message, Job(self._read, label="LAPLACE GET"), done)

    def _data_reply(self, message: envelope.Message, latest: tuple[int, Any]) -> dict[str, Any]:
        seq, data = latest
        return envelope.ok_reply(self.name, message, {"data": data, "seq": seq})

    def _read(self) -> tuple[int, Any]:
        """GET on the device's turn: the on_get callback, then the data."""
        if self.on_get is not None:
            self.on_get()
        return self._refresh()

    def _refresh(self) -> tuple[int, Any]:
        if self._data is not None:
            return self._data.latest
        data = self.read_data()
        with self._seq_lock:
            self._seq += 1
            self._latest = (self._seq, data)
            return self._latest

    def read_data(self) -> dict[str, Any]:
        """The device's readings, as GET serves them (runs on the device's turn)."""
        layout = self._layout()
        device = self._device()
        data = {name: device.query(name) for name in layout.readings}
        if layout.drives:
            where = device.positions() if callable(getattr(device, "positions", None)) else None
            if isinstance(where, Mapping):
                data["positions"] = [where[a] for a in layout.axes]
            unit = getattr(device, "unit", None)
            if isinstance(unit, str):
                data["unit"] = unit
        return envelope.plain(data)

    def _on_set(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        layout = self._layout()
        positions = envelope.positions_by_axis(message.value, layout.freedom, layout.axes)
        if not layout.drives:
            return self._callback(message, "on_position_changed", message.value)
        targets = {layout.axes[i]: p for i, p in positions.items()}
        self._check_limits(targets)
        touches = self._touches(targets)
        server = self._server
        assert server is not None
        server.check_unlocked(touches)

        def moved(job: Job) -> None:
            if not job.ok:
                self.last_error = f"SET {targets}: {job.error}"
                log.error("%s: LAPLACE %s failed: %s", self.name, message.cmd, job.error)
            return None

        job = Job(self._move, (targets, message.value), label=f"LAPLACE SET {targets}")
        return LaplaceAnswer(
            message.cmd,
            now=envelope.ok_reply(self.name, message),
            job=job,
            done=moved,
            touches=touches,
            as_task=True,
        )

    def _move(self, targets: dict[str, float], as_sent: Any) -> Generator[Any, Any, None]:
        """A task: each axis moves in turn with the device's `move_abs`, stepped (a task
        operation) so that GETs, reads and a STOP are served while the stage moves."""
        device = self._device()
        stepped = task_function(device, "move_abs")
        for axis, position in targets.items():
            if stepped is not None:
                yield from stepped(device, axis, position)
            else:
                device.move_abs(axis, position)
        if self.on_position_changed is not None:
            self.on_position_changed(as_sent)

    def _check_limits(self, targets: dict[str, float]) -> None:
        limits = getattr(self._device(), "limits", None)
        if not isinstance(limits, Mapping):
            return
        unit = getattr(self._device(), "unit", "")
        for axis, position in targets.items():
            if axis not in limits:
                continue
            low, high = limits[axis]
            if not low <= position <= high:
                raise ProtocolError(
                    f"SET refused: {position:g} {unit} is outside the soft limits of axis "
                    f"{axis} [{low:g}, {high:g}] {unit}; nothing was moved"
                )

    def _touches(self, targets: dict[str, float]) -> tuple[str, ...]:
        """The lock leaves the moves touch: the server's own rule for `move_abs(axis, pos)`."""
        server = self._server
        assert server is not None
        out: list[str] = []
        for axis, position in targets.items():
            found = server.touches("call", "move_abs", (axis, position), {})
            out.extend(leaf for leaf in found if leaf not in out)
        return tuple(out)

    def _on_save(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        self._check_save_path(message.value)
        self.save_path = message.value
        return self._callback(message, "on_saving_path_changed", message.value)

    def _on_stop(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        server = self._server
        assert server is not None
        # whatever else it means, STOP stops the motion: a running move (task) ends now
        stopped = server.cancel_task(f"LAPLACE STOP from {message.sender}")
        if not self.allow_stop:
            moved = f"the running move (task {stopped}) was stopped; " if stopped else ""
            raise ProtocolError(
                f"STOP refused: {moved}this server does not take a remote STOP; stop it on "
                "its host (or start it with allow_stop=True)"
            )
        log.warning("%s: stopping on a LAPLACE STOP from %s", self.name, message.sender)
        server.stop_reason = f"a LAPLACE STOP from {message.sender}"

        def stop() -> None:
            time.sleep(_STOP_REPLY_GRACE_S)
            server.stop()

        threading.Thread(target=stop, name=f"laplace-stop:{self.name}", daemon=True).start()
        return LaplaceAnswer(message.cmd, now=envelope.ok_reply(self.name, message))

    def _on_update_actuator_positions(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        """As ServerLHC: `on_set_actuators(whole message)`; then, labmesh's addition,
        `on_update_actuator_positions(actuators)`, each when set, one after the other."""
        touches = self._locked_for_everyone(message)
        calls = [
            (func, argument)
            for func, argument in (
                (self.on_set_actuators, message.fields),
                (self.on_update_actuator_positions, message.value),
            )
            if func is not None
        ]
        if not calls:
            return LaplaceAnswer(message.cmd, now=envelope.ok_reply(self.name, message))

        def run() -> None:
            for func, argument in calls:
                func(argument)

        def done(job: Job) -> dict[str, Any]:
            if job.ok:
                return envelope.ok_reply(self.name, message)
            return self._job_error(message, job)

        return self._queued(message, Job(run, label="LAPLACE UPDATE ACT POS"), done, touches)

    def _check_save_path(self, path: Any) -> None:
        """SAVE paths reach the application's callback only when they cannot climb out of
        where it saves: no `..`; absolute only under `save_root`."""
        if not isinstance(path, str) or not path or "\0" in path:
            raise ProtocolError(f"SAVE refused: the path must be a non-empty string, got {path!r}")
        parts = path.replace("\\", "/").split("/")
        if ".." in parts:
            raise ProtocolError(
                f"SAVE refused: {path[:200]!r} climbs up with '..'; send a path without it"
            )
        absolute = PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()
        if absolute:
            root = self.save_root
            if root is None or not (
                PurePath(path).is_relative_to(root) or PureWindowsPath(path).is_relative_to(root)
            ):
                where = (
                    f"under {str(root)!r}" if root else "relative (this server has no save_root)"
                )
                raise ProtocolError(
                    f"SAVE refused: {path[:200]!r} is absolute; paths must be {where}"
                )

    def _locked_for_everyone(self, message: envelope.Message) -> tuple[str, ...]:
        """What a LAPLACE command that changes state touches (a LAPLACE message carries no
        session: it may run only while nobody holds any of the device's resources)."""
        server = self._server
        assert server is not None
        touches = server.touches("call", f"LAPLACE {message.cmd}")
        server.check_unlocked(touches)
        return touches

    def _callback(self, message: envelope.Message, name: str, argument: Any) -> LaplaceAnswer:
        """Run callback `name(argument)` on the device's turn, then reply (at once if unset).
        Like SET, refused while someone holds the device's resources."""
        touches = self._locked_for_everyone(message)
        func = getattr(self, name)
        if func is None:
            return LaplaceAnswer(message.cmd, now=envelope.ok_reply(self.name, message))

        def done(job: Job) -> dict[str, Any]:
            if job.ok:
                return envelope.ok_reply(self.name, message)
            return self._job_error(message, job)

        job = Job(func, (argument,), label=f"LAPLACE {name}")
        return self._queued(message, job, done, touches)

    def _queued(
        self,
        message: envelope.Message,
        job: Job,
        done: Callable[[Job], dict[str, Any]],
        touches: tuple[str, ...] = (),
    ) -> LaplaceAnswer:
        def fail(text: str) -> dict[str, Any]:
            return self._error(message.fields, f"{self.name}: {message.cmd} failed: {text}")

        return LaplaceAnswer(message.cmd, job=job, done=done, fail=fail, touches=touches)

    def _job_error(self, message: envelope.Message, job: Job) -> dict[str, Any]:
        exc = job.error
        text = (str(exc) or type(exc).__name__) if exc is not None else "failed"
        log.info("%s: LAPLACE %s failed: %s", self.name, message.cmd, text)
        return self._error(message.fields, f"{self.name}: {message.cmd} failed: {text}")

    def _device(self) -> Any:
        assert self._server is not None
        return self._server.device


def _label(obj: Any) -> str:
    """The command of a (maybe invalid) message, for metrics: known commands only."""
    cmd = obj.get("cmd") if isinstance(obj, dict) else None
    return cmd if cmd in envelope.COMMANDS else ""


def _check_freedom(freedom: Any) -> int:
    if isinstance(freedom, bool) or not isinstance(freedom, int) or freedom < 0:
        raise ValueError(f"freedom must be a whole number of axes (0 or more), got {freedom!r}")
    return freedom


def _callback_setter(name: str) -> Callable[[Any, Callable | None], None]:
    def setter(self: Any, func: Callable | None) -> None:
        setattr(self, name, func)

    setter.__name__ = setter.__qualname__ = f"set_{name}"
    setter.__doc__ = f"Set the `{name}` callback (None: unset), as laplace-server's setter."
    return setter


for _name in CALLBACKS:
    setattr(LaplaceAdapter, f"set_{_name}", _callback_setter(_name))
