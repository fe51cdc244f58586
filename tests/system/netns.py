"""Separate hosts on one machine for system tests: network namespaces on a bridge.

A `Lan` creates a switch namespace with a bridge (multicast snooping off, so UDP multicast
reaches every port) and one namespace per host, each with `eth0` on the bridge and the address
`SUBNET.N/24` given for it; `delete()` removes the namespaces and with them every link and
address. Only addresses assigned here are used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable

SUBNET = "10.213.0"


def netns_problem() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.decode().strip()}"
    return None


class Lan:
    """Hosts `{role: N}` at SUBNET.N on one bridge; namespaces are named `TAG-ROLE`.

    Parameters:
        tag: a prefix unique to this test run (e.g. with the process id).
        hosts: role -> last address byte.
        multicast: the roles given a multicast route (224.0.0.0/4 on eth0); the others have
            no route beyond their subnet.
    """

    def __init__(self, tag: str, hosts: dict[str, int], multicast: Iterable[str]) -> None:
        self.hosts = dict(hosts)
        self.multicast = set(multicast)
        self.ns = {role: f"{tag}-{role}" for role in ("switch", *hosts)}
        self._created: list[str] = []

    def ip(self, *args: str, role: str | None = None) -> None:
        """Run `ip ARGS` (in `role`'s namespace if given)."""
        cmd = ["ip", "-n", self.ns[role], *args] if role else ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def exec(self, role: str, *argv: str) -> list[str]:
        """`argv` run in `role`'s namespace (`ip netns exec` execs it: the PID is argv's)."""
        return ["ip", "netns", "exec", self.ns[role], *argv]

    def build(self) -> Lan:
        for ns in self.ns.values():
            self.ip("netns", "add", ns)
            self._created.append(ns)
        self.ip("link", "add", "br0", "type", "bridge", role="switch")
        self.ip("link", "set", "br0", "type", "bridge", "mcast_snooping", "0", role="switch")
        self.ip("link", "set", "br0", "up", role="switch")
        for role, last in self.hosts.items():
            port, ns = f"p{last}", self.ns[role]
            self.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                    role="switch")  # fmt: skip
            self.ip("link", "set", port, "master", "br0", role="switch")
            self.ip("link", "set", port, "up", role="switch")
            self.ip("addr", "add", f"{SUBNET}.{last}/24", "dev", "eth0", role=role)
            self.ip("link", "set", "eth0", "up", role=role)
            self.ip("link", "set", "lo", "up", role=role)
            if role in self.multicast:
                self.ip("route", "add", "224.0.0.0/4", "dev", "eth0", role=role)
        return self

    def link(self, role: str, up: bool) -> None:
        """Plug or unplug `role`'s cable (its port on the switch)."""
        self.ip("link", "set", f"p{self.hosts[role]}", "up" if up else "down", role="switch")

    def delete(self) -> None:
        for ns in reversed(self._created):  # deleting a namespace removes its links
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._created.clear()
