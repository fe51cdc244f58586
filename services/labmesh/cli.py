"""The `labmesh` command line.

Exit codes: 0 success; 1 the operation failed (device error, not reachable, timeout);
2 usage or configuration error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from labmesh import __version__
from labmesh.protocol.errors import LabmeshError, RemoteError
from labmesh.signals import stop_signals, wait_for_signal

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: The lease `monitor` keeps, so a restarted server is noticed and subscribed to again (s).
MONITOR_LEASE_S = 6.0
#: How often `call` redraws a task's progress, and how long Ctrl+C waits for the stop (s).
PROGRESS_PERIOD_S = 0.2
CANCEL_WAIT_S = 5.0
#: Commands that run until stopped log what they do; one-shot commands only warn.
_LONG_RUNNING = {"serve", "discovery", "demo"}

log = logging.getLogger("labmesh.cli")


class CliError(LabmeshError):
    """An error reported as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def cmd_serve(args: argparse.Namespace) -> int:
    from labmesh.config import ConfigError, load_host_config
    from labmesh.host import HostServer, ports_in_use

    if len(args.config) != 1:
        raise CliError(
            f"serve takes one host file, got {len(args.config)}: {', '.join(args.config)}; run "
            "one `labmesh serve` per host file (each instrument PC has its own)",
            EXIT_USAGE,
        )
    try:
        config = load_host_config(args.config[0])
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    taken = ports_in_use(config, args.bind or config.bind)
    if taken:
        raise CliError(
            f"{config.path}: cannot listen on {', '.join(taken)}: another program (another "
            "`labmesh serve`?) has it; stop it, or change the port in the host file "
            "(metrics_port: null turns metrics off)",
            EXIT_USAGE,
        )
    with stop_signals() as stop:  # (from before the first device opens)
        host = HostServer(config, sim=args.sim, bind=args.bind).start()
        try:
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
            signalled = wait_for_signal(check=lambda: not host.finished, stop=stop)
        finally:
            host.stop()
    if not signalled:
        for row in host.status():
            print(f"{row['name']:<20} {row['state']}  ({row['error']})", flush=True)
    print("labmesh serve: stopped", flush=True)
    return EXIT_OK


def parse_value(text: str) -> Any:
    """A command-line value: JSON if it parses (1064, true, [1, 2], "x"), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


def typed_value(text: str, param: dict[str, Any] | None) -> Any:
    """A command-line value for a parameter of the declared type (describe's `dtype`):
    bool takes true/false/1/0/yes/no/on/off in any case, int and float take numbers, str takes
    the text as typed (quotes optional); any other type, or an unknown parameter, gets
    parse_value. ValueError names the type expected."""
    dtype = (param or {}).get("dtype")
    name = (param or {}).get("name", "the parameter")
    if dtype == "bool":
        word = text.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise CliError(
            f"{name} takes a bool: true or false (also 1/0, yes/no, on/off), got {text!r}",
            EXIT_USAGE,
        )
    if dtype in ("int", "float"):
        try:
            number = json.loads(text)
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise CliError(
                f"{name} takes {'an int' if dtype == 'int' else 'a float'}, got {text!r}",
                EXIT_USAGE,
            )
        return number
    if dtype == "str":
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return text[1:-1]
        return text
    return parse_value(text)


def _parameter(client: Any, name: str) -> dict[str, Any] | None:
    for param in (client.description.get("doc") or {}).get("parameters", {}).get("default", []):
        if param.get("name") == name:
            return param
    return None


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

    options.setdefault("lease_s", None)
    if getattr(args, "server_key", None):
        options.setdefault("server_key", args.server_key)
    return build_client(name, timeout=args.timeout, discovery=_resolver(args), **options)


def _resolver(args: argparse.Namespace) -> Any:
    """The Resolver for --discovery (or LABMESH_DISCOVERY), made once per command."""
    from labmesh.discovery import Resolver

    if getattr(args, "_resolver", None) is None:
        args._resolver = Resolver(args.discovery)
    return args._resolver


def _records(args: argparse.Namespace) -> list[dict[str, Any]]:
    from labmesh.discovery import DiscoveryUnavailableError

    try:
        return sorted(_resolver(args).list(), key=lambda r: r["name"])
    except DiscoveryUnavailableError as exc:
        raise CliError(str(exc)) from None


def _device_status(args: argparse.Namespace, record: dict[str, Any]) -> dict[str, Any]:
    """Ping a device and read its locks, quickly; a dead one is reported as down."""
    from labmesh.client import build_client

    row = {k: record.get(k) for k in ("name", "kind", "host", "address")}
    row.update(up=False, healthy=False, holders=[])
    try:
        client = build_client(
            record["address"],
            timeout=min(args.timeout, 1500),
            retries=0,
            lease_s=None,
            server_key=record.get("server_key"),
        )
    except (OSError, RemoteError, LabmeshError) as exc:
        row["error"] = str(exc)
        return row
    try:
        pong = client.ping()
        locks = client.locks()
        row.update(
            up=True,
            healthy=pong.get("healthy", False),
            busy=pong.get("busy", False),
            holders=locks.get("holders", []),
        )
    except (OSError, RemoteError) as exc:
        row["error"] = str(exc)
    finally:
        client.close()
    return row


def _holder_summary(holders: list[dict[str, Any]]) -> str:
    by_holder: dict[str, int] = {}
    for row in holders:
        label = row["metadata"].get("name") or row["client_id"]
        by_holder[label] = by_holder.get(label, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in by_holder.items()) or "-"


def cmd_ls(args: argparse.Namespace) -> int:
    rows = [_device_status(args, record) for record in _records(args)]
    code = EXIT_OK if all(r["up"] for r in rows) else EXIT_FAILED
    if args.json:
        _emit(args, rows)
        return code
    if not rows:
        resolver = _resolver(args)
        print(f"no devices registered at {resolver.source or ', '.join(resolver.endpoints)}")
        return EXIT_OK
    print(f"{'NAME':<18} {'KIND':<11} {'HOST':<14} {'ADDRESS':<26} {'UP':<5} LOCK HOLDERS")
    for row in rows:
        up = ("yes" if row["healthy"] else "sick") if row["up"] else "NO"
        print(
            f"{row['name']:<18} {row['kind']:<11} {row['host']:<14} {row['address']:<26} "
            f"{up:<5} {_holder_summary(row['holders'])}"
        )
    return code


def cmd_watch(args: argparse.Namespace) -> int:
    import zmq

    from labmesh.discovery.resolver import discovery_curve

    info = _resolver(args).watch()
    sock = zmq.Context.instance().socket(zmq.SUB)
    curve = discovery_curve(None, None)  # the feed is as secured as the API
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"device:")
    sock.connect(info["pub"])
    if not args.json:
        print(
            f"watching {info['pub']} ({len(info['devices'])} devices now); Ctrl+C stops", flush=True
        )
    deadline = time.monotonic() + args.seconds if args.seconds else None
    try:
        while deadline is None or time.monotonic() < deadline:
            if not sock.poll(200):
                continue
            _topic, body = sock.recv_multipart()
            event = json.loads(body)
            if args.json:
                print(json.dumps(event), flush=True)
            else:
                record = event.get("record") or {}
                name = record.get("name", event.get("name", "?"))
                print(
                    f"{event.get('event', '?'):<8} {name:<18} "
                    f"{record.get('kind', ''):<11} {record.get('host', ''):<14} "
                    f"{record.get('address', '')}",
                    flush=True,
                )
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        sock.close()
    return EXIT_OK


def cmd_discovery(args: argparse.Namespace) -> int:
    from labmesh.discovery import BeaconSettings, DiscoveryService
    from labmesh.security import Keyring, ServerSecurity, load_key_pair

    security = None
    if args.key:
        if not args.clients:
            raise CliError(
                "--key needs --clients DIR: the directory of NAME.key files of the hosts and "
                "users discovery accepts",
                EXIT_USAGE,
            )
        roles = dict(role.split("=", 1) for role in args.role) if args.role else {}
        security = ServerSecurity(load_key_pair(args.key), Keyring(directories=args.clients), roles)
    elif args.clients:
        raise CliError("--clients needs --key (discovery's own key pair)", EXIT_USAGE)
    with stop_signals() as stop:  # (from before the service starts)
        service = DiscoveryService(
            args.address,
            args.pub,
            http_host=args.http_host,
            http_port=args.http_port,
            ttl_s=args.ttl,
            beacon=None if args.no_beacon else BeaconSettings(),
            security=security,
        ).start()
        print(
            f"labmesh discovery: API {service.address}, changes {service.pub_address}, "
            f"HTTP {service.http_url}; Ctrl+C stops",
            flush=True,
        )
        if service.server_key:
            print(f"  CurveZMQ: LABMESH_DISCOVERY_KEY={service.server_key}", flush=True)
        try:
            wait_for_signal(stop=stop)
        finally:
            service.stop()
    print("labmesh discovery: stopped", flush=True)
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        _emit(args, client.query(args.param))
    return EXIT_OK


def cmd_set(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        ok = client.write(args.param, typed_value(args.value, _parameter(client, args.param)))
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
        if args.operation not in client.description.get("tasks", ()) and not args.detach:
            _emit(args, client.call(args.operation, *positional, **keywords))
            return EXIT_OK
        task = client.start(args.operation, *positional, **keywords)
        if args.detach:
            _emit(args, {"task": task.id, "operation": task.operation, "state": task.state})
            if not args.json:
                print(
                    f"labmesh: follow it with: labmesh task {args.name} {task.id}", file=sys.stderr
                )
            return EXIT_OK
        _emit(args, _follow_task(args, task))
    return EXIT_OK


def _follow_task(args: argparse.Namespace, task: Any) -> Any:
    """Wait for a task, drawing its progress on a terminal; Ctrl+C stops it on the server."""
    bar = sys.stderr.isatty() and not args.json
    try:
        while not task.wait(PROGRESS_PERIOD_S):
            if bar:
                _draw_progress(task.status())
    except KeyboardInterrupt:
        if bar:
            sys.stderr.write("\n")
        status = task.cancel()
        task.wait(CANCEL_WAIT_S)
        outcome = task.status()
        error = (outcome.get("error") or {}).get("error")
        where = f": {error}" if error else f" (state {outcome.get('state', status['state'])})"
        print(
            f"labmesh: interrupted; stopped task {task.id} on {args.name}{where}", file=sys.stderr
        )
        raise
    finally:
        if bar:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    return task.result()


def _draw_progress(status: dict[str, Any]) -> None:
    progress = status.get("progress")
    shown = (
        ", ".join(f"{k}={_short_value(v)}" for k, v in progress.items())
        if isinstance(progress, dict)
        else _short_value(progress)
    )
    line = f"{status.get('label', status.get('operation', ''))} {status.get('running_s', 0):.1f} s"
    if shown:
        line += f"  {shown}"
    sys.stderr.write("\r\033[K" + line[:200])
    sys.stderr.flush()


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)[:60]


def cmd_monitor(args: argparse.Namespace) -> int:
    """camonitor-style: one line per update (time, device, name, value, unit) until Ctrl+C."""
    # a lease: after a server restart the client connects again and subscribes again
    with _client(args, args.name, lease_s=MONITOR_LEASE_S) as client:
        units = {
            p["name"]: p.get("unit") or ""
            for p in (client.description.get("doc") or {}).get("parameters", {}).get("default", [])
        }
        device = client.description.get("name", args.name)
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        with client.subscribe(
            args.params, every_s=args.every, deadband=args.deadband, max_rate_hz=args.rate
        ) as sub:
            while deadline is None or time.monotonic() < deadline:
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                update = sub.get(max(0.0, left))
                if update is None:
                    continue
                if update.missed is None:
                    print(f"labmesh: {device} restarted; subscribed again", file=sys.stderr)
                elif update.missed:
                    print(
                        f"labmesh: {update.missed} update(s) of {update.name} missed",
                        file=sys.stderr,
                    )
                _print_update(args, device, update, units.get(update.name, ""))
    return EXIT_OK


def _print_update(args: argparse.Namespace, device: str, update: Any, unit: str) -> None:
    if args.json:
        record = {
            "device": device,
            "name": update.name,
            "value": update.value,
            "unit": unit or None,
            "ts": update.timestamp,
            "seq": update.seq,
            "missed": update.missed,
        }
        print(json.dumps(record), flush=True)
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(update.timestamp))
    fraction = f"{update.timestamp % 1:.6f}"[1:]
    value = update.value if isinstance(update.value, str) else json.dumps(update.value)
    print(f"{device:<16} {update.name:<20} {when}{fraction} {value} {unit}".rstrip(), flush=True)


def cmd_keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labmesh import keys

    directory = Path(args.dir) if args.dir else keys.default_directory()
    try:
        if args.action == "new":
            public, secret = keys.new_key_pair(directory, args.name)
            key = keys.public_key(str(public), directory)
            _emit(
                args,
                {
                    "name": args.name,
                    "public_key": key,
                    "public": str(public),
                    "secret": str(secret),
                },
                f"{args.name}: public key {key}\n  public  {public}  (give this one out)\n"
                f"  secret  {secret}  (keep it: readable by you only)",
            )
        else:
            _emit(args, keys.public_key(args.name, directory))
    except keys.KeyFileError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return EXIT_OK


def cmd_task(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        payload = {"type": "task_status", "task": args.task}
        if args.cancel:
            payload["type"] = "task_cancel"
        _emit(args, client._request(payload))
    return EXIT_OK


def cmd_describe(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        if args.json:
            _emit(args, client.describe())
        else:
            print(client.help())
    return EXIT_OK


def cmd_locks(args: argparse.Namespace) -> int:
    if args.name is None:
        rows = [_device_status(args, record) for record in _records(args)]
        held = [{"device": r["name"], **h} for r in rows for h in r["holders"]]
        if args.json:
            _emit(args, held)
            return EXIT_OK
        if held:
            print(f"{'DEVICE':<18} {'RESOURCE':<24} {'HOLDER':<40} {'NAME':<16} SINCE / LEFT")
        for row in held:
            label = row["metadata"].get("name") or ""
            print(
                f"{row['device']:<18} {row['resource']:<24} {row['client_id']:<40} "
                f"{label:<16} held {row['since_s']:.1f} s, {row['remaining_s']:.1f} s left"
            )
        if not held:
            print("no locks held")
        return EXIT_OK
    with _client(args, args.name) as client:
        locks = client.locks()
    if args.json:
        _emit(args, locks)
        return EXIT_OK
    if not locks["holders"]:
        print(f"{args.name}: no locks held (lockable: {', '.join(locks['resources']) or '-'})")
    else:
        print(f"{'RESOURCE':<24} {'HOLDER':<40} {'NAME':<16} SINCE / LEFT")
    for row in locks["holders"]:
        label = row["metadata"].get("name") or row["metadata"].get("experiment") or ""
        print(
            f"{row['resource']:<24} {row['client_id']:<40} {label:<16} "
            f"held {row['since_s']:.1f} s, {row['remaining_s']:.1f} s left"
        )
    return EXIT_OK


def cmd_visa(args: argparse.Namespace) -> int:
    from labmesh.drivers.visa import SIM_DIR, list_resources

    library = f"{SIM_DIR / 'pm100.yaml'}@sim" if args.sim else "@py"
    rows, notes = list_resources(library, tcpip=args.tcpip)
    if args.json:
        _emit(args, {"resources": rows, "notes": notes})
        return EXIT_OK
    for row in rows:
        what = " ".join(str(row[k]) for k in ("vendor", "product") if row.get(k))
        serial = f" (serial {row['serial']})" if row.get("serial") else ""
        print(f"{row['resource']:<48} {what}{serial}".rstrip())
    if not rows:
        print("no instruments found" + ("" if args.tcpip else " on USB or serial ports"))
    for note in notes:
        print(f"labmesh: {note}", file=sys.stderr)
    if not args.tcpip:
        print(
            "(network instruments: `labmesh visa list --tcpip` asks the LAN; or write "
            "TCPIP::HOST::INSTR / TCPIP::HOST::5025::SOCKET yourself)",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_unlock(args: argparse.Namespace) -> int:
    with _client(args, args.name) as client:
        released = client.force_release(args.resources)["released"]
    lines = [f"freed {', '.join(r['resources'])} held by {r['holder']}" for r in released]
    _emit(args, released, "\n".join(lines) or "nothing of that was held")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from labmesh import audit

    path = Path(args.file) if args.file else audit.default_path()
    if not path.exists() and not args.follow:
        raise CliError(
            f"no audit trail at {path}: `labmesh serve` writes it there (host file `audit:`, "
            f"or ${audit.ENV_VAR}); give the file as an argument",
            EXIT_USAGE,
        )
    try:
        for line in audit.follow(path, lines=args.lines, forever=args.follow):
            print(line if args.json else audit.describe_line(line), flush=True)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from labmesh import demo
    from labmesh.config import ConfigError

    try:
        return demo.run(args.base_port, args.metrics_port, args.prometheus, secure=args.secure)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


#: The flags every command takes, before or after its name, and their defaults.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "debug": False,
    "json": False,
    "discovery": None,
    "timeout": 5000,
    "server_key": None,
}


def _common_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    group = parser.add_argument_group("common options (before or after the command)")
    group.add_argument(
        "--debug",
        action="store_true",
        default=defaults["debug"],
        help="show tracebacks and debug logs",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=defaults["json"],
        help="machine-readable output (errors too, as JSON on stderr)",
    )
    group.add_argument(
        "--discovery",
        default=defaults["discovery"],
        metavar="ENDPOINTS",
        help="discovery endpoint(s), comma-separated, or auto (default: $LABMESH_DISCOVERY, "
        "else this machine, else the LAN beacon)",
    )
    group.add_argument(
        "--timeout",
        type=int,
        default=defaults["timeout"],
        metavar="MS",
        help="reply timeout in ms (default 5000)",
    )
    group.add_argument(
        "--server-key",
        default=defaults["server_key"],
        metavar="KEY",
        help="a secured server's public key, for a tcp:// address (names get it from discovery)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labmesh", description="Networked lab instruments over ZeroMQ."
    )
    parser.add_argument("--version", action="version", version=f"labmesh {__version__}")
    _common_flags(parser, GLOBAL_DEFAULTS)
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
    call = device_command(
        "call",
        "call an operation: OP [ARG ...] [key=value ...]; a long one (a task) shows its "
        "progress on a terminal, and Ctrl+C stops it on the device",
        cmd_call,
    )
    call.add_argument("operation")
    call.add_argument("arguments", nargs="*")
    call.add_argument(
        "--detach", action="store_true", help="start it as a task, print its id and return"
    )
    monitor = device_command(
        "monitor", "print updates of parameters as they come (Ctrl+C stops)", cmd_monitor
    )
    monitor.add_argument("params", nargs="+", metavar="PARAM")
    monitor.add_argument("--every", type=float, metavar="S", help="have the server read every S s")
    monitor.add_argument("--deadband", type=float, help="skip changes smaller than this")
    monitor.add_argument("--rate", type=float, metavar="HZ", help="at most HZ updates a second")
    monitor.add_argument("--seconds", type=float, help="stop after this long")
    task = device_command("task", "the status of a task (the running one by default)", cmd_task)
    task.add_argument("task", nargs="?", help="task id (from call --detach)")
    task.add_argument("--cancel", action="store_true", help="stop it")
    device_command("describe", "parameters, operations and resources of a device", cmd_describe)
    unlock = device_command(
        "unlock", "force-release locks another session holds (admin role)", cmd_unlock
    )
    unlock.add_argument("resources", nargs="+", metavar="RESOURCE")
    visa = sub.add_parser(
        "visa", help="`visa list`: the VISA resources (instruments) this PC sees, for host files"
    )
    visa.add_argument("action", choices=("list",))
    visa.add_argument(
        "--tcpip", action="store_true", help="also search the LAN (VXI-11 broadcast, HiSLIP)"
    )
    visa.add_argument("--sim", action="store_true", help="list the simulated instruments")
    visa.set_defaults(func=cmd_visa)
    audit = sub.add_parser("audit", help="print (and follow) a host's audit trail")
    audit.add_argument("file", nargs="?", help="the trail (default: $LABMESH_AUDIT or ~/.local)")
    audit.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    audit.add_argument("-n", "--lines", type=int, default=20, help="last N lines first (20)")
    audit.set_defaults(func=cmd_audit)
    keys = sub.add_parser("keys", help="CurveZMQ key pairs: `keys new NAME`, `keys show NAME`")
    keys.add_argument("action", choices=("new", "show"))
    keys.add_argument("name", help="key name (new), or key name or .key file (show)")
    keys.add_argument(
        "--dir", help="keys directory (default: $LABMESH_KEYS or ~/.config/labmesh/keys)"
    )
    keys.set_defaults(func=cmd_keys)
    locks = sub.add_parser("locks", help="who holds which resource (of one device, or all)")
    locks.add_argument("name", nargs="?", help="device name or address (default: every device)")
    locks.set_defaults(func=cmd_locks)
    ls = sub.add_parser("ls", help="every registered device: kind, host, address, up, holders")
    ls.set_defaults(func=cmd_ls)
    watch = sub.add_parser("watch", help="print registrations as they change")
    watch.add_argument("--seconds", type=float, help="stop after this long")
    watch.set_defaults(func=cmd_watch)

    demo = sub.add_parser("demo", help="a whole simulated lab on this machine (Ctrl+C stops)")
    demo.add_argument("--base-port", type=int, default=5550, help="first of its ports (5550)")
    demo.add_argument("--metrics-port", type=int, default=9105, help="first metrics port")
    demo.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus (binary on PATH) with the shipped config",
    )
    demo.add_argument(
        "--secure",
        action="store_true",
        help="a secured lab: CurveZMQ keys, roles, an audit trail (prints what to export)",
    )
    demo.set_defaults(func=cmd_demo)

    disc = sub.add_parser("discovery", help="run the discovery service")
    disc.add_argument("--address", default="tcp://*:5550", help="ZeroMQ API endpoint")
    disc.add_argument("--pub", default="tcp://*:5551", help="change feed endpoint")
    disc.add_argument("--http-host", default="0.0.0.0", help="HTTP interface")
    disc.add_argument("--http-port", type=int, default=5552, help="HTTP port (/targets, ...)")
    disc.add_argument("--ttl", type=float, default=10.0, help="registration lifetime (s)")
    disc.add_argument("--no-beacon", action="store_true", help="no LAN multicast beacon")
    disc.add_argument("--key", help="serve with CurveZMQ: discovery's key pair (name or path)")
    disc.add_argument(
        "--clients", action="append", help="directory of accepted NAME.key files (repeatable)"
    )
    disc.add_argument(
        "--role",
        action="append",
        metavar="NAME=ROLE",
        help="operator registers devices, observer only looks up (default: *=operator)",
    )
    disc.set_defaults(func=cmd_discovery)

    serve = sub.add_parser("serve", help="serve the instruments of one host file")
    serve.add_argument("config", nargs="+", help="the host's lab YAML file (one per process)")
    serve.add_argument("--sim", action="store_true", help="simulate every instrument")
    serve.add_argument("--bind", help="listen on this interface instead of the file's bind")
    serve.set_defaults(func=cmd_serve)
    # the common flags after the command too (`labmesh ls --json`), listed in its --help;
    # SUPPRESS keeps one given before the command from being reset by the command's parser
    for command in sub.choices.values():
        _common_flags(command, dict.fromkeys(GLOBAL_DEFAULTS, argparse.SUPPRESS))
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
        return _report(args, str(exc), "CliError", exc.code)
    except RemoteError as exc:
        where = getattr(args, "name", "")
        return _report(args, str(exc), exc.type, EXIT_FAILED, where)
    except TimeoutError as exc:
        return _report(args, str(exc), "TimeoutError", EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `labmesh describe x | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:
        code = EXIT_USAGE if type(exc).__name__ in _USAGE_ERRORS else EXIT_FAILED
        return _report(args, str(exc), type(exc).__name__, code, plain_type=True)
    finally:
        _note_discovery(args)


def _note_discovery(args: argparse.Namespace) -> None:
    """Say which discovery answered when none was configured (or that an address came from
    the address book because none answered)."""
    resolver = getattr(args, "_resolver", None)
    if resolver is None or resolver.source is None or getattr(args, "json", False):
        return
    if resolver.implicit or "address book" in resolver.source:
        print(f"labmesh: (discovery: {resolver.source})", file=sys.stderr)


#: Local errors that are a setup mistake (exit 2), not a failed operation.
_USAGE_ERRORS = {"KeyFileError", "ConfigError"}


def _report(
    args: argparse.Namespace,
    message: str,
    kind: str,
    code: int,
    where: str = "",
    plain_type: bool = False,
) -> int:
    """One error line on stderr (a JSON object with --json), and the exit code; with --debug,
    the traceback of the error being handled first."""
    if getattr(args, "debug", False):
        traceback.print_exc(file=sys.stderr)
    if getattr(args, "json", False):
        error = {"error": message, "type": kind, "exit": code}
        if where:
            error["device"] = where
        print(json.dumps(error), file=sys.stderr)
    elif kind == "CliError":
        print(f"labmesh: {message}", file=sys.stderr)
    elif where:
        print(f"labmesh: {where}: {kind}: {message}", file=sys.stderr)
    elif plain_type:
        print(f"labmesh: {kind}: {message}", file=sys.stderr)
    else:
        print(f"labmesh: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
