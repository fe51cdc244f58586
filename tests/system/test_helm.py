"""The Helm chart (helm/labmesh), rendered and linted by a real helm, validated offline against
the Kubernetes API schemas (kubernetes-validate), with assertions on the rendered objects.

Rendered with helm/labmesh/ci/full-values.yaml: three hosts that between them use the
unprivileged device access modes (a USB device plugin, device-plugin resources, none), metrics
on and off, CurveZMQ keys from Secrets, NetworkPolicies, three discovery pods (a StatefulSet),
plus ServiceMonitor / PodMonitor / PrometheusRule and the Grafana ConfigMaps. The privileged
opt-in (hostPath USB, host networking) is rendered from values of its own.
Every pod of the default render and of the full values is checked against the rules of Pod
Security "restricted" (`restricted_violations`, written from the Pod Security Standards).
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
from labmesh.discovery.resolver import parse_endpoints

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
#: The names the full values give the release's objects (release `lab`).
FULLNAME = "lab-labmesh"
DISCOVERY = f"{FULLNAME}-discovery"  # StatefulSet, lookup Service, PDB, NetworkPolicy
HEADLESS = f"{FULLNAME}-discovery-headless"
KEYS_PATH = "/var/run/secrets/labmesh/keys"
CLIENTS_PATH = "/var/run/secrets/labmesh/clients"
#: The label a namespace needs for the privileged opt-in (Pod Security admission).
PRIVILEGED_LABEL = "pod-security.kubernetes.io/enforce=privileged"
PM100 = "USB0::0x1313::0x8078::P0000001::INSTR"
#: One host entry without `usb:` or `hostNetwork:`: what the defaults make of it.
MINIMAL_HOST = {
    "name": "pc1",
    "nodeSelector": {"kubernetes.io/hostname": "pc1"},
    "config": {
        "devices": [{"name": "pm", "driver": "powermeter", "port": 5555, "resource": PM100}]
    },
}
#: The opt-in privileged USB host: hostPath /dev/bus/usb, privileged, host networking.
PRIVILEGED_HOST = {
    "name": "optics-pc-1",
    "nodeSelector": {"kubernetes.io/hostname": "optics-pc-1"},
    "usb": {"mode": "hostPath", "privileged": True},
    "hostNetwork": True,
    "config": {
        "devices": [{"name": "pm100-a", "driver": "powermeter", "port": 5555, "resource": PM100}]
    },
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([require_tool("helm"), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(*args: str, release: str = "lab") -> list[dict[str, Any]]:
    out = helm("template", release, str(CHART), "--namespace", NAMESPACE, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def values_file(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`Kind/name` -> pod template (with its metadata) of every object that makes pods."""
    out = {}
    for obj in objects:
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Pod":
            out[key] = obj
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out[key] = obj["spec"]["template"]
        elif obj["kind"] == "CronJob":
            out[key] = obj["spec"]["jobTemplate"]["spec"]["template"]
    return out


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]


# Pod Security Standards, "restricted" (which includes "baseline"), as of Kubernetes 1.31:
# https://kubernetes.io/docs/concepts/security/pod-security-standards/
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
#: The image's unprivileged user (services/Dockerfile LABMESH_UID).
IMAGE_UID = 10001


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """What keeps a pod (or pod template) from Pod Security "restricted", one line each, plus
    the chart's own two rules: a read-only root filesystem and the image's uid 10001."""
    spec, metadata = template["spec"], template.get("metadata", {})
    pod_context = spec.get("securityContext") or {}
    out = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"{field}: true")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {volume['name']}: {', '.join(sorted(kinds))}")
    for sysctl in pod_context.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']}")
    for key, value in (metadata.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            out.append(f"annotation {key}: {value}")
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")
    for label, context in [("pod", pod_context)] + [
        (f"container {c['name']}", c.get("securityContext") or {}) for c in all_containers(spec)
    ]:
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{label}: windowsOptions.hostProcess")
        if (context.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append(f"{label}: appArmorProfile Unconfined")
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or {"user", "role"} & set(selinux):
            out.append(f"{label}: seLinuxOptions {selinux}")
        if context.get("runAsUser") == 0:
            out.append(f"{label}: runAsUser 0")
    for container in all_containers(spec):
        name = f"container {container['name']}"
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            out.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities add {capabilities['add']}")
        if context.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {context['procMount']}")
        for port in container.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        seccomp = (context.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        # the chart's own rules, beyond the standard
        if context.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem is not true")
        uid = context.get("runAsUser", pod_context.get("runAsUser"))
        if uid != IMAGE_UID:
            out.append(f"{name}: runAsUser {uid}, not the image's {IMAGE_UID}")
    return out


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(FULL_VALUES.read_text())


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render("-f", str(FULL_VALUES))


@pytest.fixture(scope="module")
def privileged_values(tmp_path_factory) -> str:
    return values_file(tmp_path_factory.mktemp("privileged"), {"hosts": [PRIVILEGED_HOST]})


@pytest.fixture(scope="module")
def minimal_host_values(tmp_path_factory) -> str:
    return values_file(tmp_path_factory.mktemp("minimal"), {"hosts": [MINIMAL_HOST]})


@pytest.fixture(scope="module")
def hosts(objects, values) -> dict[str, dict[str, Any]]:
    """Per host entry: its Deployment, pod spec, container, ConfigMap and parsed host file."""
    deployments = by_kind(objects, "Deployment")
    configmaps = by_kind(objects, "ConfigMap")
    out = {}
    for entry in values["hosts"]:
        name = f"{FULLNAME}-host-{entry['name']}"
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


def render_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` prints it. `helm template` skips NOTES.txt (and `helm
    install --dry-run` needs a cluster in helm 3.10): render it as the body of a named template
    in a copy of the chart."""
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
        "template", "lab", str(chart), "--namespace", NAMESPACE, *args,
        "--show-only", "templates/notes-check.yaml",
    ).stdout  # fmt: skip
    return yaml.safe_load(out)["data"]["notes"]


def test_lint_passes_for_defaults_and_full_values(privileged_values):
    version = helm("version", "--short").stdout.strip()
    assert version.startswith("v3."), version
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), "-f", str(FULL_VALUES))
    helm("lint", "--strict", str(CHART), "-f", privileged_values)


def validate_all(objects: list[dict[str, Any]]) -> int:
    try:
        import kubernetes_validate
    except ImportError:
        unavailable(f"kubernetes-validate is not installed ({INSTALL['kubernetes-validate']})")
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
    return checked


def test_every_object_is_valid_for_kubernetes(objects):
    kinds = {o["kind"] for o in objects}
    assert {
        "StatefulSet", "Deployment", "Service", "ConfigMap", "Pod", "ServiceAccount",
        "PodDisruptionBudget", "NetworkPolicy",
    } | OPERATOR_KINDS <= kinds  # fmt: skip
    assert validate_all(objects) == 2 * (len(objects) - len(OPERATOR_KINDS))


def test_default_and_opt_in_renders_are_valid_for_kubernetes(
    minimal_host_values, privileged_values
):
    for args in ((), ("-f", minimal_host_values), ("-f", privileged_values)):
        objects = render(*args)
        assert validate_all(objects) == 2 * len(objects)


def test_default_values_render_discovery_and_dashboards_only():
    objects = render()
    assert not by_kind(objects, "Deployment")
    assert sorted(by_kind(objects, "StatefulSet")) == [DISCOVERY]
    assert sorted(by_kind(objects, "Service")) == [DISCOVERY, HEADLESS]
    assert sorted(by_kind(objects, "PodDisruptionBudget")) == [DISCOVERY]
    assert sorted(by_kind(objects, "ServiceAccount")) == [FULLNAME]
    assert not by_kind(objects, "NetworkPolicy")  # opt-in
    assert not OPERATOR_KINDS & {o["kind"] for o in objects}
    dashboards = [o for o in objects if o["kind"] == "ConfigMap"]
    assert len(dashboards) == len(list(DASHBOARDS.glob("*.json"))) > 0


def test_default_values_are_unprivileged(minimal_host_values):
    """A host entry without usb: or hostNetwork: gets no USB, no privilege, the pod network."""
    for objects in (render(), render("-f", minimal_host_values)):
        for name, template in pod_specs(objects).items():
            spec = template["spec"]
            assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
            assert not spec.get("hostIPC"), name
            assert not [v for v in spec.get("volumes", []) if "hostPath" in v], name
            for container in all_containers(spec):
                assert container["securityContext"].get("privileged") is not True, name
    objects = render("-f", minimal_host_values)
    (host,) = [
        d for d in by_kind(objects, "Deployment").values() if "-host-" in d["metadata"]["name"]
    ]
    container = host["spec"]["template"]["spec"]["containers"][0]
    assert not any(k.startswith("squat.ai/") for k in container["resources"]["limits"])
    assert "/dev/bus/usb" not in {m["mountPath"] for m in container["volumeMounts"]}


def test_the_restricted_checker_knows_the_rules():
    """The checker itself, against pods that each break one rule (and a clean one)."""
    clean = {
        "metadata": {},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": IMAGE_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "c",
                "securityContext": {
                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }  # fmt: skip
    assert restricted_violations(clean) == []

    def broken(change) -> list[str]:
        pod = json.loads(json.dumps(clean))
        change(pod["spec"], pod["spec"]["containers"][0]["securityContext"])
        return restricted_violations(pod)

    cases = {
        "hostNetwork": lambda s, c: s.update(hostNetwork=True),
        "hostPID": lambda s, c: s.update(hostPID=True),
        "hostPath": lambda s, c: s["volumes"].append({"name": "usb", "hostPath": {"path": "/d"}}),
        "privileged": lambda s, c: c.update(privileged=True),
        "allowPrivilegeEscalation": lambda s, c: c.pop("allowPrivilegeEscalation"),
        "drop ALL": lambda s, c: c.update(capabilities={"drop": ["NET_RAW"]}),
        "capabilities add": lambda s, c: c.update(
            capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}
        ),
        "runAsNonRoot": lambda s, c: s["securityContext"].pop("runAsNonRoot"),
        "runAsUser 0": lambda s, c: c.update(runAsUser=0),
        "seccompProfile": lambda s, c: c.update(seccompProfile={"type": "Unconfined"}),
        "readOnlyRootFilesystem": lambda s, c: c.pop("readOnlyRootFilesystem"),
        "hostPort": lambda s, c: s["containers"][0].update(
            ports=[{"containerPort": 1, "hostPort": 1}]
        ),
        "sysctl": lambda s, c: s["securityContext"].update(
            sysctls=[{"name": "kernel.msgmax", "value": "1"}]
        ),
    }  # fmt: skip
    for label, change in cases.items():
        assert broken(change), label


@pytest.mark.parametrize("which", ["defaults", "defaults+host", "full-values"])
def test_every_pod_meets_pod_security_restricted(which, minimal_host_values):
    args = {
        "defaults": (),
        "defaults+host": ("-f", minimal_host_values),
        "full-values": ("-f", str(FULL_VALUES)),
    }[which]
    pods = pod_specs(render(*args))
    assert any(k.startswith("StatefulSet/") for k in pods) and any(
        k.startswith("Pod/") for k in pods
    )
    if which != "defaults":
        assert any(k.startswith("Deployment/") for k in pods)
    problems = {
        name: found for name, spec in pods.items() if (found := restricted_violations(spec))
    }
    assert problems == {}


def test_the_privileged_usb_host_is_an_explicit_opt_in(tmp_path, privileged_values):
    objects = render("-f", privileged_values)
    deployment = by_kind(objects, "Deployment")[f"{FULLNAME}-host-optics-pc-1"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["privileged"] is True
    assert {"name": "usb", "mountPath": "/dev/bus/usb"} in container["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["usb"]["hostPath"] == {"path": "/dev/bus/usb", "type": "Directory"}
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # discovery's names still resolve
    found = restricted_violations(deployment["spec"]["template"])
    assert "hostNetwork: true" in found and "volume usb: hostPath" in found
    assert "container labmesh: privileged" in found
    # the rest of the release stays restricted
    others = {k: v for k, v in pod_specs(objects).items() if "-host-" not in k}
    assert others and not any(restricted_violations(v) for v in others.values())
    # NOTES name the host and the namespace label it needs
    notes = render_notes(tmp_path, "-f", privileged_values)
    node = "optics-pc-1: node kubernetes.io/hostname=optics-pc-1"
    assert f"{node} | USB hostPath (privileged) | host network" in notes
    assert "PRIVILEGED: optics-pc-1" in notes
    assert f"kubectl label namespace {NAMESPACE} {PRIVILEGED_LABEL}" in notes
    # hostNetwork alone is an opt-in too (and needs the label)
    hostnet = {**MINIMAL_HOST, "hostNetwork": True}
    notes = render_notes(tmp_path / "hostnet", "-f", values_file(tmp_path, {"hosts": [hostnet]}))
    assert "PRIVILEGED: pc1" in notes and PRIVILEGED_LABEL in notes


def test_docs_and_notes_state_the_namespace_label(tmp_path):
    section = (REPO / "docs" / "deployment.md").read_text().split("## Kubernetes (Helm)")[1]
    section = section.split("\n## ")[0]
    assert "pod-security.kubernetes.io/enforce: privileged" in section
    notes = render_notes(tmp_path)
    assert "pod-security.kubernetes.io/enforce=restricted" in notes
    assert PRIVILEGED_LABEL in notes  # what an opt-in host would need


def test_device_servers_are_pinned_to_their_nodes(hosts):
    assert sorted(hosts) == ["daq-pc", "optics-pc-1", "sim-rig"]
    for name, host in hosts.items():
        spec = host["deployment"]["spec"]
        assert host["pod"]["nodeSelector"] == host["entry"]["nodeSelector"], name
        assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}, name
        assert spec["selector"]["matchLabels"]["labmesh.io/host"] == name
        assert "hostNetwork" not in host["pod"], name  # the default: the pod network
    assert hosts["daq-pc"]["pod"]["tolerations"] == hosts["daq-pc"]["entry"]["tolerations"]


def test_device_access_by_mode(hosts):
    def mounts(host):
        return {m["mountPath"]: m["name"] for m in host["container"]["volumeMounts"]}

    # devicePlugin USB: the plugin's resource as a limit, no hostPath, not privileged.
    optics = hosts["optics-pc-1"]
    assert optics["container"]["resources"]["limits"]["squat.ai/usb"] == 1
    # device-plugin resources of a host with usb none.
    daq = hosts["daq-pc"]
    assert daq["container"]["resources"]["limits"]["squat.ai/nidaq"] == 1
    assert daq["container"]["resources"]["limits"]["squat.ai/serial"] == 1
    assert "squat.ai/usb" not in daq["container"]["resources"]["limits"]
    # none + simulation.
    sim = hosts["sim-rig"]
    assert sim["container"]["args"] == ["serve", "/etc/labmesh/host.yaml", "--sim"]
    for host in hosts.values():
        assert "/dev/bus/usb" not in mounts(host)
        assert mounts(host)["/etc/labmesh"] == "host-file"
        assert mounts(host)["/tmp"] == "tmp"  # the root filesystem is read-only
        context = host["container"]["securityContext"]
        assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
        pod_context = host["pod"]["securityContext"]
        assert pod_context["runAsUser"] == 10001 and pod_context["runAsNonRoot"] is True
        assert pod_context["supplementalGroups"] == [46, 20]


def test_hosts_register_with_every_discovery_pod(objects, hosts, values):
    replicas = values["discovery"]["replicas"]
    assert replicas == 3
    endpoints = [f"tcp://{DISCOVERY}-{i}.{HEADLESS}.{NAMESPACE}.svc:5550" for i in range(replicas)]
    for name, host in hosts.items():
        config = host["config"]
        assert config.host == name
        assert config.discovery == endpoints, name  # labmesh's own parser read the list
        env = {e["name"]: e.get("value") for e in host["container"]["env"]}
        assert parse_endpoints(env["LABMESH_DISCOVERY"]) == (False, endpoints)
    # configFile is kept verbatim: comments survive and YAML 1.1 cannot turn the axis y into true
    daq = hosts["daq-pc"]
    assert "# NI-DAQmx wants every call on one thread" in daq["host_file"]
    stage = next(d for d in daq["config"].devices if d.name == "stage")
    assert stage.options["axes"] == ["x", "y", "z"]
    assert [d.name for d in daq["config"].devices] == ["daq-1", "stage", "psu"]


def test_discovery_statefulset_headless_and_lookup_services(objects):
    statefulset = by_kind(objects, "StatefulSet")[DISCOVERY]
    spec = statefulset["spec"]
    assert spec["replicas"] == 3 and spec["serviceName"] == HEADLESS
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][0] == "discovery" and "--no-beacon" in container["args"]
    assert container["args"][container["args"].index("--address") + 1] == "tcp://*:5550"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"api": 5550, "pub": 5551, "http": 5552}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["affinity"]["podAntiAffinity"]  # spread over nodes by default
    services = by_kind(objects, "Service")
    headless = services[HEADLESS]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"] for p in headless["spec"]["ports"]} == {"api", "pub", "http"}
    service = services[DISCOVERY]
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {
        p["name"]: (p["port"], p["targetPort"], p["nodePort"]) for p in service["spec"]["ports"]
    }
    assert ports == {
        "api": (5550, "api", 30550),
        "pub": (5551, "pub", 30551),
        "http": (5552, "http", 30552),
    }
    pdb = by_kind(objects, "PodDisruptionBudget")[DISCOVERY]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # StatefulSet pods carry controller-revision-hash=NAME-<10 chars>: 63 at most
    assert len(DISCOVERY) <= 52


def test_two_releases_in_one_namespace_do_not_collide():
    first = render("-f", str(FULL_VALUES), release="lab")
    second = render("-f", str(FULL_VALUES), release="lab2")
    names = [{(o["kind"], o["metadata"]["name"]) for o in objects} for objects in (first, second)]
    assert len(names[0]) == len(first) and len(names[1]) == len(second)  # none twice in one
    assert names[0] & names[1] == set()
    # and neither selects the other's pods: every selector names its release
    for release, objects in (("lab", first), ("lab2", second)):
        for obj in objects:
            spec = obj.get("spec", {})
            selector = spec.get("selector")
            if obj["kind"] in (
                "ServiceMonitor",
                "PodMonitor",
                "StatefulSet",
                "Deployment",
                "PodDisruptionBudget",
            ):
                selector = selector["matchLabels"]
            elif obj["kind"] == "NetworkPolicy":
                selector = spec["podSelector"]["matchLabels"]
            if selector is not None:
                assert selector["app.kubernetes.io/instance"] == release, obj["metadata"]["name"]
            labels = obj["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == release
            assert labels["app.kubernetes.io/name"] == "labmesh"
        # hosts register with their own release's discovery only
        for configmap in by_kind(objects, "ConfigMap").values():
            if "host.yaml" in configmap["data"]:
                config = parse_host_config(configmap["data"]["host.yaml"])
                assert all(
                    e.startswith(f"tcp://{release}-labmesh-discovery-") for e in config.discovery
                )


def test_long_release_names_keep_every_name_valid_and_distinct():
    release = "a-very-long-release-name-for-the-optics-lab-number-4"  # 52 characters
    objects = render("-f", str(FULL_VALUES), release=release)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(set(names)) == len(names)
    for kind, name in names:
        assert len(name) <= 63 and not name.endswith("-"), (kind, name)
    (statefulset,) = by_kind(objects, "StatefulSet")
    assert len(statefulset) <= 52 and statefulset.endswith("-discovery")
    assert any(n.endswith("-host-optics-pc-1") for _, n in names)


def test_keys_come_from_secrets_as_read_only_files_never_env(objects, hosts, values):
    security = values["security"]
    assert not by_kind(objects, "Secret")  # the chart never holds key material
    for name, template in pod_specs(objects).items():
        for container in all_containers(template["spec"]):
            assert "envFrom" not in container, name
            for env in container.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), (name, env)
                assert "key_secret" not in str(env.get("value", "")), (name, env)

    def secret_volumes(pod):
        volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        assert volumes["keys"]["secretName"] == security["existingSecret"]
        assert volumes["clients"]["secretName"] == security["clientsSecret"]
        assert volumes["keys"]["defaultMode"] == 0o440 == volumes["clients"]["defaultMode"]
        return {i["key"] for i in volumes["keys"]["items"]}

    def read_only_mounts(container):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[KEYS_PATH] == {"name": "keys", "mountPath": KEYS_PATH, "readOnly": True}
        assert mounts[CLIENTS_PATH] == {
            "name": "clients",
            "mountPath": CLIENTS_PATH,
            "readOnly": True,
        }

    # discovery: only its own pair, given as paths
    discovery = by_kind(objects, "StatefulSet")[DISCOVERY]["spec"]["template"]["spec"]
    core = security["discoveryKey"]
    assert secret_volumes(discovery) == {f"{core}.key_secret", f"{core}.key"}
    container = discovery["containers"][0]
    read_only_mounts(container)
    args = container["args"]
    assert args[args.index("--key") + 1] == f"{KEYS_PATH}/{core}.key_secret"
    assert args[args.index("--clients") + 1] == CLIENTS_PATH
    roles = [args[i + 1] for i, a in enumerate(args) if a == "--role"]
    assert roles == security["discoveryRoles"]
    # hosts: their own pair and discovery's public key, named in the host file
    for name, host in hosts.items():
        key = host["entry"].get("keyName", name)
        assert secret_volumes(host["pod"]) == {f"{key}.key_secret", f"{key}.key", f"{core}.key"}
        read_only_mounts(host["container"])
        assert host["pod"]["securityContext"]["fsGroup"] == 10001  # group-readable 0440 files
        spec = host["config"].security
        assert spec is not None, name
        assert spec.key == f"{KEYS_PATH}/{key}.key_secret"
        assert spec.clients == [CLIENTS_PATH]
        assert spec.discovery_key == f"{KEYS_PATH}/{core}.key"
    # a host file's own security keys stay (sim-rig's roles)
    assert hosts["sim-rig"]["config"].security.roles == {"alice": "operator", "*": "observer"}


def test_without_secrets_there_is_no_key_mount(minimal_host_values):
    for template in pod_specs(render("-f", minimal_host_values)).values():
        assert not [v for v in template["spec"].get("volumes", []) if "secret" in v]
    configmap = by_kind(render("-f", minimal_host_values), "ConfigMap")[f"{FULLNAME}-host-pc1"]
    assert parse_host_config(configmap["data"]["host.yaml"]).security is None


def test_ports_and_probes_follow_the_host_files(hosts):
    for name, host in hosts.items():
        config, container = host["config"], host["container"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        devices = {f"device-{i}": d.port for i, d in enumerate(config.devices)}
        assert {k: v for k, v in ports.items() if k.startswith("device-")} == devices, name
        plaintext = {
            f"plaintext-{i}": d.plaintext_port
            for i, d in enumerate(config.devices)
            if d.plaintext_port
        }
        assert {k: v for k, v in ports.items() if k.startswith("plaintext-")} == plaintext, name
        annotations = host["deployment"]["spec"]["template"]["metadata"]["annotations"]
        assert len(annotations["checksum/config"]) == 64
        if config.metrics_port:
            assert ports["metrics"] == config.metrics_port
            # liveness is the process answering; readiness is every device served (/ready)
            for probe, path in (
                ("startupProbe", "/health"),
                ("readinessProbe", "/ready"),
                ("livenessProbe", "/health"),
            ):
                assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}
            assert annotations["prometheus.io/port"] == str(config.metrics_port)
            assert annotations["prometheus.io/scrape"] == "true"
        else:  # metrics off: the first device server's port
            assert "metrics" not in ports
            assert container["livenessProbe"]["tcpSocket"] == {"port": "device-0"}
            assert "prometheus.io/scrape" not in annotations
    assert hosts["optics-pc-1"]["config"].metrics_port == DEFAULT_METRICS_PORT
    assert hosts["daq-pc"]["config"].metrics_port == 9106
    assert hosts["sim-rig"]["config"].metrics_port is None
    assert hosts["sim-rig"]["config"].devices[0].plaintext_port == 5561


def test_network_policies_open_only_labmesh_ports_to_the_clients(objects, hosts, values):
    np = values["networkPolicy"]
    policies = by_kind(objects, "NetworkPolicy")
    assert sorted(policies) == sorted([DISCOVERY] + [f"{FULLNAME}-host-{h}" for h in hosts])
    clients = [
        {
            "podSelector": np["clients"]["podSelector"],
            "namespaceSelector": np["clients"]["namespaceSelector"],
        },
        *({"ipBlock": {"cidr": c}} for c in np["clients"]["cidrs"]),
    ]
    prometheus = [np["prometheus"]]
    release = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "labmesh",
                "app.kubernetes.io/instance": "lab",
            }
        }
    }

    def ingress(policy):
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        rules = policy["spec"]["ingress"]
        assert all(rule.get("from") for rule in rules)  # never an empty `from`: that is anyone
        return [(rule["from"], sorted(p["port"] for p in rule["ports"])) for rule in rules]

    discovery = policies[DISCOVERY]
    assert (
        discovery["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "discovery"
    )
    assert ingress(discovery) == [([release, *clients], [5550, 5551, 5552]), (prometheus, [5552])]
    for name, host in hosts.items():
        policy = policies[f"{FULLNAME}-host-{name}"]
        assert policy["spec"]["podSelector"]["matchLabels"]["labmesh.io/host"] == name
        config = host["config"]
        ports = sorted(
            [d.port for d in config.devices]
            + [d.plaintext_port for d in config.devices if d.plaintext_port]
        )
        expected = [(clients, ports)]
        if config.metrics_port:
            expected.append((prometheus, [config.metrics_port]))
        assert ingress(policy) == expected, name


def test_service_account_image_digest_and_test_pod(objects, values, tmp_path):
    (account,) = by_kind(objects, "ServiceAccount").values()
    assert account["metadata"]["name"] == FULLNAME
    assert account["automountServiceAccountToken"] is False
    digest = values["image"]["digest"]
    for name, template in pod_specs(objects).items():
        spec = template["spec"]
        assert spec["serviceAccountName"] == FULLNAME, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in all_containers(spec):
            assert container["image"] == f"registry.example.org/lab/labmesh@{digest}", name
    test_pod = by_kind(objects, "Pod")[f"{FULLNAME}-test-discovery"]
    assert test_pod["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"},
    }  # fmt: skip
    assert f"http://{DISCOVERY}:5552/health" in test_pod["spec"]["containers"][0]["args"][0]
    # an existing ServiceAccount: used, not made
    path = values_file(tmp_path, {"serviceAccount": {"create": False, "name": "lab-robot"}})
    objects = render("-f", path)
    assert not by_kind(objects, "ServiceAccount")
    assert {t["spec"]["serviceAccountName"] for t in pod_specs(objects).values()} == {"lab-robot"}
    # without a digest: repository:appVersion
    (statefulset,) = by_kind(render(), "StatefulSet").values()
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == "labmesh:0.1.0"


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
    cm = by_kind(objects, "ConfigMap")[f"{FULLNAME}-datasource"]
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
    selector = service_monitor["spec"]["selector"]["matchLabels"].items()
    services = by_kind(objects, "Service")
    assert selector <= services[DISCOVERY]["metadata"]["labels"].items()
    # not the headless Service too: each pod would be scraped twice
    assert not selector <= services[HEADLESS]["metadata"]["labels"].items()
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
        ({"hosts": [{"name": "pc1", "config": {"devices": []}}]}, "nodeSelector is required"),
        ({"hosts": [{"name": "Bad_Name", "nodeSelector": {"a": "b"}, "configFile": "x"}]}, "name"),
        ({"hosts": [{"name": "pc1", "nodeSelector": {"a": "b"}}]}, "config is required"),
        (
            {"hosts": [{**MINIMAL_HOST, "usb": {"mode": "usb"}}]},
            "mode",
        ),
        (
            {"hosts": [{"name": "pc1", "nodeSelector": {"a": "b"}, "configFile": "devices: 3"}]},
            "devices list",
        ),
        ({"hosts": [{**MINIMAL_HOST, "usb": {"mode": "hostPath"}}]}, "set usb.privileged: true"),
        ({"security": {"existingSecret": "lab-keys"}}, "security.clientsSecret is required"),
        ({"image": {"repository": "labmesh", "digest": "latest"}}, "digest"),
        ({"discovery": {"replicas": 0}}, "replicas"),
    ],
    ids=[
        "no-node-selector", "bad-name", "no-host-file", "bad-usb-mode", "not-a-host-file",
        "hostpath-without-privileged", "keys-without-clients", "bad-digest", "zero-replicas",
    ],
)  # fmt: skip
def test_bad_values_are_refused_with_the_reason(tmp_path, values, message):
    proc = helm("template", "lab", str(CHART), "-f", values_file(tmp_path, values), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_set_file_serves_an_example_host_file_verbatim():
    example = REPO / "examples" / "hosts" / "pm100.yaml"
    objects = render(
        "--set", "hosts[0].name=optics-pc-1",
        "--set", "hosts[0].nodeSelector.kubernetes\\.io/hostname=optics-pc-1",
        "--set-file", f"hosts[0].configFile={example}",
    )  # fmt: skip
    text = by_kind(objects, "ConfigMap")[f"{FULLNAME}-host-optics-pc-1"]["data"]["host.yaml"]
    assert text.startswith(example.read_text())
    config = parse_host_config(text)
    assert config.host == "optics-pc-1"  # the file's own host key wins
    assert config.discovery == [
        f"tcp://{DISCOVERY}-{i}.{HEADLESS}.{NAMESPACE}.svc:5550" for i in range(2)
    ]


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
    text = render_notes(tmp_path, "-f", str(FULL_VALUES))
    endpoints = ",".join(f"tcp://{DISCOVERY}-{i}.{HEADLESS}.{NAMESPACE}.svc:5550" for i in range(3))
    assert f"LABMESH_DISCOVERY={endpoints}" in text
    assert f"tcp://{DISCOVERY}.{NAMESPACE}.svc:5550" in text
    assert "optics-pc-1: node kubernetes.io/hostname=optics-pc-1 | USB devicePlugin" in text
    assert "stage (motor) port 5557" in text
    assert (
        "daq-pc: node labmesh.io/instruments=daq-pc | USB none | squat.ai/nidaq, squat.ai/serial"
        in text
    )
    assert "sim-rig" in text and "SIMULATED" in text
    assert "ServiceMonitor + PodMonitor created" in text
    assert "Secret lab-keys" in text and "NetworkPolicies" in text
    assert "PRIVILEGED" not in text and "pod-security.kubernetes.io/enforce=restricted" in text
