"""The lease table with plain data and an injected clock."""

from __future__ import annotations

import contextlib
import random

import pytest

from labmesh.locks import LeaseTable, Waiter, flatten, normalize_path
from labmesh.protocol.errors import (
    LeaseExpiredError,
    ResourceAllocationError,
    ResourceLockedError,
)

pytestmark = pytest.mark.unit

TREE = {"Dev1": {"port0": ["line0", "line1"], "port1": ["line0"]}, "ai0": None}


def test_normalization_and_flattening():
    assert normalize_path(" /Dev1/port0/ ") == "Dev1/port0"
    assert normalize_path("Dev1//port0 / line0") == "Dev1/port0/line0"
    assert flatten(TREE) == ["Dev1/port0/line0", "Dev1/port0/line1", "Dev1/port1/line0", "ai0"]
    assert flatten(["a/", " /b"]) == ["a", "b"]
    assert flatten("x") == ["x"] and flatten(None) == [] and flatten([]) == []


def test_prefix_expands_to_every_leaf_below():
    table = LeaseTable(TREE)
    assert table.expand(" /Dev1/port0/ ") == ("Dev1/port0/line0", "Dev1/port0/line1")
    assert table.expand("Dev1") == ("Dev1/port0/line0", "Dev1/port0/line1", "Dev1/port1/line0")
    assert table.expand({"Dev1": {"port1": ["line0"]}}) == ("Dev1/port1/line0",)
    assert table.expand(["Dev1/port0/line0", "Dev1/port0"]) == (
        "Dev1/port0/line0",
        "Dev1/port0/line1",
    )


def test_unknown_resources_are_refused_with_the_known_ones():
    table = LeaseTable(TREE)
    with pytest.raises(
        ResourceAllocationError,
        match=r"unknown resource\(s\) \['Dev2'\]; "
        r"this device's lockable resources are \['Dev1/port0/line0'",
    ):
        table.acquire("s1", "c1", "Dev2", 0.0)
    with pytest.raises(ResourceAllocationError, match="declares no lockable resources"):
        LeaseTable().acquire("s1", "c1", "x", 0.0)
    # the prefix must match whole path segments
    with pytest.raises(ResourceAllocationError):
        table.expand("Dev1/port")


def test_all_or_nothing_and_holder_named():
    table = LeaseTable(TREE)
    table.acquire("s1", "c1", "Dev1/port0/line0", 0.0, lease_s=10, metadata={"name": "exp-A"})
    with pytest.raises(
        ResourceAllocationError,
        match=r"held by c1 \(exp-A\) for 2.0 s "
        r"\(lease ends in 8.0 s\)",
    ):
        table.acquire("s2", "c2", ["Dev1/port0", "Dev1/port1"], 2.0, lease_s=10)
    assert table.holder("Dev1/port1/line0") is None  # nothing of the failed request was taken
    table.acquire("s2", "c2", "Dev1/port1", 2.0, lease_s=10)
    assert table.holder("Dev1/port1/line0").session == "s2"


def test_reconnect_of_same_session_replaces_its_grant():
    table = LeaseTable(TREE)
    table.acquire("s1", "c1", "Dev1/port0", 0.0)
    table.acquire("s1", "c1", "Dev1/port1", 1.0)
    assert table.holder("Dev1/port0/line0") is None
    assert table.grant("s1").leaves == ("Dev1/port1/line0",)


def test_check_refuses_other_sessions_only():
    table = LeaseTable(TREE)
    table.acquire("s1", "c1", "Dev1/port0/line0", 0.0, lease_s=10, metadata={"name": "A"})
    table.check("s1", ["Dev1/port0/line0"], 1.0)
    table.check("s2", ["Dev1/port0/line1"], 1.0)
    with pytest.raises(ResourceLockedError, match=r"held by c1 \(A\)") as info:
        table.check("s2", ["Dev1/port0/line0"], 1.0)
    assert info.value.details["holders"][0]["remaining_s"] == 9.0
    with pytest.raises(ResourceLockedError):
        table.check(None, ["Dev1/port0/line0"], 1.0)


def test_leases_expire_and_renew():
    table = LeaseTable(TREE, idle_limit_s=600)
    table.acquire("leased", "c1", "Dev1/port0/line0", 0.0, lease_s=10)
    table.acquire("plesty", "c2", "Dev1/port1", 0.0)  # no lease: the idle limit applies
    table.renew("leased", 8.0)
    assert table.expire(17.9) == []
    assert [g.session for g in table.expire(18.0)] == ["leased"]
    with pytest.raises(LeaseExpiredError, match="connect again"):
        table.renew("leased", 18.0)
    assert table.expire(599.0) == []
    assert [g.session for g in table.expire(600.0)] == ["plesty"]


def test_in_flight_sessions_do_not_expire():
    table = LeaseTable(TREE)
    table.acquire("s1", "c1", "Dev1", 0.0, lease_s=1)
    assert table.expire(5.0, alive=["s1"]) == []
    assert len(table.expire(5.0)) == 1


def test_waiters_first_come_first_served_and_timeout():
    table = LeaseTable(TREE)
    table.acquire("h", "holder", "Dev1/port0", 0.0, lease_s=10)
    table.enqueue(Waiter("w1", "c1", table.expand("Dev1/port0"), deadline=5.0))
    table.enqueue(Waiter("w2", "c2", table.expand("Dev1/port0/line1"), deadline=5.0))
    table.enqueue(Waiter("w3", "c3", table.expand("Dev1/port1"), deadline=1.0))
    granted, expired = table.serve_waiters(0.5)
    assert [w.session for w, _ in granted] == ["w3"]  # free and wanted by nobody earlier
    # a newcomer may not overtake w2 on a leaf w1/w2 are waiting for
    table.release("h")
    with pytest.raises(ResourceAllocationError, match="promised to c1"):
        table.acquire("late", "c9", "Dev1/port0/line1", 1.0)
    granted, expired = table.serve_waiters(1.0)
    assert [w.session for w, _ in granted] == ["w1"]  # w2 stays behind w1
    table.release("w1")
    granted, _ = table.serve_waiters(2.0)
    assert [w.session for w, _ in granted] == ["w2"]
    table.enqueue(Waiter("w4", "c4", table.expand("Dev1/port0/line1"), deadline=3.0))
    granted, expired = table.serve_waiters(3.0)
    assert granted == [] and [w.session for w in expired] == ["w4"]


def test_random_sequences_keep_the_invariants():
    """Thousands of random operations: no leaf is ever held by two sessions, no grant outlives
    its lease past an expiry pass, every grant ends released or expired, and a waiter is never
    overtaken by a later one that wants any of the same leaves."""
    rng = random.Random(2026)
    specs = [
        "Dev1",
        "Dev1/port0",
        "Dev1/port0/line0",
        "Dev1/port0/line1",
        "Dev1/port1",
        "ai0",
        ["ai0", "Dev1/port1/line0"],
    ]
    checked_overtakes = 0
    for _run in range(25):
        table = LeaseTable(TREE, idle_limit_s=50)
        now = 0.0
        queued: list[Waiter] = []  # still waiting, in arrival order
        for step in range(400):
            now += rng.random() * 3
            session = f"s{rng.randrange(8)}"
            op = rng.random()
            if op < 0.35:
                with contextlib.suppress(ResourceAllocationError):
                    table.acquire(
                        session,
                        session,
                        rng.choice(specs),
                        now,
                        lease_s=rng.choice([None, 5.0, 20.0]),
                    )
            elif op < 0.5:
                waiter = Waiter(
                    f"w{step}",
                    f"w{step}",
                    table.expand(rng.choice(specs)),
                    now + rng.random() * 20,
                    lease_s=rng.choice([None, 5.0]),
                )
                table.enqueue(waiter)
                queued.append(waiter)
            elif op < 0.62:
                table.release(session)
            elif op < 0.75:
                with contextlib.suppress(LeaseExpiredError):
                    table.renew(session, now)
            else:
                table.expire(now)
                for grant in table.sessions():
                    assert grant.expires_at(table.idle_limit_s) > now
            served, expired = table.serve_waiters(now)
            gone = {w.session for w, _ in served} | {w.session for w in expired}
            for waiter, _grant in served:
                earlier = queued[: queued.index(waiter)]
                for other in earlier:
                    if other.session not in gone:
                        checked_overtakes += 1
                        assert set(other.leaves).isdisjoint(waiter.leaves), (other, waiter)
            queued = [w for w in queued if w.session not in gone]
            holders: dict[str, str] = {}
            for grant in table.sessions():
                for leaf in grant.leaves:
                    assert leaf not in holders, f"{leaf} held by two sessions"
                    holders[leaf] = grant.session
                    assert table.holder(leaf) is grant
        table.expire(now + 10_000)
        assert table.sessions() == []
        assert all(table.holder(leaf) is None for leaf in table.leaves)
    assert checked_overtakes > 50  # the fairness check really ran
