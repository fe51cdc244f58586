"""Resource locks over real sockets: enforcement, leases, crashes, waiting, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from labmesh import RemoteError, build_async_client, build_client, build_server

from support import MemoryDaq, MemoryMeter, serve, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def daq_server():
    srv = serve(MemoryDaq(), fixed_threading=True)
    try:
        yield srv
    finally:
        srv.stop()


def test_non_holder_write_is_refused_and_holder_write_succeeds(daq_server):
    with (
        build_client(
            daq_server.address, resources="Dev1/port0/line0", connect_kwargs={"name": "exp-A"}
        ) as a,
        build_client(daq_server.address, connect_kwargs={"name": "exp-B"}) as b,
    ):
        assert a.write_line("Dev1/port0/line0", True) is True
        with pytest.raises(
            RemoteError,
            match=r"resource locked: \['Dev1/port0/line0'\] held by "
            r"client-\w+ \(exp-A\) for [\d.]+ s \(lease ends in [\d.]+ s\)",
        ) as info:
            b.write_line("Dev1/port0/line0", False)
        assert type(info.value).__name__ == "ResourceLockedError"
        holder = info.value.reply["holders"][0]
        assert holder["client_id"] == a.client_id and holder["metadata"] == {"name": "exp-A"}
        # other lines, reads, and operations that touch nothing stay open to everyone
        assert b.write_line("Dev1/port0/line1", True) is True
        assert b.read_line("Dev1/port0/line0") is True
        assert b.query("AO0") == 0.0
        # an operation with no declaration touches the whole card: refused while a line is held
        with pytest.raises(RemoteError, match="resource locked"):
            b.reset_card()
        # a parameter declared on Dev1/ao0 is free; one without a declaration is whole-card
        assert b.write("AO0", 1.5) is True
        with pytest.raises(RemoteError, match="resource locked"):
            b.write("LABEL", "x")
        assert a.write("LABEL", "mine") is True
    with build_client(daq_server.address) as c:  # a released everything on close
        assert c.reset_card() is None


def test_resources_reach_the_device_call_as_plesty_passes_them(daq_server):
    with build_client(daq_server.address, resources="Dev1/port1") as a:
        assert a.granted() == ["Dev1/port1/line0"]
        assert a.write_line("Dev1/port1/line0", True)  # no **kwargs: not broken by resources
    with build_client(daq_server.address) as b:
        assert b.granted() is None


def test_id_reuse_without_the_session_token_gets_nothing(daq_server):
    with build_client(daq_server.address, resources="Dev1/port0/line0", client_id="lab-pc-7") as a:
        # a second connection claiming the live client's routing id is ignored by the server's
        # socket: it cannot take over the route (and read the holder's replies)
        with pytest.raises(TimeoutError):
            build_client(daq_server.address, client_id="lab-pc-7", lease_s=None, timeout=500)
        impostor = build_client(daq_server.address, client_id="lab-pc-8", lease_s=None)
        try:
            with pytest.raises(RemoteError, match="resource locked"):
                impostor.write_line("Dev1/port0/line0", False)
            assert impostor.connection_info["resources"] == []
        finally:
            impostor.close()
        assert a.locks()["holders"][0]["client_id"] == "lab-pc-7"
        assert a.write_line("Dev1/port0/line0", True) is True


HOLDER = textwrap.dedent("""
    import sys, time
    from labmesh import build_client
    c = build_client(sys.argv[1], resources="Dev1/port0", lease_s=1.0,
                     connect_kwargs={"name": "doomed"})
    print("READY", flush=True)
    time.sleep(60)
""")


def test_sigkilled_holder_loses_its_lock_within_lease_plus_one_second(daq_server):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, daq_server.address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "READY"
        with build_client(daq_server.address) as watcher:
            assert [h["metadata"]["name"] for h in watcher.locks()["holders"]] == ["doomed"] * 2
        time.sleep(1.5)  # the holder's heartbeats keep its 1 s lease alive
        with build_client(daq_server.address) as watcher:
            assert len(watcher.locks()["holders"]) == 2
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        waiter = build_client(daq_server.address, resources="Dev1/port0", wait_s=5.0)
        try:
            assert time.monotonic() - killed < 1.0 + 1.0
            assert waiter.connection_info["resources"] == ["Dev1/port0/line0", "Dev1/port0/line1"]
            assert waiter.write_line("Dev1/port0/line1", True)
        finally:
            waiter.close()
    finally:
        holder.kill()
        holder.wait(5)


def test_waiting_refusal_names_the_holder(daq_server):
    with build_client(daq_server.address, resources="Dev1/port1", connect_kwargs={"name": "A"}):
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"waited 0.3 s; .* held by client-\w+ \(A\)"):
            build_client(daq_server.address, resources="Dev1/port1", wait_s=0.3)
        assert 0.25 < time.monotonic() - t0 < 2.0  # waited its 0.3 s, not much longer


def test_waiters_are_served_first_come_first_served(daq_server):
    order: list[str] = []
    holder = build_client(daq_server.address, resources="Dev1/port0")

    def wait_for(name: str) -> None:
        c = build_client(
            daq_server.address,
            resources="Dev1/port0/line0",
            wait_s=5,
            connect_kwargs={"name": name},
        )
        order.append(name)
        c.close()

    def waiting() -> int:
        return daq_server.metrics_snapshot()["waiters"]

    # each waiter is started only once the server counts the one before it as waiting, so the
    # arrival order is known without sleeping
    first = threading.Thread(target=wait_for, args=("first",))
    first.start()
    assert wait_until(lambda: waiting() == 1), "the first connect is not waiting"
    second = threading.Thread(target=wait_for, args=("second",))
    second.start()
    assert wait_until(lambda: waiting() == 2), "the second connect is not waiting"
    holder.close()
    first.join(5)
    second.join(5)
    assert not first.is_alive() and not second.is_alive()
    assert order == ["first", "second"]


def test_plesty_style_grant_is_reclaimed_after_the_idle_limit():
    srv = serve(MemoryDaq(), idle_limit_s=0.5)
    try:
        plesty_like = build_client(srv.address, resources="Dev1/port0", lease_s=None)
        assert plesty_like.heartbeat_interval_s is None
        with build_client(srv.address) as other:
            assert len(other.locks()["holders"]) == 2
            assert wait_until(lambda: other.locks()["holders"] == [], timeout=2.0)
        plesty_like._connected = False
        plesty_like.close()
    finally:
        srv.stop()


def test_a_long_call_keeps_its_lease(daq_server):
    with build_client(daq_server.address, resources="Dev1/port0", lease_s=0.3) as a:
        a._closing.set()  # no heartbeats: only the in-flight call keeps the session alive
        assert a.hold(1.0) == 1.0
        assert a.write_line("Dev1/port0/line0", True) is True


def test_server_restart_is_reported_to_the_holder(daq_server):
    address = daq_server.address
    holder = build_client(address, resources="Dev1/port0/line0", timeout=2000)
    casual = build_client(address, timeout=2000)
    try:
        daq_server.stop()
        srv = build_server(MemoryDaq(), address=address).start()
        try:
            with pytest.raises(RemoteError, match="unknown here .* server restarted") as info:
                holder.write_line("Dev1/port0/line0", True)
            assert type(info.value).__name__ == "LeaseExpiredError"
            assert casual.write_line("Dev1/port1/line0", True)  # held nothing: reconnects
            # the holder never carries on without its locks: still refused next time
            with pytest.raises(RemoteError, match="LeaseExpired|unknown here"):
                holder.query("AO0")
        finally:
            srv.stop()
    finally:
        holder.close()
        casual.close()


def test_locks_listing_shows_age_and_time_left(daq_server):
    with build_client(
        daq_server.address, resources=["Dev1/ao0"], lease_s=5, connect_kwargs={"name": "scan"}
    ) as a:
        time.sleep(0.2)
        rows = a.locks()["holders"]
        assert rows == [
            {
                "resource": "Dev1/ao0",
                "client_id": a.client_id,
                "metadata": {"name": "scan"},
                "resources": ["Dev1/ao0"],
                "since_s": rows[0]["since_s"],
                "lease_s": 5.0,
                "remaining_s": rows[0]["remaining_s"],
            }
        ]
        assert rows[0]["since_s"] >= 0.2 and 0 < rows[0]["remaining_s"] <= 5.0


def test_inspection_operations_touch_nothing_and_bad_arguments_fail_on_their_own(daq_server):
    with (
        build_client(daq_server.address, resources="Dev1/port0/line0") as a,
        build_client(daq_server.address) as b,
    ):
        assert b.identity().startswith("labmesh,MemoryDaq")
        assert b.check_errors() == []
        assert b.check_operatability() is True
        a._closing.set()
        # a template filled with an unknown line is checked as the whole card (held: refused)
        with pytest.raises(RemoteError, match="resource locked"):
            b.write_line("Dev9/nowhere", True)
    with build_client(daq_server.address) as c:  # nobody holds anything: the call itself runs
        assert c.write_line("Dev9/nowhere", True) is True


def test_a_huge_lease_is_capped_at_the_idle_limit():
    srv = serve(MemoryDaq(), idle_limit_s=30)
    try:
        with build_client(srv.address, resources="Dev1/port0", lease_s=1e12) as c:
            assert c.connection_info["lease"] == 30.0
            assert c.locks()["holders"][0]["remaining_s"] <= 30.0
    finally:
        srv.stop()


def test_lock_changes_what_a_session_holds_and_keeps_its_subscriptions():
    """client.lock(): the same session takes other resources (or none), keeping its
    subscriptions; a busy resource is refused naming the holder, and nothing changes."""
    import asyncio

    srv = serve(MemoryMeter("meter-lock"))
    try:
        with (
            build_client(srv.address, connect_kwargs={"name": "exp-A"}) as a,
            build_client(srv.address, connect_kwargs={"name": "exp-B"}) as b,
        ):
            session = a.session
            sub = a.subscribe("WAVELENGTH")
            assert sub.get(2).value == 532.0
            assert a.lock("Dev1/port0") == ["Dev1/port0/line0", "Dev1/port0/line1"]
            assert a.session == session  # the same session, not a new connection
            with pytest.raises(RemoteError, match=r"held by .*\(exp-A\)") as refused:
                b.lock("Dev1/port0/line1")
            assert refused.value.type == "ResourceAllocationError"
            assert b.lock("Dev1/port1") == ["Dev1/port1/line0"]
            assert a.lock([]) == []
            assert b.lock(["Dev1/port0/line1", "Dev1/port1"]) == [
                "Dev1/port0/line1",
                "Dev1/port1/line0",
            ]
            holders = {h["resource"]: h["metadata"]["name"] for h in a.locks()["holders"]}
            assert holders == {"Dev1/port0/line1": "exp-B", "Dev1/port1/line0": "exp-B"}
            assert b.write("WAVELENGTH", 600.0) is True  # b holds or may take every leaf
            assert sub.get(2).value == 600.0  # a's subscription survived its lock changes
            sub.close()

        async def asynchronous() -> list[str]:
            client = await build_async_client(srv.address)
            try:
                held = await client.lock("Dev1/port0/line0")
                await client.lock([])
                return held
            finally:
                await client.close()

        assert asyncio.run(asynchronous()) == ["Dev1/port0/line0"]
    finally:
        srv.stop()
