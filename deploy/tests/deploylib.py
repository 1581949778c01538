"""Helpers for the deploy tests: render the chart offline, load manifests, validate objects,
expand a container's args the way the kubelet does, run `iamlet --check-config`."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "chart"
MANIFESTS = ROOT / "deploy" / "manifests"
GOLDEN = Path(__file__).resolve().parent / "golden"
VALUES = Path(__file__).resolve().parent / "values"
IAMLET = Path(os.environ.get("IAMLET_BIN", ROOT / "target" / "debug" / "iamlet"))

# Kubernetes versions every object must validate against (strict: unknown fields fail):
# the oldest the chart declares, a current one, and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.25.0", "1.31.0"]

# The kube2iam rollout guide's DaemonSet args, as the guide spells them, one per line in
# seed-args.txt (the Rust tests read the same file): the manifest keeps them unchanged, and the
# chart's seed values (tests/values/seed.yaml) give the same flags.
SEED_ARGS = (Path(__file__).parent / "seed-args.txt").read_text().split()


def as_assignment(arg: str) -> str:
    """`--flag` as `--flag=true` (a bare boolean flag); `--flag=value` as it is."""
    return arg if "=" in arg else f"{arg}=true"


# What the Downward API gives the DaemonSet in a cluster (stand-ins for the expansion).
FIELD_REFS = {"status.hostIP": "10.1.2.3", "spec.nodeName": "ip-10-1-2-3.ec2.internal",
              "status.podIP": "10.1.2.3"}

def require(ok: bool, reason: str) -> None:
    """A prerequisite of the calling test: elsewhere than CI its absence skips the test
    (pytest reports it); in CI (CI=true) it fails it, so a test cannot silently not run."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"a prerequisite is missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


RELEASE = "iamlet"
NAMESPACE = "kube-system"


def kube_versions() -> list[str]:
    import kubernetes_validate

    latest = kubernetes_validate.latest_version()
    return KUBE_VERSIONS + ([latest] if latest not in KUBE_VERSIONS else [])


def render_chart(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, by Helm's own engine (helm-python-sdk), offline."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def split_docs(text: str) -> list[str]:
    """Non-empty YAML documents of a (multi-document) text."""
    docs = re.split(r"(?m)^---[ \t]*$", text)
    return [d.strip("\n") for d in docs if yaml.safe_load(d) is not None]


def as_template_output(rendered: dict[str, str]) -> str:
    """Like `helm template`: every document with a `# Source:` line, templates in name order,
    NOTES.txt left out."""
    out = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in split_docs(rendered[path]):
            out.append(f"---\n# Source: {path}\n{doc}\n")
    return "".join(out)


def objects(text: str) -> list[dict[str, Any]]:
    return [yaml.safe_load(d) for d in split_docs(text)]


def chart_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rendered = render_chart(values)
    return [o for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for o in objects(text)]


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((VALUES / name).read_text())


def manifest_objects(name: str) -> list[dict[str, Any]]:
    return objects((MANIFESTS / name).read_text())


def by_kind(objs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o.get("kind") == kind]


def validate(obj: dict[str, Any]) -> None:
    """Strict schema validation for every version in kube_versions(); raises on failure."""
    import kubernetes_validate

    for v in kube_versions():
        try:
            kubernetes_validate.validate(obj, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            name = obj.get("metadata", {}).get("name")
            raise AssertionError(
                f"{obj.get('kind')}/{name} is not valid for Kubernetes {v}: "
                f"{'.'.join(map(str, e.path))}: {e.message}") from None


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (fieldRefs from FIELD_REFS)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = FIELD_REFS[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $$ escapes, unknown references stay as written."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, s)


def expanded_args(container: dict[str, Any]) -> list[str]:
    env = container_env(container)
    args = [expand(a, env) for a in container.get("args", [])]
    left = [a for a in args if "$(" in a]
    assert not left, f"unexpanded references in args: {left}"
    return args


def check_config(container: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`iamlet <expanded args> --check-config` with the container's plain env only."""
    assert IAMLET.exists(), f"{IAMLET} missing: cargo build -p iamlet"
    env = {"PATH": "/usr/bin:/bin"}
    env.update({k: v for k, v in container_env(container).items()})
    return subprocess.run([str(IAMLET), *expanded_args(container), "--check-config"],
                          env=env, capture_output=True, text=True, timeout=30)


def agent_daemonset(objs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The agent's DaemonSet among rendered objects (not the cleanup ones)."""
    [ds] = [o for o in by_kind(objs, "DaemonSet")
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "uninstall"
            and not o["metadata"]["name"].endswith(("-uninstall", "-cleanup"))]
    return ds


def agent_container(ds: dict[str, Any]) -> dict[str, Any]:
    containers = ds["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the agent DaemonSet has one container"
    return containers[0]
