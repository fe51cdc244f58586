"""Shared VISA plumbing for SCPI drivers: sessions with short timeouts and clear errors, and
`VisaDevice`, the base of drivers that talk SCPI to one VISA resource.

A `VisaSession` opens one resource with pyvisa (any backend), or with pyvisa-sim from a YAML
definition that is written to a private temporary file for every open, because pyvisa-sim keeps
one state per YAML file and instances must not share it. Every error names the instrument, the
resource and the command, and says what to check.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pyvisa
import yaml
from pyvisa import constants, rname
from pyvisa.errors import VisaIOError

from labmesh.device import Device, operation
from labmesh.protocol.errors import LabmeshError, ParameterValueError

log = logging.getLogger("labmesh.drivers")

#: The pyvisa-sim definitions shipped with labmesh.
SIM_DIR = Path(__file__).resolve().parent / "sim"
#: How many entries `check_errors` reads at most: SCPI error queues are bounded (PM100: 30).
MAX_QUEUED_ERRORS = 32


class InstrumentConnectionError(LabmeshError, ConnectionError):
    """The instrument could not be opened or reached (not found, unplugged, refused)."""

    wire_type = "ConnectionError"


class InstrumentTimeoutError(LabmeshError, TimeoutError):
    """The instrument did not answer a query within the VISA timeout."""

    wire_type = "TimeoutError"


class InstrumentReplyError(LabmeshError, ValueError):
    """The instrument answered something the driver cannot use (garbled, over range)."""

    wire_type = "ValueError"


class InstrumentRefusedError(LabmeshError, ValueError):
    """The instrument put an error in its queue right after a command the driver sent."""

    wire_type = "ValueError"


def connection_hint(resource: str) -> str:
    """What to check when `resource` cannot be reached, by interface type."""
    try:
        parsed = rname.parse_resource_name(resource)
    except rname.InvalidResourceName:
        return "is the resource name right? e.g. USB0::0x1313::0x8078::P0000001::INSTR"
    interface = parsed.interface_type_const
    if interface == constants.InterfaceType.usb:
        return (
            "is the USB cable in, libusb installed (Debian: apt install libusb-1.0-0), the "
            "device readable by this user (a udev rule: docs/troubleshooting.md), and, in a "
            "container, /dev/bus/usb passed in? `labmesh visa list` shows what this PC sees"
        )
    if interface == constants.InterfaceType.tcpip:
        host = getattr(parsed, "host_address", "?")
        port = getattr(parsed, "port", None)
        where = f"{host}:{port}" if port else host
        return f"is the instrument on and reachable at {where}?"
    if interface == constants.InterfaceType.asrl:
        return (
            "is the serial adapter plugged in (on Linux the resource is ASRL/dev/ttyUSB0::INSTR"
            ", not ASRL1::INSTR), its device readable (group dialout) and, in a container, "
            "passed in? `labmesh visa list` shows the ports"
        )
    if interface == constants.InterfaceType.gpib:
        return "is the GPIB adapter connected and its driver installed?"
    return "is the instrument on and connected?"


#: What a string sent unquoted into an SCPI command may hold: a mnemonic or a number, nothing
#: that ends the command (`;`, a newline), starts another parameter (`,`, a space) or a string.
_BARE_SCPI = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-:*/")


def scpi_text(value: Any) -> str:
    """A validated parameter value as SCPI text: booleans as 1/0, numbers compact (1064, 5e-09),
    strings as they are if they are a plain mnemonic, else refused (ParameterValueError): a
    string that could end the command or start another one never reaches the instrument."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.10g}"
    text = str(value)
    if isinstance(value, str) and not set(text) <= _BARE_SCPI:
        bad = sorted(set(text) - _BARE_SCPI)
        raise ParameterValueError(
            f"{text[:40]!r} cannot be sent unquoted to an SCPI instrument: it holds "
            f"{''.join(bad)[:10]!r} (letters, digits and _.+-:*/ only); a parameter map that "
            "sends free text must quote it, e.g. write: \"DISP:TEXT '{value}'\""
        )
    return text


def scpi_quoted(value: str, quote: str) -> str:
    """`value` for inside an SCPI string delimited by `quote`: the quote doubled, as SCPI
    escapes it; control characters (a newline would end the command) refused."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ParameterValueError(
            f"{value[:40]!r} holds a control character (a newline or another terminator would "
            "end the SCPI command): send printable text only"
        )
    return value.replace(quote, quote * 2)


def error_code(owner: str, command: str, entry: str) -> int:
    """The number of an SCPI error-queue entry: `0,"No error"` and `+0,"No error"` give 0."""
    try:
        return int(entry.split(",", 1)[0].strip())
    except ValueError:
        raise InstrumentReplyError(
            f"{owner}: {command!r} answered {entry!r}, which is not an SCPI error entry like "
            f'0,"No error" (is the error command of this instrument right?)',
            command=command,
            reply=entry,
        ) from None


def load_sim_definition(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a pyvisa-sim YAML definition (spec 1.1: devices, resources) into a dict."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the pyvisa-sim definition: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: the pyvisa-sim definition is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise ValueError(
            f"{path}: a pyvisa-sim definition needs a 'devices' mapping (and 'spec', "
            "'resources'); see the files in labmesh/drivers/sim/"
        )
    return data


def _sim_definition_for(owner: str, definition: dict[str, Any], resource: str) -> dict[str, Any]:
    """`definition` with `resource` bound to its device, so any resource name works in sim.

    A resource the definition lists keeps its device; another one is bound to the only device
    the definition has (a definition with several devices must list the resource itself).
    """
    wanted = _canonical(resource)
    if wanted is None:
        raise InstrumentConnectionError(
            f"{owner}: {resource!r} is not a VISA resource name pyvisa-sim understands "
            "(e.g. USB0::0x1313::0x8078::P0000001::INSTR or ASRL1::INSTR)"
        )
    resources = dict(definition.get("resources") or {})
    if any(_canonical(name) == wanted for name in resources):
        return definition
    devices = list(definition["devices"])
    if len(devices) != 1:
        raise InstrumentConnectionError(
            f"{owner}: the simulated instruments list no resource {resource}; listed: "
            f"{sorted(resources)} (add it under 'resources' in the pyvisa-sim YAML)"
        )
    bound = copy.deepcopy(definition)
    bound["resources"] = {**resources, resource: {"device": devices[0]}}
    return bound


#: A serial resource named by its device path (Linux, macOS): pyvisa-py opens it, pyvisa-sim
#: cannot parse it.
_SERIAL_PATH = re.compile(r"ASRL/[^:]+::INSTR", re.IGNORECASE)


def _canonical(resource: str) -> str | None:
    try:
        return rname.to_canonical_name(resource)
    except rname.InvalidResourceName:
        return None  # pyvisa-sim reports the bad entry itself when it parses the file


class VisaSession:
    """One VISA resource, opened on demand, with short timeouts and errors that say what to do.

    Parameters:
        owner: the device name errors start with (e.g. "pm100-a").
        resource: the VISA resource name, e.g. `USB0::0x1313::0x8078::P0000001::INSTR` or
            `TCPIP::192.168.1.20::5025::SOCKET`.
        visa_library: the pyvisa backend, e.g. "@py" or "path.yaml@sim" (None: pyvisa's
            default). Not allowed together with `sim_definition`.
        sim_definition: a pyvisa-sim definition (a dict, see `load_sim_definition`): open a
            private simulated instrument instead of real hardware.
        timeout_ms: how long a query waits for its answer.
        termination: what ends a command and an answer (both ways).
    """

    def __init__(
        self,
        owner: str,
        resource: str,
        *,
        visa_library: str | None = None,
        sim_definition: dict[str, Any] | None = None,
        timeout_ms: int = 2000,
        termination: str = "\n",
    ) -> None:
        if sim_definition is not None and visa_library is not None:
            raise ValueError(
                f"{owner}: pass either sim=True or visa_library={visa_library!r}, not both"
            )
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise ValueError(f"{owner}: timeout_ms must be a positive int, got {timeout_ms!r}")
        self.owner = owner
        self.resource = resource
        self.visa_library = visa_library
        self.sim_definition = sim_definition
        self.timeout_ms = timeout_ms
        self.termination = termination
        self._manager: pyvisa.ResourceManager | None = None
        self._instrument: Any = None

    @property
    def is_open(self) -> bool:
        return self._instrument is not None

    def _opened_name(self) -> str:
        """The name opened: the resource, or in simulation a stand-in pyvisa-sim can parse for
        a serial port named by its device path (`ASRL/dev/ttyUSB0::INSTR` -> `ASRL1::INSTR`)."""
        if self.sim_definition is not None and _SERIAL_PATH.fullmatch(self.resource):
            return "ASRL1::INSTR"
        return self.resource

    def open(self) -> None:
        """Open the resource; InstrumentConnectionError says what is missing when it fails."""
        if self._instrument is not None:
            return
        manager = self._resource_manager()
        try:
            instrument = manager.open_resource(self._opened_name(), open_timeout=self.timeout_ms)
        except VisaIOError as exc:
            self._close_private_manager(manager)
            if exc.error_code == constants.StatusCode.error_resource_not_found:
                raise self._not_found() from None
            raise InstrumentConnectionError(
                f"{self.owner}: cannot open VISA resource {self.resource}: {exc.description} "
                f"({connection_hint(self.resource)})"
            ) from None
        except (ValueError, OSError) as exc:  # pyvisa-py: a missing interface module, a bad name
            self._close_private_manager(manager)
            reason = " ".join(str(exc).split())  # pyvisa-py's install hints span lines
            raise InstrumentConnectionError(
                f"{self.owner}: cannot open VISA resource {self.resource}: {reason} "
                f"({connection_hint(self.resource)})"
            ) from None
        if not getattr(instrument, "session", None):
            # pyvisa-sim "opens" a resource its YAML does not list and answers nothing on it
            self._close_private_manager(manager)
            raise self._not_found()
        instrument.timeout = self.timeout_ms
        instrument.read_termination = self.termination
        instrument.write_termination = self.termination
        self._manager = manager
        self._instrument = instrument

    def close(self) -> None:
        """Close the resource; safe after a failed or partial open and when already closed."""
        instrument, self._instrument = self._instrument, None
        manager, self._manager = self._manager, None
        if instrument is not None:
            try:
                instrument.close()
            except Exception as exc:  # unplugged meanwhile: closing must still succeed
                log.info("%s: closing %s: %s", self.owner, self.resource, exc)
        if manager is not None:
            self._close_private_manager(manager)

    def write(self, command: str) -> None:
        """Send a command that has no answer."""
        instrument = self._require_open(command)
        try:
            instrument.write(command)
        except (VisaIOError, OSError) as exc:
            raise self._io_error(command, exc) from None

    def query(self, command: str) -> str:
        """Send a query and return its answer without the termination and surrounding blanks."""
        instrument = self._require_open(command)
        try:
            return instrument.query(command).strip()
        except VisaIOError as exc:
            if exc.error_code != constants.StatusCode.error_timeout:
                raise self._io_error(command, exc) from None
            self._discard_late_answer()
            raise InstrumentTimeoutError(
                f"{self.owner}: no answer from {self.resource} to {command!r} within "
                f"{self.timeout_ms} ms (is the instrument on and does it know {command!r}? "
                "if it is only slow, raise timeout_ms)",
                command=command,
                resource=self.resource,
            ) from None
        except UnicodeDecodeError as exc:
            self._discard_late_answer()
            raise InstrumentReplyError(
                f"{self.owner}: the answer of {self.resource} to {command!r} is not text: "
                f"{exc.object!r} (a baud rate or termination mismatch?)",
                command=command,
                reply=repr(exc.object),
            ) from None
        except OSError as exc:
            raise self._io_error(command, exc) from None

    # ---- internals --------------------------------------------------------------------------
    def _resource_manager(self) -> pyvisa.ResourceManager:
        if self.sim_definition is None:
            try:
                return pyvisa.ResourceManager(self.visa_library or "")
            except (ValueError, OSError) as exc:
                raise InstrumentConnectionError(
                    f"{self.owner}: cannot load the VISA library "
                    f"{self.visa_library or '(pyvisa default)'}: {exc} (install pyvisa-py or "
                    "NI-VISA; for a simulated instrument pass sim=True)"
                ) from None
        definition = _sim_definition_for(self.owner, self.sim_definition, self._opened_name())
        fd, path = tempfile.mkstemp(prefix="labmesh-sim-", suffix=".yaml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                yaml.safe_dump(definition, out, sort_keys=False)
            # pyvisa-sim parses the file here; the copy is not needed afterwards
            return pyvisa.ResourceManager(f"{path}@sim")
        except Exception as exc:
            raise InstrumentConnectionError(
                f"{self.owner}: cannot start the simulated instrument: {exc} "
                "(is pyvisa-sim installed? pip install 'labmesh[sim]')"
            ) from None
        finally:
            os.unlink(path)

    def _close_private_manager(self, manager: pyvisa.ResourceManager) -> None:
        # A real backend's ResourceManager is one object shared by every session in the
        # process; only a simulated instrument's own manager may be closed.
        if self.sim_definition is not None:
            manager.close()

    def _require_open(self, command: str) -> Any:
        if self._instrument is None:
            raise InstrumentConnectionError(
                f"{self.owner}: cannot send {command!r}: {self.resource} is not open "
                "(connect the device first: `with device:` or serve it with build_server)"
            )
        return self._instrument

    def _not_found(self) -> InstrumentConnectionError:
        return InstrumentConnectionError(
            f"{self.owner}: VISA resource {self.resource} not found "
            f"({connection_hint(self.resource)})",
            resource=self.resource,
        )

    def _io_error(self, command: str, exc: Exception) -> InstrumentConnectionError:
        reason = exc.description if isinstance(exc, VisaIOError) else str(exc)
        return InstrumentConnectionError(
            f"{self.owner}: sending {command!r} to {self.resource} failed: {reason} "
            f"({connection_hint(self.resource)})",
            command=command,
            resource=self.resource,
        )

    def _discard_late_answer(self) -> None:
        """Drop whatever the instrument still sends, so it cannot answer the next query."""
        try:
            self._instrument.clear()
        except (VisaIOError, NotImplementedError, OSError) as exc:  # pyvisa-sim has no clear
            log.debug("%s: clearing %s: %r", self.owner, self.resource, exc)


class VisaDevice(Device):
    """Base of drivers that talk SCPI to one VISA resource.

    Connect opens the resource and asks `identity_command` (so a silent instrument fails at
    start, not at the first request); every command sent with `send` is followed by one read of
    the error queue, so a refused setting raises InstrumentRefusedError instead of passing
    silently. Subclasses declare parameters and implement `_query_`/`_write_` with `send` and
    `ask`.

    Parameters:
        resource: the VISA resource name.
        name: the device's name in the lab.
        visa_library, sim_definition, timeout_ms: see `VisaSession`.
    """

    #: Asked at connect and by `identity`; None when the instrument has no identity query.
    identity_command: str | None = "*IDN?"
    #: The SCPI error queue; None when the instrument has none (writes are then unconfirmed).
    error_command: str | None = "SYST:ERR?"

    def __init__(
        self,
        resource: str,
        *,
        name: str | None = None,
        visa_library: str | None = None,
        sim_definition: dict[str, Any] | None = None,
        timeout_ms: int = 2000,
    ) -> None:
        super().__init__(name)
        if not isinstance(resource, str) or not resource.strip():
            raise ValueError(
                f"{self.name}: resource must be a VISA resource name such as "
                f"USB0::0x1313::0x8078::P0000001::INSTR, got {resource!r}"
            )
        self.resource = resource.strip()
        self.session = VisaSession(
            self.name,
            self.resource,
            visa_library=visa_library,
            sim_definition=sim_definition,
            timeout_ms=timeout_ms,
        )

    def connect(self) -> None:
        self.session.open()
        try:
            if self.identity_command:
                log.info("%s: connected to %s", self.name, self.ask(self.identity_command))
        except BaseException:
            self.session.close()
            raise

    def disconnect(self) -> None:
        self.session.close()

    def ask(self, command: str) -> str:
        """Send a query and return the instrument's answer (stripped)."""
        return self.session.query(command)

    def send(self, command: str) -> None:
        """Send a command; raise InstrumentRefusedError if the instrument queues an error."""
        self.session.write(command)
        if not self.error_command:
            return
        entry = self.ask(self.error_command)
        if error_code(self.name, self.error_command, entry) != 0:
            later = self.check_errors()
            more = f" (then: {'; '.join(later)})" if later else ""
            raise InstrumentRefusedError(
                f"{self.name}: {self.resource} refused {command!r}: {entry}{more}; check the "
                "value against the instrument's state and manual",
                command=command,
                errors=[entry, *later],
            )

    @operation(idempotent=True)
    def identity(self) -> str:
        """The instrument's answer to its identity query (`*IDN?`)."""
        if not self.identity_command:
            return super().identity()
        return self.ask(self.identity_command)

    @operation(idempotent=True)
    def check_errors(self) -> list[str]:
        """Empty the instrument's error queue and return its entries (empty list when none)."""
        if not self.error_command:
            return []
        errors: list[str] = []
        for _ in range(MAX_QUEUED_ERRORS):
            entry = self.ask(self.error_command)
            if error_code(self.name, self.error_command, entry) == 0:
                return errors
            errors.append(entry)
        log.warning(
            "%s: %s still reports errors after %d reads; returning those",
            self.name,
            self.error_command,
            MAX_QUEUED_ERRORS,
        )
        return errors

    @operation(idempotent=True)
    def check_operatability(self) -> bool:
        """True when the resource is open and the instrument answers its identity query."""
        if not self.session.is_open:
            return False
        if not self.identity_command:
            return True
        try:
            self.ask(self.identity_command)
        except (InstrumentTimeoutError, InstrumentConnectionError, InstrumentReplyError) as exc:
            log.warning("%s: not operational: %s", self.name, exc)
            return False
        return True


#: USB vendor ids of instrument makers (USBTMC), for `labmesh visa list`.
USB_VENDORS = {
    0x0699: "Tektronix",
    0x0957: "Keysight (Agilent)",
    0x0AAD: "Rohde & Schwarz",
    0x1313: "Thorlabs",
    0x164E: "Siglent",
    0x1AB1: "Rigol",
    0x2A8D: "Keysight",
    0x3923: "National Instruments",
    0x05E6: "Keithley",
    0x0B21: "Yokogawa",
    0x1FFB: "Pololu",
    0xF4EC: "Siglent",
}
#: Thorlabs product ids seen on the bench.
USB_PRODUCTS = {
    (0x1313, 0x8070): "PM100D (DFU)",
    (0x1313, 0x8072): "PM100USB",
    (0x1313, 0x8078): "PM100D",
    (0x1313, 0x8079): "PM100A",
    (0x1313, 0x807B): "PM400",
}


def list_resources(
    library: str = "@py", *, tcpip: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """The instruments this PC sees: [{resource, kind, vendor, product, serial}], and notes on
    what could not be searched (libusb missing, ...).

    USB (USBTMC) devices are read through pyusb and serial ports through pyserial, which send
    nothing anywhere; only `tcpip` asks pyvisa-py to search the network (a VXI-11 broadcast on
    the LAN and HiSLIP over zeroconf). A `...@sim` library lists its simulated resources.
    """
    if library.endswith("@sim"):
        manager = pyvisa.ResourceManager(library)
        try:
            return [_describe(r) for r in manager.list_resources("?*")], []
        finally:
            manager.close()
    notes: list[str] = []
    rows = [_describe(r) for r in _usb_resources(notes)]
    rows += _serial_resources(notes)
    if tcpip:
        manager = pyvisa.ResourceManager(library)
        try:
            rows += [_describe(r) for r in manager.list_resources("TCPIP?*")]
        except Exception as exc:
            notes.append(f"TCPIP: {exc}")
        finally:
            manager.close()
    return rows, notes


#: USB interface class and subclass of USBTMC (test and measurement) instruments.
_USBTMC = (0xFE, 0x03)


def _usb_resources(notes: list[str]) -> list[str]:
    try:
        import usb.core
    except ImportError:
        notes.append("USB: pyusb is not installed (pip install pyusb)")
        return []
    try:
        devices = list(usb.core.find(find_all=True))
    except Exception as exc:
        notes.append(
            f"USB: {exc}: libusb is missing (Debian: apt install libusb-1.0-0), so USB "
            "instruments cannot be listed or opened"
        )
        return []
    found = []
    for dev in devices:
        try:
            tmc = any(
                (i.bInterfaceClass, i.bInterfaceSubClass) == _USBTMC for cfg in dev for i in cfg
            )
        except Exception:
            tmc = dev.idVendor in USB_VENDORS
        if not tmc:
            continue
        try:
            serial = dev.serial_number
        except Exception:
            serial = None
            notes.append(
                f"USB 0x{dev.idVendor:04x}:0x{dev.idProduct:04x}: no permission to read it; "
                "add a udev rule (docs/troubleshooting.md) or run as a member of its group"
            )
        found.append(f"USB0::0x{dev.idVendor:04X}::0x{dev.idProduct:04X}::{serial or '?'}::INSTR")
    return found


def _serial_resources(notes: list[str]) -> list[dict[str, Any]]:
    try:
        from serial.tools import list_ports
    except ImportError:
        notes.append("serial: pyserial is not installed (pip install pyserial)")
        return []
    rows = []
    for port in list_ports.comports():
        row: dict[str, Any] = {"resource": f"ASRL{port.device}::INSTR", "kind": "ASRL"}
        if port.vid is not None and port.pid is not None:
            row["vendor"] = USB_VENDORS.get(port.vid, f"vendor 0x{port.vid:04x}")
            row["product"] = port.product or port.description or f"product 0x{port.pid:04x}"
            row["serial"] = port.serial_number
        rows.append(row)
    return rows


def _describe(resource: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "resource": resource,
        "kind": resource.split("::")[0].rstrip("0123456789"),
    }
    try:
        parsed = rname.parse_resource_name(resource)
    except Exception:
        return row
    vendor = getattr(parsed, "manufacturer_id", None)
    product = getattr(parsed, "model_code", None)
    if vendor is not None and product is not None:
        vid, pid = int(str(vendor), 0), int(str(product), 0)
        row["vendor"] = USB_VENDORS.get(vid, f"vendor 0x{vid:04x}")
        row["product"] = USB_PRODUCTS.get((vid, pid), f"product 0x{pid:04x}")
        serial = getattr(parsed, "serial_number", None)
        row["serial"] = None if serial in (None, "?") else serial
    return row
