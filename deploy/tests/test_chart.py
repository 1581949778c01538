"""The Helm chart in deploy/chart/, rendered offline by Helm's own engine (helm-python-sdk
bundles Helm v4's Go library as libhelm_c): lint-clean, every object schema-valid, the default
render equal to deploy/tests/golden/default.yaml, every DaemonSet's args accepted by
`iamlet --check-config`."""

from __future__ import annotations

import json
import os

import pytest

from deploylib import (CHART, GOLDEN, NAMESPACE, RELEASE, SEED_ARGS, agent_container, agent_daemonset, as_template_output,
                       as_assignment, by_kind, chart_objects, check_config, expanded_args, load_values,
                       manifest_objects, render_chart, validate)

VALUE_SETS = {
    "default": None,
    "seed": "seed.yaml",
    "kube2iam-style": "kube2iam-style.yaml",
    "no-rbac": "no-rbac.yaml",
    "uninstall": "uninstall.yaml",
}


def values_of(name):
    f = VALUE_SETS[name]
    return None if f is None else load_values(f)


def test_helm_renders_offline_with_helms_library():
    import helm_python as helm

    assert helm.helm_sdk_version().startswith("v4."), helm.helm_sdk_version()
    rendered = render_chart()
    assert f"{RELEASE}/templates/daemonset.yaml" in rendered


def test_lint_is_clean():
    import helm_python as helm

    for name in VALUE_SETS:
        report = helm.lint(str(CHART), values_of(name), strict=True, namespace=NAMESPACE,
                           kube_version="v1.31.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, (name, problems)


def test_default_render_matches_golden():
    out = as_template_output(render_chart())
    golden = GOLDEN / "default.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(out)
    assert golden.exists(), "no golden file: deploy/tests/run.sh --update"
    assert out == golden.read_text(), (
        "the default render changed; if on purpose, run deploy/tests/run.sh --update "
        "and review the diff of deploy/tests/golden/default.yaml")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_is_valid(name):
    objs = chart_objects(values_of(name))
    assert objs
    for o in objs:
        if o["kind"] == "ServiceMonitor":
            continue  # a CRD: checked against the Service in test_service_monitor_scrapes_the_agents
        validate(o)
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"], o["kind"]


@pytest.mark.parametrize("name", [n for n in VALUE_SETS if n != "uninstall"])
def test_daemonset_args_pass_check_config(name):
    ds = agent_daemonset(chart_objects(values_of(name)))
    c = agent_container(ds)
    r = check_config(c)
    assert r.returncode == 0, (name, expanded_args(c), r.stdout, r.stderr)


def test_seed_values_give_the_seed_args():
    ds = agent_daemonset(chart_objects(load_values("seed.yaml")))
    args = agent_container(ds)["args"]
    for a in [*map(as_assignment, SEED_ARGS), "--node=$(NODE_NAME)"]:
        assert a in args, (a, args)


def test_kube2iam_style_values_reach_the_flags():
    ds = agent_daemonset(chart_objects(load_values("kube2iam-style.yaml")))
    c = agent_container(ds)
    args = c["args"]
    for a in ["--base-role-arn=arn:aws:iam::123456789012:role/", "--default-role=kube2iam-default",
              "--host-interface=cali+", "--metrics-port=9543", "--namespace-restrictions",
              "--namespace-restriction-format=regexp", "--verbose", "--imdsv2=required",
              "--io-driver=epoll", "--workers=4", "--log-format=json",
              "--iptables-backend=legacy", "--metadata-policy=allowlist",
              "--allow-metadata-path=^/latest/meta-data/placement/"]:
        assert a in args, (a, args)
    assert "ports" not in c, "no host ports: they block the surge pod"
    assert "--handover-socket=/run/iamlet/handover.sock" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "iamlet-aws"
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    spec = ds["spec"]["template"]["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert c["image"] == "registry.example.com/iamlet:0.1.0-rc1"


def test_default_daemonset_is_the_plain_manifests_agent():
    """The chart's default agent and deploy/manifests/iamlet.yaml agree on what matters."""
    chart_ds = agent_daemonset(chart_objects())
    [plain_ds] = by_kind(manifest_objects("iamlet.yaml"), "DaemonSet")
    cc, pc = agent_container(chart_ds), agent_container(plain_ds)
    cs, ps = chart_ds["spec"]["template"]["spec"], plain_ds["spec"]["template"]["spec"]
    for key in ["hostNetwork", "priorityClassName", "tolerations"]:
        assert cs[key] == ps[key], key
    assert chart_ds["spec"]["updateStrategy"] == plain_ds["spec"]["updateStrategy"]
    for key in ["resources"]:
        assert cc[key] == pc[key], key
    for key in ["capabilities", "privileged", "readOnlyRootFilesystem", "runAsUser",
                "allowPrivilegeEscalation"]:
        assert cc["securityContext"][key] == pc["securityContext"][key], key
    assert cc["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert cc["livenessProbe"]["httpGet"]["path"] == "/healthz"
    [chart_role] = by_kind(chart_objects(), "ClusterRole")
    [plain_role] = by_kind(manifest_objects("iamlet.yaml"), "ClusterRole")
    assert chart_role["rules"] == plain_role["rules"]
    # The container-credentials door is set up the same way in both.
    token_flags = ("--container-credentials", "--token-audience", "--token-keys-cache", "--cluster-name")
    token_args = lambda c: sorted(a for a in c["args"] if a.startswith(token_flags))
    assert token_args(cc) == token_args(pc) == [
        "--container-credentials=true",
        "--token-audience=pods.eks.amazonaws.com",
        "--token-keys-cache=/run/iamlet/service-account-keys.json",
    ]


def test_token_identity_values_reach_the_flags():
    values = {"iamlet": {"containerCredentials": False, "tokenAudience": "iamlet",
                         "clusterName": "prod-eu", "handoverDir": ""}}
    c = agent_container(agent_daemonset(chart_objects(values)))
    args = c["args"]
    for a in ["--container-credentials=false", "--token-audience=iamlet", "--cluster-name=prod-eu"]:
        assert a in args, (a, args)
    # No handover directory: nowhere on the host to keep the keys.
    assert not any(a.startswith(("--token-keys-cache", "--handover-socket")) for a in args), args
    r = check_config(c)
    assert r.returncode == 0, (expanded_args(c), r.stdout, r.stderr)
    # The defaults: on, the pod-identity webhook's audience, no cluster name, no TokenReview.
    args = agent_container(agent_daemonset(chart_objects()))["args"]
    assert "--container-credentials=true" in args and "--token-audience=pods.eks.amazonaws.com" in args
    assert not any(a.startswith(("--cluster-name", "--token-review")) for a in args), args


def tokenreview_rules(objs):
    [role] = by_kind(objs, "ClusterRole")
    return [r for r in role["rules"] if "tokenreviews" in r.get("resources", [])]


def test_token_review_adds_its_flag_and_its_rbac_only_when_enabled():
    assert not tokenreview_rules(chart_objects())
    objs = chart_objects({"iamlet": {"tokenReview": True}})
    assert tokenreview_rules(objs) == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    c = agent_container(agent_daemonset(objs))
    assert "--token-review" in c["args"]
    r = check_config(c)
    assert r.returncode == 0, (expanded_args(c), r.stdout, r.stderr)
    for o in objs:
        if o["kind"] != "ServiceMonitor":
            validate(o)


def test_no_rbac_uses_the_named_service_account():
    objs = chart_objects(load_values("no-rbac.yaml"))
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ServiceAccount")
    ds = agent_daemonset(objs)
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "iam-agent"
    [secret] = by_kind(objs, "Secret")
    c = agent_container(ds)
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert "--iptables=false" in c["args"] and not any(a.startswith("--host-ip") for a in c["args"])


def test_service_monitor_scrapes_the_agents():
    objs = chart_objects(load_values("kube2iam-style.yaml"))
    ds = agent_daemonset(objs)
    [svc] = by_kind(objs, "Service")
    [sm] = by_kind(objs, "ServiceMonitor")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == "monitoring"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert set(sm["spec"]["selector"]["matchLabels"].items()) <= set(svc["metadata"]["labels"].items())
    assert set(svc["spec"]["selector"].items()) <= set(pod_labels.items())
    [ep] = sm["spec"]["endpoints"]
    assert ep["path"] == "/metrics" and ep["interval"] == "30s"
    [port] = svc["spec"]["ports"]
    assert ep["port"] == port["name"] and port["port"] == 9543
    assert svc["spec"]["clusterIP"] == "None"


def test_dashboard_configmap_carries_the_dashboard():
    objs = chart_objects(load_values("kube2iam-style.yaml"))
    [cm] = by_kind(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["iamlet.json"]) == json.loads((CHART / "dashboards" / "iamlet.json").read_text())


def test_uninstall_mode_replaces_the_agent():
    objs = chart_objects(load_values("uninstall.yaml"))
    [ds] = by_kind(objs, "DaemonSet")
    assert ds["metadata"]["name"] == f"{RELEASE}-uninstall"
    assert not by_kind(objs, "ServiceMonitor") and not by_kind(objs, "Service")
    spec = ds["spec"]["template"]["spec"]
    [_, cleanup] = spec["initContainers"]
    assert cleanup["command"] == ["iamlet", "cleanup", "--kube2iam"]
    agent = agent_daemonset(chart_objects())
    assert ds["spec"]["selector"] != agent["spec"]["selector"]
    # The same as the plain uninstall manifest's pod, but for names and labels.
    [plain] = by_kind(manifest_objects("uninstall.yaml"), "DaemonSet")
    pspec = plain["spec"]["template"]["spec"]
    assert [c["command"] for c in spec["initContainers"]] == [c["command"] for c in pspec["initContainers"]]
    assert cleanup["securityContext"]["capabilities"] == pspec["initContainers"][1]["securityContext"]["capabilities"]


def test_notes_warn_about_kube2iams_prestop_hook():
    lifecycle = {"preStop": {"exec": {"command": [
        "/bin/sh", "-c",
        "eval `iptables-save | grep 169.254.169.254 | sed s/-A/'iptables -t nat -D'/g`"]}}}
    notes = render_chart({"lifecycle": lifecycle})[f"{RELEASE}/templates/NOTES.txt"]
    assert "WARNING: lifecycle" in notes
    assert "WARNING: lifecycle" not in render_chart()[f"{RELEASE}/templates/NOTES.txt"]


def test_helm_uninstall_leaves_a_cleanup_daemonset_behind():
    """`helm uninstall` never strands the DNAT rule: a pre-delete hook creates the cleanup
    DaemonSet (not part of the release, so it survives the uninstall)."""
    objs = chart_objects()
    [hook] = [o for o in by_kind(objs, "DaemonSet") if o["metadata"]["name"] == f"{RELEASE}-cleanup"]
    ann = hook["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-delete"
    assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation"
    [_, cleanup] = hook["spec"]["template"]["spec"]["initContainers"]
    assert cleanup["command"] == ["iamlet", "cleanup", "--kube2iam"]
    selectors = [o["spec"]["selector"] for o in by_kind(objs, "DaemonSet")]
    assert len(selectors) == len({str(s) for s in selectors}) == 2
    off = chart_objects({"uninstall": {"onHelmUninstall": False}})
    assert [o["metadata"]["name"] for o in by_kind(off, "DaemonSet")] == [RELEASE]
