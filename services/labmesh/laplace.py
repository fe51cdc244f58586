"""LAPLACE-LHC on labmesh: serve any device to LAPLACE clients, or run a ServerLHC-style server.

`LaplaceAdapter` answers the LAPLACE envelope on a `DeviceServer`'s own socket, next to the
native protocol: `DeviceServer(stage, laplace=LaplaceAdapter())`. INFO comes from the device's
description, GET reads its parameters, SET moves its axes, and the other commands go to
callbacks. `LaplaceServer` is the drop-in for laplace-server's `ServerLHC`: the same constructor,
`set_data`, callbacks and setters, without its crashes, lost updates, latency tail or open STOP.

Everything that runs device code or user callbacks is queued on the device server like a native
call, so it never overlaps another call on that device. PING and INFO never wait for the device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from labmesh.device.base import Device, touched_resources
from labmesh.device.executor import Job
from labmesh.protocol import laplace as envelope
from labmesh.protocol.errors import LabmeshError, ProtocolError, ResourceAllocationError

if TYPE_CHECKING:
    from labmesh.server import DeviceServer

log = logging.getLogger("labmesh.laplace")

#: The callbacks, by laplace-server's attribute names (each also has a `set_<name>` setter).
CALLBACKS = (
    "on_get",
    "on_position_changed",
    "on_saving_path_changed",
    "on_opt",
    "on_scan",
    "on_set_actuators",
    "on_set_diagnostics",
    "on_update_actuator_positions",
)
#: After answering a remote STOP, wait this long before closing the socket (it closes with
#: linger 0, which would drop a reply still queued).
_STOP_REPLY_GRACE_S = 0.1


class LaplaceAnswer:
    """How the device server answers one LAPLACE message.

    `now` is sent at once (None: nothing yet). `job`, when set, is queued on the device like a
    native call; when it ends, `reply(job)` gives the reply to send (None: nothing, because `now`
    already answered). `touches` are the lock leaves the job touches, checked when it starts.
    """

    __slots__ = ("_done", "_fail", "command", "job", "now", "touches")

    def __init__(
        self,
        command: str,
        *,
        now: dict[str, Any] | None = None,
        job: Job | None = None,
        done: Callable[[Job], dict[str, Any] | None] | None = None,
        fail: Callable[[str], dict[str, Any]] | None = None,
        touches: tuple[str, ...] = (),
    ) -> None:
        self.command = command
        self.now = now
        self.job = job
        self.touches = touches
        self._done = done
        self._fail = fail

    def reply(self, job: Job) -> dict[str, Any] | None:
        """The reply once `job` ended (ok or not), or None when nothing more is sent."""
        return self._done(job) if self._done is not None else None

    def failed(self, text: str) -> dict[str, Any] | None:
        """The reply when the job cannot run (server shutting down), or None if already answered."""
        if self.now is not None or self._fail is None:
            return None
        return self._fail(text)


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
    """

    #: GET reads the device (False: it serves data the application sets).
    _live = True

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
    ) -> None:
        if kind is not None and kind not in envelope.DEVICE_KINDS:
            raise ValueError(
                f"LAPLACE device kind {kind!r} is not one of {list(envelope.DEVICE_KINDS)}"
            )
        if freedom is not None:
            _check_freedom(freedom)
        self.versions = envelope.check_versions(versions)
        self.allow_stop = allow_stop
        self._kind = kind
        self._freedom = freedom
        self._name_list = tuple(name_list) if name_list is not None else None
        self._plottables = tuple(plottables_list) if plottables_list is not None else None
        self._readings = tuple(readings) if readings is not None else None
        self.save_path: str | None = None
        self.last_error: str | None = None
        for name in CALLBACKS:
            setattr(self, name, None)
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

    # ---- laplace-server's setters ---------------------------------------------------------
    def set_on_get(self, func: Callable[[], None] | None) -> None:
        self.on_get = func

    def set_on_position_changed(self, func: Callable[[Any], None] | None) -> None:
        self.on_position_changed = func

    def set_on_saving_path_changed(self, func: Callable[[str], None] | None) -> None:
        self.on_saving_path_changed = func

    def set_on_opt(self, func: Callable[[dict], None] | None) -> None:
        self.on_opt = func

    def set_on_scan(self, func: Callable[[dict], None] | None) -> None:
        self.on_scan = func

    def set_on_set_actuators(self, func: Callable[[dict], None] | None) -> None:
        self.on_set_actuators = func

    def set_on_set_diagnostics(self, func: Callable[[dict], None] | None) -> None:
        self.on_set_diagnostics = func

    def set_on_update_actuator_positions(self, func: Callable[[dict], None] | None) -> None:
        self.on_update_actuator_positions = func

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
        latest = self._latest
        if latest is not None and (busy or not (self._live or self.on_get is not None)):
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
        if touches:
            server.locks.check(None, touches, server.clock())

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
        )

    def _move(self, targets: dict[str, float], as_sent: Any) -> None:
        device = self._device()
        for axis, position in targets.items():
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
        """The lock leaves the moves touch (every leaf when the device does not say)."""
        server = self._server
        assert server is not None
        leaves = server.locks.leaves
        if not leaves:
            return ()
        out: list[str] = []
        for axis, position in targets.items():
            declared = touched_resources(self._device(), "call", "move_abs", (axis, position), {})
            try:
                found = server.locks.expand(declared) if declared is not None else None
            except ResourceAllocationError:
                found = None
            if found is None:
                return tuple(sorted(leaves))
            out.extend(leaf for leaf in found if leaf not in out)
        return tuple(out)

    def _on_save(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        self.save_path = message.value
        return self._callback(message, "on_saving_path_changed", message.value)

    def _on_stop(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        if not self.allow_stop:
            raise ProtocolError(
                "STOP refused: this server does not take a remote STOP; stop it on its host "
                "(or start it with allow_stop=True)"
            )
        log.warning("%s: stopping on a LAPLACE STOP from %s", self.name, message.sender)
        server = self._server
        assert server is not None

        def stop() -> None:
            time.sleep(_STOP_REPLY_GRACE_S)
            server.stop()

        threading.Thread(target=stop, name=f"laplace-stop:{self.name}", daemon=True).start()
        return LaplaceAnswer(message.cmd, now=envelope.ok_reply(self.name, message))

    def _on_update_actuator_positions(self, message: envelope.Message, busy: bool) -> LaplaceAnswer:
        """As ServerLHC: `on_set_actuators(whole message)`; then, labmesh's addition,
        `on_update_actuator_positions(actuators)`, each when set, one after the other."""
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

        return self._queued(message, Job(run, label="LAPLACE UPDATE ACT POS"), done)

    def _callback(self, message: envelope.Message, name: str, argument: Any) -> LaplaceAnswer:
        """Run callback `name(argument)` on the device's turn, then reply (at once if unset)."""
        func = getattr(self, name)
        if func is None:
            return LaplaceAnswer(message.cmd, now=envelope.ok_reply(self.name, message))

        def done(job: Job) -> dict[str, Any]:
            if job.ok:
                return envelope.ok_reply(self.name, message)
            return self._job_error(message, job)

        return self._queued(message, Job(func, (argument,), label=f"LAPLACE {name}"), done)

    def _queued(
        self, message: envelope.Message, job: Job, done: Callable[[Job], dict[str, Any]]
    ) -> LaplaceAnswer:
        def fail(text: str) -> dict[str, Any]:
            return self._error(message.fields, f"{self.name}: {message.cmd} failed: {text}")

        return LaplaceAnswer(message.cmd, job=job, done=done, fail=fail)

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


class _ApplicationData(Device):
    """The device behind a LaplaceServer: no instrument, only the data its application sets."""

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(name)
        self.kind = kind.lower()


class LaplaceServer(LaplaceAdapter):
    """A LAPLACE-LHC server in the style of laplace-server's `ServerLHC`, served by labmesh.

    Same constructor, `set_data`, callbacks and setters as ServerLHC (see LaplaceAdapter), on a
    labmesh DeviceServer: REQ and DEALER clients, any malformed message answered with a LAPLACE
    error and never fatal, no polling sleep, a bounded `stop()`, and STOP refused unless allowed.
    The native protocol (describe, ping) answers on the same socket.

    `set_data(data)` keeps a snapshot (later changes to `data` do not leak in) and returns its
    sequence number, which GET replies carry as `payload.seq`: a client tells new data from old
    by it, so nothing is emptied after a GET and no update is lost. `update_data(changes)` merges
    keys into the current data atomically, for several threads updating different keys. GET
    calls `on_get` (when set) on the server's thread and then replies with the data current
    after it, so an `on_get` that calls `set_data` is served fresh.

    Parameters:
        name: the server's name (replies' `from`, INFO `name`).
        address: where to listen, e.g. `tcp://*:5555` or `tcp://127.0.0.1:0` (port chosen;
            `address` then tells the real one).
        freedom: number of axes (0 for a camera).
        device: the LAPLACE device kind, one of MOTOR, CAMERA, GAS, OPT, SHOT, SCAN.
        data: the initial data (a JSON-like dict).
        empty_data_after_get: must stay False (laplace-server's data-losing option; use the
            sequence number instead).
        time_poll_ms, time_sleep_ms: accepted for laplace-server compatibility and ignored
            (no polling loop here).
        name_list, plottables_list: INFO's lists.
        versions: accepted protocol versions (error replies carry the first).
        allow_stop: let a remote STOP stop the server.
    """

    _live = False

    def __init__(
        self,
        name: str,
        address: str,
        freedom: int,
        device: str,
        data: Mapping[str, Any] | None = None,
        empty_data_after_get: bool = False,
        time_poll_ms: float | None = None,
        time_sleep_ms: float | None = None,
        name_list: Sequence[str] = (),
        plottables_list: Sequence[str] = (),
        *,
        versions: Sequence[str] = envelope.DEFAULT_VERSIONS,
        allow_stop: bool = False,
        context: zmq.Context | None = None,
    ) -> None:
        from labmesh.server import DeviceServer  # the server imports this module's types

        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if device not in envelope.DEVICE_KINDS:
            raise ValueError(
                f"Invalid device {device!r}: choose among {list(envelope.DEVICE_KINDS)}"
            )
        if empty_data_after_get:
            raise ValueError(
                "empty_data_after_get=True is not supported: it loses data set between a GET "
                "and the emptying; GET replies carry payload.seq, which changes with every "
                "set_data, so a client can tell new data from old"
            )
        if not isinstance(address, str):
            raise TypeError(f"address must be a string like 'tcp://*:5555', got {address!r}")
        super().__init__(
            kind=device,
            freedom=_check_freedom(freedom),
            name_list=name_list,
            plottables_list=plottables_list,
            versions=versions,
            allow_stop=allow_stop,
        )
        self.freedom = freedom
        self.device = device
        self.set_data(data if data is not None else {})
        self.server = DeviceServer(
            _ApplicationData(name, device),
            address=address,
            name=name,
            laplace=self,
            context=context,
        )

    def _refresh(self) -> tuple[int, Any]:
        latest = self._latest
        assert latest is not None
        return latest

    # ---- data -----------------------------------------------------------------------------
    def set_data(self, data: Mapping[str, Any]) -> int:
        """Replace the data GET serves with a snapshot of `data`; returns its sequence number."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        snapshot = envelope.plain(data)
        with self._seq_lock:
            self._seq += 1
            self._latest = (self._seq, snapshot)
            return self._seq

    def update_data(self, changes: Mapping[str, Any]) -> int:
        """Merge `changes` into the current data in one step; returns the sequence number."""
        if not isinstance(changes, Mapping):
            raise TypeError(f"changes must be a dict, got {type(changes).__name__}")
        snapshot = envelope.plain(changes)
        with self._seq_lock:
            assert self._latest is not None
            self._seq += 1
            self._latest = (self._seq, {**self._latest[1], **snapshot})
            return self._seq

    def empty_data(self) -> int:
        """Serve `{}` from now on (a new sequence number, like any set_data)."""
        return self.set_data({})

    @property
    def data(self) -> dict[str, Any]:
        """A copy of the data GET serves now."""
        latest = self._latest
        assert latest is not None
        return envelope.plain(latest[1])

    @property
    def seq(self) -> int:
        """The sequence number of the data GET serves now."""
        latest = self._latest
        assert latest is not None
        return latest[0]

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The endpoint really bound (port 0 and wildcards resolved)."""
        return self.server.address

    @property
    def running(self) -> bool:
        return self.server.running

    def start(self) -> LaplaceServer:
        """Serve in the background (the server's own threads); returns self."""
        self.server.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving and release the port; returns within about `timeout` seconds."""
        self.server.stop(timeout)

    def is_alive(self) -> bool:
        return self.server.running

    def join(self, timeout: float | None = None) -> None:
        """Wait until the server has stopped (or `timeout` seconds)."""
        self.server._stopped.wait(timeout)

    def __enter__(self) -> LaplaceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def qt_signals(self, parent: Any = None) -> Any:
        """A `labmesh.laplace_qt.LaplaceSignals` bound to this server's callbacks (needs PyQt6,
        imported only here)."""
        from labmesh.laplace_qt import LaplaceSignals

        return LaplaceSignals(self, parent)
