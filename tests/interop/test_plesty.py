"""labmesh against the real PLESTY (plesty_lib 0.6.0 from PyPI), in both directions.

- the real PLESTY client drives a labmesh server (and both servers grant resources alike);
- labmesh's client drives the real PLESTY server;
- a PLESTY-README-style server program written with labmesh imports serves both clients and
  stops cleanly on Ctrl+C.

The PLESTY side runs in its own virtualenv (see conftest.py and scripts/interop_env.py).
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import labmesh
from labmesh import Device, Parameter, RemoteError, build_client, build_server, operation

pytestmark = pytest.mark.interop

RESOURCE_TREE = {"Dev1": {"port0": ["line0", "line1"]}}
LINE0 = "Dev1/port0/line0"
#: How long a Ctrl+C'ed server may take to exit.
SIGINT_EXIT_S = 2.0


class BenchLaser(Device):
    """An in-memory laser for the interop tests."""

    kind = "laser"
    resources = RESOURCE_TREE
    WAVELENGTH = Parameter(float, unit="nm", min=400, max=1100, description="emission")
    POWER = Parameter(float, unit="W", read_only=True, description="measured output")

    def __init__(self) -> None:
        super().__init__("bench-laser")
        self.values: dict[str, float] = {"WAVELENGTH": 633.0, "POWER": 0.002}
        self.total_shots = 0

    def _query_(self, name: str) -> float:
        return self.values[name]

    def _write_(self, name: str, value: Any) -> bool:
        self.values[name] = value
        return True

    @operation(budget_s=2)
    def fire(self, shots: int = 1, resources: Any = None) -> dict[str, Any]:
        """Fire `shots` pulses; reports the running total and the caller's resources."""
        self.total_shots += int(shots)
        return {"shots": int(shots), "total": self.total_shots, "resources": resources}


@pytest.fixture
def labmesh_server() -> Iterator[Any]:
    """A labmesh server in this process on 127.0.0.1, on a port the OS picked (port 0)."""
    device = BenchLaser()
    server = build_server(device, address="tcp://127.0.0.1:0")
    assert server.address.startswith("tcp://127.0.0.1:"), server.address
    assert int(server.address.rsplit(":", 1)[1]) > 0
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.running


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ok(result: dict[str, Any], step: str) -> Any:
    outcome = result.get(step)
    assert outcome is not None, f"step {step!r} did not run: {json.dumps(result, indent=1)}"
    assert outcome["ok"], f"step {step!r} raised {outcome['raised']}: {outcome['message']}"
    return outcome["value"]


def _raised(result: dict[str, Any], step: str) -> tuple[str, str]:
    outcome = result.get(step)
    assert outcome is not None, f"step {step!r} did not run: {json.dumps(result, indent=1)}"
    assert not outcome["ok"], f"step {step!r} should have raised, returned {outcome['value']!r}"
    return outcome["raised"], outcome["message"]


# ---- (a) the real PLESTY client against a labmesh server -------------------------------------
def test_plesty_client_drives_labmesh_server(
    labmesh_server: Any, plesty_client: Callable[..., dict[str, Any]]
) -> None:
    device: BenchLaser = labmesh_server.device
    result = plesty_client(
        labmesh_server.address,
        "--resources",
        json.dumps([LINE0]),
        "--client-id",
        "plesty-a",
        "--connect-kwargs",
        json.dumps({"name": "interop-a"}),
        "--param",
        "WAVELENGTH",
        "--value",
        "800",
        "--bad-value",
        "2000",
        "--op",
        "fire",
        "--op-args",
        "[3]",
        "--contend",
    )

    # connect: PLESTY's client keeps connection_info = the connect result
    info = _ok(result, "connect")
    assert info["client_id"] == "plesty-a"  # the DEALER identity it set
    assert info["resources"] == [LINE0]
    assert info["metadata"] == {"name": "interop-a"}

    described = _ok(result, "describe")
    assert {"fire", "identity", "check_errors", "check_operatability"} <= set(described["methods"])
    assert described["budgets"]["fire"] == 2.0
    params = {p["name"]: p for p in described["doc"]["parameters"]["default"]}
    assert params["WAVELENGTH"]["unit"] == "nm"
    assert (params["WAVELENGTH"]["min_value"], params["WAVELENGTH"]["max_value"]) == (400, 1100)

    assert _ok(result, "query") == 633.0
    assert _ok(result, "write") is True
    assert _ok(result, "query_after") == 800.0
    assert device.values["WAVELENGTH"] == 800.0  # it reached the device, not only a cache

    # the describe-bound proxy works, and the server hands the caller's lock to the operation
    assert result["op_bound"] is True
    assert _ok(result, "call") == {"shots": 3, "total": 3, "resources": [LINE0]}
    assert device.total_shots == 3

    # a refused write: PLESTY's client raises RuntimeError("<type>: <message>")
    raised, message = _raised(result, "bad_write")
    assert raised == "RuntimeError"
    assert message.startswith("ValueError: "), message
    assert "WAVELENGTH" in message and "2000" in message, message
    assert device.values["WAVELENGTH"] == 800.0

    # a second PLESTY client asking for the held line is refused the way PLESTY refuses
    raised, message = _raised(result, "contender")
    assert raised == "RuntimeError"
    assert message.startswith("ResourceAllocationError"), message

    assert _ok(result, "disconnect") == {"client_id": "plesty-a"}
    _ok(result, "close")

    # after the first disconnected, the second gets the line
    after = _ok(result, "contender_after")
    assert after["client_id"] == "plesty-a-contender"
    assert after["resources"] == [LINE0]
    _ok(result, "contender_close")

    # and nothing is left held on the server
    with build_client(labmesh_server.address, timeout=3000) as observer:
        assert observer.locks()["holders"] == []


def test_plesty_client_on_a_secured_hosts_plaintext_observer_listener(
    plesty_client: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """PLESTY cannot do CURVE: a secured labmesh server gives its plaintext listener exactly
    the role the host file says (observer here): reads work, writes and calls are refused with
    PLESTY's own error shape, and nothing reaches the device."""
    from labmesh.keys import new_key_pair
    from labmesh.security import Keyring, ServerSecurity, load_key_pair

    new_key_pair(tmp_path, "host")
    security = ServerSecurity(
        load_key_pair("host", tmp_path), Keyring(), {}, "observer", "tcp://127.0.0.1:0"
    )
    device = BenchLaser()
    server = build_server(device, address="tcp://127.0.0.1:0", security=security).start()
    try:
        common = ["--param", "WAVELENGTH", "--value", "800", "--bad-value", "2000"]
        result = plesty_client(
            server.plaintext_address, *common, "--op", "fire", "--op-args", "[3]"
        )
        _ok(result, "connect")
        assert "fire" in _ok(result, "describe")["methods"]
        assert _ok(result, "query") == 633.0
        raised, message = _raised(result, "write")
        assert raised == "RuntimeError" and message.startswith("PermissionError: "), message
        assert "needs role operator" in message
        assert _ok(result, "query_after") == 633.0
        raised, message = _raised(result, "call")
        assert message.startswith("PermissionError: "), message
        assert device.values["WAVELENGTH"] == 633.0 and device.total_shots == 0
        locked = plesty_client(
            server.plaintext_address,
            *common,
            "--resources",
            json.dumps([LINE0]),
            "--op",
            "fire",
            "--connect-only",
        )
        raised, message = _raised(locked, "connect")
        assert message.startswith("PermissionError: ") and "needs role operator" in message
        # the CurveZMQ endpoint does not talk to a plaintext client at all
        silent = plesty_client(server.address, *common, "--op", "fire", "--timeout-ms", "800")
        assert _raised(silent, "connect")[0] in ("TimeoutError", "RuntimeError")
    finally:
        server.stop()


def test_plesty_and_labmesh_servers_grant_resources_alike(
    labmesh_server: Any, plesty_server: Any, plesty_client: Callable[..., dict[str, Any]]
) -> None:
    """The same resource requests against both servers (same tree) get the same answers."""
    specs: list[Any] = [
        [],
        LINE0,
        "Dev1/port0",
        ["Dev1/port0/line1"],
        {"Dev1": {"port0": ["line0"]}},
        {"Dev1": {"port0": None}},
        "Dev9/port0",
    ]
    for spec in specs:
        outcomes = {}
        for name, address in (
            ("plesty", plesty_server.address),
            ("labmesh", labmesh_server.address),
        ):
            result = plesty_client(
                address,
                "--resources",
                json.dumps(spec),
                "--connect-only",
                "--client-id",
                f"diff-{name}",
            )
            connect = result["connect"]
            if connect["ok"]:
                _ok(result, "close")
                outcomes[name] = ("granted", connect["value"]["resources"])
            else:
                outcomes[name] = (connect["raised"], connect["message"].split(":", 1)[0])
        assert outcomes["labmesh"] == outcomes["plesty"], f"resources={spec!r}: {outcomes}"
    assert outcomes["plesty"] == ("RuntimeError", "ResourceAllocationError")  # the unknown one


# ---- (b) labmesh's client against the real PLESTY server -------------------------------------
def test_labmesh_client_drives_plesty_server(plesty_server: Any) -> None:
    address = plesty_server.address
    assert address == f"tcp://127.0.0.1:{plesty_server.port}"
    client = build_client(address, timeout=3000, resources=[LINE0], client_id="labmesh-b")
    try:
        info = client.connection_info
        assert info is not None
        assert info["client_id"] == "labmesh-b"
        assert info["resources"] == [LINE0]

        described = client.describe()
        assert described["methods"] == ["fire", "identity", "query", "write"]
        assert described["budgets"] == {"fire": 2.0}

        assert client.query("WAVELENGTH") == 633.0
        assert client.write("WAVELENGTH", 720) is True
        assert client.query("WAVELENGTH") == 720.0

        # operations listed by describe are bound as methods; PLESTY passes the caller's lock
        assert client.fire(2) == {"shots": 2, "total": 2, "resources": [LINE0]}
        assert client.call("fire", shots=1)["total"] == 3
        assert client.identity() == "PLESTY-peer,PeerLaser,0,plesty_lib-0.6.0"

        # PLESTY's error replies become RemoteError subclasses named by the wire type
        with pytest.raises(ValueError, match="WAVELENGTH") as bad:
            client.write("WAVELENGTH", 2000)
        assert isinstance(bad.value, RemoteError)
        assert type(bad.value).__name__ == "ValueError"
        assert client.query("WAVELENGTH") == 720.0
        with pytest.raises(KeyError) as unknown:
            client.query("NOPE")
        assert isinstance(unknown.value, RemoteError)

        # PLESTY refuses a second holder of the line; labmesh surfaces its reply as is
        with pytest.raises(RemoteError) as refused:
            build_client(address, timeout=3000, resources=[LINE0], client_id="labmesh-b2")
        assert type(refused.value).__name__ == "ResourceAllocationError"
        assert refused.value.reply["result"]["resources"] == []
        assert refused.value.reply["result"]["client_id"] == "labmesh-b2"
    finally:
        client.close()

    # close() disconnected: PLESTY released the line to the next client
    with pytest.raises(ConnectionError):
        client.query("WAVELENGTH")
    again = build_client(address, timeout=3000, resources=[LINE0], client_id="labmesh-b3")
    try:
        assert again.connection_info is not None
        assert again.connection_info["resources"] == [LINE0]
    finally:
        again.close()

    plesty_server.signal(signal.SIGTERM)
    assert plesty_server.wait(10.0) == 0, plesty_server.stderr
    assert "DEVICE CLOSED" in plesty_server.stdout_lines


# ---- (c) the seed example: PLESTY's quick-start server, written with labmesh ------------------
SEED_SERVER = textwrap.dedent(
    '''\
    """A device server as PLESTY's quick start writes one, importing labmesh instead."""
    import asyncio
    import sys

    from labmesh import Device, Parameter, build_server, operation


    class DemoLaser(Device):
        """An in-memory laser."""

        resources = {"Dev1": {"port0": ["line0", "line1"]}}
        WAVELENGTH = Parameter(float, unit="nm", min=400, max=1100)

        def __init__(self):
            super().__init__("demo-laser")
            self.values = {"WAVELENGTH": 633.0}

        def connect(self):
            print("DEVICE CONNECTED", flush=True)

        def disconnect(self):
            print("DEVICE CLOSED", flush=True)

        def _query_(self, name):
            return self.values[name]

        def _write_(self, name, value):
            self.values[name] = value

        @operation(budget_s=2)
        def fire(self, shots: int = 1) -> int:
            """Fire some pulses."""
            return shots


    async def main():
        device = DemoLaser()
        server = build_server(device, address=f"tcp://127.0.0.1:{int(sys.argv[1])}")
        print("READY", server.address, flush=True)
        await server.run()


    if __name__ == "__main__":
        asyncio.run(main())
    '''
)


def test_seed_example_serves_both_clients_and_stops_on_ctrl_c(
    tmp_path: Path,
    free_tcp_port: int,
    spawn: Callable[..., Any],
    plesty_client: Callable[..., dict[str, Any]],
) -> None:
    program = tmp_path / "seed_server.py"
    program.write_text(SEED_SERVER, encoding="utf-8")
    port = free_tcp_port
    # the interpreter running these tests, with labmesh importable however it was installed
    package_root = Path(labmesh.__file__).resolve().parent.parent
    server = spawn([sys.executable, program, str(port)], pythonpath=[package_root])
    ready = server.wait_for_line("READY ")
    address = ready.split(" ", 1)[1]
    assert address == f"tcp://127.0.0.1:{port}"

    # our client
    with build_client(address, timeout=3000, resources="Dev1/port0") as ours:
        assert ours.connection_info["resources"] == ["Dev1/port0/line0", "Dev1/port0/line1"]
        assert "fire" in ours.describe()["methods"]
        assert ours.query("WAVELENGTH") == 633.0
        assert ours.write("WAVELENGTH", 700) is True
        assert ours.fire(4) == 4
        with pytest.raises(ValueError, match="WAVELENGTH"):
            ours.write("WAVELENGTH", 300)
    assert "DEVICE CONNECTED" in server.stdout_lines

    # the real PLESTY client
    result = plesty_client(
        address,
        "--resources",
        json.dumps([LINE0]),
        "--op",
        "fire",
        "--op-args",
        "[2]",
        "--value",
        "900",
    )
    assert _ok(result, "connect")["resources"] == [LINE0]
    assert "fire" in _ok(result, "describe")["methods"]
    assert _ok(result, "query") == 700.0
    assert _ok(result, "write") is True
    assert _ok(result, "query_after") == 900.0
    assert _ok(result, "call") == 2
    raised, message = _raised(result, "bad_write")
    assert (raised, message.split(":", 1)[0]) == ("RuntimeError", "ValueError")
    assert _ok(result, "disconnect")["client_id"] == "plesty-interop"

    # Ctrl+C. A server stopped by its operator has succeeded: like the same program under
    # PLESTY (observed: exit 0 within 0.7 s, device closed, nothing on stderr), it must close
    # the device, free the port and exit 0 within 2 s, without a traceback.
    time.sleep(0.2)  # let the server settle after the last reply
    server.signal(signal.SIGINT)
    started = time.monotonic()
    code = server.wait(SIGINT_EXIT_S)
    took = time.monotonic() - started
    assert code is not None, f"still running {SIGINT_EXIT_S} s after SIGINT\n{server.stderr}"
    problems = []
    if "DEVICE CLOSED" not in server.stdout_lines:
        problems.append("the device was not disconnected")
    if not port_is_free(port):
        problems.append(f"port {port} still bound after exit")
    if code != 0:
        problems.append(f"exit code {code} after SIGINT ({took:.2f} s), expected 0")
    if "Exception in thread" in server.stderr:
        problems.append("an exception escaped a thread during shutdown")
    if "Traceback" in server.stderr:
        problems.append("a traceback was printed")
    assert not problems, "; ".join(problems) + f"\nstderr:\n{server.stderr}"
