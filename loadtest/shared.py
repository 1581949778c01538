"""Shared cores: iamlet beside nginx (and the floor) with the servers and the client on the same
cores, neither pinned nor capped, as an agent on a node shares its cores with the pods that call
it. Cached credentials over 50 connections, keep-alive and a new connection per request, one
worker (nginx: one worker process) each, a fresh iamlet per driver per repetition, the servers'
order rotating between repetitions.

The matrix (bench.py) pins each server to a core of its own under a CPU cap, which compares CPU
per request. Here what also counts is how a server's way of waiting lets its client run: every
answer a server sends wakes a client thread, and a client thread woken on the server's core may
preempt it, a context switch per answer. A server that reaps completions in batches (io_uring)
is preempted at most once per batch; one that makes a system call per answer (epoll: iamlet's
legacy driver, nginx, the floor) can be preempted after each. So the server's context switches
per request are recorded beside req/s and CPU per request (voluntary and involuntary, summed
over its threads, from /proc/PID/task/*/status).

The client is wrk (`-t 2`, so that it can use both cores, as the servers may): light enough
that the servers' differences show. The smoke, which has no wrk, runs the built-in client and
checks only that every run answers without errors. Called from bench.py as the part `shared`,
with bench itself as `bench`. Standard library only; loopback only; every run is bounded in time
(wrk's `-d`, the built-in client's count and time, and a subprocess timeout).
"""

import copy
import os
import subprocess
import time

from report import fmt, med, option, run_problems

CONNS = 50
# The built-in client's bound in count, per second of a run: far above what one core answers.
MAX_REQ_PER_S = 2_000_000
MODES = (("keepalive", "cached credentials, keep-alive", True),
         ("new-conn", "cached credentials, new connection per request", False))


def settings(a):
    return {
        "seconds": option(a, "shared_seconds", 5.0, 0.5),
        "reps": option(a, "shared_reps", 3, 1),
        "conns": CONNS,
        "wrk_threads": 2,
    }


def ctx_switches(pids):
    """Voluntary + involuntary context switches of every thread of the processes."""
    n = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                            n += int(line.split()[1])
            except OSError:
                pass
    return n


def run(env, results, bench):
    a = env.a
    cfg = settings(a)
    pods = os.path.join(env.work, "shared-pods.json")
    subprocess.run(bench.tool(a, "gen-pods", "--out", pods, "--count", str(a.pods), "--roles", str(a.roles), "--net", "10",
                              "--prefix", "lt", "--local-role", bench.ROLE), check=True, stdout=subprocess.DEVNULL)
    client = "wrk" if a.wrk else "tool"
    # Neither pinned nor capped, one worker; everything else as bench starts them elsewhere.
    e2 = copy.copy(env)
    e2.a = copy.copy(a)
    e2.a.server_cpus = None
    e2.a.client_cpus = None
    e2.a.workers = 1
    e2.cap = None
    probe = bench.start_iamlet(e2, "epoll", pods, name="shared-probe")
    _, cred = bench.http(probe.port, bench.CREDS)
    answer = bench.raw_answer(probe.port, bench.CREDS)
    bench.stop(probe)
    others = {}
    if a.nginx:
        others["nginx"] = bench.start_nginx(e2, {bench.CREDS: "x" * len(cred)})
    if a.floor:
        others["floor"] = bench.start_floor(e2, answer)
    runs = []
    for rep in range(cfg["reps"]):
        servers = [("iamlet", "uring"), ("iamlet", "epoll"), *((name, "") for name in others)]
        k = rep % len(servers)
        servers = servers[k:] + servers[:k]
        iamlets = {}
        try:
            for server, driver in servers:
                if server == "iamlet":
                    iamlets[driver] = bench.start_iamlet(e2, driver, pods, name=f"shared-{driver}-r{rep}")
            for mode, _, keepalive in MODES:
                for server, driver in servers:
                    if server == "floor" and not keepalive:
                        continue  # the floor answers keep-alive only
                    proc = iamlets[driver] if server == "iamlet" else others[server]
                    sc = dict(id=f"shared-{mode}", path=bench.CREDS, conns=cfg["conns"], duration=cfg["seconds"],
                              client=client, keepalive=keepalive, threads=cfg["wrk_threads"],
                              max_requests=int(cfg["seconds"] * MAX_REQ_PER_S) + 1)
                    label = f"shared-{mode}-{server}{'-' + driver if driver else ''}-r{rep}"
                    pids = bench.server_pids(proc)
                    s0 = ctx_switches(pids)
                    res = bench.measure(e2, proc, sc, label)
                    s1 = ctx_switches(pids)
                    res.update(mode=mode, server=server, driver=driver, rep=rep)
                    res["ctx_switches_per_req"] = (s1 - s0) / res["requests"] if res["requests"] else None
                    runs.append(res)
                    bench.log(f"shared rep {rep} {mode:9s} {server:6s} {driver:5s} {res['rps']:9.0f} req/s  "
                              f"p99 {res['p99_us']:7.0f} µs  cpu {res['cpu_us_per_req'] or 0:5.1f} µs/req  "
                              f"ctx switches {res['ctx_switches_per_req'] or 0:.3f}/req  errors {res['errors']}")
                    time.sleep(a.pause)
        finally:
            for p in iamlets.values():
                bench.stop(p)
    for p in others.values():
        bench.stop(p)
    res = {"settings": cfg, "client": runs[0]["client"] if runs else client, "cores": os.cpu_count(),
           "runs": runs, "summary": summarize(runs)}
    results["shared"] = res
    for s in res["summary"]:
        bench.log(f"shared {s['mode']} {s['who']}: {fmt(s['rps'])} req/s, "
                  f"{fmt(s['vs_nginx'], 2)}× nginx (median of pairs)")
    return res


def who(r):
    return f"iamlet {r['driver']}" if r["server"] == "iamlet" else r["server"]


def summarize(runs):
    out = []
    for mode, title, _ in MODES:
        names = []
        for r in runs:
            if r["mode"] == mode and who(r) not in names:
                names.append(who(r))
        for name in names:
            rs = [r for r in runs if r["mode"] == mode and who(r) == name]
            ratios = []
            for r in rs:
                peer = [n for n in runs if n["mode"] == mode and n["server"] == "nginx" and n["rep"] == r["rep"]]
                if peer and peer[0]["rps"]:
                    ratios.append(r["rps"] / peer[0]["rps"])
            out.append({
                "mode": mode, "title": title, "who": name, "n": len(rs),
                "rps": med([r["rps"] for r in rs]),
                "p50_us": med([r.get("p50_us") for r in rs]),
                "p99_us": med([r.get("p99_us") for r in rs]),
                "cpu_us_per_req": med([r.get("cpu_us_per_req") for r in rs]),
                "ctx_switches_per_req": med([r.get("ctx_switches_per_req") for r in rs]),
                "vs_nginx": med(ratios) if name != "nginx" else None,
                "vs_nginx_runs": ratios if name != "nginx" else [],
                "errors": sum(r.get("errors", 0) for r in rs),
                "requests": sum(r.get("requests", 0) for r in rs),
            })
    return out


# ---------------------------------------------------------------- report


def problems(results):
    r = results.get("shared")
    if not r:
        return []
    return run_problems("shared", r["runs"], lambda x: f"{x['mode']} {who(x)} rep {x['rep']}")


def targets(results):
    """The cached-credentials goals on shared cores, where nginx ran: iamlet at 1.3× nginx
    with keep-alive and at least level with it on a new connection per request."""
    r = results.get("shared")
    t = []
    if not r:
        return t
    goals = {"keepalive": 1.3, "new-conn": 1.0}
    for s in r["summary"]:
        if s["who"].startswith("iamlet") and s["vs_nginx"] is not None:
            g = goals[s["mode"]]
            t.append((f"shared cores, {s['title']}: {s['who']} ≥ {g:.1f}× nginx req/s", f"{fmt(s['vs_nginx'], 2)}×",
                      s["vs_nginx"] >= g))
    return t


def markdown(results):
    r = results["shared"]
    cfg = r["settings"]
    client = (f"wrk -t {cfg['wrk_threads']} -c {cfg['conns']}" if r["client"] == "wrk"
              else f"the built-in client, {cfg['conns']} connections")
    L = [f"### Shared cores ({r['cores']} cores, servers and client unpinned and uncapped)", "",
         f"Cached credentials, {client}, {cfg['seconds']:g} s per run, {cfg['reps']} repetitions (servers in rotating "
         "order; a fresh iamlet per driver per repetition); one worker / worker process each. The ratio is the median "
         "of each repetition's pair with nginx. Context switches are the server's, voluntary and involuntary, per "
         "request.", "",
         "| mode | server | req/s | vs nginx (per repetition) | p50 / p99 µs | CPU µs/req | context switches/req | errors |",
         "|---|---|---|---|---|---|---|---|"]
    for s in r["summary"]:
        runs = ", ".join(f"{x:.2f}" for x in s["vs_nginx_runs"])
        vs = f"**{fmt(s['vs_nginx'], 2)}×** ({runs})" if s["vs_nginx"] is not None else "–"
        L.append(f"| {s['title']} | {s['who']} | {fmt(s['rps'])} | {vs} | {fmt(s['p50_us'])} / {fmt(s['p99_us'])} | "
                 f"{fmt(s['cpu_us_per_req'], 1)} | {fmt(s['ctx_switches_per_req'], 3)} | {s['errors']} |")
    L.append("")
    return "\n".join(L) + "\n"
