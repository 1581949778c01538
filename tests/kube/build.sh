#!/usr/bin/env bash
# Builds the real kube-apiserver and etcd from the Go modules pinned in tests/kube/go.mod into a
# cache directory keyed by their versions (and go.sum), so a second run costs nothing. Prints
# the directory holding `kube-apiserver` and `etcd`.
#   IAMLET_KUBE_CACHE   where builds are kept (default ~/.cache/iamlet-kube)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"
command -v go >/dev/null || {
  echo "tests/kube/build.sh: go is not installed; install Go 1.26 (the Go module proxy must be reachable)." >&2
  exit 1
}
export GOFLAGS="${GOFLAGS:-} -mod=mod -buildvcs=false"
k8s=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
etcd=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
sum=$(sha256sum go.mod go.sum etcd/main.go | sha256sum | cut -c1-12)
out="${IAMLET_KUBE_CACHE:-$HOME/.cache/iamlet-kube}/kubernetes-$k8s-etcd-$etcd-$sum"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out.tmp"
start=$(date +%s)
# -trimpath and no debug info: smaller binaries, and the cache key is all that matters.
go build -trimpath -ldflags='-s -w' -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -trimpath -ldflags='-s -w' -o "$out.tmp/etcd" ./etcd >&2
rm -rf "$out"
mv "$out.tmp" "$out"
echo "tests/kube/build.sh: built kube-apiserver $k8s and etcd $etcd in $(( $(date +%s) - start ))s" >&2
echo "$out"
