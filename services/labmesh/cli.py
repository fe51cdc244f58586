"""The `labmesh` command line.

Exit codes: 0 success; 1 the operation failed (device error, not reachable, timeout);
2 usage or configuration error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from labmesh import __version__
from labmesh.protocol.errors import RemoteError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Commands that run until stopped log what they do; one-shot commands only warn.
_LONG_RUNNING = {"serve", "discovery", "demo"}

log = logging.getLogger("labmesh.cli")


class CliError(Exception):
    """An error reported as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_serve(args: argparse.Namespace) -> int:
    from labmesh.config import ConfigError, load_host_config
    from labmesh.host import HostServer

    try:
        config = load_host_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    host = HostServer(config, sim=args.sim, bind=args.bind).start()
    host.wait_ready(timeout=30)
    for row in host.status():
        line = f"{row['name']:<20} {row['driver']:<12} {row['address']:<28} {row['state']}"
        if row["error"]:
            line += f"  ({row['error']})"
        print(line, flush=True)
    print(
        f"labmesh serve: host {config.host}, {len(config.devices)} device(s); Ctrl+C stops",
        flush=True,
    )
    try:
        _wait_for_signal()
    finally:
        host.stop()
    print("labmesh serve: stopped", flush=True)
    return EXIT_OK


def parse_value(text: str) -> Any:
    """A command-line value: JSON if it parses (1064, true, [1, 2], "x"), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _emit(args: argparse.Namespace, value: Any, human: str | None = None) -> None:
    if args.json:
        print(json.dumps(value, indent=None if isinstance(value, (int, float, str)) else 2))
    else:
        print(human if human is not None else _plain(value))


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2)


def _client(args: argparse.Namespace, name: str, **options: Any) -> Any:
    from labmesh.client import build_client

    return build_client(name, timeout=args.timeout, lease_s=None, **options)


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        _emit(args, client.query(args.param))
    return EXIT_OK


def cmd_set(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        ok = client.write(args.param, parse_value(args.value))
    _emit(args, ok, "ok" if ok else "refused by the instrument")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_call(args: argparse.Namespace) -> int:
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for item in args.arguments:
        key, sep, value = item.partition("=")
        if sep and key.isidentifier():
            keywords[key] = parse_value(value)
        else:
            positional.append(parse_value(item))
    with _client(args, args.name) as client:
        _emit(args, client.call(args.operation, *positional, **keywords))
    return EXIT_OK


def cmd_describe(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        if args.json:
            _emit(args, client.describe())
        else:
            print(client.help())
    return EXIT_OK


def cmd_locks(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        locks = client.locks()
    if args.json:
        _emit(args, locks)
        return EXIT_OK
    if not locks["holders"]:
        print(f"{args.name}: no locks held (lockable: {', '.join(locks['resources']) or '-'})")
    for row in locks["holders"]:
        label = row["metadata"].get("name") or row["metadata"].get("experiment") or ""
        print(
            f"{row['resource']:<24} {row['client_id']:<40} {label:<16} "
            f"held {row['since_s']:.1f} s, {row['remaining_s']:.1f} s left"
        )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labmesh", description="Networked lab instruments over ZeroMQ."
    )
    parser.add_argument("--version", action="version", version=f"labmesh {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--timeout", type=int, default=5000, metavar="MS", help="reply timeout (default 5000)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def device_command(name: str, helptext: str, func: Any) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("name", help="device name (via discovery) or address tcp://HOST:PORT")
        cmd.set_defaults(func=func)
        return cmd

    get = device_command("get", "read a parameter", cmd_get)
    get.add_argument("param")
    set_ = device_command("set", "write a parameter (VALUE is JSON, or a plain string)", cmd_set)
    set_.add_argument("param")
    set_.add_argument("value")
    call = device_command("call", "call an operation: OP [ARG ...] [key=value ...]", cmd_call)
    call.add_argument("operation")
    call.add_argument("arguments", nargs="*")
    device_command("describe", "parameters, operations and resources of a device", cmd_describe)
    device_command("locks", "who holds which resource of a device", cmd_locks)

    serve = sub.add_parser("serve", help="serve the instruments of one host file")
    serve.add_argument("config", help="the host's lab YAML file")
    serve.add_argument("--sim", action="store_true", help="simulate every instrument")
    serve.add_argument("--bind", help="listen on this interface instead of the file's bind")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.debug
        else logging.INFO
        if args.command in _LONG_RUNNING
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except CliError as exc:
        print(f"labmesh: {exc}", file=sys.stderr)
        return exc.code
    except RemoteError as exc:
        where = getattr(args, "name", "")
        print(f"labmesh: {where}: {exc.type}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except TimeoutError as exc:
        print(f"labmesh: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `labmesh describe x | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:
        if args.debug:
            raise
        print(f"labmesh: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
