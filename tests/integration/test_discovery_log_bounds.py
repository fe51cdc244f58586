"""A peer cannot fill the discovery service's log: floods cost a bounded number of lines.

Real discovery services on 127.0.0.1; the log is what pytest's caplog captures from the
service's logger, `labmesh.discovery`.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time

import pytest
import zmq

from labmesh.discovery import DeviceRecord, DiscoveryService

from support import wait_until

pytestmark = pytest.mark.integration

LOGGER = "labmesh.discovery"
FLOOD = 2000
SUMMARY = re.compile(r"^discovery: (\d+) more '(.+)' line\(s\) suppressed ")
EXPIRED_ONE = re.compile(r"^discovery: (\S+) at \S+ on \S+ stopped heartbeating; removed$")
EXPIRED_MANY = re.compile(
    r"^discovery: (\d+) records stopped heartbeating and were removed: "
    r"((?:[\w.-]+, ){0,4}[\w.-]+)(?:, \.\.\. \(\+(\d+) more\))?$"
)


def start_discovery(**kw) -> DiscoveryService:
    return DiscoveryService(
        "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", http_host="127.0.0.1", http_port=0, **kw
    ).start()


def dealer_for(service: DiscoveryService) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(service.address)
    return sock


def service_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def record(name: str, instance: str = "i1") -> DeviceRecord:
    return DeviceRecord(
        name=name, instance=instance, address="tcp://127.0.0.1:5555", host="pc-1", kind="daq"
    )


def malformed_requests(count: int, seed: int = 7) -> list[list[bytes]]:
    """`count` requests the service must refuse as malformed: junk, non-JSON, wrong types."""
    rng = random.Random(seed)
    fixed: list[list[bytes]] = [
        [b"hello"],
        [b"{type: ping}"],
        [b'{"type": "ping"'],
        [b"\xff\xfe not utf-8"],
        [b"[]"],
        [b"42"],
        [b'"ping"'],
        [b"null"],
        [b"{}"],
        [b'{"type": 5}'],
        [b'{"type": "reboot"}'],
        [b'{"type": "lookup", "name": 7}'],
        [b'{"type": "heartbeat", "records": "x"}'],
        [b'{"type": "deregister", "records": [1, 2]}'],
        [b'{"type": "list", "kind": 3}'],
        [b'{"type": "list", "labels": ["a"]}'],
        [b'{"type": "ping", "id": {"a": 1}}'],
        [b'{"type": "ping"}', b'{"type": "ping"}'],  # two body frames
        [b"", b"not json after a REQ-style delimiter"],
    ]
    out = []
    for i in range(count):
        if i % 2:
            out.append(fixed[(i // 2) % len(fixed)])
        else:
            out.append([rng.randbytes(rng.randint(1, 200))])
    return out


def test_a_flood_of_malformed_requests_costs_a_bounded_number_of_log_lines(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    interval_s = 2.0
    service = start_discovery(ttl_s=10, log_interval_s=interval_s)
    sock = dealer_for(service)
    try:
        requests = malformed_requests(FLOOD)
        before = len(caplog.records)
        replies = []
        deadline = time.monotonic() + 30
        for start in range(0, FLOOD, 100):  # 100 in flight at a time: no queue ever fills
            assert time.monotonic() < deadline, "the flood took too long"
            chunk = requests[start : start + 100]
            for frames in chunk:
                sock.send_multipart(frames)
            for _ in chunk:
                assert sock.poll(5000), f"no reply after {len(replies)} of {FLOOD}"
                replies.append(json.loads(sock.recv_multipart()[-1]))
        # every malformed request got its error reply, in order
        assert len(replies) == FLOOD
        assert all(r["status"] == "error" for r in replies)
        assert {r["type"] for r in replies} == {"ProtocolError"}, {r["type"] for r in replies}

        def flood_lines() -> list[str]:
            return [r.getMessage() for r in caplog.records[before:] if r.name == LOGGER]

        def accounted() -> int:  # lines written + lines counted in summaries
            written = sum("malformed request from" in line for line in flood_lines())
            summarized = 0
            for line in flood_lines():
                match = SUMMARY.match(line)
                if match and match[2] == "malformed request":
                    summarized += int(match[1])
            return written + summarized

        # the summaries come from the service's periodic tick once the interval ends
        assert wait_until(lambda: accounted() == FLOOD, 2 * interval_s + 5), (
            accounted(),
            flood_lines(),
        )
        lines = flood_lines()
        assert len(lines) < 20, lines
        written = [line for line in lines if "malformed request from" in line]
        assert len(written) >= 5  # the first lines of the burst are written in full
        assert all("malformed request from" in line for line in written[:5])
        assert all(len(line) < 1000 for line in lines)
        # the service still answers, and normal requests are still served
        rec = record("pm100-a")
        sock.send_multipart([json.dumps({"type": "register", "record": rec.to_dict()}).encode()])
        assert sock.poll(2000)
        assert json.loads(sock.recv_multipart()[-1])["status"] == "ok"
        sock.send_multipart([json.dumps({"type": "lookup", "name": "pm100-a", "id": 1}).encode()])
        assert sock.poll(2000)
        found = json.loads(sock.recv_multipart()[-1])
        assert found["status"] == "ok" and found["id"] == 1
        assert found["result"]["address"] == "tcp://127.0.0.1:5555"
        assert service.healthy
    finally:
        sock.close()
        service.stop()


def test_hundreds_of_records_expiring_together_cost_a_handful_of_lines(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    count = 500
    service = start_discovery(ttl_s=2.0)
    sock = dealer_for(service)
    try:
        names = [f"dev-{i:03d}" for i in range(count)]
        started = time.monotonic()
        for i, name in enumerate(names):  # pipelined: all 500 register within one TTL tick
            body = {"type": "register", "id": i, "record": record(name, f"i{i}").to_dict()}
            sock.send_multipart([json.dumps(body).encode()])
        for _ in names:
            assert sock.poll(5000)
            assert json.loads(sock.recv_multipart()[-1])["status"] == "ok"
        assert time.monotonic() - started < 1.5, "registering took longer than the TTL"
        # then the "network cut": no heartbeats; every record expires

        def expired_names() -> tuple[int, list[str]]:
            total, named = 0, []
            for line in service_lines(caplog):
                if match := EXPIRED_MANY.match(line):
                    total += int(match[1])
                    named += match[2].split(", ")
                    assert int(match[1]) == len(match[2].split(", ")) + int(match[3] or 0)
                elif match := EXPIRED_ONE.match(line):
                    total += 1
                    named.append(match[1])
            return total, named

        assert wait_until(lambda: expired_names()[0] == count, 2.0 + 5), service_lines(caplog)
        sock.send_multipart([b'{"type": "ping"}'])
        assert sock.poll(2000)
        assert json.loads(sock.recv_multipart()[-1])["result"]["devices"] == 0
        lines = service_lines(caplog)
        expiry_lines = [line for line in lines if "stopped heartbeating" in line]
        assert 1 <= len(expiry_lines) <= 5, expiry_lines
        assert set(expired_names()[1]) <= set(names)
        # registering and expiring 500 records, start line included: a handful of lines
        assert len(lines) < 20, lines
    finally:
        sock.close()
        service.stop()
