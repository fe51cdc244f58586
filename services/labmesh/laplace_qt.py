"""`labmesh.laplace_qt`: the first name of `labmesh.compat.laplace.qt` (needs PyQt6)."""

from labmesh.compat.laplace.qt import LaplaceSignals

__all__ = ["LaplaceSignals"]
