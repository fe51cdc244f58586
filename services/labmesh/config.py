"""Lab YAML: one file per instrument host, validated into server specs with file:line errors.

host: lab-pc-3                    # optional; default: this machine's host name
bind: "*"                         # interface the device servers listen on
discovery: tcp://lab-core:5550    # optional: endpoint(s) or auto; default $LABMESH_DISCOVERY
metrics_port: 9105                # Prometheus /metrics of this process (default; null: off)
lock_idle_limit_s: 600            # optional: reclaim locks of silent PLESTY clients
limits: {max_queue_per_session: 50}   # optional: server bounds (labmesh.server.ServerLimits)
security:                         # optional: CurveZMQ and roles (docs/security.md)
  key: lab-pc-3                   # this host's key pair (name in $LABMESH_KEYS, or a path)
  clients: /etc/labmesh/clients   # directory of NAME.key files (reloaded), or a list of them
  keys: {alice: "Z85 public key"} # optional: more named public keys
  discovery_key: lab-core         # discovery's public key (default $LABMESH_DISCOVERY_KEY)
  roles: {alice: operator, "*": observer}   # roles on every device of this host
audit: stdout                     # optional: off | stdout | a file | {file, stdout, ...}
devices:
  - name: pm100-a
    driver: powermeter            # powermeter | scpi | nidaq | motor | package.module:Class
    resource: USB0::0x1313::0x8078::P0000001::INSTR
    port: 5555
    sim: false
    fixed_threading: true
    options: {sensor_type: S155C}
    roles: {bob: operator}        # optional, secured host: this device's roles over the host's
    plaintext: {port: 5565, role: observer}   # optional, secured host: for PLESTY/LAPLACE
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from labmesh.access import ROLES, role_rank
from labmesh.discovery.registry import NAME_PATTERN
from labmesh.locks import DEFAULT_IDLE_LIMIT_S
from labmesh.protocol.errors import LabmeshError
from labmesh.server.core import DEFAULT_FIXED_THREADING, ServerLimits

#: Where `labmesh serve` exposes /metrics unless the host file says otherwise (null: off).
DEFAULT_METRICS_PORT = 9105
#: Built-in drivers by short name: (module, class).
DRIVERS = {
    "powermeter": ("labmesh.drivers.powermeter", "PowermeterDevice"),
    "scpi": ("labmesh.drivers.scpi", "ScpiDevice"),
    "nidaq": ("labmesh.drivers.nidaq", "NIDaqDevice"),
    "motor": ("labmesh.drivers.motor", "MotorStage"),
}

_HOST_KEYS = {
    "host": "this host's name in the lab (default: the machine's host name)",
    "bind": "interface to listen on, e.g. '*' or 127.0.0.1",
    "advertise": "address other hosts reach this one at (default: found from the route)",
    "discovery": "discovery endpoint(s): tcp://HOST:PORT, a list of them, or auto",
    "metrics_port": "TCP port of this process's Prometheus /metrics (default 9105; null: off)",
    "lock_idle_limit_s": "seconds after which a silent PLESTY client's locks are reclaimed",
    "limits": "bounds on what one peer can make a device server hold (ServerLimits fields)",
    "security": "CurveZMQ: key, clients, keys, discovery_key, roles (docs/security.md)",
    "audit": "the audit trail: off, stdout, a file path, or {file, stdout, max_bytes, backups}",
    "devices": "the list of instruments this host serves",
}
_SECURITY_KEYS = {
    "key": "this host's key pair: a name in the keys directory or a .key_secret path",
    "clients": "a directory of NAME.key files (re-read when it changes), or a list of them",
    "keys": "a mapping of names to public keys (Z85 text or .key paths)",
    "discovery_key": "discovery's public key (Z85 text, a key name or a .key path)",
    "roles": "key name -> observer | operator | admin on every device ('*': any known key)",
}
_PLAINTEXT_KEYS = {
    "port": "TCP port of the plaintext listener (for PLESTY and LAPLACE clients)",
    "role": "the role its peers get: none | observer | operator | admin (default observer)",
}
_DEVICE_KEYS = {
    "name": "the device's unique name in the lab",
    "driver": f"one of {sorted(DRIVERS)} or package.module:Class",
    "resource": "VISA resource or device address (driver-specific)",
    "port": "TCP port this device's server listens on",
    "pub_port": "TCP port its subscription updates are published on (default: a free port)",
    "sim": "true to simulate the instrument",
    "fixed_threading": "run every call on one dedicated thread (default true)",
    "options": "driver-specific keyword arguments",
    "resources": "override the driver's lockable resources (list or tree)",
    "laplace": "serve LAPLACE clients too (mapping of LAPLACE options)",
    "metrics": "parameters exported as labmesh_parameter_value: a list, or {name: period_s}",
    "roles": "secured host: key name -> role on this device, over the host's roles",
    "plaintext": "secured host: {port, role} of a plaintext listener for PLESTY/LAPLACE clients",
}


class ConfigError(LabmeshError, ValueError):
    """A lab YAML mistake: says which file, where, what is wrong and what is expected."""


@dataclass
class DeviceSpec:
    """One device of a host file, validated."""

    name: str
    driver: str
    port: int
    resource: str | None = None
    #: where subscription updates are published (None: a free port on the same interface)
    pub_port: int | None = None
    sim: bool = False
    fixed_threading: bool = DEFAULT_FIXED_THREADING
    options: dict[str, Any] = field(default_factory=dict)
    resources: Any = None
    laplace: dict[str, Any] | None = None
    #: parameters read every period (s) and exported to Prometheus
    metrics: dict[str, float] = field(default_factory=dict)
    #: secured host: this device's roles (over the host's), and its plaintext listener
    roles: dict[str, str] = field(default_factory=dict)
    plaintext_port: int | None = None
    plaintext_role: str = "none"
    where: str = ""

    def driver_class(self) -> type:
        """Import the driver class (ConfigError naming the file:line if it cannot be)."""
        target = ":".join(DRIVERS[self.driver]) if self.driver in DRIVERS else self.driver
        module_name, _, class_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, class_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"{self.where}: devices[{self.name}].driver: cannot load {self.driver!r} "
                f"({exc}); check the module path and that it is installed"
            ) from None

    def build(self, sim: bool | None = None) -> Any:
        """Construct the driver object (name, sim and resource passed as keyword arguments)."""
        cls = self.driver_class()
        kwargs = dict(self.options)
        kwargs["name"] = self.name
        simulate = self.sim or bool(sim)
        if simulate or _accepts(cls, "sim"):
            if not _accepts(cls, "sim"):
                raise ConfigError(
                    f"{self.where}: {self.name}: driver {self.driver!r} has no "
                    "simulation mode; remove sim: true (or --sim)"
                )
            kwargs["sim"] = simulate
        if self.resource is not None:
            kwargs["resource"] = self.resource
        device = cls(**kwargs)
        if self.resources is not None:
            device.resources = self.resources
        return device


@dataclass
class HostConfig:
    """A validated instrument-host file."""

    host: str
    devices: list[DeviceSpec]
    bind: str = "*"
    advertise: str | None = None
    discovery: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    lock_idle_limit_s: float = DEFAULT_IDLE_LIMIT_S
    limits: ServerLimits = field(default_factory=ServerLimits)
    path: str = ""
    security: SecuritySpec | None = None
    #: the `audit:` value as written (None: the default, see labmesh.audit.from_settings)
    audit: Any = None


@dataclass
class SecuritySpec:
    """A host file's `security:` mapping, validated (keys are loaded by the host)."""

    key: str
    clients: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    discovery_key: str | None = None
    roles: dict[str, str] = field(default_factory=dict)
    where: str = ""


def _limits(doc: _Located, raw: Any) -> ServerLimits:
    """The host file's `limits:` mapping as ServerLimits (every field a positive number)."""
    if raw is None:
        return ServerLimits()
    if not isinstance(raw, dict):
        raise _fail(doc, ("limits",), f"expected a mapping of limit: value, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(ServerLimits)}
    _unknown_keys(doc, ("limits",), raw, {name: "a server bound" for name in fields})
    values = {}
    for name, value in raw.items():
        integer = fields[name].type in ("int", int)
        if (
            isinstance(value, bool)
            or not isinstance(value, int if integer else (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            expected = "a positive whole number" if integer else "a positive number"
            raise _fail(doc, ("limits", name), f"expected {expected}, got {value!r}")
        values[name] = value
    return ServerLimits(**values)


def _accepts(cls: type, keyword: str) -> bool:
    """Whether a driver's constructor takes `keyword` (or any keyword)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in params)


class _Located:
    """YAML converted to plain data, remembering the line of every node by its key path."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines: dict[tuple, int] = {}
        try:
            node = yaml.compose(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: not valid YAML: {problem}") from None
        self.data = self._convert(node, ()) if node is not None else None

    def _convert(self, node: yaml.Node, key: tuple) -> Any:
        self.lines[key] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k_node, v_node in node.value:
                k = yaml.safe_load(yaml.serialize(k_node))
                out[k] = self._convert(v_node, (*key, k))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(v, (*key, i)) for i, v in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))

    def at(self, key: tuple) -> str:
        while key and key not in self.lines:
            key = key[:-1]
        return f"{self.path}:{self.lines.get(key, 1)}"


def _label(key: tuple) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _fail(doc: _Located, key: tuple, message: str) -> ConfigError:
    return ConfigError(f"{doc.at(key)}: {_label(key)}: {message}")


def _unknown_keys(doc: _Located, key: tuple, given: dict, allowed: dict[str, str]) -> None:
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _fail(
                doc,
                (*key, name),
                f"unknown key {name!r}{hint} (allowed: {', '.join(sorted(allowed))})",
            )


def _port(doc: _Located, key: tuple, value: Any, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise _fail(doc, key, f"expected a TCP port number {low}-65535, got {value!r}")
    return value


def _bool(doc: _Located, key: tuple, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(doc, key, f"expected true or false, got {value!r}")
    return value


def _endpoints(doc: _Located, key: tuple, value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise _fail(doc, key, f"expected tcp://HOST:PORT, a list of them, or auto; got {value!r}")
    out = [i.strip() for i in items if i.strip()]
    for endpoint in out:
        if endpoint != "auto" and not re.match(r"^tcp://[^:/\s]+:\d+$", endpoint):
            raise _fail(doc, key, f"{endpoint!r} is not tcp://HOST:PORT (or auto)")
    return out


def parse_host_config(text: str, path: str = "<string>") -> HostConfig:
    """Validate a host file's text; raises ConfigError with file:line on the first mistake."""
    doc = _Located(path, text)
    data = doc.data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: expected a mapping with a 'devices' list, got "
            f"{type(data).__name__ if data is not None else 'an empty file'}"
        )
    _unknown_keys(doc, (), data, _HOST_KEYS)
    host = data.get("host") or socket.gethostname()
    if not isinstance(host, str):
        raise _fail(doc, ("host",), f"expected a host name, got {host!r}")
    bind = data.get("bind", "*")
    if not isinstance(bind, str) or not bind:
        raise _fail(doc, ("bind",), f"expected an interface address or '*', got {bind!r}")
    advertise = data.get("advertise")
    if advertise is not None and not isinstance(advertise, str):
        raise _fail(doc, ("advertise",), f"expected a host name or address, got {advertise!r}")
    discovery = _endpoints(doc, ("discovery",), data.get("discovery") or [])
    metrics = data.get("metrics_port", DEFAULT_METRICS_PORT)
    metrics_port = _port(doc, ("metrics_port",), metrics, allow_zero=True) if metrics else None
    idle = data.get("lock_idle_limit_s", DEFAULT_IDLE_LIMIT_S)
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle <= 0:
        raise _fail(doc, ("lock_idle_limit_s",), f"expected a positive number, got {idle!r}")
    limits = _limits(doc, data.get("limits"))
    security = _security(doc, data.get("security"))
    audit_setting = data.get("audit")
    if audit_setting is not None and not (
        isinstance(audit_setting, (str, dict)) or audit_setting is False
    ):
        raise _fail(
            doc, ("audit",), f"expected off, stdout, a path or a mapping, got {audit_setting!r}"
        )
    devices_raw = data.get("devices")
    if not isinstance(devices_raw, list) or not devices_raw:
        raise _fail(doc, ("devices",), "expected a non-empty list of devices")
    devices: list[DeviceSpec] = []
    names: dict[str, str] = {}
    ports: dict[int, str] = {}
    if metrics_port:
        ports[metrics_port] = "metrics_port"
    for i, raw in enumerate(devices_raw):
        spec = _device(doc, ("devices", i), raw)
        if spec.name in names:
            raise _fail(
                doc,
                ("devices", i, "name"),
                f"name {spec.name!r} is already used at {names[spec.name]}",
            )
        if spec.port in ports:
            raise _fail(
                doc,
                ("devices", i, "port"),
                f"port {spec.port} is already used by {ports[spec.port]}",
            )
        if spec.pub_port is not None and spec.pub_port in ports | {spec.port: ""}:
            used = ports.get(spec.pub_port) or f"device {spec.name}'s port"
            raise _fail(
                doc,
                ("devices", i, "pub_port"),
                f"port {spec.pub_port} is already used by {used}",
            )
        if spec.plaintext_port is not None:
            if security is None:
                raise _fail(
                    doc,
                    ("devices", i, "plaintext"),
                    "a plaintext listener is for secured hosts (add a security: section); "
                    "without one every port is plaintext already",
                )
            if spec.plaintext_port in ports | {spec.port: "", spec.pub_port: ""}:
                raise _fail(
                    doc,
                    ("devices", i, "plaintext", "port"),
                    f"port {spec.plaintext_port} is already used",
                )
            ports[spec.plaintext_port] = f"device {spec.name} (plaintext)"
        if spec.roles and security is None:
            raise _fail(
                doc, ("devices", i, "roles"), "roles need a security: section (keys to name)"
            )
        names[spec.name] = spec.where
        ports[spec.port] = f"device {spec.name}"
        if spec.pub_port is not None:
            ports[spec.pub_port] = f"device {spec.name} (pub_port)"
        devices.append(spec)
    return HostConfig(
        host,
        devices,
        bind,
        advertise,
        discovery,
        metrics_port,
        float(idle),
        limits,
        path,
        security,
        audit_setting,
    )


def _roles(doc: _Located, key: tuple, raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(doc, key, f"expected a mapping of key names to roles, got {raw!r}")
    for name, role in raw.items():
        try:
            role_rank(role, "role")
        except ValueError:
            raise _fail(
                doc, (*key, name), f"unknown role {role!r}; roles are {', '.join(ROLES)}"
            ) from None
    return {str(k): str(v).lower() for k, v in raw.items()}


def _security(doc: _Located, raw: Any) -> SecuritySpec | None:
    if raw is None:
        return None
    key = ("security",)
    if not isinstance(raw, dict):
        raise _fail(doc, key, f"expected a mapping ({', '.join(_SECURITY_KEYS)}), got {raw!r}")
    _unknown_keys(doc, key, raw, _SECURITY_KEYS)
    if not isinstance(raw.get("key"), str):
        raise _fail(doc, key, f"missing 'key' ({_SECURITY_KEYS['key']})")
    clients = raw.get("clients") or []
    if isinstance(clients, str):
        clients = [clients]
    if not isinstance(clients, list) or not all(isinstance(c, str) for c in clients):
        raise _fail(doc, (*key, "clients"), f"expected a directory or a list, got {clients!r}")
    keys = raw.get("keys") or {}
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise _fail(doc, (*key, "keys"), f"expected a mapping of names to keys, got {keys!r}")
    discovery_key = raw.get("discovery_key")
    if discovery_key is not None and not isinstance(discovery_key, str):
        raise _fail(doc, (*key, "discovery_key"), f"expected a key, got {discovery_key!r}")
    base = Path(doc.path).parent if doc.path and not doc.path.startswith("<") else Path(".")
    return SecuritySpec(
        key=raw["key"],
        clients=[str(base / c) for c in clients],
        keys={str(k): v for k, v in keys.items()},
        discovery_key=discovery_key,
        roles=_roles(doc, (*key, "roles"), raw.get("roles")),
        where=doc.at(key),
    )


def _plaintext(doc: _Located, key: tuple, raw: Any) -> tuple[int | None, str]:
    if raw is None:
        return None, "none"
    if not isinstance(raw, dict):
        raise _fail(doc, key, f"expected {{port, role}}, got {raw!r}")
    _unknown_keys(doc, key, raw, _PLAINTEXT_KEYS)
    if "port" not in raw:
        raise _fail(doc, key, f"missing 'port' ({_PLAINTEXT_KEYS['port']})")
    port = _port(doc, (*key, "port"), raw["port"])
    role = _roles(doc, key, {"role": raw.get("role", "observer")})["role"]
    return port, role


def _device(doc: _Located, key: tuple, raw: Any) -> DeviceSpec:
    if not isinstance(raw, dict):
        raise _fail(doc, key, f"expected a mapping with name, driver and port, got {raw!r}")
    _unknown_keys(doc, key, raw, _DEVICE_KEYS)
    for required in ("name", "driver", "port"):
        if required not in raw:
            raise _fail(doc, key, f"missing {required!r} ({_DEVICE_KEYS[required]})")
    name = raw["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise _fail(
            doc,
            (*key, "name"),
            f"expected a name of letters, digits, '.', '_' or '-' (at most 63), got {name!r}",
        )
    driver = raw["driver"]
    if not isinstance(driver, str) or (driver not in DRIVERS and ":" not in driver):
        raise _fail(
            doc,
            (*key, "driver"),
            f"unknown driver {driver!r}; expected one of {sorted(DRIVERS)} or package.module:Class",
        )
    port = _port(doc, (*key, "port"), raw["port"])
    pub_port = raw.get("pub_port")
    if pub_port is not None:
        pub_port = _port(doc, (*key, "pub_port"), pub_port)
    resource = raw.get("resource")
    if resource is not None and not isinstance(resource, str):
        raise _fail(doc, (*key, "resource"), f"expected a string, got {resource!r}")
    options = raw.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise _fail(
            doc, (*key, "options"), f"expected a mapping of keyword arguments, got {options!r}"
        )
    resources = raw.get("resources")
    if resources is not None and not isinstance(resources, (list, dict)):
        raise _fail(doc, (*key, "resources"), f"expected a list or a tree, got {resources!r}")
    laplace = raw.get("laplace")
    if laplace is not None and not isinstance(laplace, dict):
        raise _fail(doc, (*key, "laplace"), f"expected a mapping, got {laplace!r}")
    exported = _exported(doc, (*key, "metrics"), raw.get("metrics"))
    plaintext_port, plaintext_role = _plaintext(doc, (*key, "plaintext"), raw.get("plaintext"))
    spec = DeviceSpec(
        name=name,
        driver=driver,
        port=port,
        pub_port=pub_port,
        resource=resource,
        sim=_bool(doc, (*key, "sim"), raw.get("sim", False)),
        fixed_threading=_bool(
            doc, (*key, "fixed_threading"), raw.get("fixed_threading", DEFAULT_FIXED_THREADING)
        ),
        options=options,
        resources=resources,
        laplace=laplace,
        metrics=exported,
        roles=_roles(doc, (*key, "roles"), raw.get("roles")),
        plaintext_port=plaintext_port,
        plaintext_role=plaintext_role,
        where=doc.at(key),
    )
    _check_driver(doc, key, spec)
    return spec


#: Driver arguments the host file sets itself (name:, sim:, resource:), never through options.
_MANAGED_ARGUMENTS = ("name", "sim", "resource")


def _check_driver(doc: _Located, key: tuple, spec: DeviceSpec) -> None:
    """Everything about a device that can be known without opening it: the driver loads, its
    options are arguments it takes (with "did you mean"), its required arguments are given,
    and the driver's own `check_options` (e.g. a known sensor head) accepts them."""
    try:
        cls = spec.driver_class()
    except ConfigError as exc:
        raise _fail(doc, (*key, "driver"), str(exc).split(": ", 2)[-1]) from None
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return  # a driver whose signature cannot be read is checked when it is built
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes = [n for n, p in params.items() if p.kind not in _VARIADIC]
    options = [n for n in takes if n not in _MANAGED_ARGUMENTS]
    for option in spec.options:
        if option in _MANAGED_ARGUMENTS:
            raise _fail(
                doc,
                (*key, "options", option),
                f"{option!r} is set by the device's own {option}: key, not by options",
            )
        if not takes_any and option not in params:
            close = difflib.get_close_matches(option, options, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _fail(
                doc,
                (*key, "options", option),
                f"driver {spec.driver!r} takes no option {option!r}{hint} (its options: "
                f"{', '.join(options) or 'none'})",
            )
    if spec.resource is not None and "resource" not in params and not takes_any:
        raise _fail(doc, (*key, "resource"), f"driver {spec.driver!r} takes no resource")
    for name, param in params.items():
        if param.kind in _VARIADIC or param.default is not inspect.Parameter.empty:
            continue
        if name == "resource" and spec.resource is None:
            raise _fail(
                doc,
                key,
                f"missing 'resource' ({_DEVICE_KEYS['resource']}; `labmesh visa list` shows "
                "the instruments this PC sees)",
            )
        if name not in _MANAGED_ARGUMENTS and name not in spec.options:
            raise _fail(doc, (*key, "options"), f"driver {spec.driver!r} needs option {name!r}")
    check = getattr(cls, "check_options", None)
    if callable(check):
        try:
            check(dict(spec.options))
        except (ValueError, TypeError) as exc:
            raise _fail(doc, (*key, "options"), str(exc)) from None


_VARIADIC = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)


#: How often an exported parameter is read when the host file gives no period (s).
DEFAULT_EXPORT_PERIOD_S = 1.0


def _exported(doc: Any, key: tuple, raw: Any) -> dict[str, float]:
    """`metrics:` of a device: a list of parameter names, or {name: period_s}."""
    if raw is None:
        return {}
    if isinstance(raw, list) and all(isinstance(n, str) and n for n in raw):
        return dict.fromkeys(raw, DEFAULT_EXPORT_PERIOD_S)
    if isinstance(raw, dict) and all(isinstance(n, str) and n for n in raw):
        out = {}
        for name, period in raw.items():
            if (
                isinstance(period, bool)
                or not isinstance(period, (int, float))
                or not math.isfinite(period)
                or period < 0.05
            ):
                raise _fail(
                    doc, (*key, name), f"expected a period of at least 0.05 s, got {period!r}"
                )
            out[name] = float(period)
        return out
    raise _fail(
        doc,
        key,
        f"expected a list of parameter names, or a mapping of name to period (s), got {raw!r}",
    )


def load_host_config(path: str | Path) -> HostConfig:
    """Read and validate a host file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the lab file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return parse_host_config(text, str(path))
