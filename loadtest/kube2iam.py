#!/usr/bin/env python3
"""iamlet beside kube2iam: one real kube-apiserver + etcd, one moto (STS), one fake IMDS; the
agents in turn (kube2iam, iamlet epoll, iamlet io_uring; order rotated per repetition), each a
fresh process watching the same API server for the same pods.

Started by loadtest/kube2iam.sh, which builds kube2iam and installs what this needs. Standard
library only; reuses bench.py's helpers (processes, /proc figures, oha). Every process started
here is killed on exit by PID; every load is bounded in time and count; everything talks to
127.0.0.0/8 only.

How the agents reach STS. kube2iam 0.15.0 builds a new STS client for every AssumeRole with a
legacy endpoint resolver that returns https://sts.<region>.amazonaws.com whenever the region is
in EC2 DescribeRegions' answer (iam/iam.go); that resolver runs before the SDK's base-endpoint
setting, so AWS_ENDPOINT_URL_STS is not honoured for a real region (aws-sdk-go-v2
service/sts endpoints.go: ResolveEndpoint only falls back on EndpointNotFoundError). So each
agent runs in a mount namespace of its own in which /etc/hosts maps the STS and EC2 hostnames
to 127.0.0.1 and /etc/resolv.conf names 127.0.0.1 (no DNS query leaves loopback), and trusts
only a CA made for this run (SSL_CERT_FILE); an nginx TLS front on 127.0.0.1:443 with a
certificate from that CA forwards to moto. iamlet runs the same way (its STS client reads
SSL_CERT_FILE through rustls-native-certs), so both agents take their production path:
HTTPS to the regional endpoint, nothing overridden but name resolution and trust.
"""

import argparse
import atexit
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (registers the kill-on-exit handlers)

ROOT = bench.ROOT
log = bench.log
NODE = "loadtest-node"
NS = "k2i-loadtest"
ROLE = bench.ROLE
BASE_ARN = bench.BASE_ARN
CREDS_PREFIX = "/latest/meta-data/iam/security-credentials/"
REGION = "us-east-1"
STS_HOSTS = ("sts.us-east-1.amazonaws.com", "sts.amazonaws.com", "ec2.us-east-1.amazonaws.com")
# The roles kube2iam's chart grants it (read pods and namespaces), under a name of this run's.
KUBE2IAM_RULES = [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]}]
AGENTS = ("kube2iam", "iamlet-epoll", "iamlet-uring")
# kube2iam logs a line per request at its default level (info); this variant, cached scenarios
# only, shows how much of its cost that is.
QUIET = "kube2iam-warn"


# ---------------------------------------------------------------- the API server


class Kube:
    """The real control plane (tests/kube/start.sh) and a small REST client for it: one
    keep-alive HTTPS connection per thread, admin token."""

    def __init__(self, work, cpus):
        cmd = [os.path.join(ROOT, "tests/kube/start.sh"), "--owner-pid", str(os.getpid())]
        if cpus:
            cmd = ["taskset", "-c", cpus] + cmd
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=240)
        info = dict(line.split("=", 1) for line in r.stdout.decode().splitlines() if "=" in line)
        if "dir" in info:
            atexit.register(self.stop)
        if r.returncode != 0:
            raise SystemExit(f"tests/kube/start.sh failed:\n{r.stderr.decode(errors='replace')[-3000:]}")
        self.info = info
        self.dir = info["dir"]
        self.server = info["server"]
        self.token = info["token"]
        self.ca = info["ca"]
        self.host, port = self.server.removeprefix("https://").split(":")
        self.port = int(port)
        self.ctx = ssl.create_default_context(cafile=self.ca)
        self.local = threading.local()
        self.work = work

    def stop(self):
        if self.dir and os.path.isdir(self.dir):
            subprocess.run([os.path.join(ROOT, "tests/kube/stop.sh"), self.dir], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)

    def conn(self):
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
        return c

    def req(self, method, path, body=None, ctype="application/json", ok=(200, 201)):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        if isinstance(body, str):
            data = body.encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = ctype
        for attempt in range(2):
            c = self.conn()
            try:
                c.request(method, path, body=data, headers=headers)
                r = c.getresponse()
                raw = r.read()
                break
            except (OSError, http.client.HTTPException):
                c.close()
                self.local.c = None
                if attempt:
                    raise
        if ok and r.status not in ok:
            raise SystemExit(f"{method} {path}: {r.status} {raw[:500]!r}")
        return r.status, (json.loads(raw) if raw else None)

    def apply(self, path, doc):
        """Server-side apply (the API server takes YAML for it too)."""
        self.req("PATCH", path + "?fieldManager=iamlet-loadtest&force=true", doc,
                 ctype="application/apply-patch+yaml")

    def kubeconfig(self, token, name):
        path = os.path.join(self.work, f"{name}.kubeconfig")
        with open(path, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: loadtest
  cluster:
    server: {self.server}
    certificate-authority: {self.ca}
users:
- name: {name}
  user:
    token: {token}
contexts:
- name: loadtest
  context: {{cluster: loadtest, user: {name}}}
current-context: loadtest
""")
        return path

    def sa_token(self, ns, sa, seconds=6 * 3600):
        _, r = self.req("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
                        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"expirationSeconds": seconds}})
        return r["status"]["token"]

    def create_pod(self, name, ip, role, label):
        """Created, then its phase and IP set through the status subresource, as a kubelet would
        (no kubelet runs here)."""
        self.req("POST", f"/api/v1/namespaces/{NS}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"loadtest-set": label},
                         "annotations": {"iam.amazonaws.com/role": role}},
            "spec": {"nodeName": NODE, "serviceAccountName": "default",
                     "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]}})
        self.req("PATCH", f"/api/v1/namespaces/{NS}/pods/{name}/status",
                 {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                             "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}]}},
                 ctype="application/merge-patch+json")

    def delete_set(self, label, timeout=120):
        """Deletes a set of pods at once (grace 0: no kubelet finishes a graceful deletion) and
        waits until the API server lists none of them."""
        sel = f"labelSelector=loadtest-set%3D{label}"
        self.req("DELETE", f"/api/v1/namespaces/{NS}/pods?{sel}&gracePeriodSeconds=0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, r = self.req("GET", f"/api/v1/namespaces/{NS}/pods?{sel}&limit=1")
            if not r["items"]:
                return
            time.sleep(0.2)
        raise SystemExit(f"pods {label} still listed {timeout} s after their deletion")


def shipped_rbac_docs():
    """deploy/manifests/iamlet.yaml's ServiceAccount, ClusterRole and ClusterRoleBinding, as
    YAML documents with their API paths (the manifest is applied as it is, not re-typed)."""
    text = open(os.path.join(ROOT, "deploy/manifests/iamlet.yaml")).read()
    out = []
    for doc in re.split(r"(?m)^---\s*$", text):
        kind = re.search(r"(?m)^kind:\s*(\S+)", doc)
        name = re.search(r"(?m)^metadata:\s*\n(?:  .*\n)*?  name:\s*(\S+)", doc)
        if not kind or not name:
            continue
        kind, name = kind.group(1), name.group(1)
        if kind == "ServiceAccount":
            ns = re.search(r"(?m)^  namespace:\s*(\S+)", doc).group(1)
            out.append((f"/api/v1/namespaces/{ns}/serviceaccounts/{name}", doc, (ns, name)))
        elif kind == "ClusterRole":
            out.append((f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}", doc, None))
        elif kind == "ClusterRoleBinding":
            out.append((f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}", doc, None))
    kinds = sorted(p.split("/")[-2] for p, _, _ in out)
    assert kinds == ["clusterrolebindings", "clusterroles", "serviceaccounts"], kinds
    return out


def setup_cluster(kube):
    """The node, the pods' namespace, the agents' identities; returns their kubeconfigs."""
    kube.req("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    kube.req("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    # No controller manager here: the namespace's default ServiceAccount is made by hand.
    kube.req("POST", f"/api/v1/namespaces/{NS}/serviceaccounts",
             {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})
    sa = None
    for path, doc, who in shipped_rbac_docs():
        kube.apply(path, doc)
        sa = who or sa
    iamlet_kc = kube.kubeconfig(kube.sa_token(*sa), "iamlet")
    name = "kube2iam-loadtest"
    kube.req("POST", "/api/v1/namespaces/kube-system/serviceaccounts",
             {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
    kube.apply(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}", json.dumps(
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": KUBE2IAM_RULES}))
    kube.apply(f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}", json.dumps(
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "kube-system"}]}))
    k2i_kc = kube.kubeconfig(kube.sa_token("kube-system", name), "kube2iam")
    # The pod the oha scenarios ask as (oha connects from 127.0.0.1).
    kube.create_pod("loadtest-local", "127.0.0.1", ROLE, "local")
    return iamlet_kc, k2i_kc


# ---------------------------------------------------------------- STS: moto behind a TLS front


def make_pki(work):
    d = os.path.join(work, "sts-pki")
    os.makedirs(d)
    san = ",".join(f"DNS:{h}" for h in STS_HOSTS)

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=iamlet-loadtest-sts-ca",
         "-keyout", "ca.key", "-out", "ca.crt")
    # RSA-2048 like the real endpoint's certificate, so the agents' handshakes cost what they cost there.
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={STS_HOSTS[0]}", "-keyout", "front.key", "-out", "front.csr")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    ossl("x509", "-req", "-in", "front.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
         "-extfile", "san.ext", "-out", "front.crt")
    empty = os.path.join(d, "no-other-cas")
    os.makedirs(empty)
    return d, empty


def start_tls_front(a, work, pki, moto_port):
    """nginx on 127.0.0.1:443 terminating TLS for the STS/EC2 hostnames, forwarding to moto
    (keep-alive upstream, Host kept: moto picks the service by it); stub_status on a plain port
    counts the calls."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 443))
    except OSError as e:
        raise SystemExit(f"127.0.0.1:443 is taken ({e}); the agents' STS front needs it")
    finally:
        s.close()
    d = os.path.join(work, "sts-front")
    os.makedirs(os.path.join(d, "tmp"))
    status_port = bench.free_port()
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
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  upstream moto {{ server 127.0.0.1:{moto_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:443 ssl backlog=4096;
    ssl_certificate {pki}/front.crt;
    ssl_certificate_key {pki}/front.key;
    location / {{
      proxy_pass http://moto;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_read_timeout 60s;
    }}
  }}
  server {{
    listen 127.0.0.1:{status_port};
    location = /status {{ stub_status; }}
  }}
}}
""")
    p = bench.start([a.nginx, "-p", d, "-c", conf, "-e", os.path.join(d, "error.log")], os.path.join(work, "sts-front.log"),
                    cpus=a.client_cpus)
    p.status_port = status_port
    bench.wait_for(lambda: front_requests(p) is not None, "STS TLS front", proc=p)
    return p


def front_requests(front):
    st, body = bench.http(front.status_port, "/status")
    if st != 200:
        return None
    m = re.search(rb"accepts handled requests\s+\d+\s+\d+\s+(\d+)", body)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- the agents


class Ctx:
    pass


def agent_env(ctx):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("AWS_", "IAMLET_", "GODEBUG", "GOMAXPROCS")) and "proxy" not in k.lower()
         and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    e.update(
        AWS_REGION=REGION,
        AWS_DEFAULT_REGION=REGION,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.path.join(ctx.work, "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=os.path.join(ctx.work, "no-aws-credentials"),
        SSL_CERT_FILE=os.path.join(ctx.pki, "ca.crt"),
        SSL_CERT_DIR=ctx.no_cas,
    )
    return e


# Runs the agent with this run's /etc/hosts and /etc/resolv.conf in a private mount namespace;
# exec keeps the PID (taskset → unshare → sh → agent), so /proc figures are the agent's.
NAMESPACE_WRAPPER = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'


def start_agent(ctx, agent, name, extra=()):
    a = ctx.a
    port = bench.free_port()
    logfile = os.path.join(ctx.work, f"{name}.log")
    common = [f"--node={NODE}", f"--base-role-arn={BASE_ARN}", f"--app-port={port}",
              f"--metadata-addr=127.0.0.1:{ctx.imds_port}"]
    if agent.startswith("kube2iam"):
        if agent == QUIET:
            extra = ("--log-level=warn", *extra)
        cmd = [a.kube2iam, f"--kubeconfig={ctx.k2i_kc}", *common, *extra]
    else:
        driver = agent.split("-", 1)[1]
        cmd = [a.iamlet, f"--kubeconfig={ctx.iamlet_kc}", *common, f"--io-driver={driver}",
               f"--workers={a.workers}", "--use-regional-sts-endpoint", *a.iamlet_arg, *extra]
    wrapped = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NAMESPACE_WRAPPER, "sh",
               ctx.hosts, ctx.resolv, *cmd]
    t0 = time.time()
    p = bench.start(wrapped, logfile, cpus=a.server_cpus, env=agent_env(ctx))
    p.port = port
    p.logfile = logfile
    p.agent = agent
    p.cmd = cmd
    if agent.startswith("kube2iam"):
        # kube2iam listens once its pod and namespace caches are synced.
        ready = lambda: bench.http(port, "/healthz", timeout=1)[0] != 0  # noqa: E731
    else:
        ready = lambda: bench.http(port, "/ready", timeout=1)[0] == 200  # noqa: E731
    bench.wait_for(ready, f"{name} ready", timeout=60, proc=p, logfile=logfile)
    p.ready_s = time.time() - t0
    return p


def raw_get(port, src, path, timeout):
    """One GET on a new connection from source address `src`; (status, body, seconds)."""
    t0 = time.perf_counter()
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: iamlet-loadtest\r\n"
                  f"Connection: close\r\n\r\n".encode())
        data = b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            headers[k.decode().strip().lower()] = v.decode().strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = dechunk(body)
        return status, body, time.perf_counter() - t0, headers, None
    except OSError as e:
        return 0, b"", time.perf_counter() - t0, {}, type(e).__name__
    finally:
        s.close()


def dechunk(b):
    out = b""
    while b:
        size, _, rest = b.partition(b"\r\n")
        n = int(size.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out += rest[:n]
        b = rest[n + 2:]
    return out


def creds_shape(body):
    try:
        j = json.loads(body)
    except ValueError:
        return None
    return {"keys": sorted(j), "Code": j.get("Code"), "Type": j.get("Type"),
            "expiration_format": re.sub(r"\d", "9", j.get("Expiration", ""))}


# ---------------------------------------------------------------- scenarios


def cached(ctx, srv, sid, keepalive, rep):
    a = ctx.a
    sc = dict(id=sid, path=CREDS_PREFIX + ROLE, conns=a.conns, duration=a.duration, client="oha", keepalive=keepalive)
    warm = dict(sc, duration=a.warmup)
    bench.measure(ctx.env, srv, warm, f"{sid}-{srv.name}-r{rep}-warm")
    return bench.measure(ctx.env, srv, sc, f"{sid}-{srv.name}-r{rep}")


def first_requests(ctx, srv, session, rep):
    """Pods created one at a time, each with a role never asked before; each asks once, from its
    own address, as soon as the API server has its IP. Time from that moment to the 200."""
    a = ctx.a
    label = f"first-{session}"
    out = []
    for k in range(a.first_pods):
        ip = f"127.{60 + session}.0.{k + 1}"
        role = f"first-{session}-{k}"
        t0 = time.perf_counter()
        ctx.kube.create_pod(f"first-{session}-{k}", ip, role, label)
        t1 = time.perf_counter()
        st, body, dt, _, err = raw_get(srv.port, ip, CREDS_PREFIX + role, a.request_timeout)
        ok = st == 200 and b"AccessKeyId" in body
        out.append({"status": st, "ok": ok, "error": err, "write_ms": (t1 - t0) * 1e3, "first_200_ms": dt * 1e3 if ok else None,
                    "from_create_ms": (t1 - t0 + dt) * 1e3 if ok else None,
                    "body": None if ok else body[:200].decode(errors="replace")})
        time.sleep(a.first_gap)
    oks = [r["first_200_ms"] for r in out if r["ok"]]
    res = {"pods": len(out), "ok": len(oks), "errors": len(out) - len(oks),
           "median_ms": statistics.median(oks) if oks else None, "max_ms": max(oks) if oks else None,
           "min_ms": min(oks) if oks else None,
           "median_from_create_ms": bench_med([r["from_create_ms"] for r in out]),
           "over_100ms": sum(1 for x in oks if x >= 100), "samples": out}
    log(f"rep {rep} {srv.name:13} first request  median {fmt_ms(res['median_ms'])} ms  "
        f"max {fmt_ms(res['max_ms'])} ms  errors {res['errors']}/{res['pods']}")
    return res, label


def storm(ctx, srv, session, rep):
    """`storm_pods` pods written to the API server at once (`writers` connections); each asks
    once, from its own address, as soon as its IP is written. Wall time from the first write
    to the last 200; per pod, time from its IP's write to its 200."""
    a = ctx.a
    n = a.storm_pods
    label = f"storm-{session}"
    pods = [(f"storm-{session}-{i}", f"127.{100 + session}.{i // 250}.{i % 250 + 1}", f"storm-role-{i % a.storm_roles}")
            for i in range(n)]
    results = [None] * n
    acked = [None] * n
    asks = concurrent.futures.ThreadPoolExecutor(max_workers=n + 4)
    pids = [srv.pid]
    bench.reset_hwm(pids)
    c0 = bench.cpu_ticks(pids)
    f0 = front_requests(ctx.front)
    deadline = time.time() + a.storm_timeout

    def ask(i):
        _, ip, role = pods[i]
        st, body, dt, _, err = raw_get(srv.port, ip, CREDS_PREFIX + role, max(1.0, min(a.request_timeout, deadline - time.time())))
        results[i] = (st, b"AccessKeyId" in body, time.perf_counter(), err)

    def write(i):
        name, ip, role = pods[i]
        ctx.kube.create_pod(name, ip, role, label)
        acked[i] = time.perf_counter()
        return asks.submit(ask, i)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=a.writers) as w:
        futs = [f.result() for f in [w.submit(write, i) for i in range(n)]]
    t_written = time.perf_counter()
    done, pending = concurrent.futures.wait(futs, timeout=max(1.0, deadline - time.time()))
    asks.shutdown(wait=False, cancel_futures=True)
    cpu_s = (bench.cpu_ticks(pids) - c0) / bench.CLK_TCK
    f1 = front_requests(ctx.front)
    ok = [i for i in range(n) if results[i] and results[i][0] == 200 and results[i][1]]
    lat = sorted((results[i][2] - acked[i]) * 1e3 for i in ok)
    kinds = {}
    ok_set = set(ok)
    for i in range(n):
        r = results[i]
        k = "ok" if i in ok_set else ("timeout" if r is None else (r[3] or f"status_{r[0]}"))
        kinds[k] = kinds.get(k, 0) + 1
    res = {
        "pods": n, "roles": a.storm_roles, "writers": a.writers, "ok": len(ok), "errors": n - len(ok),
        "error_kinds": {k: v for k, v in kinds.items() if k != "ok"},
        "write_s": t_written - t0,
        "wall_s": (max(results[i][2] for i in ok) - t0) if len(ok) == n else None,
        "wall_ok_s": (max(results[i][2] for i in ok) - t0) if ok else None,
        "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "max_ms": lat[-1] if lat else None,
        "agent_cpu_s": cpu_s, "agent_hwm_kib": bench.status_kib(srv.pid, "VmHWM"),
        "agent_rss_kib_after": bench.status_kib(srv.pid, "VmRSS"),
        # stub_status counts the request that reads it: one of the two reads is in the difference.
        "sts_calls": (f1 - f0 - 1) if f0 is not None and f1 is not None else None,
        "unfinished": len(pending),
    }
    log(f"rep {rep} {srv.name:13} storm {n} pods/{a.storm_roles} roles: written in {res['write_s']:.1f} s, all 200 after "
        f"{fmt_s(res['wall_s'])} s, per pod p50 {fmt_ms(res['p50_ms'])} / p99 {fmt_ms(res['p99_ms'])} ms, "
        f"errors {res['errors']} {res['error_kinds'] or ''}, STS calls {res['sts_calls']}, "
        f"CPU {cpu_s:.2f} s, RSS peak {res['agent_hwm_kib'] / 1024:.1f} MiB")
    return res, label


def pct(xs, q):
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def fmt_ms(x):
    return "-" if x is None else f"{x:,.1f}"


def fmt_s(x):
    return "-" if x is None else f"{x:.2f}"


def session(ctx, agent, rep, index, parts):
    a = ctx.a
    name = f"{agent}-r{rep}"
    srv = start_agent(ctx, agent, name)
    srv.name = agent
    # Idle: started, caches synced, not asked anything yet.
    time.sleep(a.settle)
    rec = {"agent": agent, "rep": rep, "session": index, "ready_s": srv.ready_s, "args": srv.cmd[1:],
           "idle_rss_kib": bench.status_kib(srv.pid, "VmRSS"), "idle_anon_kib": bench.status_kib(srv.pid, "RssAnon"),
           "threads": bench.status_kib(srv.pid, "Threads")}
    # The first credentials request (AssumeRole; kube2iam also DescribeRegions once).
    st = body = headers = None
    deadline = time.time() + 30
    while time.time() < deadline:
        st, body, _, headers, _ = raw_get(srv.port, "127.0.0.1", CREDS_PREFIX + ROLE, 10)
        if st == 200:
            break
        time.sleep(0.2)
    if st != 200:
        raise SystemExit(f"{name}: no credentials for the 127.0.0.1 pod: {st} {body[:300]!r}\n"
                         + open(srv.logfile, errors="replace").read()[-3000:])
    rec["shape"] = creds_shape(body)
    rec["body_bytes"] = len(body)
    rec["content_type"] = headers.get("content-type")
    labels = []
    try:
        if "cached" in parts:
            for sid, ka in (("keepalive", True), ("new-conn", False)):
                r = cached(ctx, srv, sid, ka, rep)
                rec[sid] = r
                log(f"rep {rep} {agent:13} {sid:10} {r['rps']:9.0f} req/s  p50 {r['p50_us']:7.0f} µs  p99 {r['p99_us']:7.0f} µs  "
                    f"cpu {r['cpu_us_per_req'] or 0:6.1f} µs/req  errors {r['errors']} {r['error_kinds'] or ''}")
                time.sleep(a.pause)
        if "first" in parts:
            rec["first"], label = first_requests(ctx, srv, index, rep)
            labels.append(label)
        if "storm" in parts:
            rec["storm"], label = storm(ctx, srv, index, rep)
            labels.append(label)
        rec["hwm_kib_end"] = bench.status_kib(srv.pid, "VmHWM")
    finally:
        bench.stop(srv)
        for label in labels:
            ctx.kube.delete_set(label)
    lines = sum(1 for _ in open(srv.logfile, "rb"))
    rec["log_lines"] = lines
    rec["log_bytes"] = os.path.getsize(srv.logfile)
    errors = [line.strip() for line in open(srv.logfile, errors="replace")
              if re.search(r"level=(error|fatal)|\bERROR\b", line)]
    rec["log_errors"] = len(errors)
    rec["log_error_samples"] = sorted(set(re.sub(r'time="[^"]*" ', "", x)[:300] for x in errors))[:5]
    os.remove(srv.logfile)  # kube2iam writes a line per request: only the counts are kept
    return rec


# ---------------------------------------------------------------- summary and report


# (key, title, unit, path into a session record, higher_is_better, digits)
METRICS = [
    ("keepalive_rps", "cached credentials, keep-alive: req/s", "req/s", ("keepalive", "rps"), True, 0),
    ("keepalive_cpu", "cached credentials, keep-alive: CPU per request", "µs", ("keepalive", "cpu_us_per_req"), False, 1),
    ("keepalive_p50", "cached credentials, keep-alive: p50 latency", "µs", ("keepalive", "p50_us"), False, 0),
    ("newconn_rps", "cached credentials, new connection per request: req/s", "req/s", ("new-conn", "rps"), True, 0),
    ("newconn_cpu", "cached credentials, new connection per request: CPU per request", "µs", ("new-conn", "cpu_us_per_req"), False, 1),
    ("first_ms", "first request of a new pod (new role): IP written → 200, median", "ms", ("first", "median_ms"), False, 1),
    ("first_create_ms", "first request of a new pod: pod created (POST) → 200, median", "ms", ("first", "median_from_create_ms"), False, 1),
    ("storm_wall", "storm: first write to last 200", "s", ("storm", "wall_s"), False, 2),
    ("storm_p50", "storm: per pod, IP written → 200, p50", "ms", ("storm", "p50_ms"), False, 0),
    ("storm_p99", "storm: per pod, IP written → 200, p99", "ms", ("storm", "p99_ms"), False, 0),
    ("storm_cpu", "storm: agent CPU", "s", ("storm", "agent_cpu_s"), False, 2),
    ("storm_sts", "storm: STS calls", "", ("storm", "sts_calls"), False, 0),
    ("storm_hwm", "storm: agent peak RSS", "MiB", ("storm", "agent_hwm_kib"), False, 1),
    ("idle_rss", "idle RSS (started, synced, before any request)", "MiB", ("idle_rss_kib",), False, 1),
]


def get(rec, path):
    v = rec
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
        if v is None:
            return None
    if path[-1].endswith("_kib"):
        v = v / 1024
    return v


def summarize(results):
    sessions = results["sessions"]
    rows = []
    for key, title, unit, path, higher, nd in METRICS:
        row = {"key": key, "title": title, "unit": unit, "higher_is_better": higher, "digits": nd,
               "median": {}, "values": {}, "ratio": {}}
        for agent in AGENTS + (QUIET,):
            vals = [get(s, path) for s in sessions if s["agent"] == agent]
            row["values"][agent] = vals
            row["median"][agent] = bench_med(vals)
        row["ratio_quiet"] = {}
        for base, into in (("kube2iam", row["ratio"]), (QUIET, row["ratio_quiet"])):
            for agent in AGENTS[1:]:
                ratios = []
                for s in sessions:
                    if s["agent"] != agent:
                        continue
                    peer = [p for p in sessions if p["agent"] == base and p["rep"] == s["rep"]]
                    v, k = get(s, path), get(peer[0], path) if peer else None
                    if v is not None and k:
                        ratios.append(v / k)
                into[agent] = bench_med(ratios)
        if any(v is not None for v in row["median"].values()):
            rows.append(row)
    return rows


def bench_med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def problems(results):
    out = []
    for s in results["sessions"]:
        if not s["agent"].startswith("iamlet"):
            continue
        for sid in ("keepalive", "new-conn"):
            r = s.get(sid)
            if r and (r["errors"] or not r["ok"]):
                out.append(f"{s['agent']} rep {s['rep']} {sid}: {r['errors']} errors {r['error_kinds']}")
        for sid in ("first", "storm"):
            r = s.get(sid)
            if r and r["errors"]:
                out.append(f"{s['agent']} rep {s['rep']} {sid}: {r['errors']} of {r['pods']} pods without a 200"
                           + (f" {r.get('error_kinds')}" if r.get("error_kinds") else ""))
    shapes = {json.dumps(s.get("shape"), sort_keys=True) for s in results["sessions"]}
    if len(shapes) != 1:
        out.append(f"the agents' credential answers differ in shape: {sorted(shapes)}")
    return out


def kube2iam_failures(results):
    out = []
    for s in results["sessions"]:
        if not s["agent"].startswith("kube2iam"):
            continue
        for sid in ("keepalive", "new-conn"):
            r = s.get(sid)
            if r and r["errors"]:
                out.append(f"{s['agent']} rep {s['rep']} {sid}: {r['errors']} errors {r['error_kinds']}")
        for sid in ("first", "storm"):
            r = s.get(sid)
            if r and r["errors"]:
                out.append(f"{s['agent']} rep {s['rep']} {sid}: {r['errors']} of {r['pods']} pods without a 200"
                           + (f" {r.get('error_kinds')}" if r.get("error_kinds") else ""))
    return out


def esc(s):
    return s.replace("`", "'").replace("|", "\\|")


def num(x, nd):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def ratio_txt(r):
    return "–" if r is None else f"{r:.2f}×" if r >= 0.1 else f"{r:.3f}×"


def markdown(results, rows, svg_rel):
    e = results["environment"]
    k = results["kube2iam"]
    a = results["settings"]
    lines = [f"## iamlet vs kube2iam — {e['date']} — iamlet `{e.get('iamlet_source_commit') or e['commit']}`"
             + (" (+ uncommitted changes)" if e.get("tree_dirty") else "")
             + f", kube2iam {k['tag']} (`{k['commit'][:12]}`)" + (" — SMOKE" if results["smoke"] else "")
             + (f" — {a['label']}: iamlet {' '.join(a['iamlet_arg'])}" if a.get("label") else ""), ""]
    lines += [
        f"`loadtest/kube2iam.sh` (`loadtest/kube2iam.py`): one real kube-apiserver {e.get('kube_apiserver', '')} + etcd "
        f"{e.get('etcd', '')}, "
        f"moto {e.get('moto', '')} as STS behind an nginx TLS front on 127.0.0.1:443, the fake IMDS "
        "(nginx); each agent a fresh process per repetition, order rotated "
        f"({a['reps']} repetitions), pinned to CPU {a['server_cpus']} with one core's worth of threads "
        f"(iamlet `--workers {a['workers']}`; kube2iam's Go runtime sees one CPU, so GOMAXPROCS=1); "
        f"oha, moto, the fronts, the API server, etcd and the Python clients on CPU {a['client_cpus']}.",
        "",
        f"- Hardware: {e['cpu']}, {e['cores']} cores; kernel `{e['kernel']}`; load average "
        f"{' '.join(e['loadavg_start'])} at the start, {' '.join(e.get('loadavg_end', []))} at the end.",
        f"- iamlet: built from `{e.get('iamlet_source_commit')}` (run from branch commit `{e['commit']}`), "
        f"{e['iamlet_profile']} build, identity: the shipped "
        "ServiceAccount and RBAC of `deploy/manifests/iamlet.yaml` (a TokenRequest token), defaults "
        "otherwise (`--log-level=info`, `--sts-rate-limit=20`, `--sts-max-in-flight=32`) plus "
        "`--use-regional-sts-endpoint`" + (f" and `{' '.join(a['iamlet_arg'])}`" if a.get("iamlet_arg") else "") + ".",
        f"- kube2iam: tag {k['tag']}, commit `{k['commit']}`, {k['go']}, `CGO_ENABLED=0` as its image "
        f"builds it (source: {k['source']}); identity: a ServiceAccount bound to a ClusterRole with "
        "get/list/watch on pods and namespaces (what its chart grants); defaults otherwise (log level "
        "info: a line per request, written to a file).",
        "- STS for both: the agents run in mount namespaces of their own where `/etc/hosts` maps "
        "`sts.us-east-1.amazonaws.com` (and the EC2 endpoint kube2iam asks for DescribeRegions) to "
        "127.0.0.1 and trust only a CA made for the run (`SSL_CERT_FILE`). kube2iam 0.15.0 does not "
        "honour `AWS_ENDPOINT_URL_STS` for a real region: its own endpoint resolver (regional "
        "endpoint whenever DescribeRegions lists the region) runs before the SDK's base endpoint.",
        f"- Cached scenarios: {e.get('oha', '')}, {a['conns']} connections, {a['duration']:g} s after "
        f"{a['warmup']:g} s of warm-up, from the pod at 127.0.0.1, "
        + (f"each agent held to {e['server_cpu_cap']} of a CPU (cgroup v1 quota, as bench.py does) so the "
           "server, not oha, is the limit." if e.get("server_cpu_cap") else "no CPU cap.")
        + " CPU per request: the agent's utime+stime over the run / requests.",
        f"- First request: {a['first_pods']} pods per repetition, created one at a time (POST, then "
        "the status with its IP), each with a role never asked before; the pod asks once, from its "
        "own 127.x address on a new connection, as soon as the API server acknowledged its IP.",
        f"- Storm: {a['storm_pods']} pods, {a['storm_roles']} roles, written by {a['writers']} "
        "API connections at once; each pod asks once as soon as its IP is written. STS calls: "
        "requests through the TLS front during the storm.",
        "",
        "Medians over the repetitions; ratio = iamlet / kube2iam (median of the per-repetition "
        "ratios); the last column says which way is better.",
        "",
        "| scenario | unit | kube2iam | iamlet epoll | iamlet io_uring | epoll / kube2iam | io_uring / kube2iam | better |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, nd = r["median"], r["digits"]
        lines.append(f"| {r['title']} | {r['unit']} | {num(m['kube2iam'], nd)} | {num(m['iamlet-epoll'], nd)} | "
                     f"{num(m['iamlet-uring'], nd)} | **{ratio_txt(r['ratio']['iamlet-epoll'])}** | "
                     f"**{ratio_txt(r['ratio']['iamlet-uring'])}** | {'higher' if r['higher_is_better'] else 'lower'} |")
    quiet = [r for r in rows if r["median"].get(QUIET) is not None]
    if quiet:
        lines += ["", "kube2iam with per-request logging off (`--log-level=warn`, cached scenarios only, "
                  "interleaved with the others):", "",
                  "| scenario | unit | kube2iam `--log-level=warn` | epoll / it | io_uring / it | kube2iam default / it |",
                  "|---|---|---|---|---|---|"]
        for r in quiet:
            k = [x / q for x, q in zip(r["values"]["kube2iam"], r["values"][QUIET]) if x is not None and q]
            lines.append(f"| {r['title']} | {r['unit']} | {num(r['median'][QUIET], r['digits'])} | "
                         f"**{ratio_txt(r['ratio_quiet']['iamlet-epoll'])}** | **{ratio_txt(r['ratio_quiet']['iamlet-uring'])}** | "
                         f"{ratio_txt(bench_med(k))} |")
    lines.append("")
    # Errors, shapes, logs.
    fails = kube2iam_failures(results)
    errs_iamlet = problems(results)
    total = {ag: sum((s.get(x) or {}).get("errors", 0) or 0 for s in results["sessions"] if s["agent"] == ag
                     for x in ("keepalive", "new-conn", "first", "storm")) for ag in AGENTS + (QUIET,)}
    lines.append(f"Non-200 answers or failed requests: iamlet epoll {total['iamlet-epoll']}, io_uring "
                 f"{total['iamlet-uring']}; kube2iam {total['kube2iam'] + total[QUIET]}"
                 + (": " + "; ".join(fails) if fails else "") + ".")
    shapes = {}
    for s in results["sessions"]:
        shapes.setdefault(s["agent"], (s.get("shape"), s.get("body_bytes"), s.get("content_type")))
    same = len({json.dumps(v[0], sort_keys=True) for v in shapes.values()}) == 1
    ks = shapes.get("kube2iam", (None,))[0] or {}
    lines.append(f"Credential answers: {'the same JSON shape' if same else 'DIFFERENT shapes'} from every agent "
                 f"(keys {', '.join(ks.get('keys', []))}; Code {ks.get('Code')}, Type {ks.get('Type')}); "
                 + ", ".join(f"{ag} {v[1]} bytes, Content-Type `{v[2]}`" for ag, v in shapes.items()) + ".")
    logs = {ag: bench_med([s.get("log_bytes") for s in results["sessions"] if s["agent"] == ag]) for ag in AGENTS + (QUIET,)}
    logs = {ag: v for ag, v in logs.items() if v is not None}
    lines.append("Log written per repetition (median): " + ", ".join(
        f"{ag} {(v or 0) / 1e6:,.1f} MB" for ag, v in logs.items()) + ".")
    firsts = {}
    for s in results["sessions"]:
        f = s.get("first")
        if f:
            t = firsts.setdefault(s["agent"], [0, 0, []])
            t[0] += f["over_100ms"]
            t[1] += f["ok"]
            t[2] += [x["first_200_ms"] for x in f["samples"] if x["ok"]]
    if firsts:
        lines.append("First requests (IP written → 200): " + "; ".join(
            f"{ag} min {num(min(t[2]) if t[2] else None, 1)} / median {num(bench_med(t[2]), 1)} / max "
            f"{num(max(t[2]) if t[2] else None, 1)} ms, {t[0]} of {t[1]} at 100 ms or more"
            for ag, t in firsts.items()) + ".")
    samples = sorted({x for s in results["sessions"] for x in s.get("log_error_samples", [])})
    if samples:
        lines.append("Error lines in the agents' logs: " + "; ".join(f"`{esc(x)}`" for x in samples[:6]) + ".")
    if errs_iamlet:
        lines.append("")
        lines.append("Problems: " + "; ".join(errs_iamlet))
    if svg_rel:
        lines += ["", f"![iamlet vs kube2iam]({svg_rel})"]
    lines += ["", f"Raw: `{results['json_rel']}`.", ""]
    return "\n".join(lines)


SHORT = {
    "keepalive_rps": "keep-alive: req/s", "keepalive_cpu": "keep-alive: CPU per request",
    "keepalive_p50": "keep-alive: p50 latency", "newconn_rps": "new connection: req/s",
    "newconn_cpu": "new connection: CPU per request", "first_ms": "new pod's first request (IP → 200)",
    "first_create_ms": "new pod's first request (POST → 200)", "storm_wall": "storm: first write → last 200",
    "storm_p50": "storm: per pod p50", "storm_p99": "storm: per pod p99", "storm_cpu": "storm: agent CPU",
    "storm_sts": "storm: STS calls", "storm_hwm": "storm: peak RSS", "idle_rss": "idle RSS",
}


def svg(rows):
    """How many times better iamlet is than kube2iam, per figure and driver (log scale)."""
    import math

    items = [r for r in rows if any(r["ratio"].get(d) for d in AGENTS[1:])]
    W, left, bar, gap = 940, 250, 11, 10
    H = 70 + len(items) * (2 * bar + gap) + 40
    lo, hi = 0.25, 200.0
    x = lambda v: left + (W - left - 60) * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="10" y="20" font-size="13" font-weight="bold">iamlet vs kube2iam: how many times better iamlet is '
           '(medians; log scale; right of 1× = iamlet better)</text>']
    for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200):
        out.append(f'<line x1="{x(t):.1f}" y1="40" x2="{x(t):.1f}" y2="{H - 35}" stroke="{"#333" if t == 1 else "#ddd"}"/>')
        out.append(f'<text x="{x(t):.1f}" y="{H - 22}" text-anchor="middle">{t:g}×</text>')
    y = 50
    colors = {"iamlet-epoll": "#2ca02c", "iamlet-uring": "#1f77b4"}
    for r in items:
        out.append(f'<text x="{left - 8}" y="{y + bar + 4}" text-anchor="end">{SHORT.get(r["key"], r["title"])}</text>')
        for d in AGENTS[1:]:
            v = r["ratio"].get(d)
            if v:
                f = v if r["higher_is_better"] else 1 / v
                f = min(max(f, lo), hi)
                x0, x1 = sorted((x(1), x(f)))
                out.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(1, x1 - x0):.1f}" height="{bar - 1}" fill="{colors[d]}">'
                           f'<title>{d}: {f:.2f}× better</title></rect>')
                out.append(f'<text x="{x1 + 3:.1f}" y="{y + bar - 2}" font-size="9">{f:.2f}×</text>')
            y += bar
        y += gap
    ly = H - 8
    for j, d in enumerate(AGENTS[1:]):
        out.append(f'<rect x="{left + j * 150}" y="{ly - 9}" width="10" height="10" fill="{colors[d]}"/>')
        out.append(f'<text x="{left + j * 150 + 14}" y="{ly}">{d.replace("uring", "io_uring")}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(results, out_dir, smoke):
    os.makedirs(out_dir, exist_ok=True)
    e = results["environment"]
    stamp = e["date"].replace(":", "").replace("-", "")
    label = results["settings"].get("label")
    base = f"{'smoke-' if smoke else ''}kube2iam-{stamp}-{e['commit']}" + (f"-{label}" if label else "")
    rows = summarize(results)
    results["summary"] = rows
    results["problems"] = problems(results)
    results["kube2iam_failures"] = kube2iam_failures(results)
    # loadtest/RESULTS.md for runs into loadtest/results; any other directory gets its own.
    standard = os.path.abspath(out_dir) == os.path.join(HERE, "results") and not smoke
    results_md = os.path.join(HERE, "RESULTS.md") if standard else os.path.join(out_dir, "RESULTS.md")
    jpath = os.path.join(out_dir, base + ".json")
    spath = os.path.join(out_dir, base + ".svg")
    results["json_rel"] = os.path.relpath(jpath, os.path.dirname(results_md))
    with open(jpath, "w") as f:
        json.dump(results, f, indent=1)
    with open(spath, "w") as f:
        f.write(svg(rows))
    md = markdown(results, rows, os.path.relpath(spath, os.path.dirname(results_md)))
    with open(results_md, "a") as f:
        f.write("\n" + md)
    return [jpath, spath, results_md]


# ---------------------------------------------------------------- main


def versions(a, kube):
    def out(cmd):
        try:
            return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30).stdout.decode().strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    apiserver = next(w for w in open(os.path.join(kube.dir, "apiserver.sh")).read().split() if w.endswith("/kube-apiserver"))
    # Built from its Go modules (tests/kube/build.sh), it carries no version stamp; its cache
    # directory is named after the versions.
    built = re.search(r"kubernetes-(v[\d.]+)-etcd-(v[\d.]+)", apiserver)
    return {
        "kube_apiserver": built.group(1) if built else out([apiserver, "--version"]),
        "etcd": built.group(2) if built else "",
        "moto": out([os.path.join(os.path.dirname(a.moto), "python3"), "-c", "import moto; print(moto.__version__)"]),
        "go": out(["go", "version"]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iamlet", required=True)
    p.add_argument("--kube2iam", required=True)
    p.add_argument("--kube2iam-info", required=True, help="build.json written by kube2iam.sh")
    p.add_argument("--moto", required=True)
    p.add_argument("--oha", required=True)
    p.add_argument("--nginx", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--smoke", action="store_true", help="every scenario for ~1 s, 1 repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=5, help="seconds per cached-credentials run")
    p.add_argument("--warmup", type=float, default=1, help="seconds of load before each measured cached run")
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--first-pods", type=int, default=10, help="new pods per repetition in the first-request scenario")
    p.add_argument("--first-gap", type=float, default=0.2)
    p.add_argument("--storm-pods", type=int, default=750)
    p.add_argument("--storm-roles", type=int, default=25, help="distinct roles among the storm's pods")
    p.add_argument("--storm-timeout", type=float, default=120)
    p.add_argument("--writers", type=int, default=8, help="API connections writing the storm's pods")
    p.add_argument("--request-timeout", type=float, default=30)
    p.add_argument("--settle", type=float, default=1.0, help="seconds between ready and the idle RSS")
    p.add_argument("--pause", type=float, default=0.5)
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--server-cpu-share", type=float, default=0.35,
                   help="cached runs: cap the agent at this share of one CPU (cgroup v1 cpu quota); 0 = no cap")
    p.add_argument("--no-kube2iam-warn", dest="kube2iam_warn", action="store_false",
                   help="skip the cached runs of kube2iam with --log-level=warn")
    p.add_argument("--iamlet-arg", action="append", default=[],
                   help="one more iamlet flag (repeatable), e.g. --iamlet-arg=--sts-rate-limit=10000")
    p.add_argument("--label", default="", help="a name for a variant run: in the file names and the section's title")
    p.add_argument("--only", default="", help="comma-separated parts: cached, first, storm")
    a = p.parse_args()
    if a.smoke:
        a.reps, a.duration, a.warmup, a.first_pods, a.storm_pods, a.storm_roles, a.settle, a.pause = 1, 1, 0.3, 3, 50, 5, 0.3, 0
    if not os.path.exists("/proc/self/ns/mnt") or os.geteuid() != 0:
        raise SystemExit("needs root: the agents run in mount namespaces of their own")
    parts = set(filter(None, a.only.split(","))) or {"cached", "first", "storm"}
    # Fields bench.environment() and bench's clients read.
    a.drivers = "uring,epoll"

    # A cap group of this script's own: bench.py's may be in use by another run.
    bench.CAP_GROUP = os.path.join(bench.CGROUP_CPU, "iamlet-kube2iam-server")
    work = tempfile.mkdtemp(prefix="iamlet-kube2iam-")
    ctx = Ctx()
    ctx.a, ctx.work, ctx.parts = a, work, parts

    def cleanup():
        bench.kill_all()
        bench.drop_cap()
        shutil.rmtree(work, ignore_errors=True)

    atexit.register(cleanup)
    if a.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in a.client_cpus.split(",")})
    results = {"environment": bench.environment(a), "smoke": a.smoke, "sessions": [],
               "kube2iam": json.load(open(a.kube2iam_info)),
               "settings": {k: v for k, v in vars(a).items() if k not in ("iamlet", "kube2iam", "kube2iam_info", "moto", "oha", "nginx", "out_dir")}}
    results["settings"]["parts"] = sorted(parts)
    # The last commit that changed what the iamlet binary is built from (the branch's own
    # commits touch only loadtest/).
    results["environment"]["iamlet_source_commit"] = bench.sh(
        "git log -1 --format=%h -- proxy resolver Cargo.toml Cargo.lock rust-toolchain.toml")
    log("work dir", work)
    t0 = time.time()

    log("control plane (tests/kube/start.sh)")
    ctx.kube = Kube(work, a.client_cpus)
    ctx.iamlet_kc, ctx.k2i_kc = setup_cluster(ctx.kube)
    results["environment"].update(versions(a, ctx.kube))

    ctx.pki, ctx.no_cas = make_pki(work)
    ctx.hosts = os.path.join(work, "hosts")
    with open(ctx.hosts, "w") as f:
        f.write("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {h}\n" for h in STS_HOSTS))
    ctx.resolv = os.path.join(work, "resolv.conf")
    with open(ctx.resolv, "w") as f:
        f.write("nameserver 127.0.0.1\n")

    moto_port = bench.free_port()
    moto = bench.start([a.moto, "-H", "127.0.0.1", "-p", str(moto_port)], os.path.join(work, "moto.log"), cpus=a.client_cpus)
    bench.wait_for(lambda: bench.http(moto_port, "/moto-api/")[0] == 200, "moto", proc=moto)
    ctx.front = start_tls_front(a, work, ctx.pki, moto_port)

    # The fake IMDS (bench.py's nginx); the agents only pass through to it, which is not measured.
    ctx.env = bench.Env(a, work)
    ctx.env.imds_port = ctx.imds_port = bench.free_port()
    imds = bench.start_upstream_nginx(ctx.env)
    bench.wait_for(lambda: bench.http(ctx.imds_port, bench.INSTANCE_ID)[0] == 200, "fake IMDS", proc=imds)
    results["environment"]["fake_imds"] = "nginx"

    if not a.smoke and a.server_cpu_share > 0:
        ctx.env.cap = bench.make_cap(a.server_cpu_share)
    results["environment"]["server_cpu_cap"] = a.server_cpu_share if ctx.env.cap else None

    index = 0
    for rep in range(a.reps):
        agents = AGENTS + ((QUIET,) if a.kube2iam_warn and "cached" in parts else ())
        order = agents[rep % len(agents):] + agents[:rep % len(agents)]
        for agent in order:
            results["sessions"].append(session(ctx, agent, rep, index, parts if agent != QUIET else {"cached"}))
            index += 1
            time.sleep(a.pause)

    results["wall_s"] = round(time.time() - t0, 1)
    results["environment"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    bench.kill_all()
    paths = write(results, a.out_dir, a.smoke)
    for pth in paths:
        log("wrote", os.path.relpath(pth, ROOT))
    for x in results["kube2iam_failures"]:
        log("kube2iam:", x)
    if results["problems"]:
        for x in results["problems"]:
            log("PROBLEM:", x)
        sys.exit(1)
    log("done in", results["wall_s"], "s")


if __name__ == "__main__":
    main()
