"""The image's one runtime definition, deploy/image/runtime.conf, read (no build here): what
deploy/Dockerfile's runtime stage says agrees with it, deploy/image/build.sh reads it the way
this test does, and the shipped seccomp profile is the runtime default plus io_uring for
the capabilities the manifests give the agent. deploy/image/test.sh runs the built image."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from deploylib import (ROOT, agent_container, agent_daemonset, chart_objects, manifest_objects,
                       require, validate)

IMAGE = ROOT / "deploy" / "image"
RUNTIME = IMAGE / "runtime.conf"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SECCOMP = ROOT / "deploy" / "seccomp"
PROFILE = SECCOMP / "iamlet-io-uring.json"
# What debian:<suite>-slim sets: the Dockerfile inherits it, build.sh (from scratch) sets it.
DEBIAN_IMAGE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
SINGLE = ("suite", "binary", "entrypoint", "user", "workdir", "port")
MULTI = ("package", "symlink", "env", "label")


def runtime() -> dict:
    """runtime.conf as deploy/image/common.sh's read_runtime_conf reads it."""
    conf: dict = {k: [] for k in MULTI}
    for n, line in enumerate(RUNTIME.read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(" ")
        assert sep and value, f"runtime.conf:{n}: expected 'key value'"
        if key in MULTI:
            conf[key].append(value)
        else:
            assert key in SINGLE, f"runtime.conf:{n}: unknown key {key}"
            conf[key] = value
    assert set(SINGLE) <= set(conf), f"runtime.conf lacks {set(SINGLE) - set(conf)}"
    return conf


def pairs(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values)


def runtime_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    start = max(i for i, l in enumerate(lines) if l.startswith("FROM "))
    return [(l.split(None, 1) + [""])[:2] for l in lines[start:]]


def args(stage, instruction: str) -> list[str]:
    return [a for i, a in stage if i == instruction]


def test_bash_and_this_test_read_runtime_conf_alike():
    script = ('. deploy/image/common.sh; read_runtime_conf deploy/image/runtime.conf; '
              'for v in SUITE BINARY ENTRYPOINT USER WORKDIR PORT; do n=RUNTIME_$v; '
              'printf "%s\\0%s\\0" "$v" "${!n}"; done; '
              'for v in PACKAGES SYMLINKS ENV LABELS; do n="RUNTIME_$v[@]"; '
              'for x in "${!n}"; do printf "%s\\0%s\\0" "$v" "$x"; done; done')
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\0")[:-1]
    got: dict = {k: [] for k in MULTI}
    plural = {"PACKAGES": "package", "SYMLINKS": "symlink", "ENV": "env", "LABELS": "label"}
    for k, v in zip(out[::2], out[1::2]):
        if k in plural:
            got[plural[k]].append(v)
        else:
            got[k.lower()] = v
    assert got == runtime()


def test_build_sh_takes_everything_from_runtime_conf():
    build = (IMAGE / "build.sh").read_text()
    assert "read_runtime_conf deploy/image/runtime.conf" in build
    code = "\n".join(l for l in build.splitlines() if not l.lstrip().startswith("#"))
    for pkg in runtime()["package"]:
        assert not re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", code), \
            f"build.sh names the package {pkg} itself"


def test_dockerfile_runtime_stage_uses_the_same_base_and_packages():
    rt = runtime()
    stage = runtime_stage()
    assert stage[0] == ["FROM", f"debian:{rt['suite']}-slim"]
    [install] = [a for a in args(stage, "RUN") if "apt-get install" in a]
    pkgs = {p for p in install.split("apt-get install", 1)[1].split("&&")[0].split()
            if not p.startswith("-")}
    assert pkgs == set(rt["package"])


def test_dockerfile_runtime_stage_has_the_same_paths_and_entrypoint():
    rt = runtime()
    stage = runtime_stage()
    copies = [shlex.split(a) for a in args(stage, "COPY")]
    assert any(c[0].startswith("--from=") and c[-1] == rt["binary"] for c in copies), copies
    runs = " ".join(args(stage, "RUN"))
    for link in rt["symlink"]:
        assert f"ln -s {rt['binary']} {link}" in runs
    assert args(stage, "ENTRYPOINT") == [json.dumps([rt["entrypoint"]])]
    assert args(stage, "CMD") == []
    assert args(stage, "USER")[-1:] == [rt["user"]]
    assert (args(stage, "WORKDIR") or ["/"])[-1] == rt["workdir"]
    assert args(stage, "EXPOSE") == [rt["port"]]


def test_dockerfile_runtime_stage_has_the_same_env_and_labels():
    rt = runtime()
    stage = runtime_stage()
    env = dict(DEBIAN_IMAGE_ENV)
    for a in args(stage, "ENV"):
        env.update(pairs(shlex.split(a)))
    assert {k: env.get(k) for k in pairs(rt["env"])} == pairs(rt["env"])
    labels: dict[str, str] = {}
    for a in args(stage, "LABEL"):
        labels.update(pairs(shlex.split(a)))
    assert labels == pairs(rt["label"])


def test_test_sh_runs_the_image_with_the_manifests_security_context():
    sc = agent_container(agent_daemonset(manifest_objects("iamlet.yaml")))["securityContext"]
    [line] = re.findall(r"(?ms)^SECURITY=\((.*?)\)$", (IMAGE / "test.sh").read_text())
    line = " ".join(line.split()) + " "
    assert sc["capabilities"]["drop"] == ["ALL"] and "--cap-drop=ALL" in line
    for cap in sc["capabilities"]["add"]:
        assert f"--cap-add={cap}" in line
    assert len(re.findall(r"--cap-add=", line)) == len(sc["capabilities"]["add"])
    assert sc["readOnlyRootFilesystem"] and "--read-only " in line and "--read-only-tmpfs=false" in line
    assert f"--user {sc['runAsUser']}" in line
    assert sc["allowPrivilegeEscalation"] is False and "no-new-privileges" in line
    assert "dst=/run/xtables.lock" in line


def generator():
    spec = importlib.util.spec_from_file_location("gen_profile", SECCOMP / "gen-io-uring-profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seccomp_profile_is_plain_oci_and_allows_io_uring():
    p = json.loads(PROFILE.read_text())
    assert set(p) == {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    assert {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"} <= set(p["architectures"])
    for rule in p["syscalls"]:
        assert set(rule) <= {"names", "action", "args", "errnoRet"}, rule
    allowed = {n for r in p["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
               for n in r["names"]}
    assert {"io_uring_setup", "io_uring_enter", "io_uring_register"} <= allowed
    # What the agent serves with on epoll stays allowed (socket is, by address family).
    assert {"bind", "listen", "accept4", "epoll_wait", "clone", "clone3"} <= allowed
    denied = {n for r in p["syscalls"] if r["action"] == "SCMP_ACT_ERRNO" for n in r["names"]}
    assert {"bpf", "init_module", "kexec_load", "chroot"} <= denied


def test_seccomp_profile_is_resolved_for_the_agents_capabilities():
    gen = generator()
    for objs in (manifest_objects("iamlet.yaml"), chart_objects()):
        sc = agent_container(agent_daemonset(objs))["securityContext"]
        assert {"CAP_" + c for c in sc["capabilities"]["add"]} == gen.CAPS


def test_seccomp_profile_is_the_default_plus_io_uring():
    """Regenerate with deploy/seccomp/gen-io-uring-profile.py when the default changes."""
    require(Path("/usr/share/containers/seccomp.json").exists(),
            "needs containers/common's default profile (Debian: golang-github-containers-common)")
    assert PROFILE.read_text() == generator().render()


def test_chart_takes_the_documented_seccomp_profile_next_to_its_defaults():
    """values.yaml's io_uring note: securityContext.seccompProfile merges with the defaults."""
    profile = {"type": "Localhost", "localhostProfile": PROFILE.name}
    objs = chart_objects({"securityContext": {"seccompProfile": profile}})
    ds = agent_daemonset(objs)
    sc = agent_container(ds)["securityContext"]
    default = agent_container(agent_daemonset(chart_objects()))["securityContext"]
    assert "seccompProfile" not in default
    assert sc == {**default, "seccompProfile": profile}
    validate(ds)
