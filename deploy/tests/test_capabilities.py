"""The manifests' capability set, exercised for real in a private network namespace (the
host's tables are never touched): the agent, holding only the capabilities
deploy/manifests/iamlet.yaml grants (bounding set, no_new_privs, uid 0, as the container
runtime sets them), installs its DNAT rule with each iptables backend, leaves it in place when
it exits (fail-closed), and the uninstall manifest's `iamlet cleanup --kube2iam`, with its
capabilities, removes it and kube2iam's leftover rule. And why NET_RAW is there: without it
iptables-legacy cannot open its raw socket."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

import pytest

from deploylib import IAMLET, agent_container, by_kind, manifest_objects, require

TOOLS = ["unshare", "setpriv", "ip", "iptables-legacy", "iptables-nft",
         "iptables-legacy-save", "iptables-nft-save", "curl"]

@pytest.fixture(autouse=True)
def _netns_prerequisites() -> None:
    require(os.geteuid() == 0 and all(shutil.which(t) for t in TOOLS),
            "needs root and " + ", ".join(TOOLS) + " (a private network namespace)")


def setpriv_for(container) -> list[str]:
    """setpriv arguments reproducing the container's capabilities: drop ALL, add the listed."""
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    keep = ",".join("+" + c.lower() for c in caps["add"])
    args = ["setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all"]
    if container["securityContext"].get("allowPrivilegeEscalation") is False:
        args.append("--no-new-privs")
    return args


def in_netns(script: str, timeout: int = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "--net", "bash", "-c", script], capture_output=True,
                          text=True, timeout=timeout,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def agent_and_cleanup():
    [ds] = by_kind(manifest_objects("iamlet.yaml"), "DaemonSet")
    [un] = by_kind(manifest_objects("uninstall.yaml"), "DaemonSet")
    cleanup = un["spec"]["template"]["spec"]["initContainers"][1]
    return agent_container(ds), cleanup


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_agent_installs_keeps_and_cleanup_removes_the_rule(backend, tmp_path):
    assert IAMLET.exists()
    agent, cleanup = agent_and_cleanup()
    pods = tmp_path / "pods.yaml"
    pods.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    log = tmp_path / "agent.log"
    agent_priv = " ".join(setpriv_for(agent))
    cleanup_priv = " ".join(setpriv_for(cleanup))
    cleanup_cmd = " ".join([str(IAMLET)] + cleanup["command"][1:])
    script = textwrap.dedent(f"""
        set -u
        fail() {{ echo "FAIL: $*"; echo '--- agent log'; cat {log}; exit 1; }}
        saved() {{ iptables-{backend}-save -t nat; }}
        ip link set lo up
        ip link add weave type veth peer name weave-peer
        ip addr add 10.99.0.1/24 dev weave && ip link set weave up && ip link set weave-peer up
        # The agent, with the DaemonSet's capabilities only.
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin AWS_REGION=us-east-1 \\
            AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true \\
            AWS_ENDPOINT_URL_STS=http://127.0.0.1:9 \\
          {agent_priv} {IAMLET} --app-port=8181 --iptables=true --host-ip=10.99.0.1 \\
            --host-interface=weave --iptables-backend={backend} --workers=1 \\
            --metadata-addr=127.0.0.1:9 --pods-from={pods} >{log} 2>&1 &
        AGENT=$!
        for _ in $(seq 1 150); do
          curl -fs http://127.0.0.1:8181/ready >/dev/null 2>&1 && break
          kill -0 $AGENT 2>/dev/null || fail "the agent exited"
          sleep 0.2
        done
        curl -fs http://127.0.0.1:8181/ready >/dev/null || {{ kill $AGENT; fail "agent not ready"; }}
        saved | grep -q -- '-j DNAT --to-destination 10.99.0.1:8181' || {{ kill $AGENT; saved; fail "no DNAT rule"; }}
        echo "agent ready, rule installed ({backend})"
        kill -TERM $AGENT; wait $AGENT
        echo "agent exited: $?"
        saved | grep -q -- '-j DNAT --to-destination 10.99.0.1:8181' || {{ saved; fail "the rule went away with the agent (not fail-closed)"; }}
        echo "rule kept after exit"
        # kube2iam's leftover rule, as kube2iam adds it.
        iptables-{backend} -w 5 -t nat -A PREROUTING -d 169.254.169.254/32 -i weave -p tcp \\
          --dport 80 -j DNAT --to-destination 10.99.0.1:8181 || fail "cannot add kube2iam's rule"
        # The uninstall manifest's cleanup container, with its capabilities only.
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin {cleanup_priv} {cleanup_cmd} || {{ saved; fail "cleanup failed"; }}
        if saved | grep -E -q '169\\.254\\.169\\.254|IAMLET'; then saved; fail "rules left after cleanup"; fi
        echo "cleanup removed everything"
    """)
    r = in_netns(script)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cleanup removed everything" in r.stdout


def test_net_raw_is_needed_by_iptables_legacy_only():
    """Why the manifests add NET_RAW: with NET_ADMIN alone, iptables-nft works and
    iptables-legacy fails."""
    agent, _ = agent_and_cleanup()
    assert agent["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    only_admin = "setpriv --bounding-set=-all,+net_admin --inh-caps=-all --no-new-privs"
    both = "setpriv --bounding-set=-all,+net_admin,+net_raw --inh-caps=-all --no-new-privs"
    rule = "-t nat -A PREROUTING -d 169.254.169.254/32 -p tcp --dport 80 -j DNAT --to-destination 10.99.0.1:8181"
    script = textwrap.dedent(f"""
        {only_admin} iptables-nft -w 5 {rule} && echo nft-admin-ok || echo nft-admin-fail
        {only_admin} iptables-legacy -w 5 {rule} 2>/dev/null && echo legacy-admin-ok || echo legacy-admin-fail
        {both} iptables-legacy -w 5 {rule} && echo legacy-both-ok || echo legacy-both-fail
    """)
    out = in_netns(script).stdout.split()
    assert out == ["nft-admin-ok", "legacy-admin-fail", "legacy-both-ok"], out
