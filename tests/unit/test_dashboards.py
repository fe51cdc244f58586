"""The shipped Grafana dashboards, provisioning and Prometheus files, checked by structure.

The queries themselves run against a real Prometheus in
tests/system/test_prometheus_dashboards.py; here: every file parses, every panel is wired to the
provisioned datasource, every metric and label in PromQL is one labmesh exports, and promtool
accepts the config and passes the rule tests.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

from support import unavailable

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "check_dashboards", ROOT / "scripts" / "check_dashboards.py"
)
assert _spec is not None and _spec.loader is not None
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

DASHBOARD_FILES = checks.dashboard_files()
EXPECTED = {
    "Lab overview": "labmesh-overview",
    "Device detail": "labmesh-device",
    "Locks": "labmesh-locks",
}


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    return checks.exported_metrics()


@pytest.fixture(scope="module")
def uid() -> str:
    return checks.datasource_uid()


def need_promtool() -> None:
    if shutil.which("promtool") is None:
        unavailable("promtool is not installed (Debian: apt-get install prometheus)")


# ---- dashboards --------------------------------------------------------------------------------
def test_the_three_dashboards_are_shipped_once():
    titles = {}
    for path in DASHBOARD_FILES:
        dashboard = checks.load_dashboard(path)
        assert dashboard["title"] not in titles, f"{path.name} repeats {dashboard['title']!r}"
        titles[dashboard["title"]] = dashboard["uid"]
    assert titles == EXPECTED


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_structure(path, uid, exported):
    dashboard = checks.load_dashboard(path)
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None  # provisioned dashboards carry no database id
    assert "labmesh" in dashboard["tags"]
    assert checks.check_dashboard(dashboard, uid, exported) == []
    panels = checks.data_panels(dashboard)
    assert len(panels) >= 8
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_checker_finds_what_it_claims_to(uid, exported):
    """A broken copy of a dashboard: each defect is reported (the checks are not vacuous)."""
    dashboard = copy.deepcopy(checks.load_dashboard(checks.DASHBOARDS / "locks.json"))
    panels = checks.data_panels(dashboard)
    panels[0]["targets"][0]["expr"] = "sum(labmesh_lock_hold_since_seconds)"  # typo'd metric
    panels[1]["targets"][0]["expr"] = 'sum by (devcie) (labmesh_lock_waiters{device=~"$device"})'
    panels[2]["datasource"] = {"type": "prometheus", "uid": "someone-elses"}
    panels[3]["id"] = panels[4]["id"]
    panels[5]["targets"][0]["expr"] = ""
    panels[6]["targets"][0]["expr"] = 'labmesh_lock_waiters{device="$devices"}'
    panels[7]["targets"][0]["legendFormat"] = "{{holdername}}"
    problems = "\n".join(checks.check_dashboard(dashboard, uid, exported))
    assert "labmesh_lock_hold_since_seconds is not a labmesh metric" in problems
    assert "unknown label 'devcie'" in problems
    assert "datasource uid is not 'labmesh-prometheus'" in problems
    assert f"duplicate panel id {panels[4]['id']}" in problems
    assert "no expr" in problems
    assert "undefined variable $devices" in problems
    assert "legend uses unknown label 'holdername'" in problems


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        (
            "histogram_quantile(0.99, sum by (device, le) (rate(labmesh_request_duration_seconds_"
            'bucket{labmesh_host=~"$host", type=~"query|write"}[$__rate_interval])))',
            {"labmesh_request_duration_seconds_bucket"},
            {"device", "le", "labmesh_host", "type"},
        ),
        (
            "time() - labmesh_lock_held_since_seconds offset 15m > 8 * 3600",
            {"labmesh_lock_held_since_seconds"},
            set(),
        ),
        (
            "labmesh_device_up * on (instance, device) group_left (kind) labmesh_server_info"
            " or vector(1e-9)",
            {"labmesh_device_up", "labmesh_server_info"},
            {"instance", "device", "kind"},
        ),
    ],
)
def test_promql_names_are_extracted(expr, metrics, labels):
    assert checks.metric_names(expr) == metrics
    assert checks.label_names(expr) == labels


def test_variables_substitute_and_unknown_ones_fail():
    values = {"device": "stage-a", "__rate_interval": "30s"}
    expr = 'rate(x{device="$device", d2="${device}", d3="${device:regex}"}[$__rate_interval])'
    assert checks.substitute(expr, values) == (
        'rate(x{device="stage-a", d2="stage-a", d3="stage-a"}[30s])'
    )
    with pytest.raises(KeyError, match="host"):
        checks.substitute('x{labmesh_host=~"$host"}', values)


def test_every_labmesh_metric_is_on_a_dashboard(exported):
    """A metric nobody looks at is a gap: each labmesh family appears in some panel."""

    def family(name: str) -> str:
        for suffix in ("_bucket", "_count", "_sum"):
            base = name.removesuffix(suffix)
            if base != name and base + "_bucket" in exported:
                return base
        return name

    used = set()
    for path in DASHBOARD_FILES:
        for _title, _ref, expr in checks.queries(checks.load_dashboard(path)):
            used |= {family(name) for name in checks.metric_names(expr)}
    families = {
        family(name)
        for name in exported
        if name.startswith("labmesh_") and not name.endswith("_created")
    }
    assert families - used == set()


def test_device_detail_is_templated_by_one_device_and_locks_has_the_holder_table():
    device = checks.load_dashboard(checks.DASHBOARDS / "device-detail.json")
    (var,) = [v for v in checks.variables(device) if v["name"] == "device"]
    assert var["multi"] is False and var["includeAll"] is False
    assert any(p["type"] == "heatmap" for p in checks.data_panels(device))
    for panel in checks.data_panels(device):
        assert all('device="$device"' in t["expr"] for t in panel["targets"]), panel["title"]
    locks = checks.load_dashboard(checks.DASHBOARDS / "locks.json")
    (holders,) = [p for p in checks.data_panels(locks) if p["title"] == "Held locks"]
    assert holders["type"] == "table"
    assert all("labmesh_lock_held_since_seconds" in t["expr"] for t in holders["targets"])
    assert all(t["instant"] and t["format"] == "table" for t in holders["targets"])


# ---- Grafana provisioning ----------------------------------------------------------------------
def test_datasource_has_a_fixed_uid_and_an_env_url():
    config = yaml.safe_load(checks.DATASOURCES.read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["uid"] == "labmesh-prometheus"
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "${LABMESH_PROMETHEUS_URL}"


def test_dashboard_provider_loads_the_dashboards_folder():
    config = yaml.safe_load(checks.DASHBOARD_PROVIDERS.read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    assert provider["folder"] == "labmesh"


# ---- Prometheus --------------------------------------------------------------------------------
def _config() -> dict:
    return yaml.safe_load(checks.PROMETHEUS_CONFIG.read_text())


def test_prometheus_scrapes_hosts_through_discovery_and_discovery_itself(exported):
    config = _config()
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"labmesh", "labmesh-discovery"}
    (sd,) = jobs["labmesh"]["http_sd_configs"]
    assert sd["url"] == "http://labmesh-discovery:5552/targets"
    assert jobs["labmesh-discovery"]["static_configs"] == [{"targets": ["labmesh-discovery:5552"]}]
    metric_labels = set().union(*exported.values())
    for job in jobs.values():
        for rule in job.get("relabel_configs", []):
            # a target label named like a metric label would be renamed exported_<name>
            assert rule.get("target_label") not in metric_labels
    for path in config["rule_files"]:
        assert (checks.PROMETHEUS_DIR / path).is_file()


def test_rules_use_labmesh_metrics_and_every_alert_has_firing_and_quiet_tests(exported):
    rules = yaml.safe_load(checks.RULES.read_text())
    known_metrics = set(exported) | checks.SYNTHETIC_METRICS
    known_labels = set(checks.TARGET_LABELS).union(*exported.values())
    alerts = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert checks.metric_names(rule["expr"]) <= known_metrics, rule
            assert checks.label_names(rule["expr"]) <= known_labels, rule
            if "alert" in rule:
                alerts.add(rule["alert"])
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                assert {"summary", "description"} <= set(rule["annotations"])
    assert len(alerts) >= 8
    tests = yaml.safe_load(checks.RULE_TESTS.read_text())
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def test_promtool_check_config():
    need_promtool()
    result = checks.promtool("check", "config", str(checks.PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules():
    need_promtool()
    result = checks.promtool("test", "rules", str(checks.RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
