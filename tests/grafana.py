"""Reading a Grafana dashboard's queries as Prometheus would run them (unit and e2e tests)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

DASHBOARD = REPO / "dashboards" / "ptft-pipelines.json"
# Grafana's $__rate_interval is at least four scrape intervals; Ray refreshes its values every 10 s,
# so a shorter window could see no change at all.
RATE_INTERVAL = "1m"
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}


@dataclass(frozen=True)
class Query:
    panel: str
    ref_id: str
    expr: str  # as written in the dashboard, with Grafana variables

    def __str__(self) -> str:
        return f"panel {self.panel!r} query {self.ref_id}: {self.expr}"


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel with queries (rows hold none), including those inside collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        found += [panel] if panel.get("type") != "row" else panel.get("panels", [])
    return found


def queries(dashboard: dict) -> list[Query]:
    return [
        Query(panel["title"], target["refId"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def concrete(expr: str, dashboard: dict) -> str:
    """The query Grafana would send with every variable at "All" and `$__rate_interval` set."""
    all_values = {
        variable["name"]: variable.get("allValue") or ".*"
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    }
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${__rate_interval}", RATE_INTERVAL)
    return re.sub(r"\$\{?(\w+)\}?", lambda match: all_values.get(match[1], match[0]), expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)  # label matchers, range windows
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)  # label lists
    names = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
    return {name for name in names if name.lower() not in PROMQL_WORDS}
