"""NI-DAQmx cards as labmesh devices: digital lines, analog inputs and analog outputs.

Every configured physical channel is a lockable resource, laid out as a tree under the card's
name (`{"Dev1": {"port0": ["line0", "line1"], "ai0": None, "ao0": None}}`), so two experiments
can each lock their own lines of one card. The driver talks to the card only through a
`DaqBackend`: `NidaqmxBackend` for a real card, `SimulatedCard` for tests and demos.
"""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from labmesh.device import Device, Parameter, operation
from labmesh.locks import normalize_path
from labmesh.protocol.errors import LabmeshError

#: What to do when the NI driver is missing (nidaqmx itself imports without it).
NO_DRIVER = "NI-DAQmx driver not installed on this host (install NI-DAQmx, or run with sim: true)"
#: Most samples one `read_ai` returns (software-timed, one request).
MAX_SAMPLES = 100_000

#: kind -> (what users call it, the channel name pattern without the card, an example)
_KINDS: dict[str, tuple[str, re.Pattern[str], str]] = {
    "line": ("digital line", re.compile(r"port\d+/line\d+"), "port0/line3"),
    "ai": ("analog input", re.compile(r"ai\d+"), "ai0"),
    "ao": ("analog output", re.compile(r"ao\d+"), "ao0"),
}
_RANGE = re.compile(r"(?P<stem>.*\D)(?P<first>\d+):(?P<last>\d+)")
#: Operations that write a channel, by the argument that names it and the channel kind.
_CHANNEL_ARGUMENT = {"write_line": ("line", "line"), "write_ao": ("channel", "ao")}
#: Inherited operations that only read; the base class declares no resources for them, which
#: would make them wait for every lock on the card.
_LOCK_FREE = frozenset({"check_errors", "check_operatability"})


class DaqDriverMissingError(LabmeshError, RuntimeError):
    """NI-DAQmx, the NI driver the nidaqmx package calls into, is not installed on this host."""

    wire_type = "DaqDriverMissingError"


class DaqHardwareError(LabmeshError, RuntimeError):
    """NI-DAQmx reported an error for a card or channel (`details["error_code"]`: its status)."""

    wire_type = "DaqHardwareError"


@dataclass(frozen=True)
class CardInfo:
    """What a backend found when it opened a card.

    Attributes:
        product_type: the card's model, e.g. "USB-6001".
        channels: the card's physical channels by kind ("line", "ai", "ao"), full names; None
            when the backend has any channel it is asked for (a simulator).
    """

    product_type: str
    channels: Mapping[str, Iterable[str]] | None = None


class DaqBackend(Protocol):
    """What `NIDaqDevice` needs from a card. Channels are full NI-DAQmx names (`Dev1/ai0`).

    Calls come from one thread at a time. `volts` is the (min, max) range the channel is
    configured for; a backend may use it to pick the card's gain.
    """

    def open(self, device: str) -> CardInfo:
        """Find the card; raise an error saying what is wrong if it cannot be used."""
        ...

    def close(self) -> None:
        """Release the card; safe after a failed or partial open."""
        ...

    def write_line(self, line: str, value: bool) -> None: ...

    def read_line(self, line: str) -> bool: ...

    def read_ai(self, channel: str, samples: int, volts: tuple[float, float]) -> list[float]: ...

    def write_ao(self, channel: str, value: float, volts: tuple[float, float]) -> None: ...


@contextmanager
def _daqmx(what: str) -> Iterator[Any]:
    """The nidaqmx module, with its errors turned into ones that name `what` and the fix."""
    import nidaqmx  # imported on first use: it takes about half a second and sim never needs it

    try:
        yield nidaqmx
    except nidaqmx.errors.DaqNotFoundError:
        raise DaqDriverMissingError(f"{what}: {NO_DRIVER}") from None
    except nidaqmx.errors.DaqError as exc:
        message = str(exc).split("\n\n", 1)[0].strip()
        raise DaqHardwareError(
            f"{what}: NI-DAQmx error {exc.error_code}: {message}", error_code=exc.error_code
        ) from exc
    except nidaqmx.errors.Error as exc:
        raise DaqHardwareError(f"{what}: nidaqmx failed: {exc}") from exc


class NidaqmxBackend:
    """A real card through the nidaqmx package, with one short-lived Task per operation.

    Nothing stays reserved between calls, so NI MAX test panels or other programs can use the
    card's other channels; each call costs a few milliseconds of task set-up. NI cards keep a
    digital line's and an analog output's last value after the task that wrote it is cleared.
    """

    def __init__(self) -> None:
        self._driven: set[str] = set()

    def open(self, device: str) -> CardInfo:
        with _daqmx(device) as daqmx:
            names = list(daqmx.system.System.local().devices.device_names)
            if device not in names:
                raise DaqHardwareError(
                    f"{device}: no such NI-DAQmx device on this host; devices here: {names} "
                    "(check the name in NI MAX, and that the card is plugged in)"
                )
            card = daqmx.system.Device(device)
            lines = [*card.do_lines.channel_names, *card.di_lines.channel_names]
            return CardInfo(
                card.product_type,
                {
                    "line": lines,
                    "ai": card.ai_physical_chans.channel_names,
                    "ao": card.ao_physical_chans.channel_names,
                },
            )

    def close(self) -> None:
        self._driven.clear()

    def write_line(self, line: str, value: bool) -> None:
        with _daqmx(line) as daqmx, daqmx.Task() as task:
            task.do_channels.add_do_chan(
                line, line_grouping=daqmx.constants.LineGrouping.CHAN_PER_LINE
            )
            task.write(value)
        self._driven.add(line)

    def read_line(self, line: str) -> bool:
        with _daqmx(line) as daqmx, daqmx.Task() as task:
            # A line this driver drives is read back through an output task: an input task
            # would switch the line to input and stop driving it.
            channels = task.do_channels if line in self._driven else task.di_channels
            add = channels.add_do_chan if line in self._driven else channels.add_di_chan
            add(line, line_grouping=daqmx.constants.LineGrouping.CHAN_PER_LINE)
            return bool(task.read())

    def read_ai(self, channel: str, samples: int, volts: tuple[float, float]) -> list[float]:
        with _daqmx(channel) as daqmx, daqmx.Task() as task:
            task.ai_channels.add_ai_voltage_chan(channel, min_val=volts[0], max_val=volts[1])
            return [float(v) for v in task.read(number_of_samples_per_channel=samples)]

    def write_ao(self, channel: str, value: float, volts: tuple[float, float]) -> None:
        with _daqmx(channel) as daqmx, daqmx.Task() as task:
            task.ao_channels.add_ao_voltage_chan(channel, min_val=volts[0], max_val=volts[1])
            task.write(value)


class SimulatedCard:
    """A card in memory: lines hold what was written, outputs hold their last value, and an
    analog input reads noise around 0 V, or around the output it is looped back to.

    Parameters:
        loopback: analog input -> analog output wired together, e.g. `{"Dev1/ai0": "Dev1/ao0"}`.
        noise_v: standard deviation of the noise on every analog input sample, in volts.
        seed: seeds the noise, for reproducible readings.
    """

    product_type = "Simulated NI-DAQ (labmesh)"

    def __init__(
        self,
        *,
        loopback: Mapping[str, str] | None = None,
        noise_v: float = 0.002,
        seed: int | None = None,
    ) -> None:
        self.loopback = dict(loopback or {})
        self.noise_v = noise_v
        self.lines: dict[str, bool] = {}
        self.outputs: dict[str, float] = {}
        self._rng = random.Random(seed)

    def open(self, device: str) -> CardInfo:
        return CardInfo(self.product_type)

    def close(self) -> None:
        """Nothing to release."""

    def write_line(self, line: str, value: bool) -> None:
        self.lines[line] = value

    def read_line(self, line: str) -> bool:
        return self.lines.get(line, False)

    def read_ai(self, channel: str, samples: int, volts: tuple[float, float]) -> list[float]:
        source = self.loopback.get(channel)
        level = self.outputs.get(source, 0.0) if source is not None else 0.0
        low, high = volts
        return [
            min(high, max(low, level + self._rng.gauss(0.0, self.noise_v))) for _ in range(samples)
        ]

    def write_ao(self, channel: str, value: float, volts: tuple[float, float]) -> None:
        self.outputs[channel] = value


def expand_channels(device: str, specs: str | Iterable[str], kind: str) -> list[str]:
    """Full NI-DAQmx channel names from specs such as `"port0/line0:7"`, `"ai2"`, `"Dev1/ao0"`.

    `kind` is "line", "ai" or "ao". A range `first:last` counts up or down; the card's name in
    front is optional. Raises ValueError naming a spec that is not a channel of that kind.
    """
    word, pattern, example = _KINDS[kind]
    found: list[str] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        text = normalize_path(spec)
        if text.startswith(f"{device}/"):
            text = text[len(device) + 1 :]
        match = _RANGE.fullmatch(text)
        if match:
            first, last = int(match["first"]), int(match["last"])
            step = 1 if last >= first else -1
            names = [f"{match['stem']}{i}" for i in range(first, last + step, step)]
        else:
            names = [text]
        for channel in names:
            if not pattern.fullmatch(channel):
                raise ValueError(
                    f"{spec!r} does not name {word}s of {device}; write it like {example!r} or "
                    f"'{device}/{example}' (a range: '{example}:7')"
                )
            if f"{device}/{channel}" not in found:
                found.append(f"{device}/{channel}")
    return found


def _volts_range(value: Any, what: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (min, max) in volts, got {value!r}") from None
    if not low < high:
        raise ValueError(f"{what} must be (min, max) with min < max, got {value!r}")
    return low, high


class NIDaqDevice(Device):
    """An NI-DAQmx card: digital lines (read, write), analog inputs (read), analog outputs
    (write).

    Channels are named as NI-DAQmx names them (`Dev1/port0/line3`, `Dev1/ai0`, `Dev1/ao1`);
    operations also take them without the card's name (`port0/line3`). Each configured channel
    is a lockable resource and a parameter of the same name (a line: bool; an analog input:
    read-only float, one sample; an analog output: float limited to `ao_range`, whose query
    gives the last value written through this driver, None before the first write). Writing a
    line or an output touches exactly that channel; reads touch nothing.

    Parameters:
        device: the card's name in NI-DAQmx (as NI MAX shows it); default "Dev1".
        lines: digital lines, e.g. `["port0/line0:7"]` or `["port0/line0", "port1/line2"]`.
        ai: analog inputs, e.g. `["ai0:3"]`.
        ao: analog outputs, e.g. `["ao0", "ao1"]`.
        ai_range: (min, max) volts the analog inputs are read with.
        ao_range: (min, max) volts the analog outputs accept; writes outside are refused.
        sim: use a `SimulatedCard` (no card, no NI driver needed); its analog input aiN is
            looped back to the analog output aoN when both are configured. Wins over `backend`,
            so `labmesh serve --sim` simulates every card.
        name: the device's name in the lab (default "NIDaqDevice").
        backend: the `DaqBackend` to use when not simulating (default `NidaqmxBackend()`).
        resource: what the lab YAML's `resource:` passes; another name for `device`.
    """

    kind = "daq"

    def __init__(
        self,
        device: str | None = None,
        *,
        lines: str | Iterable[str] = ("port0/line0:7",),
        ai: str | Iterable[str] = (),
        ao: str | Iterable[str] = (),
        ai_range: tuple[float, float] = (-10.0, 10.0),
        ao_range: tuple[float, float] = (-10.0, 10.0),
        sim: bool = False,
        name: str | None = None,
        backend: DaqBackend | None = None,
        resource: str | None = None,
    ) -> None:
        if device is not None and resource is not None and device != resource:
            raise ValueError(
                f"device={device!r} and resource={resource!r} both name the card; give one"
            )
        device = device or resource or "Dev1"
        if not isinstance(device, str) or not device or "/" in device:
            raise ValueError(f"device must be a card name such as 'Dev1', got {device!r}")
        self.card = device
        self.ai_range = _volts_range(ai_range, "ai_range")
        self.ao_range = _volts_range(ao_range, "ao_range")
        self._channels = {
            "line": expand_channels(device, lines, "line"),
            "ai": expand_channels(device, ai, "ai"),
            "ao": expand_channels(device, ao, "ao"),
        }
        if not any(self._channels.values()):
            raise ValueError(f"{name or device}: no channels configured; give lines=, ai= or ao=")
        tree: dict[str, Any] = {}
        for path in self._channels["line"]:
            _, port, line = path.split("/")
            tree.setdefault(port, []).append(line)
        for path in self._channels["ai"] + self._channels["ao"]:
            tree[path.split("/")[1]] = None
        super().__init__(name, resources={device: tree})
        if sim:
            pairs = {c.replace("/ai", "/ao"): c for c in self._channels["ai"]}
            backend = SimulatedCard(
                loopback={pairs[o]: o for o in self._channels["ao"] if o in pairs}
            )
        self.backend: DaqBackend = backend if backend is not None else NidaqmxBackend()
        self.product_type: str | None = None
        self._kind_of = {c: kind for kind, chans in self._channels.items() for c in chans}
        self._ao_written: dict[str, float | None] = dict.fromkeys(self._channels["ao"])
        for path in self._channels["line"]:
            self.declare(Parameter(bool, description="digital line", resources=(path,), name=path))
        for path in self._channels["ai"]:
            self.declare(
                Parameter(float, unit="V", read_only=True, description="analog input", name=path)
            )
        low, high = self.ao_range
        for path in self._channels["ao"]:
            self.declare(
                Parameter(
                    float,
                    unit="V",
                    min=low,
                    max=high,
                    description="analog output (query: last value written through labmesh)",
                    resources=(path,),
                    name=path,
                )
            )

    # ---- lifecycle ------------------------------------------------------------------------
    def connect(self) -> None:
        card = self.backend.open(self.card)
        self._check_card(card)  # on failure, Device.__enter__ calls disconnect (closes backend)
        self.product_type = card.product_type

    def disconnect(self) -> None:
        self.backend.close()

    def _check_card(self, card: CardInfo) -> None:
        if card.channels is None:
            return
        has = {kind: list(card.channels.get(kind, ())) for kind in _KINDS}
        missing = [c for kind, chans in self._channels.items() for c in chans if c not in has[kind]]
        if missing:
            raise ValueError(
                f"{self.name}: {self.card} ({card.product_type}) has no channel(s) {missing}; "
                f"its lines: {has['line']}, analog inputs: {has['ai']}, analog outputs: "
                f"{has['ao']}; fix lines/ai/ao in the configuration"
            )

    # ---- channels -------------------------------------------------------------------------
    def _lookup(self, kind: str, channel: Any) -> str | None:
        """The full name of a configured channel of `kind`, with or without the card's name."""
        path = normalize_path(channel)
        if not path.startswith(f"{self.card}/"):
            path = f"{self.card}/{path}"
        return path if self._kind_of.get(path) == kind else None

    def _channel(self, kind: str, channel: Any) -> str:
        path = self._lookup(kind, channel)
        if path is None:
            word = _KINDS[kind][0]
            raise ValueError(
                f"{self.name}: {channel!r} is not a configured {word} of {self.card}; "
                f"configured: {self._channels[kind]}"
            )
        return path

    def touches(self, request_type: str, name: str, args: tuple, kwargs: dict) -> Any:
        """A line or output write touches exactly that channel (named in full or not)."""
        if request_type != "call":
            return NotImplemented
        if name in _LOCK_FREE:
            return ()
        if name not in _CHANNEL_ARGUMENT:
            return NotImplemented
        argument, kind = _CHANNEL_ARGUMENT[name]
        try:
            channel = inspect.signature(getattr(self, name)).bind(*args, **kwargs).arguments
        except TypeError:
            return ()  # the call fails with this TypeError before it touches the card
        path = self._lookup(kind, channel[argument])
        return () if path is None else (path,)  # an unknown channel is refused untouched

    # ---- parameter hooks ------------------------------------------------------------------
    def _query_(self, name: str) -> Any:
        kind = self._kind_of[name]
        if kind == "line":
            return self.backend.read_line(name)
        if kind == "ai":
            return self._read_ai(name, 1)[0]
        return self._ao_written[name]

    def _write_(self, name: str, value: Any) -> bool:
        if self._kind_of[name] == "line":
            self._write_line(name, value)
        else:
            self._write_ao(name, value)
        return True

    def _write_line(self, path: str, value: Any) -> bool:
        if not isinstance(value, bool) and value not in (0, 1):
            raise ValueError(f"{self.name}: {path} takes true or false (or 1/0), got {value!r}")
        self.backend.write_line(path, bool(value))
        return bool(value)

    def _read_ai(self, path: str, samples: Any) -> list[float]:
        if isinstance(samples, bool) or not isinstance(samples, int):
            raise ValueError(f"{self.name}: samples must be a whole number, got {samples!r}")
        if not 1 <= samples <= MAX_SAMPLES:
            raise ValueError(
                f"{self.name}: samples of {path} must be from 1 to {MAX_SAMPLES}, got {samples}"
                + (" (read in several calls for more)" if samples > MAX_SAMPLES else "")
            )
        return self.backend.read_ai(path, samples, self.ai_range)

    def _write_ao(self, path: str, volts: Any) -> float:
        low, high = self.ao_range
        if isinstance(volts, bool) or not isinstance(volts, (int, float)):
            raise ValueError(f"{self.name}: {path} takes a number of volts, got {volts!r}")
        if not (math.isfinite(volts) and low <= volts <= high):
            raise ValueError(
                f"{self.name}: {volts!r} V is outside the output range of {path} "
                f"[{low:g}, {high:g}] V (set by ao_range); write a value within it"
            )
        self.backend.write_ao(path, float(volts), self.ao_range)
        self._ao_written[path] = float(volts)
        return float(volts)

    # ---- operations -----------------------------------------------------------------------
    @operation(idempotent=True, resources=["{line}"])
    def write_line(self, line: str, value: bool) -> bool:
        """Drive a digital line high (true) or low (false); returns the value written."""
        return self._write_line(self._channel("line", line), value)

    @operation(idempotent=True, resources=(), read_only=True)
    def read_line(self, line: str) -> bool:
        """Read a digital line (a line this driver drives reads back its driven value)."""
        return self.backend.read_line(self._channel("line", line))

    @operation(budget_s=30, idempotent=True, resources=(), read_only=True)
    def read_ai(self, channel: str, samples: int = 1) -> float | list[float]:
        """Read an analog input in volts: one value, or a list of `samples` software-timed
        values."""
        values = self._read_ai(self._channel("ai", channel), samples)
        return values[0] if samples == 1 else values

    @operation(idempotent=True, resources=["{channel}"])
    def write_ao(self, channel: str, volts: float) -> float:
        """Set an analog output to `volts` (within ao_range); returns the value written."""
        return self._write_ao(self._channel("ao", channel), volts)

    @operation(idempotent=True, resources=(), read_only=True)
    def channels(self) -> dict[str, list[str]]:
        """The configured channels: {"lines": [...], "ai": [...], "ao": [...]}."""
        return {
            "lines": list(self._channels["line"]),
            "ai": list(self._channels["ai"]),
            "ao": list(self._channels["ao"]),
        }

    @operation(idempotent=True, resources=(), read_only=True)
    def identity(self) -> str:
        """NI-DAQmx,<product type>,<card>,<name> (the product type once connected)."""
        return f"NI-DAQmx,{self.product_type or 'not connected'},{self.card},{self.name}"
