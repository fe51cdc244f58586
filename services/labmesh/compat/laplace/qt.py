"""Qt signals for LAPLACE callbacks: the PyQt6 bridge (imported only by Qt applications).

`LaplaceSignals(server)` sets every callback of a `LaplaceServer` (or `LaplaceAdapter`) to emit a
signal, with the signal names of laplace-server's `ServerController`, so GUI code written for it
connects unchanged. The callbacks run on the server's thread; Qt delivers the signals to slots
in the receivers' threads (queued across threads), so slots may touch widgets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    from PyQt6.QtCore import QObject, pyqtSignal
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "labmesh.compat.laplace.qt (labmesh.laplace_qt) needs PyQt6 (pip install PyQt6); the "
        "rest of labmesh.compat.laplace works without it"
    ) from exc

from labmesh.compat.laplace.adapter import CALLBACKS

if TYPE_CHECKING:  # annotations only: the server imports this module for qt_signals()
    from labmesh.compat.laplace.adapter import LaplaceAdapter


class LaplaceSignals(QObject):
    """One signal per LAPLACE callback.

    Signals (arguments as the callbacks get them): `get_received()`, `position_changed(positions)`
    (a list or an `{index: position}` dict, as sent), `saving_path_changed(path)`,
    `opt_received(data)`, `scan_received(message)`, `set_actuators_dict_received(actuators)`,
    `set_diagnostics_dict_received(diagnostics)`, `actuators_pos_update_received(actuators)`.

    Parameters:
        server: the LaplaceServer or LaplaceAdapter whose callbacks to take over (or None, then
            `bind` later).
        parent: the QObject parent.
    """

    get_received = pyqtSignal()
    position_changed = pyqtSignal(object)
    saving_path_changed = pyqtSignal(str)
    opt_received = pyqtSignal(object)
    scan_received = pyqtSignal(object)
    set_actuators_dict_received = pyqtSignal(object)
    set_diagnostics_dict_received = pyqtSignal(object)
    actuators_pos_update_received = pyqtSignal(object)

    def __init__(self, server: LaplaceAdapter | None = None, parent: Any = None) -> None:
        super().__init__(parent)
        if server is not None:
            self.bind(server)

    def bind(self, server: LaplaceAdapter) -> None:
        """Make every callback of `server` emit the matching signal."""
        for callback, signal in CALLBACKS.items():
            getattr(server, f"set_{callback}")(getattr(self, signal).emit)
