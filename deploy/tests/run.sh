#!/usr/bin/env bash
# Deploy checks (pytest, deploy/tests/test_*.py): the plain manifests and the Helm chart,
# rendered offline with helm-python-sdk (Helm v4's own Go library, bundled), validated
# against the Kubernetes schemas (kubernetes-validate), the default render against a golden
# file, every DaemonSet's args through `iamlet --check-config`, the capabilities in a private
# network namespace, the dashboard's metric names against a live /metrics, the Dockerfile,
# and docs/configuration.md against `iamlet --help`.
#   deploy/tests/run.sh              run them (builds target/debug/iamlet if missing)
#   deploy/tests/run.sh --update     rewrite deploy/tests/golden/ first, then run
#   deploy/tests/run.sh -k chart     extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
printf '\n==> deploy tests (manifests, chart, dashboard, Dockerfile, docs)\n'
tests/install-python-tools.sh
[ -x target/debug/iamlet ] || cargo build --locked -p iamlet
if [ "${1:-}" = "--update" ]; then
  export UPDATE_GOLDEN=1
  shift
fi
export PYTHONDONTWRITEBYTECODE=1
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/deploy/tests" "$@"
