#!/usr/bin/env bash
# Builds the iamlet image without Docker or a registry: a slim Debian rootfs from this
# machine's apt mirror (mmdebstrap), the stripped iamlet binary in it, committed from scratch
# by buildah. What goes in (packages, paths, entrypoint, labels): deploy/image/runtime.conf,
# which deploy/Dockerfile's runtime stage mirrors.
#   deploy/image/build.sh [--binary PATH] [--tag NAME] [--out FILE] [--mirror SOURCE]...
#     --binary  the iamlet binary (default target/release/iamlet); a stripped copy goes in
#     --tag     the local image's name (default localhost/iamlet:dev; root's storage, which
#               podman and buildah share)
#     --out     the OCI archive (default target/image/iamlet-oci.tar, gzip layers):
#               `podman load -i FILE`, `skopeo copy oci-archive:FILE docker://REGISTRY/...`
#     --mirror  an apt source for the rootfs (a URI, a `deb ...` line or a sources file),
#               repeatable; default: this machine's own apt sources, whatever their format
# Needs root (mmdebstrap's root mode, buildah's storage); installs mmdebstrap and buildah
# with apt-get when they are missing. No network but the apt mirror: nothing is run in a
# container.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
# shellcheck source=deploy/image/common.sh
. deploy/image/common.sh

BINARY=target/release/iamlet
TAG=localhost/iamlet:dev
OUT=target/image/iamlet-oci.tar
MIRRORS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY=$2; shift 2;;
    --binary=*) BINARY=${1#*=}; shift;;
    --tag) TAG=$2; shift 2;;
    --tag=*) TAG=${1#*=}; shift;;
    --out) OUT=$2; shift 2;;
    --out=*) OUT=${1#*=}; shift;;
    --mirror) MIRRORS+=("$2"); shift 2;;
    --mirror=*) MIRRORS+=("${1#*=}"); shift;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2;;
  esac
done

die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root, buildah's root storage)"
[ -x "$BINARY" ] || die "no binary at $BINARY: cargo build --release --locked -p iamlet, or --binary PATH"
ensure_tools mmdebstrap buildah strip python3 || die "cannot install the build tools"
read_runtime_conf deploy/image/runtime.conf

# The machine's own sources: its mirror (and snapshot pin, if any) and the release's
# updates and security suites, in either of apt's formats (mmdebstrap reads both).
if [ ${#MIRRORS[@]} -eq 0 ]; then
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    if grep -Eq '^[[:space:]]*deb[[:space:]]' "$f" || grep -Eq '^Types:.*\bdeb\b' "$f"; then
      MIRRORS+=("$f")
    fi
  done
  [ ${#MIRRORS[@]} -gt 0 ] || die "no apt sources on this machine: pass --mirror"
fi

# The layer's timestamps and the image's creation date come from the last commit, so the
# same inputs give the same layer digest (mmdebstrap clamps mtimes to it).
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

WORK=$(mktemp -d /tmp/iamlet-image.XXXXXX)
CTR=''
cleanup() {
  if [ -n "$CTR" ]; then buildah rm "$CTR" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

T0=$(now)
# Stripped: the debug info is most of a Rust binary's size (67 MB -> 11 MB for release).
strip --strip-all -o "$WORK/iamlet" "$BINARY"
echo "==> binary: $BINARY ($(du -h "$BINARY" | cut -f1)), stripped $(du -h "$WORK/iamlet" | cut -f1)"

# shellcheck disable=SC2016 # $root is the hook's variable, expanded when the hook runs
LINKS=$(for l in "${RUNTIME_SYMLINKS[@]}"; do printf 'ln -s %q "$root"%q\n' "$RUNTIME_BINARY" "$l"; done)
# Runs inside mmdebstrap's customize step with the rootfs directory as $1.
cat >"$WORK/customize.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
root=\$1
install -D -m 0755 -o 0 -g 0 "$WORK/iamlet" "\$root$RUNTIME_BINARY"
$LINKS
# Fails the build now, not the pod later, if the binary needs a newer libc than the rootfs.
chroot "\$root" "$RUNTIME_BINARY" --version
# resolv.conf and hostname are the build machine's (runtimes mount their own); debconf's
# backups are never read.
rm -f "\$root"/var/cache/debconf/*-old
: >"\$root/etc/resolv.conf"
: >"\$root/etc/hostname"
EOF
chmod +x "$WORK/customize.sh"

echo "==> rootfs: Debian $RUNTIME_SUITE + ${RUNTIME_PACKAGES[*]} (mmdebstrap, sources: ${MIRRORS[*]})"
T=$(now)
# essential + the packages: no apt, no recommends. The merged-usr hook sets up merged /usr
# the way debootstrap does, instead of installing usrmerge, which pulls in the whole of perl.
# Docs, man pages, locales are never installed (copyright files are kept), nor glibc's
# iconv modules (8 MB; nothing in the image converts charsets); no /dev entries (the
# runtime mounts /dev).
include=$(IFS=,; echo "${RUNTIME_PACKAGES[*]}")
mmdebstrap --mode=root --variant=essential --include="$include" \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --dpkgopt='path-exclude=/usr/lib/*/gconv/*' \
  --customize-hook="$WORK/customize.sh" --skip=output/dev \
  "$RUNTIME_SUITE" "$WORK/rootfs.tar" "${MIRRORS[@]}" >"$WORK/mmdebstrap.log" 2>&1 \
  || { tail -n 40 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
# The image has no apt: its state and the build's sources go (mmdebstrap's own cleanup
# needs them until the tarball is written).
tar --delete -f "$WORK/rootfs.tar" ./etc/apt/sources.list.d ./var/lib/apt ./var/cache/apt ./var/log/apt
echo "    $(du -h "$WORK/rootfs.tar" | cut -f1) uncompressed, $(since "$T")s"

echo "==> image: $TAG (buildah, from scratch)"
T=$(now)
OLD_ID=$(buildah inspect --type image --format '{{.FromImageID}}' "$TAG" 2>/dev/null || true)
CTR=$(buildah from --name "iamlet-build-$$" scratch)
buildah add --quiet "$CTR" "$WORK/rootfs.tar" / >/dev/null
CONFIG=(--entrypoint "[\"$RUNTIME_ENTRYPOINT\"]" --user "$RUNTIME_USER" --workingdir "$RUNTIME_WORKDIR"
        --port "$RUNTIME_PORT/tcp")
for e in "${RUNTIME_ENV[@]}"; do CONFIG+=(--env "$e"); done
for l in "${RUNTIME_LABELS[@]}"; do CONFIG+=(--label "$l"); done
VERSION=$("$WORK/iamlet" --version | awk '{print $2}')
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || REVISION="$REVISION-dirty"
CONFIG+=(--label "org.opencontainers.image.version=$VERSION" --label "org.opencontainers.image.revision=$REVISION")
buildah config "${CONFIG[@]}" "$CTR"
ID=$(buildah commit --quiet --format oci --timestamp "$SOURCE_DATE_EPOCH" --rm "$CTR" "$TAG")
CTR=''
# The image the tag named before, now nameless: gone unless something still uses it.
if [ -n "$OLD_ID" ] && [ "${OLD_ID#sha256:}" != "${ID#sha256:}" ]; then
  buildah rmi "$OLD_ID" >/dev/null 2>&1 || true
fi
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
buildah push --quiet --compression-format gzip "$TAG" "oci-archive:$(realpath "$OUT"):$TAG" >/dev/null
echo "    ${ID:0:12}, $(since "$T")s"

# What a registry would store and a node would pull: the gzip layer and the config.
python3 - "$OUT" <<'EOF'
import json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    blob = lambda d: json.load(t.extractfile("blobs/" + d.replace(":", "/")))
    [m] = json.load(t.extractfile("index.json"))["manifests"]
    man = blob(m["digest"])
    layers = sum(l["size"] for l in man["layers"])
    print(f"==> {sys.argv[1]}: {len(man['layers'])} layer(s), compressed {layers / 1e6:.1f} MB "
          f"(+ config {man['config']['size']} B)")
EOF
echo "    uncompressed $(buildah images --noheading --format '{{.Size}}' "$ID" | head -n 1), total $(since "$T0")s"
