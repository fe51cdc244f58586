"""`labmesh.laplace`: the first name of `labmesh.compat.laplace` (kept for existing programs)."""

from labmesh.compat.laplace import (
    CALLBACKS,
    ApplicationData,
    LaplaceAdapter,
    LaplaceAnswer,
    LaplaceServer,
)

__all__ = ["CALLBACKS", "ApplicationData", "LaplaceAdapter", "LaplaceAnswer", "LaplaceServer"]
