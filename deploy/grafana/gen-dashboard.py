#!/usr/bin/env python3
"""Writes the Grafana dashboard deploy/chart/dashboards/iamlet.json (import it in Grafana, or
let the chart ship it to Grafana's dashboard sidecar with grafana.dashboard.enabled=true).

    deploy/grafana/gen-dashboard.py           rewrite the JSON
    deploy/grafana/gen-dashboard.py --check   exit 1 when the JSON differs from this script

Every metric name used here is checked against a live iamlet's /metrics by
deploy/tests/test_dashboard.py (kube2iam_* names against kube2iam's own list until the binary
exposes them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "chart" / "dashboards" / "iamlet.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"

panels: list[dict] = []
_y = 0
_x = 0
_h = 0


def _place(w: int, h: int) -> dict:
    global _x, _y, _h
    if _x + w > 24:
        _x, _y, _h = 0, _y + _h, 0
    pos = {"x": _x, "y": _y, "w": w, "h": h}
    _x += w
    _h = max(_h, h)
    return pos


def row(title: str) -> None:
    global _x, _y, _h
    _x, _y, _h = 0, _y + _h, 0
    panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                   "gridPos": {"x": 0, "y": _y, "w": 24, "h": 1}})
    _y += 1


def target(expr: str, legend: str, ref: str, instant: bool = False) -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update({"instant": True, "range": False})
    return t


def timeseries(title: str, targets: list[tuple[str, str]], unit: str = "short",
               w: int = 12, h: int = 8, description: str = "", stack: bool = False) -> None:
    panels.append({
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "gridPos": _place(w, h),
        "fieldConfig": {"defaults": {"unit": unit, "custom": {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "showPoints": "never"}}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom",
                               "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(targets)],
    })


def stat(title: str, expr: str, unit: str = "short", description: str = "",
         thresholds: list[tuple[float | None, str]] | None = None, w: int = 6) -> None:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    panels.append({
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "gridPos": _place(w, 4),
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute",
                                                                  "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "none", "textMode": "auto"},
        "targets": [target(expr, "", "A", instant=True)],
    })


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    lbl = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
             f"{lbl}p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]


# --- overview ----------------------------------------------------------------------------
row("Overview")
stat("Agents reporting", f"count(iamlet_pods_indexed{{{SEL}}})",
     description="iamlet pods whose /metrics is scraped.")
stat("Nodes without the DNAT rule",
     f'count(iamlet_iptables_rule_present{{{SEL}, family="ipv4"}} == 0) or vector(0)',
     description="Agents whose IAMLET chain or PREROUTING jump is missing or wrong right now "
                 "(restored within --iptables-verify-interval). 0 is healthy.",
     thresholds=[(None, "green"), (1, "red")])
stat("Credential answers from cache",
     f"sum(rate(iamlet_credential_cache_hits_total{{{SEL}}}[{RATE}])) / "
     f"(sum(rate(iamlet_credential_cache_hits_total{{{SEL}}}[{RATE}])) + "
     f"sum(rate(iamlet_credential_cache_misses_total{{{SEL}}}[{RATE}])))",
     unit="percentunit",
     description="Share of credential requests answered without waiting for STS.",
     thresholds=[(None, "red"), (0.9, "orange"), (0.99, "green")])
stat("STS errors / s",
     f'sum(rate(iamlet_sts_assume_role_total{{{SEL}, outcome!="success"}}[{RATE}])) or vector(0)',
     unit="reqps", thresholds=[(None, "green"), (0.001, "red")])

# --- requests ----------------------------------------------------------------------------
row("Requests from pods")
timeseries("Requests by route and status",
           [(f"sum by (route, status) (rate(iamlet_http_requests_total{{{SEL}}}[{RATE}])) > 0",
             "{{route}} {{status}}")],
           unit="reqps", stack=True,
           description="Every answer, by route (credentials, role_list, token, passthrough, "
                       "admin, denied, invalid) and status class.")
timeseries("Error answers (4xx/5xx) by route",
           [(f'sum by (route, status) (rate(iamlet_http_requests_total{{{SEL}, status=~"4xx|5xx"}}[{RATE}])) > 0',
             "{{route}} {{status}}")],
           unit="reqps")
timeseries("Latency", quantiles("iamlet_http_request_duration_seconds"), unit="s",
           description="Time to answer a pod (iamlet_http_request_duration_seconds).")
timeseries("Latency by route, p99",
           [(f"histogram_quantile(0.99, sum by (le, route) (rate(iamlet_http_request_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
             "{{route}}")], unit="s")
timeseries("Latency by handler, p99 (kube2iam_http_request_duration_seconds)",
           [(f"histogram_quantile(0.99, sum by (le, handler) (rate(kube2iam_http_request_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
             "{{handler}}")], unit="s",
           description="kube2iam's compatible histogram (handler names as kube2iam's), for "
                       "dashboards and alerts written for kube2iam.")
timeseries("Connections",
           [(f"sum by (instance) (rate(iamlet_http_connections_total{{{SEL}}}[{RATE}]))",
             "{{instance}}")], unit="cps")
timeseries("Requests from unknown IPs (waited for the watcher)",
           [(f"sum by (outcome) (rate(iamlet_ip_waits_total{{{SEL}}}[{RATE}]))", "{{outcome}}")],
           unit="reqps",
           description="found: the pod appeared in time; timeout: answered 404 after "
                       "--backoff-max-elapsed-time.")

# --- credentials -------------------------------------------------------------------------
row("Credentials and STS")
timeseries("STS AssumeRole calls by outcome",
           [(f"sum by (outcome) (rate(iamlet_sts_assume_role_total{{{SEL}}}[{RATE}]))",
             "{{outcome}}")], unit="reqps", stack=True)
timeseries("STS AssumeRole errors by node",
           [(f'sum by (instance, outcome) (rate(iamlet_sts_assume_role_total{{{SEL}, outcome!="success"}}[{RATE}])) > 0',
             "{{instance}} {{outcome}}")], unit="reqps")
timeseries("STS AssumeRole latency", quantiles("iamlet_sts_assume_role_duration_seconds"),
           unit="s")
timeseries("IAM request latency (kube2iam_iam_request_duration_seconds), p99",
           [(f"histogram_quantile(0.99, sum by (le, code) (rate(kube2iam_iam_request_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
             "{{code}}")], unit="s")
timeseries("Credential cache hits and misses",
           [(f"sum(rate(iamlet_credential_cache_hits_total{{{SEL}}}[{RATE}]))", "hits"),
            (f"sum(rate(iamlet_credential_cache_misses_total{{{SEL}}}[{RATE}]))", "misses"),
            (f"sum(rate(kube2iam_iam_cache_hits_total{{{SEL}}}[{RATE}]))",
             "hits (kube2iam_iam_cache_hits_total)")], unit="reqps")
timeseries("Credential keys held",
           [(f"sum by (instance) (iamlet_credential_keys{{{SEL}}})", "{{instance}}")],
           description="(role ARN, external ID) keys with credentials kept fresh, per node.")

# --- node --------------------------------------------------------------------------------
row("Pods and node")
timeseries("Pods indexed",
           [(f"sum by (instance) (iamlet_pods_indexed{{{SEL}}})", "{{instance}}")])
timeseries("Pod IPs indexed",
           [(f"sum by (instance) (iamlet_ips_indexed{{{SEL}}})", "{{instance}}")])
timeseries("DNAT rule present",
           [(f"min by (instance, family) (iamlet_iptables_rule_present{{{SEL}}})",
             "{{instance}} {{family}}")],
           description="1: the IAMLET chain, its rules and the jump at the top of nat "
                       "PREROUTING are in place.")
timeseries("DNAT rule restores and errors",
           [(f"sum by (instance) (increase(iamlet_iptables_restores_total{{{SEL}}}[{RATE}])) > 0",
             "restored {{instance}}"),
            (f"sum by (instance) (increase(iamlet_iptables_errors_total{{{SEL}}}[{RATE}])) > 0",
             "error {{instance}}")])
timeseries("Pod source errors and snapshot publishes",
           [(f"sum by (instance) (rate(iamlet_pod_source_errors_total{{{SEL}}}[{RATE}]))",
             "source errors {{instance}}"),
            (f"sum by (instance) (rate(iamlet_snapshot_publishes_total{{{SEL}}}[{RATE}]))",
             "publishes {{instance}}")], unit="ops")
timeseries("Health (kube2iam_healthcheck_status)",
           [(f"min by (instance) (kube2iam_healthcheck_status{{{SEL}}})", "{{instance}}")],
           description="kube2iam's compatible health gauge: 1 passing.")
panels.append({
    "type": "table", "title": "Versions (kube2iam_info)", "datasource": DS,
    "gridPos": _place(24, 6),
    "targets": [target(f"max by (instance, version) (kube2iam_info{{{SEL}}})", "", "A",
                       instant=True)],
    "transformations": [{"id": "labelsToFields", "options": {}}],
    "fieldConfig": {"defaults": {}, "overrides": []},
    "options": {"showHeader": True},
})

for i, p in enumerate(panels, start=1):
    p["id"] = i

dashboard = {
    "title": "iamlet",
    "uid": "iamlet",
    "description": "iamlet: per-pod AWS IAM credentials (kube2iam replacement). "
                   "Generated by deploy/grafana/gen-dashboard.py.",
    "tags": ["iamlet", "kube2iam", "aws", "iam"],
    "editable": True,
    "graphTooltip": 1,
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-6h", "to": "now"},
    "refresh": "1m",
    "timezone": "",
    "annotations": {"list": []},
    "links": [],
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
        {"name": "instance", "label": "Agent", "type": "query", "datasource": DS,
         "query": {"query": "label_values(iamlet_pods_indexed, instance)", "refId": "instance"},
         "definition": "label_values(iamlet_pods_indexed, instance)",
         "multi": True, "includeAll": True, "allValue": ".*", "current": {}, "hide": 0,
         "refresh": 2, "sort": 1},
    ]},
    "panels": panels,
}

text = json.dumps(dashboard, indent=2, sort_keys=False) + "\n"
if "--check" in sys.argv[1:]:
    if OUT.read_text() != text:
        sys.exit(f"{OUT} is stale: run deploy/grafana/gen-dashboard.py")
    print(f"{OUT} is current")
else:
    OUT.write_text(text)
    print(f"wrote {OUT}")
