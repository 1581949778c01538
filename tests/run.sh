#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the Python tools (moto, boto3, AWS
# CLI) into .venv, checks formatting and lints, builds the iamlet binary, runs every test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
step() { printf '\n==> %s\n' "$*"; }

step "python test tools"
tests/install-python-tools.sh
export MOTO_SERVER="$ROOT/.venv/bin/moto_server"

step "rustfmt"
cargo fmt --all -- --check

step "clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "build"
cargo build --locked -p iamlet
deploy/tests/run.sh   # manifests, Helm chart, dashboard, Dockerfile, docs/configuration.md

step "tests"
cargo test --locked --workspace
step "load-test smoke (no timing assertions)"; loadtest/run.sh --smoke
