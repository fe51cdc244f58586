"""The `labmesh` command line.

Exit codes: 0 success; 1 the operation failed (device error, not reachable, timeout);
2 usage or configuration error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from labmesh import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labmesh", description="Networked lab instruments over ZeroMQ."
    )
    parser.add_argument("--version", action="version", version=f"labmesh {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
        level=logging.DEBUG if args.debug else logging.INFO,
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
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        print(f"labmesh: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
