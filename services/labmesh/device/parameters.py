"""Declared device parameters: type, unit, limits, options, access, and validation of writes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from labmesh.hints import did_you_mean
from labmesh.protocol.errors import ParameterValueError

_TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str"}


@dataclass(frozen=True)
class Parameter:
    """A parameter a device declares, e.g. `WAVELENGTH = Parameter(float, unit="nm", min=400)`.

    Declared as a class attribute of a Device subclass (the attribute name is the parameter
    name) or passed to `Device.declare()`. Each device instance holds its own copy, so a driver
    can narrow limits at run time (a power meter learns them from its sensor head) with
    `device.set_limits("WAVELENGTH", min=..., max=...)`.

    Parameters:
        type: float, int, bool or str (None accepts any JSON value).
        unit: unit shown to users, e.g. "nm", "W".
        min, max: inclusive numeric limits.
        options: the allowed values (a closed list).
        read_only: cannot be written (e.g. a measured POWER).
        write_only: cannot be queried (e.g. a trigger).
        description: one line for users and `describe`.
        default: the value before the first query/write, if any.
        resources: the lockable resources a write of this parameter touches (issue: locks).
        poll_s: a server reads it this often whoever subscribes, and publishes each reading
            to its subscribers (None: only when a subscriber asks for `every_s`).
    """

    type: type | None = float
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    options: tuple[Any, ...] | None = None
    read_only: bool = False
    write_only: bool = False
    description: str = ""
    default: Any = None
    resources: tuple[str, ...] | None = None
    name: str = ""
    poll_s: float | None = None

    def __post_init__(self) -> None:
        if self.type not in (None, *_TYPE_NAMES):
            raise TypeError(
                f"parameter type must be float, int, bool, str or None, not {self.type}"
            )
        if self.options is not None and not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        if self.resources is not None and not isinstance(self.resources, tuple):
            object.__setattr__(self, "resources", tuple(self.resources))
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"parameter {self.name or '?'}: min {self.min} > max {self.max}")
        if self.poll_s is not None and (
            isinstance(self.poll_s, bool)
            or not isinstance(self.poll_s, (int, float))
            or not self.poll_s > 0
        ):
            raise ValueError(
                f"parameter {self.name or '?'}: poll_s must be > 0 s, got {self.poll_s!r}"
            )
        if self.read_only and self.write_only:
            raise ValueError(f"parameter {self.name or '?'} cannot be read-only and write-only")

    def __set_name__(self, owner: type, name: str) -> None:
        if not self.name:
            object.__setattr__(self, "name", name)

    def replace(self, **changes: Any) -> Parameter:
        """A copy with some fields changed (limits narrowed, a new description, ...)."""
        return dataclasses.replace(self, **changes)

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.type, "any")  # type: ignore[arg-type]

    def _a(self) -> str:
        name = self.type_name
        return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"

    def _allowed(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.options is not None:
            return f"one of {list(self.options)}"
        if self.min is not None and self.max is not None:
            return f"{self._a()} from {self.min} to {self.max}{unit}"
        if self.min is not None:
            return f"{self._a()} >= {self.min}{unit}"
        if self.max is not None:
            return f"{self._a()} <= {self.max}{unit}"
        return self._a()

    def validate(self, value: Any) -> Any:
        """Check a value for writing and return it in the declared type (an int becomes a float).

        Raises ParameterValueError naming the parameter, the value and what is allowed.
        """
        if self.read_only:
            raise ParameterValueError(f"{self.name} is read-only; it can be queried, not written")
        coerced = self._coerce(value)
        if self.options is not None and coerced not in self.options:
            hint = did_you_mean(coerced, self.options, "options")
            raise ParameterValueError(
                f"{value!r} is not an option of {self.name}; allowed: {list(self.options)}{hint}"
            )
        if (self.min is not None and coerced < self.min) or (
            self.max is not None and coerced > self.max
        ):
            raise ParameterValueError(
                f"{value!r} is out of range for {self.name}; allowed: {self._allowed()}"
            )
        return coerced

    def _coerce(self, value: Any) -> Any:
        t = self.type
        if t is None:
            return value
        wrong = ParameterValueError(
            f"{self.name} takes {self._allowed()}, got {type(value).__name__} {value!r}"
        )
        if t is bool:
            if not isinstance(value, bool):
                raise wrong
            return value
        if isinstance(value, bool):
            raise wrong  # bool is an int subclass in Python; never a number here
        if t is float:
            if not isinstance(value, (int, float)):
                raise wrong
            if isinstance(value, float) and math.isnan(value):
                raise ParameterValueError(f"{self.name} cannot be set to NaN")
            return float(value)
        if t is int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if not isinstance(value, int):
                raise wrong
            return value
        if not isinstance(value, str):
            raise wrong
        return value

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for `describe` and `help`."""
        return {
            "type": self.type_name,
            "unit": self.unit,
            "min": self.min,
            "max": self.max,
            "options": list(self.options) if self.options is not None else None,
            "read_only": self.read_only,
            "write_only": self.write_only,
            "description": self.description,
        }
