"""The Helm chart (helm/labmesh), rendered and linted by a real helm, validated offline against
the Kubernetes API schemas (kubernetes-validate), with assertions on the rendered objects.

Rendered with helm/labmesh/ci/full-values.yaml: three hosts that between them use every device
access mode (hostPath USB, device-plugin resources, none), host networking on and off, metrics
on and off, plus ServiceMonitor / PodMonitor / PrometheusRule and the Grafana ConfigMaps.
The dashboards and rules the chart ships are links to compose/ (one copy): the tests compare
the rendered ConfigMaps and rules with those files byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from system_tools import INSTALL, require_tool, unavailable

from labmesh.config import DEFAULT_METRICS_PORT, parse_host_config

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "labmesh"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
DASHBOARDS = REPO / "compose" / "grafana" / "dashboards"
RULES = REPO / "compose" / "prometheus" / "rules" / "labmesh.rules.yml"
DATASOURCE = REPO / "compose" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
NAMESPACE = "lab"
#: Kubernetes versions validated against: the chart's kubeVersion floor and a current one.
KUBE_VERSIONS = ("1.23.0", "1.31.0")
#: Kinds of the Prometheus Operator (CRDs: no schema in kubernetes-validate).
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([require_tool("helm"), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "lab", str(CHART), "--namespace", NAMESPACE, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(FULL_VALUES.read_text())


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render("-f", str(FULL_VALUES))


@pytest.fixture(scope="module")
def hosts(objects, values) -> dict[str, dict[str, Any]]:
    """Per host entry: its Deployment, pod spec, container, ConfigMap and parsed host file."""
    deployments = by_kind(objects, "Deployment")
    configmaps = by_kind(objects, "ConfigMap")
    out = {}
    for entry in values["hosts"]:
        name = f"lab-labmesh-host-{entry['name']}"
        deployment = deployments[name]
        pod = deployment["spec"]["template"]["spec"]
        text = configmaps[name]["data"]["host.yaml"]
        out[entry["name"]] = {
            "entry": entry,
            "deployment": deployment,
            "pod": pod,
            "container": pod["containers"][0],
            "host_file": text,
            "config": parse_host_config(text, f"{name}/host.yaml"),
        }
    return out


def test_lint_passes_for_defaults_and_full_values():
    version = helm("version", "--short").stdout.strip()
    assert version.startswith("v3."), version
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), "-f", str(FULL_VALUES))


def test_every_object_is_valid_for_kubernetes(objects):
    try:
        import kubernetes_validate
    except ImportError:
        unavailable(f"kubernetes-validate is not installed ({INSTALL['kubernetes-validate']})")
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "Pod"} | OPERATOR_KINDS <= kinds
    checked = 0
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {exc}")
            checked += 1
    assert checked == 2 * (len(objects) - len(OPERATOR_KINDS))


def test_default_values_render_discovery_and_dashboards_only():
    objects = render()
    assert sorted(by_kind(objects, "Deployment")) == ["lab-labmesh-discovery"]
    assert sorted(by_kind(objects, "Service")) == ["labmesh-discovery"]
    assert not OPERATOR_KINDS & {o["kind"] for o in objects}
    dashboards = [o for o in objects if o["kind"] == "ConfigMap"]
    assert len(dashboards) == len(list(DASHBOARDS.glob("*.json"))) > 0


def test_device_servers_are_pinned_to_their_nodes(hosts):
    assert sorted(hosts) == ["daq-pc", "optics-pc-1", "sim-rig"]
    for name, host in hosts.items():
        spec = host["deployment"]["spec"]
        assert host["pod"]["nodeSelector"] == host["entry"]["nodeSelector"], name
        assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}, name
        assert spec["selector"]["matchLabels"]["labmesh.io/host"] == name
        hostnet = host["entry"].get("hostNetwork", True)
        assert host["pod"].get("hostNetwork", False) is hostnet, name
        if hostnet:  # the discovery Service's name must still resolve from the node's network
            assert host["pod"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert hosts["daq-pc"]["pod"]["tolerations"] == hosts["daq-pc"]["entry"]["tolerations"]


def test_device_access_by_mode(hosts):
    def mounts(host):
        return {m["mountPath"]: m["name"] for m in host["container"]["volumeMounts"]}

    def volumes(host):
        return {v["name"]: v for v in host["pod"]["volumes"]}

    # hostPath: the node's /dev/bus/usb, privileged (Kubernetes has no device cgroup rules).
    optics = hosts["optics-pc-1"]
    assert mounts(optics)["/dev/bus/usb"] == "usb"
    assert volumes(optics)["usb"]["hostPath"] == {"path": "/dev/bus/usb", "type": "Directory"}
    assert optics["container"]["securityContext"]["privileged"] is True
    # devicePlugin resources: requested as limits, no hostPath, not privileged, no capabilities.
    daq = hosts["daq-pc"]
    assert daq["container"]["resources"]["limits"]["squat.ai/nidaq"] == 1
    assert daq["container"]["resources"]["limits"]["squat.ai/serial"] == 1
    assert "/dev/bus/usb" not in mounts(daq)
    context = daq["container"]["securityContext"]
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    # none + simulation.
    sim = hosts["sim-rig"]
    assert "/dev/bus/usb" not in mounts(sim)
    assert sim["container"]["args"] == ["serve", "/etc/labmesh/host.yaml", "--sim"]
    for host in hosts.values():
        assert mounts(host)["/etc/labmesh"] == "host-file"
        assert mounts(host)["/tmp"] == "tmp"  # the root filesystem is read-only
        assert host["container"]["securityContext"]["readOnlyRootFilesystem"] is True
        pod_context = host["pod"]["securityContext"]
        assert pod_context["runAsUser"] == 10001 and pod_context["runAsNonRoot"] is True
        assert pod_context["supplementalGroups"] == [46, 20]


def test_host_files_are_valid_and_point_at_discovery(hosts):
    endpoint = f"tcp://labmesh-discovery.{NAMESPACE}.svc:5550"
    for name, host in hosts.items():
        config = host["config"]
        assert config.host == name
        assert config.discovery == [endpoint]
        env = {e["name"]: e["value"] for e in host["container"]["env"]}
        assert env["LABMESH_DISCOVERY"] == endpoint
    # configFile is kept verbatim: comments survive and YAML 1.1 cannot turn the axis y into true
    daq = hosts["daq-pc"]
    assert "# NI-DAQmx wants every call on one thread" in daq["host_file"]
    stage = next(d for d in daq["config"].devices if d.name == "stage")
    assert stage.options["axes"] == ["x", "y", "z"]
    assert [d.name for d in daq["config"].devices] == ["daq-1", "stage", "psu"]


def test_ports_and_probes_follow_the_host_files(hosts):
    for name, host in hosts.items():
        config, container = host["config"], host["container"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        devices = {f"device-{i}": d.port for i, d in enumerate(config.devices)}
        assert {k: v for k, v in ports.items() if k.startswith("device-")} == devices, name
        annotations = host["deployment"]["spec"]["template"]["metadata"]["annotations"]
        assert len(annotations["checksum/config"]) == 64
        if config.metrics_port:
            assert ports["metrics"] == config.metrics_port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
            assert annotations["prometheus.io/port"] == str(config.metrics_port)
            assert annotations["prometheus.io/scrape"] == "true"
        else:  # metrics off: the first device server's port
            assert "metrics" not in ports
            assert container["livenessProbe"]["tcpSocket"] == {"port": "device-0"}
            assert "prometheus.io/scrape" not in annotations
    assert hosts["optics-pc-1"]["config"].metrics_port == DEFAULT_METRICS_PORT
    assert hosts["daq-pc"]["config"].metrics_port == 9106
    assert hosts["sim-rig"]["config"].metrics_port is None


def test_discovery_deployment_service_and_probes(objects):
    deployment = by_kind(objects, "Deployment")["lab-labmesh-discovery"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 1
    assert container["args"][0] == "discovery" and "--no-beacon" in container["args"]
    assert container["args"][container["args"].index("--address") + 1] == "tcp://*:5550"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"api": 5550, "pub": 5551, "http": 5552}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = by_kind(objects, "Service")["labmesh-discovery"]
    assert service["spec"]["type"] == "NodePort"
    spec_ports = service["spec"]["ports"]
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = {p["name"]: (p["port"], p["targetPort"], p["nodePort"]) for p in spec_ports}
    assert ports == {
        "api": (5550, "api", 30550),
        "pub": (5551, "pub", 30551),
        "http": (5552, "http", 30552),
    }


def test_dashboards_are_the_compose_files(objects):
    assert (CHART / "files" / "grafana" / "dashboards").resolve() == DASHBOARDS.resolve()
    files = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert files
    rendered = {}
    for cm in by_kind(objects, "ConfigMap").values():
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1":
            assert cm["metadata"]["annotations"]["grafana_folder"] == "labmesh"
            assert cm["metadata"]["namespace"] == NAMESPACE
            rendered.update(cm["data"])
    assert rendered == files  # byte for byte, one ConfigMap per file
    for text in rendered.values():
        assert json.loads(text)["uid"]


def test_datasource_configmap_is_the_compose_provisioning_file(objects, values):
    cm = by_kind(objects, "ConfigMap")["lab-labmesh-datasource"]
    assert cm["metadata"]["labels"]["grafana_datasource"] == "1"
    url = values["grafana"]["datasource"]["prometheusUrl"]
    text = cm["data"]["labmesh-datasource.yaml"]
    assert text == DATASOURCE.read_text().replace("${LABMESH_PROMETHEUS_URL}", url)
    (source,) = yaml.safe_load(text)["datasources"]
    assert source["uid"] == "labmesh-prometheus" and source["url"] == url


def test_prometheus_rule_is_the_shipped_rule_file(objects, tmp_path):
    (rule,) = by_kind(objects, "PrometheusRule").values()
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    promtool = require_tool("promtool")
    rendered = tmp_path / "rendered.rules.yml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(rendered)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_monitors_select_the_pods_with_the_rules_job_names(objects):
    rules = RULES.read_text()
    assert 'job="labmesh-discovery"' in rules and 'job="labmesh"' in rules
    (service_monitor,) = by_kind(objects, "ServiceMonitor").values()
    service = by_kind(objects, "Service")["labmesh-discovery"]
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "labmesh-discovery"} in endpoint["relabelings"]
    (pod_monitor,) = by_kind(objects, "PodMonitor").values()
    selector = pod_monitor["spec"]["selector"]["matchLabels"].items()
    hosts = [
        d for d in by_kind(objects, "Deployment").values() if "-host-" in d["metadata"]["name"]
    ]
    assert hosts and all(
        selector <= d["spec"]["template"]["metadata"]["labels"].items() for d in hosts
    )
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert {"targetLabel": "job", "replacement": "labmesh"} in endpoint["relabelings"]
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_label_labmesh_io_host"],
        "targetLabel": "labmesh_host",
    } in endpoint["relabelings"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "pc1", "config": {"devices": []}}, "nodeSelector is required"),
        ({"name": "Bad_Name", "nodeSelector": {"a": "b"}, "configFile": "x"}, "name"),
        ({"name": "pc1", "nodeSelector": {"a": "b"}}, "config is required"),
        (
            {"name": "pc1", "nodeSelector": {"a": "b"}, "configFile": "x", "usb": {"mode": "usb"}},
            "mode",
        ),
        ({"name": "pc1", "nodeSelector": {"a": "b"}, "configFile": "devices: 3"}, "devices list"),
    ],
    ids=["no-node-selector", "bad-name", "no-host-file", "bad-usb-mode", "not-a-host-file"],
)
def test_bad_values_are_refused_with_the_reason(tmp_path, values, message):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"hosts": [values]}))
    proc = helm("template", "lab", str(CHART), "-f", str(path), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_set_file_serves_an_example_host_file_verbatim():
    example = REPO / "examples" / "hosts" / "pm100.yaml"
    objects = render(
        "--set", "hosts[0].name=optics-pc-1",
        "--set", "hosts[0].nodeSelector.kubernetes\\.io/hostname=optics-pc-1",
        "--set-file", f"hosts[0].configFile={example}",
    )  # fmt: skip
    text = by_kind(objects, "ConfigMap")["lab-labmesh-host-optics-pc-1"]["data"]["host.yaml"]
    assert text.startswith(example.read_text())
    config = parse_host_config(text)
    assert config.host == "optics-pc-1"  # the file's own host key wins
    assert config.discovery == [f"tcp://labmesh-discovery.{NAMESPACE}.svc:5550"]


def test_packaged_chart_carries_the_linked_files(tmp_path):
    helm("package", str(CHART), "--destination", str(tmp_path))
    (package,) = tmp_path.glob("labmesh-*.tgz")
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
        for dashboard in DASHBOARDS.glob("*.json"):
            member = tar.extractfile(f"labmesh/files/grafana/dashboards/{dashboard.name}")
            assert member is not None and member.read() == dashboard.read_bytes()
        rules = tar.extractfile("labmesh/files/prometheus/rules/labmesh.rules.yml")
        assert rules is not None and rules.read() == RULES.read_bytes()
    assert "labmesh/values.schema.json" in names
    assert not any(n.startswith("labmesh/ci/") or n.endswith(".test.yml") for n in names)


def test_notes_render_for_full_values(tmp_path):
    # `helm template` skips NOTES.txt (and `helm install --dry-run` needs a cluster in helm
    # 3.10): render it as the body of a named template in a copy of the chart.
    chart = tmp_path / "labmesh"
    shutil.copytree(CHART, chart, symlinks=False)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_check.tpl").write_text(
        '{{- define "notes-check" }}' + notes + "{{- end }}"
    )
    (chart / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes-check}\n"
        'data:\n  notes: {{ include "notes-check" . | quote }}\n'
    )
    out = helm(
        "template", "lab", str(chart), "--namespace", NAMESPACE, "-f", str(FULL_VALUES),
        "--show-only", "templates/notes-check.yaml",
    ).stdout  # fmt: skip
    text = yaml.safe_load(out)["data"]["notes"]
    assert f"LABMESH_DISCOVERY=tcp://labmesh-discovery.{NAMESPACE}.svc:5550" in text
    assert (
        "optics-pc-1: node kubernetes.io/hostname=optics-pc-1 | USB hostPath (privileged)" in text
    )
    assert "stage (motor) port 5557" in text
    assert (
        "daq-pc: node labmesh.io/instruments=daq-pc | USB none | squat.ai/nidaq, squat.ai/serial"
        in text
    )
    assert "sim-rig" in text and "SIMULATED" in text
    assert "ServiceMonitor + PodMonitor created" in text
