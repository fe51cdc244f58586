"""Value subscriptions over real sockets: first update = current value, driver pushes, polling
shared between subscribers, filters, gap counting, slow subscribers, restarts, fan-out cost."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from labmesh import RemoteError, build_async_client, build_client, build_server
from labmesh.drivers.motor import MotorStage

from support import MemoryMeter, serve, wait_until

pytestmark = pytest.mark.integration

TICKER = Path(__file__).resolve().parents[1] / "ticker_server.py"


class CountingMeter(MemoryMeter):
    """A MemoryMeter that counts its device reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def _query_(self, name: str):
        self.reads += 1
        return super()._query_(name)


@pytest.fixture
def ticker():
    """tests/ticker_server.py in its own process (its CPU is measured apart from ours)."""
    proc = subprocess.Popen(
        [sys.executable, str(TICKER), "--max-lifetime", "120"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("ADDRESS "), line
        yield proc, line.split()[1]
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU of the process's Python threads, CPU of libzmq's I/O threads), seconds."""
    python = zmq_io = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if name.startswith("ZMQbg"):
            zmq_io += cpu
        else:
            python += cpu
    return python, zmq_io


def test_the_first_update_is_the_current_value_then_the_driver_pushes_a_move():
    server = serve(MotorStage(("x",), speed=20.0, name="stage-s"))
    try:
        with build_client(server.address) as client, client.subscribe("x/position") as sub:
            first = sub.get(2)
            assert (first.name, first.value, first.seq, first.missed) == ("x/position", 0.0, 1, 0)
            assert abs(first.timestamp - time.time()) < 5
            task = client.start("move_abs", "x", 2.0)  # 0.1 s: a few positions on the way
            seen = [first]
            while seen[-1].value != 2.0:
                update = sub.get(2)
                assert update is not None, seen
                seen.append(update)
            assert task.result(2) == 2.0
            values = [u.value for u in seen]
            assert values == sorted(values) and len(values) >= 3
            assert [u.seq for u in seen] == list(range(1, len(seen) + 1))
            assert sub.gaps == 0
    finally:
        server.stop()


def test_writes_are_published_and_polling_is_shared_between_subscribers():
    meter = CountingMeter()
    server = serve(meter)
    try:
        with build_client(server.address) as writer:
            subs = [writer.subscribe("WAVELENGTH", every_s=0.05) for _ in range(5)]
            reads_before = meter.reads
            time.sleep(1.0)
            reads = meter.reads - reads_before
            # one device read per period whatever the number of subscribers (5 here)
            assert 12 <= reads <= 26, reads
            writer.write("WAVELENGTH", 633.0)
            for sub in subs:
                assert wait_until(lambda s=sub: _last_value(s) == 633.0, 2)
                sub.close()
    finally:
        server.stop()


def _last_value(sub):
    value = None
    while (update := sub.get(0)) is not None:
        value = update.value
    sub.__dict__["_last"] = value if value is not None else sub.__dict__.get("_last")
    return sub.__dict__["_last"]


def test_deadband_and_rate_limit_filter_per_subscriber(ticker):
    _, address = ticker
    with build_client(address) as client:
        everything, slow, coarse = [], [], []
        subs = [
            client.subscribe("COUNT", everything.append),
            client.subscribe("COUNT", slow.append, max_rate_hz=10),
            client.subscribe("COUNT", coarse.append, deadband=50),
        ]
        total = client.burst(500, 1.0)
        assert wait_until(lambda: everything and everything[-1].value == total, 5)
        time.sleep(0.3)  # the last held value goes out within 1/10 s
        assert len(everything) >= 500  # current value + 500 pushed
        assert 8 <= len(slow) <= 14, len(slow)  # 10 Hz over 1 s, the latest value last
        assert slow[-1].value == 500
        assert 9 <= len(coarse) <= 12 and all(
            b.value - a.value >= 50 for a, b in itertools.pairwise(coarse)
        )
        for sub in subs:
            sub.close()


def test_sixteen_subscribers_at_1_khz_are_gap_free_and_fan_out_costs_the_server_nothing(ticker):
    proc, address = ticker
    clients = [build_client(address) for _ in range(16)]
    try:
        # the server's Python CPU per update with 1 subscriber, then with 16
        python_cpu, io_cpu = {}, {}
        for count in (1, 16):
            got: list[list[int]] = [[] for _ in range(count)]
            subs = [
                clients[i].subscribe("COUNT", lambda u, out=got[i]: out.append(u.seq))
                for i in range(count)
            ]
            for received in got:
                assert wait_until(lambda r=received: len(r) >= 1, 5)
            before = cpu_seconds(proc.pid)
            total = clients[0].burst(1000, 2.0)
            assert wait_until(lambda g=got, t=total: all(len(r) >= t + 1 for r in g), 15), (
                count,
                [len(r) for r in got],
            )
            after = cpu_seconds(proc.pid)
            gaps = [sum(b - a - 1 for a, b in itertools.pairwise(r)) for r in got]
            assert gaps == [0] * count
            assert all(sub.gaps == 0 for sub in subs)
            python_cpu[count] = (after[0] - before[0]) / total
            io_cpu[count] = (after[1] - before[1]) / total
            for sub in subs:
                sub.close()
        # one encoding and one send per update whatever the number of subscribers: libzmq's
        # I/O thread does the per-subscriber copies (measured apart, it grows with them). A
        # Python loop over subscribers would cost ~16x; a loaded 2-core machine adds noise.
        assert python_cpu[16] < 2.5 * python_cpu[1] + 20e-6, (python_cpu, io_cpu)
    finally:
        for client in clients:
            client.close()


def test_a_slow_subscriber_loses_updates_and_slows_nobody(ticker):
    _proc, address = ticker
    with build_client(address) as client:
        fast: list[int] = []
        sub = client.subscribe("BLOB", lambda u: fast.append(u.seq))
        slow = zmq.Context.instance().socket(zmq.SUB)
        slow.setsockopt(zmq.LINGER, 0)
        slow.setsockopt(zmq.RCVHWM, 10)
        slow.setsockopt(zmq.SUBSCRIBE, next(iter(sub.topics)).encode())
        slow.connect(client.connection_info["pub"])
        time.sleep(0.3)
        # 20 MB of updates, more than the server's queue for one subscriber (1,000 updates)
        # and the kernel's socket buffers can hold for a peer that reads nothing
        total = client.burst(5000, 2.0, pad=2000)
        assert wait_until(lambda: len(fast) >= total + 1, 10), len(fast)
        seqs = []
        while slow.poll(200):
            seqs.append(json.loads(slow.recv_multipart()[1])["seq"])
        slow.close()
        assert sum(b - a - 1 for a, b in itertools.pairwise(fast)) == 0  # the others: no gap
        assert len(seqs) < total / 2, len(seqs)  # it lost most (ZeroMQ dropped them) ...
        assert seqs == sorted(seqs)
        sub.close()


def test_subscriptions_resume_after_a_server_restart_and_report_the_gap():
    meter = MemoryMeter()
    server = serve(meter)
    address = server.address
    try:
        client = build_client(address, lease_s=0.6)
        try:
            sub = client.subscribe("WAVELENGTH", every_s=0.05)
            assert sub.get(2).value == 532.0
            server.stop()
            server = build_server(MemoryMeter(), address=address).start()
            # the heartbeat finds the new server, connects again and subscribes again
            update = None
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                update = sub.get(0.5)
                if update is not None and update.missed is None:
                    break
            assert update is not None and update.missed is None, update
            assert sub.restarts == 1
            following = sub.get(2)
            assert following is not None and following.missed == 0
            assert following.seq == update.seq + 1
        finally:
            client.close()
    finally:
        server.stop()


def test_unknown_names_and_bad_filters_are_refused_clearly():
    server = serve(MemoryMeter())
    try:
        with build_client(server.address) as client:
            with pytest.raises(KeyError, match="nothing to subscribe to named \\['NOPE'\\]"):
                client.subscribe("NOPE")
            with pytest.raises(RemoteError, match="deadband must be a number >= 0"):
                client.subscribe("WAVELENGTH", deadband=-1)
            assert client._subscriptions == []
    finally:
        server.stop()


def test_the_asyncio_client_iterates_updates():
    server = serve(MotorStage(("x",), speed=20.0))

    async def main() -> list:
        client = await build_async_client(server.address)
        try:
            values = []
            async with client.subscribe("x/position") as sub:
                task = await client.start("move_abs", "x", 1.0)
                async for update in sub:
                    values.append(update.value)
                    if update.value == 1.0:
                        break
            assert await task.result(2) == 1.0
            return values
        finally:
            await client.close()

    try:
        values = asyncio.run(main())
    finally:
        server.stop()
    assert values[0] == 0.0 and values[-1] == 1.0 and values == sorted(values)


def test_subscribing_from_many_threads_of_one_client():
    server = serve(MemoryMeter())
    try:
        with build_client(server.address) as client:
            errors = []

            def one(i: int) -> None:
                try:
                    with client.subscribe(["WAVELENGTH", "POWER"][i % 2]) as sub:
                        assert sub.get(2) is not None
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert errors == []
    finally:
        server.stop()


def test_a_callback_may_close_its_subscription_or_use_the_client():
    server = serve(MotorStage(("x",), speed=20.0))
    try:
        with build_client(server.address) as client:
            seen, reads = [], []

            def closing(update) -> None:
                seen.append(update.value)
                if len(seen) == 3:
                    sub.close()  # from the receiving thread itself

            def reading(update) -> None:
                reads.append(client.query("x/speed"))  # the client, from the callback

            sub = client.subscribe("x/position", closing)
            other = client.subscribe("x/position", reading, max_rate_hz=20)
            assert client.move_abs("x", 2.0) == 2.0  # while callbacks run
            assert wait_until(lambda: sub.closed and len(reads) >= 2, 5)
            assert len(seen) == 3 and set(reads) == {20.0}
            other.close()
            assert client.ping()["pong"]
    finally:
        server.stop()


def test_subscriptions_of_a_crashed_client_end_with_its_lease():
    meter = CountingMeter()
    server = serve(meter)
    try:
        client = build_client(server.address, lease_s=0.3)
        client.subscribe("WAVELENGTH", every_s=0.05)
        assert wait_until(lambda: server.core.subs.streams, 2)
        client._closing.set()  # the process dies: no heartbeat, no disconnect
        client._close_socket()
        assert wait_until(lambda: not server.core.subs.streams, 3)
        reads = meter.reads
        time.sleep(0.3)
        assert meter.reads == reads  # nobody subscribes: the polling stopped too
    finally:
        server.stop()


def test_a_fixed_publish_port_is_announced_and_used():
    from support import free_port

    port = free_port()
    server = serve(MemoryMeter(), pub_address=f"tcp://127.0.0.1:{port}")
    try:
        with build_client(server.address) as client:
            assert client.connection_info["pub"] == f"tcp://127.0.0.1:{port}"
            with client.subscribe("WAVELENGTH") as sub:
                assert sub.get(2).value == 532.0
                client.write("WAVELENGTH", 600.0)
                assert sub.get(2).value == 600.0
    finally:
        server.stop()
