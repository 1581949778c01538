# shellcheck shell=bash
# Sourced by deploy/image/build.sh and deploy/image/test.sh.

# The package that provides each command (Debian bookworm).
declare -A IMAGE_TOOL_PACKAGE=(
  [mmdebstrap]=mmdebstrap [buildah]=buildah [podman]=podman [runc]=runc [skopeo]=skopeo
  [ip]=iproute2 [nsenter]=util-linux [curl]=curl [python3]=python3 [strip]=binutils
  [iptables-nft-save]=iptables [iptables-legacy-save]=iptables
)

# Commands among "$@" that are not on PATH.
missing_tools() {
  local t
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || printf '%s\n' "$t"; done
}

# Installs the packages behind the missing commands among "$@" (root with apt-get only);
# returns 1, saying what is missing, when it cannot.
ensure_tools() {
  local missing pkgs t
  missing=$(missing_tools "$@")
  [ -z "$missing" ] && return 0
  pkgs=$(for t in $missing; do printf '%s\n' "${IMAGE_TOOL_PACKAGE[$t]:-$t}"; done | sort -u | tr '\n' ' ')
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: ${missing//$'\n'/ } (apt-get install --no-install-recommends $pkgs)" >&2
    return 1
  fi
  echo "==> apt-get install $pkgs"
  local log
  log=$(mktemp)
  # Package lists may be absent (a slim machine) or stale (a candidate gone): update once.
  # shellcheck disable=SC2086
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs >"$log" 2>&1; then
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
             --no-install-recommends $pkgs; } >"$log" 2>&1; then
      tail -n 20 "$log" >&2
      rm -f "$log"
      return 1
    fi
  fi
  rm -f "$log"
  missing=$(missing_tools "$@")
  [ -z "$missing" ] || { echo "still missing after apt-get: ${missing//$'\n'/ }" >&2; return 1; }
}

# Reads deploy/image/runtime.conf into RUNTIME_* variables: RUNTIME_SUITE, RUNTIME_BINARY,
# RUNTIME_ENTRYPOINT, RUNTIME_USER, RUNTIME_WORKDIR, RUNTIME_PORT (single values) and the
# arrays RUNTIME_PACKAGES, RUNTIME_SYMLINKS, RUNTIME_ENV, RUNTIME_LABELS, for the scripts
# that source this file.
# shellcheck disable=SC2034
read_runtime_conf() {
  local file=$1 line key value n=0
  RUNTIME_PACKAGES=() RUNTIME_SYMLINKS=() RUNTIME_ENV=() RUNTIME_LABELS=()
  RUNTIME_SUITE='' RUNTIME_BINARY='' RUNTIME_ENTRYPOINT='' RUNTIME_USER='' RUNTIME_WORKDIR='' RUNTIME_PORT=''
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    case "$line" in ''|'#'*) continue;; esac
    key=${line%% *}
    value=${line#* }
    if [ "$key" = "$line" ] || [ -z "$value" ]; then
      echo "$file:$n: expected 'key value': $line" >&2
      return 1
    fi
    case "$key" in
      suite) RUNTIME_SUITE=$value;;
      package) RUNTIME_PACKAGES+=("$value");;
      binary) RUNTIME_BINARY=$value;;
      symlink) RUNTIME_SYMLINKS+=("$value");;
      entrypoint) RUNTIME_ENTRYPOINT=$value;;
      user) RUNTIME_USER=$value;;
      workdir) RUNTIME_WORKDIR=$value;;
      port) RUNTIME_PORT=$value;;
      env) RUNTIME_ENV+=("$value");;
      label) RUNTIME_LABELS+=("$value");;
      *) echo "$file:$n: unknown key '$key'" >&2; return 1;;
    esac
  done <"$file"
  local v v_name
  for v in RUNTIME_SUITE RUNTIME_BINARY RUNTIME_ENTRYPOINT RUNTIME_USER RUNTIME_WORKDIR RUNTIME_PORT; do
    v_name=${v#RUNTIME_}
    [ -n "${!v}" ] || { echo "$file: no '${v_name,,}' line" >&2; return 1; }
  done
}

# Seconds since the epoch, with milliseconds.
now() { date +%s.%3N; }
# Seconds elapsed since $1 (a `now` value), e.g. 12.3.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
