"""The request/reply exchange every requester drives (labmesh.protocol.exchange), with plain
data: no socket, the clock passed in."""

from __future__ import annotations

import json
import logging

import pytest

from labmesh.protocol.errors import LabmeshError, RemoteError
from labmesh.protocol.exchange import (
    Channel,
    Done,
    GiveUp,
    Reconnect,
    Send,
    Wait,
    attempts_for,
    result,
)

pytestmark = pytest.mark.unit

log = logging.getLogger("test.exchange")


def reply(rid: str | None, result_value: object = 1, **extra: object) -> bytes:
    body: dict = {"status": "ok", "result": result_value, **extra}
    if rid is not None:
        body["id"] = rid
    return json.dumps(body).encode()


def error(rid: str | None, wire_type: str, message: str = "no") -> bytes:
    body = {"status": "error", "type": wire_type, "error": message}
    if rid is not None:
        body["id"] = rid
    return json.dumps(body).encode()


def sent(action: Send) -> dict:
    return json.loads(action.body)


def test_each_attempt_gets_a_fresh_id_and_the_session():
    channel = Channel("tcp://peer:1", log, prefix="ab")
    exchange = channel.exchange({"type": "query", "param": "P"}, wait_ms=100, session="s1")
    first = exchange.start(0.0)
    assert isinstance(first, Send) and not first.fresh_socket
    assert sent(first) == {"type": "query", "param": "P", "session": "s1", "id": "ab:1"}
    again = channel.exchange({"type": "ping"}, wait_ms=100).start(0.0)
    assert sent(again)["id"] == "ab:2" and "session" not in sent(again)


def test_a_foreign_id_is_dropped_counted_and_the_wait_shrinks():
    channel = Channel("tcp://peer:1", log, prefix="ab")
    exchange = channel.exchange({"type": "ping"}, wait_ms=1000)
    send = exchange.start(10.0)
    assert exchange.received(reply("ab:0", "stale"), 10.4) == Wait(600)
    assert channel.late_replies == 1
    assert exchange.received(reply(send.rid, "fresh"), 10.5) == Done(
        {"status": "ok", "result": "fresh", "id": send.rid}
    )
    assert channel.peer_echoes_ids


def test_a_reply_without_id_is_accepted_only_from_a_peer_that_never_echoed_one():
    plesty = Channel("tcp://plesty:1", log)
    exchange = plesty.exchange({"type": "query", "param": "P"}, wait_ms=100)
    exchange.start(0.0)
    assert isinstance(exchange.received(reply(None, 5), 0.01), Done)

    labmesh = Channel("tcp://labmesh:1", log)
    first = labmesh.exchange({"type": "ping"}, wait_ms=100)
    assert isinstance(first.received(reply(first.start(0.0).rid), 0.01), Done)
    second = labmesh.exchange({"type": "query", "param": "P"}, wait_ms=100)
    second.start(1.0)
    # this peer echoes ids: an id-less reply is someone else's (or a forgery), not ours
    assert isinstance(second.received(reply(None, "forged"), 1.01), Wait)
    assert labmesh.late_replies == 1


def _plesty_owing_one() -> Channel:
    """An id-less peer (PLESTY) that has not answered one request on the route kept (a lock
    holder keeps its routing id after a timeout)."""
    plesty = Channel("tcp://plesty:1", log)
    slow = plesty.exchange({"type": "query", "param": "SLOW"}, wait_ms=800)
    slow.start(0.0)
    assert isinstance(slow.timed_out(0.8), GiveUp)
    assert plesty.owed == 1
    return plesty


def test_answers_an_id_less_peer_still_owes_are_dropped_before_the_next_request_is_sent():
    plesty = _plesty_owing_one()
    nxt = plesty.exchange({"type": "query", "param": "NEXT"}, wait_ms=1000)
    # not sent yet: a PLESTY server answers in order, so its next answer is SLOW's
    assert nxt.start(1.0) == Wait(1000)
    send = nxt.received(reply(None, "slow-reply"), 1.5)
    assert isinstance(send, Send) and not send.fresh_socket and sent(send)["param"] == "NEXT"
    assert plesty.owed == 0 and plesty.late_replies == 1
    assert nxt.received(reply(None, "next-reply"), 1.6).reply["result"] == "next-reply"


def test_owed_answers_that_do_not_come_in_time_send_nothing_and_say_why():
    plesty = _plesty_owing_one()  # e.g. a move still running, or a server that restarted
    nxt = plesty.exchange({"type": "query", "param": "NEXT"}, wait_ms=1000)
    assert isinstance(nxt.start(1.0), Wait)
    gave_up = nxt.timed_out(2.0)
    assert isinstance(gave_up, GiveUp) and nxt.sent == 0  # nothing was sent
    text = str(gave_up.error)
    assert "still owes 1 answer(s) to earlier requests" in text and "nothing was sent" in text
    assert "close this client and connect again" in text
    assert plesty.owed == 1  # an answer that comes later is still not taken for another's
    again = plesty.exchange({"type": "query", "param": "NEXT"}, wait_ms=1000)
    assert isinstance(again.start(10.0), Wait)
    assert isinstance(again.received(reply(None, "move-result"), 12.0), Send)
    assert again.received(reply(None, "next-reply"), 12.1).reply["result"] == "next-reply"


def test_a_new_route_owes_nothing():
    plesty = _plesty_owing_one()
    plesty.new_route()  # the driver's next socket has its own routing id
    assert isinstance(plesty.exchange({"type": "ping"}, wait_ms=100).start(1.0), Send)


def test_retries_on_a_kept_route_take_the_first_answer_and_owe_the_rest():
    kept = Channel("tcp://plesty:1", log)
    retried = kept.exchange({"type": "query", "param": "P"}, wait_ms=100, attempts=3)
    retried.start(0.0)
    assert isinstance(retried.timed_out(0.1), Send)  # re-sent on the kept route (no new_route)
    assert isinstance(retried.timed_out(0.2), Send)
    # the same question three times: the first answer to come is the answer
    done = retried.received(reply(None, "answer"), 0.25)
    assert isinstance(done, Done) and done.reply["result"] == "answer"
    assert kept.owed == 2  # the other two come later, in order, and are dropped then
    nxt = kept.exchange({"type": "query", "param": "Q"}, wait_ms=100)
    assert isinstance(nxt.start(1.0), Wait)
    assert isinstance(nxt.received(reply(None, "answer"), 1.01), Wait)
    assert isinstance(nxt.received(reply(None, "answer"), 1.02), Send)
    assert nxt.received(reply(None, "q"), 1.03).reply["result"] == "q"


def test_retries_on_fresh_routes_owe_nothing():
    fresh = Channel("tcp://plesty:1", log)
    retried = fresh.exchange({"type": "query", "param": "P"}, wait_ms=100, attempts=2)
    retried.start(0.0)
    assert isinstance(retried.timed_out(0.1), Send)
    fresh.new_route()  # the driver replaced the socket with a fresh id before sending
    assert isinstance(retried.received(reply(None, "answer"), 0.15), Done)
    assert fresh.owed == 0
    gave_up = fresh.exchange({"type": "query", "param": "P"}, wait_ms=100, attempts=2)
    gave_up.start(1.0)
    gave_up.timed_out(1.1)
    fresh.new_route()
    assert isinstance(gave_up.timed_out(1.2), GiveUp)
    assert fresh.owed == 1  # only the attempt on the route in use (the driver replaces it)


def test_an_abandoned_request_to_an_id_less_peer_is_owed():
    plesty = Channel("tcp://plesty:1", log)
    cancelled = plesty.exchange({"type": "query", "param": "P"}, wait_ms=1000)
    cancelled.start(0.0)
    assert cancelled.abandon() and plesty.owed == 1  # the driver replaces its socket
    labmesh = Channel("tcp://labmesh:1", log)
    first = labmesh.exchange({"type": "ping"}, wait_ms=100)
    assert isinstance(first.received(reply(first.start(0.0).rid), 0.01), Done)
    other = labmesh.exchange({"type": "ping"}, wait_ms=100)
    other.start(1.0)
    assert not other.abandon() and labmesh.owed == 0  # its late reply carries its id


def test_a_disconnect_is_sent_at_once_and_takes_the_first_answer_whatever_is_owed():
    plesty = _plesty_owing_one()  # a lock holder closing while a call still runs
    bye = plesty.exchange({"type": "disconnect"}, wait_ms=1000)
    assert isinstance(bye.start(1.0), Send)  # the locks are released now, not after the call
    assert isinstance(bye.received(reply(None, {"client_id": "c"}), 1.1), Done)


def test_a_request_json_cannot_carry_is_never_counted_as_sent():
    plesty = Channel("tcp://plesty:1", log)
    bad = plesty.exchange({"type": "write", "param": "P", "value": object()}, wait_ms=100)
    with pytest.raises(Exception, match="object"):
        bad.start(0.0)
    assert bad.sent == 0 and not bad.abandon() and plesty.owed == 0  # nothing to wait for
    assert isinstance(plesty.exchange({"type": "ping"}, wait_ms=100).start(1.0), Send)


def test_a_peer_that_echoes_ids_never_owes_answers():
    labmesh = Channel("tcp://labmesh:1", log)
    first = labmesh.exchange({"type": "ping"}, wait_ms=100)
    assert isinstance(first.received(reply(first.start(0.0).rid), 0.01), Done)
    slow = labmesh.exchange({"type": "ping"}, wait_ms=100)
    slow.start(1.0)
    assert isinstance(slow.timed_out(1.1), GiveUp) and labmesh.owed == 0
    assert isinstance(labmesh.exchange({"type": "ping"}, wait_ms=100).start(2.0), Send)
    # and a reply with an empty id while nothing is sent is nobody's
    plesty = _plesty_owing_one()
    nxt = plesty.exchange({"type": "ping"}, wait_ms=100)
    nxt.start(1.0)
    assert isinstance(nxt.received(reply(""), 1.01), Wait) and plesty.owed == 1


def test_an_undecodable_reply_is_dropped_and_the_exchange_keeps_waiting():
    channel = Channel("tcp://peer:1", log)
    exchange = channel.exchange({"type": "ping"}, wait_ms=200)
    exchange.start(0.0)
    for junk in (b"\xff\xfe", b"[1, 2]", b'{"status": "maybe"}', b"{" * 5000):
        assert isinstance(exchange.received(junk, 0.05), Wait)
    assert channel.bad_replies == 4


def test_a_timeout_resets_the_socket_and_a_reply_to_the_first_attempt_is_late():
    channel = Channel("tcp://peer:1", log, prefix="ab")
    exchange = channel.exchange({"type": "query", "param": "P"}, wait_ms=100, attempts=2)
    first = exchange.start(0.0)
    second = exchange.timed_out(0.1)
    assert isinstance(second, Send) and second.fresh_socket and second.rid != first.rid
    assert isinstance(exchange.received(reply(first.rid, "late"), 0.15), Wait)
    assert exchange.received(reply(second.rid, "ok"), 0.16).reply["result"] == "ok"


def test_the_retry_limit_gives_up_with_a_message_that_says_how_often():
    channel = Channel("tcp://peer:1", log)
    exchange = channel.exchange({"type": "query", "param": "POWER"}, wait_ms=50, attempts=3)
    action = exchange.start(0.0)
    sends = [action]
    for step in range(1, 10):
        action = exchange.timed_out(step * 0.05)
        if isinstance(action, GiveUp):
            break
        sends.append(action)
    assert len(sends) == 3 and isinstance(action, GiveUp)
    assert "no reply from tcp://peer:1 to query POWER within 50 ms (sent 3 times)" in str(
        action.error
    )
    channel.new_route()  # (the driver's fresh socket: nothing owed on it)
    one = channel.exchange({"type": "write", "param": "P", "value": 1}, wait_ms=50)
    one.start(0.0)
    error_text = str(one.timed_out(0.05).error)
    assert "to write P within 50 ms;" in error_text and "sent" not in error_text


@pytest.mark.parametrize(
    ("payload", "attempts"),
    [
        ({"type": "query", "param": "P"}, 3),
        ({"type": "describe"}, 3),
        ({"type": "ping"}, 3),
        ({"type": "write", "param": "P", "value": 1}, 1),
        ({"type": "call", "func": "home"}, 3),  # declared idempotent
        ({"type": "call", "func": "move_to"}, 1),
        ({"type": "connect"}, 1),
        ({"type": "disconnect"}, 1),
    ],
)
def test_only_requests_that_change_nothing_or_are_declared_idempotent_are_resent(payload, attempts):
    assert attempts_for(payload, retries=2, idempotent=frozenset({"home"})) == attempts


def test_lease_expiry_reconnects_once_then_the_reply_is_final():
    channel = Channel("tcp://peer:1", log)
    exchange = channel.exchange(
        {"type": "write", "param": "P", "value": 1}, wait_ms=100, session="old", may_reconnect=True
    )
    first = exchange.start(0.0)
    assert exchange.received(error(first.rid, "LeaseExpiredError", "gone"), 0.01) == Reconnect(
        "gone"
    )
    again = exchange.reconnected("new", 0.02)
    assert sent(again)["session"] == "new" and again.rid != first.rid
    final = exchange.received(error(again.rid, "LeaseExpiredError"), 0.03)
    assert isinstance(final, Done)
    with pytest.raises(RemoteError) as info:
        result(final.reply)
    assert info.value.type == "LeaseExpiredError"
    # after reconnecting, a timeout does not send a third time
    exchange2 = channel.exchange(
        {"type": "query", "param": "P"}, wait_ms=100, attempts=1, may_reconnect=True
    )
    rid = exchange2.start(1.0).rid
    exchange2.received(error(rid, "LeaseExpiredError"), 1.01)
    exchange2.reconnected("s", 1.02)
    assert isinstance(exchange2.timed_out(1.2), GiveUp)


@pytest.mark.parametrize(
    ("rtype", "allowed"), [("heartbeat", True), ("connect", True), ("query", False)]
)
def test_lease_expiry_is_final_for_session_requests_or_when_locks_would_be_lost(rtype, allowed):
    channel = Channel("tcp://peer:1", log)
    exchange = channel.exchange({"type": rtype, "param": "P"}, wait_ms=100, may_reconnect=allowed)
    rid = exchange.start(0.0).rid
    assert isinstance(exchange.received(error(rid, "LeaseExpiredError"), 0.01), Done)


def test_a_flood_of_late_replies_writes_a_bounded_number_of_log_lines(caplog):
    channel = Channel("tcp://peer:1", log)
    exchange = channel.exchange({"type": "ping"}, wait_ms=10_000)
    exchange.start(0.0)
    with caplog.at_level(logging.INFO, logger="test.exchange"):
        for i in range(2000):
            exchange.received(reply(f"x:{i}"), 0.001 * i)
            exchange.received(b"junk", 0.001 * i)
    assert channel.late_replies == 2000 and channel.bad_replies == 2000
    assert 2 <= len(caplog.records) <= 12


def test_result_raises_remote_errors_or_the_local_class_given():
    assert result({"status": "ok", "result": [1]}) == [1]
    with pytest.raises(ValueError, match="out of range") as info:
        result({"status": "error", "type": "ValueError", "error": "out of range"})
    assert isinstance(info.value, RemoteError)

    class NameTaken(LabmeshError):
        wire_type = "NameTakenError"

    with pytest.raises(NameTaken) as taken:
        result(
            {"status": "error", "type": "NameTakenError", "error": "taken", "owner": "pc-1"},
            {"NameTakenError": NameTaken},
        )
    assert taken.value.details == {"owner": "pc-1"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="attempts >= 1"):
        Channel("p", log).exchange({"type": "ping"}, wait_ms=100, attempts=0)
