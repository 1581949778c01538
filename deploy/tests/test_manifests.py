"""The plain manifests in deploy/manifests/: schema-valid, the field guide's DaemonSet args
accepted by `iamlet --check-config`, and the properties the deploy story relies on."""

from __future__ import annotations

import pytest
import yaml

from deploylib import (MANIFESTS, SEED_ARGS, agent_container, by_kind, check_config, expanded_args,
                       manifest_objects, validate)

FILES = ["iamlet.yaml", "uninstall.yaml"]


@pytest.mark.parametrize("name", FILES)
def test_every_object_is_schema_valid(name):
    objs = manifest_objects(name)
    assert objs
    for o in objs:
        validate(o)


def test_kustomization_installs_the_agent_only():
    k = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert k["resources"] == ["iamlet.yaml"]
    assert {p.name for p in MANIFESTS.glob("*.yaml")} == {*FILES, "kustomization.yaml"}


def agent_ds():
    [ds] = by_kind(manifest_objects("iamlet.yaml"), "DaemonSet")
    return ds


# The container-credentials door: on (with --iptables it also redirects 169.254.170.23),
# the AWS pod-identity webhook's audience, and the API server's keys kept beside the handover
# socket on the host, so a restart during an API server outage still verifies tokens.
TOKEN_ARGS = [
    "--container-credentials=true",
    "--token-audience=pods.eks.amazonaws.com",
    "--token-keys-cache=/run/iamlet/service-account-keys.json",
]


def test_daemonset_keeps_the_seed_args_and_adds_node():
    c = agent_container(agent_ds())
    assert c["args"] == SEED_ARGS + ["--node=$(NODE_NAME)", "--handover-socket=/run/iamlet/handover.sock",
                                     *TOKEN_ARGS]


def test_token_keys_are_kept_on_the_hosts_handover_directory():
    ds = agent_ds()
    c = agent_container(ds)
    [cache] = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--token-keys-cache=")]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    directory = cache.rsplit("/", 1)[0]
    assert directory in mounts, (cache, mounts)
    assert vols[mounts[directory]]["hostPath"]["path"] == directory
    # The root filesystem is read-only: the file can only be written there.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_daemonset_args_pass_check_config():
    c = agent_container(agent_ds())
    r = check_config(c)
    assert r.returncode == 0, (expanded_args(c), r.stdout, r.stderr)


def test_daemonset_args_expand_to_the_node():
    args = expanded_args(agent_container(agent_ds()))
    assert "--host-ip=10.1.2.3" in args and "--node=ip-10-1-2-3.ec2.internal" in args


def test_check_config_rejects_a_broken_copy():
    """The check above can fail: a wrong value is refused with exit 64."""
    c = agent_container(agent_ds())
    c = {**c, "args": [a if not a.startswith("--host-ip") else "--host-ip=not-an-ip"
                       for a in c["args"]]}
    r = check_config(c)
    assert r.returncode == 64, (r.stdout, r.stderr)


def test_daemonset_node_integration():
    ds = agent_ds()
    spec = ds["spec"]["template"]["spec"]
    c = agent_container(ds)
    env = {e["name"]: e for e in c["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["AWS_REGION"]["value"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8181}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8181}
    sc = c["securityContext"]
    assert sc.get("privileged") is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert mounts["xtables-lock"] == "/run/xtables.lock"
    assert vols["xtables-lock"]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    assert "cpu" not in c["resources"].get("limits", {}), "a CPU limit throttles answers"
    # Upgrades surge: the new pod takes the old one's sockets over the host directory.
    assert mounts["handover"] == "/run/iamlet"
    assert vols["handover"]["hostPath"] == {"path": "/run/iamlet", "type": "DirectoryOrCreate"}
    ru = ds["spec"]["updateStrategy"]
    assert ru == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    # A hostNetwork pod's declared port is a host port: the scheduler would keep the surge
    # pod off the node.
    assert "ports" not in c


def test_rbac():
    objs = manifest_objects("iamlet.yaml")
    [sa] = by_kind(objs, "ServiceAccount")
    [role] = by_kind(objs, "ClusterRole")
    [binding] = by_kind(objs, "ClusterRoleBinding")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"]
             for g in rule.get("apiGroups", []) for r in rule.get("resources", [])}
    assert rules[("", "pods")] >= {"get", "list", "watch"}
    assert rules[("", "namespaces")] >= {"get", "list", "watch"}
    assert rules[("", "serviceaccounts")] >= {"get", "list", "watch"}
    assert rules[("events.k8s.io", "events")] >= {"create", "patch"}
    assert rules[("", "events")] >= {"create", "patch"}
    # The service-account signing keys, granted here rather than left to the default
    # system:service-account-issuer-discovery binding (a cluster may have removed it).
    urls = {u: set(rule["verbs"]) for rule in role["rules"] for u in rule.get("nonResourceURLs", [])}
    assert urls == {"/.well-known/openid-configuration": {"get"}, "/openid/v1/jwks": {"get"}}
    # Nothing else new: no TokenReview, no writes beyond Events.
    assert {r for (_, r) in rules} == {"pods", "namespaces", "serviceaccounts", "events"}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    ds = agent_ds()
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_uninstall_runs_cleanup_on_every_node_after_the_agent_is_gone():
    [ds] = by_kind(manifest_objects("uninstall.yaml"), "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert {"operator": "Exists"} in spec["tolerations"]
    wait, cleanup = spec["initContainers"]
    assert "/dev/tcp/127.0.0.1/${AGENT_PORT}" in wait["command"][-1]
    assert {"name": "AGENT_PORT", "value": "8181"} in wait["env"]
    assert cleanup["command"] == ["iamlet", "cleanup", "--kube2iam"]
    assert cleanup["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert {"name": "xtables-lock", "mountPath": "/run/xtables.lock"} in cleanup["volumeMounts"]
    # Its pods never match the agent's selector.
    assert ds["spec"]["selector"] != agent_ds()["spec"]["selector"]
    images = {c["image"] for c in spec["initContainers"] + spec["containers"]}
    assert images == {agent_container(agent_ds())["image"]}


def test_uninstall_waits_while_an_agent_listens():
    """The wait-for-agent-gone script, run here on loopback: it returns at once when nothing
    listens on AGENT_PORT, and keeps waiting while something does."""
    import socket
    import subprocess

    [ds] = by_kind(manifest_objects("uninstall.yaml"), "DaemonSet")
    wait = ds["spec"]["template"]["spec"]["initContainers"][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        run = lambda t: subprocess.run(wait["command"], env={"PATH": "/usr/bin:/bin", "AGENT_PORT": str(port)},
                                       capture_output=True, text=True, timeout=t)
        s.listen()
        with pytest.raises(subprocess.TimeoutExpired):
            run(2)
    r = run(10)
    assert r.returncode == 0 and "cleaning up" in r.stdout
