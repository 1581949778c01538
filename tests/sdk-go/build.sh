#!/usr/bin/env bash
# Builds the aws-sdk-go-v2 test client (main.go, modules pinned in go.mod/go.sum) into a
# cache keyed by those files, and prints the binary's path; a second run costs nothing.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"
command -v go >/dev/null || {
  echo "tests/sdk-go/build.sh: go is not installed; install Go 1.26 (the Go module proxy must be reachable)." >&2
  exit 1
}
sum=$(sha256sum go.mod go.sum main.go | sha256sum | cut -c1-12)
out="${IAMLET_KUBE_CACHE:-$HOME/.cache/iamlet-kube}/sdk-go-$sum/caller"
if [ ! -x "$out" ]; then
  mkdir -p "$(dirname "$out")"
  GOFLAGS="-mod=mod -buildvcs=false" go build -trimpath -o "$out.tmp" . >&2
  mv "$out.tmp" "$out"
fi
echo "$out"
