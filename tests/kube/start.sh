#!/usr/bin/env bash
# Starts a real etcd and kube-apiserver on loopback for iamlet's tests: free ports, data in a
# temporary directory, a CA and serving certificate made for this run, a service-account
# signing key and issuer, RBAC authorization, and an admin identity (a bearer token in a
# token file) for the test code. Waits for /readyz (bounded), failing loudly with the logs'
# tails. Prints, one per line:
#   dir=<run directory>  (give it to stop.sh)
#   kubeconfig=<admin kubeconfig>
#   ca=<CA certificate>
#   server=https://127.0.0.1:<port>
#   token=<admin token>
#   etcd=http://127.0.0.1:<port>
#   issuer=<service-account issuer>
#   audit=<audit log: every request of a ServiceAccount (the agent's), metadata level>
# Options: --owner-pid PID  stop everything once that process is gone (test binaries start
#          this once and never get to call stop.sh).
#          --bin DIR        take kube-apiserver and etcd from DIR instead of build.sh.
#          --apiserver-arg ARG  one more kube-apiserver flag (repeatable).
# tests/kube/restart.sh DIR restarts kube-apiserver alone (same etcd, same flags).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
owner=""
bin=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --owner-pid) owner="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --apiserver-arg) extra+=("$2"); shift 2 ;;
    *) echo "tests/kube/start.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$bin" ] || bin="$("$HERE/build.sh")"
for b in kube-apiserver etcd; do
  [ -x "$bin/$b" ] || { echo "tests/kube/start.sh: $bin/$b is missing; run tests/kube/build.sh" >&2; exit 1; }
done
command -v openssl >/dev/null || { echo "tests/kube/start.sh: openssl is not installed (apt-get install openssl)." >&2; exit 1; }

dir="$(mktemp -d "${TMPDIR:-/tmp}/iamlet-kube.XXXXXX")"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)

fail() {
  echo "tests/kube/start.sh: $*" >&2
  for f in etcd.log apiserver.log; do
    [ -f "$dir/$f" ] && { echo "--- $f (last 30 lines)" >&2; tail -n 30 "$dir/$f" >&2; }
  done
  "$HERE/stop.sh" "$dir" >/dev/null 2>&1 || true
  exit 1
}

# Certificates for this run only.
pki="$dir/pki"; mkdir -p "$pki"
(
  cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=iamlet-test-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key \
    -out apiserver.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > san.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
    -extfile san.ext -out apiserver.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
) || fail "could not make the certificates"
token="$(openssl rand -hex 24)"
echo "$token,iamlet-test-admin,iamlet-test-admin,system:masters" > "$pki/tokens.csv"
issuer="https://kubernetes.default.svc.cluster.local"

"$bin/etcd" --name default --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "default=http://127.0.0.1:$peer_port" --unsafe-no-fsync \
  --log-level warn >"$dir/etcd.log" 2>&1 &
echo $! > "$dir/etcd.pid"

cat > "$pki/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: None
POLICY

# The command is kept in the run directory, so restart.sh can run it again.
{
  echo '#!/usr/bin/env bash'
  printf 'exec'
  printf ' %q' "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
    --service-account-issuer "$issuer" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --authorization-mode RBAC --anonymous-auth=false \
    --service-cluster-ip-range 10.96.0.0/16 \
    --enable-priority-and-fairness=false \
    --profiling=false \
    --audit-policy-file "$pki/audit-policy.yaml" --audit-log-path "$dir/audit.log" \
    --v 1 "${extra[@]}"
  echo
} > "$dir/apiserver.sh"
chmod +x "$dir/apiserver.sh"
"$dir/apiserver.sh" >"$dir/apiserver.log" 2>&1 &
echo $! > "$dir/apiserver.pid"
echo "https://127.0.0.1:$api_port" > "$dir/server"
echo "$token" > "$dir/token"

if [ -n "$owner" ]; then
  # Stops what this started once the owner (a test binary) is gone, however it ended.
  nohup bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2/stop.sh" "$3"' \
    _ "$owner" "$HERE" "$dir" >/dev/null 2>&1 &
  echo $! > "$dir/watchdog.pid"
fi

"$HERE/wait-ready.sh" "$dir" || fail "kube-apiserver was not ready"

cat > "$dir/admin.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
KC
echo "dir=$dir"
echo "kubeconfig=$dir/admin.kubeconfig"
echo "ca=$pki/ca.crt"
echo "server=https://127.0.0.1:$api_port"
echo "token=$token"
echo "etcd=http://127.0.0.1:$etcd_port"
echo "issuer=$issuer"
echo "audit=$dir/audit.log"
