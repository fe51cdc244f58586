"""Error types that cross the wire, and the client-side RemoteError family.

Server side, an exception becomes a reply `{"status": "error", "type": T, "error": msg}`, where
T is the exception's `wire_type` attribute if it has one, else its class name. Client side, every
error reply is raised as a subclass of `RemoteError` whose class name is T; for the builtin names
PLESTY clients already know (ValueError, KeyError, TimeoutError, ...) the class also subclasses the
builtin, so `except ValueError` keeps working across the network.
"""

from __future__ import annotations

import builtins
from typing import Any


class LabmeshError(Exception):
    """Base of the errors labmesh raises itself (server side and locally)."""

    wire_type: str = "LabmeshError"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProtocolError(LabmeshError):
    """A request that is not a valid labmesh / PLESTY / LAPLACE message."""

    wire_type = "ProtocolError"


class SerializationError(LabmeshError):
    """A result (or request field) that JSON cannot carry."""

    wire_type = "SerializationError"


class ResourceAllocationError(LabmeshError):
    """A connect whose requested resources cannot be granted (PLESTY's name)."""

    wire_type = "ResourceAllocationError"


class ResourceLockedError(LabmeshError):
    """An operation touching a resource that another session holds."""

    wire_type = "ResourceLockedError"


class LeaseExpiredError(LabmeshError):
    """The session's lease ran out (or the server restarted) and its locks are gone."""

    wire_type = "LeaseExpiredError"


class BusyError(LabmeshError):
    """A request refused at once because a bound was reached (calls queued, waiters).

    Its details name the bound (`bound`, a ServerLimits field), its `limit` and the `depth`
    reached; nothing was queued, so the request can be sent again later.
    """

    wire_type = "BusyError"


class BudgetExpiredError(LabmeshError):
    """The server-side time budget of a device call ran out (wire type TimeoutError, which
    clients raise as a TimeoutError; the reply says `still_running` and when it `started`)."""

    wire_type = "TimeoutError"


class TaskCancelledError(LabmeshError):
    """A task (a long operation) was stopped before it finished: by `task_cancel`, by a
    preempting call touching its resources (a stage's `stop`), or by Ctrl+C."""

    wire_type = "TaskCancelledError"


class ShutdownError(LabmeshError):
    """The server stopped before a request was answered (a call interrupted or not started, a
    lock wait ended)."""

    wire_type = "ShutdownError"


class InternalError(LabmeshError):
    """A bug in the server answering one request; the server carries on."""

    wire_type = "InternalError"


class ExecutorDeadError(LabmeshError):
    """The thread that runs a device's calls is gone; the device cannot be reached."""

    wire_type = "ExecutorDeadError"


class UnknownParameterError(LabmeshError, KeyError):
    """A parameter name the device does not declare (wire type KeyError, as PLESTY)."""

    wire_type = "KeyError"


class ParameterValueError(LabmeshError, ValueError):
    """A parameter value of the wrong type, out of range, or not an option."""

    wire_type = "ValueError"


class UnknownOperationError(LabmeshError, AttributeError):
    """A `call` to a name that is not an exposed operation."""

    wire_type = "AttributeError"


class UnknownTaskError(LabmeshError, LookupError):
    """`task_status` / `task_cancel` of a task id this server does not know (never started
    here, or finished long ago)."""

    wire_type = "UnknownTaskError"


def wire_type_of(exc: BaseException) -> str:
    """The `type` string a reply carries for this exception."""
    return getattr(exc, "wire_type", None) or type(exc).__name__


class RemoteError(Exception):
    """An error the remote device server answered with.

    Attributes:
        type: the wire `type` (also this exception's class name).
        message: the server's message.
        reply: the whole reply object (extra fields such as `still_running`, `result`).
    """

    type: str = "RemoteError"

    def __init__(self, message: str, reply: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply or {}

    def __str__(self) -> str:
        return self.message

    @property
    def still_running(self) -> bool:
        """True when a budget expired while the device was still busy with the call."""
        return bool(self.reply.get("still_running"))


_BUILTIN_BASES = {
    name: getattr(builtins, name)
    for name in (
        "ValueError",
        "KeyError",
        "TypeError",
        "TimeoutError",
        "PermissionError",
        "AttributeError",
        "RuntimeError",
        "NotImplementedError",
        "IndexError",
        "ConnectionError",
        "OSError",
        "ZeroDivisionError",
        "ArithmeticError",
        "LookupError",
    )
}
_remote_classes: dict[str, type[RemoteError]] = {}


def remote_error_class(type_name: str) -> type[RemoteError]:
    """The RemoteError subclass named `type_name` (created once, then cached).

    Type names that are not Python identifiers (a hostile or buggy server) map to RemoteError.
    """
    if not isinstance(type_name, str) or not type_name.isidentifier():
        return RemoteError
    cls = _remote_classes.get(type_name)
    if cls is None:
        bases: tuple[type, ...] = (RemoteError,)
        if type_name in _BUILTIN_BASES:
            bases = (RemoteError, _BUILTIN_BASES[type_name])
        cls = type(type_name, bases, {"type": type_name, "__module__": "labmesh.remote"})
        if type_name == "KeyError":
            # KeyError.__str__ would quote the message; keep it readable.
            cls.__str__ = RemoteError.__str__  # type: ignore[method-assign]
        _remote_classes[type_name] = cls
    return cls


def remote_error(type_name: str, message: str, reply: dict[str, Any] | None = None) -> RemoteError:
    """Build the exception a client raises for an error reply."""
    return remote_error_class(type_name)(message, reply)
