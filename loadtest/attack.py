"""Neighbour under attack: one pod (and a few unknown sources) attack iamlet while a neighbour
pod asks for its credentials 50 times a second, each time on a new connection.

Phases, one after another with quiet gaps between: (a) 10,000 connections from one pod, each
with a request whose answer is never read; (b) 50 small-window sockets pipelining /metrics
without reading; (c) 2,000 slowloris connections from ten sources; (d) an upstream that sends
`100 Continue` before every answer, with requests from the attacker (`Expect: 100-continue`)
and the neighbour alternating, each checked for its own answer; (e) a burst of 34 × 256
connections from sources that are not pods, each pipelining 512 requests and closing at once,
then how long iamlet keeps sockets for them; (f) a pass-through flood from the attacker pod
(HEADs on 8 keep-alive connections, bursts of 256 GETs on new connections) and how many
connections reach the metadata service.

Measured: the neighbour's latency and failures, iamlet's RSS (every 100 ms), and iamlet's own
counters after each phase. Standard library only; loopback only; every socket is closed at
the end of its phase and every loop is bounded in count and time. Called from bench.py with
bench itself as `bench` (its helpers and its process list), so nothing is started twice.
"""

import copy
import errno
import http.server
import json
import math
import os
import re
import resource
import selectors
import socket
import socketserver
import sys
import threading
import time

from report import esc, fmt, option, pct

MARKER = "UPSTREAM-MARKER"
ATTACKER = "127.0.0.11"
NEIGHBOUR = "127.0.0.12"
SLOW_SOURCES = [f"127.0.3.{i}" for i in range(1, 11)]
# Phase (e): sources that are not pods (write_pods knows 127.0.0.1, ATTACKER and NEIGHBOUR).
STRANGERS = [f"127.0.4.{i}" for i in range(1, 35)]
STRANGER_REQUEST = b"GET / HTTP/1.1\r\n\r\n"
# Phase (f): a pass-through path (forwarded to the marker upstream).
FLOOD_PATH = "/latest/meta-data/instance-id"
# iamlet's pass-through pool (proxy/src/upstream.rs MAX_CONNS): per worker, busy and idle.
UPSTREAM_PER_WORKER = 16
# Phase (e): sockets iamlet still holds for the departed strangers this long after the burst
# are a problem.
RELEASE_LIMIT_S = 5.0
ATTACKER_ROLE = "app-role"
NEIGHBOUR_ROLE = "other-role"
NEIGHBOUR_PATH = "/latest/meta-data/iam/security-credentials/" + NEIGHBOUR_ROLE
NEIGHBOUR_RATE = 50
# With port 0, bind() would pick the local port before the destination is known, so every
# connection from one source would need its own port; with this the port is picked at
# connect, per 4-tuple.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TCP_ESTABLISHED = 1
P99_LIMIT_MS = 100.0
RSS_LIMIT_KIB = 64 * 1024

COUNTERS = {
    "rejected_per_source": ("iamlet_connections_rejected_total", {"reason": "per_source"}),
    "rejected_worker_full": ("iamlet_connections_rejected_total", {"reason": "worker_full"}),
    "evicted": ("iamlet_connections_evicted_total", {}),
    "renders": ("iamlet_metrics_renders_total", {}),
    "write_stalled": ("iamlet_errors_total", {"class": "downstream", "kind": "write_stalled"}),
    "header_timeout": ("iamlet_errors_total", {"class": "downstream", "kind": "header_timeout"}),
    "rejected_strangers": ("iamlet_connections_rejected_total", {"reason": "strangers"}),
    "abandoned": ("iamlet_requests_abandoned_total", {}),
    "upstream_busy": ("iamlet_errors_total", {"class": "upstream", "kind": "upstream_busy"}),
    "upstream_opened": ("iamlet_upstream_connections_opened_total", {}),
}

PHASES = [
    ("a", "connections from one pod, answers never read"),
    ("b", "small-window sockets pipelining /metrics, never read"),
    ("c", "slowloris from 10 sources"),
    ("d", "upstream 100 Continue, attacker and neighbour alternating"),
    ("e", "pipelined burst from strangers, closed at once"),
    ("f", "pass-through flood from one pod"),
]


def settings(a):
    """Phase lengths and sizes: the command line's, else the full run's or the smoke's."""
    def pick(name, full, short):
        return option(a, name, full, short)

    return {
        "seconds": pick("attack_seconds", 10.0, 1.5),
        # At least --metrics-max-age past each phase, so the counters scraped then are a
        # fresh render that includes the whole phase.
        "quiet": pick("attack_quiet", 3.0, 1.2),
        "workers": pick("attack_workers", 2, 2),
        "conns": pick("attack_conns", 10_000, 2_000),
        "slowloris": pick("attack_slowloris", 2_000, 500),
        "scrapers": 50,
        "pipelined": 400,
        "pairs_max": 20_000,
        # (e): connections per stranger source (34 sources), requests pipelined on each
        # (512 × 18 bytes = 9 KiB).
        "stranger_conns": pick("attack_stranger_conns", 256, 32),
        "stranger_requests": 512,
        # (f): HEADs over `head_conns` keep-alive connections, and up to `bursts` bursts of
        # `burst` concurrent GETs, each on a new connection.
        "heads": pick("attack_heads", 4_000, 800),
        "head_conns": 8,
        "burst": 256,
        "bursts": pick("attack_bursts", 20, 2),
    }


# ---------------------------------------------------------------- marker upstream


class MarkerUpstream:
    """The metadata service iamlet forwards to: every answer names the request it answers,
    so an answer delivered to the wrong client is visible. With `interim` set it sends
    `100 Continue` before every answer, unasked. HTTP/1.1 with keep-alive, so iamlet can pool
    its connections; it counts the connections it accepts and the most open at once."""

    def __init__(self):
        self.interim = False
        self.requests = 0
        self.expect_seen = 0
        self.heads_seen = 0
        self.accepted = 0
        self.open = 0
        self.peak = 0  # most open at once since the last `mark`
        self.lock = threading.Lock()
        up = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # an idle pooled connection's thread ends eventually, iamlet or not

            def setup(self):
                with up.lock:
                    up.accepted += 1
                    up.open += 1
                    up.peak = max(up.peak, up.open)
                super().setup()
                # The interim answer, the head and the body go out as separate writes (so the
                # 100 arrives on its own, as from a real upstream); without this, Nagle holds
                # each behind iamlet's delayed ACK of the previous one.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def finish(self):
                try:
                    super().finish()
                finally:
                    with up.lock:
                        up.open -= 1

            def handle_expect_100(self):
                return True  # whether a 100 goes out is `interim`'s choice, not the client's

            def log_message(self, *args):
                pass

            def answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(min(n, 65536))
                with up.lock:
                    up.requests += 1
                    if self.headers.get("Expect") is not None:
                        up.expect_seen += 1
                    if self.command == "HEAD":
                        up.heads_seen += 1
                if up.interim:
                    self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                extra = {}
                if self.command == "PUT" and self.path == "/latest/api/token":
                    body = b"AQAEAFakeMarkerUpstreamToken000000000000000000000000000=="
                    ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                    if ttl:
                        extra["X-Aws-Ec2-Metadata-Token-Ttl-Seconds"] = ttl
                else:
                    body = f"{MARKER} {self.command} {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            # iamlet relays a HEAD as a GET (so its connection pools); a HEAD arriving here is
            # counted (`heads_seen`) and answered as one.
            do_GET = do_PUT = do_POST = do_HEAD = answer

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def mark(self):
        """Starts a window: (connections accepted so far, requests so far); the peak restarts
        from the connections open now."""
        with self.lock:
            self.peak = self.open
            return self.accepted, self.requests

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- clients


def new_socket(src, blocking=True, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    except OSError:
        pass
    if rcvbuf:
        # Before connect: the window advertised in the handshake is what the agent sees.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(blocking)
    s.bind((src, 0))
    return s


def parse_response(buf, eof=False):
    """(status, body, interim answers skipped) once `buf` holds a whole final answer, else None."""
    pos, interim = 0, 0
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return None
        lines = buf[pos:end].decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            return (-1, buf[pos:], interim)
        if 100 <= status < 200:
            interim += 1
            pos = end + 4
            continue
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        start = end + 4
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(buf) - start < n:
                return None
            return (status, buf[start:start + n], interim)
        return (status, buf[start:], interim) if eof else None


def request_from(src, port, raw, timeout=3.0):
    """One request on a new connection from `src`: (status, body, interim, error)."""
    deadline = time.monotonic() + timeout
    s = None
    try:
        s = new_socket(src)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(raw)
        buf = b""
        while True:
            r = parse_response(buf)
            if r:
                return (*r, None)
            left = deadline - time.monotonic()
            if left <= 0:
                return (0, b"", 0, "timed out")
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                r = parse_response(buf, eof=True)
                return (*r, None) if r else (0, b"", 0, "closed before an answer")
            buf += chunk
    except OSError as e:
        return (0, b"", 0, f"{type(e).__name__}: {e}")
    finally:
        if s is not None:
            s.close()


def get(path, extra=""):
    return f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}Connection: close\r\n\r\n".encode()


class Neighbour:
    """50 requests a second on schedule, each on a new connection from the neighbour pod. A few
    threads share the schedule so one slow answer does not hold back the ones due after it;
    `late_ms` says how far behind schedule a request went out when they were all busy."""

    def __init__(self, port, t0, threads=8, timeout=3.0):
        self.port, self.t0, self.timeout = port, t0, timeout
        self.samples = []  # [t_s, latency_ms, status, error, late_ms]
        self.lock = threading.Lock()
        self.next = 0
        self.stop_evt = threading.Event()
        self.raw = get(NEIGHBOUR_PATH)
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()

    def loop(self):
        while not self.stop_evt.is_set():
            with self.lock:
                i = self.next
                self.next += 1
            due = self.t0 + i / NEIGHBOUR_RATE
            wait = due - time.monotonic()
            if wait > 0 and self.stop_evt.wait(wait):
                return
            t = time.monotonic()
            status, body, _, err = request_from(NEIGHBOUR, self.port, self.raw, self.timeout)
            lat = (time.monotonic() - t) * 1e3
            if err is None and (status != 200 or b"AccessKeyId" not in body):
                err = f"status {status}: {body[:120].decode(errors='replace')}"
            with self.lock:
                self.samples.append([round(t - self.t0, 4), round(lat, 3), status, err, round(max(0.0, t - due) * 1e3, 1)])

    def stop(self):
        self.stop_evt.set()
        for t in self.threads:
            t.join(self.timeout + 2)


class RssSampler:
    def __init__(self, bench, pid, t0, every=0.1):
        self.bench, self.pid, self.t0, self.every = bench, pid, t0, every
        self.samples = []  # [t_s, VmRSS KiB]
        self.stop_evt = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def start(self):
        self.thread.start()

    def loop(self):
        while True:
            self.samples.append([round(time.monotonic() - self.t0, 3), self.bench.status_kib(self.pid, "VmRSS")])
            if self.stop_evt.wait(self.every):
                return

    def stop(self):
        self.stop_evt.set()
        self.thread.join(2)


# ---------------------------------------------------------------- attacks


class Held:
    """Attack connections: non-blocking, opened with a bounded number of connects in flight, so
    a backlog that drops SYNs stalls no thread; what a socket could not send at once is
    retried while the phase lasts."""

    def __init__(self, port):
        self.port = port
        self.conns = []  # [socket, bytes not yet sent]
        self.connect_failures = 0
        self.send_errors = 0
        self.bytes_sent = 0

    def open(self, n, sources, payload, deadline, rcvbuf=None, in_flight=256, connect_timeout=1.0):
        sel = selectors.DefaultSelector()
        started = 0
        try:
            while (started < n or sel.get_map()) and time.monotonic() < deadline:
                while started < n and len(sel.get_map()) < in_flight:
                    src = sources[started % len(sources)]
                    started += 1
                    try:
                        s = new_socket(src, blocking=False, rcvbuf=rcvbuf)
                    except OSError:
                        self.connect_failures += 1
                        continue
                    rc = s.connect_ex(("127.0.0.1", self.port))
                    if rc not in (0, errno.EINPROGRESS):
                        s.close()
                        self.connect_failures += 1
                        continue
                    sel.register(s, selectors.EVENT_WRITE, time.monotonic())
                now = time.monotonic()
                for key, _ in sel.select(timeout=0.02):
                    s = key.fileobj
                    sel.unregister(s)
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        s.close()
                        self.connect_failures += 1
                        continue
                    c = [s, payload]
                    self.conns.append(c)
                    self.push(c)
                for key in list(sel.get_map().values()):
                    if now - key.data > connect_timeout:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
                        self.connect_failures += 1
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
                self.connect_failures += 1
            sel.close()

    def push(self, c, data=None):
        s = c[0]
        if s is None:
            return
        if data:
            c[1] = c[1] + data
        if not c[1]:
            return
        try:
            n = s.send(c[1])
            self.bytes_sent += n
            c[1] = c[1][n:]
        except BlockingIOError:
            pass
        except OSError:
            # The agent closed it (RST on the second write after its close).
            self.send_errors += 1
            s.close()
            c[0] = None

    def hold(self, deadline, dribble=None, every=0.5):
        """Until `deadline`: keeps pushing unsent bytes; with `dribble`, sends it on every
        connection each `every` seconds."""
        nxt = time.monotonic() + every
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            if dribble and now >= nxt:
                nxt += every
                for c in self.conns:
                    self.push(c, dribble)
            for c in self.conns:
                if c[1]:
                    self.push(c)
            time.sleep(max(0.0, min(0.1, deadline - now)))

    def close(self):
        """Closes everything; returns how many were still established (not closed by the agent)."""
        open_ = 0
        for c in self.conns:
            s = c[0]
            if s is None:
                continue
            try:
                if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED:
                    open_ += 1
            except OSError:
                pass
            s.close()
        n = len(self.conns)
        self.conns = []
        return {"opened": n, "connect_failures": self.connect_failures, "still_open_at_end": open_,
                "closed_by_agent": n - open_, "bytes_sent": self.bytes_sent}


def hold_open(ctx, deadline, n, sources, payload, rcvbuf=None, dribble=None):
    """n connections from sources, each sending payload (then dribble every 0.5 s), held
    until deadline and then closed; what the holding saw."""
    h = Held(ctx["port"])
    try:
        h.open(n, sources, payload, deadline, rcvbuf=rcvbuf)
        h.hold(deadline, dribble=dribble)
    finally:
        res = h.close()
    return res


def attack_conns(ctx, deadline):
    return hold_open(ctx, deadline, ctx["cfg"]["conns"], [ATTACKER],
                     b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: x\r\n\r\n")


def attack_scrapes(ctx, deadline):
    return hold_open(ctx, deadline, ctx["cfg"]["scrapers"], [ATTACKER],
                     b"GET /metrics HTTP/1.1\r\n\r\n" * ctx["cfg"]["pipelined"], rcvbuf=4096)


def attack_slowloris(ctx, deadline):
    return hold_open(ctx, deadline, ctx["cfg"]["slowloris"], SLOW_SOURCES,
                     b"GET /latest/meta-data/ HTTP/1.1\r\nX-a: ", dribble=b"a")


def attack_interim(ctx, deadline):
    port, up = ctx["port"], ctx["upstream"]
    pairs = mismatches = errors = interim_seen = 0
    examples = []
    up.interim = True
    expect0 = up.expect_seen
    try:
        while pairs < ctx["cfg"]["pairs_max"] and time.monotonic() < deadline:
            for src, path, extra in ((ATTACKER, f"/latest/meta-data/a-{pairs}", "Expect: 100-continue\r\n"),
                                     (NEIGHBOUR, f"/latest/meta-data/b-{pairs}", "")):
                status, body, interim, err = request_from(src, port, get(path, extra))
                interim_seen += interim
                want = f"{MARKER} GET {path}".encode()
                if err is not None or status != 200:
                    errors += 1
                    if len(examples) < 5:
                        examples.append(f"{src} {path}: {err or status}")
                elif body != want:
                    mismatches += 1
                    if len(examples) < 5:
                        examples.append(f"{src} {path}: got {body[:100].decode(errors='replace')!r}")
            pairs += 1
        # Past the count bound the phase still lasts its time, so phases compare.
        time.sleep(max(0.0, deadline - time.monotonic()))
    finally:
        up.interim = False
    return {"pairs": pairs, "mismatches": mismatches, "errors": errors, "interim_seen_by_clients": interim_seen,
            "expect_forwarded": up.expect_seen - expect0, "examples": examples}


def burst_and_close(port, sources, per_source, payload, deadline, in_flight=256, timeout=3.0):
    """per_source connections from each of `sources` (round robin, at most `in_flight`
    unfinished at once): each sends `payload` and is closed as soon as it has, reading
    nothing. Bounded by `deadline`, and each connection by `timeout`."""
    n = per_source * len(sources)
    sel = selectors.DefaultSelector()
    started = sent = connect_failures = send_errors = unfinished = 0
    try:
        while (started < n or sel.get_map()) and time.monotonic() < deadline:
            while started < n and len(sel.get_map()) < in_flight:
                src = sources[started % len(sources)]
                started += 1
                try:
                    s = new_socket(src, blocking=False)
                except OSError:
                    connect_failures += 1
                    continue
                rc = s.connect_ex(("127.0.0.1", port))
                if rc not in (0, errno.EINPROGRESS):
                    s.close()
                    connect_failures += 1
                    continue
                # [started at, bytes left to send; None while connecting]
                sel.register(s, selectors.EVENT_WRITE, [time.monotonic(), None])
            for key, _ in sel.select(timeout=0.02):
                s, st = key.fileobj, key.data
                if st[1] is None:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        sel.unregister(s)
                        s.close()
                        connect_failures += 1
                        continue
                    st[1] = memoryview(payload)
                try:
                    st[1] = st[1][s.send(st[1]):]
                except BlockingIOError:
                    continue
                except OSError:
                    # Closed by iamlet at accept (a stranger past its share) before all was sent.
                    sel.unregister(s)
                    s.close()
                    send_errors += 1
                    continue
                if not st[1]:
                    sel.unregister(s)
                    s.close()
                    sent += 1
            now = time.monotonic()
            for key in list(sel.get_map().values()):
                if now - key.data[0] > timeout:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    if key.data[1] is None:
                        connect_failures += 1
                    else:
                        send_errors += 1
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
            unfinished += 1
        sel.close()
    return {"planned": n, "started": started, "sent": sent, "connect_failures": connect_failures,
            "send_errors": send_errors, "unfinished": unfinished}


def proc_hex(ip):
    """An IPv4 address as /proc/net/tcp writes it (the 32-bit value in host byte order)."""
    return "%08X" % int.from_bytes(socket.inet_aton(ip), sys.byteorder)


def sockets_for(pid, port, peers_hex):
    """(held, queued) for TCP peers in `peers_hex`: sockets that are descriptors of `pid`, and
    connections to `port` still in the listen queue (not accepted yet: no descriptor, state
    ESTABLISHED or CLOSE_WAIT); None when /proc cannot be read."""
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            table = f.read()
    except OSError:
        return None
    inodes, queued = [], 0
    for line in table.splitlines()[1:]:
        # The remote address first (a cheap split: most lines are someone else's), then the rest.
        head = line.split(None, 3)
        if len(head) < 4 or head[2].split(":")[0] not in peers_hex:
            continue
        cols = line.split()
        if len(cols) < 10:
            continue
        if cols[9] != "0":
            inodes.append(cols[9])
        elif cols[3] in ("01", "08") and int(cols[1].split(":")[1], 16) == port:
            queued += 1
    held = 0
    if inodes:
        mine = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    mine.add(link[8:-1])
        except OSError:
            return None
        held = sum(1 for i in inodes if i in mine)
    return held, queued


def attack_strangers(ctx, deadline):
    """(e): the burst (bounded by the phase's time, at least 3 s), then the phase's length
    again with the neighbour alone, watching (every 50 ms, bounded) until iamlet holds no
    socket for the strangers. Its end is its own: burst end + `seconds` (or the watch's end)."""
    cfg = ctx["cfg"]
    payload = STRANGER_REQUEST * cfg["stranger_requests"]
    peers = {proc_hex(ip) for ip in STRANGERS}
    t_start = time.monotonic()
    b = burst_and_close(ctx["port"], STRANGERS, cfg["stranger_conns"], payload, max(deadline, t_start + 3.0))
    t_end = time.monotonic()
    watch_until = t_end + max(cfg["seconds"], RELEASE_LIMIT_S + 1.0)
    # release_s: when the first reading that found nothing began (0 when the one taken at
    # the burst's end did); a reading takes `read_ms_max` at most.
    first = last = most = None
    release_s = None
    read_ms = 0.0
    while True:
        t_read = time.monotonic()
        last = sockets_for(ctx["pid"], ctx["port"], peers)
        read_ms = max(read_ms, (time.monotonic() - t_read) * 1e3)
        if last is None:
            break
        if first is None:
            first = most = last
        elif sum(last) > sum(most):
            most = last
        if last == (0, 0):
            release_s = t_read - t_end
            break
        if time.monotonic() >= watch_until:
            break
        time.sleep(0.05)
    watched = time.monotonic() - t_end
    time.sleep(max(0.0, t_end + cfg["seconds"] - time.monotonic()))
    return {**b, "sources": len(STRANGERS), "per_source": cfg["stranger_conns"], "payload_bytes": len(payload),
            "requests_each": cfg["stranger_requests"], "burst_s": round(t_end - t_start, 3),
            "at_burst_end": first, "most_after": most, "at_watch_end": last,
            "release_s": None if release_s is None else round(release_s, 3), "read_ms_max": round(read_ms, 1),
            "watched_s": round(watched, 3)}


class Tally:
    """Answers by status: 200, 503, other statuses, errors (no answer: timeout, reset, close)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"sent": 0, "200": 0, "503": 0, "other": 0, "errors": 0}
        self.other = {}
        self.examples = []

    def add(self, status=None, err=None):
        with self.lock:
            if err is not None:
                self.counts["errors"] += 1
                if len(self.examples) < 5:
                    self.examples.append(err)
            elif status in (200, 503):
                self.counts[str(status)] += 1
            else:
                self.counts["other"] += 1
                self.other[str(status)] = self.other.get(str(status), 0) + 1

    def sent(self):
        with self.lock:
            self.counts["sent"] += 1

    def result(self):
        with self.lock:
            return {**self.counts, "other_statuses": dict(self.other), "examples": list(self.examples)}


def head_loop(port, n, deadline, tally, odd, timeout=3.0):
    """Up to n HEADs one after another on a keep-alive connection from the attacker (a new
    one after an error or a close), until `deadline`. An answer with bytes after its head
    (a body on a HEAD answer) is counted in `odd` and the connection replaced, as a client
    would have to."""
    raw = f"HEAD {FLOOD_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode()
    s = None
    try:
        for _ in range(n):
            if time.monotonic() >= deadline:
                return
            try:
                if s is None:
                    s = new_socket(ATTACKER)
                    s.settimeout(timeout)
                    s.connect(("127.0.0.1", port))
                    with tally.lock:
                        odd["connections"] += 1
                tally.sent()
                until = time.monotonic() + timeout
                s.settimeout(timeout)
                s.sendall(raw)
                buf = b""
                while b"\r\n\r\n" not in buf and len(buf) < 65536:
                    left = until - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("no answer in time")
                    s.settimeout(left)
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed before an answer")
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                try:
                    status = int(lines[0].split(" ", 2)[1]) if lines[0].startswith("HTTP/") else -1
                except (IndexError, ValueError):
                    status = -1
                tally.add(status)
                if status == -1 or rest:
                    with tally.lock:
                        odd["head_answers_with_body"] += 1
                        if len(odd["examples"]) < 3:
                            odd["examples"].append(buf[:300].decode("latin-1"))
                    s.close()
                    s = None
                elif any(x.lower().replace(" ", "") == "connection:close" for x in lines[1:]):
                    s.close()
                    s = None
            except OSError as e:
                tally.add(err=f"HEAD: {type(e).__name__}: {e}")
                if s is not None:
                    s.close()
                s = None
    finally:
        if s is not None:
            s.close()


def get_burst(port, n, tally, timeout=3.0):
    """n GETs at once from the attacker, each on a new connection (Connection: close), read to
    their answers; bounded by `timeout` (iamlet's own upstream bounds are 1 s to get a
    connection, 3 s for the answer)."""
    raw = get(FLOOD_PATH)
    sel = selectors.DefaultSelector()
    end = time.monotonic() + timeout
    try:
        for _ in range(n):
            try:
                s = new_socket(ATTACKER, blocking=False)
            except OSError as e:
                tally.add(err=f"GET socket: {e}")
                continue
            rc = s.connect_ex(("127.0.0.1", port))
            if rc not in (0, errno.EINPROGRESS):
                s.close()
                tally.add(err=f"GET connect: {os.strerror(rc)}")
                continue
            tally.sent()
            sel.register(s, selectors.EVENT_WRITE, [memoryview(raw), b""])
        while sel.get_map() and time.monotonic() < end:
            for key, ev in sel.select(timeout=0.05):
                s, st = key.fileobj, key.data
                try:
                    if st[0] is not None:
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, os.strerror(err))
                        st[0] = st[0][s.send(st[0]):]
                        if not st[0]:
                            st[0] = None
                            sel.modify(s, selectors.EVENT_READ, st)
                        continue
                    chunk = s.recv(65536)
                    st[1] += chunk
                    r = parse_response(st[1], eof=not chunk)
                    if r is None and chunk:
                        continue
                    sel.unregister(s)
                    s.close()
                    if r is None:
                        tally.add(err="GET: closed before an answer")
                    else:
                        tally.add(r[0])
                except BlockingIOError:
                    continue
                except OSError as e:
                    sel.unregister(s)
                    s.close()
                    tally.add(err=f"GET: {type(e).__name__}: {e}")
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
            tally.add(err="GET: no answer in time")
        sel.close()


def attack_flood(ctx, deadline):
    """(f): HEADs over keep-alive connections (threads) and, meanwhile, bursts of GETs on new
    connections, all from the attacker pod to a pass-through path; the marker upstream counts
    the connections iamlet opens to it."""
    cfg, port, up = ctx["cfg"], ctx["port"], ctx["upstream"]
    accepted0, requests0 = up.mark()
    heads, gets = Tally(), Tally()
    odd = {"connections": 0, "head_answers_with_body": 0, "examples": []}
    per = -(-cfg["heads"] // cfg["head_conns"])
    threads = [threading.Thread(target=head_loop, args=(port, per, deadline, heads, odd), daemon=True)
               for _ in range(cfg["head_conns"])]
    for t in threads:
        t.start()
    bursts = 0
    try:
        while bursts < cfg["bursts"] and time.monotonic() < deadline:
            get_burst(port, cfg["burst"], gets)
            bursts += 1
    finally:
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 5.0)
    with up.lock:
        accepted, peak, upstream_requests, heads_seen = up.accepted - accepted0, up.peak, up.requests - requests0, up.heads_seen
    time.sleep(max(0.0, deadline - time.monotonic()))
    h, g = heads.result(), gets.result()
    return {"requests": h["sent"] + g["sent"], "heads": h, "gets": g, "bursts": bursts,
            "head_connections": odd["connections"], "head_answers_with_body": odd["head_answers_with_body"],
            "head_examples": odd["examples"],
            "status": {k: h[k] + g[k] for k in ("200", "503", "other", "errors")},
            "upstream_accepted": accepted, "upstream_peak_open": peak, "upstream_requests": upstream_requests,
            "upstream_heads_seen": heads_seen, "upstream_cap": ctx["workers"] * UPSTREAM_PER_WORKER,
            "still_alive": sum(t.is_alive() for t in threads)}


ATTACKS = {"a": attack_conns, "b": attack_scrapes, "c": attack_slowloris, "d": attack_interim,
           "e": attack_strangers, "f": attack_flood}


# ---------------------------------------------------------------- metrics


def scrape(bench, port):
    st, body = bench.http(port, "/metrics", timeout=5.0)
    if st != 200:
        return None
    samples = []
    for line in body.decode(errors="replace").splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        try:
            samples.append((m.group(1), labels, float(m.group(3))))
        except ValueError:
            pass
    out = {}
    for key, (name, want) in COUNTERS.items():
        out[key] = sum(v for n, labels, v in samples if n == name and all(labels.get(k) == x for k, x in want.items()))
    return out


# ---------------------------------------------------------------- run


def window_stats(neigh, rss, t_from, t_to):
    s = [x for x in neigh if t_from <= x[0] < t_to]
    lats = [x[1] for x in s if x[3] is None]
    fails = [x for x in s if x[3] is not None]
    r = [k for t, k in rss if t_from <= t <= t_to]
    kinds = {}
    for x in fails:
        kinds[x[3]] = kinds.get(x[3], 0) + 1
    return {
        "requests": len(s),
        "failures": len(fails),
        "failure_kinds": kinds,
        "p50_ms": pct(lats, 0.5),
        "p99_ms": pct(lats, 0.99),
        "max_ms": max(lats) if lats else None,
        "max_late_ms": max((x[4] for x in s), default=None),
        "max_rss_kib": max(r) if r else None,
    }


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def write_pods(path, local_role):
    def pod(name, ip, role):
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "loadtest", "uid": f"attack-{name}",
                             "creationTimestamp": "2026-01-01T00:00:00Z", "annotations": {"iam.amazonaws.com/role": role}},
                "spec": {"containers": [{"name": "app", "image": "x"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}

    # The pod at 127.0.0.1 is the one bench.start_iamlet waits for credentials as.
    items = [pod("loadtest-local", "127.0.0.1", local_role), pod("attacker", ATTACKER, ATTACKER_ROLE),
             pod("neighbour", NEIGHBOUR, NEIGHBOUR_ROLE)]
    with open(path, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)


def run(env, results, bench):
    a = env.a
    cfg = settings(a)
    soft, hard = raise_nofile()
    need = cfg["conns"] + cfg["slowloris"] + 200
    if soft < need:
        bench.log(f"attack: RLIMIT_NOFILE {soft} < {need}; the connection phases open what they can")
    up = MarkerUpstream()
    pods = os.path.join(env.work, "attack-pods.json")
    write_pods(pods, bench.ROLE)
    # Its own upstream and worker count; everything else as bench starts iamlet elsewhere.
    e2 = copy.copy(env)
    e2.a = copy.copy(a)
    e2.a.workers = cfg["workers"]
    e2.imds_port = up.port
    srv = neigh = rss = None
    switch = sys.getswitchinterval()

    def has_credentials(src, role):
        st, body, _, _ = request_from(src, srv.port, get("/latest/meta-data/iam/security-credentials/" + role))
        return st == 200 and b"AccessKeyId" in body

    try:
        srv = bench.start_iamlet(e2, a.scale_driver, pods, extra=("--metrics-max-age=1s",), name="attack")
        port = srv.port
        for src, role in ((NEIGHBOUR, NEIGHBOUR_ROLE), (ATTACKER, ATTACKER_ROLE)):
            bench.wait_for(lambda: has_credentials(src, role), f"iamlet credentials for {role} from {src}",
                           proc=srv, logfile=srv.logfile)
        # The attack threads hold the GIL in bursts; a short switch interval keeps the
        # neighbour's threads from queueing behind them for the default 5 ms.
        sys.setswitchinterval(0.0005)
        t0 = time.monotonic()
        neigh = Neighbour(port, t0)
        rss = RssSampler(bench, srv.pid, t0)
        rss.start()
        neigh.start()
        ctx = {"port": port, "upstream": up, "cfg": cfg, "pid": srv.pid, "workers": cfg["workers"]}
        phases = []
        time.sleep(cfg["quiet"])
        before = scrape(bench, port)
        baseline_end = time.monotonic() - t0
        for pid_, title in PHASES:
            start = time.monotonic() - t0
            stats = ATTACKS[pid_](ctx, t0 + start + cfg["seconds"])
            end = time.monotonic() - t0
            time.sleep(max(0.0, cfg["quiet"] - (time.monotonic() - t0 - end)))
            after = scrape(bench, port)
            delta = {k: after[k] - before[k] for k in after} if after and before else None
            phases.append({"id": pid_, "title": title, "start_s": round(start, 3), "end_s": round(end, 3),
                           "attack": stats, "counters_after": after, "counters_delta": delta})
            before = after
            bench.log(f"attack phase {pid_} ({title}): {json.dumps(stats)}; counters {json.dumps(delta)}")
        total = time.monotonic() - t0
    finally:
        for x in (neigh, rss):
            if x is not None:
                x.stop()
        sys.setswitchinterval(switch)
        if srv is not None:
            bench.stop(srv)
        up.close()
    ns, rs = neigh.samples, rss.samples
    ns.sort(key=lambda x: x[0])
    quiet = {"id": "quiet", "title": "quiet, before the first phase", "start_s": 0.0,
             "end_s": round(baseline_end, 3), "attack": None, "counters_after": None, "counters_delta": None}
    quiet["neighbour"] = window_stats(ns, rs, 0.0, baseline_end)
    for ph in phases:
        ph["neighbour"] = window_stats(ns, rs, ph["start_s"], ph["end_s"])
    res = {
        "settings": cfg,
        "workers": cfg["workers"],
        "driver": a.scale_driver,
        "iamlet_args": ["--metrics-max-age=1s", f"--workers={cfg['workers']}", "--sts-rate-limit=10000"],
        "nofile": [soft, hard],
        "duration_s": round(total, 2),
        "upstream_requests": up.requests,
        "phases": [quiet] + phases,
        "overall": window_stats(ns, rs, 0.0, total + 1),
        # [t_s, latency_ms, status, error or null, late_ms] and [t_s, VmRSS KiB]
        "neighbour_series": ns,
        "rss_series": rs,
    }
    results["attack"] = res
    for ph in res["phases"]:
        n = ph["neighbour"]
        bench.log(f"attack {ph['id']:5}: neighbour {n['requests']} requests, {n['failures']} failures, "
                  f"p50/p99/max {fmt(n['p50_ms'], 2)}/{fmt(n['p99_ms'], 2)}/{fmt(n['max_ms'], 2)} ms, "
                  f"RSS max {fmt((n['max_rss_kib'] or 0) / 1024, 1)} MiB")
    return res


# ---------------------------------------------------------------- report


def problems(results):
    r = results.get("attack")
    if not r:
        return []
    smoke = results.get("smoke")
    p = []
    for ph in r["phases"]:
        n = ph["neighbour"]
        name = f"attack phase {ph['id']}"
        if not n["requests"]:
            p.append(f"{name}: no neighbour requests")
        if n["failures"]:
            p.append(f"{name}: {n['failures']} neighbour failures {n['failure_kinds']}")
        if not smoke and n["p99_ms"] is not None and n["p99_ms"] >= P99_LIMIT_MS:
            p.append(f"{name}: neighbour p99 {n['p99_ms']:.1f} ms ≥ {P99_LIMIT_MS:.0f} ms")
        if (n["max_rss_kib"] or 0) >= RSS_LIMIT_KIB:
            p.append(f"{name}: iamlet RSS {n['max_rss_kib'] / 1024:.1f} MiB ≥ {RSS_LIMIT_KIB // 1024} MiB")
        at = ph.get("attack")
        if at is None:
            continue
        # An attack that never got going proves nothing about the neighbour.
        if ph["id"] == "d":
            if at["mismatches"]:
                p.append(f"{name}: {at['mismatches']} answers for someone else's request {at['examples']}")
            if at["errors"]:
                p.append(f"{name}: {at['errors']} failed requests {at['examples']}")
            if not at["pairs"]:
                p.append(f"{name}: no request pairs")
        elif ph["id"] == "e":
            if not at["sent"]:
                p.append(f"{name}: the burst sent no connections")
            if at["release_s"] is None or at["release_s"] > RELEASE_LIMIT_S:
                left = at["at_watch_end"]
                what = "unknown (/proc unreadable)" if left is None else f"{left[0]} held, {left[1]} not yet accepted"
                p.append(f"{name}: iamlet still had sockets for the departed strangers {RELEASE_LIMIT_S:g} s after "
                         f"the burst ({what} at {at['watched_s']:g} s)")
        elif ph["id"] == "f":
            if not at["requests"]:
                p.append(f"{name}: the flood sent no requests")
            elif not at["status"]["200"]:
                p.append(f"{name}: no pass-through request answered 200 {at['heads']['examples'] + at['gets']['examples']}")
            if at["upstream_peak_open"] > at["upstream_cap"]:
                p.append(f"{name}: {at['upstream_peak_open']} upstream connections open at once > "
                         f"{r['workers']} workers × {UPSTREAM_PER_WORKER} = {at['upstream_cap']}")
        elif not at.get("opened"):
            p.append(f"{name}: the attack opened no connections")
        if ph.get("counters_after") is None:
            p.append(f"{name}: /metrics scrape after the phase failed")
    return p


def markdown(results, svg_rel):
    r = results["attack"]
    cfg = r["settings"]
    L = []
    L.append(f"Neighbour under attack ({r['driver']} driver, {r['workers']} workers, default limits, "
             f"`{' '.join(r['iamlet_args'])}`; {cfg['seconds']:g} s per phase, {cfg['quiet']:g} s quiet between). "
             f"The neighbour pod ({NEIGHBOUR}) asks for its credentials {NEIGHBOUR_RATE} times a second, each on a "
             f"new connection; the attacker pod is {ATTACKER}, the slowloris sources {SLOW_SOURCES[0]}–"
             f"{SLOW_SOURCES[-1].rsplit('.', 1)[1]} and the burst's {STRANGERS[0]}–{STRANGERS[-1].rsplit('.', 1)[1]} "
             f"are not pods. Counters are iamlet's own, their increase over "
             f"the phase, scraped {cfg['quiet']:g} s after it (more than `--metrics-max-age` later: a fresh render). "
             f"Chart: ![neighbour latency and RSS under attack]({svg_rel})")
    L.append("")
    L.append("| phase | attack | neighbour requests | failures | p50 / p99 / max ms | max RSS MiB | "
             "rejected per_source / worker_full / strangers | evicted | abandoned | /metrics renders | "
             "write_stalled | header_timeout | upstream busy / opened |")
    L.append("|---" * 13 + "|")
    for ph in r["phases"]:
        n = ph["neighbour"]
        at = ph.get("attack")
        if at is None:
            what = "none"
        elif ph["id"] == "d":
            what = (f"{at['pairs']:,} pairs; **{at['mismatches']} wrong answers**, {at['errors']} errors; "
                    f"interim answers reaching clients {at['interim_seen_by_clients']}, Expect forwarded "
                    f"{at['expect_forwarded']}")
        elif ph["id"] == "e":
            if at["release_s"] is None:
                rel = f"**not all released within {at['watched_s']:.1f} s** after it"
            elif at["release_s"] == 0:
                rel = "**nothing left to release**"
            else:
                rel = f"**all released {at['release_s']:.2f} s** after it"
            held = at["at_burst_end"]
            what = (f"{at['sent']:,} of {at['planned']:,} connections sent and closed in {at['burst_s']:.2f} s "
                    f"({at['connect_failures']} connect failures, {at['send_errors']} cut off); at the burst's end "
                    f"iamlet held {fmt(held and held[0])} sockets for them, {fmt(held and held[1])} not yet accepted: "
                    f"{rel} (a reading of /proc took ≤ {at['read_ms_max']:.0f} ms)")
        elif ph["id"] == "f":
            st, h, g = at["status"], at["heads"], at["gets"]
            what = (f"{at['requests']:,} requests ({h['sent']:,} HEAD on {at['head_connections']} connections, "
                    f"{g['sent']:,} GET in {at['bursts']} bursts): 200 {st['200']:,} / 503 {st['503']:,} / other "
                    f"{st['other']:,} / no answer {st['errors']:,}; upstream **{at['upstream_accepted']} connections "
                    f"accepted, at most {at['upstream_peak_open']} open** (cap {at['upstream_cap']})"
                    + (f"; {at['head_answers_with_body']} HEAD answers with a body" if at["head_answers_with_body"] else "")
                    + (f"; {at['upstream_heads_seen']} HEADs reached the upstream as HEAD"
                       if at["upstream_heads_seen"] else ""))
        else:
            what = (f"{at['opened']:,} opened ({at['connect_failures']} failed), {at['closed_by_agent']:,} closed by "
                    f"iamlet before the end")
        d = ph.get("counters_delta") or {}
        name = ph["title"] if at is None else f"({ph['id']}) {ph['title']}"
        L.append(f"| {name} | {what} | {n['requests']:,} | **{n['failures']}** | "
                 f"{fmt(n['p50_ms'], 2)} / {fmt(n['p99_ms'], 2)} / {fmt(n['max_ms'], 1)} | "
                 f"{fmt((n['max_rss_kib'] or 0) / 1024, 1)} | {fmt(d.get('rejected_per_source'))} / "
                 f"{fmt(d.get('rejected_worker_full'))} / {fmt(d.get('rejected_strangers'))} | {fmt(d.get('evicted'))} | "
                 f"{fmt(d.get('abandoned'))} | {fmt(d.get('renders'))} | "
                 f"{fmt(d.get('write_stalled'))} | {fmt(d.get('header_timeout'))} | "
                 f"{fmt(d.get('upstream_busy'))} / {fmt(d.get('upstream_opened'))} |")
    L.append("")
    smoke = results.get("smoke")
    o = r["overall"]
    L.append(f"- Phases: (a) {cfg['conns']:,} connections from {ATTACKER}, each sending one role-list request "
             f"and never reading; (b) {cfg['scrapers']} sockets with `SO_RCVBUF=4096` each pipelining "
             f"{cfg['pipelined']} `GET /metrics` and never reading; (c) {cfg['slowloris']:,} slowloris connections "
             f"round robin from 10 sources, one header byte every 500 ms; (d) the upstream sends `100 Continue` "
             f"before every answer while `GET /latest/meta-data/a-N` from {ATTACKER} (with `Expect: 100-continue`) "
             f"and `…/b-N` from {NEIGHBOUR} alternate, each on a new connection, each checked for its own marker; "
             f"(e) {len(STRANGERS)} sources that are not pods × {cfg['stranger_conns']:,} connections "
             f"({len(STRANGERS) * cfg['stranger_conns']:,}), each sending {cfg['stranger_requests']} pipelined "
             f"`GET / HTTP/1.1` ({cfg['stranger_requests'] * len(STRANGER_REQUEST):,} bytes) and closing at once, "
             f"then the phase's length with the neighbour alone while /proc (iamlet's descriptors against "
             f"`/proc/PID/net/tcp`, and connections still in its listen queue) is read every 50 ms until iamlet "
             f"holds nothing for those sources; (f) from {ATTACKER}, {cfg['heads']:,} `HEAD {FLOOD_PATH}` one after "
             f"another over {cfg['head_conns']} keep-alive connections and, meanwhile, up to {cfg['bursts']} bursts of "
             f"{cfg['burst']} concurrent `GET {FLOOD_PATH}` on new connections (the phase's time bounds both); the "
             f"marker upstream (HTTP/1.1 keep-alive) counts the connections iamlet opens to it and the most open at "
             f"once.")
    L.append("- Reading the counters: /metrics renders include the harness's own scrape after each phase; "
             "write_stalled also counts the scrape sockets the harness resets at the end of a phase shorter "
             "than `--write-timeout` (5 s), and header_timeout only shows when a phase outlasts "
             "`--header-read-timeout` (5 s). rejected strangers: connections from non-pods closed at accept while "
             "non-pods held their share (a sixteenth of `--max-connections-per-worker`, per worker); abandoned: "
             "requests given up because their client hung up while they waited; upstream busy: pass-through "
             "requests answered 503 for want of an upstream connection within `--upstream-connect-timeout`; "
             "upstream opened: iamlet's count of connections opened to the metadata service.")
    L.append(f"- Whole run: {o['requests']:,} neighbour requests, {o['failures']} failures, max latency "
             f"{fmt(o['max_ms'], 1)} ms, max RSS {fmt((o['max_rss_kib'] or 0) / 1024, 1)} MiB"
             + f"; limits: zero failures, zero wrong answers, "
             + ("" if smoke else f"p99 < {P99_LIMIT_MS:.0f} ms per phase, ")
             + f"RSS < {RSS_LIMIT_KIB // 1024} MiB, nothing held for the departed strangers "
             + f"{RELEASE_LIMIT_S:g} s after the burst, at most {r['workers']} × {UPSTREAM_PER_WORKER} upstream "
             + "connections open at once in (f)"
             + ". " + ("No problems." if not problems(results) else "Problems: " + "; ".join(problems(results)) + "."))
    L.append("")
    return "\n".join(L) + "\n"


def svg(results):
    r = results["attack"]
    ns, rs = r["neighbour_series"], r["rss_series"]
    phases = [p for p in r["phases"] if p["id"] != "quiet"]
    W, left, right = 980, 70, 20
    top1, h1 = 50, 300
    top2, h2 = top1 + h1 + 60, 160
    H = top2 + h2 + 50
    tmax = max([r["duration_s"]] + [x[0] for x in ns] + [x[0] for x in rs] + [1.0])
    pw = W - left - right

    def X(t):
        return left + pw * t / tmax

    lats = [x[1] for x in ns if x[3] is None and x[1] > 0]
    lo = 0.1
    hi = max(lats + [P99_LIMIT_MS * 2])
    lmin, lmax = math.log10(lo), math.ceil(math.log10(hi))

    def Y1(ms):
        v = min(max(math.log10(max(ms, lo)), lmin), lmax)
        return top1 + h1 - h1 * (v - lmin) / (lmax - lmin)

    # Ticks every 16 MiB, the axis one tick above the highest of the samples and the limit.
    kmax = (math.floor(max([k for _, k in rs] + [RSS_LIMIT_KIB]) / (16 * 1024)) + 1) * 16 * 1024

    def Y2(kib):
        return top2 + h2 - h2 * kib / kmax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    colours = ["#fde2c4", "#d8e8f8", "#e2f2d8", "#efdcf3", "#f8f3c4", "#d4f0ee"]
    for i, p in enumerate(phases):
        x0, x1 = X(p["start_s"]), X(p["end_s"])
        for top, h in ((top1, h1), (top2, h2)):
            out.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(1.0, x1 - x0):.1f}" height="{h}" '
                       f'fill="{colours[i % len(colours)]}"/>')
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{top1 + 14}" text-anchor="middle" font-weight="bold">'
                   f'({p["id"]})</text>')
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{top1 + 27}" text-anchor="middle" font-size="9">'
                   f'{esc(short_title(p, r["settings"]))}</text>')
        at = p.get("attack") or {}
        if p["id"] == "e" and at.get("release_s") is not None:
            # When iamlet held nothing more for the departed strangers.
            x = X(p["start_s"] + at["burst_s"] + at["release_s"])
            out.append(f'<line x1="{x:.1f}" y1="{top1 + 32}" x2="{x:.1f}" y2="{top2 + h2}" stroke="#555" '
                       f'stroke-dasharray="2,2"/>')
            out.append(f'<text x="{x + 2:.1f}" y="{top1 + 40}" font-size="9">released</text>')
    out.append(f'<text x="{left}" y="{top1 - 14}" font-size="13" font-weight="bold">neighbour credentials request '
               f'latency, ms (log; {NEIGHBOUR_RATE}/s, new connection each; red ×: failed'
               + ("" if results.get("smoke") else f"; dashed: {P99_LIMIT_MS:.0f} ms") + ')</text>')
    for e in range(int(lmin), int(lmax) + 1):
        y = Y1(10 ** e)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - right}" y2="{y:.1f}" stroke="#ccc"/>')
        out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{10 ** e:g}</text>')
    if not results.get("smoke"):
        y = Y1(P99_LIMIT_MS)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - right}" y2="{y:.1f}" stroke="#d62728" stroke-dasharray="4,3"/>')
    pts = []
    for t, ms, _st, err, _late in ns:
        if err is None:
            pts.append(f'<circle cx="{X(t):.1f}" cy="{Y1(ms):.1f}" r="1.3"/>')
        else:
            x = X(t)
            y = top1 + 4
            pts.append(f'<path d="M{x - 3:.1f},{y - 3:.1f}L{x + 3:.1f},{y + 3:.1f}M{x - 3:.1f},{y + 3:.1f}L{x + 3:.1f},{y - 3:.1f}" '
                       f'stroke="#d62728" stroke-width="1.5"/>')
    out.append('<g fill="#1f77b4" fill-opacity="0.6">' + "".join(pts) + "</g>")
    out.append(f'<rect x="{left}" y="{top1}" width="{pw}" height="{h1}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left}" y="{top2 - 14}" font-size="13" font-weight="bold">iamlet RSS, MiB (VmRSS every 100 ms; '
               f'dashed: {RSS_LIMIT_KIB // 1024} MiB)</text>')
    for k in range(int(kmax // (16 * 1024)) + 1):
        v = k * 16 * 1024
        y = Y2(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - right}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{v / 1024:.0f}</text>')
    y = Y2(RSS_LIMIT_KIB)
    out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - right}" y2="{y:.1f}" stroke="#d62728" stroke-dasharray="4,3"/>')
    if rs:
        out.append('<polyline fill="none" stroke="#2ca02c" stroke-width="1.5" points="'
                   + " ".join(f"{X(t):.1f},{Y2(k):.1f}" for t, k in rs) + '"/>')
    out.append(f'<rect x="{left}" y="{top2}" width="{pw}" height="{h2}" fill="none" stroke="#333"/>')
    step = 5 if tmax > 20 else 1
    t = 0
    while t <= tmax:
        x = X(t)
        out.append(f'<line x1="{x:.1f}" y1="{top2 + h2}" x2="{x:.1f}" y2="{top2 + h2 + 4}" stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{top2 + h2 + 16}" text-anchor="middle">{t:g}</text>')
        t += step
    out.append(f'<text x="{left + pw / 2:.1f}" y="{top2 + h2 + 34}" text-anchor="middle">seconds since the neighbour '
               f'started</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def short_title(p, cfg):
    return {"a": f"{cfg['conns']:,} conns, never read", "b": f"{cfg['scrapers']} × {cfg['pipelined']} /metrics unread",
            "c": f"{cfg['slowloris']:,} slowloris", "d": "upstream 100 Continue",
            "e": f"{len(STRANGERS)} × {cfg['stranger_conns']} stranger burst",
            "f": "pass-through flood"}.get(p["id"], p["title"])


