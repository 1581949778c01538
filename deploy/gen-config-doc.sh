#!/usr/bin/env bash
# Generates docs/configuration.md from the binary's own help (`iamlet --help` and each
# subcommand's `--help`), so the page lists exactly the flags, environment variables,
# defaults and values that the binary accepts.
#   deploy/gen-config-doc.sh            rewrite docs/configuration.md
#   deploy/gen-config-doc.sh --check    exit 1 (and show the diff) when it is stale
# BINARY (env) picks the binary; default target/debug/iamlet (`cargo build -p iamlet`).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BINARY:-$ROOT/target/debug/iamlet}"
DOC="$ROOT/docs/configuration.md"
[ -x "$BIN" ] || { echo "gen-config-doc: $BIN not found; run: cargo build -p iamlet" >&2; exit 2; }

# A clean environment: clap prints the current value of a flag's variable in `[env: X=value]`.
help() { env -i PATH=/usr/bin:/bin COLUMNS=4000 "$BIN" "$@" --help; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
help >"$WORK/iamlet.help"
# Subcommands: the names under "Commands:" (clap's own `help` excluded).
awk '/^Commands:/{on=1; next} on && /^[^ ]/{on=0} on && /^  [a-z]/{print $1}' "$WORK/iamlet.help" |
  grep -vx help >"$WORK/commands" || true
while read -r cmd; do help "$cmd" >"$WORK/cmd-$cmd.help"; done <"$WORK/commands"

python3 - "$WORK" >"$WORK/configuration.md" <<'PY'
import os, re, sys

work = sys.argv[1]
# kube2iam's own flags (jtblin/kube2iam cmd/main.go): the rest are iamlet's.
KUBE2IAM = set("""api-server api-token app-port metrics-port base-role-arn debug default-role
iam-role-key iam-external-id iam-role-session-ttl insecure metadata-addr iptables
auto-discover-base-arn auto-discover-default-role host-interface namespace-restrictions
namespace-restriction-format namespace-key cache-resync-period resolve-duplicate-cache-ips
host-ip node backoff-max-interval backoff-max-elapsed-time log-format log-level
use-regional-sts-endpoint verbose version""".split())

OPT = re.compile(r"^ {2,6}(?:-(\w), )?--([a-z0-9-]+)(.*)$")

def parse(text):
    """clap's long help -> (about, [option dicts])."""
    lines = text.splitlines()
    about = []
    for l in lines:
        if l.startswith("Usage:"):
            break
        if l.strip():
            about.append(l.strip())
    opts, cur, in_opts = [], None, False
    for l in lines:
        if l.startswith("Options:"):
            in_opts = True
            continue
        if not in_opts:
            continue
        m = OPT.match(l)
        if m:
            # Long help: the value alone on the line; short help: value, 2+ spaces, text.
            value, _, inline = m.group(3).strip(" ").partition("  ")
            if m.group(3).startswith("  "):
                value, inline = "", m.group(3).strip()
            cur = {"short": m.group(1), "name": m.group(2), "value": value.strip(),
                   "desc": [inline.strip()] if inline.strip() else [], "env": "",
                   "default": "", "values": []}
            opts.append(cur)
            continue
        s = l.strip()
        if cur is None or not s:
            continue
        if s.startswith("[env: "):
            cur["env"] = s[len("[env: "):-1].split("=")[0]
        elif s.startswith("[default: "):
            cur["default"] = s[len("[default: "):-1]
        elif s.startswith("[possible values: "):
            cur["values"] = [(v.strip(), "") for v in s[len("[possible values: "):-1].split(",")]
        elif s == "Possible values:":
            pass
        elif s.startswith("- ") and (cur["values"] or cur["desc"] and cur["desc"][-1] != ""):
            name, _, d = s[2:].partition(":")
            cur["values"].append((name.strip(), d.strip()))
        else:
            cur["desc"].append(s)
    return " ".join(about), opts

def cell(s):
    return s.replace("|", "\\|")

def flag_cell(o):
    v = o["value"]
    if v.startswith("[=<"):      # --flag[=<BOOL>]: kube2iam-style boolean
        v = "[=BOOL]"
    v = v.replace("<", "").replace(">", "")
    f = f"`--{o['name']}{'=' + v if v and not v.startswith('[') else v}`"
    if o["short"]:
        f = f"`-{o['short']}`, " + f
    return f

def table(opts, kube2iam_col):
    head = "| Flag | Environment | Default | " + ("kube2iam | " if kube2iam_col else "") + "Description |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for o in opts:
        desc = " ".join(o["desc"])
        if desc and not desc.endswith("."):
            desc += "."
        if o["values"]:
            vals = "; ".join(f"`{n}`" + (f": {d}" if d else "") for n, d in o["values"])
            desc += f" Values: {vals}."
        row = [flag_cell(o), f"`{o['env']}`" if o["env"] else "", f"`{o['default']}`" if o["default"] else ""]
        if kube2iam_col:
            row.append("yes" if o["name"] in KUBE2IAM else "")
        row.append(cell(desc))
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)

about, opts = parse(open(os.path.join(work, "iamlet.help")).read())
commands = [c for c in open(os.path.join(work, "commands")).read().split() if c]

print("""# Configuration

<!-- Generated by deploy/gen-config-doc.sh from the binary's --help: do not edit by hand.
     deploy/tests checks that this page matches the binary. -->

This page lists every flag of `iamlet`, the environment variable each one also reads, and
its default. It is generated from the binary's own `--help`; run
`deploy/gen-config-doc.sh` after changing a flag.

- A flag on the command line wins over its environment variable.
- Boolean flags take kube2iam's forms: `--iptables`, `--iptables=true`, `--iptables=false`
  (also `1`/`0`, `t`/`f`); the value needs `=`.
- Durations are Go durations, as kube2iam's: `500ms`, `10s`, `15m`, `1h30m`.
- `iamlet --check-config ...` validates a set of flags without touching the network: exit 0,
  or 64 with one sentence naming the flag and the fix.
- The *kube2iam* column marks kube2iam's flags (same name, same meaning; differences are in
  [compat.md](compat.md)); the others are iamlet's own.
""")
print(f"## `iamlet` (the agent)\n\n{about}\n")
print(table(opts, True))
for c in commands:
    cabout, copts = parse(open(os.path.join(work, f"cmd-{c}.help")).read())
    print(f"\n## `iamlet {c}`\n\n{cabout}\n")
    print(table(copts, False))
print("""
## Other environment variables

| Variable | Read by | Meaning |
|---|---|---|
| `AWS_REGION`, `AWS_DEFAULT_REGION` | the STS client | the region whose STS endpoint is used (always regional); without either, the region comes from the metadata service at `--metadata-addr` |
| `AWS_ENDPOINT_URL_STS` | the STS client | another STS endpoint (a VPC endpoint, or a local fake in tests) |
| `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_WEB_IDENTITY_TOKEN_FILE`, ... | the STS client | the agent's own credentials, from the AWS default chain; normally none are set and the node's instance role is used |
| `AWS_EC2_METADATA_DISABLED` | the STS client | `true`: the default chain never asks the metadata service (tests) |
| `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT` | the pod watcher | set by Kubernetes in every pod: the in-cluster API server, used unless `--api-server`/`--kubeconfig` |
| `IAMLET_LOG` | logging | a `tracing` filter directive that overrides `--log-level`/`--verbose`, e.g. `iamlet=debug,kube=info` |
| `HOST_IP`, `NODE_NAME` | the DaemonSet | not read by iamlet: the manifests set them from the Downward API and pass them as `--host-ip=$(HOST_IP)` and `--node=$(NODE_NAME)` |""")
PY

if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$DOC" "$WORK/configuration.md"; then
    echo "docs/configuration.md is stale: run deploy/gen-config-doc.sh (after cargo build -p iamlet)" >&2
    exit 1
  fi
  echo "docs/configuration.md matches $BIN --help"
else
  cp "$WORK/configuration.md" "$DOC"
  echo "wrote $DOC"
fi
