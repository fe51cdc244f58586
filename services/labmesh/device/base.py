"""The device contract a driver author subclasses, and the `@operation` decorator.

A driver is synchronous code: it implements `connect`/`disconnect`, the `_write_`/`_query_`
hooks for its declared parameters, and exposes extra operations with `@operation`. The same
object works locally (`with MyDevice() as dev: dev.query("POWER")`) and remotely through
`build_server(dev)` + `build_client(...)`, where the client gets the same methods.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import string
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from labmesh.device.parameters import Parameter
from labmesh.device.tasks import run_to_end
from labmesh.hints import did_you_mean
from labmesh.protocol.errors import ParameterValueError, UnknownParameterError

log = logging.getLogger("labmesh.device")

F = TypeVar("F", bound=Callable[..., Any])

OPERATION_MARKER = "__labmesh_operation__"
#: On a task operation: its generator function (the server steps it; a direct call runs it).
TASK_MARKER = "__labmesh_task__"
#: Markers PLESTY's `@expose_to_api` leaves on a function; honoured so its drivers serve as-is.
_PLESTY_EXPOSE_MARKER = "__plesty_expose_in_api__"
_PLESTY_BUDGET_MARKER = "__plesty_op_budget_s__"


@dataclass(frozen=True)
class OperationSpec:
    """What `@operation` declares about a method.

    Attributes:
        budget_s: how long the call may take; the client waits that long and the server uses it
            as the call's budget when the caller gives none.
        idempotent: safe to send twice; only then does a client retry it after a timeout.
        resources: the lockable resources the call touches (None = the whole device; () =
            none). An entry may name an argument in braces, e.g. `"{line}"` or
            `"stage/{axis}"`, filled in from the call's arguments.
        preempt: runs while a task runs (between its steps) instead of waiting for it, and
            stops a running task whose resources it touches (a stage's `stop`).
        task: the method is a generator, stepped by the server as a task (labmesh.device.tasks).
        read_only: it only reads (a position, a channel list): on a secured device the
            observer role may call it, as it may query parameters.
    """

    budget_s: float | None = None
    idempotent: bool = False
    resources: tuple[str, ...] | None = None
    preempt: bool = False
    task: bool = False
    read_only: bool = False


@overload
def operation(func: F) -> F: ...
@overload
def operation(
    *,
    budget_s: float | None = None,
    idempotent: bool = False,
    resources: Iterable[str] | None = None,
    preempt: bool = False,
    read_only: bool = False,
) -> Callable[[F], F]: ...


def operation(
    func: Callable[..., Any] | None = None,
    *,
    budget_s: float | None = None,
    idempotent: bool = False,
    resources: Iterable[str] | None = None,
    preempt: bool = False,
    read_only: bool = False,
) -> Any:
    """Expose a device method to remote clients (`call`), optionally with a time budget.

    Use as `@operation` or `@operation(budget_s=30, idempotent=True)`. A generator method is a
    task (labmesh.device.tasks): the server steps it, answering reads and preempting calls
    between its steps; called directly, it runs to its end and returns its result.
    """
    if budget_s is not None and (isinstance(budget_s, bool) or budget_s <= 0):
        raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    spec = OperationSpec(
        float(budget_s) if budget_s is not None else None,
        idempotent,
        tuple(resources) if resources is not None else None,
        bool(preempt),
        read_only=bool(read_only),
    )

    def mark(f: F) -> F:
        if not inspect.isgeneratorfunction(f):
            setattr(f, OPERATION_MARKER, spec)
            return f

        @functools.wraps(f)
        def run_here(*args: Any, **kwargs: Any) -> Any:
            return run_to_end(f(*args, **kwargs))

        setattr(run_here, TASK_MARKER, f)
        setattr(run_here, OPERATION_MARKER, dataclasses.replace(spec, task=True))
        return run_here  # type: ignore[return-value]

    return mark(func) if func is not None else mark


def _operation_spec(attr: Any) -> OperationSpec | None:
    if isinstance(attr, (staticmethod, classmethod)):
        attr = attr.__func__
    if not callable(attr):
        return None
    base = inspect.unwrap(attr)
    spec = getattr(attr, OPERATION_MARKER, None) or getattr(base, OPERATION_MARKER, None)
    if spec is not None:
        return spec
    if getattr(base, _PLESTY_EXPOSE_MARKER, False):
        return OperationSpec(budget_s=getattr(base, _PLESTY_BUDGET_MARKER, None))
    return None


def task_function(device: Any, name: str) -> Callable[..., Any] | None:
    """The generator function of task operation `name` of `device` (None: not a task)."""
    return getattr(getattr(type(device), name, None), TASK_MARKER, None)


def find_operations(obj: Any) -> Mapping[str, OperationSpec]:
    """Public methods of `obj`'s class (and bases) marked as operations, by name (read-only).

    An override keeps the operation (and its spec) of the method it overrides, so a driver
    that redefines `identity` needs no decorator; a new `@operation(...)` replaces the spec.
    Worked out once per class: the server asks on every call that may touch a lock.
    """
    return _class_operations(type(obj))


@functools.lru_cache(maxsize=256)
def _class_operations(kind: type) -> Mapping[str, OperationSpec]:
    found: dict[str, OperationSpec] = {}
    for cls in kind.__mro__:
        if cls is object:
            continue
        for name, attr in vars(cls).items():
            if name.startswith("_") or name in found or isinstance(attr, property):
                continue
            spec = _operation_spec(attr)
            if spec is not None:
                found[name] = spec
    return types.MappingProxyType(found)


_FORMATTER = string.Formatter()


def touched_resources(
    device: Any, request_type: str, name: str, args: tuple, kwargs: dict
) -> tuple[str, ...] | None:
    """What a write or call touches, as the device declares it; None means the whole device.

    A driver with its own mapping overrides `Device.touches`; otherwise a parameter's
    `resources` and an operation's `resources` (with `{argument}` templates) are used.
    Reads touch nothing: they are allowed whoever holds a lock.
    """
    if request_type == "query":
        return ()
    custom = getattr(device, "touches", None)
    if callable(custom):
        found = custom(request_type, name, args, kwargs)
        if found is not NotImplemented:
            return None if found is None else tuple(found)
    if request_type == "write":
        params = getattr(device, "parameters", None)
        param = params.get(name) if isinstance(params, dict) else None
        return param.resources if isinstance(param, Parameter) else None
    method = getattr(device, name, None)
    spec = find_operations(device).get(name) if method is not None else None
    if spec is None or spec.resources is None:
        return None
    if not any("{" in r for r in spec.resources):
        return spec.resources
    try:
        bound = inspect.signature(method).bind(*args, **kwargs)
    except TypeError:
        return None  # the call itself will fail with the right TypeError; lock like the device
    bound.apply_defaults()
    used = {field for r in spec.resources for _, field, _, _ in _FORMATTER.parse(r) if field}
    if any(bound.arguments.get(field) is None for field in used):
        return None  # e.g. `home(axis=None)`: every axis, i.e. the whole device
    try:
        return tuple(r.format(**bound.arguments) for r in spec.resources)
    except (KeyError, IndexError, ValueError):
        return None


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _annotation_name(annotation: Any) -> str | None:
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or str(annotation)


def describe_operation(name: str, method: Callable[..., Any], spec: OperationSpec) -> dict:
    """JSON description of one operation: doc, arguments (for client signatures), budget."""
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        sig = None
    iparams = []
    if sig is not None:
        for p in sig.parameters.values():
            if p.name == "self":
                continue
            iparams.append(
                {
                    "name": p.name,
                    "kind": p.kind.name,
                    "dtype": _annotation_name(p.annotation),
                    "required": p.default is inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD),
                    "default": None if p.default is p.empty else _jsonable(p.default),
                }
            )
    returns = _annotation_name(sig.return_annotation) if sig is not None else None
    return {
        "name": name,
        "source": "labmesh",
        "description": inspect.getdoc(method) or "",
        "iparams": iparams,
        "oparams": [{"name": "result", "dtype": returns}] if returns else [],
        "kind": {
            "budget_s": spec.budget_s,
            "idempotent": spec.idempotent,
            "task": spec.task,
            "preempt": spec.preempt,
            "read_only": spec.read_only,
        },
        "resources": list(spec.resources) if spec.resources is not None else None,
    }


class Device:
    """Base class of every labmesh driver.

    Subclass it, declare parameters as class attributes (`POWER = Parameter(float, unit="W",
    read_only=True)`), implement `connect`, `disconnect`, `_query_` and `_write_`, and mark
    extra methods with `@operation`. `resources` declares what clients can lock: a flat list
    (`["x", "y"]`) or a nested tree (`{"Dev1": {"port0": ["line0", "line1"]}}`).

    Parameters:
        name: the device's name in the lab (defaults to the class name).
        resources: overrides the class's `resources`.
    """

    kind: str = "device"
    resources: list[str] | dict[str, Any] | None = None

    def __init__(self, name: str | None = None, *, resources: Any = None) -> None:
        self.name = name or type(self).__name__
        if resources is not None:
            self.resources = resources
        self.parameters: dict[str, Parameter] = {}
        for cls in reversed(type(self).__mro__):
            for attr_name, attr in vars(cls).items():
                if isinstance(attr, Parameter):
                    self.parameters[attr_name] = attr
        self.connected = False

    # ---- lifecycle (override) -------------------------------------------------------------
    def connect(self) -> None:
        """Open the instrument. Called once, on the thread that runs the device's calls."""

    def disconnect(self) -> None:
        """Close the instrument. Must be safe to call after a failed or partial connect."""

    # ---- parameter hooks (override) -------------------------------------------------------
    def _query_(self, name: str) -> Any:
        """Read parameter `name` from the instrument; a raw string is converted to its type."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _query_({name!r})")

    def _write_(self, name: str, value: Any) -> bool | None:
        """Send validated `value` for `name`; return False if the instrument refused it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _write_({name!r})")

    # ---- the contract ---------------------------------------------------------------------
    def declare(self, parameter: Parameter) -> None:
        """Add or replace a parameter at run time (e.g. from a YAML parameter map)."""
        if not parameter.name:
            raise ValueError("a parameter declared at run time needs a name")
        self.parameters[parameter.name] = parameter

    def set_limits(self, name: str, *, min: float | None = None, max: float | None = None) -> None:
        """Narrow or widen the limits of a numeric parameter for this instance."""
        self.parameters[name] = self.parameter(name).replace(min=min, max=max)

    def parameter(self, name: str) -> Parameter:
        """The declared parameter `name`, or UnknownParameterError listing the known ones."""
        try:
            return self.parameters[name]
        except (KeyError, TypeError):
            hint = did_you_mean(name, self.parameters, "parameter names")
            raise UnknownParameterError(
                f"{self.name} has no parameter {name!r}{hint}; known: {sorted(self.parameters)}"
            ) from None

    def query(self, name: str, **_request: Any) -> Any:
        """Read a declared parameter, converted to its declared type."""
        param = self.parameter(name)
        if param.write_only:
            raise ParameterValueError(f"{name} is write-only; it can be written, not queried")
        return _from_device(self.name, param, self._query_(name))

    def write(self, name: str, value: Any, **_request: Any) -> bool:
        """Validate `value` against the declaration of `name` and write it; True on success."""
        value = self.parameter(name).validate(value)
        return self._write_(name, value) is not False

    def touches(self, request_type: str, name: str, args: tuple, kwargs: dict) -> Any:
        """Override to say which resources a write/call touches (None = the whole device).

        Return NotImplemented (the default) to use the declarations of parameters and
        operations. Must be quick and pure: it runs before the call, on the server's thread.
        """
        return NotImplemented

    def publish(self, name: str, value: Any) -> None:
        """Push a new value of parameter (or topic) `name` to its subscribers, from any device
        code (e.g. a position during a move). Without a server serving this device, nothing
        happens."""
        sink = self.__dict__.get("_labmesh_publish")
        if sink is not None:
            sink(name, value)

    def get_config_list(self) -> list[str]:
        """Names of the declared parameters."""
        return sorted(self.parameters)

    @operation(idempotent=True, resources=())
    def identity(self) -> str:
        """The instrument's identity string (e.g. the answer to `*IDN?`)."""
        return f"labmesh,{type(self).__name__},{self.name},0"

    @operation(idempotent=True, resources=())
    def check_errors(self) -> list[str]:
        """Errors the instrument reports (empty list when none)."""
        return []

    @operation(idempotent=True, resources=())
    def check_operatability(self) -> bool:
        """True when the instrument is connected and answers."""
        return self.connected

    def describe(self) -> dict[str, Any]:
        """Static description (no instrument I/O): parameters, operations, resources."""
        return describe_device(self)

    def __enter__(self) -> Device:
        try:
            self.connect()
        except BaseException:
            try:
                self.disconnect()  # release whatever the partial connect opened
            except Exception as exc:
                log.warning("%s: disconnect after a failed connect also failed: %s", self.name, exc)
            raise
        self.connected = True
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.disconnect()
        finally:
            self.connected = False


def describe_device(device: Any) -> dict[str, Any]:
    """Describe any served object: a labmesh Device, or a PLESTY-style driver.

    Reads only class metadata and declarations, never the instrument, so the server can answer
    `describe` while a 20 s exposure runs.
    """
    ops = find_operations(device)
    functions = [describe_operation(n, getattr(device, n), s) for n, s in sorted(ops.items())]
    parameters = getattr(device, "parameters", None)
    params = parameters.items() if isinstance(parameters, dict) else ()
    resources = getattr(device, "resources", None)
    if resources is None:
        resources = getattr(device, "_resources", None)
    return {
        "name": getattr(device, "name", None) or type(device).__name__,
        "kind": getattr(device, "kind", "device"),
        "methods": sorted(ops),
        "budgets": {n: s.budget_s for n, s in ops.items() if s.budget_s is not None},
        "idempotent": sorted(n for n, s in ops.items() if s.idempotent),
        "tasks": sorted(n for n, s in ops.items() if s.task),
        "preempt": sorted(n for n, s in ops.items() if s.preempt),
        "read_only": sorted(n for n, s in ops.items() if s.read_only),
        "doc": {
            "description": inspect.getdoc(type(device)) or "",
            "parameters": {
                "default": [
                    {"name": n, **_plesty_param(p)}
                    for n, p in sorted(params)
                    if isinstance(p, Parameter)
                ]
            },
            "functions": functions,
            "standard_methods": [],
        },
        "resources": _jsonable(resources) if resources else [],
    }


def _plesty_param(p: Parameter) -> dict[str, Any]:
    """A parameter in the field names PLESTY's describe uses (dtype, min_value, ...)."""
    return {
        "dtype": p.type_name,
        "unit": p.unit,
        "default": _jsonable(p.default),
        "read_only": p.read_only,
        "write_only": p.write_only,
        "min_value": p.min,
        "max_value": p.max,
        "options": list(p.options) if p.options is not None else None,
        "description": p.description,
        "poll_s": p.poll_s,
    }


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


_TRUE = {"1", "on", "true", "yes"}
_FALSE = {"0", "off", "false", "no"}


def _from_device(device: str, param: Parameter, raw: Any) -> Any:
    """Convert what `_query_` returned (often an SCPI string) to the parameter's type."""
    if not isinstance(raw, (str, bytes)) or param.type in (None, str):
        return raw.strip() if isinstance(raw, str) and param.type is str else raw
    text = raw.decode() if isinstance(raw, bytes) else raw
    text = text.strip()
    try:
        if param.type is float:
            return float(text)
        if param.type is int:
            return int(float(text))
        if param.type is bool:
            low = text.lower()
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
            raise ValueError(text)
    except ValueError:
        raise ParameterValueError(
            f"{device}: {param.name}: the instrument answered {text!r}, which is not "
            f"{_article(param.type_name)} {param.type_name} (wrong command in the driver, or a "
            "garbled line: check the cable and the instrument's settings)"
        ) from None
    return text
