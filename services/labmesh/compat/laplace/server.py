"""`LaplaceServer`: laplace-server's `ServerLHC`, served by labmesh.

The same constructor, `set_data`, callbacks and setters as ServerLHC, without its crashes, lost
updates, latency tail or open STOP. It is not an adapter itself: it owns a `DeviceServer` (the
socket, the threads, the bounds) serving a data-only device, and a `LaplaceAdapter` that answers
LAPLACE on that server from the `ApplicationData` the program sets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zmq

from labmesh.compat.laplace.adapter import CALLBACKS, ApplicationData, LaplaceAdapter
from labmesh.device.base import Device
from labmesh.protocol import laplace as envelope
from labmesh.server.loop import DeviceServer


class _DataOnly(Device):
    """The device behind a LaplaceServer: no instrument, only the data its application sets."""

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(name)
        self.kind = kind.lower()


class LaplaceServer:
    """A LAPLACE-LHC server in the style of laplace-server's `ServerLHC`, served by labmesh.

    Same constructor, `set_data`, callbacks (`on_get`, ... as attributes, or `set_on_get(...)`)
    and setters as ServerLHC, on a labmesh DeviceServer: REQ and DEALER clients, any malformed
    message answered with a LAPLACE error and never fatal, no polling sleep, a bounded `stop()`,
    and STOP refused unless allowed. The native protocol (describe, ping) answers on the same
    socket. Callbacks get what ServerLHC passes them (see LaplaceAdapter); labmesh's
    `on_update_actuator_positions` is an addition, called after `on_set_actuators`.

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
        save_root: SAVE paths with `..` are always refused; absolute ones are accepted under
            this directory. The default "/" keeps ServerLHC programs working (their masters
            send absolute paths); give the data directory to confine them.

    Attributes:
        adapter: the LaplaceAdapter answering LAPLACE (callbacks, `save_path`, `last_error`).
        server: the DeviceServer it runs on.
        store: the ApplicationData GET serves.
    """

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
        save_root: str | None = "/",
    ) -> None:
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
        self.freedom = freedom
        self.device = device
        self.store = ApplicationData(data)
        self.adapter = LaplaceAdapter(
            kind=device,
            freedom=freedom,
            name_list=name_list,
            plottables_list=plottables_list,
            versions=versions,
            allow_stop=allow_stop,
            data=self.store,
            save_root=save_root,
        )
        self.server = DeviceServer(
            _DataOnly(name, device),
            address=address,
            name=name,
            laplace=self.adapter,
            context=context,
        )

    # ---- what the adapter keeps ----------------------------------------------------------
    @property
    def name(self) -> str:
        return self.server.name

    @property
    def save_path(self) -> str | None:
        """The path of the last SAVE."""
        return self.adapter.save_path

    @property
    def last_error(self) -> str | None:
        return self.adapter.last_error

    @property
    def allow_stop(self) -> bool:
        return self.adapter.allow_stop

    def set_name_list(self, names: Sequence[str]) -> None:
        """Replace the INFO `name_list`."""
        self.adapter.set_name_list(names)

    # ---- data -----------------------------------------------------------------------------
    def set_data(self, data: Mapping[str, Any]) -> int:
        """Replace the data GET serves with a snapshot of `data`; returns its sequence number."""
        return self.store.set(data)

    def update_data(self, changes: Mapping[str, Any]) -> int:
        """Merge `changes` into the current data in one step; returns the sequence number."""
        return self.store.update(changes)

    def empty_data(self) -> int:
        """Serve `{}` from now on (a new sequence number, like any set_data)."""
        return self.store.set({})

    @property
    def data(self) -> dict[str, Any]:
        """A copy of the data GET serves now."""
        return envelope.plain(self.store.latest[1])

    @property
    def seq(self) -> int:
        """The sequence number of the data GET serves now."""
        return self.store.latest[0]

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
        self.server.wait_stopped(timeout)

    def __enter__(self) -> LaplaceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def qt_signals(self, parent: Any = None) -> Any:
        """A `labmesh.compat.laplace.qt.LaplaceSignals` bound to this server's callbacks
        (needs PyQt6, imported only here)."""
        from labmesh.compat.laplace.qt import LaplaceSignals

        return LaplaceSignals(self, parent)


def _forwarded(name: str) -> property:
    def get(self: LaplaceServer) -> Callable | None:
        return getattr(self.adapter, name)

    def set_(self: LaplaceServer, func: Callable | None) -> None:
        setattr(self.adapter, name, func)

    return property(get, set_, doc=f"The `{name}` callback (runs on the server's thread).")


def _forwarded_setter(name: str) -> Callable[[LaplaceServer, Callable | None], None]:
    def setter(self: LaplaceServer, func: Callable | None) -> None:
        setattr(self.adapter, name, func)

    setter.__name__ = setter.__qualname__ = f"set_{name}"
    setter.__doc__ = f"Set the `{name}` callback (None: unset), as ServerLHC's setter."
    return setter


for _name in CALLBACKS:
    setattr(LaplaceServer, _name, _forwarded(_name))
    setattr(LaplaceServer, f"set_{_name}", _forwarded_setter(_name))
