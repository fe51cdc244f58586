"""Drive a device server with the real PLESTY client (run with the interop venv's python).

    <interop-venv>/bin/python peer_plesty_client.py ADDRESS [options]

Steps, each recorded as `{"ok": true, "value": ...}` or `{"ok": false, "raised": <class>,
"message": <str>}`:

    connect           build_client(ADDRESS, resources=..., client_id=..., connect_kwargs=...)
    describe          client.describe()
    query             client.query(PARAM)
    write             client.write(PARAM, VALUE)
    query_after       client.query(PARAM)
    call              getattr(client, OP)(*OP_ARGS, **OP_KWARGS)   (the describe-bound proxy)
    bad_write         client.write(PARAM, BAD_VALUE)                (PLESTY raises RuntimeError)
    contender         (--contend) a second client asking for the same resources
    disconnect        client.disconnect_from_server()
    close             client.close()
    contender_after   (--contend) the second client again, after the first disconnected
    contender_close   its close()

With --connect-only only `connect` (and `close` when it succeeded) run. The results are printed
as one JSON line on stdout; the exit status is 0 whenever that line was printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from plesty.lib.service import build_client


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def step(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one step and record its outcome; return its value (None when it raised)."""
    started = time.monotonic()
    try:
        value = fn()
    except Exception as exc:  # the outcome is the data here, whatever it is
        results[name] = {
            "ok": False,
            "raised": type(exc).__name__,
            "message": str(exc),
            "s": round(time.monotonic() - started, 3),
        }
        return None
    elapsed = round(time.monotonic() - started, 3)
    results[name] = {"ok": True, "value": _jsonable(value), "s": elapsed}
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"address": args.address}
    resources = json.loads(args.resources) if args.resources is not None else None
    connect_kwargs = json.loads(args.connect_kwargs) if args.connect_kwargs else None

    def new_client(client_id: str) -> Any:
        return build_client(
            args.address,
            timeout=args.timeout_ms,
            resources=resources,
            client_id=client_id,
            connect_kwargs=connect_kwargs,
        )

    client = step(results, "connect", lambda: new_client(args.client_id))
    if client is None:
        return results
    results["connect"]["value"] = _jsonable(client.connection_info)
    if args.connect_only:
        step(results, "close", client.close)
        return results

    step(results, "describe", client.describe)
    step(results, "query", lambda: client.query(args.param))
    step(results, "write", lambda: client.write(args.param, json.loads(args.value)))
    step(results, "query_after", lambda: client.query(args.param))
    results["op_bound"] = hasattr(client, args.op)
    op_args = json.loads(args.op_args)
    op_kwargs = json.loads(args.op_kwargs)
    step(results, "call", lambda: getattr(client, args.op)(*op_args, **op_kwargs))
    step(results, "bad_write", lambda: client.write(args.param, json.loads(args.bad_value)))

    contender_id = f"{args.client_id}-contender"
    if args.contend:
        other = step(results, "contender", lambda: new_client(contender_id))
        if other is not None:  # should not happen; do not leave it connected
            other.close()
    step(results, "disconnect", client.disconnect_from_server)
    step(results, "close", client.close)
    if args.contend:
        other = step(results, "contender_after", lambda: new_client(contender_id))
        if other is not None:
            results["contender_after"]["value"] = _jsonable(other.connection_info)
            step(results, "contender_close", other.close)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--resources", help="JSON: a string, a list or a nested tree")
    parser.add_argument("--client-id", default="plesty-interop")
    parser.add_argument("--connect-kwargs", help="JSON object of connect metadata")
    parser.add_argument("--timeout-ms", type=int, default=3000)
    parser.add_argument("--param", default="WAVELENGTH")
    parser.add_argument("--value", default="800", help="JSON value to write")
    parser.add_argument("--bad-value", default="2000", help="JSON value the device must refuse")
    parser.add_argument("--op", default="fire")
    parser.add_argument("--op-args", default="[]", help="JSON list")
    parser.add_argument("--op-kwargs", default="{}", help="JSON object")
    parser.add_argument(
        "--contend", action="store_true", help="also try a second client for the same resources"
    )
    parser.add_argument("--connect-only", action="store_true")
    args = parser.parse_args()
    results = run(args)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
