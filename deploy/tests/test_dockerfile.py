"""deploy/Dockerfile, read (no Docker here): multi-stage, the toolchain that
rust-toolchain.toml pins, a locked release build of the iamlet package, a slim runtime with
both iptables backends, and an entrypoint that takes kube2iam's DaemonSet args."""

from __future__ import annotations

import re
import tomllib

from deploylib import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]


def test_multi_stage_with_the_pinned_toolchain():
    froms = [l.split() for l in instructions() if l.startswith("FROM ")]
    assert len(froms) == 2
    channel = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    assert froms[0][1] == f"rust:{channel}-bookworm" and froms[0][-1] == "build"
    assert froms[1][1] == "debian:bookworm-slim"


def test_locked_release_build_of_iamlet():
    runs = " ".join(l for l in instructions() if l.startswith("RUN "))
    assert "cargo build --release --locked -p iamlet" in runs


def test_runtime_has_both_iptables_backends_and_no_recommends():
    runs = [l for l in instructions() if l.startswith("RUN ") and "apt-get install" in l]
    assert len(runs) == 1
    run = runs[0]
    assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run
    pkgs = set(run.split("apt-get install", 1)[1].split("&&")[0].split())
    assert {"iptables", "ca-certificates", "conntrack"} <= pkgs


def test_entrypoint_takes_args_like_kube2iams_image():
    ins = instructions()
    assert 'ENTRYPOINT ["/usr/local/bin/iamlet"]' in ins
    assert not any(l.startswith("CMD ") for l in ins)
    assert any("/usr/bin/kube2iam" in l for l in ins if l.startswith("RUN "))
    assert "USER 0:0" in ins


def test_build_context_ignores_build_outputs():
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {"target/", ".venv/"} <= set(ignore)
    assert "Cargo.lock" not in ignore
