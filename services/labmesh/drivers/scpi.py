"""A generic SCPI instrument over VISA whose parameters come from a parameter map (YAML or dict).

A map names, per parameter, the query and the write template, the type, unit, limits and options:

    kind: powersupply                 # optional (default "scpi")
    identity: "*IDN?"                 # optional; null when the instrument has none
    errors: "SYST:ERR?"               # optional; null when it has no error queue
    sim_yaml: ../sim/dc_supply.yaml   # optional: pyvisa-sim definition for sim=True
    parameters:
      VOLTAGE:
        query: "VOLT?"
        write: "VOLT {value}"         # {value:.3f} formats the number itself
        type: float                   # float (default), int, bool or str
        unit: V
        min: 0
        max: 30
        description: output voltage set point

A parameter without `write` is read-only, one without `query` write-only. `sim_yaml` is relative
to the map file (to the working directory for a dict). Shipped maps live in
`labmesh/drivers/maps/` and can be named without a path (`"dc_supply"`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from labmesh.device import Parameter
from labmesh.drivers.visa import VisaDevice, load_sim_definition, scpi_quoted, scpi_text

#: Parameter maps shipped with labmesh.
MAPS_DIR = Path(__file__).resolve().parent / "maps"

_TYPES = {"float": float, "int": int, "bool": bool, "str": str}
_TOP_KEYS = ("kind", "identity", "errors", "sim_yaml", "parameters")
_PARAMETER_KEYS = (
    "query",
    "write",
    "type",
    "unit",
    "min",
    "max",
    "options",
    "read_only",
    "description",
)


class ScpiMapError(ValueError):
    """A parameter map that cannot be used; the message names the file, the key and the fix."""


class ScpiTemplate(string.Formatter):
    """Fills a write template such as `VOLT {value}` or `VOLT {value:.3f}`.

    A bare `{value}` gets SCPI text (booleans 1/0, numbers compact); a format spec formats the
    value itself (a bool as 0/1), so `{value:.3f}` writes `5.000`. A string value between
    quotes in the template (`DISP:TEXT '{value}'`) has that quote doubled, as SCPI escapes it,
    and control characters refused; a string anywhere else must be a plain mnemonic. Either
    way nothing a client sends can end the command and start another (`x';VOLT 1000;OUTP 1`).
    """

    def format_field(self, value: Any, format_spec: str) -> str:
        if not format_spec:
            return scpi_text(value)
        return format(int(value) if isinstance(value, bool) else value, format_spec)

    def fill(self, template: str, value: Any) -> str:
        """The command for `value` (ParameterValueError if it cannot be sent safely)."""
        if not isinstance(value, str):
            return self.format(template, value=value)
        parts = list(self.parse(template))
        out = []
        for i, (literal, field, spec, _conversion) in enumerate(parts):
            out.append(literal)
            if field is None:
                continue
            before = literal[-1:]
            after = parts[i + 1][0][:1] if i + 1 < len(parts) else ""
            if before in ("'", '"') and after == before and not spec:
                out.append(scpi_quoted(value, before))
            else:
                out.append(self.format_field(value, spec or ""))
        return "".join(out)


_TEMPLATE = ScpiTemplate()


@dataclass(frozen=True)
class ScpiCommands:
    """How one parameter is read and written (None: it cannot be)."""

    query: str | None
    write: str | None


@dataclass(frozen=True)
class ScpiMap:
    """A loaded, checked parameter map.

    Attributes:
        source: the file it came from (or "<dict>").
        parameters: the declarations, by parameter name.
        commands: the SCPI commands, by parameter name.
        kind: the device kind shown in `describe`.
        identity: the identity query, or None.
        errors: the error-queue query, or None.
        sim_yaml: the pyvisa-sim definition for sim=True, or None.
    """

    source: str
    parameters: dict[str, Parameter]
    commands: dict[str, ScpiCommands]
    kind: str = "scpi"
    identity: str | None = "*IDN?"
    errors: str | None = "SYST:ERR?"
    sim_yaml: Path | None = None


def shipped_map(name: str) -> Path | None:
    """The shipped map called `name` (e.g. "dc_supply"), if there is one."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = MAPS_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def load_parameter_map(source: str | Path | Mapping[str, Any]) -> ScpiMap:
    """Load and check a parameter map from a YAML file, a shipped map's name, or a dict.

    Raises ScpiMapError naming the file, the key and what is expected.
    """
    if isinstance(source, Mapping):
        return _parse_map(source, "<dict>", base=Path.cwd())
    if not isinstance(source, (str, Path)):
        raise ScpiMapError(
            f"a SCPI parameter map is a YAML file path or a dict, got {type(source).__name__}"
        )
    path = Path(source)
    if not path.is_file():
        path = shipped_map(str(source)) or path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        shipped = ", ".join(sorted(p.stem for p in MAPS_DIR.glob("*.yaml")))
        raise ScpiMapError(
            f"{source}: cannot read the SCPI parameter map ({exc.strerror or exc}); pass a YAML "
            f"file path, a dict, or a shipped map: {shipped}"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScpiMapError(f"{path}: not valid YAML: {exc}") from None
    return _parse_map(data, str(path), base=path.parent)


def _parse_map(data: Any, source: str, base: Path) -> ScpiMap:
    if not isinstance(data, Mapping):
        raise ScpiMapError(
            f"{source}: expected a mapping with a 'parameters' key, got {type(data).__name__}"
        )
    _no_unknown_keys(source, "", data, _TOP_KEYS)
    params = data.get("parameters")
    if not isinstance(params, Mapping) or not params:
        raise ScpiMapError(
            f"{source}: parameters: expected a mapping of parameter names to their commands, "
            "e.g. VOLTAGE: {query: 'VOLT?', write: 'VOLT {value}', type: float, unit: V}"
        )
    declared: dict[str, Parameter] = {}
    commands: dict[str, ScpiCommands] = {}
    for name, spec in params.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ScpiMapError(
                f"{source}: parameters: {name!r} is not a usable parameter name (expected "
                "letters, digits and _, e.g. VOLTAGE)"
            )
        declared[name], commands[name] = _parse_parameter(source, name, spec)
    sim_yaml = _optional_str(source, "", data, "sim_yaml")
    return ScpiMap(
        source=source,
        parameters=declared,
        commands=commands,
        kind=_optional_str(source, "", data, "kind") or "scpi",
        identity=_optional_str(source, "", data, "identity", "*IDN?"),
        errors=_optional_str(source, "", data, "errors", "SYST:ERR?"),
        sim_yaml=(base / sim_yaml).resolve() if sim_yaml else None,
    )


def _no_unknown_keys(source: str, where: str, data: Mapping, allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            raise ScpiMapError(
                f"{source}: {where}{key}: unknown key; expected one of {', '.join(allowed)}"
            )


def _optional_str(
    source: str, where: str, data: Mapping, key: str, default: str | None = None
) -> str | None:
    if key not in data:
        return default
    value = data[key]
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ScpiMapError(
        f"{source}: {where}{key}: expected a non-empty string or null, got {value!r}"
    )


def _parse_parameter(source: str, name: str, spec: Any) -> tuple[Parameter, ScpiCommands]:
    where = f"parameters.{name}"
    if not isinstance(spec, Mapping):
        raise ScpiMapError(
            f"{source}: {where}: expected a mapping with query/write/type/..., got {spec!r}"
        )
    _no_unknown_keys(source, f"{where}.", spec, _PARAMETER_KEYS)
    query = _optional_str(source, f"{where}.", spec, "query")
    write = _optional_str(source, f"{where}.", spec, "write")
    if write is not None:
        _check_template(source, f"{where}.write", write)
    read_only = spec.get("read_only", write is None)
    if not isinstance(read_only, bool):
        raise ScpiMapError(
            f"{source}: {where}.read_only: expected true or false, got {read_only!r}"
        )
    if read_only and write is not None:
        raise ScpiMapError(
            f"{source}: {where}: read_only is true but a write command is given; drop one"
        )
    if not read_only and write is None:
        raise ScpiMapError(f"{source}: {where}: read_only is false but there is no write command")
    if query is None and write is None:
        raise ScpiMapError(f"{source}: {where}: expected a query, a write command, or both")
    type_name = spec.get("type", "float")
    if type_name not in _TYPES:
        raise ScpiMapError(
            f"{source}: {where}.type: expected one of {', '.join(_TYPES)}, got {type_name!r}"
        )
    kind = _TYPES[type_name]
    limits = {key: _limit(source, f"{where}.{key}", spec.get(key), kind) for key in ("min", "max")}
    options = spec.get("options")
    if options is not None:
        if not isinstance(options, list) or not options:
            raise ScpiMapError(f"{source}: {where}.options: expected a non-empty list of values")
        for option in options:
            if type(option) is not kind and not (kind is float and type(option) is int):
                raise ScpiMapError(
                    f"{source}: {where}.options: {option!r} is not a {type_name}; expected a "
                    f"list of {type_name} values"
                )
        options = tuple(kind(option) for option in options)
    unit = spec.get("unit")
    description = spec.get("description", "")
    for key, value in (("unit", unit), ("description", description)):
        if value is not None and not isinstance(value, str):
            raise ScpiMapError(f"{source}: {where}.{key}: expected a string, got {value!r}")
    try:
        parameter = Parameter(
            kind,
            unit=unit,
            min=limits["min"],
            max=limits["max"],
            options=options,
            read_only=read_only,
            write_only=query is None,
            description=description or "",
            name=name,
        )
    except (TypeError, ValueError) as exc:
        raise ScpiMapError(f"{source}: {where}: {exc}") from None
    return parameter, ScpiCommands(query=query, write=write)


def _limit(source: str, where: str, value: Any, kind: type) -> float | None:
    if value is None:
        return None
    if kind not in (float, int):
        raise ScpiMapError(f"{source}: {where}: limits apply to float and int parameters only")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScpiMapError(f"{source}: {where}: expected a number, got {value!r}")
    return value


def _check_template(source: str, where: str, template: str) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ScpiMapError(f"{source}: {where}: {template!r} is not a template: {exc}") from None
    fields = {field for _, field, _, _ in parsed if field is not None}
    if fields != {"value"}:
        raise ScpiMapError(
            f"{source}: {where}: expected a command with a {{value}} field and no other, e.g. "
            f"'VOLT {{value}}'; got {template!r} (write literal braces as {{{{ }}}})"
        )


class ScpiDevice(VisaDevice):
    """A SCPI instrument over VISA whose parameters come from a parameter map (see the module).

    Parameters:
        resource: the VISA resource, e.g. `TCPIP::192.168.1.20::5025::SOCKET` or
            `ASRL/dev/ttyUSB0::INSTR`.
        parameter_map: a YAML file path, the name of a shipped map ("dc_supply"), or a dict.
        sim: simulate the instrument with pyvisa-sim (a private copy per instance), from
            `sim_yaml` or the map's `sim_yaml`; any resource name works.
        name: the device's name in the lab (default: the map file's name, or "scpi").
        visa_library: the pyvisa backend ("@py", "path.yaml@sim"; None: pyvisa's default).
        sim_yaml: the pyvisa-sim definition to use with sim=True (overrides the map's).
        timeout_ms: how long a query waits for the instrument.
    """

    kind = "scpi"

    def __init__(
        self,
        resource: str,
        parameter_map: str | Path | Mapping[str, Any],
        *,
        sim: bool = False,
        name: str | None = None,
        visa_library: str | None = None,
        sim_yaml: str | Path | None = None,
        timeout_ms: int = 2000,
    ) -> None:
        scpi_map = load_parameter_map(parameter_map)
        name = name or (Path(scpi_map.source).stem if scpi_map.source != "<dict>" else "scpi")
        sim_definition = None
        if sim:
            definition = sim_yaml or scpi_map.sim_yaml
            if definition is None:
                raise ValueError(
                    f"{name}: sim=True needs a pyvisa-sim definition: pass sim_yaml= or add "
                    f"'sim_yaml: <file>' to {scpi_map.source}"
                )
            sim_definition = load_sim_definition(definition)
        super().__init__(
            resource,
            name=name,
            visa_library=visa_library,
            sim_definition=sim_definition,
            timeout_ms=timeout_ms,
        )
        self.map = scpi_map
        self.kind = scpi_map.kind
        self.identity_command = scpi_map.identity
        self.error_command = scpi_map.errors
        for parameter in scpi_map.parameters.values():
            self.declare(parameter)

    def _query_(self, name: str) -> str:
        command = self.map.commands[name].query
        assert command is not None  # write-only parameters are refused before this
        return self.ask(command)

    def _write_(self, name: str, value: Any) -> bool:
        template = self.map.commands[name].write
        assert template is not None  # read-only parameters are refused before this
        self.send(_TEMPLATE.fill(template, value))
        return True
