"""Worker scaling: the same client load against iamlet started with `--workers W`, for W = 1 to
the number of cores (at least 1 and 2), a fresh iamlet for each run.

The load is the `creds-keepalive` scenario's: cached credentials (`GET
/latest/meta-data/iam/security-credentials/<role>` from the pod at 127.0.0.1) over 50 keep-alive
connections, with the same client (oha when the run has it, else the built-in `tool load`).
Measured per run: req/s, latency, the server's CPU time per request (utime + stime of every
thread, /proc/PID/stat deltas, through bench.measure, never under the server CPU cap), the
client's CPU time per request (its rusage), how busy the whole machine was (/proc/stat), and
the ratio to linear scaling, req/s at W / (W × req/s at 1 worker).

CPU assignment is recorded as it was: by default neither iamlet nor the client is pinned (both
may use every core, the scheduler decides), so on a small machine the client competes with the
server for the same cores; `--workers-server-cpus` / `--workers-client-cpus` pin them with
taskset. Called from bench.py as the part `workers`, with bench itself as `bench` (its helpers
and its process list). Standard library only; loopback only; every run is bounded in time and,
with the built-in client, in count.
"""

import copy
import os
import resource
import subprocess
import time

from report import esc, fmt, med, option, run_problems

CONNS = 50
# The built-in client's bound in count, per second of a run: far above what one core answers.
MAX_REQ_PER_S = 2_000_000


def settings(a):
    """The command line's, else the full run's or the smoke's."""
    smoke = a.smoke

    def pick(name, full, short):
        return option(a, name, full, short)

    cores = os.cpu_count() or 1
    # W = 1..cores, at least 1 and 2; the smoke stops at 4 to stay within a few seconds.
    wmax = pick("workers_max", max(2, cores), max(2, min(cores, 4)))
    return {
        "max_workers": wmax,
        "seconds": pick("workers_seconds", 10.0, 0.5),
        "warm_s": 0.2 if smoke else 1.0,
        "reps": pick("workers_reps", 3, 1),
        "conns": pick("workers_conns", CONNS, CONNS),
        "server_cpus": pick("workers_server_cpus", "", ""),
        "client_cpus": pick("workers_client_cpus", "", ""),
    }


def machine_ticks():
    """(busy, total) jiffies over all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    total = sum(v[:8])  # guest time is already in user
    return total - idle, total


def client_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def affinity(pid):
    try:
        return cpu_list(os.sched_getaffinity(pid))
    except OSError:
        return None


def cpu_list(cpus):
    """{0, 1, 2, 5} → "0-2,5"."""
    cpus = sorted(cpus)
    out, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def run(env, results, bench):
    a = env.a
    cfg = settings(a)
    counts = list(range(1, cfg["max_workers"] + 1))
    pods = os.path.join(env.work, "workers-pods.json")
    subprocess.run(bench.tool(a, "gen-pods", "--out", pods, "--count", str(a.pods), "--roles", str(a.roles), "--net", "10",
                              "--prefix", "lt", "--local-role", bench.ROLE), check=True, stdout=subprocess.DEVNULL)
    client = "oha" if a.oha else "tool"
    # Its own worker count and CPU assignment, never the saturating runs' cap; everything else
    # as bench starts iamlet and its clients elsewhere.
    e2 = copy.copy(env)
    e2.a = copy.copy(a)
    e2.a.server_cpus = cfg["server_cpus"] or None
    e2.a.client_cpus = cfg["client_cpus"] or None
    e2.cap = None
    here = cpu_list(os.sched_getaffinity(0))
    runs = []
    for rep in range(cfg["reps"]):
        for w in (counts if rep % 2 == 0 else list(reversed(counts))):
            e2.a.workers = w
            srv = bench.start_iamlet(e2, a.scale_driver, pods, name=f"workers-{w}")
            try:
                threads = bench.status_kib(srv.pid, "Threads")
                server_aff = affinity(srv.pid)
                warm = dict(id="warm", path=bench.CREDS, conns=cfg["conns"], duration=cfg["warm_s"], client=client,
                            max_requests=int(cfg["warm_s"] * MAX_REQ_PER_S) + 1)
                bench.run_client(e2, srv.port, warm, f"workers-warm-{w}-r{rep}")
                sc = dict(id="workers", path=bench.CREDS, conns=cfg["conns"], duration=cfg["seconds"], client=client,
                          max_requests=int(cfg["seconds"] * MAX_REQ_PER_S) + 1)
                m0, c0, t0 = machine_ticks(), client_cpu_s(), time.monotonic()
                res = bench.measure(e2, srv, sc, f"workers-{w}-r{rep}")
                m1, c1, wall = machine_ticks(), client_cpu_s(), time.monotonic() - t0
            finally:
                bench.stop(srv)
            dur = res.get("duration_s") or wall
            res.update(workers=w, rep=rep, driver=a.scale_driver, threads=threads,
                       server_affinity=server_aff, client_affinity=cfg["client_cpus"] or here)
            res["server_cores"] = res["cpu_s"] / dur if dur else None
            res["client_cpu_s"] = c1 - c0
            res["client_cpu_us_per_req"] = (c1 - c0) * 1e6 / res["requests"] if res["requests"] else None
            res["client_cores"] = (c1 - c0) / dur if dur else None
            busy, total = m1[0] - m0[0], m1[1] - m0[1]
            res["machine_busy_pct"] = 100.0 * busy / total if total else None
            # What the rest of the machine used meanwhile (the fakes, the harness, other tenants).
            if total and res["server_cores"] is not None:
                ncpu = os.cpu_count() or 1
                res["other_cores"] = max(0.0, ncpu * busy / total - res["server_cores"] - res["client_cores"])
            runs.append(res)
            bench.log(f"workers {w} rep {rep}: {res['rps']:9.0f} req/s  p99 {res['p99_us']:7.0f} µs  "
                      f"server {res['cpu_us_per_req'] or 0:5.1f} µs/req ({res['server_cores'] or 0:.2f} cores)  "
                      f"client {res['client_cpu_us_per_req'] or 0:5.1f} µs/req  machine busy "
                      f"{res['machine_busy_pct'] or 0:.0f} %  errors {res['errors']}")
            time.sleep(a.pause)
    res = {"settings": cfg, "driver": a.scale_driver, "path": bench.CREDS, "client": runs[0]["client"] if runs else client,
           "cores": os.cpu_count(), "harness_affinity": here, "runs": runs, "summary": summarize(runs)}
    results["workers"] = res
    for s in res["summary"]:
        bench.log(f"workers {s['workers']}: {fmt(s['rps'])} req/s, {fmt(s['ratio_linear'], 2)}× of linear, "
                  f"{fmt(s['cpu_us_per_req'], 2)} µs CPU/req")
    return res


def summarize(runs):
    out = []
    base = None
    for w in sorted({r["workers"] for r in runs}):
        rs = [r for r in runs if r["workers"] == w]
        s = {
            "workers": w,
            "n": len(rs),
            "rps": med([r["rps"] for r in rs]),
            "p50_us": med([r.get("p50_us") for r in rs]),
            "p99_us": med([r.get("p99_us") for r in rs]),
            "cpu_us_per_req": med([r.get("cpu_us_per_req") for r in rs]),
            "server_cores": med([r.get("server_cores") for r in rs]),
            "client_cpu_us_per_req": med([r.get("client_cpu_us_per_req") for r in rs]),
            "client_cores": med([r.get("client_cores") for r in rs]),
            "machine_busy_pct": med([r.get("machine_busy_pct") for r in rs]),
            "other_cores": med([r.get("other_cores") for r in rs]),
            "threads": max(r.get("threads") or 0 for r in rs),
            "requests": sum(r.get("requests", 0) for r in rs),
            "errors": sum(r.get("errors", 0) for r in rs),
            "rps_runs": [r["rps"] for r in sorted(rs, key=lambda r: r["rep"])],
        }
        if w == 1:
            base = s["rps"]
        s["linear_rps"] = w * base if base else None
        s["ratio_linear"] = s["rps"] / s["linear_rps"] if s["linear_rps"] else None
        out.append(s)
    return out


# ---------------------------------------------------------------- report


def problems(results):
    r = results.get("workers")
    if not r:
        return []
    p = run_problems("workers", r["runs"], lambda x: f"{x['workers']} rep {x['rep']}")
    if not any(s["workers"] == 1 for s in r["summary"]):
        p.append("workers: no 1-worker run, no ratio to linear")
    return p


def assignment(r):
    cfg = r["settings"]
    aff = r["harness_affinity"]
    srv = (f"iamlet pinned to CPU {cfg['server_cpus']} (taskset)" if cfg["server_cpus"]
           else f"iamlet not pinned (allowed CPUs {aff}; iamlet pins no worker itself)")
    cli = (f"the client pinned to CPU {cfg['client_cpus']} (taskset)" if cfg["client_cpus"]
           else f"the client not pinned either (allowed CPUs {aff})")
    return srv, cli


def markdown(results, svg_rel):
    r = results["workers"]
    cfg = r["settings"]
    e = results["environment"]
    cores = r["cores"]
    srv, cli = assignment(r)
    client = "oha" if r["client"] == "oha" else "the built-in client (`tool load`, one thread per connection)"
    L = []
    L.append(f"Worker scaling (`workers.py`; iamlet {e.get('iamlet_profile', '')} build, {r['driver']} driver, "
             f"`--workers W` for W = 1–{cfg['max_workers']}, a fresh iamlet per run). Load: the `creds-keepalive` "
             f"request path — cached credentials, `GET {r['path']}` from the pod at 127.0.0.1 — over "
             f"{cfg['conns']} keep-alive connections with {client}; {cfg['reps']} repetition{'s' if cfg['reps'] != 1 else ''} × "
             f"{cfg['seconds']:g} s per W after {cfg['warm_s']:g} s of warm-up, W order alternating, medians. "
             f"CPU assignment: {srv}; {cli}; the fake STS and fake IMDS on CPU {e.get('client_cpus') or 'any'} "
             f"with moto (idle here: every answer is cached). No CPU cap. Chart: ![req/s and CPU per request by worker "
             f"count]({svg_rel})")
    L.append("")
    L.append("| workers | req/s | W × 1-worker req/s | ratio to linear | server CPU µs/req | server CPU (cores) | "
             "client CPU µs/req | client CPU (cores) | machine busy | other processes (cores) | p50 / p99 µs | "
             "iamlet threads | errors |")
    L.append("|---" * 13 + "|")
    for s in r["summary"]:
        L.append(f"| {s['workers']} | {fmt(s['rps'])} | {fmt(s['linear_rps'])} | **{fmt(s['ratio_linear'], 2)}×** | "
                 f"{fmt(s['cpu_us_per_req'], 2)} | {fmt(s['server_cores'], 2)} | {fmt(s['client_cpu_us_per_req'], 2)} | "
                 f"{fmt(s['client_cores'], 2)} | {fmt(s['machine_busy_pct'])} % | {fmt(s['other_cores'], 2)} | {fmt(s['p50_us'])} / {fmt(s['p99_us'])} | "
                 f"{s['threads']} | {s['errors']} |")
    L.append("")
    L.append("- Ratio to linear = median req/s at W / (W × median req/s at 1 worker). Server CPU: utime + stime of "
             "every iamlet thread (/proc/PID/stat) over the run / requests answered; client CPU: the client's "
             "rusage; machine busy: all CPUs, /proc/stat, over the run; other processes: the machine's busy cores less "
             "iamlet's and the client's (the fakes, the harness, anything else running on the machine). "
             "Per-run req/s: " + "; ".join(f"W={s['workers']}: " + ", ".join(fmt(x) for x in s["rps_runs"])
                                          for s in r["summary"]) + ".")
    pinned_apart = cfg["server_cpus"] and cfg["client_cpus"] and not set(parse_cpus(cfg["server_cpus"])) & set(parse_cpus(cfg["client_cpus"]))
    caveat = (f"- Caveat: this machine has {cores} core{'s' if cores != 1 else ''}, so it cannot show scaling beyond "
              f"{cores} worker{'s' if cores != 1 else ''}")
    if pinned_apart:
        caveat += (f"; with the client pinned apart from iamlet, iamlet's {len(parse_cpus(cfg['server_cpus']))} CPU(s) "
                   "bound what more workers can add.")
    else:
        top = r["summary"][-1] if r["summary"] else None
        caveat += ("; and the load client runs on the same cores as iamlet and competes with it for them (its CPU "
                   "per request is in the table)")
        if top and top["machine_busy_pct"] is not None:
            caveat += (f": at W = {top['workers']} the machine was {fmt(top['machine_busy_pct'])} % busy, iamlet "
                       f"using {fmt(top['server_cores'], 2)} and the client {fmt(top['client_cores'], 2)} of its "
                       f"{cores} cores")
        caveat += (". The ratio to linear therefore measures this machine as much as iamlet: a worker cannot get "
                   "CPU the client is using. Cores to spare for the client (or a client on another machine) are "
                   "what would show iamlet's own scaling.")
    if r["client"] != "oha":
        caveat += (f" (The load average counts the client's {cfg['conns']} runnable threads; the other-processes "
                   "column is what else ran.)")
    L.append(caveat)
    ps = problems(results)
    L.append("- " + ("No problems (zero errors in every run)." if not ps else "Problems: " + "; ".join(ps) + "."))
    L.append("")
    return "\n".join(L) + "\n"


def parse_cpus(spec):
    out = []
    for part in filter(None, str(spec).split(",")):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def svg(results):
    r = results["workers"]
    summ = r["summary"]
    W, left, right = 980, 70, 200
    top1, h1 = 50, 260
    top2, h2 = top1 + h1 + 70, 200
    H = top2 + h2 + 80
    pw = W - left - right
    n = max(1, len(summ))
    gw = pw / n
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']

    def axis(top, h, vmax, label, nd=0):
        out.append(f'<text x="{left}" y="{top - 14}" font-size="13" font-weight="bold">{esc(label)}</text>')
        for k in range(5):
            v = vmax * k / 4
            y = top + h - h * k / 4
            out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{v:,.{nd}f}</text>')
        out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{h}" fill="none" stroke="#333"/>')
        for i, s in enumerate(summ):
            cx = left + i * gw + gw / 2
            out.append(f'<text x="{cx:.1f}" y="{top + h + 16}" text-anchor="middle">{s["workers"]} '
                       f'worker{"s" if s["workers"] != 1 else ""}</text>')

    # Panel 1: req/s (bar: median, dots: runs), linear scaling as a dashed outline.
    vmax = max([s["rps"] or 0 for s in summ] + [s["linear_rps"] or 0 for s in summ]
               + [x for s in summ for x in s["rps_runs"]] + [1e-9]) * 1.1
    axis(top1, h1, vmax, "requests per second (bar: median; dots: runs; dashed: linear, W × 1 worker)")
    bw = gw * 0.5
    for i, s in enumerate(summ):
        x = left + i * gw + (gw - bw) / 2
        v = s["rps"] or 0
        bh = h1 * v / vmax
        out.append(f'<rect x="{x:.1f}" y="{top1 + h1 - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" fill="#1f77b4">'
                   f'<title>{s["workers"]} workers: {v:,.0f} req/s</title></rect>')
        if s["linear_rps"]:
            lh = h1 * s["linear_rps"] / vmax
            out.append(f'<rect x="{x:.1f}" y="{top1 + h1 - lh:.1f}" width="{bw:.1f}" height="{lh:.1f}" fill="none" '
                       f'stroke="#d62728" stroke-dasharray="5,3"/>')
        for k, rv in enumerate(s["rps_runs"]):
            dx = x + bw + 8 + 5 * k
            out.append(f'<circle cx="{dx:.1f}" cy="{top1 + h1 - h1 * rv / vmax:.1f}" r="2.5" fill="#333"/>')
        label = f"{v:,.0f}" + (f" ({s['ratio_linear']:.2f}× linear)" if s["ratio_linear"] is not None else "")
        out.append(f'<text x="{x + bw / 2:.1f}" y="{top1 + h1 - bh - 5:.1f}" text-anchor="middle" font-size="10">'
                   f'{esc(label)}</text>')

    # Panel 2: CPU µs per request, server and client side by side.
    series = [("iamlet CPU µs/req", "#2ca02c", "cpu_us_per_req"), ("client CPU µs/req", "#ff7f0e", "client_cpu_us_per_req")]
    vmax2 = max([(s[k] or 0) for s in summ for _, _, k in series] + [1e-9]) * 1.15
    axis(top2, h2, vmax2, "CPU time per request, µs (utime + stime)", nd=1)
    bw2 = gw * 0.7 / len(series)
    for i, s in enumerate(summ):
        x0 = left + i * gw + gw * 0.15
        for j, (name, colour, key) in enumerate(series):
            v = s[key] or 0
            bh = h2 * v / vmax2
            x = x0 + j * bw2
            out.append(f'<rect x="{x:.1f}" y="{top2 + h2 - bh:.1f}" width="{bw2 - 2:.1f}" height="{bh:.1f}" fill="{colour}">'
                       f'<title>{esc(name)}, {s["workers"]} workers: {v:.2f}</title></rect>')
            out.append(f'<text x="{x + (bw2 - 2) / 2:.1f}" y="{top2 + h2 - bh - 4:.1f}" text-anchor="middle" '
                       f'font-size="10">{v:.2f}</text>')
    lx = left + pw + 15
    items = [("#1f77b4", "req/s (median)", False), ("#d62728", "linear (W × 1 worker)", True)] + \
            [(c, n, False) for n, c, _ in series]
    for j, (colour, name, dashed) in enumerate(items):
        y = top1 + 10 + 20 * j
        if dashed:
            out.append(f'<rect x="{lx}" y="{y - 10}" width="12" height="12" fill="none" stroke="{colour}" stroke-dasharray="3,2"/>')
        else:
            out.append(f'<rect x="{lx}" y="{y - 10}" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{lx + 18}" y="{y}">{esc(name)}</text>')
    srv, cli = assignment(r)
    cfg = r["settings"]
    notes = [f"{r['cores']} cores; {cfg['conns']} keep-alive connections, client: {r['client']}",
             srv + ";", cli + "."]
    for k, t in enumerate(notes):
        out.append(f'<text x="{left}" y="{H - 42 + 13 * k}" font-size="10">{esc(t)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
