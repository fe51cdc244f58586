"""Server and client over real ZeroMQ sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time

import pytest
import zmq

from labmesh import RemoteError, build_async_client, build_client, build_server

from support import MemoryMeter, serve, wait_until

pytestmark = pytest.mark.integration


def raw_socket(address: str, kind: int = zmq.DEALER) -> zmq.Socket:
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(address)
    return sock


def raw_request(sock: zmq.Socket, frames: list[bytes]) -> dict:
    sock.send_multipart(frames)
    return json.loads(sock.recv())


# ---- every request type ---------------------------------------------------------------------
def test_every_request_type(server):
    with build_client(
        server.address, timeout=3000, resources="Dev1/port0", connect_kwargs={"name": "exp-42"}
    ) as client:
        info = client.connection_info
        assert info["resources"] == ["Dev1/port0/line0", "Dev1/port0/line1"]
        assert info["metadata"] == {"name": "exp-42"} and info["session"]
        assert client.query("WAVELENGTH") == 532.0
        assert client.write("WAVELENGTH", 1064) is True
        assert client.query("WAVELENGTH") == 1064.0
        assert client.call("add", 2, b=3) == 5
        assert client.add(1) == 2.0
        desc = client.describe()
        assert desc["name"] == "meter" and desc["protocol"] == "labmesh/1"
        assert "add" in desc["methods"] and desc["healthy"] is True
        assert "WAVELENGTH: float nm, 400 to 1100" in client.help()
        pong = client.ping()
        assert pong["pong"] is True and pong["healthy"] and pong["connected"]
        hb = client._request({"type": "heartbeat"})
        assert hb["epoch"] == desc["epoch"] and hb["lease_remaining"] > 0
        holders = client.locks()["holders"]
        assert [h["resource"] for h in holders] == ["Dev1/port0/line0", "Dev1/port0/line1"]
        assert holders[0]["metadata"] == {"name": "exp-42"}
        assert client.identity().startswith("labmesh,MemoryMeter")
        assert client.get_config_list() == [
            "AUTORANGE",
            "AVERAGING",
            "MODE",
            "POWER",
            "TRIGGER",
            "WAVELENGTH",
        ]
    # close() sent disconnect: the lines are free again
    with build_client(server.address, timeout=3000) as other:
        assert other.locks()["holders"] == []


def test_parameter_errors_cross_the_wire(server):
    with build_client(server.address, timeout=3000) as client:
        with pytest.raises(
            ValueError,
            match="out of range for WAVELENGTH; allowed: a float from 400.0 to 1100.0 nm",
        ) as info:
            client.write("WAVELENGTH", 5000)
        assert isinstance(info.value, RemoteError) and type(info.value).__name__ == "ValueError"
        with pytest.raises(KeyError, match="no parameter 'COLOR'"):
            client.query("COLOR")
        with pytest.raises(ValueError, match="POWER is read-only"):
            client.write("POWER", 1.0)
        with pytest.raises(ValueError, match="takes an int"):
            client.write("AVERAGING", True)
        with pytest.raises(ValueError, match=r"not an option of MODE; allowed: \['CW', 'PULSED'\]"):
            client.write("MODE", "QCW")
        assert client.query("MODE") == "CW"


def test_call_reaches_only_exposed_operations(server):
    with build_client(server.address, timeout=3000) as client:
        for name in ("not_exposed", "_query_", "__init__", "disconnect", "query"):
            with pytest.raises(AttributeError, match=f"has no operation '{name}'"):
                client.call(name)
        assert not hasattr(client, "not_exposed")


def test_client_resources_in_kwargs_are_not_trusted(server, meter):
    with build_client(server.address, timeout=3000) as client:
        with pytest.raises(TypeError, match="unexpected keyword"):
            client.call("add", 1, c=2)
        # a forged `resources` kwarg is dropped, not passed to the device
        assert client.call("add", 1, resources=["Dev1/port0/line0"]) == 2.0


# ---- both framings ----------------------------------------------------------------------------
def test_dealer_and_req_framing(server):
    dealer = raw_socket(server.address, zmq.DEALER)
    req = raw_socket(server.address, zmq.REQ)
    try:
        reply = raw_request(dealer, [json.dumps({"type": "ping", "id": 1}).encode()])
        assert reply["status"] == "ok" and reply["id"] == 1
        req.send(json.dumps({"type": "query", "param": "WAVELENGTH", "id": "r"}).encode())
        reply = json.loads(req.recv())
        assert reply == {"status": "ok", "result": 532.0, "id": "r"}
        req.send(b"not json")  # a REQ client gets its error in REQ framing too
        assert json.loads(req.recv())["type"] == "ProtocolError"
    finally:
        dealer.close()
        req.close()


# ---- malformed input never kills the server ---------------------------------------------------
MALFORMED = {
    "random bytes": [bytes(random.Random(1).getrandbits(8) for _ in range(300))],
    "multipart": [b'{"type": "ping"}', b"extra"],
    "bad utf-8": [b'{"type": "ping", "x": "\xff\xfe"}'],
    "json array": [b"[1, 2, 3]"],
    "json string": [b'"ping"'],
    "no type": [b'{"param": "X"}'],
    "unknown type": [b'{"type": "reboot", "id": 9}'],
    "bad field": [b'{"type": "query", "param": 42, "id": 10}'],
    "nan timeout": [b'{"type": "query", "param": "X", "timeout": NaN}'],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_get_protocol_error_and_server_survives(server, name):
    sock = raw_socket(server.address)
    try:
        reply = raw_request(sock, MALFORMED[name])
        assert reply["status"] == "error" and reply["type"] == "ProtocolError", reply
        assert reply["error"]
        if name in ("unknown type", "bad field"):
            assert reply["id"] == json.loads(MALFORMED[name][0])["id"]
        ok = raw_request(sock, [b'{"type": "query", "param": "WAVELENGTH", "id": 2}'])
        assert ok == {"status": "ok", "result": 532.0, "id": 2}
    finally:
        sock.close()


def test_oversize_message_is_refused_and_server_survives(meter):
    srv = serve(meter, max_message_bytes=64 * 1024)
    sock = raw_socket(srv.address)
    try:
        big = json.dumps({"type": "write", "param": "MODE", "value": "x" * 100_000}).encode()
        reply = raw_request(sock, [big])
        assert reply["type"] == "ProtocolError" and "exceeds this server's limit" in reply["error"]
        # far beyond the limit ZeroMQ drops the connection; the DEALER reconnects by itself
        sock.send(b"y" * 1_000_000)
        with build_client(srv.address, timeout=3000) as client:
            assert client.query("WAVELENGTH") == 532.0
        assert raw_request(sock, [b'{"type": "ping", "id": 3}'])["id"] == 3
    finally:
        sock.close()
        srv.stop()


def test_random_garbage_burst_then_normal_clients(server):
    rng = random.Random(7)
    sock = raw_socket(server.address)
    try:
        for _ in range(200):
            frames = [
                bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
                for _ in range(rng.randint(1, 3))
            ]
            sock.send_multipart(frames)
        replies = 0
        while sock.poll(300):
            sock.recv_multipart()
            replies += 1
        assert replies >= 150  # one reply per routable message (a few are empty-body REQ shapes)
    finally:
        sock.close()
    with build_client(server.address, timeout=3000) as client:
        assert client.ping()["healthy"]


# ---- device failures --------------------------------------------------------------------------
def test_device_raising_is_that_calls_error(server):
    with build_client(server.address, timeout=3000) as client:
        with pytest.raises(RuntimeError, match="kaboom") as info:
            client.fail("kaboom")
        assert isinstance(info.value, RemoteError)
        assert client.add(1, 1) == 2


def test_system_exit_in_a_device_call_is_an_error_and_executor_survives(server):
    with build_client(server.address, timeout=3000) as client:
        with pytest.raises(RemoteError, match=r"SystemExit\(3\) raised inside exit") as info:
            client.exit(3)
        assert type(info.value).__name__ == "SystemExit"
        assert client.ping()["healthy"] is True
        assert client.query("WAVELENGTH") == 532.0


def test_unencodable_result_fails_only_that_call(server):
    with build_client(server.address, timeout=3000) as client:
        with pytest.raises(RemoteError, match="result of type set cannot be sent as JSON") as info:
            client.unencodable()
        assert type(info.value).__name__ == "SerializationError"
        assert client.add(2, 2) == 4


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_device_thread_shows_unhealthy_and_requests_get_clear_error(meter):
    import ctypes

    srv = serve(meter, fixed_threading=True)
    try:
        with build_client(srv.address, timeout=3000) as client:
            assert client.ping()["healthy"] is True
            # kill the device thread from outside, as a crashed extension would
            ident = srv._device_thread.ident
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(ident), ctypes.py_object(SystemExit)
            )
            pong = client.ping()  # wakes the device thread, which dies; the standby answers
            assert wait_until(lambda: not srv._device_thread.is_alive())
            pong = client.ping()
            assert pong["healthy"] is False
            assert client.describe()["healthy"] is False
            with pytest.raises(RemoteError, match="not running; restart the server") as info:
                client.query("WAVELENGTH")
            assert type(info.value).__name__ == "ExecutorDeadError"
    finally:
        srv.stop()


# ---- budgets, no overlap ------------------------------------------------------------------------
def test_budget_expiry_replies_at_once_and_calls_never_overlap(server, meter):
    with (
        build_client(server.address, timeout=5000) as a,
        build_client(server.address, timeout=5000) as b,
    ):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="Operation timed out") as info:
            a.sleep(1.0, timeout=0.2)
        assert time.monotonic() - t0 < 0.8
        assert info.value.still_running is True
        # the device is still busy: ping says so, and the next call waits, never overlaps
        pong = b.ping()
        assert pong["busy"] and pong["running"]["label"] == "sleep"
        t1 = time.monotonic()
        assert b.sleep(0.05) == 0.05
        assert time.monotonic() - t1 > 0.5  # waited for the expired call to really end
        assert meter.max_active == 1


def test_queued_call_whose_budget_expires_never_runs(server, meter):
    with (
        build_client(server.address, timeout=5000) as a,
        build_client(server.address, timeout=5000) as b,
    ):
        holder = threading.Thread(target=a.sleep, args=(0.8,))
        holder.start()
        assert wait_until(lambda: meter.active == 1)
        with pytest.raises(TimeoutError) as info:
            b.write("WAVELENGTH", 700, timeout=0.2)
        reply = info.value.reply
        assert reply["still_running"] is False and reply["started"] is False
        assert "busy with sleep" in reply["detail"]
        holder.join(5)
        assert not holder.is_alive()
        # calls run in the order they arrive: had the timed-out write been queued, it would
        # have run before this query
        assert b.query("WAVELENGTH") == 532.0
        assert meter.values["WAVELENGTH"] == 532.0  # the timed-out write was never sent


def test_describe_and_ping_answer_while_device_is_busy(server, meter):
    with (
        build_client(server.address, timeout=5000) as a,
        build_client(server.address, timeout=5000) as b,
    ):
        holder = threading.Thread(target=a.sleep, args=(1.5,))
        holder.start()
        assert wait_until(lambda: meter.active == 1)
        assert b.ping()["busy"]
        assert b.describe()["name"] == "meter"
        assert b.help()
        assert b.locks()["holders"] == []
        # all four answered while the 1.5 s call still held the device (not queued behind it)
        assert meter.active == 1 and holder.is_alive()
        holder.join(5)
        assert not holder.is_alive()


# ---- the client's guarantees ------------------------------------------------------------------
def test_server_restart_under_a_live_client(meter):
    srv = serve(meter)
    address = srv.address
    client = build_client(address, timeout=1500)
    try:
        assert client.query("WAVELENGTH") == 532.0
        srv.stop()
        srv = build_server(MemoryMeter(), address=address).start()
        t0 = time.monotonic()
        assert client.query("WAVELENGTH") == 532.0
        assert time.monotonic() - t0 < 1.0
    finally:
        client.close()
        srv.stop()


def test_client_survives_server_down_then_up(meter):
    srv = serve(meter)
    address = srv.address
    client = build_client(address, timeout=300, retries=1)
    try:
        srv.stop()
        with pytest.raises(TimeoutError, match="sent 2 times"):
            client.query("WAVELENGTH")
        srv = build_server(MemoryMeter(), address=address).start()
        deadline = time.monotonic() + 1.0
        assert client.ping()["pong"] and time.monotonic() < deadline
    finally:
        client.close()
        srv.stop()


def test_writes_are_never_resent_and_close_is_quick_when_server_is_dead(meter):
    srv = serve(meter)
    client = build_client(srv.address, timeout=300, retries=3)
    srv.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            client.write("WAVELENGTH", 600)
        assert "sent" not in str(info.value)  # one attempt only
        assert time.monotonic() - t0 < 1.1  # four attempts of 0.3 s would take 1.2 s
    finally:
        t0 = time.monotonic()
        client.close()
        assert time.monotonic() - t0 < 2.0


def test_connect_to_nothing_times_out_clearly():
    with pytest.raises(TimeoutError, match="is the server running"):
        build_client("tcp://127.0.0.1:1", timeout=200, retries=0)


def test_sixteen_concurrent_clients(server, meter):
    errors: list[BaseException] = []
    results: list[float] = []

    def worker(i: int) -> None:
        try:
            with build_client(server.address, timeout=5000) as c:
                for k in range(30):
                    assert c.add(i, k) == i + k
                    results.append(c.query("WAVELENGTH"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert results == [532.0] * (16 * 30)


def test_one_client_shared_between_threads(server):
    errors: list[BaseException] = []
    done: list[int] = []
    with build_client(server.address, timeout=5000) as client:

        def worker(i: int) -> None:
            try:
                for k in range(50):
                    assert client.add(i, k) == i + k
                done.append(i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors
    assert sorted(done) == list(range(8))


def test_bound_methods_have_remote_doc_and_signature(server):
    import inspect

    with build_client(server.address, timeout=3000) as client:
        assert client.add.__doc__ == "Add two numbers."
        assert str(inspect.signature(client.add)) == "(a, b=1.0)"


# ---- executors ---------------------------------------------------------------------------------
def test_fixed_threading_runs_every_call_on_one_thread_even_after_handover(meter):
    srv = serve(meter, fixed_threading=True)
    try:
        with build_client(srv.address, timeout=3000) as a, build_client(srv.address) as b:
            for _ in range(10):
                # a long call hands the socket to the standby thread; calls queued meanwhile
                # must still run on the device thread
                holder = threading.Thread(target=a.sleep, args=(0.02,))
                holder.start()
                assert b.query("WAVELENGTH") == 532.0
                assert b.write("AVERAGING", 5) is True
                holder.join(5)
                assert not holder.is_alive()
            assert b.query("AVERAGING") == 5
        assert meter.values["AVERAGING"] == 5
        assert meter.threads == {"device:meter"}
    finally:
        srv.stop()


# ---- lifecycle ---------------------------------------------------------------------------------
def test_shutdown_disconnects_device_and_frees_port_within_2s(meter):
    srv = serve(meter)
    client = build_client(srv.address, timeout=3000)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 2.0
    assert meter.disconnected
    again = build_server(MemoryMeter(), address=srv.address).start()  # port is free again
    again.stop()
    client.close()


def test_shutdown_during_a_long_call_is_bounded(meter):
    srv = serve(meter)
    client = build_client(srv.address, timeout=5000)
    outcome: list[BaseException] = []

    def hold() -> None:
        try:
            client.sleep(3.0)
        except BaseException as exc:
            outcome.append(exc)

    holder = threading.Thread(target=hold)
    holder.start()
    assert wait_until(lambda: meter.active == 1)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 2.0
    holder.join(5)
    assert outcome and "shutting down" in str(outcome[0])
    client.close()


def test_connect_failure_is_raised_by_start_and_port_released():
    class Broken(MemoryMeter):
        def connect(self):
            raise OSError("USB0::0x1313::0x8078::P0000001::INSTR not found")

    srv = build_server(Broken(), address="tcp://127.0.0.1:0")
    with pytest.raises(OSError, match="P0000001"):
        srv.start()
    build_server(MemoryMeter(), address=srv.address).start().stop()


def test_port_in_use_is_a_clear_error(server):
    with pytest.raises(OSError, match="cannot listen on .* another server on that port"):
        build_server(MemoryMeter(), address=server.address)


def test_await_run_serves_until_cancelled(meter):
    async def main() -> None:
        srv = build_server(meter, address="tcp://127.0.0.1:0")
        task = asyncio.create_task(srv.run())
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(
            loop.run_in_executor(None, lambda: wait_until(lambda: srv.running and meter.connected)),
            5,
        )
        client = await build_async_client(srv.address, timeout=3000)
        assert await client.query("WAVELENGTH") == 532.0
        assert await client.add(1, 2) == 3
        with pytest.raises(ValueError):
            await client.write("WAVELENGTH", 1)
        assert (await client.ping())["pong"]
        await client.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not srv.running

    asyncio.run(main())
    assert meter.disconnected


@pytest.mark.skipif(os.name != "posix", reason="ipc:// needs a POSIX system")
def test_ipc_transport(meter, tmp_path):
    srv = serve(meter, address=f"ipc://{tmp_path}/meter.sock")
    try:
        with build_client(srv.address, timeout=3000) as client:
            assert client.query("WAVELENGTH") == 532.0
    finally:
        srv.stop()


def test_calls_around_the_takeover_threshold_never_overlap_or_misroute(server, meter):
    """Calls of 0-6 ms (either side of the socket hand-over) from 6 clients, with pings."""
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        rng = random.Random(i)
        try:
            with build_client(server.address, timeout=5000) as c:
                for k in range(40):
                    seconds = rng.choice([0.0, 0.001, 0.002, 0.003, 0.006])
                    assert c.sleep(seconds) == seconds
                    assert c.add(i, k) == i + k
                    if k % 5 == 0:
                        assert c.ping()["pong"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert meter.max_active == 1
    with build_client(server.address, timeout=3000) as c:
        pong = c.ping()
        assert pong["healthy"] and not pong["busy"] and pong["queue_depth"] == 0


def test_close_is_quick_while_a_heartbeat_waits_on_a_dead_server(meter):
    srv = serve(meter)
    client = build_client(srv.address, timeout=5000, lease_s=0.3)
    srv.stop()
    time.sleep(0.15)  # the next heartbeat (every 0.1 s) is now waiting for a reply
    t0 = time.monotonic()
    client.close()
    assert time.monotonic() - t0 < 2.0


def test_describe_shows_what_the_driver_learned_at_connect():
    class LearnsAtConnect(MemoryMeter):
        def connect(self):
            self.set_limits("WAVELENGTH", min=700.0, max=1800.0)
            self.resources = {
                "Dev1": {"port0": ["line0", "line1"], "port1": ["line0"]},
                "ai": ["ai0"],
            }

    srv = serve(LearnsAtConnect())
    try:
        with build_client(srv.address, timeout=3000, resources="ai/ai0") as client:
            params = {p["name"]: p for p in client.describe()["doc"]["parameters"]["default"]}
            assert (params["WAVELENGTH"]["min_value"], params["WAVELENGTH"]["max_value"]) == (
                700.0,
                1800.0,
            )
            assert client.connection_info["resources"] == ["ai/ai0"]
            assert client.write("WAVELENGTH", 1550) is True
    finally:
        srv.stop()
