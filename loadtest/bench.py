#!/usr/bin/env python3
"""iamlet load test: iamlet (io_uring and epoll) against nginx, interleaved, on loopback.

Started by loadtest/run.sh, which installs and builds what this needs. Standard library only.
Every process started here is killed on exit (normal, error, SIGINT/SIGTERM), by PID.
Every load run is bounded in time (and the built-in client also in count).
"""

import argparse
import atexit
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASE_ARN = "arn:aws:iam::123456789012:role/"
ROLE = "lt-role"
CREDS = "/latest/meta-data/iam/security-credentials/" + ROLE
LIST = "/latest/meta-data/iam/security-credentials/"
TOKEN = "/latest/api/token"
INSTANCE_ID = "/latest/meta-data/instance-id"
# The container-credentials door (AWS_CONTAINER_CREDENTIALS_FULL_URI), asked as the SDKs do.
CONTAINER = "/v1/credentials"
CONTAINER_HOST = "169.254.170.23"
SA_ISSUER = "https://loadtest.iamlet.invalid"
SA_AUDIENCE = "pods.eks.amazonaws.com"
SA_NAMESPACE = "loadtest"
SA_NAME = "loadtest-sa"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PROCS = []
# The parts of a run, in order; --skip and --only take these names.
PARTS = ("matrix", "scaling", "storm", "soak", "attack", "upgrade", "workers", "shared")


def log(*a):
    print("[loadtest]", *a, flush=True)


def kill_all():
    for p in reversed(PROCS):
        if p.poll() is None:
            try:
                p.terminate()
            except OSError:
                pass
    deadline = time.time() + 5
    for p in reversed(PROCS):
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    PROCS.clear()


def on_signal(sig, _frame):
    kill_all()
    sys.exit(128 + sig)


atexit.register(kill_all)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)


def start(cmd, logfile, cpus=None, env=None):
    if cpus:
        cmd = ["taskset", "-c", cpus] + cmd
    f = open(logfile, "ab")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    f.close()
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in PROCS:
        PROCS.remove(p)


def free_port():
    """A free port below the ephemeral range (32768+), where the load clients' own
    connections cannot take it between this check and the server's bind."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 32700)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise SystemExit("no free port in 20000..32700")


def http(port, path, method="GET", headers=None, timeout=3.0):
    assert isinstance(port, int)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_for(pred, what, timeout=60.0, proc=None, logfile=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = ""
    if logfile and os.path.exists(logfile):
        tail = open(logfile, errors="replace").read()[-3000:]
    raise SystemExit(f"timed out waiting for {what}\n{tail}")


# ---------------------------------------------------------------- /proc figures


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                if int(st[st.rindex(")") + 2 :].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, ValueError):
                pass
    return out


def cpu_split(pids):
    """Clock ticks the processes spent in user space and in the kernel (utime, stime)."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
            fields = st[st.rindex(")") + 2 :].split()
            user += int(fields[11])
            system += int(fields[12])
        except OSError:
            pass
    return user, system


def cpu_ticks(pids):
    return sum(cpu_split(pids))


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_hwm(pids):
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


# ---------------------------------------------------------------- service-account token


def b64url(b):
    import base64

    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def sa_token(work, pod_name="loadtest-local", pod_uid="loadtest-local", ttl=86400):
    """A projected service-account token for the pod at 127.0.0.1, as the API server mints
    it: RS256 with a fresh 2048-bit key (openssl; the standard library cannot sign), and the
    key's JWKS for --token-jwks-file. Returns (iamlet arguments, token)."""
    key = os.path.join(work, "sa-key.pem")
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    mod = subprocess.run(["openssl", "rsa", "-in", key, "-noout", "-modulus"], check=True, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, timeout=30).stdout.decode().strip()
    n = bytes.fromhex(mod.split("=", 1)[1])
    kid = "loadtest-sa-key"
    jwks = os.path.join(work, "sa-jwks.json")
    with open(jwks, "w") as f:
        json.dump({"keys": [{"use": "sig", "kty": "RSA", "kid": kid, "alg": "RS256", "n": b64url(n),
                             "e": b64url((65537).to_bytes(3, "big"))}]}, f)
    now = int(time.time())
    claims = {
        "aud": [SA_AUDIENCE],
        "exp": now + ttl,
        "iat": now,
        "nbf": now,
        "iss": SA_ISSUER,
        "jti": "loadtest-0001",
        "kubernetes.io": {
            "namespace": SA_NAMESPACE,
            "node": {"name": "loadtest-node", "uid": "loadtest-node-uid"},
            "pod": {"name": pod_name, "uid": pod_uid},
            "serviceaccount": {"name": SA_NAME, "uid": "loadtest-sa-uid"},
        },
        "sub": f"system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}",
    }
    head = {"alg": "RS256", "kid": kid, "typ": "JWT"}
    signing_input = (b64url(json.dumps(head, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode()))
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing_input.encode(), check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30).stdout
    args = (f"--token-jwks-file={jwks}", f"--token-issuer={SA_ISSUER}", f"--token-audience={SA_AUDIENCE}")
    return args, signing_input + "." + b64url(sig)


def bind_local_pod(pods_file, pod_ip="127.0.0.1"):
    """Gives the pod at `pod_ip` the token's ServiceAccount (spec.serviceAccountName), so the
    container door's binding (uid, namespace, name, ServiceAccount) holds for it."""
    with open(pods_file) as f:
        doc = json.load(f)
    for item in doc["items"]:
        if item.get("status", {}).get("podIP") == pod_ip:
            assert item["metadata"]["namespace"] == SA_NAMESPACE, item["metadata"]
            item.setdefault("spec", {})["serviceAccountName"] = SA_NAME
            break
    else:
        raise SystemExit(f"{pods_file}: no pod at {pod_ip}")
    with open(pods_file, "w") as f:
        json.dump(doc, f)


def container_headers(token):
    return {"Authorization": token, "Host": CONTAINER_HOST}


def container_verifications(port):
    """Tokens the iamlet on `port` verified (first sight); a cached token adds none."""
    st, body = http(port, "/metrics", timeout=5.0)
    if st != 200:
        return None
    m = re.search(rb'^iamlet_container_credentials_total\{outcome="verified"\} (\d+)', body, re.M)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------- servers


class Env:
    def __init__(self, a, work):
        self.a = a
        self.work = work
        self.sts_port = None  # moto, or the fake STS with --sts fake
        self.fake_sts_port = None
        self.imds_port = None
        self.cap = None  # cgroup capping the server in saturating runs
        self.alloc_events = []  # --allocs, --clocks: the libc probes counted with the system calls


def tool(a, *args):
    return [a.tool, *args]


def start_iamlet(env, driver, pods_file, extra=(), name=None, sts_port=None):
    a = env.a
    sts_port = sts_port or env.sts_port
    port = free_port()
    logfile = os.path.join(env.work, f"iamlet-{name or driver}.log")
    e = dict(os.environ)
    e.update(
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL_STS=f"http://127.0.0.1:{sts_port}",
    )
    for k in list(e):
        if k.startswith("IAMLET_"):
            del e[k]
    cmd = [
        a.iamlet,
        f"--pods-from={pods_file}",
        f"--base-role-arn={BASE_ARN}",
        f"--app-port={port}",
        f"--metadata-addr=127.0.0.1:{env.imds_port}",
        f"--io-driver={driver}",
        f"--workers={a.workers}",
        "--log-level=warn",
        "--sts-rate-limit=10000",
        *extra,
    ]
    p = start(cmd, logfile, cpus=a.server_cpus, env=e)
    p.port = p_port = port
    p.logfile = logfile
    wait_for(lambda: http(p_port, "/ready")[0] == 200, f"iamlet ({driver}) ready", proc=p, logfile=logfile)

    def creds_ok():
        st, body = http(p_port, CREDS)
        return st == 200 and b"AccessKeyId" in body

    wait_for(creds_ok, f"iamlet ({driver}) credentials for {ROLE}", proc=p, logfile=logfile)
    return p


def nginx_conf(env, port, bodies):
    d = os.path.join(env.work, "nginx")
    for sub in ("", "tmp"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    workers = env.a.workers
    lines = [
        "user root;",
        f"worker_processes {workers};",
        "daemon off;",
        "master_process on;",
        f"pid {d}/nginx.pid;",
        f"error_log {d}/error.log warn;",
        "events { worker_connections 8192; }",
        "http {",
        "  access_log off;",
        "  server_tokens off;",
        "  default_type text/plain;",
        "  keepalive_requests 10000000;",
        "  keepalive_timeout 60s;",
        f"  client_body_temp_path {d}/tmp/body;",
        f"  proxy_temp_path {d}/tmp/proxy;",
        f"  fastcgi_temp_path {d}/tmp/fastcgi;",
        f"  uwsgi_temp_path {d}/tmp/uwsgi;",
        f"  scgi_temp_path {d}/tmp/scgi;",
        f"  upstream imds {{ server 127.0.0.1:{env.imds_port}; keepalive {env.a.nginx_upstream_keepalive}; }}",
        "  server {",
        f"    listen 127.0.0.1:{port} backlog=1024;",
    ]
    for path, body in bodies.items():
        lines.append(f'    location = {path} {{ return 200 "{body}"; }}')
    lines += [
        f"    location = {INSTANCE_ID} {{",
        "      proxy_pass http://imds;",
        "      proxy_http_version 1.1;",
        '      proxy_set_header Connection "";',
        "    }",
        "  }",
        "}",
    ]
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    return d, conf


def start_upstream_nginx(env):
    """The fake IMDS for pass-through load: a second nginx on the client CPUs (a threaded fake
    would measure its own thread spawning, not the proxies). Answers the IMDSv2 token PUT
    (echoing the TTL header, 400 without it) and instance-id; IMDSv1 is allowed."""
    d = os.path.join(env.work, "imds-nginx")
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  server_tokens off;
  default_type text/plain;
  keepalive_requests 10000000;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{env.imds_port} backlog=1024;
    location = /latest/api/token {{
      if ($http_x_aws_ec2_metadata_token_ttl_seconds = "") {{ return 400; }}
      add_header X-Aws-Ec2-Metadata-Token-Ttl-Seconds $http_x_aws_ec2_metadata_token_ttl_seconds always;
      return 200 "AQAEAFakeImdsLoadTestToken0000000000000000000000000000==";
    }}
    location = {INSTANCE_ID} {{ return 200 "i-0123456789abcdef0"; }}
    location = /__loadtest/connections {{ stub_status; }}
    location / {{ return 404; }}
  }}
}}
""")
    return start([env.a.nginx, "-p", d, "-c", conf, "-e", os.path.join(d, "error.log")], os.path.join(env.work, "imds-nginx.log"),
                 cpus=env.a.client_cpus)


def start_nginx(env, bodies):
    port = free_port()
    d, conf = nginx_conf(env, port, bodies)
    logfile = os.path.join(env.work, "nginx.log")
    p = start([env.a.nginx, "-p", d, "-c", conf, "-e", os.path.join(d, "error.log")], logfile, cpus=env.a.server_cpus)
    p.port = port
    p.logfile = logfile
    wait_for(lambda: http(port, CREDS)[0] == 200, "nginx", proc=p, logfile=logfile)
    wait_for(lambda: http(port, INSTANCE_ID)[0] == 200, "nginx proxy_pass", proc=p, logfile=logfile)
    return p


# The scenarios the floor server (`tool floor`) also runs: it answers only iamlet's cached
# credentials, and is the least work only for keep-alive (a new connection's costs are
# accept, DEFER_ACCEPT and close, which it does not try to do least of).
FLOOR_SCENARIOS = ("creds-keepalive",)


def raw_answer(port, path):
    """The exact bytes (head and body) the server on `port` answers a plain GET of `path` with."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            got = s.recv(65536)
            if not got:
                raise SystemExit(f"no complete answer to {path} from port {port}: {data!r}")
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        n = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
        while len(body) < n:
            got = s.recv(65536)
            if not got:
                raise SystemExit(f"short answer to {path} from port {port}")
            body += got
    return head + b"\r\n\r\n" + body[:n]


def start_floor(env, answer):
    """`tool floor`: iamlet's own answer, byte for byte, from an epoll loop that does nothing
    else (one recv and one send per keep-alive request): the ceiling of any epoll server."""
    path = os.path.join(env.work, "floor-answer.http")
    with open(path, "wb") as f:
        f.write(answer)
    port = free_port()
    logfile = os.path.join(env.work, "floor.log")
    p = start(tool(env.a, "floor", "--addr", f"127.0.0.1:{port}", "--answer-file", path, "--seconds", "7200"),
              logfile, cpus=env.a.server_cpus)
    p.port = port
    p.logfile = logfile
    wait_for(lambda: http(port, CREDS)[0] == 200, "floor server", proc=p, logfile=logfile)
    return p


def server_pids(p):
    return [p.pid] + children(p.pid)


# ---------------------------------------------------------------- clients


def oha_cmd(a, port, sc, out):
    cmd = [a.oha, "--no-tui", "--output-format", "json", "-o", out, "-z", f"{sc['duration']:g}s", "-c", str(sc["conns"])]
    if sc.get("rate"):
        cmd += ["-q", str(sc["rate"]), "--latency-correction"]
    if not sc.get("keepalive", True):
        cmd += ["--disable-keepalive"]
    if sc.get("method", "GET") != "GET":
        cmd += ["-m", sc["method"]]
    for h in sc.get("headers", []):
        cmd += ["-H", h]
    cmd.append(f"http://127.0.0.1:{port}{sc['path']}")
    return cmd


def parse_oha(path, expect_status=200):
    with open(path) as f:
        j = json.load(f)
    s = j["summary"]
    pct = j.get("latencyPercentiles", {})
    status = {str(k): v for k, v in (j.get("statusCodeDistribution") or {}).items()}
    errors = j.get("errorDistribution") or {}
    ok = status.get(str(expect_status), 0)
    total = sum(status.values()) + sum(errors.values())
    bad_status = sum(v for k, v in status.items() if k != str(expect_status))
    dur = s.get("total") or 0
    # oha counts requests cut off by the deadline as errors ("aborted due to deadline").
    errs = {k: v for k, v in errors.items() if "deadline" not in k.lower()}
    return {
        "client": "oha",
        "requests": total,
        "ok": ok,
        "errors": bad_status + sum(errs.values()),
        "error_kinds": {**errs, **{f"status_{k}": v for k, v in status.items() if k != str(expect_status)}},
        "rps": ok / dur if dur else 0.0,
        "duration_s": dur,
        "p50_us": (pct.get("p50") or 0) * 1e6,
        "p99_us": (pct.get("p99") or 0) * 1e6,
        "p999_us": (pct.get("p99.9") or 0) * 1e6,
        "max_us": (s.get("slowest") or 0) * 1e6,
    }


def tool_cmd(a, port, sc, out):
    cmd = tool(a, "load", "--target", f"127.0.0.1:{port}", "--conns", str(sc["conns"]),
               "--duration", str(sc["duration"]), "--out", out)
    if sc.get("max_requests"):
        cmd += ["--max-requests", str(sc["max_requests"])]
    if sc.get("rate"):
        cmd += ["--rate", str(sc["rate"])]
    if not sc.get("keepalive", True):
        cmd += ["--no-keepalive"]
    if sc.get("imdsv2"):
        cmd += ["--imdsv2"]
    if sc.get("method", "GET") != "GET":
        cmd += ["--method", sc["method"]]
    for h in sc.get("headers", []):
        cmd += ["--header", h]
    if sc.get("sources"):
        cmd += ["--sources", sc["sources"]]
    else:
        cmd += ["--path", sc["path"]]
    return cmd


def parse_tool(path):
    with open(path) as f:
        j = json.load(f)
    j["client"] = "iamlet-loadtool"
    j["rps"] = j["ok"] / j["duration_s"] if j["duration_s"] else 0.0
    return j


def wrk_cmd(a, port, sc):
    cmd = [a.wrk, "-t", str(sc.get("threads", 1)), "-c", str(sc["conns"]), "-d", f"{sc['duration']:g}s", "--latency"]
    if not sc.get("keepalive", True):
        cmd += ["-H", "Connection: close"]
    for h in sc.get("headers", []):
        cmd += ["-H", h]
    cmd.append(f"http://127.0.0.1:{port}{sc['path']}")
    return cmd


WRK_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def parse_wrk(text):
    """wrk's summary: requests, duration, non-2xx answers and socket errors, percentiles."""
    def us(v):
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", v)
        return float(m.group(1)) * WRK_UNITS[m.group(2)] if m else None

    m = re.search(r"(\d+) requests in ([\d.]+\w+),", text)
    if not m:
        raise SystemExit(f"wrk: no summary in its output:\n{text[-3000:]}")
    total, dur = int(m.group(1)), us(m.group(2)) / 1e6
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    kinds = {}
    if bad:
        kinds["status_not_2xx"] = int(bad.group(1))
    if sock:
        kinds.update({k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), sock.groups()) if int(v)})
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", text, re.M))
    ok = total - kinds.get("status_not_2xx", 0)
    return {
        "client": "wrk",
        "requests": total,
        "ok": ok,
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
        "rps": ok / dur if dur else 0.0,
        "duration_s": dur,
        "p50_us": us(pct["50"]) if "50" in pct else None,
        "p99_us": us(pct["99"]) if "99" in pct else None,
        "p999_us": None,
        "max_us": None,
    }


def run_client(env, port, sc, label):
    a = env.a
    out = os.path.join(env.work, f"run-{label}.json")
    kind = sc.get("client", "oha")
    use_wrk = kind == "wrk" and getattr(a, "wrk", "")
    use_oha = kind == "oha" and a.oha
    if use_wrk:
        cmd = wrk_cmd(a, port, sc)
    else:
        cmd = oha_cmd(a, port, sc, out) if use_oha else tool_cmd(a, port, sc, out)
    if sc.get("rt"):
        cmd = ["chrt", "-f", "1"] + cmd
    if a.client_cpus:
        cmd = ["taskset", "-c", a.client_cpus] + cmd
    limit = sc["duration"] + 60
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=limit)
    if use_wrk:
        if r.returncode != 0:
            raise SystemExit(f"client failed ({' '.join(cmd)}):\n{r.stdout.decode(errors='replace')[-3000:]}")
        return parse_wrk(r.stdout.decode(errors="replace"))
    if r.returncode != 0 or not os.path.exists(out):
        raise SystemExit(f"client failed ({' '.join(cmd)}):\n{r.stdout.decode(errors='replace')[-3000:]}")
    return parse_oha(out) if use_oha else parse_tool(out)


def can_rt():
    """Whether this user may use SCHED_FIFO (root or CAP_SYS_NICE); the RT variant is skipped otherwise."""
    try:
        return subprocess.run(["chrt", "-f", "1", "true"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


CGROUP_CPU = "/sys/fs/cgroup/cpu"
CAP_GROUP = os.path.join(CGROUP_CPU, "iamlet-loadtest-server")


def make_cap(share):
    """A cgroup (v1 cpu controller) holding the server under test to `share` of one CPU, so that
    on a 2-core machine the server — not the load generator on the other core — is what limits
    a saturating run. None where it cannot be made (no cgroup v1 cpu, not root, share 0)."""
    if share <= 0 or not os.path.isdir(CGROUP_CPU):
        return None
    try:
        os.makedirs(CAP_GROUP, exist_ok=True)
        period = 10_000  # 10 ms periods: short throttling gaps
        with open(os.path.join(CAP_GROUP, "cpu.cfs_period_us"), "w") as f:
            f.write(str(period))
        with open(os.path.join(CAP_GROUP, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(int(period * share)))
        return CAP_GROUP
    except OSError as e:
        log(f"no server CPU cap ({e}); saturating runs may be limited by the load generator")
        return None


def move_to(group, pids):
    """Moves whole processes (all threads) into a cgroup; best effort."""
    for pid in pids:
        try:
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError:
            pass


def drop_cap():
    if os.path.isdir(CAP_GROUP):
        try:
            for pid in open(os.path.join(CAP_GROUP, "cgroup.procs")).read().split():
                move_to(CGROUP_CPU, [int(pid)])
            os.rmdir(CAP_GROUP)
        except OSError:
            pass


def set_fifo(pids, on):
    for pid in pids:
        subprocess.run(["chrt", "-a", "-p"] + (["-f", "1"] if on else ["-o", "0"]) + [str(pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def upstream_accepts(env):
    """Connections the fake IMDS accepted so far (nginx stub_status or the tool's counter)."""
    st, body = http(env.imds_port, "/__loadtest/connections")
    if st != 200:
        return None
    m = re.search(rb"accepts handled requests\s+(\d+)", body)
    return int(m.group(1)) if m else int(body.strip() or 0)


SYSCALLS = ("read", "recvfrom", "write", "writev", "sendto", "epoll_wait", "epoll_pwait", "io_uring_enter",
            "poll", "accept4", "close")


ALLOC_FUNCTIONS = ("malloc", "calloc", "realloc", "posix_memalign")
# Rust's Instant::now and SystemTime::now, and nginx's time updates, go through it (the vDSO
# is called from inside it).
CLOCK_FUNCTIONS = ("clock_gettime",)


def add_libc_probes(a, functions):
    """--allocs, --clocks: user-space probes on the C library's `functions` (perf probe),
    removed at exit. Returns the events to count."""
    out = subprocess.run(["ldd", a.iamlet], stdout=subprocess.PIPE, text=True, check=True).stdout
    m = re.search(r"libc\.so\.6 => (\S+)", out)
    if not m:
        raise SystemExit("--allocs/--clocks: iamlet is not linked with glibc's libc.so.6")
    atexit.register(lambda: subprocess.run(["perf", "probe", "-q", "--del", "probe_libc:*"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for fn in functions:
        subprocess.run(["perf", "probe", "-q", "-x", m.group(1), "--add", fn], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [f"probe_libc:{fn}" for fn in functions]


def start_syscall_count(env, pids, label):
    """With --syscalls (or --allocs, --clocks): `perf stat` counting the server's system calls
    (tracepoints) and, with --allocs or --clocks, its calls of the probed C library functions, on
    every thread of `pids` while the client runs. The count includes the few calls between
    the client's end and perf's, which is noise against a run's hundreds of thousands."""
    # kube2iam.py measures through here with arguments of its own, which have no --syscalls.
    if not (getattr(env.a, "syscalls", False) or env.alloc_events):
        return None
    out = os.path.join(env.work, f"perf-{label}.csv")
    events = ",".join([f"syscalls:sys_enter_{c}" for c in SYSCALLS] + env.alloc_events)
    threads = []
    for pid in pids:
        try:
            threads += os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            pass
    cmd = ["perf", "stat", "-x,", "-o", out, "-e", events, "-t", ",".join(threads)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # perf attaches before the client starts
    return p, out


def finish_syscall_count(counting):
    if counting is None:
        return None
    p, out = counting
    p.send_signal(signal.SIGINT)
    p.wait(timeout=10)
    calls = {}
    with open(out) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[2].startswith(("syscalls:sys_enter_", "probe_libc:")) and parts[0].isdigit():
                name = parts[2].removeprefix("syscalls:sys_enter_").removeprefix("probe_libc:")
                if int(parts[0]):
                    calls[name] = int(parts[0])
    return calls


def measure(env, server, sc, label):
    """One client run against one server, with the server's CPU time and peak RSS."""
    pids = server_pids(server)
    reset_hwm(pids)
    capped = env.cap is not None and "rate" not in sc
    if capped:
        move_to(env.cap, pids)
    if sc.get("rt"):
        set_fifo(pids, True)
    u0 = upstream_accepts(env) if sc["path"] == INSTANCE_ID else None
    c0 = cpu_split(pids)
    counting = start_syscall_count(env, pids, label)
    try:
        res = run_client(env, server.port, sc, label)
    finally:
        calls = finish_syscall_count(counting)
        if sc.get("rt"):
            set_fifo(pids, False)
        if capped:
            move_to(CGROUP_CPU, pids)
    c1 = cpu_split(pids)
    if u0 is not None:
        u1 = upstream_accepts(env)
        res["upstream_connections"] = u1 - u0 if u1 is not None else None
    if calls is not None and res["requests"]:
        res["syscalls_per_req"] = {k: v / res["requests"] for k, v in calls.items()}
    user_s, system_s = ((b - a) / CLK_TCK for a, b in zip(c0, c1))
    res["cpu_s"] = user_s + system_s
    per_req = (lambda s: s * 1e6 / res["requests"]) if res["requests"] else (lambda s: None)
    res["cpu_us_per_req"] = per_req(res["cpu_s"])
    # The kernel's share: system calls, and the loopback TCP work they do for both ends.
    res["user_us_per_req"], res["system_us_per_req"] = per_req(user_s), per_req(system_s)
    res["peak_rss_kib"] = sum(status_kib(p, "VmHWM") for p in pids)
    res["rss_anon_kib"] = sum(status_kib(p, "RssAnon") for p in pids)
    res["rss_file_kib"] = sum(status_kib(p, "RssFile") for p in pids)
    return res


# ---------------------------------------------------------------- scenarios


def scenarios(a, token, sa=""):
    d = a.duration
    client = "oha" if a.oha else "tool"
    # The container door with a token iamlet has already verified (a hash lookup), as the SDKs
    # ask it: the raw JWT in Authorization, Host 169.254.170.23. Same client and settings as
    # 1 and 2; nginx answers the same request (it ignores both headers).
    door = [f"Authorization: {sa}", f"Host: {CONTAINER_HOST}"]
    return [
        dict(id="creds-keepalive", title="1 cached credentials, keep-alive", path=CREDS, conns=50, duration=d, client=client),
        dict(id="creds-new-conn", title="2 cached credentials, new connection per request", path=CREDS, conns=50, duration=d,
             keepalive=False, client=client),
        dict(id="container-keepalive", title="1c container door, cached token, keep-alive", path=CONTAINER, conns=50,
             duration=d, client=client, headers=door),
        dict(id="container-new-conn", title="2c container door, cached token, new connection per request", path=CONTAINER,
             conns=50, duration=d, keepalive=False, client=client, headers=door),
        dict(id="role-list", title="3 role listing", path=LIST, conns=50, duration=d, client=client),
        dict(id="imdsv2-token", title="4a IMDSv2 token PUT", path=TOKEN, method="PUT", conns=50, duration=d, client=client,
             headers=["X-aws-ec2-metadata-token-ttl-seconds: 21600"]),
        dict(id="imdsv2-get", title="4b IMDSv2 credentials GET with token", path=CREDS, conns=50, duration=d, client=client,
             headers=[f"X-aws-ec2-metadata-token: {token}"]),
        dict(id="imdsv2-flow", title="4c IMDSv2 flow (PUT then GET, chained)", path=CREDS, conns=50, duration=d,
             client="tool", imdsv2=True),
        dict(id="passthrough", title="5 pass-through instance-id (nginx: proxy_pass)", path=INSTANCE_ID, conns=50,
             duration=d, client=client),
        dict(id="creds-10k", title="fixed 10k req/s, cached credentials", path=CREDS, conns=50, duration=d, client=client,
             rate=a.fixed_rate),
        # The same under SCHED_FIFO (server threads and client): what the server does when the
        # machine's other tenants (builds, fuzzers at nice 19) cannot delay it. Not saturating,
        # bounded in time; RT throttling still reserves 5 % for everything else.
        dict(id="creds-10k-rt", title="fixed 10k req/s, SCHED_FIFO", path=CREDS, conns=50, duration=d, client=client,
             rate=a.fixed_rate, rt=True),
    ]


def main_matrix(env, results):
    a = env.a
    pods = os.path.join(env.work, "pods.json")
    subprocess.run(tool(a, "gen-pods", "--out", pods, "--count", str(a.pods), "--roles", str(a.roles), "--net", "10",
                        "--prefix", "lt", "--local-role", ROLE), check=True, stdout=subprocess.DEVNULL)
    # The container door: the 127.0.0.1 pod runs as the token's ServiceAccount.
    bind_local_pod(pods)
    sa_args, sa = sa_token(env.work)
    # Body sizes for nginx: the same lengths iamlet answers with.
    probe = start_iamlet(env, "epoll", pods, extra=sa_args, name="probe")
    _, cred = http(probe.port, CREDS)
    _, listing = http(probe.port, LIST)
    st, tok = http(probe.port, TOKEN, "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    assert st == 200, st
    st, door = http(probe.port, CONTAINER, headers=container_headers(sa))
    if st != 200 or b"AccessKeyId" not in door:
        raise SystemExit(f"container door: {st} {door[:300]!r}\n" + open(probe.logfile, errors="replace").read()[-3000:])
    answer = raw_answer(probe.port, CREDS)
    stop(probe)
    bodies = {CREDS: "x" * len(cred), LIST: "x" * len(listing), TOKEN: "x" * len(tok), CONTAINER: "x" * len(door)}
    results["body_bytes"] = {"credentials": len(cred), "role_list": len(listing), "token": len(tok),
                             "container": len(door), "sa_token": len(sa)}
    nginx = start_nginx(env, bodies) if a.nginx else None
    floor = start_floor(env, answer) if a.floor else None
    runs = results["runs"]
    drivers = a.drivers.split(",")
    for rep in range(a.reps):
        for di, driver in enumerate(drivers if rep % 2 == 0 else list(reversed(drivers))):
            srv = start_iamlet(env, driver, pods, extra=sa_args)
            # iamlet tokens are bound to the source IP: mint one as the 127.0.0.1 pod.
            st, token = http(srv.port, TOKEN, "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
            assert st == 200
            # The service-account token's first sight (verification) happens here, before any
            # measured run: the container scenarios measure the remembered token.
            st, _ = http(srv.port, CONTAINER, headers=container_headers(sa))
            assert st == 200, st
            for si, sc in enumerate(scenarios(a, token.decode(), sa)):
                if a.only and sc["id"] not in a.only.split(","):
                    continue
                if sc.get("rt") and not can_rt():
                    continue
                order = ["iamlet", "nginx"] if (rep + di + si) % 2 == 0 else ["nginx", "iamlet"]
                if floor and sc["id"] in FLOOR_SCENARIOS:
                    order.insert((rep + di) % 3, "floor")
                for who in order:
                    if who == "nginx" and not nginx:
                        continue
                    server = {"iamlet": srv, "nginx": nginx, "floor": floor}[who]
                    label = f"{sc['id']}-{who}-{driver}-r{rep}"
                    res = measure(env, server, sc, label)
                    res.update(scenario=sc["id"], server=who, driver=driver if who == "iamlet" else "-",
                               pair_driver=driver, rep=rep)
                    runs.append(res)
                    up = res.get("upstream_connections")
                    log(f"rep {rep} {driver:5} {sc['id']:19} {who:6} {res['rps']:9.0f} req/s  "
                        f"p99 {res['p99_us']:7.0f} µs  cpu {res['cpu_us_per_req'] or 0:5.1f} µs/req  "
                        f"rss {res['peak_rss_kib'] / 1024:5.1f} MiB  errors {res['errors']}"
                        + (f"  upstream conns {up}" if up is not None else ""))
                    if "syscalls_per_req" in res:
                        log("    system calls per request: " + ", ".join(
                            f"{k} {v:.2f}" for k, v in sorted(res["syscalls_per_req"].items()) if v >= 0.005))
                    time.sleep(a.pause)
            verified = container_verifications(srv.port)
            results.setdefault("container_verifications", []).append(
                {"driver": driver, "rep": rep, "workers": a.workers, "verified": verified})
            log(f"rep {rep} {driver:5} service-account tokens verified (first sight) over the whole iamlet: {verified}")
            stop(srv)
    if nginx:
        stop(nginx)
    if floor:
        stop(floor)


def scaling(env, results):
    a = env.a
    counts = [int(x) for x in a.scale_pods.split(",")]
    out = results["scaling"] = []
    for rep in range(a.scale_reps):
        order = counts if rep % 2 == 0 else list(reversed(counts))
        for n in order:
            pods = os.path.join(env.work, f"scale-{n}.json")
            src = os.path.join(env.work, f"scale-{n}.sources")
            roles = min(n, 50)
            subprocess.run(tool(a, "gen-pods", "--out", pods, "--count", str(n), "--roles", str(roles), "--net", "10",
                                "--prefix", "scale", "--local-role", ROLE, "--sources-out", src, "--sources", "50",
                                "--kind", "creds"), check=True, stdout=subprocess.DEVNULL)
            srv = start_iamlet(env, a.scale_driver, pods, name=f"scale-{n}")
            warm = dict(id="warm", path=CREDS, conns=50, duration=min(1.0, a.duration), client="tool", sources=src)
            run_client(env, srv.port, warm, f"scale-warm-{n}-r{rep}")
            sc = dict(id="scale", path=CREDS, conns=50, duration=a.duration, client="tool", sources=src)
            res = measure(env, srv, sc, f"scale-{n}-r{rep}")
            res.update(pods=n, roles=roles, rep=rep, driver=a.scale_driver)
            res["rss_kib"] = status_kib(srv.pid, "VmRSS")
            out.append(res)
            log(f"scaling rep {rep} pods {n:6} {res['rps']:9.0f} req/s  p99 {res['p99_us']:7.0f} µs  "
                f"cpu {res['cpu_us_per_req'] or 0:5.1f} µs/req  rss {res['rss_kib'] / 1024:5.1f} MiB  errors {res['errors']}")
            stop(srv)
            time.sleep(a.pause)


def storm(env, results, key, sts_port, count=None, extra=()):
    a = env.a
    count = count or a.storm_pods
    pods = os.path.join(env.work, f"{key}.json")
    subprocess.run(tool(a, "gen-pods", "--out", pods, "--count", "0", "--local-role", ROLE), check=True,
                   stdout=subprocess.DEVNULL)
    srv = start_iamlet(env, a.scale_driver, pods, extra=extra, name=key, sts_port=sts_port)
    out = os.path.join(env.work, f"{key}-result.json")
    cmd = tool(a, "storm", "--target", f"127.0.0.1:{srv.port}", "--sts", f"127.0.0.1:{sts_port}",
               "--pods-file", pods, "--count", str(count), "--net", "50", "--local-role", ROLE,
               "--pid", str(srv.pid), "--out", out, "--timeout", "120")
    if a.client_cpus:
        cmd = ["taskset", "-c", a.client_cpus] + cmd
    c0 = cpu_ticks([srv.pid])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=400)
    storm_cpu_s = (cpu_ticks([srv.pid]) - c0) / CLK_TCK
    if r.returncode != 0:
        raise SystemExit(f"storm failed:\n{r.stdout.decode(errors='replace')[-3000:]}\n"
                         + open(srv.logfile, errors="replace").read()[-3000:])
    res = json.load(open(out))
    res["driver"] = a.scale_driver
    res["iamlet_args"] = ["--sts-rate-limit=10000", *extra]
    res["sts"] = "moto" if sts_port == env.moto_port else f"fake STS ({a.fake_sts_latency_ms} ms, concurrent)"
    res["hwm_kib_process"] = status_kib(srv.pid, "VmHWM")
    # iamlet's CPU over both storms (2 × N AssumeRole calls, 2 × N first requests, metric scrapes).
    res["iamlet_cpu_s"] = storm_cpu_s
    res["iamlet_cpu_ms_per_pod"] = storm_cpu_s * 1e3 / (2 * res["pods"])
    stop(srv)
    results[key] = res
    ra = res["a"]
    log(f"{key} {res['pods']} pods/roles: publish +{ra['publish_after_write_ms']:.0f} ms, all cached "
        f"{ra['all_cached_after_publish_ms']:.0f} ms after publish (STS RTT {res['sts_rtt_ms']:.1f} ms), "
        f"misses {ra['first_request_misses']:.0f}, AssumeRole {ra['assume_role_calls']:.0f}, "
        f"RSS {ra['rss_kib'] / 1024:.1f} MiB; at RTT+50 ms: {res['b']['first_request_hits']:.0f} hits")


def soak(env, results):
    a = env.a
    pods = os.path.join(env.work, "soak.json")
    subprocess.run(tool(a, "gen-pods", "--out", pods, "--count", "0", "--local-role", ROLE), check=True,
                   stdout=subprocess.DEVNULL)
    srv = start_iamlet(env, a.scale_driver, pods, name="soak")
    out = os.path.join(env.work, "soak-result.json")
    cmd = tool(a, "soak", "--target", f"127.0.0.1:{srv.port}", "--pods-file", pods, "--pods", str(a.soak_pods),
               "--roles", str(a.soak_roles), "--duration", str(a.soak_seconds), "--conns", "16",
               "--churn-ms", "500", "--churn", "5", "--sample", str(max(1, min(10, a.soak_seconds // 20))),
               "--pid", str(srv.pid), "--local-role", ROLE, "--out", out)
    if a.client_cpus:
        cmd = ["taskset", "-c", a.client_cpus] + cmd
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=a.soak_seconds + 120)
    if r.returncode != 0:
        raise SystemExit(f"soak failed:\n{r.stdout.decode(errors='replace')[-3000:]}")
    res = json.load(open(out))
    res["driver"] = a.scale_driver
    stop(srv)
    res["iamlet_log_warnings"] = sum(1 for line in open(srv.logfile, errors="replace") if "WARN" in line or "ERROR" in line)
    results["soak"] = res
    log(f"soak {res['duration_s']:.0f} s: {res['requests']} requests, errors {res['errors']}, wrong role "
        f"{res['wrong_role']}, transitions {res['transitions']}, RSS {res['rss_after_warmup_kib']} → "
        f"{res['rss_end_kib']} KiB ({res['rss_growth_pct']:+.1f} %)")


# ---------------------------------------------------------------- environment


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              cwd=ROOT).stdout.decode().strip()
    except OSError:
        return ""


def environment(a):
    model = ""
    for line in sh("lscpu").splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    dirty = sh("git status --porcelain --untracked-files=no -- proxy resolver Cargo.lock")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": sh("git rev-parse --short HEAD"),
        "tree_dirty": bool(dirty),
        "kernel": os.uname().release,
        "cpu": model,
        "cores": os.cpu_count(),
        "server_cpus": a.server_cpus,
        "client_cpus": a.client_cpus,
        "workers": a.workers,
        "iamlet": a.iamlet,
        "iamlet_profile": "debug" if "/debug/" in a.iamlet else "release",
        "nginx": sh(f"{a.nginx} -v 2>&1") if a.nginx else None,
        "oha": sh(f"{a.oha} --version") if a.oha else None,
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "io_uring_disabled": sh("cat /proc/sys/kernel/io_uring_disabled"),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iamlet", required=True)
    p.add_argument("--tool", required=True)
    p.add_argument("--moto", default="", help="moto_server (STS); without it the fake STS serves everything")
    p.add_argument("--fake-sts-latency-ms", type=int, default=20)
    p.add_argument("--oha", default="")
    p.add_argument("--wrk", default="", help="wrk, the client of the shared-cores part (without it: the built-in client)")
    p.add_argument("--nginx", default="")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--drivers", default="uring,epoll")
    p.add_argument("--only", default="")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the floor server (tool floor) in the cached-credentials scenarios")
    p.add_argument("--allocs", action="store_true",
                   help="also count the server's malloc/calloc/realloc/posix_memalign calls per request (perf probe on "
                        "libc; root). Slows every process's allocations while it runs: run it apart")
    p.add_argument("--clocks", action="store_true",
                   help="also count the server's clock reads per request (clock_gettime; perf probe on libc; root)")
    p.add_argument("--syscalls", action="store_true",
                   help="count the server's system calls per request (perf stat; root or perf_event_paranoid <= 1)")
    p.add_argument("--fixed-rate", type=int, default=10000)
    p.add_argument("--pods", type=int, default=100)
    p.add_argument("--roles", type=int, default=10)
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--server-cpu-share", type=float, default=0.35,
                   help="saturating matrix runs: cap the server under test at this share of one CPU "
                        "(cgroup v1 cpu quota) so it, not the load generator, is the limit; 0 = no cap")
    p.add_argument("--nginx-upstream-keepalive", type=int, default=64,
                   help="idle upstream connections nginx keeps (iamlet keeps 64 per worker, upstream.rs)")
    p.add_argument("--upstream", default="nginx", choices=["nginx", "tool"],
                   help="fake IMDS for pass-through: a second nginx (default, when nginx is there) or the tool's")
    p.add_argument("--scale-pods", default="1,750,10000")
    p.add_argument("--scale-reps", type=int, default=3)
    p.add_argument("--scale-driver", default="auto")
    p.add_argument("--storm-pods", type=int, default=750)
    p.add_argument("--soak-seconds", type=int, default=600)
    p.add_argument("--soak-pods", type=int, default=200)
    p.add_argument("--soak-roles", type=int, default=20)
    p.add_argument("--attack-seconds", type=float, default=None, help="attack: seconds per phase (10; smoke 1.5)")
    p.add_argument("--attack-quiet", type=float, default=None,
                   help="attack: quiet seconds after each phase, at least --metrics-max-age (3; smoke 1.2)")
    p.add_argument("--attack-workers", type=int, default=None, help="attack: iamlet workers (2)")
    p.add_argument("--attack-conns", type=int, default=None, help="attack phase a: connections (10000; smoke 2000)")
    p.add_argument("--attack-slowloris", type=int, default=None, help="attack phase c: connections (2000; smoke 500)")
    p.add_argument("--upgrade-count", type=int, default=None, help="upgrade: upgrades per mode (20; smoke 2)")
    p.add_argument("--upgrade-rate", type=int, default=None,
                   help="upgrade: the pod's requests per second, each on a new connection (1000; smoke 500)")
    p.add_argument("--upgrade-gap", type=float, default=None, help="upgrade: seconds of steady load between upgrades (1; smoke 0.3)")
    p.add_argument("--upgrade-workers", type=int, default=None, help="upgrade: iamlet workers (2)")
    p.add_argument("--upgrade-driver", default=None, help="upgrade: iamlet --io-driver (epoll)")
    p.add_argument("--workers-max", type=int, default=None,
                   help="workers: iamlet --workers 1..this (the core count, at least 2; smoke: at most 4)")
    p.add_argument("--workers-seconds", type=float, default=None, help="workers: seconds per run (10; smoke 0.5)")
    p.add_argument("--workers-reps", type=int, default=None, help="workers: repetitions (3; smoke 1)")
    p.add_argument("--workers-conns", type=int, default=None, help="workers: keep-alive connections (50)")
    p.add_argument("--workers-server-cpus", default=None, help="workers: taskset for iamlet (default: not pinned)")
    p.add_argument("--workers-client-cpus", default=None, help="workers: taskset for the client (default: not pinned)")
    p.add_argument("--shared-seconds", type=float, default=None, help="shared: seconds per run (5; smoke 0.5)")
    p.add_argument("--shared-reps", type=int, default=None, help="shared: repetitions (3; smoke 1)")
    p.add_argument("--skip", default="", help="comma-separated parts: " + ",".join(PARTS))
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    # --only: matrix scenario ids (the matrix runs only those; every other part still runs, as
    # before) and/or part names (then only those parts run, plus the matrix if ids are named).
    only = set(filter(None, a.only.split(",")))
    ids = {sc["id"] for sc in scenarios(a, "")}
    unknown = (only - ids - set(PARTS)) | (skip - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown part or scenario {sorted(unknown)}; parts: {', '.join(PARTS)}; "
                         f"scenarios: {', '.join(sorted(ids))}")
    if only & set(PARTS):
        skip |= set(PARTS) - only - ({"matrix"} if only & ids else set())
    a.only = ",".join(sorted(only & ids))

    work = tempfile.mkdtemp(prefix="iamlet-loadtest-")
    atexit.register(lambda: shutil.rmtree(work, ignore_errors=True))
    env = Env(a, work)
    probed = (ALLOC_FUNCTIONS if a.allocs else ()) + (CLOCK_FUNCTIONS if a.clocks else ())
    if probed:
        env.alloc_events = add_libc_probes(a, probed)
    results = {"environment": environment(a), "smoke": a.smoke, "runs": [], "parts": [x for x in PARTS if x not in skip],
               "settings": {k: v for k, v in vars(a).items() if k not in ("iamlet", "tool", "moto", "oha", "nginx", "out_dir")}}
    log("work dir", work)
    if not a.smoke:
        env.cap = make_cap(a.server_cpu_share)
        atexit.register(drop_cap)
    results["environment"]["server_cpu_cap"] = a.server_cpu_share if env.cap else None

    env.moto_port = None
    if a.moto:
        env.moto_port = free_port()
        moto = start([a.moto, "-H", "127.0.0.1", "-p", str(env.moto_port)], os.path.join(work, "moto.log"), cpus=a.client_cpus)
        wait_for(lambda: http(env.moto_port, "/moto-api/")[0] == 200, "moto", proc=moto, logfile=os.path.join(work, "moto.log"))
    env.fake_sts_port = free_port()
    fsts = start(tool(a, "sts", "--addr", f"127.0.0.1:{env.fake_sts_port}", "--latency-ms", str(a.fake_sts_latency_ms)),
                 os.path.join(work, "fake-sts.log"), cpus=a.client_cpus)
    wait_for(lambda: http(env.fake_sts_port, "/")[0] != 0, "fake STS", proc=fsts)
    env.sts_port = env.moto_port or env.fake_sts_port
    env.imds_port = free_port()
    if a.nginx and a.upstream == "nginx":
        imds = start_upstream_nginx(env)
    else:
        imds = start(tool(a, "imds", "--addr", f"127.0.0.1:{env.imds_port}"), os.path.join(work, "imds.log"), cpus=a.client_cpus)
    wait_for(lambda: http(env.imds_port, INSTANCE_ID)[0] == 200, "fake IMDS", proc=imds)
    results["environment"]["fake_imds"] = "nginx" if a.nginx and a.upstream == "nginx" else "iamlet-loadtool imds"

    t0 = time.time()
    if "matrix" not in skip:
        main_matrix(env, results)
    if "scaling" not in skip:
        scaling(env, results)
    if "storm" not in skip:
        if env.moto_port:
            storm(env, results, "storm", env.moto_port)
        storm(env, results, "storm_fake_sts", env.fake_sts_port)
        # Where the time goes: the same storm with no bound on calls in flight (iamlet's CPU
        # is then the limit), and a storm no larger than the default bound (one wave).
        storm(env, results, "storm_fake_sts_unbounded", env.fake_sts_port,
              extra=(f"--sts-max-in-flight={a.storm_pods}",))
        storm(env, results, "storm_fake_sts_small", env.fake_sts_port, count=min(32, a.storm_pods))
    if "soak" not in skip:
        soak(env, results)
    if "attack" not in skip:
        import attack

        attack.run(env, results, sys.modules[__name__])
    if "upgrade" not in skip:
        import upgrade

        upgrade.run(env, results, sys.modules[__name__])
    if "workers" not in skip:
        import workers

        workers.run(env, results, sys.modules[__name__])
    if "shared" not in skip:
        import shared

        shared.run(env, results, sys.modules[__name__])
    results["wall_s"] = round(time.time() - t0, 1)
    results["environment"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    kill_all()

    import report

    paths = report.write(results, a.out_dir, smoke=a.smoke)
    for pth in paths:
        log("wrote", os.path.relpath(pth, ROOT))
    problems = report.problems(results)
    if problems:
        for x in problems:
            log("PROBLEM:", x)
        if a.smoke:
            sys.exit(1)
    log("done in", results["wall_s"], "s")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
