"""Upgrades under load: a pod asks for its role on a new connection per request, on a fixed
schedule (1,000 a second in the full run), through iamlet's DNAT rule, while iamlet is replaced
20 times in a row — once by the listener handover (`--handover-socket`: the new process takes the running
one's listening sockets, loads its pod list, accepts, and the old one drains and exits), once
by stop-start (SIGTERM, wait for the exit, start the new process; the rule stays, so the
connections in between are refused).

The rig is a node network namespace (iamlet with `--iptables`, the fake STS, and a metadata
service at 169.254.169.254:80 that answers with the node's own role, so a request that went
past iamlet shows as a leak) and a pod namespace behind a veth pair (`cali1` on the node side).
Each mode gets a fresh rig. This process opens no socket itself: the client, the metadata
service and the probes are this file's subcommands, started with `ip netns exec` into the
namespaces made here, and each refuses to run in the namespace it was started from. Every
namespace and process is removed when the mode ends (normally or not) and at exit, by name and
by PID; every loop is bounded in count and time.

Called from bench.py as the part `upgrade`, with bench itself as `bench` (its helpers and its
process list).
"""

import argparse
import atexit
import collections
import errno
import http.server
import json
import math
import os
import resource
import selectors
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import time

from report import esc, fmt, option, pct

POD_ROLE = "up-role"
NODE_ROLE = "node-role"
IFACE = "cali1"
NODE_IP = "10.201.0.1"
POD_IP = "10.201.0.2"
METADATA = "169.254.169.254"
APP_PORT = 8181
STS_PORT = 8555
LIST = "/latest/meta-data/iam/security-credentials/"
TIMEOUT_S = 1.0
BIN_S = 0.1
READY = "ready: the first pod list is published"
TOOK = "handover: took the running iamlet's listening sockets"
STOPPING = "handover: the new process accepts on our sockets; stopping"
MODES = ("handover", "stop-start")
KINDS = ("ok", "refused", "reset", "timeout", "closed", "status", "wrong_body", "leak", "error")
# Bounds on the orchestration's waits: a debug build on a busy machine starts in well under
# these, and a process past them is a failed upgrade, not a slow one.
START_WITHIN_S = 30.0
EXIT_WITHIN_S = 20.0
CMD_TIMEOUT_S = 30.0


def settings(a):
    """The command line's, else the full run's or the smoke's."""
    smoke = a.smoke

    def pick(name, full, short):
        return option(a, name, full, short)

    return {
        "upgrades": pick("upgrade_count", 20, 2),
        "rate": pick("upgrade_rate", 1000, 500),
        "gap_s": pick("upgrade_gap", 1.0, 0.3),
        "warmup_s": 0.5 if smoke else 2.0,
        "tail_s": 0.5 if smoke else 2.0,
        "workers": pick("upgrade_workers", 2, 2),
        "driver": pick("upgrade_driver", "epoll", "epoll"),
        "timeout_s": TIMEOUT_S,
    }


def own_netns():
    return os.readlink("/proc/self/ns/net")


def guard(starting_netns):
    """The subcommands open sockets; they must be inside a namespace made by the harness."""
    if not starting_netns or own_netns() == starting_netns:
        sys.exit("upgrade.py: refusing to run in the network namespace it was started from")


# ---------------------------------------------------------------- subcommand: client


class Req:
    __slots__ = ("sock", "t", "due", "reading", "buf", "done")


def kind_of_errno(e):
    if e == errno.ECONNREFUSED:
        return "refused"
    if e in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
        return "reset"
    if e == errno.ETIMEDOUT:
        return "timeout"
    return "error"


def classify(buf, expect, leak):
    """(kind, detail) of a whole answer read up to the server's close."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return "closed", f"{len(buf)} bytes before the close" if buf else "closed before an answer"
    head = buf[:end].decode("latin-1").split("\r\n")
    body = buf[end + 4:]
    length = None
    for line in head[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            try:
                length = int(v.strip())
            except ValueError:
                pass
    if length is not None:
        if len(body) < length:
            return "closed", f"{len(body)} of {length} body bytes before the close"
        body = body[:length]
    try:
        status = int(head[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        return "error", f"not HTTP: {head[0][:80]!r}"
    if leak in body:
        return "leak", f"status {status}: {body[:80].decode(errors='replace')!r}"
    if status != 200:
        return "status", f"status {status}"
    if body.strip() != expect:
        return "wrong_body", f"{body[:80].decode(errors='replace')!r}"
    return "ok", None


def client_main(args):
    """Open loop: request i goes out at t0 + i / rate whatever happened to the ones before, so
    an outage shows as failures, not as a client that waited. One event loop, non-blocking
    sockets: a slow answer holds back nothing, and no thread waits for the GIL."""
    guard(args.not_netns)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    host, port = args.target.rsplit(":", 1)
    addr = (host, int(port))
    raw = f"GET {args.path} HTTP/1.1\r\nHost: {METADATA}\r\nConnection: close\r\n\r\n".encode()
    expect, leak = args.expect.encode(), args.leak.encode()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    sel = selectors.EpollSelector()
    period = 1.0 / args.rate
    max_count = int(args.rate * args.max_seconds) + 1
    samples = []  # [start s since t0, latency ms, kind, ms behind schedule]
    details = []  # [sample index, detail] for failures, the first args.max_details
    order = collections.deque()  # in start order, so the oldest is the next to time out
    live = [0]
    ok_seen = [False]
    t0 = time.monotonic()
    t_end = t0 + args.max_seconds

    def finish(r, kind, detail=None):
        if r.done:
            return
        r.done = True
        if r.sock is not None:
            try:
                sel.unregister(r.sock)
            except (KeyError, ValueError):
                pass
            r.sock.close()
            r.sock = None
        live[0] -= 1
        now = time.monotonic()
        samples.append([round(r.t - t0, 4), round((now - r.t) * 1e3, 3), kind, round(max(0.0, r.t - r.due) * 1e3, 2)])
        if kind != "ok" and len(details) < args.max_details:
            details.append([len(samples) - 1, detail])
        if kind == "ok" and not ok_seen[0]:
            ok_seen[0] = True
            print("first ok", flush=True)

    def launch(due):
        r = Req()
        r.due, r.reading, r.buf, r.done, r.sock = due, False, b"", False, None
        r.t = time.monotonic()
        live[0] += 1
        order.append(r)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            finish(r, "error", f"socket: {e}")
            return
        s.setblocking(False)
        r.sock = s
        rc = s.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            finish(r, kind_of_errno(rc), f"connect: {errno.errorcode.get(rc, rc)}")
            return
        sel.register(s, selectors.EVENT_WRITE, r)

    def on_event(r):
        if r.done:
            return
        s = r.sock
        if not r.reading:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                finish(r, kind_of_errno(err), f"connect: {errno.errorcode.get(err, err)}")
                return
            try:
                # Far below the send buffer: one call sends it all, or fails.
                s.send(raw)
            except OSError as e:
                finish(r, kind_of_errno(e.errno or 0), f"send: {e}")
                return
            r.reading = True
            sel.modify(s, selectors.EVENT_READ, r)
            return
        try:
            chunk = s.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            finish(r, kind_of_errno(e.errno or 0), f"recv: {e}")
            return
        if chunk:
            r.buf += chunk
            if len(r.buf) > 65536:
                finish(r, "error", "answer over 64 KiB")
            return
        # Read to the server's close (the request says Connection: close): the server, not
        # this client, keeps TIME_WAIT, so a thousand connections a second cannot run the
        # pod out of ephemeral ports.
        finish(r, *classify(r.buf, expect, leak))

    def expire(now):
        while order and (order[0].done or now - order[0].t > args.timeout):
            r = order.popleft()
            if not r.done:
                finish(r, "timeout", f"no answer within {args.timeout:g} s")

    i = 0
    next_report = t0 + 1.0
    while not stop and i < max_count:
        now = time.monotonic()
        if now >= t_end:
            break
        while i < max_count and t0 + i * period <= now and live[0] < args.max_in_flight:
            launch(t0 + i * period)
            i += 1
        now = time.monotonic()
        wait = t0 + i * period - now
        if order:
            wait = min(wait, order[0].t + args.timeout - now)
        for key, _ in sel.select(max(0.0, min(wait, 0.05))):
            on_event(key.data)
        now = time.monotonic()
        expire(now)
        if now >= next_report:
            next_report += 1.0
            print(f"t={now - t0:.1f} sent={i} answered={len(samples)} in_flight={live[0]}", flush=True)
    # What is in flight finishes or times out; bounded by the timeout.
    drain_end = time.monotonic() + args.timeout + 0.5
    while live[0] > 0 and time.monotonic() < drain_end:
        for key, _ in sel.select(0.02):
            on_event(key.data)
        expire(time.monotonic())
    for r in list(order):
        finish(r, "timeout", "in flight at the end")
    out = {"t0": t0, "rate": args.rate, "sent": i, "samples": samples, "details": details}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, args.out)
    print(f"done: {len(samples)} requests", flush=True)


# ---------------------------------------------------------------- subcommand: imds


def imds_main(args):
    """The node's metadata service: the node's role, where only a request that went past
    iamlet can reach it."""
    guard(args.not_netns)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10

        def log_message(self, *a):
            pass

        def reply(self, status, body):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == LIST:
                self.reply(200, NODE_ROLE.encode())
            elif self.path == LIST + NODE_ROLE:
                self.reply(200, json.dumps({"Code": "Success", "AccessKeyId": "NODE-ROLE-LEAK",
                                            "SecretAccessKey": "x", "Token": "x",
                                            "Expiration": "2099-01-01T00:00:00Z"}).encode())
            else:
                self.reply(404, b"not found")

        def do_PUT(self):
            if self.path == "/latest/api/token":
                self.reply(200, b"AQAEAFakeNodeImdsToken==")
            else:
                self.reply(404, b"not found")

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    srv = Server((args.addr, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("listening", flush=True)
    srv.serve_forever(poll_interval=0.2)


# ---------------------------------------------------------------- subcommand: probe


def probe_main(args):
    """One GET, retried while the connection fails (a server still starting), for at most
    --wait seconds; prints {status, body, error}."""
    guard(args.not_netns)
    host, port = args.target.rsplit(":", 1)
    deadline = time.monotonic() + args.wait
    res = {"status": 0, "body": "", "error": None}
    for _ in range(10_000):
        try:
            with socket.create_connection((host, int(port)), timeout=2.0) as s:
                s.settimeout(2.0)
                s.sendall(f"GET {args.path} HTTP/1.1\r\nHost: {METADATA}\r\nConnection: close\r\n\r\n".encode())
                buf = b""
                while len(buf) < 65536:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            try:
                res = {"status": int(head.split(b" ", 2)[1]), "body": body.decode(errors="replace"), "error": None}
            except (IndexError, ValueError):
                res = {"status": 0, "body": "", "error": f"not HTTP: {buf[:80]!r}"}
            break
        except OSError as e:
            res = {"status": 0, "body": "", "error": f"{type(e).__name__}: {e}"}
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    print(json.dumps(res), flush=True)


# ---------------------------------------------------------------- the rig


class Rig:
    """One node namespace and one pod namespace, and the processes started in them."""

    def __init__(self, bench, env, tag):
        self.bench, self.env, self.a = bench, env, env.a
        pid = os.getpid()
        self.node = f"iamlet-up-node-{pid}-{tag}"
        self.pod = f"iamlet-up-pod-{pid}-{tag}"
        self.tag = tag
        self.host_netns = own_netns()
        self.made = []
        self.procs = []
        self.dir = os.path.join(env.work, f"upgrade-{tag}")
        os.makedirs(self.dir, exist_ok=True)
        self.pods = os.path.join(self.dir, "pods.json")
        # In its own directory: iamlet sets the directory's mode to 0700.
        self.sock = os.path.join(self.dir, "run", "handover.sock")
        atexit.register(self.close)

    def ip(self, *args):
        r = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=CMD_TIMEOUT_S)
        if r.returncode != 0:
            raise SystemExit(f"upgrade: ip {' '.join(args)}: {r.stderr.decode(errors='replace').strip()}")

    def build(self):
        for ns in (self.node, self.pod):
            self.ip("netns", "add", ns)
            self.made.append(ns)
            self.ip("-n", ns, "link", "set", "lo", "up")
        # Made inside the node namespace with its peer sent straight to the pod's: no link
        # ever exists in the host's namespace.
        self.ip("-n", self.node, "link", "add", IFACE, "type", "veth", "peer", "name", "eth0", "netns", self.pod)
        self.ip("-n", self.node, "addr", "add", f"{NODE_IP}/24", "dev", IFACE)
        self.ip("-n", self.node, "link", "set", IFACE, "up")
        self.ip("-n", self.node, "addr", "add", f"{METADATA}/32", "dev", "lo")
        self.ip("-n", self.pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        self.ip("-n", self.pod, "link", "set", "eth0", "up")
        self.ip("-n", self.pod, "route", "add", "default", "via", NODE_IP)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "up-pod", "namespace": "loadtest", "uid": "upgrade-pod",
                            "creationTimestamp": "2026-01-01T00:00:00Z",
                            "annotations": {"iam.amazonaws.com/role": POD_ROLE}},
               "spec": {"containers": [{"name": "app", "image": "x"}]},
               "status": {"phase": "Running", "podIP": POD_IP, "podIPs": [{"ip": POD_IP}]}}
        with open(self.pods, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "List", "items": [pod]}, f)

    def start(self, ns, cmd, name, cpus=None, env=None):
        logfile = os.path.join(self.dir, name + ".log")
        p = self.bench.start(["ip", "netns", "exec", ns, *cmd], logfile, cpus=cpus, env=env)
        p.logfile = logfile
        p.name = name
        self.procs.append(p)
        return p

    def me(self, sub, *args):
        return [sys.executable, os.path.abspath(__file__), sub, "--not-netns", self.host_netns, *args]

    def probe(self, ns, target, path, wait=0.0):
        cmd = ["ip", "netns", "exec", ns, *self.me("probe", "--target", target, "--path", path, "--wait", str(wait))]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=wait + CMD_TIMEOUT_S)
        try:
            return json.loads(r.stdout.decode().strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {"status": 0, "body": "", "error": f"probe failed: {r.stderr.decode(errors='replace')[-300:]}"}

    def forget(self, p):
        if p in self.procs:
            self.procs.remove(p)
        if p in self.bench.PROCS:
            self.bench.PROCS.remove(p)

    def close(self):
        """Processes first (by PID), then the namespaces: idempotent, for finally and atexit."""
        for p in reversed(self.procs):
            self.bench.stop(p)
        self.procs = []
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=CMD_TIMEOUT_S)
        self.made = []


def log_text(p):
    try:
        with open(p.logfile, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


class LogWatch:
    """Notices a line in a growing log file (reading only what is new each time)."""

    def __init__(self, p, text):
        self.p, self.text, self.pos, self.tail = p, text, 0, ""

    def seen(self):
        try:
            with open(self.p.logfile, "rb") as f:
                f.seek(self.pos)
                new = f.read()
        except OSError:
            return False
        self.pos += len(new)
        buf = self.tail + new.decode(errors="replace")
        if self.text in buf:
            return True
        self.tail = buf[-len(self.text):]
        return False


def tail_of(p, n=2000):
    return log_text(p)[-n:]


def iamlet_env():
    e = {k: v for k, v in os.environ.items()
         if not (k.startswith("IAMLET_") or k.startswith("AWS_") or k == "RUST_LOG")}
    e.update(AWS_REGION="us-east-1", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
             AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL_STS=f"http://127.0.0.1:{STS_PORT}")
    return e


def iamlet_args(rig, cfg, bench):
    return ["--iptables", f"--host-ip={NODE_IP}", f"--host-interface={IFACE}", f"--app-port={APP_PORT}",
            f"--metadata-addr={METADATA}", f"--pods-from={rig.pods}", f"--base-role-arn={bench.BASE_ARN}",
            f"--io-driver={cfg['driver']}", f"--workers={cfg['workers']}", "--log-level=info", "--sts-rate-limit=10000"]


def start_iamlet(rig, cfg, bench, n, handover):
    extra = [f"--handover-socket={rig.sock}"] if handover else []
    return rig.start(rig.node, [rig.a.iamlet, *iamlet_args(rig, cfg, bench), *extra], f"iamlet-{n:02d}",
                     cpus=rig.a.server_cpus, env=iamlet_env())


def wait_ready(p, timeout=START_WITHIN_S):
    """Monotonic time the ready line showed, or None (exited, or not within the bound)."""
    w = LogWatch(p, READY)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if w.seen():
            return time.monotonic()
        if p.poll() is not None:
            return time.monotonic() if w.seen() else None
        time.sleep(0.005)
    return None


def wait_exit(p, timeout=EXIT_WITHIN_S):
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def handover_once(rig, cfg, bench, old, n):
    up = {"n": n, "start": time.monotonic(), "ready": None, "old_exit": None, "old_exit_code": None,
          "took_sockets": False, "old_confirmed": False, "error": None}
    new = start_iamlet(rig, cfg, bench, n, handover=True)
    ready = LogWatch(new, READY)
    # Either may come first: the old process can finish draining before the new one logs
    # its last line. Both are watched, each time taken when first seen.
    deadline = time.monotonic() + START_WITHIN_S + EXIT_WITHIN_S
    while time.monotonic() < deadline and (up["ready"] is None or up["old_exit"] is None):
        if up["ready"] is None and ready.seen():
            up["ready"] = time.monotonic()
        if up["old_exit"] is None and old.poll() is not None:
            up["old_exit"] = time.monotonic()
            up["old_exit_code"] = old.returncode
        if up["ready"] is None and new.poll() is not None:
            up["error"] = f"the new iamlet exited {new.returncode} before it was ready: {tail_of(new)}"
            break
        time.sleep(0.005)
    up["took_sockets"] = TOOK in log_text(new)
    up["old_confirmed"] = STOPPING in log_text(old)
    if up["error"] is None:
        if up["ready"] is None:
            up["error"] = f"the new iamlet was not ready within the bound: {tail_of(new)}"
        elif up["old_exit"] is None:
            up["error"] = f"the old iamlet did not exit within {EXIT_WITHIN_S:g} s of the new one's start"
        elif up["old_exit_code"] != 0:
            up["error"] = f"the old iamlet exited {up['old_exit_code']}: {tail_of(old)}"
        elif not up["took_sockets"]:
            up["error"] = f"the new iamlet did not take the listening sockets: {tail_of(new)}"
    if up["old_exit"] is not None:
        rig.forget(old)
    up["end"] = max(x for x in (up["ready"], up["old_exit"], up["start"]) if x is not None)
    # A new process that died leaves the old one serving: that one is stopped at the end.
    return up, (old if new.poll() is not None and old.poll() is None else new)


def stop_start_once(rig, cfg, bench, old, n):
    up = {"n": n, "start": time.monotonic(), "ready": None, "old_exit": None, "old_exit_code": None, "error": None}
    old.send_signal(signal.SIGTERM)
    code = wait_exit(old)
    new = None
    if code is None:
        up["error"] = f"the old iamlet did not exit within {EXIT_WITHIN_S:g} s of SIGTERM"
    else:
        up["old_exit"] = time.monotonic()
        up["old_exit_code"] = code
        rig.forget(old)
        if code != 0:
            up["error"] = f"the old iamlet exited {code}: {tail_of(old)}"
        new = start_iamlet(rig, cfg, bench, n, handover=False)
        up["ready"] = wait_ready(new)
        if up["ready"] is None and up["error"] is None:
            up["error"] = f"the new iamlet was not ready: {tail_of(new)}"
    up["end"] = max(x for x in (up["ready"], up["old_exit"], up["start"]) if x is not None)
    return up, new or old


def run_mode(bench, env, cfg, mode):
    a = env.a
    rig = Rig(bench, env, "h" if mode == "handover" else "s")
    errors = []
    upgrades = []
    checks = {}
    out = os.path.join(rig.dir, "client.json")
    last_exit = None
    try:
        rig.build()
        if os.path.exists(a.tool):
            sts = rig.start(rig.node, [a.tool, "sts", "--addr", f"127.0.0.1:{STS_PORT}", "--latency-ms",
                                       str(a.fake_sts_latency_ms)], "sts", cpus=a.client_cpus)
            sts_what = f"fake STS ({a.fake_sts_latency_ms} ms)"
        elif a.moto:
            sts = rig.start(rig.node, [a.moto, "-H", "127.0.0.1", "-p", str(STS_PORT)], "sts", cpus=a.client_cpus)
            sts_what = "moto"
        else:
            raise SystemExit("upgrade: needs the fake STS (--tool) or moto (--moto)")
        imds = rig.start(rig.node, rig.me("imds", "--addr", METADATA, "--port", "80"), "imds", cpus=a.client_cpus)
        for what, p, target in (("STS", sts, f"127.0.0.1:{STS_PORT}"), ("metadata service", imds, f"{METADATA}:80")):
            r = rig.probe(rig.node, target, "/", wait=15.0)
            if r["error"]:
                raise SystemExit(f"upgrade: the {what} in {rig.node} does not answer: {r['error']}\n{tail_of(p)}")
        # Before any rule: the pod reaches the node's metadata service, so a request that ever
        # goes past iamlet would show as the node's role.
        r = rig.probe(rig.pod, f"{METADATA}:80", LIST, wait=5.0)
        checks["without_iamlet"] = r
        if r["status"] != 200 or r["body"].strip() != NODE_ROLE:
            errors.append(f"without iamlet the pod did not see the node's role ({r}): a leak would not show")
        cur = start_iamlet(rig, cfg, bench, 0, handover=(mode == "handover"))
        if wait_ready(cur) is None:
            raise SystemExit(f"upgrade: the first iamlet ({mode}) was not ready:\n{tail_of(cur, 3000)}")
        r = rig.probe(rig.pod, f"{METADATA}:80", LIST, wait=5.0)
        checks["with_iamlet"] = r
        if r["status"] != 200 or r["body"].strip() != POD_ROLE:
            raise SystemExit(f"upgrade: through the rule the pod got {r}, not {POD_ROLE}\n{tail_of(cur, 3000)}")
        total = cfg["warmup_s"] + cfg["upgrades"] * (cfg["gap_s"] + 5.0) + cfg["tail_s"] + 30.0
        client = rig.start(rig.pod, rig.me("client", "--target", f"{METADATA}:80", "--path", LIST, "--expect", POD_ROLE,
                                           "--leak", NODE_ROLE, "--rate", str(cfg["rate"]), "--max-seconds", str(total),
                                           "--timeout", str(cfg["timeout_s"]), "--out", out),
                           "client", cpus=a.client_cpus)
        first = LogWatch(client, "first ok")
        bench.wait_for(lambda: first.seen(), "upgrade: the client's first answer", timeout=15.0, proc=client,
                       logfile=client.logfile)
        time.sleep(cfg["warmup_s"])
        for n in range(1, cfg["upgrades"] + 1):
            if client.poll() is not None:
                errors.append(f"the client exited {client.returncode} during the upgrades: {tail_of(client)}")
                break
            once = handover_once if mode == "handover" else stop_start_once
            up, cur = once(rig, cfg, bench, cur, n)
            upgrades.append(up)
            if up["error"]:
                errors.append(f"upgrade {n}: {up['error']}")
                break
            if n < cfg["upgrades"]:
                time.sleep(cfg["gap_s"])
        time.sleep(cfg["tail_s"])
        client.send_signal(signal.SIGTERM)
        if wait_exit(client, timeout=cfg["timeout_s"] + 15) is None:
            errors.append("the client did not finish within its bound")
        cur.send_signal(signal.SIGTERM)
        last_exit = wait_exit(cur)
        if last_exit != 0:
            errors.append(f"the last iamlet exited {last_exit} on SIGTERM: {tail_of(cur)}")
    finally:
        rig.close()
    if not os.path.exists(out):
        raise SystemExit(f"upgrade ({mode}): the client wrote no results\n{errors}")
    with open(out) as f:
        data = json.load(f)
    res = summarize(mode, cfg, data, upgrades)
    res["rig_checks"] = checks
    res["sts"] = sts_what
    res["last_exit_code"] = last_exit
    res["errors"] = errors
    return res


def summarize(mode, cfg, data, upgrades):
    t0 = data["t0"]
    s = data["samples"]
    # The client's indices are in completion order: attach them before sorting by start.
    for i, d in data.get("details", []):
        s[i].append(d)
    s.sort(key=lambda x: x[0])
    kinds = collections.Counter(x[2] for x in s)
    failed = [x for x in s if x[2] != "ok"]
    lat_ok = [x[1] for x in s if x[2] == "ok"]
    span = (s[-1][0] - s[0][0]) if len(s) > 1 else 0.0
    tmax = max([x[0] for x in s[-1:]] + [0.0])
    # Whole bins only: the last one, cut short when the client stopped, would read as a drop.
    nb = max(1, int(tmax / BIN_S))
    ok_bins, fail_bins = [0] * nb, [0] * nb
    for x in s:
        t, kind = x[0], x[2]
        b = int(t / BIN_S)
        if b >= nb:
            continue
        if kind == "ok":
            ok_bins[b] += 1
        else:
            fail_bins[b] += 1
    ups = []
    for u in upgrades:
        v = {k: (round(u[k] - t0, 4) if k in ("start", "ready", "old_exit", "end") and u[k] is not None else u[k])
             for k in u}
        ups.append(v)
    # Each failure counts for the nearest upgrade (the timeline cut halfway between one
    # upgrade's end and the next one's start): a request queued just before a SIGTERM, or one
    # that timed out after the upgrade ended, still counts, and none counts twice.
    cuts = [(a["end"] + b["start"]) / 2 for a, b in zip(ups, ups[1:])]
    lo = [-math.inf] + cuts
    hi = cuts + [math.inf]
    for k, v in enumerate(ups):
        u = upgrades[k]
        v["failures"] = sum(1 for x in failed if lo[k] <= x[0] < hi[k])
        v["took_ms"] = round((u["end"] - u["start"]) * 1e3, 1)
        if mode == "stop-start" and u["ready"] is not None:
            v["no_listener_ms"] = round((u["ready"] - u["start"]) * 1e3, 1)
    took = [u["took_ms"] for u in ups if not u.get("error")]
    return {
        "mode": mode,
        "upgrades_planned": cfg["upgrades"],
        "upgrades": sum(1 for u in ups if not u.get("error")),
        "requests": len(s),
        "ok": kinds.get("ok", 0),
        "failed": len(failed),
        "failure_kinds": {k: kinds[k] for k in KINDS if k != "ok" and kinds.get(k)},
        "leaks": kinds.get("leak", 0),
        "duration_s": round(span, 3),
        "rate_target": cfg["rate"],
        "rps": round(len(s) / span, 1) if span else 0.0,
        "ok_rps": round(kinds.get("ok", 0) / span, 1) if span else 0.0,
        "p50_ms": pct(lat_ok, 0.5),
        "p99_ms": pct(lat_ok, 0.99),
        "p999_ms": pct(lat_ok, 0.999),
        "max_ms": max(lat_ok) if lat_ok else None,
        "max_any_ms": max((x[1] for x in s), default=None),
        "max_late_ms": max((x[3] for x in s), default=None),
        "late_over_10ms": sum(1 for x in s if x[3] > 10),
        "upgrade_ms_median": statistics.median(took) if took else None,
        "upgrade_ms_max": max(took) if took else None,
        "upgrade_list": ups,
        "series": {"bin_s": BIN_S, "ok": ok_bins, "failed": fail_bins},
        # [start s, kind, latency ms, detail]
        "failures": [[x[0], x[2], x[1], x[4] if len(x) > 4 else None] for x in failed[:200]],
    }


def blocker():
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    from shutil import which

    missing = [t for t in ("ip", "iptables") if not (which(t) or os.path.exists(f"/usr/sbin/{t}")
                                                     or os.path.exists(f"/sbin/{t}"))]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install iproute2 iptables)"
    return None


def run(env, results, bench):
    a = env.a
    cfg = settings(a)
    why = blocker()
    if why:
        bench.log(f"SKIPPED: upgrade: {why}")
        results["upgrade"] = {"skipped": why, "settings": cfg}
        return results["upgrade"]
    res = {"settings": cfg, "driver": cfg["driver"], "workers": cfg["workers"],
           "iamlet_profile": "debug" if "/debug/" in a.iamlet else "release",
           "rig": {"iface": IFACE, "node_ip": NODE_IP, "pod_ip": POD_IP, "metadata": f"{METADATA}:80",
                   "app_port": APP_PORT},
           # The handover mode adds --handover-socket=PATH.
           "iamlet_args": ["--iptables", f"--host-ip={NODE_IP}", f"--host-interface={IFACE}", f"--app-port={APP_PORT}",
                           f"--metadata-addr={METADATA}", f"--io-driver={cfg['driver']}", f"--workers={cfg['workers']}",
                           "--log-level=info", "--sts-rate-limit=10000"],
           "modes": {}}
    results["upgrade"] = res
    for mode in MODES:
        bench.log(f"upgrade {mode}: {cfg['upgrades']} upgrades under {cfg['rate']} req/s")
        m = res["modes"][mode] = run_mode(bench, env, cfg, mode)
        bench.log(f"upgrade {mode}: {m['upgrades']}/{m['upgrades_planned']} upgrades, {m['requests']} requests "
                  f"({m['rps']:.0f} req/s of {m['rate_target']}), failed {m['failed']} {m['failure_kinds']}, "
                  f"max {fmt(m['max_any_ms'], 1)} ms, upgrade median/max {fmt(m['upgrade_ms_median'])}/"
                  f"{fmt(m['upgrade_ms_max'])} ms" + (f"; errors: {m['errors']}" if m["errors"] else ""))
    return res


# ---------------------------------------------------------------- report


def problems(results):
    r = results.get("upgrade")
    if not r:
        return []
    if r.get("skipped"):
        # As the node tests: a missing piece is loud elsewhere, a failure in CI.
        return [f"upgrade: skipped in CI: {r['skipped']}"] if os.environ.get("CI") == "true" else []
    p = []
    for mode in MODES:
        m = r["modes"].get(mode)
        if m is None:
            p.append(f"upgrade {mode}: did not run")
            continue
        for e in m["errors"]:
            p.append(f"upgrade {mode}: {e[:500]}")
        if not m["requests"]:
            p.append(f"upgrade {mode}: no requests")
        if m["upgrades"] < m["upgrades_planned"]:
            p.append(f"upgrade {mode}: {m['upgrades']} of {m['upgrades_planned']} upgrades done")
        if m["leaks"]:
            p.append(f"upgrade {mode}: {m['leaks']} answers with the node's role")
        if mode == "handover" and m["failed"]:
            p.append(f"upgrade handover: {m['failed']} failed requests {m['failure_kinds']} "
                     f"{[f[:2] for f in m['failures'][:5]]}")
    return p


def markdown(results, svg_rel):
    r = results["upgrade"]
    cfg = r["settings"]
    L = []
    if r.get("skipped"):
        L.append(f"Upgrades under load: skipped ({r['skipped']}).")
        L.append("")
        return "\n".join(L) + "\n"
    L.append(f"Upgrades under load (`upgrade.py`; iamlet {r['iamlet_profile']} build, {r['driver']} driver, "
             f"{r['workers']} workers, `--iptables --host-interface={IFACE}` in a node network namespace). A pod "
             f"({POD_IP}, behind a veth pair) asks `GET {LIST}` at {cfg['rate']:,} requests a second on a schedule, "
             f"each on a new connection to {METADATA}:80 (the DNAT path), {cfg['timeout_s']:g} s timeout, while iamlet "
             f"is replaced {cfg['upgrades']} times in a row with {cfg['gap_s']:g} s of steady load between: "
             f"**handover** starts the new process with `--handover-socket` and waits for its `ready:` line and for "
             f"the old one's exit; **stop-start** sends SIGTERM, waits for the exit, starts the new one and waits for "
             f"`ready:`. The node's metadata service answers with the node's role, so a request that went past iamlet "
             f"counts as a leak. Chart: ![requests and failures per 100 ms during upgrades]({svg_rel})")
    L.append("")
    L.append("| mode | upgrades | requests | req/s (target) | failed | by kind | ok latency p50 / p99 / max ms | "
             "upgrade took median / max ms |")
    L.append("|---" * 8 + "|")
    for mode in MODES:
        m = r["modes"].get(mode)
        if not m:
            continue
        kinds = ", ".join(f"{k} {v:,}" for k, v in m["failure_kinds"].items()) or "–"
        L.append(f"| {mode} | {m['upgrades']} / {m['upgrades_planned']} | {m['requests']:,} | {fmt(m['rps'])} "
                 f"({m['rate_target']:,}) | **{m['failed']:,}** | {kinds} | {fmt(m['p50_ms'], 2)} / "
                 f"{fmt(m['p99_ms'], 2)} / {fmt(m['max_ms'], 1)} | {fmt(m['upgrade_ms_median'])} / "
                 f"{fmt(m['upgrade_ms_max'])} |")
    L.append("")
    h, s = r["modes"].get("handover"), r["modes"].get("stop-start")
    if h:
        per = [u["failures"] for u in h["upgrade_list"]]
        L.append(f"- Handover: an upgrade runs from the new process's start to the later of its `ready:` line and the "
                 f"old one's exit; failed requests per upgrade (each counted for the nearest upgrade) max "
                 f"{max(per) if per else '–'}.")
    if s:
        per = [u["failures"] for u in s["upgrade_list"]]
        gaps = [u["no_listener_ms"] for u in s["upgrade_list"] if u.get("no_listener_ms") is not None]
        if per:
            L.append(f"- Stop-start: failed requests per upgrade (each counted for the nearest upgrade) min / median / "
                     f"max {min(per)} / "
                     f"{fmt(statistics.median(per))} / {max(per)}; from SIGTERM to the new process's `ready:` "
                     f"median {fmt(statistics.median(gaps) if gaps else None)} ms, max {fmt(max(gaps) if gaps else None)} "
                     f"ms (the rule stays, so what arrives then is refused).")
    late = [m for m in (h, s) if m]
    if late:
        L.append("- Client: one event loop in the pod namespace, requests sent on schedule whatever the answers; most "
                 "behind schedule " + ", ".join(f"{m['mode']} {fmt(m['max_late_ms'], 1)} ms ({m['late_over_10ms']:,} "
                                                f"requests > 10 ms)" for m in late)
                 + ". Limits: zero failed requests with the handover, zero answers with the node's role in either "
                   "mode. " + ("No problems." if not problems(results) else
                               "Problems: " + "; ".join(problems(results)) + "."))
    L.append("")
    return "\n".join(L) + "\n"


def svg(results):
    r = results["upgrade"]
    modes = [m for m in MODES if m in r.get("modes", {})]
    W, left, right = 980, 70, 20
    ph, top0, gap = 200, 66, 80
    H = top0 + len(modes) * (ph + gap) - gap + 45
    pw = W - left - right
    tmax = max([len(r["modes"][m]["series"]["ok"]) * BIN_S for m in modes] + [1.0])

    def X(t):
        return left + pw * t / tmax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="18" font-size="12">Requests per {BIN_S * 1000:.0f} ms (by start; {r["settings"]["rate"]:,}/s, '
           f'a new connection each): blue answered, red failed, ▼ any failure; orange: upgrades</text>']
    for pi, mode in enumerate(modes):
        m = r["modes"][mode]
        ok, bad = m["series"]["ok"], m["series"]["failed"]
        top = top0 + pi * (ph + gap)
        ymax = nice(max([a + b for a, b in zip(ok, bad)] + [1]) * 1.15)

        def Y(v, top=top, ymax=ymax):
            return top + ph - ph * v / ymax

        for u in m["upgrade_list"]:
            x0, x1 = X(u["start"]), X(u["end"])
            out.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(1.5, x1 - x0):.1f}" height="{ph}" fill="#fde2c4">'
                       f'<title>upgrade {u["n"]}: {u["took_ms"]:.0f} ms, {u["failures"]} failed</title></rect>')
        out.append(f'<text x="{left}" y="{top - 14}" font-size="13" font-weight="bold">{esc(mode)}: {m["upgrades"]} '
                   f'upgrades, {m["requests"]:,} requests, {m["failed"]:,} failed</text>')
        step = ystep(ymax)
        v = 0
        while v <= ymax + 1e-9:
            y = Y(v)
            out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - right}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
            v += step
        bw = max(1.0, pw * BIN_S / tmax)
        bars, marks = [], []
        for i, b in enumerate(bad):
            if b:
                x = X(i * BIN_S)
                bars.append(f'<rect x="{x:.1f}" y="{Y(b):.1f}" width="{bw:.1f}" height="{ph - (Y(b) - top):.1f}"/>')
                marks.append(f'<path d="M{x + bw / 2 - 3:.1f},{top - 7}L{x + bw / 2 + 3:.1f},{top - 7}'
                             f'L{x + bw / 2:.1f},{top - 1}Z"><title>{b} failed at {i * BIN_S:.1f} s</title></path>')
        out.append('<polyline fill="none" stroke="#1f77b4" stroke-width="1.2" points="'
                   + " ".join(f"{X((i + 0.5) * BIN_S):.1f},{Y(v):.1f}" for i, v in enumerate(ok)) + '"/>')
        out.append('<g fill="#d62728">' + "".join(bars) + "".join(marks) + "</g>")
        out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
        tstep = 1 if tmax <= 15 else 5 if tmax <= 80 else 10
        t = 0
        while t <= tmax + 1e-9:
            x = X(t)
            out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#333"/>')
            out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{t:g}</text>')
            t += tstep
        out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32}" text-anchor="middle">seconds since the '
                   f'client started</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice(v):
    e = 10 ** math.floor(math.log10(max(v, 1e-9)))
    for k in (1, 2, 2.5, 5, 10):
        if k * e >= v:
            return k * e
    return 10 * e


def ystep(ymax):
    for k in (1, 2, 2.5, 5):
        e = 10 ** math.floor(math.log10(ymax / 5))
        if k * e * 6 >= ymax:
            return k * e
    return ymax / 5


# ---------------------------------------------------------------- subcommands


def main():
    p = argparse.ArgumentParser(description="the upgrade rig's programs (run inside its namespaces)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--path", required=True)
    c.add_argument("--expect", required=True)
    c.add_argument("--leak", required=True)
    c.add_argument("--rate", type=float, required=True)
    c.add_argument("--max-seconds", type=float, required=True)
    c.add_argument("--timeout", type=float, default=TIMEOUT_S)
    c.add_argument("--max-in-flight", type=int, default=2000)
    c.add_argument("--max-details", type=int, default=2000)
    c.add_argument("--out", required=True)
    i = sub.add_parser("imds")
    i.add_argument("--addr", required=True)
    i.add_argument("--port", type=int, default=80)
    q = sub.add_parser("probe")
    q.add_argument("--target", required=True)
    q.add_argument("--path", default="/")
    q.add_argument("--wait", type=float, default=0.0)
    for x in (c, i, q):
        x.add_argument("--not-netns", required=True, help="the namespace this must not run in")
    args = p.parse_args()
    {"client": client_main, "imds": imds_main, "probe": probe_main}[args.cmd](args)


if __name__ == "__main__":
    main()
