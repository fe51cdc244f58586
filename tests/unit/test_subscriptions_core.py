"""Subscription bookkeeping (labmesh.server.subscriptions) and a client's gap counting
(labmesh.updates), with plain data and the clock passed in."""

from __future__ import annotations

import json
import math

import pytest

from labmesh.protocol.topics import Filter, topic_of
from labmesh.server.subscriptions import Subscriptions
from labmesh.updates import Subscription, pub_endpoint

pytestmark = pytest.mark.unit


def bodies(messages):
    return [json.loads(body) for _topic, body in messages]


def test_topics_never_prefix_one_another():
    plain = topic_of("POWER", Filter())
    assert plain == "POWER\0\0"
    for other in (topic_of("POWER", Filter(every_s=0.1)), topic_of("POWER2", Filter())):
        assert not other.startswith(plain)


def test_one_stream_per_name_and_filter_and_one_encoding_per_update():
    subs = Subscriptions()
    a = subs.subscribe("s1", "POWER", Filter(), 0.0)
    b = subs.subscribe("s2", "POWER", Filter(), 0.0)
    c = subs.subscribe("s3", "POWER", Filter(deadband=0.5), 0.0)
    assert a is b and a is not c and len(subs.streams) == 2
    out = subs.observe("POWER", 1.0, 1.0, 100.0)
    assert len(out) == 2  # one message per stream, however many subscribers share it
    assert bodies(out)[0] == {
        "topic": "POWER\0\0",
        "name": "POWER",
        "value": 1.0,
        "ts": 100.0,
        "seq": 1,
    }


def test_deadband_and_rate_limit():
    subs = Subscriptions()
    subs.subscribe("s", "X", Filter(deadband=1.0), 0.0)
    sent = [bodies(subs.observe("X", v, t, t))[:1] for t, v in enumerate([0, 0.5, 0.9, 1.2, 1.5])]
    assert [m[0]["value"] for m in sent if m] == [0, 1.2]

    rated = Subscriptions()
    rated.subscribe("s", "Y", Filter(max_rate_hz=10), 0.0)
    assert bodies(rated.observe("Y", 1, 0.00, 0.00))[0]["seq"] == 1
    assert rated.observe("Y", 2, 0.01, 0.01) == [] and rated.observe("Y", 3, 0.05, 0.05) == []
    assert rated.earliest_flush == pytest.approx(0.1)
    assert rated.flush_due(0.09) == []
    flushed = bodies(rated.flush_due(0.1))
    assert [(m["value"], m["seq"]) for m in flushed] == [(3, 2)]  # the latest, held
    assert rated.flush_due(0.5) == [] and rated.earliest_flush == math.inf


def test_polling_is_one_read_per_period_whatever_the_subscribers():
    subs = Subscriptions()
    for who in range(50):
        subs.subscribe(who, "T", Filter(every_s=0.2), 0.0)
    subs.subscribe("fast", "T", Filter(every_s=0.1), 0.0)
    assert subs.polls_due(0.0) == ["T"]
    assert subs.polls_due(0.01) == []  # in flight: never twice
    subs.poll_ended("T", 0.02)
    assert subs.polls_due(0.11) == [] and subs.polls_due(0.125) == ["T"]  # the fastest period
    subs.poll_ended("T", 0.13)
    subs.unsubscribe("fast")
    assert subs.period("T") == 0.2
    for who in range(50):
        subs.unsubscribe(who)
    assert subs.streams == {} and subs.period("T") is None and subs.next_due() == math.inf


def test_bounds_per_subscriber_and_in_all():
    subs = Subscriptions(max_streams=3, max_per_subscriber=2)
    subs.subscribe("a", "A", Filter(), 0.0)
    subs.subscribe("a", "B", Filter(), 0.0)
    with pytest.raises(OverflowError) as per_subscriber:
        subs.subscribe("a", "C", Filter(), 0.0)
    assert per_subscriber.value.args == ("subscriber", 2)
    subs.subscribe("b", "C", Filter(), 0.0)
    with pytest.raises(OverflowError) as in_all:
        subs.subscribe("b", "D", Filter(), 0.0)
    assert in_all.value.args == ("all", 3)
    assert subs.unsubscribe("a") == 2 and len(subs.streams) == 1


def test_values_json_cannot_carry_are_dropped_and_counted():
    subs = Subscriptions()
    subs.subscribe("s", "X", Filter(), 0.0)
    assert subs.observe("X", object(), 0.0, 0.0) == []
    assert subs.dropped_unencodable == 1
    assert bodies(subs.observe("X", 2, 1.0, 1.0))[0]["seq"] == 1  # no seq was spent


def test_a_client_counts_gaps_drops_duplicates_and_marks_restarts():
    sub = Subscription(None, ["X"], Filter(), None)
    topic = "X\0\0"
    first = sub._accept(topic, "X", 1, 0.0, 5)
    assert first.missed == 0 and first.seq == 5
    assert sub._accept(topic, "X", 1, 0.0, 5) is None  # the same update twice
    assert sub._accept(topic, "X", 1, 0.0, 4) is None  # an older one
    assert sub._accept(topic, "X", 2, 0.0, 9).missed == 3 and sub.gaps == 3
    sub._server_restarted()
    after = sub._accept(topic, "X", 3, 0.0, 1)
    assert after.missed is None and sub.restarts == 1  # counters started over: unknown
    assert sub._accept(topic, "X", 4, 0.0, 2).missed == 0


def test_a_wildcard_publish_address_is_reached_where_the_server_was():
    assert pub_endpoint("tcp://0.0.0.0:4100", "tcp://lab-pc-3:5555") == "tcp://lab-pc-3:4100"
    assert pub_endpoint("tcp://10.0.0.5:4100", "tcp://lab-pc-3:5555") == "tcp://10.0.0.5:4100"
    assert pub_endpoint("ipc:///run/x.pub", "ipc:///run/x") == "ipc:///run/x.pub"
