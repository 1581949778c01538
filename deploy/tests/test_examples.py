"""The examples in deploy/examples/: schema-valid, and the token-identity pod set up the way
every current AWS SDK reads it (docs/pod-identity.md): exactly the two variables, the
projected token at the path the token-file variable names, for the audience iamlet checks."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from deploylib import ROOT, agent_container, by_kind, manifest_objects, objects, validate
from urllib.parse import urlsplit

EXAMPLES = ROOT / "deploy" / "examples"

FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
TOKEN_FILE = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
# What competes with the two: most SDKs prefer RELATIVE_URI to FULL_URI, Java v2 and JS v3
# prefer the token in a variable to the file (which is never refreshed).
COMPETING = {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN"}


def example(name):
    return objects((EXAMPLES / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_is_schema_valid(name):
    objs = example(name)
    assert objs
    for o in objs:
        validate(o)


def shipped_audience():
    """The audience the shipped agent checks (the manifest's --token-audience)."""
    [ds] = by_kind(manifest_objects("iamlet.yaml"), "DaemonSet")
    [a] = [a for a in agent_container(ds)["args"] if a.startswith("--token-audience=")]
    return a.split("=", 1)[1]


def test_token_identity_pod_has_exactly_the_two_variables_and_its_token():
    objs = example("token-identity-pod.yaml")
    [sa] = by_kind(objs, "ServiceAccount")
    [pod] = by_kind(objs, "Pod")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/checkout"}
    spec = pod["spec"]
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["metadata"]["namespace"] == sa["metadata"]["namespace"]
    # The role comes from the ServiceAccount: no pod annotation to win over it.
    assert "iam.amazonaws.com/role" not in pod["metadata"].get("annotations", {})
    assert not spec.get("hostNetwork"), "a hostNetwork pod has no address of its own to bind the token to"

    [volume] = [v for v in spec["volumes"] if "projected" in v]
    [source] = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "pods.eks.amazonaws.com" == shipped_audience()
    assert token["expirationSeconds"] == 86400
    assert token["path"] == "eks-pod-identity-token"

    containers = spec.get("initContainers", []) + spec["containers"]
    assert containers
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert set(env) == {FULL_URI, TOKEN_FILE}, (c["name"], sorted(env))
        assert not COMPETING & set(env)
        assert all("value" in e and "valueFrom" not in e for e in env.values())
        uri = urlsplit(env[FULL_URI]["value"])
        # The IPv4 literal: several SDKs resolve no names, Java v2 takes the IPv6 one only in
        # its IPv6 endpoint mode.
        assert (uri.scheme, uri.hostname, uri.port, uri.path, uri.query) == (
            "http", "169.254.170.23", None, "/v1/credentials", "")
        [mount] = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mount.get("readOnly") is True
        assert PurePosixPath(env[TOKEN_FILE]["value"]) == PurePosixPath(mount["mountPath"]) / token["path"]
        assert env[TOKEN_FILE]["value"] == (
            "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token")
        # Not under the default ServiceAccount token's mount, which the kubelet owns.
        assert not mount["mountPath"].startswith("/var/run/secrets/kubernetes.io/")


def test_the_webhook_settings_in_the_docs_inject_what_the_example_carries():
    """docs/pod-identity.md's table of the AWS pod-identity webhook's container-credentials
    flags: with those values the webhook injects the example's URI, audience and token path."""
    import re

    doc = (ROOT / "docs" / "pod-identity.md").read_text()
    flags = dict(re.findall(r"^\| `(--container-credentials-[a-z-]+)` \| `([^`]+)`", doc, re.M))
    [pod] = by_kind(example("token-identity-pod.yaml"), "Pod")
    [volume] = [v for v in pod["spec"]["volumes"] if "projected" in v]
    token = volume["projected"]["sources"][0]["serviceAccountToken"]
    [c] = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    [mount] = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
    assert flags == {
        "--container-credentials-full-uri": env[FULL_URI],
        "--container-credentials-audience": token["audience"],
        "--container-credentials-token-mount-path": mount["mountPath"],
        "--container-credentials-token-volume-name": volume["name"],
        "--container-credentials-token-path": token["path"],
    }
