"""Check the labmesh Grafana dashboards and Prometheus files; helpers shared by their tests.

    python scripts/check_dashboards.py          # structure of every dashboard, promtool checks

What it checks (no Grafana needed): every dashboard parses and has a uid and a title; panel ids
are unique and panels do not overlap; every data panel and variable uses the provisioned
datasource uid; every target has a PromQL expression; every metric name in PromQL is one labmesh
exports (read from labmesh.metrics) or `up`; every label in matchers, `by (...)`/`on (...)`
clauses and legends is a label those metrics or the shipped scrape config give; every template
variable used is defined. With promtool: `check config` and `test rules`.

The system test (tests/system/test_prometheus_dashboards.py) runs every query found here against a
real Prometheus scraping real labmesh processes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
DASHBOARDS = COMPOSE / "grafana" / "dashboards"
DATASOURCES = COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = COMPOSE / "grafana" / "provisioning" / "dashboards" / "labmesh.yml"
PROMETHEUS_DIR = COMPOSE / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules" / "labmesh.rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "rules" / "labmesh.rules.test.yml"

#: Labels Prometheus adds to every scraped series under the shipped prometheus.yml
#: (labmesh_devices and labmesh_kinds are dropped there by relabelling).
TARGET_LABELS = frozenset({"job", "instance", "labmesh_host"})
#: Series Prometheus makes itself for every target.
SYNTHETIC_METRICS = frozenset({"up"})
#: Grafana's built-in variables the dashboards may use.
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__range", "__range_s"})

_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)")
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)|\[\[(\w+)\]\]")
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


# ---- reading the files -------------------------------------------------------------------------
def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def datasource_uid() -> str:
    """The uid of the provisioned Prometheus datasource."""
    config = yaml.safe_load(DATASOURCES.read_text())
    (source,) = [d for d in config["datasources"] if d["type"] == "prometheus"]
    return source["uid"]


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dashboard) if p.get("type") != "row"]


def variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return dashboard.get("templating", {}).get("list", [])


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every data panel."""
    return [
        (panel.get("title", ""), target.get("refId", ""), target.get("expr", ""))
        for panel in data_panels(dashboard)
        for target in panel.get("targets", [])
    ]


# ---- PromQL --------------------------------------------------------------------------------
def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}, ${name:fmt}, [[name]]) by `values`;
    KeyError for a variable not in `values`."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(4)
        if name not in values:
            raise KeyError(f"variable ${name} has no value (known: {sorted(values)})")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def used_variables(text: str) -> set[str]:
    return {m.group(1) or m.group(3) or m.group(4) for m in _VARIABLE.finditer(text)}


def _neutral(expr: str) -> str:
    """The expression with variables replaced by harmless values, for static analysis."""
    return _VARIABLE.sub("1", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords and labels left out)."""
    text = _STRING.sub('""', _neutral(expr))
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(1)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    names |= {
        m.group(1)
        for m in re.finditer(r'__name__\s*=\s*"([^"]+)"', _neutral(expr))
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", m.group(1))
    }
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring/group_* clauses."""
    text = _STRING.sub('""', _neutral(expr))
    labels = set()
    for block in _MATCHERS.findall(text):
        labels |= set(_MATCHER_LABEL.findall(block))
    for _, inner in _GROUPING.findall(text):
        labels |= {part.strip() for part in inner.split(",") if part.strip()}
    return labels


def legend_labels(legend: str) -> set[str]:
    return set(_LEGEND_LABEL.findall(legend or ""))


# ---- what labmesh exports ----------------------------------------------------------------------
class _StubServer:
    """Enough of a DeviceServer for labmesh.metrics' scrape-time collector (no sockets)."""

    @staticmethod
    def metrics_snapshot() -> dict[str, Any]:
        return {
            "device": "stub",
            "up": True,
            "busy": False,
            "queue_depth": 0,
            "in_flight": 0,
            "waiters": 0,
            "locks": [{"resource": "r", "holder": "h", "holder_name": "n", "since": 0.0}],
            "values": [("p", "u", 1.0)],
        }


def exported_metrics() -> dict[str, frozenset[str]]:
    """Every series name a labmesh process can export -> its label names (from labmesh.metrics,
    plus the names of the scrape-time collector's gauges)."""
    from prometheus_client.metrics import MetricWrapperBase

    from labmesh import metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    out: dict[str, frozenset[str]] = {}
    wrappers = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    for wrapper in wrappers:
        labels = frozenset(wrapper._labelnames)
        for family in wrapper.describe():
            for suffix in suffixes.get(family.type, ("",)):
                extra = {"le"} if suffix == "_bucket" else set()
                out[family.name + suffix] = labels | extra
    collector = metrics._ServerCollector()
    stub = _StubServer()
    collector.add(stub)
    for family in collector.collect():
        for sample in family.samples:
            out[sample.name] = frozenset(sample.labels)
    for family in metrics.REGISTRY.collect():  # process_*, python_*, and the rest, by sample
        for sample in family.samples:
            out.setdefault(sample.name, frozenset(sample.labels))
    return out


# ---- the checks ------------------------------------------------------------------------------
def _overlaps(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def check_dashboard(
    dashboard: dict[str, Any], uid: str, exported: dict[str, frozenset[str]]
) -> list[str]:
    """Problems of one dashboard (empty: fine)."""
    problems: list[str] = []
    title = dashboard.get("title") or "?"

    def problem(message: str) -> None:
        problems.append(f"{title}: {message}")

    for key in ("uid", "title"):
        if not dashboard.get(key):
            problem(f"no {key}")
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        problem(f"schemaVersion {dashboard.get('schemaVersion')!r}: expected 36 or later")
    known_labels = set(TARGET_LABELS).union(*exported.values())
    known_metrics = set(exported) | SYNTHETIC_METRICS
    defined = {v.get("name") for v in variables(dashboard)}
    for variable in variables(dashboard):
        name = variable.get("name")
        if variable.get("type") == "query":
            if (variable.get("datasource") or {}).get("uid") != uid:
                problem(f"variable ${name}: datasource uid is not {uid!r}")
            query = variable_query(variable)
            match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
            if not match:
                problem(f"variable ${name}: expected label_values(selector, label), got {query!r}")
            else:
                for metric in metric_names(match.group(1)) - known_metrics:
                    problem(f"variable ${name}: unknown metric {metric}")
                for label in (label_names(match.group(1)) | {match.group(2)}) - known_labels:
                    problem(f"variable ${name}: unknown label {label}")
        for used in used_variables(variable_query(variable)) - defined:
            problem(f"variable ${name} uses undefined ${used}")
    ids = [p.get("id") for p in iter_panels(dashboard)]
    for dup in sorted({i for i in ids if ids.count(i) > 1}, key=str):
        problem(f"duplicate panel id {dup}")
    if None in ids:
        problem("a panel has no id")
    placed = [p for p in dashboard.get("panels", []) if "gridPos" in p]
    for panel in dashboard.get("panels", []):
        grid = panel.get("gridPos")
        if not grid or grid["x"] + grid["w"] > 24 or min(grid.values()) < 0:
            problem(f"panel {panel.get('title')!r}: bad gridPos {grid!r}")
    for i, a in enumerate(placed):
        for b in placed[i + 1 :]:
            if _overlaps(a["gridPos"], b["gridPos"]):
                problem(f"panels {a.get('title')!r} and {b.get('title')!r} overlap")
    for panel in data_panels(dashboard):
        ptitle = panel.get("title") or f"id {panel.get('id')}"
        if not panel.get("title"):
            problem(f"panel id {panel.get('id')} has no title")
        if (panel.get("datasource") or {}).get("uid") != uid:
            problem(f"panel {ptitle!r}: datasource uid is not {uid!r}")
        targets = panel.get("targets") or []
        if not targets:
            problem(f"panel {ptitle!r} has no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or None in refs:
            problem(f"panel {ptitle!r}: refIds missing or repeated: {refs}")
        for target in targets:
            where = f"panel {ptitle!r} {target.get('refId')}"
            expr = target.get("expr", "")
            if not expr.strip():
                problem(f"{where}: no expr")
                continue
            if (target.get("datasource") or {}).get("uid", uid) != uid:
                problem(f"{where}: datasource uid is not {uid!r}")
            for used in used_variables(expr) - defined - GRAFANA_BUILTINS:
                problem(f"{where}: undefined variable ${used}")
            names = metric_names(expr)
            if not names:
                problem(f"{where}: selects no metric: {expr!r}")
            for metric in names - known_metrics:
                problem(f"{where}: {metric} is not a labmesh metric")
            for label in label_names(expr) - known_labels:
                problem(f"{where}: unknown label {label!r}")
            for label in legend_labels(target.get("legendFormat", "")) - known_labels:
                problem(f"{where}: legend uses unknown label {label!r}")
            if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
                problem(f"{where}: unbalanced brackets")
    return problems


def check_all() -> list[str]:
    uid = datasource_uid()
    exported = exported_metrics()
    problems: list[str] = []
    uids: dict[str, Path] = {}
    for path in dashboard_files():
        try:
            dashboard = load_dashboard(path)
        except json.JSONDecodeError as exc:
            problems.append(f"{path.name}: not JSON: {exc}")
            continue
        if dashboard.get("uid") in uids:
            problems.append(f"{path.name}: uid {dashboard['uid']} also in {uids[dashboard['uid']]}")
        uids[dashboard.get("uid")] = path
        problems += [f"{path.name}: {p}" for p in check_dashboard(dashboard, uid, exported)]
    return problems


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        raise FileNotFoundError("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR
    )


def main() -> int:
    problems = check_all()
    for problem in problems:
        print(problem)
    print(f"{len(dashboard_files())} dashboards, {len(problems)} problem(s)")
    if shutil.which("promtool"):
        for args in (
            ("check", "config", str(PROMETHEUS_CONFIG)),
            ("test", "rules", str(RULE_TESTS)),
        ):
            result = promtool(*args)
            print(f"promtool {' '.join(args[:2])}: {'ok' if result.returncode == 0 else 'FAILED'}")
            if result.returncode:
                print(result.stdout + result.stderr)
                problems.append("promtool")
    else:
        print("promtool not installed: config and rule tests not run")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
