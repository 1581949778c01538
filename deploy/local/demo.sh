#!/usr/bin/env bash
# Runs iamlet end to end on this machine, touching only loopback:
#   moto (STS and a stand-in instance metadata service) -> iamlet in local mode
#   -> an unmodified AWS CLI / boto3 asking iamlet for credentials
#   -> `sts get-caller-identity` shows the pod's assumed role.
# Everything it starts is stopped on exit.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=deploy/wait.sh
. deploy/wait.sh
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "==> python tools (moto, boto3, awscli) in $VENV"
"$ROOT/tests/install-python-tools.sh" >/dev/null

echo "==> building iamlet"
cargo build --quiet -p iamlet

MOTO_PORT=$(free_port)
echo "==> moto on 127.0.0.1:$MOTO_PORT (STS + stand-in metadata service)"
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_until 90 "moto on :$MOTO_PORT" "$WORK/moto.log" "${PIDS[-1]}" curl -fs "http://127.0.0.1:$MOTO_PORT/moto-api/"

APP_PORT=$(free_port)
echo "==> iamlet on 127.0.0.1:$APP_PORT with deploy/local/pods.yaml"
# The agent's own AWS identity: static test credentials, region set, and no IMDS lookups.
env AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
    AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL_STS="http://127.0.0.1:$MOTO_PORT" \
  "$ROOT/target/debug/iamlet" \
    --app-port="$APP_PORT" \
    --metadata-addr="127.0.0.1:$MOTO_PORT" \
    --base-role-arn=arn:aws:iam::123456789012:role/ \
    --pods-from="$ROOT/deploy/local/pods.yaml" >"$WORK/iamlet.log" 2>&1 &
PIDS+=($!)
wait_until 60 "iamlet /ready on :$APP_PORT" "$WORK/iamlet.log" "${PIDS[-1]}" curl -fs "http://127.0.0.1:$APP_PORT/ready"

echo "==> the pod's view: GET /latest/meta-data/iam/security-credentials/"
curl -fs "http://127.0.0.1:$APP_PORT/latest/meta-data/iam/security-credentials/"; echo

echo "==> unmodified AWS CLI, credentials from iamlet (AWS_EC2_METADATA_SERVICE_ENDPOINT)"
# A client as a pod would run it: no credentials of its own, the metadata service is iamlet.
ARN=$(env -i PATH="$VENV/bin:/usr/bin:/bin" HOME="$WORK" \
    AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:$APP_PORT/" \
    AWS_ENDPOINT_URL_STS="http://127.0.0.1:$MOTO_PORT" AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 \
  "$VENV/bin/aws" sts get-caller-identity --query Arn --output text)
echo "$ARN"
case "$ARN" in
  *":assumed-role/checkout-role/"*) echo "==> OK: the pod got its own role (checkout-role)";;
  *) echo "==> FAILED: expected assumed-role/checkout-role, got $ARN"; cat "$WORK/iamlet.log"; exit 1;;
esac
