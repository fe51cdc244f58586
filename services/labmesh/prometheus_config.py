"""Point the shipped Prometheus config (compose/prometheus/) at a given discovery service.

The file in the repository is the one compose and Helm use; `render` changes only where
discovery is and, optionally, the scrape interval, and makes rule paths absolute, so a test or
`labmesh demo --prometheus` runs exactly the shipped scrape jobs and alert rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def render(shipped: Path, discovery_http: str, scrape_interval: str | None = None) -> str:
    """The shipped prometheus.yml with `discovery_http` (HOST:PORT of discovery's HTTP API)
    substituted into its http_sd URLs and discovery targets."""
    config: dict[str, Any] = yaml.safe_load((shipped / "prometheus.yml").read_text())
    if scrape_interval:
        config.setdefault("global", {})["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [
        str((shipped / rule).resolve()) if not Path(rule).is_absolute() else rule
        for rule in config.get("rule_files", [])
    ]
    for job in config.get("scrape_configs", []):
        for sd in job.get("http_sd_configs", []):
            path = sd["url"].split("/", 3)[3] if sd["url"].count("/") >= 3 else "targets"
            sd["url"] = f"http://{discovery_http}/{path}"
        if "discovery" in job.get("job_name", ""):
            for static in job.get("static_configs", []):
                static["targets"] = [discovery_http]
    return yaml.safe_dump(config, sort_keys=False)
