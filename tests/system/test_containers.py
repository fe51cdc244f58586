"""The container image and both compose files, run for real on this machine's Docker.

The image is built offline exactly as scripts/build_image.py --offline does (a debootstrap base,
imported once and cached as labmesh-base:bookworm, plus a wheelhouse pip builds on this host),
and reused while the Dockerfile, the package's source and the base are unchanged. Then, with
compose v1 (docker-compose 1.29) and v2 (docker compose), each in turn:

  lab core      compose/lab-core.yaml: `discovery`, and `prometheus` with a stand-in image
                (this machine's Debian Prometheus on the debootstrap base, entrypoint and user
                as in prom/prometheus) running the shipped compose/prometheus configuration
                with only the discovery port substituted. No Grafana image can be had here:
                its service is checked by `config` below.
  instrument PC compose/instrument-host.yaml serving a simulated PM100 power meter

both on host networking bound to 127.0.0.1 with free ports, the discovery endpoint given to the
instrument host only through LABMESH_DISCOVERY. A client on this machine connects to the meter
by name through discovery, queries and writes it, and reads the host's /metrics; Prometheus
finds the host through discovery (http_sd) and scrapes it with the labels the rules and
dashboards use; the compose healthchecks turn healthy; the USB device cgroup rule is proven
with a fake USB character device node (major 189) mounted as the host's /dev/bus/usb: opening
it inside the container fails with ENXIO (access granted, no such device), while the same image
without the rule gets EPERM. Every container exits 0 on SIGTERM; `stop` and `down` each take
under 5 s.

Needs root, docker (a running dockerd), docker-compose, the compose v2 plugin, Prometheus and
debootstrap (for the first build): see system_tools.INSTALL. Skipped without them, failed on CI.
"""

from __future__ import annotations

import contextlib
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
#: compose CLIs by the name used in test ids.
COMPOSE_CLIS = {"v1": ["docker-compose"], "v2": ["docker", "compose"]}
#: A USB device node (char major 189) no real bus is likely to have: bus 8, device 128.
FAKE_USB = ("008/128", os.makedev(189, 7 * 128 + 127))
DOWN_LIMIT_S = 5.0
DEVICE = "ci-meter"
#: The stand-in for prom/prometheus: same entrypoint, user and data directory.
PROMETHEUS_DOCKERFILE = f"""FROM {build_image.DEBOOTSTRAP_BASE}
COPY prometheus /bin/prometheus
RUN mkdir -p /prometheus /etc/prometheus && chown 65534:65534 /prometheus
USER 65534
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
"""


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


@pytest.fixture(scope="module")
def prometheus_image(docker, image) -> str:
    """This machine's Prometheus in an image shaped like prom/prometheus (built once)."""
    binary = Path(require_tool("prometheus", "promtool")).resolve()
    version = run([str(binary), "--version"]).stdout.split()[2]
    tag = f"labmesh-test-prometheus:{version.replace('+', '-')}"
    if build_image.image_id(tag):
        return tag
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dockerfile = PROMETHEUS_DOCKERFILE.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(binary, arcname="prometheus")
    proc = subprocess.run(
        [docker, "build", "--force-rm", "-t", tag, "-"],
        input=context.getvalue(),
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return tag


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
    revision = run(["git", "-C", str(REPO), "rev-parse", "HEAD"]).stdout.strip()
    assert labels["org.opencontainers.image.revision"] in (revision, "unknown")
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


@pytest.mark.parametrize("file", [LAB_CORE, INSTRUMENT_HOST], ids=lambda p: p.stem)
def test_compose_files_are_valid_for_v1_and_v2(compose, file, tmp_path):
    raw = yaml.safe_load(file.read_text())
    assert "name" not in raw  # compose v1 refuses a top-level name
    host_file = REPO / "examples" / "hosts" / "pm100.yaml"
    env = {**os.environ, "LABMESH_HOST_FILE": str(host_file)}
    proc = run([*compose, "-f", str(file), "config"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert service["restart"] == "unless-stopped", name
        assert not service.get("privileged"), name
    labmesh_services = [s for s in services.values() if "build" in s]
    for service in labmesh_services:
        assert service["init"] is True
        assert Path(service["build"]["context"]) == REPO
        assert service["build"]["dockerfile"] == "services/Dockerfile"
    if file == INSTRUMENT_HOST:
        (service,) = labmesh_services
        assert service["device_cgroup_rules"] == ["c 189:* rmw"]
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts["/etc/labmesh/host.yaml"]["source"] == str(host_file)
        assert mounts["/etc/labmesh/host.yaml"]["read_only"] is True
        assert mounts["/dev/bus/usb"]["source"] == "/dev/bus/usb"
        assert "LABMESH_DISCOVERY" in service["environment"]
    else:
        prometheus, grafana = services["prometheus"], services["grafana"]
        assert "labmesh-discovery:127.0.0.1" in str(prometheus["extra_hosts"])
        # nobody who reaches Prometheus's port may stop it (POST /-/quit)
        assert not any("lifecycle" in arg for arg in prometheus["command"])
        assert _mount_source(prometheus, "/etc/prometheus") == COMPOSE / "prometheus"
        provider = yaml.safe_load(
            (COMPOSE / "grafana/provisioning/dashboards/labmesh.yml").read_text()
        )
        dashboards_path = provider["providers"][0]["options"]["path"]
        assert _mount_source(grafana, dashboards_path) == COMPOSE / "grafana/dashboards"
        provisioning = _mount_source(grafana, "/etc/grafana/provisioning")
        assert provisioning == COMPOSE / "grafana/provisioning"
        assert grafana["environment"]["LABMESH_PROMETHEUS_URL"] == "http://127.0.0.1:9090"


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

    def __init__(self, compose: list[str], file: Path, project: str, env: dict[str, str]):
        self.base = [*compose, "-p", project, "-f", str(file)]
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
    core = Stack(compose, LAB_CORE, f"{tag}core", env)
    host = Stack(compose, INSTRUMENT_HOST, f"{tag}host", env)
    try:
        yield core, host
    finally:
        for stack in (host, core):
            run([*stack.base, "down", "--volumes", "--remove-orphans", "--timeout", "5"], env=env)


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


def test_lab_core_and_instrument_host(docker, image, prometheus_image, compose, tmp_path):
    api, pub, http, device_port, metrics_port, prometheus_port = free_ports(6)
    # The shipped Prometheus configuration, with only discovery's HTTP port substituted.
    prometheus_dir = tmp_path / "prometheus"
    shutil.copytree(COMPOSE / "prometheus", prometheus_dir)
    config = prometheus_dir / "prometheus.yml"
    assert config.read_text().count("labmesh-discovery:5552") == 2
    config.write_text(
        config.read_text().replace("labmesh-discovery:5552", f"labmesh-discovery:{http}")
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
        "LABMESH_HEALTH_URL": f"http://127.0.0.1:{metrics_port}/metrics",
        "PROMETHEUS_IMAGE": prometheus_image,
        "PROMETHEUS_HOST": "127.0.0.1",
        "PROMETHEUS_PORT": str(prometheus_port),
        "LABMESH_PROMETHEUS_DIR": str(prometheus_dir),
    }
    timings: dict[str, float] = {}
    with stacks(compose, env) as (core, host):
        started = time.monotonic()
        core("up", "-d", "--no-build", "discovery", "prometheus")
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

        core_id = core.container("discovery")
        host_id = host.container()
        assert wait_until(lambda: health(docker, core_id) == "healthy", 20, 0.5)
        assert wait_until(lambda: health(docker, host_id) == "healthy", 20, 0.5)

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
