#!/usr/bin/env bash
# iamlet beside kube2iam, one command (loopback only; root: the agents run in mount namespaces
# of their own, see loadtest/kube2iam.py):
#   loadtest/kube2iam.sh               full comparison (~12 min after the installs and builds):
#                                      iamlet (epoll, io_uring) and kube2iam against the same
#                                      real kube-apiserver, moto and fake IMDS, 3 repetitions
#   loadtest/kube2iam.sh --smoke       every scenario for ~1 s (not in CI: kube2iam's source is
#                                      not reachable from CI)
#   loadtest/kube2iam.sh --build-only  only fetch and build kube2iam; prints the binary's path
# Other flags go to loadtest/kube2iam.py (--reps 5, --duration 10, --storm-pods 300, ...).
#
# kube2iam's source, the first that works (tag KUBE2IAM_TAG, default 0.15.0):
#   1. KUBE2IAM_SRC=<dir>: a git repository (bare or not) holding the tag, or a source tree of it
#   2. go install github.com/jtblin/kube2iam/cmd@<tag> (the Go module proxy)
#   3. git clone --branch <tag> https://github.com/jtblin/kube2iam
# It is built as its release image builds it (CGO_ENABLED=0, -ldflags "-s -X version...") into
# loadtest/.tools/kube2iam-<tag>/ (ignored by git), with build.json (tag, commit, source, Go).
#
# Also installs what the comparison needs, as run.sh does: moto (tests/install-python-tools.sh
# → .venv), oha (cargo install, cached in loadtest/.tools), nginx and openssl (apt-get), the
# real control plane (tests/kube/build.sh, cached), iamlet (release).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TAG="${KUBE2IAM_TAG:-0.15.0}"
TOOLS="$ROOT/loadtest/.tools"
DEST="$TOOLS/kube2iam-$TAG"
SMOKE=0
BUILD_ONLY=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1; ARGS+=(--smoke) ;;
    --build-only) BUILD_ONLY=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
step() { printf '==> %s\n' "$*" >&2; }

build_kube2iam() {
  if [ -x "$DEST/kube2iam" ] && [ -f "$DEST/build.json" ]; then
    return 0
  fi
  command -v go >/dev/null || { echo "loadtest/kube2iam.sh: Go is needed to build kube2iam (https://go.dev/dl/)." >&2; exit 1; }
  local src="" commit="" how=""
  work="$(mktemp -d "${TMPDIR:-/tmp}/kube2iam-build.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  if [ -n "${KUBE2IAM_SRC:-}" ]; then
    if git -C "$KUBE2IAM_SRC" rev-parse --verify --quiet "refs/tags/$TAG^{commit}" >/dev/null 2>&1; then
      commit="$(git -C "$KUBE2IAM_SRC" rev-parse "refs/tags/$TAG^{commit}")"
      mkdir -p "$work/src"
      git -C "$KUBE2IAM_SRC" archive "$commit" | tar -x -C "$work/src"
      src="$work/src"; how="KUBE2IAM_SRC git repository, tag $TAG"
    elif [ -f "$KUBE2IAM_SRC/go.mod" ] && grep -q '^module github.com/jtblin/kube2iam$' "$KUBE2IAM_SRC/go.mod"; then
      # A plain source tree: its commit only if it is a checkout.
      commit="$(git -C "$KUBE2IAM_SRC" rev-parse HEAD 2>/dev/null || echo unknown)"
      cp -a "$KUBE2IAM_SRC/." "$work/src"
      src="$work/src"; how="KUBE2IAM_SRC source tree (tag not checked)"
    else
      echo "loadtest/kube2iam.sh: KUBE2IAM_SRC=$KUBE2IAM_SRC is neither a git repository with tag $TAG nor kube2iam's source tree." >&2
      exit 1
    fi
  else
    # kube2iam's tags have no "v": the module proxy resolves the tag to a pseudo-version.
    step "kube2iam $TAG: go install from the module proxy"
    if GOBIN="$work/bin" CGO_ENABLED=0 timeout 300 \
        go install -ldflags "-s -X github.com/jtblin/kube2iam/version.Version=$TAG" \
        "github.com/jtblin/kube2iam/cmd@$TAG" >"$work/go-install.log" 2>&1; then
      mkdir -p "$DEST"
      mv "$work/bin/cmd" "$DEST/kube2iam"
      commit="$(go version -m "$DEST/kube2iam" | awk '$1=="mod" {print $3; exit}')"
      how="go install github.com/jtblin/kube2iam/cmd@$TAG (module $commit)"
    else
      step "go install failed: $(grep -m1 -E 'error|refused|40[34]|not found' "$work/go-install.log" || tail -n1 "$work/go-install.log")"
      step "kube2iam $TAG: git clone https://github.com/jtblin/kube2iam"
      if timeout 120 git clone --quiet --depth 1 --branch "$TAG" https://github.com/jtblin/kube2iam "$work/src" 2>"$work/clone.log"; then
        commit="$(git -C "$work/src" rev-parse HEAD)"
        src="$work/src"; how="git clone https://github.com/jtblin/kube2iam, tag $TAG"
      else
        step "git clone failed: $(tail -n1 "$work/clone.log")"
        echo "loadtest/kube2iam.sh: kube2iam's source is not reachable here; set KUBE2IAM_SRC to a clone of https://github.com/jtblin/kube2iam (with tag $TAG) or to its source tree." >&2
        exit 1
      fi
    fi
  fi
  if [ -n "$src" ]; then
    step "kube2iam $TAG: go build (${commit:0:12}; modules from the Go module proxy, ~2 min cold)"
    mkdir -p "$DEST"
    (cd "$src" && CGO_ENABLED=0 go build -o "$DEST/kube2iam.new" \
      -ldflags "-s -X github.com/jtblin/kube2iam/version.Version=$TAG -X github.com/jtblin/kube2iam/version.GitCommit=${commit:0:7}" \
      ./cmd)
    mv "$DEST/kube2iam.new" "$DEST/kube2iam"
  fi
  rm -rf "$work"
  python3 - "$DEST/build.json" "$TAG" "$commit" "$how" "$(go version)" <<'PY'
import json, sys, datetime
path, tag, commit, how, gov = sys.argv[1:]
json.dump({"tag": tag, "commit": commit, "source": how, "go": gov,
           "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "cgo": False}, open(path, "w"), indent=1)
PY
}

build_kube2iam
if [ "$BUILD_ONLY" = 1 ]; then
  echo "$DEST/kube2iam"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "loadtest/kube2iam.sh: needs root (mount namespaces for the agents, a TLS front on 127.0.0.1:443)." >&2; exit 1; }

step "python tools (moto) in .venv"
[ -x "$ROOT/.venv/bin/moto_server" ] || tests/install-python-tools.sh >/dev/null

for pkg in nginx:nginx-light openssl:openssl; do
  cmd="${pkg%%:*}"
  if ! command -v "$cmd" >/dev/null && ! [ -x "/usr/sbin/$cmd" ]; then
    step "$cmd (apt-get install ${pkg#*:})"
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkg#*:}" >/dev/null \
      || { apt-get update -q >/dev/null && env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkg#*:}" >/dev/null; }
  fi
done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

if [ ! -x "$TOOLS/bin/oha" ]; then
  step "oha (cargo install oha --locked, ~5 min once; cached in loadtest/.tools)"
  cargo install oha --locked --root "$TOOLS" --quiet
fi

step "real control plane (tests/kube/build.sh, cached)"
tests/kube/build.sh >/dev/null

step "build: iamlet (release)"
cargo build --quiet --locked --release -p iamlet
IAMLET="${CARGO_TARGET_DIR:-$ROOT/target}/release/iamlet"

OUT="$ROOT/loadtest/results"
[ "$SMOKE" = 1 ] && OUT="$ROOT/loadtest/results/tmp/kube2iam-smoke" && rm -rf "$OUT"

CPUS=$(nproc)
PIN=(--server-cpus 0 --client-cpus 1)
[ "$CPUS" -lt 2 ] && PIN=(--server-cpus "" --client-cpus "")

step "run"
exec python3 loadtest/kube2iam.py --iamlet "$IAMLET" --kube2iam "$DEST/kube2iam" --kube2iam-info "$DEST/build.json" \
  --moto "$ROOT/.venv/bin/moto_server" --oha "$TOOLS/bin/oha" --nginx "$NGINX" --out-dir "$OUT" "${PIN[@]}" "${ARGS[@]}"
