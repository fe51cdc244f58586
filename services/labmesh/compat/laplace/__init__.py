"""LAPLACE-LHC on labmesh: serve any device to LAPLACE clients (`LaplaceAdapter`), or run a
ServerLHC-style server (`LaplaceServer`). The PyQt6 bridge is `labmesh.compat.laplace.qt`.

`labmesh.laplace` and `labmesh.laplace_qt` re-export these under their first names.
"""

from labmesh.compat.laplace.adapter import (
    CALLBACKS,
    ApplicationData,
    LaplaceAdapter,
    LaplaceAnswer,
)
from labmesh.compat.laplace.server import LaplaceServer

__all__ = ["CALLBACKS", "ApplicationData", "LaplaceAdapter", "LaplaceAnswer", "LaplaceServer"]
