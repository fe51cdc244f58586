"""A late reply of the real PLESTY server (which echoes no request id) never answers the next
question of a labmesh client (README: "a late reply never answers the next question").

The PLESTY server (tests/interop/peer_plesty_slow_server.py, in the interop venv) answers
`query("SLOW")` after SLOW_S seconds, longer than the client waits; every other query answers
`"<NAME>-<n>"`. The client times out on SLOW, then asks again at once: the device answers in
order (PLESTY runs device calls one at a time), so the late "slow-reply" comes first. It must
not be taken for the next answer, nor shift every later answer by one.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from labmesh import build_async_client, build_client

from support import free_port

pytestmark = pytest.mark.interop

SLOW_SERVER = Path(__file__).resolve().parent / "peer_plesty_slow_server.py"
#: How long the slow query takes on the server (s), and how long the client waits (ms).
SLOW_S = 2.0
TIMEOUT_MS = 800


@pytest.fixture
def slow_plesty(interop_python: Path, spawn: Callable[..., Any]) -> Any:
    process = spawn(
        [interop_python, SLOW_SERVER, str(free_port()), str(SLOW_S), "--max-lifetime", "120"]
    )
    process.address = process.wait_for_line("READY ").split(" ", 1)[1].strip()
    return process


#: The questions asked after the slow one, while the device may still owe its answer.
NEXT = ["NEXT", "THEN", "LAST"]


def _ask_next(client: Any, first_wait_s: float = SLOW_S * 2) -> list[str]:
    """NEXT (waiting past the slow query's end), THEN and LAST, through a sync client."""
    return [client.query(name, timeout=first_wait_s if name == "NEXT" else None) for name in NEXT]


async def _ask_next_async(client: Any) -> list[str]:
    """As _ask_next, through an asyncio client."""
    return [
        await client.query(name, timeout=SLOW_S * 2 if name == "NEXT" else None) for name in NEXT
    ]


def _own_answers(answers: list[str]) -> None:
    """Each answer is to its own question (`NAME-<n>`), in the order asked, and none is the
    slow query's late one."""
    assert "slow-reply" not in answers, answers
    assert [a.rsplit("-", 1)[0] for a in answers] == NEXT, answers
    counters = [int(a.rsplit("-", 1)[1]) for a in answers]
    assert counters == sorted(counters), answers


def test_sync_client_late_plesty_reply_does_not_answer_the_next_query(slow_plesty: Any) -> None:
    # retries=0: the slow query is sent once (a re-send would only wait longer)
    client = build_client(slow_plesty.address, timeout=TIMEOUT_MS, retries=0, lease_s=None)
    try:
        assert client.session is None  # a PLESTY server: no token, no ids echoed
        assert client.query("FIRST").startswith("FIRST-")
        with pytest.raises(TimeoutError, match="query SLOW"):
            client.query("SLOW")
        # asked while the device still sleeps: answered after the late reply was sent;
        # budget so that the client waits past the slow query's end
        _own_answers(_ask_next(client))
    finally:
        client.close()


def test_async_client_late_plesty_reply_does_not_answer_the_next_query(slow_plesty: Any) -> None:
    async def scenario() -> list[str]:
        client = await build_async_client(
            slow_plesty.address, timeout=TIMEOUT_MS, retries=0, lease_s=None
        )
        try:
            assert (await client.query("FIRST")).startswith("FIRST-")
            with pytest.raises(TimeoutError, match="query SLOW"):
                await client.query("SLOW")
            return await _ask_next_async(client)
        finally:
            await client.close()

    answers = asyncio.run(asyncio.wait_for(scenario(), 60))
    _own_answers(answers)


def test_a_retried_slow_query_gets_its_own_answer(slow_plesty: Any) -> None:
    """With re-sends (a query is safe to send again), the answer to the last attempt is taken,
    and the question after it still gets its own answer."""
    client = build_client(slow_plesty.address, timeout=TIMEOUT_MS, retries=1, lease_s=None)
    try:
        # attempts at 0 and 0.8 s; the device answers them at 2 and 4 s, both too late
        with pytest.raises(TimeoutError, match=r"sent 2 times"):
            client.query("SLOW")
        _own_answers(_ask_next(client, first_wait_s=SLOW_S * 3))
    finally:
        client.close()


def test_a_lock_holder_keeps_its_id_and_still_gets_its_own_answers(slow_plesty: Any) -> None:
    """A PLESTY server knows a client's locks only by its routing id, so a lock holder keeps
    its socket after a timeout and the late answer comes to it: the client waits for that
    answer and drops it before asking the next question."""
    client = build_client(
        slow_plesty.address, timeout=TIMEOUT_MS, retries=0, lease_s=None, resources="Dev1/port0"
    )
    try:
        assert client.connection_info["resources"] == ["Dev1/port0/line0"]
        assert client.query("FIRST").startswith("FIRST-")
        with pytest.raises(TimeoutError):
            client.query("SLOW")
        _own_answers(_ask_next(client))
        assert client._channel.late_replies == 1  # the late answer came, and was dropped
    finally:
        client.close()


def test_an_async_lock_holder_gets_its_own_answers_too(slow_plesty: Any) -> None:
    async def scenario() -> tuple[list[str], int]:
        client = await build_async_client(
            slow_plesty.address,
            timeout=TIMEOUT_MS,
            retries=0,
            lease_s=None,
            resources="Dev1/port0",
        )
        try:
            assert client.connection_info["resources"] == ["Dev1/port0/line0"]
            with pytest.raises(TimeoutError):
                await client.query("SLOW")
            return await _ask_next_async(client), client._channel.late_replies
        finally:
            await client.close()

    answers, late = asyncio.run(asyncio.wait_for(scenario(), 60))
    _own_answers(answers)
    assert late == 1


@pytest.mark.parametrize("locks", [None, "Dev1/port0"], ids=["no-locks", "lock-holder"])
def test_a_cancelled_async_query_leaves_no_answer_for_the_next(slow_plesty: Any, locks) -> None:
    """`asyncio.wait_for(client.query(...), t)` cancels the request while it waits: its late
    answer must not answer the next question either."""

    async def scenario() -> list[str]:
        client = await build_async_client(
            slow_plesty.address, timeout=5000, retries=0, lease_s=None, resources=locks
        )
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.query("SLOW"), 0.5)
            return await _ask_next_async(client)
        finally:
            await client.close()

    answers = asyncio.run(asyncio.wait_for(scenario(), 60))
    _own_answers(answers)


class _Alarm(Exception):
    """What a SIGALRM handler (a hand-made timeout) raises inside a blocking call."""


@pytest.mark.parametrize("how", ["ctrl-c", "alarm"])
@pytest.mark.parametrize("locks", [None, "Dev1/port0"], ids=["no-locks", "lock-holder"])
def test_a_query_interrupted_by_a_signal_leaves_no_answer_for_the_next(
    slow_plesty: Any, locks, how: str
) -> None:
    """Ctrl+C (a real SIGINT to this thread), or a SIGALRM handler that raises, during a
    blocking query: its late answer must not answer the next question."""
    client = build_client(
        slow_plesty.address, timeout=5000, retries=0, lease_s=None, resources=locks
    )
    main = threading.get_ident()

    def alarm(_signum: int, _frame: object) -> None:
        raise _Alarm("took too long")

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        sig = signal.SIGINT if how == "ctrl-c" else signal.SIGALRM
        timer = threading.Timer(0.5, signal.pthread_kill, (main, sig))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else _Alarm):
                client.query("SLOW")
        finally:
            timer.join()
            signal.signal(signal.SIGALRM, previous)
        _own_answers(_ask_next(client))
    finally:
        client.close()


def test_a_lock_holder_closing_while_an_answer_is_owed_releases_its_locks(
    slow_plesty: Any,
) -> None:
    """The disconnect that releases PLESTY's locks is sent at once, even while the device
    still owes the answer to a call that timed out; another client then gets the locks."""
    holder = build_client(
        slow_plesty.address, timeout=TIMEOUT_MS, retries=0, lease_s=None, resources="Dev1/port0"
    )
    with pytest.raises(TimeoutError):
        holder.query("SLOW")
    holder.close()  # while SLOW still runs on the device
    with build_client(
        slow_plesty.address, timeout=5000, lease_s=None, resources="Dev1/port0"
    ) as other:
        assert other.connection_info["resources"] == ["Dev1/port0/line0"]


def test_a_lock_holder_waits_its_whole_budget_once_instead_of_re_sending(
    slow_plesty: Any,
) -> None:
    """Its kept connection loses nothing, so a re-send would only run the call again: with
    retries=2 one attempt waits three waits (2.4 s), long enough for the 2 s SLOW."""
    client = build_client(
        slow_plesty.address, timeout=TIMEOUT_MS, retries=2, lease_s=None, resources="Dev1/port0"
    )
    try:
        assert client.query("SLOW") == "slow-reply"
        assert client.query("SLOWRUNS") == 1
        assert client.query("NEXT").startswith("NEXT-")
    finally:
        client.close()
