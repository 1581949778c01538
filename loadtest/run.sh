#!/usr/bin/env bash
# iamlet load test, one command, from a fresh machine (loopback only):
#   loadtest/run.sh            full run (~25 min + the soak): iamlet (io_uring, epoll) vs nginx,
#                              interleaved, 3 repetitions; lookup scaling; pod storm; 10 min soak
#   loadtest/run.sh --smoke    CI smoke (< 60 s): every scenario for ~1 s with the built-in
#                              client, asserts zero errors and that the report is written
#   loadtest/run.sh --scaling  worker scaling only (~1-2 min after the builds): iamlet --workers
#                              W = 1..nproc under the creds-keepalive load (bench.py --only workers);
#                              oha if already in loadtest/.tools, else the built-in client; no nginx
# Other flags go to loadtest/bench.py (e.g. --soak-seconds 60, --reps 5, --duration 10,
# --skip soak, --only creds-keepalive,passthrough, --server-cpus 0 --client-cpus 1).
#
# Installs what it needs: oha (`cargo install oha --locked`, cached in loadtest/.tools),
# nginx (Debian: nginx-light), wrk (the shared-cores part's client), openssl (the container
# door's token), moto
# (tests/install-python-tools.sh → .venv). Results: JSON and
# SVG in loadtest/results/, a section appended to loadtest/RESULTS.md (smoke: results/tmp/).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SMOKE=0
SCALING=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    --scaling) SCALING=1; ARGS+=(--only workers) ;;
    *) ARGS+=("$a") ;;
  esac
done
step() { printf '==> %s\n' "$*"; }
TOOLS="$ROOT/loadtest/.tools"

step "python tools (moto) in .venv"
tests/install-python-tools.sh >/dev/null

NGINX="$(command -v nginx || true)"
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ] && [ "$SMOKE" = 0 ] && [ "$SCALING" = 0 ]; then
  step "nginx (apt-get install nginx-light)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null; }
  NGINX=/usr/sbin/nginx
fi

# The container-door scenarios mint a service-account token (RS256) with the openssl CLI.
if ! command -v openssl >/dev/null && [ "$SCALING" = 0 ]; then
  step "openssl (apt-get install openssl)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl >/dev/null; }
fi

# The shared-cores part's client (the smoke runs the built-in one instead).
WRK="$(command -v wrk || true)"
if [ -z "$WRK" ] && [ "$SMOKE" = 0 ] && [ "$SCALING" = 0 ]; then
  step "wrk (apt-get install wrk)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null; }
  WRK=/usr/bin/wrk
fi
[ "$SMOKE" = 1 ] && WRK=""

OHA=""
if [ "$SCALING" = 1 ]; then
  [ -x "$TOOLS/bin/oha" ] && OHA="$TOOLS/bin/oha"
elif [ "$SMOKE" = 0 ]; then
  if [ ! -x "$TOOLS/bin/oha" ]; then
    step "oha (cargo install oha --locked, ~5 min once; cached in loadtest/.tools)"
    cargo install oha --locked --root "$TOOLS" --quiet
  fi
  OHA="$TOOLS/bin/oha"
fi

step "build: load tool"
cargo build --quiet --release --manifest-path loadtest/tool/Cargo.toml --target-dir "$ROOT/target/loadtool"
TOOL="$ROOT/target/loadtool/release/iamlet-loadtool"

if [ "$SMOKE" = 1 ]; then
  # CI already built the debug binary (tests/run.sh); a release build would take minutes.
  step "build: iamlet (debug, for the smoke)"
  cargo build --quiet --locked -p iamlet
  IAMLET="$ROOT/target/debug/iamlet"
  OUT="$ROOT/loadtest/results/tmp/smoke"
  rm -rf "$OUT"
  SMOKE_ARGS=(--smoke --duration 0.5 --reps 1 --pause 0 --scale-pods 1,50 --scale-reps 1
              --storm-pods 50 --soak-seconds 3 --soak-pods 20 --soak-roles 4 --fixed-rate 500)
else
  step "build: iamlet (release)"
  cargo build --quiet --locked --release -p iamlet
  IAMLET="$ROOT/target/release/iamlet"
  OUT="$ROOT/loadtest/results"
  SMOKE_ARGS=()
fi

# Two cores or more: servers on the first, clients on the second. One core: share it.
CPUS=$(nproc)
PIN=(--server-cpus 0 --client-cpus 1)
[ "$CPUS" -lt 2 ] && PIN=(--server-cpus "" --client-cpus "")

step "run"
exec python3 loadtest/bench.py --iamlet "$IAMLET" --tool "$TOOL" --moto "$ROOT/.venv/bin/moto_server" \
  --oha "$OHA" --wrk "$WRK" --nginx "$NGINX" --out-dir "$OUT" "${PIN[@]}" "${SMOKE_ARGS[@]}" "${ARGS[@]}"
