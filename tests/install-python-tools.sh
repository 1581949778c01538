#!/usr/bin/env bash
# Installs the Python-side test tools into <repo>/.venv (idempotent): moto's server (STS),
# boto3 and the AWS CLI (unmodified SDK clients).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python3" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python3" -c 'import moto, boto3, awscli, flask' 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]' boto3 awscli
fi
# deploy/tests: Helm's own template engine (helm-python-sdk bundles Helm v4's Go library, no
# helm binary, renders offline), Kubernetes schemas (kubernetes-validate), pytest.
if ! "$VENV/bin/python3" -c 'import helm_python, kubernetes_validate, yaml, pytest' 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'helm-python-sdk>=0.2.2,<0.3' 'kubernetes-validate>=1.31' pyyaml pytest
fi
# aws-sdk-js v3 (an unmodified client in the SDK matrix), with the machine's Node.js.
if command -v npm >/dev/null && [ ! -d "$ROOT/tests/js/node_modules/@aws-sdk/credential-providers" ]; then
  (cd "$ROOT/tests/js" && npm ci --no-audit --no-fund --loglevel=error)
fi
