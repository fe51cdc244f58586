"""Everything one instrument host serves: one DeviceServer per configured device, supervised.

A device that fails to open is reported and retried with backoff, without taking the others
down; a device whose driver cannot even be built (a config mistake) is reported once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labmesh import __version__, metrics
from labmesh.audit import AuditLog, from_settings
from labmesh.config import ConfigError, DeviceSpec, HostConfig
from labmesh.discovery import DeviceRecord, Registrar, advertised_address
from labmesh.protocol.native import PROTOCOL_NAME
from labmesh.security import KeyPair, Keyring, ServerSecurity, load_key_pair
from labmesh.server import DeviceServer
from labmesh.userstate import read_json, write_private_json

log = logging.getLogger("labmesh.host")

#: Retry delays after a failed open: 1 s, 2 s, 4 s ... capped.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
#: How long stopping a host may take: its devices disconnect meanwhile (within `docker stop`'s
#: 10 s grace before SIGKILL).
STOP_TIMEOUT_S = 8.0
#: How often a supervisor looks whether its server stopped on its own (s; the host's own
#: stop wakes it at once).
STOPPED_POLL_S = 0.5


@dataclass
class DeviceState:
    """What a host knows about one of its devices (for status tables and `labmesh ls`)."""

    spec: DeviceSpec
    address: str
    state: str = "starting"  # starting | serving | retrying | failed | stopped
    error: str | None = None
    attempts: int = 0
    server: DeviceServer | None = None

    def row(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "driver": self.spec.driver,
            "address": self.server.address if self.server else self.address,
            "state": self.state,
            "attempts": self.attempts,
            "error": self.error,
        }


def _laplace_adapter(spec: DeviceSpec) -> Any:
    """The LAPLACE adapter a device's `laplace:` mapping asks for (None without one)."""
    if spec.laplace is None:
        return None
    from labmesh.compat.laplace import LaplaceAdapter

    return LaplaceAdapter(**spec.laplace)


#: $LABMESH_STATE_DIR: where a host keeps its state (registration ids); default
#: ~/.local/state/labmesh.
STATE_ENV = "LABMESH_STATE_DIR"
_instances_lock = threading.Lock()


def state_directory() -> Path:
    configured = os.environ.get(STATE_ENV, "").strip()
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "labmesh"


def remembered_instance(key: str) -> str:
    """A registration instance id for `key`, made once and kept in the state directory; a
    fresh one (not kept) where the directory cannot be written."""
    path = state_directory() / "instances.json"
    with _instances_lock:
        known = read_json(path)
        known = known if isinstance(known, dict) else {}
        instance = known.get(key)
        if isinstance(instance, str) and len(instance) >= 16:
            return instance
        instance = known[key] = secrets.token_hex(16)
        try:
            write_private_json(path, known)
        except OSError as exc:  # a read-only home: registration works, restarts wait a TTL
            log.debug("registration id not kept in %s: %s", path, exc)
        return instance


def ports_in_use(config: HostConfig, bind: str) -> list[str]:
    """The host file's ports that another program already listens on, as `5555 (device
    pm100-a)`: `serve` refuses to start then (exit 2) instead of retrying forever."""
    wanted: list[tuple[int, str]] = []
    if config.metrics_port:
        wanted.append((config.metrics_port, "metrics_port"))
    for spec in config.devices:
        wanted.append((spec.port, f"device {spec.name}"))
        if spec.pub_port is not None:
            wanted.append((spec.pub_port, f"device {spec.name}'s pub_port"))
        if spec.plaintext_port is not None:
            wanted.append((spec.plaintext_port, f"device {spec.name}'s plaintext port"))
    host = "0.0.0.0" if bind in ("*", "0.0.0.0") else bind
    taken = []
    for port, what in wanted:
        why = port_taken(host, port)
        if why is not None:
            taken.append(f"{port} ({what}: {why})")
    return taken


def port_taken(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now (None: it could). Bound as the servers
    bind: a port merely in TIME_WAIT is free, a listener is not."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


class HostServer:
    """Serves every device of a host file.

    Parameters:
        config: the validated host file.
        sim: simulate every device (as `labmesh serve --sim`).
        bind: override the file's `bind` interface (e.g. 127.0.0.1 in tests).
        audit: where audit lines go (default: the host file's `audit:`, else $LABMESH_AUDIT,
            else the default file of labmesh.audit).

    Raises KeyFileError (a ConfigError's sibling) when the `security:` keys cannot be read.
    """

    def __init__(
        self,
        config: HostConfig,
        *,
        sim: bool = False,
        bind: str | None = None,
        audit: AuditLog | None = None,
    ):
        self.config = config
        self.audit = audit or from_settings(config.audit, f"{config.path}: audit")
        self.key: KeyPair | None = None
        self.keyring: Keyring | None = None
        security = config.security
        if security is not None:
            self.key = load_key_pair(security.key)
            self.keyring = Keyring(security.keys, security.clients)
            log.info(
                "CurveZMQ: host key %s (%s...), %d known client keys",
                self.key.name,
                self.key.public.decode()[:8],
                len(self.keyring.names()),
            )
        else:
            log.warning(
                "no security: section: these devices listen in plaintext and anyone who "
                "reaches their ports may drive them (docs/security.md: `labmesh keys new`)"
            )
        self.sim = sim
        self.bind = bind or config.bind
        self.devices = {
            spec.name: DeviceState(spec, f"tcp://{self.bind}:{spec.port}")
            for spec in config.devices
        }
        self._stop = threading.Event()
        self._stop_deadline = 0.0  # set by stop()
        self._threads: list[threading.Thread] = []
        self._ready = {name: threading.Event() for name in self.devices}
        # the host file's discovery endpoints, else LABMESH_DISCOVERY (what containers set)
        registrar = Registrar(
            config.discovery or None,
            server_key=security.discovery_key if security is not None else None,
            key=self.key,
        )
        self.registrar = registrar if (registrar.auto or registrar.endpoints) else None
        self.metrics_url: str | None = None
        self._metrics_http: Any = None

    def start(self) -> HostServer:
        self._start_metrics()
        if self.registrar is not None:
            self.registrar.start()
        for state in self.devices.values():
            thread = threading.Thread(
                target=self._supervise,
                args=(state,),
                name=f"supervise:{state.spec.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _start_metrics(self) -> None:
        """Serve this process's /metrics; a taken port is reported, not fatal."""
        port = self.config.metrics_port
        if not port:
            return
        host = "0.0.0.0" if self.bind == "*" else self.bind
        try:
            self._metrics_http = metrics.start_http(port, host, ready=self.readiness)
        except OSError as exc:
            log.error("%s; this host's devices are served without metrics", exc)
            return
        self.metrics_url = f"http://{host}:{port}/metrics"
        log.info("metrics on %s", self.metrics_url)

    def readiness(self) -> dict[str, Any]:
        """/ready's report: ready when every device of the host file is served, connected
        and its server healthy; otherwise which are not, and why (e.g. an instrument that is
        unplugged, retried with backoff)."""
        devices = {}
        for name, state in self.devices.items():
            server = state.server
            up = (
                state.state == "serving"
                and server is not None
                and server.connected
                and server.healthy
            )
            row: dict[str, Any] = {"up": up, "state": state.state}
            if state.error:
                row["error"] = state.error
            devices[name] = row
        down = sorted(name for name, row in devices.items() if not row["up"])
        report: dict[str, Any] = {"ready": not down, "host": self.config.host, "devices": devices}
        if down:
            report["down"] = down
        return report

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every device has served or failed its first attempt."""
        return all(event.wait(timeout) for event in self._ready.values())

    def servers(self) -> dict[str, DeviceServer]:
        return {n: s.server for n, s in self.devices.items() if s.server is not None}

    def _supervise(self, state: DeviceState) -> None:
        spec = state.spec
        delay = BACKOFF_FIRST_S
        metrics.SERVERS.set_down(spec.name, True)  # up=0 until it serves
        while not self._stop.is_set():
            state.attempts += 1
            try:
                device = spec.build(sim=self.sim)
                laplace = _laplace_adapter(spec)
            except (ConfigError, TypeError, ValueError, ImportError) as exc:
                state.state, state.error = "failed", f"{spec.where}: {spec.name}: {exc}"
                log.error("%s (not retried: fix the lab file)", state.error)
                self._ready[spec.name].set()
                return
            try:
                server = DeviceServer(
                    device,
                    fixed_threading=spec.fixed_threading,
                    address=state.address,
                    name=spec.name,
                    idle_limit_s=self.config.lock_idle_limit_s,
                    laplace=laplace,
                    limits=self.config.limits,
                    export=spec.metrics,
                    pub_address=(
                        f"tcp://{self.bind}:{spec.pub_port}" if spec.pub_port is not None else None
                    ),
                    security=self._security_of(spec),
                    audit=self.audit,
                )
                server.start()
            except Exception as exc:
                state.state, state.error = "retrying", f"{type(exc).__name__}: {exc}"
                log.error("%s: cannot open (%s); retrying in %.0f s", spec.name, state.error, delay)
                self._ready[spec.name].set()
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            state.server, state.state, state.error = server, "serving", None
            metrics.SERVERS.set_down(spec.name, False)
            log.info("%s: serving %s on %s", spec.name, spec.driver, server.address)
            self._register(server)
            self._ready[spec.name].set()
            # serve until the host stops, or the server stops on its own: asked to by a peer
            # (a LAPLACE STOP honoured under `laplace: {allow_stop: true}`: "stopped") or not
            # (its threads ended: a labmesh bug, "failed"); either way it is withdrawn from
            # discovery, reported down with the reason and not served again by this process
            while not self._stop.wait(STOPPED_POLL_S) and server.running:
                pass
            if self.registrar is not None:
                self.registrar.remove(spec.name)
            # (on the host's stop: as long as its deadline allows, so the device disconnects)
            server.stop(max(1.5, self._stop_deadline - time.monotonic()))
            if not self._stop.is_set():
                metrics.SERVERS.set_down(spec.name, True)
                if server.stop_reason:
                    state.state, state.error = "stopped", f"stopped by {server.stop_reason}"
                    log.warning(
                        "%s: %s; withdrawn from discovery, not restarted", spec.name, state.error
                    )
                else:
                    state.state = "failed"
                    state.error = (
                        "its server stopped unexpectedly (a labmesh bug: the log says why); "
                        "restart `labmesh serve` to serve it again"
                    )
                    log.error("%s: %s", spec.name, state.error)
            break
        state.state = "stopped" if state.state != "failed" else state.state

    def _security_of(self, spec: DeviceSpec) -> ServerSecurity | None:
        """A device's CurveZMQ settings: the host's key and keyring, the host's roles with
        the device's over them, and its plaintext listener if it has one."""
        if self.key is None or self.keyring is None or self.config.security is None:
            return None
        plaintext = (
            f"tcp://{self.bind}:{spec.plaintext_port}" if spec.plaintext_port is not None else None
        )
        return ServerSecurity(
            self.key,
            self.keyring,
            {**self.config.security.roles, **spec.roles},
            spec.plaintext_role if plaintext else "none",
            plaintext,
        )

    def _instance_of(self, server: DeviceServer) -> str:
        """The registration's instance id: the same across restarts of this host file's
        device (kept in the host's state file, owner-only), so a host that crashed and
        restarts takes its name back at once instead of being refused by its own record for
        a TTL. A device by the same name in another host file (another port) gets its own."""
        spec = self.devices[server.name].spec
        return remembered_instance(f"{self.config.host}/{spec.name}/{spec.port}")

    def _register(self, server: DeviceServer) -> None:
        """Tell discovery where this device is served (an address others can reach)."""
        if self.registrar is None:
            return
        toward = self.registrar.route_target()
        while toward is None and self.registrar.auto and not self._stop.is_set():
            # with `auto`, register only once the beacon has named discovery: the address
            # advertised is the one on the route toward it
            toward = self.registrar.wait_route_target(1.0)
        advertise = self.config.advertise
        self.registrar.add(
            DeviceRecord(
                name=server.name,
                address=advertised_address(server.address, toward, advertise),
                instance=self._instance_of(server),
                kind=server.description["kind"],
                metrics_url=advertised_address(self.metrics_url, toward, advertise)
                if self.metrics_url
                else None,
                host=self.config.host,
                resources=server.description["resources"],
                protocols=[PROTOCOL_NAME],
                version=__version__,
                started=time.time(),
                server_key=server.server_key,
            )
        )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop every device server within about `timeout`, each waiting for its device's
        disconnect (closing an instrument can take a moment) until then; their discovery
        registrations are withdrawn."""
        deadline = self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.registrar is not None:
            self.registrar.stop(max(0.5, deadline - time.monotonic()))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.audit.close()

    @property
    def finished(self) -> bool:
        """True once a device was stopped remotely (a LAPLACE STOP) and nothing is left to
        serve or retry: `labmesh serve` then exits, as ServerLHC does on STOP."""
        states = [s.state for s in self.devices.values()]
        return "stopped" in states and all(st in ("stopped", "failed") for st in states)

    def status(self) -> list[dict[str, Any]]:
        return [state.row() for state in self.devices.values()]
