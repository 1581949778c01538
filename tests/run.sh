#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the Python tools (moto, boto3, AWS
# CLI) into .venv, checks formatting and lints, builds the iamlet binary, runs every test.
# Prints how long each step took at the end (also when a step fails).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

STEPS=()
STEP_NAME=""
STEP_START=0
RUN_START=$(date +%s)
finish_step() {
  if [ -n "$STEP_NAME" ]; then
    STEPS+=("$(printf '%6ss  %s' $(($(date +%s) - STEP_START)) "$STEP_NAME")")
  fi
}
step() {
  finish_step
  STEP_NAME="$*"
  STEP_START=$(date +%s)
  printf '\n==> %s\n' "$*"
}
report() {
  local rc=$?
  finish_step
  printf '\n==> step times (%s)\n' "$([ "$rc" = 0 ] && echo passed || echo "FAILED, rc=$rc")"
  printf '%s\n' "${STEPS[@]}"
  printf '%6ss  total\n' $(($(date +%s) - RUN_START))
}
trap report EXIT

step "python test tools"
tests/install-python-tools.sh
export MOTO_SERVER="$ROOT/.venv/bin/moto_server"

step "rustfmt"
cargo fmt --all -- --check
(cd loadtest/tool && cargo fmt -- --check)

step "clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
(cd loadtest/tool && cargo clippy --locked --all-targets -- -D warnings)

step "crate boundaries"
# The data plane (crate iamlet) reaches the control plane only through iamlet-resolver's
# handle types: no async runtime or Kubernetes client of its own.
direct=$(cargo tree --locked -p iamlet --depth 1 -e normal --prefix none | awk '{print $1}')
for forbidden in tokio kube k8s-openapi; do
  if grep -qx "$forbidden" <<<"$direct"; then
    echo "proxy/Cargo.toml depends on $forbidden directly; keep it in iamlet-resolver or iamlet-node" >&2
    exit 1
  fi
done
echo "iamlet's direct dependencies: $(tr '\n' ' ' <<<"$direct")"

step "build"
cargo build --locked -p iamlet

step "real control plane: kube-apiserver and etcd from their Go modules (cached)"
# Built once per machine into ~/.cache/iamlet-kube (keyed by the versions in tests/kube/go.mod);
# the control-plane tests start them on loopback (tests/kube/start.sh).
tests/kube/build.sh

step "deploy tests"
deploy/tests/run.sh   # manifests, Helm chart, dashboard, Dockerfile, docs/configuration.md

step "tests"
cargo test --locked --workspace

step "image: built with mmdebstrap + buildah, run with podman in a node namespace"
# The debug binary CI just built (a release build takes minutes); the image's runtime
# definition is the release image's.
deploy/image/test.sh --binary target/debug/iamlet

step "load-test smoke (no timing assertions)"
loadtest/run.sh --smoke
