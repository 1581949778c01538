"""The Grafana dashboard: generated from deploy/grafana/gen-dashboard.py, well-formed, and
every metric it queries is one that iamlet really exposes (read from a live /metrics) or, for
kube2iam_* names not exposed yet, one of kube2iam's own metric names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploylib import CHART, IAMLET, ROOT, require

DASHBOARD = CHART / "dashboards" / "iamlet.json"

# kube2iam's metric families (jtblin/kube2iam metrics/metrics.go) as Prometheus exposes them.
KUBE2IAM_SAMPLES = {
    "kube2iam_iam_request_duration_seconds_bucket", "kube2iam_iam_request_duration_seconds_sum",
    "kube2iam_iam_request_duration_seconds_count", "kube2iam_iam_cache_hits_total",
    "kube2iam_http_request_duration_seconds_bucket", "kube2iam_http_request_duration_seconds_sum",
    "kube2iam_http_request_duration_seconds_count", "kube2iam_healthcheck_status", "kube2iam_info",
}
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
            "gauge": [""], "info": ["_info"], "summary": ["", "_sum", "_count"],
            "unknown": [""], "stateset": [""], "gaugehistogram": ["_bucket", "_gsum", "_gcount"]}


MOTO = os.environ.get("MOTO_SERVER", str(ROOT / ".venv" / "bin" / "moto_server"))
NETNS_TOOLS = ["unshare", "ip", "iptables-nft", "curl"]

PODS = """apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: app
    namespace: default
    uid: 00000000-0000-4000-8000-000000000001
    creationTimestamp: "2026-01-01T00:00:00Z"
    annotations: {iam.amazonaws.com/role: "arn:aws:iam::123456789012:role/dashboard"}
  spec: {containers: [{name: app, image: example/app}]}
  status: {phase: Running, podIP: 127.0.0.1, podIPs: [{ip: 127.0.0.1}]}
"""


@pytest.fixture(scope="module")
def live_scrapes(tmp_path_factory) -> tuple[str, str]:
    """/metrics of a real agent doing real work, in a private network namespace (nothing
    leaves it): --iptables on a veth named weave, moto as STS, one annotated pod at
    127.0.0.1 that fetches its credentials, so every family has samples. Every wait is
    bounded and fails the fixture with the server's log."""
    require(os.geteuid() == 0 and all(shutil.which(t) for t in NETNS_TOOLS),
            "needs root and " + ", ".join(NETNS_TOOLS))
    assert IAMLET.exists(), f"{IAMLET} missing: cargo build -p iamlet"
    assert Path(MOTO).exists(), f"{MOTO} missing: tests/install-python-tools.sh"
    tmp = tmp_path_factory.mktemp("live")
    (tmp / "pods.yaml").write_text(PODS)
    script = textwrap.dedent(f"""
        set -u
        # Polls URL until it answers 2xx, at most SECONDS; else prints why with the log's tail
        # and fails the whole script (never goes on without the server).
        wait_for() {{
          local url=$1 secs=$2 log=$3 pid=$4 i
          for i in $(seq 1 $((secs * 10))); do
            curl -fs "$url" >/dev/null 2>&1 && return 0
            kill -0 "$pid" 2>/dev/null || {{ echo "FATAL: $log: the process exited before $url answered"; tail -n 40 "$log"; exit 1; }}
            sleep 0.1
          done
          echo "FATAL: $url did not answer within ${{secs}}s"; tail -n 40 "$log"; exit 1
        }}
        ip link set lo up
        ip link add weave type veth peer name weave-peer
        ip addr add 10.99.0.1/24 dev weave && ip link set weave up && ip link set weave-peer up
        {MOTO} -H 127.0.0.1 -p 15001 >{tmp}/moto.log 2>&1 &
        MOTO=$!
        trap 'kill $MOTO ${{AGENT:-}} 2>/dev/null' EXIT
        wait_for http://127.0.0.1:15001/moto-api/ 90 {tmp}/moto.log $MOTO
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin AWS_REGION=us-east-1 \\
            AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true \\
            AWS_ENDPOINT_URL_STS=http://127.0.0.1:15001 \\
          {IAMLET} --app-port=8181 --iptables=true --host-ip=10.99.0.1 --host-interface=weave \\
            --workers=1 --metadata-addr=127.0.0.1:15001 --pods-from={tmp}/pods.yaml \\
            --base-role-arn=arn:aws:iam::123456789012:role/ \\
            >{tmp}/iamlet.log 2>&1 &
        AGENT=$!
        wait_for http://127.0.0.1:8181/ready 60 {tmp}/iamlet.log $AGENT
        curl -fsS http://127.0.0.1:8181/metrics >{tmp}/fresh.txt
        C=http://127.0.0.1:8181/latest/meta-data/iam/security-credentials
        curl -fsS $C/ >/dev/null && curl -fsS $C/dashboard >/dev/null && curl -fsS $C/dashboard >/dev/null \\
          || {{ echo "FATAL: the pod's credential requests failed"; tail -n 40 {tmp}/iamlet.log; exit 1; }}
        curl -s http://127.0.0.1:8181/latest/meta-data/placement/region >/dev/null
        curl -fsS http://127.0.0.1:8181/metrics >{tmp}/metrics.txt
        iptables-save -t nat >/dev/null
    """)
    r = subprocess.run(["unshare", "--net", "bash", "-c", script], capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    metrics, fresh = tmp / "metrics.txt", tmp / "fresh.txt"
    assert metrics.stat().st_size and fresh.stat().st_size, (
        r.stdout + r.stderr + (tmp / "iamlet.log").read_text())
    return fresh.read_text(), metrics.read_text()


@pytest.fixture(scope="module")
def live_metrics(live_scrapes) -> str:
    """The agent's /metrics after it served the pod."""
    return live_scrapes[1]


def exposed_names(text: str) -> set[str]:
    """Every sample name the families in this exposition can have (also families that have
    no sample yet, from their # TYPE line)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names.update(family + s for s in SUFFIXES.get(kind, [""]))
            if kind == "counter" and family.endswith("_total"):
                names.add(family)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in d["templating"]["list"] if "definition" in v]
    return exprs


def referenced_metrics() -> set[str]:
    return {m for e in dashboard_exprs() for m in re.findall(r"\b((?:iamlet|kube2iam)_[a-z0-9_]+)", e)}


def test_dashboard_is_generated_from_its_script():
    r = subprocess.run([sys.executable, str(ROOT / "deploy" / "grafana" / "gen-dashboard.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_shape():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "iamlet" and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in d["panels"]).lower()
    for topic in ["route and status", "latency", "sts assumerole calls", "sts assumerole errors",
                  "sts assumerole latency", "cache hits", "pods indexed", "dnat rule present"]:
        assert topic in titles, topic
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"
                assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
                if "iamlet_" in t["expr"] or "kube2iam_" in t["expr"]:
                    assert '$instance' in t["expr"], t["expr"]


def test_every_iamlet_metric_in_the_dashboard_is_exposed(live_metrics):
    exposed = exposed_names(live_metrics)
    missing = sorted(m for m in referenced_metrics() if m.startswith("iamlet_") and m not in exposed)
    assert not missing, f"the dashboard queries metrics iamlet does not expose: {missing}"


def test_every_kube2iam_metric_in_the_dashboard_is_kube2iams(live_metrics):
    wanted = {m for m in referenced_metrics() if m.startswith("kube2iam_")}
    assert wanted, "the dashboard keeps kube2iam's panels"
    assert wanted <= KUBE2IAM_SAMPLES, wanted - KUBE2IAM_SAMPLES
    exposed = {m for m in exposed_names(live_metrics) if m.startswith("kube2iam_")}
    assert wanted <= exposed, f"the dashboard queries kube2iam names iamlet does not expose: {wanted - exposed}"


def test_iamlet_families_the_issue_names_are_queried():
    refs = referenced_metrics()
    for m in ["iamlet_http_requests_total", "iamlet_sts_assume_role_total",
              "iamlet_sts_assume_role_duration_seconds_bucket",
              "iamlet_credential_cache_hits_total", "iamlet_pods_indexed",
              "iamlet_iptables_rule_present", "iamlet_http_request_duration_seconds_bucket",
              "kube2iam_http_request_duration_seconds_bucket"]:
        assert m in refs, m


def test_a_fresh_agent_exposes_every_dashboard_metric(live_scrapes):
    """Right after /ready, before any pod asked: every family the dashboard queries has a
    sample (0 where nothing happened yet), so its panels show 0, not "no data"."""
    fresh = live_scrapes[0]
    samples = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in fresh.splitlines()
                if line and not line.startswith("#")}
    missing = sorted(m for m in referenced_metrics() if m not in samples)
    assert not missing, f"no sample on a fresh agent for {missing}:\n{fresh}"
