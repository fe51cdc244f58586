"""The container image and both compose files, run for real on this machine's Docker.

The image is built offline exactly as scripts/build_image.py --offline does (a debootstrap base,
imported once and cached as labmesh-base:bookworm, plus a wheelhouse pip builds on this host),
and reused while the Dockerfile, the package's source and the base are unchanged. Then, with
compose v1 (docker-compose 1.29) and v2 (docker compose), each in turn:

  lab core      compose/lab-core.yaml: `discovery`, `prometheus` and `alertmanager` with
                stand-in images (this machine's Debian Prometheus and Alertmanager on the
                debootstrap base, entrypoint and user as in prom/*, a busybox-like `wget` for
                the healthchecks) running the shipped compose/prometheus configuration with
                only the discovery and Alertmanager ports substituted, and the shipped
                compose/alertmanager. No Grafana image can be had here: its service is checked
                by `config`, and its password secret with the debootstrap base standing in.
  instrument PC compose/instrument-host.yaml + instrument-host.usb.yaml serving a simulated
                PM100 power meter

both on host networking bound to 127.0.0.1 with free ports, the discovery endpoint given to the
instrument host only through LABMESH_DISCOVERY. A client on this machine connects to the meter
by name through discovery, queries and writes it, and reads the host's /metrics; Prometheus
finds the host through discovery (http_sd) and scrapes it with the labels the rules and
dashboards use, and finds the compose Alertmanager by its shipped name; every container has a
read-only root, no capabilities, no-new-privileges and limits, and its compose healthcheck
turns healthy; the rendered `config` of both files shows that hardening, 127.0.0.1 web UIs and
no Grafana password variable; the USB device cgroup rule is proven
with a fake USB character device node (major 189) mounted as the host's /dev/bus/usb: opening
it inside the container fails with ENXIO (access granted, no such device), while the same image
without the rule gets EPERM. Every container exits 0 on SIGTERM; `stop` and `down` each take
under 5 s.

Needs root, docker (a running dockerd), docker-compose, the compose v2 plugin, Prometheus,
Alertmanager (Debian: prometheus-alertmanager) and debootstrap (for the first build): see
system_tools.INSTALL. Skipped without them, failed on CI.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from system_tools import INSTALL, require_tool, unavailable

from labmesh import build_client

from support import wait_until

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("build_image", REPO / "scripts" / "build_image.py")
assert _spec is not None and _spec.loader is not None
build_image = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_image)

COMPOSE = REPO / "compose"
LAB_CORE = COMPOSE / "lab-core.yaml"
INSTRUMENT_HOST = COMPOSE / "instrument-host.yaml"
#: The opt-in USB override: /dev/bus/usb and the device cgroup rule.
INSTRUMENT_HOST_USB = COMPOSE / "instrument-host.usb.yaml"
#: compose CLIs by the name used in test ids.
COMPOSE_CLIS = {"v1": ["docker-compose"], "v2": ["docker", "compose"]}
#: A USB device node (char major 189) no real bus is likely to have: bus 8, device 128.
FAKE_USB = ("008/128", os.makedev(189, 7 * 128 + 127))
DOWN_LIMIT_S = 5.0
DEVICE = "ci-meter"
#: busybox's `wget -q -O /dev/null URL` (what the compose healthchecks of the prom/* images
#: run) for the stand-ins below, whose debootstrap base has python3 but no wget.
WGET_SHIM = """#!/usr/bin/python3
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[-1], timeout=4).status == 200 else 1)
except OSError:
    sys.exit(1)
"""
#: Stand-ins for prom/prometheus and prom/alertmanager: this machine's Debian binaries with the
#: same entrypoint, user (nobody), data directory, and a `wget` for the healthchecks; `extra`
#: copies files the Debian build reads at run time (Alertmanager's templates).
STANDIN_DOCKERFILE = """FROM {base}
COPY {name} /bin/{name}
COPY wget /bin/wget
{extra}RUN chmod 0755 /bin/wget && mkdir -p /{name} /etc/{name} && chown 65534:65534 /{name}
USER 65534
WORKDIR /{name}
ENTRYPOINT ["/bin/{name}"]
"""
#: The hardening every service of both compose files has.
HARDENING = {"read_only": True, "cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"]}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run(cmd: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def docker() -> str:
    if os.geteuid() != 0:
        unavailable("the Docker tests need root (device nodes, dockerd)")
    path = require_tool("docker")
    info = run([path, "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        unavailable(
            f"no Docker daemon answers ({info.stderr.strip()[:200]}); start one: "
            f"{INSTALL['docker']}"
        )
    return path


@pytest.fixture(scope="module")
def image(docker) -> str:
    if not build_image.image_id(build_image.DEBOOTSTRAP_BASE):
        require_tool("debootstrap")
    started = time.monotonic()
    try:
        tag = build_image.ensure_test_image(force=os.environ.get("LABMESH_REBUILD_IMAGE") == "1")
    except build_image.BuildError as exc:
        pytest.fail(f"building the image failed: {exc}", pytrace=False)
    print(f"\nimage {tag} ready in {time.monotonic() - started:.1f} s")
    return tag


def standin_image(docker: str, binary: Path, name: str, data: tuple[Path, ...] = ()) -> str:
    """This machine's `binary` in an image shaped like prom/`name` (built once per version),
    with the directories `data` at their own paths."""
    extra = "COPY rootfs/ /\n" if data else ""
    dockerfile = STANDIN_DOCKERFILE.format(
        base=build_image.DEBOOTSTRAP_BASE, name=name, extra=extra
    )
    version = run([str(binary), "--version"]).stdout.split()[2]
    shape = hashlib.sha256((dockerfile + WGET_SHIM).encode()).hexdigest()[:8]
    tag = f"labmesh-test-{name}:{version.replace('+', '-')}-{shape}"
    if build_image.image_id(tag):
        return tag
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for arcname, text in (("Dockerfile", dockerfile), ("wget", WGET_SHIM)):
            info = tarfile.TarInfo(arcname)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
        tar.add(binary, arcname=name)
        for directory in data:
            tar.add(directory, arcname=f"rootfs{directory}")
    proc = subprocess.run(
        [docker, "build", "--force-rm", "-t", tag, "-"],
        input=context.getvalue(),
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return tag


@pytest.fixture(scope="module")
def prometheus_image(docker, image) -> str:
    binary = Path(require_tool("prometheus", "promtool")).resolve()
    return standin_image(docker, binary, "prometheus")


@pytest.fixture(scope="module")
def alertmanager_image(docker, image) -> str:
    path = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if path is None:
        unavailable(
            "Alertmanager is not installed (install: apt-get install -y prometheus-alertmanager)"
        )
    assert path is not None
    # Debian's build reads its notification templates from here (upstream embeds them)
    templates = Path("/usr/share/prometheus/alertmanager")
    return standin_image(docker, Path(path).resolve(), "alertmanager", (templates,))


@pytest.fixture(params=sorted(COMPOSE_CLIS), scope="module")
def compose(request) -> list[str]:
    cli = COMPOSE_CLIS[request.param]
    require_tool(cli[0], "docker-compose" if request.param == "v1" else "docker")
    probe = run([*cli, "version"], timeout=30)
    if probe.returncode != 0:
        unavailable(f"compose {request.param} is not installed: {INSTALL[' '.join(cli)]}")
    return cli


def test_image_runs_every_role_as_an_unprivileged_user(docker, image):
    version = run([docker, "run", "--rm", image, "--version"])
    assert version.returncode == 0 and version.stdout.startswith("labmesh "), version.stderr
    probe = (
        "import os, grp, usb.backend.libusb1, nidaqmx, pyvisa_py, pyvisa_sim; "
        "print(os.getuid(), sorted(grp.getgrgid(g).gr_name for g in os.getgroups()), "
        "usb.backend.libusb1.get_backend() is not None)"
    )
    out = run([docker, "run", "--rm", "--entrypoint", "python3", image, "-c", probe])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 1)[0] == "10001"
    assert "'plugdev'" in out.stdout and "'dialout'" in out.stdout
    assert out.stdout.strip().endswith("True")  # pyusb finds libusb
    config = json.loads(run([docker, "image", "inspect", image]).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["labmesh"]
    assert config["User"] == "10001"
    assert config["Healthcheck"]["Test"][0] == "CMD"


def test_image_keeps_no_pip_no_wheels_and_carries_its_version_and_security_fixes(docker, image):
    """Issue 19: the 21 MB wheelhouse stayed in a layer, pip stayed in the virtualenv, there
    were no OCI labels, and the offline base had no bookworm-security source."""
    labels = json.loads(run([docker, "image", "inspect", image]).stdout)[0]["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == build_image.source_version()["VERSION"]
    # the commit the image was built at: the test image is reused while its inputs are
    # unchanged, so that is a commit of this repository, not necessarily HEAD
    revision = labels["org.opencontainers.image.revision"]
    known = run(["git", "-C", str(REPO), "cat-file", "-e", f"{revision}^{{commit}}"])
    assert revision == "unknown" or (len(revision) == 40 and known.returncode == 0), revision
    probe = (
        "import importlib.util, os, sys; "
        "print(importlib.util.find_spec('pip') is None, os.path.exists('/tmp/wheelhouse'), "
        "os.path.exists(sys.prefix + '/bin/pip'), "
        "open('/etc/apt/sources.list').read().count('bookworm-security'))"
    )
    out = run([docker, "run", "--rm", "--entrypoint", "python3", image, "-c", probe])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "False", "1"], out.stdout
    # no layer of the image holds the wheelhouse: the biggest layer is the virtualenv's copy,
    # and no step of the image's history copies wheels
    history = run([docker, "history", "--no-trunc", "--format", "{{.CreatedBy}}", image]).stdout
    assert "wheelhouse" not in history, history


def test_the_wheelhouse_is_for_the_image_python_whatever_python_builds_it(tmp_path):
    """Issue 19: `--offline` built wheels for the build host's Python, so on a Python 3.12 host
    it failed with "No matching distribution found for pyzmq>=25". The wheelhouse is now made
    for the image's CPython 3.11: made here for another target (3.12) from this Python, every
    binary wheel is for that target, and labmesh's own wheel is pure Python."""
    wheels = build_image.build_wheelhouse(tmp_path / "wh", python="3.12")
    assert any(w.startswith("labmesh-") and w.endswith("py3-none-any.whl") for w in wheels)
    binary = [w for w in wheels if "-none-any" not in w]
    assert any(w.startswith("pyzmq-") for w in binary) and any(
        w.startswith("msgspec-") for w in binary
    )
    assert all("-cp312-" in w and "manylinux" in w for w in binary), binary
    # and the command the image build uses names 3.11 and the base's glibc range
    command = build_image.wheel_download_command("labmesh[sim]", tmp_path, machine="x86_64")
    assert command[command.index("--python-version") + 1] == "3.11"
    assert "cp311" in command and "manylinux_2_36_x86_64" in command


def compose_config(compose: list[str], files: list[Path], env: dict[str, str], cwd: Path):
    args = [arg for file in files for arg in ("-f", str(file))]
    proc = run([*compose, *args, "config"], env={**os.environ, **env}, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def assert_hardened(name: str, service: dict[str, Any]) -> None:
    """read-only root with a tmpfs /tmp, no capabilities, no privilege gain, limits, a
    healthcheck that runs, host networking with no published port, no secret variables."""
    for key, value in HARDENING.items():
        assert service.get(key) == value, (name, key, service.get(key))
    assert "/tmp" in [t.split(":")[0] for t in service["tmpfs"]], name
    assert int(str(service["pids_limit"])) > 0, name
    memory = str(service["mem_limit"])  # v1 prints it as written (256m), v2 in bytes
    assert memory[:-1].isdigit() and not memory.startswith("0"), (name, memory)
    check = service["healthcheck"]
    assert not check.get("disable") and check["test"][0] == "CMD", (name, check)
    assert check["retries"] >= 1 and check["timeout"], name
    assert service["network_mode"] == "host" and not service.get("ports"), name
    assert not service.get("privileged") and not service.get("cap_add"), name
    for variable in service.get("environment") or {}:
        if any(word in variable for word in ("PASSWORD", "SECRET", "TOKEN")):
            assert variable.endswith("__FILE"), (name, variable)  # a path, never the value


@pytest.mark.parametrize(
    "files",
    [[LAB_CORE], [INSTRUMENT_HOST], [INSTRUMENT_HOST, INSTRUMENT_HOST_USB]],
    ids=["lab-core", "instrument-host", "instrument-host+usb"],
)
def test_compose_files_are_valid_for_v1_and_v2(compose, files, tmp_path):
    for file in files:
        raw = yaml.safe_load(file.read_text())
        assert "name" not in raw  # compose v1 refuses a top-level name
    host_file = REPO / "examples" / "hosts" / "pm100.yaml"
    # no Grafana password file anywhere: `config` still renders (only Grafana needs it)
    env = {
        "LABMESH_HOST_FILE": str(host_file),
        "GRAFANA_ADMIN_PASSWORD_FILE": str(tmp_path / "missing"),
        "GRAFANA_ADMIN_PASSWORD": "must-not-be-used",
    }
    for variable in ("PROMETHEUS_HOST", "ALERTMANAGER_HOST", "GRAFANA_HOST", "LABMESH_USB_DIR"):
        env[variable] = ""  # as if unset: the defaults below (empty means default here)
    config = compose_config(compose, files, env, tmp_path)
    services = config["services"]
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert_hardened(name, service)
    labmesh_services = [s for s in services.values() if "build" in s]
    for service in labmesh_services:
        assert service["init"] is True
        assert Path(service["build"]["context"]) == REPO
        assert service["build"]["dockerfile"] == "services/Dockerfile"
        assert "python3" in service["healthcheck"]["test"]  # the image has no curl or wget
    if files[0] == INSTRUMENT_HOST:
        (service,) = labmesh_services
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts["/etc/labmesh/host.yaml"]["source"] == str(host_file)
        assert mounts["/etc/labmesh/host.yaml"]["read_only"] is True
        assert "LABMESH_DISCOVERY" in service["environment"]
        assert service["environment"]["LABMESH_STATE_DIR"].startswith("/home/labmesh/")
        assert mounts["/home/labmesh"]["source"] == "labmesh-state"  # writable, kept
        if INSTRUMENT_HOST_USB in files:
            assert service["device_cgroup_rules"] == ["c 189:* rmw"]
            assert mounts["/dev/bus/usb"]["source"] == "/dev/bus/usb"
        else:  # runs (--sim) on a PC without /dev/bus/usb
            assert "/dev/bus/usb" not in mounts and not service.get("device_cgroup_rules")
        return
    prometheus, alertmanager, grafana = (
        services[name] for name in ("prometheus", "alertmanager", "grafana")
    )
    # the web UIs listen on this machine only unless the admin says otherwise
    assert "--web.listen-address=127.0.0.1:9090" in prometheus["command"]
    assert "--web.listen-address=127.0.0.1:9093" in alertmanager["command"]
    assert "--cluster.listen-address=" in alertmanager["command"]  # no gossip port
    assert grafana["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    # nobody who reaches Prometheus's port may stop it (POST /-/quit)
    assert not any("lifecycle" in arg for arg in prometheus["command"])
    # Prometheus finds discovery and Alertmanager by the names its shipped config uses
    shipped = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    (am_target,) = shipped["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am_target == "labmesh-alertmanager:9093"
    hosts = str(prometheus["extra_hosts"])
    assert "labmesh-discovery:127.0.0.1" in hosts and "labmesh-alertmanager:127.0.0.1" in hosts
    assert "labmesh-alert-webhook:127.0.0.1" in str(alertmanager["extra_hosts"])
    assert _mount_source(prometheus, "/etc/prometheus") == COMPOSE / "prometheus"
    assert _mount_source(alertmanager, "/etc/alertmanager") == COMPOSE / "alertmanager"
    provider = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/labmesh.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert _mount_source(grafana, dashboards_path) == COMPOSE / "grafana/dashboards"
    provisioning = _mount_source(grafana, "/etc/grafana/provisioning")
    assert provisioning == COMPOSE / "grafana/provisioning"
    assert grafana["environment"]["LABMESH_PROMETHEUS_URL"] == "http://127.0.0.1:9090"
    # Grafana's admin password: a file secret, never a variable, never defaulted
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    assert "must-not-be-used" not in yaml.safe_dump(config)
    (secret,) = [s if isinstance(s, str) else s["source"] for s in grafana["secrets"]]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == f"/run/secrets/{secret}"
    assert config["secrets"][secret]["file"] == str(tmp_path / "missing")
    del env["GRAFANA_ADMIN_PASSWORD_FILE"]
    default = compose_config(compose, files, env, tmp_path)["secrets"][secret]["file"]
    assert default == "/etc/labmesh/grafana-admin-password"


def _mount_source(service: dict[str, Any], target: str) -> Path:
    """The host path mounted at `target` (v1 prints short syntax, v2 long)."""
    for volume in service["volumes"]:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            if rest.split(":")[0] == target:
                return Path(source)
        elif volume["target"] == target:
            return Path(volume["source"])
    raise AssertionError(f"nothing mounted at {target}: {service['volumes']}")


class Stack:
    """One compose project of this test, always taken down (with its volumes) at the end."""

    def __init__(self, compose: list[str], files: list[Path], project: str, env: dict[str, str]):
        self.base = [*compose, "-p", project, *(arg for f in files for arg in ("-f", str(f)))]
        self.env = env
        self.project = project

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = run([*self.base, *args], timeout=timeout, env=self.env)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc

    def container(self, *service: str) -> str:
        ids = self("ps", "-q", *service).stdout.split()
        assert len(ids) == 1, ids
        return ids[0]

    def stop(self, docker: str) -> tuple[float, dict[str, int]]:
        """Stop every container (timed); their exit codes by name (0: left on SIGTERM by
        itself, 137: killed after the grace period)."""
        ids = self("ps", "-q").stdout.split()
        started = time.monotonic()
        self("stop", "--timeout", "10")
        took = time.monotonic() - started
        out = run([docker, "inspect", "--format", "{{.Name}} {{.State.ExitCode}}", *ids]).stdout
        return took, {name: int(code) for name, code in (line.split() for line in out.splitlines())}

    def down(self) -> float:
        started = time.monotonic()
        self("down", "--volumes", "--remove-orphans", "--timeout", "10")
        return time.monotonic() - started


@contextlib.contextmanager
def stacks(compose: list[str], env: dict[str, str]) -> Iterator[tuple[Stack, Stack]]:
    tag = f"lmtest{os.getpid()}{compose[-1].replace('-', '')}"
    core = Stack(compose, [LAB_CORE], f"{tag}core", env)
    host = Stack(compose, [INSTRUMENT_HOST, INSTRUMENT_HOST_USB], f"{tag}host", env)
    try:
        yield core, host
    finally:
        for stack in (host, core):
            run([*stack.base, "down", "--volumes", "--remove-orphans", "--timeout", "5"], env=env)


def assert_hardened_container(docker: str, name: str, container: str) -> None:
    out = run([docker, "inspect", "--format", "{{json .HostConfig}}", container])
    host_config = json.loads(out.stdout)
    assert host_config["ReadonlyRootfs"] is True, name
    assert host_config["CapDrop"] == ["ALL"] and not host_config["CapAdd"], name
    assert "no-new-privileges:true" in host_config["SecurityOpt"], name
    assert "/tmp" in (host_config["Tmpfs"] or {}), name
    assert host_config["Memory"] > 0 and host_config["PidsLimit"] > 0, name
    assert host_config["Privileged"] is False, name


def health(docker: str, container: str) -> str:
    out = run([docker, "inspect", "--format", "{{.State.Health.Status}}", container])
    return out.stdout.strip()


def open_errno(cmd: list[str]) -> str:
    """Run a python snippet that opens the fake USB node; returns the errno name (or OK)."""
    snippet = (
        "import errno\n"
        "try:\n"
        f"    open('/dev/bus/usb/{FAKE_USB[0]}', 'rb').close()\n"
        "    print('OK')\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno])\n"
    )
    proc = run([*cmd, "python3", "-c", snippet], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = http_get(url)
    return json.loads(body)["data"]["result"] if status == 200 else []


def test_lab_core_and_instrument_host(
    docker, image, prometheus_image, alertmanager_image, compose, tmp_path
):
    api, pub, http, device_port, metrics_port, prometheus_port, am_port = free_ports(7)
    # The shipped Prometheus configuration, with only discovery's and Alertmanager's ports
    # substituted.
    prometheus_dir = tmp_path / "prometheus"
    shutil.copytree(COMPOSE / "prometheus", prometheus_dir)
    config = prometheus_dir / "prometheus.yml"
    assert config.read_text().count("labmesh-discovery:5552") == 2
    assert config.read_text().count("labmesh-alertmanager:9093") == 1
    config.write_text(
        config.read_text()
        .replace("labmesh-discovery:5552", f"labmesh-discovery:{http}")
        .replace("labmesh-alertmanager:9093", f"labmesh-alertmanager:{am_port}")
    )
    prometheus_dir.chmod(0o755)
    usb = tmp_path / "usb"
    node = usb / FAKE_USB[0]
    node.parent.mkdir(parents=True)
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, FAKE_USB[1])
        os.chmod(node, 0o666)
    except PermissionError as exc:
        unavailable(f"cannot create a fake USB device node here: {exc}")
    host_file = tmp_path / "host.yaml"
    host_file.write_text(
        "host: ci-rig\n"
        "bind: 127.0.0.1\n"
        f"metrics_port: {metrics_port}\n"
        "devices:\n"
        f"  - name: {DEVICE}\n"
        "    driver: powermeter\n"
        "    resource: USB0::0x1313::0x8078::P0000001::INSTR\n"
        f"    port: {device_port}\n"
        "    sim: true\n"
    )
    discovery = f"tcp://127.0.0.1:{api}"
    env = {
        **os.environ,
        "LABMESH_IMAGE": image,
        "LABMESH_BIND": "127.0.0.1",
        "LABMESH_HTTP_HOST": "127.0.0.1",
        "LABMESH_DISCOVERY_PORT": str(api),
        "LABMESH_PUB_PORT": str(pub),
        "LABMESH_HTTP_PORT": str(http),
        "LABMESH_DISCOVERY_FLAGS": "--no-beacon",  # no multicast beyond this machine
        "LABMESH_HEALTH_INTERVAL": "1s",
        "LABMESH_HOST_FILE": str(host_file),
        "LABMESH_DISCOVERY": discovery,
        "LABMESH_USB_DIR": str(usb),
        "LABMESH_HEALTH_URL": f"http://127.0.0.1:{metrics_port}/ready",
        "PROMETHEUS_IMAGE": prometheus_image,
        "PROMETHEUS_HOST": "127.0.0.1",
        "PROMETHEUS_PORT": str(prometheus_port),
        "LABMESH_PROMETHEUS_DIR": str(prometheus_dir),
        "ALERTMANAGER_IMAGE": alertmanager_image,
        "ALERTMANAGER_HOST": "127.0.0.1",
        "ALERTMANAGER_PORT": str(am_port),
        # no password file: only Grafana (not started here) needs one
        "GRAFANA_ADMIN_PASSWORD_FILE": str(tmp_path / "no-such-file"),
    }
    timings: dict[str, float] = {}
    with stacks(compose, env) as (core, host):
        started = time.monotonic()
        core("up", "-d", "--no-build", "discovery", "prometheus", "alertmanager")
        assert wait_until(lambda: http_get(f"http://127.0.0.1:{http}/health")[0] == 200, 30), core(
            "logs"
        ).stdout
        timings["lab core up"] = time.monotonic() - started

        started = time.monotonic()
        host("up", "-d", "--no-build")

        def registered() -> bool:
            status, body = http_get(f"http://127.0.0.1:{http}/devices")
            return status == 200 and DEVICE in [d["name"] for d in json.loads(body)]

        assert wait_until(registered, 30, 0.2), (
            f"{DEVICE} did not register with discovery within 30 s: the instrument host gets "
            "the endpoint only from LABMESH_DISCOVERY (the host file has no discovery key)\n"
            + host("logs").stdout
            + core("logs").stdout
        )
        timings["instrument host registered"] = time.monotonic() - started

        # A client on this machine finds the meter by name through discovery.
        with build_client(DEVICE, discovery=[discovery], timeout=3000) as client:
            power = client.query("POWER")
            assert isinstance(power, float) and power > 0
            client.write("WAVELENGTH", 1064.0)
            assert client.query("WAVELENGTH") == 1064.0
            assert client.describe()["name"] == DEVICE

        status, text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("labmesh_device_up", (("device", DEVICE),))] == 1.0
        queries = [
            value
            for (name, labels), value in samples.items()
            if name == "labmesh_request_duration_seconds_count"
            and dict(labels).get("device") == DEVICE
            and dict(labels).get("operation") == "WAVELENGTH"
        ]
        assert sum(queries) >= 2, queries

        status, body = http_get(f"http://127.0.0.1:{http}/targets")
        (group,) = json.loads(body)
        assert group["targets"] == [f"127.0.0.1:{metrics_port}"]
        assert group["labels"]["labmesh_host"] == "ci-rig"

        # Prometheus (compose's config, rules and extra_hosts) finds the host via discovery.
        def scraped() -> list[dict[str, Any]]:
            return prometheus_query(prometheus_port, f'labmesh_device_up{{device="{DEVICE}"}}')

        assert wait_until(lambda: bool(scraped()), 45, 1.0), core("logs", "prometheus").stdout
        timings["first Prometheus sample"] = time.monotonic() - started
        (sample,) = scraped()
        assert sample["metric"]["job"] == "labmesh"
        assert sample["metric"]["labmesh_host"] == "ci-rig"
        assert sample["value"][1] == "1"
        assert wait_until(
            lambda: prometheus_query(prometheus_port, 'up{job="labmesh-discovery"} == 1'), 20, 1.0
        )
        status, body = http_get(f"http://127.0.0.1:{prometheus_port}/api/v1/rules")
        assert status == 200 and json.loads(body)["data"]["groups"]  # the shipped rules loaded

        # Prometheus found the compose Alertmanager by the shipped name (extra_hosts)
        status, body = http_get(f"http://127.0.0.1:{prometheus_port}/api/v1/alertmanagers")
        assert status == 200, body
        active = [a["url"] for a in json.loads(body)["data"]["activeAlertmanagers"]]
        assert active == [f"http://labmesh-alertmanager:{am_port}/api/v2/alerts"]
        status, _ = http_get(f"http://127.0.0.1:{am_port}/-/ready")
        assert status == 200

        # every container healthy (its compose healthcheck), with the hardening applied
        host_id = host.container()
        containers = {name: core.container(name) for name in ("discovery", "prometheus")}
        containers["alertmanager"] = core.container("alertmanager")
        containers["instrument host"] = host_id
        for name, container in containers.items():
            assert wait_until(lambda c=container: health(docker, c) == "healthy", 30, 0.5), (
                name,
                health(docker, container),
                run([docker, "inspect", "--format", "{{json .State.Health}}", container]).stdout,
            )
            assert_hardened_container(docker, name, container)
        # inside: no capabilities, no privilege gain, / read-only, /tmp and the state writable
        probe = (
            "import os, re\n"
            "status = open('/proc/self/status').read()\n"
            "print(re.search(r'CapEff:\\s*(\\w+)', status)[1], "
            "re.search(r'NoNewPrivs:\\s*(\\d)', status)[1])\n"
            "for path in ('/probe', '/tmp/probe', os.environ['LABMESH_STATE_DIR'] + '/probe'):\n"
            "    try:\n"
            "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
            "        open(path, 'w').close()\n"
            "        print(path, 'ok')\n"
            "    except OSError as exc:\n"
            "        print(path, exc.strerror)\n"
        )
        proc = run([docker, "exec", host_id, "python3", "-c", probe])
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == "0000000000000000 1", lines
        assert lines[1] == "/probe Read-only file system", lines
        assert lines[2:] == ["/tmp/probe ok", "/home/labmesh/state/probe ok"], lines

        # The device cgroup rule: the container may open USB nodes (ENXIO: allowed, but no
        # such device) where the same image without the rule may not (EPERM).
        assert open_errno([docker, "exec", host_id]) == "ENXIO"
        without_rule = [
            docker, "run", "--rm", "-v", f"{usb}:/dev/bus/usb", "--entrypoint", "", image,
        ]  # fmt: skip
        assert open_errno(without_rule) == "EPERM"

        for name, stack in (("instrument host", host), ("lab core", core)):
            timings[f"{name} stop"], exit_codes = stack.stop(docker)
            assert exit_codes and set(exit_codes.values()) == {0}, exit_codes
            timings[f"{name} down"] = stack.down()
    summary = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    print(f"\ncompose {' '.join(compose)}: {summary}")
    for name in ("instrument host", "lab core"):
        assert timings[f"{name} stop"] < DOWN_LIMIT_S, timings
        assert timings[f"{name} down"] < DOWN_LIMIT_S, timings
    leftovers = run(
        [docker, "ps", "-aq", "--filter", f"label=com.docker.compose.project={core.project}"]
    )
    assert leftovers.stdout.strip() == ""


def test_grafana_password_is_a_file_and_usb_is_opt_in(docker, image, compose, tmp_path):
    """Grafana: the admin password reaches the container only as the file its __FILE variable
    names, and without that file the container is refused (no default password). No Grafana
    image can be had here: the debootstrap base stands in for it, under the service's own
    options (read-only, no capabilities, ...). Instrument host: the base file alone runs on a
    PC without /dev/bus/usb; the USB override refuses to start without it."""
    password = "correct horse battery staple"
    secret = tmp_path / "grafana-admin-password"
    env = {
        **os.environ,
        "GRAFANA_IMAGE": build_image.DEBOOTSTRAP_BASE,
        "GRAFANA_ADMIN_PASSWORD_FILE": str(secret),
        "LABMESH_IMAGE": image,
        "LABMESH_HOST_FILE": str(REPO / "examples" / "hosts" / "pm100.yaml"),
        "LABMESH_USB_DIR": str(tmp_path / "no-usb-here"),
    }
    project = f"lmtest{os.getpid()}{compose[-1].replace('-', '')}secret"
    script = (
        'cat "$GF_SECURITY_ADMIN_PASSWORD__FILE"; echo; '
        'env | grep -c "^GF_SECURITY_ADMIN_PASSWORD="; '
        "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; touch /probe 2>/dev/null || echo ro"
    )
    grafana = [*compose, "-p", project, "-f", str(LAB_CORE), "run", "--rm", "--no-deps"]
    grafana += ["--entrypoint", "sh", "grafana", "-c", script]
    try:
        refused = run(grafana, env=env)
        assert refused.returncode != 0
        assert str(secret) in refused.stderr and "does not exist" in refused.stderr, refused.stderr
        secret.write_text(password + "\n")
        secret.chmod(0o400)
        proc = run(grafana, env=env)
        assert proc.returncode == 0, proc.stderr
        lines = [line.split() for line in proc.stdout.splitlines() if line.strip()]
        assert lines[0] == password.split()
        assert lines[1] == ["0"]  # no GF_SECURITY_ADMIN_PASSWORD variable
        assert lines[2:] == [["CapEff:", "0000000000000000"], ["NoNewPrivs:", "1"], ["ro"]]
    finally:
        run([*compose, "-p", project, "-f", str(LAB_CORE), "down", "--volumes"], env=env)

    probe = "import os; print(os.path.exists('/dev/bus/usb'), os.getuid())"
    for files, works in (
        ([INSTRUMENT_HOST], True),
        ([INSTRUMENT_HOST, INSTRUMENT_HOST_USB], False),
    ):
        base = [*compose, "-p", project + "host", *(a for f in files for a in ("-f", str(f)))]
        try:
            proc = run([*base, "run", "--rm", "--no-deps", "--entrypoint", "python3", "labmesh",
                        "-c", probe], env=env)  # fmt: skip
            if works:
                assert proc.returncode == 0, proc.stderr
                assert proc.stdout.split()[-2:] == ["False", "10001"], proc.stdout
            else:
                assert proc.returncode != 0 and "does not exist" in proc.stderr, proc.stderr
        finally:
            run([*base, "down", "--volumes"], env=env)
