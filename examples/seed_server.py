"""The seed's server example with labmesh imports: an in-memory power meter on port 5555.

Run it, then connect with `build_client("tcp://127.0.0.1:5555")`. Ctrl+C stops it cleanly.
Pass another address as the first argument, e.g. `tcp://127.0.0.1:0` for any free port.
"""

import asyncio
import random
import sys

from labmesh import Device, Parameter, build_server, operation


class InMemoryPowermeter(Device):
    """A power meter without hardware: WAVELENGTH is kept, POWER is a noisy reading."""

    kind = "powermeter"

    WAVELENGTH = Parameter(float, unit="nm", min=400, max=1100, description="correction line")
    POWER = Parameter(float, unit="W", read_only=True, description="measured optical power")

    def __init__(self, name: str = "pm100-demo") -> None:
        super().__init__(name)
        self.wavelength = 532.0
        self.offset = 0.0

    def _query_(self, name: str) -> float:
        if name == "WAVELENGTH":
            return self.wavelength
        return 1.0e-3 * (1 + random.gauss(0, 0.01)) - self.offset

    def _write_(self, name: str, value: float) -> bool:
        self.wavelength = value
        return True

    @operation(budget_s=5)
    def zero(self) -> float:
        """Zero the sensor against the current (dark) reading; returns the offset in W."""
        self.offset = 1.0e-3
        return self.offset


async def main(address: str) -> None:
    server = build_server(InMemoryPowermeter(), fixed_threading=True, address=address)
    print(f"serving {server.name} on {server.address}", flush=True)
    await server.run()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"))
    except KeyboardInterrupt:
        print("stopped", flush=True)
