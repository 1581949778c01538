#!/usr/bin/env python3
"""Writes deploy/seccomp/iamlet-io-uring.json: the container runtimes' default seccomp
profile as it applies to the iamlet container, plus io_uring.

    deploy/seccomp/gen-io-uring-profile.py [DEFAULT_PROFILE] [OUT]

DEFAULT_PROFILE is containers/common's default (/usr/share/containers/seccomp.json, Debian
package golang-github-containers-common): the profile podman and CRI-O apply, and the rule
set Docker's and containerd's defaults share. Like every runtime default it denies the
io_uring syscalls, so iamlet's `--io-driver=auto` serves on epoll.

That file gates some rules on the container's capabilities and architecture ("includes" /
"excludes"), a containers/common extension that containerd does not read from a Localhost
profile: it would apply every rule, gated or not. So the profile is resolved here for what
the DaemonSet's container is (the capabilities below, Linux on amd64 or arm64) into plain
OCI form (defaultAction, architectures, syscalls), which containerd, CRI-O, podman and Docker
all read the same way, and which allows exactly what the runtime default allows that
container, plus io_uring_setup, io_uring_enter and io_uring_register.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")
OUT = HERE / "iamlet-io-uring.json"

# The capabilities deploy/manifests/iamlet.yaml and the chart give the agent container
# (deploy/tests/test_image.py checks they still match).
CAPS = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
# Architectures the image is built for, as containers/common names them in "includes",
# with the compat ones a 64-bit kernel also runs (their SCMP names come from "archMap").
ARCHES = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64"}
COMPAT = {"amd64": {"x86", "x32", "386"}, "arm64": {"arm"}}
IO_URING = ["io_uring_enter", "io_uring_register", "io_uring_setup"]


def applies(rule: dict) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    unknown = (set(inc) | set(exc)) - {"caps", "arches"}
    if unknown:
        raise SystemExit(f"rule {rule['names']}: conditions {sorted(unknown)} not resolved here")
    arches = set(ARCHES) | set().union(*COMPAT.values())
    if inc.get("arches") and not arches & set(inc["arches"]):
        return False
    if exc.get("arches") and arches <= set(exc["arches"]):
        return False
    if not set(inc.get("caps") or []) <= CAPS:
        return False
    if CAPS & set(exc.get("caps") or []):
        return False
    return True


def resolve(default: dict) -> dict:
    archmap = {a["architecture"]: a.get("subArchitectures") or [] for a in default["archMap"]}
    architectures = []
    for scmp in ARCHES.values():
        architectures += [scmp, *archmap.get(scmp, [])]
    syscalls = []
    for rule in default["syscalls"]:
        if not applies(rule):
            continue
        if set(IO_URING) & set(rule["names"]):
            raise SystemExit(f"the default profile now has a rule for io_uring: {rule}")
        out = {"names": rule["names"], "action": rule["action"]}
        if rule.get("args"):
            out["args"] = rule["args"]
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = rule["errnoRet"]
        syscalls.append(out)
    syscalls.append({"names": IO_URING, "action": "SCMP_ACT_ALLOW"})
    profile = {"defaultAction": default["defaultAction"]}
    if default.get("defaultErrnoRet") is not None:
        profile["defaultErrnoRet"] = default["defaultErrnoRet"]
    profile["architectures"] = architectures
    profile["syscalls"] = syscalls
    return profile


def render(default_path: Path = DEFAULT_PROFILE) -> str:
    return json.dumps(resolve(json.loads(default_path.read_text())), indent=2) + "\n"


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PROFILE
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else OUT
    out.write_text(render(src))
    print(f"wrote {out} from {src}")


if __name__ == "__main__":
    main()
