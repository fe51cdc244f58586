"""labmesh devices in bluesky plans, through ophyd-async: `pip install 'labmesh[bluesky]'`.

    from bluesky import RunEngine
    from bluesky.plans import scan
    from labmesh.ophyd import labmesh_device

    RE = RunEngine()
    pm = labmesh_device("pm100-a")          # by name, through discovery; signals from describe
    stage = labmesh_device("stage")         # a motor stage: stage.x, stage.y are motors
    RE(scan([pm], stage.x, 0, 10, 11))

- A labmesh device becomes an ophyd-async `StandardReadable` built from its `describe`. Each
  parameter is a signal (`SignalR` when read-only, else `SignalRW`) with its dtype, units,
  limits and choices. Measured parameters (read-only) are read in each event, and the others
  are the configuration (`read_configuration`).
- Parameter names become attribute names: lowercase, with anything else than letters, digits
  and `_` turned into `_` (`POWER` -> `pm.power`, `Dev1/port0/line0` -> `daq.dev1_port0_line0`).
- A device with `move_abs` and `<axis>/position` parameters (a `MotorStage`) gets one motor per
  axis (`stage.x`). A motor is `Movable`, `Locatable` and `Stoppable`: `set()` starts the move
  as a labmesh task and reports its progress (bluesky's progress bars), and `stop()` stops
  it on the device.
- `subscribe_reading` (monitors, `observe_value`) uses labmesh subscriptions, not polling.
- `stage()` locks the device's resources for the plan (bluesky stages a motor's top device,
  so a scan of `stage.x` locks the stage; `bps.stage(stage.x)` locks the axis alone), under the
  bluesky session's name, and `unstage()` releases them. A device someone else holds fails at stage
  time, and the error names the holder.

Every remote call runs on the RunEngine's event loop through labmesh's asyncio client. Only
the `describe` made when a device is built is synchronous.
"""

from __future__ import annotations

import asyncio
import collections
import getpass
import re
import socket
import time
from typing import Any

from bluesky.protocols import Location, Reading
from event_model import DataKey
from ophyd_async.core import (
    AsyncStatus,
    SignalBackend,
    SignalMetadata,
    SignalR,
    SignalRW,
    StandardReadable,
    WatchableAsyncStatus,
    WatcherUpdate,
    make_datakey,
)
from ophyd_async.core import StandardReadableFormat as Format

from labmesh.client import AsyncDeviceClient, DeviceClient
from labmesh.locks import flatten

_TYPES: dict[str, type] = {"float": float, "int": int, "bool": bool, "str": str}
#: How often a motor's move reports its progress to bluesky (s).
PROGRESS_PERIOD_S = 0.05


def session_name() -> str:
    """The default holder name of a bluesky session's locks: `bluesky:user@host`."""
    return f"bluesky:{getpass.getuser()}@{socket.gethostname()}"


def attribute_name(parameter: str) -> str:
    """`POWER` -> `power`, `Dev1/port0/line0` -> `dev1_port0_line0`."""
    name = re.sub(r"\W", "_", parameter).strip("_").lower() or "value"
    return f"p_{name}" if name[0].isdigit() else name


class _Remote:
    """One labmesh device as the ophyd-async objects of it share it: the asyncio client
    (made in the RunEngine's loop at connect) and the resources its staged parts hold."""

    def __init__(self, device: str, options: dict[str, Any], session: str) -> None:
        self.device = device
        self.options = options
        self.session = session
        self.client: AsyncDeviceClient | None = None
        self._connecting: asyncio.Lock | None = None
        self._held: collections.Counter[str] = collections.Counter()

    async def connect(self, timeout: float) -> AsyncDeviceClient:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.client is None:
                client = AsyncDeviceClient(
                    self.device,
                    timeout=int(max(timeout, 1.0) * 1000),
                    connect_kwargs={"name": self.session},
                    **self.options,
                )
                await client.connect()
                self.client = client
        return self.client

    async def close(self) -> None:
        """Close the client (its locks are released, its lease heartbeat ends)."""
        client, self.client = self.client, None
        self._held.clear()
        if client is not None:
            await client.close()

    async def hold(self, resources: list[str]) -> None:
        """Lock `resources` too (what other staged parts hold stays held)."""
        if not resources:
            return
        wanted = collections.Counter(self._held)
        wanted.update(resources)
        assert self.client is not None, "connect the device before staging it"
        await self.client.lock(sorted(wanted))
        self._held = wanted

    async def release(self, resources: list[str]) -> None:
        if not resources or self.client is None:
            return
        self._held.subtract(resources)
        self._held = +self._held  # drop what nobody holds now
        await self.client.lock(sorted(self._held))


class LabmeshSignalBackend(SignalBackend[Any]):
    """A signal's backend: reads, writes and subscriptions of one labmesh parameter."""

    def __init__(self, remote: _Remote, parameter: dict[str, Any]) -> None:
        super().__init__(_TYPES.get(parameter.get("dtype") or "", float))
        self.remote = remote
        self.parameter = parameter["name"]
        metadata: SignalMetadata = {}
        if parameter.get("unit"):
            metadata["units"] = parameter["unit"]
        if parameter.get("options") is not None:
            metadata["choices"] = [str(v) for v in parameter["options"]]
        low, high = parameter.get("min_value"), parameter.get("max_value")
        if self.datatype in (int, float) and (low is not None or high is not None):
            limits = {"low": low if low is not None else float("-inf")}
            limits["high"] = high if high is not None else float("inf")
            metadata["limits"] = {"control": limits}  # type: ignore[typeddict-item]
        self.metadata = metadata
        self._subscription: Any = None
        self._setpoint: Any = None
        self._tasks: set[asyncio.Future] = set()

    def source(self, name: str, read: bool) -> str:
        return f"labmesh://{self.remote.device}/{self.parameter}"

    async def connect(self, timeout: float) -> None:
        await self.remote.connect(timeout)

    @property
    def _client(self) -> AsyncDeviceClient:
        assert self.remote.client is not None, "connect the device first"
        return self.remote.client

    async def put(self, value: Any) -> None:
        if value is None:
            return
        self._setpoint = value
        await self._client.write(self.parameter, value)

    async def get_datakey(self, source: str) -> DataKey:
        value = await self.get_value()
        return make_datakey(self.datatype, value, source, self.metadata)  # type: ignore[arg-type]

    async def get_reading(self) -> Reading[Any]:
        value = await self._client.query(self.parameter)
        return Reading(value=self._typed(value), timestamp=time.time(), alarm_severity=0)

    async def get_value(self) -> Any:
        return self._typed(await self._client.query(self.parameter))

    async def get_setpoint(self) -> Any:
        return self._setpoint if self._setpoint is not None else await self.get_value()

    def set_callback(self, callback: Any) -> None:
        """Follow the parameter through a labmesh subscription (None: stop following)."""
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            self._background(subscription.close())
        if callback is None:
            return

        def updated(update: Any) -> None:
            value = self._typed(update.value)
            callback(Reading(value=value, timestamp=update.timestamp, alarm_severity=0))

        self._subscription = self._client.subscribe(self.parameter, updated)
        self._background(self._subscription.start())

    def _background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _typed(self, value: Any) -> Any:
        if value is None or self.datatype is None:
            return value
        return self.datatype(value) if not isinstance(value, self.datatype) else value


class LabmeshMotor(StandardReadable):
    """One axis of a labmesh motor stage: Movable, Locatable, Stoppable, Stageable.

    `user_readback` is `<axis>/position` (read in each event), `velocity` is `<axis>/speed`.
    """

    def __init__(self, remote: _Remote, axis: str, parameters: dict[str, dict], name: str = ""):
        self._remote = remote
        self.axis = axis
        position = parameters[f"{axis}/position"]
        self.units = position.get("unit") or ""
        self.limits = (position.get("min_value"), position.get("max_value"))
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.user_readback = SignalR(LabmeshSignalBackend(remote, position))
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            if f"{axis}/speed" in parameters:
                self.velocity = SignalRW(LabmeshSignalBackend(remote, parameters[f"{axis}/speed"]))
        self._setpoint: float | None = None
        self._stopped_on_request = False
        super().__init__(name=name)

    @WatchableAsyncStatus.wrap
    async def set(self, value: float, timeout: float | None = None):  # type: ignore[override]
        """Move the axis to `value`: a labmesh task, its progress reported as it goes."""
        client = self._remote.client
        assert client is not None, "connect the stage first"
        initial = float(await self.user_readback.get_value())
        self._setpoint = float(value)
        self._stopped_on_request = False
        task = await client.start("move_abs", self.axis, float(value), timeout=timeout)
        started = time.monotonic()
        while not await task.wait(PROGRESS_PERIOD_S):
            progress = task.progress
            current = progress.get("position") if isinstance(progress, dict) else None
            if current is not None:
                yield WatcherUpdate(
                    current=float(current),
                    initial=initial,
                    target=float(value),
                    name=self.name,
                    unit=self.units,
                    time_elapsed=time.monotonic() - started,
                )
        await task.result()  # raises when it failed or was stopped (TaskCancelledError)
        yield WatcherUpdate(
            current=float(await self.user_readback.get_value()),
            initial=initial,
            target=float(value),
            name=self.name,
            unit=self.units,
            time_elapsed=time.monotonic() - started,
        )

    async def locate(self) -> Location[float]:
        readback = float(await self.user_readback.get_value())
        setpoint = self._setpoint if self._setpoint is not None else readback
        return Location(setpoint=setpoint, readback=readback)

    async def stop(self, success: bool = True) -> None:
        """Stop the axis on the device (a preempting call: it ends a move at once)."""
        self._stopped_on_request = True
        client = self._remote.client
        if client is not None:
            await client.call("stop", self.axis)

    @AsyncStatus.wrap
    async def stage(self) -> None:
        """Lock this axis for the plan (ResourceAllocationError names who holds it)."""
        await self._remote.hold([self.axis])

    @AsyncStatus.wrap
    async def unstage(self) -> None:
        await self._remote.release([self.axis])


class LabmeshDevice(StandardReadable):
    """A labmesh device as an ophyd-async device; see the module docstring.

    Parameters:
        device: a device name (through discovery) or an address `tcp://HOST:PORT`.
        name: the ophyd name (default: the labmesh device name, `-` turned into `_`).
        session: the holder name its locks show (default `bluesky:user@host`).
        description: its `describe` (default: asked of the device now, synchronously).
        options: more DeviceClient/AsyncDeviceClient options (discovery=, key=, server_key=).
    """

    def __init__(
        self,
        device: str,
        name: str = "",
        *,
        session: str | None = None,
        description: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if description is None:
            with DeviceClient(device, lease_s=None, **options) as client:
                description = client.describe()
        self.description = description
        self._remote = _Remote(device, options, session or session_name())
        params = {p["name"]: p for p in description["doc"]["parameters"]["default"]}
        self.resources = flatten(description.get("resources") or [])
        axes = _axes(description, params)
        self.motors: dict[str, LabmeshMotor] = {}
        for axis in axes:
            motor = LabmeshMotor(self._remote, axis, params)
            setattr(self, attribute_name(axis), motor)
            self.motors[axis] = motor
        in_motors = {f"{a}/{p}" for a in axes for p in ("position", "speed")}
        for pname, param in params.items():
            if pname in in_motors or param.get("write_only"):
                continue
            backend = LabmeshSignalBackend(self._remote, param)
            # measured (read-only) parameters in each event, the others as configuration;
            # a child is registered by being set inside the block
            if param.get("read_only"):
                with self.add_children_as_readables(Format.HINTED_SIGNAL):
                    setattr(self, attribute_name(pname), SignalR(backend))
            else:
                with self.add_children_as_readables(Format.CONFIG_SIGNAL):
                    setattr(self, attribute_name(pname), SignalRW(backend))
        super().__init__(name=name or description.get("name", device).replace("-", "_"))

    @AsyncStatus.wrap
    async def stage(self) -> None:
        """Lock the device's resources for the plan (none declared: nothing to lock).

        bluesky stages a motor's top device (a plan moving `stage.x` stages `stage`), so this
        locks every axis; `bps.stage(stage.x)` locks that axis alone."""
        await self._remote.hold(self.resources)

    @AsyncStatus.wrap
    async def unstage(self) -> None:
        await self._remote.release(self.resources)

    async def disconnect(self) -> None:
        """Close the device's connection (its locks released, its lease heartbeat stopped);
        `connect()` opens a new one. From plain code: `call_in_bluesky_event_loop(
        device.disconnect())`. A device left connected when the session ends costs nothing
        but its heartbeat."""
        await self._remote.close()


def labmesh_device(device: str, name: str = "", **options: Any) -> LabmeshDevice:
    """A LabmeshDevice, connected in the RunEngine's event loop when bluesky has one (as
    ophyd-async's `init_devices` does); `connect=False` leaves connecting to you."""
    connect = options.pop("connect", True)
    made = LabmeshDevice(device, name, **options)
    if connect:
        from bluesky.run_engine import call_in_bluesky_event_loop

        call_in_bluesky_event_loop(made.connect())
    return made


def _axes(description: dict[str, Any], params: dict[str, dict]) -> list[str]:
    """The axes of a motor stage: it has move_abs and stop, and `<axis>/position`."""
    if not {"move_abs", "stop"} <= set(description.get("methods", ())):
        return []
    return [n.rsplit("/", 1)[0] for n in params if n.endswith("/position")]
