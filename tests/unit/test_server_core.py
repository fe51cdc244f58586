"""The device server's pure core, driven with plain data (h11-style): no sockets, no threads.

Each test feeds `ServerCore` events (receive, start_next, job_done, tick, peer_gone,
undeliverable) with an explicit clock and checks the actions it returns.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from labmesh.server.core import Count, Log, Run, Send, ServerCore, ServerLimits

from support import MemoryMeter

pytestmark = pytest.mark.unit

LINE0 = "Dev1/port0/line0"


def body(obj) -> list[bytes]:
    return [json.dumps(obj).encode()]


def sends(actions) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def replies(actions) -> list[dict]:
    return [json.loads(a.body) for a in sends(actions)]


def one_reply(actions) -> dict:
    found = replies(actions)
    assert len(found) == 1, found
    return found[0]


class Harness:
    """A core plus the device calls the loop would run, run synchronously on demand."""

    def __init__(self, **limits) -> None:
        self.device = MemoryMeter()
        self.core = ServerCore(self.device, "meter", limits=ServerLimits(**limits))
        self.core.connected = True
        self.now = 1000.0

    def send(self, identity: bytes, obj, conn=1) -> list:
        return self.core.receive(identity, body(obj), self.now, conn)

    def run_all(self) -> list:
        """Run every queued call to completion, one at a time; return every action."""
        out = []
        while True:
            actions = self.core.start_next(self.now)
            out.extend(a for a in actions if not isinstance(a, Run))
            runs = [a for a in actions if isinstance(a, Run)]
            if not runs:
                return out
            assert len(runs) == 1
            runs[0].job.run()
            out.extend(self.core.job_done(runs[0].job, self.now))

    def ask(self, identity: bytes, obj, conn=1) -> dict:
        """One request answered (running the device call if it needs one)."""
        actions = self.send(identity, obj, conn) + self.run_all()
        return one_reply(actions)


def test_query_is_queued_then_run_and_answered_with_its_id():
    h = Harness()
    assert h.send(b"a", {"type": "query", "param": "WAVELENGTH", "id": 7}) == []
    assert h.core.has_work
    actions = h.core.start_next(h.now)
    assert [type(a) for a in actions] == [Run]
    assert h.core.running is actions[0].job
    assert not h.core.has_work
    actions[0].job.run()
    reply = one_reply(h.core.job_done(actions[0].job, h.now))
    assert reply == {"status": "ok", "result": 532.0, "id": 7}
    assert h.core.running is None


def test_reply_route_keeps_req_framing():
    h = Harness()
    actions = h.core.receive(b"req", [b"", b'{"type": "ping"}'], h.now, 1)
    assert sends(actions)[0].route == [b"req", b""]


def test_a_second_call_waits_for_the_first():
    h = Harness()
    h.send(b"a", {"type": "call", "func": "sleep", "args": [0], "id": 1})
    first = h.core.start_next(h.now)
    h.send(b"b", {"type": "query", "param": "POWER", "id": 2})
    assert h.core.start_next(h.now) == []  # busy: nothing starts
    ping = one_reply(h.send(b"c", {"type": "ping"}))
    assert ping["result"]["busy"] and ping["result"]["queue_depth"] == 1
    first[0].job.run()
    assert one_reply(h.core.job_done(first[0].job, h.now))["id"] == 1
    assert one_reply(h.run_all())["id"] == 2


# ---- bounds -----------------------------------------------------------------------------------
def test_device_queue_bound_refuses_at_once_with_busy_error():
    h = Harness(max_queue_per_device=10, max_queue_per_session=100)
    for i in range(10):
        assert h.send(bytes([i]), {"type": "query", "param": "POWER", "id": i}) == []
    actions = h.send(b"late", {"type": "query", "param": "POWER", "id": 99})
    reply = one_reply(actions)
    assert reply["type"] == "BusyError" and reply["id"] == 99
    assert "10 calls are already queued" in reply["error"]
    assert reply["bound"] == "max_queue_per_device" and reply["limit"] == 10
    assert Count("refused", ("max_queue_per_device",)) in actions
    assert h.core.queue_depth == 10


def test_session_queue_bound_is_per_peer():
    h = Harness(max_queue_per_session=3)
    for i in range(3):
        assert h.send(b"greedy", {"type": "query", "param": "POWER", "id": i}) == []
    reply = one_reply(h.send(b"greedy", {"type": "query", "param": "POWER", "id": 3}))
    assert reply["type"] == "BusyError" and reply["bound"] == "max_queue_per_session"
    # another peer is not affected, and the greedy one may queue again once served
    assert h.send(b"other", {"type": "query", "param": "POWER", "id": 4}) == []
    assert len(replies(h.run_all())) == 4
    assert h.send(b"greedy", {"type": "query", "param": "POWER", "id": 5}) == []


def test_waiters_are_capped_and_wait_is_capped():
    h = Harness(max_waiters=2, max_wait_s=5.0)
    holder = h.ask(b"h", {"type": "connect", "resources": LINE0, "lease": 10})
    assert holder["status"] == "ok"
    for i in range(2):
        assert h.send(b"w%d" % i, {"type": "connect", "resources": LINE0, "wait": 3600}) == []
    reply = one_reply(h.send(b"w9", {"type": "connect", "resources": LINE0, "wait": 1}))
    assert reply["type"] == "BusyError" and reply["bound"] == "max_waiters"
    # wait=3600 was capped at 5 s: the first waiter gives up after 5 s, naming the holder
    h.now += 5.01
    refused = replies(h.core.tick(h.now))
    assert len(refused) == 2
    assert all(r["type"] == "ResourceAllocationError" for r in refused)
    assert "waited 5 s" in refused[0]["error"] and "held by h" in refused[0]["error"]


def test_waiter_enqueue_is_fast_at_the_cap():
    h = Harness(max_waiters=1000)
    h.ask(b"h", {"type": "connect", "resources": LINE0, "lease": 10})
    start = time.perf_counter()
    for i in range(1000):
        h.send(b"w%d" % i, {"type": "connect", "resources": LINE0, "wait": 60})
    assert time.perf_counter() - start < 0.5
    assert h.core.locks.waiting == 1000


def test_connect_paths_are_bounded_and_refusals_are_short():
    h = Harness(max_connect_paths=4096)
    start = time.perf_counter()
    reply = h.ask(b"a", {"type": "connect", "resources": ["Dev1"] * 400000})
    assert time.perf_counter() - start < 0.5
    assert reply["type"] == "ProtocolError" and "more than 4096" in reply["error"]
    unknown = [f"nope{i}" for i in range(4000)]
    reply = h.ask(b"a", {"type": "connect", "resources": unknown})
    assert reply["type"] == "ResourceAllocationError"
    assert "(+3995 more)" in reply["error"] and len(json.dumps(reply)) < 2000
    # a repeated prefix is fine: 4096 copies name three leaves
    ok = h.ask(b"a", {"type": "connect", "resources": ["Dev1/port0"] * 4096, "lease": 5})
    assert ok["result"]["resources"] == ["Dev1/port0/line0", "Dev1/port0/line1"]


def test_connect_metadata_is_bounded():
    h = Harness(max_metadata_bytes=100)
    reply = h.ask(b"a", {"type": "connect", "name": "x" * 200})
    assert reply["type"] == "ProtocolError" and "limit is 100" in reply["error"]
    assert h.ask(b"a", {"type": "connect", "name": "pump-probe"})["status"] == "ok"


def test_oversize_request_gets_protocol_error():
    h = Harness(max_message_bytes=1000)
    reply = h.ask(b"a", {"type": "ping", "pad": "x" * 2000})
    assert reply["type"] == "ProtocolError" and "limit of 1000 bytes" in reply["error"]


def test_deeply_nested_json_is_a_protocol_error_not_an_internal_one():
    h = Harness()
    reply = one_reply(h.core.receive(b"a", [b"[" * 100000], h.now, 1))
    assert reply["type"] == "ProtocolError"


def test_log_lines_per_cause_are_bounded_with_a_summary():
    h = Harness(log_burst=5, log_interval_s=60)
    logs = []
    for i in range(5000):
        actions = h.core.receive(b"x%d" % i, [b"\xff\xfe not json"], h.now, i)
        assert one_reply(actions)["type"] == "ProtocolError"
        logs += [a for a in actions if isinstance(a, Log)]
    assert len(logs) == 5
    h.now += 61
    summary = [a for a in h.core.tick(h.now) if isinstance(a, Log)]
    assert len(summary) == 1 and "4995 more 'malformed request'" in summary[0].message


# ---- grants belong to the token or the live connection -----------------------------------
def test_plesty_grant_is_bound_to_its_connection_not_its_client_id():
    h = Harness()
    granted = h.ask(b"plesty-1", {"type": "connect", "resources": LINE0}, conn=1)
    assert granted["result"]["lease"] is None
    # the same routing id on another connection (a stranger who read it from `locks`)
    write = {"type": "call", "func": "sleep", "args": [0]}
    refused = h.ask(b"plesty-1", write, conn=2)
    assert refused["type"] == "ResourceLockedError"
    h.ask(b"plesty-1", {"type": "disconnect"}, conn=2)
    assert h.core.locks.holder(LINE0) is not None
    # the holder itself, on its own connection, without the token
    assert h.ask(b"plesty-1", write, conn=1)["status"] == "ok"
    # its connection closes: the grant ends (PLESTY: held until disconnect)
    h.core.peer_gone(1, h.now)
    assert h.core.locks.holder(LINE0) is None


def test_hex_client_id_collision_gains_nothing():
    h = Harness()
    raw = bytes([0, 0xFF, 0x10, 0x80])
    h.ask(raw, {"type": "connect", "resources": LINE0}, conn=1)
    shown = h.ask(b"x", {"type": "locks"})["result"]["holders"][0]["client_id"]
    assert shown == raw.hex()
    stranger = shown.encode()
    reply = h.ask(stranger, {"type": "call", "func": "sleep", "args": [0]}, conn=1)
    assert reply["type"] == "ResourceLockedError"


def test_session_token_is_the_only_way_to_act_on_a_leased_grant():
    h = Harness()
    grant = h.ask(b"lab", {"type": "connect", "resources": LINE0, "lease": 10})
    token = grant["result"]["session"]
    write = {"type": "call", "func": "sleep", "args": [0]}
    assert h.ask(b"lab", write)["type"] == "ResourceLockedError"  # same id, no token
    assert h.ask(b"other", {**write, "session": token})["status"] == "ok"


# ---- waiters that vanished never inherit ---------------------------------------------------
def test_waiter_whose_connection_closed_never_inherits():
    h = Harness()
    holder = h.ask(b"h", {"type": "connect", "resources": LINE0, "lease": 10}, conn=1)
    h.send(b"gone", {"type": "connect", "resources": LINE0, "wait": 3600}, conn=2)
    h.core.peer_gone(2, h.now)
    token = holder["result"]["session"]
    actions = h.send(b"h", {"type": "disconnect", "session": token}, conn=1)
    assert [r["result"]["client_id"] for r in replies(actions)] == ["h"]
    assert h.core.locks.holder(LINE0) is None
    assert h.ask(b"live", {"type": "connect", "resources": LINE0, "lease": 5})["status"] == "ok"


def test_grant_that_cannot_be_delivered_passes_to_the_next_waiter():
    h = Harness()
    holder = h.ask(b"h", {"type": "connect", "resources": LINE0, "lease": 10})
    h.send(b"ghost", {"type": "connect", "resources": LINE0, "wait": 60, "id": 1}, conn=None)
    h.send(b"live", {"type": "connect", "resources": LINE0, "wait": 60, "id": 2}, conn=3)
    actions = h.send(b"h", {"type": "disconnect", "session": holder["result"]["session"]})
    grant_send = next(s for s in sends(actions) if s.grant is not None)
    assert grant_send.route == [b"ghost"]
    # the loop could not reach the ghost
    passed = h.core.undeliverable(grant_send, "peer_gone", h.now)
    assert Count("reply_dropped", ("peer_gone",)) in passed
    assert [s.route for s in sends(passed)] == [[b"live"]]
    assert h.core.locks.holder(LINE0).client_id == "live"


# ---- budgets ---------------------------------------------------------------------------------
def test_budget_expiry_of_a_queued_call_frees_its_queue_slot():
    h = Harness(max_queue_per_session=1)
    h.send(b"a", {"type": "call", "func": "sleep", "args": [0]})
    running = h.core.start_next(h.now)[0].job
    h.send(b"b", {"type": "query", "param": "POWER", "timeout": 0.5, "id": 1})
    h.now += 0.6
    reply = one_reply(h.core.tick(h.now))
    assert reply["type"] == "TimeoutError" and reply["started"] is False
    assert h.send(b"b", {"type": "query", "param": "POWER", "id": 2}) == []
    running.run()
    h.core.job_done(running, h.now)
    assert one_reply(h.run_all())["id"] == 2


def test_shutdown_answers_every_unanswered_call():
    h = Harness()
    h.send(b"a", {"type": "call", "func": "sleep", "args": [0], "id": 1})
    h.core.start_next(h.now)
    h.send(b"b", {"type": "query", "param": "POWER", "id": 2})
    found = replies(h.core.shutdown(h.now))
    assert sorted(r["id"] for r in found) == [1, 2]
    assert {r["type"] for r in found} == {"ShutdownError"}


# ---- random sequences: the invariants ---------------------------------------------------------
REQUESTS = [
    {"type": "query", "param": "POWER"},
    {"type": "query", "param": "NOPE"},
    {"type": "write", "param": "WAVELENGTH", "value": 600},
    {"type": "write", "param": "WAVELENGTH", "value": "bad"},
    {"type": "call", "func": "sleep", "args": [0]},
    {"type": "call", "func": "add", "args": [1, 2], "timeout": 0.3},
    {"type": "call", "func": "fail"},
    {"type": "call", "func": "missing"},
    {"type": "connect", "resources": LINE0},
    {"type": "connect", "resources": LINE0, "lease": 1.0},
    {"type": "connect", "resources": "Dev1/port0", "lease": 2.0, "wait": 1.5},
    {"type": "connect", "resources": ["nope"] * 3},
    {"type": "disconnect"},
    {"type": "heartbeat", "session": "stale"},
    {"type": "ping"},
    {"type": "describe"},
    {"type": "locks"},
]


def _check_invariants(core: ServerCore) -> None:
    holders = core.locks._holder
    for leaf, session in holders.items():
        grant = core.locks.grant(session)
        assert grant is not None and leaf in grant.leaves
    held = [leaf for grant in core.locks.sessions() for leaf in grant.leaves]
    assert len(held) == len(set(held)), "two sessions hold one resource"
    for grant in core.locks.sessions():
        assert all(holders[leaf] == grant.session for leaf in grant.leaves)


def test_random_sequences_keep_every_invariant():
    rng = random.Random(12)
    start = time.perf_counter()
    sequences = 2000
    for _ in range(sequences):
        h = Harness(max_queue_per_session=4, max_queue_per_device=8, max_waiters=3)
        conns = {b"p%d" % i: i for i in range(4)}
        peers = list(conns)
        abandoned: set[int] = set()  # sent on a connection that closed: a reply is optional
        log: list = []
        tokens: dict[bytes, str] = {}
        sent: dict[bytes, set[int]] = {p: set() for p in peers}
        answered: dict[bytes, list[int]] = {p: [] for p in peers}
        running = None
        next_id = 0

        def collect(actions, answered=answered, tokens=tokens):
            for s in sends(actions):
                reply = json.loads(s.body)
                if "id" in reply:
                    answered[s.route[0]].append(reply["id"])
                token = (reply.get("result") or {}) if reply.get("status") == "ok" else {}
                if isinstance(token, dict) and token.get("session"):
                    tokens[s.route[0]] = token["session"]

        for _step in range(rng.randint(5, 40)):
            roll = rng.random()
            if roll < 0.55:
                peer = rng.choice(peers)
                conn = conns[peer]
                request = dict(rng.choice(REQUESTS), id=next_id)
                if peer in tokens and rng.random() < 0.7:
                    request["session"] = tokens[peer]
                sent[peer].add(next_id)
                log.append(("req", peer, conn, request, h.now))
                next_id += 1
                collect(h.core.receive(peer, body(request), h.now, conn))
            elif roll < 0.75 and running is None:
                actions = h.core.start_next(h.now)
                collect(actions)
                runs = [a for a in actions if isinstance(a, Run)]
                assert len(runs) <= 1
                if runs:
                    running = runs[0].job
                    running.run()
            elif roll < 0.85 and running is not None:
                assert h.core.running is running  # at most one call on the device
                collect(h.core.job_done(running, h.now))
                log.append(("done", running.label))
                running = None
            elif roll < 0.95:
                h.now += rng.choice([0.1, 0.5, 2.0])
                collect(h.core.tick(h.now))
                log.append(("tick", h.now))
            else:
                peer = rng.choice(peers)
                collect(h.core.peer_gone(conns[peer], h.now))
                abandoned.update(sent[peer] - set(answered[peer]))
                conns[peer] += 100  # it reconnects: a new connection
                log.append(("gone", peer))
            _check_invariants(h.core)
        # drain: every request gets exactly one reply, to the peer that sent it
        if running is not None:
            collect(h.core.job_done(running, h.now))
        for _ in range(50):  # waits end within max wait (1.5 s) and budgets within 0.3 s
            collect(h.run_all())
            if not h.core.in_flight and not h.core.locks.waiting:
                break
            h.now += 1.0
            collect(h.core.tick(h.now))
        for peer in peers:
            got = answered[peer]
            assert len(got) == len(set(got)), f"a request answered twice: {got}"
            assert set(got) <= sent[peer], "a reply reached a peer that did not ask"
            assert sent[peer] - set(got) <= abandoned, "\n".join(map(repr, log))
        _check_invariants(h.core)
    assert time.perf_counter() - start < 20  # thousands of sequences, plain data


def test_every_refusal_bound_is_a_limits_field_and_counted():
    import dataclasses
    import inspect

    from labmesh import metrics
    from labmesh.server import core

    fields = {f.name for f in dataclasses.fields(ServerLimits)}
    assert set(metrics.REFUSAL_BOUNDS) <= fields
    source = inspect.getsource(core)
    for bound in metrics.REFUSAL_BOUNDS:
        assert f'"{bound}"' in source, f"{bound} is never refused by the core"


def test_sessions_are_bounded_by_evicting_the_oldest_that_holds_nothing():
    h = Harness(max_sessions=3)
    holder = h.ask(b"h", {"type": "connect", "resources": LINE0, "lease": 10})
    idle = [h.ask(b"i%d" % i, {"type": "connect", "lease": 10}) for i in range(2)]
    # a fourth connect ends the oldest lock-free session, never the holder's
    assert h.ask(b"new", {"type": "connect", "lease": 10})["status"] == "ok"
    assert h.core.locks.session_count == 3
    stale = h.ask(
        b"i0", {"type": "query", "param": "POWER", "session": idle[0]["result"]["session"]}
    )
    assert stale["type"] == "LeaseExpiredError"
    assert h.core.locks.holder(LINE0).session == holder["result"]["session"]


def test_sessions_all_holding_locks_refuse_a_new_connect():
    h = Harness(max_sessions=2)
    h.ask(b"a", {"type": "connect", "resources": LINE0, "lease": 10})
    h.ask(b"b", {"type": "connect", "resources": "Dev1/port1", "lease": 10})
    reply = h.ask(b"c", {"type": "connect", "lease": 10})
    assert reply["type"] == "BusyError" and reply["bound"] == "max_sessions"


def test_a_plesty_identity_on_a_new_connection_ends_the_old_connections_grant():
    h = Harness()
    h.ask(b"plesty", {"type": "connect", "resources": LINE0}, conn=1)
    # connection 1 closed without the monitor telling (events lost); the client is back on 2
    again = h.ask(b"plesty", {"type": "connect", "resources": "Dev1/port1"}, conn=2)
    assert again["status"] == "ok"
    assert h.core.locks.holder(LINE0) is None
    assert h.core.locks.session_count == 1


# ---- found in review ---------------------------------------------------------------------------
def test_a_token_carrying_session_without_lease_is_not_bound_to_its_connection():
    h = Harness()
    first = h.ask(b"lab", {"type": "connect", "resources": LINE0}, conn=1)
    token = first["result"]["session"]
    # the labmesh client (lease_s=None) resets its socket: same session, new connection
    again = h.ask(b"lab~1", {"type": "connect", "resources": LINE0, "session": token}, conn=2)
    assert again["result"]["session"] == token
    h.core.peer_gone(2, h.now)  # the newer connection closes, the token lives on
    write = {"type": "call", "func": "sleep", "args": [0], "session": token}
    assert h.ask(b"lab~2", write, conn=3)["status"] == "ok"
    assert h.core.locks.holder(LINE0).session == token


def test_plesty_indexes_do_not_grow_over_connect_close_cycles():
    h = Harness()
    for conn in range(2000):
        h.ask(b"plesty", {"type": "connect", "resources": LINE0}, conn=conn)
        h.core.peer_gone(conn, h.now)
    assert h.core.locks.session_count == 0
    assert h.core._plesty.index_sizes() == (0, 0, 0)


def test_ending_a_waiting_session_answers_its_wait():
    h = Harness(max_sessions=2)
    h.ask(b"h", {"type": "connect", "resources": LINE0, "lease": 10})
    waiting = h.send(b"w", {"type": "connect", "lease": 10, "id": "w0"})
    token = one_reply(waiting)["result"]["session"]
    assert (
        h.send(
            b"w", {"type": "connect", "resources": LINE0, "wait": 60, "session": token, "id": "w1"}
        )
        == []
    )
    # a new connect must not evict the waiting session (it holds no lock, but it waits)
    assert one_reply(h.send(b"n", {"type": "connect", "lease": 10}))["type"] == "BusyError"
    # its own disconnect ends the wait with an answer
    found = replies(h.send(b"w", {"type": "disconnect", "session": token, "id": "bye"}))
    assert {r["id"]: r["status"] for r in found} == {"w1": "error", "bye": "ok"}
    assert h.core._waiters_by_conn == {}


def test_waiters_cap_cannot_be_bypassed_by_sessions_with_a_grant():
    h = Harness(max_waiters=2)
    h.ask(b"h", {"type": "connect", "resources": LINE0, "lease": 10})
    refused = 0
    for i in range(20):
        token = h.ask(b"s%d" % i, {"type": "connect", "lease": 10})["result"]["session"]
        actions = h.send(
            b"s%d" % i, {"type": "connect", "resources": LINE0, "wait": 60, "session": token}
        )
        refused += bool(actions) and one_reply(actions)["type"] == "BusyError"
    assert h.core.locks.waiting == 2 and refused == 18


def test_finished_calls_with_huge_timeouts_are_not_kept():
    h = Harness()
    for i in range(5000):
        h.ask(b"a", {"type": "query", "param": "POWER", "timeout": 1e9, "id": i})
    assert len(h.core._deadlines) < 200


def test_long_ids_are_refused_without_being_echoed():
    h = Harness()
    reply = h.ask(b"a", {"type": "ping", "id": "x" * 100_000})
    assert reply["type"] == "ProtocolError" and "id" not in reply
    assert len(json.dumps(reply)) < 300


def test_queued_request_bytes_are_bounded():
    h = Harness(max_queue_bytes=10_000)
    h.send(b"a", {"type": "call", "func": "sleep", "args": [0]})
    h.core.start_next(h.now)  # the device is busy; what follows waits
    big = {"type": "write", "param": "MODE", "value": "CW", "pad": "x" * 4000}
    assert h.send(b"b", big) == [] and h.send(b"c", big) == []
    reply = one_reply(h.send(b"d", big))
    assert reply["type"] == "BusyError" and reply["bound"] == "max_queue_bytes"


def test_a_call_outlasting_its_lease_does_not_make_the_loop_spin():
    h = Harness()
    token = h.ask(b"a", {"type": "connect", "resources": LINE0, "lease": 0.5})["result"]["session"]
    h.send(b"a", {"type": "call", "func": "sleep", "args": [0], "session": token})
    h.core.start_next(h.now)  # runs for a long time: the session is kept alive
    for _ in range(5):
        h.now += 1.0
        h.core.tick(h.now)
        assert h.core.next_wakeup() > h.now
    assert h.core.locks.holder(LINE0) is not None


def test_shutdown_answers_waiting_connects():
    h = Harness()
    h.ask(b"h", {"type": "connect", "resources": LINE0, "lease": 10})
    h.send(b"w", {"type": "connect", "resources": LINE0, "wait": 60, "id": 5})
    found = replies(h.core.shutdown(h.now))
    assert [(r["id"], r["type"]) for r in found] == [(5, "ShutdownError")]


def test_a_client_that_uses_its_token_keeps_its_grant_when_its_first_connection_closes():
    h = Harness()
    # a labmesh client with lease_s=None: its first connect looks like PLESTY's
    token = h.ask(b"lab", {"type": "connect", "resources": LINE0}, conn=1)["result"]["session"]
    write = {"type": "call", "func": "sleep", "args": [0], "session": token}
    assert h.ask(b"lab", write, conn=1)["status"] == "ok"
    h.core.peer_gone(1, h.now)  # its socket was reset; the token goes on
    assert h.ask(b"lab~1", write, conn=2)["status"] == "ok"
    assert h.core.locks.holder(LINE0).session == token


def test_subscription_and_task_status_bounds_refuse_naming_the_bound_and_count_it():
    h = Harness(max_streams_per_session=2, max_streams=3, max_status_waiters=1)
    session = h.ask(b"s", {"type": "connect", "lease": 10})["result"]["session"]
    ok = h.ask(b"s", {"type": "subscribe", "params": ["POWER", "MODE"], "session": session})
    assert set(ok["result"]["topics"]) == {"POWER", "MODE"}
    actions = h.send(b"s", {"type": "subscribe", "params": ["AVERAGING"], "session": session})
    refused = one_reply(actions)
    assert refused["type"] == "BusyError" and refused["bound"] == "max_streams_per_session"
    assert "max_streams_per_session=2 for this session" in refused["error"]
    assert Count("refused", ("max_streams_per_session",)) in actions
    # the refused request took nothing away: the session still has its two streams
    assert len(h.core.subs.topics_of(session)) == 2
    other = h.ask(b"o", {"type": "connect", "lease": 10})["result"]["session"]
    h.ask(b"o", {"type": "subscribe", "params": ["AUTORANGE"], "session": other})
    full = one_reply(
        h.send(b"o", {"type": "subscribe", "params": ["WAVELENGTH"], "session": other})
    )
    assert full["bound"] == "max_streams" and "in all" in full["error"]

    # one waiter per task here: the second wait is refused at once
    started = h.send(b"s", {"type": "call", "func": "sleep", "args": [0], "task": True})
    task = one_reply(started)["result"]["task"]
    assert h.send(b"s", {"type": "task_status", "task": task, "wait": 5}) == []
    second = one_reply(h.send(b"o", {"type": "task_status", "task": task, "wait": 5}))
    assert second["bound"] == "max_status_waiters"
    assert [a for a in h.run_all() if isinstance(a, Send)]  # the waiter is answered at the end
